"""Whole optimizer steps through the CUDA kernels and their host wrappers, without a GPU.

Runs under ``PATHSGD_BACKEND=cuda-emu`` (``make test-cuda-emu`` sets it, next to
``PATHSGD_CUDA_EMU``): every call of the CUDA-backed ops on CPU tensors goes to the
CPU emulation of csrc/cuda/*.cu. ``make test-cuda-emu`` also runs the optimizer-level
oracle tests of test_optimizer.py and test_general_graphs.py (SGD parity against the
brute-force oracle, rescaling invariance and its negative control) under this backend.
Skipped, saying why, under any other backend.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathsgd
from pathsgd import env, ops

from conftest import make_mlp, set_random_grads

pytestmark = pytest.mark.skipif(not ops.CUDA_EMULATED,
                                reason="PATHSGD_BACKEND=cuda-emu is not set (make test-cuda-emu sets it)")


def counters():
    launches, without_guard, stream_queries = torch.ops.pathsgd_emu.emu_counters()
    return launches, without_guard


def test_backend_reports_cuda_emu():
    assert ops.backend_for("cpu") == "cuda-emu"
    assert "backend cpu   cuda-emu" in env.report()


def small_cnn():
    return nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 20, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_every_launch_of_a_step_has_a_cuda_guard(kind, momentum):
    """A whole step (gamma forward, fused passes, multi-tensor update, clamp) launches emulated CUDA
    kernels, and every launch happens while a CUDAGuard is alive."""
    torch.manual_seed(0)
    model = make_mlp((40, 33, 17, 10), dtype=torch.float32) if kind == "mlp" else small_cnn()
    opt = pathsgd.PathSGD(model, lr=1e-3, momentum=momentum, clamp=0.5,
                          input_shape=(40,) if kind == "mlp" else (1, 40))
    before = counters()
    for step in range(2):
        set_random_grads(model, seed=step)
        opt.step()
    after = counters()
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv1d)) for m in model.modules())
    # at least one launch per layer and step (the fused pass or the multi-tensor update)
    assert after[0] - before[0] >= 2 * (n_layers if kind == "mlp" else 2)
    assert after[1] == before[1] == 0, "a CUDA kernel was launched with no CUDAGuard alive"


def _mnist1d(n: int = 600):
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples = n
    args.seed = 3
    data = make_dataset(args)
    return torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"], dtype=torch.long)


def _train_mnist1d(x, y, steps=40):
    """The training loop a user writes: model.train(), zero_grad, cross-entropy, backward, step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = pathsgd.PathSGD(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    model.train()
    for step in range(steps):
        i = (step * 50) % (len(x) - 50)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return model, losses, accuracy


def test_mnist1d_training_matches_the_cpu_backend(monkeypatch):
    """40 MNIST-1D steps through the emulated CUDA kernels land where the compiled CPU kernels do
    (float32; the two backends round differently, so to a tolerance), and the loss falls."""
    x, y = _mnist1d()
    emu_model, emu_losses, emu_acc = _train_mnist1d(x, y)
    monkeypatch.setattr(ops, "_K", torch.ops.pathsgd)  # the same step on the CPU kernels
    launches = counters()[0]
    cpu_model, cpu_losses, cpu_acc = _train_mnist1d(x, y)
    assert counters()[0] == launches, "the CPU run must not touch the emulated kernels"
    assert sum(emu_losses[-5:]) < 0.8 * sum(emu_losses[:5]), emu_losses
    for (name, a), b in zip(emu_model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert emu_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert abs(emu_acc - cpu_acc) <= 0.01
