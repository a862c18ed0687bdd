"""compress_ops/ops/hashed.py: hashed_linear and its backward ops -- op rules from
ARCHITECTURE.md, both routes against the float64 reference, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compress_ops  # noqa: F401  (registers the ops)
from compress_ops.kernels.formats import hashed as hf
from compress_ops.ops import hashed as hashed_ops
from compress_ops.reference import hashed_linear_ref

op = torch.ops.compress_ops.hashed_linear
V = hf.HASH_VERSION


def _w(b: int, dtype=torch.float32, seed=0, grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, generator=g) * 0.2).to(dtype).requires_grad_(grad)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_virtual_weight_matches_a_pure_python_hash():
    """The spec of kernels/formats/hashed.py, computed with Python ints (arbitrary
    precision, explicit wrap modulo 2**32): a wrong shift or constant fails here first."""
    m32 = 0xFFFFFFFF
    mix, gold = 0x045D9F3B, 0x9E3779B1
    assert (hf.MIX, hf.GOLD) == (mix, gold)

    def fmix(v: int) -> int:
        v ^= v >> 16
        v = (v * mix) & m32
        v ^= v >> 16
        v = (v * mix) & m32
        return v ^ (v >> 16)

    def spec(n: int, k: int, seed: int, b: int) -> tuple[int, bool]:
        h = ((fmix(n ^ seed) ^ ((k * gold) & m32)) * mix) & m32
        return (((h << 1) & m32) * b) >> 32, bool(h >> 31)

    n, k, b = 7, 13, 29
    for seed in (0, 1, 0xDEADBEEF, 2**32 - 1):
        bucket, neg = hf.virtual_index(n, k, b, seed)
        for r in range(n):
            for c in range(k):
                assert (bucket[r, c].item(), bool(neg[r, c])) == spec(r, c, seed, b)
    # rows up to 2**31 - 1 (a row range of a huge layer: only [2, k] is built) and B up to
    # 2**31 - 1; large columns through the format's own hash_bits on a slice
    for b in (101, 2**31 - 1):
        bucket, neg = hf.virtual_index(2**31 - 1, 40, b, 9, rows=(2**31 - 3, 2**31 - 1))
        for r in range(2):
            for c in (0, 1, 17, 39):
                assert (bucket[r, c].item(), bool(neg[r, c])) == spec(2**31 - 3 + r, c, 9, b)
    big = torch.tensor([0, 5, 2**30 + 3, 2**31 - 2, 2**31 - 1])
    h = hf.hash_bits(big[:, None], big[None, :], 0xDEADBEEF)
    for i, r in enumerate(big.tolist()):
        for j, c in enumerate(big.tolist()):
            want = ((fmix(r ^ 0xDEADBEEF) ^ ((c * gold) & m32)) * mix) & m32
            assert h[i, j].item() == want


def test_hash_spreads_positions_over_buckets_and_signs():
    bucket, neg = hf.virtual_index(256, 256, 512, 3)
    counts = torch.bincount(bucket.flatten(), minlength=512).double()
    assert counts.min() > 0  # every bucket used: 128 members on average
    assert counts.std() / counts.mean() < 0.15  # Poisson-like (1/sqrt(128) = 0.088)
    assert abs(neg.double().mean().item() - 0.5) < 0.01
    # rows and columns alike: about half of every row's and column's signs (256 each: sd
    # 0.031; the one-multiply hash leaves a few rows ~5 sd off)
    assert neg.double().mean(1).sub(0.5).abs().max() < 0.2
    assert neg.double().mean(0).sub(0.5).abs().max() < 0.2


def test_signs_are_independent_of_buckets_and_unstructured():
    """The sign (``h``'s top bit) is not a function of the bucket (``h``'s low 31 bits):
    within a bucket both signs occur, about half each, and two members of a bucket have
    uncorrelated signs (what HashedNets' sign hash is for). The sign matrix is not rank-1
    structured (``s[n, k] = a[n] b[k]`` would make every two rows' sign vectors correlate
    +-1): rows' and columns' sign vectors are uncorrelated on average. Known limit of the
    one-multiply hash: two rows whose ``R`` differ in few bits (or two columns whose ``C``
    do) have correlated signs, so the pairwise correlations have a tail (about 0.1 % of
    pairs past 4.8 sd here); such pairs share no more buckets than any others."""
    b = 512
    bucket, neg = hf.virtual_index(256, 256, b, 3)
    neg_count = torch.zeros(b, dtype=torch.float64).index_add_(0, bucket.flatten(),
                                                               neg.flatten().double())
    count = torch.bincount(bucket.flatten(), minlength=b).double()
    frac = neg_count / count
    assert ((frac > 0) & (frac < 1)).all()  # both signs in every bucket
    assert abs(frac.mean().item() - 0.5) < 0.02
    assert (frac - 0.5).abs().max() < 0.25  # 128 members: sd 0.044
    # members of one bucket: sum over pairs of s_i s_j = (S^2 - count) / 2, S the signed sum
    s = 1 - 2 * neg.double()
    signed = torch.zeros(b, dtype=torch.float64).index_add_(0, bucket.flatten(), s.flatten())
    pair_corr = ((signed.square() - count) / 2).sum() / (count * (count - 1) / 2).sum()
    assert abs(pair_corr.item()) < 0.01  # 2M pairs
    for m in (s, s.T):
        c = (m @ m.T) / m.shape[1]  # correlations of the rows' +-1 vectors
        off = c[~torch.eye(c.shape[0], dtype=torch.bool)]
        assert abs(off.mean().item()) < 0.01
        assert off.abs().mean() < 0.06  # ~ sqrt(2/pi)/16 = 0.050 for independent signs
        assert (off.abs() > 0.3).double().mean() < 0.005  # the tail (sd 1/16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "b"), [(24, 70, 97), (33, 17, 1), (5, 9, 100)])
def test_op_matches_reference_on_both_backends(op_device, dtype, n, k, b):
    w = _w(b, dtype)
    bias = (torch.randn(n) * 0.1).to(dtype)
    x = torch.randn(3, 5, k).to(dtype)
    y = op(x, w, bias, n, k, 12345, V)
    ref = hashed_linear_ref(x, w, bias, n, k, 12345, dtype=torch.float64)
    assert y.shape == (3, 5, n) and y.dtype == dtype
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_cpu_path_in_row_chunks_matches_one_chunk(monkeypatch):
    n, k, b = 37, 50, 300
    w, x, bias = _w(b, grad=True), torch.randn(4, k, requires_grad=True), torch.randn(n)
    y = op(x, w, bias, n, k, 77, V)
    y.square().sum().backward()
    want = (y.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    monkeypatch.setattr(hf, "CHUNK_ELEMENTS", 3 * k)  # 3 rows per chunk, ragged last chunk
    y2 = op(x, w, bias, n, k, 77, V)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want[1], rtol=1e-5, atol=1e-5)  # summed per chunk
    torch.testing.assert_close(w.grad, want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_match_float64_autograd_of_the_virtual_weight(op_device, with_bias):
    n, k, b, seed = 19, 23, 40, 2**32 - 1
    w = _w(b, grad=True)
    bias = torch.randn(n, requires_grad=True) if with_bias else None
    x = torch.randn(2, 3, k, requires_grad=True)
    gy = torch.randn(2, 3, n)
    (op(x, w, bias, n, k, seed, V) * gy).sum().backward()
    w64 = w.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    (F.linear(x64, hf.hashed_weight(w64, n, k, seed), b64) * gy.double()).sum().backward()
    assert _rel(w.grad, w64.grad) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5
    if with_bias:
        assert _rel(bias.grad, b64.grad) < 1e-6


def test_opcheck(op_device):
    n, k, b = 16, 40, 50
    w, bias = _w(b, grad=True), torch.randn(n, requires_grad=True)
    x = torch.randn(4, k, requires_grad=True)
    torch.library.opcheck(op, (x, w, bias, n, k, 3, V))
    torch.library.opcheck(op, (x.detach(), w, None, n, k, 0, V))
    g = torch.randn(4, n)
    torch.library.opcheck(torch.ops.compress_ops.hashed_linear_t, (g, w.detach(), n, k, 3, V))
    torch.library.opcheck(torch.ops.compress_ops.hashed_grad_w, (g, x.detach(), b, n, k, 3, V))


def test_m_zero_and_leading_dims(op_device):
    n, k = 12, 20
    w, bias = _w(30), torch.randn(n)
    assert op(torch.randn(0, k), w, bias, n, k, 0, V).shape == (0, n)
    assert op(torch.randn(2, 0, k), w, None, n, k, 0, V).shape == (2, 0, n)
    y = op(torch.randn(k), w, bias, n, k, 0, V)
    assert y.shape == (n,)
    x = torch.randn(6, 2 * k)[:, ::2]  # not contiguous
    torch.testing.assert_close(op(x, w, bias, n, k, 0, V), op(x.contiguous(), w, bias, n, k, 0, V))


def test_nonfinite_inputs_propagate_where_dense_does(op_device):
    n, k = 8, 16
    w = _w(20)
    x = torch.randn(3, k)
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    y = op(x, w, None, n, k, 5, V)
    ref = F.linear(x.double(), hf.hashed_weight(w, n, k, 5).double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))


@pytest.mark.parametrize(("args", "err", "match"), [
    (lambda x, w, b: (x, w, b, 8, 16, -1, V), ValueError, "seed must be in"),
    (lambda x, w, b: (x, w, b, 8, 16, 2**32, V), ValueError, "seed must be in"),
    (lambda x, w, b: (x, w, b, 8, 16, 0, V + 1), ValueError, "hash version"),
    (lambda x, w, b: (x, w, b, 8, 15, 0, V), ValueError, "in_features"),
    (lambda x, w, b: (x, w, b, 0, 16, 0, V), ValueError, "out_features must be >= 1"),
    (lambda x, w, b: (x, w[:0], b, 8, 16, 0, V), ValueError, "buckets"),
    (lambda x, w, b: (x, w.reshape(4, 5), b, 8, 16, 0, V), ValueError, "1-D"),
    (lambda x, w, b: (x, w.double(), b, 8, 16, 0, V), TypeError, "dtype"),
    (lambda x, w, b: (x.half(), w, b, 8, 16, 0, V), TypeError, "dtype"),
    (lambda x, w, b: (x, w, b[:3], 8, 16, 0, V), ValueError, "bias"),
])
def test_bad_input_is_named(args, err, match):
    x, w, b = torch.randn(2, 16), _w(20), torch.randn(8)
    with pytest.raises(err, match=match):
        op(*args(x, w, b))


def test_backward_ops_refuse_mismatched_inputs():
    w = _w(20)
    with pytest.raises(ValueError, match="N=8"):
        torch.ops.compress_ops.hashed_linear_t(torch.randn(2, 7), w, 8, 16, 0, V)
    with pytest.raises(ValueError, match="leading shape"):
        torch.ops.compress_ops.hashed_grad_w(torch.randn(2, 8), torch.randn(3, 16), 20, 8, 16,
                                             0, V)
    with pytest.raises(ValueError, match="hash version"):
        hashed_ops.check_hash_version(0)


def test_compile_parity_with_gradients():
    n, k = 24, 48
    w, bias = _w(100, grad=True), torch.randn(n, requires_grad=True)

    def f(x):
        return op(x, w, bias, n, k, 11, V).relu().sum()

    torch._dynamo.reset()
    x = torch.randn(5, k, requires_grad=True)
    f(x).backward()
    want = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    torch.testing.assert_close(x.grad, want[0])
    torch.testing.assert_close(w.grad, want[1])
    torch._dynamo.reset()


def test_cpu_index_cache_changes_nothing_and_stays_within_its_bound(monkeypatch):
    n, k, b = 30, 40, 64
    w, x = _w(b, grad=True), torch.randn(3, k)
    hashed_ops.INDEX_CACHE.clear()
    monkeypatch.setenv("COMPRESS_OPS_HASH_CACHE_MB", "0")
    y0 = op(x, w, None, n, k, 1, V)
    assert not hashed_ops.INDEX_CACHE  # nothing kept
    monkeypatch.setenv("COMPRESS_OPS_HASH_CACHE_MB", "1")
    y1 = op(x, w, None, n, k, 1, V)
    y2 = op(x, w, None, n, k, 1, V)  # from the cache
    assert torch.equal(y0, y1) and torch.equal(y1, y2)
    assert list(hashed_ops.INDEX_CACHE) == [(n, k, b, 1, (0, n), "cpu")]
    limit = 3 * n * k * 5  # room for three layers' indices
    monkeypatch.setenv("COMPRESS_OPS_HASH_CACHE_MB", str(limit / (1 << 20)))
    for seed in range(2, 7):
        op(x, w, None, n, k, seed, V)
    assert [key[3] for key in hashed_ops.INDEX_CACHE] == [4, 5, 6]  # least recently used out
    monkeypatch.setenv("COMPRESS_OPS_HASH_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="COMPRESS_OPS_HASH_CACHE_MB"):
        op(x, w, None, n, k, 99, V)
    hashed_ops.INDEX_CACHE.clear()
