"""path_norm and path_scales against the brute-force path enumeration of conftest.py."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pathsgd
from conftest import brute_force, enumerate_paths, linear_layers, make_mlp

P_VALUES = [1, 2, 3]


def _shapes():
    """Depth 1-4, widths 1-4 (inputs included), with and without biases, some mixed."""
    rng = random.Random(1234)
    shapes = [((1, 1), True), ((1, 1), False), ((4, 4), True), ((3, 1, 2), False), ((1, 4, 1), True),
              ((2, 3, 4, 2), True), ((4, 4, 4, 4, 4), True), ((4, 4, 4, 4, 4), False), ((1, 1, 1, 1, 1), True),
              ((2, 3, 2, 1), [True, False, True]), ((3, 2, 4, 1, 3), [False, True, False, True])]
    for _ in range(6):
        depth = rng.randint(1, 4)
        widths = tuple(rng.randint(1, 4) for _ in range(depth + 1))
        shapes.append((widths, [rng.random() < 0.5 for _ in range(depth)]))
    return shapes


SHAPES = _shapes()


def _check(model: nn.Module, p: float, rtol: float = 1e-12) -> None:
    norm_pow, kappa = brute_force(model, p)
    got_norm = pathsgd.path_norm(model, p)
    assert got_norm.dtype == torch.float64
    assert got_norm.dim() == 0
    assert math.isclose(float(got_norm) ** p, norm_pow, rel_tol=rtol, abs_tol=0.0), (float(got_norm) ** p, norm_pow)
    scales = pathsgd.path_scales(model, p)
    assert list(scales) == [n for n, _ in model.named_parameters()]
    for name, prm in model.named_parameters():
        got = scales[name]
        assert got.shape == prm.shape, name
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, kappa[name], rtol=rtol, atol=0.0, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# The oracle itself
# ----------------------------------------------------------------------------------------------------------------

def test_oracle_path_count():
    widths, has_bias = (2, 3, 4), [True, True]
    paths = enumerate_paths(widths, has_bias)
    assert len(paths) == 2 * 3 * 4 + 3 * 4 + 4
    assert len({tuple(p) for p in paths}) == len(paths)
    assert all(p[-1][1] == 2 for p in paths)  # every path ends at the output layer


def test_oracle_by_hand():
    """1-1-1 net: paths x->h->y, b1->h->y, b2->y."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(-3.0)
        model[2].weight.fill_(0.5)
        model[2].bias.fill_(5.0)
    for p in (1, 2, 3):
        norm_pow, kappa = brute_force(model, p)
        assert norm_pow == pytest.approx(2.0 ** p * 0.5 ** p + 3.0 ** p * 0.5 ** p + 5.0 ** p, rel=1e-15)
        assert float(kappa["0.weight"]) == pytest.approx(0.5 ** p)
        assert float(kappa["0.bias"]) == pytest.approx(0.5 ** p)
        assert float(kappa["2.weight"]) == pytest.approx(2.0 ** p + 3.0 ** p)
        assert float(kappa["2.bias"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# path_norm / path_scales vs brute force
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("widths,bias", SHAPES, ids=[f"{w}-{b}" for w, b in SHAPES])
def test_sequential_mlp(widths, bias, p):
    model = make_mlp(widths, bias=bias, seed=hash((widths, str(bias))) % 1000, scale=1.5)
    _check(model, p)


@pytest.mark.parametrize("p", P_VALUES)
def test_non_integer_p(p):
    model = make_mlp((3, 2, 4, 2), seed=3)
    _check(model, p + 0.5)


@pytest.mark.parametrize("p", P_VALUES)
def test_zero_weights_dead_units(p):
    """kappa of a zero edge is still the sum over its paths of the *other* edges (not 0)."""
    model = make_mlp((3, 4, 3, 2), seed=5)
    with torch.no_grad():
        model[0].weight[1].zero_()  # unit 1 of layer 1 has no input edge
        model[0].bias[1] = 0.0
        model[2].weight[:, 2].zero_()  # unit 2 of layer 1 has no output edge
        model[4].weight[0, 0] = 0.0
    _check(model, p)
    kappa = pathsgd.path_scales(model, p)
    assert float(kappa["4.weight"][0, 0]) > 0


@pytest.mark.parametrize("p", P_VALUES)
def test_all_zero_layer(p):
    model = make_mlp((3, 3, 2), seed=6)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    _check(model, p)


@pytest.mark.parametrize("p", P_VALUES)
def test_float32_model(p):
    """A float32 model: path_scales are float64, path_norm is in float32 (its opmath)."""
    model = make_mlp((3, 4, 2), seed=7, dtype=torch.float32)
    norm_pow, kappa = brute_force(model, p)
    assert pathsgd.path_norm(model, p).dtype == torch.float32
    assert float(pathsgd.path_norm(model, p)) ** p == pytest.approx(norm_pow, rel=1e-5)
    scales = pathsgd.path_scales(model, p)
    for name in kappa:
        assert scales[name].dtype == torch.float64
        torch.testing.assert_close(scales[name], kappa[name], rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("p", P_VALUES)
def test_huge_and_tiny_weights(p):
    """Weights 1e+-30: path products far outside float32 but inside float64."""
    model = make_mlp((2, 3, 3, 2), seed=8)
    with torch.no_grad():
        model[0].weight.mul_(1e30)
        model[0].bias.mul_(1e30)
        model[2].weight.mul_(1e-30)
        model[4].weight.mul_(1e10)
    _check(model, p, rtol=1e-11)


class FunctionalNet(nn.Module):
    """Custom module traced by torch.fx: functional relu, Flatten, Dropout, LeakyReLU, Identity."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(4, 3, bias=False)
        self.act = nn.LeakyReLU(0.1)
        self.ident = nn.Identity()
        self.fc3 = nn.Linear(3, 2)

    def forward(self, x):
        x = self.flatten(x)
        x = F.relu(self.fc1(x))
        x = self.drop(x)
        x = self.act(self.fc2(x))
        x = self.ident(x)
        x = F.dropout(x, 0.1, self.training)
        return self.fc3(torch.relu(x))


class NestedNet(nn.Module):
    """Linear layers inside nested modules, functional leaky_relu and a reshape."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU()))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(x.reshape(-1, 3))
        return self.head(F.leaky_relu(x, 0.2))


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("cls", [FunctionalNet, NestedNet])
def test_custom_module_traced(cls, p):
    torch.manual_seed(11)
    model = cls().double()
    _check(model, p)


def test_custom_module_names_match_named_parameters():
    model = NestedNet().double()
    assert list(pathsgd.path_scales(model)) == ["body.0.weight", "body.0.bias", "body.2.0.weight",
                                                "body.2.0.bias", "head.weight", "head.bias"]


class SizeFlattenNet(nn.Module):
    """The most common flatten idiom in custom modules: x.view(x.size(0), -1)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("p", [2])
def test_view_with_size_flatten(p):
    """'Flatten/reshape (modules or functions)' are identity edges of the chain."""
    torch.manual_seed(12)
    model = SizeFlattenNet().double()
    _check(model, p)


def test_bare_linear_model():
    """A single nn.Linear is the simplest supported network (depth 1)."""
    torch.manual_seed(13)
    model = nn.Linear(3, 2).double()
    norm_pow, kappa = brute_force(model, 2)
    assert float(pathsgd.path_norm(model, 2)) ** 2 == pytest.approx(norm_pow, rel=1e-12)
    scales = pathsgd.path_scales(model, 2)
    torch.testing.assert_close(scales["weight"], kappa["weight"])
    torch.testing.assert_close(scales["bias"], kappa["bias"])


def test_path_norm_rescaling_invariant():
    """phi_p is invariant under node rescaling (it depends on the function class, not the parametrization)."""
    model = make_mlp((3, 4, 4, 2), seed=14)
    before = {p: float(pathsgd.path_norm(model, p)) for p in P_VALUES}
    with torch.no_grad():
        c = torch.tensor([0.01, 3.0, 50.0, 0.2], dtype=torch.float64)
        model[0].weight.mul_(c[:, None])
        model[0].bias.mul_(c)
        model[2].weight.div_(c[None, :])
    for p in P_VALUES:
        assert float(pathsgd.path_norm(model, p)) == pytest.approx(before[p], rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Differentiability
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("widths,bias", [((3, 4, 2), True), ((2, 3, 3, 2), [True, False, True]), ((4, 1), False)])
def test_path_norm_gradient_matches_brute_force(widths, bias, p):
    """d phi / d w_e = (1/p) phi^(1-p) * p |w_e|^(p-1) sign(w_e) kappa_e  (kappa from brute force)."""
    model = make_mlp(widths, bias=bias, seed=21)
    norm = pathsgd.path_norm(model, p)
    assert norm.requires_grad
    names, prms = zip(*model.named_parameters())
    grads = torch.autograd.grad(norm, prms)
    norm_pow, kappa = brute_force(model, p)
    phi = norm_pow ** (1.0 / p)
    for name, prm, grad in zip(names, prms, grads):
        w = prm.detach()
        expected = phi ** (1 - p) * w.abs().pow(p - 1) * w.sign() * kappa[name]
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("p", [1, 2, 3, 2.5])
def test_path_norm_gradcheck(p):
    model = make_mlp((3, 3, 2), seed=22)
    names = [n for n, _ in model.named_parameters()]
    inputs = tuple(prm.detach().clone().requires_grad_(True) for prm in model.parameters())

    def fn(*flat):
        functional = make_mlp((3, 3, 2), seed=22)
        # Swap the parameters for the inputs so autograd sees them.
        for name, t in zip(names, flat):
            mod_name, attr = name.rsplit(".", 1)
            mod = functional.get_submodule(mod_name)
            delattr(mod, attr)
            setattr(mod, attr, t)
        return pathsgd.path_norm(functional, p)

    try:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    except ValueError as exc:  # a plain-tensor attribute cannot be traced as a parameter: fall back
        pytest.skip(f"functional parameter swap not traceable: {exc}")


@pytest.mark.parametrize("p", P_VALUES)
def test_path_norm_finite_differences(p):
    """Central differences of path_norm vs its autograd gradient, entry by entry."""
    model = make_mlp((2, 3, 2), seed=23)
    norm = pathsgd.path_norm(model, p)
    grads = torch.autograd.grad(norm, list(model.parameters()))
    h = 1e-6
    for prm, grad in zip(model.parameters(), grads):
        flat = prm.data.view(-1)
        for k in range(flat.numel()):
            old = float(flat[k])
            with torch.no_grad():
                flat[k] = old + h
                up = float(pathsgd.path_norm(model, p))
                flat[k] = old - h
                down = float(pathsgd.path_norm(model, p))
                flat[k] = old
            assert (up - down) / (2 * h) == pytest.approx(float(grad.view(-1)[k]), rel=1e-5, abs=1e-8)


def test_path_norm_as_regularizer_backward():
    """path_norm used in a loss: .backward() fills .grad of every parameter."""
    model = make_mlp((3, 4, 2), seed=24)
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = model(x).pow(2).mean() + 1e-3 * pathsgd.path_norm(model)
    loss.backward()
    assert all(prm.grad is not None and torch.isfinite(prm.grad).all() for prm in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Property-based: random shapes and weights
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 4), min_size=2, max_size=5),
       bias_bits=st.integers(0, 15), p=st.sampled_from([1, 2, 3, 1.5]), seed=st.integers(0, 10_000),
       log_scale=st.floats(-3, 3))
def test_random_mlps(widths, bias_bits, p, seed, log_scale):
    depth = len(widths) - 1
    bias = [bool(bias_bits >> k & 1) for k in range(depth)]
    model = make_mlp(tuple(widths), bias=bias, seed=seed, scale=10.0 ** log_scale)
    _check(model, p, rtol=1e-11)


def test_linear_layers_helper_order():
    model = FunctionalNet()
    assert [n for n, _ in linear_layers(model)] == ["fc1", "fc2", "fc3"]
