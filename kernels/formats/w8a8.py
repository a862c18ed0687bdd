"""W8A8: 8-bit weights *and* 8-bit activations (int8, or FP8 e4m3), the stored form, the exact
quantization rules, byte counts and input checks (Triton-free).

**Weights.** ``qweight [N, K]`` (``torch.int8``, or ``torch.float8_e4m3fn``), row-major, no
packing or padding, and ``w_scales [N]`` in the compute dtype (fp16, bf16 or fp32), symmetric
per output channel: ``W[n, k] = qweight[n, k] * w_scales[n]``. The scale is
``max |W[n, :]| / QMAX`` rounded to the compute dtype first, and the levels are chosen against
that rounded value (:func:`quantize_weight`), so ``dense_weight()`` is what the kernel
multiplies. int8 levels are in ``[-127, 127]`` (``-128`` is never written: the grid is
symmetric), FP8 values in ``[-448, 448]``. A zero row has scale 0 and levels 0.

**Smoothing** (optional, SmoothQuant where no exact fold exists): ``smooth [K]`` in the
compute dtype multiplies the activation's columns before it is quantized,
``x'[m, k] = float32(x[m, k]) * float32(smooth[k])`` (one float32 rounding), and the stored
weight is the smoothed one, ``W[:, k] / smooth[k]`` quantized. The effective dense weight is
``qweight * w_scales[:, None] * smooth[None, :]``. Without ``smooth``, ``x' = float32(x)``.

**Activations** (:func:`quantize_activation`, the one rule every path follows, bit for bit).
Each row ``x'[m, :]`` of the activation (per token) is read in float32 (exact for fp16/bf16):

* dynamic (``input_scale`` None): ``amax = max |x[m, :]|``, ``s_x = amax / QMAX`` (one
  correctly rounded float32 division) and ``inv = (1 / amax) * QMAX`` (float32, two roundings:
  the reciprocal, then the product, as torch evaluates ``QMAX / amax`` for a Python scalar;
  ``inv = 0`` where ``amax = 0``);
* static (``input_scale``, one value calibrated per tensor): ``s_x = input_scale`` (in float32)
  and ``inv = 1 / s_x``;
* int8: ``q = clamp(rint(x * inv), -127, 127)``, ``rint`` rounding half to even (the float32
  product rounded once, then rounded to an integer); FP8: ``q = e4m3(clamp(x * inv, -448,
  448))``, round to nearest even (PTX ``cvt.rn.satfinite``);
* a row holding a NaN or an Inf gets ``s_x = NaN`` and ``q = 0``: the whole output row is NaN,
  where dense ``F.linear`` gives non-finite values too (``s_x + sum(x * 0)`` in the kernels).

**The product** (:func:`epilogue`): ``acc[m, n] = sum_k q_x[m, k] * q_w[n, k]``, int32 for int8
(exact: ``|acc| <= K * 127**2 < 2**31`` for ``K <= MAX_K_INT8``), float32 for FP8 (each product
is exact in float32; the sum's order is the kernel's). Then, in float32 and in this order,
``y = float(acc) * s_x[m] * w_scales[n] + bias[n]``, rounded once to the activation dtype.
int8 is therefore bit-exact between any two paths that follow these rules.

Bytes: ``N K`` (one per weight) + ``N`` scales: 0.5x fp16 (plus 2 bytes per row).
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats._common import (
    ACT_DTYPES,
    check_activation,
    check_companion,
    check_nonempty,
)

__all__ = ["QDTYPES", "QMAX", "MAX_K_INT8", "qdtype_name", "quantize_weight",
           "quantize_activation", "epilogue", "dequantize_weight", "w8a8_bytes", "check_inputs",
           "check_weight"]

#: The stored weight (and activation) types, by config name.
QDTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
#: The largest magnitude of a level: int8 127 (symmetric), FP8 e4m3 448.
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
#: Beyond this K an int32 accumulator of int8 products could overflow (``K * 127**2 < 2**31``).
MAX_K_INT8 = (2**31 - 1) // (127 * 127)
_OP = "w8a8_linear"
_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 half to even


def qdtype_name(dtype: torch.dtype) -> str:
    """``"int8"`` or ``"fp8"`` for a stored dtype (``ValueError`` for any other)."""
    for name, d in QDTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"qweight dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")


def _levels(v: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """float32 ``v`` (already scaled) to stored levels by the rule above."""
    qmax = QMAX[qdtype]
    if qdtype == torch.int8:
        return torch.round(v).clamp_(-qmax, qmax).to(torch.int8)  # round: half to even
    return v.clamp(-qmax, qmax).to(qdtype)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, qdtype: torch.dtype, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight [N, K], w_scales [N])`` of a dense ``w [N, K]``: symmetric per output
    channel, the scale rounded to ``dtype`` (default ``w.dtype``) before the levels are chosen
    against it. ``ValueError`` for non-finite weights."""
    qdtype_name(qdtype)
    if w.dim() != 2:
        raise ValueError(f"w must be [N, K], got shape {tuple(w.shape)}")
    dtype = dtype or w.dtype
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds NaN or Inf; it cannot be quantized")
    w64 = w.detach().to(torch.float64)
    scales = (w64.abs().amax(dim=1) / QMAX[qdtype]).to(dtype)
    s = scales.to(torch.float64)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = _levels((w64 * inv[:, None]).float(), qdtype)
    return q.contiguous(), scales


def quantize_activation(x: torch.Tensor, qdtype: torch.dtype,
                        input_scale: torch.Tensor | None = None,
                        smooth: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K], s_x [M] float32)`` of ``x [..., K]`` (rows flattened) by the module's rule:
    per row and dynamic, or with the static per-tensor ``input_scale``; the columns first
    multiplied by ``smooth [K]`` where given."""
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    if smooth is not None:
        xf = xf * smooth.float()[None, :]
    qmax = QMAX[qdtype]
    bad = torch.isfinite(xf).all(dim=1).logical_not_()
    if input_scale is None:
        amax = xf.abs().amax(dim=1) if k else xf.new_zeros(xf.shape[0])
        s = amax / qmax
        inv = torch.where(amax > 0, amax.reciprocal() * qmax, torch.zeros_like(amax))
    else:
        s = input_scale.reshape(()).float().expand(xf.shape[0]).clone()
        inv = s.reciprocal().nan_to_num(posinf=0.0)
    v = xf * inv[:, None]
    v[bad] = 0.0
    s[bad] = float("nan")
    return _levels(v, qdtype), s


def epilogue(acc: torch.Tensor, s_x: torch.Tensor, w_scales: torch.Tensor,
             bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``float(acc) * s_x[m] * w_scales[n] + bias[n]`` in float32, that order, rounded once to
    ``dtype`` (``acc [M, N]`` int32 or float32)."""
    y = acc.float() * s_x[:, None]
    y = y * w_scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(dtype)


def dequantize_weight(qweight: torch.Tensor, w_scales: torch.Tensor,
                      dtype: torch.dtype | None = None,
                      smooth: torch.Tensor | None = None) -> torch.Tensor:
    """The effective dense weight ``qweight * w_scales[:, None] (* smooth[None, :])``, computed
    in float32, in ``dtype`` (default: the scales')."""
    w = qweight.float() * w_scales.float()[:, None]
    if smooth is not None:
        w = w * smooth.float()[None, :]
    return w.to(dtype or w_scales.dtype)


def w8a8_bytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Stored bytes: one per weight, plus one scale per row in ``dtype``."""
    return n * k + n * dtype.itemsize


def check_weight(qweight: object, w_scales: object) -> None:
    """Named errors for a bad stored weight: ``qweight [N, K]`` int8 or FP8 e4m3,
    ``w_scales [N]`` float16/bfloat16/float32 on its device."""
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    if qweight.dtype not in QMAX:
        raise TypeError(f"qweight dtype must be torch.int8 or torch.float8_e4m3fn, got "
                        f"{qweight.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_nonempty(_OP, ("N (qweight.shape[0])", n), ("K (qweight.shape[1])", k))
    if qweight.dtype == torch.int8 and k > MAX_K_INT8:
        raise ValueError(f"K={k} > {MAX_K_INT8}: int8 products could overflow the int32 "
                         f"accumulator")
    if not isinstance(w_scales, torch.Tensor):
        raise TypeError(f"w_scales must be a torch.Tensor, got {type(w_scales).__name__}")
    if w_scales.dtype not in ACT_DTYPES:
        raise TypeError(f"w_scales must be float16, bfloat16 or float32, got {w_scales.dtype}")
    if tuple(w_scales.shape) != (n,):
        raise ValueError(f"w_scales shape {tuple(w_scales.shape)} must be ({n},)")
    if w_scales.device != qweight.device:
        raise ValueError(f"qweight on {qweight.device} but w_scales on {w_scales.device}")


def check_inputs(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                 smooth: torch.Tensor | None = None, *, values: bool = True) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of ``w8a8_linear``: the weight
    (:func:`check_weight`), ``x[..., K]`` in the scales' dtype and device, ``bias [N]`` and a
    static ``input_scale`` (one element, the scales' dtype; ``smooth [K]`` in the same dtype;
    on the CPU also finite and > 0, unless ``values=False``: a fake impl has no values)."""
    check_weight(qweight, w_scales)
    n, k = qweight.shape
    check_activation(x, n, k, 1, w_scales, "w_scales", bias, where=_OP)
    if input_scale is not None:
        check_companion(input_scale, "input_scale", (1,), x, "x")
        # a value check is a device sync: the CPU checks it per call, the module when it is set
        if values and input_scale.device.type == "cpu" and not bool((input_scale > 0).all()
                                                         & torch.isfinite(input_scale).all()):
            raise ValueError(f"input_scale must be finite and > 0, got {input_scale.tolist()}")
    if smooth is not None:
        check_companion(smooth, "smooth", (k,), x, "x")
