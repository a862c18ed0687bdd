"""Real models, built from code with random weights (no downloads): torchvision and timm
convnets through DWSepFuseConfig with example inputs. For each: how many depthwise convs exist,
how many fused, why each of the rest was not, and the fused model's output against the eval-mode
original. The README's model table is this test's table (``python -m
tests.compress_ops.test_real_models`` prints it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops.nn import FusedDWSepConv2d

from .models import random_bn


def _tv(name: str):
    return lambda **kw: getattr(pytest.importorskip("torchvision").models, name)(**kw)


def _timm(name: str):
    return lambda: pytest.importorskip("timm").create_model(name)


SE = "squeeze-excite"
SIZE = "depend on the input size"

# name -> (builder, depthwise convs, fused by default, fused with fix_input_size=True, the
# reason every other depthwise conv is left unfused)
MODELS = {
    "torchvision mobilenet_v2": (_tv("mobilenet_v2"), 17, 17, 17, None),
    "torchvision mobilenet_v3_small": (_tv("mobilenet_v3_small"), 11, 2, 2, SE),
    "torchvision efficientnet_b0": (_tv("efficientnet_b0"), 16, 0, 0, SE),
    "torchvision shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 19, 19, 19, None),
    "torchvision mnasnet0_5": (_tv("mnasnet0_5"), 17, 17, 17, None),
    "timm tf_efficientnet_lite0": (_timm("tf_efficientnet_lite0"), 16, 12, 16, SIZE),
    "timm tf_mobilenetv3_small_100": (_timm("tf_mobilenetv3_small_100"),
                                      11, 1, 2, SE),  # (and one TF padding, by default)
    "timm mobilenetv2_100": (_timm("mobilenetv2_100"), 17, 17, 17, None),
}


def _depthwise(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and m.groups > 1 and m.groups == m.in_channels == m.out_channels]


def test_real_model_libraries_are_installed():
    """CI installs them (requirements-dev.txt); only the GPU image, which brings its own torch
    without them, skips the real-model tests."""
    if torch.cuda.is_available():
        pytest.skip("the GPU image does not carry torchvision / timm / transformers")
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401


def fuse_model(name: str, fix_input_size: bool, size: int = 64):
    """(model, depthwise names, fused names, notes, max error / output scale)."""
    torch.manual_seed(0)
    model = random_bn(MODELS[name][0]()).eval()
    dws = _depthwise(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    co.compress_(model, co.DWSepFuseConfig(fix_input_size=fix_input_size), example_inputs=(x,))
    fused = [n for n, m in model.named_modules() if isinstance(m, FusedDWSepConv2d)]
    notes = {r.name: r.note for r in co.report(model)}
    with torch.no_grad():
        err = ((model(x) - ref).abs().max() / ref.abs().max()).item()
    return model, dws, fused, notes, err


@pytest.mark.slow
@pytest.mark.parametrize("name,fix_input_size", [(n, False) for n in MODELS] + [
    (n, True) for n, spec in MODELS.items() if spec[2] != spec[3]])  # (the rest: no change)
def test_real_model_fuses_what_is_exact_and_names_the_rest(name, fix_input_size):
    _, n_dw, n_default, n_fixed, reason = MODELS[name]
    model, dws, fused, notes, err = fuse_model(name, fix_input_size)
    assert len(dws) == n_dw
    assert len(fused) == (n_fixed if fix_input_size else n_default), notes
    assert set(fused) <= set(dws)  # the fused module sits where the depthwise conv was
    allowed = {reason} | (set() if fix_input_size else {SIZE})
    for dw in set(dws) - set(fused):
        assert any(r is not None and r in notes[dw] for r in allowed), (dw, notes[dw])
    assert err < 1e-5, err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm tf_efficientnet_lite0", "timm tf_mobilenetv3_small_100"])
def test_the_plain_call_without_example_inputs_fuses_what_export_would(name):
    """The call a new user makes, ``compress_(model.eval(), DWSepFuseConfig())``: torch.fx
    cannot trace these timm models (``Conv2dSame`` at the root), so the depthwise convs it
    leaves are captured with torch.export on the input timm declares (``pretrained_cfg``,
    224 x 224); as many fuse as with example_inputs, and the fused model is exact at another
    size."""
    _, n_dw, n_default, _, reason = MODELS[name]
    torch.manual_seed(0)
    model = random_bn(MODELS[name][0]()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=rf"inferred input \[1, 3, 224, 224\] \(timm "
                                         rf"pretrained_cfg\['input_size'\]\); {n_default} fused"):
        co.compress_(model, co.DWSepFuseConfig())
    fused = [n for n, m in model.named_modules() if isinstance(m, FusedDWSepConv2d)]
    assert len(fused) == n_default
    notes = {r.name: r.note for r in co.report(model)}
    for dw in set(_depthwise(model)) - set(fused):
        assert reason in notes[dw] or SIZE in notes[dw], (dw, notes[dw])
    with torch.no_grad():
        err = ((model(x) - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


@pytest.mark.slow
def test_a_model_quantized_first_still_fuses_through_export():
    """The package's own ops are captured as what they are: a model whose classifier was
    quantized first fuses every chain, and its output is unchanged by the fusion."""
    torch.manual_seed(0)
    model = random_bn(MODELS["torchvision mobilenet_v2"][0](num_classes=64)).eval()
    co.compress_(model, co.QuantConfig(bits=4))
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    assert sum(isinstance(m, FusedDWSepConv2d) for m in model.modules()) == 17
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    assert isinstance(copy.deepcopy(model), nn.Module)


# structured channel groups found on each model (torch.export capture)
GROUPS = {"torchvision mobilenet_v2": 25, "torchvision mobilenet_v3_small": 27,
          "torchvision efficientnet_b0": 40, "torchvision shufflenet_v2_x0_5": 18,
          "torchvision mnasnet0_5": 25, "timm tf_efficientnet_lite0": 24,
          "timm tf_mobilenetv3_small_100": 27, "timm mobilenetv2_100": 25}


def prune_dead_half(name: str, size: int = 64):
    """Kill every other channel of every group (producer rows and biases zero, BatchNorm mean
    and shift zero), then ``prune_channels(zero_only=True)``: (groups, skipped, channels
    removed, parameters before and after, max error / output scale, the pruned model)."""
    torch.manual_seed(0)
    model = random_bn(MODELS[name][0]()).eval()
    x = torch.randn(2, 3, size, size)
    groups, skipped = co.structured.channel_groups(model, (x,))
    with torch.no_grad():
        for g in groups:
            idx = torch.arange(0, g.width, 2)
            for p in g.producers:
                m = model.get_submodule(p)
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0
            for n in g.norms:
                bn = model.get_submodule(n)
                bn.running_mean[idx] = 0
                bn.bias[idx] = 0
        ref = model(x)
    before = sum(p.numel() for p in model.parameters())
    rep = co.structured.prune_channels(model, (x,), zero_only=True)
    after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        err = ((model(x) - ref).abs().max() / ref.abs().max()).item()
    removed = sum(b - a for _, b, a in rep.groups)
    return groups, skipped, removed, before, after, err, model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_channel_groups_remove_dead_channels_exactly(name):
    """Through module classes (timm's Conv2dSame and BatchNormAct2d: 0 groups with torch.fx),
    squeeze-excite gates coupled with the channels they scale; the pruned model keeps its
    classes and runs at another input size."""
    groups, skipped, removed, before, after, err, model = prune_dead_half(name)
    assert len(groups) == GROUPS[name]
    assert removed >= sum(g.width // 2 for g in groups) // 2 and after < before
    assert err < 1e-5, err
    assert all(reason for reason in skipped.values())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape[0] == 1


def table() -> str:
    """The README's table: depthwise convs, fused (default / fix_input_size), max error."""
    rows = ["| model | depthwise convs | fused | fused, `fix_input_size=True` | the rest | "
            "max error / output scale | channel groups | dead half removed: parameters, "
            "max error |", "|---|---|---|---|---|---|---|---|"]
    for name, (_, _, _, _, reason) in MODELS.items():
        _, dws, fused, _, err = fuse_model(name, False)
        _, _, fused_fix, _, err_fix = fuse_model(name, True)
        groups, _, _, before, after, err_p, _ = prune_dead_half(name)
        why = {SE: "squeeze-excite between dw and pw (a different chain)",
               SIZE: "padding computed from the input size (TF `Conv2dSame`)",
               None: "-"}[reason]
        if reason == SE and len(fused_fix) > len(fused):
            why += "; by default also TF `Conv2dSame` padding"
        rows.append(f"| {name} | {len(dws)} | {len(fused)} | {len(fused_fix)} | {why} | "
                    f"{max(err, err_fix):.1e} | {len(groups)} | {before / 1e6:.2f}M -> "
                    f"{after / 1e6:.2f}M, {err_p:.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
