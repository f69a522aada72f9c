"""The abs-pow network's kappas without an autograd graph (the per-step path of conv nets).

A PathSGD step of a traced model runs the abs-pow network (``|w|^p`` weights, all-ones input,
float64) forward and backpropagates to every ``|w|^p``. The network is tiny, so autograd's
bookkeeping costs as much as the arithmetic. This module compiles, once per model, the
forward into a flat plan and the backward into a tape of vector-Jacobian products (VJPs):

* Conv/Linear: ``aten.convolution_backward`` (or two matmuls) gives the input gradient and
  the weight and bias gradients (kappa) in one call; a module called twice sums its kappas.
* identity, reshape, residual addition, multiplication by a constant, max pooling (a sum pool
  in the abs-pow network): closed-form VJPs.
* any other node (average/adaptive pooling, concatenation, means, slicing, BatchNorm) is linear
  in its tensor inputs, so autograd through that single node gives its VJP (LOCAL).

The tape is a flat program of ints (see :func:`pathsgd.reference.abs_pow_vjp`). Without LOCAL
nodes the whole backward is one op, ``pathsgd::abs_pow_vjp`` (csrc/abs_pow_vjp.cpp), which
saves the Python loop over the tape; with them the Python twin runs it.

``GeneralGraph`` uses it when no fused Linear (an autograd Function) lies in the evaluated part
and every convolution has explicit padding; otherwise the autograd path computes the same numbers
(the tests compare both).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor

from .dag import (_ADD, _CONV, _IDENTITY_FUNCTIONS, _IDENTITY_METHODS, _IDENTITY_MODULES, _MAXPOOL, _MUL,
                  _POOL_FUNCTIONS, _RESHAPE_METHODS, _SHAPE_MODULES, _WEIGHTED, AbsNetResult, _constant_factor,
                  _function_pool_args, _module_pool_args, _sum_pool_args, layer_call, sum_pool)
from . import ops, reference
from .reference import (VJP_ADD, VJP_ALIAS, VJP_CONV, VJP_LINEAR, VJP_LOCAL, VJP_RESHAPE, VJP_SCALE, VJP_SUMPOOL,
                        abs_pow_list_)

_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}

# Forward plan codes
_INPUT, _ALIAS, _LAYER, _SUMPOOL, _FLATTEN, _OTHER = range(6)
# Backward rule codes
_V_LAYER, _V_ALIAS, _V_RESHAPE, _V_ADD, _V_SCALE, _V_MAXPOOL, _V_LOCAL = range(7)


class TapedEvaluation:
    """Forward plan and VJP tape of a ``GeneralGraph``'s abs-pow network up to ``stop``."""

    def __init__(self, graph: Any, stop: Optional[torch.fx.Node]) -> None:
        self.graph = graph
        self.stop = stop
        self.output = next(n for n in graph.gm.graph.nodes if n.op == "output")
        self.plan: List[Tuple[torch.fx.Node, int, Any]] = []
        self.needs: Dict[torch.fx.Node, bool] = {}  # does the node's value depend on a parameter?
        self.tape: List[Tuple[torch.fx.Node, int, Any]] = []
        for node in graph.gm.graph.nodes:
            if node.op == "output":
                break
            self.plan.append(self._plan_entry(node))
            weighted = node.op == "call_module" and isinstance(graph.modules[node.target], _WEIGHTED)
            self.needs[node] = node in graph._tensor_nodes and (
                weighted or any(self.needs.get(n, False) for n in node.all_input_nodes))
            if self.needs[node]:
                self.tape.append((node, *self._vjp_rule(node)))
            if node is stop:
                break
        self.tape.reverse()
        # |w|^p leaves: every parameter of the evaluated part (the dense head's are not)
        skip = graph.head_names if stop is not None else frozenset()
        self.leaf_names: List[str] = []
        self.leaf_sources: List[Tuple[nn.Module, str]] = []
        for name, m in graph.weighted.items():
            if name not in skip:
                for kind in ("weight", "bias") if m.bias is not None else ("weight",):
                    self.leaf_names.append(graph.param_name(name, kind))
                    self.leaf_sources.append((m, kind))
        # Per-step scratch reused across steps (no values carried over): float64 copies of the
        # parameters that become |w|^p in place, and the all-ones input, keyed by device.
        self._leaf_buffers: Dict[torch.device, List[Tensor]] = {}
        self._ones: Dict[torch.device, Tensor] = {}
        self._compile_vjp_program()

    # ---- compile -------------------------------------------------------------------------------------------
    def _plan_entry(self, node: torch.fx.Node) -> Tuple[torch.fx.Node, int, Any]:
        g = self.graph
        if node.op == "placeholder":
            return node, _INPUT, None
        if node.op == "call_module":
            m = g.modules[node.target]
            if isinstance(m, _WEIGHTED):
                bias = g.param_name(node.target, "bias") if m.bias is not None else None
                return node, _LAYER, (node.args[0], g.param_name(node.target, "weight"), bias, *layer_call(m))
            if isinstance(m, _IDENTITY_MODULES):
                return node, _ALIAS, node.args[0]
            if isinstance(m, nn.Flatten):
                return node, _FLATTEN, (node.args[0], m.start_dim, m.end_dim)
            if isinstance(m, _MAXPOOL):
                return node, _SUMPOOL, (node.args[0], *self._sum_pool_args(*_module_pool_args(m)[1:]))
        elif (node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS) or (
                node.op == "call_method" and node.target in _IDENTITY_METHODS):
            return node, _ALIAS, node.args[0]
        elif node.op == "call_function" and node.target in _POOL_FUNCTIONS and _POOL_FUNCTIONS[node.target][0] == "max":
            return node, _SUMPOOL, (node.args[0], *self._sum_pool_args(*_function_pool_args(node)[1:]))
        return node, _OTHER, None

    @staticmethod
    def _sum_pool_args(nd: int, args: Dict[str, Any]) -> Tuple[int, Tuple, bool]:
        """A max pool's sum-pool geometry, normalized once (its dilation and return_indices
        were validated when the graph was built)."""
        return (nd, _sum_pool_args(nd, args["kernel_size"], args.get("stride"), args.get("padding", 0)),
                args.get("ceil_mode", False))

    def _vjp_rule(self, node: torch.fx.Node) -> Tuple[int, Any]:
        g = self.graph
        x = node.args[0] if node.args else None
        if node.op == "call_module":
            m = g.modules[node.target]
            if isinstance(m, _WEIGHTED):
                names = (g.param_name(node.target, "weight"),
                         g.param_name(node.target, "bias") if m.bias is not None else None)
                return _V_LAYER, (x, m, *names)
            if isinstance(m, _IDENTITY_MODULES):
                return _V_ALIAS, (x,)
            if isinstance(m, _SHAPE_MODULES):
                return _V_RESHAPE, (x,)
            if isinstance(m, _MAXPOOL):
                return _V_MAXPOOL, (x, *self._sum_pool_args(*_module_pool_args(m)[1:]))
        elif node.op == "call_function":
            t = node.target
            if t in _IDENTITY_FUNCTIONS:
                return _V_ALIAS, (x,)
            if t in _ADD:
                return _V_ADD, tuple(a for a in node.args[:2] if isinstance(a, torch.fx.Node) and self.needs[a])
            if t in _MUL:
                return _V_SCALE, (next(a for a in node.args if isinstance(a, torch.fx.Node)),)
            if t in _RESHAPE_FUNCTIONS:
                return _V_RESHAPE, (x,)
            if t in _POOL_FUNCTIONS and _POOL_FUNCTIONS[t][0] == "max":
                return _V_MAXPOOL, (x, *self._sum_pool_args(*_function_pool_args(node)[1:]))
        elif node.target in _IDENTITY_METHODS:
            return _V_ALIAS, (x,)
        elif node.target in _RESHAPE_METHODS:
            return _V_RESHAPE, (x,)
        sources = tuple(n for n in node.all_input_nodes if self.needs[n])
        return _V_LOCAL, sources

    # ---- run -----------------------------------------------------------------------------------------------
    def run(self, p: float, head_gamma: Optional[Callable[[Tensor], Tensor]] = None) -> AbsNetResult:
        """kappa of every parameter of the evaluated part; with a ``stop`` node, ``head_gamma(x)``
        (x: the value there) gives d phi_p^p / d x, else the seed is d sum(outputs) / d output."""
        g = self.graph
        device = next(iter(g.weighted.values())).weight.device
        result = AbsNetResult()
        with torch.no_grad():
            leaves = self._abs_pow_leaves(p, device)
            env = self._forward(p, leaves, device)
            if self.stop is not None:
                x = result.head_input = env[self.stop]
                seeds = {self.stop: head_gamma(x).reshape(x.shape)}
            else:
                outputs: List[Tensor] = []
                seeds = {}
                torch.fx.node.map_arg(self.output.args[0], lambda n: (
                    outputs.append(env[n]),
                    seeds.__setitem__(n, seeds[n] + 1 if n in seeds else torch.ones_like(env[n]))))
                result.total = sum(o.sum() for o in outputs)
            slots = self.vjp_slots
            seed_nodes = [n for n in seeds if n in slots]
            args = ([env[n] for n in slots], list(leaves.values()), [seeds[n] for n in seed_nodes],
                    [slots[n] for n in seed_nodes], self.vjp_program, self._vjp_factors(p))
            if self._local_entries:  # nodes backpropagated by local autograd: the Python interpreter
                kappas = reference.abs_pow_vjp(*args, local_vjp=lambda i, g: self._local_vjp(i, g, env, p))
            else:
                kappas = ops.abs_pow_vjp(*args)
        result.kappas = dict(zip(leaves, kappas))
        return result

    def _compile_vjp_program(self) -> None:
        """The tape as an ``abs_pow_vjp`` program (``self.vjp_program``: a flat list of ints, one
        instruction per tape entry; see :func:`pathsgd.reference.abs_pow_vjp`). Nodes without a
        closed-form rule become LOCAL instructions, which only the Python interpreter runs."""
        self.vjp_slots: Dict[torch.fx.Node, int] = {}  # node -> index into the values list
        self._scale_nodes: List[torch.fx.Node] = []
        self._local_entries: List[Tuple[torch.fx.Node, Tuple[torch.fx.Node, ...]]] = []
        self._factors: Dict[float, List[float]] = {}
        slots = self.vjp_slots

        def slot(n: torch.fx.Node) -> int:
            return slots.setdefault(n, len(slots))

        leaf = {name: i for i, name in enumerate(self.leaf_names)}
        program: List[int] = []
        for node, rule, data in self.tape:
            if rule == _V_LAYER:
                src, m, weight, bias = data
                head = [slot(node), slot(src), leaf[weight], leaf[bias] if bias is not None else -1,
                        int(self.needs[src])]
                if isinstance(m, _CONV):
                    program += [VJP_CONV, *head, len(m.kernel_size), *m.stride, *m.padding, *m.dilation, m.groups]
                else:
                    program += [VJP_LINEAR, *head]
            elif rule in (_V_ALIAS, _V_RESHAPE):
                program += [VJP_ALIAS if rule == _V_ALIAS else VJP_RESHAPE, slot(node), slot(data[0])]
            elif rule == _V_ADD:
                program += [VJP_ADD, slot(node), len(data), *(slot(n) for n in data)]
            elif rule == _V_SCALE:
                program += [VJP_SCALE, slot(node), slot(data[0]), len(self._scale_nodes)]
                self._scale_nodes.append(node)
            elif rule == _V_MAXPOOL:
                src, nd, (kernel, stride, padding), ceil_mode = data
                program += [VJP_SUMPOOL, slot(node), slot(src), nd, *kernel, *stride, *padding, int(ceil_mode)]
            else:
                for n in (node, *data):
                    slot(n)
                program += [VJP_LOCAL, slot(node), len(self._local_entries)]
                self._local_entries.append((node, data))
        if self.stop is not None:
            slot(self.stop)
        self.vjp_program = program

    def _vjp_factors(self, p: float) -> List[float]:
        """The constant edge weights |c|^p of the tape's multiplications, per p."""
        factors = self._factors.get(p)
        if factors is None:
            factors = self._factors[p] = [float(_constant_factor(n, p)) for n in self._scale_nodes]
        return factors

    def _abs_pow_leaves(self, p: float, device: torch.device) -> Dict[str, Tensor]:
        """``{name: |w|^p}`` in float64 for the evaluated part's parameters: one multi-tensor
        copy of the current parameters (read from their modules on every call) into reused
        buffers, then an in-place power."""
        sources = [getattr(m, kind) for m, kind in self.leaf_sources]
        buffers = self._leaf_buffers.get(device)
        if buffers is None or any(b.shape != t.shape for b, t in zip(buffers, sources)):
            buffers = self._leaf_buffers[device] = [torch.empty(t.shape, dtype=torch.float64, device=device)
                                                    for t in sources]
        if buffers:
            torch._foreach_copy_(buffers, sources)
            abs_pow_list_(buffers, p)
        return dict(zip(self.leaf_names, buffers))

    def _ones_input(self, device: torch.device) -> Tensor:
        """The abs-pow network's all-ones input (read-only: the plan never writes to it)."""
        ones = self._ones.get(device)
        if ones is None:
            ones = self._ones[device] = torch.ones((1,) + self.graph.input_shape, dtype=torch.float64, device=device)
        return ones

    def _forward(self, p: float, leaves: Dict[str, Tensor], device: torch.device) -> Dict[torch.fx.Node, Any]:
        g = self.graph
        env: Dict[torch.fx.Node, Any] = {}

        def val(a: Any) -> Any:
            return torch.fx.node.map_arg(a, env.__getitem__)

        for node, code, data in self.plan:
            if code == _ALIAS:
                env[node] = env[data]
            elif code == _LAYER:
                src, weight, bias, fn, geometry = data
                x = env[src]
                env[node] = fn(x if x.device == device else x.to(device), leaves[weight],
                               leaves[bias] if bias is not None else None, *geometry)
            elif code == _SUMPOOL:
                env[node] = sum_pool(env[data[0]], *data[1:])
            elif code == _FLATTEN:
                env[node] = env[data[0]].flatten(*data[1:])
            elif code == _INPUT:
                env[node] = self._ones_input(device)
            else:
                env[node] = g._constant_node(node, val, p)
        return env

    def _local_vjp(self, index: int, gy: Tensor, env: Dict[torch.fx.Node, Any],
                   p: float) -> List[Tuple[int, Tensor]]:
        """Autograd through one node (linear in its tensor inputs): [(source slot, gradient)]."""
        node, sources = self._local_entries[index]
        with torch.enable_grad():
            local = {n: env[n].detach().requires_grad_(True) if n in sources else env[n]
                     for n in node.all_input_nodes}
            out = self.graph._constant_node(node, lambda a: torch.fx.node.map_arg(a, local.__getitem__), p)
            grads = torch.autograd.grad(out, [local[n] for n in sources], gy, allow_unused=True)
        return [(self.vjp_slots[n], grad) for n, grad in zip(sources, grads) if grad is not None]
