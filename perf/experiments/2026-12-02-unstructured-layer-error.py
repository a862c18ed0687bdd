"""Unstructured one-shot pruning on one random 256 x 512 layer with correlated inputs of uneven
energy per channel (2,048 calibration rows; 3 seeds): the relative layer output error
``tr((W - W') H (W - W')^T) / tr(W H W^T)`` of SparseGPT (block 128), Wanda and magnitude, at
50% and 70%; the README's figures.

    PYTHONPATH=. python perf/experiments/2026-12-02-unstructured-layer-error.py
"""

from __future__ import annotations

import torch

from compress_ops.sparsify import (
    magnitude_unstructured,
    sparsegpt_unstructured,
    wanda_unstructured,
)


def correlated(rows: int, k: int, seed: int) -> torch.Tensor:
    """Correlated features (a random mixing) with uneven energy per channel (0.1x to 3.1x)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) * 0.4
         + torch.randn(rows, k, generator=g) * 0.5 + 0.3)
    return x * (torch.rand(k, generator=g) * 3 + 0.1)


def rel(w: torch.Tensor, new: torch.Tensor, h: torch.Tensor) -> float:
    d, w64, h64 = (w - new).double(), w.double(), h.double()
    return float(((d @ h64) * d).sum() / ((w64 @ h64) * w64).sum())


def main() -> None:
    torch.set_num_threads(1)
    print("| sparsity | seed | SparseGPT | Wanda | magnitude |")
    print("|---|---|---|---|---|")
    for s in (0.5, 0.7):
        for seed in range(3):
            x = correlated(2048, 512, seed)
            h = 2 * x.T @ x / x.shape[0]
            w = torch.randn(256, 512, generator=torch.Generator().manual_seed(100 + seed))
            row = [rel(w, sparsegpt_unstructured(w, h, s), h),
                   rel(w, wanda_unstructured(w, h, s), h), rel(w, magnitude_unstructured(w, s), h)]
            print(f"| {s:.0%} | {seed} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
