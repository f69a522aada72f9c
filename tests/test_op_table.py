"""One parametrized test over the IR's op table (pathsgd.graph.OP_TABLE): every entry is accepted
by validation, lowered to its kind, evaluated by the taped evaluator (compiled and reference
ops) and by its autograd twin with the same kappas, and stepped by PathSGD. A new table entry
without an example model here fails ``test_every_table_entry_has_an_example``."""
from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import functional, graph, ops

INPUT_SHAPE = (2, 8)


class Net(nn.Module):
    """conv -> ``body`` (the op under test) -> flatten -> linear, float64."""

    def __init__(self, body: Callable, extra: Dict[str, nn.Module], flat: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.extra = nn.ModuleDict(extra)
        self.body = body
        self.fc = nn.Linear(flat, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(self, self.conv(x)), 1))


def _bn() -> nn.Module:
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.eval().requires_grad_(False)


# kind -> (extra modules, body(net, x), flattened size)
EXAMPLES: Dict[str, tuple] = {
    graph.LAYER: ({"lin": nn.Linear(8, 5)}, lambda n, x: n.extra["lin"](x), 15),
    graph.ALIAS: ({"drop": nn.Dropout1d(0.0), "act": nn.LeakyReLU(0.1)},
                  lambda n, x: F.relu(n.extra["act"](n.extra["drop"](x))), 24),
    graph.RESHAPE: ({"unflat": nn.Unflatten(2, (2, 4))}, lambda n, x: n.extra["unflat"](x).reshape(-1, 3, 8), 24),
    graph.SUMPOOL: ({"pool": nn.MaxPool1d(3, 2, padding=1)}, lambda n, x: n.extra["pool"](x), 12),
    graph.AVGPOOL: ({"pool": nn.AvgPool1d(3, 2, padding=1, count_include_pad=False, ceil_mode=True)},
                    lambda n, x: n.extra["pool"](x), 15),
    graph.ADAPTIVE: ({"avg": nn.AdaptiveAvgPool1d(3), "max": nn.AdaptiveMaxPool1d(3)},
                     lambda n, x: n.extra["avg"](x) + n.extra["max"](x), 9),
    graph.MEAN: ({}, lambda n, x: x.mean(-1, keepdim=True), 3),
    graph.ADD: ({"side": nn.Conv1d(3, 3, 1)}, lambda n, x: x + n.extra["side"](x), 24),
    graph.LINEAR_MAP: ({}, lambda n, x: torch.cat([x, x[:, :, :4]], dim=2).transpose(1, 2), 36),
    graph.SHAPE_QUERY: ({}, lambda n, x: x.view(x.size(0), x.shape[1], -1), 24),
    graph.SCALE: ({}, lambda n, x: (x * -0.5) / 4, 24),
    graph.BATCHNORM: ({"bn": _bn()}, lambda n, x: n.extra["bn"](x), 24),
    graph.CIRCULAR_PAD: ({"conv": nn.Conv1d(3, 2, 3, padding=2, padding_mode="circular", dilation=2),
                          "pool": nn.MaxPool1d(2, stride=1, dilation=3)},
                         lambda n, x: n.extra["pool"](n.extra["conv"](x)), 10),
}


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    extra, body, flat = EXAMPLES[kind]
    return Net(body, extra, flat).double()


def _kappas(model: nn.Module, p: float, evaluator: str, reference_ops: bool) -> Dict[str, torch.Tensor]:
    with graph.use_evaluator(evaluator), ops.use_reference(reference_ops):
        return pathsgd.path_scales(model, p, INPUT_SHAPE)


def test_every_table_entry_has_an_example():
    assert {rule.kind for rule in graph.OP_TABLE} == set(EXAMPLES)
    assert len({rule.kind for rule in graph.OP_TABLE}) == len(graph.OP_TABLE)
    # every op has its meaning in both semirings (the layer rules live in the evaluators)
    assert all(rule.forward is not None and rule.forward_max is not None for rule in graph.OP_TABLE
               if rule.kind != graph.LAYER)


@pytest.mark.parametrize("p", (1, 2, 3))
@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_table_entry_validates_evaluates_and_steps(kind, p):
    model = _model(kind)
    assert pathsgd.check_support(model, INPUT_SHAPE) == []
    ir = graph.build_path_graph(model, INPUT_SHAPE)
    assert kind in {node.kind for node in ir.nodes}
    taped = _kappas(model, p, "tape", False)
    assert set(taped) == {n for n, t in model.named_parameters() if t.requires_grad}
    for name, kappa in taped.items():
        assert kappa.shape == dict(model.named_parameters())[name].shape
        assert bool((kappa > 0).any()), f"{name}: all-zero kappa, the comparison would be vacuous"
    for evaluator, reference_ops in (("tape", True), ("autograd", False)):
        other = _kappas(model, p, evaluator, reference_ops)
        for name in taped:
            torch.testing.assert_close(other[name], taped[name], rtol=1e-12, atol=0,
                                       msg=lambda m: f"{evaluator}/{reference_ops} {name}: {m}")
    # phi_p^p is homogeneous of degree 1 in the |w|^p of each layer not called twice: kappa . |w|^p summed
    # over one layer's weight and bias is phi_p^p times its degree, here checked on the classifier.
    norm_pow = float(pathsgd.path_norm(model, p, INPUT_SHAPE).detach()) ** p
    fc = model.fc
    share = float((taped["fc.weight"] * fc.weight.detach().abs() ** p).sum()
                  + (taped["fc.bias"] * fc.bias.detach().abs() ** p).sum())
    assert share == pytest.approx(norm_pow, rel=1e-10)
    # kappa at p = inf (a forward and a backward max-propagation) is the largest term of kappa at p = 1's sum
    k_inf, k_1 = pathsgd.path_scales(model, float("inf"), INPUT_SHAPE), pathsgd.path_scales(model, 1, INPUT_SHAPE)
    for name in k_1:
        assert bool((k_inf[name] <= k_1[name] * (1 + 1e-12)).all()), name
        assert bool(((k_inf[name] > 0) == (k_1[name] > 0)).all()), name
    # the max-times rule: phi_inf <= phi_1 <= (number of paths) * phi_inf
    norms = {q: float(v.detach()) for q, v in pathsgd.path_norms(model, (0, 1, float("inf")), INPUT_SHAPE).items()}
    assert 0 < norms[float("inf")] <= norms[1.0] * (1 + 1e-12)
    assert norms[1.0] <= norms[0.0] * norms[float("inf")] * (1 + 1e-12)
    # the step takes the taped trunk and the dense head, and matches SGD on grad / kappa^(2/p)
    twin = _model(kind)
    opt = pathsgd.PathSGD(model, lr=0.01, p=p, input_shape=INPUT_SHAPE)
    x = torch.randn(4, *INPUT_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for m in (model, twin):
        m(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            if b.grad is not None:
                b.sub_(0.01 * b.grad / taped[name].pow(2.0 / p).clamp_min(1e-12))
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dropout", [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d])
def test_mlp_with_any_dropout_is_a_dense_chain(dropout):
    """Every identity unit of the table keeps an MLP on the fused dense path (not the general one)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), dropout(0.0), nn.Linear(5, 2))
    ir = graph.build_path_graph(model)
    assert ir.is_dense_chain and [layer.name for layer in ir.head.layers] == ["1", "4"]
