"""Models and helpers shared by the compress_ops.structured tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def seed(n: int = 0) -> torch.Generator:
    torch.manual_seed(n)
    return torch.Generator().manual_seed(n)


def mlp(act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 12), act(), nn.Linear(12, 4))


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


class CNN(nn.Module):
    def __init__(self, pad2: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=pad2)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 16 if pad2 else 6 * 9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.view(x.size(0), -1))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = ResBlock(4, 6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


def widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}
