"""The dense evaluator: path scales of a chain of Linear layers by the fused kernels.

For a dense chain with ``a = |w|^p``:

    gamma_in(0) = 1,  gamma_in(l) = |W_l|^p gamma_in(l-1) + |b_l|^p
    gamma_out(L) = 1, gamma_out(l-1) = |W_l|^pT gamma_out(l)
    phi_p(w)^p = sum(gamma_in(L)),  kappa(W_l)_ij = gamma_out(l)_i gamma_in(l-1)_j,  kappa(b_l)_i = gamma_out(l)_i

Gamma vectors are carried as (normalized vector, float64 log scale) pairs so deep networks
neither overflow nor underflow. The step (:func:`dense_step`) runs the gamma forward over all
layers, then one fused pass per layer, output to input, that reads W, grad and the momentum
buffer once, accumulates ``gamma_out(l-1)`` from the old weights and writes the update.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from .graph import DenseChain
from .reference import from_log_scaled
from .sgd_params import READ_ONLY

LogScaled = Tuple[Tensor, Tensor]  # (gamma normalized to max in [1, 2], float64 log scale)
# (group id, first step, device) -> [(update, float64 kappa)]: one multi-tensor update each
Batches = Dict[Tuple[int, bool, torch.device], List[Tuple[Any, Tensor]]]


def unit_gamma(n: int, dtype: torch.dtype, device: torch.device) -> LogScaled:
    """Gamma of input units or output units: all ones, log scale 0."""
    return torch.ones(n, dtype=dtype, device=device), torch.zeros((), dtype=torch.float64, device=device)


def on(gamma: LogScaled, weight: Tensor) -> LogScaled:
    """A gamma pair in the opmath dtype and on the device of ``weight`` (layers may differ)."""
    v, s = gamma
    device = weight.device
    if v.device == device and s.device == device and v.dtype == reference.opmath_dtype(weight.dtype):
        return gamma  # the usual case; .to() would cost a dispatch per vector
    return v.to(device=device, dtype=reference.opmath_dtype(weight.dtype)), s.to(device)


def chain_gamma_in(chain: DenseChain, p: float, gamma_forward: Callable = reference.gamma_forward,
                   dtype: Optional[torch.dtype] = None, gamma0: Optional[LogScaled] = None,
                   with_output: bool = True,
                   params: Optional[List[Tuple[Tensor, Optional[Tensor]]]] = None) -> List[LogScaled]:
    """``[gamma_in(0), ..., gamma_in(L)]``: the input gamma of every layer, then the output gamma
    (left out when ``with_output`` is False: a step needs only the layers' inputs).

    ``dtype`` casts the weights first (float64 for exact scales); by default the vectors are in
    the parameters' opmath dtype. ``gamma0`` is the chain's input gamma (default: all ones, the
    chain starts at the model input). ``params``: the layers' (weight, bias), when read already.
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


def log_path_norm_pow(chain: DenseChain, p: float) -> Tensor:
    """Differentiable ``log(phi_p^p)`` of a whole-model chain, in float64."""
    v, s = chain_gamma_in(chain, p)[-1]
    return s + v.sum().double().log()


def chain_kappas(chain: DenseChain, p: float) -> Dict[str, Tensor]:
    """``{parameter name: kappa}`` (float64, materialized) of a whole-model chain."""
    with torch.no_grad():
        gin = chain_gamma_in(chain, p, dtype=torch.float64)
        last = chain.layers[-1].weight
        gout = unit_gamma(last.shape[0], torch.float64, last.device)
        kappas: Dict[str, Tensor] = {}
        for layer, (v_in, s_in) in zip(reversed(chain.layers), reversed(gin[:-1])):
            v_out, s_out = gout
            kappas[layer.weight_name] = torch.outer(v_out, v_in) * (s_out + s_in).exp()
            if layer.bias_name is not None:
                kappas[layer.bias_name] = v_out * s_out.exp()
            gout = reference.gamma_backward(layer.weight.double(), v_out, s_out, p)
    named = [name for layer in chain.layers for name in (layer.weight_name, layer.bias_name) if name is not None]
    return {name: kappas[name] for name in named}  # model order


def gamma_out_pass(weight: Tensor, gamma_in: LogScaled, gamma_out: LogScaled, p: float) -> LogScaled:
    """``|W|^pT gamma_out`` (normalized) by the fused kernel's read-only pass (``gamma_in`` is not
    read, but shaped as the op needs)."""
    return ops.fused_dense_step_(weight, None, None, *gamma_in, *gamma_out, float(p), READ_ONLY)


def dense_step(chain: DenseChain, updates: Dict[Tensor, Any], bias_batches: Batches,
               gamma0: Optional[Dict[float, LogScaled]] = None,
               record: Optional[Dict[Tensor, Any]] = None) -> Dict[float, LogScaled]:
    """Fused Path-SGD step of a dense chain over the parameters in ``updates``.

    ``gamma0`` (per p) is the chain's input gamma when the chain is the head of a larger model;
    then the returned gamma_out at the chain input (per p, from the old weights) is what the rest
    of the model needs. Bias updates (materialized kappa, O(neurons)) go into ``bias_batches``, for
    the caller's multi-tensor update. ``record`` receives the kappa each parameter was updated with:
    a weight's ``(gamma_in, its log scale, gamma_out, its log scale)``, a bias's float64 kappa.
    """
    params = [(layer.weight, layer.bias) for layer in chain.layers]  # module attribute lookups are slow: once
    ps = sorted({u.p for u in updates.values()} | set(gamma0 or ()))
    gamma_in = {p: chain_gamma_in(chain, p, lambda w, b, v, s, p_: ops.gamma_forward(w, b, *on((v, s), w), p_),
                                  gamma0=gamma0[p] if gamma0 else None, with_output=False, params=params)
                for p in ps}
    last = params[-1][0]
    unit, unit_kappa = chain.output_unit(reference.opmath_dtype(last.dtype), last.device)
    gamma_out = {p: unit for p in ps}
    for index in reversed(range(len(params))):
        weight, bias = params[index]
        bias_update = updates.get(bias) if bias is not None else None
        if bias_update is not None:
            if index == len(params) - 1 and bias.device == last.device:
                kappa = unit_kappa  # the last layer's bias: kappa = gamma_out = 1
            else:
                kappa = from_log_scaled(on(gamma_out[bias_update.p], bias), bias.device)
            bias_update.prepare_buffer()
            if record is not None:
                record[bias] = kappa.clone()  # the last bias's kappa is a shared constant
            key = (id(bias_update.group), bias_update.first_step, bias.device)
            bias_batches.setdefault(key, []).append((bias_update, kappa))
        weight_update = updates.get(weight)
        # Read-only passes (other p values) must see the old weights: run them before the update.
        order = ps if len(ps) == 1 else sorted(ps, key=lambda p: weight_update is not None and weight_update.p == p)
        for p in order:
            update = weight_update if weight_update is not None and weight_update.p == p else None
            if update is None and index == 0 and gamma0 is None:
                continue  # nobody needs the gamma at the model input
            gammas = (on(gamma_in[p][index], weight), on(gamma_out[p], weight))
            if update is None:
                gamma_out[p] = gamma_out_pass(weight, *gammas, p)
                continue
            if record is not None:
                record[weight] = (*gammas[0], *gammas[1])
            gamma_out[p] = ops.fused_dense_step_(weight, update.grad, update.prepare_buffer(), *gammas[0],
                                                 *gammas[1], p, update.sgd())
    return gamma_out
