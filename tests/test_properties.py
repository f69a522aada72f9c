"""Hypothesis property tests: one or two PathSGD steps on random MLPs with random hyper-parameters.

For random shapes (depth 1-4, widths 1-9, bias on/off per layer), p in {1, 1.5, 2, 3} (one p per
param group, two groups), random SGD hyper-parameters, clamp, eps, float32/float64 and random
gradients (some None), the step of the default backend (compiled kernels when built)

  * equals the step of the pure-PyTorch reference backend (``pathsgd.ops.has_kernel`` patched to
    return False, which routes every op to :mod:`pathsgd.reference`), and
  * equals ``torch.optim.SGD`` stepping on ``grad / max(kappa ** (2/p), eps)`` with kappa from
    :func:`pathsgd.path_scales`, then clamping (the definition of the Path-SGD step).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Dict, List, Optional, Tuple
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pathsgd
from pathsgd import ops

P_VALUES = [1, 1.5, 2, 3]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def reference_backend():
    """Every pathsgd op runs its twin in pathsgd.reference (the switch ops.py documents)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ops, "has_kernel", lambda device_type: False))
        if hasattr(ops, "_use_compiled"):  # the per-call switch, in case it stops asking has_kernel
            stack.enter_context(mock.patch.object(ops, "_use_compiled", lambda tensor: False))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="pathsgd: using the pure-PyTorch reference backend")
        yield


@st.composite
def cases(draw):
    depth = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 9), min_size=depth + 1, max_size=depth + 1))
    bias = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    act = draw(st.sampled_from(["relu", "leaky"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.3]))
    hyper = dict(lr=draw(st.floats(1e-3, 0.5)), momentum=momentum, dampening=dampening,
                 weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])), nesterov=nesterov,
                 maximize=draw(st.booleans()), eps=draw(st.sampled_from([1e-12, 1e-3])))
    clamp = draw(st.one_of(st.none(), st.floats(0.05, 1.0), st.tuples(st.floats(-1.0, 0.0), st.floats(0.0, 1.0))))
    split = draw(st.integers(0, depth))  # layers [0, split) in group 0, the rest in group 1
    ps = (draw(st.sampled_from(P_VALUES)), draw(st.sampled_from(P_VALUES)))
    steps = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 16))
    n_params = sum(2 if b else 1 for b in bias)
    no_grad = draw(st.lists(st.booleans(), min_size=n_params, max_size=n_params))
    return dict(widths=widths, bias=bias, act=act, dtype=dtype, hyper=hyper, clamp=clamp, split=split, ps=ps,
                steps=steps, seed=seed, no_grad=no_grad)


def build(case) -> nn.Sequential:
    torch.manual_seed(case["seed"])
    widths, mods = case["widths"], []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1], bias=case["bias"][i], dtype=case["dtype"]))
        if i < len(widths) - 2:
            mods.append(nn.ReLU() if case["act"] == "relu" else nn.LeakyReLU(0.1))
    return nn.Sequential(*mods)


def groups_of(model: nn.Module, case) -> List[Tuple[List[str], Dict]]:
    """Two param groups (possibly one empty, then dropped) split by layer, each with its own p."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = set(linear_names[:case["split"]])
    names = [n for n, _ in model.named_parameters()]
    groups = [([n for n in names if n.split(".")[0] in first], dict(p=case["ps"][0])),
              ([n for n in names if n.split(".")[0] not in first], dict(p=case["ps"][1], clamp=case["clamp"]))]
    return [g for g in groups if g[0]]


def set_grads(model: nn.Module, case, step: int) -> None:
    gen = torch.Generator().manual_seed(case["seed"] * 7 + step)
    for (name, prm), none in zip(model.named_parameters(), case["no_grad"]):
        grad = torch.randn(prm.shape, generator=gen, dtype=torch.float64).to(prm.dtype)
        prm.grad = None if (none and step == 0) else grad  # grad None on the first step only


def run_pathsgd(case, reference: bool) -> Tuple[nn.Module, nn.Module]:
    model = build(case)
    start = copy.deepcopy(model)
    named = dict(model.named_parameters())
    with reference_backend() if reference else contextlib.nullcontext():
        opt = pathsgd.PathSGD([{"params": [named[n] for n in names], **o} for names, o in groups_of(model, case)],
                              model=model, **case["hyper"])
        for step in range(case["steps"]):
            set_grads(model, case, step)
            opt.step()
    return start, model


def run_oracle(case) -> nn.Module:
    """torch.optim.SGD on grad / max(kappa^(2/p), eps), kappa from pathsgd.path_scales, then clamp."""
    model = build(case)
    named = dict(model.named_parameters())
    groups = groups_of(model, case)
    hyper = dict(case["hyper"])
    eps = hyper.pop("eps")
    sgd = torch.optim.SGD([{"params": [named[n] for n in names]} for names, _ in groups], foreach=False, **hyper)
    for step in range(case["steps"]):
        set_grads(model, case, step)
        with torch.no_grad():
            kappas = {o["p"]: pathsgd.path_scales(model, o["p"]) for _, o in groups}  # before any update
            raw = {}
            for names, o in groups:
                for n in names:
                    if named[n].grad is not None:
                        raw[n] = named[n].grad
                        kp = kappas[o["p"]][n].pow(2.0 / o["p"]).clamp_min(eps).to(named[n].dtype)
                        named[n].grad = named[n].grad / kp
            sgd.step()
            for names, o in groups:
                clamp = o.get("clamp")
                if clamp is None:
                    continue
                lo, hi = (-clamp, clamp) if isinstance(clamp, float) else clamp
                for n in names:
                    if n in raw:
                        named[n].clamp_(lo, hi)
            for n, g in raw.items():
                named[n].grad = g
    return model


def assert_steps_close(start: nn.Module, got: nn.Module, want: nn.Module, dtype: torch.dtype) -> None:
    """Parameters agree relative to the size of the update (path-scaled updates can be large)."""
    rtol = 2e-4 if dtype == torch.float32 else 1e-9
    for (name, s), (_, a), (_, b) in zip(start.named_parameters(), got.named_parameters(), want.named_parameters()):
        assert a.dtype == b.dtype == dtype
        with torch.no_grad():
            scale = float((b - s).abs().max()) + float(b.abs().max()) + 1e-30
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@SETTINGS
@given(case=cases())
def test_step_equals_reference_backend(case):
    start, got = run_pathsgd(case, reference=False)
    _, want = run_pathsgd(case, reference=True)
    assert_steps_close(start, got, want, case["dtype"])
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.isfinite(a).all() == torch.isfinite(b).all()


@SETTINGS
@given(case=cases())
def test_step_equals_sgd_on_kappa_scaled_gradients(case):
    start, got = run_pathsgd(case, reference=False)
    want = run_oracle(case)
    assert_steps_close(start, got, want, case["dtype"])


@SETTINGS
@given(case=cases())
def test_reference_backend_equals_sgd_on_kappa_scaled_gradients(case):
    start, got = run_pathsgd(case, reference=True)
    want = run_oracle(case)
    assert_steps_close(start, got, want, case["dtype"])


def test_reference_switch_really_switches():
    """The patch routes ops to pathsgd.reference (the compiled op is never called)."""
    if not ops.has_kernel("cpu"):
        pytest.skip("compiled kernels not built: every run already uses the reference backend")
    calls = []
    original = ops.reference.fused_dense_step_

    def spy(*args):
        calls.append(1)
        return original(*args)

    case = dict(widths=[3, 4, 2], bias=[True, True], act="relu", dtype=torch.float32,
                hyper=dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                           eps=1e-12), clamp=None, split=0, ps=(2, 2), steps=1, seed=0, no_grad=[False] * 4)
    with mock.patch.object(ops.reference, "fused_dense_step_", spy):
        run_pathsgd(case, reference=False)
        assert calls == []
        run_pathsgd(case, reference=True)
        assert calls
