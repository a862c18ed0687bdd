"""kernels/hashed.py: the hashed-weight kernels (GEMV, tensor-core GEMM, both directions, and the
bucket gradient) against float64 references built from the format's own virtual weight, the
hash bit for bit (positions up to 2**31 - 1 included), configs and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from compress_ops.kernels import hashed as kh
from compress_ops.kernels.formats.hashed import (
    MAX_DIM,
    MAX_SEED,
    hash_bits,
    hashed_weight,
    virtual_index,
)
from compress_ops.kernels.tuning import KernelConfig

from .tolerances import rel_err, tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [0, 1, 12345, 2**31, MAX_SEED]
GEMV = KernelConfig("gemv", 4, 32, 32, 4, 1)
GEMM = KernelConfig("gemm", 16, 32, 32, 4, 2)
# None: the tuned default (GEMV up to gemv_max_m rows, else the GEMM)
CONFIGS = [None, GEMV, GEMM, GEMV.with_split_k(2), GEMM.with_split_k(4)]


def _data(m: int, n: int, k: int, b: int, dtype: torch.dtype, bias: bool, trans: bool,
          seed: int, device: str):
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.randn(m, n if trans else k, generator=g).to(dtype).to(device)
    w = torch.randn(b, generator=g).to(dtype).to(device)
    bb = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, bb


def _ref(x, w, bias, n, k, seed, trans):
    wv = hashed_weight(w.double(), n, k, seed)
    if trans:
        return x.double() @ wv
    return F.linear(x.double(), wv, None if bias is None else bias.double())


@settings(max_examples=40)
@given(m=st.sampled_from([0, 1, 3, 17, 40]), n=st.sampled_from([1, 5, 33, 70]),
       k=st.sampled_from([1, 7, 33, 40, 64, 70]), b=st.sampled_from([1, 2, 17, 1000, 6000]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), trans=st.booleans(),
       seed=st.sampled_from(SEEDS), cfg=st.sampled_from(CONFIGS))
def test_matmul_matches_float64_reference(poison, device, m, n, k, b, dtype, bias, trans, seed,
                                          cfg):
    """Both paths, both directions, split-K, ragged N and K, B from 1 to past N K."""
    bias = bias and not trans
    x, w, bb = _data(m, n, k, b, dtype, bias, trans, seed, device)
    y = kh.hashed_matmul(x, w, bb, n, k, seed, transpose=trans, config=cfg)
    out = k if trans else n
    assert y.shape == (m, out) and y.dtype == dtype
    if m:
        assert rel_err(y, _ref(x, w, bb, n, k, seed, trans)) < tol(dtype, n if trans else k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("k", [70, 40])
def test_default_config_every_regime(poison, device, dtype, m, trans, k):
    """The tuned defaults (fp32 x: the GEMV up to gemv_max_m rows; fp16 / bf16: the GEMM at
    every M), ragged N = 33 and K (70: a position per weight; 40, a multiple of 8: one per
    octet, ``OCTETS``), the maximal seed, bias where the product takes one."""
    n, b, seed = 33, 500, MAX_SEED
    x, w, bb = _data(m, n, k, b, dtype, not trans, trans, seed, device)
    y = kh.hashed_matmul(x, w, bb, n, k, seed, transpose=trans)
    assert rel_err(y, _ref(x, w, bb, n, k, seed, trans)) < tol(dtype, n if trans else k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("cfg", [GEMV, GEMM])
@pytest.mark.parametrize("k", [21, 24])
@pytest.mark.parametrize("krows", [False, True])
def test_weight_bit_exact(poison, device, monkeypatch, dtype, trans, cfg, k, krows):
    """``x`` the identity: every output is one weight times 1 (exact in any dtype and path),
    so the kernels' W equals the format's ``hashed_weight`` bit for bit (K = 24: octets;
    ``krows``: the GEMM's octet tile built along its rows, as under Triton before 3.9)."""
    monkeypatch.setattr(kh, "_KROWS", krows)
    n, seed = 19, 2**32 - 7
    assert kh.octets(k, trans, cfg) == (k == 24)
    w = torch.randn(300, dtype=dtype, device=device)
    r = n if trans else k
    x = torch.eye(r, dtype=dtype, device=device)
    y = kh.hashed_matmul(x, w, None, n, k, seed, transpose=trans, config=cfg)
    wv = hashed_weight(w, n, k, seed)
    assert torch.equal(y, wv if trans else wv.T)


@triton.jit
def _hash_probe(out_ptr, bucket_ptr, table_ptr, n0, k0, seed, B, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    n = (n0 + offs).to(tl.uint32)[:, None]
    k = (k0 + offs).to(tl.uint32)[None, :]
    h = kh._hash(n, k, seed)
    flat = offs[:, None] * BLOCK + offs[None, :]
    tl.store(out_ptr + flat, h.to(tl.int64))
    # the kernels' bucket address into a table holding its own indices
    tl.store(bucket_ptr + flat, tl.load(kh._bucket_ptrs(table_ptr, h, B, False)))


@pytest.mark.parametrize(("n0", "k0"), [(0, 0), (MAX_DIM - 15, MAX_DIM - 15), (70000, 2**30)])
@pytest.mark.parametrize("seed", [0, 0x9E3779B9, MAX_SEED])
def test_hash_at_large_positions(device, n0, k0, seed):
    """The kernels' hash (uint32 registers) equals the format's int64 arithmetic up to the
    largest positions ``n, k = 2**31 - 1`` (``k GOLD`` and ``(R ^ C) MIX`` wrap modulo
    2**32); the bucket is the multiply-high of ``h << 1`` and ``B``."""
    blk = 16
    n = torch.arange(n0, n0 + blk, device=device)[:, None]
    k = torch.arange(k0, k0 + blk, device=device)[None, :]
    ref = hash_bits(n, k, seed)
    assert (ref >= 2**31).any() and (ref < 2**31).any()  # both signs
    for B in (1000, 65521):
        h = torch.empty(blk, blk, dtype=torch.int64, device=device)
        bucket = torch.empty_like(h)
        table = torch.arange(B, dtype=torch.int64, device=device)
        _hash_probe[(1,)](h, bucket, table, n0, k0, kh.seed_args(seed), B, BLOCK=blk)
        assert torch.equal(h, ref)
        assert torch.equal(bucket, ((ref << 1) & 0xFFFFFFFF) * B >> 32)
        if k0 < 2**20:  # the format's own index (it builds whole rows: k from 0)
            got, _ = virtual_index(MAX_DIM, k0 + blk, B, seed, rows=(n0, n0 + blk))
            assert torch.equal(bucket, got[:, k0:])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Inf - Inf in columns never stored
@pytest.mark.parametrize("cfg", [GEMV, GEMM])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("k", [33, 40])
@pytest.mark.parametrize("krows", [False, True])
def test_padding_never_reads_a_non_finite_bucket(poison, device, monkeypatch, cfg, trans, k,
                                                 krows):
    """Ragged K and N: every bucket no real position maps to is Inf, so a tile position past
    the edge that gathered one (times x's zero padding) would put a NaN in a real output
    (``krows``: as in :func:`test_weight_bit_exact`)."""
    monkeypatch.setattr(kh, "_KROWS", krows)
    n, b, seed = 5, 400, 3
    bucket, _ = virtual_index(n, k, b, seed)
    used = torch.zeros(b, dtype=torch.bool)
    used[bucket.flatten()] = True
    w = torch.randn(b, dtype=torch.float16)
    w[~used] = float("inf")
    x = torch.randn(3, n if trans else k, dtype=torch.float16)
    y = kh.hashed_matmul(x.to(device), w.to(device), None, n, k, seed, transpose=trans,
                         config=cfg)
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), _ref(x, w, None, n, k, seed, trans)) < tol(torch.float16, k)


@pytest.mark.parametrize("cfg", [None, GEMV, GEMM])
def test_nan_and_inf_propagate(poison, device, cfg):
    """A NaN bucket and an Inf in x give non-finite outputs exactly where the reference has
    them; NaN stays NaN."""
    n, k, seed = 9, 20, 5
    w = torch.randn(50, dtype=torch.float32)
    w[7] = float("nan")
    x = torch.randn(3, k, dtype=torch.float32)
    x[1, 4] = float("inf")
    y = kh.hashed_matmul(x.to(device), w.to(device), None, n, k, seed, config=cfg).cpu()
    ref = _ref(x, w, None, n, k, seed, False)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


@pytest.mark.parametrize("trans", [False, True])
def test_batch_dims_and_non_contiguous_x(poison, device, trans):
    n, k, seed = 10, 24, 77
    w = torch.randn(64, dtype=torch.float16, device=device)
    r = n if trans else k
    x = torch.randn(2, 3, 2 * r, dtype=torch.float16, device=device)[..., ::2]
    assert not x.is_contiguous()
    y = kh.hashed_matmul(x, w, None, n, k, seed, transpose=trans)
    assert y.shape == (2, 3, k if trans else n)
    assert rel_err(y, _ref(x, w, None, n, k, seed, trans)) < tol(torch.float16, r)
    empty = kh.hashed_matmul(x[:, :0], w, None, n, k, seed, transpose=trans)
    assert empty.shape == (2, 0, k if trans else n)


def test_sign_pairs_ptx_semantics():
    """``_sign_pairs`` (PTX, GPU only: ``lop3.b32 d, v, hs, 0x80008000, 0x78``) on a register
    holding two 16-bit weights and the two hashes' high halves (``_hi``, packed as the weights
    are) flips each weight's sign bit by its own hash's top bit, as the per-weight form the
    interpreter runs does. Modelled here on the two halves' bits."""
    g = torch.Generator().manual_seed(0)
    lo, hi = (torch.randint(0, 2**16, (4096,), generator=g) for _ in range(2))
    h_lo, h_hi = (torch.randint(0, 2**32, (4096,), generator=g) for _ in range(2))
    v = lo | (hi << 16)
    hs = (h_lo >> 16) | ((h_hi >> 16) << 16)  # the high halves as the pairs pack them
    lut = 0x78  # a ^ (b & c) for a = 0xF0, b = 0xCC, c = 0xAA
    assert lut == 0xF0 ^ (0xCC & 0xAA)
    d = v ^ (hs & 0x80008000)
    assert torch.equal(d & 0xFFFF, lo ^ ((h_lo >> 31) << 15))
    assert torch.equal(d >> 16, hi ^ ((h_hi >> 31) << 15))


def _grad_w_ref(g, x, b, n, k, seed):
    big_g = g.reshape(-1, n).double().T @ x.reshape(-1, k).double()
    bucket, neg = virtual_index(n, k, b, seed, device=g.device)
    v = torch.where(neg, -big_g, big_g)
    return torch.zeros(b, dtype=torch.float64, device=g.device).index_add_(
        0, bucket.flatten(), v.flatten())


@settings(max_examples=15)
@given(m=st.sampled_from([0, 1, 17, 40]), n=st.sampled_from([1, 5, 33]),
       k=st.sampled_from([1, 7, 70]), b=st.sampled_from([1, 3, 100, 3000]),
       dtype=st.sampled_from(DTYPES), seed=st.sampled_from(SEEDS),
       split=st.sampled_from([1, 2]))
def test_grad_w_matches_float64_index_add(device, m, n, k, b, dtype, seed, split):
    g = torch.randn(m, n, dtype=dtype, device=device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    cfg = KernelConfig("gemm", 16, 32, 32, 4, 2, split_k=split)
    gw = kh.hashed_grad_w(g, x, b, n, k, seed, config=cfg)
    assert gw.shape == (b,) and gw.dtype == torch.float32
    ref = _grad_w_ref(g, x, b, n, k, seed)
    if m == 0:
        assert not gw.any()
    else:
        # fp32 sums of exact products of the inputs (the dot, then the atomics)
        assert rel_err(gw, ref) < tol(torch.float32, m * n * k // b + m)


def test_grad_w_default_config_and_batch_dims(device):
    n, k, b, seed = 20, 30, 50, 9
    g = torch.randn(2, 3, n, dtype=torch.bfloat16, device=device)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16, device=device)
    gw = kh.hashed_grad_w(g, x, b, n, k, seed)
    assert rel_err(gw, _grad_w_ref(g, x, b, n, k, seed)) < tol(torch.float32, 6 * n * k // b)


def test_errors(device):
    w = torch.randn(10, device=device)
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="no bias"):
        kh.hashed_matmul(torch.randn(2, 4, device=device), w, torch.randn(4, device=device),
                         4, 8, 0, transpose=True)
    with pytest.raises(ValueError, match="out_features"):
        kh.hashed_matmul(x, w, None, 4, 8, 0, transpose=True)
    with pytest.raises(ValueError, match="in_features"):
        kh.hashed_matmul(x, w, None, 4, 9, 0)
    with pytest.raises(ValueError, match="seed"):
        kh.hashed_matmul(x, w, None, 4, 8, 2**32)
    with pytest.raises(TypeError, match="dtype"):
        kh.hashed_matmul(x.half(), w, None, 4, 8, 0)
    with pytest.raises(ValueError, match="leading dims"):
        kh.hashed_grad_w(torch.randn(3, 4, device=device), x, 10, 4, 8, 0)


def test_select_config_regimes():
    cpu = torch.device("cpu")
    assert kh.select_config(1, 4096, 4096, cpu, torch.float32).path == "gemv"
    assert kh.select_config(1, 4096, 4096, cpu, torch.float16).path == "gemm"
    assert kh.select_config(2048, 4096, 4096, cpu, torch.bfloat16).path == "gemm"
    big = kh.select_config(2048, 4096, 4096, cpu, torch.float32)
    assert big.path == "gemm" and big.block_m <= 64 and big.block_k <= 32
    from compress_ops.kernels import tuning

    with tuning.simulate_gpu():  # a skinny grid takes split-K on a GPU
        assert kh.select_config(1, 256, 8192, cpu).split_k > 1
        assert kh.select_grad_w_config(4096, 64, 64, cpu).split_k > 1
    assert kh.get_autotune_configs(1) and kh.get_autotune_configs(2048)


def test_seed_args_bits():
    for seed in SEEDS:
        arg = kh.seed_args(seed)
        assert -(2**31) <= arg < 2**31
        assert arg % 2**32 == seed
