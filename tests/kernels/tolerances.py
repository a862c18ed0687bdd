"""Tolerances of a kernel against its float64 reference (ARCHITECTURE.md, "Testing")."""

from __future__ import annotations

import math

import torch


def tol(dtype: torch.dtype, k: int) -> float:
    """Relative (to ||ref||) tolerance from dtype and reduction length."""
    return {torch.float32: 1e-5 * math.sqrt(k), torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}[dtype]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
