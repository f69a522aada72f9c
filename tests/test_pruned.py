"""Pruned models (torch.nn.utils.prune: weight = weight_orig * weight_mask): path norm, path scales and
PathSGD act on the effective weight, against a masked copy of the model without prune hooks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import pathsgd

from conftest import make_mlp


def _cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 3, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24, 5), nn.ReLU(), nn.Linear(5, 2)).double()


SHAPES = {"mlp": None, "cnn": (2, 8)}


def _fresh(kind: str) -> nn.Module:
    return make_mlp((4, 6, 5, 3), seed=2, scale=1.3) if kind == "mlp" else _cnn()


def pruned_and_masked(kind: str):
    """(model with prune hooks on two layers (weights; one bias too), the same model without hooks whose
    parameters are the products weight_orig * weight_mask)."""
    model, masked = _fresh(kind), _fresh(kind)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv1d))]
    torch.manual_seed(11)  # random_unstructured
    prune.l1_unstructured(layers[0], "weight", amount=0.4)
    prune.random_unstructured(layers[1], "weight", amount=0.3)
    prune.l1_unstructured(layers[1], "bias", amount=0.5)
    with torch.no_grad():
        for (name, m), twin in zip(model.named_modules(), masked.modules()):
            for kind_ in ("weight", "bias"):
                if hasattr(m, f"{kind_}_orig"):
                    getattr(twin, kind_).copy_(getattr(m, f"{kind_}_orig") * getattr(m, f"{kind_}_mask"))
    return model, masked


def _masked_name(name: str) -> str:
    return name.replace("_orig", "")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("p", [1, 2, 0.5])
def test_path_norm_and_scales_of_the_effective_weight(kind, p):
    model, masked = pruned_and_masked(kind)
    shape = SHAPES[kind]
    got = float(pathsgd.path_norm(model, p, shape).detach())
    want = float(pathsgd.path_norm(masked, p, shape).detach())
    assert got == pytest.approx(want, rel=1e-12)
    assert got < float(pathsgd.path_norm(_fresh(kind), p, shape).detach())  # pruning removed paths
    scales = pathsgd.path_scales(model, p, shape)
    want_scales = pathsgd.path_scales(masked, p, shape)
    assert {_masked_name(n) for n in scales} == set(want_scales)
    assert {n for n in scales if n.endswith("_orig")} == {n for n, _ in model.named_parameters() if n.endswith("_orig")}
    for name, kappa in scales.items():
        torch.testing.assert_close(kappa, want_scales[_masked_name(name)], rtol=1e-12, atol=0)
    magnitudes = pathsgd.path_magnitudes(model, p, shape)
    first = next(n for n in magnitudes if n.endswith("weight_orig"))
    mask = dict(model.named_buffers())[first.replace("_orig", "_mask")]
    assert bool((magnitudes[first][mask == 0] == 0).all())  # a pruned weight carries no path


def test_path_norm_gradient_reaches_weight_orig_through_the_mask():
    model, masked = pruned_and_masked("mlp")
    pathsgd.path_norm(model, 2).backward()
    pathsgd.path_norm(masked, 2).backward()
    layer = model[0]
    torch.testing.assert_close(layer.weight_orig.grad, masked[0].weight.grad * layer.weight_mask, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("every", [1, None])
def test_pathsgd_updates_weight_orig_with_the_kappa_of_the_effective_weight(kind, every):
    model, masked = pruned_and_masked(kind)
    shape = SHAPES[kind]
    lr = 0.02 if kind == "mlp" else 1e-3  # small enough that no ReLU unit dies (every gradient stays non-zero)
    opt = pathsgd.PathSGD(model, lr=lr, momentum=0.9, kappa_every=every, input_shape=shape)
    twin = pathsgd.PathSGD(masked, lr=lr, momentum=0.9, kappa_every=every, input_shape=shape)
    masks = {n.replace("_mask", ""): b for n, b in model.named_buffers() if n.endswith("_mask")}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, *(shape or (4,)), generator=gen, dtype=torch.float64)
    for _ in range(4):
        for m, o in ((model, opt), (masked, twin)):
            o.zero_grad()
            m(x).square().sum().backward()
        with torch.no_grad():  # the copy keeps its pruned entries at zero as the mask does
            for name, t in masked.named_parameters():
                if name in masks:
                    t.grad.mul_(masks[name])
        opt.step()
        twin.step()
    effective = {n.replace("_orig", ""): t * masks[n.replace("_orig", "")] if n.endswith("_orig") else t
                 for n, t in model.named_parameters()}
    for name, t in masked.named_parameters():
        torch.testing.assert_close(effective[name], t * masks[name] if name in masks else t, rtol=1e-10, atol=1e-13)
    # the same function as the masked copy (pruned entries stay without effect), and training moved it
    torch.testing.assert_close(model(x), masked(x), rtol=1e-10, atol=1e-12)
    start = pruned_and_masked(kind)[0]
    start(x).square().sum().backward()
    live = [(a, b) for a, b in zip(model.parameters(), start.parameters()) if float(b.grad.abs().max()) > 0]
    assert len(live) >= len(list(model.parameters())) - 1  # (a dead ReLU channel can leave one bias without gradient)
    assert all(not torch.equal(a, b) for a, b in live)


def test_prune_example_runs_and_reports_both_methods(capsys):
    """examples/prune_path_magnitude.py as a user runs it (one epoch): accuracies for every sparsity."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "prune_path_magnitude.py")
    spec = importlib.util.spec_from_file_location("prune_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--epochs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("MNIST-1D MLP") and "test accuracy" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["50%", "80%", "90%", "95%", "98%"]
    accs = [(float(r[1]), float(r[2])) for r in rows]
    assert all(0 <= a <= 100 and 0 <= b <= 100 for a, b in accs)
    assert accs[0][0] > 20  # half the weights pruned by path magnitude: still far above chance (10%)
