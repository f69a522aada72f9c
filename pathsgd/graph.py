"""Model -> path graph.

The path graph of a network has a unit per neuron and an edge per scalar weight
(DESIGN.md section 1). For a chain of ``nn.Linear`` layers joined by positively
homogeneous element-wise modules it is a :class:`DenseChain`, whose path scales
come from the fused per-layer kernels. The model is traced once with
``torch.fx`` (``nn.Sequential`` included); anything that would break node-
rescaling invariance raises a ValueError naming the module.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Positively homogeneous, element-wise (or pure reshaping) modules: identity edges
# in the path graph.
PASSTHROUGH_MODULES: Tuple[type, ...] = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Flatten)
PASSTHROUGH_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, torch.flatten, torch.nn.functional.relu_,
                         torch.relu_}
PASSTHROUGH_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}

SUPPORTED_TEXT = ("supported: nn.Linear layers joined by ReLU, LeakyReLU, Identity, Dropout and "
                  "Flatten/reshape (modules or functions)")


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


@dataclass
class DenseChain:
    """A chain of dense layers, input to output."""
    layers: List[DenseLayer]

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        named = {}
        for layer in self.layers:
            named[f"{layer.name}.weight"] = layer.weight
            if layer.bias is not None:
                named[f"{layer.name}.bias"] = layer.bias
        return named


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters the optimizer updates: DDP/DataParallel are unwrapped; FSDP is refused."""
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp_types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    if any(isinstance(model, t) for t in fsdp_types) or type(model).__name__.startswith("FSDP"):
        raise ValueError(
            f"pathsgd: {type(model).__name__} (FSDP / sharded parameters) is not supported: path scales need every "
            "layer's full weights on each rank. Use DistributedDataParallel, which PathSGD unwraps.")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many exception types
        raise ValueError(
            f"pathsgd: could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
            "Path-SGD needs a static graph; data-dependent control flow is not supported. " + SUPPORTED_TEXT) from exc


def _describe(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)!s} (at '{node.name}')"
    if node.op == "call_method":
        return f"method .{node.target}() (at '{node.name}')"
    return f"{node.op} '{node.target}'"


def _is_passthrough(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in PASSTHROUGH_FUNCTIONS
    if node.op == "call_method":
        return node.target in PASSTHROUGH_METHODS
    return False


def build_dense_chain(model: nn.Module) -> DenseChain:
    """Trace ``model`` and return its chain of Linear layers, or raise ValueError naming the obstacle."""
    gm = _trace(model)
    modules = dict(gm.named_modules())
    current: Optional[torch.fx.Node] = None
    layers: List[DenseLayer] = []
    seen_layers: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise ValueError(f"pathsgd: {type(model).__name__}.forward takes more than one input "
                                 f"('{node.target}'); path graphs have one input tensor")
            current = node
            continue
        if node.op == "output":
            out = node.args[0]
            if out is not current:
                raise ValueError(f"pathsgd: the output of {type(model).__name__} is not the end of a single "
                                 f"chain of layers; {SUPPORTED_TEXT}")
            continue
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op == "get_attr":
            raise ValueError(f"pathsgd: {type(model).__name__} reads attribute '{node.target}' directly in forward; "
                             f"parameters must belong to supported layers ({SUPPORTED_TEXT})")
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            if node.target in seen_layers:
                raise ValueError(f"pathsgd: module '{node.target}' (Linear) is called twice (shared weights); "
                                 "a dense chain needs each Linear once")
            seen_layers.add(node.target)
            layer_input = node.args[0]
        elif _is_passthrough(node, modules):
            layer_input = tensor_args[0] if tensor_args else None
            if len(tensor_args) > 1:
                raise ValueError(f"pathsgd: {_describe(node, modules)} combines several tensors; {SUPPORTED_TEXT}")
        else:
            raise ValueError(f"pathsgd: {_describe(node, modules)} is not supported by Path-SGD: it is not "
                             f"positively homogeneous or not a chain element, so it would break node-rescaling "
                             f"invariance; {SUPPORTED_TEXT}")
        if layer_input is not current:
            raise ValueError(f"pathsgd: {_describe(node, modules)} does not continue the chain of layers "
                             f"(branches and skip connections are not a dense chain); {SUPPORTED_TEXT}")
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            layers.append(DenseLayer(node.target, modules[node.target]))
        current = node
    if not layers:
        raise ValueError(f"pathsgd: {type(model).__name__} has no nn.Linear layer; {SUPPORTED_TEXT}")
    for prev, layer in zip(layers, layers[1:]):
        if prev.module.out_features != layer.module.in_features:
            raise ValueError(f"pathsgd: layer '{layer.name}' has in_features={layer.module.in_features} but the "
                             f"previous layer '{prev.name}' has out_features={prev.module.out_features}")
    chain = DenseChain(layers)
    on_paths = {id(p) for p in chain.named_parameters().values()}
    stray = [name for name, p in model.named_parameters() if id(p) not in on_paths]
    if stray:
        raise ValueError(f"pathsgd: parameters {stray} of {type(model).__name__} are not on any input-to-output "
                         f"path of supported layers; {SUPPORTED_TEXT}")
    return chain


def build_path_graph(model: nn.Module, input_shape: Optional[Tuple[int, ...]] = None) -> DenseChain:
    """The path graph of ``model`` (DDP unwrapped). ``input_shape`` (no batch dim) is for conv nets."""
    return build_dense_chain(unwrap_model(model))
