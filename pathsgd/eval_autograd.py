"""The autograd evaluator: the reference twin of :mod:`pathsgd.eval_tape`, and the differentiable
path norm of general graphs.

It runs the same forward rules of :data:`pathsgd.graph.OP_TABLE` with ``|w|^p`` leaves that
require grad, and backpropagates with ``torch.autograd.grad``: every kappa is materialized (no
dense kernels), which is obviously correct and slower. It is chosen explicitly, with
:func:`pathsgd.graph.use_evaluator`, and for convolutions with string padding (``'same'``), which
``convolution_backward`` cannot take.
"""
from __future__ import annotations

from typing import FrozenSet, Optional

import torch
from torch import Tensor

from .eval_tape import Activations, Kappas, layer_leaves
from .graph import PathGraph, PathNode, forward_values
from .reference import abs_pow, abs_pow_list


def _forward(graph: PathGraph, p: float, leaves, stop: Optional[int]):
    device = next(iter(graph.layers.values())).weight.device

    def layer_forward(node: PathNode, x: Tensor) -> Tensor:
        layer = node.data
        bias = leaves[layer.bias_name] if layer.bias_name is not None else None
        return layer.forward(x if x.device == device else x.to(device), leaves[layer.weight_name], bias)

    ones = torch.ones((1,) + graph.input_shape, dtype=torch.float64, device=device)
    return forward_values(graph, p, layer_forward, ones, stop)


class AutogradEvaluator:
    """``forward(p)`` / ``backward(acts, seed)`` as :class:`pathsgd.eval_tape.TapeEvaluator`, by autograd."""

    def __init__(self, graph: PathGraph, stop: Optional[int], dense: FrozenSet[str] = frozenset()) -> None:
        self.graph, self.stop = graph, stop
        self.leaf_sources = layer_leaves(graph, stop, frozenset())  # every kappa materialized

    def forward(self, p: float) -> Activations:
        device = next(iter(self.graph.layers.values())).weight.device
        with torch.no_grad():
            values = abs_pow_list([getattr(m, kind).detach().to(device=device, dtype=torch.float64)
                                   for _, m, kind in self.leaf_sources], p) if self.leaf_sources else []
        leaves = {name: v.requires_grad_(True) for (name, _, _), v in zip(self.leaf_sources, values)}
        with torch.enable_grad():  # the step runs under no_grad
            env = _forward(self.graph, p, leaves, self.stop)
            total = sum(env[i].sum() for i in self.graph.outputs) if self.stop is None else None
        return Activations(p, env, leaves, {}, total)

    def backward(self, acts: Activations, seed: Optional[Tensor] = None) -> Kappas:
        leaves = list(acts.leaves.values())
        if self.stop is not None:
            out, grad_out = acts.env[self.stop], seed.reshape(acts.env[self.stop].shape)
        else:
            out, grad_out = acts.total, None
        grads = torch.autograd.grad(out, leaves, grad_outputs=grad_out, allow_unused=True) \
            if leaves and out.requires_grad else [None] * len(leaves)
        kappas = {name: g if g is not None else torch.zeros_like(t)
                  for (name, t), g in zip(acts.leaves.items(), grads)}
        return Kappas(kappas, {})


def path_norm_pow(graph: PathGraph, p: float) -> Tensor:
    """``phi_p^p`` in float64, differentiable in the real parameters (a regularizer)."""
    device = next(iter(graph.layers.values())).weight.device
    leaves = {}
    for layer in graph.layers.values():
        leaves[layer.weight_name] = abs_pow(layer.weight.to(device=device, dtype=torch.float64), p)
        if layer.bias_name is not None:
            leaves[layer.bias_name] = abs_pow(layer.bias.to(device=device, dtype=torch.float64), p)
    env = _forward(graph, p, leaves, None)
    return sum(env[i].sum() for i in graph.outputs)
