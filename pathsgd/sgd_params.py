"""The hyper-parameters of one SGD update, as every pathsgd op takes them.

:class:`SgdParams` is passed by the optimizer to the op wrappers (:mod:`pathsgd.ops`), their fake
kernels and their twins (:mod:`pathsgd.reference`). At the operator boundary it travels as
``float[] sgd`` (:meth:`SgdParams.packed`, field order) plus ``Tensor? lr_tensor``; the C++ struct
``pathsgd::SgdArgs`` (csrc/path_sgd_math.h) reads the same order back. A missing clamp bound is
packed as -inf / +inf, which clamps nothing (NaN stays NaN), so the packing is exact.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Union

from torch import Tensor


class SgdParams(NamedTuple):
    """torch.optim.SGD's update of a path-scaled gradient ``g_tilde = g / max(kappa^(2/p), eps)``:

        d = g_tilde (+ weight_decay * w);  buf = d on the first step, else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf;  w = clamp(w - lr * d, clamp_min, clamp_max)

    ``lr`` may be a tensor (read by the kernel, no host synchronization on CUDA); ``maximize``
    negates ``g`` first; ``first_step`` initializes the momentum buffer.
    """
    lr: Union[float, Tensor] = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    first_step: bool = False
    eps: float = 0.0
    clamp_min: Optional[float] = None
    clamp_max: Optional[float] = None

    def packed(self) -> List[float]:
        """The ``float[] sgd`` argument of the ops, in field order (a tensor lr packs as 0)."""
        lr = 0.0 if isinstance(self.lr, Tensor) else float(self.lr)
        lo = -math.inf if self.clamp_min is None else float(self.clamp_min)
        hi = math.inf if self.clamp_max is None else float(self.clamp_max)
        return [lr, float(self.momentum), float(self.dampening), float(self.weight_decay), float(self.nesterov),
                float(self.maximize), float(self.first_step), float(self.eps), lo, hi]

    @property
    def lr_tensor(self) -> Optional[Tensor]:
        """The ``Tensor? lr_tensor`` argument of the ops."""
        return self.lr if isinstance(self.lr, Tensor) else None

    @classmethod
    def unpack(cls, sgd: List[float], lr_tensor: Optional[Tensor] = None) -> "SgdParams":
        """The inverse of :meth:`packed` (what the C++ kernels read)."""
        if len(sgd) != len(cls._fields):
            raise ValueError(f"pathsgd: the sgd argument must have {len(cls._fields)} entries "
                             f"({', '.join(cls._fields)}), got {len(sgd)}")
        lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, eps, lo, hi = sgd
        return cls(lr if lr_tensor is None else lr_tensor, momentum, dampening, weight_decay, bool(nesterov),
                   bool(maximize), bool(first_step), eps, None if lo == -math.inf else lo,
                   None if hi == math.inf else hi)


# The hyper-parameters of a read-only fused pass (no gradient: nothing is updated).
READ_ONLY = SgdParams()
