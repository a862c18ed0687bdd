"""channel_groups through the torch.export capture: Conv2d subclasses that pad in their forward
(the efficientnet-pytorch pair), the surgery keeping their classes, products of channel tensors
and what stays refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_ops as co

from ..models import random_bn
from ..test_fuse_export import Conv2dDynamicSamePadding, Conv2dStaticSamePadding, MBConv


@pytest.mark.parametrize("conv", [Conv2dDynamicSamePadding, Conv2dStaticSamePadding])
def test_same_padding_subclasses_are_grouped_and_keep_their_class_when_pruned(conv):
    torch.manual_seed(0)
    model = random_bn(MBConv(conv, stride=2))
    x = torch.randn(2, 8, 12, 12)
    groups, skipped = co.structured.channel_groups(model, (x,), capture="fx")
    assert groups == [] and ("subclass" in skipped["_expand_conv"]  # static: traced into
                             or "not traceable by torch.fx" in skipped["_expand_conv"])
    groups, skipped = co.structured.channel_groups(model, (x,))
    assert len(groups) == 1
    g = groups[0]
    assert (g.producers, g.depthwise, g.norms, g.consumers) == (
        ["_expand_conv"], ["_depthwise_conv"], ["_bn0", "_bn1"], ["_project_conv"])
    assert "model output" in skipped["_project_conv"]
    with torch.no_grad():  # kill channels 0, 2, 4, ...: removing them is exact
        idx = torch.arange(0, g.width, 2)
        model._expand_conv.weight[idx] = 0
        model._bn0.running_mean[idx] = 0
        model._bn0.bias[idx] = 0
        ref = model(x)
    rep = co.structured.prune_channels(model, (x,), zero_only=True)
    assert rep.groups == [(("_expand_conv",), 32, 16)]
    assert type(model._depthwise_conv) is conv and model._depthwise_conv.groups == 16
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    model(torch.randn(1, 8, 9, 9))  # the class's own padding still runs


class _Gated(nn.Module):
    """Llama's MLP (down(silu(gate(x)) * up(x))) and a product that broadcasts the channel
    dim, which must stay refused."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 1), nn.Linear(16, 4)

    def forward(self, x):
        x = x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        return self.out(self.a(x) * self.b(x))


def test_products_couple_their_factors_and_a_broadcast_channel_dim_is_refused():
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(3, 5, 8)
    groups, skipped = co.structured.channel_groups(model, (x,))
    assert [(g.producers, g.consumers) for g in groups] == [(["gate", "up"], ["down"])]
    assert "multiplies tensors of different shapes" in skipped["a"]
    ref = model(x)
    with torch.no_grad():
        model.gate.weight[::2] = 0
        model.gate.bias[::2] = 0  # silu(0) * up = 0: dead
        model.up.weight[::2] = 0
        model.up.bias[::2] = 0
        ref = model(x)
    rep = co.structured.prune_channels(model, (x,), zero_only=True)
    assert rep.groups == [(("gate", "up"), 16, 8)]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="capture must be"):
        co.structured.channel_groups(model, (x,), capture="jit")


class _Attention(nn.Module):
    """Self-attention whose forward infers the head count (``-1``), or fixes it
    (``fixed_heads``: ``view(B, S, 4, -1)`` would silently re-split fewer rows into 4 heads), or
    fixes the merged width (``fixed_width``: ``reshape(B, S, 64)`` fails once heads are gone)."""

    def __init__(self, fixed_heads: bool = False, fixed_width: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(64, 64) for _ in range(4))
        self.fixed_heads, self.fixed_width = fixed_heads, fixed_width

    def forward(self, x):
        b, s, _ = x.shape

        def split(z):
            shape = (b, s, 4, -1) if self.fixed_heads else (b, s, -1, 16)
            return z.view(*shape).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)),
                                                       split(self.v(x)))
        a = a.transpose(1, 2)
        return x + self.o(a.reshape(b, s, 64) if self.fixed_width else a.reshape(b, s, -1))


def test_heads_whose_count_the_forward_fixes_are_refused_or_put_back():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    groups, _ = co.structured.channel_groups(_Attention(), (x,))
    assert [(g.unit, g.producers, g.width, g.rows["q"], g.columns["o"]) for g in groups] == [
        ("head", ["q", "k", "v"], 4, 16, 16)]
    model = _Attention(fixed_heads=True)
    groups, skipped = co.structured.channel_groups(model, (x,))
    assert groups == [] and "fixed number of heads (4)" in skipped["q"]
    model = _Attention(fixed_width=True)
    ref = model(x)
    params = {n: p for n, p in model.named_parameters()}
    rep = co.structured.prune_channels(model, (x,), sparsity=0.5)
    assert rep.groups == [(("q", "k", "v"), 4, 4)] and "failed to run" in rep.skipped["q"]
    assert all(p is params[n] for n, p in model.named_parameters())  # put back as it was
    torch.testing.assert_close(model(x), ref)
    model = _Attention()
    rep = co.structured.prune_channels(model, (x,), sparsity=0.5)
    assert rep.groups == [(("q", "k", "v"), 4, 2)] and model.q.out_features == 32
    assert model(x).shape == x.shape
