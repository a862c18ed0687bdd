"""Fused depthwise-separable convolution (MobileNet): depthwise k x k -> bias -> act -> pointwise
1x1 -> bias -> act -> + residual, in one Triton launch.

The layout, activations and checks: :mod:`compress_ops.kernels.formats.dwsep_conv`.

Kernel
------
:func:`_dwsep_conv_kernel` tiles the output as ``[BLOCK_P pixels, BLOCK_CO channels]``
(pixels flattened over ``B x Ho x Wo``). For each chunk of ``BLOCK_C`` input channels it
computes the depthwise output of its pixels in registers (the ``k*k`` taps: shifted, masked
loads of ``[BLOCK_P, BLOCK_C]`` NHWC rows and one ``[BLOCK_C]`` weight vector per tap), adds
the bias, applies the activation, casts to the activation dtype and feeds it to ``tl.dot``
with the ``[BLOCK_C, BLOCK_CO]`` pointwise tile.

Arithmetic: fp16 activations accumulate the taps in fp16 (``F16_ACC``; on a GPU one
``HFMA2`` per two channels and tap, no conversions, and the result is already the packed dot
operand; the unfused pair rounds the depthwise output to fp16 too); bf16 and fp32
accumulate in fp32 (bf16's 8-bit mantissa would lose too much over 9 or 25 taps), with half
the channel block (:func:`table_tile`: the same registers). The
fp16 sum rounds once per tap: the error grows with ``k*k`` roundings of the partial sums
(about ``sqrt(k*k) 2**-11`` relative, against one ``2**-11`` rounding of an fp32 sum), and
a partial sum past 65504 becomes Inf even where the full sum would not.

Weights: ``dw_weight [C, k, k]`` at any strides whose taps are ``(i*k + j) stride(2)`` apart
(contiguous, or the module's tap-major ``(1, k C, C)``, where a tap of ``BLOCK_C`` channels is
one vector load); other layouts are copied once per call.

The depthwise output never goes to HBM. With ``Cout > BLOCK_CO`` the depthwise part is
recomputed per output-channel tile (``k*k`` FMAs per element against ``Cout`` for the 1x1),
except where :func:`route` takes the two-phase kernel.

:func:`_dwsep_two_phase_kernel` (one launch, the depthwise part once): per pixel tile,
``cdiv(C, BLOCK_C)`` programs store their depthwise chunk (activation dtype) into an L2
workspace and count their arrival; ``cdiv(Cout, BLOCK_CO)`` programs wait for the tile's chunks
(acquire) and run the 1x1 over them with the epilogue. Tickets order the roles so that no
program waits on one that has not started; the last readers reset the counters (no memset).
It moves ``B Ho Wo C e`` more through L2 (written once, read per output-channel tile) and pays
the handoff, so the table routes only the Cout buckets where the static model predicts it
faster: MobileNetV2's 14^2 x 576 -> 160 (4.70 -> 4.14 us) and 7^2 x 960 -> 320 (5.93 ->
5.66 us), Triton 3.9.

Bytes (activations of ``e`` bytes; weights are small and cached)
---------------------------------------------------------------
Unfused (cuDNN depthwise, then pointwise): read ``B H W C``, write ``B Ho Wo C``, read it back,
write ``B Ho Wo Cout`` (+ read the residual): ``e (B H W C + 2 B Ho Wo C + B Ho Wo Cout)``.
Fused: ``e (B H W C + B Ho Wo Cout)`` (+ residual), i.e. ``2 B Ho Wo C e`` less.
MobileNetV2's dw + project pairs (expansion 6, stride 1, ``C = 6 Cout``): unfused moves
``B H W (6 + 12 + 1) Cout e``, fused ``B H W 7 Cout e``: 2.7x fewer bytes; stride 2 pairs
(``Ho Wo = H W / 4``): ``(6 + 3 + 0.25)`` against ``6.25``: 1.5x. The pairs are memory-bound
(``2 C Cout`` FLOPs per output pixel against ``~7 Cout e`` bytes, ~40 FLOP/B in fp16 at
Cout = 24..320: under the H100/H200 ridge of ~300 FLOP/B), so the predicted gain is ~1.5-2.7x
per pair, minus the recomputation for ``Cout > BLOCK_CO``.
FLOPs: ``2 B Ho Wo C (k*k + Cout)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from compress_ops.kernels import _launch as _launch_mod
from compress_ops.kernels._launch import dot_meta, ptx
from compress_ops.kernels.formats.dwsep_conv import (
    ACTIVATIONS,
    KERNEL_SIZES,
    check_inputs,
    output_size,
)
from compress_ops.kernels.tuning import device_name, gpu_target, load_tables

__all__ = ["dwsep_conv2d", "select_config", "audit_specs"]

_FAMILY = "dwsep_conv"
# Triton before 3.9 lowers fp16 tl.maximum / tl.minimum through fp32 (two conversions, two FMNMX
# and a pack per pair); 3.9 emits HMNMX2 / HFMA2.RELU, a little leaner than the inline PTX
_ASM_RELU = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _relu6(v):
    """min(max(v, 0), 6) with NaN kept (``F.relu6``): the default ``tl.maximum`` /
    ``tl.minimum`` return the other operand for NaN; ``PropagateNan.ALL`` is ``max.NaN``."""
    v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, 6.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _activation(v, ACT: tl.constexpr):
    """The activations of ``ACTIVATION_FNS``, non-finite values included: NaN -> NaN; relu:
    +-Inf -> Inf, 0; relu6: 6, 0; hardswish: Inf, NaN (``-Inf * 0``); silu: Inf, NaN."""
    if ACT == 1:  # relu
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:  # relu6
        v = _relu6(v)
    elif ACT == 3:  # hardswish: v * relu6(v + 3) / 6
        v = v * _relu6(v + 3.0) / 6.0
    elif ACT == 4:  # silu
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _relu_f16x2(v, SIX: tl.constexpr):
    """relu (``SIX`` off) or relu6 of fp16 ``v`` in packed fp16, NaN kept (PTX ``max.NaN`` /
    ``min.NaN.f16x2``, sm_80+): Triton 3.6 lowers ``tl.maximum`` of fp16 through fp32 (two
    conversions, two FMNMX and a pack per pair)."""
    if SIX:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 z, s, t; mov.b32 z, 0; mov.b32 s, 0x46004600; "
            "max.NaN.f16x2 t, $1, z; min.NaN.f16x2 $0, t, s; }",
            "=r,r", [v], dtype=tl.float16, is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 z; mov.b32 z, 0; max.NaN.f16x2 $0, $1, z; }",
            "=r,r", [v], dtype=tl.float16, is_pure=True, pack=2)
    return out


@triton.jit
def _tap_row(d, x_tile, w_row, c_mask, hi, wi0, H, W, i, stride_xh, stride_xw,
             stride_wt, KSIZE: tl.constexpr, EVEN_C: tl.constexpr):
    """``d += x[hi, wi0 + j] * w[i, j]`` over the row's taps j (unrolled), FMAs in ``d``'s dtype
    (fp32, or packed fp16 pairs). ``w_row``: the channels' tap (0, 0) addresses."""
    # 0 <= v < n as one unsigned compare (pixels past P carry a negative row)
    row_ok = hi.to(tl.uint32) < H.to(tl.uint32)
    for j in tl.static_range(KSIZE):
        wi = wi0 + j
        ok = row_ok & (wi.to(tl.uint32) < W.to(tl.uint32))
        if EVEN_C:  # whole channel blocks: the pixel's bounds are the only mask
            xv = tl.load(x_tile + (i * stride_xh + j * stride_xw), mask=ok[:, None], other=0.0)
            wv = tl.load(w_row + (i * KSIZE + j) * stride_wt)
        else:
            xv = tl.load(x_tile + (i * stride_xh + j * stride_xw),
                         mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(w_row + (i * KSIZE + j) * stride_wt, mask=c_mask, other=0.0)
        d = tl.fma(xv.to(d.dtype), wv.to(d.dtype)[None, :], d)
    return d


@triton.jit
def _pixels(tile, x_ptr, P, HO, WO, pad_top, pad_left, stride_xb, stride_xh, stride_xw,
            KSIZE: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pixel tile ``tile``: its flat indices, mask, the ``[BLOCK_P]`` addresses of each pixel's
    tap (0, 0) (outside the image where padded: such taps are masked, never read; every tap
    adds a scalar offset to them) and the top-left input row and column."""
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    bi = offs_p // (HO * WO)
    rem = offs_p % (HO * WO)
    ho = rem // WO
    wo = rem % WO
    hi0 = tl.where(p_mask, ho * STRIDE - pad_top, -KSIZE - 1)  # past P: no row is inside
    wi0 = wo * STRIDE - pad_left
    x_pix = x_ptr + bi.to(tl.int64) * stride_xb + hi0.to(tl.int64) * stride_xh \
        + wi0 * stride_xw
    return offs_p, p_mask, x_pix, hi0, wi0


@triton.jit
def _dw_chunk(x_pix, dww_ptr, dwb_ptr, offs_c, c_mask, hi0, wi0, H, W, stride_xh, stride_xw,
              stride_wc, stride_wt, KSIZE: tl.constexpr, ACT1: tl.constexpr,
              HAS_DW_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
              F16_ACC: tl.constexpr, EVEN_C: tl.constexpr, ASM_RELU: tl.constexpr):
    """``act1(dw(x) + dw_b)`` of the pixels for the channels ``offs_c``: ``[BLOCK_P, BLOCK_C]``
    in fp16 (``F16_ACC``) or fp32."""
    x_tile = x_pix[:, None] + offs_c[None, :]
    w_row = dww_ptr + offs_c * stride_wc
    if F16_ACC:
        d = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float16)
    else:
        d = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # the taps in the order (i, j) row-major, unrolled (a 5 x 5 kernel's rows stay a
    # runtime loop: 25 tiles in flight spill on sm_80): a tap costs a scalar offset on the
    # pixels' addresses, its two bounds and its FMAs
    if KSIZE <= 3:
        for i in tl.static_range(KSIZE):
            d = _tap_row(d, x_tile, w_row, c_mask, hi0 + i, wi0, H, W, i,
                         stride_xh, stride_xw, stride_wt, KSIZE, EVEN_C)
    else:
        for i in range(KSIZE):
            d = _tap_row(d, x_tile, w_row, c_mask, hi0 + i, wi0, H, W, i,
                         stride_xh, stride_xw, stride_wt, KSIZE, EVEN_C)
    if HAS_DW_BIAS:
        d += tl.load(dwb_ptr + offs_c, mask=c_mask, other=0.0).to(d.dtype)[None, :]
    if ACT1 >= 3:  # hardswish, silu: in fp32
        d = _activation(d.to(tl.float32), ACT1)
    elif F16_ACC and ASM_RELU and ACT1 > 0:
        d = _relu_f16x2(d, ACT1 == 2)
    else:
        d = _activation(d, ACT1)
    return d


@triton.jit
def _epilogue(acc, pwb_ptr, res_ptr, y_ptr, offs_p, p_mask, offs_co, co_mask, COUT,
              ACT2: tl.constexpr, HAS_PW_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """``y = act2(acc + pw_b) (+ residual)`` of a ``[BLOCK_P, BLOCK_CO]`` tile, stored in y's
    dtype. y and the residual are dense ``[B, Ho, Wo, Cout]``: pixel p's row starts at
    ``p Cout`` (no div/mod in the accumulator's layout)."""
    if HAS_PW_BIAS:
        acc += tl.load(pwb_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT2)
    out_mask = p_mask[:, None] & co_mask[None, :]
    if HAS_RES:
        r_pix = res_ptr + offs_p.to(tl.int64) * COUT
        acc += tl.load(r_pix[:, None] + offs_co[None, :], mask=out_mask,
                       other=0.0).to(tl.float32)
    y_pix = y_ptr + offs_p.to(tl.int64) * COUT
    tl.store(y_pix[:, None] + offs_co[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dwsep_conv_kernel(
    # pointers
    x_ptr, dww_ptr, dwb_ptr, pww_ptr, pwb_ptr, res_ptr, y_ptr,
    # sizes
    P, H, W, C, HO, WO, COUT, pad_top, pad_left,
    # strides (channels-last: unit channel stride everywhere)
    stride_xb, stride_xh, stride_xw,
    stride_wc, stride_wt,
    # meta-parameters
    KSIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    ACT1: tl.constexpr,
    ACT2: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr,
    HAS_PW_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
    F16_ACC: tl.constexpr = False,
    EVEN_C: tl.constexpr = False,
    ASM_RELU: tl.constexpr = False,
):
    """y[b, ho, wo, :] = act2(act1(dw(x) + dw_b) @ pw^T + pw_b) (+ residual), NHWC.

    Grid: (cdiv(B Ho Wo, BLOCK_P), cdiv(Cout, BLOCK_CO)). Per BLOCK_C input channels: KSIZE^2
    masked, shifted ``[BLOCK_P, BLOCK_C]`` loads (zero padding = masked-out taps), fp32 FMAs,
    bias + act1, then ``tl.dot`` with the ``[BLOCK_C, BLOCK_CO]`` pointwise tile (fp32
    accumulator). dw_weight is read as [C, KSIZE, KSIZE], pw_weight as [COUT, C] (K-major tile).

    Roofline: 2 B Ho Wo C (KSIZE^2 + Cout) FLOPs; minimum bytes e (B H W C + B Ho Wo Cout)
    (+ the residual).
    """
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    offs_p, p_mask, x_pix, hi0, wi0 = _pixels(pid_p, x_ptr, P, HO, WO, pad_top, pad_left,
                                              stride_xb, stride_xh, stride_xw, KSIZE, STRIDE,
                                              BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < COUT

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        d = _dw_chunk(x_pix, dww_ptr, dwb_ptr, offs_c, c_mask, hi0, wi0, H, W, stride_xh,
                      stride_xw, stride_wc, stride_wt, KSIZE, ACT1, HAS_DW_BIAS, BLOCK_P,
                      BLOCK_C, F16_ACC, EVEN_C, ASM_RELU)
        pw = tl.load(pww_ptr + offs_co[None, :] * C + offs_c[:, None],
                     mask=c_mask[:, None] & co_mask[None, :], other=0.0)  # [BLOCK_C, BLOCK_CO]
        if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
            acc = tl.dot(d, pw.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(d.to(pw.dtype), pw, acc, input_precision=DOT_PRECISION)

    _epilogue(acc, pwb_ptr, res_ptr, y_ptr, offs_p, p_mask, offs_co, co_mask, COUT, ACT2,
              HAS_PW_BIAS, HAS_RES)


@triton.jit
def _dwsep_two_phase_kernel(
    # pointers (d_ptr: the depthwise workspace [n_tiles BLOCK_P, n_c BLOCK_C]; sync_ptr: the
    # int32 counters [2 + 2 n_tiles], zero between launches)
    x_ptr, dww_ptr, dwb_ptr, pww_ptr, pwb_ptr, res_ptr, y_ptr, d_ptr, sync_ptr,
    # sizes
    P, H, W, C, HO, WO, COUT, pad_top, pad_left, n_tiles, n_c, n_co,
    # strides (channels-last: unit channel stride everywhere)
    stride_xb, stride_xh, stride_xw,
    stride_wc, stride_wt,
    # meta-parameters
    KSIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    ACT1: tl.constexpr,
    ACT2: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr,
    HAS_PW_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
    F16_ACC: tl.constexpr = False,
    EVEN_C: tl.constexpr = False,
    ASM_RELU: tl.constexpr = False,
):
    """The pair in one launch of ``n_tiles (n_c + n_co)`` programs, the depthwise part computed
    once: ``n_c = cdiv(C, BLOCK_C)`` depthwise programs and ``n_co = cdiv(Cout, BLOCK_CO)``
    pointwise programs per pixel tile.

    Each program draws a ticket (``sync[0]``, the order programs *started*); ticket ``t`` is
    role ``t % (n_c + n_co)`` of pixel tile ``t // (n_c + n_co)``. Roles ``0 .. n_c - 1``
    (phase 1) compute their ``[BLOCK_P, BLOCK_C]`` depthwise chunk (bias, act1), store it in
    the activation dtype (what the unfused pair stores) into the workspace ``d`` (L2) and
    count themselves in the tile's arrival counter ``sync[2 + tile]`` (release). The other
    roles (phase 2) wait until the tile's ``n_c`` chunks have arrived (acquire), then run
    ``d[tile] @ pw[co tile]^T`` over the chunks (read from L2) and the epilogue (bias, act2,
    residual), and count themselves in ``sync[2 + n_tiles + tile]`` and ``sync[1]``.

    A program waits only for lower tickets (its tile's depthwise roles come first), which have
    started and never wait: no grid, residency or scheduling order deadlocks it (the
    interpreter runs programs in ticket order). The last pointwise program of a tile zeroes
    the tile's two counters; the last of the launch the ticket and ``sync[1]``: the counters
    are zero again for the next launch (no memset; ``d`` is overwritten whole every launch).
    """
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    per_tile = n_c + n_co
    tile = ticket // per_tile
    role = ticket - tile * per_tile
    offs_p, p_mask, x_pix, hi0, wi0 = _pixels(tile, x_ptr, P, HO, WO, pad_top, pad_left,
                                              stride_xb, stride_xh, stride_xw, KSIZE, STRIDE,
                                              BLOCK_P)
    stride_d = n_c * BLOCK_C
    d_rows = d_ptr + offs_p.to(tl.int64)[:, None] * stride_d
    if role < n_c:  # phase 1: the depthwise chunk ``role``
        offs_c = role * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        d = _dw_chunk(x_pix, dww_ptr, dwb_ptr, offs_c, c_mask, hi0, wi0, H, W, stride_xh,
                      stride_xw, stride_wc, stride_wt, KSIZE, ACT1, HAS_DW_BIAS, BLOCK_P,
                      BLOCK_C, F16_ACC, EVEN_C, ASM_RELU)
        # the workspace covers every tile's rows and chunks' channels: no mask (channels past
        # C hold act1(0) = 0, pixels past P rows no output reads)
        tl.store(d_rows + offs_c[None, :], d.to(d_ptr.dtype.element_ty))
        tl.debug_barrier()  # every thread's stores are issued before the arrival is released
        tl.atomic_add(sync_ptr + 2 + tile, 1, sem="release")
    else:  # phase 2: the pointwise tile ``role - n_c``
        offs_co = (role - n_c) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < COUT
        offs_k = tl.arange(0, BLOCK_C)
        # the pointwise tile as stored, [BLOCK_CO, BLOCK_C] (rows contiguous: 16-byte copies),
        # transposed for the dot (a shared-memory view, no data movement)
        pw_tile = pww_ptr + offs_co[:, None] * C + offs_k[None, :]
        d_tile = d_rows + offs_k[None, :]
        arrived = tl.atomic_add(sync_ptr + 2 + tile, 0, sem="acquire")
        while arrived < n_c:
            arrived = tl.atomic_add(sync_ptr + 2 + tile, 0, sem="acquire")
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
        for kc in range(0, n_c):
            c0 = kc * BLOCK_C
            if EVEN_C:
                pw = tl.trans(tl.load(pw_tile + c0, mask=co_mask[:, None], other=0.0))
            else:
                pw = tl.trans(tl.load(pw_tile + c0,
                                      mask=co_mask[:, None] & (c0 + offs_k < C)[None, :],
                                      other=0.0))
            dt = tl.load(d_tile + c0, cache_modifier=".cg")
            if UPCAST_DOT:  # Triton-interpreter workaround: its bf16 tl.dot multiplies raw bits
                acc = tl.dot(dt.to(tl.float32), pw.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(dt, pw, acc, input_precision=DOT_PRECISION)
        _epilogue(acc, pwb_ptr, res_ptr, y_ptr, offs_p, p_mask, offs_co, co_mask, COUT, ACT2,
                  HAS_PW_BIAS, HAS_RES)
        tl.debug_barrier()  # every thread has read d before the finish is counted
        done = tl.atomic_add(sync_ptr + 2 + n_tiles + tile, 1, sem="acq_rel")
        if done == n_co - 1:  # the tile's last reader: its counters back to zero
            tl.atomic_xchg(sync_ptr + 2 + tile, 0, sem="relaxed")
            tl.atomic_xchg(sync_ptr + 2 + n_tiles + tile, 0, sem="relaxed")
        finished = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
        if finished == n_tiles * n_co - 1:  # the launch's last program: every ticket is drawn
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Configs and audit specs
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def select_config(c: int, cout: int, k: int, device: torch.device) -> dict:
    """Tile for (C, Cout, k) from ``configs/dwsep_conv.json``: ``block_p``, ``block_c``,
    ``block_co``, ``num_warps``, ``num_stages``, by Cout bucket (next power of two; ``BLOCK_CO``
    covers Cout up to 128 without recomputing the depthwise part)."""
    tables = load_tables(_FAMILY)
    table = tables.get(device_name(device), tables["default"])
    keys = sorted(int(co) for co in table[str(k)])
    bucket = 1 << max(0, (cout - 1).bit_length())
    key = next((co for co in keys if co >= bucket), keys[-1])
    return dict(table[str(k)][str(key)])


def table_tile(c: int, cout: int, k: int, device: torch.device, f16_acc: bool) -> dict:
    """The table's tile for a call: :func:`select_config`, whose ``block_c`` is the fp16 one; a
    depthwise tile accumulated in fp32 (bf16, fp32) holds twice the registers per channel, so it
    takes half the channels (at least 16)."""
    cfg = dict(select_config(c, cout, k, device))  # (a copy: select_config is cached)
    if not f16_acc:
        cfg["block_c"] = max(16, cfg["block_c"] // 2)
    return cfg


def route(c: int, cout: int, k: int, device: torch.device, f16_acc: bool,
          act1: str = "relu6", p: int = 0) -> tuple[bool, dict]:
    """``(two_phase, tile)`` of a call: the two-phase kernel (:func:`_dwsep_two_phase_kernel`)
    where the one-pass tile would recompute the depthwise part (``Cout > BLOCK_CO``) and the
    table's ``two_phase`` entries have a tile for ``k`` and Cout's bucket (next power of two:
    the buckets where the static model predicts it faster, perf/static_perf.py); else the
    one-pass tile (:func:`table_tile`). bf16 / fp32 take half the channel block either way; the
    two-phase tile also where act1 runs in fp32 (hardswish, SiLU), and 16 channels where C is
    not a multiple of the block (masked taps): its larger pixel tiles spill otherwise (the
    audit's variants, sm_80). On a GPU, a one-pass pixel tile above 64 is halved once where the
    call's ``p`` pixels would leave SMs without a program (MobileNetV2's 56^2 x 144 -> 32 s2:
    98 -> 196 programs, the same predicted time: it is memory-bound)."""
    one = table_tile(c, cout, k, device, f16_acc)
    if cout <= one["block_co"]:
        target = gpu_target(device)
        if (target is not None and one["block_p"] > 64
                and triton.cdiv(p, one["block_p"]) * triton.cdiv(cout, one["block_co"])
                < target.sms):
            one["block_p"] //= 2
        return False, one
    tables = load_tables(_FAMILY)
    two = tables.get(device_name(device), tables["default"]).get("two_phase", {}).get(str(k), {})
    cfg = two.get(str(1 << max(0, (cout - 1).bit_length())))
    if cfg is None:
        return False, one
    cfg = dict(cfg)
    if c % cfg["block_c"]:  # masked taps: the smallest channel block
        cfg["block_c"] = 16
    elif not f16_acc or act1 in ("hardswish", "silu"):
        cfg["block_c"] = max(16, cfg["block_c"] // 2)
    return True, cfg


_WORKSPACE: dict = {}


def _workspace(device: torch.device, dtype: torch.dtype, numel: int,
               counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-phase kernel's depthwise workspace (``dtype``, at least ``numel``) and its int32
    counters (at least ``counters``), per device, stream and dtype: the counters allocated
    zeroed once and left zeroed by every launch (its last programs reset them), ``d`` written
    whole by every launch, so a call adds no memset. Calls on one stream run in order; another
    stream gets its own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, dtype)
    ws = _WORKSPACE.get(key)
    if ws is None or ws[0].numel() < numel or ws[1].numel() < counters:
        old = ws if ws is not None else (torch.empty(0), torch.empty(0))
        ws = (torch.empty(max(numel, old[0].numel(), 1 << 16), device=device, dtype=dtype),
              torch.zeros(max(counters, old[1].numel(), 64), device=device,
                          dtype=torch.int32))
        _WORKSPACE[key] = ws
    return ws


_SIG = {
    "x_ptr": "*{dt}", "dww_ptr": "*{dt}", "dwb_ptr": "*{dt}", "pww_ptr": "*{dt}",
    "pwb_ptr": "*{dt}", "res_ptr": "*{dt}", "y_ptr": "*{dt}", "P": "i32", "H": "i32", "W": "i32",
    "C": "i32", "HO": "i32", "WO": "i32", "COUT": "i32", "pad_top": "i32", "pad_left": "i32",
    "stride_xb": "i32", "stride_xh": "i32", "stride_xw": "i32", "stride_wt": "i32",
}
_ALIGNED = ["x_ptr", "dww_ptr", "dwb_ptr", "pww_ptr", "pwb_ptr", "res_ptr", "y_ptr", "C", "COUT",
            "stride_xb", "stride_xh", "stride_xw", "stride_wt"]


def audit_specs(defaults_only: bool = False) -> list[dict]:
    """Every distinct shipped tile for k in {3, 5} and both strides, fp16, with ReLU6 and a
    residual (MobileNetV2's project unit; the epilogue with ``act2`` too); unless
    ``defaults_only`` (the GPU image's Triton, CI time), also bf16 and hardswish/SiLU for the
    k = 3 tiles. (There is no autotune space: the table is the space.)"""
    specs: dict[str, dict] = {}
    for table in load_tables(_FAMILY).values():
        for k in KERNEL_SIZES:
            # the table's tiles and, above 64 pixels, their halves (route() on a small grid)
            tiles = [*table[str(k)].values()]
            tiles += [{**t, "block_p": t["block_p"] // 2} for t in tiles if t["block_p"] > 64]
            for cfg in tiles:
                variants = [("fp16", 2, 2, True, 1), ("fp16", 2, 0, True, 2)]
                if k == 3 and not defaults_only:
                    variants += [("bf16", 2, 0, True, 1), ("fp16", 3, 4, False, 1)]
                for dt, a1, a2, res, stride in variants:
                    bc = cfg["block_c"] if dt == "fp16" else max(16, cfg["block_c"] // 2)
                    name = (f"p{cfg['block_p']}c{bc}co{cfg['block_co']}"
                            f"w{cfg['num_warps']}s{cfg['num_stages']}/k{k}s{stride}/"
                            f"{ACTIVATIONS[a1]}-{ACTIVATIONS[a2]}{'+res' if res else ''}/{dt}")
                    consts = {"KSIZE": k, "STRIDE": stride, "ACT1": a1, "ACT2": a2,
                              "HAS_DW_BIAS": True, "HAS_PW_BIAS": True, "HAS_RES": res,
                              "BLOCK_P": cfg["block_p"], "BLOCK_C": bc,
                              "BLOCK_CO": cfg["block_co"], "DOT_PRECISION": "tf32",
                              "UPCAST_DOT": False, "F16_ACC": dt == "fp16",
                              "EVEN_C": True, "ASM_RELU": _ASM_RELU,
                              "stride_wc": 1}
                    sig = {a: v.format(dt=dt) for a, v in _SIG.items()}
                    sig.update({c: "constexpr" for c in consts})
                    specs.setdefault(name, {
                        "kernel": _dwsep_conv_kernel.__name__, "config": name,
                        "fn": _dwsep_conv_kernel, "signature": sig, "constexprs": consts,
                        "aligned": _ALIGNED, "num_warps": cfg["num_warps"],
                        "num_stages": cfg["num_stages"],
                        "expect_mma": "HGMMA" if cfg["block_p"] >= 64 else "HMMA"})
    return list(specs.values()) + _two_phase_audit_specs(defaults_only)


_SIG_TWO_PHASE = {"d_ptr": "*{dt}", "sync_ptr": "*i32", "n_tiles": "i32", "n_c": "i32",
                  "n_co": "i32", **_SIG}  # (put in the kernel's parameter order below)


def _two_phase_audit_specs(defaults_only: bool) -> list[dict]:
    """The two-phase kernel's shipped tiles (the ``two_phase`` tables), fp16 with ReLU6 and a
    residual at both strides (and ``act2``); unless ``defaults_only``, also bf16, hardswish/SiLU
    and a ragged channel count (``EVEN_C`` off), each with half the channel block as
    :func:`route` gives them."""
    specs: dict[str, dict] = {}
    for table in load_tables(_FAMILY).values():
        for k, buckets in table.get("two_phase", {}).items():
            for cfg in buckets.values():
                variants = [("fp16", 2, 2, True, 1, True), ("fp16", 2, 0, True, 2, True)]
                if not defaults_only:
                    variants += [("bf16", 2, 0, True, 1, True), ("fp16", 3, 4, False, 1, True),
                                 ("fp16", 2, 0, False, 2, False), ("bf16", 3, 0, True, 1, False)]
                for dt, a1, a2, res, stride, even in variants:
                    bc = cfg["block_c"]  # as route() picks it
                    if not even:
                        bc = 16
                    elif dt != "fp16" or a1 >= 3:
                        bc = max(16, bc // 2)
                    name = (f"two-phase/p{cfg['block_p']}c{bc}co{cfg['block_co']}"
                            f"w{cfg['num_warps']}s{cfg['num_stages']}/k{k}s{stride}/"
                            f"{ACTIVATIONS[a1]}-{ACTIVATIONS[a2]}{'+res' if res else ''}/{dt}"
                            f"{'' if even else '/ragged-c'}")
                    consts = {"KSIZE": int(k), "STRIDE": stride, "ACT1": a1, "ACT2": a2,
                              "HAS_DW_BIAS": True, "HAS_PW_BIAS": True, "HAS_RES": res,
                              "BLOCK_P": cfg["block_p"], "BLOCK_C": bc,
                              "BLOCK_CO": cfg["block_co"], "DOT_PRECISION": "tf32",
                              "UPCAST_DOT": False, "F16_ACC": dt == "fp16",
                              "EVEN_C": even, "ASM_RELU": _ASM_RELU, "stride_wc": 1}
                    sig = {a.name: _SIG_TWO_PHASE[a.name].format(dt=dt)
                           for a in _dwsep_two_phase_kernel.params
                           if a.name in _SIG_TWO_PHASE}
                    sig.update({c: "constexpr" for c in consts})
                    aligned = [a for a in _ALIGNED + ["d_ptr", "sync_ptr"]
                               if even or a != "C"]
                    specs.setdefault(name, {
                        "kernel": _dwsep_two_phase_kernel.__name__, "config": name,
                        "fn": _dwsep_two_phase_kernel, "signature": sig, "constexprs": consts,
                        "aligned": aligned, "num_warps": cfg["num_warps"],
                        "num_stages": cfg["num_stages"],
                        "expect_mma": "HGMMA" if cfg["block_p"] >= 64 else "HMMA"})
    return list(specs.values())


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def dwsep_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                 pw_weight: torch.Tensor, pw_bias: torch.Tensor | None,
                 residual: torch.Tensor | None = None, stride: int = 1,
                 padding: Sequence[int] = (1, 1, 1, 1), act1: str = "relu6",
                 act2: str = "none", *, config: dict | None = None,
                 checked: bool = False) -> torch.Tensor:
    """``act2(pw(act1(dw(x) + dw_bias)) + pw_bias) (+ residual)`` in one launch.

    ``x`` ``[B, C, H, W]`` (converted once to channels-last); returns ``[B, Cout, Ho, Wo]`` in
    ``torch.channels_last``. Runs on ``x``'s device (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``). ``config`` overrides the tile (keys of :func:`select_config`).
    """
    if not checked:
        check_inputs(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1,
                     act2)
    b, c, h, w = x.shape
    k = dw_weight.shape[1]
    cout = pw_weight.shape[0]
    ho, wo = output_size(h, w, k, stride, padding)
    cl = torch.channels_last
    y = _launch_mod._empty((b, ho, wo, cout), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
    if y.numel() == 0:  # B = 0, Cout = 0, Ho = 0 or Wo = 0: nothing to launch
        return y.contiguous(memory_format=cl)
    x = x.contiguous(memory_format=cl)
    if dw_weight.stride(1) != k * dw_weight.stride(2):  # taps not at one stride: copy
        dw_weight = dw_weight.contiguous()
    pw_weight = pw_weight.contiguous()
    dw_bias = dw_bias.contiguous() if dw_bias is not None else None
    pw_bias = pw_bias.contiguous() if pw_bias is not None else None
    if residual is not None:
        nhwc = residual.permute(0, 2, 3, 1)  # dense [B, Ho, Wo, Cout] (size-1 dims: any stride)
        residual = residual if nhwc.is_contiguous() else nhwc.contiguous().permute(0, 3, 1, 2)
    p = b * ho * wo
    f16_acc = x.dtype == torch.float16
    if config is not None:
        cfg = dict(config)
        two_phase = bool(cfg.pop("two_phase", False))
    else:
        two_phase, cfg = route(c, cout, k, x.device, f16_acc, act1, p)
    dummy = dw_weight
    r = residual if residual is not None else y
    meta = dict(
        KSIZE=k, STRIDE=stride, ACT1=ACTIVATIONS.index(act1), ACT2=ACTIVATIONS.index(act2),
        HAS_DW_BIAS=dw_bias is not None, HAS_PW_BIAS=pw_bias is not None,
        HAS_RES=residual is not None, BLOCK_P=cfg["block_p"], BLOCK_C=cfg["block_c"],
        BLOCK_CO=cfg["block_co"], F16_ACC=f16_acc,
        EVEN_C=c % cfg["block_c"] == 0, ASM_RELU=_ASM_RELU and ptx(x),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **dot_meta(x))
    ptrs = (x, dw_weight, dw_bias if dw_bias is not None else dummy, pw_weight,
            pw_bias if pw_bias is not None else dummy, r, y)
    strides = (x.stride(0), x.stride(2), x.stride(3), dw_weight.stride(0), dw_weight.stride(2))
    if two_phase:
        n_tiles = triton.cdiv(p, cfg["block_p"])
        n_c, n_co = triton.cdiv(c, cfg["block_c"]), triton.cdiv(cout, cfg["block_co"])
        d, sync = _workspace(x.device, x.dtype, n_tiles * cfg["block_p"] * n_c * cfg["block_c"],
                             2 + 2 * n_tiles)
        _launch_mod.launch(
            _dwsep_two_phase_kernel, (n_tiles * (n_c + n_co),), *ptrs, d, sync,
            p, h, w, c, ho, wo, cout, padding[2], padding[0], n_tiles, n_c, n_co, *strides,
            **meta)
        return y
    grid = (triton.cdiv(p, cfg["block_p"]), triton.cdiv(cout, cfg["block_co"]))
    _launch_mod.launch(
        _dwsep_conv_kernel, grid, *ptrs,
        p, h, w, c, ho, wo, cout, padding[2], padding[0], *strides, **meta)
    return y
