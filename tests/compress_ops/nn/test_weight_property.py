"""Every compressed module answers ``.weight`` like the layer it replaced: a decompressed copy
(``dense_weight()``) with the original's shape, dtype and device; it cannot be assigned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops.nn import FusedDWSepConv2d

LINEAR_CONFIGS = [co.QuantConfig(bits=4, group_size=32), co.Sparse24Config(),
                  co.LowRankConfig(rank=8), co.CodebookConfig(bits=4)]


@pytest.mark.parametrize("config", LINEAR_CONFIGS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_is_the_decompressed_copy(config, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(dtype)
    new = co.compress_(lin, config)
    w = new.weight
    assert w.shape == lin.weight.shape and w.dtype == dtype and w.device == lin.weight.device
    assert torch.equal(w, new.dense_weight())
    with pytest.raises(AttributeError):
        new.weight = torch.zeros_like(w)
    with pytest.raises(KeyError, match="already exists"):
        new.weight = nn.Parameter(torch.zeros_like(w))
    assert "weight" not in new.state_dict()


def test_tucker_conv_weight_and_hf_style_reads():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    new = co.compress_(nn.Sequential(conv), co.LowRankConfig(rank=4))[0]
    assert type(new).__name__ == "LowRankConv2d"
    assert new.weight.shape == conv.weight.shape and new.weight.dtype == conv.weight.dtype
    x = torch.randn(2, 16, 8, 8)
    # code outside the project: F.conv2d with the module's .weight gives its output
    ref = nn.functional.conv2d(x, new.weight, new.bias, padding=1)
    torch.testing.assert_close(new(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["tucker", "shared"])
def test_compressed_convs_answer_every_conv2d_attribute_a_reference_reads(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, dilation=1)
    if kind == "tucker":
        new = co.compress_(nn.Sequential(conv), co.LowRankConfig(rank=4))[0]
    else:
        new = co.nn.SharedFilterConv2d.from_dense(conv, filters=8)
    x = torch.randn(2, 16, 9, 9)
    ref = nn.functional.conv2d(x, new.weight, new.bias, new.stride, new.padding, new.dilation,
                               new.groups)
    torch.testing.assert_close(new(x), ref, rtol=1e-4, atol=1e-4)
    assert new.groups == conv.groups and new.weight.shape == conv.weight.shape


def test_fused_unit_has_no_single_weight():
    m = FusedDWSepConv2d(8, 16)
    assert not hasattr(m, "weight") and hasattr(m, "dw_weight")


def test_lowrank_base_is_base_weight_and_old_state_dicts_load():
    m = co.nn.LowRankLinear(16, 12, rank=4, base=True)
    with torch.no_grad():
        m.base_weight.normal_()
    sd = m.state_dict()
    assert "base_weight" in sd and "weight" not in sd
    old = {("weight" if k == "base_weight" else k): v for k, v in sd.items()}
    fresh = co.nn.LowRankLinear(16, 12, rank=4, base=True)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.base_weight, m.base_weight)
    torch.testing.assert_close(m.weight, m.u @ m.v + m.base_weight)


def test_hf_vit_with_a_factorized_patch_embedding_runs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=96)
    model = transformers.ViTModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    co.compress_(model, co.LowRankConfig(rank=16, patch_embeddings=True))
    proj = model.embeddings.patch_embeddings.projection
    assert type(proj).__name__ == "LowRankConv2d"
    out = model(x).last_hidden_state  # ViT reads projection.weight.dtype
    assert out.shape == (2, 17, 64) and torch.isfinite(out).all()
