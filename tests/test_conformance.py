"""PathSGD as a drop-in ``torch.optim`` citizen (issue 7, conformance half).

Modeled on the checks of torch's own ``test_optim`` OptimizerInfo suite: param groups,
``add_param_group``, ``zero_grad``, ``step(closure)``, step hooks, ``state_dict`` round trips
and casting, lr schedulers, tensor lr, ``torch.amp.GradScaler``, ``torch.compile``,
``torch.library.opcheck`` for half dtypes, DDP (2-process gloo), FSDP and parametrized
layers.

The mathematical oracle here is :class:`ScaledSGDTwin`: ``torch.optim.SGD`` stepping on
``grad / max(kappa ** (2/p), eps)`` with kappa from :func:`pathsgd.path_scales`, then
clamping (the definition of the Path-SGD step). Everything that compares against it runs in
float64.
"""
from __future__ import annotations

import copy
import io
import os
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn as nn

from torch.optim.optimizer import register_optimizer_step_post_hook

import pathsgd
from pathsgd import ops
from pathsgd.graph import unwrap_model
from pathsgd.sgd_params import SgdParams
from test_trunk_chain_step import Case as trunk_case

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def mlp(widths: Sequence[int] = (3, 5, 4, 2), dtype=F64, seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: List[nn.Module] = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1], bias=bias, dtype=dtype))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def data(n: int = 16, d_in: int = 3, d_out: int = 2, dtype=F64, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randn(n, d_out, generator=gen, dtype=dtype)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    for prm in model.parameters():
        prm.grad = None
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss.detach()


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.named_parameters()}


def assert_same_params(a: nn.Module, b: nn.Module, exact: bool = False, rtol: float = 1e-10, atol: float = 1e-12):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        if exact:
            assert torch.equal(x, y), f"{name} differs: max |diff| {float((x - y).abs().max())}"
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def state_equal(a: dict, b: dict) -> bool:
    """Deep equality of optimizer state dicts (tensors by value)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class ScaledSGDTwin:
    """torch.optim.SGD on path-scaled gradients, then clamp: the definition of the Path-SGD step.

    ``groups``: list of ``(parameter names, options)``; options may hold SGD keys and p, eps, clamp.
    """

    def __init__(self, model: nn.Module, groups: List[Tuple[Sequence[str], dict]], **defaults):
        self.model = model
        self.named = dict(model.named_parameters())
        self.defaults = defaults
        self.extra: List[dict] = []
        self.sgd: Optional[torch.optim.SGD] = None
        for names, opts in groups:
            self.add_group(names, **opts)

    def add_group(self, names: Sequence[str], **opts) -> None:
        opts = {**self.defaults, **opts}
        clamp = opts.get("clamp")
        if isinstance(clamp, (int, float)):
            clamp = (-clamp, clamp)
        self.extra.append(dict(names=list(names), p=opts.get("p", 2), eps=opts.get("eps", 1e-12), clamp=clamp))
        group = {"params": [self.named[n] for n in names], **{k: opts[k] for k in SGD_KEYS if k in opts}}
        if self.sgd is None:
            self.sgd = torch.optim.SGD([group], lr=opts.get("lr", 0.01), foreach=False)
        else:
            self.sgd.add_param_group(group)

    @torch.no_grad()
    def step(self) -> None:
        kappas = {g["p"]: pathsgd.path_scales(self.model, g["p"]) for g in self.extra}  # old weights, all p first
        saved = {}
        for g in self.extra:
            for n in g["names"]:
                prm = self.named[n]
                if prm.grad is None:
                    continue
                saved[n] = prm.grad
                kp = kappas[g["p"]][n].pow(2.0 / g["p"]).clamp_min(g["eps"]).to(prm.dtype)
                prm.grad = prm.grad / kp
        self.sgd.step()
        for n, grad in saved.items():
            self.named[n].grad = grad
        for g in self.extra:
            if g["clamp"] is not None:
                for n in g["names"]:
                    if n in saved:
                        self.named[n].clamp_(*g["clamp"])


def names_of(model: nn.Module, prefixes: Sequence[str]) -> List[str]:
    return [n for n, _ in model.named_parameters() if n.split(".")[0] in prefixes]


def params_of(model: nn.Module, prefixes: Sequence[str]) -> List[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in names_of(model, prefixes)]


# ----------------------------------------------------------------------------------------------------------------
# Param groups, add_param_group, zero_grad, closure, hooks
# ----------------------------------------------------------------------------------------------------------------

GROUP_OPTS = [
    dict(lr=0.1, momentum=0.9, p=1, clamp=0.3),
    dict(lr=0.05, momentum=0.0, p=2),
    dict(lr=0.2, momentum=0.5, nesterov=True, p=3, clamp=(-0.2, 0.5), weight_decay=0.01),
]


def test_param_groups_per_group_hyper_parameters_match_the_math():
    model = mlp((3, 5, 4, 2))
    twin_model = copy.deepcopy(model)
    layers = [["0"], ["2"], ["4"]]
    opt = pathsgd.PathSGD([{"params": params_of(model, l), **o} for l, o in zip(layers, GROUP_OPTS)], model=model,
                          lr=0.01, momentum=0.0)
    twin = ScaledSGDTwin(twin_model, [(names_of(twin_model, l), o) for l, o in zip(layers, GROUP_OPTS)],
                         lr=0.01, momentum=0.0)
    # Defaults fill every group; clamp=c is normalized to (-c, c).
    assert [g["p"] for g in opt.param_groups] == [1, 2, 3]
    assert [g["clamp"] for g in opt.param_groups] == [(-0.3, 0.3), None, (-0.2, 0.5)]
    assert all(g["eps"] == 1e-12 and g["dampening"] == 0 and g["maximize"] is False for g in opt.param_groups)
    x, y = data()
    for _ in range(4):
        backward(model, x, y)
        backward(twin_model, x, y)
        opt.step()
        twin.step()
        assert_same_params(model, twin_model)
    with torch.no_grad():
        assert all(float(t.abs().max()) <= 0.3 for t in params_of(model, ["0"]))
        assert all(float(t.min()) >= -0.2 and float(t.max()) <= 0.5 for t in params_of(model, ["4"]))


def test_add_param_group_fills_defaults_and_steps_like_the_math():
    model = mlp((3, 6, 2))
    twin_model = copy.deepcopy(model)
    opt = pathsgd.PathSGD([{"params": params_of(model, ["0"])}], model=model, lr=0.1, momentum=0.9)
    twin = ScaledSGDTwin(twin_model, [(names_of(twin_model, ["0"]), {})], lr=0.1, momentum=0.9)
    x, y = data()
    for step in range(5):
        if step == 2:
            opt.add_param_group({"params": params_of(model, ["2"]), "lr": 0.3, "p": 1, "clamp": 0.5})
            twin.add_group(names_of(twin_model, ["2"]), lr=0.3, p=1, clamp=0.5)
            group = opt.param_groups[-1]
            assert group["momentum"] == 0.9 and group["eps"] == 1e-12 and group["clamp"] == (-0.5, 0.5)
        backward(model, x, y)
        backward(twin_model, x, y)
        opt.step()
        twin.step()
        assert_same_params(model, twin_model)
    assert len(opt.state) == 4


def test_add_param_group_rejects_duplicates_and_foreign_parameters_unchanged():
    model = mlp((3, 6, 2))
    opt = pathsgd.PathSGD([{"params": params_of(model, ["0"])}], model=model)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2, dtype=F64))]})
    with pytest.raises(ValueError, match="clamp"):
        opt.add_param_group({"params": params_of(model, ["2"]), "clamp": (1.0, -1.0)})
    assert len(opt.param_groups) == 1
    assert state_equal(opt.state_dict(), before)
    opt.add_param_group({"params": params_of(model, ["2"])})  # still usable
    assert len(opt.param_groups) == 2


def test_zero_grad_set_to_none_true_makes_step_a_no_op():
    model = mlp()
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9)
    x, y = data()
    backward(model, x, y)
    opt.step()
    opt.zero_grad()  # set_to_none=True is the default, like torch
    assert all(prm.grad is None for prm in model.parameters())
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    opt.step()
    assert all(torch.equal(t, before[n]) for n, t in model.named_parameters())
    assert state_equal(opt.state_dict(), state)


def test_zero_grad_set_to_none_false_keeps_zero_grads_and_momentum_moves_like_the_math():
    model = mlp()
    twin_model = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9)
    twin = ScaledSGDTwin(twin_model, [([n for n, _ in twin_model.named_parameters()], {})], lr=0.1, momentum=0.9)
    x, y = data()
    backward(model, x, y)
    backward(twin_model, x, y)
    opt.step()
    twin.step()
    opt.zero_grad(set_to_none=False)
    twin.sgd.zero_grad(set_to_none=False)
    assert all(prm.grad is not None and not prm.grad.any() for prm in model.parameters())
    before = snapshot(model)
    opt.step()  # zero gradients, but the momentum buffer still moves the weights (as in torch.optim.SGD)
    twin.step()
    assert any(not torch.equal(t, before[n]) for n, t in model.named_parameters())
    assert_same_params(model, twin_model)


def test_step_closure_runs_under_enable_grad_and_returns_its_loss():
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9)
    ref_opt = pathsgd.PathSGD(ref_model, lr=0.1, momentum=0.9)
    x, y = data()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():  # step() must still run the closure with grad enabled
            loss = opt.step(closure)
        ref_loss = backward(ref_model, x, y)
        ref_opt.step()
        assert isinstance(loss, torch.Tensor) and torch.equal(loss.detach(), ref_loss)
        assert_same_params(model, ref_model, exact=True)
    assert calls == [True, True, True]
    # The returned object is the closure's own return value.
    sentinel = object()
    assert opt.step(lambda: sentinel) is sentinel
    assert opt.step() is None


def test_step_pre_and_post_hooks():
    model = mlp()
    opt = pathsgd.PathSGD(model, lr=0.1)
    x, y = data()
    events = []

    def pre(o, args, kwargs):
        assert o is opt
        events.append(("pre", torch.equal(model[0].weight, start)))

    def post(o, args, kwargs):
        assert o is opt
        events.append(("post", torch.equal(model[0].weight, start)))

    def global_post(o, args, kwargs):
        if o is opt:
            events.append(("global_post", None))

    h_pre, h_post = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    h_global = register_optimizer_step_post_hook(global_post)
    try:
        start = model[0].weight.detach().clone()
        backward(model, x, y)
        opt.step()
        assert events == [("pre", True), ("post", False), ("global_post", None)]
    finally:
        h_pre.remove()
        h_post.remove()
        h_global.remove()
    events.clear()
    backward(model, x, y)
    opt.step()
    assert events == []


def test_pre_hook_can_modify_gradients_before_the_step():
    """A pre-hook runs before path scales and the update are computed (e.g. gradient clipping)."""
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.1)
    ref_opt = pathsgd.PathSGD(ref_model, lr=0.1)
    x, y = data()

    def clip(o, args, kwargs):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)

    opt.register_step_pre_hook(clip)
    backward(model, x, y)
    backward(ref_model, x, y)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.01)
    opt.step()
    ref_opt.step()
    assert_same_params(model, ref_model, exact=True)


# ----------------------------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ----------------------------------------------------------------------------------------------------------------

def _two_group_opt(model, **kw):
    return pathsgd.PathSGD([{"params": params_of(model, ["0", "2"]), "p": 1, "clamp": (-0.4, 0.6)},
                            {"params": params_of(model, ["4"]), "lr": 0.05, "nesterov": True}],
                           model=model, lr=0.1, momentum=0.9, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    model = mlp((3, 5, 4, 2), dtype=dtype)
    opt = _two_group_opt(model)
    x, y = data(dtype=dtype)
    for _ in range(3):
        backward(model, x, y)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()
    assert [g["p"] for g in sd["param_groups"]] == [1, 2]
    assert sd["param_groups"][0]["clamp"] == (-0.4, 0.6)
    assert set(sd["state"]) == set(range(6)) and all("momentum_buffer" in s for s in sd["state"].values())
    for _ in range(3):
        backward(model, x, y)
        opt.step()

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = mlp((3, 5, 4, 2), dtype=dtype, seed=123)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = _two_group_opt(resumed, eps=0.5)  # constructor values are overwritten by the checkpoint too
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["eps"] == 1e-12
    for _ in range(3):
        backward(resumed, x, y)
        opt2.step()
    assert_same_params(model, resumed, exact=True)
    assert state_equal(opt.state_dict(), opt2.state_dict())


def test_load_state_dict_casts_state_to_parameter_dtype_like_torch():
    """A float64 optimizer state loaded into float32 parameters is cast (as torch.optim does)."""
    model64 = mlp((3, 5, 4, 2), dtype=F64)
    opt64 = _two_group_opt(model64)
    x, y = data(dtype=F64)
    for _ in range(2):
        backward(model64, x, y)
        opt64.step()
    sd = opt64.state_dict()
    sd_copy = copy.deepcopy(sd)

    model32 = copy.deepcopy(model64).float()
    opt32 = _two_group_opt(model32)
    opt32.load_state_dict(sd)
    for prm in model32.parameters():
        buf = opt32.state[prm]["momentum_buffer"]
        assert buf.dtype == torch.float32 and buf.device == prm.device
    assert state_equal(sd, sd_copy), "load_state_dict must not modify the dict it was given"
    assert all(s["momentum_buffer"].dtype == F64 for s in opt64.state.values())

    # Same as loading a state dict cast by hand, bit for bit, over further steps.
    manual = copy.deepcopy(sd_copy)
    for s in manual["state"].values():
        s["momentum_buffer"] = s["momentum_buffer"].float()
    model_ref = copy.deepcopy(model64).float()
    opt_ref = _two_group_opt(model_ref)
    opt_ref.load_state_dict(manual)
    x32, y32 = x.float(), y.float()
    for _ in range(3):
        backward(model32, x32, y32)
        backward(model_ref, x32, y32)
        opt32.step()
        opt_ref.step()
    assert_same_params(model32, model_ref, exact=True)
    # And close to continuing in float64.
    for _ in range(3):
        backward(model64, x, y)
        opt64.step()
    for a, b in zip(model32.parameters(), model64.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a cross-device load")
def test_load_state_dict_moves_state_to_parameter_device():  # pragma: no cover - CUDA only
    model = mlp(dtype=torch.float32)
    opt = pathsgd.PathSGD(model, lr=0.1)
    x, y = data(dtype=torch.float32)
    backward(model, x, y)
    opt.step()
    cuda_model = copy.deepcopy(model).cuda()
    cuda_opt = pathsgd.PathSGD(cuda_model, lr=0.1)
    cuda_opt.load_state_dict(opt.state_dict())
    assert all(s["momentum_buffer"].is_cuda for s in cuda_opt.state.values())
    backward(cuda_model, x.cuda(), y.cuda())
    cuda_opt.step()


def test_load_torch_sgd_state_dict_resumes_with_pathsgd_defaults():
    """Swapping SGD for PathSGD in a script that resumes from an SGD checkpoint."""
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    backward(model, x, y)
    sgd.step()
    opt = pathsgd.PathSGD(model, lr=0.5, momentum=0.9)
    opt.load_state_dict(sgd.state_dict())
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["p"] == 2 and group["clamp"] is None and group["eps"] == 1e-12
    backward(model, x, y)
    opt.step()
    assert all(torch.isfinite(t).all() for t in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# lr schedulers and tensor lr
# ----------------------------------------------------------------------------------------------------------------

def _pair(lr=0.1, momentum=0.9, **kw):
    model = mlp((3, 5, 4, 2))
    twin_model = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=lr, momentum=momentum, **kw)
    twin_lr = lr.clone() if isinstance(lr, torch.Tensor) else lr  # schedulers fill tensor lr in place
    twin = ScaledSGDTwin(twin_model, [([n for n, _ in twin_model.named_parameters()], {})], lr=twin_lr,
                         momentum=momentum, **kw)
    return model, opt, twin_model, twin


def _lockstep(model, opt, twin_model, twin, sched, twin_sched, steps, metric=None):
    x, y = data()
    lrs, momenta = [], []
    for i in range(steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        momenta.append(opt.param_groups[0]["momentum"])
        loss = backward(model, x, y)
        backward(twin_model, x, y)
        opt.step()
        twin.step()
        assert_same_params(model, twin_model)
        if metric is None:
            sched.step()
            twin_sched.step()
        else:
            sched.step(metric(i, loss))
            twin_sched.step(metric(i, loss))
    return lrs, momenta


def test_step_lr_drives_pathsgd():
    model, opt, twin_model, twin = _pair()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin.sgd, step_size=2, gamma=0.5)
    lrs, _ = _lockstep(model, opt, twin_model, twin, sched, twin_sched, 6)
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_one_cycle_lr_with_cycle_momentum_drives_pathsgd():
    model, opt, twin_model, twin = _pair()
    kw = dict(max_lr=0.2, total_steps=8, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, **kw)
    twin_sched = torch.optim.lr_scheduler.OneCycleLR(twin.sgd, **kw)
    lrs, momenta = _lockstep(model, opt, twin_model, twin, sched, twin_sched, 7)
    assert max(lrs) == pytest.approx(0.2, rel=0.05) and min(lrs) < 0.02
    assert min(momenta) == pytest.approx(0.8, abs=0.02) and max(momenta) == pytest.approx(0.95)


def test_reduce_lr_on_plateau_drives_pathsgd():
    model, opt, twin_model, twin = _pair(lr=0.2)
    kw = dict(mode="min", factor=0.5, patience=0, threshold=0.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    twin_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(twin.sgd, **kw)
    # A metric that gets worse on steps 2 and 3 and better otherwise.
    metric = lambda i, loss: [1.0, 0.5, 0.9, 0.9, 0.1, 0.05][i]  # noqa: E731
    lrs, _ = _lockstep(model, opt, twin_model, twin, sched, twin_sched, 6, metric)
    assert lrs == pytest.approx([0.2, 0.2, 0.2, 0.1, 0.05, 0.05])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tensor_lr_with_scheduler(momentum):
    model, opt, twin_model, twin = _pair(lr=torch.tensor(0.1, dtype=F64), momentum=momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin.sgd, step_size=1, gamma=0.5)
    lrs, _ = _lockstep(model, opt, twin_model, twin, sched, twin_sched, 4)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_tensor_lr_changed_in_place_is_used_by_the_next_step():
    model, opt, twin_model, twin = _pair(lr=torch.tensor(0.1, dtype=F64), momentum=0.0)
    x, y = data()
    for lr in (0.1, 0.3, 0.0):
        opt.param_groups[0]["lr"].fill_(lr)
        twin.sgd.param_groups[0]["lr"].fill_(lr)
        before = snapshot(model)
        backward(model, x, y)
        backward(twin_model, x, y)
        opt.step()
        twin.step()
        assert_same_params(model, twin_model)
        if lr == 0.0:
            assert all(torch.equal(t, before[n]) for n, t in model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# torch.amp.GradScaler with CPU autocast (fp16, bf16)
# ----------------------------------------------------------------------------------------------------------------

AMP_DTYPES = [torch.float16, torch.bfloat16]


def _amp_loss(model, x, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        assert out.dtype == dtype
        return ((out.float() - y) ** 2).mean()


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("explicit_unscale", [True, False])
def test_grad_scaler_standard_unscale_path(dtype, explicit_unscale):
    model = mlp((4, 16, 16, 2), dtype=torch.float32)
    twin_model = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9)
    twin_opt = pathsgd.PathSGD(twin_model, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x, y = data(64, 4, 2, dtype=torch.float32)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = _amp_loss(model, x, y, dtype)
        scaler.scale(loss).backward()
        inv_scale = scaler.get_scale() ** -1  # a power of two: unscaling is exact
        for a, b in zip(model.parameters(), twin_model.parameters()):
            b.grad = a.grad * inv_scale
        if explicit_unscale:
            scaler.unscale_(opt)  # the standard path, e.g. before gradient clipping
            for a, b in zip(model.parameters(), twin_model.parameters()):
                assert torch.equal(a.grad, b.grad)
        scaler.step(opt)  # unscales here when unscale_ was not called
        scaler.update()
        twin_opt.step()
        losses.append(float(loss))
        assert_same_params(model, twin_model, exact=True)
    assert scaler.get_scale() == 2.0 ** 12  # no overflow, no skipped step
    assert losses[-1] < 0.95 * losses[0]


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_scaler_skips_step_on_non_finite_gradient(dtype, bad):
    model = mlp((4, 16, 2), dtype=torch.float32)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9, clamp=10.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = data(32, 4, 2, dtype=torch.float32)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(_amp_loss(model, x, y, dtype)).backward()
        if step == 2:
            model[0].weight.grad[1, 2] = bad
            before, state = snapshot(model), copy.deepcopy(opt.state_dict())
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(t, before[n]) for n, t in model.named_parameters()), "the step must be skipped"
    assert state_equal(opt.state_dict(), state), "momentum buffers must be untouched"
    assert scaler.get_scale() == 2.0 ** 9  # backoff


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------

COMPILE_BACKENDS = ["eager", "aot_eager"]
if os.environ.get("PATHSGD_TEST_INDUCTOR", "1") != "0":  # ~30 s of C++ compilation on 2 cores; =0 skips it
    COMPILE_BACKENDS.append("inductor")


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_training_step_matches_eager(backend):
    torch._dynamo.reset()
    model = mlp((3, 8, 8, 2), dtype=torch.float32)
    compiled_model = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, clamp=0.5)
    opt, compiled_opt = pathsgd.PathSGD(model, **kw), pathsgd.PathSGD(compiled_model, **kw)
    x, y = data(16, dtype=torch.float32)

    def train_step(m, o):
        o.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        o.step()
        return loss

    compiled_step = torch.compile(train_step, backend=backend)
    try:
        for _ in range(3):
            eager_loss = train_step(model, opt)
            compiled_loss = compiled_step(compiled_model, compiled_opt)
            torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
            assert_same_params(compiled_model, model, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in compiled_opt.state.values())


def test_compiled_step_is_one_graph():
    """``opt.step()`` traces into a single graph: no graph break inside pathsgd (each break also costs a
    recompile per parameter, and past torch._dynamo's recompile limit the step silently runs eagerly)."""
    torch._dynamo.reset()
    model = mlp((3, 8, 8, 2), dtype=torch.float32)
    opt = pathsgd.PathSGD(model, lr=0.05, momentum=0.9, clamp=0.5)
    x, y = data(16, dtype=torch.float32)
    backward(model, x, y)
    opt.step()  # momentum buffers exist: later steps take one code path

    def step():
        opt.step()

    try:
        explanation = torch._dynamo.explain(step)()
    finally:
        torch._dynamo.reset()
    where = [f"{r.user_stack[-1].filename}:{r.user_stack[-1].lineno}" if r.user_stack else "?"
             for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, (
        f"{explanation.graph_break_count} graph breaks, first at {where[:3]}: {str(explanation.break_reasons[0].reason)[:300]}")


def test_compiled_conv_net_step_is_one_graph_and_matches_eager():
    """A conv net's step (taped abs-pow forward, the abs_pow_vjp op, the dense head's fused
    kernels) also traces into one graph, and the compiled step gives the eager weights."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5, 6), nn.ReLU(), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    opt, compiled_opt = (pathsgd.PathSGD(m, lr=0.05, momentum=0.9, input_shape=(1, 10)) for m in (model, twin))
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 1, 10, generator=gen), torch.randn(8, 2, generator=gen)
    compiled_step = torch.compile(lambda: compiled_opt.step())
    try:
        for i in range(3):
            backward(model, x, y)
            backward(twin, x, y)
            opt.step()
            if i == 0:
                compiled_opt.step()  # momentum buffers exist: later steps take one code path
                continue
            compiled_step()
            assert_same_params(twin, model, rtol=1e-6, atol=1e-7)
        backward(twin, x, y)
        explanation = torch._dynamo.explain(lambda: compiled_opt.step())()
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]


# ----------------------------------------------------------------------------------------------------------------
# opcheck: tests/test_kernels.py covers every op in float32/float64; here the op set and half dtypes
# ----------------------------------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="compiled CPU kernels not built")


@needs_kernels
def test_every_registered_op_is_wrapped():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pathsgd::")}
    assert registered == set(ops._OP_NAMES)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_half_dtypes(dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, generator=gen).to(dtype)
    g = torch.randn(5, 3, generator=gen).to(dtype)
    buf = torch.randn(5, 3, generator=gen).to(dtype)
    gi, go = torch.rand(3, generator=gen) + 0.5, torch.rand(5, generator=gen) + 0.5
    s = torch.zeros((), dtype=F64)
    b = torch.randn(5, generator=gen).to(dtype)
    w2, g2, buf2 = (torch.randn(2, 5, generator=gen).to(dtype) for _ in range(3))
    samples = [
        ("gamma_forward", (w, b, gi, s, 2.0)),
        ("fused_dense_step_", (w.clone(), g, buf.clone(), gi, s, go, s.clone(), 2.0,
                               SgdParams(0.1, 0.9, eps=1e-12, clamp_min=-1.0, clamp_max=1.0).packed(), None)),
        ("scaled_sgd_update_", ([w.clone(), b.clone()], [g, b.clone()], [buf.clone(), b.clone()],
                                [torch.rand(5, 3, generator=gen, dtype=F64), torch.rand(5, generator=gen, dtype=F64)],
                                1.5, SgdParams(0.0, 0.9, eps=1e-12).packed(), torch.tensor(0.1))),
        ("clamp_", ([w.clone(), b.clone()], -0.1, 0.1)),
        ("dense_chain_step_", ([w.clone(), w2.clone(), b.clone()], [g, g2, b.clone()],
                               [buf.clone(), buf2.clone(), b.clone()], [0], [], 2.0,
                               SgdParams(0.1, 0.9, 0.0, 0.01, True, eps=1e-12, clamp_max=1.0).packed(), None)),
        ("trunk_chain_step_", trunk_case(0, dtype, 2.0, 1).args("cpu")),  # a small conv net
    ]
    # abs_pow_forward / abs_pow_vjp work on the float64 abs-pow network whatever the parameters' dtype.
    assert {n for n, _ in samples} == set(ops._OP_NAMES) - {"abs_pow_forward", "abs_pow_vjp"}
    for name, args in samples:
        torch.library.opcheck(getattr(torch.ops.pathsgd, name).default, args)


# ----------------------------------------------------------------------------------------------------------------
# DDP (2-process gloo) and FSDP
# ----------------------------------------------------------------------------------------------------------------

DDP_WIDTHS = (3, 8, 8, 2)
DDP_STEPS = 5
DDP_KW = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _ddp_batch():
    return data(16, 3, 2, dtype=torch.float32, seed=7)


def _ddp_worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    try:
        model = mlp(DDP_WIDTHS, dtype=torch.float32, seed=0)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = pathsgd.PathSGD(ddp, **DDP_KW)  # unwraps ddp.module to build the path graph
        # Names without the "module." prefix: the path graph was built on ddp.module.
        result["names"] = [opt.param_name(t) for t in ddp.parameters()]
        x, y = _ddp_batch()
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        for _ in range(DDP_STEPS):
            opt.zero_grad()
            loss = ((ddp(xs) - ys) ** 2).mean()
            loss.backward()
            opt.step()
        result["params"] = {n: t.detach().clone() for n, t in model.named_parameters()}

        # FSDP2 (fully_shard) on CPU/gloo: sharded DTensor parameters must be refused clearly.
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            fully_shard = None
        for key, shard in (("fsdp2_root", lambda m: fully_shard(m)),
                           ("fsdp2_submodule", lambda m: fully_shard(m[0]))):
            if fully_shard is None:
                result[key] = "unavailable"
                continue
            try:
                m = mlp(DDP_WIDTHS, dtype=torch.float32, seed=0)
                shard(m)
            except Exception as exc:  # noqa: BLE001
                result[key] = f"unavailable: {type(exc).__name__}: {exc}"
                continue
            try:
                pathsgd.PathSGD(m, lr=0.1)
                result[key] = "no error"
            except Exception as exc:  # noqa: BLE001
                result[key] = f"{type(exc).__name__}: {exc}"
    finally:
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), outdir), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail("the DDP workers did not finish within 240 s")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def test_ddp_ranks_end_bit_identical_and_match_single_process(ddp_results):
    r0, r1 = ddp_results
    assert r0["names"] == r1["names"] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{name} differs between ranks"
    # Single process on the full batch: DDP averages the per-rank mean gradients = the full-batch mean gradient.
    model = mlp(DDP_WIDTHS, dtype=torch.float32, seed=0)
    start = snapshot(model)
    opt = pathsgd.PathSGD(model, **DDP_KW)
    x, y = _ddp_batch()
    for _ in range(DDP_STEPS):
        backward(model, x, y)
        opt.step()
    for name, t in model.named_parameters():
        assert not torch.equal(t, start[name])
        torch.testing.assert_close(r0["params"][name], t.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_fsdp2_fully_shard_root_is_refused(ddp_results):
    for result in ddp_results:
        outcome = result["fsdp2_root"]
        if outcome.startswith("unavailable"):
            pytest.skip(f"fully_shard on CPU/gloo: {outcome}")
        assert outcome.startswith("ValueError") and "FSDP" in outcome and "shard" in outcome.lower(), outcome


def test_fsdp2_fully_shard_submodule_is_refused_clearly(ddp_results):
    """fully_shard(model[0]) leaves a plain Sequential root with DTensor parameters in it."""
    for result in ddp_results:
        outcome = result["fsdp2_submodule"]
        if outcome.startswith("unavailable"):
            pytest.skip(f"fully_shard on CPU/gloo: {outcome}")
        # Not a generic tracing failure: the message must say the parameters are sharded and what to use.
        assert outcome.startswith("ValueError") and "shard" in outcome.lower(), outcome
        assert "DistributedDataParallel" in outcome, outcome


def test_fsdp1_instance_is_refused_by_unwrap_model():
    """FSDP1 cannot be constructed on a CPU-only machine; an instance made without __init__ is enough."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(fsdp)
    fsdp._fsdp_wrapped_module = mlp(dtype=torch.float32)
    try:
        from torch.distributed.fsdp._common_utils import TrainingState
        fsdp.training_state = TrainingState.IDLE  # enough for fsdp.parameters() to work
    except ImportError:  # pragma: no cover - private module moved
        pass
    with pytest.raises(ValueError, match="FSDP"):
        unwrap_model(fsdp)
    with pytest.raises(ValueError, match="FullyShardedDataParallel.*DistributedDataParallel"):
        pathsgd.PathSGD(fsdp, lr=0.1)


def test_fsdp_named_class_is_refused():
    class FSDPSequential(nn.Sequential):  # what fully_shard makes of a Sequential root
        pass

    model = FSDPSequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="FSDP"):
        unwrap_model(model)
    with pytest.raises(ValueError, match="FSDP"):
        pathsgd.PathSGD(model, lr=0.1)


def test_data_parallel_wrapper_is_unwrapped():
    model = mlp()
    twin_model = copy.deepcopy(model)
    wrapped = nn.DataParallel(model)  # CPU-only: a plain wrapper around model
    assert unwrap_model(wrapped) is model
    opt = pathsgd.PathSGD(wrapped, lr=0.1, momentum=0.9)
    twin_opt = pathsgd.PathSGD(twin_model, lr=0.1, momentum=0.9)
    x, y = data()
    for _ in range(2):
        backward(wrapped, x, y)
        backward(twin_model, x, y)
        opt.step()
        twin_opt.step()
    assert_same_params(model, twin_model, exact=True)


# ----------------------------------------------------------------------------------------------------------------
# Parametrized layers (torch.nn.utils.parametrize, weight_norm): a clear ValueError (decision, see below)
# ----------------------------------------------------------------------------------------------------------------
# Decision: pathsgd refuses parametrized layers. The traced graph reads the *effective* weight
# (e.g. g * v / |v|), which is not a leaf parameter: the optimizer would have to update the
# underlying parameters (original0/original1, weight_g/weight_v) with path scales defined on the
# effective weight, which is neither Path-SGD nor SGD. The error names the underlying parameters.

class _Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


def _weight_norm(m):
    return torch.nn.utils.parametrizations.weight_norm(m)


def _legacy_weight_norm(m):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(m)


def _symmetric(m):
    torch.nn.utils.parametrize.register_parametrization(m, "weight", _Symmetric())
    return m


@pytest.mark.parametrize("apply, expected", [
    (_weight_norm, "0.parametrizations.weight.original0"),
    (_symmetric, "0.parametrizations.weight.original"),
    (_legacy_weight_norm, "0.weight_g"),
], ids=["parametrizations.weight_norm", "register_parametrization", "legacy_weight_norm"])
def test_parametrized_layers_raise_a_clear_error(apply, expected):
    model = mlp((3, 3, 2), dtype=torch.float32)
    apply(model[0])
    before = snapshot(model)
    for make in (lambda: pathsgd.PathSGD(model, lr=0.1), lambda: pathsgd.path_scales(model),
                 lambda: pathsgd.path_norm(model),
                 lambda: pathsgd.PathSGD([{"params": model[2].parameters()}], model=model, lr=0.1)):
        with pytest.raises(ValueError) as info:
            make()
        assert expected in str(info.value), str(info.value)
    assert all(torch.equal(t, before[n]) for n, t in model.named_parameters())
