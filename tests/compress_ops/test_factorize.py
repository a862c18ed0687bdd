"""compress_ops/factorize.py: truncated SVD, the energy rule, randomized SVD, Tucker-2."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops import factorize as fz


def _spectrum_matrix(n: int, k: int, decay: float, seed: int) -> torch.Tensor:
    """A random [n, k] matrix with singular values decay**i (random orthogonal bases)."""
    g = torch.Generator().manual_seed(seed)
    r = min(n, k)
    q1, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return (q1 * s) @ q2.t()


@given(n=st.integers(1, 40), k=st.integers(1, 40), r=st.integers(1, 45),
       seed=st.integers(0, 2**16))
def test_truncation_error_is_the_discarded_singular_values(n, k, r, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = fz.svd_factors(w, rank=r, method="exact")
    assert f.rank == min(r, n, k) and f.u.shape == (n, f.rank) and f.v.shape == (f.rank, k)
    err = (w - f.u @ f.v).norm()
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(err, s[f.rank:].norm(), rtol=1e-9, atol=1e-9)
    # sqrt(sigma) in both factors: equal column / row norms
    torch.testing.assert_close(f.u.norm(dim=0), f.v.norm(dim=1), rtol=1e-9, atol=1e-9)


@given(values=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30),
       energy=st.floats(0.01, 1.0))
def test_energy_rule_picks_the_smallest_admissible_rank(values, energy):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    r = fz.energy_rank(s, energy)
    total = float(s.pow(2).sum())
    if total == 0:
        assert r == 1
        return
    cum = torch.cumsum(s.pow(2), 0)
    assert 1 <= r <= len(s)
    assert cum[r - 1] >= energy * total * (1 - 1e-12)  # admissible
    if r > 1:
        assert cum[r - 2] < energy * total * (1 - 1e-12)  # and the smallest such


def test_energy_rank_against_the_svd_and_with_a_partial_spectrum():
    w = _spectrum_matrix(60, 50, 0.8, 0)
    f = fz.svd_factors(w, energy=0.99, method="exact")
    s2 = torch.linalg.svdvals(w).pow(2)
    cum = torch.cumsum(s2, 0) / s2.sum()
    assert cum[f.rank - 1] >= 0.99 > cum[f.rank - 2]
    assert f.kept_energy >= 0.99
    # a leading part of the spectrum that misses the target asks for more
    assert fz.energy_rank(torch.linalg.svdvals(w)[:3], 0.99, total=float(s2.sum())) == 4
    assert fz.svd_factors(w, energy=1.0, method="exact").rank == 50


@pytest.mark.parametrize("mode", ["rank", "energy"])
def test_randomized_svd_is_as_accurate_as_the_exact_one(mode):
    """On a decaying spectrum (trained weights) and on a flat-ish one, the randomized
    factors' error is within 1% (decaying) / 3% (flat) of the optimal truncation's."""
    for w, slack in ((_spectrum_matrix(300, 200, 0.97, 1), 1.01),
                     (_spectrum_matrix(300, 200, 0.995, 2), 1.03)):
        kw = {"rank": 40} if mode == "rank" else {"energy": 0.9}
        exact = fz.svd_factors(w, method="exact", **kw)
        rand = fz.svd_factors(w, method="randomized", **kw)
        assert rand.method == "randomized" and exact.method == "exact"
        if mode == "energy":  # the sketch is widened until it captures the target
            assert abs(rand.rank - exact.rank) <= 1
            assert (rand.u @ rand.v).pow(2).sum() >= 0.9 * w.pow(2).sum() * 0.99
        e_exact = (w - exact.u @ exact.v).norm()
        e_rand = (w - rand.u @ rand.v).norm()
        if rand.rank == exact.rank:
            assert e_rand <= e_exact * slack


def test_auto_method_choice_and_errors():
    small = torch.randn(64, 48)
    assert fz.svd_factors(small, rank=4).method == "exact"
    big = torch.randn(fz.RANDOMIZED_MIN_DIM, fz.RANDOMIZED_MIN_DIM // 2 + 8)
    # the smaller dim is below the threshold: exact
    assert fz.svd_factors(big, rank=8).method == "exact"
    f = fz.svd_factors(torch.randn(fz.RANDOMIZED_MIN_DIM + 40, fz.RANDOMIZED_MIN_DIM), rank=16)
    assert f.method == "randomized" and f.u.dtype == torch.float32
    # energy on a large matrix: randomized while the rank stays small, exact for a flat one
    dim = fz.RANDOMIZED_MIN_DIM
    decaying = _spectrum_matrix(dim, dim, 0.9, 4).float()
    f = fz.svd_factors(decaying, energy=0.99)
    assert f.method == "randomized" and f.rank == fz.svd_factors(decaying, energy=0.99,
                                                                  method="exact").rank
    flat = torch.randn(dim, dim)
    assert fz.svd_factors(flat, energy=0.9).method == "exact"
    with pytest.raises(ValueError, match="exactly one"):
        fz.svd_factors(small)
    with pytest.raises(ValueError, match="exactly one"):
        fz.svd_factors(small, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy"):
        fz.svd_factors(small, energy=1.5)
    with pytest.raises(ValueError, match="rank"):
        fz.svd_factors(small, rank=0)
    with pytest.raises(ValueError, match="method"):
        fz.svd_factors(small, rank=2, method="qr")
    with pytest.raises(ValueError, match="2-D"):
        fz.svd_factors(torch.randn(2, 3, 4), rank=2)


def test_randomized_svd_leaves_the_global_rng_alone_and_is_reproducible():
    w = torch.randn(300, 200)
    state = torch.get_rng_state()
    a = fz.svd_factors(w, rank=8, method="randomized").u
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)
    assert torch.equal(a, fz.svd_factors(w, rank=8, method="randomized").u)


def test_zero_weight_factorizes_to_rank_one_zero():
    f = fz.svd_factors(torch.zeros(8, 6), energy=0.9)
    assert f.rank == 1 and torch.count_nonzero(f.u @ f.v) == 0


# --------------------------------------------------------------------------------------------
# Tucker-2
# --------------------------------------------------------------------------------------------


def test_tucker2_full_ranks_are_exact_and_truncation_is_orthogonal():
    w = torch.randn(12, 7, 3, 3, dtype=torch.float64)
    full = fz.tucker2(w, ranks=(12, 7))
    torch.testing.assert_close(full.weight(), w, rtol=1e-10, atol=1e-10)
    f = fz.tucker2(w, ranks=(5, 4))
    assert f.ranks == (5, 4) and f.core.shape == (5, 4, 3, 3)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(f.out_factor.t() @ f.out_factor, eye, rtol=1e-9, atol=1e-9)
    # HOOI never does worse than plain HOSVD
    hosvd = fz.tucker2(w, ranks=(5, 4), iters=0)
    assert (w - f.weight()).norm() <= (w - hosvd.weight()).norm() + 1e-12


def test_tucker2_energy_per_mode():
    a = _spectrum_matrix(16, 9 * 4, 0.5, 3).reshape(16, 4, 3, 3)
    f = fz.tucker2(a, energy=0.999)
    assert f.ranks[0] < 16  # the fast-decaying output mode is truncated
    assert (a - f.weight()).norm() / a.norm() < 0.05
    with pytest.raises(ValueError, match="exactly one"):
        fz.tucker2(a)
    with pytest.raises(ValueError, match="4-D"):
        fz.tucker2(a[0], ranks=(2, 2))
    with pytest.raises(ValueError, match="ranks must be"):
        fz.tucker2(a, ranks=(2, 0))


# --------------------------------------------------------------------------------------------
# Non-finite weights (issue 13)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_like_the_other_configs(bad):
    from compress_ops.configs import UnsupportedWeight

    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    w[3, 7] = bad
    for method in ("exact", "randomized", "auto"):
        with pytest.raises(UnsupportedWeight, match="w contains NaN or Inf"):
            fz.svd_factors(w, rank=4, method=method)
        with pytest.raises(UnsupportedWeight, match="w contains NaN or Inf"):
            fz.svd_factors(w, energy=0.9, method=method)
    conv = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    conv[2, 1, 0, 2] = bad
    with pytest.raises(UnsupportedWeight, match="w contains NaN or Inf"):
        fz.tucker2(conv, ranks=(2, 2))
    with pytest.raises(UnsupportedWeight, match="w contains NaN or Inf"):
        fz.tucker2(conv, energy=0.9)
