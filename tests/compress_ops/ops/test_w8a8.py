"""compress_ops/ops/w8a8.py: w8a8_linear — the activation-quantization rules against float64
rounding, exact integer arithmetic (bit for bit on every int8 path), the op rules from
ARCHITECTURE.md, routes, the straight-through autograd."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compress_ops  # noqa: F401  (registers the ops)
from compress_ops.kernels.formats import w8a8 as fmt
from compress_ops.ops.w8a8 import w8a8_route
from compress_ops.reference import w8a8_linear_ref

op = torch.ops.compress_ops.w8a8_linear
INT8, FP8 = torch.int8, torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(n=24, k=70, qdtype=INT8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return fmt.quantize_weight(w.to(dtype), qdtype)


def _x(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.3).to(dtype)


def _rne(v: torch.Tensor) -> torch.Tensor:
    """Round half to even in float64, written out (not torch.round)."""
    f = torch.floor(v)
    d = v - f
    up = (d > 0.5) | ((d == 0.5) & (torch.remainder(f, 2) == 1))
    return f + up.double()


# --------------------------------------------------------------------------------------------
# the activation rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("static", [False, True])
def test_int8_activation_levels_follow_float64_rounding(dtype, static):
    x = _x(7, 53, dtype=dtype) * 3
    scale = torch.tensor([0.02], dtype=dtype) if static else None
    q, s = fmt.quantize_activation(x, INT8, scale)
    xf = x.double()
    if static:
        s64 = scale.double().expand(7)
        inv = (1.0 / scale.float()).double().expand(7)
    else:
        amax = xf.abs().amax(1)
        s64, inv = amax / 127, ((1 / amax.float()) * 127).double()  # two float32 roundings
    assert torch.equal(s.double(), s64.float().double())  # float32, one rounding
    v = (xf * inv[:, None]).float().double()  # the float32 product, rounded once
    want = _rne(v).clamp(-127, 127)
    assert torch.equal(q.double(), want)
    inside = v.abs() <= 127
    err = (q.double() - xf / s.double()[:, None]).abs()[inside]
    assert float(err.max()) <= 0.5 + 1e-5  # round to nearest, up to the rounded inverse


def test_ties_round_to_even_and_clip_saturates():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]])  # amax 127: inv = 1
    q, s = fmt.quantize_activation(x, INT8)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 4, -126]] and s.tolist() == [1.0]
    q, _ = fmt.quantize_activation(torch.tensor([[1000.0, -1000.0, 1.0]]), INT8,
                                   torch.tensor([1.0]))
    assert q.tolist() == [[127, -127, 1]]  # a static scale clips; -128 is never written
    q8, _ = fmt.quantize_activation(torch.tensor([[1e6, -1e6, 1.0]]), FP8, torch.tensor([1.0]))
    assert q8.float().tolist() == [[448.0, -448.0, 1.0]]


@pytest.mark.parametrize("qdtype", [INT8, FP8], ids=["int8", "fp8"])
def test_zero_rows_give_the_bias_and_nonfinite_rows_give_nan(qdtype):
    qw, ws = _weight(qdtype=qdtype)
    x = _x(5, 70)
    x[1] = 0.0
    x[2, 3] = float("nan")
    x[3, 7] = float("inf")
    x[4, 0] = float("-inf")
    q, s = fmt.quantize_activation(x, qdtype)
    assert s[1] == 0 and torch.isnan(s[2:]).all() and (q[1:].float() == 0).all()
    b = torch.randn(24)
    y = op(x, qw, ws, b, None)
    assert torch.equal(y[1], b)
    assert torch.isnan(y[2:]).all() and torch.isfinite(y[0]).all()


# --------------------------------------------------------------------------------------------
# the op against exact integer arithmetic
# --------------------------------------------------------------------------------------------


@st.composite
def cases(draw):
    return {"m": draw(st.integers(0, 20)), "k": draw(st.integers(1, 80)),
            "n": draw(st.integers(1, 40)), "lead": draw(st.integers(1, 2)),
            "dtype": draw(st.sampled_from(DTYPES)), "static": draw(st.booleans()),
            "bias": draw(st.booleans()), "smooth": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**16))}


def _case_args(c, qdtype):
    qw, ws = _weight(c["n"], c["k"], qdtype, c["dtype"], c["seed"])
    shape = (c["m"], c["k"]) if c["lead"] == 1 else (2, c["m"], c["k"])
    x = _x(*shape, dtype=c["dtype"], seed=c["seed"] + 1)
    b = torch.randn(c["n"]).to(c["dtype"]) if c["bias"] else None
    s = torch.tensor([0.015], dtype=c["dtype"]) if c["static"] else None
    sm = (torch.rand(c["k"]) + 0.5).to(c["dtype"]) if c["smooth"] else None
    return x, qw, ws, b, s, sm


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int8_is_bit_exact_against_integer_arithmetic(backend, monkeypatch):
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", backend)

    @settings(max_examples=25 if backend == "reference" else 8, deadline=None)
    @given(cases())
    def run(c):
        x, qw, ws, b, s, sm = _case_args(c, INT8)
        y = op(x, qw, ws, b, s, sm)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], c["n"])
        assert torch.equal(y, w8a8_linear_ref(x, qw, ws, b, s, sm))

    run()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_matches_float64_within_float32_rounding(backend, monkeypatch):
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", backend)

    @settings(max_examples=15 if backend == "reference" else 6, deadline=None)
    @given(cases())
    def run(c):
        x, qw, ws, b, s, sm = _case_args(c, FP8)
        y = op(x, qw, ws, b, s, sm)
        ref = w8a8_linear_ref(x, qw, ws, b, s, sm, exact_epilogue=False)
        if y.numel():
            err = (y.double() - ref).norm() / ref.norm().clamp_min(1e-30)
            # fp32 sums (1e-6 sqrt(K)), then one rounding to the activation dtype
            bound = {torch.float32: 1e-6 * math.sqrt(c["k"]) + 1e-7, torch.bfloat16: 8e-3,
                     torch.float16: 1e-3}[c["dtype"]]
            assert float(err) <= bound

    run()


def test_routes(monkeypatch):
    qw, _ = _weight()
    q8, _ = _weight(qdtype=FP8)
    x = _x(2, 70)
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
    assert w8a8_route(x, qw) == "int-mm" and w8a8_route(x, q8) == "fp8-emulated"
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "triton")
    assert w8a8_route(x, qw) == "triton" and w8a8_route(x, q8) == "triton"


# --------------------------------------------------------------------------------------------
# op rules
# --------------------------------------------------------------------------------------------


OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
            "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("qdtype", [INT8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("static", [False, True])
def test_opcheck(qdtype, static):
    qw, ws = _weight(16, 64, qdtype)
    x = _x(4, 64).requires_grad_()
    b = torch.randn(16, requires_grad=True)
    s = torch.tensor([0.02]) if static else None
    # opcheck's schema test compares inputs with arithmetic torch has no FP8 CPU kernel for
    utils = OPCHECKS[1:] if qdtype == FP8 else OPCHECKS
    torch.library.opcheck(op, (x, qw, ws, b, s), test_utils=utils)
    torch.library.opcheck(op, (x.detach(), qw, ws, None, s, torch.rand(64) + 0.5),
                          test_utils=utils)


def test_m_zero_and_leading_dims():
    qw, ws = _weight()
    b = torch.randn(24)
    assert op(torch.randn(0, 70), qw, ws, b, None).shape == (0, 24)
    assert op(torch.randn(2, 0, 70), qw, ws, None, None).shape == (2, 0, 24)
    assert op(torch.randn(70), qw, ws, b, None).shape == (24,)
    assert torch.equal(op(_x(3, 140)[:, ::2], qw, ws, b, None),
                       op(_x(3, 140)[:, ::2].contiguous(), qw, ws, b, None))


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_straight_through_gradient(static, smooth):
    qw, ws = _weight()
    x = (_x(5, 70) * 2).requires_grad_()
    b = torch.randn(24, requires_grad=True)
    s = torch.tensor([0.02]) if static else None  # clips |x * smooth| > 2.54
    sm = torch.rand(70) + 0.5 if smooth else None
    g = torch.randn(5, 24)
    op(x, qw, ws, b, s, sm).backward(g)
    w = fmt.dequantize_weight(qw, ws).double()
    if smooth:
        w = w * sm.double()[None, :]
    want = g.double() @ w
    if static:
        xs = x.detach() * (1 if sm is None else sm)
        want = want * (xs.abs() <= 127 * 0.02).double()
        assert (xs.abs() > 127 * 0.02).any()
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, g.sum(0))


def test_compile_parity_and_dynamic_batch():
    qw, ws = _weight()
    b = torch.randn(24)
    f = torch.compile(lambda x: op(x, qw, ws, b, None), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    torch._dynamo.reset()
    for m in (3, 5, 9):
        x = _x(m, 70)
        assert torch.equal(f(x), op(x, qw, ws, b, None))


BAD = [
    (lambda a: {**a, "qweight": a["qweight"].int()}, TypeError, "qweight dtype"),
    (lambda a: {**a, "qweight": a["qweight"][None]}, ValueError, "2-D"),
    (lambda a: {**a, "w_scales": a["w_scales"][:-1]}, ValueError, "w_scales shape"),
    (lambda a: {**a, "w_scales": a["w_scales"].long()}, TypeError, "w_scales must be"),
    (lambda a: {**a, "x": a["x"].half()}, TypeError, "w_scales dtype"),
    (lambda a: {**a, "x": a["x"][:, :-1]}, ValueError, "K="),
    (lambda a: {**a, "bias": torch.randn(23)}, ValueError, "bias shape"),
    (lambda a: {**a, "input_scale": torch.tensor([0.0])}, ValueError, "input_scale must be"),
    (lambda a: {**a, "input_scale": torch.tensor([float("nan")])}, ValueError, "finite"),
    (lambda a: {**a, "input_scale": torch.tensor([1.0, 2.0])}, ValueError, "input_scale shape"),
    (lambda a: {**a, "qweight": a["qweight"][:, :0], "x": a["x"][:, :0]}, ValueError, "K"),
    (lambda a: {**a, "smooth": torch.ones(69)}, ValueError, "smooth shape"),
    (lambda a: {**a, "smooth": torch.ones(70).half()}, TypeError, "smooth dtype"),
]


@pytest.mark.parametrize(("mutate", "exc", "match"), BAD)
def test_bad_inputs_raise_named_errors(mutate, exc, match):
    qw, ws = _weight()
    a = mutate({"x": _x(2, 70), "qweight": qw, "w_scales": ws, "bias": None,
                "input_scale": None, "smooth": None})
    with pytest.raises(exc, match=match):
        op(a["x"], a["qweight"], a["w_scales"], a["bias"], a["input_scale"], a["smooth"])


def test_int8_k_limit_is_named():
    with pytest.raises(ValueError, match="overflow"):
        fmt.check_weight(torch.zeros(1, fmt.MAX_K_INT8 + 1, dtype=INT8), torch.zeros(1))


def test_weight_levels_and_scales():
    w = torch.randn(32, 50) * torch.linspace(0.1, 3, 32)[:, None]
    w[5] = 0
    for qdtype, qmax in ((INT8, 127), (FP8, 448)):
        q, s = fmt.quantize_weight(w, qdtype)
        assert q.dtype == qdtype and s.dtype == w.dtype and s[5] == 0
        assert float(q.float().abs().max()) <= qmax
        deq = fmt.dequantize_weight(q, s).double()
        if qdtype == INT8:  # half a level per weight
            assert ((deq - w.double()).abs() <= s.double()[:, None] / 2 * (1 + 1e-6)).all()
        else:  # e4m3: 3 mantissa bits, relative half-ulp 2**-4 (above the subnormals)
            big = w.abs() > s[:, None] * 2**-6
            assert ((deq - w.double()).abs()[big] <= w.double().abs()[big] / 16 + 1e-7).all()
    with pytest.raises(ValueError, match="NaN"):
        fmt.quantize_weight(torch.tensor([[float("nan"), 1.0]]), INT8)


def test_k_one_is_exact():  # torch 2.13's CPU _int_mm returns wrong sums at K = 1
    qw, ws = _weight(5, 1)
    x = _x(3, 1)
    assert torch.equal(op(x, qw, ws, None, None), w8a8_linear_ref(x, qw, ws, None, None))
