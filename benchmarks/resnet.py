"""ResNet-18 with torchvision's layout (conv1 7x7/2, max pool, 4 stages of 2 BasicBlocks, global
average pool, fc), written out here so neither torchvision nor a download is needed; BatchNorm in
eval mode with frozen parameters (its running statistics randomized so it is not the identity).

Also the timing of ``pathsgd.path_norm`` on it (float64, 3x224x224): ``python -m benchmarks.resnet``.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, stages = [64, 128, 256, 512], 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0, dtype: torch.dtype = torch.float64) -> ResNet18:
    """Random ResNet-18, BatchNorm frozen in eval mode with random statistics."""
    torch.manual_seed(seed)
    model = ResNet18().to(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            m.eval().requires_grad_(False)
    return model


def time_path_norms(repeats: int = 5, ps=(2.0, float("inf")), threads: int = 2) -> Dict[str, Any]:
    """Median wall time of ``pathsgd.path_norm(resnet18, p, (3, 224, 224))`` per p (trace included)."""
    import pathsgd
    torch.set_num_threads(threads)
    model = resnet18()
    out: Dict[str, Any] = {"model": "ResNet-18 (torchvision layout), float64, input 3x224x224, eval BatchNorm",
                           "threads": threads, "repeats": repeats, "p": {}}
    for p in ps:
        times: List[float] = []
        value = None
        for _ in range(repeats + 1):  # the first call warms up
            t0 = time.perf_counter()
            value = pathsgd.path_norm(model, p, (3, 224, 224), log=True)
            times.append(time.perf_counter() - t0)
        out["p"][str(p)] = {"median_s": statistics.median(times[1:]), "min_s": min(times[1:]),
                            "log_path_norm": float(value.detach())}
    return out


if __name__ == "__main__":
    print(time_path_norms())
