"""Launcher pieces every linear-kernel family shares: activation/bias checks, the output buffer
(split-K workspace), the ``tl.dot`` precision and its interpreter workaround, and the kernels'
common epilogue (:func:`store_tile`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten tiles


def check_activation(x: torch.Tensor, n: int, kp: int, k_unit: int, weight: torch.Tensor,
                     weight_name: str, bias: torch.Tensor | None) -> None:
    """Named ``TypeError``/``ValueError`` for ``x[..., K]`` and ``bias[N]`` against a packed
    weight of ``N`` rows and padded width ``kp`` (``K`` in ``(kp - k_unit, kp]``), whose
    floating tensor ``weight`` (named ``weight_name``) fixes the dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if weight.dtype != x.dtype:
        raise TypeError(f"{weight_name} dtype {weight.dtype} must match x dtype {x.dtype}")
    k = x.shape[-1]
    if not kp - k_unit < k <= kp:
        raise ValueError(f"x last dim (K={k}) does not match the packed weight: it holds "
                         f"Kp={kp} columns, so K must be in ({kp - k_unit}, {kp}]")
    if weight.device != x.device:
        raise ValueError(f"x on {x.device} but the packed weight on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({n},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"x on {x.device} but bias on {bias.device}")


def output(m: int, n: int, x2: torch.Tensor, split_k: int) -> torch.Tensor:
    """``y[M, N]``: in x's dtype, or a zeroed fp32 workspace that split-K slices add into."""
    if split_k > 1:
        return torch.zeros((m, n), device=x2.device, dtype=torch.float32)
    return _empty((m, n), device=x2.device, dtype=x2.dtype)


def finish(y: torch.Tensor, x2: torch.Tensor, split_k: int) -> torch.Tensor:
    return y.to(x2.dtype) if split_k > 1 else y


def dot_meta(x2: torch.Tensor) -> dict:
    """``DOT_PRECISION`` (tf32 unless fp32 with TF32 disabled) and ``UPCAST_DOT`` (the Triton
    interpreter's bf16 ``tl.dot`` multiplies raw bits: upcast there)."""
    ieee = x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "ieee" if ieee else "tf32",
            "UPCAST_DOT": x2.device.type == "cpu" and x2.dtype == torch.bfloat16}


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of a ``[BLOCK_M, BLOCK_N]`` fp32 tile: + bias (by the first K split only), then
    store in ``y``'s dtype, or atomically add into the fp32 split-K workspace."""
    if HAS_BIAS:
        if pid_k == 0:
            b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
            acc += b.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask, sem="relaxed")
