"""General path graphs (issue 5): conv nets, pooling, residuals, concatenation, shared weights, eval BatchNorm.

The oracle here is independent of pathsgd's abs-pow network: :class:`Unrolled` builds the
explicit dense path graph of a network unit by unit, straight from the module definitions
(every conv output unit gets one explicit edge per input unit it reads, labelled with the index
of the shared weight it uses; pooling, skip, BatchNorm and constant-multiplication edges are
explicit constants), and :meth:`Unrolled.scales` enumerates every input-or-bias -> output path
of that graph and sums products of ``|w_e|^p`` in float64 (numpy). kappa of a weight is the sum
over all (path, edge using that weight) pairs of the product of the path's other edges, so a
shared weight (a convolution tap, a module called twice) sums over all of its edges.

Edge conventions (pathsgd/graph.py docstring): MaxPool is sum-pooling over its window
(edges of weight 1 from the real, non-padding units), AvgPool / AdaptiveAvgPool / mean have
constant edges ``1/d`` (d per PyTorch's divisor rules), residual additions and concatenation have
edges of weight 1, ``x * c`` an edge of weight c, eval-mode BatchNorm a per-channel edge
``a = gamma / sqrt(var + eps)`` and a constant bias edge ``beta - mean * a``.

The unrolled graph is itself checked against the torch forward pass (non-linearities replaced
by the identity, max pooling by sum pooling): it must compute the same linear function.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import functional

P_VALUES = (1, 2, 3)
RTOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (several threads only spin, and crawl on a busy machine).
    conftest.py's autouse fixture restores the thread count afterwards."""
    torch.set_num_threads(1)
    yield


# ================================================================================================================
# The independent oracle: explicit unit-level path graph + path enumeration
# ================================================================================================================

class Unrolled:
    """Explicit path graph of a network for one sample: units are ints, edges are (src, dst, key).

    ``key`` is ``(parameter name, index tuple)`` for a learnable weight or a Python float for
    a constant edge. Every bias edge comes from a bias-source unit (gamma_in = 1). Units are
    numbered in creation order and every edge goes from a lower to a higher number.
    """

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.n = 0
        self.src: List[int] = []
        self.dst: List[int] = []
        self.key: List[object] = []
        self.sources: List[int] = []
        self.bias_sources: List[int] = []
        self.inputs: Optional[np.ndarray] = None
        self.outputs: Optional[np.ndarray] = None
        self._paths: Optional[np.ndarray] = None

    # ---- construction ----------------------------------------------------------------------------------------
    def units(self, shape: Sequence[int]) -> np.ndarray:
        count = int(np.prod(shape))
        u = np.arange(self.n, self.n + count).reshape(tuple(shape))
        self.n += count
        return u

    def edge(self, s, d, key) -> None:
        s, d = int(s), int(d)
        assert s < d
        self.src.append(s)
        self.dst.append(d)
        self.key.append(key)

    def input(self, shape: Sequence[int]) -> np.ndarray:
        self.inputs = self.units(shape)
        self.sources.extend(self.inputs.ravel().tolist())
        return self.inputs

    def bias_source(self) -> int:
        u = int(self.units((1,))[0])
        self.sources.append(u)
        self.bias_sources.append(u)
        return u

    def output(self, y: np.ndarray) -> None:
        self.outputs = y.ravel()

    # ---- layers (loops over indices, straight from the module hyper-parameters) -----------------------------
    def conv(self, x: np.ndarray, name: str) -> np.ndarray:
        m = self.modules[name]
        assert m.padding_mode in ("zeros", "circular")
        circular = m.padding_mode == "circular"  # a padded position reads the input element it wraps to
        nd = x.ndim - 1
        cin, spatial = x.shape[0], x.shape[1:]
        assert cin == m.in_channels
        k, s, pad, dil = m.kernel_size, m.stride, m.padding, m.dilation
        out = [(spatial[d] + 2 * pad[d] - dil[d] * (k[d] - 1) - 1) // s[d] + 1 for d in range(nd)]
        cout, groups = m.out_channels, m.groups
        cin_g, cout_g = cin // groups, cout // groups
        bsrc = self.bias_source() if m.bias is not None else None
        y = self.units((cout, *out))
        for o in range(cout):
            g = o // cout_g
            for pos in itertools.product(*[range(n) for n in out]):
                for ic in range(cin_g):
                    for kk in itertools.product(*[range(n) for n in k]):
                        ip = tuple(pos[d] * s[d] - pad[d] + kk[d] * dil[d] for d in range(nd))
                        if circular:
                            ip = tuple(ip[d] % spatial[d] for d in range(nd))
                        if all(0 <= ip[d] < spatial[d] for d in range(nd)):
                            self.edge(x[(g * cin_g + ic,) + ip], y[(o,) + pos], (f"{name}.weight", (o, ic) + kk))
                if bsrc is not None:
                    self.edge(bsrc, y[(o,) + pos], (f"{name}.bias", (o,)))
        return y

    def conv_transpose(self, x: np.ndarray, name: str) -> np.ndarray:
        """Input unit (ic, pos) feeds output unit (oc, pos * stride - padding + k * dilation) through w[ic, oc, k]."""
        m = self.modules[name]
        nd = x.ndim - 1
        cin, spatial = x.shape[0], x.shape[1:]
        k, s, pad, dil, opad = m.kernel_size, m.stride, m.padding, m.dilation, m.output_padding
        out = [(spatial[d] - 1) * s[d] - 2 * pad[d] + dil[d] * (k[d] - 1) + opad[d] + 1 for d in range(nd)]
        groups = m.groups
        cin_g, cout_g = cin // groups, m.out_channels // groups
        bsrc = self.bias_source() if m.bias is not None else None
        y = self.units((m.out_channels, *out))
        for ic in range(cin):
            g = ic // cin_g
            for pos in itertools.product(*[range(n) for n in spatial]):
                for oc in range(cout_g):
                    for kk in itertools.product(*[range(n) for n in k]):
                        op = tuple(pos[d] * s[d] - pad[d] + kk[d] * dil[d] for d in range(nd))
                        if all(0 <= op[d] < out[d] for d in range(nd)):
                            self.edge(x[(ic,) + pos], y[(g * cout_g + oc,) + op], (f"{name}.weight", (ic, oc) + kk))
        if bsrc is not None:
            for idx in np.ndindex(*y.shape):
                self.edge(bsrc, y[idx], (f"{name}.bias", (idx[0],)))
        return y

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        m = self.modules[name]
        assert x.shape == (m.in_features,)
        bsrc = self.bias_source() if m.bias is not None else None
        y = self.units((m.out_features,))
        for i in range(m.out_features):
            for j in range(m.in_features):
                self.edge(x[j], y[i], (f"{name}.weight", (i, j)))
            if bsrc is not None:
                self.edge(bsrc, y[i], (f"{name}.bias", (i,)))
        return y

    @staticmethod
    def _pool_out(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
        out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        return out

    def window_pool(self, x: np.ndarray, kind: str, kernel, stride=None, padding=0, ceil_mode=False,
                    count_include_pad=True, divisor_override=None, dilation=1) -> np.ndarray:
        """Max pool (sum-pool convention, weight 1; any dilation) or avg pool (weight 1/divisor, PyTorch's
        divisor rules)."""
        nd = x.ndim - 1
        tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
        k = tup(kernel)
        s = tup(stride if stride not in (None, []) else kernel)
        p = tup(padding)
        dil = tup(dilation)
        spatial = x.shape[1:]
        if any(d != 1 for d in dil):
            assert kind == "max"
            out = []
            for d in range(nd):  # torch's pooling output length with dilation
                n = (spatial[d] + 2 * p[d] - dil[d] * (k[d] - 1) - 1 + (s[d] - 1 if ceil_mode else 0)) // s[d] + 1
                out.append(n - 1 if ceil_mode and (n - 1) * s[d] >= spatial[d] + p[d] else n)
            y = self.units((x.shape[0], *out))
            for c in range(x.shape[0]):
                for pos in itertools.product(*[range(n) for n in out]):
                    for kk in itertools.product(*[range(n) for n in k]):
                        ip = tuple(pos[d] * s[d] - p[d] + kk[d] * dil[d] for d in range(nd))
                        if all(0 <= ip[d] < spatial[d] for d in range(nd)):
                            self.edge(x[(c,) + ip], y[(c,) + pos], 1.0)
            return y
        out = [self._pool_out(spatial[d], k[d], s[d], p[d], ceil_mode) for d in range(nd)]
        y = self.units((x.shape[0], *out))
        for c in range(x.shape[0]):
            for pos in itertools.product(*[range(n) for n in out]):
                starts = [pos[d] * s[d] - p[d] for d in range(nd)]
                ranges = [range(max(starts[d], 0), min(starts[d] + k[d], spatial[d])) for d in range(nd)]
                real = list(itertools.product(*ranges))
                if kind == "max":
                    weight = 1.0
                elif divisor_override:
                    weight = 1.0 / divisor_override
                elif count_include_pad:
                    weight = 1.0 / math.prod(min(starts[d] + k[d], spatial[d] + p[d]) - starts[d] for d in range(nd))
                else:
                    weight = 1.0 / len(real)
                for ip in real:
                    self.edge(x[(c,) + ip], y[(c,) + pos], weight)
        return y

    def adaptive_avg(self, x: np.ndarray, out_size, kind: str = "avg") -> np.ndarray:
        """Adaptive pooling windows; avg: weight 1/count, max: weight 1 (sum-pool convention)."""
        nd = x.ndim - 1
        out = tuple(out_size) if isinstance(out_size, (tuple, list)) else (out_size,) * nd
        spatial = x.shape[1:]
        y = self.units((x.shape[0], *out))
        for c in range(x.shape[0]):
            for pos in itertools.product(*[range(n) for n in out]):
                ranges = [range((pos[d] * spatial[d]) // out[d], -((-(pos[d] + 1) * spatial[d]) // out[d]))
                          for d in range(nd)]
                real = list(itertools.product(*ranges))
                for ip in real:
                    self.edge(x[(c,) + ip], y[(c,) + pos], 1.0 / len(real) if kind == "avg" else 1.0)
        return y

    def mean(self, x: np.ndarray, dims: Sequence[int], total: bool = False) -> np.ndarray:
        """Mean (or with ``total``, sum) over the given axes of the per-sample unit array (no batch axis)."""
        keep = [d for d in range(x.ndim) if d not in dims]
        n = math.prod(x.shape[d] for d in dims)
        moved = np.transpose(x, keep + list(dims)).reshape(math.prod(x.shape[d] for d in keep), n)
        y = self.units(tuple(x.shape[d] for d in keep))
        for i, row in enumerate(moved):
            for u in row:
                self.edge(u, y.ravel()[i], 1.0 if total else 1.0 / n)
        return y

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        assert a.shape == b.shape
        y = self.units(a.shape)
        for u, v, w in zip(a.ravel(), b.ravel(), y.ravel()):
            self.edge(u, w, 1.0)
            self.edge(v, w, 1.0)
        return y

    def scale(self, x: np.ndarray, c: float) -> np.ndarray:
        y = self.units(x.shape)
        for u, w in zip(x.ravel(), y.ravel()):
            self.edge(u, w, float(c))
        return y

    def batchnorm(self, x: np.ndarray, name: str) -> np.ndarray:
        m = self.modules[name]
        var = m.running_var.detach().double().numpy()
        mean = m.running_mean.detach().double().numpy()
        a = m.weight.detach().double().numpy() / np.sqrt(var + m.eps)
        c = m.bias.detach().double().numpy() - mean * a
        bsrc = self.bias_source()
        y = self.units(x.shape)
        for idx in np.ndindex(*x.shape):
            self.edge(x[idx], y[idx], float(a[idx[0]]))
            self.edge(bsrc, y[idx], float(c[idx[0]]))
        return y

    # ---- evaluation -----------------------------------------------------------------------------------------
    def _edge_values(self) -> np.ndarray:
        params = {n: t.detach().double().numpy() for n, t in self.params.items()}
        return np.array([params[k[0]][k[1]] if isinstance(k, tuple) else k for k in self.key], dtype=np.float64)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The linear function of the graph with the signed weights (sources: x and bias units = 1)."""
        w = self._edge_values()
        val = np.zeros(self.n)
        val[self.inputs.ravel()] = x.ravel()
        val[self.bias_sources] = 1.0
        for e in np.argsort(np.asarray(self.dst), kind="stable"):
            val[self.dst[e]] += val[self.src[e]] * w[e]
        return val[self.outputs]

    def paths(self) -> np.ndarray:
        """Every source -> output path as a row of edge indices, padded with the dummy edge ``len(edges)``."""
        if self._paths is None:
            out_edges: Dict[int, List[int]] = {}
            for e, s in enumerate(self.src):
                out_edges.setdefault(s, []).append(e)
            outputs = set(self.outputs.tolist())
            found: List[Tuple[int, ...]] = []

            def walk(u: int, prefix: Tuple[int, ...]) -> None:
                if u in outputs:
                    found.append(prefix)
                    return
                for e in out_edges.get(u, ()):
                    walk(self.dst[e], prefix + (e,))

            for s in self.sources:
                walk(s, ())
            dummy = len(self.src)
            width = max(len(p) for p in found)
            self._paths = np.array([p + (dummy,) * (width - len(p)) for p in found], dtype=np.int64)
        return self._paths

    def scales(self, p: float) -> Tuple[float, Dict[str, torch.Tensor]]:
        """``(phi_p^p, {parameter name: kappa})`` by enumerating all paths, in float64."""
        paths = self.paths()
        a = np.append(np.abs(self._edge_values()) ** p, 1.0)  # the dummy edge has a = 1
        offsets, slots, total_slots = {}, [], 0
        for name, t in self.params.items():
            offsets[name] = total_slots
            total_slots += t.numel()
        for k in self.key:
            if isinstance(k, tuple):
                shape = tuple(self.params[k[0]].shape)
                slots.append(offsets[k[0]] + int(np.ravel_multi_index(k[1], shape)))
            else:
                slots.append(-1)
        slots = np.array(slots + [-1], dtype=np.int64)
        A = a[paths]
        ones = np.ones((A.shape[0], 1))
        prefix = np.cumprod(np.concatenate([ones, A[:, :-1]], axis=1), axis=1)
        suffix = np.cumprod(np.concatenate([ones, A[:, :0:-1]], axis=1), axis=1)[:, ::-1]
        others = prefix * suffix  # product of the path's other edges
        S = slots[paths]
        mask = S >= 0
        flat = np.zeros(total_slots)
        np.add.at(flat, S[mask], others[mask])
        kappa = {name: torch.from_numpy(flat[offsets[name]:offsets[name] + t.numel()].reshape(tuple(t.shape)).copy())
                 for name, t in self.params.items()}
        return float(A.prod(axis=1).sum()), kappa


# ================================================================================================================
# Small networks: forward (for pathsgd) and unroll (for the oracle), side by side
# ================================================================================================================

class SumPool(nn.Module):
    """Sum over the max-pool window (used only to check the unrolled graph; never given to pathsgd)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        m = self.pool
        nd = x.dim() - 2
        tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
        if any(d != 1 for d in tup(m.dilation)):  # dilated windows, summed element by element
            k, s, p, dil = tup(m.kernel_size), tup(m.stride), tup(m.padding), tup(m.dilation)
            spatial = x.shape[2:]
            out = []
            for d in range(nd):
                n = (spatial[d] + 2 * p[d] - dil[d] * (k[d] - 1) - 1 + (s[d] - 1 if m.ceil_mode else 0)) // s[d] + 1
                out.append(n - 1 if m.ceil_mode and (n - 1) * s[d] >= spatial[d] + p[d] else n)
            y = x.new_zeros(tuple(x.shape[:2]) + tuple(out))
            for pos in itertools.product(*[range(n) for n in out]):
                for kk in itertools.product(*[range(n) for n in k]):
                    ip = tuple(pos[d] * s[d] - p[d] + kk[d] * dil[d] for d in range(nd))
                    if all(0 <= ip[d] < spatial[d] for d in range(nd)):
                        y[(slice(None), slice(None)) + pos] += x[(slice(None), slice(None)) + ip]
            return y
        if nd == 1:
            one = lambda v: (1, v[0] if isinstance(v, (tuple, list)) else v)  # noqa: E731
            return F.avg_pool2d(x.unsqueeze(-2), one(m.kernel_size), one(m.stride), (0, one(m.padding)[1]),
                                m.ceil_mode, True, divisor_override=1).squeeze(-2)
        return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, True, divisor_override=1)


class OracleNet(nn.Module):
    """Base: ``self.act`` is the non-linearity (ReLU; Identity for the linearity check)."""
    input_shape: Tuple[int, ...] = ()
    linear_check = False  # True in the linearized copy (functional max pools -> sum pools)

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def linearized(self) -> "OracleNet":
        """A copy with ReLU -> identity and max pool -> sum pool: the linear function of the path graph."""
        lin = copy.deepcopy(self)
        lin.act = nn.Identity()
        lin.linear_check = True
        for name, m in list(lin.named_children()):
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                setattr(lin, name, SumPool(m))
        return lin

    def unrolled(self) -> Unrolled:
        g = Unrolled(self)
        g.output(self.unroll(g, g.input(self.input_shape)))
        return g


class Conv1dNet(OracleNet):
    """Conv1d with stride/padding/dilation, grouped conv without bias, AvgPool1d(count_include_pad=False)."""
    input_shape = (2, 9)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2)             # (2, 9) -> (4, 5)
        self.c2 = nn.Conv1d(4, 4, 2, padding=1, groups=2, bias=False)             # -> (4, 6)
        self.pool = nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)  # -> (4, 3)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        x = self.act(self.c2(self.act(self.c1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def unroll(self, g, x):
        x = g.conv(g.conv(x, "c1"), "c2")
        x = g.window_pool(x, "avg", 3, 2, 1, count_include_pad=False)
        return g.linear(x.reshape(-1), "fc")


class Conv2dNet(OracleNet):
    """Conv2d with rectangular kernel/stride/padding/dilation, MaxPool2d with padding and ceil_mode,
    multiplication and division by constants, mean over the spatial dims."""
    input_shape = (1, 5, 6)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, (2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1))  # -> (3, 5, 3)
        self.pool = nn.MaxPool2d(2, stride=(2, 1), padding=(1, 0), ceil_mode=True)          # -> (3, 3, 2)
        self.c2 = nn.Conv2d(3, 2, (2, 1), padding=(0, 1), bias=False)                      # -> (2, 2, 4)

    def forward(self, x):
        x = self.pool(self.act(self.c1(x))) * 0.5
        x = self.act(self.c2(x)) / 4.0
        return (-3.0 * x).mean(dim=(2, 3))

    def unroll(self, g, x):
        x = g.scale(g.window_pool(g.conv(x, "c1"), "max", 2, (2, 1), (1, 0), ceil_mode=True), 0.5)
        x = g.scale(g.conv(x, "c2"), 0.25)
        return g.mean(g.scale(x, -3.0), (1, 2))


class AvgPool2dNet(OracleNet):
    """Grouped Conv2d, AvgPool2d(count_include_pad=True) with padding, AdaptiveAvgPool2d with overlapping windows."""
    input_shape = (2, 5, 5)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, groups=2)                          # -> (4, 5, 5)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True)  # -> (4, 3, 3)
        self.adapt = nn.AdaptiveAvgPool2d((2, 2))                                 # -> (4, 2, 2)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = self.adapt(self.pool(self.act(self.c1(x))))
        return self.fc(x.flatten(1))

    def unroll(self, g, x):
        x = g.window_pool(g.conv(x, "c1"), "avg", 3, 2, 1, count_include_pad=True)
        return g.linear(g.adaptive_avg(x, (2, 2)).reshape(-1), "fc")


class Pool1dNet(OracleNet):
    """MaxPool1d with padding, AvgPool1d(count_include_pad=True, ceil_mode), AdaptiveAvgPool1d (overlapping)."""
    input_shape = (1, 8)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 2, 3, padding=1)                                        # -> (2, 8)
        self.mpool = nn.MaxPool1d(3, stride=2, padding=1)                              # -> (2, 4)
        self.apool = nn.AvgPool1d(2, stride=1, padding=1, ceil_mode=True)              # -> (2, 5)
        self.adapt = nn.AdaptiveAvgPool1d(3)                                           # -> (2, 3)
        self.fc = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        x = self.adapt(self.apool(self.mpool(self.act(self.c1(x)))))
        return self.fc(x.reshape(x.shape[0], -1))

    def unroll(self, g, x):
        x = g.window_pool(g.conv(x, "c1"), "max", 3, 2, 1)
        x = g.window_pool(x, "avg", 2, 1, 1, ceil_mode=True, count_include_pad=True)
        return g.linear(g.adaptive_avg(x, 3).reshape(-1), "fc")


class ResidualNet(OracleNet):
    """stem -> residual block y = relu(conv2(relu(conv1(x)))) + x -> MaxPool1d -> Linear."""
    input_shape = (1, 6)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 2, 3, padding=1)
        self.conv1 = nn.Conv1d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv1d(2, 2, 3, padding=1, bias=False)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.act(self.stem(x))
        y = self.act(self.conv2(self.act(self.conv1(x)))) + x
        return self.fc(self.pool(y).flatten(1))

    def unroll(self, g, x):
        x = g.conv(x, "stem")
        y = g.add(g.conv(g.conv(x, "conv1"), "conv2"), x)
        return g.linear(g.window_pool(y, "max", 2).reshape(-1), "fc")


class CatNet(OracleNet):
    """Two branches concatenated along the channels, then a strided conv."""
    input_shape = (1, 6)

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 2, 3, padding=1)
        self.b = nn.Conv1d(1, 1, 1, bias=False)
        self.c = nn.Conv1d(3, 2, 2, stride=2)  # -> (2, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.cat([self.act(self.a(x)), self.b(x)], dim=1)
        return self.fc(self.act(self.c(x)).flatten(1))

    def unroll(self, g, x):
        x = np.concatenate([g.conv(x, "a"), g.conv(x, "b")], axis=0)
        return g.linear(g.conv(x, "c").reshape(-1), "fc")


class SharedNet(OracleNet):
    """A conv called twice and a Linear called twice (shared weights), mean over length."""
    input_shape = (2, 5)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = self.act(self.conv(self.act(self.conv(x))))
        x = x.mean(-1)
        return self.fc(self.act(self.fc(x)))

    def unroll(self, g, x):
        x = g.mean(g.conv(g.conv(x, "conv"), "conv"), (1,))
        return g.linear(g.linear(x, "fc"), "fc")


class BatchNormNet(OracleNet):
    """Eval-mode BatchNorm2d (frozen, random stats, one negative gamma) and BatchNorm1d after a Linear."""
    input_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 2)              # -> (2, 3, 3)
        self.bn = nn.BatchNorm2d(2)
        self.c2 = nn.Conv2d(2, 2, 2, bias=False)  # -> (2, 2, 2)
        self.fc1 = nn.Linear(8, 3)
        self.bn1 = nn.BatchNorm1d(3)
        self.fc2 = nn.Linear(3, 2)
        gen = torch.Generator().manual_seed(99)
        for bn in (self.bn, self.bn1):
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
                bn.weight[0] = -abs(float(bn.weight[0]))
            bn.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = self.act(self.c2(self.act(self.bn(self.c1(x)))))
        return self.fc2(self.act(self.bn1(self.fc1(x.flatten(1)))))

    def unroll(self, g, x):
        x = g.conv(g.batchnorm(g.conv(x, "c1"), "bn"), "c2")
        return g.linear(g.batchnorm(g.linear(x.reshape(-1), "fc1"), "bn1"), "fc2")


class DenseDAGNet(OracleNet):
    """Linear layers inside a DAG (residual add): every Linear is called once (fused dense kernel path)."""
    input_shape = (1, 5)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 2)  # -> (2, 4)
        self.fc1 = nn.Linear(8, 3)
        self.fc2 = nn.Linear(3, 3, bias=False)
        self.fc3 = nn.Linear(3, 2)

    def forward(self, x):
        h = self.act(self.fc1(self.act(self.conv(x)).flatten(1)))
        return self.fc3(self.act(self.fc2(h)) + h)

    def unroll(self, g, x):
        h = g.linear(g.conv(x, "conv").reshape(-1), "fc1")
        return g.linear(g.add(g.linear(h, "fc2"), h), "fc3")


class FunctionalPoolNet(OracleNet):
    """Functional pools (max with padding, avg with ceil_mode and count_include_pad=False, adaptive avg that
    upsamples, adaptive max), torch.cat along the length, x.sum over the length."""
    input_shape = (1, 7)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 2, 2, bias=False)  # -> (2, 6)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = SumPool(nn.MaxPool1d(3, 2, 1))(x) if self.linear_check else F.max_pool1d(x, 3, 2, 1)  # -> (2, 3)
        x = F.avg_pool1d(x, 2, 2, 1, True, False)                                               # -> (2, 2)
        top = (x * 2.0).sum(-1, keepdim=True) if self.linear_check else F.adaptive_max_pool1d(x * 2.0, 1)
        x = torch.cat([F.adaptive_avg_pool1d(x, 3), top], dim=-1)                               # -> (2, 4)
        return self.fc(x.sum(-1))

    def unroll(self, g, x):
        x = g.window_pool(g.conv(x, "c1"), "max", 3, 2, 1)
        x = g.window_pool(x, "avg", 2, 2, 1, ceil_mode=True, count_include_pad=False)
        x = np.concatenate([g.adaptive_avg(x, 3), g.adaptive_avg(g.scale(x, 2.0), 1, kind="max")], axis=1)
        return g.linear(g.mean(x, (1,), total=True), "fc")


class Conv3dNet(OracleNet):
    """Conv3d with stride/padding, AvgPool3d with divisor_override, AdaptiveAvgPool3d, Flatten module."""
    input_shape = (1, 3, 3, 2)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(1, 2, (2, 2, 1), stride=(1, 2, 1), padding=(0, 1, 0))   # -> (2, 2, 2, 2)
        self.pool = nn.AvgPool3d(2, stride=1, padding=(1, 0, 0), divisor_override=3)  # -> (2, 3, 1, 1)
        self.adapt = nn.AdaptiveAvgPool3d((2, 1, 1))                                 # -> (2, 2, 1, 1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.flat(self.adapt(self.pool(self.act(self.c1(x))))))

    def unroll(self, g, x):
        x = g.window_pool(g.conv(x, "c1"), "avg", 2, 1, (1, 0, 0), divisor_override=3)
        return g.linear(g.adaptive_avg(x, (2, 1, 1)).reshape(-1), "fc")


class CircularDilatedNet(OracleNet):
    """Circular padding (each wrapped use of a weight is one edge) and MaxPool with dilation, 1-D and 2-D."""
    input_shape = (1, 4, 5)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=(1, 2), padding_mode="circular", dilation=(1, 2))  # -> (2, 4, 5)
        self.pool = nn.MaxPool2d((2, 2), stride=(2, 2), padding=(1, 1), dilation=(2, 2), ceil_mode=True)
        self.c2 = nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular")
        self.pool1 = nn.MaxPool1d(2, stride=1, dilation=2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = self.pool(self.act(self.c1(x)))
        x = x.flatten(2)
        x = self.pool1(self.act(self.c2(x)))
        return self.fc(x.mean(-1))

    def unroll(self, g, x):
        x = g.window_pool(g.conv(x, "c1"), "max", (2, 2), (2, 2), (1, 1), ceil_mode=True, dilation=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = g.window_pool(g.conv(x, "c2"), "max", 2, 1, 0, dilation=2)
        return g.linear(g.mean(x, (1,)), "fc")


class ConvTransposeNet(OracleNet):
    """ConvTranspose1d (stride, padding, output_padding, groups, dilation) and ConvTranspose2d (no bias),
    with Unflatten and Dropout1d/2d between them (identity units at p=0)."""
    input_shape = (2, 4)

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)  # -> (4, 8)
        self.drop1 = nn.Dropout1d(0.0)
        self.unflat = nn.Unflatten(1, (1, 4))
        self.up2 = nn.ConvTranspose2d(1, 2, (2, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2), bias=False)
        self.drop2 = nn.Dropout2d(0.0)
        self.fc = nn.Linear(2 * 5 * 17, 2)

    def forward(self, x):
        x = self.drop1(self.act(self.up1(x)))                   # (4, 8)
        x = self.drop2(self.act(self.up2(self.unflat(x))))      # (1, 4, 8) -> (2, 5, 17)
        return self.fc(x.flatten(1))

    def unroll(self, g, x):
        x = g.conv_transpose(x, "up1")
        x = g.conv_transpose(x.reshape(1, *x.shape), "up2")
        return g.linear(x.reshape(-1), "fc")


ORACLE_NETS = [Conv1dNet, Conv2dNet, AvgPool2dNet, Pool1dNet, ResidualNet, CatNet, SharedNet, BatchNormNet,
               DenseDAGNet, FunctionalPoolNet, Conv3dNet, CircularDilatedNet, ConvTransposeNet]


def make_net(cls, seed: int = 0, scale: float = 1.3) -> OracleNet:
    torch.manual_seed(seed)
    model = cls().double()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.requires_grad:
                t.mul_(scale)
    return model


_UNROLLED: Dict[type, Unrolled] = {}


def unrolled_of(model: OracleNet) -> Unrolled:
    """The unrolled graph (structure cached per class; weights are read at every evaluation)."""
    cls = type(model)
    if cls not in _UNROLLED:
        _UNROLLED[cls] = model.unrolled()
    g = _UNROLLED[cls]
    g.params = dict(model.named_parameters())
    g.modules = dict(model.named_modules())
    return g


def path_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters of Linear/Conv layers (the ones with kappa), in model order."""
    return {n: t for n, t in model.named_parameters() if not n.startswith(("bn.", "bn1."))}


# ================================================================================================================
# 1. path_norm and path_scales against the oracle
# ================================================================================================================

@pytest.mark.parametrize("cls", ORACLE_NETS, ids=lambda c: c.__name__)
def test_unrolled_graph_is_the_network(cls):
    """The oracle's explicit graph computes the network's linear function (ReLU -> id, max -> sum pool)."""
    model = make_net(cls)
    g = model.unrolled()
    lin = model.linearized()
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn((1,) + cls.input_shape, generator=gen, dtype=torch.float64)
        want = lin(x).detach().reshape(-1).numpy()
        np.testing.assert_allclose(g.forward(x[0].numpy()), want, rtol=1e-12, atol=1e-12)
    n_paths = len(g.paths())
    assert 50 <= n_paths <= 20000, n_paths  # tiny nets: a few hundred to a few thousand paths


def test_oracle_by_hand():
    """Conv1d(1, 1, 2, padding=1) on a length-2 input, then sum: every path written out."""
    class Tiny(OracleNet):
        input_shape = (1, 2)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 2, padding=1)  # 3 outputs: [w1 x0], [w0 x0 + w1 x1], [w0 x1]

        def forward(self, x):
            return self.conv(x).sum(-1)

        def unroll(self, g, x):
            return g.mean(g.conv(x, "conv"), (1,), total=True)

    model = Tiny().double()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([[[2.0, -3.0]]]))
        model.conv.bias.fill_(0.5)
    g = model.unrolled()
    assert len(g.paths()) == 4 + 3  # 4 input paths (2 taps x 2 inputs) + 3 bias paths
    for p in P_VALUES:
        total, kappa = g.scales(p)
        assert total == pytest.approx(2 * 2.0 ** p + 2 * 3.0 ** p + 3 * 0.5 ** p, rel=1e-14)
        torch.testing.assert_close(kappa["conv.weight"], torch.tensor([[[2.0, 2.0]]], dtype=torch.float64))
        torch.testing.assert_close(kappa["conv.bias"], torch.tensor([3.0], dtype=torch.float64))
        assert float(pathsgd.path_norm(model, p, (1, 2)).detach()) ** p == pytest.approx(total, rel=1e-12)


@pytest.fixture(params=["taped", "taped-reference", "autograd"])
def evaluation(request, monkeypatch) -> Tuple[str, List[int]]:
    """How kappa is backpropagated through the abs-pow network: the VJP tape (the default) with
    the compiled ops, the same tape with the reference ops (the Python interpreter of the tape), or
    the autograd evaluator (its twin, chosen explicitly). All must match the oracle. Returns the
    mode ("taped" for both tape modes) and the list of taped backward runs, so a test can check
    the tape was used."""
    from pathsgd import eval_tape, graph, ops, step_plans
    runs: List[int] = []
    if request.param == "autograd":
        with graph.use_evaluator("autograd"):
            yield "autograd", runs
        return
    # the step plan of a conv net whose trunk is compiled programs runs the tape inside one op
    for cls, name in ((eval_tape.TapeEvaluator, "backward"), (step_plans.TrunkStepPlan, "_step_op")):
        method = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _method=method, **k: runs.append(1) or _method(self, *a, **k))
    with ops.use_reference(request.param == "taped-reference"):
        yield "taped", runs


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("cls", ORACLE_NETS, ids=lambda c: c.__name__)
def test_path_norm_and_scales_match_oracle(cls, p, evaluation):
    model = make_net(cls, seed=p)
    total, kappa = unrolled_of(model).scales(p)
    norm = pathsgd.path_norm(model, p, cls.input_shape)
    assert norm.dtype == torch.float64 and norm.dim() == 0
    assert math.isclose(float(norm.detach()) ** p, total, rel_tol=RTOL), (float(norm.detach()) ** p, total)
    scales = pathsgd.path_scales(model, p, cls.input_shape)
    assert list(scales) == list(path_params(model))
    for name, prm in path_params(model).items():
        assert scales[name].shape == prm.shape and scales[name].dtype == torch.float64, name
        torch.testing.assert_close(scales[name], kappa[name], rtol=RTOL, atol=1e-300, msg=lambda m: f"{name}: {m}")
    mode, runs = evaluation
    assert len(runs) == (1 if mode == "taped" else 0)  # path_scales evaluates once, taped unless told not to


def test_string_padding_takes_autograd_and_matches_explicit_padding(evaluation):
    """padding='same'/'valid' cannot go to convolution_backward: such a model takes the autograd
    evaluation, with the kappas of the same model written with explicit padding."""
    def net(same: bool) -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv1d(2, 3, 3, padding="same" if same else 1), nn.ReLU(),
                             nn.Conv1d(3, 2, 2, padding="valid" if same else 0), nn.Flatten(),
                             nn.Linear(2 * 6, 2)).double()
    mode, runs = evaluation
    implicit = pathsgd.path_scales(net(True), 2, (2, 7))
    assert not runs  # never taped
    explicit = pathsgd.path_scales(net(False), 2, (2, 7))
    assert len(runs) == (1 if mode == "taped" else 0)
    assert list(implicit) == list(explicit)
    for name in implicit:
        torch.testing.assert_close(implicit[name], explicit[name], rtol=1e-12, atol=0)


def test_path_norm_is_differentiable_for_conv():
    """d phi_p^p / dw = kappa * p |w|^(p-1) sign(w) for every (shared) conv weight."""
    model = make_net(ResidualNet, seed=5)
    p = 2
    norm = pathsgd.path_norm(model, p, ResidualNet.input_shape)
    grads = torch.autograd.grad(norm ** p, list(path_params(model).values()))
    _, kappa = unrolled_of(model).scales(p)
    for (name, prm), grad in zip(path_params(model).items(), grads):
        torch.testing.assert_close(grad, kappa[name] * p * prm.detach().abs() ** (p - 1) * prm.detach().sign(),
                                   rtol=1e-9, atol=1e-300, msg=lambda m: f"{name}: {m}")


# ================================================================================================================
# 2. Rescaling invariance (Theorem 4.1) for a CNN with a residual block, float64
# ================================================================================================================

class ResCNN(nn.Module):
    """conv0 -> [conv1 -> relu -> conv2 -> relu] + skip -> maxpool -> Linear -> ReLU -> Linear."""

    def __init__(self, c: int = 4, length: int = 8, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.conv0 = nn.Conv1d(2, c, 3, padding=1)
        self.conv1 = nn.Conv1d(c, c, 3, padding=1)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.fc1 = nn.Linear(c * length // 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.relu(self.conv0(x))
        y = F.relu(self.conv2(F.relu(self.conv1(x)))) + x
        y = self.pool(y).flatten(1)
        return self.fc2(F.relu(self.fc1(y)))


def _log_uniform(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(100.0))


@torch.no_grad()
def rescale_rescnn(model: ResCNN, seed: int) -> ResCNN:
    """A node-rescaled copy: every hidden unit (per channel for convs) scaled by its own c in [1e-2, 1e2].

    Channel k of the residual stream (conv0's output, the skip, conv2's output and their sum) has
    one c: conv0 and conv2 outgoing filters/biases of channel k times c, conv1's input channel k and
    fc1's columns of channel k times 1/c. conv1's output channels and fc1's units have their own c.
    """
    gen = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    C = m.conv0.out_channels
    c_res, c_mid, c_fc = _log_uniform(C, gen), _log_uniform(C, gen), _log_uniform(m.fc1.out_features, gen)
    pooled = m.fc1.in_features // C
    # residual stream
    m.conv0.weight.mul_(c_res.view(-1, 1, 1))
    m.conv0.bias.mul_(c_res)
    m.conv2.weight.mul_(c_res.view(-1, 1, 1))
    m.conv2.bias.mul_(c_res)
    m.conv1.weight.div_(c_res.view(1, -1, 1))
    m.fc1.weight.div_(c_res.repeat_interleave(pooled).view(1, -1))
    # conv1's output channels (inside the block)
    m.conv1.weight.mul_(c_mid.view(-1, 1, 1))
    m.conv1.bias.mul_(c_mid)
    m.conv2.weight.div_(c_mid.view(1, -1, 1))
    # fc1's units
    m.fc1.weight.mul_(c_fc.view(-1, 1))
    m.fc1.bias.mul_(c_fc)
    m.fc2.weight.div_(c_fc.view(1, -1))
    return m


def _train(model: nn.Module, opt, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_rescaling_invariance_residual_cnn():
    torch.manual_seed(0)
    model = ResCNN().double()
    twin = rescale_rescnn(model, seed=1)
    gen = torch.Generator().manual_seed(2)
    x_test = torch.randn(32, 2, 8, generator=gen, dtype=torch.float64)
    batches = [(torch.randn(16, 2, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(50)]
    with torch.no_grad():
        assert _rel_diff(model(x_test), twin(x_test)) < 1e-12  # the rescaling keeps the function
        # ... and the weights really are far apart
        assert max(float((a - b).abs().max()) for a, b in zip(model.parameters(), twin.parameters())) > 1.0
    for p in P_VALUES:  # the path norm is rescaling-invariant too
        norms = [float(pathsgd.path_norm(m, p, (2, 8)).detach()) for m in (model, twin)]
        assert math.isclose(*norms, rel_tol=1e-12), norms

    # Negative control first (copies): plain SGD from the two rescaled starting points drifts apart.
    sgd_a, sgd_b = copy.deepcopy(model), copy.deepcopy(twin)
    _train(sgd_a, torch.optim.SGD(sgd_a.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3), batches)
    _train(sgd_b, torch.optim.SGD(sgd_b.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3), batches)
    with torch.no_grad():
        sgd_diff = _rel_diff(sgd_a(x_test), sgd_b(x_test))
    assert not math.isnan(sgd_diff) and sgd_diff > 1e-3, sgd_diff

    outputs_before = model(x_test).detach()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, input_shape=(2, 8))
    _train(model, pathsgd.PathSGD(model, **kw), batches)
    _train(twin, pathsgd.PathSGD(twin, **kw), batches)
    with torch.no_grad():
        out, out_twin = model(x_test), twin(x_test)
    assert torch.isfinite(out).all()
    assert _rel_diff(outputs_before, out) > 1e-2, "PathSGD did not move the function"
    assert _rel_diff(out, out_twin) < 1e-8, _rel_diff(out, out_twin)


# ================================================================================================================
# 3. SGD parity: PathSGD == torch.optim.SGD on g / max(kappa_oracle^(2/p), eps)
# ================================================================================================================

def _random_batch(cls, gen, n=6):
    x = torch.randn((n,) + cls.input_shape, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _set_loss_grads(model, x, y) -> None:
    for t in model.parameters():
        t.grad = None
    ((model(x) - y) ** 2).mean().backward()


def _oracle_sgd_step(model, sgd: torch.optim.SGD, p: float, eps: float) -> None:
    """torch SGD step on gradients divided by max(kappa_oracle^(2/p), eps); grads restored afterwards."""
    _, kappa = unrolled_of(model).scales(p)
    saved = {}
    with torch.no_grad():
        for name, t in path_params(model).items():
            if t.grad is not None:
                saved[name] = t.grad
                t.grad = t.grad / kappa[name].pow(2.0 / p).clamp_min(eps).to(t.dtype)
    sgd.step()
    for name, t in path_params(model).items():
        if name in saved:
            t.grad = saved[name]


@pytest.mark.parametrize("cls,p,hyper", [
    (ResidualNet, 2, dict(momentum=0.9, weight_decay=1e-3)),
    (Conv2dNet, 1, dict(momentum=0.9, nesterov=True)),
    (SharedNet, 3, dict(momentum=0.5, dampening=0.1, weight_decay=1e-2)),
    (AvgPool2dNet, 2, dict(momentum=0.0, maximize=True)),
], ids=["residual-p2", "conv2d-p1-nesterov", "shared-p3", "avgpool-p2-maximize"])
def test_sgd_parity_conv(cls, p, hyper, evaluation):
    model = make_net(cls, seed=7)
    twin = copy.deepcopy(model)
    lr = 1e-2
    opt = pathsgd.PathSGD(model, lr=lr, p=p, input_shape=cls.input_shape, **{"momentum": 0.0, **hyper})
    sgd = torch.optim.SGD(list(path_params(twin).values()), lr=lr, **hyper)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = _random_batch(cls, gen)
        _set_loss_grads(model, x, y)
        _set_loss_grads(twin, x, y)
        opt.step()
        _oracle_sgd_step(twin, sgd, p, eps=1e-12)
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), make_net(cls, seed=7).parameters()))


def test_sgd_parity_float32_conv():
    """A float32 conv net: scaled update in float32 from the float64 kappa."""
    model = make_net(ResidualNet, seed=8).float()
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=1e-2, momentum=0.9, input_shape=ResidualNet.input_shape)
    sgd = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, y = _random_batch(ResidualNet, gen)
        _set_loss_grads(model, x.float(), y.float())
        _set_loss_grads(twin, x.float(), y.float())
        opt.step()
        _oracle_sgd_step(twin, sgd, 2, eps=1e-12)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_taped_evaluation_reads_current_parameters():
    """The tape reuses its float64 |w|^p buffers across calls: every call must see the weights
    as they are then (changed in place, replaced by a new Parameter, resized), never old values."""
    model = make_net(ResidualNet, seed=9)
    graph = pathsgd.PathSGD(model, lr=1e-2, input_shape=ResidualNet.input_shape).graph
    fresh = lambda: pathsgd.path_scales(model, p=2, input_shape=ResidualNet.input_shape)  # noqa: E731
    changes = [lambda: model.conv1.weight.mul_(1.7),
               lambda: setattr(model.stem, "bias", nn.Parameter(torch.rand(2, dtype=torch.float64))),
               lambda: setattr(model.conv2, "weight", nn.Parameter(model.conv2.weight.detach() * 0.3))]
    for change in [lambda: None] + changes:
        with torch.no_grad():
            change()
        got = functional.path_scales_of(graph, 2.0)
        for name, want in fresh().items():
            torch.testing.assert_close(got[name], want, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")
    # The reused buffers never leak out as kappas (a later call must not change earlier results).
    first = {k: v.clone() for k, v in functional.path_scales_of(graph, 2.0).items()}
    kept = functional.path_scales_of(graph, 2.0)
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    functional.path_scales_of(graph, 2.0)
    for name, value in first.items():
        torch.testing.assert_close(kept[name], value, rtol=0, atol=0)


# ================================================================================================================
# 5. Linear inside a DAG: fused dense kernel (called once) and materialized kappa (called twice)
# ================================================================================================================

@pytest.mark.parametrize("cls,fused", [(DenseDAGNet, {"fc1", "fc2", "fc3"}), (SharedNet, set())],
                         ids=["fused-linears", "shared-linear"])
@pytest.mark.parametrize("p", (1, 2, 3))
def test_linear_in_dag_one_step(cls, fused, p):
    model = make_net(cls, seed=11)
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9, weight_decay=1e-2, p=p, input_shape=cls.input_shape)
    # which code path runs (the fused dense kernel needs a Linear called once on a flat input)
    assert set(opt.graph.dense_layers) == fused
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = _random_batch(cls, torch.Generator().manual_seed(5))
    _set_loss_grads(model, x, y)
    _set_loss_grads(twin, x, y)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    opt.step()
    _oracle_sgd_step(twin, sgd, p, eps=1e-12)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert not torch.equal(a, before[name]), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


def test_fused_linear_with_different_p_groups():
    """Param groups with different p in one DAG: every kappa from the old weights."""
    model = make_net(DenseDAGNet, seed=12)
    twin = copy.deepcopy(model)
    names_p1 = ["fc1.weight", "fc2.weight"]
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in names_p1], "p": 1},
              {"params": [t for n, t in named.items() if n not in names_p1]}]
    opt = pathsgd.PathSGD(groups, lr=0.05, momentum=0.0, p=2, model=model, input_shape=DenseDAGNet.input_shape)
    x, y = _random_batch(DenseDAGNet, torch.Generator().manual_seed(6))
    _set_loss_grads(model, x, y)
    _set_loss_grads(twin, x, y)
    opt.step()
    kappas = {p: unrolled_of(twin).scales(p)[1] for p in (1, 2)}
    with torch.no_grad():
        for name, t in twin.named_parameters():
            p = 1 if name in names_p1 else 2
            t.sub_(0.05 * t.grad / kappas[p][name].pow(2.0 / p).clamp_min(1e-12))
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("subset", ["all", "trunk", "head", "head-bias", "one-conv-weight"])
@pytest.mark.parametrize("cls,head,trunk_linears", [(ResidualNet, ["fc"], []), (DenseDAGNet, ["fc3"], ["fc1", "fc2"]),
                                                    (BatchNormNet, ["fc2"], ["fc1"])],
                         ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_dense_head_step_with_partial_parameters(cls, head, trunk_linears, subset, evaluation):
    """A model ending in Linear layers (a conv trunk's classifier) takes the dense-head path: the
    head's fused passes seed the trunk's backward. Whatever subset is optimized, every kappa
    comes from the old weights (oracle) and parameters outside the subset stay unchanged."""
    model = make_net(cls, seed=14)
    twin = copy.deepcopy(model)
    named = path_params(model)
    head_params = [n for n in named if n.split(".")[0] in head]
    chosen = {"all": list(named), "trunk": [n for n in named if n not in head_params], "head": head_params,
              "head-bias": [n for n in head_params if n.endswith("bias")],
              "one-conv-weight": [next(n for n in named if n not in head_params and n.endswith("weight"))]}[subset]
    opt = pathsgd.PathSGD([named[n] for n in chosen], lr=0.05, momentum=0.0, model=model,
                          input_shape=cls.input_shape)
    assert [layer.name for layer in opt.graph.head.layers] == head
    x, y = _random_batch(cls, torch.Generator().manual_seed(15))
    _set_loss_grads(model, x, y)
    _set_loss_grads(twin, x, y)
    opt.step()
    _, kappa = unrolled_of(twin).scales(2)
    with torch.no_grad():
        for name in chosen:
            t = path_params(twin)[name]
            t.sub_(0.05 * t.grad / kappa[name].clamp_min(1e-12))
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert all(not torch.equal(named[n], dict(make_net(cls, seed=14).named_parameters())[n]) for n in chosen)
    # The trunk (its dense Linear layers included) is one taped backward, seeded by the head.
    mode, runs = evaluation
    assert len(runs) == (1 if mode == "taped" else 0)


# ================================================================================================================
# 4. Unsupported models: a ValueError naming the module and why; nothing changes
# ================================================================================================================

def _state(model: nn.Module):
    return copy.deepcopy(model.state_dict())


def _assert_same_state(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


class Wrap(nn.Module):
    """conv -> relu -> ``body.<name>`` (the layer under test) -> flatten -> Linear."""

    def __init__(self, layer: nn.Module, conv: bool = True, flat_features: int = 4 * 6):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3) if conv else nn.Identity()
        self.body = nn.Sequential()
        self.body.add_module("layer", layer)
        self.fc = nn.Linear(flat_features, 2)

    def forward(self, x):
        return self.fc(self.body(F.relu(self.conv(x))).flatten(1))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # x: (B, T, 4)
        h = self.proj(x)
        return self.fc(self.attn(h, h, h)[0].mean(1))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx):
        return self.fc(self.emb(idx).mean(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return F.relu(self.fc(x))
        return x


class ControlFlowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.blocks = nn.Sequential(Gate())
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.blocks(F.relu(self.inp(x))))


class UnusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.spare = nn.Linear(4, 4)  # never called

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class DeadBranchNet(nn.Module):
    """``side`` is called but its result never reaches the output: its parameters are on no path."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.side = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        self.side(h)
        return self.fc2(h)


class AddConstNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) + 1.0)


class ProductNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(3, 4)
        self.fc3 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc1(x)) * F.relu(self.fc2(x)))


class ReflectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def _bn_train_net():
    net = Wrap(nn.BatchNorm1d(4))
    net.body.layer.requires_grad_(False)  # frozen, but in training mode
    return net


# (factory, input_shape, needles that must all appear in the message (case-insensitive))
UNSUPPORTED = {
    "batchnorm-train": (_bn_train_net, (1, 8), ["'body.layer'", "BatchNorm1d", "training mode"]),
    "layernorm": (lambda: Wrap(nn.LayerNorm(6)), (1, 8),
                  ["'body.layer'", "LayerNorm", "normaliz", "supported: linear"]),
    "groupnorm": (lambda: Wrap(nn.GroupNorm(2, 4)), (1, 8),
                  ["'body.layer'", "GroupNorm", "normaliz", "supported: linear"]),
    "sigmoid": (lambda: Wrap(nn.Sigmoid()), (1, 8), ["'body.layer'", "Sigmoid", "homogeneous", "supported: linear"]),
    "tanh": (lambda: Wrap(nn.Tanh()), (1, 8), ["'body.layer'", "Tanh", "homogeneous", "supported: linear"]),
    "gelu": (lambda: Wrap(nn.GELU()), (1, 8), ["'body.layer'", "GELU", "homogeneous", "supported: linear"]),
    "attention": (AttentionNet, (3, 4), ["'attn'", "MultiheadAttention", "attention", "supported: linear"]),
    "embedding": (EmbeddingNet, (5,), ["'emb'", "Embedding", "index", "supported: linear"]),
    "lstm": (LSTMNet, (3, 4), ["'rnn'", "LSTM", "recurrent", "supported: linear"]),
    "control-flow": (ControlFlowNet, (3,), ["'blocks.0'", "Gate", "control flow"]),
    "unused-parameter": (UnusedNet, (3,), ["spare.weight", "spare.bias", "not on any"]),
    "dead-branch": (DeadBranchNet, (3,), ["side.weight", "side.bias", "not on any"]),
    "reflect-padding": (ReflectNet, (1, 8), ["'features.0'", "Conv1d", "padding_mode", "reflect"]),
    "missing-input-shape": (lambda: Wrap(nn.Identity()), None, ["input_shape", "required"]),
    "input-shape-channels": (lambda: Wrap(nn.Identity()), (2, 8), ["input_shape", "(2, 8)", "inconsistent"]),
    "input-shape-length": (lambda: Wrap(nn.Identity()), (1, 9), ["input_shape", "(1, 9)", "inconsistent"]),
    "add-constant": (AddConstNet, (3,), ["add", "constant", "homogeneous"]),
    "product-of-activations": (ProductNet, (3,), ["mul", "homogeneous"]),
}


def _check_message(msg: str, needles: Sequence[str]) -> None:
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in error message: {msg}"
    assert "pathsgd" in msg.lower()


# PathSGD takes a missing input_shape from the model's forward input (tested in test_first_hour.py).
@pytest.mark.parametrize("case", [c for c in UNSUPPORTED if c != "missing-input-shape"])
def test_unsupported_raises_at_construction(case):
    factory, input_shape, needles = UNSUPPORTED[case]
    torch.manual_seed(0)
    model = factory()
    before = _state(model)
    kw = {} if input_shape is None else {"input_shape": input_shape}
    with pytest.raises(ValueError) as info:
        pathsgd.PathSGD(model, lr=0.1, **kw)
    _check_message(str(info.value), needles)
    _assert_same_state(before, _state(model))
    assert model.training  # the mode is not touched either


@pytest.mark.parametrize("case", ["batchnorm-train", "layernorm", "sigmoid", "control-flow", "unused-parameter",
                                  "dead-branch", "add-constant", "missing-input-shape", "input-shape-length"])
def test_unsupported_raises_in_path_norm_and_scales(case):
    """path_norm / path_scales refuse the same models (never a silent wrong answer)."""
    factory, input_shape, needles = UNSUPPORTED[case]
    torch.manual_seed(0)
    model = factory()
    before = _state(model)
    for fn in (pathsgd.path_norm, pathsgd.path_scales):
        with pytest.raises(ValueError) as info:
            fn(model, 2, input_shape)
        _check_message(str(info.value), needles)
    _assert_same_state(before, _state(model))


def test_unsupported_functional_activations():
    class Functional(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fc1, self.fc2, self.fn = nn.Linear(3, 4), nn.Linear(4, 2), fn

        def forward(self, x):
            return self.fc2(self.fn(self.fc1(x)))

    for fn, needle in [(torch.sigmoid, "sigmoid"), (torch.tanh, "tanh"), (F.gelu, "gelu"), (F.softplus, "softplus")]:
        with pytest.raises(ValueError, match=f"(?i){needle}.*homogeneous"):
            pathsgd.PathSGD(Functional(fn), lr=0.1)


def test_batchnorm_parameters_in_optimizer_raise():
    model = make_net(BatchNormNet)
    model.bn.requires_grad_(True)  # eval mode, but its parameters would be optimized
    with pytest.raises(ValueError, match=r"bn\.weight.*BatchNorm2d"):
        pathsgd.PathSGD(model, lr=0.1, input_shape=BatchNormNet.input_shape)


def test_batchnorm_train_after_construction_step_raises_and_changes_nothing():
    model = make_net(BatchNormNet)
    opt = pathsgd.PathSGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3, input_shape=BatchNormNet.input_shape)
    gen = torch.Generator().manual_seed(0)
    x, y = _random_batch(BatchNormNet, gen)
    _set_loss_grads(model, x, y)
    opt.step()  # a good step: momentum buffers exist
    x, y = _random_batch(BatchNormNet, gen)
    _set_loss_grads(model, x, y)
    model.train()
    state = _state(model)
    opt_state = copy.deepcopy(opt.state_dict())
    grads = {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
    with pytest.raises(ValueError) as info:
        opt.step()
    _check_message(str(info.value), ["'bn'", "BatchNorm2d", "training mode"])
    _assert_same_state(state, _state(model))
    new_opt_state = opt.state_dict()
    assert opt_state["param_groups"] == new_opt_state["param_groups"]
    assert opt_state["state"].keys() == new_opt_state["state"].keys()
    for k, v in opt_state["state"].items():
        assert torch.equal(v["momentum_buffer"], new_opt_state["state"][k]["momentum_buffer"])
    for n, t in model.named_parameters():
        if n in grads:
            assert torch.equal(t.grad, grads[n])
    # back in eval mode the same step works
    model.eval()
    opt.step()
    assert any(not torch.equal(t, state[n]) for n, t in model.named_parameters())
