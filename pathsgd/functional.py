"""The Path-SGD step over a path graph, like ``torch.optim.sgd.sgd`` for :class:`pathsgd.PathSGD`.

A step runs straight through the IR's evaluators:

    MLP (the whole model is a dense chain):  dense walk (gamma forward, fused update passes)
    CNN with a dense head:  trunk forward -> dense walk of the head (its fused update passes
                            give the gamma_out at its input) -> trunk backward seeded with it
    anything else:          forward + backward of the whole abs-pow network, per p
    then one multi-tensor update per (param group, first step, device) with materialized kappa.

Every kappa comes from the weights before the step: all evaluations of a step run before the
parameters they read are updated.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .eval_autograd import AutogradEvaluator
from .eval_dense import Batches, dense_step, on
from .eval_tape import Kappas, TapeEvaluator
from .graph import DenseChain, PathGraph
from .reference import from_log_scaled, opmath_dtype, to_log_scaled
from .sgd_params import SgdParams

Evaluator = Union[TapeEvaluator, AutogradEvaluator]
# A kappa kept for later steps: a dense weight's (gamma_in, log scale, gamma_out, log scale), else float64 kappa.
Stored = Union[Tuple[Tensor, Tensor, Tensor, Tensor], Tensor]


class ParamUpdate:
    """One parameter's update this step; ``buffer`` is None until momentum first runs."""
    __slots__ = ("param", "grad", "group", "buffer", "first_step", "buffer_replaced", "p", "_sgd")

    def __init__(self, param: Tensor, grad: Tensor, group: Dict[str, Any], buffer: Optional[Tensor]) -> None:
        self.param, self.grad, self.group, self.buffer = param, grad, group, buffer
        self.first_step = False
        self.buffer_replaced = False
        self.p: float = group["p"]
        self._sgd: Optional[SgdParams] = None

    def prepare_buffer(self) -> Optional[Tensor]:
        """The momentum buffer to pass to a kernel (allocated, uninitialized, on the first step)."""
        if self.group["momentum"] == 0:
            return None
        if self.buffer is None:
            self.buffer = torch.empty_like(self.param, memory_format=torch.contiguous_format)
            self.first_step = True
        return self.buffer

    def sgd(self, unit: bool = False) -> SgdParams:
        """The hyper-parameters of the pathsgd ops (built once the buffer is prepared); ``unit``:
        for a parameter of units (kappa = 1, eps not applied)."""
        sgd = self._sgd
        if sgd is None or sgd.first_step != self.first_step:
            sgd = self._sgd = group_sgd(self.group, self.first_step)
        return sgd._replace(eps=0.0) if unit else sgd


def evaluator_for(graph: PathGraph, stop: Optional[int], dense: FrozenSet[str]) -> Evaluator:
    """The abs-pow evaluator of ``graph`` up to ``stop`` with ``dense`` layers, built once."""
    kind = graph.evaluator()
    key = (kind, stop, dense)
    evaluator = graph.evaluators.get(key)
    if evaluator is None:
        cls = TapeEvaluator if kind == "tape" else AutogradEvaluator
        evaluator = graph.evaluators[key] = cls(graph, stop, dense)
    return evaluator


def _batch(batches: Batches, update: ParamUpdate, kappa: Tensor) -> None:
    update.prepare_buffer()
    batches.setdefault((id(update.group), update.first_step, update.param.device), []).append((update, kappa))


def _apply_batches(batches: Batches, unit: bool = False) -> None:
    """One multi-tensor update per (group, first step, device) with materialized kappa."""
    for batch in batches.values():
        first = batch[0][0]
        ops.scaled_sgd_update_([u.param for u, _ in batch], [u.grad for u, _ in batch],
                               [u.buffer for u, _ in batch] if first.buffer is not None else [],
                               [k for _, k in batch], first.p, first.sgd(unit))


def _unit_parameter_step(unit_params: Dict[str, Tensor], updates: Dict[Tensor, ParamUpdate]) -> None:
    """PReLU slopes: node rescaling leaves a slope and its gradient unchanged, so they take the plain
    SGD update (kappa = 1, eps not applied), in one multi-tensor update per group."""
    batches: Batches = {}
    for param in unit_params.values():
        update = updates.get(param)
        if update is not None:
            _batch(batches, update, torch.ones_like(param, dtype=torch.float64, memory_format=torch.contiguous_format))
    _apply_batches(batches, unit=True)


def _dense_for(graph: PathGraph, names: FrozenSet[str], updates: Dict[Tensor, ParamUpdate], p: float) -> FrozenSet[str]:
    """The layers of ``names`` whose weight is updated with this p (their kappa stays rank 1)."""
    chosen = []
    for name in names:
        update = updates.get(graph.layers[name].weight_param)
        if update is not None and update.p == p:
            chosen.append(name)
    return frozenset(chosen)


def _layer_updates(graph: PathGraph, updates: Dict[Tensor, ParamUpdate], results: Dict[float, Kappas],
                   skip: FrozenSet[str], batches: Batches, record: Optional[Dict[Tensor, Stored]] = None) -> None:
    """The updates of the layers outside ``skip``: dense layers by the fused kernel with their
    gammas, the rest into ``batches`` with their materialized kappa (both into ``record``)."""
    for name, layer in graph.layers.items():
        if name in skip:
            continue
        for param, param_name, is_weight in ((layer.weight_param, layer.weight_name, True),
                                             (layer.bias_param, layer.bias_name, False)):
            update = updates.get(param) if param is not None else None
            if update is None:
                continue
            result = results[update.p]
            if is_weight and name in result.dense_gammas:
                gammas = [t if t.device == param.device else t.to(param.device) for t in result.dense_gammas[name]]
                ops.fused_dense_step_(param, update.grad, update.prepare_buffer(), *gammas, update.p, update.sgd())
                if record is not None:
                    record[param] = tuple(gammas)
                continue
            kappa = result.kappas[param_name]
            kappa = kappa if kappa.device == param.device else kappa.to(param.device)
            _batch(batches, update, kappa)
            if record is not None:
                record[param] = kappa.clone()  # the tape's buffers are reused by the next evaluation


def _whole_chain_step(chain: DenseChain, updates: Dict[Tensor, ParamUpdate],
                      gamma0: Optional[Tensor] = None) -> Optional[List[Tensor]]:
    """The chain's step as ONE op call (``pathsgd::dense_chain_step_``) when every weight and bias
    of it is updated with the same hyper-parameters (one param group, device and first step);
    returns ``[gamma_out]`` at the chain input (float64; ``[]`` without ``gamma0``, the chain's
    float64 input gamma), or None (nothing done) when that does not hold."""
    weight_updates, bias_updates, bias_layers = [], [], []
    for index, layer in enumerate(chain.layers):
        update = updates.get(layer.weight)
        if update is None:
            return None
        weight_updates.append(update)
        if layer.bias is not None:
            update = updates.get(layer.bias)
            if update is None:
                return None
            bias_updates.append(update)
            bias_layers.append(index)
    chosen = weight_updates + bias_updates
    first = chosen[0]
    device = first.param.device
    if any(u.group is not first.group or u.param.device != device for u in chosen):
        return None
    for update in chosen:
        update.prepare_buffer()
    if any(u.first_step != first.first_step for u in chosen):
        return None
    buffers = [u.buffer for u in chosen] if first.buffer is not None else []
    gamma = [gamma0.clone()] if gamma0 is not None else []  # the op overwrites it with the result
    ops.dense_chain_step_([u.param for u in chosen], [u.grad for u in chosen], buffers, bias_layers, gamma, first.p,
                          first.sgd())
    return gamma


def group_sgd(group: Dict[str, Any], first_step: bool) -> SgdParams:
    """The SgdParams of a param group's update."""
    lo, hi = group["clamp"] if group["clamp"] is not None else (None, None)
    lr = group["lr"]
    return SgdParams(lr if isinstance(lr, Tensor) else float(lr), float(group["momentum"]), float(group["dampening"]),
                     float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]), first_step,
                     float(group["eps"]), lo, hi)


def _chain_step(chain: DenseChain, updates: Dict[Tensor, ParamUpdate], batches: Batches,
                gamma0: Optional[Tensor] = None, record: Optional[Dict[Tensor, Stored]] = None) -> Optional[Tensor]:
    """The dense walk of a chain: one op call when it applies, else layer by layer (mixed param
    groups, p values or parameters left out, or kappas to ``record``). Returns the gamma_out at
    the chain input (float64) when ``gamma0`` (the chain's float64 input gamma) is given."""
    p = next(iter(updates.values())).p
    if record is None and all(u.p == p for u in updates.values()):
        gamma_out = _whole_chain_step(chain, updates, gamma0)
        if gamma_out is not None:
            return gamma_out[0] if gamma0 is not None else None
    if gamma0 is None:
        dense_step(chain, updates, batches, record=record)
        return None
    gamma_in = to_log_scaled(gamma0, opmath_dtype(chain.layers[0].weight.dtype))
    return from_log_scaled(dense_step(chain, updates, batches, gamma0={p: gamma_in}, record=record)[p], gamma0.device)


def _stored_step(unit_params: Dict[str, Tensor], updates: Dict[Tensor, ParamUpdate],
                 stored: Dict[Tensor, Stored]) -> None:
    """The update with kappas kept from an earlier step (no abs-pow network, no gamma forward):
    dense weights by the fused kernel with their stored gammas, the rest in multi-tensor batches."""
    units = {id(t) for t in unit_params.values()}
    batches: Batches = {}
    for param, update in updates.items():
        if id(param) in units:
            continue
        entry = stored[param]
        if isinstance(entry, tuple):
            v_in, s_in = on(entry[:2], param)
            v_out, s_out = on(entry[2:], param)
            ops.fused_dense_step_(param, update.grad, update.prepare_buffer(), v_in, s_in, v_out, s_out, update.p,
                                  update.sgd())
        else:
            _batch(batches, update, entry if entry.device == param.device else entry.to(param.device))
    _apply_batches(batches)


def path_sgd(graph: Optional[PathGraph], updates: Dict[Tensor, ParamUpdate],
             stored: Optional[Dict[Tensor, Stored]] = None, record: Optional[Dict[Tensor, Stored]] = None,
             unit_params: Optional[Dict[str, Tensor]] = None) -> None:
    """Functional Path-SGD step over the parameters in ``updates`` (see :class:`pathsgd.PathSGD`).

    ``stored``: the kappa of every updated parameter, kept from an earlier step (the kappa
    schedule): no path graph is evaluated (``graph`` may be None; ``unit_params`` names the PReLU
    slopes). ``record``: filled with the kappa each parameter is updated with this step (a dense
    weight's four gamma tensors, else a float64 kappa), for a later ``stored`` step.
    """
    unit_params = graph.unit_params if graph is not None else (unit_params or {})
    if unit_params:
        _unit_parameter_step(unit_params, updates)
    if stored is not None:
        _stored_step(unit_params, updates, stored)
        return
    batches: Batches = {}
    if graph.is_dense_chain:
        _chain_step(graph.head, updates, batches, record=record)
        _apply_batches(batches)
        return
    ps = sorted({u.p for u in updates.values()})
    if graph.head is not None and len(ps) == 1:
        p = ps[0]
        trunk = evaluator_for(graph, graph.head_input, _dense_for(graph, graph.dense_layers - graph.head_names,
                                                                  updates, p))
        acts = trunk.forward(p)
        x = acts.env[graph.head_input]
        gamma_out = _chain_step(graph.head, updates, batches, x.reshape(-1), record)
        results = {p: trunk.backward(acts, gamma_out)}
        _layer_updates(graph, updates, results, graph.head_names, batches, record)
    else:
        results = {}
        for p in ps:  # every evaluation reads the old weights, so all of them run before any update
            evaluator = evaluator_for(graph, None, _dense_for(graph, graph.dense_layers, updates, p))
            results[p] = evaluator.backward(evaluator.forward(p))
        _layer_updates(graph, updates, results, frozenset(), batches, record)
    _apply_batches(batches)


def path_scales_of(graph: PathGraph, p: float) -> Dict[str, Tensor]:
    """``{parameter name: kappa}`` of a general graph (float64, materialized)."""
    evaluator = evaluator_for(graph, None, frozenset())
    return evaluator.backward(evaluator.forward(p)).kappas


