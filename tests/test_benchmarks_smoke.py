"""The benchmark suite's naive baseline is a correct Path-SGD, and (opt-in) the suite runs end to end.

The end-to-end run (``python -m benchmarks.run --quick``) takes about a minute, so it only runs
when ``PATHSGD_BENCH_SMOKE=1`` is set.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.baselines import NaivePathSGD  # noqa: E402


def _tiny_mlp(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 6, bias=bias), nn.ReLU(),
                         nn.Linear(6, 3, bias=bias)).double()


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("hyper", [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
                                   dict(momentum=0.5, dampening=0.1)])
@pytest.mark.parametrize("bias", [True, False])
def test_naive_baseline_matches_pathsgd(p, hyper, bias):
    torch.manual_seed(0)
    model = _tiny_mlp(bias)
    with torch.no_grad():  # unbalance the hidden units so kappa varies over orders of magnitude
        model[0].weight.mul_(torch.logspace(-1, 1, 7, dtype=torch.float64)[:, None])
    twin = copy.deepcopy(model)
    opt = pathsgd.PathSGD(model, lr=0.05, p=p, **hyper)
    naive = NaivePathSGD(twin, lr=0.05, p=p, **hyper)
    for _ in range(3):
        x = torch.randn(8, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (8,))
        for m, o in ((model, opt), (twin, naive)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} differs (p={p}, {hyper})")


def test_naive_baseline_one_step_equals_pathsgd_formula():
    """One step, no momentum: w - lr * g / kappa^(2/p) with kappa from pathsgd.path_scales."""
    torch.manual_seed(1)
    model = _tiny_mlp()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    F.cross_entropy(model(x), y).backward()
    kappa = pathsgd.path_scales(model, p=2)
    expected = {n: (w - 0.1 * w.grad / kappa[n]).detach() for n, w in model.named_parameters()}
    NaivePathSGD(model, lr=0.1, momentum=0.0, p=2).step()
    for name, w in model.named_parameters():
        torch.testing.assert_close(w.detach(), expected[name], rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(os.environ.get("PATHSGD_BENCH_SMOKE") != "1",
                    reason="set PATHSGD_BENCH_SMOKE=1 to run the benchmark suite's --quick mode (about a minute)")
def test_benchmark_suite_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in ("report.md", "results.json", "step_time.png", "scaling.png", "memory.png", "convergence.png"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["parts"]) == {"step_time", "cnn_step", "scaling", "memory", "path_norm", "convergence", "paper"}
    cnn = results["parts"]["cnn_step"]
    assert len(cnn["runs"]) == 1 and cnn["train_step_ratio_median"] > 1.0  # PathSGD does strictly more work
    assert "Conv net training step" in (tmp_path / "report.md").read_text()
    assert results["machine"]["torch_version"] == torch.__version__
    headline = results["parts"]["step_time"]["headline"]
    assert headline["pathsgd_over_sgd_foreach"] > 0


def test_paper_lowest_from_epoch():
    """The first epoch from which a curve stays the lowest of all (None when it does not end lowest)."""
    import numpy as np
    from benchmarks.paper import lowest_from
    curves = {"a": np.array([1.0, 0.5, 0.4, 0.3, 0.2]), "b": np.array([0.9, 0.6, 0.3, 0.25, 0.1]),
              "c": np.array([2.0, 0.4, 0.5, 0.5, 0.5])}
    assert lowest_from(curves) == {"a": None, "b": 2, "c": None}
    curves["b"][3] = 0.35  # b is lowest at 2 and 4, not at 3: from 4
    assert lowest_from(curves) == {"a": None, "b": 4, "c": None}
    assert lowest_from({"x": np.array([1.0, float("nan")]), "y": np.array([2.0, 3.0])}) == {"x": None, "y": 1}


def test_paper_initialization_and_unbalanced_copy():
    """The paper's init (std 1/sqrt(fan_in), zero biases); the unbalanced net computes the same function."""
    from benchmarks import paper
    model = paper.make_model("digits", seed=3, init="balanced")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linears] == [64, paper.HIDDEN, paper.HIDDEN]
    for m in linears:
        assert float(m.bias.abs().max()) == 0.0
        assert abs(float(m.weight.std()) * m.in_features ** 0.5 - 1.0) < 0.05
    unbalanced = paper.make_model("digits", seed=3, init="unbalanced")
    x = paper.load_digits()["x_test"]
    with torch.no_grad():
        a, b = model(x), unbalanced(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    ratio = max(float((u.weight.abs() / w.weight.abs()).max()) for u, w in zip(
        [m for m in unbalanced if isinstance(m, nn.Linear)], linears))
    assert ratio > 10  # really rescaled


def test_resnet18_path_norm_is_the_classifier_share():
    """The torchvision-shaped ResNet-18 of benchmarks/resnet.py is supported, and its path norm agrees
    with its kappas: every path crosses the classifier exactly once (a weight or its bias), so
    phi_p^p = sum over fc of |w|^p kappa (tape) = path_norm^p (autograd evaluator), p = 2, 3x32x32."""
    from benchmarks.resnet import resnet18
    model = resnet18(seed=1)
    assert pathsgd.check_support(model, (3, 32, 32)) == []
    magnitudes = pathsgd.path_magnitudes(model, 2, (3, 32, 32))
    share = float(magnitudes["fc.weight"].sum() + magnitudes["fc.bias"].sum())
    norm = float(pathsgd.path_norm(model, 2, (3, 32, 32)).detach())
    assert share == pytest.approx(norm ** 2, rel=1e-10)
    assert len(magnitudes) == sum(1 for n, t in model.named_parameters() if t.requires_grad)
