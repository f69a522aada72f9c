"""The one-call step plan of a dense chain (functional.ChainStepPlan): after the first step, an MLP's
``optimizer.step()`` is one ``pathsgd::dense_chain_step_`` call with no per-parameter Python objects.

Every test runs a user's training loop twice, with the plan and with it switched off (the general
path: per-parameter updates, the same op), and requires the same bits; and checks which path ran.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import ops
from pathsgd.eval_tape import TapeEvaluator

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="the plan runs on the compiled kernels only")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 31)
        self.fc2 = nn.Linear(31, 17)
        self.fc3 = nn.Linear(17, 5)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = self.dropout(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc3(F.relu(self.fc2(x))), dim=1)


class Calls:
    """Counts the general path's per-parameter collection, the chain op's calls (by the general
    path's wrapper or by a step plan's kernel: plans built after this) and the conv-net step op's."""

    def __init__(self, monkeypatch) -> None:
        self.general = self.chain_op = self.trunk_op = 0
        collect, chain_op, kernel = pathsgd.PathSGD._collect_updates, ops.dense_chain_step_, ops.step_kernel

        def counted_collect(opt):
            self.general += 1
            return collect(opt)

        def counted(fn, name="dense_chain_step_"):
            def call(*args, **kwargs):
                if name == "dense_chain_step_":
                    self.chain_op += 1
                else:
                    self.trunk_op += 1
                return fn(*args, **kwargs)
            return call

        monkeypatch.setattr(pathsgd.PathSGD, "_collect_updates", counted_collect)
        monkeypatch.setattr(ops, "dense_chain_step_", counted(chain_op))
        monkeypatch.setattr(ops, "step_kernel", lambda name, device_type: kernel(name, device_type) and counted(
            kernel(name, device_type), name))


def train(model, opt, steps, seed=0, between=None):
    """The pytorch/examples MNIST loop on random data (a scheduler too); ``between(step)`` runs before each step."""
    gen = torch.Generator().manual_seed(seed)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model.train()
    for step in range(steps):
        x = torch.randn(16, 20, generator=gen).to(next(model.parameters()).dtype)
        target = torch.randint(0, 5, (16,), generator=gen)
        torch.manual_seed(seed + step)  # the same dropout masks in both runs
        opt.zero_grad()
        F.nll_loss(model(x), target).backward()
        if between is not None:
            between(step)
        opt.step()
        scheduler.step()


def without_plan(opt):
    opt._step_plan = lambda: None
    return opt


def assert_same(a: nn.Module, b: nn.Module, opt_a, opt_b) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
        if opt_a.defaults["momentum"] and x.requires_grad:
            assert torch.equal(opt_a.state[x]["momentum_buffer"], opt_b.state[y]["momentum_buffer"]), name


@pytest.mark.parametrize("hyper", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(momentum=0.0, clamp=0.3, p=3), dict(momentum=0.9, dampening=0.2, p=1)])
def test_mlp_steps_are_one_op_call_and_match_the_general_path(monkeypatch, hyper):
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    calls = Calls(monkeypatch)
    opt = pathsgd.PathSGD(model, lr=0.05, **hyper)
    train(model, opt, steps=6)
    # momentum: the first step creates the buffers on the general path; then the plan, one op call a step
    assert calls.general == (1 if hyper["momentum"] else 0), calls.general
    assert calls.chain_op == 6
    plan = opt._plan[1]
    size = plan.workspace.numel()
    train(model, opt, steps=2)  # later steps: the chain op's workspace does not grow
    assert plan.workspace.numel() == size and opt._plan[1] is plan
    twin_opt = without_plan(pathsgd.PathSGD(twin, lr=0.05, **hyper))
    train(twin, twin_opt, steps=6)
    train(twin, twin_opt, steps=2)
    assert calls.general == 8 + (1 if hyper["momentum"] else 0)
    assert_same(model, twin, opt, twin_opt)
    assert not torch.equal(model.fc1.weight, Net().fc1.weight)


def test_bad_gradient_gets_the_named_error_and_changes_nothing():
    torch.manual_seed(1)
    model = Net()
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9)
    train(model, opt, steps=2)
    before = [t.clone() for t in model.parameters()]
    buffers = [opt.state[t]["momentum_buffer"].clone() for t in model.parameters()]
    model.fc1.weight.grad = model.fc1.weight.grad.to_sparse()  # the first layer: the chain op checks it first
    with pytest.raises(RuntimeError, match="sparse gradients .*'fc1.weight'"):
        opt.step()
    for t, b, buf in zip(model.parameters(), before, buffers):
        assert torch.equal(t, b)
        assert torch.equal(opt.state[t]["momentum_buffer"], buf)


def test_frozen_layer_and_cast_model_take_the_general_path_and_match(monkeypatch):
    torch.manual_seed(2)
    model = Net()
    twin = copy.deepcopy(model)

    def between(step, net):
        if step == 2:
            net.fc2.weight.grad = None  # a parameter without a gradient this step
        if step == 3:
            net.double()  # cast after momentum steps: the buffers follow, as in torch.optim.SGD

    calls = Calls(monkeypatch)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9)
    train(model, opt, steps=6, between=lambda s: between(s, model))
    assert calls.general == 3  # first step, the missing gradient, the cast (dtypes then refused by the op)
    twin_opt = without_plan(pathsgd.PathSGD(twin, lr=0.05, momentum=0.9))
    train(twin, twin_opt, steps=6, between=lambda s: between(s, twin))
    assert model.fc1.weight.dtype == torch.float64
    assert opt.state[model.fc1.weight]["momentum_buffer"].dtype == torch.float64
    assert_same(model, twin, opt, twin_opt)


def test_no_plan_for_two_param_groups_or_a_replaced_parameter(monkeypatch):
    torch.manual_seed(3)
    model = Net()
    calls = Calls(monkeypatch)
    groups = [dict(params=[model.fc1.weight, model.fc1.bias], lr=0.01),
              dict(params=[t for n, t in model.named_parameters() if not n.startswith("fc1")])]
    opt = pathsgd.PathSGD(groups, lr=0.05, model=model)
    train(model, opt, steps=3)
    assert calls.general == 3
    single = pathsgd.PathSGD(model, lr=0.05)
    train(model, single, steps=2)
    assert calls.general == 3
    model.fc3.bias = nn.Parameter(model.fc3.bias.detach().clone())  # the optimizer holds the old one
    with torch.no_grad():
        old = single.param_groups[0]["params"][-1]
        assert old is not model.fc3.bias
    train(model, single, steps=1)
    assert calls.general == 4


# ---- conv nets: functional/step_plans.TrunkStepPlan ---------------------------------------------------------
class ConvNet(nn.Module):
    """The pytorch/examples MNIST net, scaled down (12x12 inputs), with an adaptive pool so that
    it takes several input sizes (a node without a compiled rule: the plan runs the evaluator), or
    without it (12x12 only: the trunk's forward and backward are compiled programs)."""

    def __init__(self, batchnorm: bool = False, adaptive: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, 1)
        self.bn = nn.BatchNorm2d(6) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(6, 8, 3, 1)
        self.pool = nn.AdaptiveAvgPool2d(4) if adaptive else nn.Identity()
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(128, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(self.pool(x)), 1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def train_cnn(model, opt, steps, seed=0, sizes=(12,), between=None):
    """The MNIST loop; BatchNorm in eval mode after ``model.train()``, as PathSGD's error shows."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    if isinstance(model.bn, nn.BatchNorm2d):
        model.bn.eval()
    for step in range(steps):
        size = sizes[step % len(sizes)]
        x = torch.randn(8, 1, size, size, generator=gen).to(next(model.parameters()).dtype)
        target = torch.randint(0, 5, (8,), generator=gen)
        torch.manual_seed(seed + step)
        opt.zero_grad()
        F.nll_loss(model(x), target).backward()
        if between is not None:
            between(step)
        opt.step()


class TrunkCalls(Calls):
    """Also counts the trunk's backward passes: the evaluator's ``backward`` (the general path, and
    the plan when a trunk node has no compiled rule; the plan's step op otherwise)."""

    def __init__(self, monkeypatch) -> None:
        super().__init__(monkeypatch)
        self.vjp = 0
        backward = TapeEvaluator.backward

        def counted(*args, **kwargs):
            self.vjp += 1
            return backward(*args, **kwargs)

        monkeypatch.setattr(TapeEvaluator, "backward", counted)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("hyper", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(momentum=0.0, clamp=0.3, p=3), dict(momentum=0.9, dampening=0.2, p=1)])
def test_cnn_steps_take_the_trunk_plan_and_match_the_general_path(monkeypatch, hyper, adaptive):
    torch.manual_seed(4)
    model = ConvNet(adaptive=adaptive)
    twin = copy.deepcopy(model)
    calls = TrunkCalls(monkeypatch)
    opt = pathsgd.PathSGD(model, lr=0.02, **hyper)
    train_cnn(model, opt, steps=5)
    first = 1 if hyper["momentum"] else 0  # the first momentum step creates the buffers
    assert calls.general == first, calls.general
    # one op a step when the trunk's passes are compiled programs, else the evaluator around the chain op
    assert (calls.trunk_op, calls.chain_op, calls.vjp) == ((0, 5, 5) if adaptive else (5 - first, first, first))
    assert isinstance(opt._plan[1], pathsgd.step_plans.TrunkStepPlan)
    assert opt._plan[1].compiled is not adaptive
    twin_opt = without_plan(pathsgd.PathSGD(twin, lr=0.02, **hyper))
    train_cnn(twin, twin_opt, steps=5)
    assert calls.general == 5 + first
    assert_same(model, twin, opt, twin_opt)
    assert not torch.equal(model.conv1.weight, ConvNet().conv1.weight)


def test_cnn_plan_follows_the_input_shape_and_eval_batchnorm(monkeypatch):
    torch.manual_seed(5)
    model = ConvNet(batchnorm=True)
    model.bn.eval()
    model.bn.requires_grad_(False)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    twin = copy.deepcopy(model)

    calls = TrunkCalls(monkeypatch)
    opt = pathsgd.PathSGD(model, lr=0.02, momentum=0.9)
    built = []
    new_plan = opt._new_step_plan
    opt._new_step_plan = lambda graph, group: built.append(graph.input_shape) or new_plan(graph, group)
    train_cnn(model, opt, steps=6, sizes=(12, 14))
    assert calls.general == 1 and calls.vjp == 6
    assert sorted(opt._graphs) == [(1, 12, 12), (1, 14, 14)]  # one graph per input shape, a plan each step
    assert built == [(1, 12, 12), (1, 14, 14)]  # one plan per graph, kept while the sizes alternate
    twin_opt = without_plan(pathsgd.PathSGD(twin, lr=0.02, momentum=0.9))
    train_cnn(twin, twin_opt, steps=6, sizes=(12, 14))
    assert_same(model, twin, opt, twin_opt)


@pytest.mark.parametrize("adaptive", [True, False])
def test_cnn_plan_bad_input_gets_the_named_error_and_changes_nothing(adaptive):
    torch.manual_seed(6)
    model = ConvNet(batchnorm=True, adaptive=adaptive)
    model.bn.eval()
    model.bn.requires_grad_(False)
    opt = pathsgd.PathSGD(model, lr=0.02, momentum=0.9)
    train_cnn(model, opt, steps=2)
    before = [t.clone() for t in model.parameters()]
    buffers = {t: opt.state[t]["momentum_buffer"].clone() for t in model.parameters() if t.requires_grad}

    def unchanged():
        for t, b in zip(model.parameters(), before):
            assert torch.equal(t, b)
        for t, buf in buffers.items():
            assert torch.equal(opt.state[t]["momentum_buffer"], buf)

    model.train()  # BatchNorm left in training mode (model.train() without model.bn.eval())
    with pytest.raises(ValueError, match="'bn'.*training mode"):
        opt.step()
    unchanged()
    model.bn.eval()
    good = model.conv2.weight.grad
    model.conv2.weight.grad = good.to_sparse()  # a trunk parameter: checked before the head's op runs
    with pytest.raises(RuntimeError, match="sparse gradients .*'conv2.weight'"):
        opt.step()
    unchanged()


@pytest.mark.parametrize("adaptive", [True, False])
def test_cnn_frozen_layer_and_cast_model_take_the_general_path_and_match(monkeypatch, adaptive):
    torch.manual_seed(7)
    model = ConvNet(adaptive=adaptive)
    twin = copy.deepcopy(model)

    def between(step, net):
        if step == 2:
            net.conv1.weight.grad = None  # a trunk parameter without a gradient this step
        if step == 3:
            net.double()  # cast after momentum steps: the buffers follow, as in torch.optim.SGD

    calls = TrunkCalls(monkeypatch)
    opt = pathsgd.PathSGD(model, lr=0.02, momentum=0.9)
    train_cnn(model, opt, steps=6, between=lambda s: between(s, model))
    assert calls.general == 3  # first step, the missing gradient, the cast (its buffers are cast there)
    twin_opt = without_plan(pathsgd.PathSGD(twin, lr=0.02, momentum=0.9))
    train_cnn(twin, twin_opt, steps=6, between=lambda s: between(s, twin))
    assert model.conv1.weight.dtype == torch.float64
    assert opt.state[model.conv1.weight]["momentum_buffer"].dtype == torch.float64
    assert_same(model, twin, opt, twin_opt)
