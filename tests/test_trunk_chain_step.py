"""``pathsgd::trunk_chain_step_`` (a conv net's whole Path-SGD step in one op call) on every device:

* bit-identical to the ops it is made of, composed in Python as csrc/trunk_chain_step.h documents
  (the float64 |w|^p leaves by reference.abs_pow_list_, abs_pow_forward, the device's
  dense_chain_step_ seeded and re-seeded through gamma0, abs_pow_vjp, the device's
  scaled_sgd_update_): the op is the conv-net step plan without Python;
* close to its pure-PyTorch twin ``pathsgd.reference.trunk_chain_step_`` (and, for the CUDA kernels,
  to the CPU op); the twin itself is checked end to end against the brute-force and unrolled-graph
  oracles by the optimizer tests (tests/test_general_graphs.py, test_sgd_parity_conv);
* bit-identical on a rerun; bad arguments raise naming the problem before anything changes; opcheck.

The op's arguments come from the step plan a user's conv net gets (``TrunkStepPlan``: its layout
and parameter order), on two small nets of odd sizes: a 1-D one (max pool, a bias-free conv, a
head with one bias) and a 2-D one (a residual addition, a padded max pool, a stride).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import ops, reference
from pathsgd.sgd_params import SgdParams
from pathsgd.step_plans import TrunkStepPlan
from test_dense_chain_step import HYPERS, TARGETS, _bad, _with, same_bits, sgd_params

F64 = torch.float64


class Net1d(nn.Module):
    input_shape = (2, 11)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv1d(5, 3, 3, stride=2, bias=False)
        self.fc1 = nn.Linear(6, 7, bias=False)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.conv1(x)), 2, ceil_mode=True)
        x = torch.flatten(F.relu(self.conv2(x)), 1)
        return self.fc2(F.relu(self.fc1(x)))


class Net2d(nn.Module):
    input_shape = (3, 7, 7)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 2, 2, stride=2)
        self.fc1 = nn.Linear(18, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x + F.relu(self.conv2(x)), 3, stride=1, padding=1)
        x = torch.flatten(F.relu(self.conv3(x)), 1)
        return self.fc2(F.relu(self.fc1(x)))


NETS = [Net1d, Net2d]
DTYPES = [torch.float32, F64, torch.bfloat16]
RTOL = {torch.float32: 2e-5, F64: 1e-12, torch.bfloat16: 1.6e-2}


def _cases():
    """Every (net, dtype, p, hyper) combination."""
    return list(itertools.product(range(len(NETS)), DTYPES, (1.0, 2.0, 3.0), range(len(HYPERS))))


class Case:
    """A net's trunk step: its plan's parameter order and layout, with random grads and buffers
    (CPU; placed on a device by ``args``)."""

    def __init__(self, net: int, dtype: torch.dtype, p: float, hyper: int, seed: int = 0) -> None:
        cls = NETS[net]
        torch.manual_seed(seed + 31 * net)
        model = cls().to(dtype)
        opt = pathsgd.PathSGD(model, lr=0.05, p=p, input_shape=cls.input_shape)
        plan = TrunkStepPlan(opt._graph_for_step(), opt.param_groups[0])
        assert plan.compiled
        self.p, self.h = p, HYPERS[hyper]
        self.layout, self.factors = plan.layout, plan.evaluator.vjp_factors(p)
        self.trunk = len(plan.trunk_params)
        self.params = [t.detach().clone() for t in plan.step_params]
        gen = torch.Generator().manual_seed(seed + 7 * hyper)
        draw = lambda t, scale: (torch.randn(t.shape, generator=gen, dtype=F64) * scale).to(dtype)  # noqa: E731
        self.grads = [draw(t, 1.0) for t in self.params]
        self.buffers = [draw(t, 0.1) for t in self.params]

    def args(self, device: str) -> tuple:
        """Fresh copies on ``device`` of everything the op mutates, in the op's argument order."""
        to = lambda ts: [t.clone().to(device) for t in ts]  # noqa: E731
        sgd = sgd_params(self.h, device)
        buffers = to(self.buffers) if self.h["momentum"] != 0 else []
        return (to(self.params), to(self.grads), buffers, list(self.layout), list(self.factors), self.p,
                sgd.packed(), sgd.lr_tensor)


def twin(*args):
    """reference.trunk_chain_step_ called with an op's arguments (its SgdParams unpacked)."""
    return reference.trunk_chain_step_(*args[:-2], SgdParams.unpack(args[-2], args[-1]))


def composed(ns):
    """The step composed of its ops as csrc/trunk_chain_step.h, the chain and update of namespace
    ``ns`` (the abs-pow programs are pathsgd._C's device-generic kernels), called with the op's
    arguments."""
    def run(params, grads, buffers, layout, factors, p, sgd, lr_tensor):
        t = reference._read_trunk_layout(layout)
        n, momentum = t["trunk"], SgdParams.unpack(sgd, lr_tensor).momentum != 0
        leaves = [w.to(F64, copy=True) for w in params[:n]]
        reference.abs_pow_list_(leaves, p)
        ones = torch.ones(t["input_shape"], dtype=F64, device=leaves[0].device)
        values = torch.ops.pathsgd.abs_pow_forward.default(ones, leaves, t["forward_program"], factors)
        value = lambda k: ones if k < 0 else values[k]  # noqa: E731
        gamma = [value(t["stop_value"]).reshape(-1).clone()]
        ns.dense_chain_step_.default(params[n:], grads[n:], buffers[n:] if momentum else [], t["bias_layers"], gamma,
                                     p, sgd, lr_tensor)
        slots = [value(k) for k in t["slot_values"]]
        stop = t["stop_slot"]
        kappas = torch.ops.pathsgd.abs_pow_vjp.default(slots, leaves, [gamma[0].reshape(slots[stop].shape)], [stop],
                                                       t["vjp_program"], factors)
        ns.scaled_sgd_update_.default(params[:n], grads[:n], buffers[:n] if momentum else [], kappas, p, sgd,
                                      lr_tensor)
    return run


def _state(args):
    """What the op writes: the parameters and their momentum buffers."""
    return [*args[0], *args[2]]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("net,dtype,p,hyper", _cases(), ids=lambda v: getattr(v, "__name__", None))
def test_trunk_chain_step_matches_its_ops_and_twin(target, net, dtype, p, hyper):
    name, ns, device, _ = target
    case = Case(net, dtype, p, hyper)
    got = case.args(device)
    assert ns.trunk_chain_step_.default(*got) is None
    # 1. its ops of the same device, composed in Python: the same bits
    steps = case.args(device)
    composed(ns)(*steps)
    for i, (a, b) in enumerate(zip(_state(got), _state(steps))):
        assert same_bits(a, b), f"output {i} differs from the composed ops"
    # 2. the pure-PyTorch twin (and the CPU op, for CUDA kernels): close
    others = [("reference", twin, device)]
    if name != "cpu":
        others.append(("cpu", torch.ops.pathsgd.trunk_chain_step_.default, "cpu"))
    for other_name, fn, other_device in others:
        other = case.args(other_device)
        fn(*other)
        for i, (a, b) in enumerate(zip(_state(got), _state(other))):
            a, b = a.cpu(), b.cpu()
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                                       msg=lambda m: f"state {i} vs {other_name}: {m}")
    # every trunk and head parameter moved (the comparison is not vacuous; bfloat16 can round a few away)
    moved = [not torch.equal(a.cpu(), b) for a, b in zip(got[0], case.params)]
    assert all(moved) if dtype != torch.bfloat16 else moved[0] and moved[-1], moved
    # 3. a rerun: the same bits
    again = case.args(device)
    ns.trunk_chain_step_.default(*again)
    for a, b in zip(_state(got), _state(again)):
        assert same_bits(a, b), "rerun differs"


@pytest.mark.parametrize("target", TARGETS)
def test_trunk_chain_step_strided_grads(target):
    """Non-contiguous gradients of trunk and head parameters: the same bits as contiguous ones."""
    _, ns, device, _ = target
    case = Case(1, torch.float32, 2.0, 1)
    plain = case.args(device)
    ns.trunk_chain_step_.default(*plain)
    strided = case.args(device)
    grads = [g.transpose(0, 1).contiguous().transpose(0, 1) if g.dim() >= 2 else g for g in strided[1]]
    assert not grads[0].is_contiguous() and not grads[case.trunk].is_contiguous()  # conv1 and fc1 weights
    ns.trunk_chain_step_.default(strided[0], grads, *strided[2:])
    for i, (a, b) in enumerate(zip(_state(strided), _state(plain))):
        assert same_bits(a, b), f"output {i} differs with strided grads"


TRUNK_ARG_NAMES = ("params", "grads", "momentum_buffers", "layout", "factors", "p")


@pytest.mark.parametrize("target", TARGETS)
def test_trunk_chain_step_bad_arguments_raise_and_change_nothing(target):
    _, ns, device, _ = target
    case = Case(0, torch.float32, 2.0, 1)  # Net1d: conv1 weight and bias, conv2 weight; fc1, fc2 weights, fc2 bias
    args = case.args(device)
    before = [t.clone() for t in _state(args)]
    params, grads, buffers, layout = args[:4]
    trunk = case.trunk
    cases = [
        (dict(grads=grads[:-1]), "5 grads for 6 params"),
        (dict(momentum_buffers=buffers[:2]), "momentum buffers"),
        (dict(p=0.5), "p must be >= 1"),
        (dict(layout=layout[:5]), "layout"),
        (dict(layout=[0] + layout[1:]), "trunk parameters must leave the head"),
        (dict(layout=[len(params)] + layout[1:]), "trunk parameters must leave the head"),
        # a bad trunk tensor: found before the head's chain (which runs first) changes anything
        (dict(grads=_with(grads, 0, grads[0][:, :1])), "trunk grad 0"),
        (dict(grads=_with(grads, 1, grads[1].double())), "trunk grad 1"),
        (dict(grads=_with(grads, 2, grads[2].to_sparse())), "[Ss]parse"),  # the dispatcher's refusal
        (dict(momentum_buffers=_with(buffers, 2, buffers[2].transpose(0, 1).contiguous().transpose(0, 1))),
         "trunk momentum buffer 2"),
        # a bad head tensor: the chain's own checks, before it changes anything
        (dict(grads=_with(grads, trunk, grads[trunk].double())), "weight grad 0"),
        (dict(momentum_buffers=_with(buffers, len(params) - 1, buffers[-1][:2])), "bias momentum buffer 0"),
    ]
    for changes, needle in cases:
        with pytest.raises(RuntimeError, match=needle):
            ns.trunk_chain_step_.default(*_bad(args, TRUNK_ARG_NAMES, **changes))
        for a, b in zip(_state(args), before):
            assert torch.equal(a, b), f"{changes}: the failed call changed a tensor"


@pytest.mark.skipif(not ops.has_kernel("cpu"), reason="compiled CPU kernels not built")
@pytest.mark.parametrize("net", range(len(NETS)))
@pytest.mark.parametrize("hyper", [0, 2])
def test_trunk_chain_step_opcheck(net, hyper):
    torch.library.opcheck(torch.ops.pathsgd.trunk_chain_step_.default, Case(net, torch.float32, 2.0, hyper).args("cpu"))


@pytest.mark.skipif(not ops.has_kernel("cpu"), reason="compiled CPU kernels not built")
def test_users_conv_net_step_is_one_op_call(monkeypatch):
    """A user's loop on the 2-D net: after the first (buffer-creating) step, every step is one
    trunk_chain_step_ call and nothing else of pathsgd's ops, with the bits of the general path."""
    torch.manual_seed(3)
    model = Net2d()
    twin_model = copy.deepcopy(model)
    calls = []
    kernel = ops.step_kernel

    def counted(name, device_type):
        fn = kernel(name, device_type)
        return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setattr(ops, "step_kernel", counted)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    twin_opt = pathsgd.PathSGD(twin_model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    twin_opt._step_plan = lambda: None  # the general path
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(6, *Net2d.input_shape, generator=gen), torch.randint(0, 2, (6,), generator=gen)
        for m, o in ((model, opt), (twin_model, twin_opt)):
            m.train()
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert calls == ["trunk_chain_step_"] * 3
    for (name, a), b in zip(model.named_parameters(), twin_model.parameters()):
        assert torch.equal(a, b), name
