"""Path norm, path scales (kappa) and the support report of a model.

``phi_p(w)^p`` is the sum over input/bias -> output paths of the product of ``|w_e|^p`` along the
path, and ``kappa_e = d phi_p^p / d |w_e|^p`` sums the products of the other edges over the paths
through e. A chain of Linear layers takes the dense evaluator (two gamma vectors per layer);
other graphs take the abs-pow network of :mod:`pathsgd.graph`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from . import eval_autograd, eval_dense, reference
from .functional import path_scales_of
from .graph import build_path_graph, lower


def check_p(p: float) -> None:
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 1 and p < float("inf")):
        raise ValueError(f"Invalid p: {p!r} (Path-SGD needs a finite p >= 1)")


def path_norm(model: nn.Module, p: float = 2, input_shape: Optional[Tuple[int, ...]] = None) -> Tensor:
    """The path norm ``phi_p(w) = (sum over input/bias -> output paths of prod |w_e|^p)^(1/p)``.

    A differentiable scalar (usable as a regularizer) in the parameters' opmath dtype.
    """
    check_p(p)
    graph = build_path_graph(model, input_shape)
    dtype = reference.opmath_dtype(next(iter(graph.named_parameters().values())).dtype)
    if graph.is_dense_chain:
        return (eval_dense.log_path_norm_pow(graph.head, p) / p).exp().to(dtype)
    graph.check_mode(set())
    return eval_autograd.path_norm_pow(graph, p).pow(1.0 / p).to(dtype)


def path_scales(model: nn.Module, p: float = 2, input_shape: Optional[Tuple[int, ...]] = None) -> Dict[str, Tensor]:
    """``{parameter name: kappa}``, kappa shaped like the parameter, in float64.

    ``kappa_e`` is the sum over paths through edge e of the product of the other
    edges' ``|w|^p`` (``= d phi_p^p / d |w_e|^p``); float64 so it does not overflow
    where the parameters' dtype would.
    """
    check_p(p)
    graph = build_path_graph(model, input_shape)
    if graph.is_dense_chain:
        return eval_dense.chain_kappas(graph.head, p)
    graph.check_mode(set())
    kappas = path_scales_of(graph, p)
    return {name: kappas[name] for name in graph.named_parameters()}


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
