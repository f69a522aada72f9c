"""Shared helpers of the pathsgd test suite.

The brute-force oracle here is deliberately independent of the code under test:
it enumerates every input-or-bias -> output path of a dense chain unit by unit
with itertools (no gamma recursion, no matrix products) and sums products of
``|w|^p`` in Python floats (float64).
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import settings

# Under CI the property tests run a fixed set of examples (derandomized, the same on every run), so a
# result does not depend on the draw; local runs keep drawing new examples and finding new cases.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# An edge of the path graph: ("w", layer, i, j) is W_layer[i, j] (unit j of layer-1 -> unit i of layer);
# ("b", layer, i) is the bias of unit i of layer (from that bias's own constant source unit).
Edge = Tuple


# --------------------------------------------------------------------------------------------------------------
# Brute-force path enumeration
# --------------------------------------------------------------------------------------------------------------

def enumerate_paths(widths: Sequence[int], has_bias: Sequence[bool]) -> List[List[Edge]]:
    """Every input-or-bias -> output path of a dense chain, as its list of edges.

    ``widths[0]`` is the number of inputs and ``widths[l]`` the number of units of
    layer ``l`` (1..L); ``has_bias[l-1]`` says whether layer ``l`` has a bias.
    """
    depth = len(widths) - 1
    paths: List[List[Edge]] = []
    # Paths from an input unit: one unit per layer 0..L.
    for units in itertools.product(*[range(w) for w in widths]):
        paths.append([("w", layer, units[layer], units[layer - 1]) for layer in range(1, depth + 1)])
    # Paths from the bias source of layer l0: bias edge into a unit of l0, then one unit per later layer.
    for l0 in range(1, depth + 1):
        if not has_bias[l0 - 1]:
            continue
        for units in itertools.product(*[range(w) for w in widths[l0:]]):
            path: List[Edge] = [("b", l0, units[0])]
            path += [("w", layer, units[layer - l0], units[layer - l0 - 1]) for layer in range(l0 + 1, depth + 1)]
            paths.append(path)
    return paths


def linear_layers(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """The model's nn.Linear modules in definition order (our test models call them in that order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def brute_force(model: nn.Module, p: float) -> Tuple[float, Dict[str, torch.Tensor]]:
    """``(phi_p^p, {param name: kappa})`` by explicit path enumeration, in float64.

    kappa_e = sum over the paths through e of the product of the other edges' |w|^p.
    """
    layers = linear_layers(model)
    weights = [m.weight.detach().double().tolist() for _, m in layers]
    biases = [m.bias.detach().double().tolist() if m.bias is not None else None for _, m in layers]
    widths = [layers[0][1].in_features] + [m.out_features for _, m in layers]
    has_bias = [b is not None for b in biases]

    def a(edge: Edge) -> float:
        if edge[0] == "w":
            return abs(weights[edge[1] - 1][edge[2]][edge[3]]) ** p
        return abs(biases[edge[1] - 1][edge[2]]) ** p

    total = 0.0
    kappa: Dict[Edge, float] = {}
    for path in enumerate_paths(widths, has_bias):
        values = [a(e) for e in path]
        total += math.prod(values)
        for k, edge in enumerate(path):
            kappa[edge] = kappa.get(edge, 0.0) + math.prod(values[:k] + values[k + 1:])

    out: Dict[str, torch.Tensor] = {}
    for layer, (name, m) in enumerate(layers, start=1):
        prefix = f"{name}." if name else ""
        kw = torch.zeros(m.out_features, m.in_features, dtype=torch.float64)
        for i in range(m.out_features):
            for j in range(m.in_features):
                kw[i, j] = kappa.get(("w", layer, i, j), 0.0)
        out[prefix + "weight"] = kw
        if m.bias is not None:
            out[prefix + "bias"] = torch.tensor([kappa.get(("b", layer, i), 0.0) for i in range(m.out_features)],
                                                dtype=torch.float64)
    return total, out


def brute_force_scaled_grads(model: nn.Module, p_of: Dict[str, float], eps: float) -> Dict[str, torch.Tensor]:
    """``{name: grad / max(kappa^(2/p), eps)}`` with kappa from the brute-force oracle (per-param p)."""
    cache: Dict[float, Dict[str, torch.Tensor]] = {}
    scaled = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        p = p_of[name]
        if p not in cache:
            cache[p] = brute_force(model, p)[1]
        kappa_pow = cache[p][name].pow(2.0 / p).clamp_min(eps).to(param.dtype)
        scaled[name] = param.grad / kappa_pow
    return scaled


class OraclePathSGD:
    """Path-SGD written as torch.optim.SGD on brute-force-scaled gradients, then clamp.

    ``groups`` are lists of parameter names with per-group options (lr, momentum,
    dampening, weight_decay, nesterov, maximize, p, clamp, eps), like torch param groups.
    """

    SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")

    def __init__(self, model: nn.Module, groups: List[dict], **defaults):
        self.model = model
        self.named = dict(model.named_parameters())
        self.groups = []
        torch_groups = []
        for g in groups:
            g = {**defaults, **g}
            g.setdefault("p", 2)
            g.setdefault("eps", 1e-12)
            g.setdefault("clamp", None)
            self.groups.append(g)
            torch_groups.append({"params": [self.named[n] for n in g["names"]],
                                 **{k: g[k] for k in self.SGD_KEYS if k in g}})
        self.sgd = torch.optim.SGD(torch_groups)

    @torch.no_grad()
    def step(self) -> None:
        p_of = {n: g["p"] for g in self.groups for n in g["names"]}
        scaled = {}
        for g in self.groups:  # eps may differ per group
            s = brute_force_scaled_grads(self.model, p_of, g["eps"])
            scaled.update({n: s[n] for n in g["names"] if n in s})
        saved = {n: self.named[n].grad for n in scaled}
        for n, s in scaled.items():
            self.named[n].grad = s
        self.sgd.step()
        for n, grad in saved.items():
            self.named[n].grad = grad
        for g in self.groups:
            clamp = g["clamp"]
            if clamp is None:
                continue
            lo, hi = (-clamp, clamp) if isinstance(clamp, (int, float)) else clamp
            for n in g["names"]:
                if n in scaled:
                    self.named[n].clamp_(lo, hi)


# --------------------------------------------------------------------------------------------------------------
# Model factories
# --------------------------------------------------------------------------------------------------------------

def make_mlp(widths: Sequence[int], bias=True, dtype=torch.float64, seed: int = 0, act=nn.ReLU,
             scale: float = 1.0) -> nn.Sequential:
    """nn.Sequential(Linear, act, Linear, ..., Linear); ``bias`` is a bool or a per-layer list."""
    torch.manual_seed(seed)
    depth = len(widths) - 1
    biases = list(bias) if isinstance(bias, (list, tuple)) else [bias] * depth
    mods: List[nn.Module] = []
    for layer in range(depth):
        mods.append(nn.Linear(widths[layer], widths[layer + 1], bias=biases[layer], dtype=dtype))
        if layer < depth - 1:
            mods.append(act())
    model = nn.Sequential(*mods)
    if scale != 1.0:
        with torch.no_grad():
            for prm in model.parameters():
                prm.mul_(scale)
    return model


def set_random_grads(model: nn.Module, seed: int, skip: Optional[set] = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, prm in model.named_parameters():
        if skip and name in skip:
            prm.grad = None
        else:
            prm.grad = torch.randn(prm.shape, generator=gen, dtype=torch.float64).to(prm.dtype)


def loss_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Zero grads, MSE loss backward; returns the loss."""
    for prm in model.parameters():
        prm.grad = None
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss.detach()


def params_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.named_parameters()}


def assert_params_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"parameter {n}: {m}")


@pytest.fixture(autouse=True)
def _one_thread_by_default():
    """Tests run on one intra-op thread unless they set another count themselves.

    Tiny tensors gain nothing from threads, and OpenMP on an oversubscribed CI
    machine makes each op 10-50x slower. Tests of the thread-parallel kernel
    paths (determinism, the large sizes) call torch.set_num_threads(2) explicitly.
    The previous count is restored afterwards.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
