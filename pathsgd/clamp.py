"""WGAN-style weight clipping after the step of any optimizer."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import ops

ClampArg = Union[None, float, Tuple[float, float]]


def normalize_clamp(clamp: ClampArg) -> Optional[Tuple[float, float]]:
    """``None`` -> None, ``c`` -> ``(-c, c)``, ``(lo, hi)`` -> ``(lo, hi)``; validated."""
    if clamp is None:
        return None
    if isinstance(clamp, (int, float)) and not isinstance(clamp, bool):
        if not clamp >= 0:
            raise ValueError(f"Invalid clamp value: {clamp!r} (clamp=c means (-c, c) and needs c >= 0)")
        return (-float(clamp), float(clamp))
    try:
        lo, hi = clamp
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid clamp: {clamp!r} (expected None, c, or (lo, hi))") from exc
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"Invalid clamp: {clamp!r} (needs lo <= hi, got lo={lo}, hi={hi})")
    return (lo, hi)


def clamp_params_(params: Iterable[Tensor], lo: float, hi: float) -> None:
    """Clamp every tensor to ``[lo, hi]`` in place, one multi-tensor launch per (device, dtype)."""
    buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for t in params:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for tensors in buckets.values():
            ops.clamp_(tensors, lo, hi)


def clamp_after_step(optimizer: Optimizer, lo: float, hi: float,
                     params: Optional[Iterable[Tensor]] = None) -> RemovableHandle:
    """After every ``optimizer.step()``, clamp the parameters it updated to ``[lo, hi]``.

    The WGAN critic pattern (Arjovsky et al., 2017) for any optimizer, e.g.
    ``clamp_after_step(torch.optim.RMSprop(critic.parameters(), lr=5e-5), -0.01, 0.01)``.
    Clipping happens after the step, never before, and only to parameters that had
    a gradient in that step (those the optimizer updated). ``params`` restricts it
    (e.g. to leave BatchNorm parameters unclipped); by default every parameter of the
    optimizer is eligible. Returns a handle whose ``remove()`` stops the clipping.
    """
    lo, hi = normalize_clamp((lo, hi))
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"clamp_after_step needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    eligible = None if params is None else {id(t) for t in params}
    if eligible is not None:
        in_optimizer = {id(t) for g in optimizer.param_groups for t in g["params"]}
        if not eligible <= in_optimizer:
            raise ValueError("clamp_after_step: some params are not in the optimizer's param groups")

    def hook(opt: Optimizer, args, kwargs) -> None:
        updated = [t for g in opt.param_groups for t in g["params"]
                   if t.grad is not None and (eligible is None or id(t) in eligible)]
        clamp_params_(updated, lo, hi)

    return optimizer.register_step_post_hook(hook)
