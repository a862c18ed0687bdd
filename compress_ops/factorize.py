"""Choosing low-rank factors: truncated SVD (exact or randomized), the energy rank rule, and
Tucker-2 for convolution kernels.

Everything here works in float32 or float64 on the weight's device and returns factors in the
caller's dtype; nothing depends on modules or configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_ops._validate import check_int, check_number, is_int
from compress_ops.configs import UnsupportedWeight

__all__ = ["SVDFactors", "energy_rank", "svd_factors", "Tucker2Factors", "tucker2",
           "RANDOMIZED_MIN_DIM"]

# Randomized SVD is used ("auto") from this smaller dimension up, when the rank it needs is at
# most a quarter of it; below that the exact SVD is cheap. Its accuracy against the exact SVD
# is a test (tests/compress_ops/test_factorize.py).
RANDOMIZED_MIN_DIM = 1024
_OVERSAMPLE = 16
_POWER_ITERS = 4


def _check_finite(weight: torch.Tensor) -> None:
    # the message of quantize._check_weight: every config refuses non-finite weights alike
    if not torch.isfinite(weight).all():
        raise UnsupportedWeight("w contains NaN or Inf")


def _check_fraction(energy: float) -> None:
    check_number("energy", energy, low=0.0, high=1.0, low_open=True)


def energy_rank(singular_values: torch.Tensor, energy: float,
                total: float | None = None) -> int:
    """The smallest ``r >= 1`` with ``sum(s[:r]**2) >= energy * total`` (``total`` defaults to
    ``sum(s**2)``: pass ``||W||_F**2`` when ``s`` is only the leading part of the spectrum).

    Returns ``len(s) + 1`` when the given values do not reach the target (so a caller can ask
    for more of the spectrum); an all-zero spectrum gives 1.
    """
    _check_fraction(energy)
    s2 = singular_values.double().pow(2)
    total = float(s2.sum()) if total is None else float(total)
    if total <= 0.0:
        return 1
    cum = torch.cumsum(s2, 0)
    # relative slack for the rounding of the cumulative sum (energy = 1 must hit full rank)
    hit = torch.nonzero(cum >= energy * total * (1 - 1e-12)).flatten()
    return int(hit[0]) + 1 if hit.numel() else len(s2) + 1


@dataclass
class SVDFactors:
    """``W ~ u @ v`` with ``u = U_r sqrt(S_r)`` ``[N, r]``, ``v = sqrt(S_r) V_r^T`` ``[r, K]``.

    ``singular_values`` are the leading ones the method computed (all of them for the exact SVD),
    ``total_energy`` is ``||W||_F**2``, ``method`` ``"exact"`` or ``"randomized"``.
    """

    u: torch.Tensor
    v: torch.Tensor
    singular_values: torch.Tensor
    total_energy: float
    method: str

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def kept_energy(self) -> float:
        """Fraction of ``||W||_F**2`` the kept singular values carry."""
        kept = float(self.singular_values[: self.rank].double().pow(2).sum())
        return kept / self.total_energy if self.total_energy > 0 else 1.0


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(dtype).contiguous(), (root[:, None] * vh[:r]).to(dtype).contiguous()


def svd_factors(weight: torch.Tensor, rank: int | None = None, energy: float | None = None,
                method: str = "auto") -> SVDFactors:
    """Truncated SVD of ``weight [N, K]`` at a given ``rank`` or the smallest rank keeping
    ``energy`` of ``||W||_F**2`` (exactly one of the two).

    ``method``: ``"exact"`` (``torch.linalg.svd`` in float64 up to 4M elements, else
    float32), ``"randomized"`` (``torch.svd_lowrank``, 16 extra columns, 4 power iterations;
    for ``energy`` it widens the sketch until the captured energy reaches the target), or
    ``"auto"`` (randomized when ``min(N, K) >= RANDOMIZED_MIN_DIM`` and the rank it needs is
    at most a quarter of it, else exact; for ``energy``, exact as soon as the sketch would
    have to grow past half of ``min(N, K)``). By Eckart-Young the exact result's error
    ``||W - u @ v||_F**2`` is the sum of the discarded ``sigma**2``. A weight with a NaN or
    an Inf raises :class:`~compress_ops.configs.UnsupportedWeight`.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [N, K]")
    _check_finite(weight)
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    n, k = weight.shape
    full = min(n, k)
    if rank is not None:
        rank = min(check_int("rank", rank, min=1), full)
    else:
        _check_fraction(energy)
    dtype = weight.dtype
    work = torch.float64 if weight.numel() <= 2**22 else torch.float32
    a = weight.detach().to(work)
    total = float(a.double().pow(2).sum())

    auto = method == "auto"
    if auto:
        need = rank if rank is not None else max(1, full // 16)
        method = "randomized" if full >= RANDOMIZED_MIN_DIM and need * 4 <= full else "exact"
    if method == "randomized":
        q = min(full, (rank if rank is not None else max(8, full // 16)) + _OVERSAMPLE)
        while True:
            # a fixed sketch: the caller's RNG stream is untouched, the factors reproducible
            with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
                torch.manual_seed(0)
                u, s, vv = torch.svd_lowrank(a, q=q, niter=_POWER_ITERS)
            r = rank if rank is not None else energy_rank(s, energy, total)
            if r <= len(s) - (_OVERSAMPLE if q < full else 0) or q >= full:
                break
            if auto and 2 * q > full // 2:  # the energy needs a large rank: exact is cheaper
                q = 0
                break
            q = min(full, 2 * q)  # the sketch missed the energy target: widen it
        if q:
            r = min(r, len(s))
            uf, vf = _split(u, s, vv.t(), r, dtype)
            return SVDFactors(uf, vf, s.to(dtype=torch.float64), total, "randomized")
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = rank if rank is not None else min(energy_rank(s, energy, total), full)
    uf, vf = _split(u, s, vh, r, dtype)
    return SVDFactors(uf, vf, s.to(torch.float64), total, "exact")


# --------------------------------------------------------------------------------------------
# Tucker-2 (convolutions)
# --------------------------------------------------------------------------------------------


@dataclass
class Tucker2Factors:
    """``W[o, i, h, w] ~ sum_{a, b} out_factor[o, a] core[a, b, h, w] in_factor[i, b]``.

    ``in_factor [C_in, r_in]`` (the 1x1 reduce conv is its transpose), ``core [r_out, r_in,
    kh, kw]``, ``out_factor [C_out, r_out]`` (the 1x1 restore conv).
    """

    in_factor: torch.Tensor
    core: torch.Tensor
    out_factor: torch.Tensor

    @property
    def ranks(self) -> tuple[int, int]:
        return self.out_factor.shape[1], self.in_factor.shape[1]

    def weight(self) -> torch.Tensor:
        """The composed ``[C_out, C_in, kh, kw]`` kernel."""
        return torch.einsum("oa,abhw,ib->oihw", self.out_factor, self.core, self.in_factor)


def _mode_basis(unfolded: torch.Tensor, rank: int | None, energy: float | None) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    r = rank if rank is not None else energy_rank(s, energy)
    return u[:, : max(1, min(r, u.shape[1]))]


def tucker2(weight: torch.Tensor, ranks: tuple[int, int] | None = None,
            energy: float | None = None, iters: int = 2) -> Tucker2Factors:
    """Tucker-2 decomposition of a conv kernel ``[C_out, C_in, kh, kw]`` along its two channel
    modes: HOSVD (leading left singular vectors of the mode-0 and mode-1 unfoldings; with
    ``energy``, each mode keeps the smallest rank reaching it), then ``iters`` HOOI sweeps
    (alternating refits of each basis against the other), all in float64.

    ``ranks = (r_out, r_in)`` or ``energy`` (exactly one). With full ranks the composition is
    exact. A weight with a NaN or an Inf raises :class:`~compress_ops.configs.UnsupportedWeight`.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("weight must be a 4-D conv kernel [C_out, C_in, kh, kw]")
    _check_finite(weight)
    if (ranks is None) == (energy is None):
        raise ValueError("give exactly one of ranks and energy")
    c_out, c_in, kh, kw = weight.shape
    if ranks is not None:
        if len(ranks) != 2 or any(not is_int(r) or r < 1 for r in ranks):
            raise ValueError(f"ranks must be two ints >= 1 (r_out, r_in), got {ranks!r}")
        r_out, r_in = min(ranks[0], c_out), min(ranks[1], c_in * kh * kw, c_in)
    else:
        _check_fraction(energy)
        r_out = r_in = None
    w = weight.detach().to(torch.float64)
    mode0 = w.reshape(c_out, -1)  # [C_out, C_in kh kw]
    mode1 = w.permute(1, 0, 2, 3).reshape(c_in, -1)  # [C_in, C_out kh kw]
    a = _mode_basis(mode0, r_out, energy)  # [C_out, r_out]
    b = _mode_basis(mode1, r_in, energy)  # [C_in, r_in]
    r_out, r_in = a.shape[1], b.shape[1]
    for _ in range(iters):
        # refit each basis to the kernel projected on the other one (HOOI)
        proj_in = torch.einsum("oihw,ib->obhw", w, b).reshape(c_out, -1)
        a = _mode_basis(proj_in, r_out, None)
        proj_out = torch.einsum("oihw,oa->iahw", w, a).reshape(c_in, -1)
        b = _mode_basis(proj_out, r_in, None)
    core = torch.einsum("oihw,oa,ib->abhw", w, a, b)
    dt = weight.dtype
    return Tucker2Factors(b.to(dt).contiguous(), core.to(dt).contiguous(), a.to(dt).contiguous())
