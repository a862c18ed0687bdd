"""``compress_`` keeps the state of what it replaces, or refuses with the reason (issue 13,
items 5 and 6): train/eval mode, frozen parameters, bias ties, hooks, float64 layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops.qat import prepare_qat

CONFIGS = [co.Sparse24Config(), co.QuantConfig(4, 32), co.CodebookConfig(4),
           co.LowRankConfig(rank=4), co.DWSepFuseConfig()]
IDS = [type(c).__name__ for c in CONFIGS]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 32))


def _replaced(model: nn.Module) -> list[str]:
    return [r.name for r in co.report(model) if r.kind != "dense"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("training", [False, True])
def test_train_eval_mode_is_kept(cfg, training):
    model = _model().train(training)
    co.compress_(model, cfg)
    assert _replaced(model), "nothing was compressed: the test is void"
    assert all(m.training is training for m in model.modules())


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_frozen_layers_stay_frozen(cfg):
    model = _model()
    model.requires_grad_(False)
    co.compress_(model, cfg)
    assert _replaced(model)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=IDS[:4])
def test_trainable_bias_is_the_same_parameter(cfg):
    model = _model()
    bias = model[7].bias
    co.compress_(model, cfg)
    assert "7" in _replaced(model)
    assert model[7].bias is bias and bias.requires_grad  # optimizer references stay valid


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=IDS[:4])
def test_bias_tie_is_kept(cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1].bias = model[0].bias
    co.compress_(model, cfg)
    assert _replaced(model) == ["0", "1"]
    assert model[0].bias is model[1].bias
    with torch.no_grad():
        model[0].bias.add_(1.0)  # one edit reaches both layers, as before compressing
    assert torch.equal(model[0].bias, model[1].bias)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=IDS[:4])
def test_hooked_layers_stay_dense_with_the_reason(cfg, kind):
    model = _model()
    calls = []
    getattr(model[7], f"register_{kind}_hook")(lambda *a: calls.append(1))
    co.compress_(model, cfg)
    notes = {r.name: r.note for r in co.report(model)}
    assert type(model[7]) is nn.Linear and "hooks" in notes["7"]
    assert "5" in _replaced(model)  # the unhooked layers still compress
    model(torch.randn(2, 8, 4, 4)).sum().backward()
    assert calls


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_float64_layers_stay_dense_and_run(cfg):
    model = _model().double().eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    ref = model(x)
    co.compress_(model, cfg)
    notes = {r.name: r.note for r in co.report(model) if r.kind == "dense"}
    assert any("float64" in note for note in notes.values())
    kinds = {r.kind for r in co.report(model)}
    assert kinds <= {"dense", "tucker2"}  # Tucker-2 is plain ATen convs: it runs in float64
    y = model(x)
    assert y.dtype == torch.float64
    if kinds == {"dense"}:
        torch.testing.assert_close(y, ref)


def test_float64_module_constructors_name_the_dtype():
    for build in (lambda: co.nn.QuantLinear(64, 8, dtype=torch.float64),
                  lambda: co.nn.Sparse24Linear(64, 8, dtype=torch.float64),
                  lambda: co.nn.CodebookLinear(64, 8, dtype=torch.float64),
                  lambda: co.nn.LowRankLinear(64, 8, 4, dtype=torch.float64)):
        with pytest.raises(co.UnsupportedModule, match="float64 weights"):
            build()


def test_prepare_qat_keeps_state():
    model = _model().eval()
    model[5].requires_grad_(False)
    bias = model[7].bias
    prepare_qat(model, co.QuantConfig(4, 32))
    assert all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model[5].parameters())
    assert model[7].bias is bias
