"""Path norm, path scales (kappa) and the support report of a model.

``phi_p(w)^p`` is the sum over input/bias -> output paths of the product of ``|w_e|^p`` along the
path, and ``kappa_e = d phi_p^p / d |w_e|^p`` sums the products of the other edges over the paths
through e. A chain of Linear layers takes the dense evaluator (two gamma vectors per layer);
other graphs take the abs-pow network of :mod:`pathsgd.graph`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import eval_autograd, eval_dense, reference
from .functional import path_scales_of
from .graph import PathGraph, build_path_graph, lower


def check_p(p: float) -> None:
    """PathSGD's p: the path-scaled step needs a finite p >= 1."""
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 1 and p < float("inf")):
        raise ValueError(f"Invalid p: {p!r} (Path-SGD needs a finite p >= 1: for p < 1, kappa^(2/p) of a "
                         "quasi-norm does not make the update rescaling invariant as in the paper; path_norm and "
                         "path_scales take any p in [0, inf])")


def check_norm_p(p: float) -> float:
    """The p of a path norm: any number in [0, inf]."""
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0):  # NaN fails p >= 0
        raise ValueError(f"Invalid p: {p!r} (a path norm takes p in [0, inf]: 0 counts paths, inf is the largest "
                         "path product)")
    return float(p)


def _norm(graph: PathGraph, p: float, log: bool) -> Tensor:
    """phi_p (or log phi_p) of a built graph, float64, differentiable."""
    if math.isinf(p):
        value = eval_autograd.log_max_path_product(graph)
        return value if log else value.exp()
    if graph.is_dense_chain and p != 0:  # phi_0 is the count itself: exact, without the log round trip
        log_pow = eval_dense.log_path_norm_pow(graph.head, p)
        return log_pow / p if log else (log_pow / p).exp()
    norm_pow = eval_autograd.path_norm_pow(graph, p)
    if p == 0:
        return norm_pow.log() if log else norm_pow
    return norm_pow.log() / p if log else norm_pow.pow(1.0 / p)


def _built(model: nn.Module, input_shape: Optional[Tuple[int, ...]]) -> PathGraph:
    graph = build_path_graph(model, input_shape)
    graph.check_mode(set())
    return graph


def path_norm(model: nn.Module, p: float = 2, input_shape: Optional[Tuple[int, ...]] = None,
              log: bool = False) -> Tensor:
    r"""The path norm of ``model``, a differentiable scalar (usable as a regularizer).

    .. math::
        \phi_p(w) = \Big(\sum_{\text{paths } \pi} \prod_{e \in \pi} |w_e|^p\Big)^{1/p}

    over every input/bias -> output path, for any ``p`` in [0, inf]:

    * ``0 < p < 1``: the quasi-norm of the same formula (used in generalization bounds);
    * ``p = 0``: the number of paths whose every weight is non-zero (a zero weight cuts every path
      through it; constant edges count when non-zero); piecewise constant, so its gradient is zero;
    * ``p = inf``: the largest path product ``max over paths of prod |w_e|``, by a forward
      max-propagation in log domain (deep nets neither overflow nor underflow), differentiable almost
      everywhere (the subgradient through the arg-max path).

    ``log=True`` returns ``log phi_p`` (finite where ``phi_p`` would overflow). In the parameters'
    opmath dtype (float64 for float64 parameters, else float32); ``input_shape`` (without the batch
    dim) is needed for convolutions.
    """
    p = check_norm_p(p)
    graph = _built(model, input_shape)
    dtype = reference.opmath_dtype(next(iter(graph.named_parameters().values())).dtype)
    return _norm(graph, p, log).to(dtype)


def path_norms(model: nn.Module, ps: Sequence[float], input_shape: Optional[Tuple[int, ...]] = None,
               log: bool = False) -> Dict[float, Tensor]:
    """``{p: path_norm(model, p)}`` for several exponents from one trace of the model."""
    ps = [check_norm_p(p) for p in ps]
    graph = _built(model, input_shape)
    dtype = reference.opmath_dtype(next(iter(graph.named_parameters().values())).dtype)
    return {p: _norm(graph, p, log).to(dtype) for p in ps}


def path_scales(model: nn.Module, p: float = 2, input_shape: Optional[Tuple[int, ...]] = None) -> Dict[str, Tensor]:
    r"""``{parameter name: kappa}``, kappa shaped like the parameter, in float64.

    .. math::
        \kappa_e = \sum_{\text{paths } \pi \ni e} \prod_{e' \in \pi, e' \ne e} |w_{e'}|^p
        = \partial \phi_p^p / \partial |w_e|^p

    for any ``p`` in [0, inf] (p = 0: the number of paths through e whose other weights are all
    non-zero; p = inf: the largest product of the other edges' |w| over the paths through e, over all its
    edges for a shared weight, by a forward and a backward max-propagation in log domain). float64 so it
    does not overflow where the parameters' dtype would.
    """
    p = check_norm_p(p)
    return _scales(_built(model, input_shape), p)


def _scales(graph: PathGraph, p: float) -> Dict[str, Tensor]:
    """kappa of every parameter of a built graph, in model order."""
    if math.isinf(p):
        return eval_autograd.max_path_scales(graph)
    if graph.is_dense_chain:
        return eval_dense.chain_kappas(graph.head, p)
    kappas = path_scales_of(graph, p)
    return {name: kappas[name] for name in graph.named_parameters()}


def path_magnitudes(model: nn.Module, p: float = 1, input_shape: Optional[Tuple[int, ...]] = None
                    ) -> Dict[str, Tensor]:
    r"""``{parameter name: |w|^p * kappa}``, shaped like the parameter, in float64: each weight's share of
    :math:`\phi_p^p`,

    .. math::
        m_e = |w_e|^p \kappa_e = \sum_{\text{paths } \pi \ni e} \prod_{e' \in \pi} |w_{e'}|^p,

    the total product of the paths through e (the score of path-magnitude pruning: removing e removes
    exactly these paths). Summed over all weights, each path counts once per weight on it. Any ``p`` in
    [0, inf] (p = 0: the number of non-zero paths through e; p = inf: the largest path product through e).
    """
    p = check_norm_p(p)
    graph = _built(model, input_shape)
    kappas = _scales(graph, p)
    effective = {}  # the tensors on the paths (weight_orig * mask for pruned layers)
    for layer in graph.layers.values():
        effective[layer.weight_name] = layer.weight
        if layer.bias_name is not None:
            effective[layer.bias_name] = layer.bias
    power = 1.0 if math.isinf(p) else p  # p = inf: |w| times the largest product of the others
    return {name: reference.abs_pow(effective[name].detach().to(torch.float64), power) * kappa
            for name, kappa in kappas.items()}


def check_support(model: nn.Module, input_shape: Optional[Tuple[int, ...]] = None) -> List[str]:
    """Every reason ``model`` cannot be handled by :class:`~pathsgd.PathSGD` / :func:`path_norm`, without raising.

    Each entry names the module (or function, or parameter), says why it breaks node-rescaling
    invariance or cannot be placed on the path graph, and what is supported. ``[]`` when the model
    is supported. BatchNorm in training mode is reported (the optimizer checks it at every step);
    ``input_shape`` (without the batch dim), when given, is checked against the model. The errors
    of ``PathSGD`` and ``path_norm`` name the first of these reasons.
    """
    try:
        graph = lower(model)
    except ValueError as exc:  # sharded, or not traceable: nothing further can be read
        return [str(exc)]
    if graph.problems:
        return list(graph.problems)
    try:
        graph.resolve_input_shape(input_shape, shape_optional=True)
    except ValueError as exc:  # the input shape
        return [str(exc)]
    return []
