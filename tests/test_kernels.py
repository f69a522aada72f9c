"""Every compiled kernel op ``pathsgd::*`` on every target: against its pure-PyTorch twin in
:mod:`pathsgd.reference`, against formulas written out here in float64 from the definitions
(kappa_ij = gamma_out_i * gamma_in_j, torch.optim.SGD's update), and, for the CUDA kernels, against
the compiled CPU op on CPU copies of the same inputs; a rerun must be bit-identical.

Targets (the first part of every test id):

- ``cpu``: the compiled CPU kernels, ``torch.ops.pathsgd.*`` on CPU tensors;
- ``cuda``: the CUDA kernels on a GPU, when one is visible and pathsgd._C has them;
- ``cuda-emu``: with no GPU, when ``PATHSGD_CUDA_EMU`` names the library ``make cuda-emu`` builds: the
  same CUDA kernels and host wrappers on the CPU emulation of the CUDA runtime, registered as
  ``torch.ops.pathsgd_emu.*`` on CPU tensors, with CUDA's launch rules, 32-lane shuffles and barrier
  checks (``make test-cuda-emu``);
- neither: one skipped ``cuda`` case per test, saying why.

Tests of a CPU-only property (thread counts, OpenMP) run on ``cpu`` only; those that need a real GPU
(host synchronizations, CUDA graphs, abs_pow_vjp on CUDA tensors) on ``cuda`` only (under the
emulation they are skipped, saying so).

A test's grid: the CPU runs its CPU grid; the CUDA kernels run the CPU grid and their own extra grids
(larger and odder sizes, half dtypes, more hyper-parameter sets). The CPU and a real GPU run every
combination. Under the emulation each grid is cut to a covering set (every pair of values of any two
axes occurs, a hyper-parameter set counting as one axis per field), so every kernel, dtype,
hyper-parameter variant and size class runs without running every combination;
``PATHSGD_CUDA_EMU_ALL=1`` runs them all, and ``PATHSGD_CUDA_SLOW=1`` adds the slow set of the CUDA
targets (10^6-row and 10^6-column layers, tensors of more than 2^31 elements; about 15 GB of memory).

Hyper-parameters are :class:`pathsgd.sgd_params.SgdParams` values: the compiled ops get
``sgd.packed(), sgd.lr_tensor``, the twins ``sgd``.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import zlib
from typing import List, NamedTuple, Optional

import pytest
import torch

import pathsgd  # noqa: F401  (loads pathsgd._C)
from pathsgd import ops, reference
from pathsgd.sgd_params import SgdParams

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Targets and grids
# ----------------------------------------------------------------------------------------------------------------

class Target(NamedTuple):
    name: str              # the test id: "cpu", "cuda" or "cuda-emu"
    ns: object             # the ops namespace of its kernels (None when skipped)
    device: str            # where its tensors live
    why: Optional[str]     # why it is skipped, or None

    @property
    def cuda(self) -> bool:
        """The CUDA kernels (on a GPU or emulated)."""
        return self.name != "cpu"

    @property
    def emulated(self) -> bool:
        return self.name == "cuda-emu"


def _targets() -> List[Target]:
    cpu_ok = ops.has_kernel("cpu")
    targets = [Target("cpu", torch.ops.pathsgd if cpu_ok else None, "cpu",
                      None if cpu_ok else f"no compiled CPU kernels: {ops.unavailable_reason('cpu')}")]
    if torch.cuda.is_available():
        ok = ops.has_kernel("cuda")
        targets.append(Target("cuda", torch.ops.pathsgd if ok else None, "cuda",
                              None if ok else f"no CUDA kernels: {ops.unavailable_reason('cuda')}"))
    elif os.environ.get("PATHSGD_CUDA_EMU") and cpu_ok:
        ops.load_cuda_emulation()  # a missing library is an error, not a skip: the user asked for it
        targets.append(Target("cuda-emu", torch.ops.pathsgd_emu, "cpu", None))
    else:
        targets.append(Target("cuda", None, "cuda", "no CUDA GPU and PATHSGD_CUDA_EMU is not set (`make "
                                                    "test-cuda-emu` runs the CUDA kernels on the CPU emulation)"))
    return targets


TARGETS = _targets()
CUDA_TARGETS = [t for t in TARGETS if t.cuda]
# A real GPU: CUDA tensors, host synchronizations, CUDA graphs (the emulation has CPU tensors only).
GPU_TARGETS = [t._replace(why=t.why or "needs a real GPU (the emulation has CPU tensors only)") if t.emulated else t
               for t in CUDA_TARGETS]
# abs_pow_vjp is one device-generic kernel in pathsgd._C (no emulated twin): the CPU and a real GPU.
ABS_POW_TARGETS = [TARGETS[0]] + GPU_TARGETS
RUN_ALL = os.environ.get("PATHSGD_CUDA_EMU_ALL") == "1"
SLOW = os.environ.get("PATHSGD_CUDA_SLOW") == "1"
slow = pytest.mark.skipif(not SLOW, reason="slow set: PATHSGD_CUDA_SLOW=1 runs it")
needs_cpu_kernels = pytest.mark.skipif(TARGETS[0].why is not None, reason=str(TARGETS[0].why))


def covering(*axes, where=lambda *combo: True, full=True):
    """The combinations of the axes' values that satisfy ``where``: all of them (``full``), or a subset
    in which every value of every axis, and every pair of values of any two axes, occurs at least once,
    an SgdParams value counting as one axis per field (greedy all-pairs; deterministic)."""
    combos = [c for c in itertools.product(*axes) if where(*c)]
    if full:
        return combos

    def features(combo):
        flat = []
        for i, v in enumerate(combo):
            if isinstance(v, SgdParams):
                flat += [(f"{i}.{k}", repr(x)) for k, x in v._asdict().items()]
            else:
                flat.append((str(i), repr(v)))
        return set(itertools.combinations(flat, 2)) | {(f,) for f in flat}  # a one-axis grid: every value

    feats = [features(c) for c in combos]
    missing = set().union(*feats) if feats else set()
    chosen = []
    while missing:
        k = max(range(len(combos)), key=lambda i: len(feats[i] & missing))
        chosen.append(combos[k])
        missing -= feats[k]
    return chosen


def hyper_id(h: SgdParams) -> str:
    lr = f"lrT{float(h.lr):g}" if isinstance(h.lr, torch.Tensor) else f"lr{h.lr:g}"
    c = "none" if h.clamp_min is None and h.clamp_max is None else f"{h.clamp_min},{h.clamp_max}"
    return (f"{lr}-m{h.momentum:g}-d{h.dampening:g}-{'nest' if h.nesterov else 'std'}-wd{h.weight_decay:g}-"
            f"{'max' if h.maximize else 'min'}-{'first' if h.first_step else 'later'}-eps{h.eps:g}-clamp{c}")


def value_id(v) -> str:
    if isinstance(v, SgdParams):
        return hyper_id(v)
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, type):
        return v.__name__
    if isinstance(v, tuple):
        if all(isinstance(x, int) for x in v):
            return "x".join(map(str, v))
        return ",".join(map(value_id, v))
    return str(v)


def _param(target: Target, *values):
    return pytest.param(target, *values, id="-".join([target.name, *map(value_id, values)]),
                        marks=pytest.mark.skipif(target.why is not None, reason=str(target.why)))


def on(targets: List[Target]):
    """The ``target`` parameter over ``targets``."""
    return [_param(t) for t in targets]


def cases(*grids, cuda=(), targets=None, where=lambda *combo: True):
    """pytest params ``(target, *combination)``. A grid is a sequence of axes (each a list of values):
    ``grids`` run on every target, ``cuda`` only on the CUDA targets; every combination on the CPU and
    on a GPU, a covering set of each grid under the emulation (all with PATHSGD_CUDA_EMU_ALL=1); a
    skipped target gets one case, saying why."""
    out = []
    for t in TARGETS if targets is None else targets:
        combos, seen = [], set()
        for axes in list(grids) + (list(cuda) if t.cuda else []):
            for c in covering(*axes, where=where, full=not t.emulated or RUN_ALL):
                key = "-".join(map(value_id, c))
                if key not in seen:
                    seen.add(key)
                    combos.append(c)
        if t.why is not None:
            combos = combos[:1]
        out += [_param(t, *c) for c in combos]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tolerances and comparisons
# ----------------------------------------------------------------------------------------------------------------

DTYPES = [F32, F64, F16, BF16]
PS = [1.0, 2.0, 3.0]
OPMATH = {F64: F64, F32: F32, BF16: F32, F16: F32}
# Absolute + relative tolerance of a kernel against its twin, per dtype (gamma vectors: GAMMA_TOL of the opmath type).
TOL = {F64: dict(rtol=1e-12, atol=1e-13), F32: dict(rtol=2e-5, atol=2e-6), BF16: dict(rtol=1.6e-2, atol=1e-4),
       F16: dict(rtol=2e-3, atol=1e-5)}
GAMMA_TOL = {F64: dict(rtol=1e-12, atol=1e-14), F32: dict(rtol=2e-5, atol=1e-6)}
# Relative tolerance of a tensor stored in `dtype`, with an absolute floor scaled to the data (`close`).
RTOL = {F32: 1e-5, F64: 1e-12, F16: 1e-2, BF16: 1e-2}


def opmath(dtype: torch.dtype) -> torch.dtype:
    return reference.opmath_dtype(dtype)


def close(actual, expected, dtype, what=""):
    """rtol of `dtype`, with an absolute floor scaled to the data (update results can cancel)."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    rtol = RTOL[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def match(actual, expected, dtype, what="", tol=None):
    """A kernel's result against its twin's: within TOL (or ``tol``) and within ``close``."""
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), **(tol or TOL[dtype]),
                               msg=lambda m: f"{what}: {m}")
    close(actual, expected, dtype, what)


def same_bits(a, b) -> bool:
    """Bit-identical tensors (NaNs included)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int).cpu(), b.contiguous().view(as_int).cpu())


def expected_sgd(w, g, buf, kappa_pow, h: SgdParams):
    """torch.optim.SGD's update on g / max(kappa_pow, eps), written out here in float64, then clamp."""
    w, g, kappa_pow = w.detach().cpu().double(), g.detach().cpu().double(), kappa_pow.cpu().double()
    if h.maximize:
        g = -g
    d = g / kappa_pow.clamp_min(h.eps)
    if h.weight_decay:
        d = d + h.weight_decay * w
    new_buf = None
    if h.momentum:
        new_buf = d.clone() if h.first_step else h.momentum * buf.cpu().double() + (1 - h.dampening) * d
        d = d + h.momentum * new_buf if h.nesterov else new_buf
    w = w - float(h.lr) * d
    if h.clamp_min is not None or h.clamp_max is not None:
        w = w.clamp(h.clamp_min, h.clamp_max)
    return w, new_buf


def sgd_tol(dtype):
    """Tolerance against expected_sgd (float32 / float64 parameters)."""
    return dict(rtol=1e-11, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------

def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def gamma_vec(n, dtype, gen, min_value=0.05, zeros=False):
    """A normalized gamma vector (max in [1, 2)), like the kernels produce; ``zeros``: every fifth entry
    an exact zero (dead units)."""
    v = torch.rand(n, generator=gen, dtype=F64) * (1 - min_value) + min_value
    v = v / v.max() * (1 + float(torch.rand((), generator=gen)))
    if zeros and n > 3:
        v[::5] = 0
    return v.to(OPMATH[dtype])


def log_scale(x):
    return torch.tensor(float(x), dtype=F64)


def tensor(shape, dtype, gen, layout="contiguous", scale=1.0):
    """randn of ``shape`` as a contiguous tensor, a transposed view, or a strided slice."""
    if layout == "contiguous":
        return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)
    if layout == "transposed":
        assert len(shape) == 2
        return (torch.randn(shape[1], shape[0], generator=gen, dtype=F64) * scale).to(dtype).t()
    if layout == "strided":
        big = (torch.randn(*shape[:-1], shape[-1] * 2, generator=gen, dtype=F64) * scale).to(dtype)
        return big[..., ::2]
    raise AssertionError(layout)


def place(t, device):
    """A copy of ``t`` on ``device`` with ``t``'s shape and strides (a non-contiguous view stays one)."""
    if t is None:
        return None
    if t.is_contiguous():
        return t.to(device, copy=True)
    size = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    out = torch.zeros(size, dtype=t.dtype, device=device).as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def dense_copy(t, device):
    return None if t is None else t.contiguous().to(device, copy=True)


def to_dev(x, device):
    return None if x is None else x.to(device)


def unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is NOT 16-byte aligned (when t has > 0 elements)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous()
    return out


def bounded(h: SgdParams) -> bool:
    """Dead units (gamma 0, kappa 0) only where eps bounds their step: eps = 1e-12 would blow a
    half-precision weight up to inf."""
    return h.eps >= 1e-6


# "Dead-unit" inputs: some gammas exactly 0, non-zero log scales, weights ~ N(0, 1/4), buffers ~ N(0, 1/100).
DEAD = dict(dead=True, s_in=0.375, s_out=0.625, w_scale=0.5, buf_scale=0.1)


def dense_case(rows, cols, dtype, seed, grad_layout="contiguous", weight_layout="contiguous", s_in=0.0, s_out=0.0,
               dead=False, w_scale=1.0, buf_scale=1.0):
    gen = _gen(seed)
    return dict(
        weight=tensor((rows, cols), dtype, gen, weight_layout, w_scale),
        grad=tensor((rows, cols), dtype, gen, grad_layout),
        buffer=tensor((rows, cols), dtype, gen, scale=buf_scale),
        gamma_in=gamma_vec(cols, dtype, gen, zeros=dead), gamma_in_log_scale=log_scale(s_in),
        gamma_out=gamma_vec(rows, dtype, gen, zeros=dead), gamma_out_log_scale=log_scale(s_out),
    )


def sgd_on(sgd: SgdParams, device) -> SgdParams:
    """``sgd`` with a tensor lr moved to ``device`` (for the oracles)."""
    return sgd._replace(lr=sgd.lr.to(device)) if isinstance(sgd.lr, torch.Tensor) else sgd


def fused(impl, weight, grad, buffer, gin, s_in, gout, s_out, p, sgd, packed=None):
    """fused_dense_step_ of ``impl``: an ops namespace (``sgd.packed(), sgd.lr_tensor``; ``packed``
    overrides the float list) or ``reference`` (``sgd``)."""
    if impl is reference:
        return reference.fused_dense_step_(weight, grad, buffer, gin, s_in, gout, s_out, float(p), sgd)
    return impl.fused_dense_step_.default(weight, grad, buffer, gin, s_in, gout, s_out, float(p),
                                          sgd.packed() if packed is None else packed, sgd.lr_tensor)


def scaled(impl, params, grads, buffers, kappas, p, sgd, packed=None):
    """scaled_sgd_update_ of ``impl`` (an ops namespace, or ``reference``)."""
    if impl is reference:
        return reference.scaled_sgd_update_(params, grads, buffers, kappas, float(p), sgd)
    return impl.scaled_sgd_update_.default(params, grads, buffers, kappas, float(p),
                                           sgd.packed() if packed is None else packed, sgd.lr_tensor)


def run_fused(impl, case, p, sgd, device, with_grad=True, buffer=True, contiguous=False, packed=None):
    """fused_dense_step_ on copies of ``case`` on ``device`` (the weight and grad keep their strides
    unless ``contiguous``); returns (weight, buffer, gamma_out_prev, log_scale)."""
    copy_ = dense_copy if contiguous else place
    weight = copy_(case["weight"], device)
    if not contiguous:
        assert weight.stride() == case["weight"].stride()
    buf = case["buffer"].to(device, copy=True) if buffer and sgd.momentum != 0 else None
    gamma, scale = fused(impl, weight, copy_(case["grad"], device) if with_grad else None, buf,
                         case["gamma_in"].to(device), case["gamma_in_log_scale"].to(device),
                         case["gamma_out"].to(device), case["gamma_out_log_scale"].to(device), p, sgd, packed)
    return weight, buf, gamma, scale


def check_fused(target, case, p, sgd, with_grad=True, packed=None):
    """The op of ``target`` against the twin on the same device (and, for the CUDA kernels, the CPU op),
    a read-only pass leaves the weight alone, a rerun gives the same bits; returns the op's results."""
    dev, dtype = target.device, case["weight"].dtype
    odt = OPMATH[dtype]
    got = run_fused(target.ns, case, p, sgd, dev, with_grad, packed=packed)
    w, buf, g, s = got
    assert g.dtype == odt and g.shape == (case["weight"].shape[1],) and g.device.type == torch.device(dev).type
    assert s.dtype == F64 and s.dim() == 0 and s.device.type == torch.device(dev).type
    others = [("reference", run_fused(reference, case, p, sgd, dev, with_grad, contiguous=True))]
    if target.cuda:
        others.append(("cpu", run_fused(torch.ops.pathsgd, case, p, sgd_on(sgd, "cpu"), "cpu", with_grad,
                                        contiguous=True, packed=packed)))
    # A float32 sum over many rows drifts: the twin's log scale of an 82000 x 1 float16 layer is 2.7e-5 off
    # the float64 definition, the CUDA kernel's 7e-8. The absolute log-scale bound holds up to 4096 rows;
    # taller layers are bounded by `close` (and, in test_fused_dense_step_shapes, by the definition).
    long_sum = dtype != F64 and case["weight"].shape[0] > 4096
    for name, (w_o, b_o, g_o, s_o) in others:
        match(w, w_o, dtype, f"weight vs {name}")
        if b_o is not None:
            match(buf, b_o, dtype, f"momentum buffer vs {name}")
        match(g, g_o, odt, f"gamma_out_prev vs {name}", tol=GAMMA_TOL[odt])
        if not long_sum:
            torch.testing.assert_close(s.cpu(), s_o.cpu().to(F64), rtol=0, atol=1e-9 if dtype == F64 else 1e-5)
        close(s, s_o.to(F64), odt, f"log scale vs {name}")
    if not with_grad:
        assert torch.equal(w.cpu(), case["weight"]), "a read-only pass (grad=None) modified the weight"
        if buf is not None:
            assert torch.equal(buf.cpu(), case["buffer"]), "a read-only pass modified the momentum buffer"
        no_buf = run_fused(target.ns, case, p, sgd, dev, with_grad, buffer=False, packed=packed)
        assert same_bits(no_buf[2], g) and same_bits(no_buf[3], s), "read-only pass: a buffer changed gamma"
    again = run_fused(target.ns, case, p, sgd, dev, with_grad, packed=packed)
    for a, b in zip(got, again):
        assert same_bits(a, b), "a rerun differs"
    return got


def kappa_of(case):
    """kappa_ij = gamma_out_i gamma_in_j exp(s_out + s_in), in float64."""
    return (torch.outer(case["gamma_out"].double(), case["gamma_in"].double())
            * math.exp(float(case["gamma_in_log_scale"]) + float(case["gamma_out_log_scale"])))


# Hyper-parameter sets. The CPU grid: every momentum variant x weight decay x maximize x first step x
# clamp (both, one side, none); the CUDA grid adds dampening with nesterov, first_step without momentum.
HYPER_DEFAULT = SgdParams(lr=0.01, momentum=0.9, weight_decay=0.01, eps=1e-12)


def _hyper_grid():
    out = []
    for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)]:
        for wd, maximize, first, clamp in itertools.product([0.0, 0.01], [False, True], [False, True],
                                                            [None, (-0.05, 0.05), (None, 0.05), (-0.05, None)]):
            if momentum == 0 and first:
                continue  # first_step only matters with a momentum buffer
            out.append(HYPER_DEFAULT._replace(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                              weight_decay=wd, maximize=maximize, first_step=first,
                                              clamp_min=clamp and clamp[0], clamp_max=clamp and clamp[1]))
    return out


def _cuda_hyper_grid(eps):
    combos = []
    for momentum, dampening, nesterov, wd, maximize, first_step, clamp in itertools.product(
            [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.01], [False, True], [False, True], [None, (-0.3, 0.25)]):
        if momentum == 0.0 and (dampening != 0.0 or nesterov):
            continue
        combos.append(SgdParams(0.05, momentum, dampening, wd, nesterov, maximize, first_step, eps,
                                clamp and clamp[0], clamp and clamp[1]))
    return combos


HYPER_GRID = _hyper_grid()
CUDA_HYPER = _cuda_hyper_grid(eps=0.05)
HYPER_SMALL = [
    SgdParams(0.05, eps=0.05),
    SgdParams(0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True, eps=0.05, clamp_min=-0.3,
              clamp_max=0.25),
    SgdParams(0.05, momentum=0.9, nesterov=True, first_step=True, eps=0.05),
]


# ----------------------------------------------------------------------------------------------------------------
# The sgd argument
# ----------------------------------------------------------------------------------------------------------------

def _chain_args(device, sgd_list, lr_tensor=None, weight=None):
    w = torch.tensor([[0.5, -0.25, 1.0], [0.75, 0.1, -2.0]], dtype=F64) if weight is None else weight
    return ([w.to(device, copy=True)], [torch.full_like(w, 0.5).to(device)], [], [], [], 2.0, sgd_list, lr_tensor)


def _sgd_list_calls(device):
    """(op name, its arguments with the sgd list left to fill in, the tensors it would change)."""
    w, g = torch.randn(3, 4, dtype=F64, device=device), torch.randn(3, 4, dtype=F64, device=device)
    gin, gout = torch.ones(4, dtype=F64, device=device), torch.ones(3, dtype=F64, device=device)
    s = torch.zeros((), dtype=F64, device=device)
    kappa = torch.ones(3, 4, dtype=F64, device=device)
    chain = _chain_args(device, None)
    return [("fused_dense_step_", lambda sgd: (w, g, None, gin, s, gout, s, 2.0, sgd, None), [w]),
            ("scaled_sgd_update_", lambda sgd: ([w], [g], [], [kappa], 2.0, sgd, None), [w]),
            ("dense_chain_step_", lambda sgd: (*chain[:6], sgd, None), chain[0])]


@pytest.mark.parametrize("target", on(TARGETS))
def test_sgd_list_of_wrong_length_raises(target):
    """A float[] sgd that is not SgdParams.packed() (10 entries) raises a clear error before anything
    changes, with the same text from the CPU and the CUDA kernels."""
    good = SgdParams(0.1, eps=1e-12).packed()
    assert len(good) == len(SgdParams._fields) == 10
    for name, make, state in _sgd_list_calls(target.device):
        before = [t.clone() for t in state]
        for bad in ([], good[:9], good + [0.0], good[:1]):
            with pytest.raises(RuntimeError, match=f"pathsgd.{name}: sgd must have 10 entries") as info:
                getattr(target.ns, name).default(*make(bad))
            message = str(info.value).split("\n")[0]
            assert f"got {len(bad)}" in message, message
            if target.cuda:
                _, cpu_make, _ = next(c for c in _sgd_list_calls("cpu") if c[0] == name)
                with pytest.raises(RuntimeError) as cpu_info:
                    getattr(torch.ops.pathsgd, name).default(*cpu_make(bad))
                assert str(cpu_info.value).split("\n")[0] == message, (name, message)
            for a, b in zip(state, before):
                assert torch.equal(a, b), f"{name}: the failed call changed a tensor"
        getattr(target.ns, name).default(*make(good))  # the right length runs


@pytest.mark.parametrize("target,op,bounds", cases(
    (["fused_dense_step_", "scaled_sgd_update_", "dense_chain_step_"], [(None, None), (None, 0.5), (-0.5, None)])))
def test_unset_clamp_bounds_pack_as_infinities_and_clamp_nothing(target, op, bounds):
    """clamp_min / clamp_max None pack as -inf / +inf, which clamps nothing: NaN stays NaN, +-inf and
    +-1e30 stay where the update puts them; a bound that is set still clamps (NaN stays NaN too)."""
    lo, hi = bounds
    dev = target.device
    sgd = SgdParams(0.1, eps=1e-12, clamp_min=lo, clamp_max=hi)
    packed = sgd.packed()
    assert packed[8] == (-math.inf if lo is None else lo) and packed[9] == (math.inf if hi is None else hi)
    assert SgdParams.unpack(packed) == sgd
    w0 = torch.tensor([[float("nan"), 1e30, -1e30], [float("inf"), -float("inf"), 0.3]], dtype=F64)
    g = torch.full_like(w0, 0.5)
    ones = lambda n: torch.ones(n, dtype=F64, device=dev)  # noqa: E731
    s = torch.zeros((), dtype=F64, device=dev)
    results = []
    for impl in (target.ns, reference):
        w = w0.to(dev, copy=True)
        if op == "fused_dense_step_":
            fused(impl, w, g.to(dev), None, ones(3), s, ones(2), s, 2.0, sgd)
        elif op == "scaled_sgd_update_":
            scaled(impl, [w], [g.to(dev)], [], [ones(6).view(2, 3)], 2.0, sgd)
        else:
            args = _chain_args(dev, packed, weight=w0)
            if impl is reference:
                reference.dense_chain_step_(*args[:6], sgd)
            else:
                impl.dense_chain_step_.default(*args)
            w = args[0][0]
        results.append(w)
    got = results[0].cpu()
    # kappa = 1 for every weight (gamma_in = gamma_out = 1; a one-layer chain with gamma0 = 1)
    want, _ = expected_sgd(w0, g, None, torch.ones_like(w0), sgd)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0, equal_nan=True)
    assert math.isnan(float(got[0, 0])), "NaN must stay NaN"
    if hi is None:
        assert float(got[1, 0]) == math.inf and float(got[0, 1]) > 1e29
    if lo is None:
        assert float(got[1, 1]) == -math.inf and float(got[0, 2]) < -1e29
    torch.testing.assert_close(got, results[1].cpu(), rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------------------------
# gamma_forward
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 3), (17, 5), (5, 17), (64, 33)]
DENSE_SHAPES = [(1, 1), (7, 1), (1, 7), (7, 33), (33, 7), (1000, 7), (7, 1000), (4097, 3), (3, 4097), (130, 257)]


@pytest.mark.parametrize("target,shape,dtype,p,bias", cases(
    (SHAPES, DTYPES, PS, [True, False]),
    cuda=[(DENSE_SHAPES + [(64, 5000), (2000, 300), (1, 82000), (82000, 1), (65537, 2)], DTYPES, PS,
           [False, True])]))
def test_gamma_forward(target, shape, dtype, p, bias):
    """Against the twin, the definition in float64 and (CUDA) the CPU op; normalized to a max in [1, 2];
    bit-identical reruns, independent of the data's alignment."""
    dev, ns = target.device, target.ns
    gen = _gen(seed_of(shape, dtype, p, bias))
    rows, cols = shape
    weight = tensor(shape, dtype, gen)
    b = tensor((rows,), dtype, gen) if bias else None
    gamma_in = gamma_vec(cols, dtype, gen, zeros=True)
    s = log_scale(0.7)
    args = lambda w: (w, to_dev(b, dev), gamma_in.to(dev), s.to(dev), p)  # noqa: E731
    v_k, t_k = ns.gamma_forward.default(*args(weight.to(dev)))
    v_r, t_r = reference.gamma_forward(*args(weight.to(dev)))
    odt = OPMATH[dtype]
    assert v_k.dtype == odt and v_k.shape == (rows,) and v_k.device.type == torch.device(dev).type
    assert t_k.dtype == F64 and t_k.dim() == 0 and t_k.device.type == torch.device(dev).type
    match(v_k, v_r, odt, "gamma vs reference", tol=GAMMA_TOL[odt])
    torch.testing.assert_close(t_k.cpu(), t_r.cpu(), rtol=0, atol=1e-5)
    close(t_k, t_r.to(F64), odt, "log scale vs reference")
    assert 1 - 1e-6 <= float(v_k.max()) <= 2 + 1e-6
    # Against the definition, in float64.
    true = weight.double().abs().pow(p) @ gamma_in.double() * math.exp(0.7)
    if b is not None:
        true = true + b.double().abs().pow(p)
    torch.testing.assert_close(v_k.cpu().double() * t_k.cpu().exp(), true, rtol=1e-12 if dtype == F64 else 1e-5,
                               atol=0)
    if target.cuda:
        v_c, t_c = torch.ops.pathsgd.gamma_forward.default(weight, b, gamma_in, s, p)
        close(v_k, v_c, odt, "gamma vs cpu")
        close(t_k, t_c, odt, "log scale vs cpu")
    v2, t2 = ns.gamma_forward.default(*args(weight.to(dev)))
    assert same_bits(v2, v_k) and same_bits(t2, t_k), "a rerun differs"
    v3, t3 = ns.gamma_forward.default(*args(unaligned_copy(weight.to(dev))))
    assert same_bits(v3, v_k) and same_bits(t3, t_k), "an unaligned weight gives other bits"


@pytest.mark.parametrize("target,cols,dtype,p", cases(([5, 16, 71, 200], [F32, F64, BF16], PS)))
def test_gamma_forward_row_does_not_depend_on_its_neighbours(target, cols, dtype, p):
    """The CPU kernel reduces rows in groups of four (a tail one by one): shifting the rows by one
    moves every row to another place in its group, or into the tail, and must give the same bits."""
    dev, ns = target.device, target.ns
    gen = _gen(seed_of((11, cols), dtype, p))
    weight = tensor((11, cols), dtype, gen)
    gamma_in = gamma_vec(cols, dtype, gen).to(dev)
    s = log_scale(0.3).to(dev)
    v, t = ns.gamma_forward.default(weight.to(dev), None, gamma_in, s, p)
    v_shifted, t_shifted = ns.gamma_forward.default(weight.roll(1, 0).contiguous().to(dev), None, gamma_in, s, p)
    assert same_bits(v_shifted, v.roll(1, 0)) and same_bits(t_shifted, t)


@pytest.mark.parametrize("target,layout,dtype", cases((["transposed", "strided"], [F32, F64])))
def test_gamma_forward_non_contiguous(target, layout, dtype):
    dev = target.device
    gen = _gen(3)
    weight = place(tensor((17, 5), dtype, gen, layout), dev)
    bias = place(tensor((34,), dtype, gen)[::2], dev)
    gamma_in = gamma_vec(5, dtype, gen).to(dev)
    assert not weight.is_contiguous() and not bias.is_contiguous()
    for p in PS:
        v_k, t_k = target.ns.gamma_forward.default(weight, bias, gamma_in, log_scale(0.0).to(dev), p)
        v_r, t_r = reference.gamma_forward(weight.contiguous(), bias.contiguous(), gamma_in, log_scale(0.0).to(dev), p)
        torch.testing.assert_close(v_k, v_r, **GAMMA_TOL[dtype])
        torch.testing.assert_close(t_k, t_r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target,dtype", cases(([F32, F64],)))
def test_gamma_forward_non_contiguous_and_cpu_log_scale(target, dtype):
    """A transposed 70 x 33 weight; a CPU 0-dim log scale is accepted (read on the host, no sync) and
    the result stays on the op's device."""
    dev = target.device
    gen = _gen(1)
    w = torch.randn(33, 70, generator=gen, dtype=dtype).t()  # 70 x 33, not contiguous
    gin = gamma_vec(33, dtype, gen, zeros=True)
    s = log_scale(0.5)
    y_ref, t_ref = reference.gamma_forward(w.to(dev), None, gin.to(dev), s.to(dev), 2.0)
    wd = w.to(dev)
    assert not wd.is_contiguous()
    y_dev, t_dev = target.ns.gamma_forward.default(wd, None, gin.to(dev), s.to(dev), 2.0)
    close(y_dev, y_ref, dtype, "non-contiguous weight")
    y_c, t_c = target.ns.gamma_forward.default(wd, None, gin.to(dev), s, 2.0)
    assert t_c.device.type == torch.device(dev).type
    assert torch.equal(y_c, y_dev) and torch.equal(t_c, t_dev)


@pytest.mark.parametrize("target,dtype,bias,s", cases(([F32, F64], [True, False], [300.0, -300.0, 700.0, -700.0])))
def test_gamma_forward_far_log_scale(target, dtype, bias, s):
    """The true gamma (1e+-130 .. 1e+-300) is far outside float32: only the log scale carries it."""
    dev = target.device
    gen = _gen(4)
    weight = tensor((6, 4), dtype, gen)
    b = tensor((6,), dtype, gen) if bias else None
    gamma_in = gamma_vec(4, dtype, gen)
    for p in PS:
        v_k, t_k = target.ns.gamma_forward.default(weight.to(dev), to_dev(b, dev), gamma_in.to(dev),
                                                   log_scale(s).to(dev), p)
        v_r, t_r = reference.gamma_forward(weight, b, gamma_in, log_scale(s), p)
        v_k, t_k = v_k.cpu(), t_k.cpu()
        torch.testing.assert_close(v_k, v_r, **GAMMA_TOL[dtype])
        torch.testing.assert_close(t_k, t_r, rtol=1e-12, atol=1e-6)
        assert torch.isfinite(v_k).all() and 1 - 1e-6 <= float(v_k.max()) <= 2 + 1e-6
        # Log domain, float64: log(|W|^p g e^s + |b|^p) = t + log v.
        log_wg = (weight.double().abs().pow(p) @ gamma_in.double()).log() + s
        expected = torch.logaddexp(log_wg, b.double().abs().pow(p).log()) if b is not None else log_wg
        torch.testing.assert_close(t_k + v_k.double().log(), expected, rtol=0,
                                   atol=1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("target,dtype", cases(([F32, F64],)))
def test_gamma_forward_zero_and_extreme(target, dtype):
    dev, ns = target.device, target.ns
    # An all-zero layer gives an exact zero vector with log scale 0 (no NaN from log 0), bias or not, op and twin.
    for bias in (None, torch.zeros(3, dtype=dtype, device=dev)):
        for fn in (ns.gamma_forward.default, reference.gamma_forward):
            v, t = fn(torch.zeros(3, 4, dtype=dtype, device=dev), bias, torch.ones(4, dtype=dtype, device=dev),
                      log_scale(5.0).to(dev), 2.0)
            assert torch.equal(v.cpu(), torch.zeros(3, dtype=dtype)) and float(t) == 0.0
    w = torch.zeros(9, 5, dtype=dtype, device=dev)
    gin = torch.ones(5, dtype=dtype, device=dev)
    # Only the bias contributes.
    b = torch.arange(9, dtype=dtype, device=dev)
    y, t = ns.gamma_forward.default(w, b, gin, log_scale(3.0).to(dev), 2.0)
    y_ref, t_ref = reference.gamma_forward(w, b, gin, log_scale(3.0).to(dev), 2.0)
    close(y, y_ref, dtype, "bias only")
    close(t, t_ref, dtype, "bias only log scale")
    # A huge log scale (a deep network) stays in range.
    w = torch.randn(17, 40, dtype=dtype, device=dev)
    gin = torch.rand(40, dtype=dtype, device=dev) + 0.5
    b = torch.randn(17, dtype=dtype, device=dev)
    for s in (-800.0, 800.0):
        y, t = ns.gamma_forward.default(w, b, gin, log_scale(s).to(dev), 2.0)
        y_ref, t_ref = reference.gamma_forward(w, b, gin, log_scale(s).to(dev), 2.0)
        # normalized to a maximum of 1 (up to rounding; the contract allows [1, 2])
        assert torch.isfinite(y).all() and 0.999 <= y.max().item() <= 2.0
        close(y, y_ref, dtype, f"log scale {s}")
        close(t, t_ref, dtype, f"log scale {s}")
    # |b|^p beyond float32 range for an in-range bias: the addend is float64.
    if dtype == F32:
        b = torch.tensor([1e20, -3.0, 0.0], dtype=dtype)
        w3, g3, s3 = torch.randn(3, 4, dtype=dtype), torch.ones(4, dtype=dtype), log_scale(0.0)
        y, t = ns.gamma_forward.default(w3.to(dev), b.to(dev), g3.to(dev), s3.to(dev), 3.0)
        assert torch.isfinite(y).all() and math.isfinite(t.item())
        y_ref, t_ref = reference.gamma_forward(w3, b, g3, s3, 3.0)
        close(y, y_ref, dtype, "huge bias vs reference")
        close(t, t_ref, dtype, "huge bias log scale vs reference")
        if target.cuda:
            y_cpu, t_cpu = torch.ops.pathsgd.gamma_forward.default(w3, b, g3, s3, 3.0)
            close(y, y_cpu, dtype, "huge bias vs cpu")
            close(t, t_cpu, dtype, "huge bias log scale vs cpu")
    # Empty layers.
    y, t = ns.gamma_forward.default(torch.empty(0, 4, dtype=dtype, device=dev), None,
                                    torch.ones(4, dtype=dtype, device=dev), log_scale(1.0).to(dev), 2.0)
    assert y.shape == (0,) and t.item() == 0.0
    y, t = ns.gamma_forward.default(torch.empty(3, 0, dtype=dtype, device=dev), None,
                                    torch.ones(0, dtype=dtype, device=dev), log_scale(1.0).to(dev), 2.0)
    assert torch.equal(y, torch.zeros(3, dtype=dtype, device=dev)) and t.item() == 0.0


@pytest.mark.parametrize("target,bad", cases((["gamma_shape", "gamma_dtype", "log_scale_dtype", "bias_shape", "p"],)))
def test_gamma_forward_checks_inputs(target, bad):
    dev = target.device
    args = dict(weight=torch.randn(3, 4, device=dev), bias=torch.randn(3, device=dev),
                gamma_in=torch.ones(4, device=dev), s=log_scale(0.0).to(dev), p=2.0)
    if bad == "gamma_shape":
        args["gamma_in"] = torch.ones(5, device=dev)
    elif bad == "gamma_dtype":
        args["gamma_in"] = torch.ones(4, dtype=F64, device=dev)
    elif bad == "log_scale_dtype":
        args["s"] = torch.tensor(0.0, device=dev)
    elif bad == "bias_shape":
        args["bias"] = torch.randn(4, device=dev)
    else:
        args["p"] = 0.5
    with pytest.raises(RuntimeError, match="pathsgd"):
        target.ns.gamma_forward.default(*args.values())


# ----------------------------------------------------------------------------------------------------------------
# fused_dense_step_
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,h,dtype,p", cases((HYPER_GRID, [F32, F64], PS), cuda=[(CUDA_HYPER, DTYPES, PS)]))
def test_fused_dense_step_hyper(target, h, dtype, p):
    """Every hyper-parameter variant against the twin, SGD written out here in float64 (float32 and
    float64), the clamp bounds and (CUDA) the CPU op. The CPU grid (eps 1e-12) on a 17 x 21 layer: full
    SIMD vectors and a scalar tail for float32 and float64; the CUDA grid (eps 0.05) on a 33 x 70 layer:
    full warps and a partial one, with dead units."""
    if bounded(h):
        case = dense_case(33, 70, dtype, seed_of(hyper_id(h), p), **DEAD)
    else:
        case = dense_case(17, 21, dtype, seed_of(hyper_id(h), p))
    w_k, b_k, _, _ = check_fused(target, case, p, h)
    if dtype in (F32, F64):
        w_e, b_e = expected_sgd(case["weight"], case["grad"], case["buffer"], kappa_of(case).pow(2.0 / p), h)
        torch.testing.assert_close(w_k.cpu().double(), w_e, **sgd_tol(dtype))
        if b_e is not None:
            torch.testing.assert_close(b_k.cpu().double(), b_e, **sgd_tol(dtype))
    if h.clamp_min is not None:  # the bound rounded to the parameter dtype, as torch.clamp does
        assert float(w_k.min()) >= float(torch.tensor(h.clamp_min, dtype=dtype))
    if h.clamp_max is not None:
        assert float(w_k.max()) <= float(torch.tensor(h.clamp_max, dtype=dtype))


@pytest.mark.parametrize("target,shape,dtype,p,h,with_grad", cases(
    (SHAPES, DTYPES, PS, [HYPER_DEFAULT], [True, False]),
    cuda=[(DENSE_SHAPES + [(1000, 1000), (2100, 64), (1, 82000), (82000, 1), (65537, 2)], DTYPES, PS, HYPER_SMALL,
           [True]),
          ([(7, 33), (4097, 3), (3, 4097), (1000, 7)], DTYPES, PS, [HYPER_SMALL[1]], [False])]))
def test_fused_dense_step_shapes(target, shape, dtype, p, h, with_grad):
    """Sizes and dtypes, updating or read-only (grad None: the weight stays, only gamma is computed):
    against the twin and (CUDA) the CPU op, and the returned gamma against |W_old|^pT gamma_out in float64."""
    case = dense_case(*shape, dtype, seed_of(shape, dtype, p, with_grad), **(DEAD if bounded(h) else {}))
    _, _, g, s = check_fused(target, case, p, h, with_grad=with_grad)
    true = (case["weight"].double().abs().pow(p).t() @ case["gamma_out"].double()
            * math.exp(float(case["gamma_out_log_scale"])))
    torch.testing.assert_close(g.cpu().double() * s.cpu().exp(), true, rtol=1e-11 if dtype == F64 else 1e-5, atol=0)


LAYOUTS = [("transposed", "contiguous"), ("strided", "contiguous"), ("contiguous", "transposed"),
           ("transposed", "transposed"), ("strided", "transposed")]  # (grad, weight)


@pytest.mark.parametrize("target,layouts,shape,dtype,p,h", cases(
    (LAYOUTS, [(17, 5), (3, 3), (1, 9)], [F32, F64, BF16], PS,
     [HYPER_DEFAULT, HYPER_DEFAULT._replace(first_step=True, nesterov=True, clamp_min=-0.1, clamp_max=0.1)]),
    cuda=[([("strided", "transposed")], [(7, 33), (33, 7), (1000, 7)], DTYPES, [2.0], HYPER_SMALL)]))
def test_fused_dense_step_non_contiguous(target, layouts, shape, dtype, p, h):
    """Transposed and strided grads, transposed weights (updated in their own strides): against the
    twin (and the CPU op) on contiguous copies."""
    grad_layout, weight_layout = layouts
    case = dense_case(*shape, dtype, seed=7, grad_layout=grad_layout, weight_layout=weight_layout,
                      **(DEAD if bounded(h) else {}))
    if grad_layout != "contiguous" and min(shape) > 1:
        assert not case["grad"].is_contiguous()
    if weight_layout != "contiguous" and min(shape) > 1:
        assert not case["weight"].is_contiguous()
    check_fused(target, case, p, h)


@pytest.mark.parametrize("target", on(TARGETS))
def test_fused_dense_step_non_contiguous_weight_updated_in_place(target):
    """The update lands in the caller's (non-contiguous) weight storage."""
    dev = target.device
    case = dense_case(6, 4, F64, seed=8, weight_layout="transposed")
    weight = place(case["weight"], dev)
    base = weight.t()  # the contiguous storage owner
    assert base.is_contiguous() and not weight.is_contiguous()
    before = weight.clone()
    sgd = SgdParams(0.1, eps=1e-12)
    fused(target.ns, weight, case["grad"].to(dev), None, case["gamma_in"].to(dev), log_scale(0).to(dev),
          case["gamma_out"].to(dev), log_scale(0).to(dev), 2.0, sgd)
    assert not torch.equal(weight, before)
    assert torch.equal(base.t(), weight)
    w_r = before.clone()
    fused(reference, w_r, case["grad"].to(dev), None, case["gamma_in"].to(dev), log_scale(0).to(dev),
          case["gamma_out"].to(dev), log_scale(0).to(dev), 2.0, sgd)
    torch.testing.assert_close(weight, w_r, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("target,dtype", cases(([F32, F64, BF16],)))
def test_fused_dense_step_lr_tensor(target, dtype):
    """A tensor lr (float64, 0-dim or [1], on the op's device or on the CPU) gives the bits of the same
    float lr and wins over the float in the sgd list; a float32 lr tensor is cast like the CPU does
    (float32 value -> float64 -> opmath), against the twin and (CUDA) the CPU op."""
    dev = target.device
    h = HYPER_SMALL[1]._replace(eps=1e-4)
    case = dense_case(33, 70, dtype, 3, **DEAD)
    expected = run_fused(target.ns, case, 2.0, h, dev)
    tensor_wins = h._replace(lr=123.0).packed()
    for lr_t in (torch.tensor(0.05, dtype=F64, device=dev), torch.tensor(0.05, dtype=F64),
                 torch.tensor([0.05], dtype=F64, device=dev)):
        got = run_fused(target.ns, case, 2.0, h._replace(lr=lr_t), dev, packed=tensor_wins)
        for a, b in zip(got, expected):
            assert same_bits(a, b), f"lr_tensor {tuple(lr_t.shape)} on {lr_t.device} differs from the float lr"
    check_fused(target, case, 2.0, h._replace(lr=torch.tensor(0.05, dtype=F64, device=dev)))
    for lr32 in (torch.tensor(0.05, dtype=F32), torch.tensor([0.05], dtype=F32)):
        check_fused(target, case, 2.0, h._replace(lr=lr32.to(dev)), packed=tensor_wins)


@pytest.mark.parametrize("target,dtype,scales,p", cases(
    ([F32, F64], [(300.0, -300.0), (-300.0, 300.0), (40.0, 40.0), (-40.0, -30.0), (-300.0, -300.0)], PS)))
def test_fused_dense_step_far_log_scales(target, dtype, scales, p):
    """gamma_in and gamma_out far outside float32 range; their product (kappa) may or may not be."""
    s_in, s_out = scales
    case = dense_case(17, 5, dtype, seed=10, s_in=s_in, s_out=s_out)
    hyper = HYPER_DEFAULT._replace(weight_decay=0.0, momentum=0.0)
    w_k, _, g_k, s_k = check_fused(target, case, p, hyper)
    w_k, g_k, s_k = w_k.cpu(), g_k.cpu(), s_k.cpu()
    assert torch.isfinite(w_k).all() and torch.isfinite(g_k).all()
    # Independent log-domain expectation in float64 (flush to 0 where the opmath type underflows).
    log_kappa_pow = (2.0 / p) * (torch.outer(case["gamma_out"].double().log(), torch.ones(5, dtype=F64))
                                 + case["gamma_in"].double().log() + s_in + s_out)
    scaled_grad = case["grad"].double() * torch.exp(-log_kappa_pow).clamp_max(1e12)  # eps = 1e-12
    torch.testing.assert_close(w_k.double(), case["weight"].double() - 0.01 * scaled_grad,
                               rtol=1e-10 if dtype == F64 else 1e-5, atol=1e-12)
    # Returned gamma is |W|^pT gamma_out with log scale s_out carried.
    log_true = (case["weight"].double().abs().pow(p).t() @ case["gamma_out"].double()).log() + s_out
    torch.testing.assert_close(s_k + g_k.double().log(), log_true, rtol=0, atol=1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("target", on(TARGETS))
def test_fused_dense_step_out_of_range_gamma(target):
    """Log scales far outside float32: kappa^(2/p) is built in float64 from logs, so no overflow
    (eps 1e-30, float32 weights): against the twin and (CUDA) the CPU op."""
    h = SgdParams(0.05, eps=1e-30)
    for s_in, s_out in ((-60.0, -10.0), (30.0, 25.0)):
        case = dense_case(20, 30, F32, 5, s_in=s_in, s_out=s_out, dead=True, w_scale=0.5)
        w, _, g, _ = check_fused(target, case, 2.0, h)
        assert torch.isfinite(w).all() and torch.isfinite(g).all(), (s_in, s_out)


@pytest.mark.parametrize("target,dtype,p", cases(([F32, F64], [1.0, 2.0])))
def test_fused_dense_step_kappa_in_range_with_spread_gamma(target, dtype, p):
    """kappa_ij^(2/p) in range although exp((2/p) * (s_in + s_out)) alone is not.

    gamma_in holds entries 1 and 1e-30 (float32 has room for both); the log scales
    sum to S with gamma_out_i * e^S beyond the opmath range, while
    gamma_out_i * 1e-30 * e^S is an ordinary number. The twin (and the definition)
    give the finite scaled update; a kernel that folds the whole log scale into
    one factor turns it into inf and the update into 0.
    """
    dev = target.device
    # (tiny, S): exp((2/p) * S) overflows the opmath type, (tiny * e^S)^(2/p) is between 1 and 1e8.
    tiny, s = {(F32, 2.0): (1e-37, 90.0), (F32, 1.0): (1e-20, 48.0),
               (F64, 2.0): (1e-305, 720.0), (F64, 1.0): (1e-170, 400.0)}[(dtype, p)]
    gamma_in = torch.tensor([1.0, tiny, 0.5], dtype=dtype)
    gamma_out = torch.tensor([1.0, 1.5], dtype=dtype)
    log_kappa_pow = (2.0 / p) * (gamma_out.double().log()[:, None] + gamma_in.double().log()[None, :] + s)
    expected_update = torch.exp(-log_kappa_pow)  # lr = 1, grad = 1, weight = 1
    assert 1e-8 < float(expected_update[0, 1]) < 1.0  # the middle column's update is an ordinary number
    for name, impl in (("reference", reference), (target.name, target.ns)):
        w = torch.ones(2, 3, dtype=dtype, device=dev)
        fused(impl, w, torch.ones(2, 3, dtype=dtype, device=dev), None, gamma_in.to(dev), log_scale(s / 2).to(dev),
              gamma_out.to(dev), log_scale(s / 2).to(dev), p, SgdParams(1.0, eps=1e-12))
        assert torch.isfinite(w).all(), f"{name}: non-finite weights {w}"
        torch.testing.assert_close((1.0 - w.cpu().double()), expected_update, rtol=1e-4, atol=1e-20,
                                   msg=lambda m: f"{name}: update differs from the definition: {m}")


@pytest.mark.parametrize("target,shape,spread,p", cases(([(1, 3001), (3001, 1), (7, 900)], ["plain", "wide-float64"],
                                                          PS)))
def test_fused_dense_step_kappa_factor_paths(target, shape, spread, p):
    """The CPU kernel builds kappa^(2/p) = row_i * col_j from gamma^(2/p) times constants in
    double, or from per-element logs when gamma^(2/p) would leave the double range (float64
    gammas spanning 1e-250..1); both must give the definition's update, on wide and tall layers
    (and so must the CUDA kernels on the same inputs)."""
    rows, cols = shape
    dtype = F32 if spread == "plain" else F64
    case = dense_case(rows, cols, dtype, seed=12)
    if spread == "wide-float64":
        gen = _gen(13)
        case["gamma_in"] = torch.logspace(-250, 0, cols, dtype=F64)[torch.randperm(cols, generator=gen)]
        case["gamma_out"] = torch.logspace(-200, 0.2, rows, dtype=F64)
    hyper = HYPER_DEFAULT._replace(weight_decay=0.0)
    w_k, _, _, _ = check_fused(target, case, p, hyper)
    want, _ = expected_sgd(case["weight"], case["grad"], case["buffer"], kappa_of(case).pow(2.0 / p), hyper)
    # float32: w - lr * d is rounded to float32 (cancellation where lr * d ~ w)
    torch.testing.assert_close(w_k.cpu().double(), want, rtol=1e-10 if dtype == F64 else 1e-5,
                               atol=1e-12 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("target", on(TARGETS))
def test_fused_dense_step_zero_gamma_uses_eps(target):
    """A dead unit (gamma 0) gives kappa 0: the scale is clamped to eps, no inf/NaN."""
    for dtype in (F32, F64):
        case = dense_case(4, 3, dtype, seed=11)
        case["gamma_out"][1] = 0
        case["gamma_in"][2] = 0
        for eps in (1e-12, 1e-3):
            w, b, _, _ = check_fused(target, case, 2.0, HYPER_DEFAULT._replace(eps=eps))
            assert torch.isfinite(w).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("target,dtype,p,momentum", cases(([F32, F64], PS, [0.0, 0.9])))
def test_fused_dense_step_plain_sgd_eps_bound_on_some_rows(target, dtype, p, momentum):
    """The branch-free variants (no weight decay, nesterov, maximize, clamp) check the eps
    bound per row: rows whose kappa falls below eps must be bounded, the others not."""
    case = dense_case(9, 37, dtype, seed=int(10 * momentum) + int(p))
    case["gamma_in"] = torch.linspace(0.5, 1.5, 37, dtype=case["gamma_in"].dtype)
    case["gamma_out"][[0, 2]] = 1.0   # kappa^(2/p) of these rows > eps = 1e-3
    case["gamma_out"][[1, 4]] = 1e-6  # and of these < eps
    case["gamma_out"][6] = 0.0        # a dead unit
    hyper = HYPER_DEFAULT._replace(weight_decay=0.0, momentum=momentum, eps=1e-3)
    w_k, b_k, _, _ = check_fused(target, case, p, hyper)
    kappa = kappa_of(case)
    assert (kappa.pow(2.0 / p)[[1, 4, 6]] < 1e-3).all() and (kappa.pow(2.0 / p)[[0, 2]] > 1e-3).all()
    w_e, b_e = expected_sgd(case["weight"], case["grad"], case["buffer"], kappa.pow(2.0 / p), hyper)
    torch.testing.assert_close(w_k.cpu().double(), w_e, **sgd_tol(dtype))
    if momentum:
        torch.testing.assert_close(b_k.cpu().double(), b_e, **sgd_tol(dtype))


@pytest.mark.parametrize("target", on(TARGETS))
def test_fused_dense_step_errors(target):
    dev = target.device
    case = dense_case(4, 3, F32, seed=12)
    t = {k: v.to(dev) for k, v in case.items()}
    names = ["weight", "grad", "buffer", "gamma_in", "s_in", "gamma_out", "s_out", "p"]
    with_momentum = SgdParams(0.1, 0.9, eps=1e-12)
    plain = SgdParams(0.1, eps=1e-12)

    def call(sgd=with_momentum, **changes):
        a = [t["weight"], t["grad"], t["buffer"], t["gamma_in"], log_scale(0).to(dev), t["gamma_out"],
             log_scale(0).to(dev), 2.0]
        for k, v in changes.items():
            a[names.index(k)] = v
        return fused(target.ns, *a, sgd)

    bad = [
        (dict(grad=torch.randn(3, 4, device=dev)), "grad"),
        (dict(grad=torch.randn(4, 3, dtype=F64, device=dev)), "grad"),
        (dict(buffer=None), "momentum_buffer"),
        (dict(buffer=torch.randn(3, 4, device=dev).t()), "momentum_buffer"),
        (dict(gamma_in=torch.ones(4, device=dev)), "gamma_in"),
        (dict(gamma_out=torch.ones(4, dtype=F64, device=dev)), "gamma_out"),
        (dict(s_in=torch.zeros(1, dtype=F64, device=dev)), "log_scale"),
        (dict(p=0.5), "p must be"),
        # read-only passes (no grad, no momentum)
        (dict(sgd=plain, grad=None, buffer=None, gamma_in=torch.ones(4, device=dev)), "gamma_in"),
        (dict(sgd=plain, buffer=None, grad=torch.randn(3, 4, device=dev)), "grad"),
        (dict(sgd=plain, grad=None, buffer=None, gamma_out=torch.ones(5, device=dev)), "gamma_out"),
        (dict(sgd=plain, grad=None, buffer=None, p=0.5), "p must be"),
        (dict(sgd=plain, grad=None, buffer=None, s_in=log_scale(0).to(dev).float()), "log_scale"),
    ]
    if target.device == "cuda":  # tensors on two devices (every tensor is a CPU tensor under the emulation)
        bad += [(dict(sgd=plain, grad=None, buffer=None, gamma_in=t["gamma_in"].cpu()), "gamma_in"),
                (dict(sgd=plain, buffer=None, grad=torch.randn(4, 3)), "grad")]
    for changes, needle in bad:
        with pytest.raises(RuntimeError, match=needle):
            call(**changes)


@pytest.mark.parametrize("target", on(TARGETS))
def test_fused_dense_step_large_1000x1001(target):
    """One large odd size (both thread-parallel loops of the CPU kernel split it), float32 and float64."""
    torch.set_num_threads(2)
    for dtype in (F32, F64):
        case = dense_case(1000, 1001, dtype, seed=13)
        for p, hyper in ((2.0, HYPER_DEFAULT._replace(nesterov=True, clamp_min=-0.5, clamp_max=0.5)),
                         (3.0, HYPER_DEFAULT._replace(first_step=True, maximize=True))):
            check_fused(target, case, p, hyper)


@pytest.mark.parametrize("target,dtype,shape", cases((DTYPES, [(4097, 3), (3, 4097), (1024, 1024), (2500, 130),
                                                               (65, 9000)])))
def test_fused_dense_step_deterministic_and_alignment_independent(target, dtype, shape):
    """Two runs, and a run on data that is not 16-byte aligned, give the same bits."""
    dev = target.device
    h = HYPER_SMALL[1]._replace(eps=1e-4)
    case = dense_case(*shape, dtype, 11, **DEAD)
    w, g, buf = (case[k].to(dev) for k in ("weight", "grad", "buffer"))
    rest = [case[k].to(dev) for k in ("gamma_in", "gamma_in_log_scale", "gamma_out", "gamma_out_log_scale")]
    results = []
    for aligned in (True, True, False):
        wc, gc, bc = ((x.clone() if aligned else unaligned_copy(x)) for x in (w, g, buf))
        y, t = fused(target.ns, wc, gc, bc, *rest, 2.0, h)
        results.append((wc, bc, y, t))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert same_bits(a, b)


@pytest.mark.parametrize("target", on(TARGETS))
def test_fused_dense_step_empty(target):
    dev = target.device
    for shape in ((0, 5), (5, 0), (0, 0)):
        w = torch.empty(shape, device=dev)
        y, t = fused(target.ns, w, torch.empty(shape, device=dev), None, torch.ones(shape[1], device=dev),
                     log_scale(0.0).to(dev), torch.ones(shape[0], device=dev), log_scale(0.0).to(dev), 2.0,
                     SgdParams(0.1, eps=1e-12))
        assert y.shape == (shape[1],) and torch.equal(y, torch.zeros_like(y)) and t.item() == 0.0


@slow
@pytest.mark.parametrize("target,shape,dtype", cases(
    ([(300_000, 3), (3, 300_000), (1, 1_000_000), (1_000_000, 1), (70_000, 70)], DTYPES), targets=CUDA_TARGETS))
def test_tall_and_wide_layers_slow(target, shape, dtype):
    """Layers whose reductions run over 10^5-10^6 terms. A float32 reduction of that length is not
    accurate to float32 rounding in every order (the reference's float32 matrix-vector product was
    measured 3.5e-5 off on a 10^6 x 1 layer, the emulated CUDA kernel 5e-8), so the CUDA kernels are
    compared with the reference evaluated in float64 at the dtype's tolerance, and with the CPU
    kernel: elementwise results at the dtype's tolerance, reductions at 1e-4 (the CPU fused pass
    sums up to rows / 16 terms of a column in sequence: 3.3e-5 off on a 10^6 x 1 float16 layer)."""
    dev = target.device
    h = HYPER_SMALL[1]
    case = dense_case(*shape, dtype, 13, **DEAD)
    got = run_fused(target.ns, case, 2.0, h, dev)
    cpu = run_fused(torch.ops.pathsgd, case, 2.0, h, "cpu")
    exact = run_fused(reference, {k: v.double() for k, v in case.items()}, 2.0, h, "cpu")
    odt = OPMATH[dtype]
    for name, other in (("float64 reference", exact), ("cpu", cpu)):
        close(got[0], other[0].to(dtype), dtype, f"weight vs {name}")
        close(got[1], other[1].to(dtype), dtype, f"momentum buffer vs {name}")
    close(got[2], exact[2].to(odt), odt, "gamma_out vs float64 reference")
    close(got[3], exact[3], odt, "log scale vs float64 reference")
    torch.testing.assert_close(got[2].cpu(), cpu[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[3].cpu(), cpu[3], rtol=1e-4, atol=0)
    again = run_fused(target.ns, case, 2.0, h, dev)
    assert all(same_bits(a, b) for a, b in zip(got, again)), "a rerun differs"
    gen = _gen(13)
    w = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    gin, s = gamma_vec(shape[1], dtype, gen, zeros=True), log_scale(0.25)
    y_dev, t_dev = target.ns.gamma_forward.default(w.to(dev), None, gin.to(dev), s.to(dev), 2.0)
    y_cpu, t_cpu = torch.ops.pathsgd.gamma_forward.default(w, None, gin, s, 2.0)
    y_ref, t_ref = reference.gamma_forward(w.double(), None, gin.double(), s, 2.0)
    close(y_dev, y_ref.to(odt), odt, "gamma vs float64 reference")
    close(t_dev, t_ref, odt, "log scale vs float64 reference")
    torch.testing.assert_close(y_dev.cpu(), y_cpu, rtol=1e-4, atol=1e-4)  # the CPU sums a row in 32 lanes
    torch.testing.assert_close(t_dev.cpu(), t_cpu, rtol=1e-4, atol=0)


@slow
@pytest.mark.parametrize("target", on(CUDA_TARGETS))
def test_more_than_2_31_elements_slow(target):
    """Index arithmetic past int32: a float16 weight and a clamped tensor of more than 2^31 elements
    (about 4.3 GB each), against the CPU kernels."""
    dev, ns, cpu = target.device, target.ns, torch.ops.pathsgd
    rows, cols = 65537, 32769  # 2,147,581,953 elements
    assert rows * cols > 2 ** 31
    w = torch.empty(rows, cols, dtype=F16).uniform_(-1, 1, generator=_gen(0))
    gin = torch.rand(cols, dtype=F32, generator=_gen(1))
    gout = torch.rand(rows, dtype=F32, generator=_gen(2))
    s = log_scale(0.0)
    y_dev, t_dev = ns.gamma_forward.default(w.to(dev), None, gin.to(dev), s.to(dev), 2.0)
    y_cpu, t_cpu = cpu.gamma_forward.default(w, None, gin, s, 2.0)
    close(y_dev, y_cpu, F32, "gamma_forward past 2^31 elements")
    close(t_dev, t_cpu, F32, "its log scale")
    # the read-only fused pass (no grad): the backward gamma over every element, the weight untouched
    sgd = SgdParams(0.1, eps=1e-12)
    y_dev, t_dev = fused(ns, w.to(dev), None, None, gin.to(dev), s.to(dev), gout.to(dev), s.to(dev), 2.0, sgd)
    y_cpu, t_cpu = fused(cpu, w, None, None, gin, s, gout, s, 2.0, sgd)
    close(y_dev, y_cpu, F32, "gamma_out past 2^31 elements")
    del y_cpu, gin, gout
    flat = w.view(-1)
    del w
    expected = flat[-1000:].clamp(-0.5, 0.25)
    head = flat[:1000].clamp(-0.5, 0.25)
    on_dev = flat.to(dev, copy=True)
    del flat
    ns.clamp_.default([on_dev], -0.5, 0.25)
    assert torch.equal(on_dev[-1000:].cpu(), expected) and torch.equal(on_dev[:1000].cpu(), head)
    assert on_dev.max().item() <= 0.25 and on_dev.min().item() >= -0.5


# ----------------------------------------------------------------------------------------------------------------
# scaled_sgd_update_
# ----------------------------------------------------------------------------------------------------------------

MULTI_SHAPES = [(1,), (3,), (17, 5), (2, 3, 4, 5)]
SGD_SHAPES = [(1,), (7,), (33, 3), (1000,), (4097, 3), (3, 5, 7, 2)]
CUDA_HYPER_SGD = _cuda_hyper_grid(eps=0.3)
HYPER_SMALL_SGD = [h._replace(eps=0.3) for h in HYPER_SMALL]


def multi_case(shapes, dtypes, seed, layout="contiguous", kappa_log_range=3.0, special=False, w_scale=1.0,
               buf_scale=1.0):
    """params, grads, buffers, float64 kappas; ``dtypes`` cycle over the tensors; ``special``: some
    kappas 0 (the eps bound) and 1e30 (beyond float32 range: kappa^(2/p) is taken in float64)."""
    gen = _gen(seed)
    params, grads, buffers, kappas = [], [], [], []
    for i, s in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        params.append(tensor(s, dtype, gen, layout if len(s) == 2 else "contiguous", w_scale))
        grads.append(tensor(s, dtype, gen, layout if len(s) >= 1 else "contiguous"))
        buffers.append(tensor(s, dtype, gen, scale=buf_scale))
        k = torch.exp((torch.rand(s, generator=gen, dtype=F64) * 2 - 1) * kappa_log_range)
        if special:
            flat = k.view(-1)
            flat[::7] = 0.0
            flat[3::11] = 1e30
        kappas.append(k)
    return params, grads, buffers, kappas


def run_multi(impl, case, p, sgd, device, contiguous=False, packed=None):
    """scaled_sgd_update_ on copies of ``case`` on ``device`` (params and grads keep their strides
    unless ``contiguous``); returns (params, buffers)."""
    params, grads, buffers, kappas = case
    copy_ = dense_copy if contiguous else place
    params = [copy_(t, device) for t in params]
    buffers = [b.to(device, copy=True) for b in buffers] if sgd.momentum != 0 else []
    scaled(impl, params, [copy_(g, device) for g in grads], buffers, [k.to(device) for k in kappas], p, sgd, packed)
    return params, buffers


def check_multi(target, case, p, sgd):
    """The op of ``target`` against the twin (and, for the CUDA kernels, the CPU op) on contiguous
    copies, and a rerun; returns the op's (params, buffers)."""
    dev = target.device
    got = run_multi(target.ns, case, p, sgd, dev)
    others = [("reference", run_multi(reference, case, p, sgd, dev, contiguous=True))]
    if target.cuda:
        others.append(("cpu", run_multi(torch.ops.pathsgd, case, p, sgd_on(sgd, "cpu"), "cpu", contiguous=True)))
    for name, other in others:
        for i, (a, b) in enumerate(zip(got[0], other[0])):
            match(a, b, a.dtype, f"param {i} vs {name}")
        for i, (a, b) in enumerate(zip(got[1], other[1])):
            match(a, b, a.dtype, f"momentum buffer {i} vs {name}")
    again = run_multi(target.ns, case, p, sgd, dev)
    for a, b in zip(got[0] + got[1], again[0] + again[1]):
        assert same_bits(a, b), "a rerun differs"
    return got


@pytest.mark.parametrize("target,h,dtype,p", cases((HYPER_GRID, [F32, F64], PS),
                                                   cuda=[(CUDA_HYPER_SGD, DTYPES, PS)]))
def test_scaled_sgd_update_hyper(target, h, dtype, p):
    """Every hyper-parameter variant against the twin, (CUDA) the CPU op, and SGD written out here
    in float64 (float32 and float64 parameters). The CUDA grid (eps 0.3) adds kappas of 0 (the eps
    bound) and 1e30 (kappa^(2/p) beyond float32 range) and larger tensors."""
    if bounded(h):
        case = multi_case(SGD_SHAPES, [dtype], seed_of(hyper_id(h), p), special=True, w_scale=0.5, buf_scale=0.1)
    else:
        case = multi_case(MULTI_SHAPES, [dtype], seed_of(hyper_id(h), p))
    got_p, got_b = check_multi(target, case, p, h)
    if dtype in (F32, F64):
        for k, a in enumerate(got_p):
            w_e, b_e = expected_sgd(case[0][k], case[1][k], case[2][k], case[3][k].pow(2.0 / p), h)
            torch.testing.assert_close(a.cpu().double(), w_e, **sgd_tol(dtype), msg=lambda m: f"param {k}: {m}")
            if h.momentum:
                torch.testing.assert_close(got_b[k].cpu().double(), b_e, **sgd_tol(dtype))


@pytest.mark.parametrize("target,dtype,layout,p,h", cases(
    (DTYPES, ["contiguous", "transposed", "strided"], PS,
     [HYPER_DEFAULT, HYPER_DEFAULT._replace(first_step=True, clamp_min=-0.1, clamp_max=0.2),
      HYPER_DEFAULT._replace(momentum=0.0, lr=torch.tensor(0.02, dtype=F64))])))
def test_scaled_sgd_update_dtypes_layouts(target, dtype, layout, p, h):
    """Transposed params, transposed and strided grads, every dtype, a CPU float64 lr tensor."""
    check_multi(target, multi_case([(17, 5), (3, 3), (1, 1), (5, 17)], [dtype], seed=21, layout=layout), p, h)


@pytest.mark.parametrize("target,h,p", cases((HYPER_SMALL_SGD, PS)))
def test_scaled_sgd_update_mixed_dtypes_non_contiguous(target, h, p):
    """One call over parameters of every dtype, transposed params and strided grads."""
    case = multi_case([(1,), (7,), (33, 3), (1000,), (4097, 3), (3, 5, 7, 2)], DTYPES, seed=4, layout="strided",
                      special=True, w_scale=0.5, buf_scale=0.1)
    case = ([t.t().contiguous().t() if t.dim() == 2 else t for t in case[0]], *case[1:])
    assert not case[0][2].is_contiguous() and not case[1][1].is_contiguous()
    check_multi(target, case, p, h)


@pytest.mark.parametrize("target,dtype", cases(([F32, F64],)))
def test_scaled_sgd_update_huge_kappa(target, dtype):
    """Float64 kappa beyond the parameter dtype's range (1e+-300)."""
    case = multi_case([(17, 5), (9,)], [dtype], seed=22, kappa_log_range=690.0)
    for p in PS:
        got_p, _ = check_multi(target, case, p, HYPER_DEFAULT._replace(momentum=0.0, weight_decay=0.0))
        for a in got_p:
            assert torch.isfinite(a).all()


@pytest.mark.parametrize("target,dtype", cases(([F32, BF16],), targets=CUDA_TARGETS))
def test_scaled_sgd_update_many_tensors_and_large(target, dtype):
    """More tensors than one CUDA launch's metadata holds, and a tensor spanning more chunks than one
    launch (CUDA targets: the CPU kernels have no launches; 2 x 10 s on the CPU)."""
    shapes = [(i % 13 + 1, 3) for i in range(40)] + [(300 * 65536 + 5,)] + [(17,), (65536,), (65537,)]
    check_multi(target, multi_case(shapes, [dtype], seed=9, special=True, w_scale=0.5, buf_scale=0.1), 2.0,
                HYPER_SMALL_SGD[1])


@pytest.mark.parametrize("target", on(TARGETS))
def test_scaled_sgd_update_lr_tensor_and_empty(target):
    dev = target.device
    h = HYPER_SMALL_SGD[1]._replace(eps=1e-4)
    case = multi_case(SGD_SHAPES, [F32], seed=2, special=True, w_scale=0.5, buf_scale=0.1)
    expected = run_multi(target.ns, case, 2.0, h, dev)
    tensor_wins = h._replace(lr=7.0).packed()
    for lr_t in (torch.tensor(0.05, dtype=F64, device=dev), torch.tensor(0.05, dtype=F64)):
        got = run_multi(target.ns, case, 2.0, h._replace(lr=lr_t), dev, packed=tensor_wins)
        for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
            assert same_bits(a, b), f"lr_tensor on {lr_t.device} differs from the float lr"
    # zero-size tensors are skipped
    ps = [torch.empty(0, device=dev), torch.ones(3, device=dev)]
    scaled(target.ns, ps, [torch.empty(0, device=dev), torch.ones(3, device=dev)], [],
           [torch.empty(0, dtype=F64, device=dev), torch.ones(3, dtype=F64, device=dev)], 2.0,
           SgdParams(0.5, eps=1e-12))
    assert torch.equal(ps[1], torch.full((3,), 0.5, device=dev))
    # empty lists: the wrappers return early (the ops need a tensor to dispatch on)
    ops.scaled_sgd_update_([], [], [], [], 2.0, SgdParams(0.1, 0.9, first_step=True, eps=1e-12))
    ops.clamp_([], -1.0, 1.0)


@pytest.mark.parametrize("target", on(TARGETS))
def test_scaled_sgd_update_errors(target):
    dev = target.device
    w = torch.randn(5, device=dev)
    kappa = torch.ones(5, dtype=F64, device=dev)
    plain, with_momentum = SgdParams(0.1, eps=1e-12), SgdParams(0.1, 0.9, eps=1e-12)
    bad = [
        (([w], [], [], [kappa], plain), "same length"),
        (([w], [], [], [], plain), "same length"),
        (([w], [torch.randn(5, device=dev)], [], [kappa], with_momentum), "momentum buffer"),
        (([w], [torch.randn(5, device=dev)], [torch.zeros(5, device=dev)], [torch.ones(5, device=dev)],
          with_momentum), "kappa 0"),
        (([w], [torch.randn(5, device=dev)], [], [torch.ones(5, device=dev)], plain), "kappa 0"),
        (([w], [torch.randn(6, device=dev)], [torch.zeros(5, device=dev)], [kappa], with_momentum), "grad 0"),
        (([w], [torch.randn(6, device=dev)], [], [kappa], plain), "grad 0"),
    ]
    if target.device == "cuda":  # a CPU grad next to a CUDA parameter
        bad.append((([w], [torch.randn(5)], [], [kappa], plain), "grad 0"))
    for (params, grads, buffers, kappas, sgd), needle in bad:
        with pytest.raises(RuntimeError, match=needle):
            scaled(target.ns, params, grads, buffers, kappas, 2.0, sgd)


# ----------------------------------------------------------------------------------------------------------------
# clamp_
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,dtype,bounds", cases(
    (DTYPES, [(-0.05, 0.05), (0.0, 0.0), (-1.0, -0.5), (-math.inf, 0.1), (-0.1, math.inf), (-0.5, 0.5), (0.1, 0.1),
              (-2.0, -1.0)])))
def test_clamp(target, dtype, bounds):
    """Exactly torch.clamp (NaN propagates, +-inf clamped), in place, on contiguous tensors, a transposed
    view (strides kept) and a strided view: against torch.clamp, the twin and (CUDA) the CPU op."""
    dev = target.device
    gen = _gen(31)
    lo, hi = bounds
    tensors = [tensor(s, dtype, gen) for s in [(1,), (3, 3), (7,), (17, 5), (33, 3), (1000,), (1001,), (4097, 3),
                                               (65537,)]]
    tensors += [tensor((17, 5), dtype, gen, "transposed"), tensor((4, 6), dtype, gen, "strided")]
    tensors[1][0, 0] = float("nan")
    tensors[1][0, 1] = float("inf")
    tensors[1][0, 2] = -float("inf")
    expected = [t.clone().clamp_(lo, hi) for t in tensors]
    got = [place(t, dev) for t in tensors]
    assert not got[-2].is_contiguous() and not got[-1].is_contiguous()
    target.ns.clamp_.default(got, lo, hi)
    ref = [place(t, dev) for t in tensors]
    reference.clamp_(ref, lo, hi)
    others = [ref]
    if target.cuda:
        cpu = [place(t, "cpu") for t in tensors]
        torch.ops.pathsgd.clamp_.default(cpu, lo, hi)
        others.append(cpu)
    for t, a, e, *rest in zip(tensors, got, expected, *others):
        assert a.stride() == t.stride()
        for b in [e, *rest]:
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)
    assert math.isnan(float(got[1][0, 0]))  # NaN propagates like torch.clamp


@pytest.mark.parametrize("target", on(TARGETS))
def test_clamp_many_tensors_mixed_and_errors(target):
    dev = target.device
    ts = [torch.randn(i + 1, device=dev, dtype=DTYPES[i % 4]) * 3 for i in range(50)]
    expected = [t.clamp(-1.0, 2.0) for t in ts]
    target.ns.clamp_.default(ts, -1.0, 2.0)
    for a, b in zip(ts, expected):
        assert torch.equal(a, b)
    t = torch.randn(3, device=dev)
    with pytest.raises(RuntimeError, match="lo must be <= hi"):
        target.ns.clamp_.default([t], 0.1, -0.1)
    with pytest.raises((ValueError, RuntimeError), match="lo must be <= hi"):
        reference.clamp_([t], 0.1, -0.1)


# ----------------------------------------------------------------------------------------------------------------
# Determinism of the CPU kernels over thread counts
# ----------------------------------------------------------------------------------------------------------------

def _all_ops_once(dtype, threads):
    cpu = torch.ops.pathsgd
    torch.set_num_threads(threads)
    out = []
    case = dense_case(1000, 1001, dtype, seed=41)
    v, t = cpu.gamma_forward.default(case["weight"].t().contiguous(), None, case["gamma_out"], log_scale(1.0), 3.0)
    out += [v, t]
    for p, hyper in ((2.0, HYPER_DEFAULT), (3.0, HYPER_DEFAULT._replace(nesterov=True, clamp_min=-0.5,
                                                                      clamp_max=0.5))):
        out += [x for x in run_fused(cpu, case, p, hyper, "cpu") if x is not None]
    params, buffers = run_multi(cpu, multi_case([(300, 301), (40001,)], [dtype], seed=42), 3.0, HYPER_DEFAULT, "cpu")
    out += params + buffers
    c = [tensor((70001,), dtype, _gen(43))]
    cpu.clamp_.default(c, -0.3, 0.3)
    return out + c


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [F32, F64], ids=value_id)
def test_cpu_deterministic_runs_and_thread_counts(dtype):
    """Two identical runs are bit-identical, and so are runs on 1 and 2 threads."""
    first = _all_ops_once(dtype, 2)
    second = _all_ops_once(dtype, 2)
    single = _all_ops_once(dtype, 1)
    for k, (a, b, c) in enumerate(zip(first, second, single)):
        assert torch.equal(a, b), f"output {k} differs between two identical runs"
        assert torch.equal(a, c), (f"output {k} differs between 2 threads and 1 thread "
                                   f"(max diff {float((a.double() - c.double()).abs().max())})")


@needs_cpu_kernels
@pytest.mark.skipif(sys.platform != "linux" or not torch.backends.openmp.is_available(),
                    reason="OpenMP builds: Linux with an OpenMP torch")
def test_cpu_kernels_built_with_openmp():
    """at::parallel_for is inline: without -fopenmp the extension's kernels would run on one
    thread (and the thread-count determinism tests above would pass vacuously)."""
    from pathsgd import _C
    assert _C.WITH_OPENMP == 1


@needs_cpu_kernels
def test_cpu_deterministic_thread_counts_odd_split():
    """Column blocks that do not start on a SIMD boundary (cols not a multiple of the vector width)."""
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        case = dense_case(40, 2001, F32, seed=44)
        results.append(run_fused(torch.ops.pathsgd, case, 2.0, HYPER_DEFAULT, "cpu"))
    for a, b in zip(*results):
        if a is not None:
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# torch.library.opcheck
# ----------------------------------------------------------------------------------------------------------------

def _opcheck_samples(device):
    """(op name, arguments) on ``device``."""
    case = {k: v.to(device) for k, v in dense_case(5, 3, F32, seed=51).items()}
    s = log_scale(0.5).to(device)
    yield "gamma_forward", (case["weight"], torch.randn(5, device=device), case["gamma_in"], s, 2.0)
    yield "gamma_forward", (case["weight"].double(), None, case["gamma_in"].double(), s, 3.0)
    for grad, buf, first, lr in ((case["grad"], case["buffer"], False, 0.1),
                                 (case["grad"], case["buffer"], True, torch.tensor(0.1, device=device)),
                                 (None, None, False, 0.1)):
        sgd = SgdParams(lr, 0.9, 0.0, 0.01, False, False, first, 1e-12, -1.0, 1.0)
        yield "fused_dense_step_", (case["weight"].clone(), grad, None if buf is None else buf.clone(),
                                    case["gamma_in"], s, case["gamma_out"], log_scale(-0.5).to(device), 2.0,
                                    sgd.packed(), sgd.lr_tensor)
    params, grads, buffers, kappas = (
        [t.to(device) for t in ts] for ts in multi_case([(3, 2), (4,)], [F32], seed=52))
    sgd = SgdParams(0.1, 0.9, eps=1e-12, clamp_max=0.5)
    yield "scaled_sgd_update_", ([t.clone() for t in params], grads, [b.clone() for b in buffers], kappas, 2.0,
                                 sgd.packed(), sgd.lr_tensor)
    sgd = SgdParams(torch.tensor(0.2, device=device), maximize=True, eps=1e-12)
    yield "scaled_sgd_update_", ([t.clone() for t in params], grads, [], kappas, 1.0, sgd.packed(), sgd.lr_tensor)
    yield "clamp_", ([torch.randn(3, 4, device=device), torch.randn(5, device=device)], -0.1, 0.1)
    # abs-pow backward of one Conv1d(2, 3, 3, padding=1): values [output, input], leaves [|W|^p, |b|^p]
    x, w, b = torch.ones(1, 2, 5, dtype=F64), torch.rand(3, 2, 3, dtype=F64), torch.rand(3)
    y = torch.conv1d(x, w, b.double(), padding=1)
    x, w, b, y = x.to(device), w.to(device), b.double().to(device), y.to(device)
    conv = [reference.VJP_CONV, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # node 0, src 1, leaves 0/1, need_x, nd 1, ...
    yield "abs_pow_vjp", ([y, x], [w, b], [torch.rand_like(y)], [0], conv, [])
    # its forward: the conv, a reshape of it, a constant scale of that
    yield "abs_pow_forward", (x, [w, b], [reference.VJP_CONV, -1, 0, 1, 1, 1, 1, 1, 1, reference.VJP_RESHAPE, 0, 2,
                                          3, 5, reference.VJP_SCALE, 1, 0], [0.25])
    yield "abs_pow_vjp", ([y.reshape(3, 5), y, x], [w, b], [torch.rand(3, 5, dtype=F64, device=device)], [0],
                          [reference.VJP_RESHAPE, 0, 1, reference.VJP_SCALE, 1, 1, 0] + conv[:1] + [1, 2] + conv[3:],
                          [0.25])


OPCHECK_NAMES = [name for name, _ in _opcheck_samples("cpu")]


@pytest.mark.parametrize("target,index", cases((list(range(len(OPCHECK_NAMES))),), targets=TARGETS))
def test_opcheck(target, index):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) of every op on
    every target (abs_pow_forward / abs_pow_vjp have no emulated kernels: skipped under the emulation)."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck is not available in this torch")
    name, args = list(_opcheck_samples(target.device))[index]
    if target.emulated and name not in ops.CUDA_KERNEL_OPS:
        pytest.skip(f"{name} has no emulated CUDA kernel (one device-generic kernel in pathsgd._C)")
    opcheck(getattr(target.ns, name).default, args)


# ----------------------------------------------------------------------------------------------------------------
# abs_pow_vjp: the conv nets' abs-pow backward over a compiled program
# ----------------------------------------------------------------------------------------------------------------

class _VjpNet1d(torch.nn.Module):
    """Residual conv block, strided ceil-mode max pool, a constant factor, a Linear on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv1d(2, 3, 3, padding=1)
        self.conv = torch.nn.Conv1d(3, 3, 3, padding=2, dilation=2, bias=False)
        self.pool = torch.nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
        self.mix = torch.nn.Linear(4, 2)  # on (N, C, L): not fused, takes the LINEAR rule
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x)) + x
        x = self.mix(self.pool(x)) * 0.5
        return self.fc(x.flatten(1))


class _VjpNet2d(torch.nn.Module):
    """Grouped, strided, dilated 2-D convolutions, a module called twice, a 2-D max pool."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
        self.b = torch.nn.Conv2d(4, 4, 1, bias=False)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(4 * 1 * 3, 3)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = self.b(torch.relu(self.b(x)))  # shared weights: kappa sums over both calls
        return self.fc(self.pool(x).flatten(1))


class _VjpNet3d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 2, padding=1)
        self.pool = torch.nn.MaxPool3d(2, stride=1)
        self.fc = torch.nn.Linear(2 * 3 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


VJP_NETS = [(_VjpNet1d, (2, 7)), (_VjpNet2d, (2, 5, 4)), (_VjpNet3d, (1, 3, 3, 3))]


def _vjp_program_args(cls, input_shape, p, seed=0, monkeypatch=None):
    """The abs_pow_vjp arguments of a whole-network taped evaluation of ``cls`` (CPU tensors)."""
    torch.manual_seed(seed)
    model = cls().double()
    with torch.no_grad():
        for t in model.parameters():
            t.mul_(1.5)
    captured = []
    monkeypatch.setattr(ops, "abs_pow_vjp", lambda *args: captured.append(args) or reference.abs_pow_vjp(*args))
    pathsgd.path_scales(model, p, input_shape)
    monkeypatch.undo()
    assert len(captured) == 1, "the evaluation did not take the taped path"
    return captured[0]


@pytest.mark.parametrize("target,net,p", cases((VJP_NETS, PS), targets=ABS_POW_TARGETS))
def test_abs_pow_vjp_matches_reference(target, net, p, monkeypatch):
    """pathsgd::abs_pow_vjp on the target's tensors against the twin on the same device (and, on CUDA
    tensors, the compiled op on the CPU); two runs give the same bits."""
    cls, input_shape = net
    values, leaves, seeds, slots, program, factors = _vjp_program_args(cls, input_shape, p, seed=int(p),
                                                                       monkeypatch=monkeypatch)
    on_dev = [[t.to(target.device) for t in ts] for ts in (values, leaves, seeds)]
    want = reference.abs_pow_vjp(*on_dev, slots, program, factors)
    got = target.ns.abs_pow_vjp.default(*on_dev, slots, program, factors)
    again = target.ns.abs_pow_vjp.default(*on_dev, slots, program, factors)
    cpu = torch.ops.pathsgd.abs_pow_vjp.default(values, leaves, seeds, slots, program, factors) if target.cuda \
        else want
    assert len(got) == len(want) == len(leaves)
    for i, (a, b, c, d) in enumerate(zip(got, want, again, cpu)):
        assert a.shape == leaves[i].shape and a.dtype == F64 and a.device.type == torch.device(target.device).type
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda m: f"leaf {i}: {m}")
        torch.testing.assert_close(a.cpu(), d.cpu(), rtol=1e-12, atol=0, msg=lambda m: f"leaf {i} vs cpu: {m}")
        assert torch.equal(a, c), "two runs differ"
        assert bool((b > 0).any()), f"leaf {i}: all-zero kappa, the check would be vacuous"


def test_abs_pow_vjp_rules_all_covered():
    """The tapes of VJP_NETS use every compiled rule (and no Python-only node), so the
    comparison above covers all of them."""
    from pathsgd import functional, graph
    used = set()
    for cls, input_shape in VJP_NETS:
        tape = functional.evaluator_for(pathsgd.PathSGD(cls().double(), input_shape=input_shape).graph, None,
                                        frozenset())
        assert not tape.local_nodes
        for node in tape.tape:
            used.add((node.kind, node.data.conv if node.kind == graph.LAYER else None))
    assert used == {(graph.LAYER, True), (graph.LAYER, False), (graph.ALIAS, None), (graph.RESHAPE, None),
                    (graph.ADD, None), (graph.SCALE, None), (graph.SUMPOOL, None)}, used


@pytest.mark.parametrize("target", on(ABS_POW_TARGETS))
def test_abs_pow_vjp_bad_programs_raise(target, monkeypatch):
    values, leaves, seeds, slots, program, factors = _vjp_program_args(_VjpNet1d, (2, 7), 2.0,
                                                                       monkeypatch=monkeypatch)
    values, leaves, seeds = ([t.to(target.device) for t in ts] for ts in (values, leaves, seeds))
    op = target.ns.abs_pow_vjp.default
    with pytest.raises(RuntimeError, match="unknown rule 99"):
        op(values, leaves, seeds, slots, [99, 0], factors)
    with pytest.raises(RuntimeError, match="truncated program"):
        op(values, leaves, seeds, slots, program[:-1], factors)
    with pytest.raises(RuntimeError, match="slot 999 out of range"):
        op(values, leaves, seeds, [999], program, factors)
    with pytest.raises(RuntimeError, match="2 seeds for 1 seed slots"):
        op(values, leaves, seeds * 2, slots, program, factors)


# ----------------------------------------------------------------------------------------------------------------
# abs_pow_forward: the conv nets' abs-pow forward over a compiled program
# ----------------------------------------------------------------------------------------------------------------

def _forward_case(cls, input_shape, p, seed):
    """A network of VJP_NETS (float64, weights scaled off 1), its whole-network evaluator and |w|^p leaves."""
    from pathsgd import functional
    torch.manual_seed(seed)
    model = cls().double()
    with torch.no_grad():
        for t in model.parameters():
            t.mul_(1.5)
    graph = pathsgd.PathSGD(model, input_shape=input_shape).graph
    evaluator = functional.evaluator_for(graph, None, frozenset())
    assert evaluator.forward_program is not None, "no compiled forward for this net"
    with torch.no_grad():
        leaves = [t.clone() for t in evaluator.abs_pow_leaves(p, torch.device("cpu"))]
    return graph, evaluator, leaves


@pytest.mark.parametrize("target,net,p", cases((VJP_NETS, PS), targets=ABS_POW_TARGETS))
def test_abs_pow_forward_matches_reference_and_the_table_rules(target, net, p):
    """pathsgd::abs_pow_forward on the target's tensors against its twin on the same device, and the
    values it gives every node against the op table's forward rules in Python (the IR's meaning);
    two runs give the same bits; no output aliases another or an input."""
    from pathsgd import graph as ir
    cls, input_shape = net
    graph, evaluator, leaves = _forward_case(cls, input_shape, p, seed=int(p))
    ones = torch.ones((1,) + input_shape, dtype=F64, device=target.device)
    leaves = [t.to(target.device) for t in leaves]
    program, factors = evaluator.forward_program, evaluator.vjp_factors(p)
    got = torch.ops.pathsgd.abs_pow_forward.default(ones, leaves, program, factors)
    again = torch.ops.pathsgd.abs_pow_forward.default(ones, leaves, program, factors)
    want = reference.abs_pow_forward(ones, leaves, program, factors)
    assert len(got) == len(want) == max(k for _, k in evaluator.forward_index) + 1
    for i, (a, b, c) in enumerate(zip(got, want, again)):
        assert a.dtype == F64 and a.device.type == torch.device(target.device).type
        # the CPU op's direct convolution loops (csrc/direct_conv.h) sum in another order than ATen's (the twin's)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0, msg=lambda m: f"value {i} vs the twin: {m}")
        assert torch.equal(a, c), "two runs differ"
    pointers = [t.data_ptr() for t in got] + [ones.data_ptr()] + [t.data_ptr() for t in leaves]
    assert len(set(pointers)) == len(pointers), "an output aliases another output or an input"
    by_name = dict(zip(evaluator.leaf_names, leaves))

    def layer_forward(node, x):
        layer = node.data
        return layer.forward(x, by_name[layer.weight_name], by_name.get(layer.bias_name))

    env = ir.forward_values(graph, p, layer_forward, ones)
    for node_index, k in evaluator.forward_index:
        value = ones if k < 0 else got[k]
        assert value.shape == env[node_index].shape
        torch.testing.assert_close(value, env[node_index], rtol=1e-14, atol=0,
                                   msg=lambda m: f"node {graph.nodes[node_index].name}: {m}")
    assert bool((got[-1] > 0).all()) and not torch.equal(got[-1], torch.ones_like(got[-1])), "a vacuous check"


def test_abs_pow_forward_rules_all_covered():
    """The forward programs of VJP_NETS use every compiled forward rule."""
    used = set()
    for cls, input_shape in VJP_NETS:
        _, evaluator, _ = _forward_case(cls, input_shape, 2.0, seed=0)
        program, pos = evaluator.forward_program, 0
        sizes = {reference.VJP_LINEAR: 2, reference.VJP_ADD: 1, reference.VJP_SCALE: 1}
        while pos < len(program):
            rule = program[pos]
            used.add(rule)
            if rule == reference.VJP_CONV:
                nd = program[pos + 4]
                pos += 5 + 3 * nd + 1
            elif rule == reference.VJP_RESHAPE:
                pos += 3 + program[pos + 2]
            elif rule == reference.VJP_SUMPOOL:
                lifted = 2 if program[pos + 2] == 1 else program[pos + 2]
                pos += 3 + 3 * lifted + 1
            else:
                pos += 2 + sizes[rule]
    assert used == {reference.VJP_CONV, reference.VJP_LINEAR, reference.VJP_RESHAPE, reference.VJP_ADD,
                    reference.VJP_SCALE, reference.VJP_SUMPOOL}, used


def _assert_input_grad(vjp, out, leaves, gy, x, want_gx, gen):
    """The gradient of x that the VJP program ``vjp`` (slot 0: its output ``out``, slot 1: its input x,
    seed ``gy``) gives, checked against ``want_gx`` through the weight gradient of a layer before x:
    x = conv(u, v) with a random u of twice x's size and a kernel v as large as x, so v's gradient is
    the correlation of x's gradient with u (all of it, not only its channel sums). Returns v's gradient."""
    nd, spatial = x.dim() - 2, x.shape[2:]
    u = torch.rand((1, 1) + tuple(2 * n - 1 for n in spatial), generator=gen, dtype=F64)
    v = torch.rand((x.shape[1], 1) + tuple(spatial), generator=gen, dtype=F64)
    ones, zeros = [1] * nd, [0] * nd
    x_of_u = torch.ops.aten.convolution(u, v, None, ones, zeros, ones, False, zeros, 1)
    assert x_of_u.shape == x.shape
    chain = vjp + [reference.VJP_CONV, 1, 2, len(leaves), -1, 0, nd, *ones, *zeros, *ones, 1]
    kv = torch.ops.pathsgd.abs_pow_vjp.default([out, x_of_u, u], leaves + [v], [gy], [0], chain, [])[-1]
    _, want_v, _ = torch.ops.aten.convolution_backward(want_gx, u, v, None, ones, zeros, ones, False, zeros, 1,
                                                       [False, True, False])
    torch.testing.assert_close(kv, want_v, rtol=1e-13, atol=0)
    return kv


# (nd, input shape without batch, out channels, kernel, stride, padding, dilation, groups)
DIRECT_CONVS = [
    (1, (1, 40), 32, (5,), (1,), (2,), (1,), 1),      # the MNIST-1D CNN's first layer
    (1, (6, 13), 4, (3,), (2,), (0,), (1,), 2),       # strided, grouped, odd length
    (1, (3, 9), 5, (3,), (1,), (4,), (3,), 1),        # padding wider than the reach, dilated
    (1, (2, 4), 3, (7,), (3,), (3,), (1,), 1),        # kernel longer than the input
    (2, (1, 12, 12), 6, (3, 3), (1, 1), (0, 0), (1, 1), 1),   # the MNIST net's first layer
    (2, (4, 7, 9), 6, (3, 2), (2, 1), (1, 2), (1, 2), 2),     # strided, dilated, grouped, odd sizes
    (2, (3, 5, 6), 3, (2, 3), (1, 3), (2, 0), (2, 1), 3),     # depthwise, stride 3 along the width
    (1, (37, 11), 41, (3,), (1,), (1,), (1,), 1),     # 37 and 41 channels: full and masked vectors, two blocks
    (2, (10, 6, 5), 70, (3, 3), (1, 1), (1, 1), (1, 1), 2),   # 35 channels per group out, 5 in
    (2, (16, 14, 14), 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # past the direct loops' size limit: ATen
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", DIRECT_CONVS, ids=lambda c: f"{c[0]}d-{'x'.join(map(str, c[1]))}-g{c[7]}")
def test_abs_pow_ops_convolutions_match_aten(case, bias):
    """The ops' convolution rules (on CPU tensors: the direct loops of csrc/direct_conv.h) on odd
    geometries (padding wider than the reach, kernels longer than the input, strides, dilations, groups,
    channel counts that fill no, one or several vector blocks) against ATen's convolution and
    convolution_backward: values, input/weight/bias gradients, with and without the input gradient, a
    non-contiguous output gradient; two runs give the same bits."""
    nd, shape, out_ch, kernel, stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(len(shape) * 7 + out_ch)
    x = torch.rand((1,) + shape, generator=gen, dtype=F64) + 0.5
    w = torch.rand((out_ch, shape[0] // groups) + kernel, generator=gen, dtype=F64) + 0.25
    b = torch.rand(out_ch, generator=gen, dtype=F64) if bias else None
    geometry = [*stride, *padding, *dilation, groups]
    leaves = [w] + ([b] if bias else [])
    forward = [reference.VJP_CONV, -1, 0, 1 if bias else -1, nd, *geometry]
    want = torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False, [0] * nd, groups)
    got = torch.ops.pathsgd.abs_pow_forward.default(x, leaves, forward, [])
    assert len(got) == 1 and got[0].shape == want.shape
    torch.testing.assert_close(got[0], want, rtol=1e-13, atol=0)
    assert torch.equal(got[0], torch.ops.pathsgd.abs_pow_forward.default(x, leaves, forward, [])[0])
    gy = torch.rand(want.shape[:-2] + want.shape[-1:] + want.shape[-2:-1], generator=gen, dtype=F64).transpose(-1, -2) \
        if nd == 2 else torch.rand(want.shape, generator=gen, dtype=F64)
    for need_x in (True, False):
        vjp = [reference.VJP_CONV, 0, 1, 0, 1 if bias else -1, int(need_x), nd, *geometry]
        gx, gw, gb = torch.ops.aten.convolution_backward(gy, x, w, [out_ch] if bias else None, stride, padding,
                                                        dilation, False, [0] * nd, groups, [True, True, bias])
        # the input's gradient is checked through a second layer's weight gradient: a 1x1 conv after x
        kappas = torch.ops.pathsgd.abs_pow_vjp.default([want, x], leaves, [gy], [0], vjp, [])
        torch.testing.assert_close(kappas[0], gw, rtol=1e-13, atol=0)
        if bias:
            torch.testing.assert_close(kappas[1], gb, rtol=1e-13, atol=0)
        again = torch.ops.pathsgd.abs_pow_vjp.default([want, x], leaves, [gy], [0], vjp, [])
        assert all(torch.equal(a, c) for a, c in zip(kappas, again))
        if need_x:
            _assert_input_grad(vjp, want, leaves, gy, x, gx, gen)


# (nd, input shape without batch, kernel, stride, padding, ceil_mode): pools of the model as sum pools
DIRECT_SUM_POOLS = [
    (1, (32, 40), (2,), (2,), (0,), False),           # the MNIST-1D CNN's max pool
    (1, (3, 7), (3,), (2,), (1,), True),              # ceil mode, padded: a last window half outside
    (1, (2, 8), (3,), (3,), (1,), True),              # ceil mode whose extra window would start in the padding
    (1, (4, 5), (5,), (1,), (2,), False),             # the window as long as the input
    (2, (3, 6, 7), (2, 2), (2, 2), (0, 0), False),    # odd width: the last column is dropped
    (2, (2, 5, 6), (3, 2), (2, 1), (1, 1), True),     # padded, ceil mode, different strides
    (2, (1, 4, 4), (4, 4), (1, 1), (2, 2), False),    # windows mostly in the padding
]


@pytest.mark.parametrize("case", DIRECT_SUM_POOLS, ids=lambda c: f"{c[0]}d-{'x'.join(map(str, c[1]))}")
def test_abs_pow_ops_sum_pools_match_aten(case):
    """The ops' sum-pool rule (on CPU tensors: the direct loops of csrc/direct_conv.h) on odd geometries
    (ceil mode, padding, windows longer than the stride or the input) against ATen's avg_pool2d with
    divisor 1 and its backward: the same additions in the same order, so the same bits; a
    non-contiguous output gradient."""
    nd, shape, kernel, stride, padding, ceil_mode = case
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.rand((1,) + shape, generator=gen, dtype=F64) + 0.5
    lifted = [(1,) + kernel, (1,) + stride, (0,) + padding] if nd == 1 else [kernel, stride, padding]
    x2 = x.unsqueeze(-2) if nd == 1 else x
    want = torch.ops.aten.avg_pool2d(x2, *lifted, ceil_mode, True, 1)
    want = want.squeeze(-2) if nd == 1 else want
    program = [reference.VJP_SUMPOOL, -1, nd, *[v for a in lifted for v in a], int(ceil_mode)]
    got = torch.ops.pathsgd.abs_pow_forward.default(x, [], program, [])
    assert len(got) == 1 and torch.equal(got[0], want), (got[0], want)
    gy = torch.rand(want.shape[::-1], generator=gen, dtype=F64).permute(*reversed(range(want.dim())))
    assert not gy.is_contiguous() or gy.numel() == 1
    gy2 = gy.unsqueeze(-2) if nd == 1 else gy
    want_gx = torch.ops.aten.avg_pool2d_backward(gy2, x2, *lifted, ceil_mode, True, 1)
    want_gx = want_gx.squeeze(-2) if nd == 1 else want_gx
    vjp = [reference.VJP_SUMPOOL, 0, 1, nd, *[v for a in lifted for v in a], int(ceil_mode)]
    assert bool((_assert_input_grad(vjp, want, [], gy, x, want_gx, gen) > 0).all())


@pytest.mark.parametrize("target", on(ABS_POW_TARGETS))
def test_abs_pow_forward_bad_programs_raise(target):
    _, evaluator, leaves = _forward_case(_VjpNet1d, (2, 7), 2.0, seed=0)
    ones = torch.ones(1, 2, 7, dtype=F64, device=target.device)
    leaves = [t.to(target.device) for t in leaves]
    op, program, factors = torch.ops.pathsgd.abs_pow_forward.default, evaluator.forward_program, [0.25]
    with pytest.raises(RuntimeError, match="unknown rule 99"):
        op(ones, leaves, [99, -1], factors)
    with pytest.raises(RuntimeError, match="truncated program"):
        op(ones, leaves, program[:-1], factors)
    with pytest.raises(RuntimeError, match="operand 5 is not the input or an earlier instruction's value"):
        op(ones, leaves, [reference.VJP_ADD, -1, 5], factors)
    with pytest.raises(RuntimeError, match="leaf 9 out of range"):
        op(ones, leaves, [reference.VJP_LINEAR, -1, 9, -1], factors)
    with pytest.raises(RuntimeError, match="factor 3 out of range"):
        op(ones, leaves, [reference.VJP_SCALE, -1, 3], factors)


# ----------------------------------------------------------------------------------------------------------------
# A real GPU: no host synchronization, CUDA graphs
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", on(GPU_TARGETS))
def test_no_host_sync(target):
    """The CUDA ops never synchronize with the host (log scales and lr_tensor are read on the device)."""
    dev, ns = target.device, target.ns
    case = {k: v.to(dev) for k, v in dense_case(64, 96, F32, 1, **DEAD).items()}
    w, g, buf = case["weight"], case["grad"], case["buffer"]
    b = torch.randn(64, device=dev)
    sgd = SgdParams(torch.tensor(0.05, device=dev, dtype=F64), 0.9, eps=1e-4, clamp_min=-1.0, clamp_max=1.0)
    sgd_noclamp = sgd._replace(clamp_min=None, clamp_max=None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, t = ns.gamma_forward.default(w, b, case["gamma_in"], case["gamma_in_log_scale"], 2.0)
        fused(ns, w, g, buf, case["gamma_in"], case["gamma_in_log_scale"], case["gamma_out"],
              case["gamma_out_log_scale"], 2.0, sgd)
        scaled(ns, [w], [g], [buf], [torch.ones_like(w, dtype=F64)], 2.0, sgd_noclamp)
        ns.clamp_.default([w, b], -0.5, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(t.item())


def _gpu_models():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    cnn = torch.nn.Sequential(torch.nn.Conv1d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool1d(2),
                              torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return [("mlp", mlp, (40,)), ("cnn", cnn, (1, 40))]


@pytest.mark.parametrize("target,kind", cases((["mlp", "cnn"],), targets=GPU_TARGETS))
def test_whole_step_has_no_host_sync(target, kind):
    """A whole PathSGD step (lr as a CUDA tensor) never synchronizes with the host."""
    dev = target.device
    _, model, shape = next(m for m in _gpu_models() if m[0] == kind)
    model = model.to(dev)
    opt = pathsgd.PathSGD(model, lr=torch.tensor(0.01, device=dev), momentum=0.9, clamp=0.5, input_shape=shape)
    for step in range(3):
        for t in model.parameters():
            t.grad = torch.randn_like(t)
        torch.cuda.synchronize()
        if step > 0:  # after the first step, whose buffers and plans are made once
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t).all() for t in model.parameters())


@pytest.mark.parametrize("target,kind", cases((["mlp", "cnn"],), targets=GPU_TARGETS))
def test_whole_step_captured_in_a_cuda_graph_replays_like_eager(target, kind):
    dev = target.device
    _, model, shape = next(m for m in _gpu_models() if m[0] == kind)
    model = model.to(dev)
    twin = copy.deepcopy(model)
    kw = dict(lr=torch.tensor(0.01, device=dev), momentum=0.9, weight_decay=1e-4, input_shape=shape)
    opt, opt_twin = pathsgd.PathSGD(model, **kw), pathsgd.PathSGD(twin, **kw)
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [[torch.randn(t.shape, device=dev, generator=gen) for t in model.parameters()] for _ in range(6)]
    for t, g in zip(model.parameters(), grads[0]):
        t.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: momentum buffers exist before the capture
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t, g in zip(twin.parameters(), grads[0]):
        t.grad = g.clone()
    opt_twin.step()
    # The capture itself does not run the step: the twin's second step is the first replay.
    for i in range(1, 6):
        for t, g in zip(model.parameters(), grads[i]):
            t.grad.copy_(g)
        graph.replay()
        for t, g in zip(twin.parameters(), grads[i]):
            t.grad = g.clone()
        opt_twin.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b), f"replay {i} differs from the eager step"
