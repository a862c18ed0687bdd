"""``compress_ops::dequant_linear`` (affine int8/int4/int3/int2 weights) and
``compress_ops::codebook_linear`` (k-means weight sharing): the low-bit family's ops, over the
packed formats of :mod:`compress_ops.kernels.formats.dequant`, with fake impls and autograd.

Routes (:mod:`.routing`): CUDA runs the Triton kernels. On the CPU, affine weights take torch's
native weight-only kernels where measured faster (:func:`dequant_cpu_route`, crossovers in
``kernels/configs/cpu.json``), else dequantize in row chunks + ``F.linear``; codebooks always
take the chunked path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import dequant as _dq
from compress_ops.ops import routing

__all__ = ["dequant_linear", "codebook_linear", "dequant_cpu_route", "native_int8_weight",
           "native_int4_weight"]


def dequant_cpu_route(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int) -> str:
    """Which CPU path :func:`dequant_linear` takes: ``"dense-cache"`` (opt-in),
    ``"native-int8"`` (``torch._weight_int8pack_mm``: symmetric int8 with one group per row),
    ``"native-int4"`` (``torch._weight_int4pack_mm_for_cpu``: int4 with groups of 32..256 and
    N % 16 == 0) where measured faster than ``"dequant"`` (row-chunked dequantize +
    ``F.linear``), else ``"dequant"``.

    Precision: the native int4 kernel with bf16 activations rounds more than dense bf16
    ``F.linear`` does; its norm-relative error against float64 ``F.linear`` on the module's
    ``dense_weight()`` is at most 4e-3 (measured 2.4e-3..3.5e-3, 1.6-2.3x dense bf16's; the op's
    bf16 tolerance is 1.6e-2). A single output that cancels to near zero can be off by a few
    percent of its own size."""
    if routing.cpu_dense_cache():
        return "dense-cache"
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], bits)
    m = x.numel() // max(x.shape[-1], 1)
    max_m = routing.NATIVE_MAX_M.get((bits, x.dtype), 0)
    if m > max_m:
        return "dequant"
    if bits == 8 and zeros is None and group_size == kp:
        return "native-int8"
    if bits == 4 and group_size in (32, 64, 128, 256) and n % 16 == 0:
        return "native-int4"
    return "dequant"


def native_int8_weight(qweight: torch.Tensor) -> torch.Tensor:
    # offset binary -> two's complement: flip the top bit of every byte (int8: bytes = fields)
    return torch.bitwise_xor(qweight.view(torch.uint8), 0x80).view(torch.int8)


def native_int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
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
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], bits)
    route = dequant_cpu_route(x, qweight, zeros, bits, group_size)
    if route == "dense-cache":
        w = routing.derived("dense", (qweight, scales, zeros), (bits, group_size, k),
                            lambda: _dq.dequantize(qweight, scales, zeros, bits, group_size, k))
        return F.linear(x, w, bias)
    if route == "dequant":
        def rows(r0: int, r1: int) -> torch.Tensor:
            z = None if zeros is None else zeros[r0:r1]
            return _dq.dequantize(qweight[r0:r1], scales[r0:r1], z, bits, group_size, k,
                                  dtype=x.dtype)
        return routing.chunked_linear(x, n, kp, rows, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    if kp != k:  # both kernels take the padded width (torch's int8 one crashes on K = 70)
        x2 = F.pad(x2, (0, kp - k))
    if route == "native-int8":
        # An int8 [N, Kp] copy made on every call: one XOR pass over the bytes (cheaper than
        # checking a cached copy against qweight, and it holds no memory between calls).
        y = torch._weight_int8pack_mm(x2, native_int8_weight(qweight),
                                      scales[:, 0].contiguous())
    else:
        # torch's int4 CPU packing costs ~170x the matmul to build (4096^2: 84 ms against
        # 0.5 ms), so it is cached: about the size of qweight, plus the snapshot the cache
        # checks the inputs against on every call (routing.derived).
        packed, sz = routing.derived("native-int4", (qweight, scales, zeros), (x.dtype,),
                                     lambda: native_int4_weight(qweight, scales, zeros, x.dtype))
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
    if routing.use_triton(x):
        return routing.kernels("dequant").dequant_matmul(x, qweight, scales, zeros, bias, bits,
                                                          group_size, checked=True)
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
    n, kp = indices.shape[0], _dq.packed_k(indices.shape[1], bits)
    if routing.cpu_dense_cache():
        w = routing.derived("dense", (indices, codebook), (bits, k),
                            lambda: _dq.codebook_weight(indices, codebook, bits, k))
        return F.linear(x, w, bias)
    rpg = n // codebook.shape[0]

    def rows(r0: int, r1: int) -> torch.Tensor:
        g0, g1 = r0 // rpg, -(-r1 // rpg)  # row groups the chunk touches
        w = _dq.codebook_weight(indices[g0 * rpg:g1 * rpg], codebook[g0:g1], bits, k,
                                dtype=x.dtype)
        return w[r0 - g0 * rpg:r1 - g0 * rpg]

    return routing.chunked_linear(x, n, kp, rows, bias)


@torch.library.custom_op("compress_ops::codebook_linear", mutates_args=())
def codebook_linear(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                    bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ codebook[n // (N / R), q]^T + bias``, ``q`` b-bit packed."""
    _dq.check_codebook_inputs(x, indices, codebook, bias, bits)
    if routing.use_triton(x):
        return routing.kernels("dequant").codebook_matmul(x, indices, codebook, bias, bits,
                                                           checked=True)
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
