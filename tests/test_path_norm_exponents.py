"""path_norm / path_norms / path_scales for every exponent p in [0, inf], against path enumeration.

p = 0 counts the paths whose weights are all non-zero, 0 < p < 1 is the quasi-norm, p = inf the
largest path product (a forward max-propagation in log domain). Oracles: brute-force path
enumeration of MLPs (conftest.enumerate_paths) and of the unrolled unit-level graphs of conv nets
(test_general_graphs.Unrolled), in float64; finite differences for the gradients.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import pathsgd

from conftest import enumerate_paths, linear_layers, make_mlp
from test_general_graphs import ORACLE_NETS, make_net, path_params, unrolled_of

INF = float("inf")
PS = (0, 0.5, 1, 2, 3, INF)


def _edge_pow(a: float, p: float) -> float:
    return float(a != 0) if p == 0 else abs(a) ** p


def mlp_oracle(model: nn.Module, p: float):
    """``(phi_p, {name: kappa})`` of an MLP by enumerating its paths (kappa only for finite p)."""
    layers = linear_layers(model)
    W = [m.weight.detach().double().tolist() for _, m in layers]
    B = [m.bias.detach().double().tolist() if m.bias is not None else None for _, m in layers]
    widths = [layers[0][1].in_features] + [m.out_features for _, m in layers]

    def value(edge):
        return W[edge[1] - 1][edge[2]][edge[3]] if edge[0] == "w" else B[edge[1] - 1][edge[2]]

    paths = enumerate_paths(widths, [b is not None for b in B])
    total, kappa = 0.0, {}
    for path in paths:
        a = [abs(value(e)) if p == INF else _edge_pow(value(e), p) for e in path]
        others = [math.prod(a[:k] + a[k + 1:]) for k in range(len(path))]
        if p == INF:  # the largest path product, and per edge the largest product of the others
            total = max(total, math.prod(a))
            for e, o in zip(path, others):
                kappa[e] = max(kappa.get(e, 0.0), o)
            continue
        total += math.prod(a)
        for e, o in zip(path, others):
            kappa[e] = kappa.get(e, 0.0) + o
    out = {}
    for layer, (name, m) in enumerate(layers, start=1):
        prefix = f"{name}." if name else ""
        out[prefix + "weight"] = torch.tensor([[kappa.get(("w", layer, i, j), 0.0) for j in range(m.in_features)]
                                               for i in range(m.out_features)], dtype=torch.float64)
        if m.bias is not None:
            out[prefix + "bias"] = torch.tensor([kappa.get(("b", layer, i), 0.0) for i in range(m.out_features)],
                                                dtype=torch.float64)
    return (total if p in (0, INF) else total ** (1.0 / p)), out


def _with_zeros(model: nn.Module) -> nn.Module:
    """Some weights and a bias exactly zero: p = 0 must not count their paths."""
    with torch.no_grad():
        first, *_, last = [m for m in model if isinstance(m, nn.Linear)]
        first.weight[0, :2] = 0
        first.bias[1] = 0
        last.weight[:, 2] = 0
    return model


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("bias", [True, [True, False, True]], ids=["bias", "no-middle-bias"])
def test_mlp_every_exponent_matches_enumeration(p, bias):
    model = _with_zeros(make_mlp((3, 4, 5, 2), bias=bias, seed=3, scale=1.7))
    want, kappa = mlp_oracle(model, p)
    got = pathsgd.path_norm(model, p)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got.detach()) == pytest.approx(want, rel=1e-12), (float(got.detach()), want)
    assert float(pathsgd.path_norm(model, p, log=True).detach()) == pytest.approx(math.log(want), rel=1e-12, abs=1e-12)
    scales = pathsgd.path_scales(model, p)
    assert list(scales) == [n for n, _ in model.named_parameters()]
    for name, k in kappa.items():
        torch.testing.assert_close(scales[name], k, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")


def test_p0_counts_paths_exactly():
    model = _with_zeros(make_mlp((3, 4, 5, 2), seed=3))
    count, _ = mlp_oracle(model, 0)
    assert count == int(count) and count < 3 * 4 * 5 * 2 + 4 * 5 * 2 + 5 * 2 + 2  # zeros cut some paths
    assert float(pathsgd.path_norm(model, 0).detach()) == count  # exact, no rounding


def test_path_norms_is_path_norm_for_each_p():
    model = make_mlp((4, 6, 3), seed=1)
    got = pathsgd.path_norms(model, PS)
    assert list(got) == [float(p) for p in PS]
    for p in PS:
        assert float(got[p].detach()) == pytest.approx(float(pathsgd.path_norm(model, p).detach()), rel=1e-14)


def unrolled_norm(model: nn.Module, p: float) -> float:
    """phi_p of a conv net from its unrolled unit-level graph (every path enumerated)."""
    g = unrolled_of(model)
    paths = g.paths()
    a = np.append(np.abs(g._edge_values()), 1.0)  # the dummy edge pads short paths
    prods = (a if p == INF else (a != 0).astype(float) if p == 0 else a ** p)[paths].prod(axis=1)
    if p == INF:
        return float(prods.max())
    return float(prods.sum()) if p == 0 else float(prods.sum()) ** (1.0 / p)


@pytest.mark.parametrize("p", (0, 0.5, INF))
@pytest.mark.parametrize("cls", ORACLE_NETS, ids=lambda c: c.__name__)
def test_conv_nets_every_exponent_matches_unrolled_graph(cls, p):
    model = make_net(cls, seed=4)
    with torch.no_grad():  # exact zeros: p = 0 must drop their paths, p = inf must skip them
        first = next(t for n, t in path_params(model).items() if n.endswith("weight"))
        first.view(-1)[::3] = 0
    want = unrolled_norm(model, p)
    got = float(pathsgd.path_norm(model, p, cls.input_shape).detach())
    assert got == pytest.approx(want, rel=1e-10), (got, want)
    if p == 0.5:
        scales = pathsgd.path_scales(model, p, cls.input_shape)
        _, kappa = unrolled_of(model).scales(p)
        for name in path_params(model):
            torch.testing.assert_close(scales[name], kappa[name], rtol=1e-10, atol=1e-300, msg=lambda m: f"{name}: {m}")
    if p == INF:
        scales = pathsgd.path_scales(model, p, cls.input_shape)
        want_scales = unrolled_max_scales(model)
        for name in path_params(model):
            torch.testing.assert_close(scales[name], want_scales[name], rtol=1e-10, atol=1e-300,
                                       msg=lambda m: f"{name}: {m}")


def unrolled_max_scales(model: nn.Module):
    """kappa at p = inf from the unrolled graph: per weight, the largest product of the other edges of a
    path through any of its edges."""
    g = unrolled_of(model)
    paths = g.paths()
    a = np.append(np.abs(g._edge_values()), 1.0)
    A = a[paths]
    ones = np.ones((A.shape[0], 1))
    prefix = np.cumprod(np.concatenate([ones, A[:, :-1]], axis=1), axis=1)
    suffix = np.cumprod(np.concatenate([ones, A[:, :0:-1]], axis=1), axis=1)[:, ::-1]
    others = prefix * suffix
    offsets, total = {}, 0
    for name, t in g.params.items():
        offsets[name] = total
        total += t.numel()
    slots = []
    for k in g.key:
        if isinstance(k, tuple):
            slots.append(offsets[k[0]] + int(np.ravel_multi_index(k[1], tuple(g.params[k[0]].shape))))
        else:
            slots.append(-1)
    S = np.array(slots + [-1], dtype=np.int64)[paths]
    flat = np.zeros(total)
    mask = S >= 0
    np.maximum.at(flat, S[mask], others[mask])
    return {name: torch.from_numpy(flat[offsets[name]:offsets[name] + t.numel()].reshape(tuple(t.shape)).copy())
            for name, t in g.params.items()}


def _max_plus_log(weights, biases) -> float:
    """log of the largest path product of a dense chain, by dynamic programming in numpy (float64)."""
    v = np.zeros(weights[0].shape[1])  # log 1 at the inputs
    for w, b in zip(weights, biases):
        with np.errstate(divide="ignore"):
            v = (np.log(np.abs(w)) + v[None, :]).max(axis=1)
            if b is not None:
                v = np.maximum(v, np.log(np.abs(b)))
    return float(v.max())


def test_linf_of_a_100_layer_float32_net_leaves_float32_range():
    torch.manual_seed(0)
    layers = []
    for _ in range(100):
        layers += [nn.Linear(3, 3), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(20.0)  # largest path product ~ 1e100 >> float32 max (3.4e38)
    want = _max_plus_log([m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)],
                         [m.bias.detach().double().numpy() for m in model if isinstance(m, nn.Linear)])
    assert want > math.log(torch.finfo(torch.float32).max) + 50
    got = pathsgd.path_norm(model, INF, log=True)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    assert math.isinf(float(pathsgd.path_norm(model, INF).detach()))  # the value itself overflows float32, as it should


def _tiny_conv():
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                         nn.Conv1d(4, 2, 2, dilation=2), nn.Flatten(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("p", (0.5, INF))
def test_path_norm_gradient_matches_finite_differences(p, kind):
    model = make_mlp((2, 3, 2), seed=5, scale=1.3) if kind == "mlp" else _tiny_conv()
    shape = None if kind == "mlp" else (2, 7)
    norm = pathsgd.path_norm(model, p, shape)
    params = list(model.parameters())
    grads = torch.autograd.grad(norm, params)
    h = 1e-6
    for param, grad in zip(params, grads):
        for idx in np.ndindex(*param.shape):
            with torch.no_grad():
                old = float(param[idx])
                param[idx] = old + h
                up = float(pathsgd.path_norm(model, p, shape).detach())
                param[idx] = old - h
                down = float(pathsgd.path_norm(model, p, shape).detach())
                param[idx] = old
            assert float(grad[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8), (idx, p)
    assert any(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), True, "2", None])
def test_path_norm_bad_p_raises(bad):
    with pytest.raises(ValueError, match="Invalid p"):
        pathsgd.path_norm(make_mlp((2, 2)), bad)


def test_pathsgd_still_needs_p_at_least_one():
    for p in (0, 0.5, INF):
        with pytest.raises(ValueError, match=r"p >= 1.*quasi-norm"):
            pathsgd.PathSGD(make_mlp((2, 2)), lr=0.1, p=p)


def magnitude_oracle(model: nn.Module, p: float):
    """{name: sum over the paths through each weight of the path's product} by enumeration."""
    layers = linear_layers(model)
    W = [m.weight.detach().double().tolist() for _, m in layers]
    B = [m.bias.detach().double().tolist() if m.bias is not None else None for _, m in layers]
    widths = [layers[0][1].in_features] + [m.out_features for _, m in layers]
    value = lambda e: W[e[1] - 1][e[2]][e[3]] if e[0] == "w" else B[e[1] - 1][e[2]]  # noqa: E731
    share = {}
    for path in enumerate_paths(widths, [b is not None for b in B]):
        prod = math.prod(abs(value(e)) if p == INF else _edge_pow(value(e), p) for e in path)
        for e in path:  # p = inf: the largest path product through the weight
            share[e] = max(share.get(e, 0.0), prod) if p == INF else share.get(e, 0.0) + prod
    return share


@pytest.mark.parametrize("p", (0, 1, 2, INF))
def test_path_magnitudes_match_enumeration(p):
    model = _with_zeros(make_mlp((3, 4, 2), seed=6, scale=1.4))
    got = pathsgd.path_magnitudes(model, p)
    share = magnitude_oracle(model, p)
    for layer, (name, m) in enumerate(linear_layers(model), start=1):
        want_w = torch.tensor([[share.get(("w", layer, i, j), 0.0) for j in range(m.in_features)]
                               for i in range(m.out_features)], dtype=torch.float64)
        torch.testing.assert_close(got[f"{name}.weight"], want_w, rtol=1e-12, atol=0)
        want_b = torch.tensor([share.get(("b", layer, i), 0.0) for i in range(m.out_features)], dtype=torch.float64)
        torch.testing.assert_close(got[f"{name}.bias"], want_b, rtol=1e-12, atol=0)
    assert float(got["0.weight"][0, 0]) == 0.0  # a zero weight carries no path product
