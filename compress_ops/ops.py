"""Custom ops (``torch.ops.compress_ops.*``): one per kernel, with fake impls and autograd.

Device routing, the same for every op:

* CUDA tensors run the Triton launcher from ``compress_ops.kernels``.
* CPU tensors run the fastest correct CPU path that keeps memory compressed (for 2:4: unpack
  per call + ``F.linear``); ``COMPRESS_OPS_CPU_DENSE_CACHE=1`` trades memory for dense speed
  (see :func:`cpu_dense_cache`); ``COMPRESS_OPS_CPU_BACKEND=triton`` routes them through the
  Triton kernel instead, which needs ``TRITON_INTERPRET=1`` (set by the tests without a GPU).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress_ops.kernels import sparse24 as _sp
from compress_ops.reference import sparse24_linear_ref

__all__ = ["sparse24_linear", "cpu_backend", "cpu_dense_cache"]


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


# (kind, id(values)) -> (weakref to values, stamp, derived weight)
_DERIVED: dict[tuple[str, int], tuple[weakref.ref, tuple, torch.Tensor]] = {}


def _tensor_stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents: storage, view, dtype and, where tracked,
    the version counter (``.data`` swaps change the pointer, in-place ops the version).
    Inference tensors have no version counter; they cannot be changed in place outside
    ``torch.inference_mode``."""
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, version)


def _derived_weight(kind: str, values: torch.Tensor, meta: torch.Tensor, k: int,
                    build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``build(dense W)``, computed once per packed weight and kept while ``values`` lives.

    The entry is rebuilt when ``values`` or ``meta`` change (see :func:`_tensor_stamp`) and
    dropped when ``values`` is freed. Used only by the opt-in/measured routes below.
    """
    key = (kind, id(values))
    stamp = (_tensor_stamp(values), _tensor_stamp(meta), k)
    entry = _DERIVED.get(key)
    if entry is None or entry[0]() is not values or entry[1] != stamp:
        with torch.no_grad():
            derived = build(_sp.unpack_sparse24(values, meta, k))
        if entry is None or entry[0]() is not values:
            weakref.finalize(values, _DERIVED.pop, key, None)
        entry = (weakref.ref(values), stamp, derived)
        _DERIVED[key] = entry
    return entry[2]


def cpu_dense_cache() -> bool:
    """``COMPRESS_OPS_CPU_DENSE_CACHE=1``: keep an unpacked dense copy per weight on the CPU.

    Off by default: it costs the dense weight's bytes in memory (for fp16 1.78x the packed
    weight), which is what compression is meant to save. On, the CPU path runs at dense
    ``F.linear`` speed instead of unpacking the weight on every call.
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


def _sparse24_linear_cpu(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU path: the reference, unpacked in row chunks for large weights."""
    n, kp = values.shape[0], 2 * values.shape[1]
    rows = max(64, _CPU_CHUNK_ELEMS // kp)
    if n <= 2 * rows:
        return sparse24_linear_ref(x, values, meta, bias)
    return torch.cat([
        sparse24_linear_ref(x, values[r:r + rows], meta[r:r + rows],
                            None if bias is None else bias[r:r + rows])
        for r in range(0, n, rows)], dim=-1)


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
        w = _derived_weight("semi_structured", values, meta, k,
                            torch.sparse.to_sparse_semi_structured)
        return F.linear(x, w, bias)
    if _use_triton(x):
        return _sp.run_checked(x, values, meta, bias)
    if cpu_dense_cache():
        return F.linear(x, _derived_weight("dense", values, meta, k, lambda w: w), bias)
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
