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
