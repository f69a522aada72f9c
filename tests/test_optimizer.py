"""PathSGD as a torch.optim optimizer: SGD parity against the brute-force oracle, rescaling
invariance, clamp, clamp_after_step, state_dict, param groups, hooks, bad inputs, backends."""
from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from conftest import (OraclePathSGD, assert_params_equal, brute_force, loss_grads, make_mlp, params_of,
                      set_random_grads)

SGD_DEFAULTS = dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


def batches(n, in_dim, out_dim, seed=0, batch=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, in_dim, generator=gen, dtype=torch.float64).to(dtype),
             torch.randn(batch, out_dim, generator=gen, dtype=torch.float64).to(dtype)) for _ in range(n)]


def make_pair(widths, groups, defaults, seed=0, bias=True, dtype=torch.float64):
    """(model, PathSGD, twin model, brute-force oracle) with the same param groups (by name)."""
    model = make_mlp(widths, bias=bias, seed=seed, dtype=dtype)
    twin = copy.deepcopy(model)
    named = dict(model.named_parameters())
    if groups is None:
        groups = [{"names": list(named)}]
    torch_groups = [{"params": [named[n] for n in g["names"]], **{k: v for k, v in g.items() if k != "names"}}
                    for g in groups]
    opt = pathsgd.PathSGD(torch_groups, model=model, **defaults)
    oracle = OraclePathSGD(twin, groups, **defaults)
    return model, opt, twin, oracle


def assert_close_params(a: nn.Module, b: nn.Module, rtol=1e-10, atol=1e-12):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def train_pair(model, opt, twin, oracle, data, rtol=1e-10, atol=1e-12):
    for x, y in data:
        loss_grads(model, x, y)
        loss_grads(twin, x, y)
        opt.step()
        oracle.step()
        assert_close_params(model, twin, rtol, atol)


def state_snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_state_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key, value in a["state"][k].items():
            other = b["state"][k][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other)
            else:
                assert value == other


# ----------------------------------------------------------------------------------------------------------------
# (a) SGD parity with brute-force kappa
# ----------------------------------------------------------------------------------------------------------------

HYPER_SETS = [
    dict(SGD_DEFAULTS, lr=0.02),
    dict(SGD_DEFAULTS, lr=0.01, momentum=0.9),
    dict(SGD_DEFAULTS, lr=0.01, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(SGD_DEFAULTS, lr=0.005, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(SGD_DEFAULTS, lr=0.005, momentum=0.5, maximize=True, weight_decay=0.001),
]


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("hyper", HYPER_SETS, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()
                                                                  if v != SGD_DEFAULTS[k] or k == "lr"))
@pytest.mark.parametrize("widths,bias", [((3, 4, 3, 2), True), ((2, 3, 3), False),
                                         ((4, 2, 3, 1, 2), [False, True, True, False])])
def test_sgd_parity(widths, bias, hyper, p):
    names = [n for n, _ in make_mlp(widths, bias=bias).named_parameters()]
    model, opt, twin, oracle = make_pair(widths, [{"names": names, "p": p}], hyper, seed=1, bias=bias)
    data = batches(10, widths[0], widths[-1], seed=2)
    train_pair(model, opt, twin, oracle, data)
    # It moved (the comparison is not trivially true).
    start = make_mlp(widths, bias=bias, seed=1)
    moved = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 1e-3


def test_sgd_parity_eps_active():
    """With a large eps the scale max(kappa^(2/p), eps) is eps for some entries."""
    hyper = dict(SGD_DEFAULTS, lr=0.01, momentum=0.9)
    widths = (3, 4, 2)
    model, opt, twin, oracle = make_pair(widths, [{"names": ["0.weight", "0.bias", "2.weight", "2.bias"],
                                                   "eps": 0.5, "p": 2}], hyper, seed=3)
    kappa = brute_force(model, 2)[1]
    assert any(bool((k < 0.5).any()) for k in kappa.values()) and any(bool((k > 0.5).any()) for k in kappa.values())
    train_pair(model, opt, twin, oracle, batches(10, 3, 2, seed=4))


def test_sgd_parity_float32():
    hyper = dict(SGD_DEFAULTS, lr=0.01, momentum=0.9, weight_decay=0.01)
    model, opt, twin, oracle = make_pair((3, 5, 4, 2), None, hyper, seed=5, dtype=torch.float32)
    train_pair(model, opt, twin, oracle, batches(10, 3, 2, seed=6, dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_sgd_parity_lr_tensor():
    hyper = dict(SGD_DEFAULTS, momentum=0.9)
    model = make_mlp((3, 4, 2), seed=7)
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=torch.tensor(0.01, dtype=torch.float64), **{k: v for k, v in hyper.items()
                                                                                 if k != "lr"})
    oracle = OraclePathSGD(twin, [{"names": [n for n, _ in twin.named_parameters()]}], **dict(hyper, lr=0.01))
    train_pair(model, opt, twin, oracle, batches(5, 3, 2, seed=8))


def test_kappa_recomputed_every_step():
    """After a step that changes the weights, the next update uses the new kappa."""
    model, opt, twin, oracle = make_pair((2, 3, 2), None, dict(SGD_DEFAULTS, lr=0.5), seed=9)
    for step in range(3):
        set_random_grads(model, seed=step)
        set_random_grads(twin, seed=step)
        opt.step()
        oracle.step()
        assert_close_params(model, twin)


def test_frozen_layer_still_scales_the_others():
    """A parameter with no grad is not updated, but its weights still enter the other kappas."""
    hyper = dict(SGD_DEFAULTS, lr=0.05, momentum=0.9)
    model, opt, twin, oracle = make_pair((3, 4, 2), None, hyper, seed=10)
    for step in range(3):
        set_random_grads(model, seed=step, skip={"0.weight"})
        set_random_grads(twin, seed=step, skip={"0.weight"})
        before = model[0].weight.detach().clone()
        opt.step()
        oracle.step()
        assert torch.equal(model[0].weight, before)
        assert_close_params(model, twin)


# ----------------------------------------------------------------------------------------------------------------
# (b) Rescaling invariance (Theorem 4.1) and the negative control
# ----------------------------------------------------------------------------------------------------------------

def rescaled_copy(model: nn.Sequential, seed: int) -> nn.Sequential:
    """Node-rescale every hidden unit by c ~ log-uniform[1e-2, 1e2]: incoming weights and bias *c, outgoing /c."""
    gen = torch.Generator().manual_seed(seed)
    twin = copy.deepcopy(model)
    linears = [m for m in twin if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, nxt in zip(linears, linears[1:]):
            c = torch.empty(layer.out_features, dtype=torch.float64).uniform_(math.log(1e-2), math.log(1e2),
                                                                              generator=gen).exp()
            layer.weight.mul_(c[:, None])
            if layer.bias is not None:
                layer.bias.mul_(c)
            nxt.weight.div_(c[None, :])
    return twin


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def train_both(model, twin, make_opt, steps=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt_a, opt_b = make_opt(model), make_opt(twin)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
        for m, o in ((model, opt_a), (twin, opt_b)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()


@pytest.mark.parametrize("p,nesterov", [(2, False), (1, False), (3, True)])
def test_rescaling_invariance(p, nesterov):
    model = make_mlp((6, 16, 16, 3), seed=11)
    twin = rescaled_copy(model, seed=12)
    x_test = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    f0 = model(x_test).detach()
    assert max_rel_diff(f0, twin(x_test).detach()) < 1e-12  # same function at the start
    ratio = max(float((a.abs() / b.abs()).max()) for a, b in zip(model.parameters(), twin.parameters()))
    assert ratio > 10  # the twin's weights really differ
    train_both(model, twin, lambda m: pathsgd.PathSGD(m, lr=0.01, momentum=0.9, weight_decay=1e-3, p=p,
                                                      nesterov=nesterov), seed=14)
    f1, f2 = model(x_test).detach(), twin(x_test).detach()
    assert max_rel_diff(f1, f0) > 0.1, "training did not change the function"
    assert max_rel_diff(f1, f2) < 1e-8


def test_rescaling_negative_control_sgd_drifts():
    model = make_mlp((6, 16, 16, 3), seed=11)
    twin = rescaled_copy(model, seed=12)
    x_test = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    f0 = model(x_test).detach()
    train_both(model, twin, lambda m: torch.optim.SGD(m.parameters(), lr=3e-4, momentum=0.9, weight_decay=1e-3),
               seed=14)
    f1, f2 = model(x_test).detach(), twin(x_test).detach()
    assert torch.isfinite(f1).all() and torch.isfinite(f2).all()
    assert max_rel_diff(f1, f0) > 0.05, "SGD did not train"
    assert max_rel_diff(f1, f2) > 1e-3


def test_rescaling_invariance_broken_by_clamp():
    """Only clamp breaks the invariance (clipping is not equivariant under rescaling)."""
    model = make_mlp((6, 16, 16, 3), seed=11)
    twin = rescaled_copy(model, seed=12)
    x_test = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    train_both(model, twin, lambda m: pathsgd.PathSGD(m, lr=0.01, momentum=0.9, clamp=0.3), steps=5, seed=14)
    assert max_rel_diff(model(x_test).detach(), twin(x_test).detach()) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# (c) clamp semantics
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clamp", [0.05, (-0.02, 0.1), (0.0, 0.0)], ids=str)
def test_clamp_matches_oracle(clamp):
    hyper = dict(SGD_DEFAULTS, lr=0.05, momentum=0.9)
    model, opt, twin, oracle = make_pair((3, 4, 2), [{"names": ["0.weight", "0.bias", "2.weight", "2.bias"],
                                                      "clamp": clamp}], hyper, seed=15)
    lo, hi = (-clamp, clamp) if isinstance(clamp, float) else clamp
    data = batches(5, 3, 2, seed=16)
    train_pair(model, opt, twin, oracle, data)
    for prm in model.parameters():
        assert float(prm.min()) >= lo and float(prm.max()) <= hi
    assert opt.param_groups[0]["clamp"] == (lo, hi)


def test_clamp_per_group_and_only_updated_params():
    hyper = dict(SGD_DEFAULTS, lr=0.5, momentum=0.0)
    groups = [{"names": ["0.weight", "0.bias"], "clamp": 0.05}, {"names": ["2.weight", "2.bias"]},
              {"names": ["4.weight", "4.bias"], "clamp": (-0.01, 0.01)}]
    model, opt, twin, oracle = make_pair((3, 4, 4, 2), groups, hyper, seed=17)
    with torch.no_grad():
        for m in (model, twin):
            m[0].bias.fill_(3.0)  # far outside the clamp, and will have no grad
            m[4].weight.mul_(10)
    for step in range(3):
        set_random_grads(model, seed=step, skip={"0.bias"})
        set_random_grads(twin, seed=step, skip={"0.bias"})
        opt.step()
        oracle.step()
        assert_close_params(model, twin)
    assert torch.equal(model[0].bias, torch.full((4,), 3.0, dtype=torch.float64)), "a param without grad was clamped"
    assert float(model[0].weight.abs().max()) <= 0.05
    assert float(model[2].weight.abs().max()) > 0.05  # the unclamped group
    assert float(model[4].weight.abs().max()) <= 0.01


# ----------------------------------------------------------------------------------------------------------------
# (d) clamp_after_step on another optimizer
# ----------------------------------------------------------------------------------------------------------------

def test_clamp_after_step_rmsprop():
    model = make_mlp((3, 5, 2), seed=18, scale=5.0)
    twin = copy.deepcopy(model)
    opt = torch.optim.RMSprop(model.parameters(), lr=5e-3)
    ref = torch.optim.RMSprop(twin.parameters(), lr=5e-3)
    handle = pathsgd.clamp_after_step(opt, -0.1, 0.1)
    # Clipping happens AFTER the step: the step sees the unclipped weights (clip-before would differ).
    for step, (x, y) in enumerate(batches(4, 3, 2, seed=19)):
        skip = {"2.bias"} if step < 2 else set()
        set_random_grads(model, seed=step, skip=skip)
        set_random_grads(twin, seed=step, skip=skip)
        ref.step()
        with torch.no_grad():
            for name, prm in twin.named_parameters():
                if name not in skip:
                    prm.clamp_(-0.1, 0.1)
        opt.step()
        assert_params_equal(params_of(model), params_of(twin))
        if step < 2:  # never updated: untouched, still out of range
            assert float(model[2].bias.abs().max()) > 0.1
    assert all(float(p.abs().max()) <= 0.1 for p in model.parameters())
    handle.remove()
    set_random_grads(model, seed=99)
    opt.step()
    # No more clipping: equals a plain RMSprop step.
    set_random_grads(twin, seed=99)
    ref.step()
    assert_params_equal(params_of(model), params_of(twin))


def test_clamp_after_step_params_subset():
    model = make_mlp((3, 5, 2), seed=20, scale=10.0)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    pathsgd.clamp_after_step(opt, -0.2, 0.3, params=[model[0].weight])
    set_random_grads(model, seed=0)
    opt.step()
    assert float(model[0].weight.min()) >= -0.2 and float(model[0].weight.max()) <= 0.3
    assert float(model[0].bias.abs().max()) > 0.3 or float(model[2].weight.abs().max()) > 0.3


def test_clamp_after_step_errors():
    model = make_mlp((3, 2), seed=21)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="lo <= hi"):
        pathsgd.clamp_after_step(opt, 0.1, -0.1)
    with pytest.raises(ValueError, match="not in the optimizer"):
        pathsgd.clamp_after_step(opt, -0.1, 0.1, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pathsgd.clamp_after_step(object(), -0.1, 0.1)


def test_clamp_after_step_on_pathsgd_and_sgd_agree_with_clamp_option():
    """clamp_after_step(PathSGD(clamp=None)) == PathSGD(clamp=...)."""
    model = make_mlp((3, 4, 2), seed=22)
    twin = copy.deepcopy(model)
    a = pathsgd.PathSGD(model, lr=0.05, momentum=0.9, clamp=(-0.1, 0.2))
    b = pathsgd.PathSGD(twin, lr=0.05, momentum=0.9)
    pathsgd.clamp_after_step(b, -0.1, 0.2)
    for step in range(3):
        set_random_grads(model, seed=step)
        set_random_grads(twin, seed=step)
        a.step()
        b.step()
        assert_params_equal(params_of(model), params_of(twin))


# ----------------------------------------------------------------------------------------------------------------
# (e) state_dict round trip
# ----------------------------------------------------------------------------------------------------------------

def _groups_for(model):
    return [{"params": [model[0].weight, model[0].bias], "p": 1, "clamp": 0.5},
            {"params": [model[2].weight, model[2].bias, model[4].weight, model[4].bias], "lr": 0.02, "nesterov": True}]


def test_state_dict_round_trip_bit_identical():
    data = batches(6, 3, 2, seed=23)
    kwargs = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
    # Uninterrupted run.
    model = make_mlp((3, 4, 4, 2), seed=24)
    start = copy.deepcopy(model.state_dict())
    opt = pathsgd.PathSGD(_groups_for(model), model=model, **kwargs)
    for x, y in data:
        loss_grads(model, x, y)
        opt.step()
    # Interrupted run: 3 steps, save, load into fresh copies, 3 more steps.
    m1 = make_mlp((3, 4, 4, 2), seed=99)
    m1.load_state_dict(start)
    o1 = pathsgd.PathSGD(_groups_for(m1), model=m1, **kwargs)
    for x, y in data[:3]:
        loss_grads(m1, x, y)
        o1.step()
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    m2 = make_mlp((3, 4, 4, 2), seed=98)
    m2.load_state_dict(saved["model"])
    o2 = pathsgd.PathSGD(_groups_for(m2), model=m2, lr=0.5, momentum=0.1)  # hyper-parameters come from the state
    o2.load_state_dict(saved["opt"])
    assert o2.param_groups[1]["lr"] == 0.02 and o2.param_groups[0]["momentum"] == 0.9
    assert o2.param_groups[0]["clamp"] == (-0.5, 0.5) and o2.param_groups[0]["p"] == 1
    assert len(o2.state) == 6 and all("momentum_buffer" in s for s in o2.state.values())
    for x, y in data[3:]:
        loss_grads(m2, x, y)
        o2.step()
    assert_params_equal(params_of(model), params_of(m2))
    for pa, pb in zip(model.parameters(), m2.parameters()):
        assert torch.equal(opt.state[pa]["momentum_buffer"], o2.state[pb]["momentum_buffer"])


def test_load_state_dict_casts_state_to_param_dtype():
    model = make_mlp((3, 4, 2), seed=25)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9)
    set_random_grads(model, seed=0)
    opt.step()
    model32 = make_mlp((3, 4, 2), seed=25, dtype=torch.float32)
    opt32 = pathsgd.PathSGD(model32, lr=0.01, momentum=0.9)
    opt32.load_state_dict(opt.state_dict())
    for prm in model32.parameters():
        assert opt32.state[prm]["momentum_buffer"].dtype == torch.float32
    set_random_grads(model32, seed=1)
    opt32.step()
    assert all(torch.isfinite(p).all() for p in model32.parameters())


def test_state_dict_without_momentum():
    model = make_mlp((3, 4, 2), seed=26)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.0)
    set_random_grads(model, seed=0)
    opt.step()
    sd = opt.state_dict()
    opt2 = pathsgd.PathSGD(copy.deepcopy(model), lr=0.01, momentum=0.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["momentum"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# (f) param groups, add_param_group, closure, zero_grad, hooks, all-None grads, schedulers
# ----------------------------------------------------------------------------------------------------------------

def test_param_groups_per_group_hyper_parameters():
    groups = [{"names": ["0.weight", "0.bias"], "lr": 0.02, "momentum": 0.0, "p": 1},
              {"names": ["2.weight"], "p": 3, "clamp": 0.3, "momentum": 0.5},
              {"names": ["2.bias", "4.weight", "4.bias"], "nesterov": True, "weight_decay": 0.01}]
    hyper = dict(SGD_DEFAULTS, lr=0.01, momentum=0.9)
    model, opt, twin, oracle = make_pair((3, 4, 3, 2), groups, hyper, seed=27)
    assert [g["p"] for g in opt.param_groups] == [1, 3, 2]
    assert opt.param_groups[1]["clamp"] == (-0.3, 0.3) and opt.param_groups[0]["clamp"] is None
    train_pair(model, opt, twin, oracle, batches(10, 3, 2, seed=28))


def test_add_param_group():
    hyper = dict(SGD_DEFAULTS, lr=0.01, momentum=0.9)
    model = make_mlp((3, 4, 2), seed=29)
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD([model[0].weight, model[0].bias], model=model, **hyper)
    opt.add_param_group({"params": [model[2].weight, model[2].bias], "lr": 0.03, "p": 1})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0.9
    oracle = OraclePathSGD(twin, [{"names": ["0.weight", "0.bias"]},
                                  {"names": ["2.weight", "2.bias"], "lr": 0.03, "p": 1}], **hyper)
    train_pair(model, opt, twin, oracle, batches(5, 3, 2, seed=30))


def test_add_param_group_bad_group_leaves_optimizer_unchanged():
    model = make_mlp((3, 4, 2), seed=31)
    opt = pathsgd.PathSGD([model[0].weight], model=model, lr=0.01)
    before = state_snapshot(opt)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [model[2].weight], "lr": -1.0})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 4, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="Invalid p"):
        opt.add_param_group({"params": [model[2].bias], "p": 0.5})
    assert_state_equal(before, state_snapshot(opt))
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [model[2].weight]})  # still usable
    assert len(opt.param_groups) == 2


def test_step_closure_returns_loss_and_runs_with_grad():
    model = make_mlp((3, 4, 2), seed=32)
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9)
    oracle = OraclePathSGD(twin, [{"names": [n for n, _ in twin.named_parameters()]}],
                           **dict(SGD_DEFAULTS, lr=0.01, momentum=0.9))
    x, y = batches(1, 3, 2, seed=33)[0]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    expected = loss_grads(twin, x, y)
    oracle.step()
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and float(loss) == pytest.approx(float(expected), rel=1e-14)
    assert_close_params(model, twin)
    assert opt.step() is None  # without a closure
    with torch.no_grad():
        assert opt.step(closure) is not None  # closure gets grad mode even inside no_grad


def test_zero_grad():
    model = make_mlp((3, 4, 2), seed=34)
    opt = pathsgd.PathSGD(model, lr=0.01)
    set_random_grads(model, seed=0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks():
    model = make_mlp((3, 4, 2), seed=35)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.0)
    seen = []

    def pre(o, args, kwargs):
        seen.append(("pre", model[0].weight.detach().clone()))

    def post(o, args, kwargs):
        seen.append(("post", model[0].weight.detach().clone()))

    h1 = opt.register_step_pre_hook(pre)
    h2 = opt.register_step_post_hook(post)
    set_random_grads(model, seed=0)
    opt.step()
    assert [s for s, _ in seen] == ["pre", "post"]
    assert not torch.equal(seen[0][1], seen[1][1])  # pre sees old weights, post sees new
    assert torch.equal(seen[1][1], model[0].weight)
    h1.remove()
    h2.remove()
    opt.step()
    assert len(seen) == 2


def test_all_none_grads_is_a_no_op():
    model = make_mlp((3, 4, 2), seed=36)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9, clamp=1e-3, weight_decay=0.1)
    before = params_of(model)
    assert opt.step() is None
    assert_params_equal(before, params_of(model))
    assert len(opt.state) == 0


def test_lr_scheduler_drives_pathsgd():
    hyper = dict(SGD_DEFAULTS, lr=0.04, momentum=0.9)
    model, opt, twin, oracle = make_pair((3, 4, 2), None, hyper, seed=37)
    sched_a = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(oracle.sgd, step_size=2, gamma=0.5)
    for x, y in batches(6, 3, 2, seed=38):
        loss_grads(model, x, y)
        loss_grads(twin, x, y)
        opt.step()
        oracle.step()
        sched_a.step()
        sched_b.step()
        assert_close_params(model, twin)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_deterministic_training_bit_identical():
    """Two identical runs, and runs on 2 and 1 threads, give bit-identical weights.

    The gradients are fixed tensors, not backprop: torch's own backward is not
    guaranteed bit-identical across thread counts, the Path-SGD step must be.
    """
    runs = []
    for threads in (2, 2, 1):
        torch.set_num_threads(threads)
        model = make_mlp((20, 300, 257, 5), seed=39, dtype=torch.float32)
        opt = pathsgd.PathSGD([{"params": [model[0].weight, model[0].bias], "p": 3},
                               {"params": list(model[2:].parameters())}], model=model, lr=0.01, momentum=0.9,
                              weight_decay=1e-4, nesterov=True)
        for step in range(3):
            set_random_grads(model, seed=step)
            opt.step()
        runs.append(params_of(model))
    assert_params_equal(runs[0], runs[1])
    assert_params_equal(runs[0], runs[2])


# ----------------------------------------------------------------------------------------------------------------
# (g) bad inputs
# ----------------------------------------------------------------------------------------------------------------

BAD_HYPER = [
    (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(lr=float("inf")), "Invalid learning rate"),
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
    (dict(momentum=-0.1), "Invalid momentum"),
    (dict(momentum=float("nan")), "Invalid momentum"),
    (dict(weight_decay=-1e-3), "Invalid weight_decay"),
    (dict(dampening=-0.1), "Invalid dampening"),
    (dict(nesterov=True, momentum=0.0), "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    (dict(p=0.5), "Invalid p"),
    (dict(p=0), "Invalid p"),
    (dict(p=float("inf")), "Invalid p"),
    (dict(p=float("nan")), "Invalid p"),
    (dict(clamp=(0.1, -0.1)), "Invalid clamp"),
    (dict(clamp=-0.1), "Invalid clamp"),
    (dict(clamp=(float("nan"), 1.0)), "Invalid clamp"),
    (dict(clamp="big"), "Invalid clamp"),
    (dict(eps=-1.0), "Invalid eps"),
]


@pytest.mark.parametrize("kwargs,match", BAD_HYPER,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _ in BAD_HYPER])
def test_bad_hyper_parameters(kwargs, match):
    model = make_mlp((3, 4, 2), seed=41)
    with pytest.raises(ValueError, match=match):
        pathsgd.PathSGD(model, **kwargs)
    # The same value in a param group is rejected too.
    with pytest.raises(ValueError, match=match):
        pathsgd.PathSGD([{"params": list(model.parameters()), **kwargs}], model=model)


def test_bad_p_in_path_norm_and_path_scales():
    """Path norms take p in [0, inf] (tests/test_path_norm_exponents.py); outside that, an error."""
    model = make_mlp((3, 4, 2), seed=42)
    for p in (-0.5, float("nan"), True):
        with pytest.raises(ValueError, match="Invalid p"):
            pathsgd.path_norm(model, p)
        with pytest.raises(ValueError, match="Invalid p"):
            pathsgd.path_scales(model, p)



def test_no_model_given():
    model = make_mlp((3, 4, 2), seed=43)
    with pytest.raises(ValueError, match="needs the model"):
        pathsgd.PathSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model"):
        pathsgd.PathSGD(model, lr=0.1, model=make_mlp((3, 4, 2), seed=44))


def test_parameter_not_in_model():
    model = make_mlp((3, 4, 2), seed=45)
    other = make_mlp((3, 4, 2), seed=46)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        pathsgd.PathSGD(list(other.parameters()), model=model)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        pathsgd.PathSGD([model[0].weight, nn.Parameter(torch.zeros(3, dtype=torch.float64))], model=model)


def test_complex_parameters():
    model = nn.Sequential(nn.Linear(3, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        pathsgd.PathSGD(model, lr=0.1)


def test_meta_device_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0\.weight' is on the meta device"):
        pathsgd.PathSGD([{"params": model.parameters()}], model=model, lr=0.1)


def _bad_step(opt, model, make_bad, match, error=RuntimeError):
    """One good step (so there is momentum state), then a bad step: raises, changes nothing."""
    set_random_grads(model, seed=0)
    opt.step()
    set_random_grads(model, seed=1)
    make_bad(model)
    weights, state = params_of(model), state_snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_params_equal(weights, params_of(model))
    assert_state_equal(state, state_snapshot(opt))


def test_sparse_gradient_rejected_nothing_changed():
    model = make_mlp((3, 4, 2), seed=47)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9, clamp=0.5)

    def bad(m):
        m[2].weight.grad = m[2].weight.grad.to_sparse()

    _bad_step(opt, model, bad, "sparse")


def test_complex_gradient_rejected_nothing_changed():
    model = make_mlp((3, 4, 2), seed=48)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9)

    def bad(m):
        if hasattr(m[2].bias, "grad_dtype"):  # newer torch refuses a grad of another dtype unless told
            m[2].bias.grad_dtype = None
        m[2].bias.grad = torch.zeros(2, dtype=torch.complex128)

    _bad_step(opt, model, bad, "complex")


def test_mismatched_gradient_rejected_nothing_changed():
    model = make_mlp((3, 4, 2), seed=49)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9)

    def bad(m):
        if hasattr(m[2].weight, "grad_dtype"):
            m[2].weight.grad_dtype = None
        m[2].weight.grad = m[2].weight.grad.float()

    _bad_step(opt, model, bad, "does not match")


def test_check_finite_raises_before_modifying():
    model = make_mlp((3, 4, 2), seed=50)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9, check_finite=True)

    def bad(m):
        with torch.no_grad():
            m[2].weight[0, 0] = float("nan")

    _bad_step(opt, model, bad, "non-finite", error=FloatingPointError)


class SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))) + x


def _unsupported_models():
    torch.manual_seed(0)
    yield "BatchNorm1d", nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    yield "LayerNorm", nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    yield "Sigmoid", nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    yield "Tanh", nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    yield "GELU", nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    yield "Embedding", nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    yield "sigmoid", _FunctionalSigmoidNet()
    yield "Linear", nn.Sequential(nn.ReLU())  # no Linear layer at all


class _FunctionalSigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


UNSUPPORTED = list(_unsupported_models())


@pytest.mark.parametrize("name,model", UNSUPPORTED, ids=[n for n, _ in UNSUPPORTED])
def test_unsupported_modules_raise_naming_the_module(name, model):
    model.train()
    with pytest.raises(ValueError, match=name):
        pathsgd.PathSGD(model, lr=0.1)
    with pytest.raises(ValueError, match=name):
        pathsgd.path_scales(model)
    with pytest.raises(ValueError, match=name):
        pathsgd.path_norm(model)


def test_batchnorm_switched_to_training_mode_rejected_at_step():
    """BatchNorm in training mode breaks rescaling invariance: never a silent step."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    for prm in model[1].parameters():
        prm.requires_grad_(False)
    model.eval()
    try:
        opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9)
    except ValueError as exc:  # BatchNorm rejected in any mode: also within the contract
        assert "BatchNorm1d" in str(exc)
        return
    model.train()
    for prm in (model[0].weight, model[0].bias, model[3].weight, model[3].bias):
        prm.grad = torch.randn_like(prm)
    weights, state = params_of(model), state_snapshot(opt)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        opt.step()
    assert_params_equal(weights, params_of(model))
    assert_state_equal(state, state_snapshot(opt))


def test_skip_connection_rejected_or_exact():
    """A residual connection: either a clear error, or exact path scales.

    y = fc2(relu(fc1(x))) + x adds one weightless path x_i -> y_i per output: phi^p
    gains 3, and no kappa changes (those paths contain no weight).
    """
    model = SkipNet().double()
    try:
        norm = pathsgd.path_norm(model, 2)
    except ValueError as exc:
        assert any(w in str(exc) for w in ("add", "skip", "branch", "residual")), str(exc)
        with pytest.raises(ValueError):
            pathsgd.PathSGD(model, lr=0.1)
        return
    chain = nn.Sequential(model.fc1, nn.ReLU(), model.fc2)
    norm_pow, kappa = brute_force(chain, 2)
    assert float(norm) ** 2 == pytest.approx(norm_pow + 3.0, rel=1e-12)
    scales = pathsgd.path_scales(model, 2)
    for (name, k), (_, expected) in zip(scales.items(), kappa.items()):
        torch.testing.assert_close(k, expected, rtol=1e-12, atol=0)


def test_skip_connection_with_input_shape_exact_or_rejected():
    """As above with input_shape given (no shape inference needed)."""
    model = SkipNet().double()
    try:
        norm = pathsgd.path_norm(model, 2, input_shape=(3,))
    except ValueError as exc:
        assert any(w in str(exc) for w in ("add", "skip", "branch", "residual")), str(exc)
        return
    chain = nn.Sequential(model.fc1, nn.ReLU(), model.fc2)
    norm_pow, kappa = brute_force(chain, 2)
    assert float(norm) ** 2 == pytest.approx(norm_pow + 3.0, rel=1e-12)
    scales = pathsgd.path_scales(model, 2, input_shape=(3,))
    for (name, k), (_, expected) in zip(scales.items(), kappa.items()):
        torch.testing.assert_close(k, expected, rtol=1e-12, atol=0)
    # And a PathSGD step on it equals SGD on brute-force-scaled gradients.
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.0, input_shape=(3,))
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05)
    set_random_grads(model, seed=0)
    set_random_grads(twin, seed=0)
    for prm, k in zip(twin.parameters(), kappa.values()):
        prm.grad = prm.grad / k.clamp_min(1e-12)
    opt.step()
    sgd.step()
    assert_close_params(model, twin)


def test_unused_parameter_rejected():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.extra = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="extra"):
        pathsgd.PathSGD(Unused(), lr=0.1)


def test_data_dependent_control_flow_rejected():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return self.fc(-x)

    with pytest.raises(ValueError, match="trace"):
        pathsgd.PathSGD(Branchy(), lr=0.1)


# ----------------------------------------------------------------------------------------------------------------
# (h) backends
# ----------------------------------------------------------------------------------------------------------------

_BACKEND_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import pathsgd
        from pathsgd import ops
        from conftest import make_mlp, set_random_grads
        model = make_mlp((3, 5, 4, 2), seed=51)
        opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, clamp=0.4,
                              p={p})
        for step in range(3):
            set_random_grads(model, seed=step)
            opt.step()
        norm = float(pathsgd.path_norm(model, 2))
    warned = [str(w.message) for w in caught if "reference backend" in str(w.message)]
    torch.save({{n: t.detach() for n, t in model.named_parameters()}}, {out!r})
    print(json.dumps(dict(backend=ops.backend_for("cpu"), compiled=ops.compiled_available(), warned=warned,
                          norm=norm)))
""")


def _run_backend(tmp_path, backend, p):
    out = str(tmp_path / f"{backend}-{p}.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PATHSGD_BACKEND", None)
    if backend is not None:
        env["PATHSGD_BACKEND"] = backend
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT.format(tests=tests, out=out, p=p)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(tests))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out)


def test_reference_backend_env_var_matches_compiled(tmp_path):
    """PATHSGD_BACKEND=reference in a fresh process: reference backend, one warning saying why, same numbers."""
    if not pathsgd.ops.has_kernel("cpu"):
        pytest.skip("compiled CPU kernels not built")
    assert pathsgd.ops.backend_for("cpu") in ("compiled", "cuda-emu")  # this process: the kernels, or emulated CUDA
    ref_info, ref_params = _run_backend(tmp_path, "reference", 3)
    assert ref_info["backend"] == "reference" and not ref_info["compiled"]
    assert len(ref_info["warned"]) == 1 and "PATHSGD_BACKEND=reference" in ref_info["warned"][0]
    # The same 3 steps here, on the compiled kernels.
    model = make_mlp((3, 5, 4, 2), seed=51)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, clamp=0.4, p=3)
    for step in range(3):
        set_random_grads(model, seed=step)
        opt.step()
    for name, prm in model.named_parameters():
        torch.testing.assert_close(ref_params[name], prm.detach(), rtol=1e-12, atol=1e-14)
    assert ref_info["norm"] == pytest.approx(float(pathsgd.path_norm(model, 2)), rel=1e-12)


def test_backend_env_var_values(monkeypatch):
    from pathsgd import ops
    monkeypatch.setenv("PATHSGD_BACKEND", "fast")
    with pytest.raises(ValueError, match="PATHSGD_BACKEND"):
        ops._load_extension()
    monkeypatch.setenv("PATHSGD_BACKEND", "reference")
    assert "PATHSGD_BACKEND=reference" in ops._load_extension()
    for value in ("auto", "compiled"):
        monkeypatch.setenv("PATHSGD_BACKEND", value)
        assert ops._load_extension() is None
