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
    effective_group_size,
    pack_bits,
    padded_k,
)

__all__ = [
    "AffineWeight",
    "CodebookWeight",
    "quantize_affine",
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


def quantize_affine(w: torch.Tensor, bits: int, group_size: int | None = 128, *,
                    symmetric: bool = False, search_steps: int = 20, max_shrink: float = 0.5,
                    dtype: torch.dtype | None = None) -> AffineWeight:
    """Round-to-nearest b-bit quantization of ``w[N, K]`` per row group of ``group_size``.

    The grid of each group starts at its min/max (symmetric: ``±max|w|``); with
    ``search_steps > 0`` the range is also shrunk by factors ``1 - max_shrink * i / steps`` and
    each group keeps the range with the least squared error (clipping a few outliers buys
    resolution for the rest). Scales (and fractional zero points) are stored in ``dtype``
    (default ``w.dtype``) and ``q`` is computed with the stored values, so dequantization
    reproduces the error measured here. ``search_steps=0`` is plain min/max RTN: every weight
    is then within ``scale / 2`` of its dequantized value.
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
    valid = torch.ones(n, kp, dtype=torch.bool, device=w.device)
    if kp != k:
        wf = torch.nn.functional.pad(wf, (0, kp - k))
        valid[:, k:] = False
    wg = wf.reshape(n, kp // gs, gs)
    vg = valid.reshape(n, kp // gs, gs)
    inf = torch.tensor(float("inf"), dtype=wf.dtype, device=w.device)
    hi = torch.where(vg, wg, -inf).amax(-1)
    lo = torch.where(vg, wg, inf).amin(-1)
    qmax = 2**bits - 1
    half = 2 ** (bits - 1)

    def stored(t: torch.Tensor) -> torch.Tensor:  # the value the storage dtype keeps
        return t.to(dtype).to(wf.dtype)

    def usable(t: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(t) & (t > 0)

    def grid(alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if symmetric:
            amax = torch.maximum(hi.abs(), lo.abs()) * alpha
            # levels (q - 2**(b-1)) * s: +-max|w| maps to +-(2**(b-1) - 1) (int2: +-1)
            s = stored(amax / max(half - 1, 1))
            return torch.where(usable(s), s, torch.ones_like(s)), None  # all-zero groups: s = 1
        lo_a, hi_a = lo * alpha, hi * alpha
        s = stored((hi_a - lo_a) / qmax)
        z = stored(-lo_a / s)
        # Degenerate groups (constant, all zero, or so narrow and far from zero that the zero
        # point leaves the storage dtype's range): widen the range to include zero, which keeps
        # z in [0, 2**b - 1] and represents a constant (and zero) exactly.
        ok = usable(s) & torch.isfinite(z) & (z.abs() <= 2 ** (bits + 1))
        lo0, hi0 = lo_a.clamp(max=0), hi_a.clamp(min=0)
        s0 = stored((hi0 - lo0) / qmax)
        s0 = torch.where(usable(s0), s0, torch.ones_like(s0))
        z0 = stored(-lo0 / s0)
        return torch.where(ok, s, s0), torch.where(ok, z, z0)

    def quant(s: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        zz = z if z is not None else torch.full_like(s, half)
        q = torch.clamp(torch.round(wg / s[..., None] + zz[..., None]), 0, qmax)
        err = (((q - zz[..., None]) * s[..., None] - wg) ** 2 * vg).sum(-1)
        return q, err

    s, z = grid(1.0)
    q, err = quant(s, z)
    for i in range(1, search_steps + 1):
        s_i, z_i = grid(1.0 - max_shrink * i / search_steps)
        q_i, err_i = quant(s_i, z_i)
        better = err_i < err
        err = torch.where(better, err_i, err)
        s = torch.where(better, s_i, s)
        if z is not None:
            z = torch.where(better, z_i, z)
        q = torch.where(better[..., None], q_i, q)
    q = q.reshape(n, kp).to(torch.int32)
    return AffineWeight(pack_bits(q, bits), s.to(dtype).contiguous(),
                        None if z is None else z.to(dtype).contiguous(), bits, gs)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 25, *, init: str = "quantile",
              history: list[float] | None = None) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``values[R, P]`` (each row its own 1-D problem).

    Deterministic initialisation: ``"quantile"`` puts centroid ``j`` at the ``(j + 1/2) / k``
    quantile of its row (dense where the mass is), ``"uniform"`` spreads them evenly over
    ``[min, max]`` (the min/max round-to-nearest grid, so the result is never worse than
    that grid). In 1-D the nearest centroid is found by binary search over the midpoints of the
    sorted centroids. Empty clusters keep their centroid. Returns sorted centroids ``[R, k]``.
    With ``history``, appends the total squared error before every iteration and after the
    last: Lloyd's steps never increase it.
    """
    if values.dim() != 2 or values.shape[1] == 0:
        raise ValueError("values must be [R, P] with P >= 1")
    v = _work(values).contiguous()
    r, p = v.shape
    if init == "quantile":
        srt = v.sort(dim=1).values
        pos = ((torch.arange(k, device=v.device, dtype=v.dtype) + 0.5) / k * p).long()
        c = srt[:, pos.clamp_max(p - 1)].contiguous()
    elif init == "uniform":
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        c = lo + (hi - lo) * torch.linspace(0, 1, k, device=v.device, dtype=v.dtype)
    else:
        raise ValueError(f"init must be 'quantile' or 'uniform', got {init!r}")
    for it in range(iters + 1):
        mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
        idx = torch.searchsorted(mids, v)
        if history is not None:
            history.append(float(((v - torch.gather(c, 1, idx)) ** 2).sum()))
        if it == iters:
            break
        sums = torch.zeros_like(c).scatter_add_(1, idx, v)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.equal(new, c):
            if history is not None:
                history.append(history[-1])
            break
        c = new.sort(dim=1).values
    return c


def _row_errors(values: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    idx = torch.searchsorted(mids, values)
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
    mids = ((srt[:, 1:] + srt[:, :-1]) / 2).contiguous()
    v = _work(w).reshape(r, -1).contiguous()
    idx = torch.searchsorted(mids, v)
    return torch.gather(order, 1, idx).reshape(n, k)


def fit_codebook(weights: list[torch.Tensor], bits: int, row_groups: int = 1,
                 iters: int = 25, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One k-means codebook (``2**bits`` values) per row group, fit over ``weights``.

    Runs :func:`kmeans_1d` from the quantile and the uniform start and keeps, per row group,
    the table with the lower error (so never worse than the min/max uniform grid).

    One weight with ``row_groups = R``: R tables over equal groups of rows. Several weights
    (cross-layer sharing): ``row_groups`` must be 1 and one table is fit over all of them.
    Returned in ``dtype`` (default: the first weight's).
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
    best = kmeans_1d(values, 2**bits, iters, init="quantile")
    other = kmeans_1d(values, 2**bits, iters, init="uniform")
    take = _row_errors(values, other) < _row_errors(values, best)
    best = torch.where(take[:, None], other, best)
    return best.to(dtype).contiguous()


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
