"""Window sums of the abs-pow network: what pooling layers become on gamma maps.

In the abs-pow network every edge weight ``c`` becomes ``|c|^p``:

* MaxPool -> a sum over each window (edges of weight 1). Max commutes with positive
  per-channel scaling, so this keeps node-rescaling invariance; it bounds the max-path set
  from above.
* AvgPool -> a window sum times ``divisor^-p`` (per window: padding and ``ceil_mode`` change it).
* AdaptiveAvgPool -> a window sum times ``size^-p`` of each (possibly uneven) window;
  AdaptiveMaxPool -> the window sum.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PoolArgs = Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]  # kernel, stride, padding


def as_tuple(v: Any, n: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def sum_pool_args(nd: int, kernel: Any, stride: Any, padding: Any) -> PoolArgs:
    """Kernel, stride, padding of a sum pool as tuples; 1-D pools go through 2-D (avg_pool1d
    has no divisor_override)."""
    kernel = as_tuple(kernel, nd)
    stride = as_tuple(stride if stride not in (None, []) else kernel, nd)
    padding = as_tuple(padding, nd)
    return ((1,) + kernel, (1,) + stride, (0,) + padding) if nd == 1 else (kernel, stride, padding)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling output length (a ceil_mode window must start inside the input or left padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def sum_pool(x: Tensor, nd: int, args: PoolArgs, ceil_mode: bool, dilation: Optional[Tuple[int, ...]] = None
             ) -> Tensor:
    """Sum over each pooling window (zero padding), with the arguments of :func:`sum_pool_args`
    (``dilation`` lifted like them)."""
    lifted = x.unsqueeze(-2) if nd == 1 else x
    if dilation is not None and any(d != 1 for d in dilation):
        return _dilated_sum_pool(lifted, args, ceil_mode, dilation).squeeze(-2) if nd == 1 else \
            _dilated_sum_pool(lifted, args, ceil_mode, dilation)
    pool = F.avg_pool2d if lifted.dim() == 4 else F.avg_pool3d
    y = pool(lifted, *args, ceil_mode, True, divisor_override=1)
    return y.squeeze(-2) if nd == 1 else y


def _dilated_sum_pool(x: Tensor, args: PoolArgs, ceil_mode: bool, dilation: Tuple[int, ...]) -> Tensor:
    """A dilated window sum: a depthwise convolution with a ones kernel, the input padded with zeros
    (on the right as far as ceil_mode's last window reaches)."""
    kernel, stride, padding = args
    n = len(kernel)
    spatial = x.shape[2:]
    out = [pool_output_size(spatial[d], kernel[d], stride[d], padding[d], dilation[d], ceil_mode) for d in range(n)]
    extra = [max(0, (out[d] - 1) * stride[d] + dilation[d] * (kernel[d] - 1) + 1 - spatial[d] - 2 * padding[d])
             for d in range(n)]
    xp = F.pad(x, [v for d in reversed(range(n)) for v in (padding[d], padding[d] + extra[d])])
    ones = torch.ones((x.shape[1], 1, *kernel), dtype=x.dtype, device=x.device)
    return (F.conv2d if n == 2 else F.conv3d)(xp, ones, None, stride, 0, dilation, x.shape[1])


def max_window(x: Tensor, nd: int, args: PoolArgs, ceil_mode: bool, dilation: Optional[Tuple[int, ...]] = None
               ) -> Tensor:
    """The largest entry of each pooling window (padding counts as -inf): a window sum in the
    max-times semiring (p = inf, log domain)."""
    dilation = dilation if dilation is not None else 1
    if nd == 1:
        return F.max_pool2d(x.unsqueeze(-2), *args, dilation, ceil_mode).squeeze(-2)
    return (F.max_pool2d if nd == 2 else F.max_pool3d)(x, *args, dilation, ceil_mode)


def avg_inv_divisor(x: Tensor, nd: int, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                    count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    """``1 / divisor`` of every average-pooling window (0 for a window with no input), taken
    from the layer itself, so padding rules are torch's."""
    user_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    extra = {} if nd == 1 else {"divisor_override": divisor_override}
    ones = torch.ones_like(x)
    avg_ones = user_pool(ones, kernel, stride if stride not in (None, []) else kernel, padding, ceil_mode,
                         count_include_pad, **extra)
    sum_ones = sum_pool(ones, nd, sum_pool_args(nd, kernel, stride, padding), ceil_mode)
    return torch.where(sum_ones > 0, avg_ones / sum_ones.clamp_min(1), torch.zeros_like(sum_ones))


def avg_pool(x: Tensor, p: float, nd: int, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
             count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    """An average pool of the abs-pow network: window sums times ``(1 / divisor)^p``."""
    inv_divisor = avg_inv_divisor(x, nd, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    window_sum = sum_pool(x, nd, sum_pool_args(nd, kernel, stride, padding), ceil_mode)
    return window_sum * (inv_divisor != 0).to(x.dtype) if p == 0 else window_sum * inv_divisor.pow(p)


def avg_pool_max(x: Tensor, nd: int, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                 count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    """An average pool in the max-times semiring (log domain): window max + log(1 / divisor)."""
    inv_divisor = avg_inv_divisor(x, nd, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return max_window(x, nd, sum_pool_args(nd, kernel, stride, padding), ceil_mode) + inv_divisor.log()


def adaptive_window_sizes(in_sizes: Sequence[int], out_sizes: Sequence[int], device: torch.device) -> Tensor:
    """Number of input elements of each adaptive-pooling window (product over dims)."""
    d = torch.ones((), dtype=torch.float64, device=device)
    for L, O in zip(in_sizes, out_sizes):
        i = torch.arange(O, dtype=torch.float64, device=device)
        size = torch.ceil((i + 1) * L / O) - torch.floor(i * L / O)
        d = d.unsqueeze(-1) * size
    return d


def adaptive_pool(x: Tensor, p: float, nd: int, output_size: Any, average: bool) -> Tensor:
    """Adaptive average (``average``) or max pool of the abs-pow network."""
    out_size = as_tuple(output_size, nd)
    out_size = tuple(x.shape[-nd + i] if o is None else o for i, o in enumerate(out_size))
    adaptive = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    d = adaptive_window_sizes(x.shape[-nd:], out_size, x.device)
    window_sum = adaptive(x, out_size) * d
    return window_sum * d.pow(-p) if average else window_sum


def adaptive_pool_max(x: Tensor, nd: int, output_size: Any, average: bool) -> Tensor:
    """Adaptive pooling in the max-times semiring (log domain): window max (+ log(1 / size))."""
    out_size = as_tuple(output_size, nd)
    out_size = tuple(x.shape[-nd + i] if o is None else o for i, o in enumerate(out_size))
    pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[nd]
    y = pool(x, out_size)
    return y - adaptive_window_sizes(x.shape[-nd:], out_size, x.device).log() if average else y
