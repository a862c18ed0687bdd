"""compress_ops/ops/sparse24.py: sparse24_linear — op rules from ARCHITECTURE.md, routes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compress_ops  # noqa: F401  (registers the ops)
from compress_ops.kernels import sparse24 as sp
from compress_ops.kernels.formats import sparse24 as spf
from compress_ops.ops import routing
from compress_ops.reference import sparse24_linear_ref

op = torch.ops.compress_ops.sparse24_linear


def _packed(n: int, k: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = spf.prune_2to4((torch.randn(n, k, generator=g) + 0.05).to(dtype))
    values, meta = spf.pack_sparse24(w)
    return w, values, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_reference_on_both_backends(op_device, dtype):
    w, values, meta = (t.to(op_device) for t in _packed(20, 70, dtype))
    x = torch.randn(3, 5, 70).to(dtype).to(op_device)
    b = torch.randn(20).to(dtype).to(op_device)
    y = op(x, values, meta, b)
    ref = sparse24_linear_ref(x, values, meta, b, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.shape == (3, 5, 20) and y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


def test_cpu_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "cuda")
    _, values, meta = _packed(8, 32)
    with pytest.raises(ValueError, match="COMPRESS_OPS_CPU_BACKEND"):
        op(torch.randn(2, 32), values, meta, None)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(op_device, with_bias):
    _, values, meta = (t.to(op_device) for t in _packed(12, 40))
    x = torch.randn(4, 40, device=op_device, requires_grad=True)
    b = torch.randn(12, device=op_device, requires_grad=True) if with_bias else None
    torch.library.opcheck(op, (x, values, meta, b))
    torch.library.opcheck(op, (x.detach(), values.clone().requires_grad_(), meta, b))


def test_m_zero_and_leading_dims():
    _, values, meta = _packed(12, 40)
    assert op(torch.randn(0, 40), values, meta, None).shape == (0, 12)
    assert op(torch.randn(2, 0, 40), values, meta, None).shape == (2, 0, 12)
    assert op(torch.randn(40), values, meta, None).shape == (12,)


def test_autograd_matches_dense_reference():
    w, values, meta = _packed(16, 50, seed=3)
    x = torch.randn(2, 3, 50, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(16, requires_grad=True)
    v = values.clone().requires_grad_()
    y = op(x, v, meta, b)
    g = torch.randn_like(y)
    y.backward(g)

    xr = x.detach().double().requires_grad_()
    wr = w.double().requires_grad_()
    br = b.detach().double().requires_grad_()
    F.linear(xr, wr, br).backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), br.grad, rtol=1e-5, atol=1e-5)
    # values' gradient is the dense weight gradient at the kept positions
    kp = 2 * values.shape[1]
    dense_grad = F.pad(wr.grad, (0, kp - 50))
    expect = torch.gather(dense_grad, 1, spf.value_columns(meta))
    torch.testing.assert_close(v.grad.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(x=a["x"].to(torch.int64)), TypeError, "x must be float16"),
        (lambda a: a.update(x=torch.randn(3, 33)), ValueError, "K=33"),
        (lambda a: a.update(meta=a["meta"][:, :1]), ValueError, "meta shape"),
        (lambda a: a.update(values=a["values"][:5]), ValueError, "meta shape"),
        (lambda a: a.update(values=a["values"].half()), TypeError, "values dtype"),
        (lambda a: a.update(bias=torch.randn(5)), ValueError, "bias shape"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x on meta"),
        (lambda a: a.update(bias=torch.randn(12, device="meta")), ValueError, "bias on meta"),
    ],
)
def test_bad_inputs_raise_named_errors(mutate, exc, match):
    _, values, meta = _packed(12, 70)
    args = {"x": torch.randn(3, 70), "values": values, "meta": meta, "bias": torch.randn(12)}
    mutate(args)
    with pytest.raises(exc, match=match):
        op(args["x"], args["values"], args["meta"], args["bias"])


def test_fake_impl_checks_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, values, meta = _packed(12, 70)
    with FakeTensorMode() as mode:
        fv, fm = mode.from_tensor(values), mode.from_tensor(meta)
        y = op(torch.empty(5, 7, 70), fv, fm, None)
        assert y.shape == (5, 7, 12)
        with pytest.raises(ValueError, match="K=97"):
            op(torch.empty(5, 97), fv, fm, None)


def test_semi_structured_route_is_off_without_a_measured_crossover():
    from compress_ops.ops.sparse24 import _semi_structured_eligible

    _, values, meta = _packed(128, 128, torch.float16)
    assert sp.semi_structured_min_m(torch.device("cpu")) is None
    assert not _semi_structured_eligible(torch.randn(4096, 128, dtype=torch.float16), values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_route_matches_reference_when_forced(monkeypatch):
    import compress_ops.ops.sparse24 as ops_mod

    monkeypatch.setattr(sp, "semi_structured_min_m", lambda device: 1)
    _, values, meta = _packed(256, 256, torch.float16)
    values, meta = values.cuda(), meta.cuda()
    x = torch.randn(512, 256, dtype=torch.float16, device="cuda")
    assert ops_mod._semi_structured_eligible(x, values)
    try:
        y = op(x, values, meta, None)
    except RuntimeError as exc:  # no cuSPARSELt/CUTLASS 2:4 kernel in this build
        pytest.skip(f"semi-structured sparse unavailable: {exc}")
    ref = sparse24_linear_ref(x, values, meta, None, dtype=torch.float64)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3
    assert op(x, values, meta, None).data_ptr() != y.data_ptr()  # cached weight, fresh output


def test_cpu_dense_cache_is_correct_rebuilds_on_change_and_is_freed(monkeypatch):
    import gc


    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1")
    _, values, meta = _packed(16, 40, seed=5)
    x = torch.randn(3, 40)
    ref = sparse24_linear_ref(x, values, meta, None, dtype=torch.float64)
    y = op(x, values, meta, None)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert ("dense", id(values)) in routing.DERIVED
    with torch.no_grad():
        values.mul_(2.0)  # in-place change bumps the version: the cache must not go stale
    torch.testing.assert_close(op(x, values, meta, None), 2 * y)
    key = ("dense", id(values))
    del values
    gc.collect()
    assert key not in routing.DERIVED


def test_cpu_dense_cache_is_off_by_default():

    _, values, meta = _packed(16, 40, seed=6)
    op(torch.randn(2, 40), values, meta, None)
    assert ("dense", id(values)) not in routing.DERIVED


def test_cpu_dense_cache_follows_data_swaps_and_inference_tensors(monkeypatch):
    from compress_ops.nn import Sparse24Linear

    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1")
    m = Sparse24Linear.from_dense(torch.nn.Linear(40, 16))
    x = torch.randn(3, 40)
    m(x)
    m.values.data = m.values.clone() * 3  # same tensor object and version, new storage
    torch.testing.assert_close(m(x), F.linear(x, m.dense_weight(), m.bias))
    with torch.inference_mode():
        mi = Sparse24Linear.from_dense(torch.nn.Linear(40, 16))
        xi = torch.randn(3, 40)
        torch.testing.assert_close(mi(xi), F.linear(xi, mi.dense_weight(), mi.bias))
    torch.testing.assert_close(mi(xi), F.linear(xi, mi.dense_weight(), mi.bias))


def test_frozen_base_saves_no_activation_for_backward():
    _, values, meta = _packed(16, 40)
    x = torch.randn(8, 40, requires_grad=True)
    y = op(x, values, meta, None)
    assert all(t is None or t.shape != x.shape for t in y.grad_fn.saved_tensors)
    y.sum().backward()  # the activation gradient still flows
    assert x.grad is not None and x.grad.shape == x.shape
    v = values.clone().requires_grad_()
    y = op(x, v, meta, None)  # training the values needs x, so it is saved then
    assert any(t is not None and t.shape == x.shape for t in y.grad_fn.saved_tensors)


def test_cpu_path_chunks_large_weights_exactly(monkeypatch):
    monkeypatch.setattr(routing, "CPU_CHUNK_ELEMS", 64 * 64)  # force several row chunks
    _, values, meta = _packed(300, 70, seed=9)
    x, b = torch.randn(2, 3, 70), torch.randn(300)
    y = op(x, values, meta, b)
    assert y.shape == (2, 3, 300)
    torch.testing.assert_close(y, sparse24_linear_ref(x, values, meta, b), rtol=1e-6, atol=1e-6)
