"""2:4 structured sparsity: Triton matmul kernels, their configs and launchers.

The packed format (``values`` + ``meta``), its packing and checks:
:mod:`compress_ops.kernels.formats.sparse24`.

Kernels
-------
``y[M, N] = x[M, K] @ W^T (+ bias)`` reading only ``values`` and ``meta``:

* :func:`_sparse24_gemv_kernel` (small M, memory-bound): never builds a dense tile. Each kept
  weight ``values[n, j]`` is multiplied by its own activation ``x[m, 4 * (j // 2) + pos]``,
  gathered from the (L1/L2-resident) activation rows; fp32 accumulate, one program per
  ``BLOCK_N`` output features.
* :func:`_sparse24_matmul_kernel` (large M, compute-bound): tiled GEMM with grouped program order
  (L2 reuse of the weight tiles across M), software pipelining (``num_stages``), optional split-K
  for skinny M. Each ``[BLOCK_K, BLOCK_N]`` weight tile is decompressed in registers from its
  compact ``values``/``meta`` tiles and fed to ``tl.dot`` (tensor cores).

Roofline for one call (M, N, K), activations of ``e`` bytes:
FLOPs (dense-equivalent) ``2 M N K``; useful FLOPs ``M N K``; minimum bytes
``N K (e / 2 + 1 / 8) + M K e + M N e (+ N e bias)``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from compress_ops.kernels import _launch as _launch_mod
from compress_ops.kernels._launch import dot_meta, grouped_tile, prmt, ptx, store_tile
from compress_ops.kernels.formats.sparse24 import check_inputs, padded_k
from compress_ops.kernels.tuning import (
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
    "sparse24_matmul",
    "KernelConfig",
    "select_config",
    "semi_structured_min_m",
    "get_autotune_configs",
    "autotuned_config",
    "audit_specs",
]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sparse24_gemv_kernel(
    # pointers
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, KP_HALF,
    # strides
    stride_xm, stride_vn, stride_mn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    """Small-M path: y[M, N] = x[M, K] @ W^T (+ bias), W 2:4 compressed.

    Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)). Each program walks the whole K for BLOCK_N
    output features and BLOCK_M rows. BLOCK_KH stored values (2 * BLOCK_KH dense columns) per
    step; each stored value multiplies its own gathered activation, so no dense tile exists.

    Non-finite activations: a NaN or Inf in ``x[m]`` at a column that a row prunes makes
    ``0 * x = NaN`` in the dense product, but the gather never reads that column. So each step
    also loads the ``[BLOCK_M, 2 BLOCK_KH]`` activation block densely (contiguous: the lines
    the gather reads, from L1) and accumulates ``x * 0`` (0, or NaN for NaN / +-Inf); its sum
    is added to every output of the row once at the end: a row of ``x`` holding a non-finite
    value gives NaN in every output (the dense product gives NaN, or +-Inf in the outputs
    whose weight rows keep every such column; the GEMM path gives exactly that).
    Cost per step: one vector load and ``2 BLOCK_M BLOCK_KH / (32 num_warps)`` FMAs per
    thread, against ``BLOCK_M BLOCK_N BLOCK_KH / (32 num_warps)`` gathers and FMAs; no HBM
    bytes.

    Roofline: 2 M N K dense-equivalent FLOPs (M N K useful); minimum bytes
    N K (e / 2 + 1 / 8) + M K e + M N e. Memory-bound at decode: the goal is HBM bandwidth.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    rows_n = offs_n.to(tl.int64)
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    x_rows = x_row[:, :, None]  # [BM, 1, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nonfinite = tl.zeros((BLOCK_M, 2 * BLOCK_KH), dtype=tl.float32)  # sum x * 0: 0 or NaN
    for j0 in range(0, KP_HALF, BLOCK_KH):
        offs_k = 2 * j0 + tl.arange(0, 2 * BLOCK_KH)  # the dense columns of this step
        xd = tl.load(x_row + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                     other=0.0)
        nonfinite += xd.to(tl.float32) * 0.0
        offs_j = j0 + tl.arange(0, BLOCK_KH)  # stored-value index along the row
        j_mask = offs_j < KP_HALF
        vn_mask = n_mask[:, None] & j_mask[None, :]
        v = tl.load(values_ptr + rows_n[:, None] * stride_vn + offs_j[None, :],
                    mask=vn_mask, other=0.0)
        # one metadata word per 16 values, loaded once and broadcast in registers
        offs_w = j0 // 16 + tl.arange(0, BLOCK_KH // 16)
        words = tl.load(meta_ptr + rows_n[:, None] * stride_mn + offs_w[None, :],
                        mask=n_mask[:, None] & (offs_w < KP_HALF // 16)[None, :], other=0)
        word = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, BLOCK_KH // 16, 16)),
                          (BLOCK_N, BLOCK_KH))
        pos = (word >> ((offs_j % 16) * 2)[None, :]) & 3
        col = (offs_j // 2 * 4)[None, :] + pos  # dense column of each stored value [BN, BKH]
        xg = tl.load(x_rows + col[None, :, :],
                     mask=m_mask[:, None, None] & (vn_mask & (col < K))[None, :, :],
                     other=0.0)  # [BM, BN, BKH]
        acc += tl.sum(xg.to(tl.float32) * v.to(tl.float32)[None, :, :], axis=2)
    acc += tl.sum(nonfinite, axis=1)[:, None]

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# the tiles' selector lookup (_group_columns): sel = prmt(_SEL_TA, _SEL_TB, n * _SEL_M + _SEL_OFF)
# is 0x54 << 8 p0 | 0x76 << 8 p1 for each of the six position pairs n = p0 | p1 << 2 (found by
# search; tests/kernels/test_sparse24.py checks all six against the definition)
_SEL_TA = tl.constexpr(0x00000054)
_SEL_TB = tl.constexpr(0x76545476)
_SEL_M = tl.constexpr(0xFD2C)
_SEL_OFF = tl.constexpr(0x9DC5)


@triton.jit
def _group_columns(pairs, nib, tab_a, ASM: tl.constexpr):
    """A group's four dense columns as two registers ``(lo, hi)`` (columns 0, 1 and 2, 3;
    little endian) from its value pair (``pairs``: the two two-byte values in one int32) and its
    metadata nibble ``nib = p0 | p1 << 2`` (clean: bits above 3 zero).

    Three permutes and a multiply-add: ``nib * _SEL_M + _SEL_OFF`` gives each column a table
    index in its selector nibble, one permute of the table (``tab_a``: ``_SEL_TA`` in a
    register; ``_SEL_TB`` an immediate) turns them into the selector bytes
    ``0x54 << 8 p0 | 0x76 << 8 p1`` (0x54 / 0x76 pick the pair's first / second value from the
    permute's second operand, 0x00 a zero byte from its first), and two permutes build the
    columns."""
    sel = prmt(tab_a, _SEL_TB, nib * _SEL_M + _SEL_OFF, ASM, False, True)
    lo = prmt(pairs * 0, pairs, sel, ASM, False)
    hi = prmt(pairs * 0, pairs, sel >> 16, ASM, False)
    return lo, hi


@triton.jit
def _table_register(shape: tl.constexpr, ASM: tl.constexpr):
    """``_SEL_TA`` in a register of each thread, made once before the loop (the permute's
    first operand takes no immediate, and a uniform register would be copied before every
    use)."""
    tab_a = tl.full(shape, _SEL_TA, tl.int32)
    if ASM:
        tab_a = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tab_a],
                                          dtype=tl.int32, is_pure=False, pack=1)
    return tab_a


@triton.jit
def _decompress_tile(values_ptr, meta_ptr, rows_n, n_mask, g0,
                     stride_vn, stride_mn, KP_HALF,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr = False,
                     table=_SEL_TA, META_FIRST: tl.constexpr = False):
    """Dense K-major ``[BLOCK_K, BLOCK_N]`` tile of W^T starting at group ``g0`` (column 4 g0).

    The two stored values of a group are adjacent, so one integer twice their width loads both
    (``[BLOCK_K / 4, BLOCK_N]`` pairs, contiguous along K: vector loads, no strided 16-bit
    loads); one int32 metadata word covers 8 groups. The four positions are expanded with
    joins, which keep a group inside one thread: no shared-memory round trip, no gathers. The
    tile is built K-major, ready to be the B operand of ``tl.dot`` with no ``tl.trans``
    (Triton 3.6 cannot lower a transposed joined tile to a wgmma shared layout).

    Two-byte values are placed by byte permutes (:func:`_group_columns`: a multiply-add and
    three permutes per group), where the ``tl.where`` chains (four-byte values) take twelve
    compares and selects and more. ``table``: :func:`_table_register`. ``META_FIRST``: the metadata
    words are loaded before the values (the tiles of 64+ rows: Triton 3.9's SASS then takes
    8.8 instead of 10.75 instructions per element at 64 rows; the 16-row tile loses, 7.0 ->
    7.75; Triton 3.6 is the same either way).
    """
    G: tl.constexpr = BLOCK_K // 4
    VT: tl.constexpr = values_ptr.dtype.element_ty
    offs_g = g0 + tl.arange(0, G)
    g_mask = (offs_g < KP_HALF // 2)[:, None] & n_mask[None, :]
    pair_offs = rows_n[None, :] * (stride_vn // 2) + offs_g[:, None]
    meta_ptrs = meta_ptr + rows_n[None, :] * stride_mn + (offs_g // 8)[:, None]
    if META_FIRST:
        word = tl.load(meta_ptrs, mask=g_mask, other=0)
    if VT.primitive_bitwidth == 16:  # both values of a group in one int32 (little endian)
        pairs = tl.load(values_ptr.to(tl.pointer_type(tl.int32)) + pair_offs, mask=g_mask,
                        other=0)
    else:
        pairs = tl.load(values_ptr.to(tl.pointer_type(tl.int64)) + pair_offs, mask=g_mask,
                        other=0)
    if not META_FIRST:
        word = tl.load(meta_ptrs, mask=g_mask, other=0)
    nib = word >> ((offs_g % 8) * 4)[:, None]  # p0 in bits 0-1, p1 in bits 2-3
    if VT.primitive_bitwidth == 16:
        lo, hi = _group_columns(pairs, nib & 0xF, table, ASM)
        w0 = lo.to(tl.int16).to(VT, bitcast=True)
        w1 = (lo >> 16).to(tl.int16).to(VT, bitcast=True)
        w2 = hi.to(tl.int16).to(VT, bitcast=True)
        w3 = (hi >> 16).to(tl.int16).to(VT, bitcast=True)
    else:
        v0 = (pairs & 0xFFFFFFFF).to(tl.uint32).to(VT, bitcast=True)
        v1 = ((pairs >> 32) & 0xFFFFFFFF).to(tl.uint32).to(VT, bitcast=True)
        p0 = nib & 3
        p1 = (nib >> 2) & 3
        zero = tl.zeros_like(v0)
        w0 = tl.where(p0 == 0, v0, zero)
        w1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        w2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        w3 = tl.where(p1 == 3, v1, zero)
    # join(join(w0, w2), join(w1, w3))[g, n, i, t] = w_{2i + t}; permuted to [g, i, t, n] the
    # row index g * 4 + 2i + t is the dense column.
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(tl.permute(w, (0, 2, 3, 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def _x_order(BLOCK_K: tl.constexpr):
    """The dense column of x that slot ``s`` of a ``SWAP_AB`` K tile holds
    (:func:`_decompress_frag`): slot ``16 j + 8 c + 2 t + e`` holds column
    ``t (BLOCK_K / 4) + 4 j + 2 c + e`` (thread ``t`` of a quad owns the ``BLOCK_K / 16``
    consecutive groups from ``t BLOCK_K / 16``). Pairs of slots are adjacent columns."""
    s = tl.arange(0, BLOCK_K)
    col = ((s >> 1) & 3) * (BLOCK_K // 4) + (s >> 4) * 4 + ((s >> 3) & 1) * 2 + (s & 1)
    return tl.max_contiguous(tl.multiple_of(col, 2), 2)


@triton.jit
def _row_order(BLOCK_N: tl.constexpr, WARPS: tl.constexpr):
    """The weight row each row of a ``SWAP_AB`` tile loads. The load lays row
    ``r = g + 8 w + 8 WARPS q`` out in lane ``g``, warp ``w``, register ``q``; the wgmma's
    fragment wants row ``g + 8 (q % 2) + 16 (w % 4) + 64 (w // 4) + 16 WARPS (q // 2)`` there
    (a warpgroup per 64 rows); :func:`_decompress_frag` moves the rows back with a reshape that
    the layouts make free."""
    r = tl.arange(0, BLOCK_N)
    q = r // (8 * WARPS)
    w = (r >> 3) % WARPS
    return (q >> 1) * (16 * WARPS) + (w >> 2) * 64 + (w & 3) * 16 + (q & 1) * 8 + (r & 7)


@triton.jit
def _decompress_frag(values_ptr, meta_ptr, rows_n, n_mask, g0, stride_vn, stride_mn, KP_HALF,
                     tab_a, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, WARPS: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` tile of W (two-byte values) in the slot order of
    :func:`_x_order`: the first operand of ``tl.dot(w, x^T)`` (``SWAP_AB``), which a wgmma
    reads from registers.

    An mma fragment gives thread ``t`` of a quad the slot pairs ``(2 t, 2 t + 1)`` and
    ``(2 t + 8, 2 t + 9)`` of every 16-slot block ``j``: here the two column pairs (0, 1) and
    (2, 3) of one group, the group ``t (BLOCK_K / 16) + j``. So each thread's groups are
    consecutive (its value pairs one vector load, its metadata nibbles one word), each group
    is expanded where it was loaded (:func:`_group_columns`), and
    the tile needs no data movement on its way into the dot. x is loaded in the same order."""
    J: tl.constexpr = BLOCK_K // 16  # groups per thread (one per 16-slot block)
    G: tl.constexpr = BLOCK_K // 4
    VT: tl.constexpr = values_ptr.dtype.element_ty
    offs_g = g0 + tl.arange(0, G)  # group t J + j of the tile
    if EVEN_K:
        g_mask = n_mask[:, None]
    else:
        g_mask = n_mask[:, None] & (offs_g < KP_HALF // 2)[None, :]
    pairs = tl.load(values_ptr.to(tl.pointer_type(tl.int32))
                    + (rows_n * (stride_vn // 2))[:, None] + offs_g[None, :], mask=g_mask,
                    other=0)
    # one metadata word per 8 groups, loaded once (a thread's J groups lie in one word)
    offs_w = g0 // 8 + tl.arange(0, G // 8)
    if EVEN_K:
        w_mask = n_mask[:, None]
    else:
        w_mask = n_mask[:, None] & (offs_w < KP_HALF // 16)[None, :]
    words = tl.load(meta_ptr + (rows_n * stride_mn)[:, None] + offs_w[None, :], mask=w_mask,
                    other=0)
    word = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, G // 8, 8)), (BLOCK_N, G))
    # the group's nibble n = p0 | p1 << 2 (tl.arange, not offs_g: g0 is a multiple of 8)
    nib = (word >> ((tl.arange(0, G) % 8) * 4)[None, :]) & 0xF
    # its four selector bytes, 0x54 << 8 p0 | 0x76 << 8 p1 (0x54 / 0x76: the value pair's
    # first / second value in prmt's second operand, 0x00: zero from the first), looked up in
    lo, hi = _group_columns(pairs, nib, tab_a, ASM)
    w0 = lo.to(tl.int16).to(VT, bitcast=True)
    w1 = (lo >> 16).to(tl.int16).to(VT, bitcast=True)
    w2 = hi.to(tl.int16).to(VT, bitcast=True)
    w3 = (hi >> 16).to(tl.int16).to(VT, bitcast=True)
    # [n, group, c, e]: column pair c, element e; the group is t J + j; the rows as the load
    # lays them out, [q1, q0, w // 4, w % 4, g] (:func:`_row_order`), put in the wgmma's order
    # [q1, w // 4, w % 4, q0, g]
    Q1: tl.constexpr = BLOCK_N // (16 * WARPS)
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)),
                   (Q1, 2, WARPS // 4, 4, 8, 4, J, 2, 2))
    # -> [q1, wh, wl, q0, g, j, c, t, e]: slot 16 j + 8 c + 2 t + e
    return tl.reshape(tl.permute(w, (0, 2, 3, 1, 4, 6, 7, 5, 8)), (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse24_matmul_kernel(
    # pointers
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, KP_HALF,
    # strides
    stride_xm, stride_vn, stride_mn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
    ASM: tl.constexpr = False,
    SWAP_AB: tl.constexpr = False,
    EVEN_K: tl.constexpr = False,
    WARPS: tl.constexpr = 4,
):
    """Tiled GEMM path: y[M, N] = x[M, K] @ W^T (+ bias), W 2:4 compressed.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). Programs are ordered in groups of
    GROUP_M row-tiles so consecutive programs share weight tiles in L2. With SPLIT_K > 1 each
    program reduces a K slice and adds its fp32 partial sum into ``y`` (fp32, zeroed) atomically.

    Roofline: 2 M N K FLOPs on the tensor cores (the dense tile includes the zeros); minimum
    bytes N K (e / 2 + 1 / 8) + M K e + M N e. Compute-bound from M of a few hundred.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows_n = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    # K range of this split, in whole BLOCK_K tiles.
    k_tiles = tl.cdiv(2 * KP_HALF, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)

    if SWAP_AB:  # the transposed tile W x^T: W's fragment from registers (_decompress_frag)
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # a K step of BLOCK_K columns runs as sub-tiles of SUB_K (64: 16 groups per row, four
        # consecutive ones per thread, the layout a 16-byte load gives; more K per step spreads
        # the loop's fixed cost over more weights)
        SUB_K: tl.constexpr = min(BLOCK_K, 64)
        x_cols = _x_order(SUB_K)
        frag_rows = pid_n * BLOCK_N + _row_order(BLOCK_N, WARPS)
        frag_mask = frag_rows < N
        tab_a = _table_register((BLOCK_N, 1), ASM)
        for t in range(t_begin, t_end):
            for u in tl.static_range(BLOCK_K // SUB_K):
                offs_k = t * BLOCK_K + u * SUB_K + x_cols
                if EVEN_K:  # every K tile inside K: only x's rows are masked
                    a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
                else:
                    a = tl.load(x_rows + offs_k[None, :],
                                mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                w = _decompress_frag(values_ptr, meta_ptr, frag_rows.to(tl.int64), frag_mask,
                                     (t * BLOCK_K + u * SUB_K) // 4, stride_vn, stride_mn,
                                     KP_HALF, tab_a, ASM, BLOCK_N, SUB_K, EVEN_K, WARPS)
                if UPCAST_DOT:  # Triton-interpreter workaround: bf16 tl.dot multiplies raw bits
                    acc_t = tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), acc_t,
                                   input_precision="ieee")
                else:
                    acc_t = tl.dot(w, tl.trans(a), acc_t, input_precision=DOT_PRECISION)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        table = _table_register((1, BLOCK_N), ASM)
        for t in range(t_begin, t_end):
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                        other=0.0)
            w = _decompress_tile(values_ptr, meta_ptr, rows_n, n_mask, t * (BLOCK_K // 4),
                                 stride_vn, stride_mn, KP_HALF, BLOCK_N, BLOCK_K, ASM, table,
                                 BLOCK_M >= 64)
            if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS,
               SPLIT_K)


# ---------------------------------------------------------------------------------------------
# Configs: tuned defaults (JSON per GPU name), optional autotuning, audit specs
# ---------------------------------------------------------------------------------------------

_FAMILY = "sparse24"
HALF_DTYPES = (torch.float16, torch.bfloat16)  # activations that take the tile at every M


def _load_defaults() -> dict:
    return load_tables(_FAMILY)


def select_config(m: int, n: int, k: int, device: torch.device,
                  half: bool = False) -> KernelConfig:
    """Tuned default for this shape from ``configs/sparse24.json`` (the GPU's own table if
    shipped, else ``default``): the GEMV kernel up to ``gemv_max_m`` (``half``: fp16 or bf16
    activations, ``gemv_max_m_half``, 0: every M takes the 16-row tensor-core tile, as the
    low-bit kernels do; fp32 x keeps the GEMV's exact fp32 products), else the GEMM tile of
    M's bucket, with split-K raised when the tile grid would leave multiprocessors idle.
    Cached per GPU target too: a CPU tensor configures for the interpreter, or for the GPU
    that :func:`~compress_ops.kernels.tuning.simulate_gpu` names (the static model)."""
    return _select_config(m, n, k, device, half, gpu_target(device))


@functools.lru_cache(maxsize=4096)  # per-call Python cost matters at decode (~10 us kernels)
def _select_config(m: int, n: int, k: int, device: torch.device, half: bool,
                   target) -> KernelConfig:
    table = device_table(_FAMILY, device)
    if half:
        table = {**table, "gemv_max_m": table.get("gemv_max_m_half", table["gemv_max_m"])}
    cfg = table_config(table, m)
    if cfg.path == "gemm":
        cfg = auto_split_k(cfg, m, n, padded_k(k), device)
    return cfg


def semi_structured_min_m(device: torch.device) -> int | None:
    """Smallest M from which torch's semi-structured (cuSPARSELt/CUTLASS) 2:4 GEMM beats ours.

    Read from the GPU's table in ``configs/sparse24.json`` (``semi_structured_min_m``); ``None``
    (the shipped default) means the crossover has not been measured on this GPU and the Triton
    kernel is always used. ``perf/bench_sparse24.py`` measures both providers to set it.
    """
    if device.type != "cuda":
        return None
    return device_table(_FAMILY, device).get("semi_structured_min_m")


def swap_ab(cfg: KernelConfig, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a GEMM tile computes ``W x^T`` with the weight as the dot's first operand
    (``SWAP_AB``, :func:`_decompress_frag`): two-byte activations, tiles of up to the
    device table's ``swap_ab_max_block_m`` rows, whole warpgroups and at least 16 weight rows
    per warp (the wgmma's 64 rows per warpgroup)."""
    return _swap_in(cfg, dtype, device_table(_FAMILY, device))


def _swap_in(cfg: KernelConfig, dtype: torch.dtype, table: dict) -> bool:
    if (cfg.path != "gemm" or dtype not in HALF_DTYPES or cfg.num_warps % 4
            or cfg.block_n < 16 * cfg.num_warps):
        return False
    return cfg.block_m <= table.get("swap_ab_max_block_m", 0)



def get_autotune_configs(m: int) -> list[KernelConfig]:
    """Candidate configs for an M bucket (searched when ``COMPRESS_OPS_AUTOTUNE=1``)."""
    bucket = m_bucket(m)
    if bucket <= 4:
        # The gather kernel ([BM, BN, BK/2] tile spills past 8192 elements: audit), and the
        # BLOCK_M = 16 tensor-core tiles with split-K: which wins at decode is measured.
        gemv = [KernelConfig("gemv", bucket, bn, bk, 4, 1)
                for bn in (8, 16, 32) for bk in (128, 256) if bucket * bn * bk // 2 <= 8192]
        return gemv + [KernelConfig("gemm", 16, bn, 64, 4, 4, 8, sk)
                       for bn in (64, 128) for sk in (1, 4, 8)]
    # Tiles that the audit shows compile without spills on sm_80 and sm_90 (split-K included).
    if bucket <= 64:  # skinny: small tiles, split-K to fill the machine
        tiles = {16: ((16, 64, 64, 4), (16, 128, 64, 4), (16, 128, 64, 8)),
                 32: ((32, 64, 64, 4), (32, 128, 64, 4)),
                 64: ((64, 64, 64, 4), (64, 128, 64, 8))}
        bms = {16: (16,), 32: (32,), 64: (32, 64)}[max(bucket, 16)]
        return [KernelConfig("gemm", bm, bn, bk, w, 4, 8, sk)
                for bm_tile in bms for bm, bn, bk, w in tiles[bm_tile] for sk in (1, 2, 4, 8)]
    out = []
    for bm, bn, bk, w in ((64, 128, 64, 4), (64, 128, 64, 8), (128, 64, 64, 4),
                          (128, 128, 64, 8)):
        for s in (3, 4):
            out.append(KernelConfig("gemm", bm, bn, bk, w, s, 8, 1))
    return out


def autotuned_config(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                     bias: torch.Tensor | None) -> KernelConfig:
    """The fastest of :func:`get_autotune_configs` for this call's shape, timed once per
    (M bucket, N, K, dtype, bias, GPU) and remembered."""
    m, n, k = x2.shape[0], values.shape[0], x2.shape[1]
    key = (_FAMILY, m_bucket(m), n, k, x2.dtype, bias is not None, device_name(x2.device))
    return autotune(key, get_autotune_configs(m),
                    lambda cfg: _launch(x2, values, meta, bias, cfg))


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SIG_COMMON = {
    "x_ptr": "*{dt}", "values_ptr": "*{dt}", "meta_ptr": "*i32", "bias_ptr": "*{dt}",
    "y_ptr": "*{yt}", "M": "i32", "N": "i32", "K": "i32", "KP_HALF": "i32",
    "stride_xm": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_ym": "i32",
}
_ALIGNED = ["x_ptr", "values_ptr", "meta_ptr", "bias_ptr", "y_ptr", "KP_HALF",
            "stride_xm", "stride_vn", "stride_ym"]


def audit_specs(defaults_only: bool = False) -> list[dict]:
    """Every (kernel, config, dtype) the static GPU audit compiles: the shipped defaults in
    fp16 and bf16, K % 16 == 0 and ragged K; the autotune space (unless ``defaults_only``) in
    fp16 with K % 16 == 0."""
    # SPLIT_K only changes the grid and the epilogue (store vs atomic add): every split > 1
    # compiles to the same code as split 2, so configs are audited with split_k in {1, 2}.
    # (config, dtypes, the table that decides SWAP_AB)
    cfgs: dict[str, tuple[KernelConfig, tuple[str, ...], dict]] = {}
    default = _load_defaults()["default"]
    for m in () if defaults_only else (1, 2, 4, 16, 64, 256):
        for cfg in get_autotune_configs(m):
            cfg = cfg.with_split_k(min(cfg.split_k, 2))
            cfgs[cfg.name] = (cfg, ("fp16",), default)
    for table in _load_defaults().values():
        for path in ("gemv", "gemm"):
            for c in table[path].values():
                # select_config may raise split_k at run time: audit both epilogues
                split = path == "gemm" and c["block_m"] <= SPLIT_K_MAX_M
                for sk in ((1, 2) if split else (1,)):
                    cfg = KernelConfig(path, **{**c, "split_k": sk})
                    key = f"{cfg.name}/swap" if _swap_in(cfg, torch.float16, table) else cfg.name
                    cfgs[key] = (cfg, ("fp16", "bf16"), table)
    specs = []
    for cfg, dtypes, table in cfgs.values():
        for dt in dtypes:
            yt = "fp32" if cfg.split_k > 1 else dt
            sig = {k: v.format(dt=dt, yt=yt) for k, v in _SIG_COMMON.items()}
            if cfg.path == "gemv":
                fn = _sparse24_gemv_kernel
                consts = {"HAS_BIAS": True, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                          "BLOCK_KH": cfg.block_k // 2}
                expect = "-"
            else:
                fn = _sparse24_matmul_kernel
                swap = _swap_in(cfg, _DTYPES[dt], table)
                consts = {"HAS_BIAS": True, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                          "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                          "SPLIT_K": cfg.split_k, "DOT_PRECISION": "tf32",
                          "UPCAST_DOT": False, "ASM": True,  # (as a call on the GPU)
                          "SWAP_AB": swap, "WARPS": cfg.num_warps}
                # the swapped tile's M dimension is the weight's BLOCK_N
                expect = "HGMMA" if (cfg.block_n if swap else cfg.block_m) >= 64 else "HMMA"
            sig.update({c: "constexpr" for c in consts})
            # K % 16 == 0 (every real layer: vector loads of x; the tile takes whole K steps,
            # EVEN_K) and a ragged K (masked scalar loads, masked steps): Triton compiles each
            # as its own specialization; both for the defaults. The split-K epilogue (an
            # atomic add instead of a store; the loop is the same code) once, fp16 and K % 16.
            kinds = (("k16", _ALIGNED + ["K"], True), ("kany", _ALIGNED, False))
            if len(dtypes) == 1 or cfg.split_k > 1:
                kinds = kinds[:1]
            if cfg.split_k > 1 and dt != "fp16":
                continue
            for kname, aligned, even in kinds:
                kc = consts if fn is _sparse24_gemv_kernel else {**consts, "EVEN_K": even}
                name = f"{cfg.name}{'/swap' if kc.get('SWAP_AB') else ''}/{dt}/{kname}"
                specs.append({"kernel": fn.__name__, "config": name,
                              "fn": fn, "signature": {**sig, **{c: "constexpr" for c in kc}},
                              "constexprs": kc, "aligned": aligned,
                              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                              "expect_mma": expect})
    return specs


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def _launch(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
            bias: torch.Tensor | None, cfg: KernelConfig) -> torch.Tensor:
    m, k = x2.shape
    n, kp_half = values.shape
    y = _launch_mod.output(m, n, x2, cfg.split_k)
    b = bias if bias is not None else values  # dummy pointer, never read
    args = (x2, values, meta, b, y, m, n, k, kp_half,
            x2.stride(0), values.stride(0), meta.stride(0), y.stride(0))
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        _launch_mod.launch(
            _sparse24_gemv_kernel, grid, *args, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KH=cfg.block_k // 2,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        _launch_mod.launch(
            _sparse24_matmul_kernel, grid, *args, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k, ASM=ptx(x2), **dot_meta(x2),
            SWAP_AB=swap_ab(cfg, x2.dtype, x2.device), EVEN_K=k % cfg.block_k == 0,
            WARPS=cfg.num_warps,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _launch_mod.finish(y, x2, cfg.split_k)


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, *, config: KernelConfig | None = None,
                    checked: bool = False) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W^T (+ bias)`` with ``W`` given as ``pack_sparse24`` output.

    Runs the Triton kernel on ``x``'s device (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
    ``config`` overrides the tuned default (tests use it to force a path); with
    ``COMPRESS_OPS_AUTOTUNE=1`` on CUDA the configs of :func:`get_autotune_configs` are timed
    once per (M bucket, N, K, dtype) and the fastest is kept. ``checked=True`` skips validation
    for inputs that already passed :func:`~compress_ops.kernels.formats.sparse24.check_inputs`
    (the op validates once per call).

    K is taken from ``x``: it must lie in ``(Kp - 32, Kp]``. The packed columns past the true K
    are zero (``pack_sparse24`` pads with zeros), so a caller holding the true K (the module
    does) must check ``x.shape[-1]`` against it.
    """
    if not checked:
        check_inputs(x, values, meta, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    n = values.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    x2 = x2.contiguous()
    values = values.contiguous()
    if values.data_ptr() % (2 * values.element_size()):  # pair loads: a group = one word
        values = values.clone()
    meta = meta.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if config is None:
        if x.device.type == "cuda" and os.environ.get("COMPRESS_OPS_AUTOTUNE") == "1":
            config = autotuned_config(x2, values, meta, bias)
        else:
            config = select_config(m, n, k, x.device, x.dtype in HALF_DTYPES)
    return _launch(x2, values, meta, bias, config).reshape(*lead, n)
