"""W8A8 (8-bit weights *and* 8-bit activations, int8 or FP8 e4m3): Triton kernels, configs,
launchers.

The stored weight, the exact quantization rules (the numeric contract these kernels follow bit
for bit), byte counts and input checks: :mod:`compress_ops.kernels.formats.w8a8`.

Kernels
-------
``y[M, N] = epilogue(quantize(x) @ qweight^T)``; up to ``fused_max_m`` rows (16) one launch,
above it two:

* :func:`_act_quant_kernel` (memory-bound, one program per row): the row's absolute maximum
  and a NaN/Inf flag (``sum(x * 0)``: 0, or NaN) in float32, then ``s_x`` (:func:`_row_scales`)
  and ``q = clamp(rint(x * inv))`` (int8, round half to even by the ``1.5 * 2**23`` magic add,
  whose float bits minus the magic's are the integer: no float-to-int instruction) or
  ``e4m3(clamp(x * inv, +-448))`` (FP8, round to nearest even); rows of up to
  ``max_one_pass_k`` columns are read once and held in registers, longer rows twice (the second
  pass from L2). Every division is correctly rounded (``tl.math.div_rn``: a plain ``/`` of fp32
  on a GPU is PTX's approximate ``div.full.f32``); the dynamic ``inv`` is ``(1 / amax) *
  QMAX``, two roundings, the format's rule (what torch computes for ``QMAX / amax`` with a
  Python scalar: ``reciprocal() * scalar``). Both kernels launch
  with FMA contraction off (``enable_fp_fusion=False``): ``x * inv + magic`` must round twice,
  as the reference does, and so must the epilogue.
* :func:`_w8a8_gemm_kernel`: a tiled ``tl.dot`` GEMM in grouped program order
  (:func:`~compress_ops.kernels._launch.grouped_tile`), ``num_stages`` pipelining, int8 x int8
  -> int32 (exact; IMMA on sm_80, IGMMA on sm_90 from 64 rows) or e4m3 x e4m3 -> fp32 (QGMMA on
  sm_90 from 64 rows, sm_89+ only). ``qweight [N, K]`` row-major is read as the K-major
  ``[BLOCK_K, BLOCK_N]`` operand (what 8-bit wgmma needs, no transpose). Rows past M or N are
  clamped (recomputed, never stored), so only a ragged K masks its loads; row offsets are
  int64. The epilogue is ``float(acc) * s_x[m] * w_scales[n] + bias[n]`` in float32, in that
  order, each operation rounded, then rounded once to x's dtype. With ``QUANT_X`` (small M,
  the 16-row tile) it quantizes its own x rows as :func:`_act_quant_kernel` would, bit for
  bit (one launch: at decode the second launch cost more than the quantization's issue).
  Under the Triton interpreter int8 is bit-exact against
  :func:`~compress_ops.kernels.formats.w8a8.epilogue`.

FP8 accumulation: sm_90's FP8 wgmma adds its products in less than fp32 precision; the dot
promotes its partial sums into the fp32 accumulator every K tile (``max_num_imprecise_acc =
BLOCK_K``, 128 columns at the large tiles, as DeepSeek-V3 does), not only at the end (Triton's
default on sm_90). The interpreter multiplies ``float8e4nv`` operands itself (each product exact,
fp32 sums): no operand emulation is needed there. Its float conversions are another matter:
fp32 to bf16 truncates and fp32 to e4m3 loses a rounded-up mantissa's carry, so under the
interpreter (``EXACT_CVT``) both kernels round to bf16 and e4m3 with integer arithmetic
(:func:`_bf16_rne`, :func:`_e4m3_rne`); a GPU uses its ``cvt.rn`` instructions.

Roofline for one call (M, N, K), activations of ``e`` bytes: ``2 M N K`` FLOPs on 8-bit tensor
cores (twice fp16's peak on sm_89/sm_90); minimum bytes ``N K + M K e + M N e`` (+ ``N e``
scales); the quantized activation's round trip through memory adds ``2 M K + 8 M`` (not with
``QUANT_X``, whose programs re-read x's rows from L2 instead).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compress_ops.kernels import _launch as _launch_mod
from compress_ops.kernels._launch import grouped_tile
from compress_ops.kernels.formats.w8a8 import QMAX, check_inputs
from compress_ops.kernels.tuning import (
    DTYPES,
    KernelConfig,
    device_table,
    gpu_target,
    load_tables,
    table_config,
)

__all__ = [
    "quantize_activation",
    "w8a8_linear",
    "KernelConfig",
    "select_config",
    "act_quant_meta",
    "fused_call",
    "gemm_tile",
    "exact_cvt",
    "fp8_supported",
    "audit_specs",
]

_FAMILY = "w8a8"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bf16_rne(y):
    """fp32 ``y`` rounded to bfloat16, to nearest even (the interpreter's ``.to(tl.bfloat16)``
    truncates): add ``0x7FFF`` plus the kept lowest bit and drop 16 bits; NaN stays NaN."""
    b = y.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(y != y, 0x7FC0, r)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e4m3_rne(v):
    """Finite fp32 ``v`` with ``|v| <= 448`` to e4m3, to nearest even, bit by bit (the
    interpreter's float-to-fp8 conversion loses the carry of a rounded-up mantissa): normal
    magnitudes round their fp32 mantissa to 3 bits (the exponent rebased from 127 to 7),
    subnormal ones (``< 2**-6``) are ``rint(|v| * 2**9)``, which is also the encoding of the
    smallest normal when it rounds up to 8."""
    a = tl.abs(v)
    b = a.to(tl.int32, bitcast=True)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - (120 << 3)
    sub = (a * 512.0 + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    mag = tl.where(a < 0.015625, sub, normal)
    sign = (v.to(tl.int32, bitcast=True) >> 24) & 0x80
    return (mag | sign).to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _quantize(x, inv, ok, QMAX: tl.constexpr, FP8: tl.constexpr, EXACT_CVT: tl.constexpr,
              MASK_BAD: tl.constexpr = True):
    """Levels of fp32 ``x`` against ``inv``: ``v = x * inv`` rounded once, clamped to
    ``+-QMAX``, then e4m3 (round to nearest even) or int8 ``rint`` (half to even: adding
    ``1.5 * 2**23`` leaves the integer in the low mantissa bits, exact for ``|v| < 2**22``;
    clamping first is the same as clamping after, rint being monotone with ``rint(+-127) =
    +-127``). ``MASK_BAD``: where ``ok`` is False (a row holding NaN/Inf) every level is 0;
    the fused GEMM skips this (such a row's output is NaN whatever its levels)."""
    v = x * inv
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if MASK_BAD:
        v = tl.where(ok, v, 0.0)
    if FP8:
        if EXACT_CVT:  # the interpreter
            q = _e4m3_rne(v)
        else:  # cvt.rn.satfinite.e4m3x2.f32
            q = v.to(tl.float8e4nv)
    else:
        r = v + 12582912.0  # 1.5 * 2**23: its bits are 0x4B400000 + rint(v)
        q = (r.to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
    return q


@triton.jit
def _row_scales(amax, nf, scale_ptr, QMAX: tl.constexpr, STATIC: tl.constexpr):
    """``(s_x, inv, ok)`` of rows with absolute maxima ``amax`` and flags ``nf`` (``sum(x *
    0)``: 0, or NaN for a row holding NaN/Inf). Dynamic: ``s = amax / QMAX`` and ``inv = (1 /
    amax) * QMAX`` (0 for a zero row), the format's rule. Static: ``s`` the
    per-tensor ``input_scale``, ``inv = 1 / s`` with ``nan_to_num(posinf=0)``. Every division
    correctly rounded (``div_rn``); ``s_x = s + nf`` is NaN for a bad row."""
    one = amax * 0.0 + 1.0
    if STATIC:
        s = tl.load(scale_ptr).to(tl.float32) * one
        inv = tl.math.div_rn(one, s)
        inv = tl.where(inv == float("inf"), 0.0, inv)
        inv = tl.where(inv == -float("inf"), -3.4028234663852886e38, inv)
        inv = tl.where(inv != inv, 0.0, inv)
    else:
        s = tl.math.div_rn(amax, one * QMAX)
        nz = amax > 0.0
        inv = tl.where(nz, tl.math.div_rn(one, tl.where(nz, amax, 1.0)) * QMAX, 0.0)
    return s + nf, inv, nf == 0.0


@triton.jit
def _x_block(x_ptrs, sm_ptrs, kmask, EVEN_K: tl.constexpr, SMOOTH: tl.constexpr):
    """A block of one row of x in float32 (exact for fp16/bf16), times ``smooth`` at its
    columns where ``SMOOTH`` (SmoothQuant without a fold: one float32 rounding); masked
    columns (``kmask`` False, not ``EVEN_K``) are 0."""
    if EVEN_K:
        x = tl.load(x_ptrs).to(tl.float32)
        if SMOOTH:
            x = x * tl.load(sm_ptrs).to(tl.float32)
    else:
        x = tl.load(x_ptrs, mask=kmask, other=0.0).to(tl.float32)
        if SMOOTH:
            x = x * tl.load(sm_ptrs, mask=kmask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, scale_ptr, sm_ptr,
    K, stride_xm, stride_qm,
    QMAX: tl.constexpr,
    STATIC: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
    EVEN_K: tl.constexpr,
    SMOOTH: tl.constexpr = False,
    EXACT_CVT: tl.constexpr = False,
):
    """``q[m, :]`` and ``s[m]`` of row ``m = program_id(0)`` by the format's rule (the row's
    columns first times ``smooth`` where ``SMOOTH``: :func:`_x_block`).

    Pass 1: ``amax = max |x|`` and ``nf = sum(x * 0)`` (0, or NaN where the row holds a NaN or
    an Inf: ``tl.max`` may drop NaN, a sum does not), then the scales (:func:`_row_scales`).
    Pass 2: the levels (:func:`_quantize`), from the registers (``ONE_PASS``: the whole row is
    one block) or the row read again.

    Roofline: ``M K e`` bytes read, ``M K + 4 M`` written; memory-bound.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        x = _x_block(x_row + cols, sm_ptr + cols, cols < K, EVEN_K, SMOOTH)
        amax = tl.max(tl.abs(x), axis=0)
        nf = tl.sum(x * 0.0, axis=0)
    else:
        amax_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
        nf_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = _x_block(x_row + k0 + cols, sm_ptr + k0 + cols, k0 + cols < K, EVEN_K, SMOOTH)
            amax_v = tl.maximum(amax_v, tl.abs(xk))
            nf_v += xk * 0.0
        amax = tl.max(amax_v, axis=0)
        nf = tl.sum(nf_v, axis=0)
    s, inv, ok = _row_scales(amax, nf, scale_ptr, QMAX, STATIC)
    tl.store(s_ptr + row, s)
    if ONE_PASS:
        q = _quantize(x, inv, ok, QMAX, FP8, EXACT_CVT)
        if EVEN_K:
            tl.store(q_row + cols, q)
        else:
            tl.store(q_row + cols, q, mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            kmask = k0 + cols < K
            xk = _x_block(x_row + k0 + cols, sm_ptr + k0 + cols, kmask, EVEN_K, SMOOTH)
            q = _quantize(xk, inv, ok, QMAX, FP8, EXACT_CVT)
            if EVEN_K:
                tl.store(q_row + k0 + cols, q)
            else:
                tl.store(q_row + k0 + cols, q, mask=kmask)


@triton.jit
def _w8a8_gemm_kernel(
    # pointers
    a_ptr, qw_ptr, sx_ptr, ws_ptr, bias_ptr, y_ptr, scale_ptr, sm_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_wn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,
    QUANT_X: tl.constexpr = False,
    QMAX: tl.constexpr = 127.0,
    STATIC: tl.constexpr = False,
    FEW_ROWS: tl.constexpr = False,
    SMOOTH: tl.constexpr = False,
    EXACT_CVT: tl.constexpr = False,
):
    """``y[M, N] = (float(a @ w^T) * sx[:, None]) * ws[None, :] + bias`` with ``a [M, K]`` the
    quantized activation and ``w [N, K]`` the stored weight (both int8, or both e4m3).

    Grid: ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` programs in grouped order. Each program walks
    the whole K (no split-K: the int32 sum stays exact), ``num_stages`` tiles in flight. Rows
    of ``a`` past M and of ``w`` past N are clamped (``% M``, ``% N``): loaded, computed, not
    stored, so that with ``EVEN_K`` (K a multiple of BLOCK_K) no load is masked.

    ``QUANT_X`` (small M, one launch per call): ``a_ptr`` is x itself (fp16, bf16 or fp32) and
    each program quantizes its rows on the fly, as :func:`_act_quant_kernel` would, bit for
    bit: a first pass over its rows' K for ``amax`` and the NaN/Inf flag (x is L2-resident
    after the first program), then every K step quantizes the x tile in registers before the
    dot (x's columns times ``smooth`` first where ``SMOOTH``), and the epilogue takes ``s_x``
    from registers. ``FEW_ROWS`` (M below the tile):
    x's rows past M are masked, not clamped (no 16 copies of a decode step's one row).

    Roofline: ``2 M N K`` FLOPs on 8-bit tensor cores; bytes ``N K + M K + 4 M + M N e``
    (``QUANT_X``: ``N K + M K e + M N e``).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = qw_ptr + rn.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]: K-major
    m_in = offs_m < M
    if QUANT_X:  # pass 1 over this tile's rows: amax and the NaN/Inf flag, then the scales
        amax_v = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        nf_v = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        x_ptrs = a_ptrs
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K and not FEW_ROWS:
                xt = tl.load(x_ptrs)
            elif EVEN_K:
                xt = tl.load(x_ptrs, mask=m_in[:, None], other=0.0)
            elif FEW_ROWS:
                xt = tl.load(x_ptrs, mask=m_in[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0)
            xt = xt.to(tl.float32)
            if SMOOTH:
                sm = tl.load(sm_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0)
                xt = xt * sm.to(tl.float32)[None, :]
            amax_v = tl.maximum(amax_v, tl.abs(xt))
            nf_v += xt * 0.0
            x_ptrs += BLOCK_K
        sx, inv, ok = _row_scales(tl.max(amax_v, axis=1), tl.sum(nf_v, axis=1), scale_ptr,
                                  QMAX, STATIC)
        inv = inv[:, None]
    if FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            if QUANT_X and FEW_ROWS:
                a = tl.load(a_ptrs, mask=m_in[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_in = offs_k < K - k0
            if QUANT_X and FEW_ROWS:
                a = tl.load(a_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        if QUANT_X:
            a = a.to(tl.float32)
            if SMOOTH:
                sm = tl.load(sm_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0)
                a = a * sm.to(tl.float32)[None, :]
            a = _quantize(a, inv, True, QMAX, FP8, EXACT_CVT, False)
        if FP8:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if not QUANT_X:
        sx = tl.load(sx_ptr + rm)
    ws = tl.load(ws_ptr + rn).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None]
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if EXACT_CVT and y_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter truncates
        out = _bf16_rne(y)
    else:
        out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out, mask=m_in[:, None] & (offs_n < N)[None, :])


# ---------------------------------------------------------------------------------------------
# Configs: tuned defaults (configs/w8a8.json), audit specs
# ---------------------------------------------------------------------------------------------

MIN_SMALL_BLOCK_N = 32  # the small tile's narrowest BLOCK_N on a GPU (select_config)
SMALL_MAX_BM = 32  # tiles of up to this many rows are memory-bound: narrowed to fill the SMs


def select_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """The GEMM tile of M's bucket from ``configs/w8a8.json`` (the GPU's own table if shipped,
    else ``default``). On a GPU (or a simulated one) a tile of at most ``SMALL_MAX_BM`` rows
    halves BLOCK_N, down to ``MIN_SMALL_BLOCK_N``, while its grid would leave more than a tenth
    of the multiprocessors idle (never split-K: the int32 sum would not stay exact)."""
    return _select_config(m, n, k, device, gpu_target(device))


@functools.lru_cache(maxsize=4096)  # per-call Python cost matters at decode
def _select_config(m: int, n: int, k: int, device: torch.device, target) -> KernelConfig:
    cfg = table_config(device_table(_FAMILY, device), m)
    if target is not None and cfg.block_m <= SMALL_MAX_BM:
        bn = cfg.block_n
        while (-(-m // cfg.block_m) * -(-n // bn) * 10 < target.sms * 9
               and bn // 2 >= MIN_SMALL_BLOCK_N):
            bn //= 2
        if bn != cfg.block_n:
            cfg = KernelConfig(**{**cfg.__dict__, "block_n": bn})
    return cfg


def gemm_tile(cfg: KernelConfig, k: int) -> KernelConfig:
    """A shipped tile, shrunk where it would spill (the audit, sm_80 and sm_90): where the
    weight's rows are not 16-byte aligned (K % 16: its tiles cannot be copied asynchronously
    and are staged in registers) at most 64 columns of K per step and 2 stages."""
    if k % 16 and (cfg.block_k > 64 or cfg.num_stages > 2):
        return KernelConfig(**{**cfg.__dict__, "block_k": min(cfg.block_k, 64),
                               "num_stages": min(cfg.num_stages, 2)})
    return cfg


def fused_call(m: int, cfg: KernelConfig, device: torch.device) -> bool:
    """Whether a call of M rows on this tile takes one launch, the GEMM quantizing x itself
    (``QUANT_X``): up to the table's ``fused_max_m`` rows, on a tile of at most
    ``SMALL_MAX_BM`` rows (where x's tile is small next to the weight's: 16 x 256 elements
    quantized per 64 x 256 weights). Larger M quantizes x once (:func:`_act_quant_kernel`)."""
    return (m <= device_table(_FAMILY, device).get("fused_max_m", 0)
            and cfg.block_m <= SMALL_MAX_BM)


def exact_cvt(device: torch.device) -> bool:
    """``EXACT_CVT``: round fp32 to bf16 and to e4m3 with integer arithmetic (the Triton
    interpreter's conversions truncate to bf16 and lose a rounded-up e4m3 mantissa's carry);
    a GPU (or a simulated one) uses its ``cvt.rn`` instructions."""
    return gpu_target(device) is None


def act_quant_meta(k: int, device: torch.device) -> dict:
    """The constexprs and options of :func:`_act_quant_kernel` for rows of ``k`` columns: one
    pass over a register-held row up to ``max_one_pass_k``, else two of ``block_k``."""
    t = device_table(_FAMILY, device)["act_quant"]
    if k <= t["max_one_pass_k"]:
        bk = triton.next_power_of_2(k)
        return {"BLOCK_K": bk, "ONE_PASS": True, "EVEN_K": bk == k,
                "EXACT_CVT": exact_cvt(device),
                "num_warps": max(1, min(t["num_warps_one_pass"], bk // 256)), "num_stages": 1}
    bk = t["block_k"]
    return {"BLOCK_K": bk, "ONE_PASS": False, "EVEN_K": k % bk == 0,
            "EXACT_CVT": exact_cvt(device), "num_warps": t["num_warps"], "num_stages": 1}


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return _cuda_capability(device)


@functools.lru_cache(maxsize=64)
def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def fp8_supported(device: torch.device) -> bool:
    """Whether FP8 (e4m3) W8A8 runs on ``device``: CUDA compute capability 8.9+ (Ada, Hopper),
    the interpreter, and a simulated GPU (the static model's H200)."""
    cap = _capability(device)
    return cap is None or cap >= (8, 9)


def _check_fp8(device: torch.device) -> None:
    if not fp8_supported(device):
        major, minor = _capability(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise NotImplementedError(
            f"FP8 (e4m3) W8A8 needs a GPU of compute capability >= 8.9 (sm_89+: Ada, Hopper); "
            f"{name} has {major}.{minor} (sm_{major}{minor}). Use int8 W8A8 on this GPU.")


def audit_specs(defaults_only: bool = False) -> list[dict]:
    """Every (kernel, specialization) the static GPU audit compiles, recorded from real calls
    (CPU tensors configured as on an H200, :func:`~compress_ops.kernels.tuning.simulate_gpu`)
    with the specialization Triton computes for their arguments: the GEMM at every shipped
    bucket for int8 and FP8 with fp16 x, fp16 at a ragged K, bf16 x at the small and the large
    tile (fp32 x in the two-pass calls), fused (``QUANT_X``, up to
    ``fused_max_m`` rows) or not, with SmoothQuant factors or not; the activation quantization
    in one pass and in two (K past ``max_one_pass_k``), dynamic and static, every x dtype.
    FP8 specs are compiled for sm_90 only (``archs``: sm_80 has no FP8 tensor cores). int8
    expects IMMA on sm_80 and, from 64 rows, IGMMA on sm_90; FP8 QGMMA from 64 rows (HMMA-class
    FP8 mma below). ``defaults_only`` (the second audit, under the GPU image's Triton): the
    fp16 calls at every bucket and a ragged K only (the other dtypes, shapes, static scales and
    smoothing are compiled by the full audit). Empty under the interpreter (recording needs
    Triton's JIT binder)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    from compress_ops.kernels import launches, tuning

    table = load_tables(_FAMILY)["default"]
    buckets = sorted(int(b) for b in table["gemm"])
    n = k = 8192
    calls = []  # (m, n, k, x dtype, qdtype, static[, smooth])
    for qd in (torch.int8, torch.float8_e4m3fn):
        for m in [1] + buckets + [2048]:  # M = 1: the 16-row tile with FEW_ROWS
            calls.append((m, n, k, torch.float16, qd, False))
        for m in (16, 2048):
            calls.append((m, n, k - 92, torch.float16, qd, False))  # ragged K
        if defaults_only:
            continue
        for m in (16, 2048):  # bf16 x (fp32 x: the two-pass calls below)
            calls.append((m, n, k, torch.bfloat16, qd, False))
        for m in (16, 2048):  # static scale: fused, and the quantization kernel
            calls.append((m, n, k, torch.float16, qd, True))
        calls.append((32, n, 3 * k, torch.float16, qd, False))  # two-pass quantization
        calls.append((32, n, 3 * k, torch.float32, qd, True))
        calls.append((16, n, 3 * k, torch.float32, qd, True))  # fused, 3 x 8192 columns
        for m in (16, 2048):  # SmoothQuant factors in the quantization
            calls.append((m, n, k, torch.bfloat16, qd, False, True))
    specs, seen = [], set()
    with tuning.simulate_gpu():
        for m, nn, kk, dt, qd, static, *smoothed in calls:
            x = torch.empty(m, kk, dtype=dt)
            w = torch.empty(nn, kk, dtype=qd)
            ws = torch.empty(nn, dtype=dt)
            scale = torch.ones(1, dtype=dt) if static else None
            smooth = torch.ones(kk, dtype=dt) if smoothed else None
            with launches.capture(run=False) as got:
                w8a8_linear(x, w, ws, None, scale, smooth, checked=True)
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
                fp8 = qd == torch.float8_e4m3fn
                qname = "fp8" if fp8 else "int8"
                name = (f"real_m{m}n{nn}k{kk}/{qname}/{str(dt).split('.')[-1]}"
                        f"{'/static' if static else ''}{'/smooth' if smoothed else ''}")
                if la.kernel is _w8a8_gemm_kernel:
                    big = la.kwargs["BLOCK_M"] >= 64
                    mma = ({90: "QGMMA" if big else "HMMA"} if fp8
                           else {80: "IMMA", 90: "IGMMA" if big else "IMMA"})
                else:
                    mma = "-"
                specs.append({"kernel": la.kernel.__name__, "config": name, "fn": la.kernel,
                              "signature": sig, "constexprs": consts, "attrs": attrs,
                              "num_warps": opts.num_warps, "num_stages": opts.num_stages,
                              "options": {"enable_fp_fusion": False},
                              "archs": [90] if fp8 else [80, 90], "expect_mma": mma})
    return specs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What a call's launches derive from its shapes, dtypes, device and config: the activation
    quantization's constexprs and options, the GEMM's grid and constexprs with options, the
    quantized activation's row stride (16-byte aligned, so the GEMM copies its rows
    asynchronously even at a ragged K), and whether the GEMM quantizes x itself."""

    act_meta: dict
    gemm_grid: tuple
    gemm_meta: dict
    q_stride: int
    fused: bool  # one launch: the GEMM quantizes x itself (QUANT_X)


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _q_stride(k: int) -> int:
    return -(-k // 16) * 16


def _act_meta(k: int, qdtype: torch.dtype, static: bool, smooth: bool,
              device: torch.device) -> dict:
    return dict(QMAX=QMAX[qdtype], STATIC=static, FP8=qdtype == torch.float8_e4m3fn,
                SMOOTH=smooth, enable_fp_fusion=False, **act_quant_meta(k, device))


def _make_plan(m: int, n: int, k: int, dtype: torch.dtype, qdtype: torch.dtype,
               device: torch.device, has_bias: bool, static: bool, smooth: bool,
               cfg: KernelConfig | None) -> _Plan:
    fp8 = qdtype == torch.float8_e4m3fn
    if cfg is None:
        cfg = select_config(m, n, k, device)
    if cfg.path != "gemm":
        raise ValueError(f"w8a8 has only tensor-core tiles: config path must be 'gemm', got "
                         f"{cfg.path!r}")
    cfg = gemm_tile(cfg, k)
    fused = fused_call(m, cfg, device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    meta = dict(HAS_BIAS=has_bias, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0, FP8=fp8,
                EXACT_CVT=exact_cvt(device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                enable_fp_fusion=False)
    if fused:
        meta.update(QUANT_X=True, QMAX=QMAX[qdtype], STATIC=static, FEW_ROWS=m < cfg.block_m,
                    SMOOTH=smooth)
    act = {} if fused else _act_meta(k, qdtype, static, smooth, device)
    return _Plan(act, grid, meta, _q_stride(k), fused)


def _plan(m: int, n: int, k: int, dtype: torch.dtype, qdtype: torch.dtype, device: torch.device,
          has_bias: bool, static: bool, smooth: bool, cfg: KernelConfig | None) -> _Plan:
    """:func:`_make_plan` remembered per everything it reads, so an eager decode step pays a
    dict lookup (its launches are host-bound)."""
    key = (m, n, k, dtype, qdtype, device, gpu_target(device), has_bias, static, smooth, cfg)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(m, n, k, dtype, qdtype, device, has_bias, static,
                                        smooth, cfg)
    return plan


def _check_companion(t: object, name: str, numel: int, x2: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} value{'s' * (numel != 1)}, got shape "
                         f"{tuple(t.shape)}")
    if t.dtype != x2.dtype:
        raise TypeError(f"{name} dtype {t.dtype} must match x dtype {x2.dtype}")
    if t.device != x2.device:
        raise ValueError(f"x on {x2.device} but {name} on {t.device}")


def _check_act(x2: object, qdtype: object, input_scale: object, smooth: object) -> None:
    if not isinstance(x2, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x2).__name__}")
    if x2.dtype not in DTYPES.values():
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x2.dtype}")
    if x2.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x2.shape)}")
    if x2.shape[1] < 1:
        raise ValueError(f"quantize_activation: K (x.shape[-1]) must be >= 1, got "
                         f"{x2.shape[1]}")
    if qdtype not in QMAX:
        raise TypeError(f"qdtype must be torch.int8 or torch.float8_e4m3fn, got {qdtype}")
    if input_scale is not None:
        _check_companion(input_scale, "input_scale", 1, x2)
    if smooth is not None:
        _check_companion(smooth, "smooth", x2.shape[1], x2)
        if smooth.dim() != 1:
            raise ValueError(f"smooth must be 1-D [K], got shape {tuple(smooth.shape)}")


def _quantize_rows(x2: torch.Tensor, qdtype: torch.dtype, input_scale: torch.Tensor | None,
                   smooth: torch.Tensor | None, act_meta: dict,
                   q_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x2.shape
    qbuf = torch.empty((m, q_stride), device=x2.device, dtype=qdtype)
    s = torch.empty((m,), device=x2.device, dtype=torch.float32)
    scale = input_scale if input_scale is not None else s  # dummy pointers, never read
    sm = smooth if smooth is not None else s
    _launch_mod.launch(_act_quant_kernel, (m,), x2, qbuf, s, scale, sm, k, x2.stride(0),
                       qbuf.stride(0), **act_meta)
    return qbuf[:, :k], s


def quantize_activation(x2: torch.Tensor, qdtype: torch.dtype,
                        input_scale: torch.Tensor | None = None,
                        smooth: torch.Tensor | None = None, *,
                        checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K], s_x [M] float32)`` of ``x2 [M, K]`` (fp16, bf16 or fp32) by the format's
    rule (:func:`compress_ops.kernels.formats.w8a8.quantize_activation`, bit for bit): per
    row and dynamic (``input_scale`` None), or with the static per-tensor ``input_scale`` (one
    value in x's dtype); the columns first multiplied by ``smooth [K]`` (x's dtype) where
    given. ``qdtype``: ``torch.int8`` or ``torch.float8_e4m3fn`` (on CUDA sm_89+, else
    ``NotImplementedError``). ``q``'s rows are 16-byte aligned (a view of a buffer whose row
    stride is K rounded up to 16). One launch of :func:`_act_quant_kernel`. ``checked=True``
    skips the input checks."""
    if not checked:
        _check_act(x2, qdtype, input_scale, smooth)
    if qdtype == torch.float8_e4m3fn:
        _check_fp8(x2.device)
    m, k = x2.shape
    if m == 0:
        return (torch.empty((0, k), device=x2.device, dtype=qdtype),
                torch.empty((0,), device=x2.device, dtype=torch.float32))
    x2 = x2.contiguous()
    smooth = smooth.contiguous() if smooth is not None else None
    meta = _act_meta(k, qdtype, input_scale is not None, smooth is not None, x2.device)
    return _quantize_rows(x2, qdtype, input_scale, smooth, meta, _q_stride(k))


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                smooth: torch.Tensor | None = None, *, config: KernelConfig | None = None,
                checked: bool = False) -> torch.Tensor:
    """``y[..., N] = epilogue(quantize(x * smooth) @ qweight^T)`` (the format's rules, in x's
    dtype).

    ``x [..., K]`` (any leading dims, M = 0 works; a non-contiguous x is made contiguous once),
    ``qweight [N, K]`` int8 or ``float8_e4m3fn`` with ``w_scales [N]`` in x's dtype, an
    optional ``bias [N]``, ``input_scale`` (None: per-row dynamic scales; else the static
    per-tensor scale, one value in x's dtype) and an optional ``smooth [K]`` (SmoothQuant
    factors that multiply x's columns before the quantization). Up to ``fused_max_m`` rows one
    launch of :func:`_w8a8_gemm_kernel` quantizing x itself, past it
    :func:`_act_quant_kernel` then the GEMM. FP8 on a CUDA GPU below compute capability 8.9
    raises ``NotImplementedError`` (the op routes around it). ``config`` overrides the shipped
    tile (tests force one); ``checked=True`` skips
    :func:`~compress_ops.kernels.formats.w8a8.check_inputs` (the op validates once per call).
    """
    if not checked:
        check_inputs(x, qweight, w_scales, bias, input_scale, smooth)
    qdtype = qweight.dtype
    if qdtype == torch.float8_e4m3fn:
        _check_fp8(x.device)
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    x2 = x2.contiguous()
    qweight = qweight.contiguous()
    w_scales = w_scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    smooth = smooth.contiguous() if smooth is not None else None
    plan = _plan(m, n, k, x2.dtype, qdtype, x2.device, bias is not None,
                 input_scale is not None, smooth is not None, config)
    b = bias if bias is not None else w_scales  # dummy pointers, never read
    scale = input_scale if input_scale is not None else w_scales
    sm = smooth if smooth is not None else w_scales
    if plan.fused:
        a, s = x2, w_scales
    else:
        a, s = _quantize_rows(x2, qdtype, input_scale, smooth, plan.act_meta, plan.q_stride)
    y = _launch_mod.output(m, n, x2, 1)
    _launch_mod.launch(_w8a8_gemm_kernel, plan.gemm_grid, a, qweight, s, w_scales, b, y, scale,
                       sm, m, n, k, a.stride(0), qweight.stride(0), y.stride(0),
                       **plan.gemm_meta)
    return y.reshape(*lead, n)
