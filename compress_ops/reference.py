"""Dense references of every op, in plain PyTorch (float64-capable).

Tests compare kernels against these on the same compressed weights; the CPU path of an op runs
its reference in the activation dtype when that is the fastest correct option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_ops.kernels.sparse24 import unpack_sparse24

__all__ = ["sparse24_linear_ref"]


def sparse24_linear_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ unpack(values, meta)^T + bias`` computed in ``dtype`` (default: ``x.dtype``)."""
    dtype = dtype or x.dtype
    w = unpack_sparse24(values, meta, x.shape[-1]).to(dtype)
    b = bias.to(dtype) if bias is not None else None
    return F.linear(x.to(dtype), w, b)
