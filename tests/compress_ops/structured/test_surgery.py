"""compress_ops.structured.surgery: permuting channels gives an exactly equivalent model; a
pruned model keeps dtype, training flags and requires_grad, saves, loads and trains."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from compress_ops import structured as st
from tests.compress_ops.structured.models import CNN, ResNet, mlp, randomize_bn, seed


@pytest.mark.parametrize("make", [lambda: mlp(nn.GELU), lambda: CNN(), ResNet])
def test_permuting_channels_gives_an_equivalent_model(make):
    seed(6)
    model = make().double().eval()
    randomize_bn(model)
    x = torch.randn(3, 8, dtype=torch.float64) if isinstance(model, nn.Sequential) \
        else torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = model(x)
    groups, _ = st.channel_groups(model, (x,))
    assert groups
    for g in groups:
        st.select_channels(model, g, torch.randperm(g.width))
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_pruned_model_saves_loads_and_trains():
    seed(9)
    model = ResNet().train()
    x = torch.randn(4, 3, 8, 8)
    fresh = copy.deepcopy(model)
    stats = model.block.bn2.running_mean.clone()
    st.channel_groups(model, (x,))
    assert torch.equal(model.block.bn2.running_mean, stats)  # the trace ran in eval mode
    model.block.conv1.weight.requires_grad_(False)
    report = st.prune_channels(model, (x,), 0.5)
    assert model.training and model.block.bn1.training
    assert not model.block.conv1.weight.requires_grad and model.block.conv2.weight.requires_grad
    assert model.block.conv1.weight.dtype == torch.float32
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    st.prune_channels(fresh, (x,), keep=dict(enumerate(report.kept)))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    assert model.block.conv2.weight.grad.shape == model.block.conv2.weight.shape
    assert model.block.conv1.weight.grad is None
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
