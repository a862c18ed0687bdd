"""Dense references of every op, in plain PyTorch (float64-capable).

Tests compare kernels against these on the same compressed weights; the CPU path of an op runs
the same decompression (in row chunks) when that is the fastest correct option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_ops.kernels.dequant import codebook_weight, dequantize
from compress_ops.kernels.sparse24 import unpack_sparse24

__all__ = ["sparse24_linear_ref", "dequant_linear_ref", "codebook_linear_ref",
           "lowrank_linear_ref"]


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    b = bias.to(dtype) if bias is not None else None
    return F.linear(x.to(dtype), w.to(dtype), b)


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
    return _linear(x, unpack_sparse24(values, meta, x.shape[-1]), bias, dtype)


def dequant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                       group_size: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ ((q - z) * s)^T + bias`` with the weight dequantized and multiplied in ``dtype``."""
    dtype = dtype or x.dtype
    w = dequantize(qweight, scales, zeros, bits, group_size, x.shape[-1], dtype=dtype)
    return _linear(x, w, bias, dtype)


def codebook_linear_ref(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                        bias: torch.Tensor | None, bits: int, *,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ codebook[group, q]^T + bias`` computed in ``dtype`` (default: ``x.dtype``)."""
    dtype = dtype or x.dtype
    w = codebook_weight(indices, codebook, bits, x.shape[-1], dtype=dtype)
    return _linear(x, w, bias, dtype)


def lowrank_linear_ref(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(x @ v^T) @ u^T (+ x @ weight^T) + bias`` computed in ``dtype`` (default: ``x.dtype``),
    the intermediate ``x @ v^T`` kept in ``dtype`` (as two unfused GEMMs would)."""
    dtype = dtype or x.dtype
    y = _linear(_linear(x, v, None, dtype), u, bias, dtype)
    if weight is not None:
        y = y + F.linear(x.to(dtype), weight.to(dtype))
    return y
