"""THE path-graph IR: a model traced once, every fx node lowered once to a typed path op.

The path graph of a network has a unit per neuron and an edge per scalar weight (a bias is an
edge from a constant unit). Its *abs-pow network* is the model with every weight w replaced by
``|w|^p``, every bias b by ``|b|^p``, every constant edge c by ``|c|^p`` and every non-linearity
by the identity, fed an all-ones input of ``input_shape`` (float64, batch 1): its activations are
the gamma maps, ``phi_p^p`` is the sum of its outputs, and ``kappa = d phi_p^p / d |w|^p``.

:func:`build_path_graph` traces the model with ``torch.fx`` and lowers each node through ONE
table, :data:`OP_TABLE`: an entry says which modules, functions and methods it covers, how a node
is checked and lowered (its error text for what it refuses), what it computes in the abs-pow
network (``forward``) and, where there is a closed form, its vector-Jacobian product (``vjp``).
A node no entry covers is refused with the reason from :data:`UNSUPPORTED_MODULES` (or "not known
to be positively homogeneous"), so the support and the errors cannot disagree. Everything else
(:mod:`pathsgd.eval_dense`, :mod:`pathsgd.eval_tape`, :mod:`pathsgd.eval_autograd`, the step)
reads this IR, never the fx nodes.

Edge conventions (documented choices): MaxPool is a sum over its window (see
:mod:`pathsgd.pooling`); AvgPool / AdaptiveAvgPool / mean have constant edges 1/d; residual
additions and concatenation have edges of weight 1; ``x * c`` for a Python number c is an edge of
weight c; BatchNorm in eval mode is a per-channel edge ``a = weight / sqrt(var + eps)`` and a
constant bias ``beta - mean * a`` (its parameters must not be optimized).
"""
from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import pooling
from .reference import abs_pow, const_pow, sum_pool_vjp

# ---- op kinds -----------------------------------------------------------------------------------------------
INPUT = "input"            # the all-ones input
LAYER = "layer"            # Linear / Conv: the only ops with parameters on paths
ALIAS = "alias"            # identity units (ReLU, Dropout, ...): the abs-pow network drops them
RESHAPE = "reshape"        # flatten / view / ...: the same values in another shape
ADD = "add"                # residual addition: edges of weight 1
SCALE = "scale"            # x * c for a number c: edges |c|^p
SUMPOOL = "sumpool"        # max pooling: a window sum
AVGPOOL = "avgpool"
ADAPTIVE = "adaptive"      # adaptive average / max pooling
MEAN = "mean"              # a mean over dims: edges 1/n
BATCHNORM = "batchnorm"    # eval-mode BatchNorm: a constant scale and shift
LINEAR_MAP = "linear_map"  # cat, sum, slicing, permute, ...: act on gamma maps as on activations
SHAPE_QUERY = "shape_query"  # x.size(), x.dim(), x.shape: not on any path
CIRCULAR_PAD = "circular_pad"  # the padding of a circular convolution (lowered from the layer, no fx node)

CONV_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# A transposed convolution is a linear map with shared weights: kappa sums over all its edges.
CONV_TRANSPOSE_TYPES: Tuple[type, ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES: Tuple[type, ...] = (nn.Linear,) + CONV_TYPES + CONV_TRANSPOSE_TYPES
BATCHNORM_TYPES: Tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Ref:
    """A reference to the value of IR node ``index`` inside an op's recorded call arguments."""
    index: int


@dataclass(frozen=True)
class Call:
    """A recorded call (function, tensor method or parameter-free module) whose arguments hold
    :class:`Ref` for IR values: replayed on gamma maps by :meth:`run`."""
    target: Any
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    method: bool = False

    def run(self, env: Any) -> Any:
        def value(a: Any) -> Any:
            return env[a.index] if isinstance(a, Ref) else a
        args = torch.fx.node.map_aggregate(self.args, value)
        kwargs = torch.fx.node.map_aggregate(self.kwargs, value)
        if self.method:
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


def _pruned(module: nn.Module, kind: str) -> bool:
    """``torch.nn.utils.prune`` replaced ``kind`` by ``kind_orig`` (a parameter) times ``kind_mask``."""
    return isinstance(getattr(module, f"{kind}_orig", None), nn.Parameter) and hasattr(module, f"{kind}_mask")


class Layer:
    """A weighted module (Linear or Conv) of the path graph; weights are read from the module on
    every access, so replaced or cast parameters are always current.

    ``weight`` / ``bias`` are the effective tensors on the paths; ``weight_param`` / ``bias_param`` the
    parameters the optimizer updates (``weight_name`` / ``bias_name`` their public names). They differ
    for a pruned layer (``torch.nn.utils.prune``): the effective weight is ``weight_orig * weight_mask``,
    freshly multiplied on every access, and ``weight_orig`` is updated with the kappa of that product."""

    def __init__(self, name: str, module: nn.Module, prefix: str) -> None:
        self.name = name
        self.module = module
        self.weight_pruned = _pruned(module, "weight")
        self.bias_pruned = _pruned(module, "bias")
        self.pruned = self.weight_pruned or self.bias_pruned
        self.weight_name = parameter_name(name, "weight_orig" if self.weight_pruned else "weight", prefix)
        has_bias = self.bias_pruned or module.bias is not None
        self.bias_name = parameter_name(name, "bias_orig" if self.bias_pruned else "bias", prefix) if has_bias else None
        self.conv = isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES)  # kappa materialized, input maps
        self.transposed = isinstance(module, CONV_TRANSPOSE_TYPES)
        if self.transposed:
            self.fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(module.kernel_size)]
            self.padding = module.padding
            self.geometry = (module.stride, module.padding, module.output_padding, module.groups, module.dilation)
        elif self.conv:
            self.fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
            # a circular convolution's padding is its own IR node before the layer
            self.padding = (0,) * len(module.kernel_size) if module.padding_mode == "circular" else module.padding
            self.geometry: Tuple = (module.stride, self.padding, module.dilation, module.groups)
        else:
            self.fn, self.geometry = F.linear, ()
        self.uses = 0  # calls in the traced graph (a module called twice shares its weights)

    @property
    def weight(self) -> Tensor:
        m = self.module
        return m.weight_orig * m.weight_mask if self.weight_pruned else m.weight

    @property
    def bias(self) -> Optional[Tensor]:
        m = self.module
        return m.bias_orig * m.bias_mask if self.bias_pruned else m.bias

    @property
    def weight_param(self) -> nn.Parameter:
        return self.module.weight_orig if self.weight_pruned else self.module.weight

    @property
    def bias_param(self) -> Optional[nn.Parameter]:
        return self.module.bias_orig if self.bias_pruned else self.module.bias

    def effective(self, kind: str) -> Tensor:
        return self.weight if kind == "weight" else self.bias

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The layer of the abs-pow network: this layer's geometry with |W|^p and |b|^p."""
        return self.fn(x, weight, bias, *self.geometry)


@dataclass
class PathNode:
    """One IR node: ``kind`` from :data:`OP_TABLE`, ``inputs`` the nodes whose gamma flows into it,
    ``refs`` every node its evaluation reads (inputs and shape queries), ``data`` its lowered
    arguments. ``is_tensor``, ``shape`` (of its value in the abs-pow network, batch 1) and
    ``input_rank`` are written by the shape propagation."""
    index: int
    name: str
    kind: str
    inputs: Tuple[int, ...]
    refs: Tuple[int, ...]
    data: Any
    is_tensor: bool = True
    shape: Optional[Tuple[int, ...]] = None
    input_rank: Optional[int] = None


# ---- the op table -------------------------------------------------------------------------------------------
Forward = Callable[[PathNode, Any, float], Any]       # (node, env, p) -> value in the abs-pow network
Vjp = Callable[[PathNode, Tensor, Any, float], List[Optional[Tensor]]]  # -> a gradient per input


@dataclass(frozen=True)
class OpRule:
    """One entry of :data:`OP_TABLE`: what it covers, how it lowers, what it means."""
    kind: str
    what: str                                          # for the "supported:" list of error messages
    lower: Callable[["_Lowering", torch.fx.Node, Optional[nn.Module]], Tuple[Tuple[int, ...], Any]]
    forward: Optional[Forward]                         # None only for INPUT and LAYER (evaluator-specific)
    vjp: Optional[Vjp] = None                          # closed form; None: autograd through ``forward``
    # The op in the max-times semiring, log domain (p = inf): a node's value is the log of the largest path
    # product reaching it; sums become maxima and products sums.
    forward_max: Optional[Forward] = None
    modules: Tuple[type, ...] = ()
    functions: FrozenSet[Any] = frozenset()
    methods: FrozenSet[str] = frozenset()

    def covers(self, node: torch.fx.Node, module: Optional[nn.Module]) -> bool:
        if node.op == "call_module":
            return isinstance(module, self.modules)
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods


class _Lowering:
    """State of one lowering pass: the graph being built and the problems found."""

    def __init__(self, graph: "PathGraph", modules: Dict[str, nn.Module]) -> None:
        self.graph = graph
        self.modules = modules
        self.index: Dict[torch.fx.Node, int] = {}
        self.reported: Set[str] = set()  # modules with a problem: their parameters are not "stray" too

    def fail(self, message: str, module: Optional[str] = None) -> None:
        self.graph.problems.append(message)
        if module is not None:
            self.reported.add(module)

    def ref(self, a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: Ref(self.index[n]))

    def call(self, node: torch.fx.Node, module: Optional[nn.Module]) -> Call:
        target = module if node.op == "call_module" else node.target
        return Call(target, self.ref(node.args), self.ref(dict(node.kwargs)), node.op == "call_method")

    def emit(self, name: str, kind: str, inputs: Tuple[int, ...], data: Any) -> int:
        """An extra IR node before the one being lowered (e.g. the padding of a circular convolution)."""
        index = len(self.graph.nodes)
        self.graph.nodes.append(PathNode(index, name, kind, inputs, inputs, data))
        return index

    def first_input(self, node: torch.fx.Node) -> Tuple[int, ...]:
        return (self.index[node.args[0]],)

    def tensor_inputs(self, node: torch.fx.Node) -> Tuple[int, ...]:
        return tuple(self.index[n] for n in node.all_input_nodes)


def describe_node(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (fx node '{node.name}')"
    if node.op == "call_method":
        return f"method .{node.target}() (fx node '{node.name}')"
    return f"{node.op} '{node.target}'"


# Lowering rules: check the node (``ctx.fail`` with the reason) and return (inputs, data).
def _lower_layer(ctx: _Lowering, node: torch.fx.Node, m: nn.Module) -> Tuple[Tuple[int, ...], Any]:
    if isinstance(m, CONV_TYPES + CONV_TRANSPOSE_TYPES) and m.padding_mode not in ("zeros", "circular"):
        ctx.fail(f"pathsgd: module '{node.target}' ({type(m).__name__}) uses padding_mode='{m.padding_mode}', "
                 "which is not supported (zero and circular padding are)", node.target)
    layer = ctx.graph.layers.get(node.target)
    if layer is None:
        layer = ctx.graph.layers[node.target] = Layer(node.target, m, ctx.graph.prefix)
    layer.uses += 1
    inputs = ctx.first_input(node)
    if isinstance(m, CONV_TYPES) and m.padding_mode == "circular":  # its own node: a linear map before the layer
        inputs = (ctx.emit(node.name + "_circular_pad", CIRCULAR_PAD, inputs, tuple(m._reversed_padding_repeated_twice)),)
    return inputs, layer


def _lower_batchnorm(ctx: _Lowering, node: torch.fx.Node, m: nn.Module) -> Tuple[Tuple[int, ...], Any]:
    ctx.graph.batchnorms[node.target] = m
    if m.training:
        ctx.fail(batchnorm_training(node.target, m))
    elif m.running_mean is None or m.running_var is None:
        ctx.fail(f"pathsgd: module '{node.target}' ({type(m).__name__}) has no running statistics "
                 "(track_running_stats=False): it normalizes by batch statistics, which breaks node-rescaling "
                 "invariance", node.target)
    return ctx.first_input(node), m


def _lower_alias(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    return ctx.first_input(node), (node.target if m is not None else None)  # the module's name


def _lower_replay(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    return ctx.first_input(node), ctx.call(node, m)


def _lower_linear_map(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    return ctx.tensor_inputs(node), ctx.call(node, m)


def _lower_shape_query(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    return (), ctx.call(node, m)


_DIVISIONS = {operator.truediv, operator.itruediv, torch.div}


def _lower_scale(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    consts = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(tensors) != 1 or len(consts) != 1 or node.kwargs or (node.target in _DIVISIONS
                                                                and node.args[0] is not tensors[0]):
        ctx.fail(f"pathsgd: {describe_node(node, ctx.modules)} multiplies or divides activations by something "
                 f"other than a constant number, which is not positively homogeneous; {SUPPORTED}")
        return ctx.tensor_inputs(node), 1.0
    c = float(consts[0])
    return (ctx.index[tensors[0]],), (1.0 / c if node.target in _DIVISIONS else c)


def _lower_add(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    if len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args) or node.kwargs:
        ctx.fail(f"pathsgd: {describe_node(node, ctx.modules)} adds a constant to activations, which is not "
                 f"positively homogeneous; {SUPPORTED}")
        return ctx.tensor_inputs(node), None
    return (ctx.index[node.args[0]], ctx.index[node.args[1]]), None


_MAXPOOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_MAXPOOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVGPOOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVGPOOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_TYPES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool1d: (1, True), F.adaptive_avg_pool2d: (2, True),
                       F.adaptive_avg_pool3d: (3, True), F.adaptive_max_pool1d: (1, False),
                       F.adaptive_max_pool2d: (2, False), F.adaptive_max_pool3d: (3, False)}


def _call_args(node: torch.fx.Node, names: Sequence[str]) -> Dict[str, Any]:
    """A function call's arguments after the input, by name."""
    args = dict(zip(names, node.args[1:]))
    args.update(node.kwargs)
    return args


def _lower_sumpool(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    if m is not None:
        nd = int(type(m).__name__[-2])
        args = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                    ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    else:
        nd = _MAXPOOL_FUNCTIONS[node.target]
        args = _call_args(node, ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"])
    where = describe_node(node, ctx.modules)
    if args.get("return_indices", False):
        ctx.fail(f"pathsgd: {where} has return_indices=True, which is not supported", node.target if m else None)
    geometry = pooling.sum_pool_args(nd, args["kernel_size"], args.get("stride"), args.get("padding", 0))
    dilation = pooling.as_tuple(args.get("dilation", 1), nd)
    dilation = (1,) + dilation if nd == 1 else dilation  # lifted like the geometry
    return ctx.first_input(node), (nd, geometry, bool(args.get("ceil_mode", False)), dilation)


def _lower_avgpool(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    if m is not None:
        nd = int(type(m).__name__[-2])
        args = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
                    count_include_pad=m.count_include_pad, divisor_override=getattr(m, "divisor_override", None))
    else:
        nd = _AVGPOOL_FUNCTIONS[node.target]
        args = _call_args(node, ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"])
    return ctx.first_input(node), (nd, args["kernel_size"], args.get("stride"), args.get("padding", 0),
                                   bool(args.get("ceil_mode", False)), bool(args.get("count_include_pad", True)),
                                   args.get("divisor_override"))


def _lower_adaptive(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    if m is not None:
        nd, average = int(type(m).__name__[-2]), "Avg" in type(m).__name__
        output_size, return_indices = m.output_size, getattr(m, "return_indices", False)
    else:
        nd, average = _ADAPTIVE_FUNCTIONS[node.target]
        args = _call_args(node, ["output_size", "return_indices"])
        output_size, return_indices = args["output_size"], args.get("return_indices", False)
    if return_indices:
        ctx.fail(f"pathsgd: {describe_node(node, ctx.modules)} has return_indices=True, which is not supported",
                 node.target if m else None)
    return ctx.first_input(node), (nd, output_size, average)


def _lower_mean(ctx: _Lowering, node: torch.fx.Node, m: Optional[nn.Module]) -> Tuple[Tuple[int, ...], Any]:
    kwargs = dict(node.kwargs)
    dims = node.args[1] if len(node.args) > 1 else kwargs.pop("dim", None)
    keepdim = node.args[2] if len(node.args) > 2 else kwargs.pop("keepdim", False)
    if kwargs:
        ctx.fail(f"pathsgd: {describe_node(node, ctx.modules)} has arguments {sorted(kwargs)}, which are not "
                 "supported (only dim and keepdim)")
    return ctx.first_input(node), (dims, bool(keepdim))


# Forward rules: the node's value in the abs-pow network (autograd-differentiable).
def _forward_alias(node: PathNode, env: Any, p: float) -> Any:
    return env[node.inputs[0]]


def _forward_call(node: PathNode, env: Any, p: float) -> Any:
    return node.data.run(env)


def _forward_add(node: PathNode, env: Any, p: float) -> Tensor:
    return env[node.inputs[0]] + env[node.inputs[1]]


def _forward_scale(node: PathNode, env: Any, p: float) -> Tensor:
    return env[node.inputs[0]] * const_pow(node.data, p)


def _forward_sumpool(node: PathNode, env: Any, p: float) -> Tensor:
    nd, geometry, ceil_mode, dilation = node.data
    return pooling.sum_pool(env[node.inputs[0]], nd, geometry, ceil_mode, dilation)


def _forward_circular_pad(node: PathNode, env: Any, p: float) -> Tensor:
    return F.pad(env[node.inputs[0]], node.data, mode="circular")  # every padded unit copies one input unit


def _forward_avgpool(node: PathNode, env: Any, p: float) -> Tensor:
    return pooling.avg_pool(env[node.inputs[0]], p, *node.data)


def _forward_adaptive(node: PathNode, env: Any, p: float) -> Tensor:
    return pooling.adaptive_pool(env[node.inputs[0]], p, *node.data)


def _forward_mean(node: PathNode, env: Any, p: float) -> Tensor:
    x = env[node.inputs[0]]
    dims, keepdim = node.data
    dims = tuple(range(x.dim())) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
    n = math.prod(x.shape[d] for d in dims)
    return x.sum(dim=dims, keepdim=keepdim) * float(n) ** -p


def batchnorm_constants(m: nn.Module, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel, in float64."""
    var = m.running_var.double().to(device)
    scale = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.detach().double().to(device)
    shift = -m.running_mean.double().to(device) * scale
    if m.bias is not None:
        shift = shift + m.bias.detach().double().to(device)
    return scale, shift


def _forward_batchnorm(node: PathNode, env: Any, p: float) -> Tensor:
    x = env[node.inputs[0]]
    scale, shift = batchnorm_constants(node.data, x.device)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * abs_pow(scale, p).view(shape) + abs_pow(shift, p).view(shape)


# Max-times rules (p = inf, log domain: log 0 = -inf).
def log_abs_constant(c: float) -> float:
    """``log |c|`` of a constant edge (-inf for 0: no edge)."""
    return math.log(abs(c)) if c != 0 else float("-inf")


def _max_linear_map(node: PathNode, env: Any, p: float) -> Any:
    call = node.data
    if (not call.method and call.target is torch.sum) or (call.method and call.target == "sum"):
        call = Call(torch.amax if not call.method else "amax", call.args, call.kwargs, call.method)
    return call.run(env)


def _max_add(node: PathNode, env: Any, p: float) -> Tensor:
    return torch.maximum(env[node.inputs[0]], env[node.inputs[1]])


def _max_scale(node: PathNode, env: Any, p: float) -> Tensor:
    return env[node.inputs[0]] + log_abs_constant(node.data)


def _max_sumpool(node: PathNode, env: Any, p: float) -> Tensor:
    nd, geometry, ceil_mode, dilation = node.data
    return pooling.max_window(env[node.inputs[0]], nd, geometry, ceil_mode, dilation)


def _max_avgpool(node: PathNode, env: Any, p: float) -> Tensor:
    return pooling.avg_pool_max(env[node.inputs[0]], *node.data)


def _max_adaptive(node: PathNode, env: Any, p: float) -> Tensor:
    return pooling.adaptive_pool_max(env[node.inputs[0]], *node.data)


def _max_mean(node: PathNode, env: Any, p: float) -> Tensor:
    x = env[node.inputs[0]]
    dims, keepdim = node.data
    dims = tuple(range(x.dim())) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
    n = math.prod(x.shape[d] for d in dims)
    return x.amax(dim=dims, keepdim=keepdim) - math.log(n)


def _max_batchnorm(node: PathNode, env: Any, p: float) -> Tensor:
    x = env[node.inputs[0]]
    scale, shift = batchnorm_constants(node.data, x.device)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.maximum(x + scale.abs().log().view(shape), shift.abs().log().view(shape))


# Closed-form VJPs (the rest go through autograd of their forward rule).
def _vjp_alias(node: PathNode, gy: Tensor, env: Any, p: float) -> List[Optional[Tensor]]:
    return [gy]


def _vjp_reshape(node: PathNode, gy: Tensor, env: Any, p: float) -> List[Optional[Tensor]]:
    return [gy.reshape(env[node.inputs[0]].shape)]


def _vjp_add(node: PathNode, gy: Tensor, env: Any, p: float) -> List[Optional[Tensor]]:
    return [gy.sum_to_size(env[i].shape) for i in node.inputs]


def _vjp_scale(node: PathNode, gy: Tensor, env: Any, p: float) -> List[Optional[Tensor]]:
    return [gy * const_pow(node.data, p)]


def _vjp_sumpool(node: PathNode, gy: Tensor, env: Any, p: float) -> List[Optional[Tensor]]:
    nd, geometry, ceil_mode, dilation = node.data
    x = env[node.inputs[0]]
    if any(d != 1 for d in dilation):  # a dilated window sum: the transpose of its depthwise convolution
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            return [torch.autograd.grad(pooling.sum_pool(leaf, nd, geometry, ceil_mode, dilation), leaf, gy)[0]]
    return [sum_pool_vjp(gy, x, nd, geometry, ceil_mode)]


_IDENTITY_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                     nn.Dropout3d)
_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})

OP_TABLE: Tuple[OpRule, ...] = (
    OpRule(LAYER, "Linear, Conv1d/2d/3d (zero or circular padding), ConvTranspose1d/2d/3d", _lower_layer, None,
           modules=LAYER_TYPES),
    # PReLU is positively homogeneous for any slope (max(0, cx) + a min(0, cx) = c PReLU(x), c > 0): an
    # identity unit whose slope is on no path (updated with its plain gradient).
    OpRule(ALIAS, "ReLU, LeakyReLU, PReLU, Identity, Dropout/Dropout1d/2d/3d", _lower_alias, _forward_alias,
           _vjp_alias, forward_max=_forward_alias, modules=_IDENTITY_MODULES,
           functions=frozenset({F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.dropout, F.dropout1d,
                                F.dropout2d, F.dropout3d}),
           methods=frozenset({"relu", "relu_"})),
    OpRule(RESHAPE, "Flatten/Unflatten/reshape/view", _lower_replay, _forward_call, _vjp_reshape,
           forward_max=_forward_call, modules=(nn.Flatten, nn.Unflatten),
           functions=frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}),
           methods=frozenset({"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "view_as",
                              "reshape_as"})),
    OpRule(SUMPOOL, "MaxPool", _lower_sumpool, _forward_sumpool, _vjp_sumpool, _max_sumpool, modules=_MAXPOOL_TYPES,
           functions=frozenset(_MAXPOOL_FUNCTIONS)),
    OpRule(AVGPOOL, "AvgPool", _lower_avgpool, _forward_avgpool, forward_max=_max_avgpool, modules=_AVGPOOL_TYPES,
           functions=frozenset(_AVGPOOL_FUNCTIONS)),
    OpRule(ADAPTIVE, "AdaptiveAvgPool/AdaptiveMaxPool", _lower_adaptive, _forward_adaptive, forward_max=_max_adaptive,
           modules=_ADAPTIVE_TYPES,
           functions=frozenset(_ADAPTIVE_FUNCTIONS)),
    OpRule(MEAN, "mean/sum over dims", _lower_mean, _forward_mean, forward_max=_max_mean,
           functions=frozenset({torch.mean}),
           methods=frozenset({"mean"})),
    OpRule(ADD, "residual additions", _lower_add, _forward_add, _vjp_add, _max_add, functions=_ADD_FUNCTIONS),
    OpRule(LINEAR_MAP, "torch.cat, slicing, permute/transpose", _lower_linear_map, _forward_call,
           forward_max=_max_linear_map,
           functions=frozenset({torch.cat, torch.concat, torch.concatenate, torch.sum, operator.getitem,
                                torch.permute, torch.transpose}),
           methods=frozenset({"sum", "permute", "transpose"})),
    OpRule(SHAPE_QUERY, "size/dim/shape queries", _lower_shape_query, _forward_call, forward_max=_forward_call,
           functions=frozenset({getattr}), methods=frozenset({"size", "dim"})),
    OpRule(SCALE, "multiplication by a constant", _lower_scale, _forward_scale, _vjp_scale, _max_scale,
           functions=frozenset({operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv,
                                torch.div})),
    # Produced by the lowering of Conv(padding_mode='circular'): covers no fx node of its own.
    OpRule(CIRCULAR_PAD, "circular padding of convolutions", _lower_shape_query, _forward_circular_pad,
           forward_max=_forward_circular_pad),
    OpRule(BATCHNORM, "BatchNorm in eval mode with frozen parameters", _lower_batchnorm, _forward_batchnorm,
           forward_max=_max_batchnorm, modules=BATCHNORM_TYPES),
)
RULES: Dict[str, OpRule] = {rule.kind: rule for rule in OP_TABLE}

SUPPORTED = "supported: " + ", ".join(rule.what for rule in OP_TABLE)

# What a training loop runs after model.train() to keep BatchNorm frozen and Dropout active.
BATCHNORM_FIX = ("for m in model.modules():\n"
                 "    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):\n"
                 "        m.eval()                 # running statistics: a fixed per-channel scale and shift\n"
                 "        m.requires_grad_(False)  # its affine parameters are constants of the path graph")
_BATCHNORM_WHY = ("BatchNorm in training mode normalizes by batch statistics, which undoes node rescaling. Keep "
                  "it in eval mode with frozen parameters (Dropout and the rest of the model stay in training mode); "
                  "run this after model.train() (and before building PathSGD):\n\n" + BATCHNORM_FIX + "\n")

# The modules known to break node-rescaling invariance, with the reason (the refusing half of the table).
UNSUPPORTED_MODULES: Tuple[Tuple[Tuple[type, ...], str], ...] = (
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
)


def known_unsupported(module: nn.Module) -> Optional[str]:
    """Why ``module`` breaks node-rescaling invariance, for the layers known to (else None)."""
    for types, why in UNSUPPORTED_MODULES:
        if isinstance(module, types):
            return why
    return None


def batchnorm_training(name: str, m: nn.Module) -> str:
    return f"pathsgd: module '{name}' ({type(m).__name__}) is in training mode: {_BATCHNORM_WHY}"


def rule_for(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[OpRule]:
    """The table entry covering an fx node (None: unsupported)."""
    module = modules[node.target] if node.op == "call_module" else None
    return next((rule for rule in OP_TABLE if rule.covers(node, module)), None)


# ---- tracing ------------------------------------------------------------------------------------------------
def parameter_name(module_name: str, param: str, prefix: str = "") -> str:
    """Public name of a layer's parameter, as in ``model.named_parameters()``; ``prefix`` is the
    name under which a bare layer was wrapped for tracing, stripped again."""
    name = f"{module_name}.{param}"
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _sharded_types() -> Tuple[type, ...]:
    types = []
    for module_path, name in (("torch.distributed.fsdp", "FullyShardedDataParallel"),
                              ("torch.distributed.fsdp", "FSDPModule"),
                              ("torch.distributed.tensor", "DTensor")):
        try:
            types.append(getattr(__import__(module_path, fromlist=[name]), name))
        except (ImportError, AttributeError):  # older torch or no distributed support
            pass
    return tuple(types)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters the optimizer updates: DDP/DataParallel and ``torch.compile``
    wrappers are unwrapped; FSDP is refused."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile(model): same parameters, eager module inside
        else:
            break
    sharded = _sharded_types()
    for name, module in model.named_modules():
        is_sharded = isinstance(module, sharded) or type(module).__name__.startswith("FSDP") or any(
            isinstance(t, sharded) for t in module.parameters(recurse=False))
        if is_sharded:
            where = f"module '{name}' ({type(module).__name__})" if name else type(module).__name__
            raise ValueError(
                f"pathsgd: {where} is sharded (FSDP / DTensor parameters), which is not supported: path scales need "
                "every layer's full weights on each rank. Use DistributedDataParallel, which PathSGD unwraps.")
    return model


# A model that is itself a single layer is traced inside this wrapper (fx traces into the
# root module's forward, which would read its weight as a raw attribute).
_BARE_LAYER_PREFIX = "0."


def trace(model: nn.Module) -> Tuple[torch.fx.GraphModule, str]:
    """fx-trace ``model``; returns the graph module and the parameter-name prefix to strip."""
    prefix = ""
    if isinstance(model, LAYER_TYPES):
        model, prefix = nn.Sequential(model), _BARE_LAYER_PREFIX
    tracer = torch.fx.Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many exception types
        # fx leaves the module being traced when it failed at the top of its module stack.
        stack = list(getattr(tracer, "module_stack", {}).items())
        where = type(model).__name__
        if stack and stack[-1][0]:
            qualname, module_type = stack[-1][0], stack[-1][1]
            type_name = module_type[1].__name__ if isinstance(module_type, tuple) else getattr(
                module_type, "__name__", str(module_type))
            where = f"module '{qualname}' ({type_name}) of {type(model).__name__}"
        # A module that could not be traced may hold a layer we know breaks invariance: say that first.
        failing = model.get_submodule(stack[-1][0]) if stack and stack[-1][0] else model
        for name, sub in failing.named_modules():
            why = known_unsupported(sub)
            if why is not None:
                full = ".".join(n for n in (stack[-1][0] if stack else "", name) if n)
                raise ValueError(f"pathsgd: module '{full}' ({type(sub).__name__}) of {type(model).__name__} is not "
                                 f"supported: {why}") from exc
        raise ValueError(
            f"pathsgd: could not trace {where} with torch.fx ({type(exc).__name__}: {exc}). "
            "Path-SGD needs a static graph; data-dependent control flow is not supported.") from exc
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    _strip_output_transforms(gm)
    return gm, prefix


# Functions applied to the logits after the last weighted layer (element- or row-wise). Node
# rescaling of hidden units leaves the logits unchanged, so such a function does not affect
# invariance: the path graph ends at its input. Allowed only where its value feeds the output alone.
OUTPUT_TRANSFORM_MODULES: Tuple[type, ...] = (nn.LogSoftmax, nn.Softmax, nn.Softmin, nn.Sigmoid, nn.Tanh,
                                              nn.LogSigmoid, nn.Softmax2d)
OUTPUT_TRANSFORM_FUNCTIONS = {F.log_softmax, F.softmax, F.softmin, torch.log_softmax, torch.softmax, torch.sigmoid,
                              F.sigmoid, torch.tanh, F.tanh, F.logsigmoid}
OUTPUT_TRANSFORM_METHODS = {"log_softmax", "softmax", "sigmoid", "tanh"}


def _is_output_transform(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], OUTPUT_TRANSFORM_MODULES)
    if node.op == "call_function":
        return node.target in OUTPUT_TRANSFORM_FUNCTIONS
    return node.op == "call_method" and node.target in OUTPUT_TRANSFORM_METHODS


def _strip_output_transforms(gm: torch.fx.GraphModule) -> None:
    """Removes the output transforms (log_softmax, softmax, sigmoid, tanh, ...) that end the model
    and feed only its output, so the path graph ends at the logits."""
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    stripped = False
    while True:
        node = out.args[0]
        if not (isinstance(node, torch.fx.Node) and _is_output_transform(node, modules) and len(node.users) == 1):
            break
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(tensor_args) != 1 or node.args[0] is not tensor_args[0]:
            break
        out.args = (tensor_args[0],)
        gm.graph.erase_node(node)
        stripped = True
    if stripped:
        gm.recompile()


# ---- the graph ----------------------------------------------------------------------------------------------
@dataclass
class DenseChain:
    """Linear layers applied one after the other (identity units between them): kappa of each
    weight is the outer product of two gamma vectors (rank 1), so it is never materialized."""
    layers: List[Layer]
    # Read-only constants of a step, made once: (n, dtype, device) -> (unit gamma pair, float64 ones)
    _units: Dict[Tuple, Tuple] = field(default_factory=dict, repr=False, compare=False)

    def output_unit(self, dtype: torch.dtype, device: torch.device) -> Tuple[Tuple[Tensor, Tensor], Tensor]:
        """The gamma_out of the output units (ones, log scale 0) and the kappa of the last bias
        (ones in float64): constants that ops only read, so they are made once."""
        n = self.layers[-1].module.out_features
        key = (n, dtype, device)
        units = self._units.get(key)
        if units is None:
            units = self._units[key] = ((torch.ones(n, dtype=dtype, device=device),
                                         torch.zeros((), dtype=torch.float64, device=device)),
                                        torch.ones(n, dtype=torch.float64, device=device))
        return units


class UnsupportedModelError(ValueError):
    """The model cannot be handled; the message is the first reason, ``problems`` lists them all."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__(problems[0])
        self.problems = list(problems)


_EVALUATOR = "tape"
EVALUATORS = ("tape", "autograd")


@contextmanager
def use_evaluator(name: str) -> Iterator[None]:
    """``with use_evaluator("autograd"):`` kappas are backpropagated through the abs-pow network by
    autograd (:mod:`pathsgd.eval_autograd`, the reference twin) instead of the VJP tape."""
    global _EVALUATOR
    if name not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {EVALUATORS}, got {name!r}")
    previous, _EVALUATOR = _EVALUATOR, name
    try:
        yield
    finally:
        _EVALUATOR = previous


class PathGraph:
    """The IR of a traced model: ``nodes`` in topological order, ``outputs`` (node indices), the
    weighted ``layers`` (by module name, in call order), eval-mode ``batchnorms``, PReLU
    ``unit_params``, and its dense segments:

    * ``head``: the chain of Linear layers (each called once on a vector) that ends the model; with
      ``head_input`` None it is the whole model (an MLP), else ``head_input`` is the trunk node
      feeding it (a CNN's classifier);
    * ``dense_layers``: every Linear whose kappa is rank 1 (called once, on a vector).

    ``input_shape`` None (a model with convolutions and no shape given) is a structure-only graph:
    validated and named, not evaluated.
    """

    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule, prefix: str) -> None:
        self.model = model
        self.model_name = type(model).__name__
        self.prefix = prefix
        self.nodes: List[PathNode] = []
        self.outputs: List[int] = []
        self.layers: Dict[str, Layer] = {}
        self.batchnorms: Dict[str, nn.Module] = {}
        self.unit_params: Dict[str, nn.Parameter] = {}
        self.problems: List[str] = []
        self.input_shape: Optional[Tuple[int, ...]] = None
        self.head: Optional[DenseChain] = None
        self.head_input: Optional[int] = None
        self.dense_layers: FrozenSet[str] = frozenset()
        # convolution_backward needs explicit padding: 'same'/'valid' convolutions take autograd.
        self.tape_ok = True
        self.evaluators: Dict[Tuple, Any] = {}  # built once per (evaluator, stop, dense layers): functional.py
        self._lower(gm)

    # ---- lowering ---------------------------------------------------------------------------------------------
    def _lower(self, gm: torch.fx.GraphModule) -> None:
        modules = dict(gm.named_modules())
        ctx = _Lowering(self, modules)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            ctx.fail(f"pathsgd: {self.model_name}.forward must take exactly one input tensor, "
                     f"got {[n.target for n in placeholders]}")
            return
        for node in gm.graph.nodes:
            if node.op == "output":
                torch.fx.node.map_arg(node.args[0], lambda n: self.outputs.append(ctx.index[n]))
                continue
            module = modules[node.target] if node.op == "call_module" else None
            if node.op == "placeholder":
                kind, inputs, data = INPUT, (), None
            elif node.op == "get_attr":
                ctx.fail(f"pathsgd: {self.model_name}.forward reads the tensor attribute '{node.target}' directly; "
                         f"parameters must belong to supported layers ({SUPPORTED})")
                if "." in node.target:
                    ctx.reported.add(node.target.rsplit(".", 1)[0])
                kind, inputs, data = LINEAR_MAP, (), None
            else:
                rule = rule_for(node, modules)
                if rule is None:
                    why = known_unsupported(module) if module is not None else None
                    why = why or "it is not known to be positively homogeneous, so it may break node-rescaling " \
                                 "invariance"
                    ctx.fail(f"pathsgd: {describe_node(node, modules)} is not supported: {why}; {SUPPORTED}",
                             node.target if module is not None else None)
                    kind, inputs, data = LINEAR_MAP, ctx.tensor_inputs(node), None
                else:
                    kind = rule.kind
                    inputs, data = rule.lower(ctx, node, module)
            refs = tuple(dict.fromkeys(inputs + tuple(ctx.index[n] for n in node.all_input_nodes)))
            ctx.index[node] = len(self.nodes)
            self.nodes.append(PathNode(len(self.nodes), node.name, kind, inputs, refs, data))
        self._check_parameters(ctx)

    def _check_parameters(self, ctx: _Lowering) -> None:
        """Leaves out layers whose output never reaches the model output (no path), then names
        every parameter of the model that is on no path."""
        live: Set[int] = set()
        stack = list(self.outputs)
        while stack:
            i = stack.pop()
            if i not in live:
                live.add(i)
                stack.extend(self.nodes[i].refs)
        live_layers = {self.nodes[i].data.name for i in live if self.nodes[i].kind == LAYER}
        self.layers = {name: layer for name, layer in self.layers.items() if name in live_layers}
        if not self.layers:
            ctx.fail(f"pathsgd: {self.model_name} has no Linear or Conv layer; {SUPPORTED}")
        for i in sorted(live):  # PReLU slopes: parameters of units, not of edges
            node = self.nodes[i]
            if node.kind == ALIAS and node.data is not None and isinstance(ctx.modules[node.data], nn.PReLU):
                self.unit_params[parameter_name(node.data, "weight", self.prefix)] = ctx.modules[node.data].weight
        on_paths = {id(t) for t in self.named_parameters().values()}
        frozen = {id(t) for m in self.batchnorms.values() for t in m.parameters()}
        units = {id(t) for t in self.unit_params.values()}
        reported = {id(t) for name in ctx.reported if name in ctx.modules for t in ctx.modules[name].parameters()}
        stray = [n for n, t in self.model.named_parameters() if id(t) not in on_paths | frozen | units | reported]
        if stray:
            ctx.fail(f"pathsgd: parameters {stray} of {self.model_name} are not on any input-to-output path of "
                     f"supported layers (unused, or used outside a supported layer); {SUPPORTED}")

    # ---- shapes and dense segments ----------------------------------------------------------------------------
    def resolve_input_shape(self, input_shape: Optional[Tuple[int, ...]], shape_optional: bool) -> None:
        """Sets ``input_shape`` (given, or inferred for models without convolutions), propagates
        shapes through the abs-pow network and finds the dense segments."""
        has_conv = any(layer.conv for layer in self.layers.values())
        if input_shape is not None:
            if isinstance(input_shape, int):
                input_shape = (input_shape,)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
                raise ValueError(f"pathsgd: input_shape must be positive ints without the batch dim, got {input_shape}")
            self.input_shape = tuple(input_shape)
        elif has_conv:
            if not shape_optional:
                conv = next(layer for layer in self.layers.values() if layer.conv)
                m = conv.module
                dims = {1: "L", 2: "H, W", 3: "D, H, W"}[len(m.kernel_size)]
                raise ValueError(f"pathsgd: {self.model_name} has convolutions, so input_shape (the input's shape "
                                 f"without the batch dimension) is required: a convolution's path scales depend on "
                                 f"the size of its maps. '{conv.name}' is a {type(m).__name__} with {m.in_channels} "
                                 f"input channels: pass input_shape=({m.in_channels}, {dims}) if it reads the "
                                 "model's input, e.g. the shape of one sample of your data")
        else:
            self.input_shape = self._infer_input_shape()
        if self.input_shape is not None:
            self._propagate_shapes()
            self._find_dense_segments()
        self.tape_ok = not any(layer.conv and isinstance(layer.padding, str) for layer in self.layers.values())

    def _infer_input_shape(self) -> Tuple[int, ...]:
        """Follows every use of the input through non-Linear nodes to the first Linear layers."""
        users: Dict[int, List[PathNode]] = {}
        for node in self.nodes:
            for i in node.inputs:
                users.setdefault(i, []).append(node)
        in_features, frontier, seen = set(), [0], set()
        while frontier:
            for user in users.get(frontier.pop(), []):
                if user.index in seen:
                    continue
                seen.add(user.index)
                if user.kind == LAYER and not user.data.conv:
                    in_features.add(user.data.module.in_features)
                else:
                    frontier.append(user.index)
        if len(in_features) == 1:
            return (in_features.pop(),)
        raise ValueError(f"pathsgd: cannot infer the input shape of {self.model_name}; pass input_shape")

    def _propagate_shapes(self) -> None:
        """Runs the abs-pow network once (all-ones weights, p = 2) and writes what each node holds
        into it (``is_tensor``; ``input_rank`` of layers): the fx ShapeProp of this IR."""
        device = next(iter(self.layers.values())).weight.device

        def layer(node: PathNode, x: Tensor) -> Tensor:  # only shapes matter here: all-ones weights
            node.input_rank = x.dim()
            lyr = node.data
            ones = [torch.ones(t.shape, dtype=torch.float64, device=device) if t is not None else None
                    for t in (lyr.weight_param, lyr.bias_param)]
            return lyr.forward(x.to(device), *ones)

        try:
            with torch.no_grad():
                env = forward_values(self, 2.0, layer, torch.ones((1,) + self.input_shape, dtype=torch.float64,
                                                                  device=device))
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            raise ValueError(f"pathsgd: input_shape {self.input_shape} is inconsistent with {self.model_name}: "
                             f"{exc}") from exc
        for node in self.nodes:
            node.is_tensor = isinstance(env[node.index], Tensor)
            node.shape = tuple(env[node.index].shape) if node.is_tensor else None

    def _path_users(self) -> List[int]:
        counts = [0] * len(self.nodes)
        for node in self.nodes:
            for i in node.inputs:
                counts[i] += 1
        for i in self.outputs:
            counts[i] += 1
        return counts

    def _find_dense_segments(self) -> None:
        # A pruned layer updates weight_orig from the kappa of weight_orig * mask: materialized, not fused.
        self.dense_layers = frozenset(
            n.data.name for n in self.nodes if n.kind == LAYER and not n.data.conv and n.data.uses == 1
            and n.input_rank == 2 and not n.data.pruned)
        users = self._path_users()
        if len(self.outputs) != 1:
            return
        # The whole model as a chain: Linear layers, identity units and reshapes from input to output.
        layers: List[Layer] = []
        i = self.outputs[0]
        while users[i] == 1 and self.nodes[i].kind in (LAYER, ALIAS, RESHAPE):
            node = self.nodes[i]
            if node.kind == LAYER:
                if node.data.conv or node.data.uses != 1 or node.data.pruned:
                    break
                layers.append(node.data)
            i = node.inputs[0]
        if layers and self.nodes[i].kind == INPUT:
            self.head, self.head_input = DenseChain(layers[::-1]), None
            return
        # A dense head after a trunk (a CNN's classifier): its fused update pass yields the gamma_out
        # at its input, which seeds the trunk's backward. Its input must feed nothing else.
        layers, i = [], self.outputs[0]
        while users[i] == 1 and self.nodes[i].kind in (LAYER, ALIAS):
            node = self.nodes[i]
            if node.kind == LAYER:
                if node.data.name not in self.dense_layers:
                    break
                layers.append(node.data)
            i = node.inputs[0]
        if layers and users[i] == 1 and self.nodes[i].kind != INPUT:
            self.head, self.head_input = DenseChain(layers[::-1]), i

    # ---- queries ----------------------------------------------------------------------------------------------
    @property
    def is_dense_chain(self) -> bool:
        """The whole model is one chain of Linear layers (an MLP)."""
        return self.head is not None and self.head_input is None

    @property
    def head_names(self) -> FrozenSet[str]:
        return frozenset(layer.name for layer in self.head.layers) if self.head is not None else frozenset()

    def evaluator(self) -> str:
        """How kappas are backpropagated: "tape" (default) or "autograd" (:func:`use_evaluator`, and
        convolutions with string padding, which convolution_backward cannot take)."""
        return _EVALUATOR if self.tape_ok else "autograd"

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        """The parameters on paths (weights and biases of the layers), in call order."""
        named = {}
        for layer in self.layers.values():
            named[layer.weight_name] = layer.weight_param
            if layer.bias_name is not None:
                named[layer.bias_name] = layer.bias_param
        return named

    def check_mode(self, optimized: Set[int]) -> None:
        """BatchNorm must be in eval mode and not optimized, at every step."""
        for name, m in self.batchnorms.items():
            if m.training:
                raise ValueError(batchnorm_training(name, m))
            for pname, t in m.named_parameters():
                if id(t) in optimized:
                    raise ValueError(f"pathsgd: parameter '{name}.{pname}' of {type(m).__name__} is in the optimizer;"
                                     " BatchNorm is treated as frozen constants, so exclude its parameters, e.g. "
                                     "freeze them before building PathSGD(model):\n\n" + BATCHNORM_FIX + "\n")


LayerForward = Callable[[PathNode, Tensor], Tensor]


def forward_values(graph: PathGraph, p: float, layer_forward: LayerForward, ones: Tensor,
                   stop: Optional[int] = None, max_times: bool = False) -> List[Any]:
    """The abs-pow network's value at every node (up to ``stop``): the table's forward rules (with
    ``max_times``, its max-times rules: log domain, p = inf), with ``layer_forward(node, x)`` for
    the layers (each evaluator brings its own)."""
    env: List[Any] = [None] * len(graph.nodes)
    for node in graph.nodes:
        if node.kind == INPUT:
            env[node.index] = ones
        elif node.kind == LAYER:
            env[node.index] = layer_forward(node, env[node.inputs[0]])
        else:
            rule = RULES[node.kind]
            env[node.index] = (rule.forward_max if max_times else rule.forward)(node, env, p)
        if node.index == stop:
            break
    return env


def lower(model: nn.Module) -> PathGraph:
    """The IR of ``model`` (wrappers unwrapped) without shapes; ``problems`` lists every reason it is
    not supported (empty when it is)."""
    model = unwrap_model(model)
    gm, prefix = trace(model)
    return PathGraph(model, gm, prefix)


def build_path_graph(model: nn.Module, input_shape: Optional[Tuple[int, ...]] = None,
                     shape_optional: bool = False) -> PathGraph:
    """The IR of ``model``, validated and (given or inferred ``input_shape``) shaped.

    ``input_shape`` (without the batch dim) is required when there are convolutions, unless
    ``shape_optional``: then such a model gives a structure-only graph (``input_shape`` None) that
    validates the model and names its parameters, but is not evaluated. Raises
    :class:`UnsupportedModelError` (a ValueError) naming the first module that breaks
    node-rescaling invariance; its ``problems`` lists all of them.
    """
    graph = lower(model)
    if graph.problems:
        raise UnsupportedModelError(graph.problems)
    graph.resolve_input_shape(input_shape, shape_optional)
    return graph
