"""General path graphs: any feed-forward DAG of positively homogeneous units.

The gamma maps are the activations of the *abs-pow network* on an all-ones input
of ``input_shape``: the model with every weight w replaced
by ``|w|^p``, every bias b by ``|b|^p``, every constant edge c by ``|c|^p`` and
every non-linearity by the identity. ``phi_p^p`` is the sum of its outputs, and
``kappa = d phi_p^p / d |W|^p`` is the weight-gradient of that network; autograd
sums it over all edges of a shared weight (convolutions, modules called twice).
Everything here runs in float64 with batch size 1.

Edge conventions (documented choices):
  * MaxPool is treated as sum-pooling over its window (every window edge has weight
    1). Max commutes with positive per-channel scaling, so this keeps node-rescaling
    invariance; it bounds the max-path set from above.
  * AvgPool / AdaptiveAvgPool / mean: constant edges 1/d, so ``a = d^-p``.
  * Residual additions and concatenation: edges of weight 1; ``x * c`` for a Python
    number c: an edge of weight c.
  * BatchNorm in eval mode: per-channel edge ``a = weight / sqrt(var + eps)`` and a
    constant bias ``beta - mean * a``; its parameters must not be optimized.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .reference import abs_pow, abs_pow_list, opmath_dtype

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (nn.Linear,) + _CONV
WEIGHTED_LAYERS = _WEIGHTED
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_MAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# PReLU is positively homogeneous for any slope (max(0, cx) + a min(0, cx) = c PReLU(x), c > 0): an identity
# unit of the abs-pow network whose slope is not on any path (updated with its plain gradient).
_IDENTITY_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                     nn.Dropout3d)
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten)

_IDENTITY_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d,
                       F.dropout3d}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                    operator.getitem, getattr}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "permute", "transpose", "size",
                  "dim", "view_as", "reshape_as"}
_IDENTITY_METHODS = {"relu", "relu_"}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_POOL_FUNCTIONS = {F.max_pool1d: ("max", 1), F.max_pool2d: ("max", 2), F.max_pool3d: ("max", 3),
                   F.avg_pool1d: ("avg", 1), F.avg_pool2d: ("avg", 2), F.avg_pool3d: ("avg", 3),
                   F.adaptive_avg_pool1d: ("adaptive_avg", 1), F.adaptive_avg_pool2d: ("adaptive_avg", 2),
                   F.adaptive_avg_pool3d: ("adaptive_avg", 3), F.adaptive_max_pool1d: ("adaptive_max", 1),
                   F.adaptive_max_pool2d: ("adaptive_max", 2), F.adaptive_max_pool3d: ("adaptive_max", 3)}

SUPPORTED = ("supported: Linear, Conv1d/2d/3d (zero padding), ReLU, LeakyReLU, Identity, Dropout, Flatten/reshape/"
             "view, MaxPool/AvgPool/AdaptiveAvgPool/AdaptiveMaxPool, mean/sum over dims, residual additions, "
             "torch.cat, multiplication by a constant, and BatchNorm in eval mode with frozen parameters")

# What a training loop runs after model.train() to keep BatchNorm frozen and Dropout active.
BATCHNORM_FIX = ("for m in model.modules():\n"
                 "    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):\n"
                 "        m.eval()                 # running statistics: a fixed per-channel scale and shift\n"
                 "        m.requires_grad_(False)  # its affine parameters are constants of the path graph")
_BATCHNORM_WHY = ("BatchNorm in training mode normalizes by batch statistics, which undoes node rescaling. Keep "
                  "it in eval mode with frozen parameters (Dropout and the rest of the model stay in training mode); "
                  "run this after model.train() (and before building PathSGD):\n\n" + BATCHNORM_FIX + "\n")
_WHY = [
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _BATCHNORM_WHY),
    ((nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm),
     "normalization layers divide by activation statistics, which breaks node-rescaling invariance"),
    ((nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer),
     "attention multiplies activations together, so it is not positively homogeneous"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding weights are looked up by index, not on input-to-output paths"),
    ((nn.RNNBase, nn.RNNCell, nn.LSTMCell, nn.GRUCell), "recurrent layers are not feed-forward DAGs of ReLU units"),
    ((nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Hardtanh,
      nn.ReLU6, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.Tanhshrink, nn.Softsign),
     "the activation is not positively homogeneous (f(c x) != c f(x) for c > 0) and it sits between weighted "
     "layers (log_softmax, softmax, sigmoid and tanh are allowed as output transforms: after the last weighted "
     "layer, feeding only the output)"),
]


def known_unsupported(module: nn.Module) -> Optional[str]:
    """Why ``module`` breaks node-rescaling invariance, for the layers known to (else None)."""
    for types, why in _WHY:
        if isinstance(module, types):
            return why
    return None


def _why_unsupported(module: nn.Module) -> str:
    why = known_unsupported(module)
    return why if why is not None else ("it is not known to be positively homogeneous, so it may break "
                                        "node-rescaling invariance")


def describe_node(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (fx node '{node.name}')"
    if node.op == "call_method":
        return f"method .{node.target}() (fx node '{node.name}')"
    return f"{node.op} '{node.target}'"


def _tuple(v: Any, n: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _sum_pool_args(nd: int, kernel, stride, padding) -> Tuple[Tuple[int, ...], ...]:
    """Kernel, stride, padding of a sum pool as tuples; 1-D pools go through 2-D (avg_pool1d
    has no divisor_override)."""
    kernel = _tuple(kernel, nd)
    stride = _tuple(stride if stride not in (None, []) else kernel, nd)
    padding = _tuple(padding, nd)
    return ((1,) + kernel, (1,) + stride, (0,) + padding) if nd == 1 else (kernel, stride, padding)


def _sum_pool(x: Tensor, nd: int, kernel, stride, padding, ceil_mode: bool) -> Tensor:
    """Sum over each pooling window (zero padding): max-pool edges of weight 1."""
    return sum_pool(x, nd, _sum_pool_args(nd, kernel, stride, padding), ceil_mode)


def sum_pool(x: Tensor, nd: int, args: Tuple[Tuple[int, ...], ...], ceil_mode: bool) -> Tensor:
    """``_sum_pool`` with the arguments from ``_sum_pool_args``."""
    if nd == 1:
        return F.avg_pool2d(x.unsqueeze(-2), *args, ceil_mode, True, divisor_override=1).squeeze(-2)
    return (F.avg_pool2d if nd == 2 else F.avg_pool3d)(x, *args, ceil_mode, True, divisor_override=1)


def _adaptive_window_sizes(in_sizes: Sequence[int], out_sizes: Sequence[int], device) -> Tensor:
    """Number of input elements of each adaptive-pooling window (product over dims)."""
    d = torch.ones((), dtype=torch.float64, device=device)
    for L, O in zip(in_sizes, out_sizes):
        i = torch.arange(O, dtype=torch.float64, device=device)
        size = torch.ceil((i + 1) * L / O) - torch.floor(i * L / O)
        d = d.unsqueeze(-1) * size
    return d


def _pool(kind: str, nd: int, x: Tensor, p: float, args: Dict[str, Any]) -> Tensor:
    if kind == "max":
        if _tuple(args.get("dilation", 1), nd) != (1,) * nd:
            raise ValueError("MaxPool with dilation != 1 is not supported")
        if args.get("return_indices", False):
            raise ValueError("MaxPool with return_indices=True is not supported")
        return _sum_pool(x, nd, args["kernel_size"], args.get("stride"), args.get("padding", 0),
                         args.get("ceil_mode", False))
    if kind == "avg":
        kernel, stride, padding = args["kernel_size"], args.get("stride"), args.get("padding", 0)
        ceil_mode = args.get("ceil_mode", False)
        user_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        extra = {} if nd == 1 else {"divisor_override": args.get("divisor_override")}
        ones = torch.ones_like(x)
        avg_ones = user_pool(ones, kernel, stride if stride not in (None, []) else kernel, padding, ceil_mode,
                             args.get("count_include_pad", True), **extra)
        sum_ones = _sum_pool(ones, nd, kernel, stride, padding, ceil_mode)
        inv_divisor = torch.where(sum_ones > 0, avg_ones / sum_ones.clamp_min(1), torch.zeros_like(sum_ones))
        return _sum_pool(x, nd, kernel, stride, padding, ceil_mode) * inv_divisor.pow(p)
    out_size = _tuple(args["output_size"], nd)
    out_size = tuple(x.shape[-nd + i] if o is None else o for i, o in enumerate(out_size))
    adaptive = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    d = _adaptive_window_sizes(x.shape[-nd:], out_size, x.device)
    window_sum = adaptive(x, out_size) * d
    return window_sum if kind == "adaptive_max" else window_sum * d.pow(-p)


def layer_call(m: nn.Module) -> Tuple[Callable, Tuple]:
    """``(fn, geometry)`` with ``fn(x, weight, bias, *geometry)`` the layer's functional form."""
    if isinstance(m, nn.Linear):
        return F.linear, ()
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(m.kernel_size)], (m.stride, m.padding, m.dilation, m.groups)


def _constant_factor(node: torch.fx.Node, p: float) -> float:
    """``|c|^p`` of a multiplication (or division) of activations by the constant c."""
    c = next(a for a in node.args if not isinstance(a, torch.fx.Node))
    if node.target in (operator.truediv, operator.itruediv, torch.div):
        c = 1.0 / c
    return abs(float(c)) ** p


def _module_pool_args(m: nn.Module) -> Tuple[str, int, Dict[str, Any]]:
    nd = int(type(m).__name__[-2])
    if isinstance(m, _MAXPOOL):
        return "max", nd, dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                               ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    if isinstance(m, _AVGPOOL):
        return "avg", nd, dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
                               count_include_pad=m.count_include_pad,
                               divisor_override=getattr(m, "divisor_override", None))
    kind = "adaptive_avg" if isinstance(m, _ADAPTIVE_AVG) else "adaptive_max"
    if isinstance(m, _ADAPTIVE_MAX) and m.return_indices:
        raise ValueError("AdaptiveMaxPool with return_indices=True is not supported")
    return kind, nd, dict(output_size=m.output_size)


def _function_pool_args(node: torch.fx.Node) -> Tuple[str, int, Dict[str, Any]]:
    kind, nd = _POOL_FUNCTIONS[node.target]
    names = {"max": ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
             "avg": ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]}.get(
                 kind, ["output_size", "return_indices"])
    args = dict(zip(names, node.args[1:]))
    args.update(node.kwargs)
    return kind, nd, args


def to_log_scaled(gamma: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """A non-negative float64 gamma vector as a (normalized ``dtype`` vector, float64 log
    scale) pair; an all-zero vector stays zero (the clamp only avoids 0/0)."""
    scale = gamma.amax().clamp_min(torch.finfo(torch.float64).tiny)
    return (gamma / scale).to(dtype), scale.log()


class _DenseGamma(torch.autograd.Function):
    """``y = |W|^p x`` on float64 gamma maps through the dense kernels: |W|^p is never
    materialized, and the backward ``|W|^pT g`` is the read-only fused pass.

    ``record`` receives the layer's log-scaled ``gamma_in`` and ``gamma_out`` (the
    gradient reaching y), exactly what the fused update of W needs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, p: float, record: Dict[str, Any]) -> Tensor:
        from . import ops
        record["gamma_in"] = to_log_scaled(x.reshape(-1), opmath_dtype(weight.dtype))
        y, log_scale = ops.gamma_forward(weight, None, *record["gamma_in"], p)
        ctx.save_for_backward(weight)
        ctx.p, ctx.record = p, record
        return (y.double() * log_scale.exp()).reshape(1, -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        from . import ops
        (weight,) = ctx.saved_tensors
        gamma_out = to_log_scaled(grad.reshape(-1), opmath_dtype(weight.dtype))
        ctx.record["gamma_out"] = gamma_out
        if not ctx.record["input_needs_grad"]:
            return None, None, None, None
        v_in, s_in = ctx.record["gamma_in"]  # unused by a read-only pass, but shaped as the op needs
        g, log_scale = ops.fused_dense_step_(weight, None, None, v_in, s_in, *gamma_out, ctx.p, 0.0, 0.0, 0.0, 0.0,
                                             False, False, False, 0.0, None, None, None)
        return (g.double() * log_scale.exp()).reshape(1, -1), None, None, None


class AbsNetResult:
    """Outputs of one abs-pow network evaluation."""

    def __init__(self) -> None:
        self.total: Optional[Tensor] = None                 # phi_p^p
        self.kappas: Dict[str, Tensor] = {}                 # materialized kappa per parameter name
        # fused Linear name -> (gamma_in, gamma_in log scale, gamma_out, gamma_out log scale), opmath vectors
        self.dense_gammas: Dict[str, Tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.head_input: Optional[Tensor] = None             # evaluation stopped at a dense head: its input
        self.backward_args: Tuple = ()


def _batchnorm_training(name: str, m: nn.Module) -> str:
    return f"pathsgd: module '{name}' ({type(m).__name__}) is in training mode: {_BATCHNORM_WHY}"


class UnsupportedModelError(ValueError):
    """The model cannot be handled; the message is the first reason, ``problems`` lists them all."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__(problems[0])
        self.problems = list(problems)


class GeneralGraph:
    """Path graph of a traced feed-forward DAG (convolutions, pooling, residuals, shared modules)."""

    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule, input_shape: Optional[Tuple[int, ...]],
                 prefix: str = "", shape_optional: bool = False) -> None:
        self.shape_optional = shape_optional
        self.model = model
        self.gm = gm
        self.prefix = prefix
        self.modules = dict(gm.named_modules())
        self._linear_input_rank: Dict[str, int] = {}
        self._tensor_nodes: Set[torch.fx.Node] = set()  # nodes with tensor values (set by the input-shape check)
        self._param_names: Dict[Tuple[str, str], str] = {}
        self.problems: List[str] = []
        self._validate()
        if self.problems:
            raise UnsupportedModelError(self.problems)
        self.input_shape = self._resolve_input_shape(input_shape)
        if self.input_shape is not None:
            self._check_with_input_shape()
        # (Without an input shape, a structure-only graph: names, validation, BatchNorm checks; the
        # optimizer builds the evaluated graph from the shape of the model's forward input.)
        self._fusable = [n for n, m in self.weighted.items()
                         if isinstance(m, nn.Linear) and self.uses[n] == 1 and self._linear_input_rank.get(n) == 2]
        self.head, self.head_input = self._find_dense_head()
        # the dense head's Linear modules, and the fusable Linear modules before it
        self.head_names = frozenset(layer.name for layer in self.head.layers) if self.head is not None else frozenset()
        self.trunk_fusable_linears = [n for n in self._fusable if n not in self.head_names]
        # convolution_backward needs explicit padding: 'same'/'valid' convolutions take autograd.
        self.tape_ok = not any(isinstance(m, _CONV) and isinstance(m.padding, str) for m in self.weighted.values())
        self._tapes: Dict[Optional[torch.fx.Node], Any] = {}

    # ---- structure -------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Every reason the traced model is not supported, in graph order, into ``self.problems``."""
        problems = self.problems
        reported: Set[str] = set()  # modules with a problem: their parameters are not "stray" too

        def fail(message: str, module: Optional[str] = None) -> None:
            problems.append(message)
            if module is not None:
                reported.add(module)

        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            fail(f"pathsgd: {type(self.model).__name__}.forward must take exactly one input tensor, "
                 f"got {[n.target for n in placeholders]}")
            return
        self.weighted: Dict[str, nn.Module] = {}
        self.uses: Dict[str, int] = {}
        self.batchnorms: Dict[str, nn.Module] = {}
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                fail(f"pathsgd: {type(self.model).__name__}.forward reads the tensor attribute "
                     f"'{node.target}' directly; parameters must belong to supported layers ({SUPPORTED})")
                if "." in node.target:
                    reported.add(node.target.rsplit(".", 1)[0])
            if node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, _WEIGHTED):
                    if isinstance(m, _CONV) and m.padding_mode != "zeros":
                        fail(f"pathsgd: module '{node.target}' ({type(m).__name__}) uses padding_mode="
                             f"'{m.padding_mode}'; only zero padding keeps the path graph fixed", node.target)
                    self.weighted[node.target] = m
                    self.uses[node.target] = self.uses.get(node.target, 0) + 1
                elif isinstance(m, _BATCHNORM):
                    self.batchnorms[node.target] = m
                    if m.training:
                        fail(_batchnorm_training(node.target, m))
                elif not isinstance(m, _IDENTITY_MODULES + _SHAPE_MODULES + _MAXPOOL + _AVGPOOL + _ADAPTIVE_AVG
                                    + _ADAPTIVE_MAX):
                    fail(f"pathsgd: {describe_node(node, self.modules)} is not supported: "
                         f"{_why_unsupported(m)}; {SUPPORTED}", node.target)
            elif node.op == "call_function":
                t = node.target
                if t in _MUL:
                    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
                    consts = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
                    if len(tensors) != 1 or len(consts) != 1 or (t in (operator.truediv, operator.itruediv, torch.div)
                                                                 and node.args[0] is not tensors[0]):
                        fail(f"pathsgd: {describe_node(node, self.modules)} multiplies or divides "
                             "activations by something other than a constant number, which is not "
                             f"positively homogeneous; {SUPPORTED}")
                elif t in _ADD:
                    if not all(isinstance(a, torch.fx.Node) for a in node.args[:2]) or "alpha" in node.kwargs:
                        fail(f"pathsgd: {describe_node(node, self.modules)} adds a constant to "
                             f"activations, which is not positively homogeneous; {SUPPORTED}")
                elif not (t in _IDENTITY_FUNCTIONS or t in _SHAPE_FUNCTIONS or t in _CAT or t in _POOL_FUNCTIONS
                          or t in (torch.mean, torch.sum)):
                    fail(f"pathsgd: {describe_node(node, self.modules)} is not supported: it is not "
                         f"known to be positively homogeneous; {SUPPORTED}")
            elif node.op == "call_method":
                if node.target not in _SHAPE_METHODS | _IDENTITY_METHODS | {"mean", "sum"}:
                    fail(f"pathsgd: {describe_node(node, self.modules)} is not supported: it is not "
                         f"known to be positively homogeneous; {SUPPORTED}")
        # Layers whose output never reaches the model output carry no path: leave them out so
        # the stray-parameter check below names their parameters.
        live: Set[torch.fx.Node] = set()
        stack = [n for n in self.gm.graph.nodes if n.op == "output"]
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(node.all_input_nodes)
        live_targets = {n.target for n in live if n.op == "call_module"}
        self.weighted = {name: m for name, m in self.weighted.items() if name in live_targets}
        if not self.weighted:
            fail(f"pathsgd: {type(self.model).__name__} has no Linear or Conv layer; {SUPPORTED}")
        on_paths = {id(t) for t in self.named_parameters().values()}
        bn_params = {id(t) for m in self.batchnorms.values() for t in m.parameters()}
        # PReLU slopes used by the traced graph: parameters of units, not of edges.
        self.unit_params: Dict[str, nn.Parameter] = {}
        for node in live:
            if node.op == "call_module" and isinstance(self.modules[node.target], nn.PReLU):
                self.unit_params[self.param_name(node.target, "weight")] = self.modules[node.target].weight
        unit_ids = {id(t) for t in self.unit_params.values()}
        reported_params = {id(t) for name in reported if name in self.modules for t in self.modules[name].parameters()}
        stray = [n for n, t in self.model.named_parameters() if id(t) not in on_paths and id(t) not in bn_params
                 and id(t) not in unit_ids and id(t) not in reported_params]
        if stray:
            fail(f"pathsgd: parameters {stray} of {type(self.model).__name__} are not on any "
                 f"input-to-output path of supported layers (unused, or used outside a supported "
                 f"layer); {SUPPORTED}")

    def _resolve_input_shape(self, input_shape: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
        has_conv = any(isinstance(m, _CONV) for m in self.weighted.values())
        if input_shape is not None:
            if isinstance(input_shape, int):
                input_shape = (input_shape,)
            if not all(isinstance(d, int) and d > 0 for d in input_shape):
                raise ValueError(f"pathsgd: input_shape must be positive ints without the batch dim, got {input_shape}")
            return tuple(input_shape)
        if has_conv:
            if self.shape_optional:
                return None
            raise ValueError(f"pathsgd: {type(self.model).__name__} has convolutions, so input_shape (the input's "
                             "shape without the batch dimension, e.g. (1, 40)) is required")
        # Follow every use of the input through non-Linear nodes to the first Linear layers.
        placeholder = next(n for n in self.gm.graph.nodes if n.op == "placeholder")
        in_features, frontier, seen = set(), [placeholder], set()
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user in seen or (user.op == "call_method" and user.target in ("size", "dim")):
                    continue
                seen.add(user)
                if user.op == "call_module" and isinstance(self.modules[user.target], nn.Linear):
                    in_features.add(self.modules[user.target].in_features)
                elif user.op != "output":
                    frontier.append(user)
        if len(in_features) == 1:
            return (in_features.pop(),)
        raise ValueError(f"pathsgd: cannot infer the input shape of {type(self.model).__name__}; pass input_shape")

    def _check_with_input_shape(self) -> None:
        try:
            with torch.no_grad():
                self.evaluate(2.0, frozenset(), differentiable=False, need_grads=False, record_ranks=True)
        except (RuntimeError, IndexError) as exc:
            raise ValueError(f"pathsgd: input_shape {self.input_shape} is inconsistent with "
                             f"{type(self.model).__name__}: {exc}") from exc

    def param_name(self, module_name: str, param: str) -> str:
        name = self._param_names.get((module_name, param))
        if name is None:  # computed once: the step looks names up for every parameter
            from .graph import parameter_name
            name = self._param_names[(module_name, param)] = parameter_name(module_name, param, self.prefix)
        return name

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        named = {}
        for name, m in self.weighted.items():
            named[self.param_name(name, "weight")] = m.weight
            if m.bias is not None:
                named[self.param_name(name, "bias")] = m.bias
        return named

    def fusable_linears(self) -> List[str]:
        """Linear modules called once: their kappa is rank-1 and takes the fused dense kernel."""
        return list(self._fusable)

    def _find_dense_head(self) -> Tuple[Optional["DenseChain"], Optional[torch.fx.Node]]:
        """The chain of Linear layers that ends the model (a conv trunk's classifier), and the
        node feeding it. The optimizer runs such a head through the dense-chain kernels (the
        fused update pass yields the gamma_out at its input, which then seeds the trunk's
        backward), so its weights are read once less and no autograd Function is needed.
        ``(None, None)`` unless the model output is that chain, each node of it used once."""
        from .graph import DenseChain, DenseLayer

        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        node, layers = out.args[0], []
        fusable = set(self.fusable_linears())
        while isinstance(node, torch.fx.Node) and len(node.users) == 1:
            tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if node.op == "call_module" and node.target in fusable:
                layers.append(DenseLayer(node.target, self.modules[node.target]))
            elif not ((node.op == "call_module" and isinstance(self.modules[node.target], _IDENTITY_MODULES))
                      or (node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS)
                      or (node.op == "call_method" and node.target in _IDENTITY_METHODS)):
                break
            if len(tensor_args) != 1:
                break
            node = tensor_args[0]
        # The head's input must feed nothing else (its gamma_out is the head's alone) and come
        # from the trunk: a model that is all head is a DenseChain already.
        if not layers or not isinstance(node, torch.fx.Node) or len(node.users) != 1 or node.op == "placeholder":
            return None, None
        return DenseChain(layers[::-1], self.prefix), node

    def check_mode(self, optimized: Set[int]) -> None:
        """BatchNorm must be in eval mode and not optimized, at every step."""
        for name, m in self.batchnorms.items():
            if m.training:
                raise ValueError(_batchnorm_training(name, m))
            for pname, t in m.named_parameters():
                if id(t) in optimized:
                    raise ValueError(f"pathsgd: parameter '{name}.{pname}' of {type(m).__name__} is in the optimizer;"
                                     " BatchNorm is treated as frozen constants, so exclude its parameters, e.g. "
                                     "freeze them before building PathSGD(model):\n\n" + BATCHNORM_FIX + "\n")

    # ---- the abs-pow network ---------------------------------------------------------------------------------
    def evaluate(self, p: float, fused: frozenset, differentiable: bool = False,
                 need_grads: bool = True, record_ranks: bool = False, taped: bool = True) -> AbsNetResult:
        """Run the abs-pow network; with ``need_grads`` also backpropagate ``sum(outputs)``.

        ``fused`` names Linear modules whose kappa is not materialized: their input
        gamma and output gamma (``d total / d output``) are returned instead.
        ``differentiable`` keeps the graph to the real parameters (for path_norm).
        ``taped=False`` backpropagates with autograd even where the VJP tape applies.
        """
        if taped and need_grads and not differentiable and not record_ranks and self._can_tape(fused):
            return self._taped(None).run(p)
        with torch.set_grad_enabled(need_grads or differentiable):
            return self._evaluate(p, fused, differentiable, need_grads, record_ranks)

    def trunk_kappas(self, p: float, fused: frozenset,
                     head_gamma: Callable[[Tensor], Tensor]) -> AbsNetResult:
        """Path scales of the trunk of a model that ends in a dense head (``self.head``): the
        abs-pow network runs up to the head's input x; ``head_gamma(x)`` returns the gamma_out
        there (``d phi_p^p / d x``, from the head's fused passes), which seeds the backward."""
        if self._can_tape(fused - self.head_names):
            return self._taped(self.head_input).run(p, head_gamma)
        with torch.enable_grad():
            result = self._evaluate(p, fused, False, True, False, stop=self.head_input)
            x = result.head_input
            with torch.no_grad():  # the head's passes update parameters in place
                gamma_out = head_gamma(x.detach()).reshape(x.shape)
            self._backward(result, x, gamma_out, *result.backward_args)
        return result

    def _evaluate(self, p: float, fused: frozenset, differentiable: bool, need_grads: bool,
                  record_ranks: bool, stop: Optional[torch.fx.Node] = None) -> AbsNetResult:
        first = next(iter(self.weighted.values())).weight
        device = first.device
        result = AbsNetResult()
        leaves: Dict[str, Tensor] = {}
        records: Dict[str, Dict[str, Any]] = {}
        dense_inputs: List[Tensor] = []  # leaves that make every fused layer's backward run

        def a(name: str, t: Tensor, leaf: bool) -> Tensor:
            if name in leaves:
                return leaves[name]
            v = abs_pow((t if differentiable else t.detach()).to(device=device, dtype=torch.float64), p)
            if leaf and need_grads and not differentiable:
                v.requires_grad_(True)
            leaves[name] = v
            return v

        if need_grads and not differentiable:
            self.abs_pow_leaves(leaves, p, fused, device, self.head_names if stop is not None else frozenset())
        env: Dict[torch.fx.Node, Any] = {}

        def val(x: Any) -> Any:
            return torch.fx.node.map_arg(x, lambda n: env[n])

        out_nodes: List[Tensor] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = torch.ones((1,) + self.input_shape, dtype=torch.float64, device=device)
            elif node.op == "output":
                torch.fx.node.map_arg(node.args[0], lambda n: out_nodes.append(env[n]))
            elif node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, _WEIGHTED):
                    x = val(node.args[0])
                    is_fused = node.target in fused and need_grads and not differentiable
                    b = a(self.param_name(node.target, "bias"), m.bias, leaf=True) if m.bias is not None else None
                    x = x if x.device == device else x.to(device)
                    if record_ranks and isinstance(m, nn.Linear):
                        self._linear_input_rank[node.target] = x.dim()
                    if is_fused:  # a Linear called once on a vector: kappa stays rank-1, never materialized
                        record = records[node.target] = {"input_needs_grad": x.requires_grad}
                        if not x.requires_grad:
                            x = x.detach().requires_grad_(True)
                            dense_inputs.append(x)
                        y = _DenseGamma.apply(x, m.weight.detach(), p, record)
                        y = y + b if b is not None else y
                    else:
                        y = self.layer_forward(m, x, a(self.param_name(node.target, "weight"), m.weight, leaf=True), b)
                    env[node] = y
                else:
                    env[node] = self._constant_node(node, val, p)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._constant_node(node, val, p)
            if node is stop:
                # The caller seeds the backward with the head's gamma_out (trunk_kappas).
                result.head_input = env[node]
                result.backward_args = (leaves, dense_inputs, records)
                return result
        result.total = sum(o.sum() for o in out_nodes)
        if record_ranks:
            self._tensor_nodes = {n for n, v in env.items() if isinstance(v, Tensor)}
        if need_grads and not differentiable:
            self._backward(result, result.total, None, leaves, dense_inputs, records)
        return result

    def _can_tape(self, fused: frozenset) -> bool:
        """Fused Linear layers need their autograd Function, so only evaluations without them tape."""
        return self.tape_ok and not fused

    def _taped(self, stop: Optional[torch.fx.Node]) -> Any:
        """The taped evaluation of the network up to ``stop`` (the model output when None), built once."""
        if stop not in self._tapes:
            from .taped import TapedEvaluation
            self._tapes[stop] = TapedEvaluation(self, stop)
        return self._tapes[stop]

    def abs_pow_leaves(self, leaves: Dict[str, Tensor], p: float, fused: frozenset, device: torch.device,
                       skip: frozenset) -> None:
        """``|w|^p`` in float64 of every parameter the evaluation reads as a tensor (not the
        weights of ``fused`` layers nor the modules in ``skip``), as autograd leaves, in one batch."""
        names, tensors = [], []
        for name, m in self.weighted.items():
            if name in skip:
                continue
            if name not in fused:
                names.append(self.param_name(name, "weight"))
                tensors.append(m.weight)
            if m.bias is not None:
                names.append(self.param_name(name, "bias"))
                tensors.append(m.bias)
        if not tensors:
            return
        with torch.no_grad():
            values = abs_pow_list([t.to(device=device, dtype=torch.float64) for t in tensors], p)
        for name, v in zip(names, values):
            leaves[name] = v.requires_grad_(True)

    def _backward(self, result: AbsNetResult, output: Tensor, grad_output: Optional[Tensor],
                  leaves: Dict[str, Tensor], dense_inputs: List[Tensor], records: Dict[str, Dict[str, Any]]) -> None:
        """kappa of every leaf (d output / d |w|^p, seeded with ``grad_output``) and the gamma
        pairs of the fused Linear layers, into ``result``."""
        grad_leaves = {n: t for n, t in leaves.items() if t.requires_grad}
        inputs = list(grad_leaves.values()) + dense_inputs
        grads = torch.autograd.grad(output, inputs, grad_outputs=grad_output, allow_unused=True) \
            if inputs and output.requires_grad else [None] * len(inputs)
        for (name, t), g in zip(grad_leaves.items(), grads):
            result.kappas[name] = g if g is not None else torch.zeros_like(t)
        for name, record in records.items():
            device = record["gamma_in"][0].device
            record.setdefault("gamma_out", (torch.zeros(self.weighted[name].out_features,
                                                        dtype=record["gamma_in"][0].dtype, device=device),
                                            torch.zeros((), dtype=torch.float64, device=device)))
            result.dense_gammas[name] = (*record["gamma_in"], *record["gamma_out"])

    @staticmethod
    def layer_forward(m: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """A Linear or Conv layer of the abs-pow network: ``m``'s geometry with |W|^p and |b|^p."""
        fn, geometry = layer_call(m)
        return fn(x, weight, bias, *geometry)

    def _constant_node(self, node: torch.fx.Node, val: Callable, p: float) -> Any:
        """The value of a node without parameters of its own: a linear map of its tensor
        inputs (plus a constant for BatchNorm) in the abs-pow network."""
        if node.op == "call_function":
            return self._call_function(node, val, p)
        if node.op == "call_method":
            return self._call_method(node, val, p)
        m = self.modules[node.target]
        x = val(node.args[0])
        if isinstance(m, _BATCHNORM):
            return self._batchnorm(m, x, p)
        if isinstance(m, _IDENTITY_MODULES):
            return x
        if isinstance(m, _SHAPE_MODULES):
            return m(x)
        kind, nd, args = _module_pool_args(m)
        return _pool(kind, nd, x, p, args)

    @staticmethod
    def _batchnorm(m: nn.Module, x: Tensor, p: float) -> Tensor:
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"pathsgd: {type(m).__name__} without running statistics (track_running_stats=False) "
                             "normalizes by batch statistics, which breaks node-rescaling invariance")
        var = m.running_var.double().to(x.device)
        mean = m.running_mean.double().to(x.device)
        scale = 1.0 / torch.sqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach().double().to(x.device)
        shift = -mean * scale
        if m.bias is not None:
            shift = shift + m.bias.detach().double().to(x.device)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * abs_pow(scale, p).view(shape) + abs_pow(shift, p).view(shape)

    def _call_function(self, node: torch.fx.Node, val, p: float) -> Any:
        t = node.target
        if t in _IDENTITY_FUNCTIONS:
            return val(node.args[0])
        if t in _ADD:
            return val(node.args[0]) + val(node.args[1])
        if t in _MUL:
            return val(next(a for a in node.args if isinstance(a, torch.fx.Node))) * _constant_factor(node, p)
        if t in _POOL_FUNCTIONS:
            kind, nd, args = _function_pool_args(node)
            return _pool(kind, nd, val(node.args[0]), p, args)
        if t is torch.mean:
            return self._mean(val(node.args[0]), node, p)
        # Shapes, concatenation and sums act on gamma maps exactly as on activations.
        return t(*val(node.args), **val(node.kwargs))

    def _call_method(self, node: torch.fx.Node, val, p: float) -> Any:
        if node.target in _IDENTITY_METHODS:
            return val(node.args[0])
        if node.target == "mean":
            return self._mean(val(node.args[0]), node, p)
        obj, *args = val(node.args)
        return getattr(obj, node.target)(*args, **val(node.kwargs))

    @staticmethod
    def _mean(x: Tensor, node: torch.fx.Node, p: float) -> Tensor:
        """A mean over n elements is a sum with constant edges 1/n."""
        kwargs = dict(node.kwargs)
        dims = node.args[1] if len(node.args) > 1 else kwargs.pop("dim", None)
        keepdim = node.args[2] if len(node.args) > 2 else kwargs.pop("keepdim", False)
        if dims is None:
            dims = tuple(range(x.dim()))
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        n = math.prod(x.shape[d] for d in dims)
        return x.sum(dim=dims, keepdim=keepdim) * float(n) ** -p
