"""Ternary weights at M = 1 without tensor cores: add/subtract against dequantize + FMA, and
5 trits per byte against 2-bit fields, counted in the static model (perf/static_perf.py).

Three standalone GEMVs, ``y[n] = s[n] sum_k t[n, k] x[k]`` with ``t`` in {-1, 0, 1}, fp16 x,
compiled for sm_90 with the model's own machinery (``static_perf.model_launch``: Triton's
specialization of the call, cuobjdump's SASS, the K loop's instruction mix, the H200 roofline):

a. ``addsub``: no multiplies. Each fp16 pair of x is selected per weight pair with bit tricks,
   ``((x2 ^ S) & M)``, and added with one ``add.f16x2``: ``M`` (0xFFFF per nonzero half) is one
   ``prmt`` that replicates a byte's top bit, ``S`` (the sign bits) one LOP3 of the same shifted
   word. Its 2-bit code is laid out for that (free at pack time, same 2 bits): in each 32-bit
   word of 16 columns, column ``2p`` keeps its nonzero bit at ``7 - p`` and its sign at
   ``15 - p``, column ``2p + 1`` at ``23 - p`` and ``31 - p``, so one shift by ``p`` puts a pair
   in place. Per pair: SHF + PRMT + LOP3 + LOP3 + HADD2 (5).
b. ``fma``: the shipped field layout and code (q = t + 2 in {1, 2, 3}, column ``2i`` at bits
   ``2i``, column ``2i + 1`` at ``16 + 2i``), dequantized to fp16 ``2 t`` by one shift and one
   LOP3 (``((w << 14 - 2i) ^ 0x80008000) & 0xC000C000``: bit 15 = not q's high bit, the sign;
   bit 14 = q's low bit, the nonzero flag; fp16 0x4000 is 2.0) and multiplied in with one
   ``fma.rn.f16x2``. Per pair: SHF + LOP3 + HFMA2 (3).
c. ``trit5``: 5 trits per byte (1.6 bits): ``q = ceil(256 v / 243)`` with ``v = sum_i d_i 3^(4-i)``
   (d = t + 1; llama.cpp's TQ1_0 scaling), so digit ``i`` is ``(a * 3) >> 8`` and ``a`` moves on
   to ``(a * 3) & 0xFF``. The even and the odd bytes of a word sit in 16-bit lanes, and each
   digit is decoded for two lanes at once: LEA (``a * 3``), LOP3 (bits 8-9 under the fp16
   exponent of 4, so the half is 4 + d), HADD2 (- 5: exact t), HFMA2, LOP3 (the next ``a``).

Each accumulates a K step in fp16x2 (one fp16 pair per word and row), then adds it into fp32.

Run ``env -u TRITON_INTERPRET .venv/bin/python perf/experiments/2026-12-01-ternary-addsub.py``;
it checks the three kernels in TRITON_INTERPRET=1 first (a subprocess: ``--check``; the
interpreter runs each kernel's plain-Triton twin of every inline-asm line, same bit
operations), then compiles and counts. ``--shipped PATH``: read the shipped kernel's rows from
a static_perf JSON instead of modelling them (/tmp/w/bt39.json). Static predictions only: no
GPU ran any of this. Output: the .txt beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

from compress_ops.kernels.launches import Launch
from compress_ops.perf import static_perf as sp

INTERP = bool(os.environ.get("TRITON_INTERPRET"))


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


SIGNS = tl.constexpr(_i32(0x80008000))
SIGN_EXP = tl.constexpr(_i32(0xC000C000))
LANES = tl.constexpr(0x00FF00FF)
DIGIT = tl.constexpr(0x03000300)
FOUR = tl.constexpr(0x44004400)  # fp16 4.0 in both halves: mantissa bit 8 is worth 1
FIVE = tl.constexpr(0x45004500)  # fp16 5.0 in both halves


# ---------------------------------------------------------------------------------------------
# Packed fp16x2 helpers: one PTX instruction each on the GPU, a plain-Triton twin in the
# interpreter (the same bits; fp16 arithmetic through fp32, exact here: every product is
# x times 0 or +-1 or +-2)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lo(v):
    return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _hi(v):
    return (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pack(lo, hi):
    a = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return a | (b << 16)


@triton.jit
def _hadd2(a, b, ASM: tl.constexpr):
    if ASM:
        out = tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = _pack(_lo(a) + _lo(b), _hi(a) + _hi(b))
    return out


@triton.jit
def _hfma2(a, b, c, ASM: tl.constexpr):
    if ASM:
        out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = _pack(_lo(a) * _lo(b) + _lo(c), _hi(a) * _hi(b) + _hi(c))
    return out


@triton.jit
def _lop3(a, B: tl.constexpr, c, LUT: tl.constexpr, ASM: tl.constexpr):
    """One ``lop3.b32`` of ``a``, the immediate ``B`` and the register ``c`` (a constant made
    once before the loop as ``C | (K >> 31)``, which ptxas cannot fold: with two immediates it
    re-materializes one by a MOV for every LOP3). LUT 0x28: ``(a ^ B) & c``; 0xEA:
    ``(a & B) | c``."""
    if ASM:
        out = tl.inline_asm_elementwise(
            f"lop3.b32 $0, $1, $2, $3, {LUT};", "=r,r,n,r", [a, B, c], dtype=tl.int32,
            is_pure=True, pack=1)
    elif LUT == 0x28:
        out = (a ^ B) & c
    else:
        tl.static_assert(LUT == 0xEA)
        out = (a & B) | c
    return out


@triton.jit
def _hsub2(a, c, ASM: tl.constexpr):
    """``a - c`` per half (``c``: a register)."""
    if ASM:
        out = tl.inline_asm_elementwise("sub.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, c],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = _pack(_lo(a) - _lo(c), _hi(a) - _hi(c))
    return out


@triton.jit
def _nz_mask(ws, ASM: tl.constexpr):
    """0xFFFF in the low half where bit 7 is set, in the high half where bit 23 is: one
    ``prmt.b32`` whose selector nibbles 8 and A replicate the top bit of bytes 0 and 2."""
    if ASM:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $1, 0xAA88;", "=r,r", [ws],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = (((ws >> 7) & 1) * 0xFFFF) | (((ws >> 23) & 1) * -65536)
    return out


# ---------------------------------------------------------------------------------------------
# Kernels. x2: x as int32 pairs of fp16 (x2[j] = x[2j], x[2j + 1]); w: [N, words] int32 (a, b)
# or [N, words] int32 of four 5-trit bytes (c); one program per BLOCK_N rows and K split.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _addsub_gemv_kernel(x2_ptr, q_ptr, s_ptr, y_ptr, N, K, stride_wn,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                        EVEN: tl.constexpr, ASM: tl.constexpr):
    WK: tl.constexpr = BLOCK_K // 16
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    us = tl.arange(0, WK)
    KW = K // 16
    steps = tl.cdiv(KW, WK * SPLIT_K)
    first = tl.program_id(1) * steps * WK
    acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
    for k0 in range(first, first + steps * WK, WK):
        cols = k0 + us
        if EVEN:
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :])
        else:
            k_mask = cols < KW
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
        h = tl.zeros([BLOCK_N, WK], dtype=tl.int32)
        for p in tl.static_range(8):
            if EVEN:
                xp = tl.load(x2_ptr + cols * 8 + p)
            else:
                xp = tl.load(x2_ptr + cols * 8 + p, mask=k_mask, other=0)
            ws = w << p
            m = _nz_mask(ws, ASM)
            r = (xp[None, :] ^ (ws & SIGNS)) & m
            h = _hadd2(h, r, ASM)
        acc += _lo(h) + _hi(h)
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=n_mask, other=0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + rows, y, mask=n_mask)


@triton.jit
def _fma_gemv_kernel(x2_ptr, q_ptr, s_ptr, y_ptr, N, K, stride_wn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     EVEN: tl.constexpr, ASM: tl.constexpr):
    WK: tl.constexpr = BLOCK_K // 16
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    us = tl.arange(0, WK)
    KW = K // 16
    steps = tl.cdiv(KW, WK * SPLIT_K)
    first = tl.program_id(1) * steps * WK
    acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
    sign_exp = tl.zeros([BLOCK_N, WK], dtype=tl.int32) + (SIGN_EXP | (K >> 31))
    for k0 in range(first, first + steps * WK, WK):
        cols = k0 + us
        if EVEN:
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :])
        else:
            k_mask = cols < KW
            # q = 0 past K decodes to -0: nothing added
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
        h = tl.zeros([BLOCK_N, WK], dtype=tl.int32)
        for i in tl.static_range(8):
            if EVEN:
                xp = tl.load(x2_ptr + cols * 8 + i)
            else:
                xp = tl.load(x2_ptr + cols * 8 + i, mask=k_mask, other=0)
            d = _lop3(w << (14 - 2 * i), SIGNS, sign_exp, 0x28, ASM)  # fp16 2t per half
            h = _hfma2(d, xp[None, :], h, ASM)
        acc += _lo(h) + _hi(h)
    y = tl.sum(acc, axis=1) * (0.5 * tl.load(s_ptr + rows, mask=n_mask, other=0).to(tl.float32))
    if SPLIT_K == 1:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + rows, y, mask=n_mask)


@triton.jit
def _trit5_gemv_kernel(x2_ptr, q_ptr, s_ptr, y_ptr, N, K, stride_wn,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       EVEN: tl.constexpr, ASM: tl.constexpr):
    """Word ``u`` (bytes 0-3, 20 columns): digit ``i`` of byte ``b`` is column
    ``20 u + 4 i + (0, 2, 1, 3)[b]``, so the even bytes' lane pair meets x2[10 u + 2 i] and the
    odd bytes' x2[10 u + 2 i + 1]."""
    WK: tl.constexpr = BLOCK_K // 20
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    us = tl.arange(0, WK)
    KW = K // 20
    steps = tl.cdiv(KW, WK * SPLIT_K)
    first = tl.program_id(1) * steps * WK
    acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
    four = tl.zeros([BLOCK_N, WK], dtype=tl.int32) + (FOUR | (K >> 31))
    five = tl.zeros([BLOCK_N, WK], dtype=tl.int32) + (FIVE | (K >> 31))
    for k0 in range(first, first + steps * WK, WK):
        cols = k0 + us
        if EVEN:
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :])
        else:
            k_mask = cols < KW
            # past K: any digits (x is 0 there, every decoded t finite)
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
        a0 = w & LANES
        a1 = (w >> 8) & LANES
        h = tl.zeros([BLOCK_N, WK], dtype=tl.int32)
        for i in tl.static_range(5):
            if EVEN:
                x0 = tl.load(x2_ptr + cols * 10 + 2 * i)
                x1 = tl.load(x2_ptr + cols * 10 + 2 * i + 1)
            else:
                x0 = tl.load(x2_ptr + cols * 10 + 2 * i, mask=k_mask, other=0)
                x1 = tl.load(x2_ptr + cols * 10 + 2 * i + 1, mask=k_mask, other=0)
            a0 = a0 * 3
            a1 = a1 * 3
            d0 = _hsub2(_lop3(a0, DIGIT, four, 0xEA, ASM), five, ASM)  # t = (4 + d) - 5
            d1 = _hsub2(_lop3(a1, DIGIT, four, 0xEA, ASM), five, ASM)
            h = _hfma2(d0, x0[None, :], h, ASM)
            h = _hfma2(d1, x1[None, :], h, ASM)
            if i < 4:
                a0 = a0 & LANES
                a1 = a1 & LANES
        acc += _lo(h) + _hi(h)
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=n_mask, other=0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + rows, y, mask=n_mask)


@triton.jit
def _addsub_rows_kernel(x2_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN: tl.constexpr, ASM: tl.constexpr):
    """:func:`_addsub_gemv_kernel` for ``BLOCK_M`` rows of x: each weight pair's mask and
    signs made once, its select and add once per row."""
    WK: tl.constexpr = BLOCK_K // 16
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = ms < M
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    us = tl.arange(0, WK)
    KW = K // 16
    acc = tl.zeros([BLOCK_M, BLOCK_N, WK], dtype=tl.float32)
    for k0 in range(0, KW, WK):
        cols = k0 + us
        if EVEN:
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :])
        else:
            k_mask = cols < KW
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
        h = tl.zeros([BLOCK_M, BLOCK_N, WK], dtype=tl.int32)
        for p in tl.static_range(8):
            xo = ms[:, None] * stride_xm + (cols * 8 + p)[None, :]
            if EVEN:
                xp = tl.load(x2_ptr + xo, mask=m_mask[:, None], other=0)
            else:
                xp = tl.load(x2_ptr + xo, mask=m_mask[:, None] & k_mask[None, :], other=0)
            ws = w << p
            m = _nz_mask(ws, ASM)
            r = (xp[:, None, :] ^ (ws & SIGNS)[None, :, :]) & m[None, :, :]
            h = _hadd2(h, r, ASM)
        acc += _lo(h) + _hi(h)
    y = tl.sum(acc, axis=2) * tl.load(s_ptr + rows, mask=n_mask, other=0).to(tl.float32)[None, :]
    tl.store(y_ptr + ms[:, None] * N + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _fma_rows_kernel(x2_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr, ASM: tl.constexpr):
    """:func:`_fma_gemv_kernel` for ``BLOCK_M`` rows of x: each weight pair dequantized once,
    one HFMA2 per row."""
    WK: tl.constexpr = BLOCK_K // 16
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = ms < M
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    us = tl.arange(0, WK)
    KW = K // 16
    acc = tl.zeros([BLOCK_M, BLOCK_N, WK], dtype=tl.float32)
    sign_exp = tl.zeros([BLOCK_N, WK], dtype=tl.int32) + (SIGN_EXP | (K >> 31))
    for k0 in range(0, KW, WK):
        cols = k0 + us
        if EVEN:
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :])
        else:
            k_mask = cols < KW
            w = tl.load(q_ptr + rows[:, None] * stride_wn + cols[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
        h = tl.zeros([BLOCK_M, BLOCK_N, WK], dtype=tl.int32)
        for i in tl.static_range(8):
            xo = ms[:, None] * stride_xm + (cols * 8 + i)[None, :]
            if EVEN:
                xp = tl.load(x2_ptr + xo, mask=m_mask[:, None], other=0)
            else:
                xp = tl.load(x2_ptr + xo, mask=m_mask[:, None] & k_mask[None, :], other=0)
            d = _lop3(w << (14 - 2 * i), SIGNS, sign_exp, 0x28, ASM)
            h = _hfma2(d[None, :, :], xp[:, None, :], h, ASM)
        acc += _lo(h) + _hi(h)
    y = tl.sum(acc, axis=2) * (0.5 * tl.load(s_ptr + rows, mask=n_mask, other=0)
                               .to(tl.float32))[None, :]
    tl.store(y_ptr + ms[:, None] * N + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Packing (host, offline): t [N, K] int in {-1, 0, 1}
# ---------------------------------------------------------------------------------------------


def _words(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def pack_addsub(t: torch.Tensor) -> torch.Tensor:
    n, k = t.shape
    t = t.long().view(n, k // 16, 8, 2)  # [.., pair p, column 2p + j]
    p = torch.arange(8)
    nz, neg = (t != 0).long(), (t < 0).long()
    v = ((nz[..., 0] << (7 - p)) | (neg[..., 0] << (15 - p)) | (nz[..., 1] << (23 - p))
         | (neg[..., 1] << (31 - p)))
    return _words(v.sum(-1))


def pack_fields(t: torch.Tensor) -> torch.Tensor:
    """The shipped 2-bit layout: q = t + 2, column 2i at bits 2i, column 2i + 1 at 16 + 2i."""
    n, k = t.shape
    q = (t.long() + 2).view(n, k // 16, 8, 2)
    i = torch.arange(8)
    return _words(((q[..., 0] << (2 * i)) | (q[..., 1] << (16 + 2 * i))).sum(-1))


def pack_trit5(t: torch.Tensor) -> torch.Tensor:
    n, k = t.shape
    d = (t.long() + 1).view(n, k // 20, 5, 4)  # [.., digit i, column 4i + c]
    byte_col = torch.tensor([0, 2, 1, 3])  # byte b holds column 4i + byte_col[b]
    p3 = 3 ** (4 - torch.arange(5))
    v = (d[..., byte_col] * p3[:, None]).sum(-2)  # [n, words, byte]
    q = (v * 256 + 242) // 243  # ceil(256 v / 243)
    return _words((q << (8 * torch.arange(4))).sum(-1))


KERNELS = {  # name: (kernel, packer, columns per word, bits per weight)
    "addsub": (_addsub_gemv_kernel, pack_addsub, 16, 2.0),
    "fma": (_fma_gemv_kernel, pack_fields, 16, 2.0),
    "trit5": (_trit5_gemv_kernel, pack_trit5, 20, 1.6),
}


def launch_args(name: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                k: int, bn: int, bk: int, split: int, even: bool, asm: bool):
    kernel = KERNELS[name][0]
    grid = (triton.cdiv(w.shape[0], bn), split)
    args = (x.view(torch.int32), w, s, y, w.shape[0], k, w.stride(0))
    kwargs = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "EVEN": even, "ASM": asm,
              "num_warps": 4, "num_stages": 1}
    return kernel, grid, args, kwargs


ROWS = {"addsub": _addsub_rows_kernel, "fma": _fma_rows_kernel}


def rows_launch_args(name: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                     y: torch.Tensor, k: int, bm: int, bn: int, bk: int, even: bool, asm: bool):
    m = x.shape[0]
    grid = (triton.cdiv(w.shape[0], bn), triton.cdiv(m, bm))
    x2 = x.view(torch.int32)
    args = (x2, w, s, y, m, w.shape[0], k, x2.stride(0), w.stride(0))
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN": even, "ASM": asm,
              "num_warps": 4, "num_stages": 1}
    return ROWS[name], grid, args, kwargs


# ---------------------------------------------------------------------------------------------
# Correctness (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


def check() -> None:
    torch.manual_seed(0)
    for name, (_, packer, cpw, _) in KERNELS.items():
        n, k = 24, 160
        t = torch.randint(-1, 2, (n, k))
        x = torch.randn(k).half()
        s = (torch.rand(n) + 0.5).half()
        ref = (t.double() @ x.double()) * s.double()
        w = packer(t)
        for bn, bk, split in ((16, cpw * 4, 1), (8, cpw * 2, 2)):
            y = torch.zeros(n, dtype=torch.float32 if split > 1 else torch.float16)
            kernel, grid, args, kwargs = launch_args(name, x, w, s, y, k, bn, bk, split, False,
                                                     False)
            kwargs = {a: b for a, b in kwargs.items() if a not in ("num_warps", "num_stages")}
            kernel[grid](*args, **kwargs)
            err = (y.double() - ref).abs().max().item()
            tol = 2e-3 * ref.abs().max().item() + 1e-2
            status = "ok" if err <= tol else "FAIL"
            print(f"check {name:7s} N={n} K={k} BLOCK_N={bn} BLOCK_K={bk} SPLIT_K={split}: "
                  f"max |err| {err:.2e} (tol {tol:.2e}) {status}", flush=True)
            if err > tol:
                raise SystemExit(1)
        if name in ROWS:  # the multi-row kernels: M = 3 in a tile of 4
            xm = torch.randn(3, k).half()
            refm = (xm.double() @ t.double().T) * s.double()
            y = torch.zeros(3, n, dtype=torch.float16)
            kernel, grid, args, kwargs = rows_launch_args(name, xm, w, s, y, k, 4, 16, 64,
                                                          False, False)
            kwargs = {a: b for a, b in kwargs.items() if a not in ("num_warps", "num_stages")}
            kernel[grid](*args, **kwargs)
            err = (y.double() - refm).abs().max().item()
            tol = 2e-3 * refm.abs().max().item() + 1e-2
            status = "ok" if err <= tol else "FAIL"
            print(f"check {name:7s} rows M=3 N={n} K={k} BLOCK_M=4 BLOCK_N=16 BLOCK_K=64: "
                  f"max |err| {err:.2e} (tol {tol:.2e}) {status}", flush=True)
            if err > tol:
                raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# Static model
# ---------------------------------------------------------------------------------------------


class TritCase(sp.Case):
    """The model's Case with the packed weight at ``bits_per_weight`` (1.6 for 5 trits a byte)
    and one fp16 scale per row."""

    def __init__(self, config: str, bits_per_weight: float):
        super().__init__("ternary", config, 2, None)
        object.__setattr__(self, "bpw", bits_per_weight)

    def weight_bytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        return math.ceil(n * k * self.bpw / 8) + n * dtype.itemsize

    def tile_bytes(self, bn: int, bk: int, dtype: torch.dtype) -> float:
        return bn * bk * self.bpw / 8


CONFIGS = [  # BLOCK_N, BLOCK_K (dense columns; trit5: 20 per word), SPLIT_K
    (16, 2048, 1), (32, 1024, 1), (16, 1024, 2), (64, 512, 4),
]


def model(name: str, n: int, k: int, bn: int, bk: int, split: int) -> dict:
    _, packer, cpw, bpw = KERNELS[name]
    if cpw == 20:
        bk = bk // 16 * 20  # the same words per step
    kp = math.ceil(k / cpw) * cpw  # whole words (trit5: 8192 -> 8200)
    even = kp % (bk * split) == 0  # else the K loop masks its loads
    x = torch.empty(kp, dtype=torch.float16)
    w = torch.empty(n, kp // cpw, dtype=torch.int32)
    s = torch.empty(n, dtype=torch.float16)
    y = torch.empty(n, dtype=torch.float32 if split > 1 else torch.float16)
    kernel, grid, args, kwargs = launch_args(name, x, w, s, y, kp, bn, bk, split, even, True)
    la = Launch(kernel, grid, args, kwargs)
    case = TritCase(name, bpw)
    r = sp.model_launch(la, case, 1, n, kp, torch.float16)
    c = sp.compile_launch(la)
    body_sass = loop_sass(c.sass)
    t_us = max(r.time_us.values()) + sp.MODEL["launch_us"]
    if split > 1:  # the fp32 y the atomics add into: a torch.zeros launch (as model_case)
        t_us += n * 4 / sp.MODEL["hbm_bytes_per_s"] * 1e6 + sp.MODEL["launch_us"]
    return {"kernel": name, "bits": bpw, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
            "Kp": kp, "even": even, "grid": r.grid, "regs": r.registers,
            "ctas_per_sm": r.ctas_per_sm,
            "loop_ipw": round(r.loop_instr_per_weight, 3), "ipw": round(r.instr_per_weight, 3),
            "time_us": {kk: round(v, 2) for kk, v in r.time_us.items()},
            "bound": max(r.time_us, key=r.time_us.get), "predicted_us": round(t_us, 2),
            "mix": {kk: v for kk, v in r.loop.items() if v}, "ops": body_sass}


ROW_CONFIGS = [(16, 16, 256), (16, 32, 128), (16, 16, 512), (16, 64, 64)]  # BM, BN, BK


def model_rows(name: str, m: int, n: int, k: int, bm: int, bn: int, bk: int) -> dict:
    bpw = KERNELS[name][3]
    x = torch.empty(m, k, dtype=torch.float16)
    w = torch.empty(n, k // 16, dtype=torch.int32)
    s = torch.empty(n, dtype=torch.float16)
    y = torch.empty(m, n, dtype=torch.float16)
    kernel, grid, args, kwargs = rows_launch_args(name, x, w, s, y, k, bm, bn, bk,
                                                  k % bk == 0, True)
    la = Launch(kernel, grid, args, kwargs)
    r = sp.model_launch(la, TritCase(name, bpw), m, n, k, torch.float16)
    return {"kernel": name + "-rows", "M": m, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
            "grid": r.grid, "regs": r.registers, "loop_ipw": round(r.loop_instr_per_weight, 3),
            "ipw": round(r.instr_per_weight, 3),
            "time_us": {kk: round(v, 2) for kk, v in r.time_us.items()},
            "bound": max(r.time_us, key=r.time_us.get),
            "predicted_us": round(max(r.time_us.values()) + sp.MODEL["launch_us"], 2),
            "ops": loop_sass(sp.compile_launch(la).sass)}


def loop_sass(sass: str) -> dict:
    """Opcode counts (base names) of the K loop: every instruction, not only the tracked."""
    instrs = sp.parse_sass(sass)
    lps = sp.loops(instrs)
    if not lps:
        return {}
    a, b = lps[0]
    out: dict = {}
    for ins in instrs[a:b + 1]:
        out[ins.base] = out.get(ins.base, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def shipped_rows(path: str | None) -> list[dict]:
    if path and os.path.exists(path):
        rows = json.load(open(path))["rows"]
    else:
        cases = [sp.Case("dequant", "ternary row sym", 2, None),
                 sp.Case("dequant", "int2 g128 asym", 2, 128)]
        rows = [sp.model_case(c, m) for c in cases for m in (1, 16)]
    return [r for r in rows if r["config"] in ("ternary row sym", "int2 g128 asym")
            and r["M"] in (1, 16)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="the interpreter check only")
    ap.add_argument("--shipped", default=None, help="a static_perf JSON with the shipped rows")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    if args.check:
        check()
        return 0
    if INTERP:
        raise SystemExit("run the model without TRITON_INTERPRET (env -u TRITON_INTERPRET)")
    if not args.no_check:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        subprocess.run([sys.executable, __file__, "--check"], env=env, check=True)
    n, k = sp.HEADLINE["N"], sp.HEADLINE["K"]
    dense = sp.dense_us(1, n, k, torch.float16)
    print(f"\nstatic model, H200 (sm_90, Triton {triton.__version__}), M = 1, N = K = {n}, "
          f"fp16 x; dense cuBLAS {dense:.2f} us; predictions, not measurements\n"
          f"(loop/w: K-loop SASS instructions / weights per thread per trip; all/w: the whole "
          f"kernel's; pred: max(memory, issue) + launch, + a zeroing launch when SK > 1)")
    hdr = (f"{'kernel':8s} {'bits':>4s} {'BN':>3s} {'BK':>5s} {'SK':>2s} {'grid':>5s} "
           f"{'regs':>4s} {'loop/w':>6s} {'all/w':>6s} {'mem us':>6s} {'issue us':>8s} "
           f"{'pred us':>7s} {'x dense':>7s}")
    print(hdr)
    best: dict = {}
    for name in KERNELS:
        for bn, bk, split in CONFIGS:
            r = model(name, n, k, bn, bk, split)
            tu = r["time_us"]
            print(f"{name:8s} {r['bits']:4.1f} {bn:3d} {r['BLOCK_K']:5d} {split:2d} "
                  f"{r['grid']:5d} {r['regs']:4d} {r['loop_ipw']:6.3f} {r['ipw']:6.3f} "
                  f"{tu['memory']:6.2f} {tu['issue']:8.2f} {r['predicted_us']:7.2f} "
                  f"{dense / r['predicted_us']:7.2f}", flush=True)
            if name not in best or r["predicted_us"] < best[name]["predicted_us"]:
                best[name] = r
    dense16 = sp.dense_us(16, n, k, torch.float16)
    print(f"\nM = 16 (x rows in one BLOCK_M = 16 tile; dense cuBLAS {dense16:.2f} us):")
    print(f"{'kernel':12s} {'BM':>3s} {'BN':>3s} {'BK':>5s} {'grid':>5s} {'regs':>4s} "
          f"{'loop/w':>6s} {'all/w':>6s} {'mem us':>6s} {'issue us':>8s} {'pred us':>7s} "
          f"{'x dense':>7s}")
    for name in ROWS:
        for bm, bn, bk in ROW_CONFIGS:
            r = model_rows(name, 16, n, k, bm, bn, bk)
            tu = r["time_us"]
            print(f"{r['kernel']:12s} {bm:3d} {bn:3d} {bk:5d} {r['grid']:5d} {r['regs']:4d} "
                  f"{r['loop_ipw']:6.3f} {r['ipw']:6.3f} {tu['memory']:6.2f} "
                  f"{tu['issue']:8.2f} {r['predicted_us']:7.2f} "
                  f"{dense16 / r['predicted_us']:7.2f}", flush=True)
            key = r["kernel"]
            if key not in best or r["predicted_us"] < best[key]["predicted_us"]:
                best[key] = r
    print("\nK-loop SASS of each kernel's best config (all opcodes):")
    for name, r in best.items():
        print(f"  {name} (BM {r.get('BLOCK_M', 1)}, BN {r['BLOCK_N']}, BK {r['BLOCK_K']}, "
              f"SK {r.get('SPLIT_K', 1)}): {r['ops']}")
    print("\nshipped _fields_matmul_kernel (16-row tensor-core tile, static_perf):")
    for r in shipped_rows(args.shipped):
        print(f"  {r['config']:16s} M={r['M']:<3d} loop/w {r['loop_instr_per_weight']:.3f} "
              f"all/w {r['instr_per_weight']:.3f}  mem {r['time_us']['memory']:.2f} "
              f"issue {r['time_us']['issue']:.2f} tensor {r['time_us']['tensor']:.2f} us  "
              f"pred {r['predicted_us']:.2f} us ({r['predicted_speedup']:.2f}x dense, "
              f"{r['bound']}-bound)  loop mix {r['loop_mix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
