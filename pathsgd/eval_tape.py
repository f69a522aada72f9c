"""The general evaluator: the abs-pow network of a :class:`~pathsgd.graph.PathGraph` without an
autograd graph (the per-step path of conv nets).

A step runs the abs-pow network (``|w|^p`` weights, all-ones input, float64, batch 1) forward and
backpropagates to every ``|w|^p``. The network is tiny, so autograd's bookkeeping would cost as
much as the arithmetic: :class:`TapeEvaluator` compiles, once per (stop node, dense layers), the
backward into a tape of vector-Jacobian products, then runs ``forward(p)`` -> activations and
``backward(acts, seed)`` -> kappas:

* Conv/Linear: ``aten.convolution_backward`` (or two matmuls) gives the input gradient and the
  weight and bias gradients (kappa) in one call; a module called twice sums its kappas.
* dense layers (Linear called once on a vector, named by the caller): the fused kernels, so
  kappa = gamma_out gamma_in^T stays two vectors; their gammas are returned for the fused update.
* the table's closed-form VJPs (identity, reshape, addition, constant scale, max pooling);
* any other node is linear in its tensor inputs: autograd through that node's forward rule.

The tape is a flat program of ints (see :func:`pathsgd.reference.abs_pow_vjp`). When every node
has a compiled rule the whole backward is one op, ``pathsgd::abs_pow_vjp``; otherwise its Python
twin runs the program and calls back for the other nodes. Likewise the forward: when every node
up to ``stop`` is a layer, identity unit, reshape, addition, constant scale or (undilated) max
pool and no layer is dense, it is one op, ``pathsgd::abs_pow_forward`` (see
:func:`pathsgd.reference.abs_pow_forward`); otherwise the table's forward rules run in Python.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from .eval_dense import LogScaled, gamma_out_pass
from .graph import ADD, ALIAS, INPUT, LAYER, RESHAPE, RULES, SCALE, SUMPOOL, PathGraph, PathNode, forward_values
from .reference import const_pow, to_log_scaled
from .reference import VJP_ADD, VJP_ALIAS, VJP_CONV, VJP_LINEAR, VJP_LOCAL, VJP_RESHAPE, VJP_SCALE, VJP_SUMPOOL


class Activations:
    """What ``forward`` computed: node values, the ``|w|^p`` leaves, the dense layers' gamma_in."""
    __slots__ = ("p", "env", "leaves", "gamma_in", "total")

    def __init__(self, p: float, env: List[Any], leaves: Dict[str, Tensor],
                 gamma_in: Dict[str, LogScaled], total: Optional[Tensor]) -> None:
        self.p, self.env, self.leaves, self.gamma_in, self.total = p, env, leaves, gamma_in, total


class Kappas:
    """What ``backward`` computed: materialized kappa per parameter name, and per dense layer its
    ``(gamma_in, gamma_in log scale, gamma_out, gamma_out log scale)`` (opmath vectors)."""
    __slots__ = ("kappas", "dense_gammas")

    def __init__(self, kappas: Dict[str, Tensor], dense_gammas: Dict[str, Tuple[Tensor, Tensor, Tensor, Tensor]]):
        self.kappas, self.dense_gammas = kappas, dense_gammas


def layer_leaves(graph: PathGraph, stop: Optional[int], dense: FrozenSet[str]) -> List[Tuple[str, Any, str]]:
    """``(parameter name, layer, "weight"|"bias")`` of every ``|w|^p`` leaf an evaluation up to
    ``stop`` reads: the layers before it, without the weights of ``dense`` layers."""
    evaluated = {n.data.name for n in graph.nodes[:None if stop is None else stop + 1] if n.kind == LAYER}
    leaves = []
    for layer in graph.layers.values():
        if layer.name in evaluated:
            if layer.name not in dense:
                leaves.append((layer.weight_name, layer, "weight"))
            if layer.bias_name is not None:
                leaves.append((layer.bias_name, layer, "bias"))
    return leaves


class TapeEvaluator:
    """Forward and VJP tape of a graph's abs-pow network up to ``stop`` (the output when None);
    the Linear layers named in ``dense`` run through the fused dense kernels."""

    def __init__(self, graph: PathGraph, stop: Optional[int], dense: FrozenSet[str]) -> None:
        self.graph, self.stop, self.dense = graph, stop, dense
        nodes = graph.nodes[:None if stop is None else stop + 1]
        self.needs = [False] * len(nodes)  # does the node's value depend on a parameter?
        for node in nodes:
            self.needs[node.index] = node.is_tensor and (
                node.kind == LAYER or any(self.needs[i] for i in node.inputs))
        self.tape = [node for node in reversed(nodes) if self.needs[node.index]]
        self.leaf_sources = layer_leaves(graph, stop, dense)
        self.leaf_names = [name for name, _, _ in self.leaf_sources]
        # Per-step scratch reused across steps (no values carried over): float64 copies of the
        # parameters that become |w|^p in place, and the all-ones input, keyed by device.
        self._leaf_buffers: Dict[torch.device, List[Tensor]] = {}
        self._ones: Dict[torch.device, Tensor] = {}
        self._compile()

    # ---- compile ----------------------------------------------------------------------------------------------
    def _is_dense(self, node: PathNode) -> bool:
        return node.kind == LAYER and node.data.name in self.dense

    def _compile(self) -> None:
        """The tape as an ``abs_pow_vjp`` program (a flat list of ints, one instruction per tape
        entry). Nodes without a compiled rule become LOCAL instructions (Python only)."""
        self.slots: Dict[int, int] = {}  # node index -> index into the values list
        self.scale_nodes: List[PathNode] = []
        self.local_nodes: List[PathNode] = []
        self._factors: Dict[float, List[float]] = {}
        slots, needs = self.slots, self.needs

        def slot(i: int) -> int:
            return slots.setdefault(i, len(slots))

        leaf = {name: i for i, name in enumerate(self.leaf_names)}
        program: List[int] = []
        for node in self.tape:
            kind, i = node.kind, node.index
            if kind == LAYER and not self._is_dense(node) and not node.data.transposed:
                layer, src = node.data, node.inputs[0]
                head = [slot(i), slot(src), leaf[layer.weight_name],
                        leaf[layer.bias_name] if layer.bias_name is not None else -1, int(needs[src])]
                if layer.conv:
                    m = layer.module
                    program += [VJP_CONV, *head, len(m.kernel_size), *m.stride, *layer.padding, *m.dilation, m.groups]
                else:
                    program += [VJP_LINEAR, *head]
            elif kind in (ALIAS, RESHAPE):
                program += [VJP_ALIAS if kind == ALIAS else VJP_RESHAPE, slot(i), slot(node.inputs[0])]
            elif kind == ADD:
                sources = [j for j in node.inputs if needs[j]]
                program += [VJP_ADD, slot(i), len(sources), *(slot(j) for j in sources)]
            elif kind == SCALE:
                program += [VJP_SCALE, slot(i), slot(node.inputs[0]), len(self.scale_nodes)]
                self.scale_nodes.append(node)
            elif kind == SUMPOOL and all(d == 1 for d in node.data[3]):  # dilated pools: LOCAL
                nd, (kernel, stride, padding), ceil_mode, _ = node.data
                program += [VJP_SUMPOOL, slot(i), slot(node.inputs[0]), nd, *kernel, *stride, *padding,
                            int(ceil_mode)]
            else:
                for j in (i, *node.inputs):
                    slot(j)
                program += [VJP_LOCAL, slot(i), len(self.local_nodes)]
                self.local_nodes.append(node)
        if self.stop is not None:
            slot(self.stop)
        self.program = program
        self._compile_forward(leaf)

    def _compile_forward(self, leaf: Dict[str, int]) -> None:
        """The forward as an ``abs_pow_forward`` program: ``forward_program`` and ``forward_index``
        (node index -> the instruction whose value it holds, -1 for the input); both None when a
        node has no compiled forward rule (the forward then runs the table's rules in Python)."""
        self.forward_program: Optional[List[int]] = None
        self.forward_index: Optional[List[Tuple[int, int]]] = None
        self.slot_values: Optional[List[int]] = None
        if self.dense:
            return
        program: List[int] = []
        index: Dict[int, int] = {}  # node -> the instruction computing its value (-1: the input)
        scales = {n.index: k for k, n in enumerate(self.scale_nodes)}
        new_scales: List[PathNode] = []
        count = 0
        for node in self.graph.nodes[:None if self.stop is None else self.stop + 1]:
            kind, i = node.kind, node.index
            if not node.is_tensor:
                continue  # a shape query: reshapes take their static shapes
            if kind in (INPUT, ALIAS):  # the input is an argument; an identity unit shares its input's value
                index[i] = -1 if kind == INPUT else index[node.inputs[0]]
                continue
            src = index[node.inputs[0]]
            if kind == LAYER and not node.data.transposed:
                layer = node.data
                bias = leaf[layer.bias_name] if layer.bias_name is not None else -1
                if layer.conv:
                    m = layer.module
                    program += [VJP_CONV, src, leaf[layer.weight_name], bias, len(m.kernel_size), *m.stride,
                                *layer.padding, *m.dilation, m.groups]
                else:
                    program += [VJP_LINEAR, src, leaf[layer.weight_name], bias]
            elif kind == RESHAPE:
                program += [VJP_RESHAPE, src, len(node.shape), *node.shape]
            elif kind == ADD and len(node.inputs) == 2:
                program += [VJP_ADD, src, index[node.inputs[1]]]
            elif kind == SCALE:
                if i not in scales:
                    scales[i] = len(self.scale_nodes) + len(new_scales)
                    new_scales.append(node)
                program += [VJP_SCALE, src, scales[i]]
            elif kind == SUMPOOL and all(d == 1 for d in node.data[3]):
                nd, (kernel, stride, padding), ceil_mode, _ = node.data
                program += [VJP_SUMPOOL, src, nd, *kernel, *stride, *padding, int(ceil_mode)]
            else:
                return  # no compiled forward rule
            index[i] = count
            count += 1
        self.scale_nodes += new_scales
        self.forward_program = program
        self.forward_index = list(index.items())
        # The VJP's values (slot order) as indices into the forward op's output (-1: the input).
        self.slot_values = [index[i] for i in self.slots] if all(i in index for i in self.slots) else None

    def vjp_factors(self, p: float) -> List[float]:
        """The constant edge weights |c|^p of the tape's multiplications, per p."""
        factors = self._factors.get(p)
        if factors is None:
            factors = self._factors[p] = [const_pow(n.data, p) for n in self.scale_nodes]
        return factors

    # ---- run --------------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(iter(self.graph.layers.values())).weight.device

    def abs_pow_leaves(self, p: float, device: torch.device) -> List[Tensor]:
        """``|w|^p`` of every leaf in float64, in leaf order: one multi-tensor copy of the current
        parameters into reused buffers, then an in-place power."""
        sources = [layer.effective(kind) for _, layer, kind in self.leaf_sources]
        buffers = self._leaf_buffers.get(device)
        if buffers is None or any(b.shape != t.shape for b, t in zip(buffers, sources)):
            buffers = self._leaf_buffers[device] = [torch.empty(t.shape, dtype=torch.float64, device=device)
                                                    for t in sources]
        if buffers:
            torch._foreach_copy_(buffers, sources)
            reference.abs_pow_list_(buffers, p)
        return buffers

    def ones_input(self, device: torch.device) -> Tensor:
        """The abs-pow network's all-ones input (read-only: nothing writes to it)."""
        ones = self._ones.get(device)
        if ones is None:
            ones = self._ones[device] = torch.ones((1,) + self.graph.input_shape, dtype=torch.float64, device=device)
        return ones

    @property
    def compiled(self) -> bool:
        """Forward and backward up to ``stop`` are compiled programs: the forward one op
        (:meth:`forward_op`), a conv net's whole step one op (:meth:`trunk_layout`)."""
        return self.forward_program is not None and self.slot_values is not None and not self.local_nodes

    def forward_op(self, p: float, device: torch.device) -> Tuple[List[Tensor], List[Tensor]]:
        """``(leaves, values)``: the forward program's run without per-node Python (``values``: the
        forward op's output)."""
        leaves = self.abs_pow_leaves(p, device)
        return leaves, ops.abs_pow_forward(self.ones_input(device), leaves, self.forward_program, self.vjp_factors(p))

    def trunk_layout(self, trunk: int, bias_layers: List[int]) -> List[int]:
        """``trunk_chain_step_``'s layout (:func:`pathsgd.reference.trunk_layout`) of a compiled
        evaluator with a ``stop`` (the head's input): ``trunk`` leaf parameters come first in the
        op's params, then a dense head with ``bias_layers``."""
        stop = self.slots[self.stop]
        return reference.trunk_layout(trunk, (1,) + tuple(self.graph.input_shape), self.slot_values[stop], stop,
                                      bias_layers, self.forward_program, self.slot_values, self.program)

    @torch.no_grad()
    def forward(self, p: float) -> Activations:
        """The abs-pow network up to ``stop`` from the current weights."""
        device = self._device()
        ones = self.ones_input(device)
        if self.forward_program is not None:
            leaf_list, values = self.forward_op(p, device)
            env: List[Any] = [None] * len(self.graph.nodes)
            for i, k in self.forward_index:
                env[i] = ones if k < 0 else values[k]
            return Activations(p, env, dict(zip(self.leaf_names, leaf_list)), {}, self._total(env))
        leaves = dict(zip(self.leaf_names, self.abs_pow_leaves(p, device)))
        gamma_in: Dict[str, LogScaled] = {}

        def layer_forward(node: PathNode, x: Tensor) -> Tensor:
            layer = node.data
            x = x if x.device == device else x.to(device)
            bias = leaves[layer.bias_name] if layer.bias_name is not None else None
            if layer.name not in self.dense:
                return layer.forward(x, leaves[layer.weight_name], bias)
            # y = |W|^p x + |b|^p by the dense kernel: |W|^p is never materialized
            weight = layer.weight
            v, s = gamma_in[layer.name] = to_log_scaled(x.reshape(-1), reference.opmath_dtype(weight.dtype))
            y, log_scale = ops.gamma_forward(weight, None, v, s, p)
            y = (y.double() * log_scale.exp()).reshape(1, -1)
            return y + bias if bias is not None else y

        env = forward_values(self.graph, p, layer_forward, ones, self.stop)
        return Activations(p, env, leaves, gamma_in, self._total(env))

    def _total(self, env: List[Any]) -> Optional[Tensor]:
        """phi_p^p (the outputs' sum) of a whole-network evaluation; None with a ``stop``."""
        return sum(env[i].sum() for i in self.graph.outputs) if self.stop is None else None

    @torch.no_grad()
    def backward(self, acts: Activations, seed: Optional[Tensor] = None) -> Kappas:
        """kappa of every leaf: ``d (seed . value at stop) / d |w|^p`` with a ``stop`` (``seed`` is
        d phi_p^p / d value there), else ``d sum(outputs) / d |w|^p``."""
        env, p = acts.env, acts.p
        if self.stop is not None:
            seeds = {self.stop: seed.reshape(env[self.stop].shape)}
        else:
            seeds = {}
            for i in self.graph.outputs:
                seeds[i] = seeds[i] + 1 if i in seeds else torch.ones_like(env[i])
        slots = self.slots
        seed_nodes = [i for i in seeds if i in slots]
        dense_out: Dict[str, Tuple[LogScaled, Tensor]] = {}
        args = ([env[i] for i in slots], list(acts.leaves.values()), [seeds[i] for i in seed_nodes],
                [slots[i] for i in seed_nodes], self.program, self.vjp_factors(p))
        if self.local_nodes:  # nodes without a compiled rule: the Python interpreter calls back
            kappa_list = reference.abs_pow_vjp(
                *args, local_vjp=lambda k, gy: self._local_vjp(self.local_nodes[k], gy, acts, dense_out))
        else:
            kappa_list = ops.abs_pow_vjp(*args)
        kappas = dict(zip(acts.leaves, kappa_list))
        dense_gammas = {}
        for name in self.dense:
            layer = self.graph.layers[name]
            v_in, s_in = acts.gamma_in[name]
            if name in dense_out:
                (v_out, s_out), bias_kappa = dense_out[name]
            else:  # no gradient reached the layer
                v_out = torch.zeros(layer.module.out_features, dtype=v_in.dtype, device=v_in.device)
                s_out, bias_kappa = torch.zeros((), dtype=torch.float64, device=v_in.device), None
            dense_gammas[name] = (v_in, s_in, v_out, s_out)
            if layer.bias_name is not None:
                kappas[layer.bias_name] = bias_kappa if bias_kappa is not None else torch.zeros_like(
                    acts.leaves[layer.bias_name])
        return Kappas(kappas, dense_gammas)

    def _local_vjp(self, node: PathNode, gy: Tensor, acts: Activations,
                   dense_out: Dict[str, Tuple[LogScaled, Tensor]]) -> List[Tuple[int, Tensor]]:
        """[(source slot, gradient)] of one node without a compiled rule."""
        env, p = acts.env, acts.p
        if node.kind == LAYER and node.data.transposed:  # autograd through the layer: input grad and kappas
            layer, src = node.data, node.inputs[0]
            names = [n for n in (layer.weight_name, layer.bias_name) if n is not None]
            leaf_index = {name: i for i, name in enumerate(acts.leaves)}
            with torch.enable_grad():
                x = env[src].detach().requires_grad_(self.needs[src])
                leaves = [acts.leaves[n].detach().requires_grad_(True) for n in names]
                y = layer.forward(x, leaves[0], leaves[1] if len(leaves) > 1 else None)
                inputs = leaves + ([x] if self.needs[src] else [])
                grads = torch.autograd.grad(y, inputs, gy)
            out = [(-1 - leaf_index[n], g) for n, g in zip(names, grads)]
            return out + ([(self.slots[src], grads[-1])] if self.needs[src] else [])
        if node.kind == LAYER:  # a dense layer: gamma_out is the gradient reaching its output
            layer, src = node.data, node.inputs[0]
            gamma_out = to_log_scaled(gy.reshape(-1), reference.opmath_dtype(layer.weight.dtype))
            dense_out[layer.name] = (gamma_out, gy.reshape(-1))
            if not self.needs[src]:
                return []
            g, log_scale = gamma_out_pass(layer.weight, acts.gamma_in[layer.name], gamma_out, p)
            return [(self.slots[src], (g.double() * log_scale.exp()).reshape(env[src].shape))]
        sources = list(dict.fromkeys(i for i in node.inputs if self.needs[i]))
        rule = RULES[node.kind]
        if rule.vjp is not None:
            grads = rule.vjp(node, gy, env, p)
            return [(self.slots[i], g) for i, g in zip(node.inputs, grads) if self.needs[i] and g is not None]
        with torch.enable_grad():  # linear in its tensor inputs: autograd through this node alone
            local = {i: env[i].detach().requires_grad_(True) if i in sources else env[i] for i in node.refs}
            out = rule.forward(node, local, p)
            grads = torch.autograd.grad(out, [local[i] for i in sources], gy, allow_unused=True)
        return [(self.slots[i], g) for i, g in zip(sources, grads) if g is not None]
