"""compress_ops.prune.Pruner: masks applied during training stay applied, the gradual schedule
hits its targets at the right steps, and finalize keeps the masked model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_ops import distill, prune
from compress_ops.nn import Sparse24Linear
from compress_ops.structured import channel_groups, select_channels


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(),
                         nn.Linear(24, 4))


def _data(n: int = 64, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1))
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_masks_stay_applied_and_only_grow_under_adam_momentum():
    model = _mlp()
    pruner = prune.Pruner(model, 0.75, schedule=(0, 12), update_every=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    history = []

    def on_step(*_):
        pruner.step()
        history.append({k: v.clone() for k, v in pruner.masks.items()})

    distill.fit(model, None, _data(), 20, opt, progress=False, on_step=on_step)
    for before, after in zip(history, history[1:], strict=False):
        for key in before:  # a pruned weight never comes back
            assert not (after[key] & ~before[key]).any()
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    model = pruner.finalize()
    for (name, _), keep in masks.items():
        w = model.get_submodule(name).weight
        assert type(model.get_submodule(name)) is nn.Linear  # plain module again
        assert (w[~keep] == 0).all()
        assert (w[keep] != 0).all()  # the kept weights trained
        assert (~keep).sum() == round(0.75 * w.numel())


def test_weights_used_twice_before_backward_get_correct_gradients():
    model = _mlp()
    ref = copy.deepcopy(model)
    pruner = prune.Pruner(model, 0.5)
    with torch.no_grad():
        for (name, _), keep in pruner.masks.items():
            ref.get_submodule(name).weight.mul_(keep)
    x1, x2 = torch.randn(3, 16), torch.randn(3, 16)
    (model(x1).sum() + model(x2).sum()).backward()
    (ref(x1).sum() + ref(x2).sum()).backward()
    for (name, _), keep in pruner.masks.items():
        g = model.get_submodule(name).parametrizations.weight.original.grad
        torch.testing.assert_close(g, ref.get_submodule(name).weight.grad * keep)


def test_pruner_lifecycle_errors_and_masks_are_buffers():
    model = _mlp()
    pruner = prune.Pruner(model, 0.5)
    assert any(n.endswith("keep") for n, _ in model.named_buffers())  # they follow .to()
    pruner.remove()
    with pytest.raises(RuntimeError, match="removed"):
        pruner.step()
    pruner = prune.Pruner(model, 0.5)
    pruner.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.finalize()


def test_gradual_schedule_hits_its_targets_at_the_right_steps():
    model = _mlp()
    pruner = prune.Pruner(model, 0.9, schedule=(2, 10), update_every=2)
    assert pruner.sparsity() == 0.0  # before start
    seen = {}
    for step in range(1, 13):
        pruner.step()
        seen[step] = pruner.sparsity()
    assert seen[1] == 0.0
    assert seen[4] == pytest.approx(prune.cubic_sparsity(4, 2, 10, 0.9), abs=0.01)
    assert seen[6] == pytest.approx(prune.cubic_sparsity(6, 2, 10, 0.9), abs=0.01)
    assert seen[10] == pytest.approx(0.9, abs=0.01) and seen[12] == seen[10]
    assert seen[5] == seen[4]  # masks change only every update_every steps
    values = list(seen.values())
    assert values == sorted(values)  # masks only grow


def test_global_scope_and_criteria():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(100)
    pruner = prune.Pruner(model, 0.5, scope="global")
    keep = {n: k for (n, _), k in pruner.masks.items()}
    assert keep["2"].float().mean() > keep["0"].float().mean()
    model = _mlp()
    calib = _data()
    wanda = prune.Pruner(model, 0.5, criterion="wanda", calib=calib)
    obd = prune.Pruner(_mlp(), 0.5, criterion="obd", calib=calib, loss_fn=F.cross_entropy)
    for p in (wanda, obd):
        assert p.sparsity() == pytest.approx(0.5, abs=1e-2)
    # wanda: a dead input feature (zero activations) is pruned first
    model = _mlp()
    data = [(x * torch.tensor([0.0] + [1.0] * 15), y) for x, y in calib]
    wanda = prune.Pruner(model, 0.1, criterion="wanda", calib=data, layers=["0"])
    assert not wanda.masks[("0", "weight")][:, 0].any()


def test_2_4_finalize_gives_sparse24_modules_with_the_masked_outputs():
    model = _mlp()
    pruner = prune.Pruner(model, None, pattern="2:4", layers=["0", "2"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    distill.fit(model, None, _data(), 5, opt, progress=False, on_step=pruner.step)
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
    model = pruner.finalize()
    assert isinstance(model[0], Sparse24Linear) and isinstance(model[2], Sparse24Linear)
    assert type(model[4]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


class _Aliased(nn.Module):
    """One nn.Linear registered under two names (``a`` and ``b``) and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(16, 16)
        self.a = shared
        self.b = shared
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


def test_2_4_finalize_swaps_an_aliased_linear_in_at_every_name():
    torch.manual_seed(0)
    model = _Aliased()
    pruner = prune.Pruner(model, None, pattern="2:4")
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
    model = pruner.finalize()
    assert isinstance(model.a, Sparse24Linear) and model.a is model.b  # one module, both names
    assert isinstance(model.head, Sparse24Linear)
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_unstructured_finalize_keeps_outputs_and_removes_hooks():
    model = _mlp()
    pruner = prune.Pruner(model, 0.6)
    x = torch.randn(4, 16)
    ref = model(x)
    model = pruner.finalize()
    torch.testing.assert_close(model(x), ref)
    assert type(model[0]) is nn.Linear  # no parametrization left
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    assert (model(x) != ref).any()


def test_pruner_bad_input():
    model = _mlp()
    for bad in (-0.1, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="sparsity"):
            prune.Pruner(model, bad)
    with pytest.raises(ValueError, match="pattern"):
        prune.Pruner(model, 0.5, pattern="rows")
    with pytest.raises(ValueError, match="fixed sparsity"):
        prune.Pruner(model, 0.5, pattern="2:4")
    with pytest.raises(ValueError, match="calib"):
        prune.Pruner(model, 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="loss_fn"):
        prune.Pruner(model, 0.5, criterion="obd", calib=_data())
    with pytest.raises(ValueError, match="not Linear"):
        prune.Pruner(model, 0.5, layers=["fc9"])
    with pytest.raises(ValueError, match="schedule"):
        prune.Pruner(model, 0.5, schedule=(5, 5))
    with pytest.raises(ValueError, match="example_inputs"):
        prune.Pruner(model, 0.5, pattern="channel")
    with pytest.raises(ValueError, match="expected"):
        prune.Pruner(model, 0.5, criterion=lambda n, m: torch.ones(3))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_channel_pattern_masks_groups_and_finalize_removes_them_exactly():
    torch.manual_seed(0)
    model = _randomize_bn(_CNN()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pruner = prune.Pruner(model, 0.5, pattern="channel", example_inputs=(x,))
    produced = {p for g in pruner.groups for p in g.producers}
    assert produced == {"conv1", "conv2", "fc"}  # the head's outputs are the model's
    # train a few steps with BN in train mode: masked channels stay exactly zero
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = [(torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,)))
            for _ in range(3)]
    distill.fit(model, None, data, 6, opt, progress=False, on_step=pruner.step)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model = pruner.finalize()
    assert (model.conv1.out_channels, model.conv2.out_channels, model.fc.out_features) \
        == (4, 6, 8)
    assert model.bn1.num_features == 4 and model.fc.in_features == 6 * 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_2_4_with_permutation_keeps_more_saliency_and_stays_closer_to_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 8))
    with torch.no_grad():  # inputs 0..7 of layer 2 matter most: identity grouping wastes them
        model[2].weight[:, :8] *= 10
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = model(x)
    plain = prune.Pruner(copy.deepcopy(model), None, pattern="2:4")
    pruner = prune.Pruner(model, None, pattern="2:4", example_inputs=(x,), permute=True)
    assert set(pruner.permuted) == {"2", "4"}
    assert "0" in pruner.skipped  # fed by the model input: nothing to fold into
    for before, after in pruner.permuted.values():
        assert after >= before
    before, after = pruner.permuted["2"]
    assert after > 1.2 * before
    with torch.no_grad():
        err_plain = (plain.model(x) - ref).norm()
        err_perm = (model(x) - ref).norm()
    assert err_perm < 0.9 * err_plain


def test_permutation_alone_is_an_exact_reparametrisation():
    torch.manual_seed(0)
    model = _randomize_bn(_CNN()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    groups, _ = channel_groups(model, (x,))
    (g,) = [g for g in groups if g.producers == ["fc"]]
    perm = prune.nm_permutation(model.head.weight.detach().abs())
    assert not torch.equal(perm, torch.arange(16))
    select_channels(model, g, perm)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_schedule_reaches_its_target_when_the_end_is_not_an_update_step():
    pruner = prune.Pruner(_mlp(), 0.8, schedule=(0, 7), update_every=5)
    for _ in range(7):
        pruner.step()
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)


def test_channel_finalize_folds_constants_of_dead_channels_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 12), nn.Softplus(),
                          nn.Linear(12, 3)).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    pruner = prune.Pruner(model, 0.5, pattern="channel", example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    model = pruner.finalize()
    assert (model[0].out_features, model[2].out_features) == (8, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_channel_finalize_keeps_what_it_cannot_fold_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sigmoid(), nn.Conv2d(8, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruner = prune.Pruner(model, 0.5, pattern="channel", example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    model = pruner.finalize()
    # sigmoid(0) = 0.5 is not constant through a zero-padded conv: those channels stay
    assert model[0].out_channels == 8 and "cannot be folded" in pruner.skipped["0"]
    assert model[2].out_channels == 2  # ReLU(0) = 0: removed
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.head(F.relu(h + self.b(h)))


def test_channel_layers_must_name_whole_coupled_groups():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"coupled with \['a', 'b'\]|coupled with \['b', 'a'\]"):
        prune.Pruner(_Residual(), 0.5, pattern="channel", example_inputs=(x,), layers=["b"])
    with pytest.raises(ValueError, match="model output"):
        prune.Pruner(_Residual(), 0.5, pattern="channel", example_inputs=(x,), layers=["head"])
    pruner = prune.Pruner(_Residual(), 0.5, pattern="channel", example_inputs=(x,),
                          layers=["a", "b"])
    keep = pruner.masks
    torch.testing.assert_close(keep[("a", "bias")], keep[("b", "bias")])  # one shared mask


def test_permute_with_a_one_shot_calibration_iterator():
    model = _mlp()
    calib = iter(_data())
    pruner = prune.Pruner(model, None, pattern="2:4", criterion="wanda", calib=calib,
                          example_inputs=(torch.randn(2, 16),), permute=True)
    assert pruner.permuted and pruner.sparsity() == pytest.approx(0.5)


def test_channel_layers_naming_a_depthwise_conv_is_a_clear_error():
    from compress_ops.archs import mobilenet_v2

    model = mobilenet_v2(num_classes=10, width=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    dw = next(n for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels)
    with pytest.raises(ValueError, match="depthwise conv, its channels follow"):
        prune.Pruner(model, 0.5, pattern="channel", example_inputs=(x,), layers=[dw])


def test_permute_names_why_conv_consumers_are_not_permuted():
    model = _CNN()
    pruner = prune.Pruner(model, None, pattern="2:4", example_inputs=(torch.randn(2, 3, 8, 8),),
                          permute=True, layers=["conv2", "fc", "head"])
    assert "linear consumers only" in pruner.skipped["conv2"]
    assert "1:1" in pruner.skipped["fc"]  # after a flatten
    assert "head" in pruner.permuted


class _TiedLM(nn.Module):
    """An LM head tied to the embedding (Hugging Face's tie_word_embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(32, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, t):
        return self.head(torch.relu(self.fc(self.embed(t))))


def test_a_tied_weight_is_never_pruned_as_compress_keeps_it():
    torch.manual_seed(0)
    model = _TiedLM()
    table = model.embed.weight.detach().clone()
    pruner = prune.Pruner(model, None, pattern="2:4")
    assert list(pruner.layers) == ["fc"]
    assert pruner.skipped["head"] == "weight tied to embed; pruning would change it too"
    pruner.finalize()
    assert torch.equal(model.embed.weight, table) and model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match=r"\['head'\] have a weight tied to another module"):
        prune.Pruner(_TiedLM(), None, pattern="2:4", layers=["head"])
