"""NaN and +-Inf propagate through every Triton kernel as through the dense float64 reference.

Issue 13: a kernel may not hide a non-finite value. Every family's launcher gets NaN, +Inf and
-Inf in ``x`` (and NaN in a float weight, scale or bias), on each of its paths (GEMV, split-K,
GEMM), and is compared with the float64 reference of the same compressed weights:

* where the reference is NaN, the kernel gives NaN;
* the kernel is finite exactly where the reference is;
* an infinite output has the reference's sign, and the finite outputs are within the usual
  tolerance.

Where the reference is +-Inf the kernel may give NaN: the 2:4 GEMV turns a row of ``x`` that
holds a non-finite value into NaN rather than gathering every pruned column; the affine GEMV's
``s * sum(x q) - s z * sum(x)`` turns Inf into Inf - Inf; a padded rank adds ``Inf * 0``.
"""

from __future__ import annotations

import pytest
import torch

from compress_ops.kernels import dequant as dq
from compress_ops.kernels import dwsep_conv as dc
from compress_ops.kernels import lowrank as lr
from compress_ops.kernels import sparse24 as sp
from compress_ops.kernels.formats import dequant as dqf
from compress_ops.kernels.formats import dwsep_conv as dcf
from compress_ops.kernels.formats import sparse24 as spf
from compress_ops.kernels.tuning import KernelConfig
from compress_ops.reference import (
    codebook_linear_ref,
    dequant_linear_ref,
    dwsep_conv2d_ref,
    lowrank_linear_ref,
    sparse24_linear_ref,
)

from .tolerances import rel_err, tol

# the interpreter computes with numpy, which warns on every Inf - Inf and 0 * Inf
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
K = 70  # ragged: every format pads it (2:4 and the b-bit fields to 96)
N = 24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Fresh random float32 data with no exact zeros."""
    return (torch.randn(*shape, generator=_gen(seed)) + 0.1) * scale


def _x(m: int, value: str | None, cols: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``x[m, K]`` with non-finite entries. ``value`` given (M = 1): it at ``cols[0]``. Else:
    row 0 NaN at ``cols[0]``, row 1 finite, row 2 +Inf at ``cols[0]``, row 3 -Inf at
    ``cols[1]``, row 4 NaN at ``cols[2]``, row 5 +Inf and -Inf; the rows past 5 finite."""
    x = _rand(m, K, seed=seed)
    if value is not None:
        x[0, cols[0]] = VALUES[value]
        return x
    spots = [(0, cols[0], NAN), (2, cols[0], INF), (3, cols[1], -INF), (4, cols[2], NAN),
             (5, cols[1], INF), (5, cols[2], -INF)]
    for row, col, v in spots:
        if row < m:
            x[row, col] = v
    return x


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int, *,
           nonfinite: bool = True) -> None:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    assert y.shape == ref.shape
    fin = torch.isfinite(ref)
    if nonfinite:
        assert not fin.all(), "the case must make some reference outputs non-finite"
    hidden = torch.isnan(ref) & ~torch.isnan(y)
    assert not hidden.any(), (f"{int(hidden.sum())} outputs are not NaN where the reference "
                              f"is, first at {hidden.nonzero()[0].tolist()}")
    assert torch.equal(torch.isfinite(y), fin), (
        f"finite where the reference is not: {int((torch.isfinite(y) & ~fin).sum())}; "
        f"non-finite where it is finite: {int((~torch.isfinite(y) & fin).sum())}")
    inf = torch.isinf(y)
    assert torch.equal(y[inf], ref[inf]), "an infinite output with the wrong sign"
    if fin.any():
        assert rel_err(y[fin], ref[fin]) <= tol(dtype, k)


def _cases(configs: dict) -> list:
    """(config name, value): each value alone on the M = 1 configs, all of them (in different
    rows) on the others."""
    return [(c, v) for c, (m, _) in sorted(configs.items())
            for v in (sorted(VALUES) if m == 1 else [None])]


# --------------------------------------------------------------------------------------------
# 2:4 sparse: GEMV (M <= 4) and GEMM (M > 4, split-K) paths
# --------------------------------------------------------------------------------------------

DEAD = 5  # a column pruned in every row of the weight
SP_CONFIGS = {  # name: (M, config); None: the tuned default for that M
    "gemv_m1": (1, sp.KernelConfig("gemv", 1, 16, 64)),
    "gemv_m4": (4, sp.KernelConfig("gemv", 4, 8, 128)),
    "default_gemv": (4, None),
    "gemm_16": (6, sp.KernelConfig("gemm", 16, 32, 64)),
    "gemm_32_splitk": (6, sp.KernelConfig("gemm", 32, 64, 32, split_k=4)),
    "default_gemm": (7, None),
}


def _sparse24(dtype: torch.dtype, seed: int):
    w = _rand(N, K, seed=seed)
    w[:, DEAD] = 0.0  # the smallest of its group: pruned in every row
    values, meta = spf.pack_sparse24(spf.prune_2to4(w).to(dtype))
    dense = spf.unpack_sparse24(values, meta, K)
    assert (dense[:, DEAD] == 0).all() and (dense[:, 10] != 0).any()
    return values, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("cfg", "value"), _cases(SP_CONFIGS))
def test_sparse24_propagates_nonfinite_x(device, poison, cfg, value, dtype):
    m, config = SP_CONFIGS[cfg]
    assert (sp.select_config(m, N, K, torch.device(device)).path == "gemv") == (m <= 4)
    values, meta = (t.to(device) for t in _sparse24(dtype, 1))
    # DEAD: pruned in every row (the GEMV used to skip it); 10: kept in some; the last column
    x = _x(m, value, (DEAD, 10, K - 1), seed=2).to(dtype).to(device)
    bias = _rand(N, seed=3).to(dtype).to(device)
    y = sp.sparse24_matmul(x, values, meta, bias, config=config)
    ref = sparse24_linear_ref(x, values, meta, bias, dtype=torch.float64)
    assert torch.isnan(ref[0]).all()  # 0 * x[0, DEAD] in every row
    _check(y, ref, dtype, K)


@pytest.mark.parametrize("where", ["values", "bias"])
@pytest.mark.parametrize("cfg", ["gemv_m4", "gemm_16", "gemm_32_splitk"])
def test_sparse24_propagates_nan_weight(device, poison, cfg, where):
    m, config = SP_CONFIGS[cfg]
    values, meta = _sparse24(torch.float32, 4)
    bias = _rand(N, seed=5)
    (values[7] if where == "values" else bias)[12] = NAN
    x = _rand(m, K, seed=6)
    y = sp.sparse24_matmul(x.to(device), values.to(device), meta.to(device), bias.to(device),
                           config=config)
    ref = sparse24_linear_ref(x, values, meta, bias, dtype=torch.float64)
    _check(y, ref, torch.float32, K)


# --------------------------------------------------------------------------------------------
# Low-bit weights: affine int8 / int4 / int3 / int2 and codebooks, GEMV and GEMM paths
# --------------------------------------------------------------------------------------------

DQ_CONFIGS = {
    "gemv_m1": (1, KernelConfig("gemv", 1, 16, 64)),
    "gemv_m4_splitk": (4, KernelConfig("gemv", 4, 32, 128, split_k=2)),
    "gemm_16": (6, KernelConfig("gemm", 16, 32, 64)),
    "gemm_32_splitk": (6, KernelConfig("gemm", 32, 16, 32, split_k=4)),
}
DQ_COLS = (3, 40, K - 1)


def _affine(bits: int, sym: bool, group: int | None, dtype: torch.dtype, seed: int):
    g = _gen(seed)
    gs = dqf.effective_group_size(K, group)
    kp = dqf.padded_k(K, gs)
    q = torch.randint(0, 2**bits, (N, kp), generator=g)
    scales = ((torch.rand(N, kp // gs, generator=g) + 0.5) / 2**bits).to(dtype)
    zeros = None if sym else (torch.rand(N, kp // gs, generator=g) * (2**bits - 1)).to(dtype)
    return dqf.pack_bits(q, bits), scales, zeros, gs


@pytest.mark.parametrize(("cfg", "value"), _cases(DQ_CONFIGS))
@pytest.mark.parametrize(("bits", "sym", "group", "dtype"),
                         [(8, True, None, torch.float16), (4, False, 32, torch.float16),
                          (4, False, 32, torch.float32), (3, False, None, torch.float16),
                          (2, False, 32, torch.float16)])
def test_dequant_propagates_nonfinite_x(device, poison, bits, sym, group, dtype, cfg, value):
    m, config = DQ_CONFIGS[cfg]
    qw, s, z, gs = _affine(bits, sym, group, dtype, 8)
    qw, s = qw.to(device), s.to(device)
    z = z.to(device) if z is not None else None
    x = _x(m, value, DQ_COLS, seed=7).to(dtype).to(device)
    y = dq.dequant_matmul(x, qw, s, z, None, bits, gs, config=config)
    ref = dequant_linear_ref(x, qw, s, z, None, bits, gs, dtype=torch.float64)
    _check(y, ref, dtype, K)


@pytest.mark.parametrize("where", ["scales", "zeros", "bias"])
@pytest.mark.parametrize("cfg", sorted(DQ_CONFIGS))
def test_dequant_propagates_nan_scale_zero_bias(device, poison, cfg, where):
    m, config = DQ_CONFIGS[cfg]
    qw, s, z, gs = _affine(4, False, 32, torch.float32, 9)
    b = _rand(N, seed=10)
    if where == "scales":
        s[3, 1] = NAN
    elif where == "zeros":
        z[5, 2] = NAN  # the last group: 6 real columns, 26 padded
    else:
        b[8] = NAN
    x = _rand(m, K, seed=11)
    args = (qw, s, z, b, 4, gs)
    y = dq.dequant_matmul(x.to(device), *(a.to(device) if isinstance(a, torch.Tensor) else a
                                          for a in args), config=config)
    ref = dequant_linear_ref(x, *args, dtype=torch.float64)
    _check(y, ref, torch.float32, K)


def _codebook(bits: int, dtype: torch.dtype, seed: int, pad_index: int | None = None):
    """Indices and a two-row-group codebook; ``pad_index``: the index of every padded column
    (past K), used by no real column."""
    g = _gen(seed)
    kp = dqf.padded_k(K, None)
    q = torch.randint(0, 2**bits - (pad_index is not None), (N, kp), generator=g)
    if pad_index is not None:
        q[q >= pad_index] += 1
        q[:, K:] = pad_index
    cb = torch.randn(2, 2**bits, generator=g).to(dtype)
    return dqf.pack_bits(q, bits), cb


@pytest.mark.parametrize(("cfg", "value"), _cases(DQ_CONFIGS))
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_codebook_propagates_nonfinite_x(device, poison, bits, cfg, value):
    m, config = DQ_CONFIGS[cfg]
    idx, cb = (t.to(device) for t in _codebook(bits, torch.float16, 12))
    x = _x(m, value, DQ_COLS, seed=7).to(torch.float16).to(device)
    y = dq.codebook_matmul(x, idx, cb, None, bits, config=config)
    ref = codebook_linear_ref(x, idx, cb, None, bits, dtype=torch.float64)
    _check(y, ref, torch.float16, K)


@pytest.mark.parametrize("cfg", sorted(DQ_CONFIGS))
def test_codebook_nan_entry(device, poison, cfg):
    """A NaN entry makes NaN where a real column uses it, and nothing where only the padded
    columns (past K: multiplied by no activation) point at it."""
    m, config = DQ_CONFIGS[cfg]
    idx, cb = _codebook(4, torch.float32, 13, pad_index=6)
    cb[:, 6] = NAN  # the padded columns' entry
    x = _rand(m, K, seed=14)
    y = dq.codebook_matmul(x.to(device), idx.to(device), cb.to(device), None, 4, config=config)
    ref = codebook_linear_ref(x, idx, cb, None, 4, dtype=torch.float64)
    _check(y, ref, torch.float32, K, nonfinite=False)
    cb[1, 9] = NAN  # an entry row group 1 (rows 12..23) uses
    y = dq.codebook_matmul(x.to(device), idx.to(device), cb.to(device), None, 4, config=config)
    ref = codebook_linear_ref(x, idx, cb, None, 4, dtype=torch.float64)
    assert torch.isnan(ref[:, N // 2:]).all() and torch.isfinite(ref[:, :N // 2]).all()
    _check(y, ref, torch.float32, K)


# --------------------------------------------------------------------------------------------
# Low rank: with and without a base weight, padded and unpadded rank, split-K
# --------------------------------------------------------------------------------------------

# (n_per_program, split_k): the launcher's plan, one N tile per program, split-K
LR_GRIDS = {"plan": (0, 0), "per_tile": (1, 1), "splitk": (2, 3)}


def _lowrank(r: int, dtype: torch.dtype, base: bool, seed: int):
    u = _rand(N, r, seed=seed, scale=r**-0.5).to(dtype)
    v = _rand(r, K, seed=seed + 1, scale=K**-0.5).to(dtype)
    w = _rand(N, K, seed=seed + 2, scale=K**-0.5).to(dtype) if base else None
    b = _rand(N, seed=seed + 3).to(dtype)
    return u, v, w, b


def _lr_config(grid: str) -> lr.LowRankKernelConfig:
    # 16-wide tiles: N = 24 is two N tiles, K = 70 three K tiles
    return lr.LowRankKernelConfig(16, 16, 32, 4, 2, *LR_GRIDS[grid])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid", sorted(LR_GRIDS))
@pytest.mark.parametrize(("m", "r", "base", "value"),
                         [(1, 5, False, v) for v in sorted(VALUES)]
                         + [(6, 16, False, None), (6, 5, True, None)])
def test_lowrank_propagates_nonfinite_x(device, poison, m, r, base, value, grid, dtype):
    u, v, w, b = (t.to(device) if t is not None else None for t in _lowrank(r, dtype, base, 15))
    x = _x(m, value, (3, 40, K - 1), seed=19).to(dtype).to(device)
    y = lr.lowrank_matmul(x, u, v, w, b, config=_lr_config(grid))
    ref = lowrank_linear_ref(x, u, v, w, b, dtype=torch.float64)
    _check(y, ref, dtype, K)


@pytest.mark.parametrize("where", ["u", "v", "base", "bias"])
@pytest.mark.parametrize("grid", sorted(LR_GRIDS))
def test_lowrank_propagates_nan_weight(device, poison, grid, where):
    u, v, w, b = _lowrank(5, torch.float32, where == "base", 20)
    {"u": u, "v": v, "base": w, "bias": b}[where].view(-1)[4] = NAN
    x = _rand(5, K, seed=24)
    y = lr.lowrank_matmul(x.to(device), u.to(device), v.to(device),
                          w.to(device) if w is not None else None, b.to(device),
                          config=_lr_config(grid))
    ref = lowrank_linear_ref(x, u, v, w, b, dtype=torch.float64)
    _check(y, ref, torch.float32, K)


# --------------------------------------------------------------------------------------------
# Fused dw + pw conv: every activation in both places, the residual, every weight and bias
# --------------------------------------------------------------------------------------------

B, C, H, W, COUT = 2, 6, 8, 8, 5
DW_CONFIG = {"block_p": 32, "block_c": 16, "block_co": 16, "num_warps": 4, "num_stages": 1}
NAMES = ["x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "residual"]


def _dwsep(seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(B, C, H, W, generator=g), torch.randn(C, 3, 3, generator=g) / 3,
            torch.randn(C, generator=g), torch.randn(COUT, C, generator=g) / C**0.5,
            torch.randn(COUT, generator=g), torch.randn(B, COUT, H, W, generator=g)]


def _run_dwsep(args, act1, act2, device, dtype, residual=True):
    args = [t.to(dtype).to(device) for t in args]
    if not residual:
        args[-1] = None
    pad = (1, 1, 1, 1)
    y = dc.dwsep_conv2d(*args, 1, pad, act1, act2, config=DW_CONFIG)
    ref = dwsep_conv2d_ref(*args, 1, list(pad), act1, act2, dtype=torch.float64)
    _check(y, ref, dtype, C * 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("act1", "act2"),
                         [(a, "none") for a in dcf.ACTIVATIONS]
                         + [("none", a) for a in dcf.ACTIVATIONS if a != "none"])
def test_dwsep_propagates_nonfinite_x(device, poison, act1, act2, dtype):
    x, *rest = _dwsep(25)
    # 3x3 neighbourhoods that do not overlap: inside, on the border (padding taps), the last
    # channel; relu / relu6 / hardswish map +-Inf to 0, 6, NaN or Inf, and NaN to NaN
    x[0, 1, 2, 2], x[0, 3, 6, 6], x[1, 0, 0, 0], x[1, C - 1, 7, 4] = NAN, INF, -INF, INF
    x[1, 2, 4, 1] = -INF
    _run_dwsep([x, *rest], act1, act2, device, dtype, residual=act2 != "none")


@pytest.mark.parametrize("where", NAMES[1:])
@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish"])
def test_dwsep_propagates_nan_weight(device, poison, act, where):
    args = _dwsep(26)
    args[NAMES.index(where)].view(-1)[3] = NAN
    _run_dwsep(args, act, act, device, torch.float32)
