"""Thin wrappers around the compiled ops ``torch.ops.pathsgd.*``, their fake
kernels (for ``torch.compile``), and the backend choice.

Each wrapper runs the compiled kernel when one is registered for the tensors'
device and otherwise the pure-PyTorch twin in :mod:`pathsgd.reference`, with a
one-time warning that says why. ``PATHSGD_BACKEND=reference`` forces the twin.

``PATHSGD_BACKEND=cuda-emu`` (for testing the CUDA code without a GPU) runs the
CUDA kernels and their host wrappers on CPU tensors: it loads the CPU emulation
library named by ``PATHSGD_CUDA_EMU`` (built by ``make cuda-emu``), which
registers them as ``torch.ops.pathsgd_emu.*``, and routes every CPU call of the
CUDA-backed ops there. ``abs_pow_forward`` and ``abs_pow_vjp`` are device-generic kernels of
ATen calls (no CUDA source of their own), so they keep running from ``pathsgd._C``.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .sgd_params import SgdParams

_OP_NAMES = ("gamma_forward", "fused_dense_step_", "dense_chain_step_", "trunk_chain_step_", "scaled_sgd_update_",
             "clamp_", "abs_pow_forward", "abs_pow_vjp")
# The ops with CUDA kernels in csrc/cuda/ (what the CPU emulation of the CUDA code registers).
CUDA_KERNEL_OPS = ("gamma_forward", "fused_dense_step_", "dense_chain_step_", "trunk_chain_step_",
                   "scaled_sgd_update_", "clamp_")
BACKENDS = ("auto", "compiled", "reference", "cuda-emu")


def _backend_choice() -> str:
    choice = os.environ.get("PATHSGD_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"PATHSGD_BACKEND must be one of {', '.join(map(repr, BACKENDS))}, got {choice!r}")
    return choice


def _load_emulation_library() -> str:
    """Loads the library named by ``PATHSGD_CUDA_EMU`` (once); returns its path. Raises ``RuntimeError``
    saying what to do when the variable is unset or the library is missing."""
    path = os.environ.get("PATHSGD_CUDA_EMU", "")
    if not path or not os.path.isfile(path):
        raise RuntimeError(
            "the CUDA emulation library is not available: PATHSGD_CUDA_EMU must name the library that "
            f"`make cuda-emu` builds (build/cuda-emu/libpathsgd_emu.so), got {path!r}")
    if not hasattr(torch.ops.pathsgd_emu, "fused_dense_step_"):
        torch.ops.load_library(path)
    return path


def _why_no_extension(exc: ImportError) -> str:
    """Why pathsgd._C failed to import, and what to do."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not any(f.startswith("_C") and f.endswith((".so", ".pyd")) for f in os.listdir(here)) and \
            os.path.isfile(os.path.join(os.path.dirname(here), "setup.py")):
        # `python -m pathsgd.env` in the repository after `pip install .`: Python reports a
        # "circular import" of the source tree, which has no compiled extension.
        return (f"pathsgd was imported from the source tree {here}, which shadows the installed package "
                "and has no compiled extension (the current directory comes first on sys.path): run from "
                "another directory, or build in place with `pip install --no-build-isolation -e .`")
    reason = f"the compiled extension pathsgd._C could not be imported ({exc})"
    try:
        from ._build_info import TORCH_VERSION
        if TORCH_VERSION != torch.__version__:
            reason += (f"; it was built against torch {TORCH_VERSION} but torch {torch.__version__} is "
                       "installed: rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .`")
    except ImportError:
        reason += "; build it with `pip install --no-build-isolation .`"
    return reason


def _load_extension() -> Optional[str]:
    """Imports pathsgd._C; returns None on success, else why the reference backend is used."""
    choice = _backend_choice()
    if choice == "reference":
        return "PATHSGD_BACKEND=reference is set"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.pathsgd.*)
    except ImportError as exc:
        reason = _why_no_extension(exc)
        if choice in ("compiled", "cuda-emu"):
            raise ImportError(f"PATHSGD_BACKEND={choice} but {reason}") from exc
        return reason
    return None


_UNAVAILABLE_REASON = _load_extension()
# The namespace whose kernels the CUDA-backed ops call: the emulated CUDA kernels under cuda-emu.
CUDA_EMULATED = _backend_choice() == "cuda-emu"
if CUDA_EMULATED:
    _load_emulation_library()  # its fake kernels are registered with the others, below
_K = torch.ops.pathsgd_emu if CUDA_EMULATED else torch.ops.pathsgd
_warned: set = set()


def _check_build_matches_torch() -> None:
    if _UNAVAILABLE_REASON is not None:
        return
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        return
    if TORCH_VERSION != torch.__version__:
        warnings.warn(
            f"pathsgd._C was built against torch {TORCH_VERSION} but torch {torch.__version__} is installed; "
            "rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .`", RuntimeWarning)


_check_build_matches_torch()


def compiled_available() -> bool:
    """True when pathsgd._C is loaded (and not overridden by PATHSGD_BACKEND=reference)."""
    return _UNAVAILABLE_REASON is None


def _kernels_registered(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    names = [f"pathsgd::{name}" for name in _OP_NAMES]
    if CUDA_EMULATED:
        names = [f"pathsgd_emu::{n}" if n in CUDA_KERNEL_OPS else f"pathsgd::{n}" for n in _OP_NAMES]
    # "computed": abs_pow_forward / abs_pow_vjp are device-generic (CompositeExplicitAutograd) kernels.
    return all(torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, key) for name in names)


# Registrations happen at import of pathsgd._C and never change afterwards: ask once, and keep
# a plain dict so torch.compile traces the step without graph breaks.
_KERNELS = {device_type: compiled_available() and _kernels_registered(device_type) for device_type in ("cpu", "cuda")}


def has_kernel(device_type: str) -> bool:
    """True when every op has a compiled kernel for ``device_type`` ('cpu', 'cuda')."""
    return _KERNELS.get(device_type, False)


def backend_for(device_type: str) -> str:
    """'compiled', 'cuda-emu' (CPU tensors through the emulated CUDA kernels) or 'reference'."""
    if not has_kernel(device_type):
        return "reference"
    return "cuda-emu" if CUDA_EMULATED and device_type == "cpu" else "compiled"


def unavailable_reason(device_type: str) -> Optional[str]:
    if has_kernel(device_type):
        return None
    if _UNAVAILABLE_REASON is not None:
        return _UNAVAILABLE_REASON
    return f"pathsgd._C was built without {device_type.upper()} kernels"


# Set while an optimizer built with foreach=False or fused=False steps: the twin runs instead.
_FORCED_REFERENCE = False


class use_reference:
    """``with use_reference(True):`` the ops run their pure-PyTorch twins (no warning)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        global _FORCED_REFERENCE
        self.previous, _FORCED_REFERENCE = _FORCED_REFERENCE, self.enabled or _FORCED_REFERENCE

    def __exit__(self, *exc: object) -> None:
        global _FORCED_REFERENCE
        _FORCED_REFERENCE = self.previous


def reference_forced() -> bool:
    """True inside ``use_reference(True)``: the ops run their twins."""
    return _FORCED_REFERENCE


def _use_compiled(t: Tensor) -> bool:
    if _FORCED_REFERENCE:
        return False
    device_type = t.device.type
    if device_type == "meta" or has_kernel(device_type):
        return compiled_available()
    if device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(f"pathsgd: using the pure-PyTorch reference backend on {device_type} because "
                      f"{unavailable_reason(device_type)}", RuntimeWarning, stacklevel=3)
    return False


def gamma_forward(weight: Tensor, bias: Optional[Tensor], gamma_in: Tensor, gamma_in_log_scale: Tensor,
                  p: float) -> Tuple[Tensor, Tensor]:
    """Normalized ``(|W|^p gamma_in + |b|^p, log_scale)``; see :func:`pathsgd.reference.gamma_forward`."""
    if _use_compiled(weight):
        return _K.gamma_forward.default(weight, bias, gamma_in, gamma_in_log_scale, p)
    return reference.gamma_forward(weight, bias, gamma_in, gamma_in_log_scale, p)


def fused_dense_step_(weight: Tensor, grad: Optional[Tensor], momentum_buffer: Optional[Tensor], gamma_in: Tensor,
                      gamma_in_log_scale: Tensor, gamma_out: Tensor, gamma_out_log_scale: Tensor, p: float,
                      sgd: SgdParams) -> Tuple[Tensor, Tensor]:
    """Fused backward gamma pass + Path-SGD update of one dense weight; see the reference."""
    tensors = (weight, grad, momentum_buffer, gamma_in, gamma_in_log_scale, gamma_out, gamma_out_log_scale)
    if _use_compiled(weight):
        return _K.fused_dense_step_.default(*tensors, p, sgd.packed(), sgd.lr_tensor)
    return reference.fused_dense_step_(*tensors, p, sgd)


def dense_chain_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                      bias_layers: List[int], gamma0: List[Tensor], p: float, sgd: SgdParams,
                      workspace: Optional[Tensor] = None) -> None:
    """The fused Path-SGD step of a whole dense chain in one call; see the reference. ``workspace``:
    a uint8 tensor kept across steps for the op's small tensors (CUDA; it grows at the first step)."""
    lists = (params, grads, momentum_buffers, bias_layers, gamma0)
    if _use_compiled(params[0]):
        _K.dense_chain_step_.default(*lists, p, sgd.packed(), sgd.lr_tensor, workspace)
    else:
        reference.dense_chain_step_(*lists, p, sgd)


def trunk_chain_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], layout: List[int],
                      factors: List[float], p: float, sgd: SgdParams, workspace: Optional[Tensor] = None) -> None:
    """A conv net's whole Path-SGD step (trunk forward, head chain, trunk VJP and update) in one
    call; see the reference. ``workspace``: the head chain's (as :func:`dense_chain_step_`)."""
    lists = (params, grads, momentum_buffers, layout, factors)
    if _use_compiled(params[0]):
        _K.trunk_chain_step_.default(*lists, p, sgd.packed(), sgd.lr_tensor, workspace)
    else:
        reference.trunk_chain_step_(*lists, p, sgd)


def step_kernel(name: str, device_type: str) -> Optional[Callable[..., None]]:
    """The compiled ``dense_chain_step_`` or ``trunk_chain_step_`` (``name``) for tensors on
    ``device_type`` itself (None without one), called with the op's arguments (``sgd`` packed), for a
    step plan: a small model's step is mostly the cost of calling it, and this skips the wrapper's
    backend choice and the OpOverload's Python frame."""
    if not has_kernel(device_type):
        return None
    overload = getattr(_K, name).default
    return getattr(overload, "_op", overload)


def scaled_sgd_update_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                       kappas: List[Tensor], p: float, sgd: SgdParams) -> None:
    """Multi-tensor Path-SGD update with materialized float64 kappa; see the reference."""
    if not params:
        return
    if _use_compiled(params[0]):
        _K.scaled_sgd_update_.default(params, grads, momentum_buffers, kappas, p, sgd.packed(), sgd.lr_tensor)
    else:
        reference.scaled_sgd_update_(params, grads, momentum_buffers, kappas, p, sgd)


def clamp_(tensors: List[Tensor], lo: float, hi: float) -> None:
    """Multi-tensor in-place clamp to ``[lo, hi]``."""
    if not tensors:
        return
    if _use_compiled(tensors[0]):
        _K.clamp_.default(tensors, lo, hi)
    else:
        reference.clamp_(tensors, lo, hi)


def abs_pow_forward(input: Tensor, leaves: List[Tensor], program: List[int], factors: List[float]) -> List[Tensor]:
    """The abs-pow network's values from a forward program; see :func:`pathsgd.reference.abs_pow_forward`."""
    if _use_compiled(input):
        return torch.ops.pathsgd.abs_pow_forward.default(input, leaves, program, factors)
    return reference.abs_pow_forward(input, leaves, program, factors)


def abs_pow_vjp(values: List[Tensor], leaves: List[Tensor], seeds: List[Tensor], seed_slots: List[int],
                program: List[int], factors: List[float]) -> List[Tensor]:
    """kappa of every ``|w|^p`` leaf from an abs-pow VJP program; see :func:`pathsgd.reference.abs_pow_vjp`."""
    if leaves and _use_compiled(leaves[0]):
        return torch.ops.pathsgd.abs_pow_vjp.default(values, leaves, seeds, seed_slots, program, factors)
    return reference.abs_pow_vjp(values, leaves, seeds, seed_slots, program, factors)


def _gamma_forward_fake(weight, bias, gamma_in, gamma_in_log_scale, p):
    return gamma_in.new_empty((weight.shape[0],)), gamma_in_log_scale.new_empty(())


# The fakes take the schemas' arguments: ``sgd`` is SgdParams.packed(), ``lr_tensor`` its tensor lr.
def _fused_dense_step_fake(weight, grad, momentum_buffer, gamma_in, gamma_in_log_scale, gamma_out,
                           gamma_out_log_scale, p, sgd, lr_tensor):
    return gamma_out.new_empty((weight.shape[1],)), gamma_out_log_scale.new_empty(())


def _dense_chain_step_fake(params, grads, momentum_buffers, bias_layers, gamma0, p, sgd, lr_tensor, workspace=None):
    return None


def _trunk_chain_step_fake(params, grads, momentum_buffers, layout, factors, p, sgd, lr_tensor, workspace=None):
    return None


def _scaled_sgd_update_fake(params, grads, momentum_buffers, kappas, p, sgd, lr_tensor):
    return None


def _clamp_fake(tensors, lo, hi):
    return None


def _abs_pow_forward_fake(input, leaves, program, factors):
    return reference.abs_pow_forward(input, leaves, program, factors)  # ATen ops only: they run on fake tensors


def _abs_pow_vjp_fake(values, leaves, seeds, seed_slots, program, factors):
    return [torch.empty_like(t) for t in leaves]


_FAKES = {"gamma_forward": _gamma_forward_fake, "fused_dense_step_": _fused_dense_step_fake,
          "dense_chain_step_": _dense_chain_step_fake, "trunk_chain_step_": _trunk_chain_step_fake,
          "scaled_sgd_update_": _scaled_sgd_update_fake, "clamp_": _clamp_fake,
          "abs_pow_forward": _abs_pow_forward_fake, "abs_pow_vjp": _abs_pow_vjp_fake}

if compiled_available():
    # Fake kernels: shapes and dtypes only, so torch.compile / meta tensors can trace the ops.
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"pathsgd::{_name}")(_fake)

_EMULATED_FAKES = False  # whether the pathsgd_emu ops have their fake kernels


def load_cuda_emulation() -> str:
    """Loads the CPU emulation of the CUDA kernels named by ``PATHSGD_CUDA_EMU`` and gives its ops the
    fake kernels of the ops they emulate; returns its path. Raises ``RuntimeError`` saying what to do
    when the variable is unset or the library is missing."""
    global _EMULATED_FAKES
    path = _load_emulation_library()
    if not _EMULATED_FAKES and compiled_available():
        for name in CUDA_KERNEL_OPS:
            torch.library.register_fake(f"pathsgd_emu::{name}")(_FAKES[name])
        _EMULATED_FAKES = True
    return path


if CUDA_EMULATED:
    load_cuda_emulation()
