"""Hashed weights (HashedNets): Triton kernels, configs, launchers.

Format
------
:mod:`compress_ops.kernels.formats.hashed` (the spec): ``w [B]`` buckets in the activation
dtype and a 32-bit seed; the virtual weight ``W[n, k] = sign(n, k) * w[bucket(n, k)]`` comes
from the 32-bit hash ``h = (R(n) ^ C(k)) MIX`` of the position, ``R(n) = fmix(n ^ seed)``
one per row, ``C(k) = k GOLD`` one per column. No index is stored: the kernels read only
``x`` and ``w`` from HBM (``w`` is small for a useful ``B`` and stays in L1/L2) and compute
every weight in registers, bit for bit as
:func:`~compress_ops.kernels.formats.hashed.hashed_weight`.

Kernels
-------
One weight generator serves every kernel (:func:`_w_step`). A program keeps its tile's row
hashes ``R`` and column hashes ``C`` in registers, each in the shape it broadcasts from
(:func:`_start`): ``R`` is made once per program for ``y = x W^T`` (its rows are outputs)
and once per row and K step for ``y = x W`` (``TRANS``: its rows are the reduction), ``C``
advanced by one add per column and K step (or fixed, ``TRANS``). Per weight the hash is one
LOP3 (``R ^ C``) and one multiply; the bucket is ``umulhi(h << 1, B)`` (h's low 31 bits;
PTX ``mul.hi.u32`` on a GPU, :func:`_bucket_ptrs`, the shift folded by ptxas into a second
multiply); the bucket's bits are gathered from ``w`` (viewed as int16 / int32: unmasked, a
bucket is always in range; a ragged K tile masks its last rows, so a non-finite bucket
cannot reach a real output through ``0 * inf``); the sign is an XOR of ``h``'s top bit into
the sign bit.

* ``OCTETS`` (the weight's rows ``K % 8 == 0``): columns ``8a .. 8a + 7`` have ``C(8a) + j
  GOLD``, so a thread keeps one ``C`` per octet and adds the constants (:func:`_w_octets`;
  the adds are per column a thread holds, shared by its rows). The octets run along
  stride-1 positions: along K for ``y = x W^T`` (the tile is built ``[BLOCK_N, BLOCK_K]``
  and transposed, K-major for the MMA), along N for ``y = x W``. Other K: 8 adjacent
  columns per thread with a hash each (:func:`_w_cols`).
* A thread's 8 weights are interleaved in registers (``tl.join``): a 16-bit tile goes to
  shared memory in 16-byte stores, and on a GPU the sign is applied per register pair
  (:func:`_sign_pairs`: the hashes' high halves packed like the weights, one PRMT, and one
  LOP3 per pair).
* The transposed product (the input gradient ``y = x W``) walks the same positions with the
  tile's roles swapped (``TRANS``): one kernel serves both directions.

* :func:`_hashed_gemm_kernel` (fp16 / bf16 x at every M, fp32 x past ``gemv_max_m``): grouped
  program order, the ``[BLOCK_M, BLOCK_K]`` x tile (pipelined copies) and the generated
  ``[BLOCK_K, BLOCK_N]`` W tile in x's dtype into ``tl.dot`` (fp32 accumulation): the
  generation is amortised over ``BLOCK_M`` rows. Rows past M are clamped (computed, never
  stored). M = 1 takes the 16-row tile (sm_90, fp16: 10.5 instructions per weight; the GEMV
  took 16.6-18.4 under the previous, costlier hash).
* :func:`_hashed_gemv_kernel` (fp32 x up to ``gemv_max_m`` rows: exact fp32 products): a
  program owns ``BLOCK_N`` outputs, ``BLOCK_M`` (1-4) rows and a K split; it multiplies each
  W tile into a ``[BLOCK_M, BLOCK_K, BLOCK_N]`` fp32 accumulator elementwise (one FFMA per
  weight and row, no cross-thread reduction in the loop), reduced once after it.
* Split-K (``tuning.auto_split_k``) where the output tiles leave SMs idle.
* :func:`_hashed_grad_w_kernel` (the bucket gradient): a program computes ``G = grad_out[:,
  N tile]^T @ x[:, K tile]`` over its M range with ``tl.dot`` and adds ``sign * G`` into the
  fp32 ``[B]`` gradient with ``tl.atomic_add`` (``split_k`` splits M). Float atomics make the
  summation order, so the last bits of ``grad_w``, vary between GPU runs (the interpreter
  runs programs in order and is deterministic).

Roofline for one call (M, N, K), activations of ``e`` bytes: FLOPs ``2 M N K``; minimum HBM
bytes ``B e + M K e + M N e``. The weight costs no HBM bandwidth but SASS instructions, once
per row tile (``ceil(M / BLOCK_M)`` times): sm_90, fp16, ``OCTETS``, N = K = 8192, 10.5
per weight in the 16-row tile's loop under Triton 3.9 and 3.6 (the hash 2.5: ``R ^ C``, the
multiply, ptxas's second multiply for ``h << 1`` and re-made ``R ^ C`` under register
pressure; the bucket's address 3; the load 1; the octets' adds 0.3; the sign and the
packing 1.5; the MMA's shared-memory traffic and the x copies ~0.7), 10.9 with ``TRANS``
(``R`` per row and K step), 14.3-14.5 in the 256-row tile (8 warps: fewer weights per
thread per step). At M = 1 an H200 issues 3.3e13 thread-instructions per second against the
2.4e12 fp16 weights per second HBM gives a dense GEMV: the kernel is issue-bound and beats
dense below ~14 instructions per weight (static model: 1.27x at 10.5, 0.94x under the
previous hash's 14.4); from M = 256 the tensor cores bound it as they bound dense (0.97x).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from compress_ops.kernels import _launch as _launch_mod
from compress_ops.kernels._launch import dot_meta, grouped_tile, ptx, store_tile
from compress_ops.kernels.dequant import join8, kwidth_barrier
from compress_ops.kernels.formats.hashed import GOLD, MIX, check_inputs, check_seed
from compress_ops.kernels.tuning import (
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
    "KernelConfig",
    "hashed_matmul",
    "hashed_grad_w",
    "select_config",
    "gemm_tile",
    "select_grad_w_config",
    "get_autotune_configs",
    "audit_specs",
    "seed_args",
    "octets",
]

_FAMILY = "hashed"
_MIX = tl.constexpr(MIX)
_GOLD = tl.constexpr(GOLD)
# j GOLD mod 2**32: C(8a + j) = C(8a) + j GOLD (constants typed uint32 / int32 by Triton)
_G1 = tl.constexpr((1 * GOLD) & 0xFFFFFFFF)
_G2 = tl.constexpr((2 * GOLD) & 0xFFFFFFFF)
_G3 = tl.constexpr((3 * GOLD) & 0xFFFFFFFF)
_G4 = tl.constexpr((4 * GOLD) & 0xFFFFFFFF)
_G5 = tl.constexpr((5 * GOLD) & 0xFFFFFFFF)
_G6 = tl.constexpr((6 * GOLD) & 0xFFFFFFFF)
_G7 = tl.constexpr((7 * GOLD) & 0xFFFFFFFF)
#: ``KROWS`` (the GEMM's ``OCTETS`` tile, Triton before 3.9): the octets along the position
#: tile's rows (:func:`_w_octet_rows`), not its columns. The gathers' pointers have no
#: contiguity, and Triton 3.6's Coalesce then puts a warp's lanes along dim 0 (3.9: dim 1):
#: with the octets along dim 1 the W tile's lanes ran across its 8-element register runs, so
#: 3.6 chose a shared layout the runs do not follow (2-byte STS per weight, not one STS.128
#: per 8) and, a ``#linear`` layout equal to the loads' ``#blocked`` not being recognised,
#: hashed every weight twice (once for the gather, once for the sign's ``hl``). Measured on
#: 3.6 and 3.9 only, under the previous hash (sm_90 fp16 N = K = 8192, M = 16: 3.6 24.5 ->
#: 14.4 instructions per weight with :func:`~compress_ops.kernels.dequant.kwidth_barrier`;
#: 3.9's path unchanged). Under the current hash: 3.6 10.45 with ``KROWS``, 14.5 without;
#: 3.9 10.45 without, 10.42 with at M = 16 but 13.5 (not 10.8) at M = 64, 11.7 (not 10.9)
#: transposed: the gate stays.
_KROWS = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_hash(n, seed):
    """The format's row hash ``R(n) = fmix(n ^ seed)`` of rows ``n`` (uint32; ``seed`` int32
    holding the seed's bits)."""
    h = n.to(tl.uint32) ^ seed.to(tl.uint32)
    h = ((h >> 16) ^ h) * _MIX
    h = ((h >> 16) ^ h) * _MIX
    return (h >> 16) ^ h


@triton.jit
def _col_hash(k):
    """The format's column hash ``C(k) = k GOLD`` (uint32, mod 2**32)."""
    return k.to(tl.uint32) * _GOLD


@triton.jit
def _hash(n, k, seed):
    """The format's 32-bit hash ``h = (R(n) ^ C(k)) MIX`` of positions ``(n, k)`` (``n`` and
    ``k`` broadcast against each other; ``R`` and ``C`` made before they do)."""
    return (_row_hash(n, seed) ^ _col_hash(k)) * _MIX


@triton.jit
def _bucket_ptrs(ptr, h, B, ASM: tl.constexpr):
    """``ptr + umulhi(h << 1, B)``: the addresses of the buckets of hashes ``h`` (their low 31
    bits scaled to ``[0, B)``; 4 SASS instructions: the shift (ptxas makes it a multiply of
    ``R ^ C`` by ``2 MIX``), ``IMAD.HI.U32``, ``LEA``, ``LEA.HI.X``; a ``shf.l`` with an
    opaque zero instead of the shift measured 11.6 per weight, not 10.5: ptxas then keeps
    both in the chain). ``ASM`` (a GPU): the multiply-high is PTX ``mul.hi.u32``, opaque to LLVM,
    which otherwise fuses ``umulhi(h, B) * itemsize`` into a 64-bit product and shifts (8
    instructions; an int32 offset costs a sign extension). A ``mad.wide.u32`` address in PTX
    compiles to the same LEA pair."""
    if ASM:
        bucket = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, 1; mul.hi.u32 $0, t, $2; }", "=r,r,r",
            [h, B.to(tl.uint32)], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        bucket = tl.umulhi(h << 1, B.to(tl.uint32))
    return ptr + bucket


@triton.jit
def _gather(wbits_ptr, x, B, mpos, lim, MASKED: tl.constexpr, ASM: tl.constexpr):
    """``(bits, h)``: the hash ``h = x MIX`` of the weights whose ``R(n) ^ C(k)`` is ``x``
    and their buckets' bits from ``wbits_ptr`` (w viewed as int16 / int32), unsigned.
    ``MASKED``: where ``mpos >= lim`` (a ragged K) the bits are 0."""
    h = x * _MIX
    ptrs = _bucket_ptrs(wbits_ptr, h, B, ASM)
    if MASKED:
        bits = tl.load(ptrs, mask=mpos < lim, other=0)
    else:
        bits = tl.load(ptrs)
    return bits, h


@triton.jit
def _w_tile(wbits_ptr, x, B, mpos, lim, MASKED: tl.constexpr, SIGN_SHIFT: tl.constexpr,
            DTYPE: tl.constexpr, ASM: tl.constexpr):
    """The virtual weights of :func:`_gather` in ``DTYPE``: the sign bit XORed by ``h``'s top
    bit."""
    bits, h = _gather(wbits_ptr, x, B, mpos, lim, MASKED, ASM)
    sgn = (h >> (31 - SIGN_SHIFT)) & (1 << SIGN_SHIFT)
    bits = bits ^ sgn.to(bits.dtype)
    return bits.to(DTYPE, bitcast=True)


@triton.jit
def _sign_pairs(v, hs):
    """PTX on register pairs of a 16-bit tile: ``v ^ (hs & 0x80008000)``, ``hs`` the hashes'
    high halves packed as ``v`` is (one PRMT per pair builds it, as it builds ``v``): one
    LOP3 per pair."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 m; mov.b32 m, 0x80008000; lop3.b32 $0, $1, $2, m, 0x78; }",
        "=r,r,r", [v, hs], dtype=tl.int16, is_pure=True, pack=2)


@triton.jit
def _hi(h):
    """``h``'s high half (its sign bit at bit 15), int16."""
    return (h >> 16).to(tl.int16)


@triton.jit
def _w_octets(wbits_ptr, r, c, B, mpos, lim, MJ: tl.constexpr, MASKED: tl.constexpr,
              SIGN_SHIFT: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """A ``[R, 8 C]`` W tile from row hashes ``r`` and octet column hashes ``c`` (``C(8a)``;
    broadcast to ``[R, C]``): column ``8 c + j`` has ``C(8a + j) = C(8a) + j GOLD`` (an add
    per column a thread holds, not per weight), so a weight's hash is ``(r ^ (c + j GOLD))
    MIX``. The eight are interleaved in registers (``tl.join``): a thread holds 8 adjacent
    columns. ``mpos + j MJ`` is column ``8 c + j``'s masked coordinate (``MJ`` 1: the columns
    run along K; 0: along N)."""
    if ASM and SIGN_SHIFT == 15:  # 16-bit weights on a GPU: the sign on packed pairs
        b0, h0 = _gather(wbits_ptr, r ^ c, B, mpos, lim, MASKED, ASM)
        b1, h1 = _gather(wbits_ptr, r ^ (c + _G1), B, mpos + MJ, lim, MASKED, ASM)
        b2, h2 = _gather(wbits_ptr, r ^ (c + _G2), B, mpos + 2 * MJ, lim, MASKED, ASM)
        b3, h3 = _gather(wbits_ptr, r ^ (c + _G3), B, mpos + 3 * MJ, lim, MASKED, ASM)
        b4, h4 = _gather(wbits_ptr, r ^ (c + _G4), B, mpos + 4 * MJ, lim, MASKED, ASM)
        b5, h5 = _gather(wbits_ptr, r ^ (c + _G5), B, mpos + 5 * MJ, lim, MASKED, ASM)
        b6, h6 = _gather(wbits_ptr, r ^ (c + _G6), B, mpos + 6 * MJ, lim, MASKED, ASM)
        b7, h7 = _gather(wbits_ptr, r ^ (c + _G7), B, mpos + 7 * MJ, lim, MASKED, ASM)
        v = _interleave(_interleave(_interleave(b0, b4), _interleave(b2, b6)),
                        _interleave(_interleave(b1, b5), _interleave(b3, b7)))
        hs = _interleave(_interleave(_interleave(_hi(h0), _hi(h4)), _interleave(_hi(h2), _hi(h6))),
                         _interleave(_interleave(_hi(h1), _hi(h5)), _interleave(_hi(h3), _hi(h7))))
        out = _sign_pairs(v, hs).to(DTYPE, bitcast=True)
    else:
        w0 = _w_tile(wbits_ptr, r ^ c, B, mpos, lim, MASKED, SIGN_SHIFT, DTYPE, ASM)
        w1 = _w_tile(wbits_ptr, r ^ (c + _G1), B, mpos + MJ, lim, MASKED, SIGN_SHIFT, DTYPE, ASM)
        w2 = _w_tile(wbits_ptr, r ^ (c + _G2), B, mpos + 2 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w3 = _w_tile(wbits_ptr, r ^ (c + _G3), B, mpos + 3 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w4 = _w_tile(wbits_ptr, r ^ (c + _G4), B, mpos + 4 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w5 = _w_tile(wbits_ptr, r ^ (c + _G5), B, mpos + 5 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w6 = _w_tile(wbits_ptr, r ^ (c + _G6), B, mpos + 6 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w7 = _w_tile(wbits_ptr, r ^ (c + _G7), B, mpos + 7 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        out = _interleave(_interleave(_interleave(w0, w4), _interleave(w2, w6)),
                          _interleave(_interleave(w1, w5), _interleave(w3, w7)))
    return out


@triton.jit
def _w_octet_rows(wbits_ptr, r, c, B, mpos, lim, MJ: tl.constexpr, MASKED: tl.constexpr,
                  SIGN_SHIFT: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """``KROWS``: :func:`_w_octets` with the octets along rows, a ``[8 R, C]`` tile from ``r``
    and ``c`` (broadcast to ``[R, C]``; ``c`` the octets' ``C(8a)``) whose row ``8 r + j``
    has ``C(8a) + j GOLD`` (``mpos + j MJ`` its masked coordinate), the eight joined and
    permuted into place in registers (:func:`~compress_ops.kernels.dequant.join8`)."""
    x0 = r ^ c
    R: tl.constexpr = x0.shape[0]
    C: tl.constexpr = x0.shape[1]
    if ASM and SIGN_SHIFT == 15:  # 16-bit weights on a GPU: the sign on packed pairs
        b0, h0 = _gather(wbits_ptr, x0, B, mpos, lim, MASKED, ASM)
        b1, h1 = _gather(wbits_ptr, r ^ (c + _G1), B, mpos + 1 * MJ, lim, MASKED, ASM)
        b2, h2 = _gather(wbits_ptr, r ^ (c + _G2), B, mpos + 2 * MJ, lim, MASKED, ASM)
        b3, h3 = _gather(wbits_ptr, r ^ (c + _G3), B, mpos + 3 * MJ, lim, MASKED, ASM)
        b4, h4 = _gather(wbits_ptr, r ^ (c + _G4), B, mpos + 4 * MJ, lim, MASKED, ASM)
        b5, h5 = _gather(wbits_ptr, r ^ (c + _G5), B, mpos + 5 * MJ, lim, MASKED, ASM)
        b6, h6 = _gather(wbits_ptr, r ^ (c + _G6), B, mpos + 6 * MJ, lim, MASKED, ASM)
        b7, h7 = _gather(wbits_ptr, r ^ (c + _G7), B, mpos + 7 * MJ, lim, MASKED, ASM)
        v = tl.permute(join8(b0, b1, b2, b3, b4, b5, b6, b7), (0, 2, 3, 4, 1))
        hs = tl.permute(join8(_hi(h0), _hi(h1), _hi(h2), _hi(h3), _hi(h4), _hi(h5), _hi(h6),
                               _hi(h7)), (0, 2, 3, 4, 1))
        out = _sign_pairs(v.reshape(8 * R, C), hs.reshape(8 * R, C)).to(DTYPE, bitcast=True)
    else:
        w0 = _w_tile(wbits_ptr, x0, B, mpos, lim, MASKED, SIGN_SHIFT, DTYPE, ASM)
        w1 = _w_tile(wbits_ptr, r ^ (c + _G1), B, mpos + 1 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w2 = _w_tile(wbits_ptr, r ^ (c + _G2), B, mpos + 2 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w3 = _w_tile(wbits_ptr, r ^ (c + _G3), B, mpos + 3 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w4 = _w_tile(wbits_ptr, r ^ (c + _G4), B, mpos + 4 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w5 = _w_tile(wbits_ptr, r ^ (c + _G5), B, mpos + 5 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w6 = _w_tile(wbits_ptr, r ^ (c + _G6), B, mpos + 6 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        w7 = _w_tile(wbits_ptr, r ^ (c + _G7), B, mpos + 7 * MJ, lim, MASKED, SIGN_SHIFT, DTYPE,
                     ASM)
        out = tl.permute(join8(w0, w1, w2, w3, w4, w5, w6, w7),
                         (0, 2, 3, 4, 1)).reshape(8 * R, C)
    return out


@triton.jit
def _interleave(a, b):
    """``[R, 2C]`` with ``a``'s columns at even and ``b``'s at odd indices (in registers)."""
    return tl.join(a, b).reshape(a.shape[0], 2 * a.shape[1])


@triton.jit
def _nb(nv, rv, cv, seed, J: tl.constexpr, GJ: tl.constexpr, TRANS: tl.constexpr):
    """``R(n) ^ C(k)`` of the ``J``-th output neighbour of :func:`_w_cols`' columns: ``TRANS``
    (the outputs are k) ``rv ^ (cv + J GOLD)`` (``GJ``: ``J GOLD mod 2**32``), else (the
    outputs are n) ``R(nv + J) ^ cv`` (loop-invariant, hoisted)."""
    if J == 0:
        x = rv ^ cv
    elif TRANS:
        x = rv ^ (cv + GJ)
    else:
        x = _row_hash(nv + J, seed) ^ cv
    return x


@triton.jit
def _w_cols(wbits_ptr, nv, rv, cv, seed, B, mpos, lim, MASKED: tl.constexpr,
            SIGN_SHIFT: tl.constexpr, DTYPE: tl.constexpr, JOIN: tl.constexpr,
            TRANS: tl.constexpr, ASM: tl.constexpr):
    """A ``[BLOCK_K, C << JOIN]`` W tile from the row indices ``nv``, row hashes ``rv`` and
    column hashes ``cv`` of its columns ``c << JOIN`` (broadcast to ``[BLOCK_K, C]``): column
    ``(c << JOIN) + j`` is output ``o + j`` (:func:`_nb`). The ``2**JOIN`` neighbours are
    generated apart and interleaved in registers (``tl.join``), so a thread holds
    ``2**JOIN`` adjacent columns: the tile goes to shared memory in ``2**JOIN``-element
    stores, and the GEMV loads x once per row of a thread's columns."""
    if JOIN == 0:
        out = _w_tile(wbits_ptr, rv ^ cv, B, mpos, lim, MASKED, SIGN_SHIFT, DTYPE, ASM)
    elif JOIN == 1:
        out = _interleave(
            _w_tile(wbits_ptr, rv ^ cv, B, mpos, lim, MASKED, SIGN_SHIFT, DTYPE, ASM),
            _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 1, _G1, TRANS), B, mpos, lim, MASKED,
                    SIGN_SHIFT, DTYPE, ASM))
    elif JOIN == 2:
        t0 = _w_tile(wbits_ptr, rv ^ cv, B, mpos, lim, MASKED, SIGN_SHIFT, DTYPE, ASM)
        t1 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 1, _G1, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t2 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 2, _G2, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t3 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 3, _G3, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        out = _interleave(_interleave(t0, t2), _interleave(t1, t3))
    else:
        t0 = _w_tile(wbits_ptr, rv ^ cv, B, mpos, lim, MASKED, SIGN_SHIFT, DTYPE, ASM)
        t1 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 1, _G1, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t2 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 2, _G2, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t3 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 3, _G3, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t4 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 4, _G4, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t5 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 5, _G5, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t6 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 6, _G6, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        t7 = _w_tile(wbits_ptr, _nb(nv, rv, cv, seed, 7, _G7, TRANS), B, mpos, lim, MASKED,
                     SIGN_SHIFT, DTYPE, ASM)
        out = _interleave(_interleave(_interleave(t0, t4), _interleave(t2, t6)),
                          _interleave(_interleave(t1, t5), _interleave(t3, t7)))
    return out


@triton.jit
def _start(t_begin, pid_o, seed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           TRANS: tl.constexpr, OCTETS: tl.constexpr, JOIN: tl.constexpr,
           KROWS: tl.constexpr = False):
    """``(nv, rv, cv)``: a program's first position tile as its rows ``n`` (uint32), their
    hashes ``R(n)`` and its columns' hashes ``C(k)``, each in the shape it broadcasts from
    (the hashes are made per row and per column, not per weight). ``OCTETS``: one column per
    8 weights, ``C(8a)`` (:func:`_w_octets`; ``[BLOCK_K, BLOCK_N / 8]`` with ``TRANS``, whose
    octets run along the outputs, else ``[BLOCK_N, BLOCK_K / 8]``, octets along the
    reduction; ``KROWS``: the transposes, :func:`_w_octet_rows`); else ``[BLOCK_K, BLOCK_N
    >> JOIN]`` (:func:`_w_cols`). Per K step (:func:`_advance`) ``TRANS`` moves the rows
    (``R`` made again, per row), else the columns (``C`` advanced by one add)."""
    offs_k = t_begin * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    if OCTETS:
        if TRANS:
            offs_n = offs_k
            offs_c = pid_o * BLOCK_N + 8 * tl.arange(0, BLOCK_N // 8)
        else:
            offs_n = offs_o
            offs_c = t_begin * BLOCK_K + 8 * tl.arange(0, BLOCK_K // 8)
        if KROWS:
            nv = offs_n.to(tl.uint32)[None, :]
            cv = _col_hash(offs_c)[:, None]
        else:
            nv = offs_n.to(tl.uint32)[:, None]
            cv = _col_hash(offs_c)[None, :]
    else:
        offs_c = pid_o * BLOCK_N + (tl.arange(0, BLOCK_N >> JOIN) << JOIN)
        if TRANS:
            nv = offs_k.to(tl.uint32)[:, None]
            cv = _col_hash(offs_c)[None, :]
        else:
            nv = offs_c.to(tl.uint32)[None, :]
            cv = _col_hash(offs_k)[:, None]
    return nv, _row_hash(nv, seed), cv


@triton.jit
def _advance(nv, rv, cv, seed, BLOCK_K: tl.constexpr, TRANS: tl.constexpr):
    """The next K step's ``(nv, rv, cv)`` (:func:`_start`): ``TRANS`` the rows move by
    ``BLOCK_K`` (their ``R`` made again), else the columns (``C += BLOCK_K GOLD``)."""
    if TRANS:
        nv = nv + BLOCK_K
        rv = _row_hash(nv, seed)
    else:
        STEP: tl.constexpr = (BLOCK_K * _GOLD) & 0xFFFFFFFF
        cv = cv + STEP
    return nv, rv, cv


@triton.jit
def _w_step(wbits_ptr, nv, rv, cv, seed, kt, K, B, BLOCK_K: tl.constexpr,
            TRANS: tl.constexpr, OCTETS: tl.constexpr, MASKED: tl.constexpr,
            JOIN: tl.constexpr, SIGN_SHIFT: tl.constexpr, DTYPE: tl.constexpr,
            ASM: tl.constexpr, KROWS: tl.constexpr = False):
    """K step ``kt``'s ``[BLOCK_K, BLOCK_N]`` W tile (``Wv``: ``W^T``, or ``W`` with
    ``TRANS``) from its rows and hashes (:func:`_start`); ``MASKED``: rows at or past ``K``
    read 0."""
    if OCTETS:
        if TRANS and KROWS:
            mpos = kt * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
            w = tl.trans(_w_octet_rows(wbits_ptr, rv, cv, B, mpos, K, 0, MASKED, SIGN_SHIFT,
                                       DTYPE, ASM))
        elif TRANS:
            mpos = kt * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
            w = _w_octets(wbits_ptr, rv, cv, B, mpos, K, 0, MASKED, SIGN_SHIFT, DTYPE, ASM)
        elif KROWS:
            mpos = kt * BLOCK_K + 8 * tl.arange(0, BLOCK_K // 8)[:, None]
            w = _w_octet_rows(wbits_ptr, rv, cv, B, mpos, K, 1, MASKED, SIGN_SHIFT, DTYPE, ASM)
        else:
            mpos = kt * BLOCK_K + 8 * tl.arange(0, BLOCK_K // 8)[None, :]
            w = tl.trans(_w_octets(wbits_ptr, rv, cv, B, mpos, K, 1, MASKED, SIGN_SHIFT, DTYPE,
                                   ASM))
    else:
        mpos = kt * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
        w = _w_cols(wbits_ptr, nv, rv, cv, seed, B, mpos, K, MASKED, SIGN_SHIFT, DTYPE, JOIN,
                    TRANS, ASM)
    return w


@triton.jit(do_not_specialize=["seed", "B"])
def _hashed_gemv_kernel(
    x_ptr, wbits_ptr, bias_ptr, y_ptr,
    M, N, K, KW, seed, B, tiles_per_split,
    stride_xm, stride_ym,
    TRANS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    JOIN: tl.constexpr,
    OCTETS: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    ASM: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ Wv[K, N]`` (+ bias): N and K are the call's outputs and reduction,
    ``Wv`` the virtual weight's ``[K, N]`` view, ``W^T`` (``KW``, the weight's row length, is
    K), or with ``TRANS`` ``W`` (``KW`` is N). Grid ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M),
    SPLIT_K)``;
    SPLIT_K > 1 adds fp32 partial tiles into a zeroed fp32 ``y`` (atomics). Rows past M are
    clamped (computed from a real row, never stored)."""
    pid_o = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kt = tl.arange(0, BLOCK_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, tl.cdiv(K, BLOCK_K))
    nv, rv, cv = _start(t_begin, pid_o, seed, BLOCK_N, BLOCK_K, TRANS, OCTETS, JOIN)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for kt in range(t_begin, t_end):
        x_k = x_rows + kt * BLOCK_K
        if EVEN_K:
            a = tl.load(x_k + offs_kt[None, :])
            w = _w_step(wbits_ptr, nv, rv, cv, seed, kt, K, B, BLOCK_K, TRANS, OCTETS, False,
                        JOIN, SIGN_SHIFT, x_ptr.dtype.element_ty, ASM)
        else:
            k_mask = kt * BLOCK_K + offs_kt < K
            a = tl.load(x_k + offs_kt[None, :], mask=k_mask[None, :], other=0.0)
            w = _w_step(wbits_ptr, nv, rv, cv, seed, kt, K, B, BLOCK_K, TRANS, OCTETS, True,
                        JOIN, SIGN_SHIFT, x_ptr.dtype.element_ty, ASM)
        acc3 += a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
        nv, rv, cv = _advance(nv, rv, cv, seed, BLOCK_K, TRANS)
    acc = tl.sum(acc3, axis=1)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_o, offs_m < M, offs_o < N, stride_ym, pid_k,
               HAS_BIAS, SPLIT_K)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["seed", "B"])
def _hashed_gemm_kernel(
    x_ptr, wbits_ptr, bias_ptr, y_ptr,
    M, N, K, KW, seed, B, tiles_per_split,
    stride_xm, stride_ym,
    TRANS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    JOIN: tl.constexpr,
    OCTETS: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    ASM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
    KROWS: tl.constexpr = False,
):
    """``y[M, N] = x[M, K] @ Wv[K, N]`` (+ bias) with ``tl.dot`` (N, K and ``KW`` as in the
    GEMV): grid ``(M tiles x N tiles, SPLIT_K)`` in grouped order; each K step generates the
    ``[BLOCK_K, BLOCK_N]`` W tile once for the CTA's ``BLOCK_M`` rows. Rows past M are
    clamped (computed, never stored)."""
    pid_m, pid_o = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kt = tl.arange(0, BLOCK_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, tl.cdiv(K, BLOCK_K))
    nv, rv, cv = _start(t_begin, pid_o, seed, BLOCK_N, BLOCK_K, TRANS, OCTETS, JOIN, KROWS)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(t_begin, t_end):
        x_k = x_rows + kt * BLOCK_K
        if EVEN_K:
            a = tl.load(x_k + offs_kt[None, :])
            w = _w_step(wbits_ptr, nv, rv, cv, seed, kt, K, B, BLOCK_K, TRANS, OCTETS, False,
                        JOIN, SIGN_SHIFT, x_ptr.dtype.element_ty, ASM, KROWS)
        else:
            k_mask = kt * BLOCK_K + offs_kt < K
            a = tl.load(x_k + offs_kt[None, :], mask=k_mask[None, :], other=0.0)
            w = _w_step(wbits_ptr, nv, rv, cv, seed, kt, K, B, BLOCK_K, TRANS, OCTETS, True,
                        JOIN, SIGN_SHIFT, x_ptr.dtype.element_ty, ASM, KROWS)
        # (the barrier: Triton 3.6 gives a dot operand with a tl.join behind it kWidth 4)
        acc = _dot(a, kwidth_barrier(w, ASM), acc, DOT_PRECISION, UPCAST_DOT)
        nv, rv, cv = _advance(nv, rv, cv, seed, BLOCK_K, TRANS)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_o, offs_m < M, offs_o < N, stride_ym, pid_k,
               HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["seed", "B"])
def _hashed_grad_w_kernel(
    g_ptr, x_ptr, gw_ptr,
    M, N, K, seed, B, m_tiles_per_split,
    stride_gm, stride_xm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ASM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
):
    """``grad_w[b] += sum over the tile's (n, k) with bucket b of sign * G[n, k]``, ``G =
    grad_out[M range, N tile]^T @ x[M range, K tile]`` (fp32). Grid ``(N tiles x K tiles,
    M splits)``; fp32 atomics into the zeroed ``gw_ptr``."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    offs_mt = tl.arange(0, BLOCK_M)
    t_begin = pid_s * m_tiles_per_split
    t_end = min(t_begin + m_tiles_per_split, tl.cdiv(M, BLOCK_M))
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mt in range(t_begin, t_end):
        offs_m = mt * BLOCK_M + offs_mt
        m_mask = offs_m < M
        rows = offs_m.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows * stride_gm + offs_n[None, :],
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        a = tl.load(x_ptr + rows * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(tl.trans(g), a, acc, DOT_PRECISION, UPCAST_DOT)
    h = _hash(offs_n[:, None], offs_k[None, :], seed)
    val = (acc.to(tl.int32, bitcast=True) ^ (h & 0x80000000).to(tl.int32)).to(tl.float32,
                                                                                bitcast=True)
    tl.atomic_add(_bucket_ptrs(gw_ptr, h, B, ASM), val, mask=n_mask[:, None] & k_mask[None, :],
                  sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def select_config(m: int, o: int, r: int, device: torch.device,
                  dtype: torch.dtype = torch.float16) -> KernelConfig:
    """The tile of M's bucket from ``configs/hashed.json`` (the GPU's own table if shipped,
    else ``default``) for ``o`` outputs and a reduction of ``r``: the GEMV up to
    ``gemv_max_m`` rows for fp32 x (exact fp32 products), ``gemv_max_m_half`` (0) for fp16 /
    bf16 x, whose 16-row tensor-core tile executes fewer instructions per weight than the
    GEMV even at M = 1 (sm_90, ``OCTETS``: 10.5; the GEMV's 16.6-18.4 was measured under the
    previous hash); else the
    GEMM (fp32 x: at most 64 x 64 x 32, :func:`gemm_tile`). Split-K where the output tiles
    leave SMs idle (on a GPU)."""
    return _select_config(m, o, r, device, dtype, gpu_target(device))


@functools.lru_cache(maxsize=4096)  # per-call Python cost matters at decode
def _select_config(m: int, o: int, r: int, device: torch.device, dtype: torch.dtype,
                   target) -> KernelConfig:
    table = device_table(_FAMILY, device)
    if dtype != torch.float32:
        table = {**table, "gemv_max_m": table.get("gemv_max_m_half", table["gemv_max_m"])}
    cfg = gemm_tile(table_config(table, m), dtype)
    return auto_split_k(cfg, m, o, r, device)


def gemm_tile(cfg: KernelConfig, dtype: torch.dtype) -> KernelConfig:
    """A GEMM tile for x of ``dtype``: fp32 (``tl.dot`` in IEEE fp32 unless TF32 is allowed:
    FFMA, no tensor cores) at most 64 x 64 x 32, the table's warps kept (the audit: larger
    tiles spill, and so does 64 x 64 x 32 on 4 warps)."""
    if cfg.path == "gemm" and dtype == torch.float32:
        return KernelConfig(**{**cfg.__dict__, "block_m": min(cfg.block_m, 64),
                               "block_n": min(cfg.block_n, 64),
                               "block_k": min(cfg.block_k, 32)})
    return cfg


def select_grad_w_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """The bucket-gradient tile (the table's ``grad_w``); ``split_k`` here splits M, raised on
    a GPU while the ``N x K`` tiles leave SMs idle (each split keeps at least 4 M tiles)."""
    cfg = KernelConfig(path="gemm", **device_table(_FAMILY, device)["grad_w"])
    target = gpu_target(device)
    if target is None:
        return cfg
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(k, cfg.block_k)
    m_tiles = triton.cdiv(m, cfg.block_m)
    split = 1
    while tiles * split * 10 < target.sms * 9 and split * 2 <= min(64, m_tiles // 4):
        split *= 2
    return cfg.with_split_k(split)


def get_autotune_configs(m: int) -> list[KernelConfig]:
    """Candidates for M's bucket (``COMPRESS_OPS_AUTOTUNE=1``)."""
    bucket = m_bucket(m)
    out = []
    if bucket <= 4:
        for bn, bk, w in ((64, 64, 4), (32, 64, 4), (64, 32, 4), (128, 32, 8)):
            out.append(KernelConfig("gemv", bucket, bn, bk, w, 1))
    if bucket >= 2:
        bm = max(16, min(bucket, 64))
        for bn, bk, w in ((64, 64, 4), (128, 64, 8), (64, 32, 4)):
            out.append(KernelConfig("gemm", bm, bn, bk, w, 3))
    if bucket >= 128:
        for bm, bn, bk, w in ((128, 128, 64, 8), (256, 64, 64, 8), (128, 64, 64, 4),
                              (256, 128, 32, 8)):
            out.append(KernelConfig("gemm", bm, bn, bk, w, 3))
    return out


def audit_specs(defaults_only: bool = False) -> list[dict]:
    """Every (kernel, specialization) the static GPU audit compiles, recorded from real calls
    (CPU tensors configured as on an H200) with Triton's own specialization of their
    arguments: ``hashed_matmul`` at M = 1, 2, 4, every shipped GEMM bucket and 2048, fp16
    (and, unless ``defaults_only``, bf16 x, fp32 x (the GEMV and the GEMM), ragged K with and
    without ``OCTETS``, both directions), and ``hashed_grad_w``. The GEMM
    expects ``HGMMA`` on sm_90 from 64 rows, ``HMMA`` below; the GEMV and fp32 x without TF32
    (FFMA) no tensor cores.
    Empty under the interpreter (recording needs Triton's binder)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    from compress_ops.kernels import launches, tuning

    table = load_tables(_FAMILY)["default"]
    ms = sorted({1, 2, 4, *(int(b) for b in table["gemm"]), 2048})
    n = k = 8192
    calls = [("mm", m, n, k, torch.float16, False) for m in ms]
    if not defaults_only:  # (bf16 compiles as fp16 does; CI time: one call per regime)
        calls += [("mm", m, n, k, torch.bfloat16, False) for m in (16, 2048)]
        calls += [("mm", m, n, k, torch.float32, False) for m in (1, 16, 2048)]
        # ragged K: a multiple of 8 (octets) and not (a position per weight, rows unaligned)
        calls += [("mm", m, n, kk, torch.float16, tr) for m in (16, 2048)
                  for kk in (k - 40, k - 4) for tr in (False, True)]
        calls += [("mm", m, n, k, torch.float16, True) for m in (1, 16, 2048)]
    calls += [("gw", m, n, k, dt, False) for m in (16, 2048)
              for dt in ((torch.float16,) if defaults_only else
                         (torch.float16, torch.float32))]
    specs, seen = [], set()
    with tuning.simulate_gpu():
        for what, m, nn, kk, dt, trans in calls:
            w = torch.empty(nn * kk // 8, dtype=dt)
            with launches.capture(run=False) as got:
                if what == "mm":
                    x = torch.empty(m, nn if trans else kk, dtype=dt)
                    hashed_matmul(x, w, None, nn, kk, 12345, transpose=trans, checked=True)
                else:
                    hashed_grad_w(torch.empty(m, nn, dtype=dt), torch.empty(m, kk, dtype=dt),
                                  w.numel(), nn, kk, 12345)
            for la in got:
                if isinstance(la.kernel, str):
                    continue
                sig, consts, attrs, opts = launches.specialization(la.kernel, la.args,
                                                                   la.kwargs)
                key = (la.kernel.__name__, repr(sig), repr(sorted(consts.items())),
                       repr(attrs), opts.num_warps, opts.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                if (la.kernel is _hashed_gemv_kernel
                        or la.kwargs.get("DOT_PRECISION") == "ieee"):
                    mma = "-"  # the GEMV, and fp32 x without TF32 (FFMA)
                else:
                    mma = "HGMMA" if la.kwargs["BLOCK_M"] >= 64 else "HMMA"
                    if la.kernel is _hashed_grad_w_kernel:
                        mma = "HGMMA" if la.kwargs["BLOCK_N"] >= 64 else "HMMA"
                name = (f"real_m{m}n{nn}k{kk}/{what}/{str(dt).split('.')[-1]}"
                        f"{'/trans' if trans else ''}")
                specs.append({"kernel": la.kernel.__name__, "config": name, "fn": la.kernel,
                              "signature": sig, "constexprs": consts, "attrs": attrs,
                              "num_warps": opts.num_warps, "num_stages": opts.num_stages,
                              "expect_mma": mma})
    return specs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def seed_args(seed: int) -> int:
    """The seed's bits as a signed int32 (the kernels' ``seed``: int32, so every seed compiles
    alike; :func:`_row_hash` reads it back as uint32)."""
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def octets(k: int, trans: bool, cfg: KernelConfig) -> bool:
    """``OCTETS``: the kernels keep one column hash per 8 weights (:func:`_w_octets`) where
    every octet starts at a multiple of 8: the weight's rows ``K % 8 == 0`` and tiles of 8+ columns
    along the octets' dimension (N with ``trans``, else K)."""
    return k % 8 == 0 and (cfg.block_n if trans else cfg.block_k) >= 8


def _matmul_launch(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int,
                   k: int, seed: int, trans: bool, cfg: KernelConfig) -> torch.Tensor:
    m = x2.shape[0]
    o, r = (k, n) if trans else (n, k)
    y = _launch_mod.output(m, o, x2, cfg.split_k)
    tiles = triton.cdiv(triton.cdiv(r, cfg.block_k), cfg.split_k)
    wbits = w.view(_BITS[w.dtype])
    bp = bias if bias is not None else x2  # a dummy pointer, never read
    common = dict(TRANS=trans, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                  EVEN_K=r % cfg.block_k == 0, JOIN=min(3, cfg.block_n.bit_length() - 1),
                  OCTETS=octets(k, trans, cfg),
                  SIGN_SHIFT=8 * w.element_size() - 1, ASM=ptx(x2),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x2, wbits, bp, y, m, o, r, k, seed_args(seed), w.numel(), tiles, x2.stride(0),
            y.stride(0))
    if cfg.path == "gemv":
        grid = (triton.cdiv(o, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        _launch_mod.launch(_hashed_gemv_kernel, grid, *args, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(o, cfg.block_n), cfg.split_k)
        _launch_mod.launch(_hashed_gemm_kernel, grid, *args, GROUP_M=cfg.group_m, **common,
                           **dot_meta(x2), KROWS=_KROWS)
    return _launch_mod.finish(y, x2, cfg.split_k)


def hashed_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int, k: int,
                  seed: int, *, transpose: bool = False, config: KernelConfig | None = None,
                  checked: bool = False) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W^T (+ bias)``, ``W [N, K]`` the hashed virtual weight of the
    buckets ``w [B]`` and ``seed``; ``transpose=True``: ``y[..., K] = x[..., N] @ W`` (the
    input gradient; no bias). Output in x's dtype, fp32 accumulation. Runs on x's device
    (CUDA, or the CPU under ``TRITON_INTERPRET=1``). ``config`` overrides the tuned default;
    ``COMPRESS_OPS_AUTOTUNE=1`` (CUDA) times :func:`get_autotune_configs` once per shape;
    ``checked=True`` skips validation."""
    if not checked:
        if transpose:
            if bias is not None:
                raise ValueError("hashed_matmul(transpose=True) takes no bias")
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != n:
                raise ValueError(f"x last dim ({x.shape[-1]}) must equal out_features (N={n}) "
                                 f"for the transposed product x @ W")
            check_inputs(x, w, None, k, n, seed)
        else:
            check_inputs(x, w, bias, n, k, seed)
    lead = x.shape[:-1]
    o, r = (k, n) if transpose else (n, k)
    m = math.prod(lead)
    if m == 0:
        return x.new_empty(*lead, o)
    x2 = x.reshape(m, r).contiguous()
    w = w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if config is None:
        if x.device.type == "cuda" and os.environ.get("COMPRESS_OPS_AUTOTUNE") == "1":
            key = (_FAMILY, m_bucket(m), n, k, transpose, x.dtype, bias is not None,
                   device_name(x.device))
            config = autotune(key, [auto_split_k(gemm_tile(c, x.dtype), m, o, r, x.device)
                                    for c in get_autotune_configs(m)],
                              lambda c: _matmul_launch(x2, w, bias, n, k, seed, transpose, c))
        else:
            config = select_config(m, o, r, x.device, x.dtype)
    return _matmul_launch(x2, w, bias, n, k, seed, transpose, config).reshape(*lead, o)


def hashed_grad_w(grad_out: torch.Tensor, x: torch.Tensor, buckets: int, n: int, k: int,
                  seed: int, *, config: KernelConfig | None = None) -> torch.Tensor:
    """The buckets' gradient, fp32 ``[buckets]``: ``grad_w[b] = sum over (n, k) with
    bucket(n, k) = b of sign(n, k) * sum_m grad_out[m, n] x[m, k]`` (``grad_out[..., N]``,
    ``x[..., K]``, same leading dims and dtype). fp32 atomics: the order of the sums, so the
    last bits, vary between GPU runs. ``config.split_k`` splits M."""
    check_seed(seed)
    if grad_out.shape[-1] != n or x.shape[-1] != k or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out [..., {n}] and x [..., {k}] must share their leading dims, "
                         f"got {tuple(grad_out.shape)} and {tuple(x.shape)}")
    if x.dtype not in _BITS:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out dtype {grad_out.dtype} must match x dtype {x.dtype}")
    if grad_out.device != x.device:
        raise ValueError(f"grad_out on {grad_out.device} but x on {x.device}")
    if not 1 <= buckets < 1 << 31:
        raise ValueError(f"buckets must be in [1, 2**31), got {buckets}")
    m = math.prod(x.shape[:-1])
    _launch_mod.record_torch("torch.zeros")
    gw = torch.zeros(buckets, device=x.device, dtype=torch.float32)
    if m == 0:
        return gw
    g2 = grad_out.reshape(m, n).contiguous()
    x2 = x.reshape(m, k).contiguous()
    cfg = config or select_grad_w_config(m, n, k, x.device)
    m_tiles = triton.cdiv(m, cfg.block_m)
    per = triton.cdiv(m_tiles, cfg.split_k)
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(k, cfg.block_k), triton.cdiv(m_tiles, per))
    _launch_mod.launch(_hashed_grad_w_kernel, grid, g2, x2, gw, m, n, k, seed_args(seed),
                       buckets, per, g2.stride(0), x2.stride(0), BLOCK_M=cfg.block_m,
                       BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ASM=ptx(x2),
                       num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, **dot_meta(x2))
    return gw
