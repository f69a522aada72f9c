"""The taped abs-pow evaluation's intra-op thread policy (pathsgd/taped.py).

Small convolutions run on one intra-op thread (waking a second costs more than it saves), large
ones keep every thread, and the caller's thread count is restored in every case, errors included.
The kappas themselves are checked against the oracle in test_general_graphs.py (tape and autograd).
"""
from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn as nn

import pathsgd
from pathsgd import taped


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3))


def _mixed_cnn() -> nn.Module:
    """conv1 has 64 * 32 * 32 outputs x 9 fan-in = 590k MACs (small), conv2 37.7M MACs (large)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))


def _set_grads(model: nn.Module) -> None:
    for t in model.parameters():
        t.grad = torch.full_like(t, 1e-3)


@pytest.fixture
def thread_calls(monkeypatch) -> List[int]:
    """Every torch.set_num_threads(n) made by the taped evaluation, in order."""
    calls: List[int] = []
    real = torch.set_num_threads

    def spy(n: int) -> None:
        calls.append(n)
        real(n)

    monkeypatch.setattr(taped.torch, "set_num_threads", spy)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
def test_small_network_runs_on_one_thread_and_restores(threads, thread_calls):
    torch.set_num_threads(threads)
    model = _small_cnn()
    opt = pathsgd.PathSGD(model, lr=0.1, input_shape=(1, 16))
    evaluation = opt.graph._taped(opt.graph.head_input)
    assert evaluation.all_small
    _set_grads(model)
    thread_calls.clear()
    opt.step()
    assert torch.get_num_threads() == threads
    # forward and backward each go to one thread and back; nothing at all when already on one
    assert thread_calls == ([] if threads == 1 else [1, threads, 1, threads])


def test_large_layer_keeps_threads(thread_calls):
    torch.set_num_threads(2)
    model = _mixed_cnn()
    opt = pathsgd.PathSGD(model, lr=0.1, input_shape=(1, 32, 32))
    evaluation = opt.graph._taped(opt.graph.head_input)
    small = {node.target: data[-1] for node, code, data in evaluation.plan if code == taped._LAYER}
    assert small == {"0": True, "2": False}
    assert not evaluation.all_small
    _set_grads(model)
    thread_calls.clear()
    opt.step()
    assert torch.get_num_threads() == 2
    # conv1 forward, conv2 backward is skipped (large), conv1 backward: one thread each, then back
    assert thread_calls == [1, 2, 1, 2]


def test_threads_restored_when_the_evaluation_raises(monkeypatch):
    torch.set_num_threads(2)
    model = _small_cnn()
    opt = pathsgd.PathSGD(model, lr=0.1, input_shape=(1, 16))

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure in a VJP")

    monkeypatch.setattr(taped.TapedEvaluation, "_layer_vjp", staticmethod(boom))
    _set_grads(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        opt.step()
    assert torch.get_num_threads() == 2
