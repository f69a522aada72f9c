"""Path-magnitude pruning of the MNIST-1D MLP, with pathsgd.path_magnitudes.

Trains MLP 40-512-512-10 (PyTorch default initialization, batch 128) with PathSGD for a few epochs, then
for several sparsities removes the weights with the smallest path magnitude ``|w| * kappa`` (p = 1: the
total product of the paths through the weight, i.e. the paths pruning it removes), with
``torch.nn.utils.prune.custom_from_mask``, and reports test accuracy before and after, next to plain
magnitude pruning (smallest ``|w|``) of the same number of weights. No fine-tuning.

    .venv/bin/python examples/prune_path_magnitude.py [--epochs N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pathsgd  # noqa: E402
from benchmarks.convergence import load_data  # noqa: E402


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pruned_copy(model: nn.Module, scores: dict, sparsity: float) -> nn.Module:
    """A copy with the ``sparsity`` fraction of all Linear weights of lowest score masked out (one global
    threshold across layers; biases kept)."""
    twin = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                           for m in model])
    twin.load_state_dict(model.state_dict())
    names = [n for n in scores if n.endswith("weight")]
    flat = torch.cat([scores[n].flatten() for n in names])
    k = int(sparsity * flat.numel())
    threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
    for name in names:
        layer = twin[int(name.split(".")[0])]
        prune.custom_from_mask(layer, "weight", (scores[name] > threshold).to(layer.weight.dtype))
    return twin


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load_data()
    x, y, xt, yt = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    model = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = pathsgd.PathSGD(model, lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    dense = accuracy(model, xt, yt)
    path = pathsgd.path_magnitudes(model, p=1)          # {name: |w| * kappa}
    magnitude = {n: t.detach().abs().double() for n, t in model.named_parameters()}
    print(f"MNIST-1D MLP 40-512-512-10, PathSGD lr 0.01, {args.epochs} epochs: test accuracy {100 * dense:.1f}%")
    print("sparsity  path-magnitude pruning  magnitude pruning   (test accuracy %, no fine-tuning)")
    for sparsity in (0.5, 0.8, 0.9, 0.95, 0.98):
        by_path = accuracy(pruned_copy(model, path, sparsity), xt, yt)
        by_size = accuracy(pruned_copy(model, magnitude, sparsity), xt, yt)
        print(f"{100 * sparsity:7.0f}%  {100 * by_path:22.1f}  {100 * by_size:17.1f}")


if __name__ == "__main__":
    main()
