"""``compress_ops::sparse24_linear``: a linear with a 2:4-packed weight
(:mod:`compress_ops.kernels.formats.sparse24`), its fake impl and autograd (x, values, bias).

Routes (:mod:`.routing`): CUDA runs the Triton kernel, or torch's semi-structured 2:4 GEMM
from the crossover M measured for the GPU (``semi_structured_min_m`` in
``kernels/configs/sparse24.json``; none shipped yet); the CPU unpacks in row chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import sparse24 as _sp
from compress_ops.ops import routing

__all__ = ["sparse24_linear"]


def _semi_structured_eligible(x: torch.Tensor, values: torch.Tensor) -> bool:
    """The explicit large-M route rule: CUDA, fp16/bf16, shapes torch's 2:4 GEMM accepts, and
    M at or above the crossover measured for this GPU (none shipped yet: never)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    min_m = routing.kernels("sparse24").semi_structured_min_m(x.device)
    n, k = values.shape[0], x.shape[-1]
    m = x.numel() // max(k, 1)
    return min_m is not None and m >= min_m and n % 64 == 0 and k % 64 == 0


def _sparse24_linear_cpu(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU path: the reference, unpacked in row chunks for large weights."""
    k = x.shape[-1]
    return routing.chunked_linear(
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
        # torch's 2:4 format (cuSPARSELt/CUTLASS), converted on every call: a cache would have
        # to compare the weight with a snapshot (a device sync) to stay correct under `.data`
        # edits. This route is for large M, where the conversion is a small part of the GEMM;
        # the measured crossover includes it.
        w = torch.sparse.to_sparse_semi_structured(_sp.unpack_sparse24(values, meta, k))
        return F.linear(x, w, bias)
    if routing.use_triton(x):
        return routing.kernels("sparse24").sparse24_matmul(x, values, meta, bias,
                                                            checked=True)
    if routing.cpu_dense_cache():
        w = routing.derived("dense", (values, meta), (k,),
                            lambda: _sp.unpack_sparse24(values, meta, k))
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
