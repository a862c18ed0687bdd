"""Custom ops (``torch.ops.compress_ops.*``): one per kernel, with fake impls and autograd.

Device routing, the same for every op (low-rank: see :func:`lowrank_route`):

* CUDA tensors run the Triton launcher from ``compress_ops.kernels``.
* CPU tensors run the fastest correct CPU path that keeps memory compressed (2:4 and codebook:
  decompress in row chunks + ``F.linear``; affine low-bit: torch's native weight-only kernels
  where measured faster, else the same chunked path, see :func:`dequant_cpu_route`);
  ``COMPRESS_OPS_CPU_DENSE_CACHE=1`` trades memory for dense speed
  (see :func:`cpu_dense_cache`); ``COMPRESS_OPS_CPU_BACKEND=triton`` routes them through the
  Triton kernel instead, which needs ``TRITON_INTERPRET=1`` (set by the tests without a GPU).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress_ops.kernels import dequant as _dq
from compress_ops.kernels import dwsep_conv as _dw
from compress_ops.kernels import lowrank as _lr
from compress_ops.kernels import sparse24 as _sp

__all__ = ["sparse24_linear", "dequant_linear", "codebook_linear", "lowrank_linear",
           "dwsep_conv2d",
           "cpu_backend", "cpu_dense_cache", "dequant_cpu_route", "lowrank_route"]


def cpu_backend() -> str:
    """``"reference"`` (default) or ``"triton"``, from ``COMPRESS_OPS_CPU_BACKEND``."""
    backend = os.environ.get("COMPRESS_OPS_CPU_BACKEND", "reference")
    if backend not in ("reference", "triton"):
        raise ValueError(
            f"COMPRESS_OPS_CPU_BACKEND must be 'reference' or 'triton', got {backend!r}"
        )
    return backend


def _use_triton(x: torch.Tensor) -> bool:
    if x.device.type == "cuda":
        return True
    if x.device.type == "cpu" and cpu_backend() == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "COMPRESS_OPS_CPU_BACKEND=triton runs the Triton kernel on CPU tensors, which "
                "needs TRITON_INTERPRET=1 set before triton is first imported"
            )
        return True
    return False


# --------------------------------------------------------------------------------------------
# 2:4 sparse linear
# --------------------------------------------------------------------------------------------


# (kind, id(first tensor)) -> (weakref to it, stamp of every input, derived object)
_DERIVED: dict[tuple[str, int], tuple[weakref.ref, tuple, object]] = {}


def _tensor_stamp(t: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's current contents: storage, view, dtype and, where tracked,
    the version counter (``.data`` swaps change the pointer, in-place ops the version).
    Inference tensors have no version counter; they cannot be changed in place outside
    ``torch.inference_mode``."""
    if t is None:
        return None
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, version)


def _derived(kind: str, tensors: tuple[torch.Tensor | None, ...], extra: tuple,
             build: Callable[[], object]) -> object:
    """``build()``, computed once per packed weight (``tensors[0]`` and its companions) and kept
    while ``tensors[0]`` lives.

    The entry is rebuilt when any of ``tensors`` (or ``extra``) change (see
    :func:`_tensor_stamp`) and dropped when ``tensors[0]`` is freed. Used only by the
    measured/opt-in routes below, each of which says what the entry costs in memory.
    """
    owner = tensors[0]
    key = (kind, id(owner))
    stamp = (tuple(_tensor_stamp(t) for t in tensors), extra)
    entry = _DERIVED.get(key)
    if entry is None or entry[0]() is not owner or entry[1] != stamp:
        with torch.no_grad():
            derived = build()
        if entry is None or entry[0]() is not owner:
            weakref.finalize(owner, _DERIVED.pop, key, None)
        entry = (weakref.ref(owner), stamp, derived)
        _DERIVED[key] = entry
    return entry[2]


def cpu_dense_cache() -> bool:
    """``COMPRESS_OPS_CPU_DENSE_CACHE=1``: keep an unpacked dense copy per weight on the CPU.

    Off by default: it costs the dense weight's bytes in memory (fp16: 1.78x a 2:4 weight,
    3.8x an int4 g128 weight), which is what compression is meant to save. On, the CPU path
    runs at dense ``F.linear`` speed instead of decompressing the weight on every call.
    """
    return os.environ.get("COMPRESS_OPS_CPU_DENSE_CACHE", "0") == "1"


def _semi_structured_eligible(x: torch.Tensor, values: torch.Tensor) -> bool:
    """The explicit large-M route rule: CUDA, fp16/bf16, shapes torch's 2:4 GEMM accepts, and
    M at or above the crossover measured for this GPU (none shipped yet: never)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    min_m = _sp.semi_structured_min_m(x.device)
    n, k = values.shape[0], x.shape[-1]
    m = x.numel() // max(k, 1)
    return min_m is not None and m >= min_m and n % 64 == 0 and k % 64 == 0


# Unpacking a large weight in one piece streams every intermediate through DRAM; in row
# chunks of about this many dense elements they stay in cache (2-3x faster at 4096 x 4096 and
# up on the 2-core CI machine; measured with perf/bench_sparse24.py --device cpu).
_CPU_CHUNK_ELEMS = 2**21


def _chunked_linear(x: torch.Tensor, n: int, k_packed: int,
                    rows: Callable[[int, int], torch.Tensor],
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W[r0:r1] = rows(r0, r1)`` built (decompressed) one
    cache-sized row chunk at a time: the dense weight never exists whole."""
    step = max(64, _CPU_CHUNK_ELEMS // k_packed)
    if n <= 2 * step:
        return F.linear(x, rows(0, n), bias)
    return torch.cat([F.linear(x, rows(r, min(r + step, n)),
                               None if bias is None else bias[r:r + step])
                      for r in range(0, n, step)], dim=-1)


def _sparse24_linear_cpu(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU path: the reference, unpacked in row chunks for large weights."""
    k = x.shape[-1]
    return _chunked_linear(
        x, values.shape[0], 2 * values.shape[1],
        lambda r0, r1: _sp.unpack_sparse24(values[r0:r1], meta[r0:r1], k).to(x.dtype), bias)


@torch.library.custom_op("compress_ops::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W^T + bias`` with ``W`` 2:4-packed (``pack_sparse24``)."""
    _sp.check_inputs(x, values, meta, bias)
    k = x.shape[-1]
    if _semi_structured_eligible(x, values):
        # torch's 2:4 format (cuSPARSELt/CUTLASS), converted once per weight; about as large as
        # values + meta, held in addition to them while this route is in use.
        w = _derived("semi_structured", (values, meta), (k,),
                     lambda: torch.sparse.to_sparse_semi_structured(
                         _sp.unpack_sparse24(values, meta, k)))
        return F.linear(x, w, bias)
    if _use_triton(x):
        return _sp.run_checked(x, values, meta, bias)
    if cpu_dense_cache():
        w = _derived("dense", (values, meta), (k,), lambda: _sp.unpack_sparse24(values, meta, k))
        return F.linear(x, w, bias)
    return _sparse24_linear_cpu(x, values, meta, bias)


@sparse24_linear.register_fake
def _(x, values, meta, bias):
    _sp.check_inputs(x, values, meta, bias)
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _sparse24_setup_context(ctx, inputs, output) -> None:
    x, values, meta, bias = inputs
    # x is needed only for the values gradient: a frozen compressed base keeps no activations.
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, meta)
    ctx.k = x.shape[-1]
    ctx.has_bias = bias is not None


def _sparse24_backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    k = ctx.k
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = _sp.unpack_sparse24(values, meta, k).to(grad.dtype)
        grad_x = grad @ w
    if ctx.needs_input_grad[1]:
        # dL/dvalues[n, j] = sum_m grad[m, n] * x[m, col(n, j)]: a dense outer product gathered at
        # the kept positions, so the 2:4 pattern (meta) stays fixed while values train.
        g = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, k).to(grad.dtype)
        kp = 2 * values.shape[1]
        g = torch.nn.functional.pad(g, (0, kp - k))
        cols = _sp.value_columns(meta)
        grad_values = torch.gather(g, 1, cols).to(values.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_values, None, grad_bias


sparse24_linear.register_autograd(_sparse24_backward, setup_context=_sparse24_setup_context)


# --------------------------------------------------------------------------------------------
# Low-bit affine (int8 / int4 / int2) and codebook linears
# --------------------------------------------------------------------------------------------

# Largest M at which torch's native CPU weight-only kernels beat the row-chunked dequantize +
# F.linear route, per (bits, activation dtype); measured on the 2-core AVX2 CI machine, N = K =
# 4096 (perf/bench_dequant.py --device cpu; README). With bf16 activations they beat even dense
# F.linear at M = 1 and 64 (int8 2.2x / 1.8x, int4 3.5x / 2.5x of dense bf16); their fp32 and
# fp16 kernels are slower than dequantizing from M of 2-4 rows (fp32 M = 64: 1.0 s and 1.8 s
# against 0.1 s), and fp16 int4 even at M = 1 (92 ms against 39 ms).
_NATIVE_MAX_M: dict[tuple[int, torch.dtype], int] = {
    (8, torch.float32): 2,
    (4, torch.float32): 1,
    (8, torch.bfloat16): 2**62,
    (4, torch.bfloat16): 2**62,
    (8, torch.float16): 1,
}


def dequant_cpu_route(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int) -> str:
    """Which CPU path :func:`dequant_linear` takes: ``"dense-cache"`` (opt-in),
    ``"native-int8"`` (``torch._weight_int8pack_mm``: symmetric int8 with one group per row),
    ``"native-int4"`` (``torch._weight_int4pack_mm_for_cpu``: int4 with groups of 32..256 and
    N % 16 == 0) where measured faster than ``"dequant"`` (row-chunked dequantize +
    ``F.linear``), else ``"dequant"``."""
    if cpu_dense_cache():
        return "dense-cache"
    n, kp = qweight.shape[0], qweight.shape[1] * 32 // bits
    m = x.numel() // max(x.shape[-1], 1)
    max_m = _NATIVE_MAX_M.get((bits, x.dtype), 0)
    if m > max_m:
        return "dequant"
    if bits == 8 and zeros is None and group_size == kp:
        return "native-int8"
    if bits == 4 and group_size in (32, 64, 128, 256) and n % 16 == 0:
        return "native-int4"
    return "dequant"


def _native_int8_weight(qweight: torch.Tensor) -> torch.Tensor:
    # offset binary -> two's complement: flip the top bit of every byte (int8: bytes = fields)
    return torch.bitwise_xor(qweight.view(torch.uint8), 0x80).view(torch.int8)


def _native_int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # tinygemm form: W = (q - 8) * s + zero', so zero' = (8 - z) * s
    q = _dq.unpack_bits(qweight, 4)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s = scales.float()
    z = zeros.float() if zeros is not None else torch.full_like(s, 8.0)
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz


def _dequant_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                        group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    n, kp = qweight.shape[0], qweight.shape[1] * 32 // bits
    route = dequant_cpu_route(x, qweight, zeros, bits, group_size)
    if route == "dense-cache":
        w = _derived("dense", (qweight, scales, zeros), (bits, group_size, k),
                     lambda: _dq.dequantize(qweight, scales, zeros, bits, group_size, k))
        return F.linear(x, w, bias)
    if route == "dequant":
        def rows(r0: int, r1: int) -> torch.Tensor:
            z = None if zeros is None else zeros[r0:r1]
            return _dq.dequantize(qweight[r0:r1], scales[r0:r1], z, bits, group_size, k,
                                  dtype=x.dtype)
        return _chunked_linear(x, n, kp, rows, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    if kp != k:  # both kernels take the padded width (torch's int8 one crashes on K = 70)
        x2 = F.pad(x2, (0, kp - k))
    if route == "native-int8":
        # An int8 [N, Kp] copy, built once per weight: the size of qweight (+100% of it).
        w8 = _derived("native-int8", (qweight,), (), lambda: _native_int8_weight(qweight))
        y = torch._weight_int8pack_mm(x2, w8, scales[:, 0].contiguous())
    else:
        # torch's int4 CPU packing, converted once per weight: about the size of qweight.
        packed, sz = _derived("native-int4", (qweight, scales, zeros), (x.dtype,),
                              lambda: _native_int4_weight(qweight, scales, zeros, x.dtype))
        y = torch._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)


@torch.library.custom_op("compress_ops::dequant_linear", mutates_args=())
def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   group_size: int) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ ((q - z) * s)^T + bias``, ``q`` b-bit packed
    (``compress_ops.kernels.dequant``); ``zeros=None`` is the symmetric grid."""
    _dq.check_affine_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    if _use_triton(x):
        return _dq.dequant_matmul(x, qweight, scales, zeros, bias, bits, group_size,
                                  checked=True)
    return _dequant_linear_cpu(x, qweight, scales, zeros, bias, bits, group_size)


@dequant_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):
    _dq.check_affine_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _dequant_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (bits, group_size, x.shape[-1], bias is not None)


def _dequant_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, k, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _dq.dequantize(qweight, scales, zeros, bits, group_size, k,
                                       dtype=grad.dtype)
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None


dequant_linear.register_autograd(_dequant_backward, setup_context=_dequant_setup_context)


def _codebook_linear_cpu(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                         bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    k = x.shape[-1]
    n, kp = indices.shape[0], indices.shape[1] * 32 // bits
    if cpu_dense_cache():
        w = _derived("dense", (indices, codebook), (bits, k),
                     lambda: _dq.codebook_weight(indices, codebook, bits, k))
        return F.linear(x, w, bias)
    rpg = n // codebook.shape[0]

    def rows(r0: int, r1: int) -> torch.Tensor:
        g0, g1 = r0 // rpg, -(-r1 // rpg)  # row groups the chunk touches
        w = _dq.codebook_weight(indices[g0 * rpg:g1 * rpg], codebook[g0:g1], bits, k,
                                dtype=x.dtype)
        return w[r0 - g0 * rpg:r1 - g0 * rpg]

    return _chunked_linear(x, n, kp, rows, bias)


@torch.library.custom_op("compress_ops::codebook_linear", mutates_args=())
def codebook_linear(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                    bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ codebook[n // (N / R), q]^T + bias``, ``q`` b-bit packed."""
    _dq.check_codebook_inputs(x, indices, codebook, bias, bits)
    if _use_triton(x):
        return _dq.codebook_matmul(x, indices, codebook, bias, bits, checked=True)
    return _codebook_linear_cpu(x, indices, codebook, bias, bits)


@codebook_linear.register_fake
def _(x, indices, codebook, bias, bits):
    _dq.check_codebook_inputs(x, indices, codebook, bias, bits)
    return x.new_empty(*x.shape[:-1], indices.shape[0])


def _codebook_setup_context(ctx, inputs, output) -> None:
    x, indices, codebook, bias, bits = inputs
    # x is needed only for the codebook gradient (fine-tuning the shared values).
    ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, indices, codebook)
    ctx.meta = (bits, x.shape[-1], bias is not None)


def _codebook_backward(ctx, grad):
    x, indices, codebook = ctx.saved_tensors
    bits, k, has_bias = ctx.meta
    grad_x = grad_codebook = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _dq.codebook_weight(indices, codebook, bits, k, dtype=grad.dtype)
    if ctx.needs_input_grad[2]:
        # dL/dcodebook[r, c] = sum of dL/dW[n, k] over the weights of row group r that use c
        n = indices.shape[0]
        r = codebook.shape[0]
        g = grad.reshape(-1, n).t().float() @ x.reshape(-1, k).float()  # dL/dW [N, K]
        q = _dq.unpack_bits(indices, bits, k).to(torch.int64)
        flat = q + (torch.arange(n, device=q.device) // (n // r))[:, None] * 2**bits
        grad_codebook = torch.zeros(r * 2**bits, device=g.device, dtype=torch.float32)
        grad_codebook.index_add_(0, flat.reshape(-1), g.reshape(-1))
        grad_codebook = grad_codebook.reshape(r, 2**bits).to(codebook.dtype)
    if has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, grad_codebook, grad_bias, None


codebook_linear.register_autograd(_codebook_backward, setup_context=_codebook_setup_context)


# --------------------------------------------------------------------------------------------
# Low-rank linear
# --------------------------------------------------------------------------------------------


def lowrank_route(x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor | None) -> str:
    """Which path :func:`lowrank_linear` takes: ``"fused"`` (the one-launch Triton kernel: CUDA
    up to the crossover M of ``kernels/configs/lowrank.json`` and ranks up to
    ``kernels.lowrank.MAX_RANK``, or the CPU under ``COMPRESS_OPS_CPU_BACKEND=triton``) or
    ``"unfused"`` (``F.linear(F.linear(x, v), u, bias)`` (+ ``F.linear(x, weight)``): cuBLAS on
    CUDA past the crossover, and the CPU path, where the factors already are the compressed
    form and two GEMMs are the fastest correct option)."""
    m = x.numel() // max(x.shape[-1], 1)
    r = u.shape[1]
    if x.device.type == "cuda":
        return "fused" if _lr.fused_route(m, r, weight is not None, x.device) else "unfused"
    if r <= _lr.MAX_RANK and _use_triton(x):
        return "fused"
    return "unfused"


def _lowrank_unfused(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(F.linear(x, v), u, bias)
    if weight is not None:
        y = y + F.linear(x, weight)
    return y


@torch.library.custom_op("compress_ops::lowrank_linear", mutates_args=())
def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[..., N] = (x[..., K] @ v^T) @ u^T (+ x @ weight^T) (+ bias)``: ``u [N, r]``,
    ``v [r, K]`` (any rank r >= 1), ``weight [N, K]`` an optional dense base (LoRA-style)."""
    _lr.check_inputs(x, u, v, weight, bias)
    if lowrank_route(x, u, weight) == "fused":
        return _lr.lowrank_matmul(x, u, v, weight, bias, checked=True)
    return _lowrank_unfused(x, u, v, weight, bias)


@lowrank_linear.register_fake
def _(x, u, v, weight, bias):
    _lr.check_inputs(x, u, v, weight, bias)
    return x.new_empty(*x.shape[:-1], u.shape[0])


def _lowrank_setup_context(ctx, inputs, output) -> None:
    x, u, v, weight, bias = inputs
    # x is needed only for the factor (and base weight) gradients
    needs_x = any(ctx.needs_input_grad[1:4])
    ctx.save_for_backward(x if needs_x else None, u, v, weight)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad):
    x, u, v, weight = ctx.saved_tensors
    need_x, need_u, need_v, need_w, need_b = ctx.needs_input_grad
    grad_x = grad_u = grad_v = grad_w = grad_b = None
    n, k = u.shape[0], v.shape[1]
    m = math.prod(grad.shape[:-1])
    g2 = grad.reshape(m, n)
    if need_x or need_v:
        gu = g2 @ u.to(grad.dtype)  # dL/dt, [M, r]
    if need_x:
        grad_x = gu @ v.to(grad.dtype)
        if weight is not None:
            grad_x = grad_x + g2 @ weight.to(grad.dtype)
        grad_x = grad_x.reshape(*grad.shape[:-1], k)
    if need_u or need_v or need_w:
        x2 = x.reshape(m, k).to(grad.dtype)
    if need_u:
        grad_u = (g2.t() @ (x2 @ v.to(grad.dtype).t())).to(u.dtype)
    if need_v:
        grad_v = (gu.t() @ x2).to(v.dtype)
    if need_w:
        grad_w = (g2.t() @ x2).to(weight.dtype)
    if ctx.has_bias and need_b:
        grad_b = g2.sum(0)
    return grad_x, grad_u, grad_v, grad_w, grad_b


lowrank_linear.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


# --------------------------------------------------------------------------------------------
# Fused depthwise-separable conv
# --------------------------------------------------------------------------------------------


def _act_grad(v: torch.Tensor, act: str) -> torch.Tensor | None:
    """d act(v) / dv (``None`` for the identity)."""
    if act == "none":
        return None
    if act == "relu":
        return (v > 0).to(v.dtype)
    if act == "relu6":
        return ((v > 0) & (v < 6)).to(v.dtype)
    if act == "hardswish":  # torch's convention at the kinks: 0 up to -3, 1 from 3 on
        mid = (2 * v + 3) / 6
        return torch.where(v <= -3, torch.zeros_like(v), torch.where(v >= 3,
                                                                   torch.ones_like(v), mid))
    s = torch.sigmoid(v)  # silu
    return s * (1 + v * (1 - s))


def _dwsep_cpu(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1,
               act2) -> torch.Tensor:
    """Two ATen convolutions (channels-last); symmetric padding goes to the conv itself, so
    only asymmetric padding costs an ``F.pad`` copy."""
    left, right, top, bottom = padding
    x = x.contiguous(memory_format=torch.channels_last)
    if left == right and top == bottom:
        t = F.conv2d(x, dw_weight[:, None], dw_bias, stride, (top, left), groups=x.shape[1])
    else:
        t = F.conv2d(F.pad(x, list(padding)), dw_weight[:, None], dw_bias, stride,
                     groups=x.shape[1])
    y = _dw_act(F.conv2d(_dw_act(t, act1), pw_weight[:, :, None, None], pw_bias), act2)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("compress_ops::dwsep_conv2d", mutates_args=())
def dwsep_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                 pw_weight: torch.Tensor, pw_bias: torch.Tensor | None,
                 residual: torch.Tensor | None, stride: int, padding: list[int], act1: str,
                 act2: str) -> torch.Tensor:
    """MobileNet's depthwise-separable unit in one op: depthwise ``k x k`` conv (``dw_weight
    [C, k, k]``, zero ``padding`` = (left, right, top, bottom)) + ``dw_bias`` -> ``act1`` ->
    1x1 conv (``pw_weight [Cout, C]``) + ``pw_bias`` -> ``act2`` (+ ``residual``). ``x``
    ``[B, C, H, W]`` in any memory format; the result is ``channels_last``."""
    _dw.check_inputs(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                     act1, act2)
    if _use_triton(x):
        return _dw.dwsep_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride,
                                padding, act1, act2, checked=True)
    return _dwsep_cpu(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                      act1, act2)


@dwsep_conv2d.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1, act2):
    _dw.check_inputs(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                     act1, act2)
    ho, wo = _dw.output_size(x.shape[2], x.shape[3], dw_weight.shape[1], stride, padding)
    return x.new_empty(x.shape[0], pw_weight.shape[0], ho, wo).contiguous(
        memory_format=torch.channels_last)


def _dwsep_setup_context(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1, act2 = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight, pw_bias)
    ctx.meta = (stride, list(padding), act1, act2)


def _dwsep_backward(ctx, grad):
    x, dw_weight, dw_bias, pw_weight, pw_bias = ctx.saved_tensors
    stride, padding, act1, act2 = ctx.meta
    need = ctx.needs_input_grad
    dt = grad.dtype
    c = x.shape[1]
    # recompute the two pre-activations (plain ATen ops: traceable by aot_autograd)
    xp = F.pad(x.to(dt), padding)
    t_pre = F.conv2d(xp, dw_weight.to(dt)[:, None], None if dw_bias is None else dw_bias.to(dt),
                     stride, groups=c)
    da1 = _act_grad(t_pre, act1)
    t = t_pre if act1 == "none" else _dw_act(t_pre, act1)
    g_y = grad
    if act2 != "none":
        y_pre = F.conv2d(t, pw_weight.to(dt)[:, :, None, None],
                         None if pw_bias is None else pw_bias.to(dt))
        g_y = grad * _act_grad(y_pre, act2)
    grad_x = grad_dw = grad_dwb = grad_pw = grad_pwb = grad_res = None
    if need[3]:
        grad_pw = torch.einsum("bohw,bchw->oc", g_y, t).to(pw_weight.dtype)
    if need[4] and pw_bias is not None:
        grad_pwb = g_y.sum((0, 2, 3)).to(pw_bias.dtype)
    if need[0] or need[1] or need[2]:
        g_t = F.conv2d(g_y, pw_weight.to(dt).t()[:, :, None, None])
        g_tpre = g_t if da1 is None else g_t * da1
        if need[0]:
            gxp = torch.nn.grad.conv2d_input(xp.shape, dw_weight.to(dt)[:, None], g_tpre, stride,
                                             groups=c)
            left, right, top, bottom = padding
            grad_x = gxp[:, :, top:gxp.shape[2] - bottom, left:gxp.shape[3] - right]
            grad_x = grad_x.to(x.dtype)
        if need[1]:
            grad_dw = torch.nn.grad.conv2d_weight(xp, (c, 1, *dw_weight.shape[1:]), g_tpre,
                                                  stride, groups=c)[:, 0].to(dw_weight.dtype)
        if need[2] and dw_bias is not None:
            grad_dwb = g_tpre.sum((0, 2, 3)).to(dw_bias.dtype)
    if need[5]:
        grad_res = grad
    return grad_x, grad_dw, grad_dwb, grad_pw, grad_pwb, grad_res, None, None, None, None


def _dw_act(v: torch.Tensor, act: str) -> torch.Tensor:
    from compress_ops.reference import ACTIVATION_FNS

    return ACTIVATION_FNS[act](v)


dwsep_conv2d.register_autograd(_dwsep_backward, setup_context=_dwsep_setup_context)
