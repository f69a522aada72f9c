"""``pathsgd::dense_chain_step_`` (a whole dense chain's step in one op call) on every device:

* bit-identical to the same device's per-layer ops composed as csrc/dense_chain_step.h documents
  (gamma_forward over the chain, fused_dense_step_ per layer output to input, one
  scaled_sgd_update_ of the biases): the op is the per-layer step plan without Python;
* close to its pure-PyTorch twin ``pathsgd.reference.dense_chain_step_`` (and, for the CUDA
  kernels, to the CPU op), which the brute-force optimizer tests check end to end;
* bit-identical on a rerun; bad arguments raise before anything changes; opcheck.

Targets: the compiled CPU kernels; the CUDA kernels on a GPU, or on the CPU emulation of CUDA
when ``PATHSGD_CUDA_EMU`` names its library (``make test-cuda-emu``).
"""
from __future__ import annotations

import itertools
import math
import os
from typing import List, Optional

import pytest
import torch

from pathsgd import ops, reference
from pathsgd.sgd_params import SgdParams

F64 = torch.float64


def _targets():
    """[(id, ops namespace or None, device, why skipped or None)]."""
    targets = []
    cpu_ok = ops.has_kernel("cpu")
    targets.append(("cpu", torch.ops.pathsgd if cpu_ok else None, "cpu",
                    None if cpu_ok else f"no compiled CPU kernels: {ops.unavailable_reason('cpu')}"))
    if torch.cuda.is_available():
        ok = ops.has_kernel("cuda")
        targets.append(("cuda", torch.ops.pathsgd if ok else None, "cuda",
                        None if ok else f"no CUDA kernels: {ops.unavailable_reason('cuda')}"))
    elif os.environ.get("PATHSGD_CUDA_EMU") and cpu_ok:
        ops.load_cuda_emulation()  # a missing library is an error, not a skip: the user asked for it
        targets.append(("cuda-emu", torch.ops.pathsgd_emu, "cpu", None))
    else:
        targets.append(("cuda", None, "cuda", "no CUDA GPU and PATHSGD_CUDA_EMU is not set (make test-cuda-emu)"))
    return [pytest.param(t, id=t[0], marks=pytest.mark.skipif(t[3] is not None, reason=str(t[3]))) for t in targets]


TARGETS = _targets()

RTOL = {torch.float32: 2e-5, F64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1.6e-2}
CHAINS = [  # layer sizes input -> output, and which layers have a bias
    ((5, 3), (0,)),
    ((7, 1, 9), (0, 1)),
    ((13, 33, 4, 2), (0, 2)),
    ((1, 1), ()),
    ((40, 65, 130, 3), (0, 1, 2)),
]
HYPERS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, first_step=False,
         clamp=None, lr_tensor=False),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=True, first_step=False,
         clamp=(-0.3, 0.25), lr_tensor=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=False, first_step=True,
         clamp=None, lr_tensor=True),
]
DTYPES = [torch.float32, F64, torch.float16, torch.bfloat16]


def _cases():
    """Every (chain, dtype, p, hyper, gamma0) pair of values of any two axes occurs at least once."""
    axes = [range(len(CHAINS)), DTYPES, (1.0, 2.0, 3.0), range(len(HYPERS)), (False, True)]
    full = list(itertools.product(*axes))
    pairs = lambda c: {(i, j, c[i], c[j]) for i, j in itertools.combinations(range(len(c)), 2)}  # noqa: E731
    missing, chosen = set().union(*(pairs(c) for c in full)), []
    while missing:
        best = max(full, key=lambda c: len(pairs(c) & missing))
        chosen.append(best)
        missing -= pairs(best)
    return chosen


class Chain:
    """Random chain inputs on the CPU (float64 draws, cast), placed on a device by ``args``."""

    def __init__(self, chain: int, dtype: torch.dtype, p: float, hyper: int, with_gamma0: bool, seed: int = 0):
        sizes, bias_layers = CHAINS[chain]
        gen = torch.Generator().manual_seed(seed + 97 * chain + 13 * hyper)
        draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)  # noqa
        self.dtype, self.p, self.h = dtype, p, HYPERS[hyper]
        self.weights = [draw(o, i, scale=0.5) for i, o in zip(sizes[:-1], sizes[1:])]
        self.grads = [draw(*w.shape) for w in self.weights]
        self.buffers = [draw(*w.shape, scale=0.1) for w in self.weights]
        self.bias_layers = list(bias_layers)
        self.biases = [draw(sizes[l + 1], scale=0.5) for l in bias_layers]
        self.bias_grads = [draw(*b.shape) for b in self.biases]
        self.bias_buffers = [draw(*b.shape, scale=0.1) for b in self.biases]
        g0 = (torch.rand(sizes[0], generator=gen, dtype=F64) + 0.05) * 3.7  # the float64 gamma of a trunk
        self.gamma0 = g0 if with_gamma0 else None

    def args(self, device: str) -> tuple:
        """Fresh copies on ``device`` of everything the op mutates, in the op's argument order."""
        momentum = self.h["momentum"] != 0
        to = lambda ts: [t.clone().to(device) for t in ts]  # noqa: E731
        sgd = self.sgd(device)
        gamma0 = [] if self.gamma0 is None else to([self.gamma0])
        return (to(self.weights + self.biases), to(self.grads + self.bias_grads),
                to(self.buffers + self.bias_buffers) if momentum else [], list(self.bias_layers), gamma0, self.p,
                sgd.packed(), sgd.lr_tensor)

    def sgd(self, device: str) -> SgdParams:
        return sgd_params(self.h, device)


def sgd_params(h: dict, device: str) -> SgdParams:
    """The SgdParams of a HYPERS entry (lr 0.05, a tensor on ``device`` when ``lr_tensor``)."""
    lo, hi = h["clamp"] if h["clamp"] else (None, None)
    lr = torch.tensor(0.05, dtype=F64, device=device) if h["lr_tensor"] else 0.05
    return SgdParams(lr, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"],
                     h["first_step"], 1e-3, lo, hi)


def twin(*args):
    """reference.dense_chain_step_ called with an op's arguments (its SgdParams unpacked)."""
    return reference.dense_chain_step_(*args[:-2], SgdParams.unpack(args[-2], args[-1]))


def split(args) -> tuple:
    """The op's arguments as (weights, weight grads, weight buffers, biases, bias grads, bias buffers,
    bias_layers, gamma0 or None, p, *hyper)."""
    params, grads, buffers, bias_layers, gamma0, p, *hyper = args
    n = len(params) - len(bias_layers)
    return (params[:n], grads[:n], buffers[:n], params[n:], grads[n:], buffers[n:], bias_layers,
            gamma0[0] if gamma0 else None, p, *hyper)


def per_layer(ns, host_math: bool = False):
    """The chain's step composed of the per-layer ops of namespace ``ns``, as csrc/dense_chain_step.h,
    called with the op's arguments; writes the gamma_out at the chain input into a given gamma0, as
    the op does. ``host_math``: a log scale's exp and log (of gamma0 and of the bias kappas) by the C
    library (math.exp, math.log), as the CPU op computes them on the host; else by the tensor's
    device, as the CUDA op does."""
    def run(*args):
        weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers, bias_layers, given, p, \
            *hyper = split(args)
        momentum = hyper[0][1] != 0
        opm = lambda w: reference.opmath_dtype(w.dtype)  # noqa: E731
        exp = (lambda s: math.exp(s.item())) if host_math else (lambda s: s.exp())  # noqa: E731
        bias_of = dict(zip(bias_layers, biases))
        first, last = weights[0], weights[-1]
        if given is None:
            gin = [(torch.ones(first.shape[1], dtype=opm(first), device=first.device),
                    torch.zeros((), dtype=F64, device=first.device))]
        else:  # reference.to_log_scaled (its log by the C library on the host)
            scale = given.amax().clamp_min(torch.finfo(F64).tiny)
            log_scale = torch.tensor(math.log(scale.item()), dtype=F64, device=given.device) if host_math \
                else scale.log()
            gin = [((given / scale).to(opm(first)), log_scale)]
        for l, w in enumerate(weights[:-1]):
            gin.append(ns.gamma_forward.default(w, bias_of.get(l), gin[-1][0].to(opm(w)), gin[-1][1], p))
        gout = (torch.ones(last.shape[0], dtype=opm(last), device=last.device), torch.zeros((), dtype=F64,
                                                                                          device=last.device))
        kappas = {}
        for l in reversed(range(len(weights))):
            if l in bias_of:
                kappas[l] = gout[0].to(F64) * exp(gout[1])
            w = weights[l]
            gout = ns.fused_dense_step_.default(w, weight_grads[l], weight_buffers[l] if momentum else None,
                                                gin[l][0].to(opm(w)), gin[l][1], gout[0].to(opm(w)), gout[1], p,
                                                *hyper)
        if biases:
            ns.scaled_sgd_update_.default(biases, bias_grads, bias_buffers, [kappas[l] for l in bias_layers], p,
                                          *hyper)
        if given is not None:  # from_log_scaled
            given.copy_(gout[0].to(F64) * exp(gout[1]))
    return run


def _state(args) -> List[Optional[torch.Tensor]]:
    """What the op writes: the weights and biases, their momentum buffers, gamma0."""
    return [*args[0], *args[2], *args[4]]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int).cpu(), b.contiguous().view(as_int).cpu())


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    a, b = a.detach().cpu(), b.detach().cpu()
    rtol = RTOL[dtype]
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("chain,dtype,p,hyper,with_gamma0", _cases())
def test_dense_chain_step_matches_per_layer_ops_and_twin(target, chain, dtype, p, hyper, with_gamma0):
    name, ns, device, _ = target
    case = Chain(chain, dtype, p, hyper, with_gamma0)
    got_args = case.args(device)
    assert ns.dense_chain_step_.default(*got_args) is None
    got = got_args[4]  # a given gamma0 now holds the gamma_out at the chain's input
    if with_gamma0:
        assert got[0].dtype == F64 and got[0].shape == (case.weights[0].shape[1],) and got[0].device.type == device
        assert not torch.equal(got[0].cpu(), case.gamma0)
    # 1. the per-layer ops of the same device, composed in Python: the same bits
    layered_args = case.args(device)
    per_layer(ns, host_math=name == "cpu")(*layered_args)
    for i, (a, b) in enumerate(zip(_state(got_args), _state(layered_args))):
        assert same_bits(a, b), f"output {i} differs from the per-layer ops"
    # 2. the pure-PyTorch twin (and the CPU kernels, for CUDA kernels): close
    others = [("reference", twin, device)]
    if name != "cpu":
        others.append(("cpu", torch.ops.pathsgd.dense_chain_step_.default, "cpu"))
    for other_name, fn, other_device in others:
        other_args = case.args(other_device)
        fn(*other_args)
        other = other_args[4]
        written = len(got_args[0]) + len(got_args[2])  # the parameters and buffers; then the gammas
        for i, (a, b) in enumerate(zip(_state(got_args)[:written], _state(other_args)[:written])):
            assert_close(a, b, dtype, f"state {i} vs {other_name}")
        if with_gamma0:
            assert_close(got[0], other[0], reference.opmath_dtype(dtype), f"gamma_out vs {other_name}")
    # the weights and biases moved (the comparison is not vacuous; a half-precision update can round away)
    moved = [not torch.equal(a.cpu(), b) for a, b in zip(got_args[0], case.weights + case.biases)]
    assert all(moved) if dtype in (torch.float32, F64) else any(moved), moved
    # 3. a rerun: the same bits
    again_args = case.args(device)
    ns.dense_chain_step_.default(*again_args)
    for a, b in zip(_state(got_args), _state(again_args)):
        assert same_bits(a, b), "rerun differs"


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed 2-D copy; every other entry of a 1-D one)."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    wide = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    wide[::2] = t
    return wide[::2]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_dense_chain_step_strided_tensors_and_mixed_dtypes(target, p):
    """A chain whose layer 1 is float64 between float32 layers (its gammas change dtype twice), with
    non-contiguous weights, biases and grads: the same bits as the per-layer ops on contiguous copies,
    and the strided parameters themselves are updated."""
    name, ns, device, _ = target
    case = Chain(4, torch.float32, p, 1, True)  # 40-65-130-3, momentum, weight decay, maximize, clamp
    for ts in (case.weights, case.grads, case.buffers):
        ts[1] = ts[1].double()
    for ts in (case.biases, case.bias_grads, case.bias_buffers):
        ts[1] = ts[1].double()  # the bias of layer 1
    plain = case.args(device)
    per_layer(ns, host_math=name == "cpu")(*plain)
    strided = case.args(device)
    strided = ([_strided(t) for t in strided[0]], [_strided(g) for g in strided[1]], *strided[2:])
    assert not any(t.is_contiguous() for t in strided[0] if t.numel() > 1)
    ns.dense_chain_step_.default(*strided)
    for i, (a, b) in enumerate(zip(_state(strided), _state(plain))):
        assert same_bits(a, b), f"output {i} differs from the per-layer ops on contiguous tensors"
    assert strided[4][0].dtype == F64
    assert all(not torch.equal(a.cpu(), b) for a, b in zip(strided[0], case.weights + case.biases))


CHAIN_ARG_NAMES = ("params", "grads", "momentum_buffers", "bias_layers", "gamma0")


def _bad(args, names=CHAIN_ARG_NAMES, **changes) -> tuple:
    """``args`` with the arguments named in ``changes`` (``names``: the op's leading arguments) replaced."""
    args = list(args)
    for key, value in changes.items():
        args[names.index(key)] = value
    return tuple(args)


def _with(ts: list, index: int, t: torch.Tensor) -> list:
    return ts[:index] + [t] + ts[index + 1:]


@pytest.mark.parametrize("target", TARGETS)
def test_dense_chain_step_bad_arguments_raise_and_change_nothing(target):
    _, ns, device, _ = target
    case = Chain(2, torch.float32, 2.0, 1, False)  # 13-33-4-2, biases on layers 0 and 2, momentum
    args = case.args(device)
    before = [t.clone() for t in _state(args)]
    params, grads, buffers = args[:3]  # weights 0, 1, 2, then the biases of layers 0 and 2
    cases = [
        (dict(params=[params[0], params[2], params[1], *params[3:]]), "outputs"),
        (dict(grads=grads[:4]), "4 grads for 5 params"),
        (dict(momentum_buffers=buffers[:1]), "momentum buffers"),
        (dict(bias_layers=[2, 0]), "increasing"),
        (dict(bias_layers=[0, 7]), "increasing"),
        (dict(bias_layers=[1, 2]), "shape"),
        (dict(gamma0=[torch.ones(13, dtype=F64, device=device)] * 2), "gamma0 must be empty or one float64 vector"),
        (dict(gamma0=[torch.ones(12, dtype=F64, device=device)]), r"gamma0 must be a \[13\] float64 tensor"),
        (dict(gamma0=[torch.ones(13, device=device)]), r"gamma0 must be a \[13\] float64 tensor"),
        (dict(params=[], bias_layers=[]), "at least one layer"),
        (dict(params=params[3:], grads=grads[3:], momentum_buffers=buffers[3:]), "at least one layer"),
        # a bad tensor of the FIRST layer: found before the layers behind it (updated first) change
        (dict(grads=_with(grads, 0, grads[0][:, :5])), "weight grad 0"),
        (dict(grads=_with(grads, 0, grads[0].double())), "weight grad 0"),
        (dict(momentum_buffers=_with(buffers, 0, buffers[0].t().contiguous().t())), "weight momentum buffer 0"),
        (dict(grads=_with(grads, 3, grads[3].double())), "bias grad 0"),
        (dict(momentum_buffers=_with(buffers, 3, buffers[3][:3])), "bias momentum buffer 0"),
    ]
    for changes, needle in cases:
        with pytest.raises(RuntimeError, match=needle):
            ns.dense_chain_step_.default(*_bad(args, **changes))
        for a, b in zip(_state(args), before):
            assert torch.equal(a, b), f"{changes}: the failed call changed a tensor"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("initial", [0, 24])
def test_dense_chain_step_workspace_is_reused_and_changes_no_bits(target, initial):
    """With a workspace (the step plan's, kept across steps) the op gives the bits it gives without
    one. The CUDA kernels take their small tensors from it: the first call grows it (from empty, or
    from too small: the rest were fresh allocations), later calls find everything in it (no growth,
    the same storage). The CPU op keeps its vectors on the host and leaves it as it is."""
    name, ns, device, _ = target
    case = Chain(4, torch.float32, 2.0, 1, True)  # 40-65-130-3, a bias on every layer, momentum, gamma0
    plain_args = case.args(device)
    ns.dense_chain_step_.default(*plain_args)
    workspace = torch.empty(initial, dtype=torch.uint8, device=device)
    for call in range(3):
        args = case.args(device)
        ns.dense_chain_step_.default(*args, workspace)
        for i, (a, b) in enumerate(zip(_state(args), _state(plain_args))):
            assert same_bits(a, b), f"call {call}: output {i} differs from the op without a workspace"
        if call == 0:
            size, storage = workspace.numel(), workspace.data_ptr()
        assert (workspace.numel(), workspace.data_ptr()) == (size, storage), f"call {call} grew the workspace"
    if name == "cpu":
        assert size == initial
    else:  # at least every layer's float32 gamma_in and gamma_out
        assert size >= 4 * 2 * (40 + 65 + 130 + 3), size


@pytest.mark.parametrize("target", TARGETS)
def test_dense_chain_step_bad_workspace_raises_and_changes_nothing(target):
    _, ns, device, _ = target
    case = Chain(2, torch.float32, 2.0, 1, False)
    args = case.args(device)
    before = [t.clone() for t in _state(args)]
    for bad in (torch.empty(8, dtype=torch.float32, device=device), torch.empty(2, 4, dtype=torch.uint8, device=device),
                torch.empty(16, dtype=torch.uint8, device=device)[4:]):
        with pytest.raises(RuntimeError, match="workspace must be a 1-D contiguous uint8 tensor of its own"):
            ns.dense_chain_step_.default(*args, bad)
        for a, b in zip(_state(args), before):
            assert torch.equal(a, b), "the failed call changed a tensor"


@pytest.mark.skipif(not ops.has_kernel("cpu"), reason="compiled CPU kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("with_gamma0", [False, True])
def test_dense_chain_step_opcheck(dtype, with_gamma0):
    case = Chain(4, dtype, 2.0, 1, with_gamma0)
    torch.library.opcheck(torch.ops.pathsgd.dense_chain_step_.default, case.args("cpu"))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_chain_step_subnormal_gammas_stay_finite(target, with_bias):
    """|w|^p of a tiny weight can be subnormal (|1e-212|^1.5 ~ 1e-318): the normalization of the gamma
    vector must divide by its maximum, not multiply by exp(-log max) = inf (found by the property tests:
    the next layer's update became NaN)."""
    _, ns, device, _ = target
    tiny = torch.tensor([[-9.7e-212, 3e-300]], dtype=F64)
    weights = [tiny, torch.tensor([[1.0], [0.5]], dtype=F64), torch.tensor([[0.3, -0.2]], dtype=F64)]
    grads = [torch.full_like(w, 0.7) for w in weights]
    biases = [torch.tensor([1e-250], dtype=F64)] if with_bias else []
    args = lambda dev: ([t.clone().to(dev) for t in weights + biases],  # noqa: E731
                        [g.to(dev) for g in grads] + [torch.full_like(b, 0.1).to(dev) for b in biases], [],
                        [0] if with_bias else [], [], 1.5, SgdParams(0.5, eps=1e-12).packed(), None)
    got_args, want_args = args(device), args(device)
    ns.dense_chain_step_.default(*got_args)
    twin(*want_args)
    for a, b in zip(_state(got_args), _state(want_args)):
        assert torch.isfinite(a).all(), a
        assert_close(a, b, F64, "state vs reference")
    # the last layer's kappa is |w0 w1|^1.5 ~ 1e-318 (or the bias path): below eps, so its step is lr * g / eps
    step = (weights[2] - got_args[0][2].cpu()).abs()
    assert float(step.min()) > 1e8


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] != "cpu"])
def test_cpu_and_cuda_kernels_share_their_argument_checks(target):
    """csrc/checks.h: the same bad argument gives the same message from the CPU and the CUDA kernels."""
    _, ns, device, _ = target
    cpu = torch.ops.pathsgd
    w, g = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    gin, gout, s = torch.ones(4, dtype=F64), torch.ones(3, dtype=F64), torch.zeros((), dtype=F64)
    hyper = (SgdParams(0.1, 0.9, eps=1e-12).packed(), None)
    cases = [
        ("gamma_forward", lambda dev: (w.to(dev), None, torch.ones(5, dtype=F64, device=dev), s.to(dev), 2.0)),
        ("gamma_forward", lambda dev: (w.to(dev), torch.ones(2, dtype=F64, device=dev), gin.to(dev), s.to(dev), 2.0)),
        ("gamma_forward", lambda dev: (w.to(dev), None, gin.to(dev), s.to(dev), 0.5)),
        ("fused_dense_step_", lambda dev: (w.to(dev), g[:, :3].to(dev), None, gin.to(dev), s.to(dev), gout.to(dev),
                                           s.to(dev), 2.0, *hyper)),
        ("fused_dense_step_", lambda dev: (w.to(dev), g.to(dev), None, gin.to(dev), s.to(dev), gout.to(dev),
                                           s.to(dev), 2.0, *hyper)),
        ("fused_dense_step_", lambda dev: (w.to(dev), g.to(dev), g.t().contiguous().t().to(dev), gin.to(dev),
                                           torch.zeros(1, dtype=F64, device=dev), gout.to(dev), s.to(dev), 2.0,
                                           *hyper)),
        ("scaled_sgd_update_", lambda dev: ([w.to(dev)], [g.to(dev)], [], [torch.ones(3, 4, device=dev)], 2.0,
                                            *hyper)),
        ("fused_dense_step_", lambda dev: (w.to(dev), g.to(dev), None, gin.to(dev), s.to(dev), gout.to(dev),
                                           s.to(dev), 2.0, [0.1, 0.0], None)),
        ("scaled_sgd_update_", lambda dev: ([w.to(dev)], [g.to(dev)], [], [torch.ones(3, 4, dtype=F64, device=dev)],
                                            2.0, [0.1], None)),
        ("clamp_", lambda dev: ([torch.zeros(3, dtype=torch.int64, device=dev)], -1.0, 1.0)),
        ("clamp_", lambda dev: ([w.to(dev)], 1.0, -1.0)),
    ]
    for name, make in cases:
        messages = []
        for namespace, dev in ((cpu, "cpu"), (ns, device)):
            with pytest.raises(RuntimeError) as info:
                getattr(namespace, name).default(*make(dev))
            messages.append(str(info.value).split("\n")[0])
        assert messages[0] == messages[1], (name, messages)
        assert "pathsgd" in messages[0]
