"""Launcher pieces every linear-kernel family shares: the output buffer (split-K workspace), the
``tl.dot`` precision and its interpreter workaround, whether inline PTX may be used
(:func:`ptx`), the kernels' common program order (:func:`grouped_tile`) and epilogue
(:func:`store_tile`), and a byte permute with its portable form (:func:`prmt`). The input
checks are Triton-free: :mod:`compress_ops.kernels.formats`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress_ops.kernels.launches import launch, record_torch
from compress_ops.kernels.tuning import gpu_target

__all__ = ["launch", "output", "finish", "dot_meta", "ptx", "grouped_tile", "store_tile",
           "prmt", "prmt_ref"]

_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten tiles


def output(m: int, n: int, x2: torch.Tensor, split_k: int) -> torch.Tensor:
    """``y[M, N]``: in x's dtype, or a zeroed fp32 workspace that split-K slices add into."""
    if split_k > 1:
        record_torch("torch.zeros")
        return torch.zeros((m, n), device=x2.device, dtype=torch.float32)
    return _empty((m, n), device=x2.device, dtype=x2.dtype)


def finish(y: torch.Tensor, x2: torch.Tensor, split_k: int) -> torch.Tensor:
    if split_k > 1 and x2.dtype != torch.float32:
        record_torch("cast")
        return y.to(x2.dtype)
    return y


def dot_meta(x2: torch.Tensor) -> dict:
    """``DOT_PRECISION`` (tf32 unless fp32 with TF32 disabled) and ``UPCAST_DOT`` (the Triton
    interpreter's bf16 ``tl.dot`` multiplies raw bits: upcast there)."""
    ieee = x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "ieee" if ieee else "tf32",
            "UPCAST_DOT": x2.device.type == "cpu" and gpu_target(x2.device) is None
            and x2.dtype == torch.bfloat16}


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` on a ``cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N)`` tile
    grid in grouped order: programs walk GROUP_M row-tiles down a column of tiles before the
    next column, so consecutive programs share weight tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


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


def ptx(x2: torch.Tensor) -> bool:
    """Whether a kernel may use its inline PTX (``prmt``, ``lop3``): a launch configured for an
    NVIDIA GPU (or simulated as one: the audit and the static model), not the interpreter and
    not ROCm."""
    return gpu_target(x2.device) is not None and torch.version.hip is None


@triton.jit
def prmt_ref(a, b, sel):
    """Portable PTX ``prmt.b32`` (default mode; the interpreter's form): byte ``k`` of the
    result is byte ``n_k & 7`` of the pair ``{b, a}`` (bytes 0-3 of ``a``, 4-7 of ``b``), ``n_k``
    the selector's nibble ``k``; with bit 3 of ``n_k`` set (sign-replicate mode), that byte's
    top bit in all eight bits (0x00 or 0xFF)."""
    sel_t = (a & 0) + (b & 0) + sel
    out = sel_t & 0
    for k in tl.static_range(4):
        nk = (sel_t >> (4 * k)) & 15
        n = nk & 7
        src = tl.where(n < 4, a + (b & 0), b + (a & 0))
        byte = (src >> ((n & 3) * 8)) & 0xFF
        byte = tl.where((nk & 8) != 0, ((byte >> 7) & 1) * 0xFF, byte)
        out = out | (byte << (8 * k))
    return out


@triton.jit
def prmt(a, b, sel, ASM: tl.constexpr, IMM: tl.constexpr = True, B_IMM: tl.constexpr = False):
    """``prmt.b32`` (:func:`prmt_ref`); ``IMM``: ``sel`` is an integer, the immediate, else
    an int32 tensor in a register; ``B_IMM``: ``b`` is the integer (an immediate: the second
    operand's slot takes one, the first's does not)."""
    if ASM and B_IMM:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $3, $2;", "=r,r,r,n", [a, sel, b],
                                        dtype=tl.int32, is_pure=True, pack=1)
    elif ASM:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;",
                                        "=r,r,r,n" if IMM else "=r,r,r,r", [a, b, sel],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = prmt_ref(a, b, sel)
    return out
