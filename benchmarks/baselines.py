"""An authors'-style naive Path-SGD: correct, simple, slow. The speed/memory baseline.

Every step it

1. deep-copies the model (``copy.deepcopy``, as the authors' published code does),
2. replaces every parameter of the copy by ``|w|^p`` (weights and biases),
3. forwards an all-ones input (batch of one) through the copy in eval mode and
   backpropagates ``output.sum()``: with non-negative weights and inputs every ReLU is the
   identity, so the output is ``gamma_in`` at the output units and the gradient w.r.t. each
   ``|w_e|^p`` is ``kappa_e`` (unlike the published code we backpropagate
   ``output.sum()``, not ``output.norm()**2``, and recompute every step),
4. divides each gradient in place by ``max(kappa^(2/p), eps)``,
5. and calls ``torch.optim.SGD.step`` with the same hyper-parameters.

This is exactly the update of :class:`pathsgd.PathSGD` (same hyper-parameter semantics:
weight decay is added by torch's SGD after the scaling), which
``tests/test_benchmarks_smoke.py`` checks in float64. It materializes kappa for every
weight and a full second copy of the model (parameters *and* gradients) each step.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn


def infer_input_shape(model: nn.Module) -> Sequence[int]:
    """``(in_features,)`` of the first ``nn.Linear`` of ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise ValueError("NaivePathSGD: the model has no nn.Linear; pass input_shape=")


class NaivePathSGD:
    """Naive Path-SGD: ``torch.optim.SGD`` on gradients divided by kappa computed by autograd.

    Mirrors the parts of the ``torch.optim.Optimizer`` interface the benchmarks use
    (``step``, ``zero_grad``, ``param_groups``, ``state``).
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False, p: float = 2,
                 eps: float = 1e-12, input_shape: Optional[Sequence[int]] = None, foreach: Optional[bool] = None):
        if p < 1:
            raise ValueError(f"p must be >= 1, got {p}")
        self.model = model
        self.p = float(p)
        self.eps = float(eps)
        self.input_shape = tuple(input_shape) if input_shape is not None else tuple(infer_input_shape(model))
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                                   weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach)

    @property
    def param_groups(self):
        return self.sgd.param_groups

    @property
    def state(self):
        return self.sgd.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    def path_scales(self):
        """``[kappa]`` for every parameter of the model (same order as ``model.parameters()``)."""
        with torch.enable_grad():
            shadow = copy.deepcopy(self.model)
            shadow.eval()
            for param in shadow.parameters():
                param.grad = None
                param.requires_grad_(True)
                with torch.no_grad():
                    param.copy_(param.abs().pow(self.p))
            first = next(shadow.parameters())
            ones = torch.ones((1, *self.input_shape), dtype=first.dtype, device=first.device)
            shadow(ones).sum().backward()
            return [param.grad for param in shadow.parameters()]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kappas = self.path_scales()
        for param, kappa in zip(self.model.parameters(), kappas):
            if param.grad is not None and kappa is not None:
                param.grad.div_(kappa.pow(2.0 / self.p).clamp_min(self.eps))
        self.sgd.step()
        return loss
