"""Low-rank linears: ``y = (x @ V^T) @ U^T (+ x @ W^T) (+ bias)`` in one Triton launch.

Format
------
A weight ``W[N, K]`` of rank ``r`` is stored as its two factors, ``U[N, r]`` and ``V[r, K]``,
in the activation dtype (``W ~ U @ V``; a truncated SVD puts ``sqrt(sigma)`` in both). Bytes:
``r (N + K) e``, i.e. ``r (N + K) / (N K)`` of the dense weight. An optional dense base
``W0[N, K]`` adds ``x @ W0^T`` (the shape of a LoRA adapter, or of a low-rank correction of a
compressed weight).

Kernel
------
:func:`_lowrank_matmul_kernel` runs on a grid ``(M tiles, N groups, SPLIT_K)``:

* Without a base weight a program computes ``t = x[tile] @ V^T`` (``[BLOCK_M, BLOCK_R]``, fp32,
  ``BLOCK_R`` = r padded to a power of two >= 16) over its K range once, keeps it in registers,
  and then loops over its ``n_per_program`` N tiles: ``y[tile] = t @ U[N tile]^T``. The
  intermediate never goes to HBM.

  ``n_per_program`` spans the two strategies of the design question: ``1`` recomputes ``t``
  for every N tile (most parallel: ``cdiv(N, BLOCK_N)`` programs per M tile, but every one of
  them streams all of ``V`` from L2), ``cdiv(N, BLOCK_N)`` computes it once per M tile and loops
  N inside the program (the minimum of FLOPs and of V reads, but only ``cdiv(M, BLOCK_M)``
  programs). The launcher picks it, and split-K, from a model of the L2 traffic over the grids
  that fill the GPU (:func:`plan_grid`).
* With a base weight a program owns one N tile and runs one K loop that loads each ``x`` tile
  once and feeds it to both ``tl.dot(x, W0^T)`` and ``tl.dot(x, V^T)``; then
  ``acc += t @ U^T``. Recomputing ``t`` per N tile costs ``BLOCK_R / BLOCK_N`` of the base
  GEMM's FLOPs.
* ``SPLIT_K > 1`` splits the K loop; since everything after it is linear, each split adds
  ``t_split @ U^T`` into a zeroed fp32 ``y`` (atomics), so small M can use more SMs.

Roofline for one call (M, N, K, r), activations of ``e`` bytes:
FLOPs ``2 M r (K + N)`` (+ ``2 M N K`` with a base; the kernel recomputes ``2 M K r`` once per
N group). Minimum bytes ``r (N + K) e + M K e + M N e`` (+ ``N K e``). Two unfused GEMMs move the
same plus ``2 M r e`` (``t`` written and read back) in two launches. At small M both are
bound by reading ``U`` and ``V`` (and launch latency); recomputing ``t`` per N tile multiplies
the L2 reads of ``V`` by the number of N groups, which is what ``plan_grid`` trades against
parallelism.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compress_ops.kernels import _launch as _launch_mod
from compress_ops.kernels._launch import dot_meta, store_tile
from compress_ops.kernels.formats.lowrank import MAX_RANK, check_inputs, padded_rank
from compress_ops.kernels.tuning import (
    autotune,
    device_name,
    device_table,
    gpu_target,
    load_tables,
    m_bucket,
)

__all__ = [
    "LowRankKernelConfig",
    "plan_grid",
    "plan_two_phase",
    "two_phase_route",
    "fused_route",
    "lowrank_matmul",
    "select_config",
    "select_one_pass_config",
    "get_autotune_configs",
    "audit_specs",
]

_FAMILY = "lowrank"
_SPLIT_K_MAX_M = 64


@dataclass(frozen=True)
class LowRankKernelConfig:
    """Launch parameters. ``n_per_program``: N tiles per program without a base weight
    (``0``: chosen by :func:`plan_grid`, or by :func:`plan_two_phase` for the two-phase
    kernel, where it counts the N tiles of a phase-2 program); ``split_k``: K splits (``0``:
    chosen by the plan too; the two-phase kernel's phase-1 programs). ``one_pass``: run the
    one-pass kernel where the table's ``two_phase_max_m`` would pick the two-phase one."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    n_per_program: int = 0
    split_k: int = 0
    one_pass: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < (1 if name == "num_warps" else 16) or v & (v - 1):
                raise ValueError(f"{name} must be a power of two"
                                 f"{'' if name == 'num_warps' else ' >= 16'}, got {v}")
        if self.n_per_program < 0 or self.split_k < 0 or self.num_stages < 1:
            raise ValueError("n_per_program and split_k must be >= 0, num_stages >= 1")

    @property
    def name(self) -> str:
        s = (f"m{self.block_m}n{self.block_n}k{self.block_k}"
             f"w{self.num_warps}s{self.num_stages}")
        if self.n_per_program:
            s += f"np{self.n_per_program}"
        s += f"sk{self.split_k}" if self.split_k else ""
        return s + ("op" if self.one_pass else "")

    def replace(self, **kw) -> LowRankKernelConfig:
        return LowRankKernelConfig(**{**self.__dict__, **kw})


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def _x_vt(t, x_rows, vt_cols, m_mask, r_mask, K, t_begin, t_end, BLOCK_K: tl.constexpr,
          DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``t += x[:, K tiles t_begin..t_end) V^T`` (fp32): ``x_rows`` the rows' addresses
    ``[BLOCK_M, 1]``, ``vt_cols`` the ``V^T`` tile's columns ``[1, BLOCK_R]``."""
    for kt in range(t_begin, t_end):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        vt = tl.load(vt_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :],
                     other=0.0)
        t = _dot(a, vt, t, DOT_PRECISION, UPCAST_DOT)
    return t


@triton.jit
def _lowrank_matmul_kernel(
    # pointers: w_ptr is the optional dense base weight
    x_ptr, v_ptr, u_ptr, w_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, R, n_per_program,
    # strides (unit stride along the last dim of every tensor)
    stride_xm, stride_vr, stride_un, stride_wn, stride_ym,
    # meta-parameters
    HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
):
    """y[M, N] = (x[M, K] @ V[R, K]^T) @ U[N, R]^T (+ x @ W[N, K]^T) (+ bias).

    Grid: (cdiv(M, BLOCK_M), N groups, SPLIT_K). Without a base weight a program computes
    t = x @ V^T ([BLOCK_M, BLOCK_R], fp32) over its K split once and writes ``n_per_program``
    N tiles ``t @ U^T``; with one it owns the single N tile ``pid(1)`` and loads each x tile
    once for both ``x @ W^T`` and ``x @ V^T``. SPLIT_K > 1 atomically adds fp32 partial tiles
    into a zeroed fp32 ``y``.

    Roofline: 2 M R (K + N) (+ 2 M N K) FLOPs; minimum bytes R (N + K) e + M K e + M N e
    (+ N K e with a base weight).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    vt_cols = v_ptr + offs_r[None, :] * stride_vr  # V^T tile [BLOCK_K, BLOCK_R]

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = min(t_begin + tiles_per_split, k_tiles)

    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_BASE:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        wt_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # W^T tile [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(t_begin, t_end):
            offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            vt = tl.load(vt_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :],
                         other=0.0)
            wt = tl.load(wt_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                         other=0.0)
            t = _dot(a, vt, t, DOT_PRECISION, UPCAST_DOT)
            acc = _dot(a, wt, acc, DOT_PRECISION, UPCAST_DOT)
        ut = tl.load(u_ptr + offs_n.to(tl.int64)[None, :] * stride_un + offs_r[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(t.to(x_ptr.dtype.element_ty), ut, acc, DOT_PRECISION, UPCAST_DOT)
        store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_k,
                    HAS_BIAS, SPLIT_K)
    else:
        t = _x_vt(t, x_rows, vt_cols, m_mask, r_mask, K, t_begin, t_end, BLOCK_K,
                  DOT_PRECISION, UPCAST_DOT)
        tt = t.to(x_ptr.dtype.element_ty)  # what two unfused GEMMs would write to HBM
        j_begin = pid_n * n_per_program
        j_end = min(j_begin + n_per_program, tl.cdiv(N, BLOCK_N))
        for j in range(j_begin, j_end):
            offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            ut = tl.load(u_ptr + offs_n.to(tl.int64)[None, :] * stride_un + offs_r[:, None],
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(tt, ut, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION,
                       UPCAST_DOT)
            store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym,
                        pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _lowrank_two_phase_kernel(
    x_ptr, v_ptr, u_ptr, bias_ptr, y_ptr, t_ptr, sync_ptr,
    M, N, K, R, n_splits, tiles_per_split, n_groups, n_per_program,
    stride_xm, stride_vr, stride_un, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ONE_M_TILE: tl.constexpr,
    ONE_N_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
    EVEN_M: tl.constexpr = False,
):
    """y[M, N] = (x[M, K] @ V[R, K]^T) @ U[N, R]^T (+ bias) in one launch of ``n_splits +
    n_groups`` programs, without a base weight.

    Each program first draws a ticket (an atomic counter, ``sync[0]``): the order in which
    programs *started*. Tickets ``0 .. n_splits - 1`` run phase 1: ``t += x[:, K slice] @ V[:, K
    slice]^T`` over ``tiles_per_split`` K tiles, added (fp32 atomics) into the zeroed workspace
    ``t_ptr`` ([M, BLOCK_R], row stride BLOCK_R), then count themselves in ``sync[1]``
    (release). The next ``n_groups`` tickets run phase 2 on ``n_per_program`` N tiles: they
    load their first ``U`` tile (it does not depend on ``t``, so phase 2's HBM reads overlap
    phase 1's), wait until ``sync[1] == n_splits`` (acquire), read ``t`` from L2, round it
    to the activation dtype (what two GEMMs store between them; once per program when
    ``ONE_M_TILE``: M <= BLOCK_M) and write ``y^T = U @ t^T + bias`` (``U`` the first
    operand: on sm_90 wgmma reads it from shared memory, where it is staged before the wait;
    the accumulator starts at the bias). With one M tile and one N tile per program (the
    plan's phase 2) the bias, ``y``'s and ``t``'s addresses and masks are made before the
    wait too: after it come the load of ``t``, its rounding, the dot and the store.

    A program waits only for tickets below its own, which have started and never wait, so
    the launch cannot deadlock whatever the grid, the residency or the scheduling order (the
    interpreter runs programs one after another: phase 1 has finished before phase 2 looks).
    The last phase-2 program to finish (``sync[2]``) zeroes ``t`` and the counters, so the
    workspace is ready for the next launch without a memset: one launch per call, and the
    call is safe to capture in a CUDA graph.
    """
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    m_tiles = tl.cdiv(M, BLOCK_M)
    if ticket < n_splits:
        k_tiles = tl.cdiv(K, BLOCK_K)
        t_begin = ticket * tiles_per_split
        t_end = min(t_begin + tiles_per_split, k_tiles)
        vt_cols = v_ptr + offs_r[None, :] * stride_vr  # V^T tile [BLOCK_K, BLOCK_R]
        for mt in range(0, m_tiles):
            offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < M
            x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
            t = _x_vt(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_rows, vt_cols,
                      m_mask, r_mask, K, t_begin, t_end, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :], t,
                          mask=m_mask[:, None], sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the arrival is released
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    elif ONE_M_TILE and ONE_N_TILE:
        # the plan's phase 2 (M <= BLOCK_M, one N tile): everything that does not depend on
        # t (the U tile, the bias, y's and t's addresses and masks) is done before the wait;
        # after it, one load of t, its rounding, the dot and the store
        offs_n = (ticket - n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        ut = tl.load(u_ptr + offs_n.to(tl.int64)[:, None] * stride_un + offs_r[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        # y^T = U t^T: U is the dot's first operand, loaded (on sm_90 staged in shared
        # memory for wgmma) before the wait; t^T, the second, is rounded and staged after it
        # (half the bytes of the fp32 tile). The accumulator starts at the bias.
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
        y_mask = n_mask[:, None] & m_mask[None, :]
        # t's rows past M are not read (L2 traffic: M rows, not BLOCK_M; a masked load
        # zeroes its registers first, after the wait: EVEN_M, M = BLOCK_M, needs no mask). Its
        # columns past R are read: they are zero (added to as zero, zeroed after every call).
        t_ptrs = t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :]
        t_mask = m_mask[:, None]
        _wait_arrivals(sync_ptr + 1, n_splits)
        if EVEN_M:
            tt = tl.load(t_ptrs, cache_modifier=".cg")
        else:
            tt = tl.load(t_ptrs, mask=t_mask, other=0.0, cache_modifier=".cg")
        tt = tt.to(x_ptr.dtype.element_ty)
        acc = _dot(ut, tl.trans(tt), acc, DOT_PRECISION, UPCAST_DOT)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        tl.debug_barrier()  # every thread has read t before the finish is counted
        finished = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if finished == n_groups - 1:  # the last reader: leave t and the counters zeroed
            if EVEN_M:
                tl.store(t_ptrs, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32))
            else:
                tl.store(t_ptrs, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=t_mask)
            _reset_counters(sync_ptr)
    else:
        n_tiles = tl.cdiv(N, BLOCK_N)
        j_begin = (ticket - n_splits) * n_per_program
        j_end = min(j_begin + n_per_program, n_tiles)
        offs_nt = tl.arange(0, BLOCK_N)
        u_cols = u_ptr + offs_r[None, :]  # a U tile [BLOCK_N, BLOCK_R], rows contiguous
        offs_n = j_begin * BLOCK_N + offs_nt
        ut = tl.load(u_cols + offs_n.to(tl.int64)[:, None] * stride_un,
                     mask=(offs_n < N)[:, None] & r_mask[None, :], other=0.0)
        _wait_arrivals(sync_ptr + 1, n_splits)
        if ONE_M_TILE:  # read t from L2 once for all the program's N tiles
            offs_m = tl.arange(0, BLOCK_M)
            t_once = tl.load(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :],
                             mask=(offs_m < M)[:, None], other=0.0, cache_modifier=".cg")
            t_once = t_once.to(x_ptr.dtype.element_ty)
        for j in range(j_begin, j_end):
            offs_n = j * BLOCK_N + offs_nt
            n_mask = offs_n < N
            for mt in range(0, m_tiles):
                offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
                m_mask = offs_m < M
                if ONE_M_TILE:
                    tt = t_once
                else:
                    tt = tl.load(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :],
                                 mask=m_mask[:, None], other=0.0, cache_modifier=".cg")
                    tt = tt.to(x_ptr.dtype.element_ty)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T, as above
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n, mask=n_mask,
                                   other=0.0).to(tl.float32)[:, None]
                acc = _dot(ut, tl.trans(tt), acc, DOT_PRECISION, UPCAST_DOT)
                tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None],
                         acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
            if not ONE_N_TILE:  # the next tile's U (none after the last)
                offs_n += BLOCK_N
                ut = tl.load(u_cols + offs_n.to(tl.int64)[:, None] * stride_un,
                             mask=(offs_n < min(N, j_end * BLOCK_N))[:, None] & r_mask[None, :],
                             other=0.0)
        tl.debug_barrier()  # every thread has read t before the finish is counted
        finished = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if finished == n_groups - 1:  # the last reader: leave t and the counters zeroed
            for mt in range(0, m_tiles):
                offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
                tl.store(t_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :],
                         tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                         mask=(offs_m < M)[:, None])
            _reset_counters(sync_ptr)


@triton.jit
def _wait_arrivals(counter_ptr, n_splits):
    """Poll (acquire) until every phase-1 program has counted its arrival."""
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while arrived < n_splits:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")


@triton.jit
def _reset_counters(sync_ptr):
    tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")
    tl.atomic_xchg(sync_ptr + 2, 0, sem="relaxed")
    tl.atomic_xchg(sync_ptr, 0, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Configs: tuned defaults (configs/lowrank.json), grid planning, autotuning, audit specs
# ---------------------------------------------------------------------------------------------


def _rank_class(r_pad: int, table: dict) -> str:
    keys = sorted(int(c) for c in table["rank"])
    return str(next((c for c in keys if c >= r_pad), keys[-1]))


def select_config(m: int, r_pad: int, device: torch.device) -> LowRankKernelConfig:
    """Tuned tile for M's bucket and the padded rank's class (``configs/lowrank.json``, the
    GPU's own table if shipped, else ``default``): the ``two_phase`` table's up to
    ``two_phase_max_m`` (the no-base kernel there), else ``rank``'s (the one-pass kernel; a
    base weight at small M uses :func:`select_one_pass_config`). Cached per GPU target, so a
    simulated GPU (the static model) never reuses the interpreter's tile."""
    return _select_config(m, r_pad, device, gpu_target(device))


@functools.lru_cache(maxsize=4096)
def _select_config(m: int, r_pad: int, device: torch.device, target) -> LowRankKernelConfig:
    full = device_table(_FAMILY, device)
    if m <= full.get("two_phase_max_m", 0) and "two_phase" in full:
        return _select(full["two_phase"], m, r_pad)
    return select_one_pass_config(m, r_pad, device)


def select_one_pass_config(m: int, r_pad: int, device: torch.device) -> LowRankKernelConfig:
    """The one-pass kernel's tuned tile (the table's ``rank``)."""
    return _select_one_pass(m, r_pad, device, gpu_target(device))


@functools.lru_cache(maxsize=4096)
def _select_one_pass(m: int, r_pad: int, device: torch.device, target) -> LowRankKernelConfig:
    return _select(device_table(_FAMILY, device)["rank"], m, r_pad)


def _select(tables: dict, m: int, r_pad: int) -> LowRankKernelConfig:
    table = tables[_rank_class(r_pad, {"rank": tables})]
    bucket = m_bucket(m)
    keys = sorted(int(b) for b in table)
    key = next((b for b in keys if b >= bucket), keys[-1])
    return LowRankKernelConfig(**table[str(key)])


def fused_route(m: int, r: int, has_base: bool, device: torch.device) -> bool:
    """Whether the op runs the fused kernel (else two or three cuBLAS GEMMs): ranks up to
    :data:`MAX_RANK` and M up to the table's ``fused_max_m`` (``fused_max_m_base`` with a base
    weight), the crossover for this GPU."""
    if r > MAX_RANK:
        return False
    table = device_table(_FAMILY, device)
    return m <= table["fused_max_m_base" if has_base else "fused_max_m"]


def plan_grid(cfg: LowRankKernelConfig, m: int, n: int, k: int, r: int, has_base: bool,
              device: torch.device, sms: int | None = None) -> tuple[int, int]:
    """``(n_per_program, split_k)`` for a launch, where ``cfg`` leaves them to the launcher (0).

    With a base weight: one N tile per program (split-K raised while the grid leaves SMs idle,
    M <= 64). Without one, the plan minimises a model of the L2 traffic among the grids that
    fill the GPU (at least ``sms`` programs, where possible): every N group of an M tile reads
    all of ``V`` and its ``x`` tile (``R K + BLOCK_M K`` elements: the recomputation), every
    K split reads all of ``U`` (``N R``). One N tile per program (recompute everywhere) is the
    most parallel and the most traffic; all of N per program the least traffic and the least
    parallel; split-K (M <= 64 only; >= 4 K tiles per split) buys
    parallelism with ``U`` reads instead of ``V`` reads (the audit compiles split 2; larger
    splits change only the constexpr). With many M tiles no split is needed
    and each program takes as many N tiles as keep about two programs per SM.
    ``sms``: the device's multiprocessor count (default: the GPU target's, which
    :func:`~compress_ops.kernels.tuning.simulate_gpu` sets for CPU tensors; 1 for the
    interpreter). The default is resolved before the cache, so a simulated GPU never reuses
    the interpreter's plan.
    """
    if sms is None:
        target = gpu_target(device)
        sms = target.sms if target is not None else 1
    return _plan_grid(cfg, m, n, k, r, has_base, device, sms)


@functools.lru_cache(maxsize=4096)
def _plan_grid(cfg: LowRankKernelConfig, m: int, n: int, k: int, r: int, has_base: bool,
               device: torch.device, sms: int) -> tuple[int, int]:
    n_tiles = max(1, triton.cdiv(n, cfg.block_n))
    m_tiles = max(1, triton.cdiv(m, cfg.block_m))
    k_tiles = triton.cdiv(k, cfg.block_k)
    max_split = max(1, min(16, k_tiles // 4)) if m <= _SPLIT_K_MAX_M else 1
    pows = sorted({1 << i for i in range(n_tiles.bit_length()) if 1 << i <= n_tiles} | {n_tiles})
    pers = [cfg.n_per_program] if cfg.n_per_program else pows
    if has_base:
        pers = [1]
    splits = ([cfg.split_k] if cfg.split_k else
              [1 << i for i in range(5) if 1 << i <= max_split])
    if has_base or m > _SPLIT_K_MAX_M:
        if not cfg.n_per_program and not has_base:
            pers = [max(1, min(n_tiles, (m_tiles * n_tiles) // (2 * sms)))]
        splits = splits if cfg.split_k else [1]
        if has_base and not cfg.split_k:  # fill the SMs with K splits (skinny problems)
            split = 1
            while m_tiles * n_tiles * split < sms and split * 2 <= max_split:
                split *= 2
            splits = [split]

    def programs(per: int, split: int) -> int:
        return m_tiles * triton.cdiv(n_tiles, per) * split

    def traffic(per: int, split: int) -> int:
        groups = triton.cdiv(n_tiles, per)
        return m_tiles * (groups * (r + cfg.block_m) * k + split * n * r)

    cands = [(per, split) for per in pers for split in splits]
    full = [c for c in cands if programs(*c) >= sms]
    if full:  # the least traffic among grids that fill the GPU (ties: fewer programs)
        return min(full, key=lambda c: (traffic(*c), programs(*c)))
    return max(cands, key=lambda c: (programs(*c), -traffic(*c)))


def two_phase_route(m: int, has_base: bool, cfg: LowRankKernelConfig,
                    device: torch.device) -> bool:
    """Whether a fused call runs :func:`_lowrank_two_phase_kernel`: no base weight, M up to the
    table's ``two_phase_max_m`` and a config that does not ask for the one-pass kernel."""
    if has_base or cfg.one_pass:
        return False
    return m <= device_table(_FAMILY, device).get("two_phase_max_m", 0)


def plan_two_phase(cfg: LowRankKernelConfig, m: int, n: int, k: int, r: int, itemsize: int,
                   device: torch.device, sms: int | None = None) -> tuple[int, int, int, int]:
    """``(n_splits, tiles_per_split, n_groups, n_per_program)`` of a two-phase launch.

    Phase 1 takes about ``sms K / (N + K)`` programs of ``tiles_per_split`` K tiles (the share
    of ``V``'s ``r K`` in the factors' bytes), phase 2 one N tile per program up to two
    programs per SM in all (each loads its ``U`` tile before it waits, so both factors stream
    at once; a phase-2 program with more tiles loads the later ones after the wait).
    Each phase-1 program adds an fp32 ``[M, r]`` tile into the workspace, each phase-2 program
    reads it back and the last one zeroes it: ``(n_splits + n_groups + 1) M r_pad 4`` bytes of
    L2 traffic, kept within the table's ``two_phase_workspace_over_factors`` of the factors'
    bytes (a number, or one per rank class; ``default``: 1, the H200's: 0.5 for ranks up to
    128, the budgets' ``max_l2_over_factors`` 1.5). While it is above, the larger phase
    shrinks: phase 1 to the most programs the budget leaves beside phase 2's
    (``tiles_per_split`` the fewest that fit; doubled where none fit), phase 2 by doubling its
    tiles per program (its later ``U`` tiles are then read after the wait). The H200 table's
    M = 64 tiles are wide enough that the plan keeps one N tile per program at N = K = 8192:
    BLOCK_N 256 (32 phase-2 programs, leaving 31 to phase 1), BLOCK_K 512 at rank 64 (16
    phase-1 programs of one K tile, every load of a program in flight at once) and 128 at
    rank 128 (22 programs of three).
    ``cfg.split_k`` / ``cfg.n_per_program`` fix the phase-1 programs / phase-2 tiles per
    program. ``sms``: as :func:`plan_grid`.
    """
    if sms is None:
        target = gpu_target(device)
        sms = target.sms if target is not None else 1
    budget = device_table(_FAMILY, device).get("two_phase_workspace_over_factors", 1.0)
    if isinstance(budget, dict):  # per rank class
        budget = budget[_rank_class(padded_rank(r), {"rank": budget})]
    return _plan_two_phase(cfg, m, n, k, r, itemsize, sms, budget)


@functools.lru_cache(maxsize=4096)
def _plan_two_phase(cfg: LowRankKernelConfig, m: int, n: int, k: int, r: int, itemsize: int,
                    sms: int, budget: float = 1.0) -> tuple[int, int, int, int]:
    k_tiles = max(1, triton.cdiv(k, cfg.block_k))
    n_tiles = max(1, triton.cdiv(n, cfg.block_n))
    want_splits = cfg.split_k or max(1, round(sms * k / (n + k)))
    tps = triton.cdiv(k_tiles, min(k_tiles, want_splits))
    splits = triton.cdiv(k_tiles, tps)
    per = cfg.n_per_program or triton.cdiv(n_tiles, min(n_tiles, max(1, 2 * sms - splits)))
    per = min(per, n_tiles)
    if not cfg.split_k and not cfg.n_per_program:
        t_bytes = m * padded_rank(r) * 4  # the workspace's rows are masked to M
        # programs whose workspace traffic fits: adds + reads, less the last one's zeroing
        fit = int(budget * r * (n + k) * itemsize) // t_bytes - 1
        while (triton.cdiv(k_tiles, tps) + triton.cdiv(n_tiles, per) > fit
               and (tps < k_tiles or per < n_tiles)):
            splits, groups = triton.cdiv(k_tiles, tps), triton.cdiv(n_tiles, per)
            if per >= n_tiles or (tps < k_tiles and splits >= groups):
                room = fit - groups  # the most phase-1 programs beside phase 2's
                tps = max(2 * tps, 1) if room < 1 else max(tps + 1, triton.cdiv(k_tiles, room))
            else:
                per *= 2
    tps, per = min(tps, k_tiles), min(per, n_tiles)
    return triton.cdiv(k_tiles, tps), tps, triton.cdiv(n_tiles, per), per


_WORKSPACE: dict = {}


def _workspace(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-phase kernel's fp32 ``t`` workspace (at least ``numel``) and its three int32
    counters, per device and stream: allocated zeroed once, left zeroed by every launch (the
    kernel's last program resets them), so a call adds no memset. Calls on one stream run in
    order; another stream gets its own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _WORKSPACE.get(key)
    if ws is None or ws[0].numel() < numel:
        size = max(numel, 64 * 256)
        ws = (torch.zeros(size, device=device, dtype=torch.float32),
              torch.zeros(4, device=device, dtype=torch.int32))
        _WORKSPACE[key] = ws
    return ws


def get_autotune_configs(m: int, r_pad: int) -> list[LowRankKernelConfig]:
    """Candidates for an (M bucket, padded rank) pair (``COMPRESS_OPS_AUTOTUNE=1``): both
    extremes of ``n_per_program`` (recompute per N tile, loop all of N) and the planned one."""
    bucket = m_bucket(m)
    big_r = r_pad >= 128
    if bucket <= 16:
        tiles = [(16, 64, 64 if big_r else 128, 4), (16, 128, 64, 4)]
    elif bucket <= 64:
        tiles = [(max(16, bucket), 64, 64, 4), (max(16, bucket), 128, 64, 8)]
    else:
        tiles = [(64, 128, 32, 8)] + ([] if big_r else [(128, 128, 32, 8)])
    out = []
    for bm, bn, bk, w in tiles:
        if big_r and (bn >= 128 or bm >= 64):
            w = 8  # a [BLOCK_M, 256] fp32 t tile on 4 warps spills (audit)
        for per in (0, 1, 1 << 20):  # planned, recompute per tile, whole N per program
            for sk in ((0, 1) if bucket <= _SPLIT_K_MAX_M else (1,)):
                out.append(LowRankKernelConfig(bm, bn, bk, w, 3, per, sk))
    return out


_SIG = {
    "x_ptr": "*{dt}", "v_ptr": "*{dt}", "u_ptr": "*{dt}", "w_ptr": "*{dt}", "bias_ptr": "*{dt}",
    "y_ptr": "*{yt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "n_per_program": "i32",
    "stride_xm": "i32", "stride_vr": "i32", "stride_un": "i32", "stride_wn": "i32",
    "stride_ym": "i32",
}
_ALIGNED = ["x_ptr", "v_ptr", "u_ptr", "w_ptr", "bias_ptr", "y_ptr", "stride_xm", "stride_vr",
            "stride_wn", "stride_ym", "N", "K"]


def audit_specs(defaults_only: bool = False) -> list[dict]:
    """Every (config, rank class, base?, dtype) the static GPU audit compiles: each shipped
    tile at the largest padded rank of its class, with and without a base weight, fp16 (and
    bf16 for the no-base default), split-K 2 for buckets <= 64; plus, unless
    ``defaults_only``, the autotune space (fp16, no base)."""
    entries: dict[str, tuple] = {}
    for table in load_tables(_FAMILY).values():
        for rclass, buckets in table["rank"].items():
            for bucket, c in buckets.items():
                cfg = LowRankKernelConfig(**c)
                for base in (False, True):
                    for dt in ("fp16", "bf16") if not base else ("fp16",):
                        entries.setdefault(f"{cfg.name}/r{rclass}/{dt}{'/base' if base else ''}",
                                           (cfg, int(rclass), base, dt, 1))
                    if int(bucket) <= _SPLIT_K_MAX_M:
                        entries.setdefault(
                            f"{cfg.name}sk2/r{rclass}/fp16{'/base' if base else ''}",
                            (cfg, int(rclass), base, "fp16", 2))
    if not defaults_only:
        for m in (1, 16, 64, 256):
            for r_pad in (64, 256):
                for cfg in get_autotune_configs(m, r_pad):
                    cfg = cfg.replace(n_per_program=0, split_k=0)
                    entries.setdefault(f"{cfg.name}/r{r_pad}/fp16",
                                       (cfg, r_pad, False, "fp16", 1))
    specs = _two_phase_audit_specs()
    for name, (cfg, r_pad, base, dt, split) in entries.items():
        yt = "fp32" if split > 1 else dt
        sig = {k: v.format(dt=dt, yt=yt) for k, v in _SIG.items()}
        consts = {"HAS_BASE": base, "HAS_BIAS": True, "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "BLOCK_R": r_pad,
                  "SPLIT_K": split, "DOT_PRECISION": "tf32", "UPCAST_DOT": False}
        sig.update({c: "constexpr" for c in consts})
        specs.append({"kernel": _lowrank_matmul_kernel.__name__, "config": name,
                      "fn": _lowrank_matmul_kernel, "signature": sig, "constexprs": consts,
                      "aligned": _ALIGNED, "num_warps": cfg.num_warps,
                      "num_stages": cfg.num_stages,
                      "expect_mma": "HGMMA" if cfg.block_m >= 64 else "HMMA"})
    return specs


# the architectures a GPU's own table (configs/lowrank.json) is compiled for by the audit: its
# tiles are tuned for that GPU (the H200's M = 64 tiles keep the second dot's U operand in
# shared memory, which wgmma reads there; on sm_80 mma.sync holds it in registers and spills)
_TABLE_ARCHS = {"NVIDIA H200": [90]}

_SIG_TWO_PHASE = {
    "x_ptr": "*{dt}", "v_ptr": "*{dt}", "u_ptr": "*{dt}", "bias_ptr": "*{dt}", "y_ptr": "*{dt}",
    "t_ptr": "*fp32", "sync_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
    "n_splits": "i32", "tiles_per_split": "i32", "n_groups": "i32", "n_per_program": "i32",
    "stride_xm": "i32", "stride_vr": "i32", "stride_un": "i32", "stride_ym": "i32",
}
_ALIGNED_TWO_PHASE = ["x_ptr", "v_ptr", "u_ptr", "bias_ptr", "y_ptr", "t_ptr", "sync_ptr",
                      "stride_xm", "stride_vr", "stride_ym", "N", "K"]


def _two_phase_audit_specs() -> list[dict]:
    """The two-phase kernel's shipped tiles (the ``two_phase`` tables) at the largest padded
    rank of their class, fp16 and bf16, as calls compile them: with M inside one tile where
    the tile covers its M bucket (``ONE_M_TILE``), else spanning several; one N tile per
    phase-2 program (the plan on a large GPU: M a whole tile, ``EVEN_M``, and a ragged one)
    and several. A GPU's own table compiles for its architecture (``_TABLE_ARCHS``)."""
    specs = []
    for table_name, table in load_tables(_FAMILY).items():
        for rclass, buckets in table.get("two_phase", {}).items():
            for bucket, c in buckets.items():
                cfg = LowRankKernelConfig(**c)
                for dt in ("fp16", "bf16"):
                    one_m = cfg.block_m >= int(bucket)
                    for one_n, even_m in ((True, one_m), (True, False), (False, False)):
                        if even_m == one_m and not one_n:
                            continue
                        name = (f"{cfg.name}/r{rclass}/{dt}/two-phase"
                                f"{'' if one_m else '/m-tiles'}{'' if one_n else '/n-tiles'}"
                                f"{'/ragged-m' if one_m and one_n and not even_m else ''}")
                        archs = _TABLE_ARCHS.get(table_name, [80, 90])
                        same = [sp for sp in specs if sp["config"] == name]
                        if same:  # the same compile: only the architectures it lacks
                            same[0]["archs"] = sorted(set(same[0]["archs"]) | set(archs))
                            continue
                        sig = {k: v.format(dt=dt) for k, v in _SIG_TWO_PHASE.items()}
                        consts = {"HAS_BIAS": True, "BLOCK_M": cfg.block_m,
                                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                                  "BLOCK_R": int(rclass), "ONE_M_TILE": one_m,
                                  "ONE_N_TILE": one_n, "EVEN_M": even_m,
                                  "DOT_PRECISION": "tf32", "UPCAST_DOT": False}
                        sig.update({k: "constexpr" for k in consts})
                        specs.append({"kernel": _lowrank_two_phase_kernel.__name__,
                                      "config": name, "fn": _lowrank_two_phase_kernel,
                                      "signature": sig, "constexprs": consts,
                                      "aligned": _ALIGNED_TWO_PHASE,
                                      "num_warps": cfg.num_warps,
                                      "num_stages": cfg.num_stages, "archs": archs,
                                      "expect_mma": "HGMMA" if cfg.block_m >= 64 else "HMMA"})
    return specs


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _launch_two_phase(x2: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor | None, cfg: LowRankKernelConfig) -> torch.Tensor:
    m, k = x2.shape
    n, r = u.shape
    r_pad = padded_rank(r)
    splits, tps, groups, per = plan_two_phase(cfg, m, n, k, r, x2.element_size(), x2.device)
    t, sync = _workspace(x2.device, triton.cdiv(m, cfg.block_m) * cfg.block_m * r_pad)
    y = _launch_mod.output(m, n, x2, 1)
    bp = bias if bias is not None else u  # a dummy pointer, never read
    _launch_mod.launch(
        _lowrank_two_phase_kernel, (splits + groups,),
        x2, v, u, bp, y, t, sync, m, n, k, r, splits, tps, groups, per,
        x2.stride(0), v.stride(0), u.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, BLOCK_R=r_pad, ONE_M_TILE=m <= cfg.block_m, ONE_N_TILE=per == 1,
        EVEN_M=m == cfg.block_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **dot_meta(x2))
    return y


def _launch(x2: torch.Tensor, u: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None,
            bias: torch.Tensor | None, cfg: LowRankKernelConfig) -> torch.Tensor:
    m, k = x2.shape
    n, r = u.shape
    if two_phase_route(m, w is not None, cfg, x2.device):
        return _launch_two_phase(x2, u, v, bias, cfg)
    per, split = plan_grid(cfg, m, n, k, r, w is not None, x2.device)
    y = _launch_mod.output(m, n, x2, split)
    n_groups = triton.cdiv(triton.cdiv(n, cfg.block_n), per)
    grid = (triton.cdiv(m, cfg.block_m), n_groups, split)
    wp = w if w is not None else u  # dummy pointers, never read
    bp = bias if bias is not None else u
    _launch_mod.launch(
        _lowrank_matmul_kernel, grid,
        x2, v, u, wp, bp, y, m, n, k, r, per,
        x2.stride(0), v.stride(0), u.stride(0), wp.stride(0), y.stride(0),
        HAS_BASE=w is not None, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=padded_rank(r), SPLIT_K=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_meta(x2))
    return _launch_mod.finish(y, x2, split)


def lowrank_matmul(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                   config: LowRankKernelConfig | None = None,
                   checked: bool = False) -> torch.Tensor:
    """``y[..., N] = (x[..., K] @ v^T) @ u^T (+ x @ weight^T) (+ bias)`` in one launch.

    Runs on ``x``'s device (CUDA, or the CPU under ``TRITON_INTERPRET=1``); ranks up to
    :data:`MAX_RANK`. ``config`` overrides the tuned default; ``COMPRESS_OPS_AUTOTUNE=1`` (CUDA)
    times :func:`get_autotune_configs` once per shape. ``checked=True`` skips validation.
    """
    if not checked:
        check_inputs(x, u, v, weight, bias)
    r = u.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"rank r={r} is above the fused kernel's limit MAX_RANK={MAX_RANK}; "
                         f"compress_ops.ops.lowrank_linear runs two GEMMs for it")
    lead, k = x.shape[:-1], x.shape[-1]
    n = u.shape[0]
    m = math.prod(lead)
    if m == 0:
        return x.new_empty(*lead, n)
    if n == 0 or k == 0:  # an empty weight: y = bias (or 0), no launch
        y = x.new_zeros(*lead, n)
        return y + bias if bias is not None else y
    x2 = x.reshape(m, k)
    x2, u, v = x2.contiguous(), u.contiguous(), v.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if config is None:
        if x.device.type == "cuda" and os.environ.get("COMPRESS_OPS_AUTOTUNE") == "1":
            key = (_FAMILY, m_bucket(m), n, k, r, x.dtype, weight is not None,
                   bias is not None, device_name(x.device))
            config = autotune(key, get_autotune_configs(m, padded_rank(r)),
                              lambda c: _launch(x2, u, v, weight, bias, c))
        elif weight is not None:
            config = select_one_pass_config(m, padded_rank(r), x.device)
        else:
            config = select_config(m, padded_rank(r), x.device)
    return _launch(x2, u, v, weight, bias, config).reshape(*lead, n)
