"""PathSGD: torch.optim.SGD on path-scaled gradients (Neyshabur et al., 2015)."""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .clamp import ClampArg, normalize_clamp
from .functional import ParamUpdate, path_sgd
from .graph import PathGraph, build_path_graph, unwrap_model
from .scales import check_p
from .step_plans import ChainStepPlan, TrunkStepPlan

__all__ = ["PathSGD"]


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
    every = group["kappa_every"]
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"Invalid kappa_every: {every!r} (an int >= 1: recompute kappa every kappa_every steps; "
                         "or None: compute it once, at the first step, and keep it)")
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
        kappa_every: recompute kappa every ``kappa_every`` steps (1, the default, is the paper's
            algorithm: every step), or ``None``: compute it once, at the first step, and keep it. Between
            refreshes the step is SGD on ``g / kappa_stored^(2/p)`` (no path-graph evaluation, no gamma
            forward); that keeps the rescaling invariance, because the gradients and the stored kappa
            transform together. kappa is one function of all the weights: it is recomputed for every
            parameter when any group's interval is due. The stored kappas (a dense weight's two gamma
            vectors, else kappa itself) and their ages are in ``state_dict``, so a resumed run continues
            bit-identically.
        check_finite: raise before the step if a parameter (weight, bias, PReLU slope) is non-finite
            (costs a sync).
    """

    def __init__(self, params: Union[nn.Module, Iterable[Tensor], Iterable[Dict[str, Any]]],
                 lr: Union[float, Tensor] = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 p: float = 2, clamp: ClampArg = None, eps: float = 1e-12,
                 input_shape: Optional[Tuple[int, ...]] = None, model: Optional[nn.Module] = None,
                 check_finite: bool = False, kappa_every: Optional[int] = 1) -> None:
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
        if not self.graph.is_dense_chain and self.graph.input_shape is not None:
            self._graphs[self.graph.input_shape] = self.graph
        # The shape of the model's most recent forward input; the hook goes with the optimizer.
        self._seen = _InputShape()
        handle = self._model.register_forward_pre_hook(self._seen.record)
        weakref.finalize(self, handle.remove)
        self._param_names = {id(t): name for name, t in {**self.graph.named_parameters(),
                                                          **self.graph.unit_params}.items()}
        self.check_finite = check_finite
        # Step plans by (group, parameter list, graph): a net fed two input sizes in turn keeps one per
        # graph (and its workspace); _plan is the latest (key, plan).
        self._plans: Dict[Tuple[int, ...], Optional[ChainStepPlan]] = {}
        self._plan: Optional[Tuple[Tuple[int, ...], Optional[ChainStepPlan]]] = None
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=False, fused=fused, p=p, clamp=clamp,
                        eps=eps, kappa_every=kappa_every)
        _check_group(dict(defaults))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
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
            group.setdefault("kappa_every", 1)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("differentiable", False)
        self.__dict__.setdefault("use_reference", False)
        self.__dict__.setdefault("_plan", None)
        self.__dict__.setdefault("_plans", {})

    def _graph_for_step(self) -> PathGraph:
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
        if self.graph.is_dense_chain:
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

    def _collect_updates(self) -> Dict[Tensor, ParamUpdate]:
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
            for name, param in {**self.graph.named_parameters(), **self.graph.unit_params}.items():  # PReLU slopes too
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
        plan = self._step_plan()
        if plan is not None and plan.step(self.state):
            return loss
        updates = self._collect_updates()
        if updates:
            stored, record = self._kappa_schedule(updates)
            self.graph.check_mode({id(t) for t in updates})
            graph = self._graph_for_step() if stored is None else None  # a stored kappa needs no graph
            with ops.use_reference(self.use_reference):
                path_sgd(graph, updates, stored, record, self.graph.unit_params)
            for update in updates.values():
                if update.first_step or update.buffer_replaced:  # otherwise updated in place
                    self.state[update.param]["momentum_buffer"] = update.buffer
            if record is not None or stored is not None:
                self._store_kappas(updates, record)
        return loss

    def _step_plan(self) -> Optional[ChainStepPlan]:
        """The step plan (:mod:`pathsgd.step_plans`) when this step may take it: one param group
        with every parameter of the model's path graph, kappa recomputed every step, the compiled
        kernels, no check_finite, no PReLU slopes or pruning; an MLP (one dense chain, no
        BatchNorm, no input_shape to check) or a conv net with a dense head and no dense layer in
        its trunk (its graph for this step's input shape). None otherwise: the general path."""
        if len(self.param_groups) != 1 or self.check_finite or self.use_reference or torch.compiler.is_compiling():
            return None
        group = self.param_groups[0]
        if group["kappa_every"] != 1:
            return None
        graph = self.graph
        if not graph.is_dense_chain:
            try:
                graph = self._graph_for_step()
            except ValueError:
                return None  # the general path raises it, after the per-parameter checks
        # A plan belongs to this group, its parameter list (it keeps the group alive, so its id is not
        # reused) and this graph (kept in self._graphs).
        key = (id(group), id(group["params"]), len(group["params"]), id(graph))
        plans = self._plans
        if key not in plans or (plans[key] is not None and not plans[key].params_in_place()):
            if len(plans) >= _MAX_PLANS:  # many input sizes (a fully convolutional net): start over
                plans.clear()
            plans[key] = self._new_step_plan(graph, group)
        self._plan = (key, plans[key])
        return plans[key]

    def _new_step_plan(self, graph: PathGraph, group: Dict[str, Any]) -> Optional[ChainStepPlan]:
        if graph.head is None or graph.unit_params or any(layer.pruned for layer in graph.layers.values()):
            return None
        if graph.is_dense_chain:
            if graph.batchnorms or self._given_input_shape is not None:
                return None
            plan = ChainStepPlan(graph.head, group)
        else:
            if graph.dense_layers - graph.head_names:
                return None
            plan = TrunkStepPlan(graph, group)
        if plan.kernel is None or {id(t) for t in group["params"]} != {id(t) for t in plan.params}:
            return None
        return plan

    def _kappa_schedule(self, updates: Dict[Tensor, ParamUpdate]) -> Tuple[Optional[Dict[Tensor, Any]],
                                                                           Optional[Dict[Tensor, Any]]]:
        """``(stored, record)``: the kept kappas when no group's interval is due (else None), and a
        dict to record this step's kappas in when they are to be kept (None with kappa_every=1)."""
        if all(u.group["kappa_every"] == 1 for u in updates.values()):
            return None, None
        units = {id(t) for t in self.graph.unit_params.values()}
        stored: Dict[Tensor, Any] = {}
        for param, update in updates.items():
            if id(param) in units:
                continue
            state = self.state.get(param)
            every = update.group["kappa_every"]
            if not state or "kappa_age" not in state or (every is not None and state["kappa_age"] >= every):
                return None, {}
            stored[param] = state["kappa"] if "kappa" in state else tuple(state[k] for k in _GAMMA_KEYS)
        return stored, None

    def _store_kappas(self, updates: Dict[Tensor, ParamUpdate], record: Optional[Dict[Tensor, Any]]) -> None:
        """After a step on the schedule: the new kappas (refresh) or the ages (stored step)."""
        units = {id(t) for t in self.graph.unit_params.values()}
        for param in updates:
            if id(param) in units:
                continue
            state = self.state[param]
            if record is None:
                state["kappa_age"] += 1
                continue
            for key in ("kappa",) + _GAMMA_KEYS:
                state.pop(key, None)
            entry = record[param]
            if isinstance(entry, tuple):
                state.update({key: t.clone() for key, t in zip(_GAMMA_KEYS, entry)})
            else:
                state["kappa"] = entry
            state["kappa_age"] = 1

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, except that the stored kappas keep their
        dtype (float64 kappa, opmath gammas): the base class casts floating state to the parameter's."""
        saved = state_dict["state"]
        kept = {pid: {k: v for k, v in s.items() if k in _KAPPA_KEYS} for pid, s in saved.items()}
        state_dict = {**state_dict, "state": {pid: {k: v for k, v in s.items() if k not in _KAPPA_KEYS}
                                              for pid, s in saved.items()}}
        super().load_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [t for group in self.param_groups for t in group["params"]]
        by_id = dict(zip(ids, params))
        for pid, values in kept.items():
            if values and pid in by_id:
                param = by_id[pid]
                self.state[param].update({k: v.to(param.device, copy=True) for k, v in values.items()})


# Step plans kept per optimizer (one per input-shape graph of a conv net).
_MAX_PLANS = 8

# State keys of the kappa schedule (kappa_every != 1): a dense weight's gammas, or the kappa itself.
_GAMMA_KEYS = ("gamma_in", "gamma_in_log_scale", "gamma_out", "gamma_out_log_scale")
_KAPPA_KEYS = ("kappa",) + _GAMMA_KEYS


class _InputShape:
    """Holds the shape (without the batch dim) of a model's most recent forward input."""
    __slots__ = ("last", "__weakref__")

    def __init__(self) -> None:
        self.last: Optional[Tuple[int, ...]] = None

    def record(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 1:
            self.last = tuple(args[0].shape[1:])
