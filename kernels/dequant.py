"""Low-bit weights (affine int8/int4/int3/int2/int1, codebook): Triton matmuls, configs, launchers.

The packed fields, the affine and codebook formats, packing and checks:
:mod:`compress_ops.kernels.formats.dequant`.

Kernels
-------
``y[M, N] = x[M, K] @ W^T (+ bias)`` reading only the packed form; both modes share the kernels
(a ``MODE`` constexpr picks affine-asymmetric, affine-symmetric or codebook):

* :func:`_dequant_gemv_kernel` (small M, memory-bound): loads each packed word once and walks
  its fields (``tl.static_range``), multiplying field ``i`` of a ``[U, BLOCK_N]`` word tile by
  the activations at columns ``u * fields + i``; FMA into a ``[BLOCK_M, U, BLOCK_N]`` fp32
  accumulator reduced once at the end; optional split-K (fp32 atomic adds).
* :func:`_dequant_matmul_kernel` (the bit-plane GEMM: 3-bit fields): tiled ``tl.dot`` GEMM;
  each ``[BLOCK_K, BLOCK_N]`` weight tile is unpacked and dequantized (or looked up) in
  registers, grouped program order, ``num_stages`` pipelining, optional split-K. (It and the
  GEMV still read 1-bit fields as one plane; no call routes them there.)

The contiguous 2/4/8-bit fields, and the 1-bit fields (affine; their one bit plane read as
sixteen pairs of fields per word: with fp16 x each byte copied into all four by a PRMT, then
one LOP3 per pair of adjacent columns; otherwise one shift and mask per pair, pair ``p``
holding columns ``p`` and ``p + 16``, a fixed permutation of each 32-column block that
:func:`_k_order` undoes), have their own kernels, which every call with those widths takes,
affine or codebook:
:func:`_fields_gemv_kernel` (M = 1) and :func:`_fields_matmul_kernel` (M >= 2; tiles of up
to 32 rows scale each K step's dot per output element, larger tiles dequantize each weight
once per CTA).

Roofline for one call (M, N, K), activations of ``e`` bytes: ``2 M N K`` FLOPs; minimum bytes
``N Kp b / 8 + N (Kp / gs) e (1 + asym)`` (affine) or ``N Kp b / 8 + R 2**b e`` (codebook)
``+ M K e + M N e``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compress_ops.kernels import _launch as _launch_mod
from compress_ops.kernels import launches
from compress_ops.kernels._launch import dot_meta, grouped_tile, ptx, store_tile
from compress_ops.kernels._launch import prmt as _prmt
from compress_ops.kernels.formats.dequant import (
    WORD_COLS,
    check_affine_inputs,
    check_codebook_inputs,
    packed_k,
)
from compress_ops.kernels.tuning import (
    DTYPES,
    SPLIT_K_MAX_M,
    KernelConfig,
    auto_split_k,
    autotune,
    device_name,
    device_table,
    gpu_target,
    load_tables,
    m_bucket,
    table_config,
)

__all__ = [
    "MODE_ASYM",
    "MODE_SYM",
    "MODE_CODEBOOK",
    "dequant_matmul",
    "codebook_matmul",
    "select_config",
    "get_autotune_configs",
    "autotuned_config",
    "audit_specs",
    "kwidth_barrier",
    "join8",
]

MODE_ASYM, MODE_SYM, MODE_CODEBOOK = 0, 1, 2
_FAMILY = "dequant"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _field(w0, w1, w2, i: tl.constexpr, BITS: tl.constexpr):
    """Position ``i`` of a packing unit: one word (contiguous fields in version 2's order:
    formats 2 and 3 interleave 2- and 4-bit ones, position ``i`` is field
    ``i // 2 + (i % 2) * F / 2``; format 3's column: :func:`_pos_col`) or three bit planes
    (column ``i``), or one (1-bit fields: a single bit plane)."""
    if BITS == 3:
        return ((w0 >> i) & 1) | (((w1 >> i) & 1) << 1) | (((w2 >> i) & 1) << 2)
    elif BITS == 1:
        return (w0 >> i) & 1
    else:
        F: tl.constexpr = 32 // BITS
        POS: tl.constexpr = i // 2 + (i % 2) * (F // 2) if BITS < 8 else i
        return (w0 >> (POS * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _and_or(a, b: tl.constexpr, c, ASM: tl.constexpr, IMM: tl.constexpr = True):
    """``(a & b) | c`` as one LOP3 (``ASM``: the PTX ``lop3.b32`` with the truth table
    ``(0xF0 & 0xCC) | 0xAA = 0xEA``; the ptxas of Triton 3.6 emits an AND and an OR for the
    plain expression); the plain expression elsewhere (the interpreter). ``IMM``: ``c`` is an
    integer (an immediate), else a value in a register (one ptxas cannot fold: with two
    immediates it re-materializes one into a fresh register for every LOP3)."""
    if ASM:
        out = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,n,n" if IMM else "=r,r,n,r", [a, b, c],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = (a & b) | c
    return out


@triton.jit
def _halves(v, HALF: tl.constexpr):
    """The low and high 16-bit halves of int32 ``v`` as ``HALF`` values."""
    lo = v.to(tl.int16).to(HALF, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(HALF, bitcast=True)
    return lo, hi


@triton.jit
def _pair(w, i: tl.constexpr, BITS: tl.constexpr, HALF_MAGIC: tl.constexpr, ASM: tl.constexpr,
          z2, s2, SYM_Z: tl.constexpr, DQ: tl.constexpr, BYTE_SHIFT: tl.constexpr = False,
          kz=0, EXP_REG: tl.constexpr = False):
    """Fields ``i`` and ``i + 16 / b`` of each word (format 2: columns ``2i`` and ``2i + 1`` at
    2 and 4 bits; columns ``i`` and ``i + 2`` at 8 bits), as two tensors: the halves of
    ``offset + q`` (HALF_MAGIC 1: fp16 1024 + q; 2: bf16 128 + q), both made by one shift and
    one LOP3 on the word (the pair's mask and exponent in each 16-bit half); else (0) fp32
    ``q``. ``DQ`` (on a GPU), in packed arithmetic before the halves are split
    (:func:`_dequant_halves`, fp16): 1, ``(q - z) s``; 2, ``q - z``; 3, ``(q) s + z2`` by one
    fma (``z2 = -z s``). ``BYTE_SHIFT`` (fp16):
    the word is shifted by whole bytes only (one shift per byte for every pair in it), the
    pair's ``r = b i mod 8`` low bits staying in place under an exponent that makes mantissa
    bit ``r`` worth 1: the halves are ``1024 / 2**r + q`` (:func:`_pair_offset`).
    ``EXP_REG`` (with ``BYTE_SHIFT``): the exponent word is ``EXP_R | kz`` with ``kz`` a zero
    ptxas cannot see (``K >> 31``), a register made once before the loop; as an immediate,
    ptxas re-materialized each of them by a move in every K step (its LOP3 takes the mask as
    the one immediate)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if HALF_MAGIC == 0:  # 2**23 + q in a float's mantissa, minus 2**23
        lo = _and_or(w >> (BITS * i), MASK, 0x4B000000, ASM).to(tl.float32, bitcast=True)
        hi = _and_or(w >> (BITS * i + 16), MASK, 0x4B000000, ASM).to(tl.float32, bitcast=True)
        lo = lo - 8388608.0
        hi = hi - 8388608.0
    else:
        if HALF_MAGIC == 1:
            EXP: tl.constexpr = 0x64006400
            HALF: tl.constexpr = tl.float16
        else:
            EXP: tl.constexpr = 0x43004300
            HALF: tl.constexpr = tl.bfloat16
        if BYTE_SHIFT and BITS == 1:  # w: one byte of the word in all four bytes (PRMT,
            # :func:`_unpack_words`); pair i holds its columns 2j, 2j + 1 (j = i % 4): column
            # 2j at bit 2j of the low half (j = 0: bit 8, its copy in byte 1), 2j + 1 at bit
            # 2j + 1 of the high half, each under the exponent that makes its bit worth 1
            # (1024 / 2**r, r in 1 .. 8: plus the symmetric zero 1/2 it stays exact in fp16)
            tl.static_assert(HALF_MAGIC == 1, "BYTE_SHIFT: fp16 fields only")
            J: tl.constexpr = i % 4
            R_LO: tl.constexpr = 8 if J == 0 else 2 * J
            R_HI: tl.constexpr = 2 * J + 1
            OFF_LO: tl.constexpr = (25 - R_LO) << 10
            OFF_HI: tl.constexpr = (25 - R_HI) << 10
            v = _and_or(w, (1 << R_LO) | ((1 << R_HI) << 16), OFF_LO | (OFF_HI << 16), ASM)
        elif BYTE_SHIFT:
            tl.static_assert(HALF_MAGIC == 1, "BYTE_SHIFT: fp16 fields only")
            R: tl.constexpr = (BITS * i) % 8
            SH: tl.constexpr = BITS * i - R
            EXP_R: tl.constexpr = ((25 - R) << 10) * 0x10001  # fp16 1024 / 2**R, both halves
            ws = w if SH == 0 else w >> SH
            if EXP_REG:
                v = _and_or(ws, (MASK << R) * 0x10001, EXP_R | kz, ASM, False)
            else:
                v = _and_or(ws, (MASK << R) * 0x10001, EXP_R, ASM)
            OFF0: tl.constexpr = (25 - R) << 10
            RB: tl.constexpr = R
        else:
            v = _and_or(w >> (BITS * i), MASK * 0x10001, EXP, ASM)
            OFF0: tl.constexpr = EXP & 0xFFFF
            RB: tl.constexpr = 0
        if DQ:  # the halves' offset, with a symmetric grid's constant zero folded in (an
            # integer: a whole number of the offset's units, 2**-r; 1 bit: SYM_Z 1 is the zero
            # 1/2, which needs r >= 1, BYTE_SHIFT)
            if BITS == 1 and BYTE_SHIFT:  # each half its own offset (and 1/2: 2**(r - 1) units)
                OFF: tl.constexpr = ((OFF_LO + ((SYM_Z << R_LO) >> 1))
                                     | ((OFF_HI + ((SYM_Z << R_HI) >> 1)) << 16))
            else:
                tl.static_assert(BITS > 1 or SYM_Z == 0, "1-bit zero 1/2: BYTE_SHIFT only")
                OFF: tl.constexpr = (OFF0 + (SYM_Z << RB)) * 0x10001
            v = _dequant_halves(v, z2, s2, SYM_Z, DQ == 1, HALF_MAGIC, OFF, DQ == 3)
        lo, hi = _halves(v, HALF)
    return lo, hi


# prmt.b32 selectors of _byte_pair: result bytes (low to high) = word byte 2j, 0x64 (byte 4 of
# the pair {word, 0x64646464}), word byte 2j + 1, 0x64
PRMT_PAIR_SEL = (tl.constexpr(0x4140), tl.constexpr(0x4342))
_SEL01 = PRMT_PAIR_SEL[0]
_SEL23 = PRMT_PAIR_SEL[1]


@triton.jit
def _byte_pair(w, j: tl.constexpr, ASM: tl.constexpr, mg=0x64646464):
    """Bytes ``2j`` and ``2j + 1`` of each word as the fp16 halves of ``1024 + q`` (the byte
    in the low 8 bits of the mantissa under the exponent byte 0x64), the pair in column order:
    one PTX ``prmt.b32`` (``ASM``: the selector picks the word's byte or 0x64 for each result
    byte); the masked shifts elsewhere (the interpreter)."""
    if ASM:
        SEL: tl.constexpr = _SEL01 if j == 0 else _SEL23
        out = tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,n", [w, mg, SEL], dtype=tl.int32,
            is_pure=True, pack=1)
    else:
        if j == 0:
            out = (w & 0xFF) | ((w << 8) & 0xFF0000) | 0x64006400
        else:
            out = ((w >> 16) & 0xFF) | ((w >> 8) & 0xFF0000) | 0x64006400
    return out


@triton.jit
def _lut_tables(e, BLOCK_N: tl.constexpr):
    """The 16 two-byte entries of each row's codebook (``e``: ``[BLOCK_N, 16]``, their bits in
    int32) as the eight registers :func:`_lut_word` selects from: the low bytes of entries
    ``4j .. 4j + 3`` in ``lo_j`` (byte ``i`` = entry ``4j + i``), the high bytes in ``hi_j``."""
    e3 = tl.reshape(e, (BLOCK_N, 4, 4))
    sh = (tl.arange(0, 4) * 8)[None, None, :]
    lo = tl.sum((e3 & 0xFF) << sh, axis=2)  # disjoint bytes: the sum is their OR
    hi = tl.sum(((e3 >> 8) & 0xFF) << sh, axis=2)
    lo02, lo13 = tl.split(tl.reshape(lo, (BLOCK_N, 2, 2)))  # [BN, 2]: j = (0, 2), (1, 3)
    lo0, lo2 = tl.split(lo02)
    lo1, lo3 = tl.split(lo13)
    hi02, hi13 = tl.split(tl.reshape(hi, (BLOCK_N, 2, 2)))
    hi0, hi2 = tl.split(hi02)
    hi1, hi3 = tl.split(hi13)
    return lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3


@triton.jit
def _lut_half(t0, t1, t2, t3, sel, sel8, ASM: tl.constexpr):
    """One byte of four entries looked up: the entries' 3 low index bits select from tables
    ``t0``/``t1`` (entries 0-7) and ``t2``/``t3`` (entries 8-15); then bit 3 (``sel8``: nibble
    ``k`` = ``k + 4 * bit3``) picks the half."""
    return _prmt(_prmt(t0, t1, sel, ASM, False), _prmt(t2, t3, sel, ASM, False), sel8, ASM,
                 False)


@triton.jit
def _lut_word(w, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, c3210, ASM: tl.constexpr):
    """The 8 fields of each 4-bit word looked up in registers (twenty PRMT and seven shifts or
    LOP3 per word, no memory access): four int32 whose halves are the two-byte entries of
    columns ``(2i, 2i + 1)`` (format 2: nibble ``i`` and nibble ``i + 4``), as
    :func:`_pair` gives them. ``c3210``: the constant 0x3210 in a register."""
    se = w & 0x7777  # nibbles 0-3 (even columns); PRMT reads the low 16 bits
    s8e = _and_or(w >> 1, 0x4444, c3210, ASM, False)
    wo = w >> 16  # nibbles 4-7 (odd columns)
    so = wo & 0x7777
    s8o = _and_or(wo >> 1, 0x4444, c3210, ASM, False)
    lo_e = _lut_half(lo0, lo1, lo2, lo3, se, s8e, ASM)  # low bytes of columns 0, 2, 4, 6
    hi_e = _lut_half(hi0, hi1, hi2, hi3, se, s8e, ASM)
    lo_o = _lut_half(lo0, lo1, lo2, lo3, so, s8o, ASM)  # columns 1, 3, 5, 7
    hi_o = _lut_half(hi0, hi1, hi2, hi3, so, s8o, ASM)
    p01 = _prmt(lo_e, hi_e, 0x5140, ASM)  # entries of columns 0 and 2
    p23 = _prmt(lo_e, hi_e, 0x7362, ASM)  # 4 and 6
    q01 = _prmt(lo_o, hi_o, 0x5140, ASM)  # 1 and 3
    q23 = _prmt(lo_o, hi_o, 0x7362, ASM)  # 5 and 7
    return (_prmt(p01, q01, 0x5410, ASM), _prmt(p01, q01, 0x7632, ASM),
            _prmt(p23, q23, 0x5410, ASM), _prmt(p23, q23, 0x7632, ASM))


@triton.jit
def _lut_registers(s_ptr, rows, rows_per_group, stride_sn, BLOCK_N: tl.constexpr):
    """Each row's 16 two-byte codebook entries as :func:`_lut_tables`' eight registers, each
    ``[BLOCK_N, 1]`` (``rows``: the rows' indices, clamped)."""
    e = tl.load(s_ptr + (rows // rows_per_group)[:, None] * stride_sn + tl.arange(0, 16)[None, :])
    e = e.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _lut_tables(e, BLOCK_N)
    return (lo0[:, None], lo1[:, None], lo2[:, None], lo3[:, None],
            hi0[:, None], hi1[:, None], hi2[:, None], hi3[:, None])


@triton.jit
def _lut_tile(words, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, c3210, HALF: tl.constexpr,
              ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              BITS: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_K]`` tile of 4-bit codebook entries (``HALF`` values) in K order,
    looked up in registers (:func:`_lut_word`) from ``[BLOCK_N, W]`` words."""
    r0, r1, r2, r3 = _lut_word(words, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, c3210, ASM)
    l0, h0 = _halves(r0, HALF)
    l1, h1 = _halves(r1, HALF)
    l2, h2 = _halves(r2, HALF)
    l3, h3 = _halves(r3, HALF)
    return _k_order(tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)),
                            tl.join(tl.join(h0, h2), tl.join(h1, h3))), BLOCK_N, BLOCK_K, BITS)


@triton.jit
def _pair_offset(col, BITS: tl.constexpr, BYTE_SHIFT: tl.constexpr):
    """The fp16 offset the unpacked field of column ``col`` carries (:func:`_pair`): 1024, or
    with ``BYTE_SHIFT`` ``1024 / 2**r`` for its pair's bit offset ``r`` within its byte."""
    if BYTE_SHIFT and BITS == 1:  # column c at bit r = c % 8 of its half (8 for r = 0)
        r = col & 7
        out = (1024 >> tl.where(r == 0, 8, r)).to(tl.float32)
    elif BYTE_SHIFT:
        F: tl.constexpr = 32 // BITS
        pair = (_col_pos(col, BITS) % F) // 2
        out = (1024 >> ((BITS * pair) % 8)).to(tl.float32)
    else:
        out = tl.zeros_like(col).to(tl.float32) + 1024.0
    return out


@triton.jit
def _dequant_halves(v, z2, s2, SYM_Z: tl.constexpr, SCALE: tl.constexpr = True,
                    HALF_MAGIC: tl.constexpr = 1, OFF: tl.constexpr = 0x64006400,
                    FMA: tl.constexpr = False):
    """``(q - z) s`` of the two fp16 fields of each int32 ``v`` (the halves of ``1024 + q``)
    in packed fp16 arithmetic, PTX ``sub.f16x2`` / ``mul.f16x2`` on the whole register: the
    halves are split only afterwards, so nothing reassembles them (Triton 3.9's LLVM moved the
    halves of scalar fp16 arithmetic with two PRMT per pair). ``z2``/``s2``: zero and scale in
    both halves of an int32; ``SYM_Z`` (> 0): the symmetric grid's constant zero instead, folded
    into the offset ``OFF`` by the caller (``1024 + z`` is an integer, exact). The subtractions are
    exact; one rounding, as in the scalar form. ``SCALE`` off: ``q - z`` only (exact for an integer
    zero, else one rounding), the scale applied by the caller. ``FMA``: ``(v - OFF) s2 + z2`` with
    ``z2 = -z s`` (rounded to fp16 once per group and row): one exact subtraction of the offset
    ``OFF`` (both halves' fp16 bits; 1024, or :func:`_pair`'s ``1024 / 2**r``) and one
    ``fma.rn.f16x2``, two roundings in all, as ``((q - z) rounded) s`` with a fractional zero (the
    scalar form rounds once: the interpreter's float64 tests check that one)."""
    tl.static_assert(HALF_MAGIC == 1, "packed dequantization is fp16 only")
    if FMA:  # OFF: the offset alone (z2 = -z s carries the zero)
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, $3; sub.f16x2 t, $1, c; fma.rn.f16x2 $0, t, $2, $4; }",
            "=r,r,r,n,r", [v, s2, OFF, z2], dtype=tl.int32, is_pure=True, pack=1)
    elif SYM_Z > 0 and not SCALE:  # OFF holds offset + zero
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 c; mov.b32 c, $2; sub.f16x2 $0, $1, c; }",
            "=r,r,n", [v, OFF], dtype=tl.int32, is_pure=True, pack=1)
    elif not SCALE:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, $3; sub.f16x2 t, $1, c; sub.f16x2 $0, t, $2; }",
            "=r,r,r,n", [v, z2, OFF], dtype=tl.int32, is_pure=True, pack=1)
    elif SYM_Z > 0:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, $3; sub.f16x2 t, $1, c; mul.f16x2 $0, t, $2; }",
            "=r,r,r,n", [v, s2, OFF], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 c, t; mov.b32 c, $4; sub.f16x2 t, $1, c; "
            "sub.f16x2 t, t, $2; mul.f16x2 $0, t, $3; }",
            "=r,r,r,r,n", [v, z2, s2, OFF], dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _kwidth_barrier(h, ASM: tl.constexpr):
    """``h`` (fp16/bf16) through an identity ``mov.b32`` that LLVM must keep (not pure): Triton
    3.6 halves a dot operand's "original bit width" when a ``tl.join`` lies behind it
    (``computeOrigBitWidth``), which makes both operands kWidth 4: LDS.64 reads and register
    moves instead of LDSM. The barrier ends that backward walk (ptxas drops the move)."""
    if ASM and (h.dtype.is_fp16() or h.dtype.is_bf16()):  # (fp32 operands take no join)
        out = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [h], dtype=h.dtype,
                                        is_pure=False, pack=2)
    else:
        out = h
    return out


@triton.jit
def _half_pair(x):
    """fp16 ``x`` in both 16-bit halves of an int32."""
    b = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """``[..., 2, 2, 2]`` whose element ``(a, b, c)`` is ``v[4a + 2b + c]``: the joins nested in
    bit-reversed order (``join`` adds its dimension last)."""
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)),
                   tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def _unpack_words(w, BITS: tl.constexpr, HALF_MAGIC: tl.constexpr, ASM: tl.constexpr,
                  z2=0, s2=0, SYM_Z: tl.constexpr = 0, DQ: tl.constexpr = 0, mg=0x64646464,
                  BYTE_SHIFT: tl.constexpr = False, HALF_WORDS: tl.constexpr = False,
                  kz=0, EXP_REG: tl.constexpr = False):
    """Every field of each word, ``[..., 2, 2(, 2)]``, that reshapes to K order (column ``c``
    of word ``u`` at ``u * 32 / b + c``) with every field of a word in the thread that loaded
    it: the joins add in-register dimensions, so the dot operand's store is vectorized and
    nothing moves through shared memory. ``join(a, b)`` puts ``b`` one position further along
    its new last dimension. Format 2's 2- and 4-bit words give pairs of adjacent columns
    (``2i``, ``2i + 1``) in the two halves of one register: the low and the high halves are
    joined separately (bit-reversed pair order) and then to each other, so each register's two
    halves stay adjacent (the fp16/bf16 store takes the register as it is, no PRMT). int8
    (fields in column order) pairs bytes with a PRMT in fp16; else ``(i, i + 2)``. 1-bit
    fields: sixteen pairs per word, with ``BYTE_SHIFT`` (fp16) adjacent columns from each byte
    copied into all four bytes (one PRMT per byte), else columns ``(p, p + 16)``
    (:func:`_k_order` puts them in K order). ``DQ``: each register's pair dequantized before
    it is split (:func:`_pair`; 1: ``(q - z) s``, 2: ``q - z``)."""
    if BITS == 1:  # sixteen pairs per word
        if BYTE_SHIFT:  # fp16: byte b of each word in all four bytes (one PRMT per byte), its
            # pairs 4b .. 4b + 3 in column order (pair p: columns 2p, 2p + 1; :func:`_pair`)
            w0 = _prmt(w, w, 0x0000, ASM)
            w1 = _prmt(w, w, 0x1111, ASM)
            w2 = _prmt(w, w, 0x2222, ASM)
            w3 = _prmt(w, w, 0x3333, ASM)
        else:  # one shift per pair: pair p holds columns p and p + 16 (:func:`_k_order`)
            w0 = w
            w1 = w
            w2 = w
            w3 = w
        l0, h0 = _pair(w0, 0, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l1, h1 = _pair(w0, 1, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l2, h2 = _pair(w0, 2, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l3, h3 = _pair(w0, 3, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l4, h4 = _pair(w1, 4, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l5, h5 = _pair(w1, 5, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l6, h6 = _pair(w1, 6, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l7, h7 = _pair(w1, 7, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l8, h8 = _pair(w2, 8, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l9, h9 = _pair(w2, 9, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l10, h10 = _pair(w2, 10, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l11, h11 = _pair(w2, 11, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l12, h12 = _pair(w3, 12, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l13, h13 = _pair(w3, 13, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l14, h14 = _pair(w3, 14, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        l15, h15 = _pair(w3, 15, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT)
        h = tl.join(tl.join(_join8(l0, l2, l4, l6, l8, l10, l12, l14),
                            _join8(l1, l3, l5, l7, l9, l11, l13, l15)),
                    tl.join(_join8(h0, h2, h4, h6, h8, h10, h12, h14),
                            _join8(h1, h3, h5, h7, h9, h11, h13, h15)))
    elif BITS == 8 and HALF_MAGIC == 1:  # two PRMT per word; each pair already in column order
        v0 = _byte_pair(w, 0, ASM, mg)
        v1 = _byte_pair(w, 1, ASM, mg)
        if DQ:
            OFF8: tl.constexpr = (0x6400 + SYM_Z) * 0x10001
            v0 = _dequant_halves(v0, z2, s2, SYM_Z, DQ == 1, 1, OFF8, DQ == 3)
            v1 = _dequant_halves(v1, z2, s2, SYM_Z, DQ == 1, 1, OFF8, DQ == 3)
        lo0, hi0 = _halves(v0, tl.float16)
        lo1, hi1 = _halves(v1, tl.float16)
        h = tl.join(tl.join(lo0, lo1), tl.join(hi0, hi1))
    elif BITS == 8:  # columns (0, 2) and (1, 3)
        lo0, hi0 = _pair(w, 0, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ)
        lo1, hi1 = _pair(w, 1, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ)
        h = tl.join(tl.join(lo0, hi0), tl.join(lo1, hi1))
    elif BITS == 4 or HALF_WORDS:  # four pairs per word (int4), or per byte-half (int2)
        if HALF_WORDS:  # int2 [BN, W] words: a new dimension of their two byte-halves (w >> 0,
            # w >> 8; no join, so the two threads of format 3 that share a word can each take
            # one: a join's dimension is a register's), each with four pairs at bits 0, 2, 4, 6
            w = w[:, :, None] >> (tl.arange(0, 2) * 8)[None, None, :]
        l0, h0 = _pair(w, 0, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l1, h1 = _pair(w, 1, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l2, h2 = _pair(w, 2, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l3, h3 = _pair(w, 3, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        h = tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)),
                    tl.join(tl.join(h0, h2), tl.join(h1, h3)))
    else:
        l0, h0 = _pair(w, 0, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l1, h1 = _pair(w, 1, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l2, h2 = _pair(w, 2, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l3, h3 = _pair(w, 3, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l4, h4 = _pair(w, 4, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l5, h5 = _pair(w, 5, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l6, h6 = _pair(w, 6, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        l7, h7 = _pair(w, 7, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQ, BYTE_SHIFT, kz, EXP_REG)
        h = tl.join(_join8(l0, l1, l2, l3, l4, l5, l6, l7), _join8(h0, h1, h2, h3, h4, h5, h6, h7))
    return h


@triton.jit
def _gemv_tile(acc, t, x_rows, q_ptr, s_ptr, z_ptr, lut_rows, rows_n, m_mask, n_mask,
               K, KP, group_shift, stride_qn, stride_sn,
               BITS: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr):
    """``acc`` plus K tile ``t`` of :func:`_dequant_gemv_kernel`. ``TAIL``: the tile may hold
    columns past K (masked: their activations are 0 and their codebook entries are not read,
    since 0 * a NaN entry would be NaN); else every column is real and nothing is masked."""
    COLS: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # columns per unit (1 bit: 32)
    WORDS: tl.constexpr = 3 if BITS == 3 else 1  # words per unit (bit planes: 3 or 1)
    U: tl.constexpr = BLOCK_K // COLS
    offs_u = t * U + tl.arange(0, U)  # unit index along the row
    if TAIL:
        un_mask = (offs_u < KP // COLS)[:, None] & n_mask[None, :]
    else:
        un_mask = tl.broadcast_to(n_mask[None, :], (U, BLOCK_N))
    w_ptrs = q_ptr + rows_n[None, :] * stride_qn + (offs_u * WORDS)[:, None]
    w0 = tl.load(w_ptrs, mask=un_mask, other=0)  # [U, BN]
    if BITS == 3:
        w1 = tl.load(w_ptrs + 1, mask=un_mask, other=0)
        w2 = tl.load(w_ptrs + 2, mask=un_mask, other=0)
    else:
        w1 = w0
        w2 = w0
    part = tl.zeros((BLOCK_M, U, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M, U), dtype=tl.float32)
    for i in tl.static_range(COLS):
        q = _field(w0, w1, w2, i, BITS)
        cols = _pos_col(offs_u * COLS + i, BITS)  # the field's column (format 3: permuted)
        if MODE == 2:
            if TAIL:  # the field's columns against K
                lut_mask = (cols < K)[:, None] & n_mask[None, :]
            else:
                lut_mask = un_mask
            w = tl.load(lut_rows + q, mask=lut_mask, other=0.0).to(tl.float32)
        else:
            w = q.to(tl.float32)
        if TAIL:
            x_mask = m_mask[:, None] & (cols < K)[None, :]
        else:
            x_mask = tl.broadcast_to(m_mask[:, None], (BLOCK_M, U))
        xv = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0).to(tl.float32)  # [BM, U]
        part += xv[:, :, None] * w[None, :, :]
        if MODE != 2:
            xsum += xv
    if MODE == 2:
        acc += tl.sum(part, axis=1)
    else:
        # the tile lies in one group (BLOCK_K <= group_size, or one group per row):
        # sum_k x (q - z) s = s * (sum_k x q) - s z * (sum_k x)
        grp = ((t * BLOCK_K) >> group_shift)
        s_ptrs = rows_n * stride_sn + grp
        s = tl.load(s_ptr + s_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        if MODE == 0:
            zs = tl.load(z_ptr + s_ptrs, mask=n_mask, other=0.0).to(tl.float32) * s
        elif BITS == 1:  # the symmetric 1-bit grid is binary: z = 1/2 (formats.symmetric_zero)
            zs = s * 0.5
        else:
            zs = s * (1 << (BITS - 1))
        acc += tl.sum(part, axis=1) * s[None, :] - tl.sum(xsum, axis=1)[:, None] * zs[None, :]
    return acc


@triton.jit
def _dequant_gemv_kernel(
    # pointers: s_ptr holds the scales (affine) or the codebook; z_ptr the zeros (asymmetric)
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, KP, group_shift, rows_per_group,
    # strides
    stride_xm, stride_qn, stride_sn, stride_ym,
    # meta-parameters
    BITS: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Small-M path: y[M, N] = x[M, K] @ W^T (+ bias), W packed b-bit (affine or codebook).

    Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K). Each program walks its K slice in
    BLOCK_K columns = U packing units (a unit: one word of 32 / b fields, or 32 columns in three
    bit-plane words). Each word is loaded once; its fields are extracted in registers and
    multiplied with the activations of their columns: no dense weight tile, no tensor cores.
    A tile lies inside one scale group (the launcher caps BLOCK_K at the group size), so the
    affine modes accumulate ``sum x q`` and ``sum x`` and apply ``s`` and ``z s`` once per tile.
    The columns past K are masked: activations 0 and, for codebooks, entries not read
    (``0 * a NaN entry`` would be NaN); the codebook tiles that lie before K skip that mask.

    Roofline: 2 M N K FLOPs; minimum bytes N Kp b / 8 + scales/zeros or codebook + M K e +
    M N e. Memory-bound at decode: the goal is HBM bandwidth.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    rows_n = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    if MODE == 2:
        lut_rows = s_ptr + (rows_n // rows_per_group)[None, :] * stride_sn  # [1, BN]
    else:
        lut_rows = s_ptr  # unused

    k_tiles = tl.cdiv(KP, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 2:
        # codebook: the tiles before t_tail lie before K and run unmasked along K (the hot
        # loop); the rest (the ragged end, the padding) do not read the entries of the columns
        # past K. (The affine modes mask every tile: fewer registers than two loop copies.)
        t_tail = max(min(K // BLOCK_K, t_end), t_begin)
        for t in range(t_begin, t_tail):
            acc = _gemv_tile(acc, t, x_rows, q_ptr, s_ptr, z_ptr, lut_rows, rows_n, m_mask,
                             n_mask, K, KP, group_shift, stride_qn, stride_sn, BITS, MODE,
                             BLOCK_M, BLOCK_N, BLOCK_K, False)
    else:
        t_tail = t_begin
    for t in range(t_tail, t_end):
        acc = _gemv_tile(acc, t, x_rows, q_ptr, s_ptr, z_ptr, lut_rows, rows_n, m_mask, n_mask,
                         K, KP, group_shift, stride_qn, stride_sn, BITS, MODE, BLOCK_M, BLOCK_N,
                         BLOCK_K, True)

    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _x_fields(x_row, cols_w, t, BLOCK_K: tl.constexpr, FIELDS: tl.constexpr):
    """The activations of every field of a ``[C, VEC]`` tile of int8 words (4 fields, in
    column order), one ``[C, VEC]`` fp32 tensor per field: the tile's columns loaded once,
    contiguously, and split in registers (``tl.split`` of the ``[..., 2, 2]`` reshape: column
    ``2a + b``), not gathered field by field. (Format 3 permutes the columns of 2- and 4-bit
    fields within each 32-column block: theirs are gathered.)"""
    tl.static_assert(FIELDS == 4, "_x_fields: int8 words only")
    C: tl.constexpr = cols_w.shape[0]
    VEC: tl.constexpr = cols_w.shape[1]
    cols = t * BLOCK_K + cols_w[:, :, None] + tl.arange(0, FIELDS)[None, None, :]
    x = tl.load(x_row + cols).to(tl.float32)  # [C, VEC, F]
    b0, b1 = tl.split(tl.reshape(x, (C, VEC, 2, 2)))
    f0, f2 = tl.split(b0)
    f1, f3 = tl.split(b1)
    return (f0, f1, f2, f3)


@triton.jit
def _magic_tile(acc, x0, w, x_row, cols_w, chunk_cols, chunk_mask, t, s_ptr, z_ptr, s_rows,
                lut_rows, K, group_shift, BITS: tl.constexpr, MODE: tl.constexpr,
                BLOCK_K: tl.constexpr, ONE_GROUP: tl.constexpr, MASKED: tl.constexpr,
                ASM: tl.constexpr):
    """K tile ``t`` of :func:`_fields_gemv_kernel`: ``acc[BN, C]`` plus this tile's
    ``s (sum_k x q - z sum_k x)`` per (row, chunk of VEC words); with ``ONE_GROUP`` the scale
    is applied after the loop and ``acc`` gathers ``sum_k x q`` only. Codebooks (MODE 2):
    ``sum_k x codebook[q]``, the entries of columns past K not read (``0 * NaN`` is NaN)."""
    FIELDS: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    P: tl.constexpr = 23 // BITS  # fields per placement that fit in a float's mantissa
    # int8: the tile's activations loaded once and split (Triton 3.6: 1.5 -> 1.8x predicted
    # for int4 in format 2); format 3 permutes the columns of 2- and 4-bit fields within each
    # 32-column block, so a word's fields are not consecutive columns: gathered per field
    SPLIT_X: tl.constexpr = not MASKED and FIELDS == 4
    if SPLIT_X:
        xf = _x_fields(x_row, cols_w, t, BLOCK_K, FIELDS)
    # format 2 interleaves 2- and 4-bit fields (1-bit fields lie in column order)
    ILV: tl.constexpr = 1 if BITS == 2 or BITS == 4 else 0
    for i in tl.static_range(FIELDS):
        # field i's column in its word: (2i) % F + 2i // F (interleaved), else i; then the
        # block permutation of format 3 (_pos_col)
        cols = _pos_col(t * BLOCK_K + cols_w + (ILV * ((2 * i) % FIELDS + (2 * i) // FIELDS)
                                                + (1 - ILV) * i), BITS)  # [C, VEC]
        if SPLIT_X:
            xi = xf[ILV * ((2 * i) % FIELDS + (2 * i) // FIELDS) + (1 - ILV) * i]
        elif MASKED:
            xi = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        else:
            xi = tl.load(x_row + cols).to(tl.float32)
        if i == 0:
            xs = xi
        else:
            xs += xi
        if MODE == 2:  # a table lookup (L1-resident: 2**b entries per row group)
            idx = (w >> (i * BITS)) & MASK
            if MASKED:
                qf = tl.load(lut_rows + idx, mask=(cols < K)[None, :, :], other=0.0)
            else:
                qf = tl.load(lut_rows + idx)
            qf = qf.to(tl.float32)
        else:
            if i % P == 0:  # the next placement: these fields' bits at 0 .. 23 of a word
                if i == 0:
                    ws = w
                else:
                    ws = w >> (i * BITS)
            # the field, with its bits in place, in the mantissa of 2**23: 2**23 + q 2**pos,
            # exactly; minus 2**23: q * 2**pos; times x * 2**-pos: x * q, exactly
            f = _and_or(ws, MASK << ((i % P) * BITS), 0x4B000000, ASM)
            qf = f.to(tl.float32, bitcast=True) - 8388608.0
            if i % P != 0:
                xi = xi * (1.0 / (1 << ((i % P) * BITS)))
        if i == 0:
            part = qf * xi[None, :, :]
        else:
            part += qf * xi[None, :, :]
    xq = tl.sum(part, axis=2)  # [BN, C]: sum_k x q over each chunk
    if MODE == 2:
        return acc + xq, x0
    xc = tl.sum(xs, axis=1)  # [C]: sum_k x over each chunk
    if ONE_GROUP:
        return acc + xq, x0 + xc
    # one scale group per chunk of VEC words (the launcher keeps a chunk inside a group)
    grp = (t * BLOCK_K + chunk_cols) >> group_shift  # [C]
    s_off = s_rows + grp[None, :]
    if MASKED:
        s = tl.load(s_ptr + s_off, mask=chunk_mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(s_ptr + s_off).to(tl.float32)
    if MODE == 0:
        if MASKED:
            z = tl.load(z_ptr + s_off, mask=chunk_mask, other=0.0).to(tl.float32)
        else:
            z = tl.load(z_ptr + s_off).to(tl.float32)
    else:  # the symmetric zero (1 bit: 1/2)
        z = 0.5 if BITS == 1 else 1 << (BITS - 1)
    return acc + s * (xq - z * xc[None, :]), x0


@triton.jit
def _fields_gemv_kernel(
    # pointers: s_ptr holds the scales (affine) or the codebook; z_ptr the zeros (asymmetric)
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K, KP, group_shift, rows_per_group,
    stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr = False,
):
    """Small-M path for contiguous b-bit fields (b = 1, 2, 4, 8; affine or codebook): one row of x
    per program.

    Grid: (cdiv(N, BLOCK_N), M, SPLIT_K). A K tile is ``[BLOCK_N, C, VEC]`` packed words (each
    thread loads VEC consecutive words of a row: 16-byte loads), read from global memory once.
    Each field becomes a float in registers with no layout change and no int-to-float
    instruction: ``(word & field mask) | 0x4B000000`` is ``2**23 + q * 2**pos`` exactly (the
    field in place in the mantissa of 2**23; the word is shifted once per 23 // b fields), one
    subtraction gives ``q * 2**pos``, and it multiplies ``x * 2**-pos`` (``x`` is scaled once
    per column, shared by the thread's rows). Per weight: one LOP3, one FADD, one FFMA. The
    affine terms go once per chunk: ``s (sum x q - z sum x)``; with one group per row
    (``ONE_GROUP``) once per row, after the loop. The tiles that lie inside K run unmasked;
    the ragged last one is masked. Rows past N are clamped (their results are not stored).
    Codebooks (MODE 2) look each field up in its row group's table instead (L1-resident).

    Roofline: 2 M N K FLOPs; bytes N Kp b / 8 + scales (+ zeros) + M K e + M N e. Memory-bound:
    BLOCK_K sets the bytes each program has in flight (``BLOCK_N * BLOCK_K * b / 8``).
    """
    FIELDS: tl.constexpr = 32 // BITS
    W: tl.constexpr = BLOCK_K // FIELDS  # words per row per tile
    C: tl.constexpr = W // VEC
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: loads stay unmasked
    wcol = tl.arange(0, C)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [C, VEC] words
    cols_w = wcol * FIELDS  # [C, VEC]: first column of each word in the tile
    q_ptrs = q_ptr + rows[:, None, None] * stride_qn + wcol[None, :, :]
    s_rows = rows[:, None] * stride_sn  # [BN, 1]
    if MODE == 2:
        lut_rows = s_ptr + (rows // rows_per_group)[:, None, None] * stride_sn  # [BN, 1, 1]
    else:
        lut_rows = s_ptr  # unused
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm

    k_tiles = tl.cdiv(KP, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)
    t_full = max(min(K // BLOCK_K, t_end), t_begin)  # tiles with every column before K

    acc = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    x0 = tl.zeros((C,), dtype=tl.float32)
    chunk_cols = tl.arange(0, C) * (VEC * FIELDS)  # [C]: first column of each chunk
    for t in range(t_begin, t_full):
        w = tl.load(q_ptrs + t * W)
        acc, x0 = _magic_tile(acc, x0, w, x_row, cols_w, chunk_cols, None, t, s_ptr, z_ptr,
                              s_rows, lut_rows, K, group_shift, BITS, MODE, BLOCK_K, ONE_GROUP,
                              False, ASM)
    if t_full < t_end:  # the ragged last tile (columns past K, words past KP)
        t = t_full
        word_mask = (t * W + wcol[None, :, :]) < KP // FIELDS
        chunk_mask = ((t * BLOCK_K + chunk_cols) < KP)[None, :]
        w = tl.load(q_ptrs + t * W, mask=word_mask, other=0)
        acc, x0 = _magic_tile(acc, x0, w, x_row, cols_w, chunk_cols, chunk_mask, t, s_ptr,
                              z_ptr, s_rows, lut_rows, K, group_shift, BITS, MODE, BLOCK_K,
                              ONE_GROUP, True, ASM)
    y = tl.sum(acc, axis=1)  # [BN]
    if ONE_GROUP and MODE != 2:  # y = s (sum x q - z sum x): the row's one scale and zero
        s = tl.load(s_ptr + rows * stride_sn).to(tl.float32)
        if MODE == 0:
            z = tl.load(z_ptr + rows * stride_sn).to(tl.float32)
        else:
            z = 0.5 if BITS == 1 else 1 << (BITS - 1)
        y = s * (y - z * tl.sum(x0, axis=0))
    offs_m = pid_m + tl.arange(0, 1)
    store_tile(y[None, :], bias_ptr, y_ptr, offs_m, offs_n, offs_m < M, n_mask, stride_ym, pid_k,
               HAS_BIAS, SPLIT_K)


@triton.jit
def _mm(a, w, acc, SWAP: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ w^T`` (``[BLOCK_M, BLOCK_N]``; ``acc`` None: a fresh product), or with ``SWAP``
    the transposed product ``acc + w @ a^T`` (``[BLOCK_N, BLOCK_M]``): the weight tile is the
    dot's first operand, which a wgmma reads from registers (no shared-memory round trip)."""
    if SWAP:
        out = tl.dot(w, tl.trans(a), acc, input_precision=PREC)
    else:
        out = tl.dot(a, tl.trans(w), acc, input_precision=PREC)
    return out


@triton.jit
def _per_n(v, SWAP: tl.constexpr):
    """A per-output-column vector ``[BLOCK_N]`` broadcastable against the accumulator."""
    if SWAP:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _per_m(v, SWAP: tl.constexpr):
    """A per-row vector ``[BLOCK_M]`` broadcastable against the accumulator."""
    if SWAP:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _offset_terms(xsb, z, SWAP: tl.constexpr, BYTE_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """``sum_k x (offset_k + z)`` of every output, from the all-ones dot's ``xsb``. Plain: every
    output holds ``sum_k x`` and ``z`` includes the (constant) offset. ``BYTE_SHIFT`` (with
    ``SWAP``, ``xsb`` is ``[BLOCK_N, BLOCK_M]``): the offsets differ by column, so the second
    operand's rows ``n % 16 < 8`` are the offsets and give ``T = sum_k offset_k x``, rows
    ``n % 16 >= 8`` are ones and give ``S = sum_k x``; output row ``n`` takes ``T + z_n S`` from
    its own 16-row block (a wgmma thread holds rows ``n`` and ``n + 8``)."""
    if BYTE_SHIFT:
        x4 = tl.permute(tl.reshape(xsb, (BLOCK_N // 16, 2, 8, BLOCK_M)), (0, 2, 3, 1))
        t_sum, s_sum = tl.split(x4)  # [BN / 16, 8, BM]
        z_lo, z_hi = tl.split(tl.permute(tl.reshape(z, (BLOCK_N // 16, 2, 8)), (0, 2, 1)))
        lo = t_sum + z_lo[:, :, None] * s_sum
        hi = t_sum + z_hi[:, :, None] * s_sum
        out = tl.reshape(tl.permute(tl.join(lo, hi), (0, 3, 1, 2)), (BLOCK_N, BLOCK_M))
    else:
        out = xsb * _per_n(z, SWAP)
    return out


@triton.jit
def _field_shifts(BITS: tl.constexpr):
    """The bit offset in its word of each of a word's ``32 / b`` fields, in column order:
    format 2's 2- and 4-bit words hold pairs of adjacent columns, column ``c`` at bit
    ``(c // 2 + (c % 2) F / 2) b`` (``F = 32 / b``); 8-bit fields lie in column order."""
    FIELDS: tl.constexpr = 32 // BITS
    c = tl.arange(0, FIELDS)
    if BITS == 2 or BITS == 4:
        out = (c // 2 + (c % 2) * (FIELDS // 2)) * BITS
    else:
        out = c * BITS
    return out


@triton.jit
def _k_order(h, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
             BYTE_SHIFT: tl.constexpr = False):
    """A ``[BLOCK_N, BLOCK_K]`` tile of fields (``h``: ``[BLOCK_N, words, ...]`` in version 2's
    order: pair ``q`` of a word in its columns ``2q, 2q + 1``) in K order. Format 3 permutes
    every 32-column block of 2- and 4-bit fields
    (:func:`~compress_ops.kernels.formats.dequant.block_columns`): the block's pair slot
    ``s = 4 t + 2 j + c`` (half ``e``) holds column ``16 j + 8 c + 2 t + e``, a reshape and a
    permute here, which move no data where the dot's operand layout matches (each int4 word
    is one thread's share of its block)."""
    if BITS == 8:
        out = tl.reshape(h, (BLOCK_N, BLOCK_K))
    elif BITS == 1 and BYTE_SHIFT:  # pairs of adjacent columns (:func:`_unpack_words`)
        out = tl.reshape(h, (BLOCK_N, BLOCK_K))
    elif BITS == 1:  # pair p, half e: column p + 16 e of its word (:func:`_unpack_words`)
        h = tl.reshape(h, (BLOCK_N, BLOCK_K // 32, 16, 2))
        out = tl.reshape(tl.permute(h, (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
    else:
        h = tl.reshape(h, (BLOCK_N, BLOCK_K // 32, 4, 2, 2, 2))
        out = tl.reshape(tl.permute(h, (0, 1, 3, 4, 2, 5)), (BLOCK_N, BLOCK_K))
    return out


@triton.jit
def _pos_col(pos, BITS: tl.constexpr):
    """The column held at position ``pos`` of a packed row in version 2's order (word ``u``,
    field column ``c``: ``u * 32 / b + c``) under format 3 (:func:`_k_order`)."""
    if BITS == 2 or BITS == 4:
        r = pos & 31
        slot = r >> 1
        out = ((pos - r) + 16 * ((slot >> 1) & 1) + 8 * (slot & 1) + 2 * (slot >> 2)
               + (r & 1))
    else:
        out = pos
    return out


@triton.jit
def _col_pos(col, BITS: tl.constexpr):
    """The inverse of :func:`_pos_col`: the position (version 2's order) holding column
    ``col``."""
    if BITS == 2 or BITS == 4:
        r = col & 31
        out = (col - r) + 2 * (4 * ((r >> 1) & 3) + 2 * (r >> 4) + ((r >> 3) & 1)) + (r & 1)
    else:
        out = col
    return out


@triton.jit
def _fields_matmul_kernel(
    # pointers: s_ptr holds the scales (affine) or the codebook; z_ptr the zeros (asymmetric)
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K, KP, group_shift, rows_per_group,
    stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HALF_MAGIC: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
    DEQUANT_W: tl.constexpr = False,
    ASM: tl.constexpr = False,
    EVEN_K: tl.constexpr = False,
    FEW_ROWS: tl.constexpr = False,
    ONE_GROUP: tl.constexpr = False,
    LUT_PRMT: tl.constexpr = False,
    ONES_DOT: tl.constexpr = False,
    SWAP_AB: tl.constexpr = False,
    BYTE_SHIFT: tl.constexpr = False,
):
    """Tiled GEMM for contiguous b-bit fields (b = 1, 2, 4, 8; affine or codebook):
    y = x @ W^T (+ bias). Codebooks (MODE 2) look each field up in its row group's table and
    feed ``tl.dot`` directly: 4-bit fields with two-byte entries (``LUT_PRMT``) in registers
    (each row's 16 entries loaded once as eight registers of bytes, :func:`_lut_word`: 20
    PRMT per word), other codebooks from the L1-resident table (the entries of columns past
    K are not read; nor used with ``LUT_PRMT``). One scale group per row (``ONE_GROUP``,
    affine): the dot accumulates every K tile unscaled and the scale is applied once after
    the loop.

    Grid and program order as :func:`_dequant_matmul_kernel`. Each K step loads the
    ``[BLOCK_N, BLOCK_K * b / 32]`` packed words once (16-byte loads along K), expands every
    word into its fields in registers (``[BLOCK_N, W, 32 / b]``, put in K order by a reshape
    and a permute: :func:`_unpack_words`, :func:`_k_order`), two fields per
    register as the fp16 ``1024 + q`` (bf16 ``128 + q``; fp32 x: ``q`` by the 2**23 mantissa
    trick) made by one shift and one LOP3 (fp16 int8: one PRMT), and feeds ``tl.dot``. A K
    tile lies in one scale group (the launcher caps BLOCK_K at the group size; its group is
    ``column >> group_shift``).

    ``SWAP_AB`` (fp16/bf16 x, affine 2- and 4-bit fields, tiles of up to 32 rows): the dot
    computes the transposed tile ``W x^T`` with the unpacked weights as its first operand.
    On sm_90 that is a wgmma whose first operand is read from registers: with format 3's
    column order (:func:`_k_order`) each thread's unpacked words are exactly its fragment, so
    the fields go from the LOP3 that makes them into the wgmma (no shared-memory round trip,
    and Triton 3.6's halved kWidth does not arise: wgmma operands do not take it). x^T is the
    second operand, read from the shared memory its cp.async filled; the all-ones operand is
    a masked-off load made once (a wgmma then reads it from shared memory; a constant would be
    rebuilt in registers every K step). The accumulator is transposed once before the store.
    int2 words (``HALF_WORDS``) are shared by two threads of format 3's fragment: their byte
    halves become a dimension of their own (a shift by 0 or 8, not a join), so each thread
    takes its half. ``BYTE_SHIFT`` (fp16): words are shifted by whole bytes only and each
    pair's offset ``1024 / 2**r`` differs by column (:func:`_pair`); the ones operand's rows
    ``n % 16 < 8`` then carry the columns' offsets (:func:`_offset_terms`).

    Two ways to apply the affine terms (both exact up to the activation dtype's rounding):

    * small tiles (``DEQUANT_W`` off; BLOCK_M <= 32): each K tile's partial product is scaled
      per output element. fp16 and bf16 x (``ONES_DOT``): the dot sees ``offset + q`` as
      unpacked (exact), a second dot with an all-ones operand gives ``sum_k x`` in every
      output column (in the accumulator's layout), and the step adds
      ``s (part - (offset + z) sum_k x)`` (two FFMA per output; the products are exact and the
      fp32 sums cancel the offset); fp32 x (and bf16 int8): the dot sees ``q`` and the step
      adds ``s (sum x q) - z s sum x`` (the row sums of x, every warp over the whole tile);
    * large tiles (``DEQUANT_W``): every weight is dequantized once per CTA in the activation
      dtype, ``w = ((offset + q) - offset - z) s`` (the subtractions are exact; one rounding,
      as a dense weight's), and accumulated by the dot itself: no per-tile epilogue.

    Roofline: 2 M N K FLOPs on the tensor cores; bytes N Kp b / 8 + scales (+ zeros) +
    M K e + M N e.
    """
    FIELDS: tl.constexpr = 32 // BITS
    W: tl.constexpr = BLOCK_K // FIELDS
    MASK: tl.constexpr = (1 << BITS) - 1
    # the symmetric grid's constant zero (1 bit: 1/2, not an integer: never folded into the
    # exact fp16 offset, which 1024.5 is not)
    ZSYM: tl.constexpr = 0.5 if BITS == 1 else 1 << (BITS - 1)
    # symmetric 1-bit fp16 small tiles (BYTE_SHIFT): every row of the all-ones operand holds
    # each column's offset plus the zero, 1024 / 2**r + 1/2 (exact), so its dot is the whole
    # offset term: the step adds s (part - xsb)
    OFF_ONES: tl.constexpr = ONES_DOT and BYTE_SHIFT and BITS == 1
    if OFF_ONES:
        tl.static_assert(MODE == 1, "1-bit BYTE_SHIFT: the symmetric grid only")
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows32 = tl.minimum(offs_n, N - 1)  # clamped: rows past N are not stored
    rows = rows32.to(tl.int64)
    if EVEN_K and not FEW_ROWS:  # x's rows clamped as W's (rows past M are not stored):
        # unmasked loads
        x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    else:
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    offs_w = tl.arange(0, W)
    q_ptrs = q_ptr + rows[:, None] * stride_qn + offs_w[None, :]  # [BN, W]
    # the bit offset of each column of a word (format 2: 2- and 4-bit fields interleaved)
    wcols = tl.arange(0, FIELDS)
    shifts = _field_shifts(BITS)
    if MODE == 2:
        lut_rows = s_ptr + (rows // rows_per_group)[:, None, None] * stride_sn  # [BN, 1, 1]
        if LUT_PRMT:  # each row's 16 entries in 8 registers, looked up by PRMT in the loop
            lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _lut_registers(s_ptr, rows, rows_per_group,
                                                                    stride_sn, BLOCK_N)
            c3210 = 0x3210 | (K >> 31)  # a register (see mg below)

    k_tiles = tl.cdiv(KP, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)

    ACC_SHAPE: tl.constexpr = (BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N)
    acc = tl.zeros(ACC_SHAPE, dtype=tl.float32)
    # int8 fp16's PRMT exponent bytes, as a value ptxas cannot fold (K >= 0): one register for
    # every PRMT, whose selector then is the immediate (two immediates: ptxas re-materialized
    # the selector into a fresh register before each PRMT)
    mg = 0x64646464 | (K >> 31)
    # one scale group per row (ONE_GROUP, affine): the row's zero loaded once, the dot
    # accumulates every K tile unscaled, the scale is loaded and applied once after the loop
    SCALE_AFTER: tl.constexpr = ONE_GROUP and MODE != 2
    if SCALE_AFTER:
        if MODE == 0:
            z_one = tl.load(z_ptr + rows * stride_sn)
        xs_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if ONES_DOT:
            xsb_all = tl.zeros(ACC_SHAPE, dtype=tl.float32)
            # the offset goes with the zero, or (BYTE_SHIFT) into the second dot's operand
            off_one = 0.0 if BYTE_SHIFT else 1024.0 if HALF_MAGIC == 1 else 128.0
            if MODE == 0:
                zo_one = z_one.to(tl.float32) + off_one
            else:
                zo_one = tl.zeros((BLOCK_N,), dtype=tl.float32) + (off_one + ZSYM)
    if ONES_DOT:
        # the all-ones operand, made once: with SWAP_AB a masked-off load (K >> 31 is 0 at run
        # time, unknown to the compiler), which the wgmma then reads from shared memory; a
        # constant would be rebuilt in its registers before every K step
        ones_idx = tl.arange(0, BLOCK_N)[:, None] * 0 + tl.arange(0, BLOCK_K)[None, :]
        if OFF_ONES:  # every row: each column's offset plus the zero
            col_off = _pair_offset(tl.arange(0, BLOCK_K), BITS, True) + ZSYM
            ones_val = tl.broadcast_to(col_off[None, :], (BLOCK_N, BLOCK_K)).to(
                x_ptr.dtype.element_ty)
        elif BYTE_SHIFT:  # rows n % 16 < 8: each column's offset; rows n % 16 >= 8: ones
            col_off = _pair_offset(tl.arange(0, BLOCK_K), BITS, True)
            lo_rows = (tl.arange(0, BLOCK_N) % 16) < 8
            ones_val = tl.where(lo_rows[:, None], col_off[None, :], 1.0).to(
                x_ptr.dtype.element_ty)
        else:
            ones_val = tl.full((BLOCK_N, BLOCK_K), 1.0, x_ptr.dtype.element_ty)
        if (SWAP_AB or OFF_ONES) and not UPCAST_DOT:  # (OFF_ONES: the columns' offsets, a
            # constant tile rebuilt through shared memory in every K step otherwise)
            ones_w = tl.load(x_ptr + ones_idx, mask=ones_idx < (K >> 31), other=ones_val)
        else:
            ones_w = ones_val
        if UPCAST_DOT:
            ones_w = ones_w.to(tl.float32)
    if not SCALE_AFTER and MODE != 2:  # each row's scale and zero pointers, made once: one
        # IMAD.WIDE per address in the loop (int32 offsets: fewer than 2**31 scales)
        s_row_ptrs = s_ptr + rows32 * stride_sn
        z_row_ptrs = z_ptr + rows32 * stride_sn
        # the shift in a register (ptxas re-loaded the argument in every K step)
        group_shift = group_shift | (K >> 31)
    for t in range(t_begin, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:  # every tile inside K = KP: nothing to mask
            if FEW_ROWS:  # M < BLOCK_M: clamped rows would copy row M - 1 over and over
                # (at M = 1 as many bytes of x per K step as of int4 words); a loop-invariant
                # row mask copies each real row once
                a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            else:
                a = tl.load(x_rows + offs_k[None, :])
            words = tl.load(q_ptrs + t * W)
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                        other=0.0)
            words = tl.load(q_ptrs + t * W, mask=((t * W + offs_w) < KP // FIELDS)[None, :],
                            other=0)
        if MODE == 2 and LUT_PRMT:
            h = _lut_tile(words, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, c3210, a.dtype, ASM,
                          BLOCK_N, BLOCK_K, BITS)
            if not EVEN_K:  # the entries of columns past K are not used (x is 0 there, an
                # infinite entry would make NaN)
                h = tl.where((t * BLOCK_K + tl.arange(0, BLOCK_K) < K)[None, :], h, 0.0)
        elif MODE == 2:
            fields = (words[:, :, None] >> shifts[None, None, :]) & MASK
            if EVEN_K:
                h = tl.load(lut_rows + fields)
            else:
                cols = _pos_col(t * BLOCK_K + offs_w[None, :, None] * FIELDS
                                + wcols[None, None, :], BITS)
                h = tl.load(lut_rows + fields, mask=cols < K, other=0.0)
            h = _k_order(h, BLOCK_N, BLOCK_K, BITS)
        xdt = a.dtype
        if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
            a = a.to(tl.float32)
            PREC: tl.constexpr = "ieee"
        else:
            PREC: tl.constexpr = DOT_PRECISION
        if MODE == 2:
            if UPCAST_DOT:
                hd = h.to(tl.float32)
            elif SWAP_AB:  # the first operand of a wgmma: in registers, as unpacked
                hd = h.to(a.dtype)
            else:
                hd = _kwidth_barrier(h.to(a.dtype), ASM)
            acc = _mm(a, hd, acc, SWAP_AB, PREC)
        else:
            # fp16 1024 + q (exact), bf16 128 + q (exact for q < 128), or fp32 q (cast below)
            offset = 1024.0 if HALF_MAGIC == 1 else 128.0 if HALF_MAGIC == 2 else 0.0
            s_off = (t * BLOCK_K) >> group_shift  # the group (SCALE_AFTER: unused)
            PACKED_DQ: tl.constexpr = DEQUANT_W and HALF_MAGIC == 1 and ASM
            # (the large tiles' byte shifts: not with one group per row, whose q - z folds
            # the symmetric zero into the one offset; 1 bit: there the byte shifts make the
            # fold of its zero 1/2 exact)
            BS: tl.constexpr = BYTE_SHIFT and not (DEQUANT_W and SCALE_AFTER and BITS != 1)
            if not PACKED_DQ:
                h = _k_order(_unpack_words(words, BITS, HALF_MAGIC, ASM, mg=mg, BYTE_SHIFT=BS,
                                           HALF_WORDS=SWAP_AB and BITS == 2, kz=K >> 31,
                                           EXP_REG=BS and ASM and BITS == 2),
                             BLOCK_N, BLOCK_K, BITS, BS)
            if ONES_DOT:
                # the dot sees offset + q as unpacked; a second dot with an all-ones operand
                # gives sum_k x in every column (in the accumulator's layout): the step adds
                # s (part - (offset + z) sum_k x)
                ones = ones_w
                # the offset goes with the zero, or (BYTE_SHIFT) into the ones operand
                off_z = 0.0 if BYTE_SHIFT else offset
                if MODE == 0:
                    if SCALE_AFTER:
                        zo = z_one.to(tl.float32) + off_z
                    elif BYTE_SHIFT:  # (no offset: adding 0.0 is not folded)
                        zo = tl.load(z_row_ptrs + s_off).to(tl.float32)
                    else:
                        zo = tl.load(z_row_ptrs + s_off).to(tl.float32) + off_z
                else:
                    zo = tl.zeros((BLOCK_N,), dtype=tl.float32) + (off_z + ZSYM)
                if UPCAST_DOT:
                    hd = h.to(tl.float32)
                elif SWAP_AB:
                    hd = h
                else:
                    hd = _kwidth_barrier(h, ASM)
                if SCALE_AFTER:
                    acc = _mm(a, hd, acc, SWAP_AB, PREC)
                    xsb_all = _mm(a, ones, xsb_all, SWAP_AB, PREC)
                else:
                    part = _mm(a, hd, None, SWAP_AB, PREC)
                    xsb = _mm(a, ones, None, SWAP_AB, PREC)
                    sc = tl.load(s_row_ptrs + s_off).to(tl.float32)
                    if OFF_ONES:
                        acc += (part - xsb) * _per_n(sc, SWAP_AB)
                    else:
                        acc += ((part - _offset_terms(xsb, zo, SWAP_AB, BYTE_SHIFT, BLOCK_N,
                                                      BLOCK_M)) * _per_n(sc, SWAP_AB))
            elif PACKED_DQ:
                # fp16 on a GPU: each register's pair of fields dequantized in packed fp16:
                # (v - offset) s - z s by one subtraction and one fma (DQ 3), or with one
                # group per row (SCALE_AFTER) q - z only (DQ 2), the scale after the loop
                # (the symmetric 1-bit zero, 1/2, as a stored zero: z2 = 1/2, or -s / 2)
                ZREG: tl.constexpr = MODE == 0 or BITS == 1
                if SCALE_AFTER:
                    s2 = 0
                    if MODE == 0:
                        z2 = _half_pair(z_one)[:, None]
                        SYM_Z: tl.constexpr = 0
                    elif BITS == 1 and BYTE_SHIFT:  # 1/2 folded into each pair's offset
                        z2 = 0
                        SYM_Z: tl.constexpr = 1
                    elif BITS == 1:
                        z2 = _half_pair(tl.full((BLOCK_N,), 0.5, tl.float16))[:, None]
                        SYM_Z: tl.constexpr = 0
                    else:
                        z2 = 0
                        SYM_Z: tl.constexpr = 1 << (BITS - 1)
                else:
                    sh = tl.load(s_row_ptrs + s_off)
                    s2 = _half_pair(sh)[:, None]
                    if ZREG:  # z2 = -z s: the fma's addend (1 bit, symmetric: -s / 2, exact)
                        if MODE == 0:
                            zf = tl.load(z_row_ptrs + s_off).to(tl.float32)
                        else:
                            zf = 0.5
                        z2 = _half_pair((-(zf * sh.to(tl.float32))).to(tl.float16))[:, None]
                        SYM_Z: tl.constexpr = 0
                    else:  # the constant zero folded into the subtracted offset (exact)
                        z2 = 0
                        SYM_Z: tl.constexpr = 1 << (BITS - 1)
                DQM: tl.constexpr = 2 if SCALE_AFTER else 3 if ZREG else 1
                BSP: tl.constexpr = BYTE_SHIFT and (not SCALE_AFTER or BITS == 1)
                w = _k_order(_unpack_words(words, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQM, mg,
                                           BYTE_SHIFT=BSP, HALF_WORDS=SWAP_AB and BITS == 2),
                             BLOCK_N, BLOCK_K, BITS, BSP)
                acc = _mm(a, w, acc, SWAP_AB, PREC)
            elif DEQUANT_W:  # w = (q - z) s per weight, once per CTA; the dot accumulates
                if UPCAST_DOT:  # the interpreter's bf16 arithmetic on bitcast values is wrong
                    h = h.to(tl.float32)
                # q, exactly, in h's dtype (fp16, bf16 or fp32; a literal keeps the dtype)
                if HALF_MAGIC == 1 and BS:  # each column's offset (powers of two: exact)
                    hq = h - _pair_offset(tl.arange(0, BLOCK_K), BITS, True).to(h.dtype)[None, :]
                elif HALF_MAGIC == 1:
                    hq = h - 1024.0
                elif HALF_MAGIC == 2:
                    hq = h - 128.0
                else:
                    hq = h
                if MODE == 0:
                    if SCALE_AFTER:
                        zz = z_one.to(hq.dtype)
                    else:
                        zz = tl.load(z_row_ptrs + s_off).to(hq.dtype)
                    w = hq - zz[:, None]
                else:
                    w = hq - ZSYM
                if not SCALE_AFTER:  # (q - z) s, one rounding
                    w = w * tl.load(s_row_ptrs + s_off).to(hq.dtype)[:, None]
                acc = _mm(a, w.to(xdt).to(a.dtype), acc, SWAP_AB, PREC)
            else:
                part = _mm(a, h.to(a.dtype), None, SWAP_AB, PREC)
                # this tile lies in one scale group: sum_k x (q - z) s
                #   = s * (sum_k x (offset + q)) - (offset + z) s * sum_k x
                xs = tl.sum(a.to(tl.float32), axis=1)  # [BM]
                if SCALE_AFTER:  # the sums only; the terms after the loop
                    acc += part
                    xs_all += xs
                else:
                    sc = tl.load(s_row_ptrs + s_off).to(tl.float32)
                    # two FMA per output element (one expression took an FMUL, an FFMA and a
                    # FADD)
                    acc += part * _per_n(sc, SWAP_AB)
                    if MODE == 0:
                        zs = (tl.load(z_row_ptrs + s_off).to(tl.float32) + offset) * sc
                        acc -= _per_m(xs, SWAP_AB) * _per_n(zs, SWAP_AB)
                    else:  # a constant zero: (offset + z) sum_k x per row, times s per column
                        acc -= (_per_m(xs * (offset + ZSYM), SWAP_AB)
                                * _per_n(sc, SWAP_AB))

    if SCALE_AFTER:
        s_one = _per_n(tl.load(s_ptr + rows * stride_sn).to(tl.float32), SWAP_AB)
        if OFF_ONES:  # the dots summed x (offset + q) and x (offset + z)
            acc = (acc - xsb_all) * s_one
        elif ONES_DOT:  # the dots summed x (offset + q) and x
            acc = (acc - _offset_terms(xsb_all, zo_one, SWAP_AB, BYTE_SHIFT, BLOCK_N,
                                       BLOCK_M)) * s_one
        elif DEQUANT_W or HALF_MAGIC > 0:  # the dot summed x (q - z)
            acc = acc * s_one
        else:  # the dot summed x q (fp32 q: no offset); minus z sum_k x
            if MODE == 0:
                zo = z_one.to(tl.float32)
            else:
                zo = tl.zeros((BLOCK_N,), dtype=tl.float32) + ZSYM
            acc = (acc - _per_m(xs_all, SWAP_AB) * _per_n(zo, SWAP_AB)) * s_one
    if SWAP_AB:
        acc = tl.trans(acc)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _dequant_weight_kernel(
    # pointers: s_ptr holds the scales (affine) or the codebook; z_ptr the zeros (asymmetric)
    q_ptr, s_ptr, z_ptr, w_ptr,
    N, K, KP, group_shift, rows_per_group, row0,
    stride_qn, stride_sn, stride_wn,
    BITS: tl.constexpr,
    MODE: tl.constexpr,
    HALF_MAGIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ASM: tl.constexpr = False,
    LUT_PRMT: tl.constexpr = False,
    SPLIT_K: tl.constexpr = 1,
    TILES: tl.constexpr = 1,
    EVEN_K: tl.constexpr = False,
    BYTE_SHIFT: tl.constexpr = False,
):
    """The dense weight of packed rows ``row0 .. row0 + N`` in the activation dtype: the
    affine ``w[n, k] = (q - z) s`` or the codebook entry (as ``codebook_weight``); columns
    ``K .. KP`` (padding) are not written. Each program takes ``BLOCK_N`` rows and ``TILES``
    ``[BLOCK_N, BLOCK_K]`` tiles along K, each inside one scale group: the row pointers (and
    a 4-bit codebook's registers) made once, then per tile the words loaded once (16-byte
    loads along K), unpacked in registers as the fields GEMM does (:func:`_unpack_words`,
    :func:`_k_order`; 4-bit codebooks with two-byte entries looked up in registers,
    ``LUT_PRMT``: :func:`_lut_tile`) and stored along K.

    The affine arithmetic is the fields GEMM's for the weights it dequantizes (its large
    tiles): with fp16 activations on a GPU (``HALF_MAGIC == 1`` and ``ASM``) in packed fp16,
    two fields per instruction (:func:`_dequant_halves`): symmetric grids ``(q - z) s`` with
    the constant zero folded into the exact offset, one rounding (bit-exact with
    :func:`~compress_ops.kernels.formats.dequant.dequantize`, whose fp32 product of an
    11-bit scale and a 9-bit integer is exact before it is rounded to fp16); asymmetric grids
    ``q s + (-z s)`` by one fma with ``z s`` rounded to fp16 once per group and row (two
    roundings; the fused GEMM's large tiles compute the same). Elsewhere (bf16, fp32, the
    interpreter) ``(q - z) s`` in fp32, rounded once: bit-exact with ``dequantize``. The
    large-M route (:func:`_launch`) feeds the weight to cuBLAS: a memory-bound pass (``N KP b
    / 8`` bytes read, ``N K e`` written) once per call instead of once per row tile of the
    fused GEMM."""
    FIELDS: tl.constexpr = 32 // BITS
    W: tl.constexpr = BLOCK_K // FIELDS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows32 = row0 + tl.minimum(offs_n, N - 1)  # clamped: rows past N are not stored
    rows = rows32.to(tl.int64)
    offs_w = tl.arange(0, W)
    q_rows = q_ptr + rows[:, None] * stride_qn + offs_w[None, :]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    PACKED: tl.constexpr = HALF_MAGIC == 1 and ASM and MODE != 2
    if MODE == 2 and LUT_PRMT:  # 4-bit fields, two-byte entries: looked up in registers
        lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _lut_registers(s_ptr, rows, rows_per_group,
                                                                stride_sn, BLOCK_N)
        c3210 = 0x3210 | (K >> 31)
    elif MODE == 2:
        lut_rows = s_ptr + (rows // rows_per_group)[:, None, None] * stride_sn
    else:  # each row's scale and zero pointers (int32 offsets: fewer than 2**31 scales)
        s_rows = s_ptr + rows32 * stride_sn
        z_rows = z_ptr + rows32 * stride_sn
        group_shift = group_shift | (K >> 31)  # a register, not the argument re-loaded
        mg = 0x64646464 | (K >> 31)  # as in the fields GEMM: a register, not an immediate
    k_tiles = tl.cdiv(KP, BLOCK_K)
    t_begin = pid_k * TILES
    t_end = min(t_begin + TILES, k_tiles)
    for t in range(t_begin, t_end):
        if EVEN_K:
            words = tl.load(q_rows + t * W)
        else:
            words = tl.load(q_rows + t * W, mask=((t * W + offs_w) < KP // FIELDS)[None, :],
                            other=0)
        if MODE == 2 and LUT_PRMT:
            w = _lut_tile(words, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, c3210,
                          s_ptr.dtype.element_ty, ASM, BLOCK_N, BLOCK_K, BITS)
        elif MODE == 2:
            fields = (words[:, :, None] >> _field_shifts(BITS)[None, None, :]) & MASK
            w = _k_order(tl.load(lut_rows + fields), BLOCK_N, BLOCK_K, BITS)
        elif PACKED:  # two fields per packed fp16 instruction (see above)
            g = (t * BLOCK_K) >> group_shift
            sh = tl.load(s_rows + g)
            s2 = _half_pair(sh)[:, None]
            if MODE == 0 or BITS == 1:  # z2 = -z s: the fma's addend (1 bit, symmetric:
                # z = 1/2, -s / 2 exact; not an integer, not folded into the offset)
                if MODE == 0:
                    zf = tl.load(z_rows + g).to(tl.float32)
                else:
                    zf = 0.5
                zs = -(zf * sh.to(tl.float32))
                z2 = _half_pair(zs.to(tl.float16))[:, None]
                SYM_Z: tl.constexpr = 0
                DQM: tl.constexpr = 3
            else:  # the constant zero folded into the subtracted offset (exact)
                z2 = 0
                SYM_Z: tl.constexpr = 1 << (BITS - 1)
                DQM: tl.constexpr = 1
            w = _k_order(_unpack_words(words, BITS, HALF_MAGIC, ASM, z2, s2, SYM_Z, DQM, mg,
                                       BYTE_SHIFT=BYTE_SHIFT, kz=K >> 31,
                                       EXP_REG=BYTE_SHIFT and BITS == 2),
                         BLOCK_N, BLOCK_K, BITS, BYTE_SHIFT)
        else:
            h = _k_order(_unpack_words(words, BITS, HALF_MAGIC, ASM, mg=mg), BLOCK_N, BLOCK_K,
                         BITS).to(tl.float32)
            # q exactly (fp16 1024 + q, bf16 128 + q, or q), then (q - z) s: an offset added
            # to a fractional zero instead would round it
            offset = 1024.0 if HALF_MAGIC == 1 else 128.0 if HALF_MAGIC == 2 else 0.0
            g = (t * BLOCK_K) >> group_shift
            if MODE == 0:
                z = tl.load(z_rows + g).to(tl.float32)
            else:  # the symmetric zero (1 bit: 1/2)
                z = tl.zeros((BLOCK_N,), dtype=tl.float32) + (0.5 if BITS == 1 else 1 << (BITS - 1))
            w = ((h - offset) - z[:, None]) * tl.load(s_rows + g).to(tl.float32)[:, None]
        if EVEN_K:
            mask = n_mask[:, None]
        else:
            mask = n_mask[:, None] & (t * BLOCK_K + tl.arange(0, BLOCK_K) < K)[None, :]
        tl.store(w_rows + t * BLOCK_K, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_matmul_kernel(
    # pointers: s_ptr holds the scales (affine) or the codebook; z_ptr the zeros (asymmetric)
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, KP, group_shift, rows_per_group,
    # strides
    stride_xm, stride_qn, stride_sn, stride_ym,
    # meta-parameters
    BITS: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
):
    """Tiled GEMM path: y[M, N] = x[M, K] @ W^T (+ bias), W packed b-bit (affine or codebook).

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K), programs in groups of GROUP_M
    row-tiles for L2 reuse of the weight. Each K-major ``[BLOCK_K, BLOCK_N]`` weight tile is
    unpacked from its words (each word read by the fields it holds, from L1), dequantized
    ``(q - z) * s`` in fp32 or looked up in the codebook, cast to the activation dtype and fed
    to ``tl.dot``. SPLIT_K > 1 adds fp32 partial sums into ``y`` (fp32, zeroed) atomically.

    Roofline: 2 M N K FLOPs on the tensor cores; minimum bytes N Kp b / 8 + scales/zeros or
    codebook + M K e + M N e. Compute-bound from M of a few hundred.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    COLS: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows_n = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows_n[None, :] * stride_qn  # [1, BN]
    if MODE == 2:
        lut_rows = s_ptr + (rows_n // rows_per_group)[None, :] * stride_sn

    k_tiles = tl.cdiv(KP, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        # codebook: the columns past K are not read (0 * a NaN entry would be NaN); affine:
        # their fields are finite, and KP keeps a ragged K's loads vectorized
        kn_mask = (offs_k < (K if MODE == 2 else KP))[:, None] & n_mask[None, :]
        if BITS == 3:
            w_ptrs = q_rows + ((offs_k // 32) * 3)[:, None]
            shift = (offs_k % 32)[:, None]
            q = ((tl.load(w_ptrs, mask=kn_mask, other=0) >> shift) & 1) \
                | (((tl.load(w_ptrs + 1, mask=kn_mask, other=0) >> shift) & 1) << 1) \
                | (((tl.load(w_ptrs + 2, mask=kn_mask, other=0) >> shift) & 1) << 2)
        elif BITS == 1:  # one bit plane: column 32 j + i at bit i of word j
            w_ptrs = q_rows + (offs_k // 32)[:, None]
            q = (tl.load(w_ptrs, mask=kn_mask, other=0) >> (offs_k % 32)[:, None]) & 1
        else:
            pos = _col_pos(offs_k, BITS)  # the column's position (format 3: permuted)
            words = tl.load(q_rows + (pos // COLS)[:, None], mask=kn_mask, other=0)
            c = pos % COLS  # its field (formats 2 and 3: 2 and 4 bits interleaved)
            pos = c // 2 + (c % 2) * (COLS // 2) if BITS < 8 else c
            q = (words >> (pos * BITS)[:, None]) & ((1 << BITS) - 1)
        if MODE == 2:
            w = tl.load(lut_rows + q, mask=kn_mask, other=0.0)
        else:  # the tile lies in one scale group (see the launcher): [1, BN] scales
            s_off = rows_n * stride_sn + ((t * BLOCK_K) >> group_shift)
            s = tl.load(s_ptr + s_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if MODE == 0:
                z = tl.load(z_ptr + s_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            else:  # formats.symmetric_zero: 1/2 at one bit (binary), else 2**(b - 1)
                z = 0.5 if BITS == 1 else 1 << (BITS - 1)
            w = (q.to(tl.float32) - z) * s
        if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)

    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS,
               SPLIT_K)


#: The register-level helpers another family's kernels reuse (``kernels/hashed.py``): the
#: kWidth barrier of Triton 3.6's mma operands and the join of eight values into one run.
kwidth_barrier = _kwidth_barrier
join8 = _join8


# ---------------------------------------------------------------------------------------------
# Configs: tuned defaults (configs/dequant.json), optional autotuning, audit specs
# ---------------------------------------------------------------------------------------------


def select_config(m: int, n: int, kp: int, device: torch.device, lut_gemv: bool = False,
                  lut_gemm: bool = False, narrow: bool = True,
                  half: bool = False) -> KernelConfig:
    """Tuned default for this shape from ``configs/dequant.json``: the GEMV kernel up to
    ``gemv_max_m`` (``half``: the fields GEMM's operand is the exact half-precision
    ``offset + q``, fp16 x at every width and bf16 x below 8 bits (:func:`half_operand`):
    ``gemv_max_m_half``, 0, so M = 1 takes the 16-row tensor-core tile, as Marlin does at
    batch 1), else the GEMM tile of M's bucket (``lut_gemv``: the bit-plane GEMV's table,
    ``gemv_lut``; ``lut_gemm``: the codebook / bit-plane GEMM's, ``gemm_lut``). On a GPU a
    GEMM tile of at most ``AFFINE_GEMM_MAX_BM`` rows halves BLOCK_N (down to
    ``MIN_SMALL_BLOCK_N``; ``narrow``: affine weights, since the 2-bit codebook's 32-column
    tile spills on sm_80) while its grid would leave more than a tenth of the
    multiprocessors idle, before split-K is raised (both paths): split-K costs two more
    launches, which decode cannot afford."""
    return _select_config(m, n, kp, device, lut_gemv, lut_gemm, narrow, half and not lut_gemv,
                          gpu_target(device))


def call_config(m: int, n: int, kp: int, device: torch.device, bits: int, mode: int,
                dtype: torch.dtype) -> KernelConfig:
    """The shipped config a call with these shapes, width, mode and activation dtype takes
    (:func:`select_config` with the flags the launcher derives)."""
    return select_config(m, n, kp, device, lut_gemv=bits not in MAGIC_BITS,
                         lut_gemm=bits not in MAGIC_BITS, narrow=mode != MODE_CODEBOOK,
                         half=half_operand(bits, dtype))


MIN_SMALL_BLOCK_N = 32  # the 16-row tile's narrowest BLOCK_N (audited: recorded_specs)


@functools.lru_cache(maxsize=4096)  # per-call Python cost matters at decode
def _select_config(m: int, n: int, kp: int, device: torch.device, lut_gemv: bool,
                   lut_gemm: bool, narrow: bool, half: bool, target) -> KernelConfig:
    table = dict(device_table(_FAMILY, device))
    if lut_gemv:
        table["gemv"], table["gemv_max_m"] = table["gemv_lut"], table["gemv_lut_max_m"]
    elif half:
        table["gemv_max_m"] = table.get("gemv_max_m_half", table["gemv_max_m"])
    if lut_gemm:
        table["gemm"] = table["gemm_lut"]
    cfg = table_config(table, m)
    if target is not None and narrow and not lut_gemm and cfg.path == "gemm" \
            and cfg.block_m <= AFFINE_GEMM_MAX_BM:
        bn = cfg.block_n
        while (-(-m // cfg.block_m) * -(-n // bn) * 10 < target.sms * 9
               and bn // 2 >= MIN_SMALL_BLOCK_N):
            bn //= 2
        if bn != cfg.block_n:
            cfg = KernelConfig(**{**cfg.__dict__, "block_n": bn})
    return auto_split_k(cfg, m, n, kp, device)


def get_autotune_configs(m: int) -> list[KernelConfig]:
    """Candidate configs for an M bucket (searched when ``COMPRESS_OPS_AUTOTUNE=1``): tiles the
    audit compiles without spills."""
    bucket = m_bucket(m)
    if bucket <= 4:
        # GEMV: its [BLOCK_M, U, BLOCK_N] partial sums (U = BLOCK_K / 4 for int8) stay small
        gemv = [KernelConfig("gemv", bucket, bn, bk, 4, 1, 8, sk)
                for bn, bk in ((16, 128), (32, 128), (32, 256), (64, 128))
                for sk in (1, 4) if bucket * bn * bk <= 4096 * (1 if bucket > 1 else 2)
                and (bucket, bn) != (2, 16)]  # spills on sm_90 (audit)
        return gemv + [KernelConfig("gemm", 16, 64, 64, 4, 4, 8, sk) for sk in (1, 4)]
    if bucket <= 64:
        bm = max(16, bucket)
        return [KernelConfig("gemm", bm, bn, bk, w, 4, 8, sk)
                for bn, bk, w in ((64, 32, 4), (128, 64, 8)) for sk in (1, 2, 4)]
    return [KernelConfig("gemm", bm, bn, 32, w, s, 8, 1)
            for bm, bn, w in ((64, 128, 8), (128, 128, 8)) for s in (3, 4)]


def autotuned_config(mode: int, x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                     z: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                     group: int) -> KernelConfig:
    """The fastest of :func:`get_autotune_configs` for this call's shape, timed once per
    (mode, bits, group, M bucket, N, K, dtype, bias, GPU) and remembered."""
    m, n, k = x2.shape[0], q.shape[0], x2.shape[1]
    key = (_FAMILY, mode, bits, group, m_bucket(m), n, k, x2.dtype, bias is not None,
           device_name(x2.device))
    return autotune(key, get_autotune_configs(m),
                    lambda cfg: _launch(mode, x2, q, s, z, bias, bits, group, cfg))


_SIG_COMMON = {
    "x_ptr": "*{dt}", "q_ptr": "*i32", "s_ptr": "*{dt}", "z_ptr": "*{dt}", "bias_ptr": "*{dt}",
    "y_ptr": "*{yt}", "M": "i32", "N": "i32", "K": "i32", "KP": "i32", "group_shift": "i32",
    "rows_per_group": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32",
    "stride_ym": "i32",
}
_ALIGNED = ["x_ptr", "q_ptr", "s_ptr", "z_ptr", "bias_ptr", "y_ptr", "KP",
            "stride_xm", "stride_ym", "K"]
# (bits, mode) variants the audit compiles for every config: int4 asymmetric (the default),
# int8 symmetric, int2 asymmetric, 4-bit and 3-bit (bit-plane) codebooks, 1-bit fields (one
# bit plane: the symmetric grid quantize_absmean writes, z = 1/2, and stored zero points).
_AUDIT_VARIANTS = ((4, MODE_ASYM), (8, MODE_SYM), (2, MODE_ASYM), (4, MODE_CODEBOOK),
                   (3, MODE_CODEBOOK), (1, MODE_ASYM), (1, MODE_SYM))


def _expected_mma(consts: dict) -> str:
    """The tensor-core instruction a fields/3-bit GEMM spec must compile to on sm_90 (the
    audit expects HMMA on sm_80): a wgmma (HGMMA) where a warpgroup's 64 rows fit the tile's
    first operand, x's 64+ rows or, swapped (``SWAP_AB``), the weight tile's BLOCK_N."""
    if consts.get("BLOCK_M", 16) >= 64 or (consts.get("SWAP_AB") and consts["BLOCK_N"] >= 64):
        return "HGMMA"
    return "HMMA"


def recorded_specs(n: int = 8192, k: int = 8192) -> list[dict]:
    """Audit specs of the fields kernels as real calls launch them (N = 8192, and N = 4096 for
    the small tiles, whose BLOCK_N the launcher narrows there): every shipped GEMV and
    GEMM bucket that routes to :func:`_fields_gemv_kernel` / :func:`_fields_matmul_kernel`,
    and the large-M route's :func:`_dequant_weight_kernel` (at ``dense_min_m`` rows),
    int2/int4/int8, symmetric and asymmetric, fp16 and bf16 (and int4 fp16 at a ragged K;
    1-bit fields: binary per row in fp16, bf16 and fp32, and fp16 groups of 128),
    codebooks of 2/4 bits (and their GEMM where it is :func:`_dequant_matmul_kernel`),
    recorded on CPU tensors as on an H200 and compiled with the specialization Triton computes
    for those arguments (:func:`~compress_ops.kernels.launches.specialization`)."""
    from compress_ops.kernels import launches, tuning
    from compress_ops.kernels.formats.dequant import effective_group_size, empty_affine

    table = load_tables(_FAMILY)["default"]
    ms = [int(b) for b in table["gemv"]]
    ms += [int(b) for b in table["gemm"]]
    if table.get("dense_min_m") is not None:  # the large-M route's dequantizing kernel
        ms.append(table["dense_min_m"])
    variants = [(b, g, sym, dt, k) for b, g in ((4, 128), (8, None), (2, 128))
                for sym in (False, True) for dt in (torch.float16, torch.bfloat16)]
    variants += [(b, g, False, torch.float32, k) for b, g in ((4, 128), (8, None))]
    variants.append((4, 128, False, torch.float16, k - 92))  # ragged K
    # 1-bit fields: binary (symmetric, one group per row; fp16's byte pairs), and groups
    variants += [(1, None, True, dt, k) for dt in (torch.float16, torch.bfloat16, torch.float32)]
    variants += [(1, 128, sym, torch.float16, k) for sym in (False, True)]
    specs, seen = [], set()
    # the small tiles also at N / 2, where the launcher narrows BLOCK_N (select_config)
    shapes = [(m, n) for m in ms] + [(m, n // 2) for m in ms if 1 < m <= 16]
    with tuning.simulate_gpu():
        for bits, group, sym, dt, kk in variants:
            gs = effective_group_size(kk, group)
            cb = (torch.empty(2, 2**bits, dtype=dt) if bits > 1 and (bits < 8 or not sym)
                  else None)  # (no 1-bit codebooks)
            for m, nn in shapes:
                q, s, z = empty_affine(nn, kk, bits, group, sym, dtype=dt)
                x = torch.empty(m, kk, dtype=dt)
                with launches.capture(run=False) as got:
                    dequant_matmul(x, q, s, z, None, bits, gs)
                    if cb is not None and group == 128 and not sym and kk == k:  # 2 row groups
                        codebook_matmul(x, q, cb, None, bits)
                for la in got:
                    if isinstance(la.kernel, str):
                        continue
                    sig, consts, attrs, opts = launches.specialization(la.kernel, la.args,
                                                                       la.kwargs)
                    kind = ("cb" if la.kwargs.get("MODE") == MODE_CODEBOOK
                            else "sym" if sym else "asym")
                    name = (f"real_m{m}{'' if nn == n else f'n{nn}'}/{kind}{bits}/"
                            f"{str(dt).split('.')[-1]}/k{kk}"
                            f"{f'/g{group}' if bits == 1 and group else ''}")
                    key = (la.kernel.__name__, repr(sig), repr(sorted(consts.items())), repr(attrs),
                           opts.num_warps, opts.num_stages)
                    if key in seen:
                        continue
                    seen.add(key)
                    # fp32 x: an IEEE dot (FMA, no tensor cores) unless TF32 is allowed
                    mma = ("-" if la.kernel in (_fields_gemv_kernel, _dequant_weight_kernel)
                           or la.kwargs.get("DOT_PRECISION") == "ieee"
                           else _expected_mma(la.kwargs))
                    specs.append({"kernel": la.kernel.__name__, "config": name, "fn": la.kernel,
                                  "signature": sig, "constexprs": consts, "attrs": attrs,
                                  "num_warps": opts.num_warps, "num_stages": opts.num_stages,
                                  "expect_mma": mma})
    return specs


def audit_specs(defaults_only: bool = False) -> list[dict]:
    """Every (kernel, config, variant) the static GPU audit compiles.

    Shipped defaults: every (bits, mode) variant in fp16, plus bf16 int4; the variants that
    only change the epilogue or the tile's K (split-K > 1, where ``select_config`` may raise it;
    the smaller BLOCK_K the launcher uses for groups smaller than the tile) and the autotune
    space (unless ``defaults_only``): int4.
    """
    int4 = ((4, MODE_ASYM, "fp16"),)
    every = tuple((b, md, "fp16") for b, md in _AUDIT_VARIANTS) + ((4, MODE_ASYM, "bf16"),)
    cfgs: dict[str, tuple[KernelConfig, tuple]] = {}
    for m in () if defaults_only else (1, 2, 4, 16, 32, 64, 256):
        for cfg in get_autotune_configs(m):
            cfg = cfg.with_split_k(min(cfg.split_k, 2))
            cfgs.setdefault(cfg.name, (cfg, int4))
    for table in load_tables(_FAMILY).values():
        if not isinstance(table, dict):  # "_about"
            continue
        # the affine GEMV and GEMM are audited as recorded calls (recorded_specs); their
        # split-K and small-group tiles below, by config
        for path, key in (("gemv", "gemv_lut"), ("gemm", "gemm_lut"), ("gemm", "gemm")):
            for bucket, c in table[key].items():
                cfg = KernelConfig(path, **c)
                if key != "gemm":  # "gemm": recorded calls, every variant
                    cfgs[cfg.name] = (cfg, every)
                if int(bucket) <= SPLIT_K_MAX_M:
                    cfgs.setdefault(cfg.with_split_k(2).name, (cfg.with_split_k(2), int4))
                # the launcher's smaller tiles for groups smaller than BLOCK_K
                for bk in (32, 64, 128) if path == "gemm" or cfg.block_m == 1 else (32,):
                    if bk < cfg.block_k:
                        small = KernelConfig(**{**cfg.__dict__, "block_k": bk})
                        cfgs.setdefault(small.name, (small, int4))
    # recorded calls need Triton's JIT (its binder): not under the interpreter
    specs = [] if os.environ.get("TRITON_INTERPRET") == "1" else recorded_specs()
    names = {MODE_ASYM: "asym", MODE_SYM: "sym", MODE_CODEBOOK: "cb"}
    for cfg, variants in cfgs.values():
        for bits, mode, dt in variants:
            yt = "fp32" if cfg.split_k > 1 else dt
            sig = {k: v.format(dt=dt, yt=yt) for k, v in _SIG_COMMON.items()}
            consts = {"BITS": bits, "MODE": mode, "HAS_BIAS": True, "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": cfg.split_k}
            if cfg.path == "gemv":
                fn, expect = _dequant_gemv_kernel, "-"
            else:  # the kernel the launcher runs for this tile and variant
                consts.update(GROUP_M=cfg.group_m, DOT_PRECISION="tf32", UPCAST_DOT=False)
                if fields_gemm(bits):
                    fn = _fields_matmul_kernel
                    consts.update(fields_gemm_meta(bits, mode, cfg.block_m, DTYPES[dt]), ASM=True,
                                  EVEN_K=False, FEW_ROWS=False,  # masked; real calls: recorded
                                  ONE_GROUP=False)
                else:
                    fn = _dequant_matmul_kernel
                expect = _expected_mma(consts)
            sig.update({c: "constexpr" for c in consts})
            # K % 16 == 0, and for the defaults' int4 also a ragged K (its own specialization)
            kinds = [("", _ALIGNED)]
            if variants is every and (bits, mode, dt) == (4, MODE_ASYM, "fp16"):
                kinds.append(("/kany", [a for a in _ALIGNED if a != "K"]))
            for kname, aligned in kinds:
                specs.append({"kernel": fn.__name__,
                              "config": f"{cfg.name}/{names[mode]}{bits}/{dt}{kname}",
                              "fn": fn, "signature": sig, "constexprs": consts,
                              "aligned": aligned, "num_warps": cfg.num_warps,
                              "num_stages": cfg.num_stages, "expect_mma": expect})
    return specs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """What a launch derives from a call's shapes, dtype, device and config (:func:`_plan`):
    the kernel, its grid, the scalar arguments between the pointers and the strides, and the
    constexprs with the launch options."""

    kernel: object
    grid: tuple
    ints: tuple
    meta: dict
    split_k: int
    dense_rows: int = 0  # > 0: the large-M route, dense weight rows per chunk (_launch_dense)


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096  # distinct (shape, dtype, config) calls remembered; then forgotten at once


def _plan(mode: int, x2: torch.Tensor, q: torch.Tensor, bits: int, group: int,
          has_bias: bool, cfg: KernelConfig | None) -> _Plan:
    """:func:`_make_plan` for this call (``cfg=None``: the shipped config,
    :func:`call_config`), remembered per everything it reads (the config tables, tile rules
    and constexprs are pure functions of these), so that a decode step pays a dict lookup
    instead of re-deriving its launch: eager calls are host-bound."""
    m, k = x2.shape
    fp32 = x2.dtype == torch.float32
    key = (mode, bits, group, m, k, q.shape[0], q.shape[1], x2.dtype, x2.device,
           gpu_target(x2.device), has_bias, cfg, x2.stride(0) % 16 == 0,
           fp32 and torch.backends.cuda.matmul.allow_tf32,
           os.environ.get("COMPRESS_OPS_DENSE_MIN_M"))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(mode, x2, q, bits, group, has_bias, cfg)
    return plan


def _launch(mode: int, x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
            z: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group: int,
            cfg: KernelConfig | None) -> torch.Tensor:
    """``group``: the group size (affine) or rows per codebook row group (codebook);
    ``cfg=None``: the shipped config."""
    plan = _plan(mode, x2, q, bits, group, bias is not None, cfg)
    if plan.dense_rows:
        return _launch_dense(plan, x2, q, s, z, bias)
    y = _launch_mod.output(x2.shape[0], q.shape[0], x2, plan.split_k)
    zp = z if z is not None else s  # dummy pointers, never read
    bp = bias if bias is not None else s
    _launch_mod.launch(plan.kernel, plan.grid, x2, q, s, zp, bp, y, *plan.ints,
                       x2.stride(0), q.stride(0), s.stride(0), y.stride(0), **plan.meta)
    return _launch_mod.finish(y, x2, plan.split_k)


def _make_plan(mode: int, x2: torch.Tensor, q: torch.Tensor, bits: int, group: int,
               has_bias: bool, cfg: KernelConfig | None) -> _Plan:
    m, k = x2.shape
    n = q.shape[0]
    kp = packed_k(q.shape[1], bits)
    group_size, rows_per_group = (kp, group) if mode == MODE_CODEBOOK else (group, 1)
    ints = (m, n, k, kp, group_shift_arg(group_size, kp), rows_per_group)
    if cfg is None and dense_route(m, bits, x2.dtype, x2.device):
        return _dense_plan(mode, x2, bits, group_size, kp, ints)
    if cfg is None:
        cfg = call_config(m, n, kp, x2.device, bits, mode, x2.dtype)
        if (bits == 1 and cfg.path == "gemm" and cfg.block_m <= 16 and cfg.block_k == 128
                and cfg.block_n >= 64 and x2.dtype != torch.float32
                and min(group_size, kp) >= 256):
            # 1-bit words are a quarter of int4's: the 16-row tile takes 256 columns a K step
            # where the groups allow it, which halves the per-step overhead (static model,
            # binary per row, M = 1, sm_90, Triton 3.6: 2.84 -> 2.49 loop instructions per
            # weight before fp16's PRMT pairs, 4.06x -> 4.38x dense predicted), with 8 stages
            # (shared memory on sm_80); not with BLOCK_N narrowed to 32 (it spilled on sm_90)
            cfg = KernelConfig(**{**cfg.__dict__, "block_k": 256, "num_stages": 8})
    if cfg.path == "gemv" and bits in MAGIC_BITS:
        return _fields_gemv_plan(mode, x2, has_bias, bits, group_size, kp, ints, cfg)
    if group_size < kp and cfg.block_k > group_size:  # a K tile must lie in one scale group
        # GEMV at BLOCK_M >= 2: 32-column tiles (BLOCK_K = 64 there spills on sm_90: audit)
        bk = group_size if cfg.path == "gemm" or cfg.block_m == 1 else WORD_COLS
        cfg = KernelConfig(**{**cfg.__dict__, "block_k": bk})
    if cfg.path == "gemm":
        cfg = gemm_tile(cfg, x2, bits, mode)
    meta = dict(BITS=bits, MODE=mode, HAS_BIAS=has_bias, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        return _Plan(_dequant_gemv_kernel, grid, ints, meta, cfg.split_k)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    if fields_gemm(bits):
        meta = dict(GROUP_M=cfg.group_m, ASM=ptx(x2),
                    EVEN_K=k == kp and k % cfg.block_k == 0, FEW_ROWS=m < cfg.block_m,
                    ONE_GROUP=mode != MODE_CODEBOOK and group_size >= kp,
                    **fields_gemm_meta(bits, mode, cfg.block_m, x2.dtype), **dot_meta(x2),
                    **meta)
        return _Plan(_fields_matmul_kernel, grid, ints, meta, cfg.split_k)
    return _Plan(_dequant_matmul_kernel, grid, ints,
                 dict(GROUP_M=cfg.group_m, **dot_meta(x2), **meta), cfg.split_k)


DENSE_CHUNK_BYTES = 256 << 20  # the large-M route's dense weight: at most this many bytes
DENSE_BLOCK_N = 32  # :func:`_dequant_weight_kernel`'s tile: 32 rows x one scale group (<= 128)
DENSE_BLOCK_K = 128
DENSE_TILES = 8  # K tiles per program: its row pointers (and lookup registers) made once


def dense_min_m(device: torch.device) -> int | None:
    """The smallest M that takes the large-M route (:func:`dense_route`): the environment's
    ``COMPRESS_OPS_DENSE_MIN_M`` (an int; ``never``: the fused GEMM at every M), else the
    device table's ``dense_min_m`` (``kernels/configs/dequant.json``; null: never)."""
    env = os.environ.get("COMPRESS_OPS_DENSE_MIN_M")
    if env is not None:
        if env.strip().lower() == "never":
            return None
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"COMPRESS_OPS_DENSE_MIN_M must be an int or 'never', got "
                             f"{env!r}") from None
        if value < 1:
            raise ValueError(f"COMPRESS_OPS_DENSE_MIN_M must be >= 1, got {value}")
        return value
    return device_table(_FAMILY, device).get("dense_min_m")


def dense_route(m: int, bits: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a call with the shipped config takes the large-M route: the weight
    dequantized once into a temporary dense ``[N, K]`` (:func:`_dequant_weight_kernel`, at
    most ``DENSE_CHUNK_BYTES`` at a time) and multiplied by cuBLAS (``F.linear``), two
    launches per chunk. From ``dense_min_m`` rows (:func:`dense_min_m`), 1/2/4/8-bit
    fields (affine or codebook), fp16/bf16 x. At M = 2048 (N = K = 8192, H200) the fused GEMM
    measured 0.45-0.65x dense cuBLAS (``perf/results/2026-11-30-quick-nvidia-h200.json``): its
    CTAs dequantize every weight once per row tile (16 times at M = 2048) and do not overlap
    that with the tensor cores; the dense route dequantizes once (32 MB read, 128 MB written
    at int4) before a GEMM that is cuBLAS's own."""
    if bits not in MAGIC_BITS or dtype not in (torch.float16, torch.bfloat16):
        return False
    threshold = dense_min_m(device)
    return threshold is not None and m >= threshold


def _dense_plan(mode: int, x2: torch.Tensor, bits: int, group_size: int, kp: int,
                ints: tuple) -> _Plan:
    m, n, k, _, shift, rows_per_group = ints
    bk = DENSE_BLOCK_K if group_size >= kp else min(DENSE_BLOCK_K, group_size)
    rows = max(DENSE_BLOCK_N, DENSE_CHUNK_BYTES // (k * x2.element_size())
               // DENSE_BLOCK_N * DENSE_BLOCK_N)
    # (the dense weight is dequantized as the large tiles do: asymmetric 1-bit byte pairs too)
    fields = fields_gemm_meta(bits, mode, AFFINE_GEMM_MAX_BM + 1, x2.dtype)
    k_tiles = -(-kp // bk)
    tiles = min(DENSE_TILES, k_tiles)
    meta = dict(BITS=bits, MODE=mode, BLOCK_N=DENSE_BLOCK_N, BLOCK_K=bk, ASM=ptx(x2),
                HALF_MAGIC=fields["HALF_MAGIC"], LUT_PRMT=fields["LUT_PRMT"], SPLIT_K=1,
                TILES=tiles, EVEN_K=k == kp and k % bk == 0,
                BYTE_SHIFT=fields["BYTE_SHIFT"], num_warps=4, num_stages=1)
    return _Plan(_dequant_weight_kernel, (-(-k_tiles // tiles),),
                 (k, kp, shift, rows_per_group), meta, 1, dense_rows=rows)


def _launch_dense(plan: _Plan, x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                  z: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The large-M route (:func:`dense_route`): per chunk of at most ``plan.dense_rows`` rows,
    the dense weight into one reused buffer, then ``F.linear`` (cuBLAS on a GPU)."""
    n, k = q.shape[0], x2.shape[1]
    rows = plan.dense_rows
    w = torch.empty((min(rows, n), k), device=x2.device, dtype=x2.dtype)
    zp = z if z is not None else s  # a dummy pointer, never read
    runs = launches.runs()
    outs = []
    for r0 in range(0, n, rows):
        nr = min(rows, n - r0)
        grid = (-(-nr // DENSE_BLOCK_N), *plan.grid)
        _launch_mod.launch(plan.kernel, grid, q, s, zp, w, nr, *plan.ints, r0, q.stride(0),
                           s.stride(0), w.stride(0), **plan.meta)
        _launch_mod.record_torch("F.linear")
        if runs:
            outs.append(F.linear(x2, w[:nr], None if bias is None else bias[r0:r0 + nr]))
    if not runs:  # recorded, not run (launches.capture(run=False)): unwritten, as every output
        return _launch_mod.output(x2.shape[0], n, x2, 1)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


# the fields kernels (affine and codebook, every M): contiguous 2/4/8-bit fields, and 1-bit
# fields (one bit plane, column 32j + i at bit i of word j: fp16 pairs adjacent columns from
# PRMT byte copies, else the shift-and-mask pair p of a word holds columns p and p + 16, put
# in K order by :func:`_k_order`)
MAGIC_BITS = (1, 2, 4, 8)
# :func:`_fields_matmul_kernel` scales each tile's dot product per output element up to this
# BLOCK_M (cheaper than dequantizing every weight while BLOCK_M is small); larger tiles
# dequantize each weight once (DEQUANT_W).
AFFINE_GEMM_MAX_BM = 32


def group_shift_arg(group_size: int, kp: int) -> int:
    """The kernels' ``group_shift`` argument: column ``c``'s scale group is ``c >> shift`` (a
    shift, not an integer division in every K step). Groups smaller than the row are powers of
    two (``GROUP_SIZES``); one group per row (``group_size == kp``, and codebooks) is 31: every
    column's group is 0."""
    if group_size >= kp:
        return 31
    if group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two below the padded row ({kp}); "
                         f"got {group_size}")
    return group_size.bit_length() - 1


def fields_gemm(bits: int) -> bool:
    """Whether a GEMM runs :func:`_fields_matmul_kernel` (else :func:`_dequant_matmul_kernel`,
    the bit-plane 3-bit fields): 1/2/4/8-bit fields, affine or codebook, every
    tile."""
    return bits in MAGIC_BITS


def gemm_tile(cfg: KernelConfig, x2: torch.Tensor, bits: int, mode: int) -> KernelConfig:
    """A shipped GEMM tile, shrunk where it would spill (the audit, sm_80 and sm_90): with fp32
    x (fp32 operands; a tf32 or, by default, an IEEE dot) at most 64 x 64 x 32 with 3 stages
    (8 warps from 32 rows; codebook lookups: 32 x 32); for the fields GEMM above 32 rows,
    BLOCK_K 64 where x's rows are not 16-byte aligned (they cannot be copied asynchronously
    and are staged in registers) or the fields are fp32 (bf16 int8: 128 + q is not exact);
    codebook lookups: 4 warps and 6 stages at least (the 2-warp 16-row tile holds 255
    registers), BLOCK_K 64 (64 rows) or 32 (128 rows) above 32 rows where the fields are
    gathered from memory (4-bit fields with two-byte entries, looked up in registers, keep
    the affine tiles: ``LUT_PRMT``); int8 above 32 rows at most 6 stages (shared memory
    on sm_80), asymmetric int4 at most 6 with fewer rows than the tile and 5 with bf16 x
    (registers spilled on sm_80); affine int2 at 16
    rows 18 stages (its words are small: 34 KB in flight per SM; 1-bit fields keep 12, which
    leave room for two CTAs per SM: 18 took sm_90's shared memory for one, static model; with
    groups of 256 columns or more their shipped 16-row tile takes 256 columns a K step and 8
    stages instead, :func:`_make_plan`)."""
    big = cfg.block_m > AFFINE_GEMM_MAX_BM
    if x2.dtype == torch.float32:
        bn = 32 if mode == MODE_CODEBOOK else 64
        bm = min(cfg.block_m, 32 if mode == MODE_CODEBOOK else 64)
        return KernelConfig(**{**cfg.__dict__, "block_m": bm,
                               "block_n": min(cfg.block_n, bn),
                               "block_k": min(cfg.block_k, 32),
                               "num_stages": min(cfg.num_stages, 3),
                               "num_warps": 8 if bm >= 32 else 4})
    if mode == MODE_CODEBOOK and cfg.num_warps < 4:  # lookups: 2 warps hold too many
        cfg = KernelConfig(**{**cfg.__dict__, "num_warps": 4, "num_stages": 6})
    if (mode == MODE_CODEBOOK and big and fields_gemm(bits)
            and not fields_gemm_meta(bits, mode, cfg.block_m, x2.dtype)["LUT_PRMT"]):
        # the looked-up [BLOCK_N, BLOCK_K] tile: 64 x 64 x 64 and 128 x 128 x 32 fit (the
        # register lookups of 4-bit fields take the affine tiles)
        bk = 64 if cfg.block_m <= 64 else 32
        return KernelConfig(**{**cfg.__dict__, "block_k": min(cfg.block_k, bk)})
    if (bits == 2 and mode != MODE_CODEBOOK and cfg.block_m <= 16 and cfg.num_stages < 18
            and cfg.block_n * cfg.block_k <= 64 * 128):
        # int2 words are half int4's: 18 stages keep 34 KB in flight per SM (12: 22 KB);
        # at most 16 x 64 x 128, so 18 stages stay within 108 KB of shared memory
        cfg = KernelConfig(**{**cfg.__dict__, "num_stages": 18})
    if bits == 8 and big and cfg.num_stages > 6:  # int8 words double a stage's shared memory:
        # 7 stages of 64 x 64 x 128 take 176 KB, over sm_80's 163 KB
        cfg = KernelConfig(**{**cfg.__dict__, "num_stages": 6})
    # asymmetric int4's tile in format 3's order spilled a register or two on sm_80 (the audit)
    # at 7 stages with fp16 x of fewer rows than the tile (FEW_ROWS masks x's rows) and at 6
    # with bf16 x (at 168 registers)
    cap = 5 if x2.dtype == torch.bfloat16 else 6 if x2.shape[0] < cfg.block_m else 99
    if bits == 4 and mode == MODE_ASYM and big and cfg.num_stages > cap:
        cfg = KernelConfig(**{**cfg.__dict__, "num_stages": cap})
    unaligned = x2.shape[1] % 16 or x2.stride(0) % 16
    if (fields_gemm(bits) and big and cfg.block_k > 64
            and (unaligned or (x2.dtype == torch.bfloat16 and bits == 8))):
        return KernelConfig(**{**cfg.__dict__, "block_k": 64})
    return cfg


def half_operand(bits: int, dtype: torch.dtype) -> bool:
    """Whether the fields GEMM feeds its dot the exact half-precision ``offset + q`` (and, in
    its small tiles, ``q - z``) for b-bit fields and ``dtype`` activations: fp16 at every width,
    bf16 below 8 bits (``128 + q`` is exact for q < 128 only); not fp32."""
    return bits in MAGIC_BITS and fields_gemm_meta(bits, MODE_ASYM, 1, dtype)["HALF_MAGIC"] > 0


def fields_gemm_meta(bits: int, mode: int, block_m: int, dtype: torch.dtype) -> dict:
    """The constexprs of :func:`_fields_matmul_kernel` that the launcher derives: the offset's
    exact cancellation needs the dot to see x exactly, so fp16 and bf16 x take the half
    magic (not fp32 x, which a tf32 dot rounds; bf16's 128 + q is exact for q < 128 only),
    and tiles above ``AFFINE_GEMM_MAX_BM`` rows dequantize every weight (``DEQUANT_W``).
    ``BYTE_SHIFT`` (fp16, affine 2- and 4-bit fields, every tile: :func:`_pair`; the large
    tiles subtract each pair's offset before one fma, the small ones fold the offsets into
    their all-ones operand; symmetric 1-bit fields: each byte of a word copied into all four
    bytes by one PRMT, then one LOP3 per pair of adjacent columns, each half under its own
    exponent (bit ``r`` in 1 .. 8 worth 1, so that ``1024 / 2**r + 1/2`` is exact): no shifts
    and no K permutation, where the plain pairs take a shift per pair and a PRMT per pair to
    put columns ``p, p + 16`` back in K order; the small tiles' all-ones operand holds the
    offset plus the zero in every row, the large ones fold it into the subtracted offset
    (asymmetric 1-bit fields: the large tiles and the large-M route only, whose packed
    ``q - z`` takes any zero; the small tiles' all-ones operand would need each row's zero);
    static model, sm_90, Triton 3.9, per-row scales: M = 16 3.03 -> 1.98 loop instructions per
    weight (with 256-column K steps, :func:`_make_plan`), M = 64 4.30 -> 2.95, the large-M
    route's weight 4.81 -> 4.25). ``SWAP_AB`` (the weight tile as the dot's first operand, a
    register-operand wgmma on sm_90) where the static model predicts it cheaper under both
    Tritons: fp16/bf16 x with affine 2-
    and 4-bit fields in the small tiles (int4 M = 16: 3.34 -> 3.09 instructions per weight
    under Triton 3.9, 3.27 -> 2.73 under 3.6); int8, codebooks and the large tiles lost
    (their words are not one thread's fragment, or the dequantized tile already goes through
    shared memory for the wgmma)."""
    half_magic = {torch.float16: 1, torch.bfloat16: 2 if bits < 8 else 0}.get(dtype, 0)
    return {"HALF_MAGIC": half_magic,
            "DEQUANT_W": mode != MODE_CODEBOOK and block_m > AFFINE_GEMM_MAX_BM,
            "LUT_PRMT": mode == MODE_CODEBOOK and bits == 4 and dtype.itemsize == 2,
            "SWAP_AB": (dtype.itemsize == 2 and bits in (2, 4) and mode != MODE_CODEBOOK
                        and block_m <= AFFINE_GEMM_MAX_BM),
            "BYTE_SHIFT": dtype == torch.float16 and (
                bits in (2, 4) and mode != MODE_CODEBOOK
                or bits == 1 and (mode == MODE_SYM or block_m > AFFINE_GEMM_MAX_BM)),
            "ONES_DOT": (mode != MODE_CODEBOOK and block_m <= AFFINE_GEMM_MAX_BM
                         and half_magic > 0)}


def fields_gemv_tile(bits: int, group_size: int, kp: int, block_k: int,
                     codebook: bool = False) -> tuple[int, int]:
    """``(BLOCK_K, VEC)`` of :func:`_fields_gemv_kernel` for a GEMV config: ``block_k`` is
    counted for int4 and scaled to the same bytes per tile for other widths (codebooks: not
    raised for 2-bit fields, whose 16 lookups per word would spill); a chunk of VEC words
    (16-byte loads at VEC = 4) lies inside one scale group."""
    fields = 32 // bits
    bk = max(block_k * 4 // (max(bits, 4) if codebook else bits), WORD_COLS)
    vec = min(4, group_size // fields, bk // fields)
    # a power of two (1-bit fields, one group per row of 96 columns: 3 words)
    return bk, 1 << (vec.bit_length() - 1)


def _fields_gemv_plan(mode: int, x2: torch.Tensor, has_bias: bool, bits: int,
                      group_size: int, kp: int, ints: tuple, cfg: KernelConfig) -> _Plan:
    """The launch of :func:`_fields_gemv_kernel`."""
    n = ints[1]
    bk, vec = fields_gemv_tile(bits, group_size, kp, cfg.block_k, mode == MODE_CODEBOOK)
    # codebooks: half the rows per program (their lookups hold more registers; the audit), a
    # quarter with fp32 x (its activations take twice the registers)
    bn = cfg.block_n
    if mode == MODE_CODEBOOK and bn > 8:
        bn = max(8, bn // (4 if x2.dtype == torch.float32 else 2))
    grid = (triton.cdiv(n, bn), x2.shape[0], cfg.split_k)
    meta = dict(BITS=bits, MODE=mode, HAS_BIAS=has_bias, BLOCK_N=bn, BLOCK_K=bk, VEC=vec,
                ONE_GROUP=group_size == kp, SPLIT_K=cfg.split_k, ASM=ptx(x2),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _Plan(_fields_gemv_kernel, grid, ints, meta, cfg.split_k)


def _run(mode: int, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
         bias: torch.Tensor | None, bits: int, group: int,
         config: KernelConfig | None) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    n = q.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if s.numel() >= 2**31:  # the GEMM indexes scales and zeros with int32 offsets
        raise ValueError(f"{tuple(s.shape)} scales: the kernels take fewer than 2**31 scales "
                         "(use a larger group_size)")
    x2, q, s = x2.contiguous(), q.contiguous(), s.contiguous()
    z = z.contiguous() if z is not None else None
    bias = bias.contiguous() if bias is not None else None
    if (config is None and x.device.type == "cuda"
            and os.environ.get("COMPRESS_OPS_AUTOTUNE") == "1"):
        config = autotuned_config(mode, x2, q, s, z, bias, bits, group)
    return _launch(mode, x2, q, s, z, bias, bits, group, config).reshape(*lead, n)


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   group_size: int, *, config: KernelConfig | None = None,
                   checked: bool = False) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ dequantize(qweight, scales, zeros)^T (+ bias)``.

    Runs the Triton kernel on ``x``'s device (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
    ``zeros=None`` is the symmetric grid. ``config`` overrides the tuned default;
    ``COMPRESS_OPS_AUTOTUNE=1`` (CUDA) times :func:`get_autotune_configs` once per shape.
    ``checked=True`` skips validation for inputs that already passed
    :func:`~compress_ops.kernels.formats.dequant.check_affine_inputs` (the op validates once
    per call).
    """
    if not checked:
        check_affine_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    mode = MODE_SYM if zeros is None else MODE_ASYM
    return _run(mode, x, qweight, scales, zeros, bias, bits, group_size, config)


def codebook_matmul(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                    bias: torch.Tensor | None, bits: int, *,
                    config: KernelConfig | None = None, checked: bool = False) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ codebook_weight(indices, codebook)^T (+ bias)``.

    Same devices, configs and ``checked`` as :func:`dequant_matmul`.
    """
    if not checked:
        check_codebook_inputs(x, indices, codebook, bias, bits)
    rows_per_group = indices.shape[0] // codebook.shape[0]
    return _run(MODE_CODEBOOK, x, indices, codebook, None, bias, bits, rows_per_group, config)
