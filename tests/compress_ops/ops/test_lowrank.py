"""compress_ops/ops/lowrank.py: lowrank_linear — op rules from ARCHITECTURE.md, routes, autograd."""

from __future__ import annotations

import pytest
import torch

import compress_ops  # noqa: F401  (registers the ops)
import compress_ops.ops as ops_mod
from compress_ops.kernels.formats import lowrank as lrf
from compress_ops.reference import lowrank_linear_ref

op = torch.ops.compress_ops.lowrank_linear


def _args(n=24, k=70, r=5, base=False, bias=True, dtype=torch.float32, device="cpu", seed=0,
          grad=False):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        x = (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)
        return x.requires_grad_(grad)

    u, v = t(n, r, scale=r**-0.5), t(r, k, scale=k**-0.5)
    w = t(n, k, scale=k**-0.5) if base else None
    b = t(n) if bias else None
    return u, v, w, b


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("r", [1, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_reference_on_both_backends(op_device, base, r, dtype):
    u, v, w, b = _args(r=r, base=base, dtype=dtype, device=op_device)
    x = torch.randn(3, 5, 70).to(dtype).to(op_device)
    y = op(x, u, v, w, b)
    ref = lowrank_linear_ref(x, u, v, w, b, dtype=torch.float64)
    assert y.shape == (3, 5, 24) and y.dtype == dtype
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(op_device, base, with_bias):
    u, v, w, b = _args(n=16, k=64, r=3, base=base, bias=with_bias, device=op_device, grad=True)
    x = torch.randn(4, 64, device=op_device, requires_grad=True)
    torch.library.opcheck(op, (x, u, v, w, b))
    torch.library.opcheck(op, (x.detach(), u, v.detach(), None, None))


def test_m_zero_and_leading_dims():
    u, v, w, b = _args(base=True)
    assert op(torch.randn(0, 70), u, v, w, b).shape == (0, 24)
    assert op(torch.randn(2, 0, 70), u, v, None, None).shape == (2, 0, 24)
    assert op(torch.randn(70), u, v, None, b).shape == (24,)


@pytest.mark.parametrize(("n", "k"), [(0, 5), (4, 0)])
def test_empty_weights_forward_and_backward(op_device, n, k):
    x = torch.randn(2, 3, k, device=op_device, requires_grad=True)
    u = torch.randn(n, 2, device=op_device, requires_grad=True)
    v = torch.randn(2, k, device=op_device, requires_grad=True)
    b = torch.randn(n, device=op_device, requires_grad=True)
    y = op(x, u, v, None, b)
    assert y.shape == (2, 3, n)
    torch.testing.assert_close(y, b.detach().expand(2, 3, n))
    y.sum().backward()
    assert x.grad.shape == x.shape and u.grad.shape == u.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("base", [False, True])
def test_autograd_for_x_factors_base_and_bias_matches_float64(op_device, base):
    u, v, w, b = _args(n=20, k=50, r=6, base=base, device=op_device, seed=3, grad=True)
    x = torch.randn(2, 3, 50, device=op_device, requires_grad=True)
    y = op(x, u, v, w, b)
    g = torch.randn_like(y)
    y.backward(g)
    leaves = [t for t in (x, u, v, w, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, ur, vr, *rest = ref_leaves
    wr = rest[0] if base else None
    br = rest[-1]
    lowrank_linear_ref(xr, ur, vr, wr, br, dtype=torch.float64).backward(g.double())
    for t, tr in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(t.grad.double(), tr.grad, rtol=1e-4, atol=1e-4)


def test_fine_tuning_only_the_factors_keeps_no_base_gradient():
    u, v, w, b = _args(base=True, grad=False)
    u.requires_grad_()
    x = torch.randn(4, 70)
    op(x, u, v, w, b).sum().backward()
    assert u.grad is not None and v.grad is None and w.grad is None


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(v=torch.randn(4, 70)), ValueError, "share a rank"),
        (lambda a: a.update(x=torch.randn(3, 33)), ValueError, "K=33"),
        (lambda a: a.update(x=torch.randn(3, 70).double()), TypeError, "x must be float16"),
        (lambda a: a.update(u=a["u"].half(), v=a["v"].half()), TypeError, "u dtype"),
        (lambda a: a.update(weight=torch.randn(24, 7)), ValueError, "weight shape"),
        (lambda a: a.update(bias=torch.randn(5)), ValueError, "bias shape"),
        (lambda a: a.update(x=torch.randn(3, 70, device="meta")), ValueError,
         "x on meta but u and v on cpu"),
    ],
)
def test_bad_inputs_raise_named_errors(mutate, exc, match):
    u, v, _, b = _args()
    args = {"x": torch.randn(3, 70), "u": u, "v": v, "weight": None, "bias": b}
    mutate(args)
    with pytest.raises(exc, match=match):
        op(*args.values())


def test_fake_impl_checks_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    u, v, w, _ = _args(base=True)
    with FakeTensorMode() as mode:
        fu, fv, fw = (mode.from_tensor(t) for t in (u, v, w))
        assert op(torch.empty(5, 7, 70), fu, fv, fw, None).shape == (5, 7, 24)
        with pytest.raises(ValueError, match="K=97"):
            op(torch.empty(5, 97), fu, fv, None, None)


def test_routes(monkeypatch):
    u, v, w, _ = _args(r=8, base=True)
    x = torch.randn(4, 70)
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
    assert ops_mod.lowrank_route(x, u, None) == "unfused"
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "triton")
    if __import__("os").environ.get("TRITON_INTERPRET") == "1":
        assert ops_mod.lowrank_route(x, u, w) == "fused"
    # ranks past the kernel's limit always take two GEMMs, on every backend
    big_u, big_v, _, _ = _args(r=lrf.MAX_RANK + 1)
    assert ops_mod.lowrank_route(x, big_u, None) == "unfused"


def test_ranks_past_the_kernel_limit_run_unfused_on_the_triton_backend(op_device):
    u, v, _, b = _args(n=8, k=300, r=lrf.MAX_RANK + 44, device=op_device)
    x = torch.randn(3, 300, device=op_device)
    ref = lowrank_linear_ref(x, u, v, None, b, dtype=torch.float64)
    assert _rel(op(x, u, v, None, b), ref) < 1e-5
