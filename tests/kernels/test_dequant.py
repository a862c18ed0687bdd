"""kernels/dequant.py and compress_ops/quantize.py: b-bit formats, quantization error, k-means,
and the Triton kernels against the float64 reference on the same packed weights."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops import quantize as qz
from compress_ops.kernels import dequant as dq
from compress_ops.kernels.formats import dequant as dqf
from compress_ops.kernels.tuning import KernelConfig
from compress_ops.reference import codebook_linear_ref, dequant_linear_ref

from .tolerances import rel_err as _rel_err
from .tolerances import tol as _tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "gpu"
MS = [1, 2, 3, 4, 5, 16, 17, 40] + ([129, 300, 1000] if LARGE else [])
MAX_N, MAX_K = (600, 1100) if LARGE else (72, 200)
GROUPS = [32, 64, 128, None]




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _affine(n: int, k: int, bits: int, group: int | None, sym: bool, dtype: torch.dtype,
            seed: int):
    """A random packed affine weight (random fields, scales and fractional zero points)."""
    g = _gen(seed)
    gs = dqf.effective_group_size(k, group)
    kp = dqf.padded_k(k, gs)
    q = torch.randint(0, 2**bits, (n, kp), generator=g)
    scales = ((torch.rand(n, kp // gs, generator=g) + 0.5) / 2**bits).to(dtype)
    zeros = None if sym else (torch.rand(n, kp // gs, generator=g) * (2**bits - 1)).to(dtype)
    return dqf.pack_bits(q, bits), scales, zeros, gs


def _codebook(n: int, k: int, bits: int, groups: int, dtype: torch.dtype, seed: int):
    g = _gen(seed)
    q = torch.randint(0, 2**bits, (n, dqf.padded_k(k, None)), generator=g)
    cb = torch.randn(groups, 2**bits, generator=g).to(dtype)
    return dqf.pack_bits(q, bits), cb


# --------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------


@given(n=st.integers(1, 9), blocks=st.integers(1, 5), bits=st.sampled_from(dqf.BITS),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, blocks, bits, seed):
    q = torch.randint(0, 2**bits, (n, 32 * blocks), generator=_gen(seed))
    packed = dqf.pack_bits(q, bits)
    assert packed.shape == (n, blocks * bits) and packed.dtype == torch.int32
    assert torch.equal(dqf.unpack_bits(packed, bits), q.to(torch.int32))
    k = 32 * blocks - 5
    assert torch.equal(dqf.unpack_bits(packed, bits, k), q[:, :k].to(torch.int32))


def test_bit_layout_is_the_documented_layout():
    q = torch.arange(32).reshape(1, 32) % 16
    w4 = dqf.pack_bits(q, 4)
    # column c -> word c // 8, bits 4 (c % 8): word 0 = 0x76543210
    assert w4[0, 0].item() == 0x76543210
    q8 = torch.arange(32).reshape(1, 32) + 200
    assert torch.equal(dqf.pack_bits(q8, 8).view(torch.uint8)[0], q8[0].to(torch.uint8))
    q3 = torch.zeros(1, 32, dtype=torch.int64)
    q3[0, 5] = 0b101
    q3[0, 31] = 0b010
    w3 = dqf.pack_bits(q3, 3)[0].tolist()  # planes: bit p of column i at word p, bit i
    assert w3 == [1 << 5, -(2**31), 1 << 5]


def test_pack_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        dqf.pack_bits(torch.full((2, 32), 16), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        dqf.pack_bits(torch.zeros(2, 40, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        dqf.pack_bits(torch.zeros(2, 32, dtype=torch.int64), 5)


def test_group_size_padding_rules():
    assert dqf.effective_group_size(100, None) == 128 and dqf.padded_k(100, None) == 128
    assert dqf.effective_group_size(100, 128) == 128  # one group: the padded row
    assert dqf.effective_group_size(300, 128) == 128 and dqf.padded_k(300, 128) == 384
    assert dqf.effective_group_size(70, 32) == 32 and dqf.padded_k(70, 32) == 96
    with pytest.raises(ValueError, match="group_size must be one of"):
        dqf.effective_group_size(300, 48)
    # int4 g128 with fp16 scales and zeros: <= 0.27 of fp16
    assert dqf.affine_bytes(4096, 4096, 4, 128, torch.float16) <= 0.27 * 4096 * 4096 * 2


# --------------------------------------------------------------------------------------------
# Quantization and k-means
# --------------------------------------------------------------------------------------------


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


def _sq_err(w: torch.Tensor, a: qz.AffineWeight) -> float:
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, a.bits, a.group_size, w.shape[1],
                          dtype=torch.float64)
    return float(((w.double() - w_hat) ** 2).sum())


@pytest.mark.parametrize(("bits", "group", "min_db"),
                         [(8, 128, 40.0), (4, 128, 20.0), (4, 32, 22.0), (2, 32, 9.5)])
def test_sqnr_on_gaussian_weights(bits, group, min_db):
    w = torch.randn(256, 1024, generator=_gen(1))
    a = qz.quantize_affine(w, bits, group)
    w_hat = dqf.dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, 1024)
    assert qz.sqnr_db(w, w_hat) >= min_db


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


def test_codebook_encoding_uses_the_nearest_entry():
    w = torch.randn(8, 64, generator=_gen(4))
    cb = qz.fit_codebook([w], 3, row_groups=2)
    enc = qz.encode_codebook(w, cb, 3)
    w_hat = dqf.codebook_weight(enc.indices, enc.codebook, 3, 64)
    rows = torch.arange(8) // 4
    dist = (w[:, :, None] - cb[rows][:, None, :]).abs()
    assert torch.allclose((w - w_hat).abs(), dist.min(-1).values)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        qz.quantize_affine(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="bits"):
        qz.quantize_affine(torch.randn(2, 8), 5)
    with pytest.raises(ValueError, match="row_groups"):
        qz.fit_codebook([torch.randn(6, 8)], 2, row_groups=4)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "gemv_m1": KernelConfig("gemv", 1, 16, 64),
    "gemv_m4_splitk": KernelConfig("gemv", 4, 32, 128, split_k=2),
    "gemm_16": KernelConfig("gemm", 16, 32, 64),
    "gemm_32_splitk": KernelConfig("gemm", 32, 16, 32, split_k=4),
    "gemm_64": KernelConfig("gemm", 64, 32, 64, group_m=2),
}


@given(m=st.sampled_from(MS), n=st.integers(1, MAX_N), k=st.integers(1, MAX_K),
       bits=st.sampled_from(dqf.BITS), group=st.sampled_from(GROUPS), sym=st.booleans(),
       dtype=st.sampled_from(DTYPES), cfg=st.sampled_from([None, *CONFIGS]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dequant_kernel_matches_float64_reference(poison, device, m, n, k, bits, group, sym,
                                                  dtype, cfg, bias, seed):
    qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in _affine(n, k, bits, group, sym, dtype, seed))
    x = (torch.randn(m, k, generator=_gen(seed + 1)) + 0.1).to(dtype).to(device)
    b = torch.randn(n, generator=_gen(seed + 2)).to(dtype).to(device) if bias else None
    y = dq.dequant_matmul(x, qw, s, z, b, bits, gs,
                          config=CONFIGS[cfg] if cfg else None)
    ref = dequant_linear_ref(x, qw, s, z, b, bits, gs, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, ref) < _tol(dtype, k)


@given(m=st.sampled_from(MS), n_groups=st.integers(1, 12), rows=st.sampled_from([1, 3, 8]),
       k=st.integers(1, MAX_K), bits=st.sampled_from(dqf.BITS), groups=st.sampled_from([1, 2]),
       dtype=st.sampled_from(DTYPES), cfg=st.sampled_from([None, *CONFIGS]),
       seed=st.integers(0, 2**16))
def test_codebook_kernel_matches_float64_reference(poison, device, m, n_groups, rows, k, bits,
                                                   groups, dtype, cfg, seed):
    n = n_groups * rows * groups
    idx, cb = (t.to(device) for t in _codebook(n, k, bits, groups, dtype, seed))
    x = (torch.randn(m, k, generator=_gen(seed + 1)) + 0.1).to(dtype).to(device)
    y = dq.codebook_matmul(x, idx, cb, None, bits, config=CONFIGS[cfg] if cfg else None)
    ref = codebook_linear_ref(x, idx, cb, None, bits, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, ref) < _tol(dtype, k)


def test_kernel_leading_dims_noncontiguous_and_empty(device):
    qw, s, z, gs = _affine(24, 96, 4, 32, False, torch.float32, 0)
    qw, s, z = qw.to(device), s.to(device), z.to(device)
    x = torch.randn(3, 96, 5, device=device).transpose(1, 2)  # [3, 5, 96], non-contiguous
    y = dq.dequant_matmul(x, qw, s, z, None, 4, gs)
    ref = dequant_linear_ref(x, qw, s, z, None, 4, gs, dtype=torch.float64)
    assert y.shape == (3, 5, 24) and _rel_err(y, ref) < 1e-5
    assert dq.dequant_matmul(x[:, :0], qw, s, z, None, 4, gs).shape == (3, 0, 24)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(bits=5), ValueError, "bits must be one of"),
        (lambda a: a.update(group_size=48), ValueError, "group_size must be one of"),
        (lambda a: a.update(scales=a["scales"][:, :2]), ValueError, "scales shape"),
        (lambda a: a.update(zeros=a["zeros"][:5]), ValueError, "zeros shape"),
        (lambda a: a.update(zeros=a["zeros"].half()), TypeError, "zeros dtype"),
        (lambda a: a.update(x=torch.randn(2, 61)), ValueError, "K=61"),
        (lambda a: a.update(x=torch.randn(2, 97)), ValueError, "K=97"),
        (lambda a: a.update(x=a["x"].half()), TypeError, "scales dtype"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must be float16"),
        (lambda a: a.update(qweight=a["qweight"].float()), TypeError, "qweight must be"),
        (lambda a: a.update(qweight=a["qweight"][:, :5]), ValueError, "32-column blocks"),
        (lambda a: a.update(bias=torch.randn(3)), ValueError, "bias shape"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x on meta"),
    ],
)
def test_dequant_bad_inputs_raise_named_errors(mutate, exc, match):
    qw, s, z, gs = _affine(12, 90, 4, 32, False, torch.float32, 0)  # Kp = 96, 3 groups
    args = {"x": torch.randn(2, 90), "qweight": qw, "scales": s, "zeros": z,
            "bias": torch.randn(12), "bits": 4, "group_size": gs}
    mutate(args)
    with pytest.raises(exc, match=match):
        dq.dequant_matmul(**args)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(codebook=a["codebook"][:, :8]), ValueError, "codebook shape"),
        (lambda a: a.update(codebook=torch.randn(5, 16)), ValueError, "divide N=12"),
        (lambda a: a.update(codebook=a["codebook"].half()), TypeError, "codebook dtype"),
        (lambda a: a.update(bits=3), ValueError, "32-column blocks"),
    ],
)
def test_codebook_bad_inputs_raise_named_errors(mutate, exc, match):
    idx, cb = _codebook(12, 40, 4, 2, torch.float32, 0)
    args = {"x": torch.randn(2, 40), "indices": idx, "codebook": cb, "bias": None, "bits": 4}
    mutate(args)
    with pytest.raises(exc, match=match):
        dq.codebook_matmul(**args)


def test_select_config_paths_and_autotune_space():
    cpu = torch.device("cpu")
    assert dq.select_config(1, 4096, 4096, cpu).path == "gemv"
    assert dq.select_config(4, 4096, 4096, cpu).path == "gemv"
    assert dq.select_config(5, 4096, 4096, cpu).path == "gemm"
    assert dq.select_config(3000, 4096, 4096, cpu).block_m >= 64
    for m in (1, 3, 16, 64, 1000):
        cfgs = dq.get_autotune_configs(m)
        assert cfgs and all(isinstance(c, KernelConfig) for c in cfgs)


def test_audit_specs_cover_every_shipped_config():
    specs = dq.audit_specs()
    names = {s["config"].split("/")[0] for s in specs}
    for table in dq.load_tables("dequant").values():
        for path in ("gemv", "gemm"):
            for c in table[path].values():
                assert KernelConfig(path, **c).name in names
    variants = {s["config"].split("/", 1)[1] for s in specs}
    assert {"asym4/fp16", "sym8/fp16", "asym2/fp16", "cb4/fp16", "cb3/fp16"} <= variants


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
