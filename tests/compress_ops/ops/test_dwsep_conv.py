"""compress_ops::dwsep_conv2d: the op against its float64 reference on both CPU backends, opcheck,
autograd (activation kinks included), batch 0 and the fake impl."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from compress_ops.reference import dwsep_conv2d_ref

op = torch.ops.compress_ops.dwsep_conv2d


def _args(dtype=torch.float32, device="cpu", grad=False, residual=True, k=3, stride=1,
          pad=(1, 1, 1, 1)):
    g = torch.Generator().manual_seed(1)

    def t(*s):
        return torch.randn(*s, generator=g).to(dtype).to(device).requires_grad_(grad)

    from compress_ops.kernels.formats.dwsep_conv import output_size
    ho, wo = output_size(7, 6, k, stride, pad)
    return (t(2, 12, 7, 6), t(12, k, k), t(12), t(10, 12), t(10),
            t(2, 10, ho, wo) if residual else None)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("act1", "act2", "stride", "pad"),
                         [("relu6", "none", 1, (1, 1, 1, 1)),
                          ("hardswish", "silu", 2, (0, 1, 0, 1))])
def test_op_matches_reference_on_both_backends(op_device, dtype, act1, act2, stride, pad):
    args = _args(dtype, op_device, stride=stride, pad=pad)
    y = op(*args, stride, list(pad), act1, act2)
    ref = dwsep_conv2d_ref(*args, stride, list(pad), act1, act2, dtype=torch.float64)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize(("act1", "act2"), [("relu", "none"), ("silu", "hardswish"),
                                            ("none", "relu6")])
def test_opcheck(op_device, act1, act2):
    args = _args(device=op_device, grad=True)
    torch.library.opcheck(op, (*args, 1, [1, 1, 1, 1], act1, act2))
    x, dw, _, pw, _, _ = args
    torch.library.opcheck(op, (x, dw.detach(), None, pw.detach(), None, None, 2, [0, 1, 0, 1],
                               act1, act2))


@pytest.mark.parametrize(("act1", "act2"), [("relu6", "none"), ("hardswish", "silu"),
                                            ("silu", "relu")])
def test_autograd_matches_float64(op_device, act1, act2):
    args = _args(device=op_device, grad=True, stride=2, pad=(1, 0, 0, 1))
    y = op(*args, 2, [1, 0, 0, 1], act1, act2)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = dwsep_conv2d_ref(*ref_args, 2, [1, 0, 0, 1], act1, act2)
    ref_grads = torch.autograd.grad(ref, ref_args, g.double())
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_batch_zero_and_fake_impl():
    x, dw, dwb, pw, pwb, _ = _args(residual=False)
    assert op(x[:0], dw, dwb, pw, pwb, None, 1, [1, 1, 1, 1], "relu", "none").shape == (0, 10, 7, 6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx_, fdw, fpw = (mode.from_tensor(t) for t in (x, dw, pw))
        y = op(fx_, fdw, None, fpw, None, None, 2, [1, 1, 1, 1], "relu", "none")
        assert y.shape == (2, 10, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Module: BatchNorm folding, refusals, state_dict
# --------------------------------------------------------------------------------------------



def test_activation_derivatives_follow_torch_at_the_kinks():
    from compress_ops.kernels.formats.dwsep_conv import ACTIVATION_FNS
    from compress_ops.ops.dwsep_conv import _act_grad

    v = torch.tensor([-6.5, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 7.0], dtype=torch.float64)
    for act in ("relu", "relu6", "hardswish", "silu"):
        vv = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(ACTIVATION_FNS[act](vv).sum(), vv)
        torch.testing.assert_close(_act_grad(v, act), g, msg=act)
