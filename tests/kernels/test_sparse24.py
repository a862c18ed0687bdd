"""kernels/sparse24.py: the Triton 2:4 kernels against the float64 reference (CPU: interpreter)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops.kernels import launches
from compress_ops.kernels import sparse24 as sp
from compress_ops.kernels.formats import sparse24 as spf
from compress_ops.reference import sparse24_linear_ref

from .tolerances import rel_err as _rel_err
from .tolerances import tol as _tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The "gpu" hypothesis profile (real kernels, no interpreter) also draws larger shapes.
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "gpu"
MS = [1, 2, 3, 5, 16, 17, 40, 70] + ([129, 300, 1000] if LARGE else [])
MAX_N, MAX_K = (600, 1100) if LARGE else (80, 150)


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype)  # never all-zero, no exact zeros


# --------------------------------------------------------------------------------------------
# Kernels (Triton: CUDA, or the interpreter on CPU)
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "default": None,
    "gemv_m1": sp.KernelConfig("gemv", 1, 16, 64),
    "gemv_m4": sp.KernelConfig("gemv", 4, 8, 128),
    "gemm_16": sp.KernelConfig("gemm", 16, 32, 64),
    "gemm_32_splitk": sp.KernelConfig("gemm", 32, 64, 32, split_k=4),
    "gemm_64": sp.KernelConfig("gemm", 64, 32, 64, group_m=2),
    # two-byte x: SWAP_AB (the weight tile as the dot's first operand) in 64-column sub-tiles
    "gemm_16_swap_k256": sp.KernelConfig("gemm", 16, 64, 256),
    "gemm_32_swap_n128_splitk": sp.KernelConfig("gemm", 32, 128, 128, split_k=2),
    "gemm_128": sp.KernelConfig("gemm", 128, 64, 64),  # past swap_ab_max_block_m
}


@given(
    m=st.sampled_from(MS),
    n=st.integers(1, MAX_N),
    k=st.integers(1, MAX_K),
    dtype=st.sampled_from(DTYPES),
    has_bias=st.booleans(),
    cfg=st.sampled_from(sorted(CONFIGS)),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_float64_reference(device, poison, m, n, k, dtype, has_bias, cfg, seed):
    w = spf.prune_2to4(_rand(n, k, dtype=dtype, seed=seed))
    values, meta = (t.to(device) for t in spf.pack_sparse24(w))
    x = _rand(m, k, dtype=dtype, seed=seed + 1).to(device)
    bias = _rand(n, dtype=dtype, seed=seed + 2).to(device) if has_bias else None
    y = sp.sparse24_matmul(x, values, meta, bias, config=CONFIGS[cfg])
    ref = sparse24_linear_ref(x, values, meta, bias, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) <= _tol(dtype, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", ["gemv_m4", "gemm_16", "gemm_32_splitk"])
def test_kernel_blocks_cover_ragged_grid(device, poison, cfg, dtype):
    # M, N, K all off the block grid, several blocks in every direction
    m = {"gemv_m4": 6, "gemm_16": 37, "gemm_32_splitk": 70}[cfg]
    n, k = 75, 301
    w = spf.prune_2to4(_rand(n, k, dtype=dtype, seed=3))
    values, meta = (t.to(device) for t in spf.pack_sparse24(w))
    x = _rand(m, k, dtype=dtype, seed=4).to(device)
    bias = _rand(n, dtype=dtype, seed=5).to(device)
    y = sp.sparse24_matmul(x, values, meta, bias, config=CONFIGS[cfg])
    ref = sparse24_linear_ref(x, values, meta, bias, dtype=torch.float64)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _rel_err(y, ref) <= _tol(dtype, k)


def test_every_autotune_config_computes_the_right_answer(device):
    # Autotuning picks by speed only; every candidate must be correct (ragged M, N, K).
    n, k = 40, 100
    w = spf.prune_2to4(_rand(n, k, dtype=torch.float16, seed=21))
    values, meta = (t.to(device) for t in spf.pack_sparse24(w))
    seen = set()
    for m in (1, 2, 3, 9, 33, 100):
        x = _rand(m, k, dtype=torch.float16, seed=22).to(device)
        ref = sparse24_linear_ref(x, values, meta, dtype=torch.float64)
        for cfg in sp.get_autotune_configs(m):
            if cfg.name in seen:
                continue
            seen.add(cfg.name)
            y = sp.sparse24_matmul(x, values, meta, config=cfg)
            assert _rel_err(y, ref) <= _tol(torch.float16, k), cfg.name


def test_kernel_leading_dims_noncontiguous_and_empty(device):
    n, k = 24, 64
    w = spf.prune_2to4(_rand(n, k, seed=7))
    values, meta = (t.to(device) for t in spf.pack_sparse24(w))
    x = _rand(2, k, 3, seed=8).to(device).transpose(1, 2)  # [2, 3, K], non-contiguous
    assert not x.is_contiguous()
    y = sp.sparse24_matmul(x, values, meta)
    ref = sparse24_linear_ref(x, values, meta, dtype=torch.float64)
    assert y.shape == (2, 3, n)
    assert _rel_err(y, ref) <= _tol(torch.float32, k)
    empty = sp.sparse24_matmul(x[:, :0], values, meta)
    assert empty.shape == (2, 0, n)


def test_select_config_paths():
    cpu = torch.device("cpu")
    assert sp.select_config(1, 4096, 4096, cpu).path == "gemv"
    assert sp.select_config(4, 4096, 4096, cpu).path == "gemv"
    assert sp.select_config(5, 4096, 4096, cpu).path == "gemm"
    assert sp.select_config(5000, 4096, 4096, cpu).block_m >= 64
    # half-precision activations take the 16-row tensor-core tile at every M
    assert sp.select_config(1, 4096, 4096, cpu, half=True).path == "gemm"
    assert sp.select_config(1, 4096, 4096, cpu, half=True).block_m == 16
    x = torch.randn(1, 64).half()
    values, meta = torch.randn(32, 32).half(), torch.zeros(32, 2, dtype=torch.int32)
    with launches.capture(run=False) as got:
        sp.sparse24_matmul(x, values, meta)
        sp.sparse24_matmul(x.float(), values.float(), meta)
    assert [la.kernel.__name__ for la in got] == ["_sparse24_matmul_kernel",
                                                  "_sparse24_gemv_kernel"]
    assert sp.m_bucket(1) == 1 and sp.m_bucket(17) == 32 and sp.m_bucket(64) == 64


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        sp.KernelConfig("gemm", 16, 48, 64)
    with pytest.raises(ValueError, match="block_m >= 16"):
        sp.KernelConfig("gemm", 8, 32, 64)
    with pytest.raises(ValueError, match="path"):
        sp.KernelConfig("dense", 16, 32, 64)


def test_autotune_space_is_valid():
    for m in (1, 2, 3, 8, 16, 64, 1000):
        cfgs = sp.get_autotune_configs(m)
        assert cfgs and all(isinstance(c, sp.KernelConfig) for c in cfgs)
        assert any(c.path == "gemv" for c in cfgs) == (m <= 4)
        assert len({c.name for c in cfgs}) == len(cfgs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"x": torch.ones(2, 64, dtype=torch.int32)}, TypeError, "x must be float16"),
        ({"x": torch.randn(2, 100)}, ValueError, r"K=100"),
        ({"x": torch.randn(2, 64, dtype=torch.float16)}, TypeError, "values dtype"),
        ({"bias": torch.randn(7)}, ValueError, r"bias shape"),
        ({"bias": torch.randn(8, dtype=torch.float64)}, TypeError, "bias dtype"),
        ({"meta": torch.zeros(8, 3, dtype=torch.int32)}, ValueError, "meta shape"),
        ({"x": torch.randn(2, 64, device="meta")}, ValueError, "x on meta"),
    ],
)
def test_launcher_rejects_bad_inputs(kwargs, exc, match):
    values, meta = spf.pack_sparse24(spf.prune_2to4(torch.randn(8, 64)))
    args = {"x": torch.randn(2, 64), "values": values, "meta": meta, "bias": None}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sp.sparse24_matmul(**args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_accepts_values_at_an_odd_element_offset(device, dtype):
    # The GEMM path loads a group's two values as one word; a values view starting at an odd
    # element must still give the right answer (the launcher re-aligns it).
    n, k = 20, 64
    w = spf.prune_2to4(_rand(n, k, dtype=dtype, seed=11))
    values, meta = spf.pack_sparse24(w)
    storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=device)
    shifted = storage[1:].view_as(values)
    shifted.copy_(values)
    assert shifted.data_ptr() % (2 * shifted.element_size()) != 0
    x = _rand(24, k, dtype=dtype, seed=12)
    y = sp.sparse24_matmul(x.to(device), shifted, meta.to(device), config=CONFIGS["gemm_16"])
    ref = sparse24_linear_ref(x, values, meta, dtype=torch.float64)
    assert _rel_err(y.cpu(), ref) <= _tol(dtype, k)


def test_group_selector_lookup_is_the_definition():
    """``_group_columns``: ``prmt(_SEL_TA, _SEL_TB, n * _SEL_M + _SEL_OFF)`` (PTX semantics,
    sign-replicate mode included) gives the selector bytes ``0x54 << 8 p0 | 0x76 << 8 p1`` for
    each of the six position pairs, and the two permutes of ``{pair, 0}`` then place the two
    values in their columns with zeros elsewhere."""
    from .test_dequant import _ptx_prmt

    v0, v1 = 0x8123, 0x7ABC  # sign bits set and clear: a sign-replicated value byte would show
    pair = v0 | v1 << 16
    for p0, p1 in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]:
        n = p0 | p1 << 2
        c = (n * sp._SEL_M.value + sp._SEL_OFF.value) & 0xFFFFFFFF
        sel = _ptx_prmt(sp._SEL_TA.value, sp._SEL_TB.value, c)
        assert sel == (0x54 << 8 * p0) | (0x76 << 8 * p1)
        lo, hi = _ptx_prmt(0, pair, sel), _ptx_prmt(0, pair, sel >> 16)
        dense = [0, 0, 0, 0]
        dense[p0], dense[p1] = v0, v1
        assert [lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16] == dense


def test_swap_ab_route():
    """Two-byte x with a tile of at most ``swap_ab_max_block_m`` rows and 64+ weight rows per
    warpgroup takes ``SWAP_AB``; fp32 x, narrower tiles and taller ones do not. ``EVEN_K`` is set
    exactly when every K step lies inside K."""
    cpu = torch.device("cpu")
    limit = sp.device_table("sparse24", cpu)["swap_ab_max_block_m"]
    half = torch.float16
    assert sp.swap_ab(sp.KernelConfig("gemm", 16, 64, 256), half, cpu)
    assert sp.swap_ab(sp.KernelConfig("gemm", limit, 64, 64), torch.bfloat16, cpu)
    assert not sp.swap_ab(sp.KernelConfig("gemm", 16, 64, 256), torch.float32, cpu)
    assert not sp.swap_ab(sp.KernelConfig("gemm", 16, 32, 64), half, cpu)
    # 64 weight rows per warpgroup: 8 warps need 128
    assert sp.swap_ab(sp.KernelConfig("gemm", 16, 128, 64, num_warps=8), half, cpu)
    assert not sp.swap_ab(sp.KernelConfig("gemm", 16, 64, 64, num_warps=8), half, cpu)
    assert not sp.swap_ab(sp.KernelConfig("gemm", 2 * limit, 64, 64), half, cpu)
    assert not sp.swap_ab(sp.KernelConfig("gemv", 1, 64, 64), half, cpu)
    values, meta = spf.pack_sparse24(spf.prune_2to4(torch.randn(64, 512)).half())
    with launches.capture(run=False) as got:
        sp.sparse24_matmul(torch.randn(3, 512).half(), values, meta)
        sp.sparse24_matmul(torch.randn(3, 500).half(), values, meta)
    assert [(la.kwargs["SWAP_AB"], la.kwargs["EVEN_K"]) for la in got] == [(True, True),
                                                                            (True, False)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 256), (5, 130, 512), (17, 70, 96),
                                           (16, 64, 200)])
def test_swap_ab_tiles_match_float64_reference(device, poison, dtype, m, n, k):
    """The SWAP_AB tile on whole K steps (EVEN_K) and ragged ones, rows past N, several
    sub-tiles per step and split-K: every row and column in its place."""
    w = spf.prune_2to4(_rand(n, k, dtype=dtype, seed=m + n))
    values, meta = (t.to(device) for t in spf.pack_sparse24(w))
    x = _rand(m, k, dtype=dtype, seed=k).to(device)
    bias = _rand(n, dtype=dtype, seed=3).to(device)
    ref = sparse24_linear_ref(x, values, meta, bias, dtype=torch.float64)
    for cfg in (sp.KernelConfig("gemm", 16, 64, 256), sp.KernelConfig("gemm", 64, 128, 64),
                sp.KernelConfig("gemm", 16, 64, 128, split_k=2),
                sp.KernelConfig("gemm", 64, 128, 64, num_warps=8),
                sp.KernelConfig("gemm", 64, 256, 64, num_warps=8)):
        assert sp.swap_ab(cfg, dtype, x.device)
        y = sp.sparse24_matmul(x, values, meta, bias, config=cfg)
        assert _rel_err(y, ref) <= _tol(dtype, k), cfg.name
