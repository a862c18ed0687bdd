"""compress_ops.structured.graph: layers whose channels cannot be proven removable (a cat, a
reshape, a sum over channels, an add with the model input, a shared module, an untraceable
model) are listed and left untouched; a transformer block prunes only its MLP hidden layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops import structured as st
from tests.compress_ops.models import Block
from tests.compress_ops.structured.models import mlp, seed, widths


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(3, 3)

    def forward(self, x):
        return self.c(self.a(x).reshape(-1, 2, 3)).flatten(1)


class SumOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(1, 3)

    def forward(self, x):
        return self.c(self.a(x).sum(1, keepdim=True))


class InputSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.c(F.relu(self.a(x) + x))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.c(self.b(self.a(self.b(x))))


@pytest.mark.parametrize(("make", "layers", "word"), [
    (Cat, ["a", "b"], "cat"), (Reshape, ["a"], "reshape"), (SumOverChannels, ["a"], "sum"),
    (InputSkip, ["a"], "model input"), (Shared, ["a", "b"], "called 2 times")])
def test_unprovable_layers_are_listed_and_left_untouched(make, layers, word):
    seed(7)
    model, x = make(), torch.randn(2, 4)
    groups, skipped = st.channel_groups(model, (x,))
    for name in layers:
        assert word in skipped[name], skipped[name]
    assert not {p for g in groups for p in g.producers} & set(layers)
    ref, before = model(x), widths(model)
    params = {n: p for n, p in model.named_parameters()}
    report = st.prune_channels(model, (x,), 0.5)
    assert report.skipped == skipped
    for name in layers:
        assert widths(model)[name] == before[name]
        assert model.get_submodule(name).weight is params[f"{name}.weight"]
    if make is Cat:
        torch.testing.assert_close(model(x), ref)


def test_transformer_block_prunes_only_the_mlp_hidden_layer():
    seed(8)
    model, x = Block(), torch.randn(2, 5, 64)
    groups, skipped = st.channel_groups(model, (x,))
    assert [(g.producers, g.consumers) for g in groups] == [(["up"], ["down"])]
    assert set(skipped) == {"q", "k", "v", "o", "down"}
    assert "view" in skipped["q"] and "model input" in skipped["o"]
    st.prune_channels(model, (x,), 0.25)
    assert model.up.out_features == model.down.in_features == 96
    assert model(x).shape == x.shape


def test_untraceable_model_is_left_as_it_is():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return self.c(h if h.sum() > 0 else -h)

    model, x = Branchy(), torch.randn(2, 4)
    groups, skipped = st.channel_groups(model, (x,))
    assert groups == [] and set(skipped) == {"a", "c"}
    assert "torch.export" in skipped["a"] and "torch.fx" in skipped["a"]
    # pruning it would silently do nothing: prune_channels and the channel Pruner raise
    with pytest.raises(st.UncapturableModel, match="no channel can be proven removable.*fx"):
        st.prune_channels(model, (x,), 0.5)
    with pytest.raises(ValueError, match="no channel can be proven removable"):
        co.prune.Pruner(model, 0.5, pattern="channel", example_inputs=(x,))
    assert model.a.out_features == 4
    model = mlp()
    model.forward = lambda x: model[0](x)  # fx would trace the class's forward instead
    assert "instance" in st.channel_groups(model, (x[:, :8].repeat(1, 2),))[1]["0"]
