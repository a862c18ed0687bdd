"""compress_ops/archs.py: MobileNetV2 fused every way, compiled; shuffle folding, Fire, DenseBlock
and profile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import compress_ops as co
from compress_ops import archs
from compress_ops.nn import FusedDWSepConv2d

from .models import random_bn

op = torch.ops.compress_ops.dwsep_conv2d


def test_mobilenet_v2_fused_every_way_matches_eval_model():
    torch.manual_seed(0)
    model = random_bn(archs.mobilenet_v2(num_classes=10, width=0.35, stages=4))
    x = torch.randn(2, 3, 48, 48)
    ref = model(x)
    by_config = co.compress_(copy.deepcopy(model), co.DWSepFuseConfig())
    fused = [m for m in by_config.modules() if isinstance(m, FusedDWSepConv2d)]
    blocks = [m for m in model.modules() if isinstance(m, archs.InvertedResidual)]
    assert len(fused) == len(blocks) == 10
    torch.testing.assert_close(by_config(x), ref, rtol=1e-4, atol=1e-4)
    # the blocks' own fuse(): the shortcut is added inside the kernel too
    by_block = nn.Sequential(*(b.fuse() if isinstance(b, archs.InvertedResidual) else b
                               for b in model))
    torch.testing.assert_close(by_block(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="Recipe"):
        co.Recipe({".*": co.DWSepFuseConfig()})


def test_fused_mobilenet_compiles_fullgraph_and_matches(op_device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = random_bn(archs.mobilenet_v2(num_classes=10, width=0.35, stages=2))
    co.compress_(model, co.DWSepFuseConfig())
    model = model.to(op_device)
    x = torch.randn(1, 3, 32, 32, device=op_device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fused_block_inductor_matches_with_grad():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = random_bn(archs.InvertedResidual(8, 8, 1, 3)).fuse()
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, block(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cin", "cout", "stride"), [(48, 48, 1), (24, 96, 2)])
def test_shuffle_folding_is_equivalent(cin, cout, stride):
    torch.manual_seed(0)
    unit = random_bn(archs.ShuffleUnit(cin, cout, groups=3, stride=stride))
    x = torch.randn(2, cin, 9, 9)
    folded = unit.fold_shuffle()
    assert folded.folded is not None and isinstance(folded.dw, nn.Identity)
    torch.testing.assert_close(folded(x), unit(x), rtol=1e-5, atol=1e-5)
    assert unit(x).shape == (2, cout, 9 // stride + (stride == 2), 9 // stride + (stride == 2))


def test_channel_shuffle_definition():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert archs.channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_fire_dense_block_and_profile_counts():
    fire = archs.Fire(16, 8, 16, 16)
    x = torch.randn(1, 16, 8, 8)
    assert fire(x).shape == (1, 32, 8, 8)
    prof = archs.profile(fire, x)
    assert prof.params == sum(p.numel() for p in fire.parameters())
    # squeeze 16->8 1x1, expand 8->16 1x1 and 8->16 3x3, on 64 pixels
    assert prof.flops == 2 * 64 * (16 * 8 + 8 * 16 + 8 * 16 * 9)
    dense = archs.DenseBlock(3, 16, 8)
    assert dense(x).shape == (1, 16 + 3 * 8, 8, 8) and dense.out_channels == 40
    block = archs.InvertedResidual(16, 16, 1, 6).eval().fuse()
    prof = archs.profile(block, x)
    fused = block.dwpw
    assert fused.flops(8, 8) == 2 * 64 * 96 * (9 + 16)
    assert prof.flops == 2 * 64 * 16 * 96 + fused.flops(8, 8)
    assert "TOTAL" in str(prof)



def test_profile_sums_a_module_called_twice():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    twice = nn.Sequential(conv, conv)
    prof = archs.profile(twice, torch.randn(1, 4, 6, 6))
    assert prof.flops == 2 * (2 * 36 * 4 * 4 * 9)
