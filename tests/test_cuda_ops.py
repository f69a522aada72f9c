"""CUDA kernels of pathsgd._C against pathsgd.reference and against the CPU kernels.

Every op is compared with the pure-PyTorch twin (run on the same device) and with the
compiled CPU op on CPU copies of the same inputs, over odd sizes, all dtypes,
non-contiguous inputs and the hyper-parameter variants; repeated runs must be
bit-identical.

Where the CUDA kernels run:
- on a GPU, when one is visible and pathsgd._C has CUDA kernels;
- otherwise on the CPU emulation of the CUDA runtime, when ``PATHSGD_CUDA_EMU`` names
  the library ``make cuda-emu`` builds: the same kernels and host wrappers, registered
  as ``torch.ops.pathsgd_emu.*`` on CPU tensors, with CUDA's launch rules, 32-lane
  shuffles and barrier checks (``make test-cuda-emu``);
- neither: every test is skipped, saying why.
Under the emulation each combination grid is cut to a covering set (every pair of
values of any two axes occurs), so every kernel, dtype, hyper-parameter variant and
size class runs without running every combination; ``PATHSGD_CUDA_EMU_ALL=1`` runs
them all, and ``PATHSGD_CUDA_SLOW=1`` adds the tall/wide layers and the tensors of more
than 2^31 elements.
"""
from __future__ import annotations

import itertools
import math
import os
import zlib

import pytest
import torch

from pathsgd import reference

try:  # the compiled extension registers the ops on import
    import pathsgd._C  # noqa: F401

    _HAVE_EXT = True
except ImportError:  # pragma: no cover - depends on the build
    _HAVE_EXT = False


def _has_cuda_kernels() -> bool:
    return _HAVE_EXT and torch._C._dispatch_has_kernel_for_dispatch_key("pathsgd::fused_dense_step_", "CUDA")


def _choose_target():
    """(device, namespace of the CUDA kernels, emulated?, why skipped or None)."""
    if torch.cuda.is_available():
        if not _HAVE_EXT:
            return "cuda", None, False, "pathsgd._C (the compiled extension) is not built"
        if not _has_cuda_kernels():
            return "cuda", None, False, "pathsgd._C was built without CUDA kernels"
        return "cuda", torch.ops.pathsgd, False, None
    if not os.environ.get("PATHSGD_CUDA_EMU"):
        return "cpu", None, True, ("no CUDA GPU available and PATHSGD_CUDA_EMU is not set "
                                   "(`make test-cuda-emu` runs these tests on the CPU emulation of CUDA)")
    if not _HAVE_EXT:
        return "cpu", None, True, "pathsgd._C (the compiled extension, the CPU side of the comparison) is not built"
    from pathsgd import ops as pathsgd_ops
    pathsgd_ops.load_cuda_emulation()  # a missing library is an error, not a skip: the user asked for it
    return "cpu", torch.ops.pathsgd_emu, True, None


DEVICE, _DEV_OPS, EMULATED, _SKIP_REASON = _choose_target()
RUN_ALL = not EMULATED or os.environ.get("PATHSGD_CUDA_EMU_ALL") == "1"
SLOW = os.environ.get("PATHSGD_CUDA_SLOW") == "1"

pytestmark = [pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))]
on_gpu_only = pytest.mark.skipif(EMULATED, reason="needs a real GPU (the emulation has CPU tensors only)")
slow = pytest.mark.skipif(not SLOW, reason="slow set: PATHSGD_CUDA_SLOW=1 runs it")


def ops():
    """The CUDA kernels (on the GPU, or emulated on CPU tensors)."""
    return _DEV_OPS


def cpu_ops():
    """The compiled CPU kernels."""
    return torch.ops.pathsgd


def covering(*axes, where=lambda *combo: True):
    """The combinations of the axes' values that satisfy ``where``: all of them, or (under the
    emulation) a subset in which every pair of values of any two axes occurs at least once, a dict
    value (a hyper-parameter set) counting as one axis per key (greedy all-pairs; deterministic)."""
    full = [c for c in itertools.product(*axes) if where(*c)]
    if RUN_ALL:
        return full

    def features(combo):
        flat = []
        for i, v in enumerate(combo):
            flat += [(f"{i}.{k}", repr(x)) for k, x in v.items()] if isinstance(v, dict) else [(str(i), repr(v))]
        return {(a, b) for a, b in itertools.combinations(flat, 2)}

    feats = [features(c) for c in full]
    missing = set().union(*feats)
    chosen = []
    while missing:
        k = max(range(len(full)), key=lambda i: len(feats[i] & missing))
        chosen.append(full[k])
        missing -= feats[k]
    return chosen


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative tolerance of a tensor stored in `dtype` (opmath results of half types are float32).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}
PS = [1.0, 2.0, 3.0]
DENSE_SHAPES = [(1, 1), (7, 1), (1, 7), (7, 33), (33, 7), (1000, 7), (7, 1000), (4097, 3), (3, 4097), (130, 257)]


def opmath(dtype: torch.dtype) -> torch.dtype:
    return reference.opmath_dtype(dtype)


def assert_close(actual, expected, dtype, what=""):
    """rtol of `dtype`, with an absolute floor scaled to the data (update results can cancel)."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    rtol = RTOL[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def same_bits(a, b) -> bool:
    """Bit-identical tensors (NaNs included)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int).cpu(), b.contiguous().view(as_int).cpu())


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def gamma_vector(n: int, dtype: torch.dtype, gen: torch.Generator, zeros: bool = True):
    """A normalized gamma vector (max in [1, 2]) on the CPU, with some exact zeros."""
    g = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    if zeros and n > 3:
        g[::5] = 0
    if g.max() > 0:
        g = g / g.max() * 1.5
    return g.to(opmath(dtype))


def log_scale(value: float):
    return torch.tensor(value, dtype=torch.float64)


def to_dev(x, device=DEVICE):
    return None if x is None else x.to(device)


def unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is NOT 16-byte aligned (when t has > 0 elements)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous()
    return out


# ---------------------------------------------------------------------------
# gamma_forward
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,p,with_bias",
                         covering(DENSE_SHAPES + [(64, 5000), (2000, 300), (1, 82000), (82000, 1), (65537, 2)],
                                  DTYPES, PS, [False, True]))
def test_gamma_forward(shape, dtype, p, with_bias):
    gen = torch.Generator().manual_seed(seed_of(shape, dtype, p, with_bias))
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None
    gin = gamma_vector(cols, dtype, gen)
    s = log_scale(-1.25)
    y_cpu, t_cpu = cpu_ops().gamma_forward.default(w, b, gin, s, p)
    y_dev, t_dev = ops().gamma_forward.default(w.to(DEVICE), to_dev(b), gin.to(DEVICE), s.to(DEVICE), p)
    y_ref, t_ref = reference.gamma_forward(w.to(DEVICE), to_dev(b), gin.to(DEVICE), s.to(DEVICE), p)
    assert y_dev.device.type == DEVICE and t_dev.device.type == DEVICE
    assert y_dev.dtype == opmath(dtype) and t_dev.dtype == torch.float64 and t_dev.dim() == 0
    odt = opmath(dtype)
    assert_close(y_dev, y_ref, odt, "gamma vs reference")
    assert_close(y_dev, y_cpu, odt, "gamma vs cpu")
    assert_close(t_dev, t_ref.to(torch.float64), odt, "log scale vs reference")
    assert_close(t_dev, t_cpu, odt, "log scale vs cpu")
    # Bit-identical repeats, and independence of the data alignment.
    y2, t2 = ops().gamma_forward.default(w.to(DEVICE), to_dev(b), gin.to(DEVICE), s.to(DEVICE), p)
    assert same_bits(y2, y_dev) and same_bits(t2, t_dev)
    y3, t3 = ops().gamma_forward.default(unaligned_copy(w.to(DEVICE)), to_dev(b), gin.to(DEVICE), s.to(DEVICE), p)
    assert same_bits(y3, y_dev) and same_bits(t3, t_dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_forward_non_contiguous_and_cpu_log_scale(dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(33, 70, generator=gen, dtype=dtype).t()  # 70 x 33, not contiguous
    gin = gamma_vector(33, dtype, gen)
    s = log_scale(0.5)
    y_ref, t_ref = reference.gamma_forward(w.to(DEVICE), None, gin.to(DEVICE), s.to(DEVICE), 2.0)
    wd = w.to(DEVICE)
    assert not wd.is_contiguous()
    y_dev, t_dev = ops().gamma_forward.default(wd, None, gin.to(DEVICE), s.to(DEVICE), 2.0)
    assert_close(y_dev, y_ref, dtype, "non-contiguous weight")
    # A CPU 0-dim log scale is accepted (read on the host, no sync); the result stays on the GPU.
    y_c, t_c = ops().gamma_forward.default(wd, None, gin.to(DEVICE), s, 2.0)
    assert t_c.device.type == DEVICE
    assert torch.equal(y_c, y_dev) and torch.equal(t_c, t_dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_forward_zero_and_extreme(dtype):
    # All-zero result: exact zeros with log scale 0.
    w = torch.zeros(9, 5, dtype=dtype, device=DEVICE)
    gin = torch.ones(5, dtype=dtype, device=DEVICE)
    y, t = ops().gamma_forward.default(w, None, gin, log_scale(3.0).to(DEVICE), 2.0)
    assert torch.equal(y, torch.zeros_like(y)) and t.item() == 0.0
    # Only the bias contributes.
    b = torch.arange(9, dtype=dtype, device=DEVICE)
    y, t = ops().gamma_forward.default(w, b, gin, log_scale(3.0).to(DEVICE), 2.0)
    y_ref, t_ref = reference.gamma_forward(w, b, gin, log_scale(3.0).to(DEVICE), 2.0)
    assert_close(y, y_ref, dtype, "bias only")
    assert_close(t, t_ref, dtype, "bias only log scale")
    # A huge log scale (a deep network) stays in range.
    w = torch.randn(17, 40, dtype=dtype, device=DEVICE)
    gin = torch.rand(40, dtype=dtype, device=DEVICE) + 0.5
    b = torch.randn(17, dtype=dtype, device=DEVICE)
    for s in (-800.0, 800.0):
        y, t = ops().gamma_forward.default(w, b, gin, log_scale(s).to(DEVICE), 2.0)
        y_ref, t_ref = reference.gamma_forward(w, b, gin, log_scale(s).to(DEVICE), 2.0)
        # normalized to a maximum of 1 (up to rounding; the contract allows [1, 2])
        assert torch.isfinite(y).all() and 0.999 <= y.max().item() <= 2.0
        assert_close(y, y_ref, dtype, f"log scale {s}")
        assert_close(t, t_ref, dtype, f"log scale {s}")
    # |b|^p beyond float32 range for an in-range bias: the addend is float64.
    if dtype == torch.float32:
        b = torch.tensor([1e20, -3.0, 0.0], dtype=dtype)
        w3, g3, s3 = torch.randn(3, 4, dtype=dtype), torch.ones(4, dtype=dtype), log_scale(0.0)
        y_cpu, t_cpu = cpu_ops().gamma_forward.default(w3, b, g3, s3, 3.0)
        y, t = ops().gamma_forward.default(w3.to(DEVICE), b.to(DEVICE), g3.to(DEVICE), s3.to(DEVICE), 3.0)
        assert torch.isfinite(y).all() and math.isfinite(t.item())
        assert_close(y, y_cpu, dtype, "huge bias")
        assert_close(t, t_cpu, dtype, "huge bias log scale")
    # Empty layers.
    y, t = ops().gamma_forward.default(torch.empty(0, 4, dtype=dtype, device=DEVICE), None,
                                       torch.ones(4, dtype=dtype, device=DEVICE), log_scale(1.0).to(DEVICE), 2.0)
    assert y.shape == (0,) and t.item() == 0.0
    y, t = ops().gamma_forward.default(torch.empty(3, 0, dtype=dtype, device=DEVICE), None,
                                       torch.ones(0, dtype=dtype, device=DEVICE), log_scale(1.0).to(DEVICE), 2.0)
    assert torch.equal(y, torch.zeros(3, dtype=dtype, device=DEVICE)) and t.item() == 0.0


# ---------------------------------------------------------------------------
# fused_dense_step_
# ---------------------------------------------------------------------------
def _hyper_grid():
    combos = []
    for momentum, dampening, nesterov, wd, maximize, first_step, clamp in itertools.product(
            [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.01], [False, True], [False, True],
            [None, (-0.3, 0.25)]):
        if momentum == 0.0 and (dampening != 0.0 or nesterov):
            continue
        combos.append(dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd,
                           maximize=maximize, first_step=first_step, clamp=clamp))
    return combos


HYPER = _hyper_grid()
HYPER_SMALL = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, first_step=False, clamp=None),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=True, first_step=False,
         clamp=(-0.3, 0.25)),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=False, first_step=True, clamp=None),
]


def _hyper_id(h):
    c = "noclamp" if h["clamp"] is None else "clamp"
    return (f"m{h['momentum']}-d{h['dampening']}-n{int(h['nesterov'])}-wd{h['weight_decay']}-"
            f"max{int(h['maximize'])}-fs{int(h['first_step'])}-{c}")


def _case_id(value):
    """Test ids of a covering() parameter: hyper-parameter sets by their values, the rest as pytest does."""
    return _hyper_id(value) if isinstance(value, dict) else None


def _dense_inputs(shape, dtype, seed, with_grad=True, momentum=0.9):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64).mul_(0.5).to(dtype)
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype) if with_grad else None
    buf = torch.randn(rows, cols, generator=gen, dtype=torch.float64).mul_(0.1).to(dtype) if momentum else None
    gin = gamma_vector(cols, dtype, gen)
    gout = gamma_vector(rows, dtype, gen)
    return w, g, buf, gin, log_scale(0.375), gout, log_scale(0.625)


def _run_dense(fn, inputs, device, p, lr, h, eps, lr_tensor=None, noncontig=False):
    """Runs one fused step on copies of `inputs` placed on `device`; returns (w, buf, y, t)."""
    w, g, buf, gin, s_in, gout, s_out = inputs
    w = w.clone().to(device)
    if noncontig:
        # weight as a transposed view of a contiguous tensor, grad as a strided slice
        w = w.t().contiguous().t()
    g = None if g is None else g.to(device)
    if noncontig and g is not None:
        big = torch.zeros(g.shape[0], 2 * g.shape[1], dtype=g.dtype, device=device)
        big[:, ::2] = g
        g = big[:, ::2]
    buf = None if buf is None else buf.clone().to(device)
    clamp = h["clamp"]
    y, t = fn(w, g, buf, gin.to(device), s_in.to(device), gout.to(device), s_out.to(device), p, lr,
              h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], h["first_step"], eps,
              None if clamp is None else clamp[0], None if clamp is None else clamp[1],
              None if lr_tensor is None else lr_tensor)
    return w, buf, y, t


def _check_dense(shape, dtype, p, h, with_grad=True, noncontig=False, eps=0.05, seed=0):
    inputs = _dense_inputs(shape, dtype, seed, with_grad=with_grad, momentum=h["momentum"])
    lr = 0.05
    dev = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, p, lr, h, eps, noncontig=noncontig)
    ref = _run_dense(reference.fused_dense_step_, inputs, DEVICE, p, lr, h, eps)
    cpu = _run_dense(cpu_ops().fused_dense_step_.default, inputs, "cpu", p, lr, h, eps)
    w, buf, y, t = dev
    assert y.device.type == DEVICE and t.device.type == DEVICE and t.dtype == torch.float64
    odt = opmath(dtype)
    for name, other in (("reference", ref), ("cpu", cpu)):
        assert_close(w, other[0], dtype, f"weight vs {name}")
        if buf is not None:
            assert_close(buf, other[1], dtype, f"momentum buffer vs {name}")
        assert_close(y, other[2], odt, f"gamma_out vs {name}")
        assert_close(t, other[3].to(torch.float64), odt, f"log scale vs {name}")
    if not with_grad:
        assert torch.equal(w.cpu(), inputs[0]), "a read-only pass must not change the weight"
    # Bit-identical repeat.
    dev2 = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, p, lr, h, eps, noncontig=noncontig)
    for a, b in zip(dev, dev2):
        assert same_bits(a, b), "repeat run differs"
    return dev


@pytest.mark.parametrize("h,dtype,p", covering(HYPER, DTYPES, PS), ids=_case_id)
def test_fused_dense_step_hyper(h, dtype, p):
    _check_dense((33, 70), dtype, p, h)


@pytest.mark.parametrize("shape,dtype,p,h",
                         covering(DENSE_SHAPES + [(1000, 1000), (2100, 64), (1, 82000), (82000, 1), (65537, 2)],
                                  DTYPES, PS, HYPER_SMALL),
                         ids=_case_id)
def test_fused_dense_step_shapes(shape, dtype, p, h):
    _check_dense(shape, dtype, p, h, seed=7)


@pytest.mark.parametrize("shape,dtype,p", covering([(7, 33), (4097, 3), (3, 4097), (1000, 7)], DTYPES, PS))
def test_fused_dense_step_grad_none(shape, dtype, p):
    _check_dense(shape, dtype, p, HYPER_SMALL[1], with_grad=False)


@pytest.mark.parametrize("shape,dtype,h", covering([(7, 33), (33, 7), (1000, 7)], DTYPES, HYPER_SMALL),
                         ids=_case_id)
def test_fused_dense_step_non_contiguous(shape, dtype, h):
    _check_dense(shape, dtype, 2.0, h, noncontig=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_dense_step_lr_tensor(dtype):
    h = HYPER_SMALL[1]
    inputs = _dense_inputs((33, 70), dtype, 3, momentum=h["momentum"])
    expected = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, 2.0, 0.05, h, 1e-4)
    for lr_t in (torch.tensor(0.05, dtype=torch.float64, device=DEVICE), torch.tensor(0.05, dtype=torch.float64),
                 torch.tensor([0.05], dtype=torch.float64, device=DEVICE)):
        got = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, 2.0, 123.0, h, 1e-4, lr_tensor=lr_t)
        for a, b in zip(got, expected):
            assert same_bits(a, b), f"lr_tensor on {lr_t.device} differs from the float lr"
    # A float32 lr tensor is cast like the CPU does (float32 value -> float64 -> opmath).
    lr32 = torch.tensor(0.05, dtype=torch.float32)
    got = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, 2.0, 1.0, h, 1e-4, lr_tensor=lr32.to(DEVICE))
    cpu = _run_dense(cpu_ops().fused_dense_step_.default, inputs, "cpu", 2.0, 1.0, h, 1e-4, lr_tensor=lr32)
    assert_close(got[0], cpu[0], dtype, "weight with float32 lr_tensor")


@pytest.mark.parametrize("dtype,shape", covering(DTYPES, [(4097, 3), (3, 4097), (1024, 1024), (2500, 130), (65, 9000)]))
def test_fused_dense_step_deterministic_and_alignment_independent(dtype, shape):
    h = HYPER_SMALL[1]
    inputs = _dense_inputs(shape, dtype, 11, momentum=h["momentum"])
    w, g, buf, gin, s_in, gout, s_out = [to_dev(x) for x in inputs]
    results = []
    for aligned in (True, True, False):
        wc = w.clone() if aligned else unaligned_copy(w)
        gc = g.clone() if aligned else unaligned_copy(g)
        bc = buf.clone() if aligned else unaligned_copy(buf)
        y, t = ops().fused_dense_step_.default(wc, gc, bc, gin, s_in, gout, s_out, 2.0, 0.05, h["momentum"],
                                               h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"],
                                               h["first_step"], 1e-4, -0.3, 0.25, None)
        results.append((wc, bc, y, t))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert same_bits(a, b)


@slow
@pytest.mark.parametrize("shape", [(300_000, 3), (3, 300_000), (1, 1_000_000), (1_000_000, 1), (70_000, 70)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tall_and_wide_layers_slow(shape, dtype):
    """Layers whose reductions run over 10^5-10^6 terms. A float32 reduction of that length is not
    accurate to float32 rounding in every order (the reference's float32 matrix-vector product was
    measured 3.5e-5 off on a 10^6 x 1 layer, the emulated CUDA kernel 5e-8), so the CUDA kernels are
    compared with the reference evaluated in float64 at the dtype's tolerance, and with the CPU
    kernel: elementwise results at the dtype's tolerance, reductions at 1e-4 (the CPU fused pass
    sums up to rows / 16 terms of a column in sequence: 3.3e-5 off on a 10^6 x 1 float16 layer)."""
    h = HYPER_SMALL[1]
    inputs = _dense_inputs(shape, dtype, 13, momentum=h["momentum"])
    dev = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, 2.0, 0.05, h, 0.05)
    cpu = _run_dense(cpu_ops().fused_dense_step_.default, inputs, "cpu", 2.0, 0.05, h, 0.05)
    exact = _run_dense(reference.fused_dense_step_, [None if x is None else x.double() for x in inputs], "cpu",
                       2.0, 0.05, h, 0.05)
    odt = opmath(dtype)
    for name, other in (("float64 reference", exact), ("cpu", cpu)):
        assert_close(dev[0], other[0].to(dtype), dtype, f"weight vs {name}")
        assert_close(dev[1], other[1].to(dtype), dtype, f"momentum buffer vs {name}")
    assert_close(dev[2], exact[2].to(odt), odt, "gamma_out vs float64 reference")
    assert_close(dev[3], exact[3], odt, "log scale vs float64 reference")
    torch.testing.assert_close(dev[2], cpu[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dev[3], cpu[3], rtol=1e-4, atol=0)
    again = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, 2.0, 0.05, h, 0.05)
    assert all(same_bits(a, b) for a, b in zip(dev, again)), "repeat run differs"
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gin, s = gamma_vector(shape[1], dtype, gen), log_scale(0.25)
    y_dev, t_dev = ops().gamma_forward.default(w.to(DEVICE), None, gin.to(DEVICE), s.to(DEVICE), 2.0)
    y_cpu, t_cpu = cpu_ops().gamma_forward.default(w, None, gin, s, 2.0)
    y_ref, t_ref = reference.gamma_forward(w.double(), None, gin.double(), s, 2.0)
    assert_close(y_dev, y_ref.to(odt), odt, "gamma vs float64 reference")
    assert_close(t_dev, t_ref, odt, "log scale vs float64 reference")
    torch.testing.assert_close(y_dev, y_cpu, rtol=1e-4, atol=1e-4)  # the CPU sums a row in 32 lanes
    torch.testing.assert_close(t_dev, t_cpu, rtol=1e-4, atol=0)


@slow
def test_more_than_2_31_elements_slow():
    """Index arithmetic past int32: a float16 weight and a clamped tensor of more than 2^31 elements
    (about 4.3 GB each), against the CPU kernels."""
    rows, cols = 65537, 32769  # 2,147,581,953 elements
    assert rows * cols > 2 ** 31
    w = torch.empty(rows, cols, dtype=torch.float16).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    gin = torch.rand(cols, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    gout = torch.rand(rows, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    s = log_scale(0.0)
    y_dev, t_dev = ops().gamma_forward.default(w.to(DEVICE), None, gin.to(DEVICE), s.to(DEVICE), 2.0)
    y_cpu, t_cpu = cpu_ops().gamma_forward.default(w, None, gin, s, 2.0)
    assert_close(y_dev, y_cpu, torch.float32, "gamma_forward past 2^31 elements")
    assert_close(t_dev, t_cpu, torch.float32, "its log scale")
    # the read-only fused pass (no grad): the backward gamma over every element, the weight untouched
    y_dev, t_dev = ops().fused_dense_step_.default(w.to(DEVICE), None, None, gin.to(DEVICE), s.to(DEVICE),
                                                   gout.to(DEVICE), s.to(DEVICE), 2.0, 0.1, 0.0, 0.0, 0.0, False,
                                                   False, False, 1e-12, None, None, None)
    y_cpu, t_cpu = cpu_ops().fused_dense_step_.default(w, None, None, gin, s, gout, s, 2.0, 0.1, 0.0, 0.0, 0.0, False,
                                                       False, False, 1e-12, None, None, None)
    assert_close(y_dev, y_cpu, torch.float32, "gamma_out past 2^31 elements")
    del y_cpu, gin, gout
    flat = w.view(-1)
    del w
    expected = flat[-1000:].clamp(-0.5, 0.25)
    head = flat[:1000].clamp(-0.5, 0.25)
    dev = flat.to(DEVICE)
    del flat
    ops().clamp_.default([dev], -0.5, 0.25)
    assert torch.equal(dev[-1000:].cpu(), expected) and torch.equal(dev[:1000].cpu(), head)
    assert dev.max().item() <= 0.25 and dev.min().item() >= -0.5


def test_fused_dense_step_out_of_range_gamma():
    # Log scales far outside float32: kappa^(2/p) is built in float64 from logs, so no overflow.
    h = HYPER_SMALL[0]
    for s_in, s_out in ((-60.0, -10.0), (30.0, 25.0)):
        inputs = list(_dense_inputs((20, 30), torch.float32, 5, momentum=0.0))
        inputs[4], inputs[6] = log_scale(s_in), log_scale(s_out)
        dev = _run_dense(ops().fused_dense_step_.default, inputs, DEVICE, 2.0, 0.05, h, 1e-30)
        cpu = _run_dense(cpu_ops().fused_dense_step_.default, inputs, "cpu", 2.0, 0.05, h, 1e-30)
        assert_close(dev[0], cpu[0], torch.float32, f"weight with log scales {s_in}, {s_out}")
        assert_close(dev[2], cpu[2], torch.float32, "gamma_out")


def test_fused_dense_step_empty():
    for shape in ((0, 5), (5, 0), (0, 0)):
        w = torch.empty(shape, device=DEVICE)
        y, t = ops().fused_dense_step_.default(
            w, torch.empty(shape, device=DEVICE), None, torch.ones(shape[1], device=DEVICE),
            log_scale(0.0).to(DEVICE), torch.ones(shape[0], device=DEVICE), log_scale(0.0).to(DEVICE), 2.0, 0.1,
            0.0, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
        assert y.shape == (shape[1],) and torch.equal(y, torch.zeros_like(y)) and t.item() == 0.0


def test_fused_dense_step_errors():
    w = torch.randn(4, 3, device=DEVICE)
    gin, gout = torch.ones(3, device=DEVICE), torch.ones(4, device=DEVICE)
    s = log_scale(0.0).to(DEVICE)
    args = (0.1, 0.0, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
    if not EMULATED:  # tensors on two devices (every tensor is a CPU tensor under the emulation)
        with pytest.raises(RuntimeError, match="gamma_in"):
            ops().fused_dense_step_.default(w, None, None, gin.cpu(), s, gout, s, 2.0, *args)
        with pytest.raises(RuntimeError, match="grad"):
            ops().fused_dense_step_.default(w, torch.randn(4, 3), None, gin, s, gout, s, 2.0, *args)
    with pytest.raises(RuntimeError, match="gamma_in"):
        ops().fused_dense_step_.default(w, None, None, torch.ones(4, device=DEVICE), s, gout, s, 2.0, *args)
    with pytest.raises(RuntimeError, match="grad"):
        ops().fused_dense_step_.default(w, torch.randn(3, 4, device=DEVICE), None, gin, s, gout, s, 2.0, *args)
    with pytest.raises(RuntimeError, match="gamma_out"):
        ops().fused_dense_step_.default(w, None, None, gin, s, torch.ones(5, device=DEVICE), s, 2.0, *args)
    with pytest.raises(RuntimeError, match="p must be"):
        ops().fused_dense_step_.default(w, None, None, gin, s, gout, s, 0.5, *args)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        ops().fused_dense_step_.default(w, torch.randn_like(w), None, gin, s, gout, s, 2.0, 0.1, 0.9, 0.0, 0.0,
                                        False, False, False, 1e-12, None, None, None)
    with pytest.raises(RuntimeError, match="log_scale"):
        ops().fused_dense_step_.default(w, None, None, gin, s.float(), gout, s, 2.0, *args)


# ---------------------------------------------------------------------------
# scaled_sgd_update_
# ---------------------------------------------------------------------------
SGD_SHAPES = [(1,), (7,), (33, 3), (1000,), (4097, 3), (3, 5, 7, 2)]


def _sgd_inputs(dtypes, seed, shapes=SGD_SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params, grads, bufs, kappas = [], [], [], []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        params.append(torch.randn(shape, generator=gen, dtype=torch.float64).mul_(0.5).to(dtype))
        grads.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        bufs.append(torch.randn(shape, generator=gen, dtype=torch.float64).mul_(0.1).to(dtype))
        k = torch.rand(shape, generator=gen, dtype=torch.float64).mul_(4.0)
        flat = k.view(-1)
        flat[::7] = 0.0          # eps clamp
        flat[3::11] = 1e30       # beyond float32 range: kappa^(2/p) is taken in float64
        kappas.append(k)
    return params, grads, bufs, kappas


def _run_sgd(fn, inputs, device, p, lr, h, eps, lr_tensor=None, noncontig=False):
    params, grads, bufs, kappas = inputs
    ps = [x.clone().to(device) for x in params]
    if noncontig:
        ps = [x.t().contiguous().t() if x.dim() == 2 else x for x in ps]
    gs = [x.to(device) for x in grads]
    if noncontig:
        gs2 = []
        for g in gs:
            big = torch.zeros(2 * g.numel(), dtype=g.dtype, device=device)
            big[::2] = g.reshape(-1)
            gs2.append(big[::2].view(g.shape) if g.dim() == 1 else big[::2].reshape(g.shape))
        gs = gs2
    bs = [x.clone().to(device) for x in bufs] if h["momentum"] else []
    ks = [x.to(device) for x in kappas]
    clamp = h["clamp"]
    fn(ps, gs, bs, ks, p, lr, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"],
       h["first_step"], eps, None if clamp is None else clamp[0], None if clamp is None else clamp[1], lr_tensor)
    return ps, bs


def _check_sgd(dtypes, p, h, noncontig=False, seed=0, shapes=SGD_SHAPES):
    inputs = _sgd_inputs(dtypes, seed, shapes)
    lr, eps = 0.05, 0.3
    dev = _run_sgd(ops().scaled_sgd_update_.default, inputs, DEVICE, p, lr, h, eps, noncontig=noncontig)
    ref = _run_sgd(reference.scaled_sgd_update_, inputs, DEVICE, p, lr, h, eps)
    cpu = _run_sgd(cpu_ops().scaled_sgd_update_.default, inputs, "cpu", p, lr, h, eps)
    for name, other in (("reference", ref), ("cpu", cpu)):
        for i, (a, b) in enumerate(zip(dev[0], other[0])):
            assert_close(a, b, a.dtype, f"param {i} vs {name}")
        for i, (a, b) in enumerate(zip(dev[1], other[1])):
            assert_close(a, b, a.dtype, f"momentum buffer {i} vs {name}")
    dev2 = _run_sgd(ops().scaled_sgd_update_.default, inputs, DEVICE, p, lr, h, eps, noncontig=noncontig)
    for a, b in zip(dev[0] + dev[1], dev2[0] + dev2[1]):
        assert same_bits(a, b), "repeat run differs"


@pytest.mark.parametrize("h,dtype,p", covering(HYPER, DTYPES, PS), ids=_case_id)
def test_scaled_sgd_update_hyper(h, dtype, p):
    _check_sgd([dtype], p, h)


@pytest.mark.parametrize("h,p", covering(HYPER_SMALL, PS), ids=_case_id)
def test_scaled_sgd_update_mixed_dtypes_non_contiguous(h, p):
    _check_sgd(DTYPES, p, h, noncontig=True, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_sgd_update_many_tensors_and_large(dtype):
    # More tensors than one launch's metadata holds, and a tensor spanning more chunks than one launch.
    shapes = [(i % 13 + 1, 3) for i in range(40)] + [(300 * 65536 + 5,)] + [(17,), (65536,), (65537,)]
    _check_sgd([dtype], 2.0, HYPER_SMALL[1], shapes=shapes, seed=9)


def test_scaled_sgd_update_lr_tensor_and_empty():
    h = HYPER_SMALL[1]
    inputs = _sgd_inputs([torch.float32], 2)
    expected = _run_sgd(ops().scaled_sgd_update_.default, inputs, DEVICE, 2.0, 0.05, h, 1e-4)
    for lr_t in (torch.tensor(0.05, dtype=torch.float64, device=DEVICE), torch.tensor(0.05, dtype=torch.float64)):
        got = _run_sgd(ops().scaled_sgd_update_.default, inputs, DEVICE, 2.0, 7.0, h, 1e-4, lr_tensor=lr_t)
        for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
            assert same_bits(a, b)
    # zero-size tensors are skipped
    ps = [torch.empty(0, device=DEVICE), torch.ones(3, device=DEVICE)]
    ops().scaled_sgd_update_.default(ps, [torch.empty(0, device=DEVICE), torch.ones(3, device=DEVICE)], [],
                                     [torch.empty(0, dtype=torch.float64, device=DEVICE),
                                      torch.ones(3, dtype=torch.float64, device=DEVICE)],
                                     2.0, 0.5, 0.0, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
    assert torch.equal(ps[1], torch.full((3,), 0.5, device=DEVICE))


def test_scaled_sgd_update_errors():
    p = torch.randn(5, device=DEVICE)
    args = (2.0, 0.1, 0.0, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
    with pytest.raises(RuntimeError, match="kappa 0"):
        ops().scaled_sgd_update_.default([p], [torch.randn(5, device=DEVICE)], [], [torch.ones(5, device=DEVICE)],
                                         *args)
    kappa = torch.ones(5, dtype=torch.float64, device=DEVICE)
    if not EMULATED:  # a CPU grad next to a CUDA parameter
        with pytest.raises(RuntimeError, match="grad 0"):
            ops().scaled_sgd_update_.default([p], [torch.randn(5)], [], [kappa], *args)
    with pytest.raises(RuntimeError, match="grad 0"):
        ops().scaled_sgd_update_.default([p], [torch.randn(6, device=DEVICE)], [], [kappa], *args)
    with pytest.raises(RuntimeError, match="same length"):
        ops().scaled_sgd_update_.default([p], [], [], [], *args)


# ---------------------------------------------------------------------------
# clamp_
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (33, 3), (1000,), (4097, 3), (65537,)]
    ts = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ts[1][2] = float("nan")
    ts[1][3] = float("inf")
    ts[1][4] = -float("inf")
    for lo, hi in ((-0.5, 0.5), (0.1, 0.1), (-2.0, -1.0)):
        dev = [t.to(DEVICE) for t in ts]
        dev[2] = dev[2].t().contiguous().t()  # non-contiguous
        ops().clamp_.default(dev, lo, hi)
        cpu = [t.clone() for t in ts]
        cpu_ops().clamp_.default(cpu, lo, hi)
        ref = [t.to(DEVICE) for t in ts]
        reference.clamp_(ref, lo, hi)
        for a, b, c in zip(dev, cpu, ref):
            assert torch.equal(a.isnan().cpu(), b.isnan()) and torch.equal(torch.nan_to_num(a).cpu(), torch.nan_to_num(b))
            assert torch.equal(a.isnan(), c.isnan())
            assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(c))
        assert dev[1][2].isnan()


def test_clamp_many_tensors_mixed_and_errors():
    ts = [torch.randn(i + 1, device=DEVICE, dtype=DTYPES[i % 4]) * 3 for i in range(50)]
    expected = [t.clamp(-1.0, 2.0) for t in ts]
    ops().clamp_.default(ts, -1.0, 2.0)
    for a, b in zip(ts, expected):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="lo must be <= hi"):
        ops().clamp_.default([torch.ones(3, device=DEVICE)], 1.0, -1.0)


@on_gpu_only
def test_no_host_sync():
    """The CUDA ops never synchronize with the host (log scales and lr_tensor are read on the device)."""
    h = HYPER_SMALL[1]
    inputs = [to_dev(x) for x in _dense_inputs((64, 96), torch.float32, 1, momentum=h["momentum"])]
    w, g, buf, gin, s_in, gout, s_out = inputs
    b = torch.randn(64, device=DEVICE)
    lr_t = torch.tensor(0.05, device=DEVICE, dtype=torch.float64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, t = ops().gamma_forward.default(w, b, gin, s_in, 2.0)
        ops().fused_dense_step_.default(w, g, buf, gin, s_in, gout, s_out, 2.0, 0.0, 0.9, 0.0, 0.0, False, False,
                                        False, 1e-4, -1.0, 1.0, lr_t)
        ops().scaled_sgd_update_.default([w], [g], [buf], [torch.ones_like(w, dtype=torch.float64)], 2.0, 0.0, 0.9,
                                         0.0, 0.0, False, False, False, 1e-4, None, None, lr_t)
        ops().clamp_.default([w, b], -0.5, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(t.item())


@on_gpu_only
def test_abs_pow_vjp_cuda_matches_reference_and_cpu():
    """pathsgd::abs_pow_vjp (one device-generic kernel) on CUDA tensors: the programs of the
    CPU kernel tests, against the Python twin on the GPU and the compiled op on the CPU."""
    import pathsgd
    from pathsgd import ops as pathsgd_ops
    from test_kernels import VJP_NETS

    for cls, input_shape in VJP_NETS:
        torch.manual_seed(5)
        model = cls().double()
        captured = []
        original = pathsgd_ops.abs_pow_vjp
        pathsgd_ops.abs_pow_vjp = lambda *args: captured.append(args) or original(*args)
        try:
            pathsgd.path_scales(model, 2.0, input_shape)
        finally:
            pathsgd_ops.abs_pow_vjp = original
        values, leaves, seeds, slots, program, factors = captured[0]
        on = [[t.to(DEVICE) for t in ts] for ts in (values, leaves, seeds)]
        got = ops().abs_pow_vjp.default(*on[:3], slots, program, factors)
        again = ops().abs_pow_vjp.default(*on[:3], slots, program, factors)
        want = reference.abs_pow_vjp(*on[:3], slots, program, factors)
        cpu = cpu_ops().abs_pow_vjp.default(values, leaves, seeds, slots, program, factors)
        for a, b, c, d in zip(got, again, want, cpu):
            assert a.device.type == torch.device(DEVICE).type
            torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
            torch.testing.assert_close(a.cpu(), d, rtol=1e-12, atol=0)
            assert torch.equal(a, b)


def _gpu_models():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    cnn = torch.nn.Sequential(torch.nn.Conv1d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool1d(2),
                              torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return [("mlp", mlp, (40,)), ("cnn", cnn, (1, 40))]


@on_gpu_only
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_whole_step_has_no_host_sync(kind):
    """A whole PathSGD step (lr as a CUDA tensor) never synchronizes with the host."""
    import pathsgd
    _, model, shape = next(m for m in _gpu_models() if m[0] == kind)
    model = model.to(DEVICE)
    opt = pathsgd.PathSGD(model, lr=torch.tensor(0.01, device=DEVICE), momentum=0.9, clamp=0.5, input_shape=shape)
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


@on_gpu_only
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_whole_step_captured_in_a_cuda_graph_replays_like_eager(kind):
    import copy

    import pathsgd
    _, model, shape = next(m for m in _gpu_models() if m[0] == kind)
    model = model.to(DEVICE)
    twin = copy.deepcopy(model)
    kw = dict(lr=torch.tensor(0.01, device=DEVICE), momentum=0.9, weight_decay=1e-4, input_shape=shape)
    opt, opt_twin = pathsgd.PathSGD(model, **kw), pathsgd.PathSGD(twin, **kw)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    grads = [[torch.randn(t.shape, device=DEVICE, generator=gen) for t in model.parameters()] for _ in range(6)]
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
