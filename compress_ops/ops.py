"""Custom ops (``torch.ops.compress_ops.*``): one per kernel, with fake impls and autograd.

Device routing, the same for every op:

* CUDA tensors run the Triton launcher from ``compress_ops.kernels``.
* CPU tensors run the fastest correct CPU path (for 2:4: unpack once per call + ``F.linear``);
  ``COMPRESS_OPS_CPU_BACKEND=triton`` routes them through the Triton kernel instead, which
  needs ``TRITON_INTERPRET=1`` (set by the test suite when there is no GPU).
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from compress_ops.kernels import sparse24 as _sp
from compress_ops.reference import sparse24_linear_ref

__all__ = ["sparse24_linear", "cpu_backend"]


def cpu_backend() -> str:
    """``"reference"`` (default) or ``"triton"``, from ``COMPRESS_OPS_CPU_BACKEND``."""
    backend = os.environ.get("COMPRESS_OPS_CPU_BACKEND", "reference")
    if backend not in ("reference", "triton"):
        raise ValueError(
            f"COMPRESS_OPS_CPU_BACKEND must be 'reference' or 'triton', got {backend!r}"
        )
    return backend


def _use_triton(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or (x.device.type == "cpu" and cpu_backend() == "triton")


# --------------------------------------------------------------------------------------------
# 2:4 sparse linear
# --------------------------------------------------------------------------------------------


# values id -> (weakref to values, (values version, meta ptr, meta version, K), sparse weight)
_SEMI_STRUCTURED_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _semi_structured_eligible(x: torch.Tensor, values: torch.Tensor) -> bool:
    """The explicit large-M route rule: CUDA, fp16/bf16, shapes torch's 2:4 GEMM accepts, and
    M at or above the crossover measured for this GPU (none shipped yet: never)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    min_m = _sp.semi_structured_min_m(x.device)
    n, k = values.shape[0], x.shape[-1]
    m = x.numel() // max(k, 1)
    return min_m is not None and m >= min_m and n % 64 == 0 and k % 64 == 0


def _semi_structured_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on torch's semi-structured sparse weight, converted once per ``values``.

    The converted copy (about as large as ``values`` + ``meta``) lives as long as ``values``;
    it is rebuilt when ``values`` or ``meta`` change (version counters).
    """
    k = x.shape[-1]
    stamp = (values._version, meta.data_ptr(), meta._version, k)
    entry = _SEMI_STRUCTURED_CACHE.get(id(values))
    if entry is None or entry[0]() is not values or entry[1] != stamp:
        dense = _sp.unpack_sparse24(values, meta, k)
        sparse = torch.sparse.to_sparse_semi_structured(dense)
        if entry is None:
            weakref.finalize(values, _SEMI_STRUCTURED_CACHE.pop, id(values), None)
        entry = (weakref.ref(values), stamp, sparse)
        _SEMI_STRUCTURED_CACHE[id(values)] = entry
    return F.linear(x, entry[2], bias)


@torch.library.custom_op("compress_ops::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W^T + bias`` with ``W`` 2:4-packed (``pack_sparse24``)."""
    _sp.check_inputs(x, values, meta, bias)
    if _semi_structured_eligible(x, values):
        return _semi_structured_linear(x, values, meta, bias)
    if _use_triton(x):
        return _sp.sparse24_matmul(x, values, meta, bias)
    return sparse24_linear_ref(x, values, meta, bias)


@sparse24_linear.register_fake
def _(x, values, meta, bias):
    _sp.check_inputs(x, values, meta, bias)
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _sparse24_setup_context(ctx, inputs, output) -> None:
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _sparse24_backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    k = x.shape[-1]
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
