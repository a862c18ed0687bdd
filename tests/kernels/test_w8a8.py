"""kernels/w8a8.py: the activation quantization and the 8-bit GEMM against the format's plain
torch rules (kernels/formats/w8a8.py), bit for bit for int8 and for the quantized levels; FP8's
GEMM against a float64 sum within fp32 rounding (CPU: interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from compress_ops.kernels import w8a8 as kw
from compress_ops.kernels.formats import w8a8 as fw
from compress_ops.kernels.tuning import KernelConfig

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
QDTYPES = [torch.int8, torch.float8_e4m3fn]
FP8 = torch.float8_e4m3fn
# the interpreter's numpy warns where the kernels make NaN on purpose (the NaN/Inf flag x * 0)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(q: torch.Tensor) -> torch.Tensor:
    """Levels as comparable integers (FP8 by its bytes: -0 and +0 differ, as the kernels')."""
    return q.view(torch.uint8) if q.dtype == FP8 else q


def _same_levels(got: tuple, want: tuple) -> None:
    q, s = got
    qr, sr = want
    assert q.shape == qr.shape and q.dtype == qr.dtype and s.dtype == torch.float32
    assert torch.equal(_bits(q), _bits(qr))
    assert torch.equal(s.isnan(), sr.isnan())
    assert torch.equal(s.nan_to_num(0.0), sr.nan_to_num(0.0))


def _weight(n: int, k: int, qdtype: torch.dtype, dtype: torch.dtype, seed: int):
    w = torch.randn(n, k, generator=_gen(seed)) * (torch.rand(n, 1, generator=_gen(seed)) + 0.5)
    return fw.quantize_weight(w, qdtype, dtype)


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return ((torch.randn(m, k, generator=_gen(seed)) + 0.1)
            * (torch.rand(m, 1, generator=_gen(seed + 7)) * 4 + 0.1)).to(dtype)


def _smooth(k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.rand(k, generator=_gen(seed)) * 1.5 + 0.5).to(dtype)


def _dev(t, device):
    return None if t is None else t.to(device)


def _int8_ref(x, qw, ws, b, scale, smooth=None):
    """The format's rules with the exact int32 product."""
    qx, sx = fw.quantize_activation(x.reshape(-1, x.shape[-1]), torch.int8, scale, smooth)
    acc = qx.to(torch.int32) @ qw.to(torch.int32).T
    return fw.epilogue(acc, sx, ws, b, x.dtype).reshape(*x.shape[:-1], qw.shape[0])


# --------------------------------------------------------------------------------------------
# Activation quantization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_act_quant_is_the_format_rule(device, qdtype, dtype, static):
    """Random rows (ragged K: masked one-pass blocks), a zero row, a row holding NaN, rows
    holding +Inf and -Inf, with and without SmoothQuant factors: the levels and scales equal
    the format's, bit for bit; a bad row gets s = NaN and levels 0, a zero row s = 0
    (dynamic) and levels 0."""
    for k, seed in ((37, 1), (128, 2), (301, 3)):
        x = _x(6, k, dtype, seed)
        x[1] = 0
        x[2, k // 2] = float("nan")
        x[3, 0] = float("inf")
        x[4, k - 1] = -float("inf")
        scale = torch.tensor([0.0123], dtype=dtype) if static else None
        smooth = _smooth(k, dtype, seed) if seed != 2 else None
        got = kw.quantize_activation(x.to(device), qdtype, _dev(scale, device),
                                     _dev(smooth, device))
        want = fw.quantize_activation(x, qdtype, scale, smooth)
        _same_levels(tuple(t.cpu() for t in got), want)
        q, s = got
        assert bool(s[2:5].isnan().all()) and not bool(_bits(q[2:5]).cpu().any())
        if not static:
            assert s[1].item() == 0.0 and not bool(_bits(q[1]).cpu().any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_levels_round_half_to_even_and_clamp(device, dtype):
    """A static scale of 1 (inv = 1): every tie k + 0.5 goes to the even integer (0.5 -> 0,
    1.5 -> 2, 2.5 -> 2, -2.5 -> -2, 126.5 -> 126), values past 127 clamp, and a value just
    off a tie rounds to the nearest."""
    ties = torch.arange(-130, 130).float() + 0.5
    off = torch.tensor([0.49, 0.51, 1.49, 2.51, -2.51, 127.49, -127.6, 1000.0, -1000.0])
    x = torch.cat([ties, off]).to(dtype)[None, :]
    one = torch.ones(1, dtype=dtype)
    q, s = kw.quantize_activation(x.to(device), torch.int8, one.to(device))
    want = fw.quantize_activation(x, torch.int8, one)
    _same_levels((q.cpu(), s.cpu()), want)
    assert q[0, 130].item() == 0 and q[0, 131].item() == 2 and q[0, 132].item() == 2
    assert q[0, 127].item() == -2 and q.abs().max().item() == 127


def test_fp8_levels_round_to_nearest_even_at_every_midpoint(device):
    """Every e4m3 value, the midpoints between neighbours (ties to the even mantissa), one
    fp32 ulp either side of each midpoint, subnormals, and values past 448 (clamped): the
    kernel's e4m3 (on the interpreter an integer-arithmetic rounding, its own float-to-fp8
    conversion drops a rounded-up mantissa's carry) is torch's, bit for bit."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()  # +0 .. 448
    mids = (vals[1:] + vals[:-1]) / 2
    eps = torch.nextafter(mids, torch.full_like(mids, math.inf)) - mids
    pos = torch.cat([vals, mids, mids + eps, mids - eps, torch.tensor([449.0, 464.0, 1e6])])
    x = torch.cat([pos, -pos])[None, :]
    one = torch.ones(1)
    q, _ = kw.quantize_activation(x.to(device), FP8, one.to(device))
    want, _ = fw.quantize_activation(x, FP8, one)
    assert torch.equal(_bits(q.cpu()), _bits(want))


def test_act_quant_two_passes_and_m0(device, monkeypatch):
    """Rows longer than ``max_one_pass_k`` take two passes of ``block_k`` columns (here forced
    small: 32-column blocks, ragged and even K); M = 0 returns empty levels and scales."""
    table = {"act_quant": {"max_one_pass_k": 64, "num_warps_one_pass": 4, "block_k": 32,
                           "num_warps": 4}}
    monkeypatch.setattr(kw, "device_table", lambda family, dev: table)
    assert not kw.act_quant_meta(100, torch.device("cpu"))["ONE_PASS"]
    for qdtype in QDTYPES:
        for k in (100, 128):
            x = _x(3, k, torch.float16, k)
            x[2, 70] = float("nan")
            for scale in (None, torch.tensor([0.02], dtype=torch.float16)):
                smooth = _smooth(k, torch.float16, k) if scale is None else None
                got = kw.quantize_activation(x.to(device), qdtype, _dev(scale, device),
                                             _dev(smooth, device))
                _same_levels(tuple(t.cpu() for t in got),
                             fw.quantize_activation(x, qdtype, scale, smooth))
    q, s = kw.quantize_activation(torch.empty(0, 40, device=device), torch.int8)
    assert q.shape == (0, 40) and s.shape == (0,)


# --------------------------------------------------------------------------------------------
# GEMM
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "small": KernelConfig("gemm", 16, 32, 64, 4, 3),
    "big": KernelConfig("gemm", 64, 32, 64, 4, 2, group_m=2),
}
# (M, N, K): one row, a few, a full 16-row tile, past it, past a 64-row tile; ragged N and K
SHAPES = [(1, 10, 37), (3, 33, 128), (16, 64, 256), (17, 40, 200), (70, 24, 96)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("cfg", [None, "small", "big"])
def test_int8_gemm_is_bit_exact(poison, device, m, n, k, cfg):
    """int8: y equals the format's epilogue on the exact int32 product, bit for bit, for every
    x dtype, with and without bias, dynamic and static scales, with and without SmoothQuant
    factors, fused (M <= 16 on a small tile: one launch) and quantized-first (two launches);
    rows past a tile and ragged N / K."""
    for i, dtype in enumerate(DTYPES):
        qw, ws = _weight(n, k, torch.int8, dtype, m + i)
        x = _x(m, k, dtype, 100 + m + i)
        b = torch.randn(n, generator=_gen(i)).to(dtype) if i != 1 else None
        scale = torch.tensor([0.011], dtype=dtype) if i == 2 else None
        smooth = _smooth(k, dtype, i) if i != 0 else None
        y = kw.w8a8_linear(x.to(device), qw.to(device), ws.to(device), _dev(b, device),
                           _dev(scale, device), _dev(smooth, device),
                           config=CONFIGS[cfg] if cfg else None)
        assert y.shape == (m, n) and y.dtype == dtype
        assert torch.equal(y.cpu(), _int8_ref(x, qw, ws, b, scale, smooth)), (dtype, cfg)


def test_fused_and_quantized_first_paths_agree(poison, device):
    """The same call through the fused GEMM (QUANT_X, one launch) and through the activation
    quantization + GEMM (two launches): the same bits, NaN rows included, smoothed."""
    from compress_ops.kernels import launches

    qw, ws = _weight(48, 160, torch.int8, torch.bfloat16, 5)
    x = _x(9, 160, torch.bfloat16, 6)
    x[4, 7] = float("nan")
    sm = _smooth(160, torch.bfloat16, 8).to(device)
    x, qw, ws = x.to(device), qw.to(device), ws.to(device)
    with launches.capture() as fused:
        y1 = kw.w8a8_linear(x, qw, ws, None, None, sm, config=CONFIGS["small"])
    with launches.capture() as two:
        y2 = kw.w8a8_linear(x, qw, ws, None, None, sm, config=CONFIGS["big"])
    assert [la.kernel.__name__ for la in fused] == ["_w8a8_gemm_kernel"]
    assert fused[0].kwargs["QUANT_X"] and fused[0].kwargs["FEW_ROWS"]
    assert [la.kernel.__name__ for la in two] == ["_act_quant_kernel", "_w8a8_gemm_kernel"]
    assert torch.equal(y1.isnan(), y2.isnan()) and bool(y1[4].isnan().all())
    assert torch.equal(y1.nan_to_num(), y2.nan_to_num())


@pytest.mark.parametrize("m,n,k", SHAPES[:2] + SHAPES[3:])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_gemm_within_fp32_rounding(poison, device, m, n, k, static):
    """FP8: the levels are the format's (checked above); the sum of the exact products in
    fp32 differs from the float64 sum by at most K fp32 roundings of the running sum (on a
    GPU: sm_90's FP8 accumulation, promoted to fp32 every K tile); then the epilogue's three
    roundings and the output's."""
    for i, dtype in enumerate(DTYPES):
        qw, ws = _weight(n, k, FP8, dtype, 7 * m + i)
        x = _x(m, k, dtype, 200 + m + i)
        b = torch.randn(n, generator=_gen(i)).to(dtype)
        scale = torch.tensor([0.021], dtype=dtype) if static else None
        smooth = _smooth(k, dtype, i) if i == 1 else None
        y = kw.w8a8_linear(x.to(device), qw.to(device), ws.to(device), b.to(device),
                           _dev(scale, device), _dev(smooth, device))
        qx, sx = fw.quantize_activation(x, FP8, scale, smooth)
        prod = qx.double()[:, None, :] * qw.double()[None, :, :]
        acc, mag = prod.sum(-1), prod.abs().sum(-1)
        sw = sx.double()[:, None] * ws.double()[None, :]
        ref = acc * sw + b.double()
        acc_err = (k * 2.0**-24 if device == "cpu" else 2.0**-12) * mag
        out_ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
        bound = (acc_err + 4 * 2.0**-24 * mag) * sw.abs() + 2.0**-23 * b.double().abs()[None]
        bound = bound + out_ulp[dtype] * ref.abs() + 1e-30
        assert y.dtype == dtype and bool(((y.cpu().double() - ref).abs() <= bound).all())


def test_leading_dims_noncontiguous_and_empty(poison, device):
    """x [..., K] with leading dims, a non-contiguous view (made contiguous once), and M = 0."""
    qw, ws = _weight(20, 48, torch.int8, torch.float16, 9)
    qw, ws = qw.to(device), ws.to(device)
    base = _x(48, 6, torch.float16, 10).to(device)
    x = base.T.reshape(2, 3, 48)  # a copy: reshape of a transpose
    xt = base.T  # [6, 48], non-contiguous
    y = kw.w8a8_linear(xt, qw, ws, None, None)
    assert y.shape == (6, 20)
    assert torch.equal(y.cpu(), _int8_ref(xt.cpu(), qw.cpu(), ws.cpu(), None, None))
    y3 = kw.w8a8_linear(x, qw, ws, None, None)
    assert y3.shape == (2, 3, 20) and torch.equal(y3.reshape(6, 20), y)
    assert kw.w8a8_linear(x[:0], qw, ws, None, None).shape == (0, 3, 20)


# --------------------------------------------------------------------------------------------
# Errors, configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: {**a, "qweight": a["qweight"].float()}, TypeError, "qweight dtype"),
    (lambda a: {**a, "x": a["x"][:, :40]}, ValueError, "K"),
    (lambda a: {**a, "w_scales": a["w_scales"].float()}, TypeError, "w_scales"),
    (lambda a: {**a, "w_scales": a["w_scales"][:5]}, ValueError, "w_scales shape"),
    (lambda a: {**a, "bias": torch.zeros(3, dtype=torch.float16)}, ValueError, "bias"),
    (lambda a: {**a, "input_scale": torch.ones(2, dtype=torch.float16)}, ValueError,
     "input_scale"),
    (lambda a: {**a, "input_scale": torch.zeros(1, dtype=torch.float16)}, ValueError,
     "finite and > 0"),
    (lambda a: {**a, "smooth": torch.ones(47, dtype=torch.float16)}, ValueError, "smooth"),
    (lambda a: {**a, "smooth": torch.ones(48)}, TypeError, "smooth"),
])
def test_bad_inputs_raise_named_errors(mutate, exc, match):
    qw, ws = _weight(8, 48, torch.int8, torch.float16, 11)
    args = {"x": _x(2, 48, torch.float16, 12), "qweight": qw, "w_scales": ws, "bias": None,
            "input_scale": None, "smooth": None}
    args = mutate(args)
    with pytest.raises(exc, match=match):
        kw.w8a8_linear(args["x"], args["qweight"], args["w_scales"], args["bias"],
                       args["input_scale"], args["smooth"])


def test_quantize_activation_bad_inputs_and_fp8_capability(monkeypatch):
    """Named errors for ``quantize_activation``; FP8 on a GPU below compute capability 8.9 is
    a ``NotImplementedError`` naming it (here a CPU device made to report sm_80)."""
    x = _x(2, 16, torch.float16, 13)
    with pytest.raises(TypeError, match="qdtype"):
        kw.quantize_activation(x, torch.uint8)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kw.quantize_activation(x.double(), torch.int8)
    with pytest.raises(ValueError, match="2-D"):
        kw.quantize_activation(x[0], torch.int8)
    with pytest.raises(TypeError, match="input_scale dtype"):
        kw.quantize_activation(x, torch.int8, torch.ones(1))
    with pytest.raises(ValueError, match="input_scale must hold 1 value"):
        kw.quantize_activation(x, torch.int8, torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="smooth must hold 16 values"):
        kw.quantize_activation(x, torch.int8, None, torch.ones(15, dtype=torch.float16))
    monkeypatch.setattr(kw, "_capability", lambda device: (8, 0))
    assert not kw.fp8_supported(torch.device("cpu"))
    with pytest.raises(NotImplementedError, match=r"8\.9.*has 8\.0 \(sm_80\)"):
        kw.quantize_activation(x, FP8)
    qw, ws = _weight(8, 16, FP8, torch.float16, 14)
    with pytest.raises(NotImplementedError, match="sm_80"):
        kw.w8a8_linear(x, qw, ws, None, None)
    kw.quantize_activation(x, torch.int8)  # int8 runs everywhere


def test_configs_tiles_and_routes():
    """The shipped table: a 16-row tile up to 16 rows (fused: one launch), 64+ rows from 33
    (wgmma on sm_90), 128 x 128 x 128 past 128; on a (simulated) H200 the small tile narrows
    BLOCK_N while its grid leaves SMs idle; an unaligned K shrinks the tile; no split-K."""
    from compress_ops.kernels import tuning

    cpu = torch.device("cpu")
    small = kw.select_config(1, 8192, 8192, cpu)
    big = kw.select_config(2048, 8192, 8192, cpu)
    assert small.block_m == 16 and big.block_m == 128 and big.block_n == big.block_k == 128
    assert kw.select_config(40, 8192, 8192, cpu).block_m >= 64
    assert kw.fused_call(16, small, cpu) and not kw.fused_call(17, small, cpu)
    assert not kw.fused_call(8, big, cpu)
    for m in (1, 16, 64, 2048):
        assert kw.select_config(m, 8192, 8192, cpu).split_k == 1
    with tuning.simulate_gpu():
        assert kw.select_config(16, 8192, 8192, cpu).block_n == 64  # 128 tiles: 97% of 132
        assert kw.select_config(16, 4096, 8192, cpu).block_n == 32
    shrunk = kw.gemm_tile(big, 8100)
    assert shrunk.block_k == 64 and shrunk.num_stages == 2 and kw.gemm_tile(big, 8192) == big
    meta = kw.act_quant_meta(8192, cpu)
    assert meta["ONE_PASS"] and meta["BLOCK_K"] == 8192 and meta["EXACT_CVT"]
    assert not kw.act_quant_meta(8193, cpu)["ONE_PASS"]
    with tuning.simulate_gpu():
        assert not kw.exact_cvt(cpu)
