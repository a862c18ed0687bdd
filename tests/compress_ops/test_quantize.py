"""compress_ops/quantize.py: round-to-nearest grids with a range search, k-means codebooks, SQNR
on Gaussian and heavy-tailed weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops import quantize as qz
from compress_ops.kernels.formats import dequant as dqf

GROUPS = [32, 64, 128, None]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sq_err(w: torch.Tensor, a: qz.AffineWeight) -> float:
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, a.bits, a.group_size, w.shape[1],
                          dtype=torch.float64)
    return float(((w.double() - w_hat) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fitted_codebook_is_never_worse_than_the_min_max_grid(bits):
    """The uniform start is the min/max round-to-nearest grid: Lloyd only improves on it."""
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((8, 256))
    cb = qz.fit_codebook([w], bits, row_groups=8, dtype=torch.float64)
    e_cb = float(((dqf.codebook_weight(qz.encode_codebook(w, cb, bits).indices, cb, bits, 256)
                   - w.double()) ** 2).sum())
    e_grid = _sq_err(w.double(), qz.quantize_affine(w.double(), bits, None, search_steps=0))
    assert e_cb <= e_grid * (1 + 1e-9)


@pytest.mark.parametrize(("bits", "group", "min_db"),
                         [(8, 128, 40.0), (4, 128, 20.0), (4, 32, 22.0), (2, 32, 9.5)])
def test_sqnr_on_gaussian_weights(bits, group, min_db):
    w = torch.randn(256, 1024, generator=_gen(1))
    a = qz.quantize_affine(w, bits, group)
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, 1024)
    assert qz.sqnr_db(w, w_hat) >= min_db


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        qz.quantize_affine(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="bits"):
        qz.quantize_affine(torch.randn(2, 8), 5)
    with pytest.raises(ValueError, match="row_groups"):
        qz.fit_codebook([torch.randn(6, 8)], 2, row_groups=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_degenerate_groups_quantize_finitely_and_exactly(dtype, sym, bits):
    """All-zero, constant and narrow far-from-zero groups (dead neurons, pruned rows) in 16-bit
    storage: scales and zero points stay finite, zeros come back exactly, constants up to the
    rounding of their scale."""
    w = torch.randn(6, 64, generator=_gen(0)).to(dtype)
    w[0] = 0.0  # all-zero row
    w[1, :32] = 0.75  # constant group
    w[2, 32:] = -3.0  # negative constant group
    w[3] = 1000.0 + torch.linspace(0, 1e-3, 64)  # narrow, far from zero
    w[4, :32] = 1e-9  # below fp16's smallest subnormal
    a = qz.quantize_affine(w, bits, 32, symmetric=sym)
    assert torch.isfinite(a.scales).all() and (a.scales > 0).all()
    assert a.zeros is None or torch.isfinite(a.zeros).all()
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, 64,
                          dtype=torch.float32)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[0] == 0).all()
    if not sym:  # a constant is a grid end point: only the scale's rounding is left
        rtol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
        torch.testing.assert_close(w_hat[1, :32], w[1, :32].float(), rtol=rtol, atol=0)
        torch.testing.assert_close(w_hat[2, 32:], w[2, 32:].float(), rtol=rtol, atol=0)
    rel = (w_hat[3] - w[3].float()).abs().max() / 1000.0
    assert rel < 0.5 if bits == 2 else rel < 0.1
    assert (w_hat[5] - w[5].float()).norm() / w[5].float().norm() < {2: 0.8, 4: 0.2, 8: 0.02}[bits]


def test_codebook_encoding_uses_the_nearest_entry():
    w = torch.randn(8, 64, generator=_gen(4))
    cb = qz.fit_codebook([w], 3, row_groups=2)
    enc = qz.encode_codebook(w, cb, 3)
    w_hat = dqf.codebook_weight(enc.indices, enc.codebook, 3, 64)
    rows = torch.arange(8) // 4
    dist = (w[:, :, None] - cb[rows][:, None, :]).abs()
    assert torch.allclose((w - w_hat).abs(), dist.min(-1).values)


@given(n=st.integers(1, 12), k=st.integers(1, 300), bits=st.sampled_from(dqf.BITS),
       group=st.sampled_from(GROUPS), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_rtn_error_is_at_most_half_a_step(n, k, bits, group, sym, seed):
    w = torch.randn(n, k, generator=_gen(seed), dtype=torch.float64) + 0.05
    a = qz.quantize_affine(w, bits, group, symmetric=sym, search_steps=0)
    q = dqf.unpack_bits(a.qweight, bits, k)
    assert int(q.min()) >= 0 and int(q.max()) < 2**bits
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, k)
    step = a.scales.repeat_interleave(a.group_size, 1)[:, :k]
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-9) + 1e-12).all()
    if not sym and k > 1:  # min/max grid: a group's extremes land on 0 and 2**b - 1 (a
        # one-column group is constant: its range is widened to include zero)
        assert int(q.min()) == 0 and int(q.max()) == 2**bits - 1


@given(bits=st.sampled_from([2, 3, 4]), group=st.sampled_from(GROUPS), sym=st.booleans(),
       seed=st.integers(0, 2**16))
def test_range_search_never_increases_error(bits, group, sym, seed):
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((16, 256)) if seed % 2 else torch.randn(16, 256)
    e0 = _sq_err(w, qz.quantize_affine(w, bits, group, symmetric=sym, search_steps=0))
    e1 = _sq_err(w, qz.quantize_affine(w, bits, group, symmetric=sym, search_steps=10))
    assert e1 <= e0 * (1 + 1e-6)


@given(r=st.integers(1, 3), p=st.integers(1, 400), bits=st.sampled_from(dqf.BITS),
       seed=st.integers(0, 2**16))
def test_kmeans_never_increases_error(r, p, bits, seed):
    torch.manual_seed(seed)
    v = torch.distributions.StudentT(2.5).sample((r, p)) + 0.01 * seed
    for init in ("quantile", "uniform"):
        hist: list[float] = []
        c = qz.kmeans_1d(v, 2**bits, iters=15, init=init, history=hist)
        assert c.shape == (r, 2**bits) and (c[:, 1:] >= c[:, :-1]).all()
        assert all(b <= a * (1 + 1e-9) + 1e-9 for a, b in zip(hist, hist[1:], strict=False))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_beats_rtn_at_equal_bits_on_heavy_tails(bits):
    """Same granularity (one grid / one table per row), same bits: k-means places its levels
    where the heavy-tailed mass is, a uniform grid cannot."""
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(2.5).sample((64, 512))
    cb = qz.fit_codebook([w], bits, row_groups=64)
    enc = qz.encode_codebook(w, cb, bits)
    e_cb = float(((dqf.codebook_weight(enc.indices, enc.codebook, bits, 512).double()
                   - w.double()) ** 2).sum())
    e_rtn = _sq_err(w, qz.quantize_affine(w, bits, None))  # per-row grid, range search
    assert e_cb < e_rtn
