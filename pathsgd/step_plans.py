"""Step plans: a model's Path-SGD step resolved once, so that later steps run straight through
the ops with no per-parameter Python objects (what a small model's step costs otherwise).

* :class:`ChainStepPlan`: an MLP (the whole model is one dense chain): ONE
  ``pathsgd::dense_chain_step_`` call a step.
* :class:`TrunkStepPlan`: a conv net (a trunk and a dense head): trunk forward -> the head's
  ``dense_chain_step_`` (it returns the gamma_out at the head input) -> the trunk's backward
  (``pathsgd::abs_pow_vjp``) seeded with it -> ONE ``scaled_sgd_update_`` of the trunk.

Both do what :func:`pathsgd.functional.path_sgd` does for the same step, in the same order, with
the same ops (the same bits). :meth:`ChainStepPlan.step` returns False, having changed nothing,
when a step needs the general path: a parameter without a gradient, the first momentum step (it
creates the buffers), a gradient or buffer that does not match its parameter, or an argument the
op refuses (the general path then raises its error naming the parameter).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from . import ops
from .eval_dense import from_log_scaled, to_log_scaled
from .functional import evaluator_for, group_sgd
from .graph import DenseChain, PathGraph
from .reference import opmath_dtype

__all__ = ["ChainStepPlan", "TrunkStepPlan"]


def _grads_and_buffers(params: List[Tensor], state: Dict[Tensor, Any], momentum: bool):
    """``(grads, buffers)`` of ``params``, or None when a gradient or (with momentum) a buffer is missing."""
    grads = [t.grad for t in params]
    if any(g is None for g in grads):
        return None
    buffers: list = []
    if momentum:
        for t in params:
            entry = state.get(t)
            buffer = entry.get("momentum_buffer") if entry else None
            if buffer is None:
                return None
            buffers.append(buffer)
    return grads, buffers


class ChainStepPlan:
    """The step of a model that is one dense chain optimized by one param group: the chain's
    parameters in layer order and its bias layers, resolved once."""

    def __init__(self, chain: DenseChain, group: Dict[str, Any]) -> None:
        self.group = group
        self.weights = [layer.weight_param for layer in chain.layers]
        self.bias_layers = [i for i, layer in enumerate(chain.layers) if layer.bias_param is not None]
        self.biases = [chain.layers[i].bias_param for i in self.bias_layers]
        self.slots = [(layer.module._parameters, "weight", w) for layer, w in zip(chain.layers, self.weights)]
        self.slots += [(chain.layers[i].module._parameters, "bias", b) for i, b in zip(self.bias_layers, self.biases)]
        self.device_type = self.weights[0].device.type
        # The chain op's small tensors, kept across steps (it grows to their size at the first step).
        self.workspace = torch.empty(0, dtype=torch.uint8, device=self.weights[0].device)

    @property
    def params(self) -> List[Tensor]:
        """Every parameter the plan updates."""
        return [t for _, _, t in self.slots]

    def params_in_place(self) -> bool:
        """Every parameter of the plan is still the one its module holds (none was replaced)."""
        return all(params.get(name) is t for params, name, t in self.slots)

    def _chain_args(self, state: Dict[Tensor, Any]) -> Optional[list]:
        """The chain's tensor lists for ``dense_chain_step_``, or None (the general path)."""
        if self.weights[0].device.type != self.device_type:
            return None
        momentum = self.group["momentum"] != 0
        weights = _grads_and_buffers(self.weights, state, momentum)
        biases = _grads_and_buffers(self.biases, state, momentum)
        if weights is None or biases is None:
            return None
        if self.workspace.device != self.weights[0].device:  # the model moved to another GPU
            self.workspace = torch.empty(0, dtype=torch.uint8, device=self.weights[0].device)
        return [self.weights, *weights, self.biases, *biases, self.bias_layers]

    def step(self, state: Dict[Tensor, Any]) -> bool:
        args = self._chain_args(state)
        if args is None:
            return False
        group = self.group
        try:
            ops.dense_chain_step_(*args, None, None, float(group["p"]), group_sgd(group, False), self.workspace)
        except RuntimeError:  # the op checks every argument before it changes anything
            return False
        return True


class TrunkStepPlan(ChainStepPlan):
    """The step of a conv net (``graph.head`` after a trunk) optimized by one param group, every
    trunk layer's kappa materialized by the trunk's tape (no dense layer in the trunk).

    When the trunk's forward and backward are compiled programs (every node has a compiled rule),
    a step is the evaluator's ``forward_op`` (float64 ``|w|^p`` leaves, ``abs_pow_forward``), the
    head's ``dense_chain_step_``, ``backward_op`` (``abs_pow_vjp`` seeded with its gamma_out) and
    ``scaled_sgd_update_``: ``forward`` / ``backward`` without their per-node Python.
    """

    def __init__(self, graph: PathGraph, group: Dict[str, Any]) -> None:
        super().__init__(graph.head, group)
        self.graph = graph
        self.evaluator = evaluator = evaluator_for(graph, graph.head_input, frozenset())
        named = graph.named_parameters()
        self.leaf_names = [name for name, _, _ in evaluator.leaf_sources]
        self.trunk_params = [named[name] for name in self.leaf_names]
        self.slots += [(layer.module._parameters, kind, t)
                       for (_, layer, kind), t in zip(evaluator.leaf_sources, self.trunk_params)]
        # forward_op / backward_op: the evaluator's passes without their per-node Python
        self.compiled = evaluator.compiled and bool(self.trunk_params)

    def _trunk_args(self, state: Dict[Tensor, Any]) -> Optional[list]:
        """The trunk's (grads, buffers), or None when one does not match its parameter (the
        general path casts a buffer of a cast model, or raises the error that names it): checked
        before the head's op changes anything."""
        found = _grads_and_buffers(self.trunk_params, state, self.group["momentum"] != 0)
        if found is None:
            return None
        device = self.weights[0].device
        for t, g in zip(self.trunk_params, found[0]):
            if g.layout != torch.strided or g.shape != t.shape or g.dtype != t.dtype or g.device != device:
                return None
        for t, b in zip(self.trunk_params, found[1]):
            if b.dtype != t.dtype or b.device != device or b.shape != t.shape or not b.is_contiguous():
                return None
        return found

    def step(self, state: Dict[Tensor, Any]) -> bool:
        graph, group = self.graph, self.group
        if any(m.training for m in graph.batchnorms.values()):
            return False  # the general path raises the error that names the module
        chain = self._chain_args(state)
        trunk = self._trunk_args(state) if chain is not None else None
        if trunk is None:
            return False
        p, sgd = float(group["p"]), group_sgd(group, False)
        opmath = opmath_dtype(self.weights[0].dtype)
        evaluator = self.evaluator
        if self.compiled:
            device = self.weights[0].device
            leaves, values = evaluator.forward_op(p, device, self.trunk_params)
            x = evaluator.stop_value(values, device)
        else:
            acts = evaluator.forward(p)
            x = acts.env[graph.head_input]
        v, s = to_log_scaled(x.reshape(-1), opmath)
        try:
            gamma_out = ops.dense_chain_step_(*chain, v, s, p, sgd, self.workspace)
        except RuntimeError:  # the op checks every argument before it changes anything
            return False
        seed = from_log_scaled(gamma_out, x.device)
        if self.compiled:
            kappas = evaluator.backward_op(values, leaves, seed, p)
        else:
            found = evaluator.backward(acts, seed).kappas
            kappas = [found[name] for name in self.leaf_names]
        ops.scaled_sgd_update_(self.trunk_params, *trunk, kappas, p, sgd)
        return True
