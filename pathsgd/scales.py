"""Path norm and path scales (kappa) of a model.

For a dense chain with ``a = |w|^p``:

    gamma_in(0) = 1,  gamma_in(l) = |W_l|^p gamma_in(l-1) + |b_l|^p
    gamma_out(L) = 1, gamma_out(l-1) = |W_l|^pT gamma_out(l)
    phi_p(w)^p = sum(gamma_in(L)),  kappa(W_l)_ij = gamma_out(l)_i gamma_in(l-1)_j,  kappa(b_l)_i = gamma_out(l)_i

Gamma vectors are carried as (normalized vector, float64 log scale) pairs so
deep networks neither overflow nor underflow. General DAGs
(convolutions, residuals) go through the float64 abs-pow network of
:mod:`pathsgd.dag`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import reference
from .graph import DenseChain, build_path_graph

LogScaled = Tuple[Tensor, Tensor]  # (gamma normalized to max in [1, 2], float64 log scale)


def check_p(p: float) -> None:
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 1 and p < float("inf")):
        raise ValueError(f"Invalid p: {p!r} (Path-SGD needs a finite p >= 1)")


def unit_gamma(n: int, dtype: torch.dtype, device: torch.device) -> LogScaled:
    """Gamma of input units or output units: all ones, log scale 0."""
    return torch.ones(n, dtype=dtype, device=device), torch.zeros((), dtype=torch.float64, device=device)


def chain_gamma_in(chain: DenseChain, p: float, gamma_forward: Callable = reference.gamma_forward,
                   dtype: Optional[torch.dtype] = None, gamma0: Optional[LogScaled] = None,
                   with_output: bool = True,
                   params: Optional[List[Tuple[Tensor, Optional[Tensor]]]] = None) -> List[LogScaled]:
    """``[gamma_in(0), ..., gamma_in(L)]``: the input gamma of every layer, then the output gamma
    (left out when ``with_output`` is False: a step needs only the layers' inputs).

    ``dtype`` casts the weights first (float64 for exact scales); by default the
    vectors are in the parameters' opmath dtype. ``gamma0`` is the chain's input gamma
    (default: all ones, the chain starts at the model input). ``params``: the layers'
    (weight, bias), when the caller has read them already.
    """
    if params is None:
        params = [(layer.weight, layer.bias) for layer in chain.layers]
    first = params[0][0]
    vec_dtype = dtype or reference.opmath_dtype(first.dtype)
    gammas = [gamma0 if gamma0 is not None else unit_gamma(first.shape[1], vec_dtype, first.device)]
    for weight, bias in params if with_output else params[:-1]:
        if dtype is not None:
            weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        gammas.append(gamma_forward(weight, bias, *gammas[-1], p))
    return gammas


def _chain_log_path_norm_pow(chain: DenseChain, p: float) -> Tensor:
    """Differentiable ``log(phi_p^p)`` in float64."""
    v, s = chain_gamma_in(chain, p)[-1]
    return s + v.sum().double().log()


def _chain_kappas(chain: DenseChain, p: float) -> Dict[str, Tensor]:
    with torch.no_grad():
        gin = chain_gamma_in(chain, p, dtype=torch.float64)
        last = chain.layers[-1].weight
        gout = unit_gamma(last.shape[0], torch.float64, last.device)
        kappas: Dict[int, Tensor] = {}  # by id(parameter)
        for layer, (v_in, s_in) in zip(reversed(chain.layers), reversed(gin[:-1])):
            v_out, s_out = gout
            kappas[id(layer.weight)] = torch.outer(v_out, v_in) * (s_out + s_in).exp()
            if layer.bias is not None:
                kappas[id(layer.bias)] = v_out * s_out.exp()
            gout = reference.gamma_backward(layer.weight.double(), v_out, s_out, p)
    return {name: kappas[id(t)] for name, t in chain.named_parameters().items()}  # model order


def path_norm(model: nn.Module, p: float = 2, input_shape: Optional[Tuple[int, ...]] = None) -> Tensor:
    """The path norm ``phi_p(w) = (sum over input/bias -> output paths of prod |w_e|^p)^(1/p)``.

    A differentiable scalar (usable as a regularizer) in the parameters' opmath dtype.
    """
    check_p(p)
    graph = build_path_graph(model, input_shape)
    dtype = reference.opmath_dtype(next(iter(graph.named_parameters().values())).dtype)
    if isinstance(graph, DenseChain):
        return (_chain_log_path_norm_pow(graph, p) / p).exp().to(dtype)
    graph.check_mode(set())
    total = graph.evaluate(p, frozenset(), differentiable=True, need_grads=False).total
    return total.pow(1.0 / p).to(dtype)


def path_scales(model: nn.Module, p: float = 2, input_shape: Optional[Tuple[int, ...]] = None) -> Dict[str, Tensor]:
    """``{parameter name: kappa}``, kappa shaped like the parameter, in float64.

    ``kappa_e`` is the sum over paths through edge e of the product of the other
    edges' ``|w|^p`` (``= d phi_p^p / d |w_e|^p``); float64 so it does not overflow
    where the parameters' dtype would.
    """
    check_p(p)
    graph = build_path_graph(model, input_shape)
    if isinstance(graph, DenseChain):
        return _chain_kappas(graph, p)
    graph.check_mode(set())
    kappas = graph.evaluate(p, frozenset()).kappas
    return {name: kappas[name] for name in graph.named_parameters()}


def check_support(model: nn.Module, input_shape: Optional[Tuple[int, ...]] = None) -> List[str]:
    """Every reason ``model`` cannot be handled by :class:`~pathsgd.PathSGD` / :func:`path_norm`, without raising.

    Each entry names the module (or function, or parameter), says why it breaks node-rescaling
    invariance or cannot be placed on the path graph, and what is supported. ``[]`` when the model
    is supported. BatchNorm in training mode is reported (the optimizer checks it at every step);
    ``input_shape`` (without the batch dim), when given, is checked against the model. The errors
    of ``PathSGD`` and ``path_norm`` name the first of these reasons.
    """
    from .dag import GeneralGraph, UnsupportedModelError
    from .graph import _trace, strip_output_transforms, unwrap_model

    try:
        model = unwrap_model(model)
        gm, prefix = _trace(model)
    except ValueError as exc:  # sharded, or not traceable: nothing further can be read
        return [str(exc)]
    strip_output_transforms(gm)
    try:
        GeneralGraph(model, gm, input_shape, prefix, shape_optional=True)
    except UnsupportedModelError as exc:
        return exc.problems
    except ValueError as exc:  # the input shape
        return [str(exc)]
    return []
