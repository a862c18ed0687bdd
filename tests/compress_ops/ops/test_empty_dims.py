"""Empty dimensions at the op level (issue 13, item 9), for every op: an empty batch (M = 0 rows,
B = 0 images, an empty conv output) gives the empty result on every route; an empty weight
dimension (N, K, rank, channels, codebook row groups) is refused by the input checks with a
ValueError naming it, by the real op and by its fake impl alike."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import compress_ops  # noqa: F401  (registers the ops)
from compress_ops import quantize as qz
from compress_ops.kernels.formats import sparse24 as spf
from compress_ops.kernels.formats.hashed import HASH_VERSION
from compress_ops.ops import routing

ops = torch.ops.compress_ops


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.2 + 0.01).to(dtype)


# One small weight per op (N = 16 out features, K = 40 in features), as the op's arguments
# after x.
def _sparse24(dtype=torch.float32):
    values, meta = spf.pack_sparse24(spf.prune_2to4(_rand(16, 40, dtype=dtype)))
    return values, meta, _rand(16, seed=1, dtype=dtype)


def _affine(bits=4, group=32, sym=False, dtype=torch.float32):
    a = qz.quantize_affine(_rand(16, 40, dtype=dtype), bits, group, symmetric=sym)
    return a.qweight, a.scales, a.zeros, _rand(16, seed=1, dtype=dtype), a.bits, a.group_size


def _codebook(dtype=torch.float32):
    w = _rand(16, 40, dtype=dtype)
    cb = qz.fit_codebook([w], 4, 2)
    return qz.encode_codebook(w, cb, 4).indices, cb, _rand(16, seed=1, dtype=dtype), 4


def _lowrank(dtype=torch.float32):
    return (_rand(16, 3, dtype=dtype), _rand(3, 40, seed=2, dtype=dtype),
            _rand(16, 40, seed=3, dtype=dtype), _rand(16, seed=1, dtype=dtype))


def _hashed(dtype=torch.float32):
    return _rand(50, dtype=dtype), _rand(16, seed=1, dtype=dtype), 16, 40, 7, HASH_VERSION


def _dwsep(dtype=torch.float32):
    return (_rand(6, 3, 3, dtype=dtype), _rand(6, seed=1, dtype=dtype),
            _rand(4, 6, seed=2, dtype=dtype), _rand(4, seed=3, dtype=dtype))


LINEAR = {
    "sparse24_linear": (ops.sparse24_linear, _sparse24, "sparse24"),
    "dequant_linear": (ops.dequant_linear, _affine, "dequant"),
    "codebook_linear": (ops.codebook_linear, _codebook, "dequant"),
    "lowrank_linear": (ops.lowrank_linear, _lowrank, "lowrank"),
    "hashed_linear": (ops.hashed_linear, _hashed, "hashed"),
}


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernel families whose Triton launchers the ops called."""
    calls: list[str] = []
    real = routing.kernels
    monkeypatch.setattr(routing, "kernels", lambda family: calls.append(family) or real(family))
    return calls


def _on(args: tuple, device: str) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# --------------------------------------------------------------------------------------------
# M = 0 works on every route
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ops_take_an_empty_batch(op_device, launches, name, lead, dtype):
    op, weight, family = LINEAR[name]
    args = _on(weight(dtype=dtype), op_device)
    x = torch.randn(*lead, 40).to(dtype).to(op_device)
    y = op(x, *args)
    assert y.shape == (*lead, 16) and y.dtype == dtype and y.device == x.device
    triton = op_device == "cuda" or routing.cpu_backend() == "triton"
    assert launches == ([family] if triton else [])


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_ops_take_an_empty_batch_with_gradients(name):
    op, weight, _ = LINEAR[name]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in weight())
    x = torch.randn(0, 40, requires_grad=True)
    y = op(x, *args)
    y.sum().backward()
    assert x.grad.shape == (0, 40)
    for a in args:
        if isinstance(a, torch.Tensor) and a.grad is not None:
            assert a.grad.shape == a.shape and not a.grad.count_nonzero()


@pytest.mark.parametrize("name", list(LINEAR))
def test_opcheck_at_an_empty_batch(op_device, name):
    """The fake impl and the real op agree on M = 0 (shape, strides, autograd)."""
    op, weight, _ = LINEAR[name]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and name != "dequant_linear" else a for a in _on(weight(), op_device))
    x = torch.randn(2, 0, 40, device=op_device, requires_grad=True)
    torch.library.opcheck(op, (x, *args))


@pytest.mark.parametrize("env", [{}, {"COMPRESS_OPS_CPU_DENSE_CACHE": "1"}])
def test_sparse24_cpu_routes_take_an_empty_batch(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(routing, "CPU_CHUNK_ELEMS", 64)  # several row chunks
    assert ops.sparse24_linear(torch.randn(0, 40), *_sparse24()).shape == (0, 16)


@pytest.mark.parametrize(("bits", "group", "sym", "route"),
                         [(8, None, True, "native-int8"), (4, 32, False, "native-int4"),
                          (2, 32, True, "dequant"), (3, 32, False, "dense-cache")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_cpu_routes_take_an_empty_batch(monkeypatch, bits, group, sym, route, dtype):
    import compress_ops.ops as ops_mod

    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
    if route == "dense-cache":
        monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1")
    native = {(bits, d): 2**62 for d in (torch.float32, torch.bfloat16)}
    monkeypatch.setattr(routing, "NATIVE_MAX_M", {} if route == "dequant" else native)
    args = _affine(bits, group, sym, dtype)
    x = torch.randn(2, 0, 40).to(dtype)
    assert ops_mod.dequant_cpu_route(x, args[0], args[2], bits, args[5]) == route
    assert ops.dequant_linear(x, *args).shape == (2, 0, 16)


def test_codebook_dense_cache_takes_an_empty_batch(monkeypatch):
    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1")
    assert ops.codebook_linear(torch.randn(0, 40), *_codebook()).shape == (0, 16)


# dw+pw conv: x [B, 6, H, W] -> [B, 4, Ho, Wo]; (B, H, W, stride, padding, (Ho, Wo))
EMPTY_CONVS = [
    (0, 7, 5, 1, (1, 1, 1, 1), (7, 5)),  # no images
    (2, 2, 5, 1, (0, 0, 0, 0), (0, 3)),  # the padded input is one row short of the kernel
    (2, 0, 5, 1, (1, 1, 1, 1), (0, 5)),  # no rows at all, 'same' padding
    (2, 5, 1, 2, (0, 1, 0, 1), (2, 0)),  # stride 2, no output columns
]


def _conv_case(case, dtype=torch.float32, device="cpu", residual=True):
    b, h, w, stride, padding, (ho, wo) = case
    dw, dwb, pw, pwb = _on(_dwsep(dtype), device)
    x = torch.randn(b, 6, h, w).to(dtype).to(device)
    res = torch.randn(b, 4, ho, wo).to(dtype).to(device) if residual else None
    return (x, dw, dwb, pw, pwb, res, stride, list(padding), "relu6", "silu"), (b, 4, ho, wo)


def _grads(args: tuple) -> tuple:
    """``args`` with every tensor a fresh leaf that requires grad."""
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a
                 for a in args)


@pytest.mark.parametrize("case", EMPTY_CONVS[:1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dwsep_takes_an_empty_batch(op_device, launches, case, dtype):
    args, shape = _conv_case(case, dtype, op_device)
    y = ops.dwsep_conv2d(*args)
    assert y.shape == shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    triton = op_device == "cuda" or routing.cpu_backend() == "triton"
    assert launches == (["dwsep_conv"] if triton else [])
    if dtype == torch.float32:
        torch.library.opcheck(ops.dwsep_conv2d, _grads(args))


@pytest.mark.parametrize("case", EMPTY_CONVS[1:])
def test_dwsep_triton_takes_an_empty_output(monkeypatch, launches, case):
    if not torch.cuda.is_available():
        monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "triton")
    args, shape = _conv_case(case, device="cuda" if torch.cuda.is_available() else "cpu")
    y = ops.dwsep_conv2d(*args)
    assert launches == ["dwsep_conv"]
    assert y.shape == shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.dwsep_conv2d, _grads(args))


@pytest.mark.parametrize("case", EMPTY_CONVS[1:])
def test_dwsep_cpu_takes_an_empty_output(monkeypatch, case):
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
    args, shape = _conv_case(case)
    leaves = [t.requires_grad_() for t in args[:6]]
    y = ops.dwsep_conv2d(*args)
    assert y.shape == shape and y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)
    torch.library.opcheck(ops.dwsep_conv2d, _grads(args))


def test_dwsep_fake_impl_gives_the_empty_shapes():
    cases = [_conv_case(case) for case in EMPTY_CONVS]
    with FakeTensorMode() as mode:
        for args, shape in cases:
            fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            y = ops.dwsep_conv2d(*fake)
            assert y.shape == shape and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("h", "w", "padding", "match"),
                         [(0, 5, (2, 2, 2, 2), "H=0"), (4, 0, (2, 2, 1, 1), "W=0"),
                          (1, 5, (0, 0, 0, 0), "smaller than the padded kernel")])
def test_dwsep_refuses_outputs_an_empty_or_too_small_input_cannot_give(h, w, padding, match):
    dw, dwb, pw, pwb = _dwsep()
    with pytest.raises(ValueError, match=match):
        ops.dwsep_conv2d(torch.randn(2, 6, h, w), dw, dwb, pw, pwb, None, 1, list(padding),
                         "relu", "none")


# --------------------------------------------------------------------------------------------
# Empty weight dimensions: named ValueErrors, from the op and from its fake impl
# --------------------------------------------------------------------------------------------


def _named(op: str, dim: str) -> str:
    return re.escape(f"{op}: {dim} must be >= 1, got 0")


def _i32(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.int32)


def _x(k: int) -> torch.Tensor:
    return torch.randn(2, k)


# name -> (op, arguments (built when the test runs), the message)
EMPTY_WEIGHTS = {
    "sparse24 N": (ops.sparse24_linear, lambda: (_x(40), torch.zeros(0, 32), _i32(0, 2), None),
                   _named("sparse24_linear", "N (values.shape[0])")),
    "sparse24 packed K": (ops.sparse24_linear,
                          lambda: (_x(0), torch.zeros(4, 0), _i32(4, 0), None),
                          _named("sparse24_linear", "K (values.shape[1] = Kp/2)")),
    "sparse24 K": (ops.sparse24_linear, lambda: (_x(0), *_sparse24()[:2], None),
                   _named("sparse24_linear", "K (x.shape[-1])")),
    "dequant N": (ops.dequant_linear,
                  lambda: (_x(40), _i32(0, 8), torch.ones(0, 2), None, None, 4, 32),
                  _named("dequant_linear", "N (qweight.shape[0])")),
    "dequant packed K": (ops.dequant_linear,
                         lambda: (_x(0), _i32(4, 0), torch.ones(4, 0), None, None, 4, 32),
                         _named("dequant_linear", "K (qweight.shape[1] = Kp*bits/32)")),
    "dequant K": (ops.dequant_linear, lambda: (_x(0), *_affine()[:3], None, 4, 32),
                  _named("dequant_linear", "K (x.shape[-1])")),
    "codebook N": (ops.codebook_linear,
                   lambda: (_x(40), _i32(0, 8), torch.randn(1, 16), None, 4),
                   _named("codebook_linear", "N (indices.shape[0])")),
    "codebook packed K": (ops.codebook_linear,
                          lambda: (_x(0), _i32(4, 0), torch.randn(1, 16), None, 4),
                          _named("codebook_linear", "K (indices.shape[1] = Kp*bits/32)")),
    "codebook R": (ops.codebook_linear,
                   lambda: (_x(40), _i32(4, 8), torch.randn(0, 16), None, 4),
                   _named("codebook_linear", "R (codebook.shape[0], row groups)")),
    "codebook K": (ops.codebook_linear, lambda: (_x(0), *_codebook()[:2], None, 4),
                   _named("codebook_linear", "K (x.shape[-1])")),
    "lowrank r": (ops.lowrank_linear,
                  lambda: (_x(40), torch.randn(4, 0), torch.randn(0, 40), None, None),
                  _named("lowrank_linear", "r (u.shape[1])")),
    "hashed N": (ops.hashed_linear, lambda: (_x(40), torch.randn(8), None, 0, 40, 0, HASH_VERSION),
                 _named("hashed_linear", "out_features")),
    "hashed K": (ops.hashed_linear, lambda: (_x(0), torch.randn(8), None, 4, 0, 0, HASH_VERSION),
                 _named("hashed_linear", "in_features")),
    "hashed B": (ops.hashed_linear,
                 lambda: (_x(40), torch.randn(0), None, 4, 40, 0, HASH_VERSION),
                 _named("hashed_linear", "buckets (w.numel())")),
    "dwsep C": (ops.dwsep_conv2d,
                lambda: (torch.randn(2, 0, 7, 5), torch.randn(0, 3, 3), None, torch.randn(4, 0),
                         None, None, 1, [1, 1, 1, 1], "relu", "none"),
                _named("dwsep_conv2d", "C (x.shape[1])")),
    "dwsep Cout": (ops.dwsep_conv2d,
                   lambda: (torch.randn(2, 6, 7, 5), torch.randn(6, 3, 3), None,
                            torch.randn(0, 6), None, None, 1, [1, 1, 1, 1], "relu", "none"),
                   _named("dwsep_conv2d", "Cout (pw_weight.shape[0])")),
}


@pytest.mark.parametrize("case", list(EMPTY_WEIGHTS))
def test_empty_weight_dimensions_are_refused_by_name(op_device, case):
    op, args, match = EMPTY_WEIGHTS[case]
    with pytest.raises(ValueError, match=match):
        op(*_on(args(), op_device))


@pytest.mark.parametrize("case", list(EMPTY_WEIGHTS))
def test_fake_impls_refuse_empty_weight_dimensions_by_name(case):
    op, args, match = EMPTY_WEIGHTS[case]
    args = args()
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(ValueError, match=match):
            op(*fake)
