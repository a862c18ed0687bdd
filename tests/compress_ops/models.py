"""Small models the tests build themselves (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress_ops.demo import DemoBlock


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, d_hidden: int = 96, d_out: int = 40) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden, bias=False)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.relu(self.fc1(x)))))


def Block() -> DemoBlock:  # noqa: N802  (used like a class)
    """The demo's pre-norm transformer block (own q/k/v/o projections, GELU MLP), test-sized."""
    return DemoBlock(d=64, heads=4, ffn=128)


def random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial eval statistics, so that folding is actually tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class PaddingConv(nn.Conv2d):
    """A TensorFlow-port conv that pads inside its own forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))
