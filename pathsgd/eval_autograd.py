"""The autograd evaluator: the reference twin of :mod:`pathsgd.eval_tape`, and the differentiable
path norm of general graphs.

It runs the same forward rules of :data:`pathsgd.graph.OP_TABLE` with ``|w|^p`` leaves that
require grad, and backpropagates with ``torch.autograd.grad``: every kappa is materialized (no
dense kernels), which is obviously correct and slower. It is chosen explicitly, with
:func:`pathsgd.graph.use_evaluator`, and for convolutions with string padding (``'same'``), which
``convolution_backward`` cannot take.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, FrozenSet, Optional

import torch
from torch import Tensor

from .eval_tape import Activations, Kappas, layer_leaves
from .graph import RULES, PathGraph, PathNode, forward_values, log_abs_constant
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

    compiled = False  # no compiled programs: the step plan runs forward / backward

    def __init__(self, graph: PathGraph, stop: Optional[int], dense: FrozenSet[str] = frozenset()) -> None:
        self.graph, self.stop = graph, stop
        self.leaf_sources = layer_leaves(graph, stop, frozenset())  # every kappa materialized

    def forward(self, p: float) -> Activations:
        device = next(iter(self.graph.layers.values())).weight.device
        with torch.no_grad():
            values = abs_pow_list([layer.effective(kind).detach().to(device=device, dtype=torch.float64)
                                   for _, layer, kind in self.leaf_sources], p) if self.leaf_sources else []
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


def _log_abs(t: Tensor) -> Tensor:
    return t.abs().log()  # log 0 = -inf: a zero weight is on no path's maximum


def _max_linear(x: Tensor, log_w: Tensor, log_b: Optional[Tensor]) -> Tensor:
    """``y_i = max(max_j log|W_ij| + x_j, log|b_i|)`` over the last dim of x."""
    y = (x.unsqueeze(-2) + log_w).amax(-1)
    return torch.maximum(y, log_b) if log_b is not None else y


class _MaxPlusConv(torch.autograd.Function):
    """A convolution in the max-times semiring (log domain):
    ``y[o, pos] = max over (c, k) of log_w[o, c, k] + x[c, pos * stride + k * dilation]`` (within o's
    group). The forward keeps only the arg-max (one index per output), so memory stays at the size of
    the maps; the backward sends each output's gradient to its arg-max weight and input."""

    @staticmethod
    def forward(ctx, xp: Tensor, log_w: Tensor, stride, dilation, groups: int, out) -> Tensor:
        nd = len(out)
        cout, cin_g, kernel = log_w.shape[0], log_w.shape[1], log_w.shape[2:]
        cout_g = cout // groups
        xg = xp[0].reshape(groups, cin_g, *xp.shape[2:])            # (G, Cin/G, *padded)
        wg = log_w.reshape(groups, cout_g, cin_g, *kernel)           # (G, Cout/G, Cin/G, *k)
        best = torch.full((groups, cout_g, *out), float("-inf"), dtype=xp.dtype, device=xp.device)
        arg = torch.zeros((groups, cout_g, *out), dtype=torch.long, device=xp.device)  # offset * Cin/G + c
        offsets = list(itertools.product(*[range(k) for k in kernel]))
        for k, offset in enumerate(offsets):
            shifted = xg[(slice(None), slice(None)) + _window(offset, stride, dilation, out)]  # (G, Cin/G, *out)
            w = wg[(slice(None), slice(None), slice(None)) + offset]
            cand, c = (w.reshape(*w.shape, *([1] * nd)) + shifted.unsqueeze(1)).max(2)
            better = cand > best  # strict: the first maximum wins, as in torch.max
            best = torch.where(better, cand, best)
            arg = torch.where(better, c + k * cin_g, arg)
        ctx.save_for_backward(arg)
        ctx.meta = (xp.shape, log_w.shape, stride, dilation, groups, out, offsets)
        return best.reshape(1, cout, *out)

    @staticmethod
    def backward(ctx, gy: Tensor):
        (arg,) = ctx.saved_tensors
        x_shape, w_shape, stride, dilation, groups, out, offsets = ctx.meta
        cout, cin_g = w_shape[0], w_shape[1]
        cout_g = cout // groups
        gy = gy.reshape(groups, cout_g, *out)
        gx = torch.zeros((groups, cin_g, *x_shape[2:]), dtype=gy.dtype, device=gy.device)
        gw = torch.zeros((groups, cout_g, cin_g, len(offsets)), dtype=gy.dtype, device=gy.device)
        channel, which = arg % cin_g, arg // cin_g
        for k, offset in enumerate(offsets):
            g = torch.where(which == k, gy, torch.zeros_like(gy))
            window = (slice(None), slice(None)) + _window(offset, stride, dilation, out)
            gx[window] += torch.zeros((groups, cin_g, *out), dtype=gy.dtype, device=gy.device).scatter_add_(
                1, channel, g)
            gw[..., k] = torch.zeros((groups, cout_g, cin_g), dtype=gy.dtype, device=gy.device).scatter_add_(
                2, channel.flatten(2), g.flatten(2))
        return gx.reshape(x_shape), gw.reshape(w_shape), None, None, None, None


def _window(offset, stride, dilation, out) -> tuple:
    """The input positions a kernel offset reads for every output position (a strided slice)."""
    return tuple(slice(offset[d] * dilation[d], offset[d] * dilation[d] + stride[d] * (out[d] - 1) + 1, stride[d])
                 for d in range(len(out)))


def _pad_conv_input(x: Tensor, layer) -> tuple:
    """``(x padded with -inf (log 0: no edge), (left, right) padding per dim)`` of a convolution."""
    m = layer.module
    nd = len(m.kernel_size)
    if layer.padding == "valid":
        pads = [(0, 0)] * nd
    elif layer.padding == "same":  # torch pads the extra element of an odd total on the right
        reach = [m.dilation[d] * (m.kernel_size[d] - 1) for d in range(nd)]
        pads = [(r // 2, r - r // 2) for r in reach]
    else:
        pads = [(v, v) for v in layer.padding]
    flat = [v for d in reversed(range(nd)) for v in pads[d]]
    return (torch.nn.functional.pad(x, flat, value=float("-inf")) if any(flat) else x), pads


def _max_conv(x: Tensor, layer, log_w: Tensor, log_b: Optional[Tensor]) -> Tensor:
    """A convolution in the max-times semiring, padding as -inf (log 0: no edge)."""
    m = layer.module
    nd = len(m.kernel_size)
    xp, _ = _pad_conv_input(x, layer)
    out = tuple((xp.shape[2 + d] - m.dilation[d] * (m.kernel_size[d] - 1) - 1) // m.stride[d] + 1 for d in range(nd))
    y = _MaxPlusConv.apply(xp, log_w, tuple(m.stride), tuple(m.dilation), m.groups, out)
    if log_b is not None:
        y = torch.maximum(y, log_b.view(1, -1, *([1] * nd)))
    return y


def _max_conv_transpose(x: Tensor, layer, log_w: Tensor, log_b: Optional[Tensor]) -> Tensor:
    """A transposed convolution in the max-times semiring: input position i reaches output position
    ``i * stride + k * dilation - padding`` through kernel offset k (outputs no edge reaches stay -inf)."""
    m = layer.module
    nd = len(m.kernel_size)
    stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
    cin, spatial = x.shape[1], x.shape[2:]
    cin_g, cout_g = cin // groups, m.out_channels // groups
    out = [(spatial[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (m.kernel_size[d] - 1)
           + m.output_padding[d] + 1 for d in range(nd)]
    full_size = [max(padding[d] + out[d], (spatial[d] - 1) * stride[d] + dilation[d] * (m.kernel_size[d] - 1) + 1)
                 for d in range(nd)]
    xg = x[0].reshape(groups, cin_g, *spatial)
    wg = log_w.reshape(groups, cin_g, cout_g, *m.kernel_size)
    full = torch.full((groups, cout_g, *full_size), float("-inf"), dtype=x.dtype, device=x.device)
    for offset in itertools.product(*[range(k) for k in m.kernel_size]):
        w = wg[(slice(None), slice(None), slice(None)) + offset]                  # (G, Cin/G, Cout/G)
        cand = (w.reshape(*w.shape, *([1] * nd)) + xg.unsqueeze(2)).amax(1)      # (G, Cout/G, *in)
        full = _scatter_max(full, (slice(None), slice(None)) + _window(offset, stride, dilation, spatial), cand)
    crop = (slice(None), slice(None)) + tuple(slice(padding[d], padding[d] + out[d]) for d in range(nd))
    y = full[crop].reshape(1, m.out_channels, *out)
    if log_b is not None:
        y = torch.maximum(y, log_b.view(1, -1, *([1] * nd)))
    return y


def log_max_path_product(graph: PathGraph) -> Tensor:
    """``log phi_inf = log max over input/bias -> output paths of prod |w_e|``, in float64, by a
    forward max-propagation (the max-times semiring in log domain, so deep nets neither overflow
    nor underflow); differentiable almost everywhere (the subgradient through the arg-max path)."""
    device = next(iter(graph.layers.values())).weight.device

    def layer_forward(node: PathNode, x: Tensor) -> Tensor:
        layer = node.data
        x = x if x.device == device else x.to(device)
        log_w = _log_abs(layer.weight.to(device=device, dtype=torch.float64))
        log_b = _log_abs(layer.bias.to(device=device, dtype=torch.float64)) if layer.bias is not None else None
        if layer.transposed:
            return _max_conv_transpose(x, layer, log_w, log_b)
        if layer.conv:
            return _max_conv(x, layer, log_w, log_b)
        return _max_linear(x, log_w, log_b)

    zeros = torch.zeros((1,) + graph.input_shape, dtype=torch.float64, device=device)  # log 1: the input units
    env = forward_values(graph, float("inf"), layer_forward, zeros, max_times=True)
    return torch.stack([env[i].amax() for i in graph.outputs]).amax()


# ---- kappa at p = inf: the largest product over the paths through each weight, excluding it ------------------
def _max_to_size(t: Tensor, shape) -> Tensor:
    """The max-times counterpart of ``sum_to_size``: max over the dims ``t`` was broadcast along."""
    shape = tuple(shape)
    while t.dim() > len(shape):
        t = t.amax(0)
    dims = [d for d, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.amax(dims, keepdim=True) if dims else t


def _scatter_max(target: Tensor, window: tuple, values: Tensor) -> Tensor:
    """``target[window] = max(target[window], values)`` without writing into a tensor still in use."""
    out = target.clone()
    out[window] = torch.maximum(target[window], values)
    return out


def _unpool_max(b: Tensor, in_shape, kernel, stride, padding, dilation) -> Tensor:
    """Every input position gets the max of ``b`` over the windows that contain it (padding dropped)."""
    nd = len(kernel)
    out = b.shape[-nd:]
    spatial = in_shape[-nd:]
    size = [max(spatial[d] + 2 * padding[d], padding[d] + (out[d] - 1) * stride[d] + dilation[d] * (kernel[d] - 1) + 1)
            for d in range(nd)]
    full = torch.full(tuple(b.shape[:-nd]) + tuple(size), float("-inf"), dtype=b.dtype, device=b.device)
    lead = (slice(None),) * (b.dim() - nd)
    for offset in itertools.product(*[range(k) for k in kernel]):
        full = _scatter_max(full, lead + _window(offset, stride, dilation, out), b)
    return full[lead + tuple(slice(padding[d], padding[d] + spatial[d]) for d in range(nd))]


def _selection_transpose(node: PathNode, env, b: Tensor) -> Dict[int, Tensor]:
    """For ops whose every output element copies one input element (cat, slicing, permute, circular
    padding): every input element gets the max of ``b`` over its copies (index tracking)."""
    out: Dict[int, Tensor] = {}
    rule = RULES[node.kind]
    for i in dict.fromkeys(node.inputs):
        if not isinstance(env[i], Tensor):
            continue
        local = {j: env[j] for j in node.refs}
        for j in node.inputs:
            local[j] = torch.full(env[j].shape, -1.0, dtype=torch.float64, device=env[j].device)
        local[i] = torch.arange(env[i].numel(), dtype=torch.float64, device=env[i].device).reshape(env[i].shape)
        index = rule.forward(node, local, float("inf"))
        keep = index >= 0
        target = torch.full((env[i].numel(),), float("-inf"), dtype=b.dtype, device=b.device)
        target = target.scatter_reduce(0, index[keep].long(), b.expand(index.shape)[keep], "amax")
        out[i] = target.reshape(env[i].shape)
    return out


def _sum_transpose(node: PathNode, env, b: Tensor) -> Optional[Dict[int, Tensor]]:
    """``torch.sum`` / ``.sum``: every input element reaches its output element (broadcast back)."""
    call = node.data
    if not ((not call.method and call.target is torch.sum) or (call.method and call.target == "sum")):
        return None
    x = env[node.inputs[0]]
    args = [a for a in call.args[1:]]
    dims = call.kwargs.get("dim", args[0] if args else None)
    keepdim = call.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dims is None:
        return {node.inputs[0]: b.reshape(()).expand(x.shape)}
    dims = [d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
    if not keepdim:
        for d in sorted(dims):
            b = b.unsqueeze(d)
    return {node.inputs[0]: b.expand(x.shape)}


def max_path_scales(graph: PathGraph) -> Dict[str, Tensor]:
    """``{parameter name: kappa}`` at p = inf: for each weight, the largest product of |w| over the other
    edges of the paths through it (over all its edges for a shared weight), in float64, by a forward and a
    backward max-propagation in log domain."""
    from . import pooling
    from .graph import (ADAPTIVE, ADD, ALIAS, AVGPOOL, BATCHNORM, INPUT, LAYER, MEAN, RESHAPE, SCALE, SHAPE_QUERY,
                        SUMPOOL, batchnorm_constants)
    device = next(iter(graph.layers.values())).weight.device
    logs = {}
    for layer in graph.layers.values():
        logs[layer.weight_name] = _log_abs(layer.weight.detach().to(device=device, dtype=torch.float64))
        if layer.bias_name is not None:
            logs[layer.bias_name] = _log_abs(layer.bias.detach().to(device=device, dtype=torch.float64))

    def layer_forward(node: PathNode, x: Tensor) -> Tensor:
        layer = node.data
        lb = logs[layer.bias_name] if layer.bias_name is not None else None
        if layer.transposed:
            return _max_conv_transpose(x, layer, logs[layer.weight_name], lb)
        if layer.conv:
            return _max_conv(x, layer, logs[layer.weight_name], lb)
        return _max_linear(x, logs[layer.weight_name], lb)

    with torch.no_grad():
        zeros = torch.zeros((1,) + graph.input_shape, dtype=torch.float64, device=device)
        env = forward_values(graph, float("inf"), layer_forward, zeros, max_times=True)
        back: Dict[int, Tensor] = {}

        def send(i: int, value: Tensor) -> None:
            back[i] = value if i not in back else torch.maximum(back[i], value)

        for i in graph.outputs:
            send(i, torch.zeros_like(env[i]))
        kappa: Dict[str, Tensor] = {}

        def keep(name: str, value: Tensor) -> None:
            kappa[name] = value if name not in kappa else torch.maximum(kappa[name], value)

        for node in reversed(graph.nodes):
            b = back.pop(node.index, None)
            if b is None or node.kind in (INPUT, SHAPE_QUERY):
                continue
            x = env[node.inputs[0]] if node.inputs else None
            kind = node.kind
            if kind == LAYER:
                layer, m = node.data, node.data.module
                lw = logs[layer.weight_name]
                if layer.bias_name is not None:
                    bias_b = b.amax(dim=[d for d in range(b.dim()) if d != (1 if layer.conv else b.dim() - 1)])
                    keep(layer.bias_name, bias_b)
                if not layer.conv:
                    keep(layer.weight_name, (b.unsqueeze(-1) + x.unsqueeze(-2)).reshape(-1, *lw.shape).amax(0))
                    send(node.inputs[0], (b.unsqueeze(-1) + lw).amax(-2))
                    continue
                nd = len(m.kernel_size)
                groups = m.groups
                if layer.transposed:
                    cin, spatial = x.shape[1], x.shape[2:]
                    cin_g, cout_g = cin // groups, m.out_channels // groups
                    pad = m.padding
                    full_size = [max(pad[d] + b.shape[2 + d], (spatial[d] - 1) * m.stride[d]
                                     + m.dilation[d] * (m.kernel_size[d] - 1) + 1) for d in range(nd)]
                    bfull = torch.full((1, m.out_channels, *full_size), float("-inf"), dtype=b.dtype, device=b.device)
                    bfull[(slice(None), slice(None)) + tuple(slice(pad[d], pad[d] + b.shape[2 + d])
                                                             for d in range(nd))] = b
                    bg = bfull[0].reshape(groups, cout_g, *full_size)
                    xg = x[0].reshape(groups, cin_g, *spatial)
                    wg = lw.reshape(groups, cin_g, cout_g, *m.kernel_size)
                    gin = torch.full((groups, cin_g, *spatial), float("-inf"), dtype=b.dtype, device=b.device)
                    kw = torch.empty_like(wg)
                    for offset in itertools.product(*[range(k) for k in m.kernel_size]):
                        window = (slice(None), slice(None)) + _window(offset, m.stride, m.dilation, spatial)
                        bs = bg[window]                                                     # (G, Cout/G, *in)
                        w = wg[(slice(None), slice(None), slice(None)) + offset]            # (G, Cin/G, Cout/G)
                        gin = torch.maximum(gin, (w.reshape(*w.shape, *([1] * nd)) + bs.unsqueeze(1)).amax(2))
                        kw[(slice(None), slice(None), slice(None)) + offset] = (
                            xg.unsqueeze(2) + bs.unsqueeze(1)).flatten(3).amax(3)
                    keep(layer.weight_name, kw.reshape(lw.shape))
                    send(node.inputs[0], gin.reshape(x.shape))
                    continue
                xp, pads = _pad_conv_input(x, layer)
                out = b.shape[2:]
                cin_g, cout_g = m.in_channels // groups, m.out_channels // groups
                xg = xp[0].reshape(groups, cin_g, *xp.shape[2:])
                bg = b[0].reshape(groups, cout_g, *out)
                wg = lw.reshape(groups, cout_g, cin_g, *m.kernel_size)
                gin = torch.full(xg.shape, float("-inf"), dtype=b.dtype, device=b.device)
                kw = torch.empty_like(wg)
                for offset in itertools.product(*[range(k) for k in m.kernel_size]):
                    window = (slice(None), slice(None)) + _window(offset, m.stride, m.dilation, out)
                    xs = xg[window]                                                       # (G, Cin/G, *out)
                    w = wg[(slice(None), slice(None), slice(None)) + offset]              # (G, Cout/G, Cin/G)
                    kw[(slice(None), slice(None), slice(None)) + offset] = (
                        bg.unsqueeze(2) + xs.unsqueeze(1)).flatten(3).amax(3)
                    gin = _scatter_max(gin, window, (w.reshape(*w.shape, *([1] * nd)) + bg.unsqueeze(2)).amax(1))
                keep(layer.weight_name, kw.reshape(lw.shape))
                crop = tuple(slice(pads[d][0], pads[d][0] + x.shape[2 + d]) for d in range(nd))
                send(node.inputs[0], gin.reshape(1, m.in_channels, *xp.shape[2:])[(slice(None), slice(None)) + crop])
            elif kind == ALIAS:
                send(node.inputs[0], b)
            elif kind == RESHAPE:
                send(node.inputs[0], b.reshape(x.shape))
            elif kind == ADD:
                for i in node.inputs:
                    send(i, _max_to_size(b, env[i].shape).expand(env[i].shape))
            elif kind == SCALE:
                send(node.inputs[0], b + log_abs_constant(node.data))
            elif kind in (SUMPOOL, AVGPOOL):
                if kind == SUMPOOL:
                    nd, (kernel, stride, padding), _, dilation = node.data
                else:
                    nd, kernel, stride, padding, ceil_mode, count_include_pad, divisor = node.data
                    b = b + pooling.avg_inv_divisor(x, nd, kernel, stride, padding, ceil_mode, count_include_pad,
                                                    divisor).log()
                    kernel, stride, padding = pooling.sum_pool_args(nd, kernel, stride, padding)
                    dilation = (1,) * len(kernel)
                lifted = b.unsqueeze(-2) if nd == 1 else b
                shape = tuple(x.unsqueeze(-2).shape if nd == 1 else x.shape)
                gin = _unpool_max(lifted, shape, kernel, stride, padding, dilation)
                send(node.inputs[0], gin.squeeze(-2) if nd == 1 else gin)
            elif kind == ADAPTIVE:
                nd, output_size, average = node.data
                gin = b
                for d in range(nd):
                    dim = gin.dim() - nd + d
                    L, O = x.shape[dim], gin.shape[dim]
                    rows = []
                    for pos in range(L):
                        cands = [o for o in range(O) if (o * L) // O <= pos < -((-(o + 1) * L) // O)]
                        part = gin.index_select(dim, torch.tensor(cands, device=gin.device))
                        if average:
                            sizes = torch.tensor([-((-(o + 1) * L) // O) - (o * L) // O for o in cands],
                                                 dtype=gin.dtype, device=gin.device)
                            view = [1] * gin.dim()
                            view[dim] = -1
                            part = part - sizes.log().view(view)
                        rows.append(part.amax(dim, keepdim=True))
                    gin = torch.cat(rows, dim)
                send(node.inputs[0], gin)
            elif kind == MEAN:
                dims, keepdim = node.data
                dims = tuple(range(x.dim())) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
                dims = sorted(d % x.dim() for d in dims)
                n = math.prod(x.shape[d] for d in dims)
                if not keepdim:
                    for d in dims:
                        b = b.unsqueeze(d)
                send(node.inputs[0], (b - math.log(n)).expand(x.shape))
            elif kind == BATCHNORM:
                scale, _ = batchnorm_constants(node.data, x.device)
                send(node.inputs[0], b + scale.abs().log().view((1, -1) + (1,) * (x.dim() - 2)))
            else:  # linear maps that select: cat, slicing, permute, circular padding; or a sum
                grads = _sum_transpose(node, env, b) if kind != "circular_pad" else None
                for i, g in (grads if grads is not None else _selection_transpose(node, env, b)).items():
                    send(i, g)
    named = graph.named_parameters()
    return {name: kappa[name].exp() if name in kappa else torch.zeros_like(logs[name]) for name in named}
