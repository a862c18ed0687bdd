"""kernels/lowrank.py: the fused low-rank Triton kernel against the float64 reference of the same
factors, its grid planning, configs and errors."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops.kernels import lowrank as lr
from compress_ops.kernels.formats import lowrank as lrf
from compress_ops.reference import lowrank_linear_ref

from .tolerances import rel_err, tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "gpu"
MS = [1, 2, 5, 16, 17, 40] + ([129, 300, 1000] if LARGE else [])
MAX_N, MAX_K = (600, 1100) if LARGE else (90, 150)
RANKS = [1, 3, 16, 17, 32, 64, 100, 128, 256]


def _factors(m: int, n: int, k: int, r: int, dtype: torch.dtype, base: bool, bias: bool,
             seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    u = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    v = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype) if base else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, u, v, w, b


def _tol(dtype: torch.dtype, k: int) -> float:
    # two chained reductions, the intermediate rounded to the activation dtype
    return 2 * tol(dtype, k)


# grid overrides: (n_per_program, split_k); (0, 0) is the launcher's own plan
GRIDS = [(0, 0), (1, 1), (1, 2), (2, 3), (0, 2)]


@given(m=st.sampled_from(MS), n=st.integers(1, MAX_N), k=st.integers(1, MAX_K),
       r=st.sampled_from(RANKS), dtype=st.sampled_from(DTYPES), base=st.booleans(),
       bias=st.booleans(), grid=st.sampled_from(GRIDS), one_pass=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernel_matches_float64_reference(poison, device, m, n, k, r, dtype, base, bias, grid,
                                          one_pass, seed):
    """Both kernels (two-phase: no base weight and M <= two_phase_max_m, unless one_pass)."""
    x, u, v, w, b = (t.to(device) if t is not None else None
                     for t in _factors(m, n, k, r, dtype, base, bias, seed))
    cfg = lr.select_config(m, lrf.padded_rank(r), x.device).replace(
        n_per_program=grid[0], split_k=grid[1], one_pass=one_pass)
    y = lr.lowrank_matmul(x, u, v, w, b, config=cfg)
    ref = lowrank_linear_ref(x, u, v, w, b, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) < _tol(dtype, k)


@pytest.mark.parametrize("per", [1, 2, 3, 1 << 20])
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize(("base", "one_pass"), [(False, False), (False, True), (True, False)])
def test_every_grid_strategy_is_exact(poison, device, per, split, base, one_pass):
    """N tiles per program (recompute per tile .. whole N) and split-K of the one-pass kernel,
    and the two-phase kernel's phase-1 programs and phase-2 N tiles per program: same result
    (M = 20 spans two M tiles of 16)."""
    x, u, v, w, b = (t.to(device) if t is not None else None
                     for t in _factors(20, 150, 130, 24, torch.float32, base, True, 1))
    cfg = lr.LowRankKernelConfig(16, 32, 32, 4, 2, per, split, one_pass)
    y = lr.lowrank_matmul(x, u, v, w, b, config=cfg)
    ref = lowrank_linear_ref(x, u, v, w, b, dtype=torch.float64)
    assert rel_err(y, ref) < _tol(torch.float32, 130)


def test_leading_dims_non_contiguous_and_m_zero(device):
    x, u, v, _, b = (t.to(device) if t is not None else None
                     for t in _factors(12, 40, 70, 5, torch.float32, False, True, 2))
    x3 = x.reshape(3, 4, 70).transpose(0, 1)  # non-contiguous [4, 3, 70]
    y = lr.lowrank_matmul(x3, u.t().contiguous().t(), v, None, b)
    ref = lowrank_linear_ref(x3, u, v, None, b, dtype=torch.float64)
    assert y.shape == (4, 3, 40) and rel_err(y, ref) < 1e-5
    assert lr.lowrank_matmul(x[:0], u, v, None, b).shape == (0, 40)


def _traffic(cfg, m, n, k, r, per, split):
    """The plan's L2 traffic model (elements), written out independently."""
    m_tiles, n_tiles = -(-m // cfg.block_m), -(-n // cfg.block_n)
    return m_tiles * (-(-n_tiles // per) * (r + cfg.block_m) * k + split * n * r)


@pytest.mark.parametrize(("m", "r"), [(1, 32), (16, 128), (64, 256)])
def test_plan_grid_fills_the_gpu_with_the_least_modelled_traffic(m, r):
    cpu = torch.device("cpu")
    cfg = lr.select_one_pass_config(m, lrf.padded_rank(r), cpu)  # plan_grid's kernel
    n = k = 4096
    n_tiles, m_tiles = -(-n // cfg.block_n), -(-m // cfg.block_m)
    per, split = lr.plan_grid(cfg, m, n, k, r, False, cpu, sms=132)
    assert m_tiles * -(-n_tiles // per) * split >= 132
    assert 1 <= split <= 16 and 1 <= per <= n_tiles
    # no other power-of-two grid that fills 132 SMs moves fewer bytes
    k_split_max = min(16, -(-k // cfg.block_k) // 4)
    best = min(_traffic(cfg, m, n, k, r, p, s) for p in [2**i for i in range(7)] + [n_tiles]
               for s in (1, 2, 4, 8, 16) if p <= n_tiles and s <= k_split_max
               and m_tiles * -(-n_tiles // p) * s >= 132)
    assert _traffic(cfg, m, n, k, r, per, split) == best
    # which beats recomputing x @ V^T for every N tile at the same split
    assert per > 1 and best < _traffic(cfg, m, n, k, r, 1, split)


def test_plan_grid_large_m_base_weight_interpreter_and_explicit_settings():
    cpu = torch.device("cpu")
    cfg = lr.LowRankKernelConfig(64, 128, 32)
    # many M tiles: several N tiles per program, about two programs per SM, no split-K
    assert lr.plan_grid(cfg, 8192, 4096, 4096, 64, False, cpu, sms=132) == (128 * 32 // 264, 1)
    # one SM (the interpreter): the least traffic is all of N in one program
    assert lr.plan_grid(cfg, 16, 4096, 4096, 64, False, cpu) == (32, 1)
    # a base weight pins one N tile per program; split-K fills idle SMs at small M
    assert lr.plan_grid(cfg, 8192, 4096, 4096, 64, True, cpu, sms=132) == (1, 1)
    assert lr.plan_grid(cfg, 16, 4096, 4096, 64, True, cpu, sms=132) == (1, 8)
    # explicit settings are kept
    assert lr.plan_grid(cfg.replace(n_per_program=3, split_k=2), 16, 512, 512, 64, False, cpu,
                        sms=132) == (3, 2)


def test_plan_grid_follows_the_simulated_gpu():
    """A CPU call plans for the interpreter (one SM) and, inside ``simulate_gpu``, for that GPU
    (the static model's calls), whatever was cached before: the default SM count is resolved
    before the cache."""
    from compress_ops.kernels import tuning

    cpu = torch.device("cpu")
    cfg = lr.LowRankKernelConfig(16, 64, 128)
    plain = lr.plan_grid(cfg, 16, 4096, 4096, 64, False, cpu)
    with tuning.simulate_gpu("NVIDIA H200", 132):
        simulated = lr.plan_grid(cfg, 16, 4096, 4096, 64, False, cpu)
    assert plain == lr.plan_grid(cfg, 16, 4096, 4096, 64, False, cpu, sms=1)
    assert simulated == lr.plan_grid(cfg, 16, 4096, 4096, 64, False, cpu, sms=132)
    assert simulated != plain


def test_select_config_and_route_tables():
    cpu = torch.device("cpu")
    assert lr.select_config(1, 16, cpu).block_m == 16
    assert lr.select_config(5000, 256, cpu).block_m == 64  # r = 256 tiles stay small
    assert lr.fused_route(1, 32, False, cpu)
    assert not lr.fused_route(1, 257, False, cpu)  # past MAX_RANK: two GEMMs
    assert not lr.fused_route(10**6, 32, False, cpu)
    assert [lrf.padded_rank(r) for r in (1, 16, 17, 100, 256)] == [16, 16, 32, 128, 256]
    assert lrf.lowrank_bytes(4096, 4096, 128, torch.float16) == 128 * 8192 * 2


def test_autotune_space_and_config_validation():
    for m in (1, 16, 64, 256):
        for r in (16, 256):
            cfgs = lr.get_autotune_configs(m, r)
            assert cfgs and len({c.name for c in cfgs}) == len(cfgs)
    with pytest.raises(ValueError, match="block_m"):
        lr.LowRankKernelConfig(8, 64, 64)
    with pytest.raises(ValueError, match="num_warps"):
        lr.LowRankKernelConfig(16, 64, 64, num_warps=3)
    with pytest.raises(ValueError, match="n_per_program"):
        lr.LowRankKernelConfig(16, 64, 64, n_per_program=-1)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(u=torch.randn(12, 5, 1)), ValueError, "u must be 2-D"),
        (lambda a: a.update(v=torch.randn(4, 70)), ValueError, "share a rank"),
        (lambda a: a.update(v=torch.randn(5, 70).half()), TypeError, "v dtype"),
        (lambda a: a.update(x=torch.randn(3, 71)), ValueError, "K=71"),
        (lambda a: a.update(x=torch.randn(3, 70).double()), TypeError, "x must be float16"),
        (lambda a: a.update(weight=torch.randn(12, 69)), ValueError, "weight shape"),
        (lambda a: a.update(weight=torch.randn(12, 70).half()), TypeError, "weight dtype"),
        (lambda a: a.update(bias=torch.randn(13)), ValueError, "bias shape"),
        (lambda a: a.update(u=[[1.0]]), TypeError, "u must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_named_errors(mutate, exc, match):
    args = {"x": torch.randn(3, 70), "u": torch.randn(12, 5), "v": torch.randn(5, 70),
            "weight": None, "bias": torch.randn(12)}
    mutate(args)
    with pytest.raises(exc, match=match):
        lrf.check_inputs(*args.values())


def test_launcher_refuses_ranks_past_its_limit():
    x, u, v, _, _ = _factors(2, 8, 16, lrf.MAX_RANK + 1, torch.float32, False, False, 0)
    with pytest.raises(ValueError, match="MAX_RANK"):
        lr.lowrank_matmul(x, u, v)


def _two_phase_kernel_runs(x, u, v, b, cfg):
    from compress_ops.kernels import launches

    with launches.capture() as got:
        y = lr.lowrank_matmul(x, u, v, None, b, config=cfg)
    return y, [la.kernel if isinstance(la.kernel, str) else la.kernel.__name__ for la in got]


@pytest.mark.parametrize(("m", "split", "per"), [(1, 0, 0), (16, 3, 2), (40, 2, 1)])
def test_two_phase_is_one_launch_and_leaves_its_workspace_zeroed(poison, device, m, split, per):
    """No memset, no cast: one launch; the last phase-2 program zeroes ``t`` and the
    counters, so a second call (and a call of another shape) is exact too."""
    x, u, v, _, b = (t.to(device) if t is not None else None
                     for t in _factors(m, 100, 300, 40, torch.float16, False, True, 3))
    cfg = lr.select_config(m, lrf.padded_rank(40), x.device).replace(split_k=split,
                                                                      n_per_program=per)
    ref = lowrank_linear_ref(x, u, v, None, b, dtype=torch.float64)
    for _ in range(2):
        y, kinds = _two_phase_kernel_runs(x, u, v, b, cfg)
        assert kinds == ["_lowrank_two_phase_kernel"]
        assert rel_err(y, ref) < _tol(torch.float16, 300)
        t, sync = lr._WORKSPACE[(x.device, 0)]
        assert not t.any() and not sync.any()
    x2, u2, v2, _, _ = (t.to(device) if t is not None else None
                        for t in _factors(3, 20, 50, 7, torch.float16, False, False, 4))
    y2 = lr.lowrank_matmul(x2, u2, v2)
    assert rel_err(y2, lowrank_linear_ref(x2, u2, v2, None, None, dtype=torch.float64)) < _tol(
        torch.float16, 50)


def test_two_phase_route_and_configs():
    cpu = torch.device("cpu")
    cfg = lr.select_config(16, 128, cpu)
    assert lr.two_phase_route(16, False, cfg, cpu)
    assert lr.two_phase_route(64, False, cfg, cpu) and not lr.two_phase_route(65, False, cfg, cpu)
    assert not lr.two_phase_route(16, True, cfg, cpu)  # a base weight: the one-pass kernel
    assert not lr.two_phase_route(16, False, cfg.replace(one_pass=True), cpu)
    assert cfg.replace(one_pass=True).name.endswith("op")
    # a base weight at small M takes the one-pass table's tile
    assert lr.select_one_pass_config(16, 128, cpu) == lr.LowRankKernelConfig(16, 64, 64, 4, 3)


def _workspace_bytes(m, r_pad, splits, groups):
    return (splits + groups + 1) * m * r_pad * 4  # adds, reads and the last one's zeroing


@pytest.mark.parametrize(("m", "r"), [(1, 64), (16, 128), (64, 128), (64, 256)])
def test_plan_two_phase_covers_k_and_n_and_bounds_the_workspace_traffic(m, r):
    cpu = torch.device("cpu")
    cfg = lr.select_config(m, lrf.padded_rank(r), cpu)
    n = k = 8192
    splits, tps, groups, per = lr.plan_two_phase(cfg, m, n, k, r, 2, cpu, sms=132)
    k_tiles, n_tiles = -(-k // cfg.block_k), -(-n // cfg.block_n)
    # every K tile in exactly one split, every N tile in exactly one group
    assert (splits - 1) * tps < k_tiles <= splits * tps
    assert (groups - 1) * per < n_tiles <= groups * per
    # at most two programs per SM, phase 1 has about K / (N + K) of them
    assert splits + groups <= 2 * 132 and splits <= 66
    # the fp32 workspace's L2 traffic stays within the factors' bytes (the default table's
    # two_phase_workspace_over_factors)
    assert _workspace_bytes(m, lrf.padded_rank(r), splits, groups) <= r * (n + k) * 2
    # explicit settings are kept; one SM (the interpreter) plans one program per phase
    assert lr.plan_two_phase(cfg.replace(split_k=5, n_per_program=3), m, n, k, r, 2, cpu,
                             sms=132)[::2] == (5, -(-n_tiles // 3))
    assert lr.plan_two_phase(cfg, m, 100, 300, r, 2, cpu)[::2] == (1, 1)


def _never_zero(shape, g: torch.Generator, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Random magnitudes in [0.5, 1.5) with random signs, times ``scale``: no element is zero,
    so a dropped or misplaced term cannot hide behind one."""
    mag = torch.rand(shape, generator=g) + 0.5
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (mag * sign * scale).to(dtype)


def _two_phase_tables():
    """Every shipped two-phase tile: (table, rank class, M bucket, config)."""
    from compress_ops.kernels.tuning import load_tables

    return [(name, rc, b, c) for name, t in load_tables("lowrank").items()
            for rc, buckets in t["two_phase"].items() for b, c in buckets.items()]


@pytest.mark.parametrize(("table", "rclass", "bucket", "c"), _two_phase_tables(),
                         ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("per", "bias", "full_m"),
                         [(1, True, True), (1, False, False), (2, True, False)])
def test_two_phase_shipped_tiles_match_float64_reference(poison, device, table, rclass, bucket,
                                                         c, dtype, per, bias, full_m):
    """Each shipped two-phase tile (the GPU tables' too) under the interpreter: one N tile per
    phase-2 program (the plan on a large GPU: U, bias and addresses before the wait, then
    ``y^T = U t^T``) and two (the general path), three phase-1 programs, ragged M, N, K and r
    (N and K past one tile and not multiples of it; r not a power of two), M a whole tile
    (``EVEN_M``: t read without a mask) or not, never-zero data; the workspace and counters
    are left zeroed."""
    cfg = lr.LowRankKernelConfig(**c).replace(n_per_program=per, split_k=3)
    r = int(rclass) * 3 // 4 + 1  # pads to the class
    m = cfg.block_m if full_m else max(1, min(int(bucket), cfg.block_m) - 3)  # one M tile
    n, k = cfg.block_n + 37, 2 * cfg.block_k + 29
    g = torch.Generator().manual_seed(int(rclass) + int(bucket) + per)
    x = _never_zero((m, k), g, 1.0, dtype).to(device)
    u = _never_zero((n, r), g, r**-0.5, dtype).to(device)
    v = _never_zero((r, k), g, k**-0.5, dtype).to(device)
    b = _never_zero((n,), g, 1.0, dtype).to(device) if bias else None
    y, kinds = _two_phase_kernel_runs(x, u, v, b, cfg)
    assert kinds == ["_lowrank_two_phase_kernel"]
    ref = lowrank_linear_ref(x, u, v, None, b, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) < _tol(dtype, k)
    t, sync = lr._WORKSPACE[(x.device, 0)]
    assert not t.any() and not sync.any()


def test_two_phase_reads_padded_workspace_rows_as_zero(poison, device):
    """Phase 2 reads and zeroes t's whole BLOCK_M x BLOCK_R tile without masks: rows past M
    and columns past r must stay zero from call to call, whatever the previous call's M, r
    and tile (a wider call first, then narrower ones that read its rows and columns)."""
    cfgs = [lr.LowRankKernelConfig(64, 64, 64, 4, 2, 1, 2), lr.LowRankKernelConfig(16, 32, 32)]
    for i, (m, r, cfg) in enumerate([(60, 120, cfgs[0]), (3, 5, cfgs[0]), (2, 17, cfgs[1]),
                                     (16, 128, cfgs[1])]):
        g = torch.Generator().manual_seed(10 + i)
        n, k = 70, 90
        x = _never_zero((m, k), g, 1.0, torch.float32).to(device)
        u = _never_zero((n, r), g, r**-0.5, torch.float32).to(device)
        v = _never_zero((r, k), g, k**-0.5, torch.float32).to(device)
        b = _never_zero((n,), g, 1.0, torch.float32).to(device)
        y = lr.lowrank_matmul(x, u, v, None, b, config=cfg)
        assert rel_err(y, lowrank_linear_ref(x, u, v, None, b, dtype=torch.float64)) < _tol(
            torch.float32, k)
        t, sync = lr._WORKSPACE[(x.device, 0)]
        assert not t.any() and not sync.any()


@pytest.mark.parametrize("r", [64, 128])
def test_h200_plan_meets_the_l2_target_with_one_n_tile_per_program(r):
    """On the H200 (its own table) the M = 64 plan keeps the workspace's L2 traffic (every
    phase-1 add, every phase-2 read, the zeroing) within half the factors' bytes (the
    budgets' l2_over_factors <= 1.5) and one N tile per phase-2 program (no U load after the
    wait); M <= 16 plans are unchanged by the budget. The config is the one a call gets
    (the table is per GPU, its cache per target)."""
    from compress_ops.kernels import tuning

    cpu = torch.device("cpu")
    n = k = 8192
    plain = lr.select_config(64, r, cpu)  # the interpreter's (default) tile, cached first
    with tuning.simulate_gpu("NVIDIA H200", 132):
        for m in (1, 16, 40, 64):
            cfg = lr.select_config(m, r, cpu)
            splits, tps, groups, per = lr.plan_two_phase(cfg, m, n, k, r, 2, cpu)
            assert per == 1
            assert (splits + groups + 1) * m * r * 4 <= 0.5 * r * (n + k) * 2
            k_tiles = -(-k // cfg.block_k)
            assert (splits - 1) * tps < k_tiles <= splits * tps
        h200 = lr.select_config(64, r, cpu)
        assert lr.plan_two_phase(h200, 64, n, k, r, 2, cpu) == (
            (16, 1, 32, 1) if r == 64 else (22, 3, 32, 1))
        assert lr.plan_two_phase(lr.select_config(16, r, cpu), 16, n, k, r, 2, cpu) == (
            64, 1, 128, 1)
    assert h200 != plain and lr.select_config(64, r, cpu) == plain
