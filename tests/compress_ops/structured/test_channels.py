"""compress_ops.structured.channels (prune_channels): channel groups and saliency, exact removal
of dead channels (constants folded only where exact), identity shortcuts and depthwise convs
sliced with their group, and argument validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_ops import structured as st
from tests.compress_ops.structured.models import (
    CNN,
    ResNet,
    mlp,
    randomize_bn,
    seed,
    widths,
)


def _zero_rows(layer: nn.Module, rows: list[int], bias: float | None = 0.0) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None and bias is not None:
            layer.bias[rows] = bias


def _by_producer(groups: list[st.ChannelGroup]) -> dict[str, st.ChannelGroup]:
    return {p: g for g in groups for p in g.producers}


# ---------------------------------------------------------------------- groups, saliency


def test_mlp_groups_and_half_pruning_halves_the_hidden_widths():
    seed()
    model, x = mlp(), torch.randn(5, 8)
    groups, skipped = st.channel_groups(model, (x,))
    assert [(g.producers, g.consumers, g.width) for g in groups] == [
        (["0"], ["2"], 16), (["2"], ["4"], 12)]
    assert "4" in skipped and "model output" in skipped["4"]
    before = sum(p.numel() for p in model.parameters())
    report = st.prune_channels(model, (x,), 0.5)
    assert widths(model) == {"0": (8, 8), "2": (6, 8), "4": (4, 6)}
    assert model(x).shape == (5, 4)
    assert report.params_before == before > report.params_after \
        == sum(p.numel() for p in model.parameters())
    assert [(p, b, a) for p, b, a in report.groups] == [(("0",), 16, 8), (("2",), 12, 6)]
    text = str(report)
    assert "producers" in text and "left untouched" in text and "4" in text


def test_saliency_keeps_the_strongest_rows_and_scores_override_the_weight():
    seed(1)
    model, x = mlp(), torch.randn(3, 8)
    with torch.no_grad():
        model[0].weight[[2, 7, 11]] *= 100
    report = st.prune_channels(model, (x,), {"0": 0.8})
    assert report.kept[0].tolist() == [2, 7, 11]  # round(0.8 * 16) = 13 removed
    assert report.groups[1][1:] == (12, 12)  # group without a sparsity entry stays whole
    model = mlp()
    scores = {"0": torch.zeros(16, 8)}
    scores["0"][[1, 4]] = 1.0
    report = st.prune_channels(model, (x,), {"0": 0.875}, scores=scores)
    assert report.kept[0].tolist() == [1, 4]


def test_at_least_one_channel_stays():
    model, x = mlp(), torch.randn(2, 8)
    st.prune_channels(model, (x,), 0.99)
    assert model[0].out_features == 1 and model[2].out_features == 1
    assert model(x).shape == (2, 4)


# ---------------------------------------------------------------------- exact dead removal


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Sigmoid])
def test_zero_only_mlp_removes_exactly_the_dead_rows_and_outputs_are_identical(act):
    seed(2)
    model, x = mlp(act).double(), torch.randn(7, 8, dtype=torch.float64)
    _zero_rows(model[0], [1, 5, 9])
    _zero_rows(model[2], [0, 3], bias=0.7)  # a dead row with a bias: a constant, folded
    ref = model(x)
    report = st.prune_channels(model, (x,), zero_only=True)
    assert [k.tolist() for k in report.kept] == [
        [i for i in range(16) if i not in (1, 5, 9)], [i for i in range(12) if i not in (0, 3)]]
    assert widths(model) == {"0": (13, 8), "2": (10, 13), "4": (4, 10)}
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad2", [1, 0])
def test_zero_only_cnn_with_batchnorm_folds_constants_only_where_exact(pad2):
    """conv1's dead channel 1 is 0 after BN+ReLU (removable before the padded conv2); dead
    channel 4 is a positive constant: folded into conv2's bias when conv2 does not pad, kept
    when it pads with zeros (not exact at the borders). conv2's dead channels 0 and 3 are
    constants after BN+ReLU+pool and are folded into the Linear behind the flatten."""
    seed(3)
    model = CNN(pad2).double().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _zero_rows(model.conv1, [1, 4])
    _zero_rows(model.conv2, [0, 3], bias=0.3)
    with torch.no_grad():
        model.bn1.bias[1], model.bn1.bias[4] = -5.0, 2.0
        model.bn2.bias[[0, 3]] = 1.0
    groups, skipped = st.channel_groups(model, (x,))
    g = _by_producer(groups)
    assert g["conv1"].norms == ["bn1"] and g["conv1"].consumers == ["conv2"]
    assert g["conv2"].consumers == ["fc"] and g["conv2"].columns == {"fc": 16 if pad2 else 9}
    assert set(skipped) == {"fc"}
    ref = model(x)
    report = st.prune_channels(model, (x,), zero_only=True)
    removed1 = {1} if pad2 else {1, 4}
    assert set(range(8)) - set(report.kept[0].tolist()) == removed1
    assert set(range(6)) - set(report.kept[1].tolist()) == {0, 3}
    assert model.conv1.out_channels == model.bn1.num_features == 8 - len(removed1)
    assert model.conv2.in_channels == 8 - len(removed1)
    assert model.bn2.running_mean.shape == (4,) and model.fc.in_features == 4 * (16 if pad2
                                                                                 else 9)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_zero_only_residual_block_with_conv_shortcut():
    seed(4)
    model = ResNet().double().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    groups, skipped = st.channel_groups(model, (x,))
    g = _by_producer(groups)
    assert g["block.conv2"] is g["block.shortcut.0"]
    assert sorted(g["block.conv2"].norms) == ["block.bn2", "block.shortcut.1"]
    assert g["block.conv2"].consumers == ["fc"]
    assert sorted(g["stem.0"].consumers) == ["block.conv1", "block.shortcut.0"]
    assert g["block.conv1"].consumers == ["block.conv2"]
    assert set(skipped) == {"fc"}
    _zero_rows(model.block.conv1, [0, 5])
    _zero_rows(model.block.conv2, [2, 4])
    _zero_rows(model.block.shortcut[0], [2])  # channel 4 is alive through the shortcut
    with torch.no_grad():
        model.block.bn1.bias[0], model.block.bn1.bias[5] = -5.0, 2.0  # 0 / positive constant
        model.block.bn2.bias[2] = 2.0  # a positive constant after the add: folded into fc
    ref = model(x)
    report = st.prune_channels(model, (x,), zero_only=True)
    kept = {r[0]: k.tolist() for r, k in zip(report.groups, report.kept, strict=True)}
    assert kept[("block.conv1",)] == [1, 2, 3, 4, 5, 6, 7]  # 5 is kept: conv2 pads with zeros
    assert kept[("block.conv2", "block.shortcut.0")] == [0, 1, 3, 4, 5]
    assert model.fc.in_features == model.block.shortcut[1].num_features == 5
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


class IdentityBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet2(ResNet):
    def __init__(self) -> None:
        super().__init__()
        self.block2 = IdentityBlock(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block(self.stem(x))).mean((2, 3)))


def test_identity_shortcut_couples_the_blocks_it_joins():
    seed(10)
    model = ResNet2().double().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = _by_producer(st.channel_groups(model, (x,))[0])
    assert g["block.conv2"].producers == ["block.conv2", "block.shortcut.0", "block2.conv2"]
    assert sorted(g["block.conv2"].consumers) == ["block2.conv1", "fc"]
    for layer in (model.block.conv2, model.block.shortcut[0], model.block2.conv2):
        _zero_rows(layer, [1, 3])
    with torch.no_grad():  # 0 after the first block's ReLU: block2.conv1 pads, so it must be
        model.block.bn2.bias[[1, 3]] = -5.0  # 0 there; fc folds block2's constant
    ref = model(x)
    report = st.prune_channels(model, (x,), zero_only=True)
    assert report.groups[2] == (("block.conv2", "block.shortcut.0", "block2.conv2"), 6, 4)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    st.prune_channels(model, (x,), 0.5)
    assert model.block2.bn2.num_features == model.fc.in_features == 2
    assert model(x).shape == (2, 5)


def test_depthwise_convs_are_sliced_with_their_group():
    seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = model.double().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    (g,), skipped = st.channel_groups(model, (x,))
    assert (g.producers, g.depthwise, g.norms, g.consumers) == (["0"], ["3"], ["1", "4"], ["6"])
    assert set(skipped) == {"6"}
    _zero_rows(model[0], [2, 6])
    ref = model(x)
    report = st.prune_channels(model, (x,), zero_only=True)
    assert report.kept[0].tolist() == [0, 1, 3, 4, 5, 7]
    assert model[3].groups == model[3].in_channels == model[3].out_channels == 6
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    st.prune_channels(model, (x,), 0.5)
    assert model[3].groups == 3 and model(x).shape == (2, 5)


# ---------------------------------------------------------------------- validation


def test_bad_arguments_raise():
    model, x = mlp(), torch.randn(2, 8)
    for bad in (1.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            st.prune_channels(model, (x,), bad)
    with pytest.raises(ValueError, match="sparsity"):
        st.prune_channels(model, (x,), {"0": 1.0})
    with pytest.raises(ValueError, match="unknown layers.*nope"):
        st.prune_channels(model, (x,), {"nope": 0.5})
    with pytest.raises(ValueError, match="scores"):
        st.prune_channels(model, (x,), 0.5, scores={"0": torch.ones(3)})
    with pytest.raises(ValueError, match="zero_only"):
        st.prune_channels(model, (x,), 0.5, zero_only=True)
    with pytest.raises(ValueError, match="sparsity, keep"):
        st.prune_channels(model, (x,))
    with pytest.raises(ValueError, match="keep"):
        st.prune_channels(model, (x,), keep={5: torch.tensor([0])})
    with pytest.raises(TypeError, match="tuple"):
        st.channel_groups(model, x)
    with pytest.raises(ValueError, match="example_inputs"):
        st.channel_groups(model, (torch.randn(2, 3),))
    g = st.channel_groups(model, (x,))[0][0]
    with pytest.raises(ValueError, match="repeated"):
        st.select_channels(model, g, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        st.select_channels(model, g, torch.tensor([16]))
    with pytest.raises(TypeError, match="integer"):
        st.select_channels(model, g, torch.tensor([0.0]))
    assert widths(model)["0"] == (16, 8)  # nothing was changed
    stale = copy.copy(g)
    st.select_channels(model, g, torch.tensor([0, 1]))
    assert g.width == 2 and widths(model)["2"] == (12, 2)
    with pytest.raises(ValueError, match="channel_groups again"):
        st.select_channels(model, stale, torch.tensor([0]))
