"""A user's first hour: ordinary PyTorch training code, run as written, checking real numbers."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import reference

from conftest import make_mlp, set_random_grads


def params(model):
    return {n: t.detach().clone() for n, t in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Drop-in signature
# ---------------------------------------------------------------------------------------------------------------
def test_signature_and_defaults_are_torch_sgds():
    ours = inspect.signature(pathsgd.PathSGD).parameters
    for name, theirs in inspect.signature(torch.optim.SGD).parameters.items():
        if name == "params":
            continue
        assert name in ours, f"torch.optim.SGD's argument {name} is missing"
        assert ours[name].default == theirs.default, (name, ours[name].default, theirs.default)
        assert ours[name].kind == theirs.kind, (name, ours[name].kind, theirs.kind)


def test_default_step_is_plain_path_sgd():
    """PathSGD(model) with the defaults: lr 1e-3, no momentum (w <- w - 1e-3 g / kappa), no buffer."""
    model = make_mlp((3, 4, 2), seed=1)
    twin = copy.deepcopy(model)
    set_random_grads(model, seed=2)
    set_random_grads(twin, seed=2)
    kappas = pathsgd.path_scales(twin, 2)
    pathsgd.PathSGD(model).step()
    for name, t in twin.named_parameters():
        expected = t - 1e-3 * t.grad / kappas[name].clamp_min(1e-12)
        torch.testing.assert_close(dict(model.named_parameters())[name], expected, rtol=1e-12, atol=1e-15)


def test_foreach_false_steps_with_the_reference_ops(monkeypatch):
    calls = []
    for name in ("gamma_forward", "fused_dense_step_"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    model = make_mlp((5, 7, 3), seed=3)
    twin = copy.deepcopy(model)
    for flags in (dict(foreach=False), dict(fused=False)):
        calls.clear()
        opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9, **flags)
        set_random_grads(model, seed=4)
        opt.step()
        assert "fused_dense_step_" in calls, flags
    calls.clear()
    for _ in range(2):  # the same two first steps on the compiled kernels
        set_random_grads(twin, seed=4)
        opt_twin = pathsgd.PathSGD(twin, lr=0.01, momentum=0.9, foreach=True)
        opt_twin.step()
    if pathsgd.ops.has_kernel("cpu"):
        assert calls == [], "foreach=True must use the compiled kernels"
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


def test_differentiable_and_foreach_with_fused_refused():
    model = make_mlp((3, 4, 2))
    with pytest.raises(ValueError, match="differentiable=True"):
        pathsgd.PathSGD(model, differentiable=True)
    with pytest.raises(ValueError, match="cannot be `True` together"):
        pathsgd.PathSGD(model, foreach=True, fused=True)


def test_py_typed_marker_ships():
    import importlib.resources
    assert importlib.resources.files("pathsgd").joinpath("py.typed").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Changing dtype / device after steps
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_cast_after_momentum_steps_carries_on_like_torch(dtype):
    """model.double() / .to(torch.bfloat16) after momentum steps: the buffers follow the parameters, as
    torch.optim's load_state_dict casts them, and training continues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9)
    opt_twin = pathsgd.PathSGD(twin, lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for m, o in ((model, opt), (twin, opt_twin)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    model.to(dtype)
    twin.to(dtype)
    opt_twin.load_state_dict(opt_twin.state_dict())  # torch's way: casts the buffers to the parameters
    for m, o in ((model, opt), (twin, opt_twin)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x.to(dtype)), y).backward()
            o.step()
    for name, t in model.named_parameters():
        assert opt.state[t]["momentum_buffer"].dtype == dtype, name
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------------
# torch.compile'd models
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_model_is_unwrapped_and_trains_like_the_eager_one():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    opt = pathsgd.PathSGD(compiled, lr=0.01)
    opt_eager = pathsgd.PathSGD(eager, lr=0.01)
    assert pathsgd.path_norm(compiled).item() == pytest.approx(pathsgd.path_norm(eager).item(), rel=1e-12)
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    start = params(model)
    try:
        for _ in range(3):
            for m, o in ((compiled, opt), (eager, opt_eager)):
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
    finally:
        torch._dynamo.reset()
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert (model[0].weight - start["0.weight"]).abs().max() > 1e-4
