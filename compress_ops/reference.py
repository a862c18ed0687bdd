"""Dense references of every op, in plain PyTorch (float64-capable).

The test oracle: tests compare kernels, ops and modules against these on the same compressed
weights (unpacked by :mod:`compress_ops.kernels.formats`). Production code never imports this
module; the CPU path of an op runs the same decompression (in row chunks) on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats.dequant import codebook_weight, dequantize
from compress_ops.kernels.formats.dwsep_conv import ACTIVATION_FNS
from compress_ops.kernels.formats.hashed import hashed_weight
from compress_ops.kernels.formats.sparse24 import unpack_sparse24
from compress_ops.kernels.formats.w8a8 import epilogue, quantize_activation

__all__ = ["sparse24_linear_ref", "dequant_linear_ref", "codebook_linear_ref",
           "lowrank_linear_ref", "dwsep_conv2d_ref", "w8a8_linear_ref", "hashed_linear_ref"]


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


def dwsep_conv2d_ref(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                     pw_weight: torch.Tensor, pw_bias: torch.Tensor | None,
                     residual: torch.Tensor | None, stride: int, padding: list[int],
                     act1: str, act2: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Depthwise conv (zero ``padding`` = (left, right, top, bottom)) + bias -> act1 -> 1x1 conv
    + bias -> act2 (+ residual): ``F.conv2d`` twice, in ``dtype`` (default: ``x.dtype``)."""
    dtype = dtype or x.dtype

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype)

    t = F.conv2d(F.pad(x.to(dtype), list(padding)), cast(dw_weight)[:, None], cast(dw_bias),
                 stride, groups=x.shape[1])
    y = F.conv2d(ACTIVATION_FNS[act1](t), cast(pw_weight)[:, :, None, None], cast(pw_bias))
    y = ACTIVATION_FNS[act2](y)
    return y if residual is None else y + residual.to(dtype)


def w8a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                    bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                    smooth: torch.Tensor | None = None, *,
                    exact_epilogue: bool = True) -> torch.Tensor:
    """``Q(x * smooth) @ qweight^T * s_x * w_scales + bias`` on the quantized activation (the
    format's rule), the product summed in float64 (exact: int8 sums stay below 2**31, FP8 products
    have 8 significant bits). ``exact_epilogue``: then the format's float32 epilogue, rounded
    to ``x.dtype`` (what every int8 path must give bit for bit); else everything in float64."""
    q, s_x = quantize_activation(x, qweight.dtype, input_scale, smooth)
    acc = q.double() @ qweight.double().t()
    n = qweight.shape[0]
    if exact_epilogue:
        return epilogue(acc, s_x, w_scales, bias, x.dtype).reshape(*x.shape[:-1], n)
    y = acc * s_x.double()[:, None] * w_scales.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], n)


def hashed_linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int, in_features: int, seed: int, *,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with the virtual weight of the hashed buckets ``w`` (the whole
    ``[N, K]`` weight at once), computed in ``dtype`` (default: ``x.dtype``)."""
    dtype = dtype or x.dtype
    return _linear(x, hashed_weight(w, out_features, in_features, seed), bias, dtype)
