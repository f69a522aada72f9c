"""Step plans: a model's Path-SGD step resolved once, so that later steps run straight through
the ops with no per-parameter Python objects (what a small model's step costs otherwise).

* :class:`ChainStepPlan`: an MLP (the whole model is one dense chain): ONE
  ``pathsgd::dense_chain_step_`` call a step.
* :class:`TrunkStepPlan`: a conv net (a trunk and a dense head): ONE ``pathsgd::trunk_chain_step_``
  call a step (trunk forward -> the head's dense chain, which gives the gamma_out at the head
  input -> the trunk's backward seeded with it -> the trunk's update), when every trunk node has
  a compiled rule; otherwise the same order with the evaluator's per-node Python.

Both do what :func:`pathsgd.functional.path_sgd` does for the same step, in the same order, with
the same ops (the same bits). :meth:`ChainStepPlan.step` returns False, having changed nothing,
when a step needs the general path: a parameter without a gradient, the first momentum step (it
creates the buffers), a gradient or buffer that does not match its parameter, or an argument the
op refuses (the general path then raises its error naming the parameter).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .functional import evaluator_for, group_sgd
from .graph import DenseChain, PathGraph
from .sgd_params import SgdParams

__all__ = ["ChainStepPlan", "TrunkStepPlan"]

# What a step plan's hyper-parameters are built from (p and every SGD field but first_step).
_GROUP_VALUES = operator.itemgetter("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "eps",
                                    "clamp", "p")


def _grads_and_buffers(params: List[Tensor], state: Dict[Tensor, Any], momentum: bool):
    """``(grads, buffers)`` of ``params``, or None when a gradient or (with momentum) a buffer is missing."""
    grads = []
    for t in params:
        grad = t.grad
        if grad is None:
            return None
        grads.append(grad)
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
    parameters in the op's order (the weights in layer order, then the biases) and its bias
    layers, resolved once."""

    def __init__(self, chain: DenseChain, group: Dict[str, Any]) -> None:
        self.group = group
        layers = chain.layers
        self.bias_layers = [i for i, layer in enumerate(layers) if layer.bias_param is not None]
        self.chain_params = [layer.weight_param for layer in layers] + [layers[i].bias_param for i in self.bias_layers]
        self.slots = [(layer.module._parameters, "weight", layer.weight_param) for layer in layers]
        self.slots += [(layers[i].module._parameters, "bias", layers[i].bias_param) for i in self.bias_layers]
        self.device = self.chain_params[0].device
        self.kernel = ops.step_kernel("dense_chain_step_", self.device.type)  # None: no compiled kernel (no plan)
        # The chain op's small tensors, kept across steps (it grows to their size at the first step).
        self.workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._hyper: tuple = ()  # (the group's values, p, their SgdParams, packed) of the latest step

    def hyper(self) -> Tuple[float, SgdParams, List[float]]:
        """``(p, SgdParams, packed)`` of the group, built again only when one of its values changed (an
        lr scheduler): most of the cost of building them is Python, every step."""
        values = _GROUP_VALUES(self.group)
        if not self._hyper or self._hyper[0] != values:
            sgd = group_sgd(self.group, False)
            self._hyper = (values, float(self.group["p"]), sgd, sgd.packed())
        return self._hyper[1:]

    @property
    def params(self) -> List[Tensor]:
        """Every parameter the plan updates."""
        return [t for _, _, t in self.slots]

    def params_in_place(self) -> bool:
        """Every parameter of the plan is still the one its module holds (none was replaced)."""
        return all(params.get(name) is t for params, name, t in self.slots)

    def _on_device(self) -> bool:
        """The chain is on the plan's device type (its workspace follows it to another GPU)."""
        device = self.chain_params[0].device
        if device != self.device:
            if device.type != self.device.type:
                return False
            self.device = device  # the model moved to another GPU
            self.workspace = torch.empty(0, dtype=torch.uint8, device=device)
        return True

    def _chain_args(self, state: Dict[Tensor, Any]) -> Optional[tuple]:
        """The chain's ``(grads, momentum buffers)`` for ``dense_chain_step_``, or None (the general path)."""
        if not self._on_device():
            return None
        return _grads_and_buffers(self.chain_params, state, self.group["momentum"] != 0)

    def _run_chain(self, grads: List[Tensor], buffers: List[Tensor], gamma0: List[Tensor], p: float,
                   sgd: SgdParams, packed: List[float]) -> bool:
        """The chain op (it replaces a given ``gamma0`` with the gamma_out at the chain input); False
        when it refuses an argument (it checks them all before it changes anything)."""
        try:
            self.kernel(self.chain_params, grads, buffers, self.bias_layers, gamma0, p, packed, sgd.lr_tensor,
                        self.workspace)
        except RuntimeError:
            return False
        return True

    def step(self, state: Dict[Tensor, Any]) -> bool:
        found = self._chain_args(state)
        if found is None:
            return False
        return self._run_chain(*found, [], *self.hyper())


class TrunkStepPlan(ChainStepPlan):
    """The step of a conv net (``graph.head`` after a trunk) optimized by one param group, every
    trunk layer's kappa materialized by the trunk's tape (no dense layer in the trunk).

    When the trunk's forward and backward are compiled programs (every node has a compiled rule),
    a step is ONE ``pathsgd::trunk_chain_step_`` call: the trunk's abs-pow forward program, the head's
    dense chain, the trunk's VJP program seeded with the head's gamma_out and its update, with no
    Python between them. Otherwise the evaluator's ``forward`` / ``backward`` (per-node Python) run
    around the head's ``dense_chain_step_``, and ONE ``scaled_sgd_update_`` updates the trunk.
    """

    def __init__(self, graph: PathGraph, group: Dict[str, Any]) -> None:
        super().__init__(graph.head, group)
        self.graph = graph
        self.evaluator = evaluator = evaluator_for(graph, graph.head_input, frozenset())
        named = graph.named_parameters()
        self.leaf_names = [name for name, _, _ in evaluator.leaf_sources]
        self.trunk_params = [named[name] for name in self.leaf_names]
        self.trunk_shapes = [t.shape for t in self.trunk_params]
        self._checked_buffers: tuple = ([], [])  # (the parameters' dtypes, the buffers) last found to match
        self.slots += [(layer.module._parameters, kind, t)
                       for (_, layer, kind), t in zip(evaluator.leaf_sources, self.trunk_params)]
        self.compiled = evaluator.compiled and bool(self.trunk_params)
        if self.compiled:  # the whole step is one op: its arguments, resolved once
            self.step_params = self.trunk_params + self.chain_params
            self.layout = evaluator.trunk_layout(len(self.trunk_params), self.bias_layers)
            self.trunk_kernel = ops.step_kernel("trunk_chain_step_", self.device.type)

    def _trunk_args(self, state: Dict[Tensor, Any]) -> Optional[tuple]:
        """The trunk's (grads, buffers), or None when one does not match its parameter (the
        general path casts a buffer of a cast model, or raises the error that names it): checked
        before the head's op changes anything. Buffers are checked when they or the parameters'
        dtypes changed since the last check (they are updated in place)."""
        found = _grads_and_buffers(self.trunk_params, state, self.group["momentum"] != 0)
        if found is None:
            return None
        grads, buffers = found
        device = self.device
        dtypes = [t.dtype for t in self.trunk_params]
        for g, shape, dtype in zip(grads, self.trunk_shapes, dtypes):
            if g.dtype is not dtype or g.shape != shape or g.is_sparse or g.device != device:
                return None
        checked_dtypes, checked = self._checked_buffers
        if (checked_dtypes != dtypes or len(checked) != len(buffers)
                or any(a is not b for a, b in zip(checked, buffers))):
            for b, shape, dtype in zip(buffers, self.trunk_shapes, dtypes):
                if b.dtype is not dtype or b.device != device or b.shape != shape or not b.is_contiguous():
                    return None
            self._checked_buffers = (dtypes, buffers)
        return found

    def step(self, state: Dict[Tensor, Any]) -> bool:
        graph = self.graph
        if any(m.training for m in graph.batchnorms.values()):
            return False  # the general path raises the error that names the module
        if self.compiled:
            return self._step_op(state)
        chain = self._chain_args(state)
        trunk = self._trunk_args(state) if chain is not None else None
        if trunk is None:
            return False
        p, sgd, packed = self.hyper()
        acts = self.evaluator.forward(p)
        gamma = acts.env[graph.head_input].reshape(-1).clone()  # the head's input gamma, then its gamma_out
        if not self._run_chain(*chain, [gamma], p, sgd, packed):
            return False
        found = self.evaluator.backward(acts, gamma).kappas
        ops.scaled_sgd_update_(self.trunk_params, *trunk, [found[name] for name in self.leaf_names], p, sgd)
        return True

    def _step_op(self, state: Dict[Tensor, Any]) -> bool:
        """The step as one ``trunk_chain_step_`` (it checks every tensor it writes before it changes
        anything: False, having changed nothing, when it refuses one)."""
        found = _grads_and_buffers(self.step_params, state, self.group["momentum"] != 0) if self._on_device() else None
        if found is None:
            return False
        p, sgd, packed = self.hyper()
        evaluator = self.evaluator
        kernel = self.trunk_kernel if not ops.reference_forced() else None
        try:
            if kernel is not None:
                kernel(self.step_params, *found, self.layout, evaluator.vjp_factors(p), p, packed, sgd.lr_tensor,
                       self.workspace)
            else:
                ops.trunk_chain_step_(self.step_params, *found, self.layout, evaluator.vjp_factors(p), p, sgd,
                                      self.workspace)
        except RuntimeError:
            return False
        return True
