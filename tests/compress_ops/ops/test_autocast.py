"""Every op under torch.autocast (compress_ops/ops/autocast.py): the activation and the stored
floating-point tensors run in the context's dtype, exactly as the module converted to that
dtype would, eager and compiled, with gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops.ops.autocast import OPS

from ..models import random_bn

CONFIGS = {
    "dequant_linear": co.QuantConfig(bits=4, group_size=32),
    "codebook_linear": co.CodebookConfig(bits=4),
    "sparse24_linear": co.Sparse24Config(),
    "lowrank_linear": co.LowRankConfig(rank=8),
    "w8a8_linear": co.W8A8Config(),
    "hashed_linear": co.HashedConfig(compression=1 / 8),
}


def _model(op: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if op == "dwsep_conv2d":
        m = random_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                    nn.ReLU6(), nn.Conv2d(8, 16, 1)))
        co.compress_(m, co.DWSepFuseConfig())
        return m, torch.randn(2, 8, 6, 6)
    m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    co.compress_(m, CONFIGS[op])
    return m, torch.randn(3, 5, 64)


@pytest.mark.parametrize("op", OPS)
def test_autocast_runs_the_op_in_the_context_dtype(op):
    model, x = _model(op)
    assert any(type(m).__module__.startswith("compress_ops.nn") for m in model.modules())
    reference = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        want = reference(x.bfloat16())
    x = x.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=0)  # the same computation
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        torch._dynamo.reset()
        yc = torch.compile(model, fullgraph=True)(x)
    assert yc.dtype == torch.bfloat16
    torch.testing.assert_close(yc.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert model(x).dtype == torch.float32  # outside the context: as before
