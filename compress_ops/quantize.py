"""Choosing low-bit weights: round-to-nearest affine grids (with a per-group range search) and
1-D k-means codebooks. Produces the packed formats of :mod:`compress_ops.kernels.formats.dequant`.

Everything here runs once, at compression time, in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_ops._validate import check_choice
from compress_ops.configs import UnsupportedWeight
from compress_ops.kernels.formats.dequant import (
    BITS,
    dequantize,
    effective_group_size,
    pack_bits,
    padded_k,
)

__all__ = [
    "AffineWeight",
    "CodebookWeight",
    "quantize_affine",
    "gptq_affine",
    "inverse_hessian_factor",
    "kmeans_1d",
    "fit_codebook",
    "assign_codebook",
    "encode_codebook",
    "sqnr_db",
]


@dataclass
class AffineWeight:
    """An affine packed weight: ``W = (q - z) * s`` per group (see ``kernels/dequant.py``)."""

    qweight: torch.Tensor  # [N, Kp * bits / 32] int32
    scales: torch.Tensor  # [N, Kp / group_size]
    zeros: torch.Tensor | None  # [N, Kp / group_size] or None (symmetric)
    bits: int
    group_size: int  # effective: a listed size or the padded row


@dataclass
class CodebookWeight:
    """A codebook packed weight: ``W = codebook[n // (N / R), q]``."""

    indices: torch.Tensor  # [N, Kp * bits / 32] int32
    codebook: torch.Tensor  # [R, 2**bits]
    bits: int


def _work(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError("w must be a 2-D floating-point tensor [N, K]")
    if w.numel() == 0:
        raise ValueError("w is empty")
    if not torch.isfinite(w).all():
        raise UnsupportedWeight("w contains NaN or Inf")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive value of ``dtype`` (a subnormal: fp16 2**-24, bf16 2**-133)."""
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


# A grid whose end point overflows the storage dtype after rounding steps its scale down one
# value of that dtype at a time; rounding overshoots by a few values at most.
_MAX_STEPS_DOWN = 8
# The q range of each group where a grid's end levels overflow: (q_lo, q_hi), or None.
_Bounds = tuple[torch.Tensor, torch.Tensor] | None


def quantize_affine(w: torch.Tensor, bits: int, group_size: int | None = 128, *,
                    symmetric: bool = False, search_steps: int = 20, max_shrink: float = 0.5,
                    dtype: torch.dtype | None = None) -> AffineWeight:
    """Round-to-nearest b-bit quantization of ``w[N, K]`` per row group of ``group_size``.

    The grid of each group starts at its min/max (symmetric: ``±max|w|``); with
    ``search_steps > 0`` the range is also shrunk by factors ``1 - max_shrink * i / steps`` and
    each group keeps the range with the least squared error (clipping a few outliers buys
    resolution for the rest). ``search_steps=0`` is plain min/max RTN: every weight is then
    within ``scale / 2`` of its dequantized value.

    Scales (and fractional zero points) are stored in ``dtype`` (default ``w.dtype``), and every
    candidate grid is rounded to it *before* it is evaluated: ``q`` and the error are computed
    with the stored values, dequantized like the kernels (float32, then cast to ``dtype``), so
    the search picks the grid that is actually stored. At the limits of ``dtype``:

    - a scale below its smallest positive value becomes that value (fp16 weights of ~1e-6
      are subnormal multiples of 2**-24, and so is their scale); an all-zero group keeps
      scale 1, which reconstructs exact zeros;
    - a grid whose end point ``(2**b - 1 - z) * s`` or ``-z * s`` overflows ``dtype`` after
      rounding steps its scale down to the next smaller value of ``dtype`` until it is finite
      (clipping the top value by a few ulps). A symmetric grid's extra negative level
      ``-2**(b-1) * s`` is left unused where it alone overflows.

    Raises :class:`~compress_ops.configs.UnsupportedWeight` for a NaN or Inf, for values
    beyond ``dtype``'s range, and (a guard, never seen on weights stored in ``dtype``) for a
    group whose stored grid dequantizes to a non-finite value or does no better than zeroing
    it: with scales of a dtype narrower than the weight's, no grid may represent a group.
    """
    _check_weight(w)
    check_choice("bits", bits, BITS)
    if search_steps < 0 or not 0.0 <= max_shrink < 1.0:
        raise ValueError("search_steps must be >= 0 and max_shrink in [0, 1)")
    dtype = dtype or w.dtype
    n, k = w.shape
    gs = effective_group_size(k, group_size)
    kp = padded_k(k, gs)
    wf = _work(w)
    work = wf.dtype
    padded = kp != k
    if padded:
        wf = torch.nn.functional.pad(wf, (0, kp - k))
    wg = wf.reshape(n, kp // gs, gs)
    if padded:
        vg = torch.ones(n, kp, dtype=torch.bool, device=w.device)
        vg[:, k:] = False
        vg = vg.reshape(n, kp // gs, gs)
        inf = torch.tensor(float("inf"), dtype=work, device=w.device)
        hi = torch.where(vg, wg, -inf).amax(-1)
        lo = torch.where(vg, wg, inf).amin(-1)
    else:
        hi, lo = wg.amax(-1), wg.amin(-1)
    amax = torch.maximum(hi.abs(), lo.abs())
    top = float(amax.max())
    fi = torch.finfo(dtype)
    if top > fi.max:
        raise UnsupportedWeight(
            f"w has values up to {top:.4g}, beyond the range of {_dtype_name(dtype)} "
            f"(max {fi.max:.6g}), the dtype of its scales")
    qmax = 2**bits - 1
    half = 2 ** (bits - 1)
    narrow = dtype != work  # the stored values are rounded to dtype
    tiny = max(_smallest(dtype), _smallest(work))
    # only weights near dtype's maximum can make a grid overflow
    may_overflow = top * 4 > fi.max
    # squared errors of groups near the ends of float32's range are summed in float64
    nz = amax[amax > 0]
    wide_err = work == torch.float32 and nz.numel() > 0 and (
        top > 2.0**42 or float(nz.min()) < 2.0**-42)

    def stored(t: torch.Tensor) -> torch.Tensor:  # the value the storage dtype keeps
        return t.to(dtype).to(work) if narrow else t

    def level(qv: int, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Grid point ``qv`` as the kernels (float32, cast) and ``dequantize`` (arithmetic
        in the storage dtype) compute it: finite where both are."""
        d = float(qv - half) if z is None else stored(qv - z)
        return torch.isfinite(stored((qv - (half if z is None else z)) * s)) & \
            torch.isfinite(stored(d * s))

    def fit(s: torch.Tensor, z: torch.Tensor | None, steps: int = _MAX_STEPS_DOWN
            ) -> tuple[torch.Tensor, torch.Tensor | None, _Bounds]:
        """Step the scales of grids whose end points overflow down (the top one of a
        symmetric grid, both of an asymmetric one), at most ``steps`` values of dtype; an end
        level still not finite (a symmetric grid's extra ``-2**(b-1) * s``, an integer zero
        point's half step beyond the range) is left unused: ``q`` is clamped to the
        returned ``(q_lo, q_hi)`` (None: ``[0, 2**b - 1]`` everywhere)."""
        if not may_overflow:
            return s, z, None
        for _ in range(steps):
            bad = ~level(qmax, s, z)
            if z is not None:
                bad |= ~level(0, s, z)
            if not bool(bad.any()):
                break
            sd = s.to(dtype)
            s = torch.where(bad, torch.nextafter(sd, torch.zeros_like(sd)).to(work), s)
        low, high = ~level(0, s, z), ~level(qmax, s, z)
        if not bool((low | high).any()):
            return s, z, None
        return s, z, (low.to(work), qmax - high.to(work))

    one = torch.ones_like(amax)

    def stored_up(t: torch.Tensor) -> torch.Tensor:
        """Below dtype's normal range, where scales have few significant bits and rounding
        to nearest could clip a third of the group, the next value of dtype at or above
        ``t``, so the grid covers the group; elsewhere the nearest one."""
        r = stored(t)
        if not narrow:
            return r
        rd = r.to(dtype)
        up = torch.nextafter(rd, torch.full_like(rd, float("inf"))).to(work)
        return torch.where((r < t) & (r < fi.tiny), up, r)

    def grid(alpha: float):
        # the min/max grid covers its group; shrunk ranges round to nearest
        rnd = stored_up if alpha == 1.0 else stored
        if symmetric:
            a = amax * alpha
            # levels (q - 2**(b-1)) * s: +-max|w| maps to +-(2**(b-1) - 1) (int2: +-1)
            s = rnd(a / max(half - 1, 1))
            # below dtype's smallest value: that value; all-zero groups: 1 (exact zeros)
            return fit(torch.where(a > 0, s.clamp_min(tiny), one), None)
        lo_a, hi_a = lo * alpha, hi * alpha
        s = rnd(hi_a / qmax - lo_a / qmax)  # no overflow at the top of fp32's range
        s = torch.where(hi_a > lo_a, s.clamp_min(tiny), one)
        z = stored(-lo_a / s)
        # Degenerate groups (constant, all zero, or so narrow and far from zero that the zero
        # point leaves the storage dtype's range): widen the range to include zero, which keeps
        # z in [0, 2**b - 1] and represents a constant (and zero) exactly.
        ok = (hi_a > lo_a) & torch.isfinite(z) & (z.abs() <= 2 ** (bits + 1))
        lo0, hi0 = lo_a.clamp(max=0), hi_a.clamp(min=0)
        s0 = rnd(hi0 / qmax - lo0 / qmax)
        s0 = torch.where(hi0 > lo0, s0.clamp_min(tiny), one)
        z0 = stored(-lo0 / s0)
        return fit(torch.where(ok, s, s0), torch.where(ok, z, z0))

    def quant(s: torch.Tensor, z: torch.Tensor | None, bounds: _Bounds) -> torch.Tensor:
        q = wg / s[..., None]
        q += half if z is None else z[..., None]
        q.round_().clamp_(0, qmax)
        if bounds is not None:
            q = torch.clamp(q, bounds[0][..., None], bounds[1][..., None])
        return q

    def error(s: torch.Tensor, z: torch.Tensor | None, bounds: _Bounds) -> torch.Tensor:
        d = quant(s, z, bounds)
        d -= half if z is None else z[..., None]
        d *= s[..., None]
        d = stored(d)
        d -= wg
        if wide_err:
            d = d.double()
        d.square_()
        if padded:
            d *= vg
        return d.sum(-1)

    s, z, bounds = grid(1.0)
    err = None
    if search_steps or not symmetric:
        err = error(s, z, bounds)
    # (alpha, only where): 0 is the min/max grid with its zero point rounded to an integer.
    # Zero is then a level, so no weight's error exceeds its magnitude (a fractional zero
    # point can make an int2 grid worse than zeroing a heavy-tailed group). Plain RTN
    # (search_steps = 0) takes it only where its own grid does no better than zeroing.
    candidates: list[tuple[float, torch.Tensor | None]] = []
    if not symmetric:
        only = None
        if not search_steps:
            sq = wg.double() if wide_err else wg
            sq = sq * sq
            only = err >= ((sq * vg) if padded else sq).sum(-1)
        candidates.append((0.0, only))
    candidates += [(1.0 - max_shrink * i / search_steps, None)
                   for i in range(1, search_steps + 1)]
    for alpha, only in candidates:
        if alpha == 0.0:
            s_i, z_i, bounds_i = fit(s, z.round(), steps=0)
        else:
            s_i, z_i, bounds_i = grid(alpha)
        err_i = error(s_i, z_i, bounds_i)
        better = err_i < err
        if only is not None:
            better &= only
        err = torch.where(better, err_i, err)
        s = torch.where(better, s_i, s)
        if z is not None:
            z = torch.where(better, z_i, z)
        if bounds is not None or bounds_i is not None:
            full = (torch.zeros_like(s), torch.full_like(s, qmax))
            bounds = tuple(torch.where(better, b_i, b) for b_i, b in zip(
                bounds_i or full, bounds or full, strict=True))
    q = quant(s, z, bounds).reshape(n, kp).to(torch.int32)
    out = AffineWeight(pack_bits(q, bits), s.to(dtype).contiguous(),
                       None if z is None else z.to(dtype).contiguous(), bits, gs)
    _check_affine_fit(w, out)
    return out


def inverse_hessian_factor(h: torch.Tensor, damp: float, who: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` that
    GPTQ and SparseGPT spread errors with, and the inputs that never fire (a zero diagonal:
    given 1 there, so they take no error; their weights carry no output). ``ValueError``
    (naming ``who``) when the dampened Hessian is not positive definite."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    try:
        factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                       upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise ValueError(f"{who}: the Hessian is not positive definite after dampening "
                         f"(damp={damp}); raise damp ({exc})") from exc
    return factor, dead


def gptq_affine(w: torch.Tensor, hessian: torch.Tensor, bits: int,
                group_size: int | None = 128, *, symmetric: bool = False,
                search_steps: int = 20, act_order: bool = True, block_size: int = 128,
                damp: float = 0.01) -> AffineWeight:
    """GPTQ (Frantar et al., 2023): b-bit weights of ``w[N, K]`` chosen column by column, each
    column's rounding error spread over the columns not yet quantized through the inverse of
    the layer's input Hessian ``hessian [K, K]`` (``2 X^T X / n``, :func:`compress_ops.calibrate.
    input_hessians`), so the layer's *output* error on the calibration inputs shrinks, not the
    weights' own.

    - **The grid is the stored one.** Each group's scale and zero point are
      :func:`quantize_affine`'s (the same range search, on the original weights: static
      groups), so the packed format, the module and the kernels are unchanged; only which
      level each weight takes differs. With an identity (or any diagonal) Hessian nothing
      spreads, and the result equals :func:`quantize_affine` exactly.
    - **Activation order** (``act_order``): columns are quantized in order of decreasing
      Hessian diagonal (the inputs with the most energy first, while the most columns are left
      to absorb their error). Groups stay the contiguous runs of ``group_size`` columns of the
      original order, with their static grids, so there is no ``g_idx`` and no permutation at
      run time; g_idx-style act-order instead regroups columns in the processing order and
      must gather scales by column in the kernel.
    - **Dampening**: ``damp * mean(diag H)`` is added to the diagonal before the Cholesky
      factorization of its inverse; inputs that never fire (a zero diagonal) get 1 there and
      take no error. Columns are processed in blocks of ``block_size`` with lazy updates of the
      rest (the same arithmetic, fewer passes over ``w``).

    ``ValueError`` for a Hessian of the wrong shape, non-finite, or not positive definite even
    after dampening (raise ``damp``); :class:`~compress_ops.configs.UnsupportedWeight` as
    :func:`quantize_affine`, and for weights within a factor 4 of the storage dtype's maximum
    (the grids clip levels there; use round-to-nearest).
    """
    _check_weight(w)
    n, k = w.shape
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else repr(hessian)
        raise ValueError(f"hessian must be a [{k}, {k}] tensor (the layer's input Hessian), "
                         f"got {got}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds NaN or Inf (non-finite calibration activations)")
    if not 0.0 <= damp < 1.0 or block_size < 1:
        raise ValueError(f"damp must be in [0, 1) and block_size >= 1, got {damp}, {block_size}")
    dtype = w.dtype
    if float(w.detach().abs().max()) * 4 > torch.finfo(dtype).max:
        raise UnsupportedWeight(f"GPTQ: weights within a factor 4 of {_dtype_name(dtype)}'s "
                                f"maximum, where the grids clip levels; use round-to-nearest")
    rtn = quantize_affine(w, bits, group_size, symmetric=symmetric, search_steps=search_steps)
    gs = rtn.group_size
    kp = padded_k(k, gs)
    wf = _work(w).clone()
    work = wf.dtype
    s = rtn.scales.to(work)
    off = (torch.full_like(s, float(2 ** (bits - 1))) if rtn.zeros is None
           else rtn.zeros.to(work))
    qmax = 2**bits - 1

    def stored(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(work) if dtype != work else t

    h = hessian.detach().to(device=w.device, dtype=work)
    perm = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
            else torch.arange(k, device=w.device))
    hinv, dead = inverse_hessian_factor(h[perm][:, perm], damp, "GPTQ")
    wf = wf[:, perm]
    wf[:, dead] = 0.0
    group = (perm // gs).tolist()
    q = torch.empty(n, k, dtype=work, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wf[:, i1:i2].clone()
        e1 = torch.zeros_like(w1)
        u1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group[i1 + i]
            col = w1[:, i]
            qc = (col / s[:, g] + off[:, g]).round_().clamp_(0, qmax)
            err = (col - stored((qc - off[:, g]) * s[:, g])) / u1[i, i]
            q[:, i1 + i] = qc
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            e1[:, i] = err
        wf[:, i2:] -= e1 @ hinv[i1:i2, i2:]
    full = torch.empty(n, kp, dtype=work, device=w.device)
    full[:, perm] = q
    if kp > k:  # padding columns hold what quantize_affine stores for a zero weight
        full[:, k:] = off[:, -1:].round().clamp(0, qmax)
    out = AffineWeight(pack_bits(full.to(torch.int32), bits), rtn.scales, rtn.zeros, bits, gs)
    bad = ~torch.isfinite(dequantize(out.qweight, out.scales, out.zeros, bits, gs, k))
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise UnsupportedWeight(f"GPTQ: row {r}, column {c} dequantizes to a non-finite value")
    return out


def _check_affine_fit(w: torch.Tensor, a: AffineWeight) -> None:
    """Refuse a packed weight that would store garbage: a group that dequantizes (as
    ``dequantize`` does in the storage dtype, or as the kernels do in float32 and cast) to a
    non-finite value, or whose error is no better than zeroing it."""
    n, k = w.shape
    dtype = a.scales.dtype
    name = _dtype_name(dtype)
    gs = a.group_size
    kp = padded_k(k, gs)
    w_hat = dequantize(a.qweight, a.scales, a.zeros, a.bits, gs, k)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w_ker = dequantize(a.qweight, a.scales, a.zeros, a.bits, gs, k, dtype=work).to(dtype)
    for got in (w_hat, w_ker):
        bad = ~torch.isfinite(got)
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise UnsupportedWeight(
                f"row {r}, group {c // gs}: its {a.bits}-bit grid dequantizes to a non-finite "
                f"value with {name} scales; store the scales in a wider dtype")
    pad = (0, kp - k)
    w64 = torch.nn.functional.pad(w.detach().double(), pad).reshape(n, kp // gs, gs)
    e64 = torch.nn.functional.pad(w_hat.double(), pad).reshape(n, kp // gs, gs)
    norm = w64.norm(dim=-1)
    e64 -= w64
    bad = (norm > 0) & (e64.norm(dim=-1) >= norm)
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        raise UnsupportedWeight(
            f"row {r}, group {g} (max |w| = {float(w64[r, g].abs().max()):.4g}): its "
            f"{a.bits}-bit grid with {name} scales does no better than zeroing it; store the "
            f"scales in a wider dtype")


def _midpoints(c: torch.Tensor) -> torch.Tensor:
    """Midpoints of neighbouring sorted centroids: halves first, so values near the top of
    float32's range do not overflow (the same rounded value as ``(a + b) / 2`` otherwise)."""
    return (c[:, 1:] * 0.5 + c[:, :-1] * 0.5).contiguous()


def _pow2_scale(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two power-of-two factors per row of a float32 ``v[R, P]`` (``[R, 1]`` each, both in
    range) whose product brings the row's largest magnitude into ``[0.5, 1)``: exact scalings
    that keep k-means sums and squared errors inside float32 at both ends of its range (bf16
    and fp32 weights of 3e38 or 1e-40). None where every row is well inside it."""
    if v.dtype != torch.float32:
        return None
    amax = torch.maximum(v.amax(1, keepdim=True), -v.amin(1, keepdim=True))
    if not bool(((amax > 2.0**40) | ((amax > 0) & (amax < 2.0**-40))).any()):
        return None
    _, e = torch.frexp(amax)
    e1 = e // 2
    one = torch.ones(e.shape, dtype=v.dtype, device=v.device)
    return torch.ldexp(one, -e1), torch.ldexp(one, e1 - e)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 25, *, init: str = "quantile",
              history: list[float] | None = None, tol: float = 0.0) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``values[R, P]`` (each row its own 1-D problem).

    Deterministic initialisation: ``"quantile"`` puts centroid ``j`` at the ``(j + 1/2) / k``
    quantile of its row (dense where the mass is), ``"uniform"`` spreads them evenly over
    ``[min, max]`` (the min/max round-to-nearest grid, so the result is never worse than
    that grid). In 1-D the nearest centroid is found by binary search over the midpoints of the
    sorted centroids. Empty clusters keep their centroid. Returns sorted centroids ``[R, k]``.
    With ``history``, appends the total squared error before every iteration and after the
    last: Lloyd's steps never increase it. It stops early when the assignment no longer changes
    (a fixed point) or, with ``tol > 0``, when an iteration lowers the total squared error by
    less than ``tol`` of it (converged to that tolerance; ``iters`` is then only a cap). Rows
    near either end of float32's range run scaled by a power of two (exact), so their sums
    neither overflow nor underflow. The values are sorted once: a cluster is a run of them
    and its mean a difference of float64 prefix sums, so a step costs ``O(k log P)`` per row.
    """
    if values.dim() != 2 or values.shape[1] == 0:
        raise ValueError("values must be [R, P] with P >= 1")
    v = _work(values).contiguous()
    r, p = v.shape
    scale = _pow2_scale(v)
    if scale is not None:
        v = v * scale[0] * scale[1]
    if init == "quantile":
        srt = v.sort(dim=1).values
        pos = ((torch.arange(k, device=v.device, dtype=v.dtype) + 0.5) / k * p).long()
        c = srt[:, pos.clamp_max(p - 1)].contiguous()
    elif init == "uniform":
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        c = lo + (hi - lo) * torch.linspace(0, 1, k, device=v.device, dtype=v.dtype)
    else:
        raise ValueError(f"init must be 'quantile' or 'uniform', got {init!r}")
    # Sorted once: a cluster is then a run of the sorted values, its sum a difference of
    # prefix sums, and one Lloyd step costs O(k log P) per row instead of O(P).
    srt = v.sort(dim=1).values
    zero = torch.zeros(r, 1, dtype=torch.float64, device=v.device)
    cs = torch.cat([zero, srt.double().cumsum(1)], 1)
    cs2 = torch.cat([zero, srt.double().square().cumsum(1)], 1)
    last = torch.full((r, 1), p, dtype=torch.long, device=v.device)
    first = torch.zeros_like(last)
    unscale = None if scale is None else \
        (scale[0].double() * scale[1].double()).reciprocal().square()
    prev = None
    for it in range(iters + 1):
        # cluster j holds the values in (mid[j-1], mid[j]] (what searchsorted assigns)
        cuts = torch.searchsorted(srt, _midpoints(c).contiguous(), right=True)
        edges = torch.cat([first, cuts, last], 1)
        lo, hi = edges[:, :-1], edges[:, 1:]
        counts = (hi - lo).double()
        sums = cs.gather(1, hi) - cs.gather(1, lo)
        if history is not None or tol > 0:
            sq = cs2.gather(1, hi) - cs2.gather(1, lo)
            cd = c.double()
            per_row = (sq - 2 * cd * sums + counts * cd * cd).clamp_min(0).sum(1, keepdim=True)
            sse = float(per_row.sum() if unscale is None else (per_row * unscale).sum())
            if history is not None:
                history.append(sse)
            if tol > 0 and prev is not None and prev - sse <= tol * prev:
                break
            prev = sse
        if it == iters:
            break
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c.double()).to(v.dtype)
        if torch.equal(new, c):
            if history is not None:
                history.append(history[-1])
            break
        c = new.sort(dim=1).values
    return c if scale is None else c / scale[0] / scale[1]


def _row_errors(values: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared error of every row against its table (comparable within a row only)."""
    scale = _pow2_scale(values)
    if scale is not None:
        values, c = values * scale[0] * scale[1], c * scale[0] * scale[1]
    idx = torch.searchsorted(_midpoints(c), values)
    return ((values - torch.gather(c, 1, idx)) ** 2).sum(1)


def assign_codebook(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry of every weight: ``q[N, K]`` int64.

    ``codebook[R, 2**b]`` (sorted or not) serves rows in ``R`` equal groups.
    """
    n, k = w.shape
    r = codebook.shape[0]
    cb = _work(codebook)
    order = cb.argsort(dim=1)
    srt = torch.gather(cb, 1, order)
    v = _work(w).reshape(r, -1).contiguous()
    idx = torch.searchsorted(_midpoints(srt), v)
    return torch.gather(order, 1, idx).reshape(n, k)


def fit_codebook(weights: list[torch.Tensor], bits: int, row_groups: int = 1,
                 iters: int = 1000, dtype: torch.dtype | None = None,
                 tol: float = 0.0) -> torch.Tensor:
    """One k-means codebook (``2**bits`` values) per row group, fit over ``weights``.

    Runs :func:`kmeans_1d` from the quantile and the uniform start (at most ``iters`` Lloyd
    steps each, stopping at a fixed point or, with ``tol``, when a step improves the error by
    less than that fraction) and keeps, per row group, the table with the lower error (so
    never worse than the min/max uniform grid).

    One weight with ``row_groups = R``: R tables over equal groups of rows. Several weights
    (cross-layer sharing): ``row_groups`` must be 1 and one table is fit over all of them.
    Returned in ``dtype`` (default: the first weight's). Centroids are averages of weights, so
    they stay inside the weights' range; a table that ``dtype`` cannot hold (weights beyond its
    range) raises :class:`~compress_ops.configs.UnsupportedWeight`.
    """
    check_choice("bits", bits, BITS)
    if not weights:
        raise ValueError("fit_codebook needs at least one weight")
    for w in weights:
        _check_weight(w)
    dtype = dtype or weights[0].dtype
    if len(weights) > 1:
        if row_groups != 1:
            raise ValueError("a codebook shared across layers has one row group")
        values = torch.cat([_work(w).reshape(-1) for w in weights])[None]
    else:
        n = weights[0].shape[0]
        if row_groups < 1 or n % row_groups:
            raise ValueError(f"row_groups={row_groups} must divide out_features={n}")
        values = _work(weights[0]).reshape(row_groups, -1)
    # Lloyd from both deterministic starts; each row group keeps the better table (quantiles
    # win on bell-shaped weights at few bits, the uniform grid on heavy tails at many bits).
    values = values.contiguous()
    best = kmeans_1d(values, 2**bits, iters, init="quantile", tol=tol)
    other = kmeans_1d(values, 2**bits, iters, init="uniform", tol=tol)
    take = _row_errors(values, other) < _row_errors(values, best)
    best = torch.where(take[:, None], other, best).to(dtype).contiguous()
    if not bool(torch.isfinite(best).all()):
        raise UnsupportedWeight(
            f"the weights' range exceeds {_dtype_name(dtype)}, the dtype of the codebook")
    return best


def encode_codebook(w: torch.Tensor, codebook: torch.Tensor, bits: int) -> CodebookWeight:
    """Pack ``w`` against ``codebook`` (nearest entry, using the stored values)."""
    _check_weight(w)
    n, k = w.shape
    q = assign_codebook(w, codebook)
    kp = padded_k(k, None)
    if kp != k:
        q = torch.nn.functional.pad(q, (0, kp - k))
    return CodebookWeight(pack_bits(q, bits), codebook, bits)


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|w|^2 / |w - w_hat|^2)`` in dB."""
    w64, e64 = w.double(), (w.double() - w_hat.double())
    noise = float((e64**2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10((w64**2).sum() / noise).item()
