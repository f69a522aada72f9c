"""PathSGD: torch.optim.SGD on path-scaled gradients (Neyshabur et al., 2015)."""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .dag import GeneralGraph, to_log_scaled
from .graph import DenseChain, build_path_graph, unwrap_model
from .reference import opmath_dtype
from .scales import LogScaled, chain_gamma_in, check_p

ClampArg = Union[None, float, Tuple[float, float]]

__all__ = ["PathSGD"]


def normalize_clamp(clamp: ClampArg) -> Optional[Tuple[float, float]]:
    """``None`` -> None, ``c`` -> ``(-c, c)``, ``(lo, hi)`` -> ``(lo, hi)``; validated."""
    if clamp is None:
        return None
    if isinstance(clamp, (int, float)) and not isinstance(clamp, bool):
        if not clamp >= 0:
            raise ValueError(f"Invalid clamp value: {clamp!r} (clamp=c means (-c, c) and needs c >= 0)")
        return (-float(clamp), float(clamp))
    try:
        lo, hi = clamp
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid clamp: {clamp!r} (expected None, c, or (lo, hi))") from exc
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"Invalid clamp: {clamp!r} (needs lo <= hi, got lo={lo}, hi={hi})")
    return (lo, hi)


def _check_group(group: Dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    elif not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid learning rate: {lr} (needs a finite lr >= 0)")
    for key in ("momentum", "weight_decay", "dampening"):
        value = group[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid {key} value: {value}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    check_p(group["p"])
    if not (isinstance(group["eps"], (int, float)) and group["eps"] >= 0):
        raise ValueError(f"Invalid eps value: {group['eps']}")
    group["clamp"] = normalize_clamp(group["clamp"])


class PathSGD(Optimizer):
    r"""Path-SGD: stochastic gradient descent with path-normalized gradients.

    .. math::
        \kappa_e = \sum_{\text{paths } \pi \ni e} \prod_{e' \in \pi, e' \ne e} |w_{e'}|^p,
        \qquad \tilde g_e = g_e / \max(\kappa_e^{2/p}, \epsilon)

    then exactly :class:`torch.optim.SGD`'s update on :math:`\tilde g`::

        g <- -g if maximize
        g_tilde <- g / max(kappa^(2/p), eps)          # kappa from the weights before this step
        g_tilde <- g_tilde + weight_decay * w          # weight decay after scaling
        b <- g_tilde (first step) | momentum * b + (1 - dampening) * g_tilde
        g_tilde <- g_tilde + momentum * b (nesterov) | b
        w <- w - lr * g_tilde
        w <- clamp(w, lo, hi) if clamp

    Training is invariant to node rescaling of ReLU networks (Theorem 4.1 of the
    paper), unlike plain SGD. kappa is recomputed from the current weights every step
    by fused kernels that never materialize it for dense layers.

    Args:
        params: the model (``nn.Module``), or parameters / param groups with ``model=``.
        lr: learning rate (float or 1-element tensor). Default 1e-3, as torch.optim.SGD. Path-scaled
            steps are much larger than SGD's at default initialization: start 10-100x below SGD's lr.
        momentum: momentum factor. Default 0 (the paper's algorithm), as torch.optim.SGD.
        dampening: dampening for momentum.
        weight_decay: L2 penalty, added to the path-scaled gradient.
        nesterov: Nesterov momentum.
        maximize: maximize the objective.
        foreach, fused: ``None`` or ``True``: the compiled kernels (fused passes, multi-tensor updates);
            ``False``: this optimizer steps with the pure-PyTorch reference ops (for debugging). They
            cannot both be True, as in torch.optim.SGD.
        differentiable: must be False (a differentiable step through the kernels is not supported).
        p: the p of the path norm (>= 1: for p < 1 the path-scaled step is not defined as in the paper,
            and kappa^(2/p) of a quasi-norm does not make the update rescaling invariant).
        clamp: ``None``, ``c`` for ``(-c, c)``, or ``(lo, hi)``: clamp after the step.
        eps: lower bound of ``kappa^(2/p)``.
        input_shape: input shape without the batch dim. Optional: by default the shape of the model's
            most recent forward input (one path graph per shape); a given one that disagrees with the
            real input is an error at the next step, before anything changes.
        model: the model, when ``params`` are parameters or param groups.
        check_finite: raise before the step if a weight is non-finite (costs a sync).
    """

    def __init__(self, params: Union[nn.Module, Iterable[Tensor], Iterable[Dict[str, Any]]],
                 lr: Union[float, Tensor] = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 p: float = 2, clamp: ClampArg = None, eps: float = 1e-12,
                 input_shape: Optional[Tuple[int, ...]] = None, model: Optional[nn.Module] = None,
                 check_finite: bool = False) -> None:
        if differentiable:
            raise ValueError("PathSGD does not support differentiable=True: its step runs fused kernels under "
                             "torch.no_grad(); use differentiable=False (the default)")
        if foreach and fused:
            raise ValueError("`fused` and `foreach` cannot be `True` together.")
        self.use_reference = foreach is False or fused is False
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("PathSGD got a model both as the first argument and as model=")
            # Frozen parameters (requires_grad=False, e.g. eval-mode BatchNorm) are left out.
            model, params = params, [t for t in params.parameters() if t.requires_grad]
        if model is None:
            raise ValueError("PathSGD needs the model to build its path graph: PathSGD(model, ...) or "
                             "PathSGD(param_groups, model=model, ...)")
        self.graph = build_path_graph(model, input_shape, shape_optional=True)
        self._model = unwrap_model(model)
        self._given_input_shape = None if input_shape is None else (
            (input_shape,) if isinstance(input_shape, int) else tuple(input_shape))
        # One evaluated path graph per input shape (a fully convolutional net fed several sizes).
        self._graphs: Dict[Tuple[int, ...], Any] = {}
        if isinstance(self.graph, GeneralGraph) and self.graph.input_shape is not None:
            self._graphs[self.graph.input_shape] = self.graph
        # The shape of the model's most recent forward input; the hook goes with the optimizer.
        self._seen = _InputShape()
        handle = self._model.register_forward_pre_hook(self._seen.record)
        weakref.finalize(self, handle.remove)
        self._param_names = {id(t): name for name, t in {**self.graph.named_parameters(),
                                                          **self.graph.unit_params}.items()}
        self.check_finite = check_finite
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=False, fused=fused, p=p, clamp=clamp,
                        eps=eps)
        _check_group(dict(defaults))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            if isinstance(self.graph, GeneralGraph):
                self.graph.check_mode({id(t) for g in self.param_groups for t in g["params"]})
            for param in group["params"]:
                if id(param) not in self._param_names:
                    raise ValueError(f"a parameter of shape {tuple(param.shape)} is not a parameter of the model "
                                     "PathSGD was built for (pass the same model whose parameters you optimize)")
                name = self._param_names[id(param)]
                if param.is_complex():
                    raise ValueError(f"PathSGD does not support complex parameters ('{name}')")
                if param.device.type == "meta":
                    raise ValueError(f"parameter '{name}' is on the meta device; materialize the model first")
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("clamp", None)
            group.setdefault("eps", 1e-12)
            group.setdefault("p", 2)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("differentiable", False)
        self.__dict__.setdefault("use_reference", False)

    def _graph_for_step(self) -> Any:
        """The path graph for the input that produced this step's gradients (the model's most recent
        forward input, unless ``input_shape`` was given); raises, changing nothing, when a given
        ``input_shape`` disagrees with that input or no shape is known yet."""
        seen, given = self._seen.last, self._given_input_shape
        model = type(self._model).__name__
        if given is not None:
            if seen is not None and seen != given:
                raise ValueError(f"pathsgd: PathSGD was built with input_shape={given}, but the last input of {model} "
                                 f"had shape {seen} (without the batch dim), so kappa would belong to another graph. "
                                 f"Pass input_shape={seen}, or leave input_shape out to follow each forward input")
            return self.graph
        if isinstance(self.graph, DenseChain):
            return self.graph  # a chain of Linear layers: kappa does not depend on the input shape
        shape = seen if seen is not None else self.graph.input_shape
        if shape is None:
            raise ValueError(f"pathsgd: {model} has convolutions and no input_shape was given, so PathSGD uses the "
                             "shape of the model's most recent forward input, but the model has not run yet: call "
                             "step() after forward/backward, or pass input_shape (without the batch dim)")
        graph = self._graphs.get(shape)
        if graph is None:
            graph = self._graphs[shape] = build_path_graph(self._model, shape)
        return graph

    def param_name(self, param: Tensor) -> str:
        return self._param_names.get(id(param), f"<parameter of shape {tuple(param.shape)}>")

    def _collect_updates(self) -> Dict[Tensor, "ParamUpdate"]:
        """Every parameter to update this step; raises (changing nothing) on bad input."""
        updates: Dict[Tensor, ParamUpdate] = {}
        state = self.state
        for group in self.param_groups:
            momentum = group["momentum"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                # Checked on every step, so the parameter's name is looked up only for an error.
                if grad.is_sparse:
                    raise RuntimeError(f"PathSGD does not support sparse gradients (parameter "
                                       f"'{self.param_name(param)}')")
                if grad.is_complex() or param.is_complex():
                    raise RuntimeError(f"PathSGD does not support complex parameters or gradients "
                                       f"('{self.param_name(param)}')")
                if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
                    raise RuntimeError(f"gradient of '{self.param_name(param)}' ({tuple(grad.shape)}, {grad.dtype}, "
                                       f"{grad.device}) does not match the parameter ({tuple(param.shape)}, "
                                       f"{param.dtype}, {param.device})")
                param_state = state.get(param) if momentum != 0 else None
                buffer = param_state.get("momentum_buffer") if param_state else None
                update = updates[param] = ParamUpdate(param, grad, group, buffer)
                if buffer is not None and (buffer.dtype != param.dtype or buffer.device != param.device
                                           or buffer.shape != param.shape or not buffer.is_contiguous()):
                    # The model was cast or moved after earlier steps (model.double(), .to(...)):
                    # carry on with the buffer cast like the parameter, as torch.optim.SGD does.
                    # Stored back only after the step, so an error here changes nothing.
                    if buffer.shape != param.shape:
                        raise RuntimeError(f"momentum buffer of '{self.param_name(param)}' has shape "
                                           f"{tuple(buffer.shape)}, the parameter {tuple(param.shape)}")
                    update.buffer = buffer.to(device=param.device, dtype=param.dtype,
                                              memory_format=torch.contiguous_format, copy=True)
                    update.buffer_replaced = True
        if updates and self.check_finite:
            for name, param in self.graph.named_parameters().items():
                if not bool(torch.isfinite(param).all()):
                    raise FloatingPointError(f"PathSGD(check_finite=True): parameter '{name}' has non-finite values")
        return updates

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:
        """Performs a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = self._collect_updates()
        if updates:
            graph = self._graph_for_step()
            if isinstance(graph, GeneralGraph):
                graph.check_mode({id(t) for t in updates})
            with ops.use_reference(self.use_reference):
                path_sgd(graph, updates)
            for update in updates.values():
                if update.first_step or update.buffer_replaced:  # otherwise updated in place
                    self.state[update.param]["momentum_buffer"] = update.buffer
        return loss


class _InputShape:
    """Holds the shape (without the batch dim) of a model's most recent forward input."""
    __slots__ = ("last", "__weakref__")

    def __init__(self) -> None:
        self.last: Optional[Tuple[int, ...]] = None

    def record(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 1:
            self.last = tuple(args[0].shape[1:])


class ParamUpdate:
    """One parameter's update this step; ``buffer`` is None until momentum first runs."""
    __slots__ = ("param", "grad", "group", "buffer", "first_step", "buffer_replaced", "p", "_hyper")

    def __init__(self, param: Tensor, grad: Tensor, group: Dict[str, Any], buffer: Optional[Tensor]) -> None:
        self.param, self.grad, self.group, self.buffer = param, grad, group, buffer
        self.first_step = False
        self.buffer_replaced = False
        self.p: float = group["p"]
        self._hyper: Optional[Dict[str, Any]] = None

    def prepare_buffer(self) -> Optional[Tensor]:
        """The momentum buffer to pass to a kernel (allocated, uninitialized, on the first step)."""
        if self.group["momentum"] == 0:
            return None
        if self.buffer is None:
            self.buffer = torch.empty_like(self.param, memory_format=torch.contiguous_format)
            self.first_step = True
        return self.buffer

    def hyper(self) -> Dict[str, Any]:
        """Hyper-parameter keyword arguments of the pathsgd ops (built once the buffer is prepared)."""
        if self._hyper is not None and self._hyper["first_step"] == self.first_step:
            return self._hyper
        g = self.group
        lr = g["lr"]
        lo, hi = g["clamp"] if g["clamp"] is not None else (None, None)
        self._hyper = dict(p=float(g["p"]), lr=0.0 if isinstance(lr, Tensor) else float(lr),
                           momentum=float(g["momentum"]), dampening=float(g["dampening"]),
                           weight_decay=float(g["weight_decay"]), nesterov=bool(g["nesterov"]),
                           maximize=bool(g["maximize"]), first_step=self.first_step, eps=float(g["eps"]),
                           clamp_min=lo, clamp_max=hi, lr_tensor=lr if isinstance(lr, Tensor) else None)
        return self._hyper


def _on(gamma: LogScaled, weight: Tensor) -> LogScaled:
    """A gamma pair in the opmath dtype and on the device of ``weight`` (layers may differ)."""
    v, s = gamma
    device = weight.device
    if v.device == device and s.device == device and v.dtype == opmath_dtype(weight.dtype):
        return gamma  # the usual case; .to() would cost a dispatch per vector
    return v.to(device=device, dtype=opmath_dtype(weight.dtype)), s.to(device)


Batches = Dict[Tuple[int, bool, torch.device], List[Tuple["ParamUpdate", Tensor]]]


def _dense_chain_step(chain: DenseChain, updates: Dict[Tensor, ParamUpdate],
                      gamma0: Optional[Dict[float, LogScaled]] = None,
                      bias_batches: Optional[Batches] = None) -> Dict[float, LogScaled]:
    """Fused Path-SGD step of a dense chain. ``gamma0`` (per p) is the chain's input gamma when
    the chain is the head of a larger model; then the returned gamma_out at the chain input (per
    p, from the old weights) is what the rest of the model needs. Bias updates (materialized
    kappa) go into ``bias_batches`` when given, to share the caller's multi-tensor update."""
    params = [(layer.weight, layer.bias) for layer in chain.layers]  # module attribute lookups are slow: once
    ps = sorted({u.p for u in updates.values()} | set(gamma0 or ()))
    gamma_in = {p: chain_gamma_in(chain, p, lambda w, b, v, s, p_: ops.gamma_forward(w, b, *_on((v, s), w), p_),
                                  gamma0=gamma0[p] if gamma0 else None, with_output=False, params=params)
                for p in ps}
    last = params[-1][0]
    unit, unit_kappa = chain.output_unit(opmath_dtype(last.dtype), last.device)
    gamma_out = {p: unit for p in ps}
    deferred = bias_batches is not None
    bias_batches = bias_batches if deferred else {}
    for index in reversed(range(len(params))):
        weight, bias = params[index]
        bias_update = updates.get(bias) if bias is not None else None
        if bias_update is not None:
            if index == len(params) - 1 and bias.device == last.device:
                kappa = unit_kappa  # the last layer's bias: kappa = gamma_out = 1
            else:
                v, s = _on(gamma_out[bias_update.p], bias)
                kappa = v.to(torch.float64, copy=True).mul_(s.exp())
            bias_update.prepare_buffer()
            key = (id(bias_update.group), bias_update.first_step, bias.device)
            bias_batches.setdefault(key, []).append((bias_update, kappa))
        weight_update = updates.get(weight)
        # Read-only passes (other p values) must see the old weights: run them before the update.
        order = ps if len(ps) == 1 else sorted(ps, key=lambda p: weight_update is not None and weight_update.p == p)
        for p in order:
            update = weight_update if weight_update is not None and weight_update.p == p else None
            if update is None and index == 0 and gamma0 is None:
                continue  # nobody needs the gamma at the model input
            if update is not None:
                grad, buffer, hyper = update.grad, update.prepare_buffer(), update.hyper()
            else:
                grad, buffer, hyper = None, None, {**_READ_ONLY_HYPER, "p": float(p)}
            gamma_out[p] = ops.fused_dense_step_(weight, grad, buffer, *_on(gamma_in[p][index], weight),
                                                 *_on(gamma_out[p], weight), **hyper)
    if not deferred:
        _apply_batches(bias_batches)
    return gamma_out


_READ_ONLY_HYPER = dict(p=2.0, lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                        first_step=False, eps=0.0, clamp_min=None, clamp_max=None, lr_tensor=None)


def _general_graph_step(graph: GeneralGraph, updates: Dict[Tensor, ParamUpdate]) -> None:
    ps = sorted({u.p for u in updates.values()})
    head_names = graph.head_names
    fusable = graph.trunk_fusable_linears

    def fused_for(p: float) -> frozenset:
        return frozenset(n for n in fusable if updates.get(graph.weighted[n].weight) is not None
                         and updates[graph.weighted[n].weight].p == p)

    if graph.head is not None and len(ps) == 1:
        # Dense head (e.g. a CNN's classifier): its fused update passes run inside the
        # evaluation and hand the gamma_out at the head's input to the trunk's backward.
        p = ps[0]
        batches: Batches = {}

        def head_gamma(x: Tensor) -> Tensor:
            v, s = to_log_scaled(x.reshape(-1), opmath_dtype(graph.head.layers[0].weight.dtype))
            gv, gs = _dense_chain_step(graph.head, updates, gamma0={p: (v, s)}, bias_batches=batches)[p]
            return gv.to(x.device, torch.float64, copy=True).mul_(_on_device(gs, x.device).exp())

        fused = fused_for(p)
        _apply_graph_results(graph, updates, {p: (graph.trunk_kappas(p, fused, head_gamma), fused)}, head_names,
                             batches)
        return
    # Every abs-pow evaluation reads the old weights, so all of them run before any update.
    results = {}
    for p in ps:
        fused = fused_for(p) | frozenset(n for n in head_names if updates.get(graph.weighted[n].weight) is not None
                                         and updates[graph.weighted[n].weight].p == p)
        results[p] = (graph.evaluate(p, fused), fused)
    _apply_graph_results(graph, updates, results, frozenset())


def _apply_graph_results(graph: GeneralGraph, updates: Dict[Tensor, ParamUpdate],
                         results: Dict[float, Tuple[Any, frozenset]], skip: set,
                         batches: Optional[Batches] = None) -> None:
    """The updates of a general graph's parameters (modules in ``skip`` are done already):
    fused Linear layers through the dense kernel, the rest, with ``batches`` (kappa
    materialized already), through one multi-tensor update per group."""
    batches = batches if batches is not None else {}
    for module_name, module in graph.weighted.items():
        if module_name in skip:
            continue
        for kind in ("weight", "bias"):
            param = getattr(module, kind)
            update = updates.get(param) if param is not None else None
            if update is None:
                continue
            result, fused = results[update.p]
            if kind == "weight" and module_name in fused:
                buffer = update.prepare_buffer()
                gammas = [_on_device(t, param.device) for t in result.dense_gammas[module_name]]
                ops.fused_dense_step_(param, update.grad, buffer, *gammas, **update.hyper())
                continue
            update.prepare_buffer()
            batches.setdefault((id(update.group), update.first_step, param.device), []).append(
                (update, _on_device(result.kappas[graph.param_name(module_name, kind)], param.device)))
    _apply_batches(batches)


def _on_device(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)


def _apply_batches(batches: Batches) -> None:
    """One multi-tensor update per (group, first step, device) with materialized kappa."""
    for batch in batches.values():
        first = batch[0][0]
        ops.scaled_sgd_update_([u.param for u, _ in batch], [u.grad for u, _ in batch],
                               [u.buffer for u, _ in batch] if first.buffer is not None else [],
                               [k for _, k in batch], **first.hyper())


def _unit_parameter_step(graph: Union[DenseChain, GeneralGraph], updates: Dict[Tensor, ParamUpdate]) -> None:
    """PReLU slopes: node rescaling leaves a slope and its gradient unchanged, so they take the plain
    SGD update (kappa = 1, eps not applied), in one multi-tensor update per group."""
    batches: Batches = {}
    for param in graph.unit_params.values():
        update = updates.get(param)
        if update is None:
            continue
        update.prepare_buffer()
        update.hyper()["eps"] = 0.0  # g / max(1, 0) = g
        kappa = torch.ones_like(param, dtype=torch.float64, memory_format=torch.contiguous_format)
        batches.setdefault((id(update.group), update.first_step, param.device), []).append((update, kappa))
    _apply_batches(batches)


def path_sgd(graph: Union[DenseChain, GeneralGraph], updates: Dict[Tensor, ParamUpdate]) -> None:
    """Functional Path-SGD step over the parameters in ``updates`` (see :class:`PathSGD`)."""
    if graph.unit_params:
        _unit_parameter_step(graph, updates)
    if isinstance(graph, DenseChain):
        _dense_chain_step(graph, updates)
    else:
        _general_graph_step(graph, updates)
