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


# --------------------------------------------------------------------------------------------
# The storage dtype's limits: fp16 near its maximum or below its normal range, bf16 / fp32 at
# theirs (issue 13). Every grid is chosen in the storage dtype; what cannot be stored is refused.
# --------------------------------------------------------------------------------------------

ALL_BITS = [2, 3, 4, 8]
EXTREME_GROUPS = [32, 128, None]


def _deq_paths(w: torch.Tensor, a: qz.AffineWeight) -> torch.Tensor:
    """The weight as ``dense_weight()`` returns it (arithmetic in the storage dtype) and as the
    kernels see it (float32, then cast); both must be finite. Returns the first."""
    k = w.shape[1]
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, a.bits, a.group_size, k)
    w_ker = dqf.dequantize(a.qweight, a.scales, a.zeros, a.bits, a.group_size, k,
                           dtype=torch.float32).to(a.scales.dtype)
    assert torch.isfinite(a.scales).all() and (a.scales > 0).all()
    assert a.zeros is None or torch.isfinite(a.zeros).all()
    assert torch.isfinite(w_hat).all() and torch.isfinite(w_ker).all()
    return w_hat


def _rel(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w64 = w.double()
    return float((w64 - w_hat.double()).norm() / w64.norm())


def _group_rel(w: torch.Tensor, w_hat: torch.Tensor, gs: int) -> torch.Tensor:
    """Relative error of every (row, group) of ``w`` (K a multiple of ``gs``)."""
    n, k = w.shape
    w64, e64 = w.double().reshape(n, k // gs, gs), (w.double() - w_hat.double()).reshape(
        n, k // gs, gs)
    return e64.norm(dim=-1) / w64.norm(dim=-1)


def _fp32_storage_rel(w: torch.Tensor, bits: int, group: int | None, sym: bool) -> float:
    """The error of the same (already rounded) values quantized with float32 scales: the
    grid the storage dtype's limits must not make much worse."""
    wf = w.float()
    a = qz.quantize_affine(wf, bits, group, symmetric=sym)
    return _rel(wf, dqf.dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size,
                                   w.shape[1]))


@pytest.mark.parametrize("group", EXTREME_GROUPS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_fp16_at_its_maximum_quantizes_finitely(bits, sym, group):
    """All weights +-65504: 65504 / 127 rounds up to 516 in fp16 and 127 * 516 overflows; the
    scale steps down instead (a clipping of the top value by a few ulps)."""
    w = torch.full((4, 256), 65504.0, dtype=torch.float16)
    w[1] = -65504.0
    w[2, ::2] = -65504.0
    a = qz.quantize_affine(w, bits, group, symmetric=sym)
    assert _rel(w, _deq_paths(w, a)) < 2e-3


@pytest.mark.parametrize("group", EXTREME_GROUPS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_fp16_near_its_maximum_is_as_good_as_fp32_scales(bits, sym, group):
    """+-65504 outliers among Gaussian weights, and narrow groups just below +-65504 (the
    asymmetric grid's zero point far outside its range): finite, and about as accurate as the
    same values quantized with float32 scales."""
    g = _gen(bits)
    w = torch.randn(8, 256, generator=g) * 100.0
    signs = torch.where(torch.rand(8, 256, generator=g) < 0.5, -1.0, 1.0)
    w = torch.where(torch.rand(8, 256, generator=g) < 0.05, 65504.0 * signs, w)
    w[4:6] = 65504.0 - 2000.0 * torch.rand(2, 256, generator=g)  # narrow, just below the max
    w[6:] = -65504.0 + 30000.0 * torch.rand(2, 256, generator=g)
    w = w.half()
    a = qz.quantize_affine(w, bits, group, symmetric=sym)
    assert _rel(w, _deq_paths(w, a)) <= _fp32_storage_rel(w, bits, group, sym) * 1.1 + 1e-3


def test_issue_13_fp16_maximum_through_the_module():
    import compress_ops as co

    lin = torch.nn.Linear(64, 4).half()
    lin.weight.data.fill_(65504.0)
    m = co.nn.QuantLinear.from_dense(lin, co.QuantConfig(8, None, True))
    assert torch.isfinite(m.dense_weight()).all()
    lin.weight.data = (torch.randn(4, 64, generator=_gen(13)) * 1e-6).half()
    m = co.nn.QuantLinear.from_dense(lin, co.QuantConfig(8, None))
    assert _rel(lin.weight.detach(), m.dense_weight()) < 0.05


@pytest.mark.parametrize("group", EXTREME_GROUPS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("size", [1e-6, 1e-7])
def test_fp16_tiny_weights_get_subnormal_scales(size, bits, sym, group):
    """Weights ~1e-6 are fp16 subnormals (multiples of 2**-24): the scale underflows fp16's
    normal range and becomes a subnormal, never 1 (which zeroed the layer)."""
    w = (torch.randn(8, 256, generator=_gen(bits)) * size).half()
    a = qz.quantize_affine(w, bits, group, symmetric=sym)
    rel = _rel(w, _deq_paths(w, a))
    assert rel <= _fp32_storage_rel(w, bits, group, sym) * 1.25 + 0.02
    assert rel < 0.6


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_fp16_mixed_tiny_and_normal_groups(bits, sym):
    """Tiny groups next to normal ones in the same row: every group gets its own grid. At 1e-7
    fp16 weights are a few multiples of 2**-24 and so are the scales: coarser than float32's,
    still far better than zeroing."""
    g = _gen(7 + bits)
    w = torch.randn(8, 256, generator=g)
    w[:, :32] *= 1e-6
    w[:, 64:96] *= 1e-7
    w[::2, 128:] *= 3e-6
    w = w.half()
    a = qz.quantize_affine(w, bits, 32, symmetric=sym)
    w_hat = _deq_paths(w, a)
    a32 = qz.quantize_affine(w.float(), bits, 32, symmetric=sym)
    rel32 = _group_rel(w.float(), dqf.dequantize(a32.qweight, a32.scales, a32.zeros, bits, 32,
                                                 256), 32)
    rel = _group_rel(w, w_hat, 32)
    assert (rel < 0.6).all()
    normal = torch.ones(8, dtype=torch.bool)
    normal[2] = False  # the 1e-7 group
    assert (rel[:, normal] <= rel32[:, normal] * 1.25 + 0.02).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", EXTREME_GROUPS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("exp2", [126, -128, -134])
def test_extremes_of_the_float32_range_are_scale_invariant(exp2, bits, sym, group, dtype):
    """bf16 and fp32 span 1e-38 .. 3e38. Scaling a weight by a power of two scales its grid by
    the same power: the relative error at the ends of the range matches the one at unit scale
    (the smallest end loses a little: its scales are subnormals with few significant bits)."""
    base = torch.randn(8, 256, generator=_gen(bits)).clamp(-3.3, 3.3).to(dtype)
    w = base * 2.0**exp2 if exp2 > -130 else (base * 2.0**-4) * 2.0**(exp2 + 4)
    w = w.to(dtype)  # ~3e38 / ~1e-38 / ~1e-40 (subnormal)
    assert torch.isfinite(w).all() and (w != 0).any()
    ref = (w.double() * 2.0**-exp2).to(dtype)  # the same values at unit scale, exactly
    a = qz.quantize_affine(w, bits, group, symmetric=sym)
    a_ref = qz.quantize_affine(ref, bits, group, symmetric=sym)
    rel = _rel(w, _deq_paths(w, a))
    rel_ref = _rel(ref, _deq_paths(ref, a_ref))
    if exp2 > 0:
        assert rel <= rel_ref * 1.02 + 1e-4
    else:
        assert rel <= rel_ref * 1.25 + 0.05 and rel < 0.6


def test_all_zero_groups_keep_exact_zeros_at_the_limits():
    w = torch.full((4, 64), 65504.0, dtype=torch.float16)
    w[:, :32] = 0.0
    w[1, 32:] = 1e-7
    for sym in (False, True):
        w_hat = _deq_paths(w, qz.quantize_affine(w, 4, 32, symmetric=sym))
        assert (w_hat[:, :32] == 0).all()


def test_unrepresentable_groups_are_refused_with_the_reason():
    """A storage dtype narrower than the weight: float32 weights of 1e-9 under fp16 scales
    (even the smallest fp16 subnormal zeroes them), or beyond fp16's maximum."""
    w = torch.randn(4, 64, generator=_gen(5)) * 1e-9
    with pytest.raises(qz.UnsupportedWeight, match="float16"):
        qz.quantize_affine(w, 8, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        qz.quantize_affine(torch.randn(4, 64, generator=_gen(6)) * 1e5, 4, 32,
                           dtype=torch.float16)
    # the same values in a dtype that holds them quantize normally
    a = qz.quantize_affine(w, 8, 32, dtype=torch.bfloat16)
    assert _rel(w, _deq_paths(w, a)) < 0.02


def test_the_guard_names_non_finite_and_useless_groups():
    w = torch.randn(2, 64, generator=_gen(8)).half()
    a = qz.quantize_affine(w, 4, 32)
    qz._check_affine_fit(w, a)  # a good fit passes
    bad = qz.AffineWeight(a.qweight, a.scales.clone(), a.zeros, a.bits, a.group_size)
    bad.scales[1, 0] = float("inf")
    with pytest.raises(qz.UnsupportedWeight, match=r"row 1, group 0.*non-finite.*float16"):
        qz._check_affine_fit(w, bad)
    bad.scales[1, 0] = 1000.0  # a grid far coarser than the group: worse than zeroing it
    with pytest.raises(qz.UnsupportedWeight, match=r"row 1, group 0.*float16 scales.*zeroing"):
        qz._check_affine_fit(w, bad)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("dtype", "scale"), [(torch.float16, 2.0**14), (torch.float16, 1e-6),
                                               (torch.float16, 1e-7),
                                               (torch.bfloat16, 2.0**126),
                                               (torch.bfloat16, 1e-38),
                                               (torch.float32, 2.0**126)])
def test_codebooks_at_the_limits_of_the_dtype(dtype, scale, bits):
    """k-means centroids are averages of weights: near the maximum their sums must not
    overflow, below the normal range they must not vanish."""
    base = torch.randn(4, 256, generator=_gen(bits)).clamp(-3.5, 3.5)
    w = (base * scale).to(dtype)
    if dtype == torch.float16 and scale > 1:
        w[:, ::9] = 65504.0
        w[:, 1::9] = -65504.0
    ref = w.double()
    cb = qz.fit_codebook([w], bits, row_groups=2)
    assert cb.dtype == dtype and torch.isfinite(cb).all()
    enc = qz.encode_codebook(w, cb, bits)
    w_hat = dqf.codebook_weight(enc.indices, enc.codebook, bits, 256)
    assert torch.isfinite(w_hat).all()
    # as good as the same values at unit scale (float64: no dtype limit there)
    unit = ref / ref.abs().max()
    cb_u = qz.fit_codebook([unit], bits, row_groups=2)
    e_u = _rel(unit, dqf.codebook_weight(qz.encode_codebook(unit, cb_u, bits).indices, cb_u,
                                         bits, 256))
    assert _rel(ref, w_hat) <= e_u * 1.1 + (0.05 if scale < 1 else 1e-3)
    # several weights sharing one table: sums over all of them
    shared = qz.fit_codebook([w, w.flip(0)], bits)
    assert torch.isfinite(shared).all()


@given(bits=st.sampled_from([2, 3]), group=st.sampled_from(GROUPS), steps=st.sampled_from([0, 20]),
       seed=st.integers(0, 2**16))
def test_no_group_is_worse_than_zeroing_it(bits, group, steps, seed):
    """Heavy tails at 2-3 bits: a fractional zero point puts no level at zero, and small
    weights between far-apart levels could cost more than the group's own norm. The integer
    zero point candidate keeps every group better than zeroing it (so the guard never fires
    on ordinary weights)."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(1.5).sample((16, 256))
    a = qz.quantize_affine(w, bits, group, search_steps=steps)
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, 256)
    assert (_group_rel(w, w_hat, a.group_size) < 1).all()


@given(exp2=st.integers(-26, 14), bits=st.sampled_from(dqf.BITS), group=st.sampled_from(GROUPS),
       sym=st.booleans(), outliers=st.booleans(), seed=st.integers(0, 2**16))
def test_fp16_at_any_scale_quantizes_finitely_and_usefully(exp2, bits, group, sym, outliers,
                                                          seed):
    g = _gen(seed)
    w = torch.randn(6, 96, generator=g) * 2.0**exp2
    if outliers:
        w[torch.rand(6, 96, generator=g) < 0.03] = 65504.0
    w = w.half()
    a = qz.quantize_affine(w, bits, group, symmetric=sym)
    w_hat = _deq_paths(w, a)
    gs = a.group_size
    wp = torch.nn.functional.pad(w.float(), (0, -96 % gs))
    hp = torch.nn.functional.pad(w_hat.float(), (0, -96 % gs))
    rel = _group_rel(wp, hp, gs)
    assert (rel[~torch.isnan(rel)] < 1).all()  # (an all-zero group: 0 / 0)
