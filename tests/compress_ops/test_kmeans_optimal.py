"""compress_ops/quantize.py: exact optimal 1-D k-means (dynamic programming over the sorted values),
its binning bound, activation-weighted k-means, and CodebookConfig(method=, weighted=) through
compress_."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops import quantize as qz
from compress_ops.integrations import serialization as ser
from compress_ops.kernels.formats import dequant as dqf


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t3(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Student-t(3) samples (heavy tails) from a seeded generator."""
    g = _gen(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    chi2 = (torch.randn((3, *shape), generator=g, dtype=torch.float64) ** 2).sum(0)
    return z / (chi2 / 3).sqrt()


def _sse(values: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row (weighted) squared error against the nearest centroid, in float64, brute force."""
    d = (values.double()[:, :, None] - c.double()[:, None, :]) ** 2
    e = d.min(-1).values
    return (e if w is None else e * w.double()).sum(1)


def _brute(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """The optimum over every partition of the sorted values into at most k runs."""
    order = x.argsort()
    x, w = x[order].double(), w[order].double()
    p = len(x)
    best = float("inf")
    for parts in range(1, min(k, p) + 1):
        for cuts in itertools.combinations(range(1, p), parts - 1):
            edges = [0, *cuts, p]
            total = 0.0
            for a, b in itertools.pairwise(edges):
                ww, xx = w[a:b], x[a:b]
                if float(ww.sum()) > 0:
                    mean = (ww * xx).sum() / ww.sum()
                    total += float((ww * (xx - mean) ** 2).sum())
            best = min(best, total)
    return best


# -- the exact DP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [True, False])
def test_matches_the_brute_force_optimum(dense, monkeypatch):
    """Tiny rows (both DP paths: the dense run-error table and divide and conquer), weighted
    and not, with ties and zero weights: the SSE equals the best partition's."""
    if not dense:
        monkeypatch.setattr(qz, "_DENSE_MAX", 0)
    for seed in range(120):
        g = _gen(seed)
        p = int(torch.randint(1, 11, (1,), generator=g))
        k = int(torch.randint(1, 5, (1,), generator=g))
        x = torch.randn(1, p, generator=g, dtype=torch.float64) * 3 + 0.5
        if seed % 5 == 0 and p > 2:
            x[0, 1] = x[0, 0]  # a tie
        weighted = seed % 2 == 1
        w = torch.rand(1, p, generator=g, dtype=torch.float64) + 0.05
        if weighted and seed % 3 == 0:
            w[0, 0] = 0.0  # zero weights are allowed
        if not weighted:
            w = torch.ones_like(w)
        c = qz.kmeans_1d_optimal(x, k, weights=w if weighted else None)
        assert c.shape == (1, k) and c.dtype == torch.float64
        assert torch.isfinite(c).all() and (c[:, 1:] >= c[:, :-1]).all()
        best = _brute(x[0], w[0], k)
        got = float(_sse(x, c, w)[0])
        floor = 1e-12 * float((w * x**2).sum())  # the brute force rounds too
        assert abs(got - best) <= 1e-9 * best + floor, (seed, p, k, got, best)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_or_equals_lloyd_on_heavy_tails(bits):
    """Student-t(3) rows of 600 values (solved exactly): never worse than Lloyd converged from
    either start, and strictly better than its worse start."""
    x = _t3((4, 600), seed=bits)
    k = 2**bits
    opt = _sse(x, qz.kmeans_1d_optimal(x, k))
    lloyd = [_sse(x, qz.kmeans_1d(x, k, iters=10_000, init=init))
             for init in ("quantile", "uniform")]
    for e in lloyd:
        assert (opt <= e * (1 + 1e-9)).all()
    assert (opt < torch.maximum(*lloyd)).all()


def test_fit_codebook_optimal_is_never_worse_than_lloyd_when_binned():
    """One row group of 20k heavy-tailed weights is binned (more distinct values than bins):
    the result still beats Lloyd from both starts, and the min/max uniform grid."""
    w = _t3((20, 1000), seed=7).float()
    v = w.reshape(1, -1)
    info: dict = {}
    qz.kmeans_1d_optimal(v, 16, iters=0, info=info)
    assert not info["exact"].any()  # binned by default
    for bits in (3, 4):
        opt = qz.fit_codebook([w], bits)
        lloyd = qz.fit_codebook([w], bits, method="lloyd")
        assert float(_sse(v, opt)) <= float(_sse(v, lloyd)) * (1 + 1e-7)
        grid = torch.linspace(float(v.min()), float(v.max()), 2**bits)[None]
        assert float(_sse(v, opt)) <= float(_sse(v, grid))


def test_eight_bit_tables_over_many_row_groups_are_lloyds():
    """Beyond the DP's time budget (256 entries, 64 row groups) fit_codebook runs Lloyd's two
    starts alone: the same tables as method="lloyd"."""
    w = _t3((64, 512), seed=12).float()
    v = w.reshape(64, -1)
    opt = qz.fit_codebook([w], 8, row_groups=64)
    lloyd = qz.fit_codebook([w], 8, row_groups=64, method="lloyd")
    assert (opt[:, 1:] >= opt[:, :-1]).all()
    torch.testing.assert_close(_sse(v, opt), _sse(v, lloyd), rtol=1e-6, atol=0)


def test_binned_result_obeys_the_stated_bound():
    """On bins: the returned SSE is at most the DP's value ``upper`` (= within-bin SSE + the
    bins' optimum); the exact optimum lies in ``[lower, returned SSE]``; and in terms of the
    optimum alone, ``E <= OPT + 2 sqrt(OPT S) + 2 S``."""
    x = torch.cat([_t3((2, 2000), seed=11), torch.randn(1, 2000, generator=_gen(3),
                                                         dtype=torch.float64)])
    w = torch.rand(3, 2000, generator=_gen(4), dtype=torch.float64)
    for weights in (None, w):
        for k in (4, 16):
            exact: dict = {}
            qz.kmeans_1d_optimal(x, k, weights=weights, info=exact)
            assert exact["exact"].all()
            opt = exact["sse"]
            torch.testing.assert_close(exact["upper"], opt, rtol=1e-9, atol=0)
            for bins in (64, 256):
                for iters in (0, 1000):  # the bound holds before Lloyd's polish and after
                    info: dict = {}
                    c = qz.kmeans_1d_optimal(x, k, weights=weights, bins=bins, iters=iters,
                                             info=info)
                    e, s = info["sse"], info["within"]
                    assert not info["exact"].any() and (info["bins"] == bins).all()
                    torch.testing.assert_close(e, _sse(x, c, weights), rtol=1e-9, atol=0)
                    assert (e <= info["upper"] * (1 + 1e-9)).all()
                    assert (e >= opt * (1 - 1e-9)).all()
                    assert (info["lower"] <= opt * (1 + 1e-9)).all()
                    assert (s > 0).all()
                    assert (e <= opt + 2 * (opt * s).sqrt() + 2 * s + 1e-9 * opt).all()


def test_fewer_distinct_values_than_centroids_and_constant_rows():
    x = torch.tensor([[3.0, -1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    for k in (4, 16):
        c = qz.kmeans_1d_optimal(x, k)
        assert c.shape == (3, k) and torch.isfinite(c).all()
        assert (c[:, 1:] >= c[:, :-1]).all()
        assert set(c[0].tolist()) == {-1.0, 0.0, 2.0, 3.0}  # every value, exactly
        assert (c[1] == 5.0).all() and (c[2] == 0.0).all()
        assert (_sse(x, c) == 0).all()
    one = qz.kmeans_1d_optimal(torch.tensor([[1.5]]), 4)
    assert (one == 1.5).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_run_in_float32(dtype):
    x = _t3((3, 500), seed=5).to(dtype)
    c = qz.kmeans_1d_optimal(x, 8)
    assert c.dtype == torch.float32 and (c[:, 1:] >= c[:, :-1]).all()
    ref = qz.kmeans_1d_optimal(x.double(), 8)
    assert (_sse(x, c) <= _sse(x, ref) * (1 + 1e-5)).all()


@pytest.mark.parametrize("scale", [2.0**120, 2.0**-140])
def test_rows_at_the_ends_of_float32s_range(scale):
    """Sums and squares of 1e36 or 1e-42 (subnormal) weights stay in range: the rows are
    scaled by a power of two, so the table is the unit table scaled."""
    x = _t3((2, 300), seed=9).float()
    x = x / x.abs().max()
    big = x * scale
    c = qz.kmeans_1d_optimal(big, 8)
    assert torch.isfinite(c).all() and (c[:, 1:] >= c[:, :-1]).all()
    if scale > 1:
        torch.testing.assert_close(c / scale, qz.kmeans_1d_optimal(x, 8), rtol=1e-6, atol=0)
    else:  # subnormal values are coarse: compare errors, not values
        rel = _sse(big.double() / scale, c.double() / scale) / (x.double() ** 2).sum(1)
        ref = _sse(x, qz.kmeans_1d_optimal(x, 8)) / (x.double() ** 2).sum(1)
        assert (rel <= ref + 1e-3).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        qz.kmeans_1d_optimal(torch.tensor([[1.0, float("nan"), 2.0]]), 2)
    with pytest.raises(ValueError, match="NaN"):
        qz.kmeans_1d_optimal(torch.tensor([[1.0, float("inf"), 2.0]]), 2)
    with pytest.raises(ValueError, match="k must"):
        qz.kmeans_1d_optimal(torch.randn(2, 5), 0)
    with pytest.raises(ValueError, match="bins"):
        qz.kmeans_1d_optimal(torch.randn(2, 5), 2, bins=1)
    with pytest.raises(ValueError, match="values must"):
        qz.kmeans_1d_optimal(torch.randn(5), 2)
    with pytest.raises(ValueError, match=">= 0"):
        qz.kmeans_1d_optimal(torch.randn(2, 5), 2, weights=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="NaN"):
        qz.kmeans_1d_optimal(torch.randn(2, 5), 2, weights=torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="broadcast"):
        qz.kmeans_1d_optimal(torch.randn(2, 5), 2, weights=torch.ones(3))
    with pytest.raises(ValueError, match="method"):
        qz.fit_codebook([torch.randn(4, 8)], 2, method="kmeans++")
    with pytest.raises(ValueError, match="importance"):
        qz.fit_codebook([torch.randn(4, 8)], 2, importance=-torch.ones(8))
    with pytest.raises(ValueError, match="NaN"):
        qz.fit_codebook([torch.tensor([[1.0, float("nan")]])], 2)


# -- weighted k-means -----------------------------------------------------------------------------


def test_equal_weights_are_unweighted():
    x = _t3((3, 37 * 5), seed=2)
    for k in (4, 8):
        plain = qz.kmeans_1d_optimal(x, k)
        torch.testing.assert_close(qz.kmeans_1d_optimal(x, k, weights=torch.full_like(x, 3.7)),
                                   plain, rtol=1e-12, atol=0)
        # a row of zero weights is fit unweighted
        zero = torch.rand(3, 185, generator=_gen(1), dtype=torch.float64)
        zero[1] = 0
        torch.testing.assert_close(qz.kmeans_1d_optimal(x, k, weights=zero)[1], plain[1],
                                   rtol=1e-12, atol=0)
        for init in ("quantile", "uniform"):
            torch.testing.assert_close(
                qz.kmeans_1d(x, k, 100, init=init, weights=torch.ones_like(x) * 2),
                qz.kmeans_1d(x, k, 100, init=init), rtol=1e-9, atol=0)


def test_weighted_solution_has_the_lower_weighted_error():
    """Hessian-diagonal-like weights (a per-column energy over 37 columns, broadcast over rows):
    the weighted fit has the lower weighted error, both methods; Lloyd's weighted steps never
    increase it."""
    n, k_in = 24, 37
    wt = _t3((n, k_in), seed=3)
    energy = torch.rand(k_in, generator=_gen(5), dtype=torch.float64) ** 4 * 100
    imp = energy.expand(n, k_in)
    v, iv = wt.reshape(1, -1), imp.reshape(1, -1)
    for bits in (2, 3):
        k = 2**bits
        weighted = qz.kmeans_1d_optimal(v, k, weights=iv)
        plain = qz.kmeans_1d_optimal(v, k)
        assert float(_sse(v, weighted, iv)) < float(_sse(v, plain, iv))
        assert float(_sse(v, weighted, iv)) <= float(_sse(v, qz.kmeans_1d(v, k, 1000, weights=iv),
                                                          iv)) * (1 + 1e-9)
        for method in ("optimal", "lloyd"):
            cw = qz.fit_codebook([wt], bits, method=method, importance=energy)
            cp = qz.fit_codebook([wt], bits, method=method)
            assert float(_sse(v, cw, iv)) < float(_sse(v, cp, iv))
        hist: list[float] = []
        qz.kmeans_1d(v, k, 50, weights=iv, history=hist)
        assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(hist))


# -- CodebookConfig -------------------------------------------------------------------------------


def _energy() -> torch.Tensor:
    return torch.rand(37, generator=_gen(8)) ** 3 * 10 + 0.01


def _mlp() -> nn.Sequential:
    """Ragged sizes; the first layer's inputs of high energy have small weights (and the
    reverse), so a table fit to the weights alone spends its levels where the output feels
    them least."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 24), nn.ReLU(), nn.Linear(24, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(24, 37, generator=_gen(6)) / _energy().sqrt())
    return model


def _calib() -> torch.Tensor:
    # inputs of very unequal energy per feature: what activation weighting is for
    return torch.randn(64, 37, generator=_gen(9)) * _energy().sqrt()


@pytest.mark.parametrize("method", ["optimal", "lloyd"])
def test_weighted_codebook_through_compress(method):
    x = _calib()
    dense = _mlp()
    h = 2 * x.T.double() @ x.double() / x.shape[0]  # the layer's input Hessian
    out = {}
    for weighted in (False, True):
        model = co.compress_(_mlp(), co.CodebookConfig(bits=2, method=method,
                                                       weighted=weighted), calib=[x])
        assert isinstance(model[0], co.nn.CodebookLinear)
        assert isinstance(model[2], co.nn.CodebookLinear)
        with torch.no_grad():
            err = model[0].dense_weight().double() - dense[0].weight.double()
            out[weighted] = (float((err**2 * torch.diagonal(h)).sum()),
                             float((model(x) - dense(x)).square().sum()))
    # the weighted objective, and the model's output error on the calibration inputs
    assert out[True][0] < 0.7 * out[False][0]
    assert out[True][1] < 0.8 * out[False][1]


def test_weighted_codebook_needs_calibration():
    cfg = co.CodebookConfig(weighted=True)
    assert cfg.needs_calibration and not co.CodebookConfig().needs_calibration
    with pytest.raises(ValueError, match="calib"):
        co.compress_(_mlp(), cfg)
    model = _mlp()
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        co.compress_(model, co.CodebookConfig(), calib=[_calib()])


def test_codebook_config_validation_and_json():
    assert co.CodebookConfig().method == "optimal" and not co.CodebookConfig().weighted
    with pytest.raises(ValueError, match="method"):
        co.CodebookConfig(method="exact")
    with pytest.raises(TypeError, match="weighted"):
        co.CodebookConfig(weighted=1)
    with pytest.raises(ValueError, match="shared"):
        co.CodebookConfig(weighted=True, shared=True)
    cfg = co.CodebookConfig(bits=3, method="lloyd", weighted=True)
    assert ser.config_from_json(ser.config_to_json(cfg)) == cfg
    # configs written before method / weighted existed still load (with the defaults)
    old = {"type": "CodebookConfig", "bits": 2, "row_groups": 1, "iters": 1000, "shared": False}
    assert ser.config_from_json(old) == co.CodebookConfig(bits=2)


def test_from_dense_and_shared_codebooks_take_the_method():
    lin = _mlp()[0]
    w = lin.weight.detach()
    for method in ("optimal", "lloyd"):
        m = co.nn.CodebookLinear.from_dense(lin, bits=3, method=method)
        torch.testing.assert_close(m.codebook, qz.fit_codebook([w], 3, method=method))
        enc = qz.encode_codebook(w, m.codebook, 3)
        torch.testing.assert_close(m.dense_weight(), dqf.codebook_weight(
            enc.indices, m.codebook, 3, lin.in_features))
    model = co.compress_(_mlp(), co.Recipe({r"^[02]$": co.CodebookConfig(bits=2, shared=True,
                                                                         method="lloyd")}))
    dense = _mlp()
    torch.testing.assert_close(model[0].codebook, qz.fit_codebook(
        [dense[0].weight.detach(), dense[2].weight.detach()], 2, method="lloyd"))
    with pytest.raises(ValueError, match="importance"):
        co.nn.CodebookLinear.from_dense(lin, codebook=model[0].codebook.clone(), bits=2,
                                        importance=torch.ones(37))
