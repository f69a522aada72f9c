"""Every compiled op ``torch.ops.pathsgd.*`` (CPU) against its twin in ``pathsgd.reference``.

Some tests also check the twin itself against formulas computed here in float64
from the definitions (kappa_ij = gamma_out_i * gamma_in_j, torch.optim.SGD's update).
"""
from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch

import pathsgd  # noqa: F401  (loads pathsgd._C)
from pathsgd import ops, reference

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason=f"no compiled CPU kernels: "
                                                                    f"{ops.unavailable_reason('cpu')}")

OPS = torch.ops.pathsgd if ops.compiled_available() else None
OPMATH = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
          torch.float16: torch.float32}
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=1e-5)}
GAMMA_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=2e-5, atol=1e-6)}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def gamma_vec(n, dtype, gen, min_value=0.05):
    """A normalized gamma vector (max in [1, 2)), like the kernels produce."""
    v = torch.rand(n, generator=gen, dtype=torch.float64) * (1 - min_value) + min_value
    v = v / v.max() * (1 + float(torch.rand((), generator=gen)))
    return v.to(OPMATH[dtype])


def log_scale(x):
    return torch.tensor(float(x), dtype=torch.float64)


def tensor(shape, dtype, gen, layout="contiguous", scale=1.0):
    """randn of ``shape`` as a contiguous tensor, a transposed view, or a strided slice."""
    rows, cols = shape if len(shape) == 2 else (shape[0], 1)
    if layout == "contiguous":
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype)
    if layout == "transposed":
        assert len(shape) == 2
        t = (torch.randn(cols, rows, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return t.t()
    if layout == "strided":
        big = (torch.randn(*shape[:-1], shape[-1] * 2, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return big[..., ::2]
    raise AssertionError(layout)


def dense_case(rows, cols, dtype, seed, grad_layout="contiguous", weight_layout="contiguous", s_in=0.0, s_out=0.0):
    gen = _gen(seed)
    return dict(
        weight=tensor((rows, cols), dtype, gen, weight_layout),
        grad=tensor((rows, cols), dtype, gen, grad_layout),
        buffer=tensor((rows, cols), dtype, gen),
        gamma_in=gamma_vec(cols, dtype, gen), gamma_in_log_scale=log_scale(s_in),
        gamma_out=gamma_vec(rows, dtype, gen), gamma_out_log_scale=log_scale(s_out),
    )


HYPER_DEFAULT = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False, maximize=False,
                     first_step=False, eps=1e-12, clamp_min=None, clamp_max=None, lr_tensor=None)


def run_fused(fn, case, p, hyper, with_grad=True):
    """Runs a fused_dense_step_ implementation on clones; returns (weight, buffer, gamma_prev, log_scale)."""
    weight = case["weight"].clone() if case["weight"].is_contiguous() else case["weight"].t().clone().t()
    assert weight.stride() == case["weight"].stride()
    has_buffer = with_grad and hyper["momentum"] != 0
    buffer = case["buffer"].clone() if has_buffer else None
    gamma, scale = fn(weight, case["grad"] if with_grad else None, buffer, case["gamma_in"],
                      case["gamma_in_log_scale"], case["gamma_out"], case["gamma_out_log_scale"], float(p),
                      hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"], hyper["nesterov"],
                      hyper["maximize"], hyper["first_step"], hyper["eps"], hyper["clamp_min"], hyper["clamp_max"],
                      hyper["lr_tensor"])
    return weight, buffer, gamma, scale


def compiled_fused(*args):
    return OPS.fused_dense_step_.default(*args)


def assert_fused_match(case, p, hyper, with_grad=True, dtype=None):
    dtype = dtype or case["weight"].dtype
    w_k, b_k, g_k, s_k = run_fused(compiled_fused, case, p, hyper, with_grad)
    w_r, b_r, g_r, s_r = run_fused(reference.fused_dense_step_, case, p, hyper, with_grad)
    torch.testing.assert_close(w_k, w_r, **TOL[dtype], msg=lambda m: f"weight: {m}")
    if b_r is not None:
        torch.testing.assert_close(b_k, b_r, **TOL[dtype], msg=lambda m: f"momentum buffer: {m}")
    assert g_k.dtype == OPMATH[dtype] and g_k.shape == (case["weight"].shape[1],)
    assert s_k.dtype == torch.float64 and s_k.dim() == 0
    torch.testing.assert_close(g_k, g_r, **GAMMA_TOL[OPMATH[dtype]], msg=lambda m: f"gamma_out_prev: {m}")
    torch.testing.assert_close(s_k, s_r, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-5)
    if not with_grad:
        assert torch.equal(w_k, case["weight"]), "a read-only pass (grad=None) modified the weight"
    return w_k, b_k, g_k, s_k


def expected_sgd(w, g, buf, kappa_pow, h):
    """torch.optim.SGD's update on g / max(kappa_pow, eps), written out here in float64, then clamp."""
    w, g = w.double(), g.double()
    if h["maximize"]:
        g = -g
    d = g / kappa_pow.clamp_min(h["eps"])
    if h["weight_decay"]:
        d = d + h["weight_decay"] * w
    new_buf = None
    if h["momentum"]:
        new_buf = d.clone() if h["first_step"] else h["momentum"] * buf.double() + (1 - h["dampening"]) * d
        d = d + h["momentum"] * new_buf if h["nesterov"] else new_buf
    lr = float(h["lr_tensor"]) if h["lr_tensor"] is not None else h["lr"]
    w = w - lr * d
    if h["clamp_min"] is not None or h["clamp_max"] is not None:
        w = w.clamp(h["clamp_min"], h["clamp_max"])
    return w, new_buf


def _hyper_grid():
    out = []
    for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)]:
        for wd, maximize, first, clamp in itertools.product([0.0, 0.01], [False, True], [False, True],
                                                            [None, (-0.05, 0.05), (None, 0.05), (-0.05, None)]):
            if momentum == 0 and first:
                continue  # first_step only matters with a momentum buffer
            out.append(dict(HYPER_DEFAULT, momentum=momentum, dampening=dampening, nesterov=nesterov,
                            weight_decay=wd, maximize=maximize, first_step=first, clamp_min=clamp and clamp[0],
                            clamp_max=clamp and clamp[1]))
    return out


HYPER_GRID = _hyper_grid()


def _hid(h):
    c = "none" if h["clamp_min"] is None and h["clamp_max"] is None else f"{h['clamp_min']},{h['clamp_max']}"
    return (f"m{h['momentum']}-d{h['dampening']}-{'nest' if h['nesterov'] else 'std'}-wd{h['weight_decay']}-"
            f"{'max' if h['maximize'] else 'min'}-{'first' if h['first_step'] else 'later'}-clamp{c}")


# ----------------------------------------------------------------------------------------------------------------
# gamma_forward
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 3), (17, 5), (5, 17), (64, 33)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gamma_forward(shape, dtype, bias, p):
    gen = _gen(hash((shape, str(dtype), bias, p)) % 2**31)
    rows, cols = shape
    weight = tensor(shape, dtype, gen)
    b = tensor((rows,), dtype, gen) if bias else None
    gamma_in = gamma_vec(cols, dtype, gen)
    s = log_scale(0.7)
    v_k, t_k = OPS.gamma_forward.default(weight, b, gamma_in, s, float(p))
    v_r, t_r = reference.gamma_forward(weight, b, gamma_in, s, float(p))
    assert v_k.dtype == OPMATH[dtype] and v_k.shape == (rows,)
    torch.testing.assert_close(v_k, v_r, **GAMMA_TOL[OPMATH[dtype]])
    torch.testing.assert_close(t_k, t_r, rtol=0, atol=1e-5)
    assert 1 - 1e-6 <= float(v_k.max()) <= 2 + 1e-6
    # Both against the definition, in float64.
    true = weight.double().abs().pow(p) @ gamma_in.double() * math.exp(0.7)
    if b is not None:
        true = true + b.double().abs().pow(p)
    torch.testing.assert_close(v_k.double() * t_k.exp(), true, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                               atol=0)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gamma_forward_non_contiguous(layout, dtype):
    gen = _gen(3)
    weight = tensor((17, 5), dtype, gen, layout)
    bias = tensor((34,), dtype, gen)[::2]
    gamma_in = gamma_vec(5, dtype, gen)
    assert not weight.is_contiguous() and not bias.is_contiguous()
    for p in (1, 2, 3):
        v_k, t_k = OPS.gamma_forward.default(weight, bias, gamma_in, log_scale(0.0), float(p))
        v_r, t_r = reference.gamma_forward(weight.contiguous(), bias.contiguous(), gamma_in, log_scale(0.0), float(p))
        torch.testing.assert_close(v_k, v_r, **GAMMA_TOL[dtype])
        torch.testing.assert_close(t_k, t_r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("s", [300.0, -300.0, 700.0, -700.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gamma_forward_far_log_scale(dtype, bias, s):
    """The true gamma (1e+-130 .. 1e+-300) is far outside float32: only the log scale carries it."""
    gen = _gen(4)
    weight = tensor((6, 4), dtype, gen)
    b = tensor((6,), dtype, gen) if bias else None
    gamma_in = gamma_vec(4, dtype, gen)
    for p in (1, 2, 3):
        v_k, t_k = OPS.gamma_forward.default(weight, b, gamma_in, log_scale(s), float(p))
        v_r, t_r = reference.gamma_forward(weight, b, gamma_in, log_scale(s), float(p))
        torch.testing.assert_close(v_k, v_r, **GAMMA_TOL[dtype])
        torch.testing.assert_close(t_k, t_r, rtol=1e-12, atol=1e-6)
        assert torch.isfinite(v_k).all() and 1 - 1e-6 <= float(v_k.max()) <= 2 + 1e-6
        # Log domain, float64: log(|W|^p g e^s + |b|^p) = t + log v.
        log_wg = (weight.double().abs().pow(p) @ gamma_in.double()).log() + s
        expected = torch.logaddexp(log_wg, b.double().abs().pow(p).log()) if b is not None else log_wg
        got = t_k + v_k.double().log()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_gamma_forward_all_zero():
    """An all-zero layer gives an exact zero vector with log scale 0 (no NaN from log 0)."""
    for dtype in (torch.float32, torch.float64):
        weight = torch.zeros(3, 4, dtype=dtype)
        bias = torch.zeros(3, dtype=dtype)
        for fn in (OPS.gamma_forward.default, reference.gamma_forward):
            v, t = fn(weight, bias, torch.ones(4, dtype=dtype), log_scale(5.0), 2.0)
            assert torch.equal(v, torch.zeros(3, dtype=dtype)) and float(t) == 0.0


@pytest.mark.parametrize("bad", ["gamma_shape", "gamma_dtype", "log_scale_dtype", "bias_shape", "p"])
def test_gamma_forward_checks_inputs(bad):
    weight = torch.randn(3, 4)
    args = dict(weight=weight, bias=torch.randn(3), gamma_in=torch.ones(4), s=log_scale(0.0), p=2.0)
    if bad == "gamma_shape":
        args["gamma_in"] = torch.ones(5)
    elif bad == "gamma_dtype":
        args["gamma_in"] = torch.ones(4, dtype=torch.float64)
    elif bad == "log_scale_dtype":
        args["s"] = torch.tensor(0.0)
    elif bad == "bias_shape":
        args["bias"] = torch.randn(4)
    else:
        args["p"] = 0.5
    with pytest.raises(RuntimeError, match="pathsgd"):
        OPS.gamma_forward.default(*args.values())


# ----------------------------------------------------------------------------------------------------------------
# fused_dense_step_
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hyper", HYPER_GRID, ids=_hid)
def test_fused_all_hyper_parameters(hyper):
    for dtype, p in itertools.product([torch.float32, torch.float64], [1, 2, 3]):
        # 21 columns: full SIMD vectors and a scalar tail for float32 and float64.
        case = dense_case(17, 21, dtype, seed=len(_hid(hyper)) + p)
        w_k, b_k, _, _ = assert_fused_match(case, p, hyper)
        # The kernel against SGD written out here with kappa_ij = gamma_out_i gamma_in_j in float64.
        kappa = torch.outer(case["gamma_out"].double(), case["gamma_in"].double())
        w_e, b_e = expected_sgd(case["weight"], case["grad"], case["buffer"], kappa.pow(2.0 / p), hyper)
        tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w_k.double(), w_e, **tol)
        if b_e is not None:
            torch.testing.assert_close(b_k.double(), b_e, **tol)
        if hyper["clamp_min"] is not None:  # the bound rounded to the parameter dtype, as torch.clamp does
            assert float(w_k.min()) >= float(torch.tensor(hyper["clamp_min"], dtype=dtype))
        if hyper["clamp_max"] is not None:
            assert float(w_k.max()) <= float(torch.tensor(hyper["clamp_max"], dtype=dtype))


@pytest.mark.parametrize("with_grad", [True, False], ids=["update", "read_only"])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_sizes_and_dtypes(shape, dtype, p, with_grad):
    case = dense_case(*shape, dtype, seed=hash((shape, str(dtype), p)) % 2**31)
    w, b, g, s = assert_fused_match(case, p, HYPER_DEFAULT, with_grad=with_grad)
    # gamma_out of the layer input from the OLD weights: |W_old|^pT gamma_out, in float64.
    true = case["weight"].double().abs().pow(p).t() @ case["gamma_out"].double()
    torch.testing.assert_close(g.double() * s.exp(), true, rtol=1e-11 if dtype == torch.float64 else 1e-5, atol=0)


@pytest.mark.parametrize("layouts", [("transposed", "contiguous"), ("strided", "contiguous"),
                                     ("contiguous", "transposed"), ("transposed", "transposed"),
                                     ("strided", "transposed")], ids=lambda x: f"grad_{x[0]}-weight_{x[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fused_non_contiguous(layouts, dtype):
    grad_layout, weight_layout = layouts
    for shape in [(17, 5), (3, 3), (1, 9)]:
        case = dense_case(*shape, dtype, seed=7, grad_layout=grad_layout, weight_layout=weight_layout)
        if grad_layout != "contiguous" and min(shape) > 1:
            assert not case["grad"].is_contiguous()
        if weight_layout != "contiguous" and min(shape) > 1:
            assert not case["weight"].is_contiguous()
        for p in (1, 2, 3):
            for hyper in (HYPER_DEFAULT, dict(HYPER_DEFAULT, first_step=True, nesterov=True, clamp_min=-0.1,
                                              clamp_max=0.1)):
                assert_fused_match(case, p, hyper)


def test_fused_non_contiguous_weight_updated_in_place():
    """The update lands in the caller's (non-contiguous) weight storage."""
    case = dense_case(6, 4, torch.float64, seed=8, weight_layout="transposed")
    weight = case["weight"]
    base = weight.t()  # the contiguous storage owner
    before = weight.clone()
    OPS.fused_dense_step_.default(weight, case["grad"], None, case["gamma_in"], log_scale(0), case["gamma_out"],
                                  log_scale(0), 2.0, 0.1, 0.0, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
    assert not torch.equal(weight, before)
    assert torch.equal(base.t(), weight)
    w_r = before.clone()
    reference.fused_dense_step_(w_r, case["grad"], None, case["gamma_in"], log_scale(0), case["gamma_out"],
                                log_scale(0), 2.0, 0.1, 0.0, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
    torch.testing.assert_close(weight, w_r, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_lr_tensor(dtype):
    case = dense_case(17, 5, dtype, seed=9)
    hyper = dict(HYPER_DEFAULT, lr=0.0, lr_tensor=torch.tensor(0.05, dtype=torch.float64))
    w_t, *_ = assert_fused_match(case, 2, hyper)
    w_f, *_ = run_fused(compiled_fused, case, 2, dict(HYPER_DEFAULT, lr=0.05))
    torch.testing.assert_close(w_t, w_f, rtol=0, atol=0)
    hyper32 = dict(HYPER_DEFAULT, lr=123.0, lr_tensor=torch.tensor([0.05], dtype=torch.float32))  # tensor wins
    assert_fused_match(case, 2, hyper32)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("scales", [(300.0, -300.0), (-300.0, 300.0), (40.0, 40.0), (-40.0, -30.0), (-300, -300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_far_log_scales(dtype, scales, p):
    """gamma_in and gamma_out far outside float32 range; their product (kappa) may or may not be."""
    s_in, s_out = scales
    case = dense_case(17, 5, dtype, seed=10, s_in=s_in, s_out=s_out)
    hyper = dict(HYPER_DEFAULT, weight_decay=0.0, momentum=0.0)
    w_k, _, g_k, s_k = assert_fused_match(case, p, hyper)
    assert torch.isfinite(w_k).all() and torch.isfinite(g_k).all()
    # Independent log-domain expectation in float64 (flush to 0 where the opmath type underflows).
    log_kappa_pow = (2.0 / p) * (torch.outer(case["gamma_out"].double().log(), torch.ones(5, dtype=torch.float64))
                                 + case["gamma_in"].double().log() + s_in + s_out)
    scaled = case["grad"].double() * torch.exp(-log_kappa_pow).clamp_max(1e12)  # eps = 1e-12
    torch.testing.assert_close(w_k.double(), case["weight"].double() - 0.01 * scaled,
                               rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-12)
    # Returned gamma is |W|^pT gamma_out with log scale s_out carried.
    log_true = (case["weight"].double().abs().pow(p).t() @ case["gamma_out"].double()).log() + s_out
    torch.testing.assert_close(s_k + g_k.double().log(), log_true, rtol=0, atol=1e-12 if dtype == torch.float64
                               else 1e-5)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_kappa_in_range_with_spread_gamma(dtype, p):
    """kappa_ij^(2/p) in range although exp((2/p) * (s_in + s_out)) alone is not.

    gamma_in holds entries 1 and 1e-30 (float32 has room for both); the log scales
    sum to S with gamma_out_i * e^S beyond the opmath range, while
    gamma_out_i * 1e-30 * e^S is an ordinary number. The twin (and the definition)
    give the finite scaled update; a kernel that folds the whole log scale into
    one factor turns it into inf and the update into 0.
    """
    # (tiny, S): exp((2/p) * S) overflows the opmath type, (tiny * e^S)^(2/p) is between 1 and 1e8.
    tiny, s = {(torch.float32, 2): (1e-37, 90.0), (torch.float32, 1): (1e-20, 48.0),
               (torch.float64, 2): (1e-305, 720.0), (torch.float64, 1): (1e-170, 400.0)}[(dtype, p)]
    gamma_in = torch.tensor([1.0, tiny, 0.5], dtype=dtype)
    gamma_out = torch.tensor([1.0, 1.5], dtype=dtype)
    weight = torch.ones(2, 3, dtype=dtype)
    grad = torch.ones(2, 3, dtype=dtype)
    log_kappa_pow = (2.0 / p) * (gamma_out.double().log()[:, None] + gamma_in.double().log()[None, :] + s)
    expected_update = torch.exp(-log_kappa_pow)  # lr = 1, grad = 1, weight = 1
    assert 1e-8 < float(expected_update[0, 1]) < 1.0  # the middle column's update is an ordinary number
    for name, fn in (("reference", reference.fused_dense_step_), ("compiled", OPS.fused_dense_step_.default)):
        w = weight.clone()
        fn(w, grad, None, gamma_in, log_scale(s / 2), gamma_out, log_scale(s / 2), float(p), 1.0, 0.0, 0.0, 0.0,
           False, False, False, 1e-12, None, None, None)
        assert torch.isfinite(w).all(), f"{name}: non-finite weights {w}"
        torch.testing.assert_close((1.0 - w.double()), expected_update, rtol=1e-4, atol=1e-20,
                                   msg=lambda m: f"{name}: update differs from the definition: {m}")


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 3001), (3001, 1), (7, 900)], ids=str)
@pytest.mark.parametrize("spread", ["plain", "wide-float64"])
def test_fused_kappa_factor_paths(shape, spread, p):
    """The CPU kernel builds kappa^(2/p) = row_i * col_j from gamma^(2/p) times constants in
    double, or from per-element logs when gamma^(2/p) would leave the double range (float64
    gammas spanning 1e-250..1); both must give the definition's update, on wide and tall layers."""
    rows, cols = shape
    dtype = torch.float32 if spread == "plain" else torch.float64
    case = dense_case(rows, cols, dtype, seed=12)
    if spread == "wide-float64":
        gen = _gen(13)
        case["gamma_in"] = torch.logspace(-250, 0, cols, dtype=torch.float64)[torch.randperm(cols, generator=gen)]
        case["gamma_out"] = torch.logspace(-200, 0.2, rows, dtype=torch.float64)
    hyper = dict(HYPER_DEFAULT, weight_decay=0.0)
    w_k, _, _, _ = assert_fused_match(case, p, hyper)
    kappa_pow = (torch.outer(case["gamma_out"].double(), case["gamma_in"].double())).pow(2.0 / p)
    want, _ = expected_sgd(case["weight"], case["grad"], case["buffer"], kappa_pow, hyper)
    # float32: w - lr * d is rounded to float32 (cancellation where lr * d ~ w)
    torch.testing.assert_close(w_k.double(), want, rtol=1e-10 if dtype == torch.float64 else 1e-5,
                               atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_fused_zero_gamma_uses_eps():
    """A dead unit (gamma 0) gives kappa 0: the scale is clamped to eps, no inf/NaN."""
    for dtype in (torch.float32, torch.float64):
        case = dense_case(4, 3, dtype, seed=11)
        case["gamma_out"][1] = 0
        case["gamma_in"][2] = 0
        for eps in (1e-12, 1e-3):
            hyper = dict(HYPER_DEFAULT, eps=eps)
            w, b, _, _ = assert_fused_match(case, 2, hyper)
            assert torch.isfinite(w).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_plain_sgd_eps_bound_on_some_rows(dtype, p, momentum):
    """The branch-free variants (no weight decay, nesterov, maximize, clamp) check the eps
    bound per row: rows whose kappa falls below eps must be bounded, the others not."""
    case = dense_case(9, 37, dtype, seed=int(10 * momentum) + p)
    case["gamma_in"] = torch.linspace(0.5, 1.5, 37, dtype=case["gamma_in"].dtype)
    case["gamma_out"][[0, 2]] = 1.0   # kappa^(2/p) of these rows > eps = 1e-3
    case["gamma_out"][[1, 4]] = 1e-6  # and of these < eps
    case["gamma_out"][6] = 0.0        # a dead unit
    hyper = dict(HYPER_DEFAULT, weight_decay=0.0, momentum=momentum, eps=1e-3)
    w_k, b_k, _, _ = assert_fused_match(case, p, hyper)
    kappa = torch.outer(case["gamma_out"].double(), case["gamma_in"].double())
    assert (kappa.pow(2.0 / p)[[1, 4, 6]] < 1e-3).all() and (kappa.pow(2.0 / p)[[0, 2]] > 1e-3).all()
    w_e, b_e = expected_sgd(case["weight"], case["grad"], case["buffer"], kappa.pow(2.0 / p), hyper)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_k.double(), w_e, **tol)
    if momentum:
        torch.testing.assert_close(b_k.double(), b_e, **tol)


def test_fused_checks_inputs():
    case = dense_case(4, 3, torch.float32, seed=12)
    args = [case["weight"], case["grad"], case["buffer"], case["gamma_in"], log_scale(0), case["gamma_out"],
            log_scale(0), 2.0, 0.1, 0.9, 0.0, 0.0, False, False, False, 1e-12, None, None, None]

    def call(**changes):
        a = list(args)
        names = ["weight", "grad", "buffer", "gamma_in", "s_in", "gamma_out", "s_out", "p"]
        for k, v in changes.items():
            a[names.index(k)] = v
        return OPS.fused_dense_step_.default(*a)

    with pytest.raises(RuntimeError, match="grad"):
        call(grad=torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="grad"):
        call(grad=torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        call(buffer=None)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        call(buffer=torch.randn(3, 4).t())
    with pytest.raises(RuntimeError, match="gamma_in"):
        call(gamma_in=torch.ones(4))
    with pytest.raises(RuntimeError, match="gamma_out"):
        call(gamma_out=torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="log_scale"):
        call(s_in=torch.zeros(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="p must be"):
        call(p=0.5)


def test_fused_large_1000x1001():
    """One large odd size (both thread-parallel loops split it), float32 and float64."""
    torch.set_num_threads(2)
    for dtype in (torch.float32, torch.float64):
        case = dense_case(1000, 1001, dtype, seed=13)
        for p, hyper in ((2, dict(HYPER_DEFAULT, nesterov=True, clamp_min=-0.5, clamp_max=0.5)),
                         (3, dict(HYPER_DEFAULT, first_step=True, maximize=True))):
            assert_fused_match(case, p, hyper)


# ----------------------------------------------------------------------------------------------------------------
# scaled_sgd_update_
# ----------------------------------------------------------------------------------------------------------------

def _multi_case(shapes, dtype, seed, layout="contiguous", kappa_log_range=3.0):
    gen = _gen(seed)
    params = [tensor(s, dtype, gen, layout if len(s) == 2 else "contiguous") for s in shapes]
    grads = [tensor(s, dtype, gen, layout if len(s) >= 1 else "contiguous") for s in shapes]
    buffers = [tensor(s, dtype, gen) for s in shapes]
    kappas = [torch.exp((torch.rand(s, generator=gen, dtype=torch.float64) * 2 - 1) * kappa_log_range)
              for s in shapes]
    return params, grads, buffers, kappas


def run_multi(fn, case, p, hyper):
    params, grads, buffers, kappas = case
    params = [t.clone() if t.is_contiguous() else t.t().clone().t() for t in params]
    buffers = [b.clone() for b in buffers] if hyper["momentum"] != 0 else []
    fn(params, grads, buffers, kappas, float(p), hyper["lr"], hyper["momentum"], hyper["dampening"],
       hyper["weight_decay"], hyper["nesterov"], hyper["maximize"], hyper["first_step"], hyper["eps"],
       hyper["clamp_min"], hyper["clamp_max"], hyper["lr_tensor"])
    return params, buffers


MULTI_SHAPES = [(1,), (3,), (17, 5), (2, 3, 4, 5), (1001,)]


@pytest.mark.parametrize("hyper", HYPER_GRID, ids=_hid)
def test_scaled_update_all_hyper_parameters(hyper):
    for dtype, p in itertools.product([torch.float32, torch.float64], [1, 2, 3]):
        case = _multi_case(MULTI_SHAPES[:4], dtype, seed=len(_hid(hyper)))
        got_p, got_b = run_multi(OPS.scaled_sgd_update_.default, case, p, hyper)
        ref_p, ref_b = run_multi(reference.scaled_sgd_update_, case, p, hyper)
        for k, (a, b) in enumerate(zip(got_p, ref_p)):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"param {k}: {m}")
            w_e, b_e = expected_sgd(case[0][k], case[1][k], case[2][k], case[3][k].pow(2.0 / p), hyper)
            tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.double(), w_e, **tol)
            if hyper["momentum"]:
                torch.testing.assert_close(got_b[k], ref_b[k], **TOL[dtype])
                torch.testing.assert_close(got_b[k].double(), b_e, **tol)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaled_update_dtypes_layouts(dtype, layout):
    shapes = [(17, 5), (3, 3), (1, 1), (5, 17)]
    case = _multi_case(shapes, dtype, seed=21, layout=layout)
    for p in (1, 2, 3):
        for hyper in (HYPER_DEFAULT, dict(HYPER_DEFAULT, first_step=True, clamp_min=-0.1, clamp_max=0.2),
                      dict(HYPER_DEFAULT, momentum=0.0, lr=0.0, lr_tensor=torch.tensor(0.02, dtype=torch.float64))):
            got_p, got_b = run_multi(OPS.scaled_sgd_update_.default, case, p, hyper)
            ref_p, ref_b = run_multi(reference.scaled_sgd_update_, case, p, hyper)
            for a, b in zip(got_p + got_b, ref_p + ref_b):
                torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scaled_update_huge_kappa(dtype):
    """Float64 kappa beyond the parameter dtype's range (1e+-300)."""
    case = _multi_case([(17, 5), (9,)], dtype, seed=22, kappa_log_range=690.0)
    for p in (1, 2, 3):
        hyper = dict(HYPER_DEFAULT, momentum=0.0, weight_decay=0.0)
        got_p, _ = run_multi(OPS.scaled_sgd_update_.default, case, p, hyper)
        ref_p, _ = run_multi(reference.scaled_sgd_update_, case, p, hyper)
        for k, (a, b) in enumerate(zip(got_p, ref_p)):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, **TOL[dtype])


def test_scaled_update_empty_and_checks():
    ops.scaled_sgd_update_([], [], [], [], 2.0, 0.1, 0.9, 0.0, 0.0, False, False, True, 1e-12, None, None, None)
    ops.clamp_([], -1.0, 1.0)
    w = torch.randn(3)
    base = (2.0, 0.1, 0.9, 0.0, 0.0, False, False, False, 1e-12, None, None, None)
    with pytest.raises(RuntimeError, match="same length"):
        OPS.scaled_sgd_update_.default([w], [], [], [torch.ones(3, dtype=torch.float64)], *base)
    with pytest.raises(RuntimeError, match="momentum buffer"):
        OPS.scaled_sgd_update_.default([w], [torch.randn(3)], [], [torch.ones(3, dtype=torch.float64)], *base)
    with pytest.raises(RuntimeError, match="kappa"):
        OPS.scaled_sgd_update_.default([w], [torch.randn(3)], [torch.zeros(3)], [torch.ones(3)], *base)
    with pytest.raises(RuntimeError, match="grad"):
        OPS.scaled_sgd_update_.default([w], [torch.randn(4)], [torch.zeros(3)], [torch.ones(3, dtype=torch.float64)],
                                       *base)


# ----------------------------------------------------------------------------------------------------------------
# clamp_
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bounds", [(-0.05, 0.05), (0.0, 0.0), (-1.0, -0.5), (-math.inf, 0.1), (-0.1, math.inf)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp(dtype, bounds):
    gen = _gen(31)
    lo, hi = bounds
    tensors = [tensor(s, dtype, gen) for s in [(1,), (3, 3), (17, 5), (1001,)]]
    tensors += [tensor((17, 5), dtype, gen, "transposed"), tensor((4, 6), dtype, gen, "strided")]
    tensors[1][0, 0] = float("nan")
    tensors[1][0, 1] = float("inf")
    tensors[1][0, 2] = -float("inf")
    expected = [t.clone().clamp_(lo, hi) for t in tensors]
    # Clamped in place: contiguous copies, a transposed view (strides kept), and the strided view itself.
    got = [t.clone() for t in tensors[:-2]] + [tensors[-2].t().clone().t(), tensors[-1]]
    assert not got[-2].is_contiguous() and not got[-1].is_contiguous()
    ref = [t.clone() for t in tensors]
    OPS.clamp_.default(got, lo, hi)
    reference.clamp_(ref, lo, hi)
    for a, b, e in zip(got, ref, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(b, e, rtol=0, atol=0, equal_nan=True)
    assert math.isnan(float(got[1][0, 0]))  # NaN propagates like torch.clamp


def test_clamp_rejects_lo_greater_than_hi():
    t = torch.randn(3)
    with pytest.raises(RuntimeError, match="lo must be <= hi"):
        OPS.clamp_.default([t], 0.1, -0.1)
    with pytest.raises((ValueError, RuntimeError), match="lo must be <= hi"):
        reference.clamp_([t], 0.1, -0.1)


# ----------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------

def _all_ops_once(dtype, threads):
    torch.set_num_threads(threads)
    out = []
    case = dense_case(1000, 1001, dtype, seed=41)
    v, t = OPS.gamma_forward.default(case["weight"].t().contiguous(), None, case["gamma_out"], log_scale(1.0), 3.0)
    out += [v, t]
    for p, hyper in ((2, HYPER_DEFAULT), (3, dict(HYPER_DEFAULT, nesterov=True, clamp_min=-0.5, clamp_max=0.5))):
        out += [x for x in run_fused(compiled_fused, case, p, hyper) if x is not None]
    params, buffers = run_multi(OPS.scaled_sgd_update_.default,
                                _multi_case([(300, 301), (40001,)], dtype, seed=42), 3, HYPER_DEFAULT)
    out += params + buffers
    c = [tensor((70001,), dtype, _gen(43))]
    OPS.clamp_.default(c, -0.3, 0.3)
    return out + c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_deterministic_runs_and_thread_counts(dtype):
    """Two identical runs are bit-identical, and so are runs on 1 and 2 threads."""
    first = _all_ops_once(dtype, 2)
    second = _all_ops_once(dtype, 2)
    single = _all_ops_once(dtype, 1)
    for k, (a, b, c) in enumerate(zip(first, second, single)):
        assert torch.equal(a, b), f"output {k} differs between two identical runs"
        assert torch.equal(a, c), (f"output {k} differs between 2 threads and 1 thread "
                                   f"(max diff {float((a.double() - c.double()).abs().max())})")


@pytest.mark.skipif(sys.platform != "linux" or not torch.backends.openmp.is_available(),
                    reason="OpenMP builds: Linux with an OpenMP torch")
def test_cpu_kernels_built_with_openmp():
    """at::parallel_for is inline: without -fopenmp the extension's kernels would run on one
    thread (and the thread-count determinism tests above would pass vacuously)."""
    from pathsgd import _C
    assert _C.WITH_OPENMP == 1


def test_deterministic_thread_counts_odd_split():
    """Column blocks that do not start on a SIMD boundary (cols not a multiple of the vector width)."""
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        case = dense_case(40, 2001, torch.float32, seed=44)
        results.append(run_fused(compiled_fused, case, 2, HYPER_DEFAULT))
    for a, b in zip(*results):
        if a is not None:
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# torch.library.opcheck
# ----------------------------------------------------------------------------------------------------------------

def _opcheck_samples():
    case = dense_case(5, 3, torch.float32, seed=51)
    s = log_scale(0.5)
    yield "gamma_forward", (case["weight"], torch.randn(5), case["gamma_in"], s, 2.0)
    yield "gamma_forward", (case["weight"].double(), None, case["gamma_in"].double(), s, 3.0)
    for grad, buf, first, lr_tensor in ((case["grad"], case["buffer"], False, None),
                                        (case["grad"], case["buffer"], True, torch.tensor(0.1)),
                                        (None, None, False, None)):
        yield "fused_dense_step_", (case["weight"].clone(), grad, None if buf is None else buf.clone(),
                                    case["gamma_in"], s, case["gamma_out"], log_scale(-0.5), 2.0, 0.1, 0.9, 0.0,
                                    0.01, False, False, first, 1e-12, -1.0, 1.0, lr_tensor)
    params, grads, buffers, kappas = _multi_case([(3, 2), (4,)], torch.float32, seed=52)
    yield "scaled_sgd_update_", ([t.clone() for t in params], grads, [b.clone() for b in buffers], kappas, 2.0, 0.1,
                                 0.9, 0.0, 0.0, False, False, False, 1e-12, None, 0.5, None)
    yield "scaled_sgd_update_", ([t.clone() for t in params], grads, [], kappas, 1.0, 0.1, 0.0, 0.0, 0.0, False, True,
                                 False, 1e-12, None, None, torch.tensor(0.2))
    yield "clamp_", ([torch.randn(3, 4), torch.randn(5)], -0.1, 0.1)
    # abs-pow backward of one Conv1d(2, 3, 3, padding=1): values [output, input], leaves [|W|^p, |b|^p]
    x, w, b = torch.ones(1, 2, 5, dtype=torch.float64), torch.rand(3, 2, 3, dtype=torch.float64), torch.rand(3)
    y = torch.conv1d(x, w, b.double(), padding=1)
    conv = [reference.VJP_CONV, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # node 0, src 1, leaves 0/1, need_x, nd 1, ...
    yield "abs_pow_vjp", ([y, x], [w, b.double()], [torch.rand_like(y)], [0], conv, [])
    yield "abs_pow_vjp", ([y.reshape(3, 5), y, x], [w, b.double()], [torch.rand(3, 5, dtype=torch.float64)], [0],
                          [reference.VJP_RESHAPE, 0, 1, reference.VJP_SCALE, 1, 1, 0] + conv[:1] + [1, 2] + conv[3:],
                          [0.25])


OPCHECK_SAMPLES = list(_opcheck_samples())


@pytest.mark.parametrize("index", range(len(OPCHECK_SAMPLES)), ids=[n for n, _ in OPCHECK_SAMPLES])
def test_opcheck(index):
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck is not available in this torch")
    name, args = OPCHECK_SAMPLES[index]
    opcheck(getattr(OPS, name).default, args)


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
    """The abs_pow_vjp arguments of a whole-network taped evaluation of ``cls``."""
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


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("cls,input_shape", VJP_NETS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_abs_pow_vjp_matches_reference(cls, input_shape, p, monkeypatch):
    args = _vjp_program_args(cls, input_shape, p, seed=p, monkeypatch=monkeypatch)
    want = reference.abs_pow_vjp(*args)
    got = OPS.abs_pow_vjp.default(*args)
    again = OPS.abs_pow_vjp.default(*args)
    assert len(got) == len(want) == len(args[1])
    for i, (a, b, c) in enumerate(zip(got, want, again)):
        assert a.shape == args[1][i].shape and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda m: f"leaf {i}: {m}")
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


def test_abs_pow_vjp_bad_programs_raise(monkeypatch):
    values, leaves, seeds, slots, program, factors = _vjp_program_args(_VjpNet1d, (2, 7), 2.0,
                                                                       monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="unknown rule 99"):
        OPS.abs_pow_vjp.default(values, leaves, seeds, slots, [99, 0], factors)
    with pytest.raises(RuntimeError, match="truncated program"):
        OPS.abs_pow_vjp.default(values, leaves, seeds, slots, program[:-1], factors)
    with pytest.raises(RuntimeError, match="slot 999 out of range"):
        OPS.abs_pow_vjp.default(values, leaves, seeds, [999], program, factors)
    with pytest.raises(RuntimeError, match="2 seeds for 1 seed slots"):
        OPS.abs_pow_vjp.default(values, leaves, seeds * 2, slots, program, factors)
