"""Model -> path graph.

The path graph of a network has a unit per neuron and an edge per scalar weight
(a bias is an edge from a constant unit). For a chain of ``nn.Linear`` layers joined by positively
homogeneous element-wise modules it is a :class:`DenseChain`, whose path scales
come from the fused per-layer kernels. The model is traced once with
``torch.fx`` (``nn.Sequential`` included); anything that would break node-
rescaling invariance raises a ValueError naming the module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F


# Positively homogeneous, element-wise (or pure reshaping) modules: identity edges
# in the path graph.
PASSTHROUGH_MODULES: Tuple[type, ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Flatten)
PASSTHROUGH_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, torch.flatten, torch.nn.functional.relu_,
                         torch.relu_}
PASSTHROUGH_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}

@dataclass(frozen=True)
class DenseLayer:
    """One ``nn.Linear`` of the chain: ``y = W x + b`` with W of shape (out, in)."""
    name: str
    module: nn.Linear

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.module.bias


def parameter_name(module_name: str, param: str, prefix: str = "") -> str:
    """Public name of a layer's parameter, as in ``model.named_parameters()``.

    ``prefix`` is the name under which a bare layer (``nn.Linear`` as the whole model)
    was wrapped for tracing; it is stripped again.
    """
    name = f"{module_name}.{param}"
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


@dataclass
class DenseChain:
    """A chain of dense layers, input to output."""
    layers: List[DenseLayer]
    prefix: str = ""
    # Parameters of units rather than edges (PReLU slopes): updated with their plain gradient.
    unit_params: Dict[str, nn.Parameter] = field(default_factory=dict)
    # Read-only constants of a step, made once: (n, dtype, device) -> (unit gamma pair, float64 ones)
    _units: Dict[Tuple, Tuple] = field(default_factory=dict, repr=False, compare=False)

    def output_unit(self, dtype: torch.dtype, device: torch.device) -> Tuple[Tuple[torch.Tensor, torch.Tensor],
                                                                          torch.Tensor]:
        """The gamma_out of the output units (ones, log scale 0) and the kappa of the last bias
        (ones in float64): constants that ops only read, so they are made once."""
        n = self.layers[-1].module.out_features
        key = (n, dtype, device)
        units = self._units.get(key)
        if units is None:
            from .scales import unit_gamma
            units = self._units[key] = (unit_gamma(n, dtype, device), torch.ones(n, dtype=torch.float64,
                                                                                  device=device))
        return units

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        named = {}
        for layer in self.layers:
            named[parameter_name(layer.name, "weight", self.prefix)] = layer.weight
            if layer.bias is not None:
                named[parameter_name(layer.name, "bias", self.prefix)] = layer.bias
        return named


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


def _trace(model: nn.Module) -> Tuple[torch.fx.GraphModule, str]:
    """fx-trace ``model``; returns the graph module and the parameter-name prefix to strip."""
    from .dag import WEIGHTED_LAYERS

    prefix = ""
    if isinstance(model, WEIGHTED_LAYERS):
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
        from .dag import known_unsupported
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
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__), prefix


# Functions applied to the logits after the last weighted layer (element- or row-wise). Node
# rescaling of hidden units leaves the logits unchanged, so such a function does not affect
# invariance: the path graph ends at its input. Allowed only where its value feeds the output alone.
OUTPUT_TRANSFORM_MODULES: Tuple[type, ...] = (nn.LogSoftmax, nn.Softmax, nn.Softmin, nn.Sigmoid, nn.Tanh,
                                              nn.LogSigmoid, nn.Softmax2d)
OUTPUT_TRANSFORM_FUNCTIONS = {F.log_softmax, F.softmax, F.softmin, torch.log_softmax, torch.softmax, torch.sigmoid,
                              F.sigmoid, torch.tanh, F.tanh, F.logsigmoid}
OUTPUT_TRANSFORM_METHODS = {"log_softmax", "softmax", "sigmoid", "tanh"}


def _node_is(node: torch.fx.Node, modules: Dict[str, nn.Module], module_types: Tuple[type, ...],
             functions: set, methods: set) -> bool:
    """Whether an fx node calls one of these module types, functions or tensor methods."""
    if node.op == "call_module":
        return isinstance(modules[node.target], module_types)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def _is_output_transform(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    return _node_is(node, modules, OUTPUT_TRANSFORM_MODULES, OUTPUT_TRANSFORM_FUNCTIONS, OUTPUT_TRANSFORM_METHODS)


def strip_output_transforms(gm: torch.fx.GraphModule) -> None:
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


def _is_passthrough(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    return _node_is(node, modules, PASSTHROUGH_MODULES, PASSTHROUGH_FUNCTIONS, PASSTHROUGH_METHODS)


def dense_chain_of(gm: torch.fx.GraphModule, prefix: str = "") -> Optional[DenseChain]:
    """The chain of Linear layers of a traced model, or None if it is not a simple chain.

    Modules are validated by :class:`pathsgd.dag.GeneralGraph` first; this only
    decides whether the fast dense-chain path applies.
    """
    modules = dict(gm.named_modules())
    current: Optional[torch.fx.Node] = None
    layers: List[DenseLayer] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                return None
            current = node
            continue
        if node.op == "output":
            return DenseChain(layers, prefix) if layers and node.args[0] is current else None
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        is_linear = node.op == "call_module" and isinstance(modules[node.target], nn.Linear)
        if not (is_linear or _is_passthrough(node, modules)) or tensor_args[:1] != [current] or len(tensor_args) > 1:
            return None
        if is_linear:
            if any(layer.name == node.target for layer in layers):
                return None  # shared weights: kappa is not rank-1
            layers.append(DenseLayer(node.target, modules[node.target]))
        current = node
    return None


def build_path_graph(model: nn.Module, input_shape: Optional[Tuple[int, ...]] = None,
                     shape_optional: bool = False) -> Union[DenseChain, "GeneralGraph"]:
    """The path graph of ``model`` (DDP unwrapped): a :class:`DenseChain` when the model is a
    chain of Linear layers (fused kernels), else a :class:`pathsgd.dag.GeneralGraph`.

    ``input_shape`` (without the batch dim) is required when there are convolutions, unless
    ``shape_optional``: then such a model gives a structure-only graph (``input_shape`` None) that
    validates the model and names its parameters, but is not evaluated.
    Output transforms that end the model (log_softmax, softmax, sigmoid, tanh, ...) are left out:
    the path graph ends at the logits. Raises ValueError naming any module that breaks
    node-rescaling invariance.
    """
    from .dag import GeneralGraph

    model = unwrap_model(model)
    gm, prefix = _trace(model)
    strip_output_transforms(gm)
    general = GeneralGraph(model, gm, input_shape, prefix, shape_optional)  # validates every node
    chain = dense_chain_of(gm, prefix)
    if chain is None:
        return general
    chain.unit_params = general.unit_params
    return chain
