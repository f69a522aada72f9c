"""Pure-PyTorch twin of every compiled op in ``csrc/``.

Same names, same signatures, same semantics as ``torch.ops.pathsgd.*``. It is
the fallback backend when the extension is not built (or
``PATHSGD_BACKEND=reference``) and the oracle the kernel tests compare against.
It favours obviousness over memory: ``fused_dense_step_`` materializes kappa
here, which the compiled kernels never do.

Notation (README, "How it works"): ``a_e = |w_e|^p``; a gamma vector is stored as
``(gamma, log_scale)`` with true value ``gamma * exp(log_scale)`` and ``gamma``
normalized to a maximum in [1, 2] (or all zero), so deep networks stay in range.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sgd_params import SgdParams


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic for parameters of ``dtype`` (float32 for half types)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def abs_pow(w: Tensor, p: float) -> Tensor:
    """``|w|^p``, exact for p=1 and p=2; for p=0 the indicator ``w != 0`` (a zero weight cuts its paths)."""
    if p == 2:
        return w * w
    if p == 1:
        return w.abs()
    if p == 0:
        return (w != 0).to(w.dtype)
    return w.abs().pow(p)


def const_pow(c: float, p: float) -> float:
    """``|c|^p`` of a constant edge (``c != 0`` for p=0, like :func:`abs_pow`)."""
    return float(c != 0) if p == 0 else abs(float(c)) ** p


def abs_pow_list(ws: List[Tensor], p: float) -> List[Tensor]:
    """``[|w|^p for w in ws]`` as new tensors, with one foreach op per list."""
    if p == 2:
        return torch._foreach_mul(ws, ws)
    out = torch._foreach_abs(ws)
    if p == 0:
        torch._foreach_sign_(out)  # 1 where w != 0
    elif p != 1:
        torch._foreach_pow_(out, p)
    return out


def abs_pow_list_(ws: List[Tensor], p: float) -> None:
    """``w <- |w|^p`` for every ``w`` in ``ws``, in place, with one foreach op per list."""
    if p == 2:
        torch._foreach_mul_(ws, ws)
        return
    torch._foreach_abs_(ws)
    if p == 0:
        torch._foreach_sign_(ws)  # 1 where w != 0
    elif p != 1:
        torch._foreach_pow_(ws, p)


def to_log_scaled(gamma: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """A non-negative float64 gamma vector as a (normalized ``dtype`` vector, float64 log scale)
    pair; an all-zero vector stays zero (the clamp only avoids 0/0)."""
    scale = gamma.amax().clamp_min(torch.finfo(torch.float64).tiny)
    return (gamma / scale).to(dtype), scale.log()


def from_log_scaled(gamma: Tuple[Tensor, Tensor], device: torch.device) -> Tensor:
    """The float64 values of a log-scaled gamma vector."""
    v, s = gamma
    return v.to(device, torch.float64, copy=True).mul_(s.to(device).exp())


def normalize_log_scaled(y: Tensor, log_scale: Tensor, addend: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Rescale ``y * exp(log_scale) + addend`` to ``(v, t)`` with ``max(v)`` in [1, 2] (addend float64).

    An all-zero result is returned as zeros with log scale 0.
    """
    ninf = torch.tensor(-math.inf, dtype=torch.float64, device=y.device)
    y_max = y.amax().double() if y.numel() else ninf.exp()
    log_y = torch.where(y_max > 0, log_scale + y_max.log(), ninf)
    if addend is not None:
        add_max = addend.amax().double()
        log_add = torch.where(add_max > 0, add_max.log(), ninf)
    else:
        log_add = ninf
    t = torch.maximum(log_y, log_add)
    t = torch.where(torch.isinf(t), torch.zeros_like(t), t)
    # y / y_max * exp(log_y - t): the factor is <= 1, so a tiny (subnormal) y_max cannot overflow it
    # as exp(log_scale - t) = exp(-log(y_max)) would.
    safe_max = torch.where(y_max > 0, y_max, torch.ones_like(y_max))
    v = (y.double() / safe_max * (log_y - t).exp()).to(y.dtype)
    if addend is not None:  # float64: |b|^p may be out of float32 range where b is not
        safe_add = torch.where(add_max > 0, add_max, torch.ones_like(add_max))
        v = (v.double() + addend.double() / safe_add * (log_add - t).exp()).to(y.dtype)
    # An all-zero input must stay exactly zero (exp(log_scale - 0) could be inf).
    v = torch.where(log_y.isinf() & log_add.isinf(), torch.zeros_like(v), v)
    return v, t


def gamma_forward(weight: Tensor, bias: Optional[Tensor], gamma_in: Tensor, gamma_in_log_scale: Tensor,
                  p: float) -> Tuple[Tensor, Tensor]:
    """Normalized ``|W|^p (gamma_in * exp(s)) + |b|^p`` of a dense layer (W is out x in)."""
    opmath = opmath_dtype(weight.dtype)
    y = abs_pow(weight.to(opmath), p) @ gamma_in
    addend = abs_pow(bias.double(), p) if bias is not None else None
    return normalize_log_scaled(y, gamma_in_log_scale, addend)


def gamma_backward(weight: Tensor, gamma_out: Tensor, gamma_out_log_scale: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    """Normalized ``|W|^pT (gamma_out * exp(s))``: gamma_out of a dense layer's input."""
    opmath = opmath_dtype(weight.dtype)
    return normalize_log_scaled(abs_pow(weight.to(opmath), p).t() @ gamma_out, gamma_out_log_scale)


def kappa_pow(kappa: Tensor, p: float) -> Tensor:
    """``kappa^(2/p)``."""
    return kappa if p == 2 else kappa.pow(2.0 / p)


def sgd_update_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], kappa_pow_: Tensor,
                sgd: SgdParams) -> None:
    """torch.optim.SGD's update on ``g / max(kappa_pow_, eps)``, then clamp; in opmath precision."""
    opmath = opmath_dtype(param.dtype)
    w = param.to(opmath)
    g = grad.to(opmath)
    if sgd.maximize:
        g = -g
    d = g / kappa_pow_.to(opmath).clamp_min(sgd.eps)
    if sgd.weight_decay != 0:
        d = d + sgd.weight_decay * w
    if sgd.momentum != 0:
        if sgd.first_step:
            buf = d
        else:
            buf = sgd.momentum * momentum_buffer.to(opmath) + (1 - sgd.dampening) * d
        momentum_buffer.copy_(buf)
        d = d + sgd.momentum * buf if sgd.nesterov else buf
    lr = sgd.lr.to(device=param.device, dtype=opmath) if isinstance(sgd.lr, Tensor) else sgd.lr
    w = w - lr * d
    if sgd.clamp_min is not None or sgd.clamp_max is not None:
        w = w.clamp(sgd.clamp_min, sgd.clamp_max)
    param.copy_(w)


def fused_dense_step_(weight: Tensor, grad: Optional[Tensor], momentum_buffer: Optional[Tensor], gamma_in: Tensor,
                      gamma_in_log_scale: Tensor, gamma_out: Tensor, gamma_out_log_scale: Tensor, p: float,
                      sgd: SgdParams) -> Tuple[Tensor, Tensor]:
    """Normalized ``|W_old|^pT gamma_out`` and, if ``grad`` is given, the Path-SGD update of W.

    ``kappa_ij = gamma_out_i * gamma_in_j * exp(s_out + s_in)``.
    """
    gamma_prev = gamma_backward(weight, gamma_out, gamma_out_log_scale, p)  # from the old weights
    if grad is not None:
        log_scale = gamma_in_log_scale + gamma_out_log_scale
        # Built in float64 as exp(2/p * log kappa) so an out-of-range gamma does not overflow.
        log_kappa = (torch.outer(gamma_out.double().log(), torch.ones_like(gamma_in, dtype=torch.float64))
                     + gamma_in.double().log().unsqueeze(0) + log_scale)
        sgd_update_(weight, grad, momentum_buffer, (log_kappa * (2.0 / p)).exp(), sgd)
    return gamma_prev


def dense_chain_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                      bias_layers: List[int], gamma0: List[Tensor], p: float, sgd: SgdParams) -> None:
    """The Path-SGD step of a chain of dense layers ``y = W_l x + b_l``, composed of the per-layer ops.
    ``params``: every weight ``W_0 .. W_{L-1}``, then the biases of ``bias_layers``; ``grads`` and
    ``momentum_buffers`` (empty without momentum) in the same order; ``gamma0``: empty, or the chain's
    input gamma as a float64 vector, taken as the pair ``(gamma0 / s, log s)`` with
    ``s = max(max(gamma0), tiny)``:

        gamma_in(0) = gamma0 (default ones), gamma_in(l+1) = gamma_forward(W_l, b_l, gamma_in(l))
        gamma_out = 1; for l = L-1 .. 0:  kappa(b_l) = gamma_out;
                                          gamma_out = fused_dense_step_(W_l, gamma_in(l), gamma_out)
        scaled_sgd_update_(biases, kappa(b))

    A given ``gamma0`` is then overwritten with the float64 values of the gamma_out at the chain input
    (``|W|^pT`` products of the old weights): what the part of the model before the chain needs.
    """
    layers = len(params) - len(bias_layers)
    weights, biases = params[:layers], params[layers:]
    weight_grads, bias_grads = grads[:layers], grads[layers:]
    weight_buffers, bias_buffers = momentum_buffers[:layers], momentum_buffers[layers:]
    given = gamma0[0] if gamma0 else None
    gamma0, gamma0_log_scale = (None, None) if given is None else to_log_scaled(given, opmath_dtype(params[0].dtype))
    bias_of = dict(zip(bias_layers, biases))
    first, last = weights[0], weights[-1]
    if gamma0 is None:
        gamma0 = torch.ones(first.shape[1], dtype=opmath_dtype(first.dtype), device=first.device)
        gamma0_log_scale = torch.zeros((), dtype=torch.float64, device=first.device)
    gamma_in = [(gamma0, gamma0_log_scale)]
    for w in weights[:-1]:
        v, s = gamma_in[-1]
        gamma_in.append(gamma_forward(w, bias_of.get(len(gamma_in) - 1), v.to(opmath_dtype(w.dtype)), s, p))
    gamma_out = (torch.ones(last.shape[0], dtype=opmath_dtype(last.dtype), device=last.device),
                 torch.zeros((), dtype=torch.float64, device=last.device))
    kappas = {}
    for index in reversed(range(len(weights))):
        if index in bias_of:
            kappas[index] = gamma_out[0].double() * gamma_out[1].exp()
        w = weights[index]
        buffer = weight_buffers[index] if sgd.momentum != 0 else None
        (v_in, s_in), (v_out, s_out) = gamma_in[index], gamma_out
        gamma_out = fused_dense_step_(w, weight_grads[index], buffer, v_in.to(opmath_dtype(w.dtype)), s_in,
                                      v_out.to(opmath_dtype(w.dtype)), s_out, p, sgd)
    scaled_sgd_update_(biases, bias_grads, bias_buffers, [kappas[i] for i in bias_layers], p, sgd)
    if given is not None:
        given.copy_(from_log_scaled(gamma_out, given.device))


def scaled_sgd_update_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                       kappas: List[Tensor], p: float, sgd: SgdParams) -> None:
    """Path-SGD update of each param with its materialized float64 ``kappa``."""
    for i, (param, grad, kappa) in enumerate(zip(params, grads, kappas)):
        buf = momentum_buffers[i] if sgd.momentum != 0 else None
        sgd_update_(param, grad, buf, kappa_pow(kappa, p), sgd)


def clamp_(tensors: List[Tensor], lo: float, hi: float) -> None:
    """In-place ``t.clamp_(lo, hi)`` for every tensor."""
    if lo > hi:
        raise ValueError(f"pathsgd.clamp_: lo must be <= hi, got lo={lo}, hi={hi}")
    for t in tensors:
        t.clamp_(lo, hi)


def sum_pool_vjp(g: Tensor, x: Tensor, nd: int, args: Tuple[Tuple[int, ...], ...], ceil_mode: bool) -> Tensor:
    """``g . d sum_pool(x) / dx``: every input element gets the sum of g over its windows."""
    if nd == 1:
        return torch.ops.aten.avg_pool2d_backward(g.unsqueeze(-2), x.unsqueeze(-2), *args, ceil_mode, True,
                                                  1).squeeze(-2)
    backward = torch.ops.aten.avg_pool2d_backward if nd == 2 else torch.ops.aten.avg_pool3d_backward
    return backward(g, x, *args, ceil_mode, True, 1)


# Instruction codes of the abs_pow_forward and abs_pow_vjp programs (enum Rule in
# csrc/abs_pow_programs.cpp). LOCAL is Python-only: the compiled op does not run programs that contain it.
VJP_CONV, VJP_LINEAR, VJP_ALIAS, VJP_RESHAPE, VJP_ADD, VJP_SCALE, VJP_SUMPOOL, VJP_LOCAL = range(8)


def sum_pool(x: Tensor, nd: int, kernel: List[int], stride: List[int], padding: List[int], ceil_mode: bool) -> Tensor:
    """Window sums (zero padding) with lifted arguments (1-D pools run as 2-D ones), as pooling.sum_pool."""
    if nd == 1:
        return torch.ops.aten.avg_pool2d(x.unsqueeze(-2), kernel, stride, padding, ceil_mode, True, 1).squeeze(-2)
    pool = torch.ops.aten.avg_pool2d if nd == 2 else torch.ops.aten.avg_pool3d
    return pool(x, kernel, stride, padding, ceil_mode, True, 1)


def abs_pow_forward(input: Tensor, leaves: List[Tensor], program: List[int], factors: List[float]) -> List[Tensor]:
    """The abs-pow network's forward: one value per instruction of ``program`` (input to output).

    Operands ``src`` (and ``a``, ``b``) index earlier instructions' values; -1 is ``input``.
    weight/bias are leaf indices (-1: none). An identity unit (ReLU, ...) has no instruction: it
    shares its input's value. Every value is a new tensor (no output aliases another one or an input).

        CONV    src weight bias nd stride[nd] padding[nd] dilation[nd] groups
        LINEAR  src weight bias
        RESHAPE src n shape[n]      (a copy in the static shape)
        ADD     a b                 (a + b, broadcast)
        SCALE   src factor          (multiplication by a constant: edge |c|^p = factors[factor])
        SUMPOOL src nd kernel[l] stride[l] padding[l] ceil_mode   (l = 2 for nd = 1: window sums)
    """
    out: List[Tensor] = []
    pos = 0

    def take(n: int = 1) -> List[int]:
        nonlocal pos
        pos += n
        return list(program[pos - n:pos])

    def value(i: int) -> Tensor:
        return input if i < 0 else out[i]

    while pos < len(program):
        rule, src = take(2)
        x = value(src)
        if rule == VJP_CONV:
            w, b, nd = take(3)
            stride, padding, dilation, (groups,) = take(nd), take(nd), take(nd), take()
            out.append(torch.ops.aten.convolution(x, leaves[w], leaves[b] if b >= 0 else None, stride, padding,
                                                  dilation, False, [0] * nd, groups))
        elif rule == VJP_LINEAR:
            w, b = take(2)
            out.append(torch.ops.aten.linear(x, leaves[w], leaves[b] if b >= 0 else None))
        elif rule == VJP_RESHAPE:
            out.append(x.reshape(take(take()[0])).clone())
        elif rule == VJP_ADD:
            out.append(x + value(take()[0]))
        elif rule == VJP_SCALE:
            out.append(x * factors[take()[0]])
        elif rule == VJP_SUMPOOL:
            nd = take()[0]
            lifted = 2 if nd == 1 else nd
            kernel, stride, padding, (ceil_mode,) = take(lifted), take(lifted), take(lifted), take()
            out.append(sum_pool(x, nd, kernel, stride, padding, bool(ceil_mode)))
        else:
            raise ValueError(f"abs_pow_forward: unknown rule {rule} at position {pos - 2}")
    return out

LocalVjp = Callable[[int, Tensor], List[Tuple[int, Tensor]]]


def abs_pow_vjp(values: List[Tensor], leaves: List[Tensor], seeds: List[Tensor], seed_slots: List[int],
                program: List[int], factors: List[float], local_vjp: Optional[LocalVjp] = None) -> List[Tensor]:
    """The abs-pow network's backward: ``d (seeds . outputs) / d leaf`` for every ``|w|^p`` leaf.

    ``values[s]`` is the forward value of slot s; the gradient of ``seed_slots[i]`` starts at
    ``seeds[i]``. ``program`` lists, output side first, one instruction per node:

        CONV    node src weight bias need_x nd stride[nd] padding[nd] dilation[nd] groups
        LINEAR  node src weight bias need_x
        ALIAS   node src            (identity, e.g. ReLU: the abs-pow network drops it)
        RESHAPE node src
        ADD     node n src[n]       (each branch gets the gradient, summed over broadcast dims)
        SCALE   node src factor     (multiplication by a constant: edge |c|^p = factors[factor])
        SUMPOOL node src nd kernel[l] stride[l] padding[l] ceil_mode   (l = 2 for nd = 1)
        LOCAL   node index          (Python only: ``local_vjp(index, g)`` -> [(src, grad)]; a negative src
                                     -1 - k is the kappa of leaf k, for layers without a compiled rule)

    weight/bias are leaf indices (-1: none). A leaf no gradient reaches gets zeros; a leaf
    used by several instructions (a module called twice) sums its gradients.
    """
    grads: List[Optional[Tensor]] = [None] * len(values)
    kappas: List[Optional[Tensor]] = [None] * len(leaves)

    def push(slot: int, g: Tensor) -> None:
        grads[slot] = g if grads[slot] is None else grads[slot] + g

    def add_kappa(index: int, g: Tensor) -> None:
        if index >= 0:
            kappas[index] = g if kappas[index] is None else kappas[index] + g

    for slot, seed in zip(seed_slots, seeds):
        push(slot, seed)
    pos = 0

    def take(n: int = 1) -> List[int]:
        nonlocal pos
        pos += n
        return list(program[pos - n:pos])

    while pos < len(program):
        rule, node = take(2)
        gy, grads[node] = grads[node], None
        if rule in (VJP_CONV, VJP_LINEAR):
            src, w, b, need_x = take(4)
            x, weight = values[src], leaves[w]
            if rule == VJP_CONV:
                nd = take()[0]
                stride, padding, dilation, (groups,) = take(nd), take(nd), take(nd), take()
                if gy is None:
                    continue
                gx, gw, gb = torch.ops.aten.convolution_backward(
                    gy, x, weight, [weight.shape[0]] if b >= 0 else None, stride, padding, dilation, False,
                    [0] * nd, groups, [bool(need_x), True, b >= 0])
            else:
                if gy is None:
                    continue
                g2 = gy.reshape(-1, gy.shape[-1])
                gx = gy @ weight if need_x else None
                gw, gb = g2.t() @ x.reshape(-1, x.shape[-1]), g2.sum(0) if b >= 0 else None
            add_kappa(w, gw)
            add_kappa(b, gb)
            if need_x:
                push(src, gx)
        elif rule in (VJP_ALIAS, VJP_RESHAPE):
            (src,) = take()
            if gy is not None:
                push(src, gy if rule == VJP_ALIAS else gy.reshape(values[src].shape))
        elif rule == VJP_ADD:
            srcs = take(take()[0])
            for src in srcs if gy is not None else ():
                push(src, gy.sum_to_size(values[src].shape))
        elif rule == VJP_SCALE:
            src, factor = take(2)
            if gy is not None:
                push(src, gy * factors[factor])
        elif rule == VJP_SUMPOOL:
            src, nd = take(2)
            lifted = 2 if nd == 1 else nd
            kernel, stride, padding, (ceil_mode,) = take(lifted), take(lifted), take(lifted), take()
            if gy is None:
                continue
            push(src, sum_pool_vjp(gy, values[src], nd, (kernel, stride, padding), bool(ceil_mode)))
        elif rule == VJP_LOCAL:
            (index,) = take()
            if gy is not None:
                if local_vjp is None:
                    raise ValueError("abs_pow_vjp: the program has a LOCAL instruction but no local_vjp")
                for src, g in local_vjp(index, gy):
                    if src < 0:
                        add_kappa(-1 - src, g)
                    else:
                        push(src, g)
        else:
            raise ValueError(f"abs_pow_vjp: unknown rule {rule} at position {pos - 2}")
    return [k if k is not None else torch.zeros_like(t) for k, t in zip(kappas, leaves)]


def trunk_layout(trunk: int, input_shape: Sequence[int], stop_value: int, stop_slot: int, bias_layers: List[int],
                 forward_program: List[int], slot_values: List[int], vjp_program: List[int]) -> List[int]:
    """``trunk_chain_step_``'s ``layout``: one int list (one argument to convert a step)

        [trunk, len(input_shape), *input_shape, stop_value, stop_slot, len(bias_layers), *bias_layers,
         len(forward_program), *forward_program, len(slot_values), *slot_values, *vjp_program]

    ``trunk``: how many of the op's params are the trunk's (leaf order, first); ``input_shape``: the
    abs-pow network's all-ones input; ``stop_value``: the forward output at the head's input (-1: the
    input); ``stop_slot``: its slot in the VJP program; ``slot_values``: the forward output of each VJP
    slot (-1: the input); ``bias_layers``: the head's, as ``dense_chain_step_``."""
    return [trunk, len(input_shape), *input_shape, stop_value, stop_slot, len(bias_layers), *bias_layers,
            len(forward_program), *forward_program, len(slot_values), *slot_values, *vjp_program]


def _read_trunk_layout(layout: List[int]) -> Dict[str, Any]:
    """:func:`trunk_layout`'s fields from its list."""
    pos = 0

    def take(n: int) -> List[int]:
        nonlocal pos
        pos += n
        return list(layout[pos - n:pos])

    trunk, (ndim,) = take(1)[0], take(1)
    fields: Dict[str, Any] = {"trunk": trunk, "input_shape": take(ndim)}
    fields["stop_value"], fields["stop_slot"] = take(2)
    fields["bias_layers"] = take(take(1)[0])
    fields["forward_program"] = take(take(1)[0])
    fields["slot_values"] = take(take(1)[0])
    fields["vjp_program"] = list(layout[pos:])
    return fields


def trunk_chain_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], layout: List[int],
                      factors: List[float], p: float, sgd: SgdParams) -> None:
    """The Path-SGD step of a conv net (a trunk of abs-pow programs, then a dense chain), composed of
    the ops: with ``T`` = the trunk's parameters (the first ``trunk`` of ``params``; ``layout``:
    :func:`trunk_layout`),

        leaves = |T|^p (float64);  values = abs_pow_forward(ones(input_shape), leaves)
        gamma = values[stop_value] (flattened);  dense_chain_step_(head, ..., gamma0=[gamma])
        kappa(T) = abs_pow_vjp(values, leaves, seed = gamma, now the head's gamma_out at its input)
        scaled_sgd_update_(T, kappa(T))
    """
    t = _read_trunk_layout(layout)
    n = t["trunk"]
    momentum = sgd.momentum != 0
    trunk, trunk_grads, trunk_buffers = params[:n], grads[:n], momentum_buffers[:n] if momentum else []
    leaves = [w.to(torch.float64, copy=True) for w in trunk]
    abs_pow_list_(leaves, p)
    ones = torch.ones(t["input_shape"], dtype=torch.float64, device=leaves[0].device)
    values = abs_pow_forward(ones, leaves, t["forward_program"], factors)

    def value(k: int) -> Tensor:
        return ones if k < 0 else values[k]

    slots = [value(k) for k in t["slot_values"]]
    gamma = value(t["stop_value"]).reshape(-1).clone()
    dense_chain_step_(params[n:], grads[n:], momentum_buffers[n:] if momentum else [], t["bias_layers"], [gamma], p,
                      sgd)
    stop = t["stop_slot"]
    kappas = abs_pow_vjp(slots, leaves, [gamma.reshape(slots[stop].shape)], [stop], t["vjp_program"], factors)
    scaled_sgd_update_(trunk, trunk_grads, trunk_buffers, kappas, p, sgd)
