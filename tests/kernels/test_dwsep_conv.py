"""kernels/dwsep_conv.py: the fused depthwise + pointwise kernel against the float64 reference
(``F.conv2d`` twice) over geometry, activations, residual and dtypes."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops.kernels import dwsep_conv as dc
from compress_ops.kernels.formats import dwsep_conv as dcf
from compress_ops.reference import dwsep_conv2d_ref

from .tolerances import rel_err, tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "gpu"
MAX_HW, MAX_C = (40, 200) if LARGE else (11, 40)


@st.composite
def geometry(draw):
    k = draw(st.sampled_from(dcf.KERNEL_SIZES))
    stride = draw(st.sampled_from(dcf.STRIDES))
    if draw(st.booleans()):
        p = draw(st.integers(0, k // 2))
        pad = (p, p, p, p)
    else:  # explicit / asymmetric ('same' of TensorFlow ports)
        pad = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
    h = draw(st.integers(max(1, k - pad[2] - pad[3]), MAX_HW))
    w = draw(st.integers(max(1, k - pad[0] - pad[1]), MAX_HW))
    return k, stride, pad, h, w


def _inputs(b, c, h, w, cout, k, stride, pad, dtype, biases, residual, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dw = (torch.randn(c, k, k, generator=g) / k).to(dtype)
    pw = (torch.randn(cout, c, generator=g) / c**0.5).to(dtype)
    dwb = torch.randn(c, generator=g).to(dtype) if biases else None
    pwb = torch.randn(cout, generator=g).to(dtype) if biases else None
    ho, wo = dcf.output_size(h, w, k, stride, pad)
    res = torch.randn(b, cout, ho, wo, generator=g).to(dtype) if residual else None
    return x, dw, dwb, pw, pwb, res


@given(geo=geometry(), b=st.integers(1, 3), c=st.integers(1, MAX_C),
       cout=st.integers(1, MAX_C), act1=st.sampled_from(dcf.ACTIVATIONS),
       act2=st.sampled_from(dcf.ACTIVATIONS), dtype=st.sampled_from(DTYPES),
       biases=st.booleans(), residual=st.booleans(), channels_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernel_matches_float64_reference(poison, device, geo, b, c, cout, act1, act2, dtype,
                                          biases, residual, channels_last, seed):
    k, stride, pad, h, w = geo
    args = [t.to(device) if t is not None else None for t in
            _inputs(b, c, h, w, cout, k, stride, pad, dtype, biases, residual, seed,
                    channels_last)]
    y = dc.dwsep_conv2d(*args, stride, pad, act1, act2)
    ref = dwsep_conv2d_ref(*args, stride, list(pad), act1, act2, dtype=torch.float64)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < 2 * tol(dtype, c * k * k)


@pytest.mark.parametrize("cfg", [
    {"block_p": 16, "block_c": 16, "block_co": 16, "num_warps": 4, "num_stages": 1},
    {"block_p": 32, "block_c": 64, "block_co": 32, "num_warps": 4, "num_stages": 2},
])
def test_tiles_smaller_than_the_problem_cover_it(poison, device, cfg):
    """Several pixel, channel and output-channel tiles (C and Cout not multiples)."""
    args = [t.to(device) if t is not None else None for t in
            _inputs(2, 70, 9, 10, 37, 3, 1, (1, 1, 1, 1), torch.float32, True, True, 5, False)]
    y = dc.dwsep_conv2d(*args, 1, (1, 1, 1, 1), "relu6", "none", config=cfg)
    ref = dwsep_conv2d_ref(*args, 1, [1, 1, 1, 1], "relu6", "none", dtype=torch.float64)
    assert rel_err(y, ref) < 1e-5


def test_select_config_and_bytes():
    cpu = torch.device("cpu")
    assert dc.select_config(96, 24, 3, cpu)["block_co"] >= 24
    # Cout tiles of at most 128 (past it the depthwise part is recomputed per tile: a 256-wide
    # tile is predicted slower on MobileNetV2's 14^2 and 7^2 layers, perf/static_perf.py);
    # Cout 320 (7^2 x 960): 64-wide tiles, five programs per pixel tile (parallelism over
    # recompute, predicted 6.8 -> 5.9 us)
    assert dc.select_config(576, 160, 3, cpu)["block_co"] == 128
    assert dc.select_config(960, 320, 5, cpu)["block_co"] == 64
    # fp32-accumulated depthwise tiles (bf16, fp32) take half the channel block
    assert dc.table_tile(960, 320, 3, cpu, False)["block_c"] == 32
    assert dc.table_tile(960, 320, 3, cpu, True)["block_c"] == 64
    # MobileNetV2 stride-1 project pair (C = 6 Cout): 2.7x fewer activation bytes fused
    args = (1, 56, 56, 144, 24, 3, 1, (1, 1, 1, 1), 2)
    ratio = dcf.dwsep_bytes(*args, fused=False) / dcf.dwsep_bytes(*args, fused=True)
    assert 2.6 < ratio < 2.8
    assert dcf.output_size(7, 8, 3, 2, (0, 1, 0, 1)) == (3, 4)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(dw=torch.randn(7, 3, 3)), ValueError, "groups = in = out"),
        (lambda a: a.update(dw=torch.randn(8, 7, 7)), ValueError, "kernel size 7"),
        (lambda a: a.update(dw=torch.randn(8, 3, 5)), ValueError, r"\[C, k, k\]"),
        (lambda a: a.update(stride=3), ValueError, "stride must be one of"),
        (lambda a: a.update(pad=(1, 1, 1)), ValueError, "padding must be 4 ints"),
        (lambda a: a.update(pad=(3, 1, 1, 1)), ValueError, "smaller than the kernel"),
        (lambda a: a.update(pw=torch.randn(5, 9)), ValueError, r"pw_weight must be \[Cout, C=8\]"),
        (lambda a: a.update(act1="gelu"), ValueError, "act1 must be one of"),
        (lambda a: a.update(x=torch.randn(2, 8, 6)), ValueError, "4-D"),
        (lambda a: a.update(x=torch.randn(2, 8, 6, 6).double()), TypeError, "float16"),
        (lambda a: a.update(pwb=torch.randn(5).half()), TypeError, "pw_bias dtype"),
        (lambda a: a.update(res=torch.randn(2, 5, 5, 5)), ValueError, "residual shape"),
        (lambda a: a.update(x=torch.randn(2, 8, 1, 1), pad=(0, 0, 0, 0)), ValueError,
         "smaller than the padded kernel"),
    ],
)
def test_bad_inputs_raise_named_errors(mutate, exc, match):
    a = {"x": torch.randn(2, 8, 6, 6), "dw": torch.randn(8, 3, 3), "dwb": torch.randn(8),
         "pw": torch.randn(5, 8), "pwb": torch.randn(5), "res": None, "stride": 1,
         "pad": (1, 1, 1, 1), "act1": "relu", "act2": "none"}
    mutate(a)
    with pytest.raises(exc, match=match):
        dcf.check_inputs(*a.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("c", [64, 70])  # whole channel blocks (EVEN_C) and a ragged last one
def test_every_dw_weight_layout_gives_the_same_result(poison, device, dtype, c):
    """The module's tap-major ``dw_weight`` (strides ``(1, k C, C)``: one vector per tap), a
    contiguous one and one whose taps are not at one stride (copied by the launcher) read the
    same weights: bit-identical outputs, each within the float64 reference's tolerance. fp16
    accumulates the taps in fp16 (packed pairs on a GPU)."""
    x, dw, dwb, pw, pwb, res = (t.to(device) if t is not None else None for t in
                                _inputs(2, c, 9, 10, 24, 3, 1, (1, 1, 1, 1), dtype, True, True,
                                        7, True))
    cfg = {"block_p": 32, "block_c": 32, "block_co": 32, "num_warps": 4, "num_stages": 2}
    tap_major = dw.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert tap_major.stride() == (1, 3 * c, c)
    transposed = dw.transpose(1, 2).contiguous().transpose(1, 2)  # taps at strides 1 and 3
    ys = [dc.dwsep_conv2d(x, w, dwb, pw, pwb, res, 1, (1, 1, 1, 1), "relu6", "none",
                          config=cfg) for w in (dw, tap_major, transposed)]
    ref = dwsep_conv2d_ref(x, dw, dwb, pw, pwb, res, 1, [1, 1, 1, 1], "relu6", "none",
                           dtype=torch.float64)
    assert rel_err(ys[0], ref) < 2 * tol(dtype, c * 9)
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The two-phase kernel (depthwise once per pixel tile, Cout > BLOCK_CO)
# ---------------------------------------------------------------------------------------------

TWO_PHASE = {"two_phase": True, "block_p": 16, "block_c": 16, "block_co": 16, "num_warps": 4,
             "num_stages": 2}


def _counters_zero():
    for _d, sync in dc._WORKSPACE.values():
        assert int(sync.abs().sum()) == 0


@given(geo=geometry(), b=st.integers(1, 2), c=st.integers(1, 40), cout=st.integers(17, 50),
       act1=st.sampled_from(dcf.ACTIVATIONS), act2=st.sampled_from(dcf.ACTIVATIONS),
       dtype=st.sampled_from(DTYPES), biases=st.booleans(), residual=st.booleans(),
       seed=st.integers(0, 2**16))
def test_two_phase_matches_float64_reference(poison, device, geo, b, c, cout, act1, act2,
                                             dtype, biases, residual, seed):
    """Forced two-phase route on ragged shapes (C, Cout and the pixels not multiples of the
    tiles), every activation pair, bias or not, residual or not, both strides, 3x3 and 5x5;
    the counters are zero after every call."""
    k, stride, pad, h, w = geo
    args = [t.to(device) if t is not None else None for t in
            _inputs(b, c, h, w, cout, k, stride, pad, dtype, biases, residual, seed, True)]
    y = dc.dwsep_conv2d(*args, stride, pad, act1, act2, config=TWO_PHASE)
    ref = dwsep_conv2d_ref(*args, stride, list(pad), act1, act2, dtype=torch.float64)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < 2 * tol(dtype, c * k * k)
    _counters_zero()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", dcf.KERNEL_SIZES)
def test_two_phase_repeated_calls_and_shapes(poison, device, dtype, k):
    """Several pixel, channel and output-channel tiles; two calls in a row give identical
    outputs, then a call of another shape (more pixel tiles: the counters grow) and the first
    shape again: the workspace is left ready by every launch."""
    pad = (k // 2,) * 4
    a1 = [t.to(device) for t in _inputs(2, 37, 7, 6, 41, k, 1, pad, dtype, True, True, 3, True)]
    a2 = [t.to(device) for t in _inputs(3, 20, 12, 12, 33, k, 2, pad, dtype, True, True, 4,
                                        True)]
    ref1 = dwsep_conv2d_ref(*a1, 1, list(pad), "relu6", "relu", dtype=torch.float64)
    ref2 = dwsep_conv2d_ref(*a2, 2, list(pad), "relu6", "relu", dtype=torch.float64)
    y1 = dc.dwsep_conv2d(*a1, 1, pad, "relu6", "relu", config=TWO_PHASE)
    _counters_zero()
    y1b = dc.dwsep_conv2d(*a1, 1, pad, "relu6", "relu", config=TWO_PHASE)
    _counters_zero()
    y2 = dc.dwsep_conv2d(*a2, 2, pad, "relu6", "relu", config=TWO_PHASE)
    _counters_zero()
    y1c = dc.dwsep_conv2d(*a1, 1, pad, "relu6", "relu", config=TWO_PHASE)
    _counters_zero()
    for y, ref, c in ((y1, ref1, 37), (y2, ref2, 20)):
        assert rel_err(y, ref) < 2 * tol(dtype, c * k * k)
    torch.testing.assert_close(y1b, y1, rtol=0, atol=0)
    torch.testing.assert_close(y1c, y1, rtol=0, atol=0)


def test_two_phase_workspace_grows(poison, device):
    """A call with more pixel tiles than the counters hold (2 + 2 n_tiles > 64) reallocates
    them; the result is right and the counters are zero after it, and a small call after."""
    pad = (1, 1, 1, 1)
    big = [t.to(device) if t is not None else None for t in
           _inputs(2, 24, 16, 17, 20, 3, 1, pad, torch.float32, True, False, 6, True)]
    y = dc.dwsep_conv2d(*big, 1, pad, "relu", "none", config=TWO_PHASE)
    ref = dwsep_conv2d_ref(*big, 1, list(pad), "relu", "none", dtype=torch.float64)
    assert rel_err(y, ref) < 2 * tol(torch.float32, 24 * 9)
    _counters_zero()
    assert max(sync.numel() for _, sync in dc._WORKSPACE.values()) >= 2 + 2 * 34
    small = [t.to(device) if t is not None else None for t in
             _inputs(1, 5, 4, 4, 18, 3, 2, pad, torch.float32, False, False, 7, True)]
    y = dc.dwsep_conv2d(*small, 2, pad, "silu", "hardswish", config=TWO_PHASE)
    ref = dwsep_conv2d_ref(*small, 2, list(pad), "silu", "hardswish", dtype=torch.float64)
    assert rel_err(y, ref) < 2 * tol(torch.float32, 5 * 9)
    _counters_zero()


def test_two_phase_route():
    """MobileNetV2's pairs whose Cout passes the one-pass tile (14^2 x 576 -> 160, 7^2 x 960 ->
    320: Cout buckets 256 and 512, 3 x 3) take the two-phase kernel (the static model's choice);
    Cout within one tile keeps the one-pass kernel, and so does a 5 x 5 (no two-phase tile);
    bf16 / fp32 take half the channel block."""
    cpu = torch.device("cpu")
    for c, cout in ((576, 160), (960, 320)):
        two, cfg = dc.route(c, cout, 3, cpu, True)
        assert two and cfg["block_co"] < cout
        assert dc.route(c, cout, 3, cpu, False)[1]["block_c"] == max(16, cfg["block_c"] // 2)
        assert not dc.route(c, cout, 5, cpu, True)[0]
    for c, cout in ((32, 16), (144, 24), (576, 96)):
        assert not dc.route(c, cout, 3, cpu, True)[0]
    # an fp32 act1: half the channel block; masked taps (ragged C): 16 (the audit's variants)
    full = dc.route(576, 160, 3, cpu, True)[1]["block_c"]
    assert dc.route(576, 160, 3, cpu, True, "silu")[1]["block_c"] == full // 2
    assert dc.route(570, 160, 3, cpu, True)[1]["block_c"] == 16
    assert dc.route(570, 160, 3, cpu, False)[1]["block_c"] == 16


def test_small_grid_halves_the_pixel_tile():
    """On a GPU (simulated), a one-pass pixel tile above 64 is halved once where the grid would
    leave SMs idle: MobileNetV2's 56^2 x 144 -> 32 s2 (25088 pixels, 98 -> 196 programs); a
    grid that fills the SMs keeps the table's tile, and so does the interpreter."""
    from compress_ops.kernels import tuning

    cpu = torch.device("cpu")
    table = dc.route(144, 32, 3, cpu, True, "relu6", 25088)[1]
    with tuning.simulate_gpu("NVIDIA H200", 132):
        small = dc.route(144, 32, 3, cpu, True, "relu6", 25088)[1]
        large = dc.route(144, 24, 3, cpu, True, "relu6", 100352)[1]
    assert table["block_p"] == 256 and small["block_p"] == 128 and large["block_p"] == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("act1", "act2"), [("relu6", "none"), ("hardswish", "relu"),
                                            ("none", "silu")])
def test_two_phase_propagates_nonfinite_x(device, poison, act1, act2, dtype):
    """NaN / +-Inf in x reach the outputs through the workspace exactly as in the float64
    reference (the padded channels of a ragged chunk stay finite: they never reach y)."""
    from .test_nonfinite import INF, NAN, _check, _dwsep

    x, *rest = _dwsep(25)
    c = x.shape[1]
    x[0, 1, 2, 2], x[0, 3, 6, 6], x[1, 0, 0, 0], x[1, c - 1, 7, 4] = NAN, INF, -INF, INF
    args = [t.to(dtype).to(device) for t in (x, *rest)]
    pad = (1, 1, 1, 1)
    y = dc.dwsep_conv2d(*args, 1, pad, act1, act2, config=TWO_PHASE)
    ref = dwsep_conv2d_ref(*args, 1, list(pad), act1, act2, dtype=torch.float64)
    _check(y, ref, dtype, c * 9)
    _counters_zero()
