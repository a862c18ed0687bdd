"""DWSepFuseConfig with example_inputs (compress_ops.fuse.fuse_exported): chains matched on the
ATen ops torch.export records, through Conv2d subclasses that pad in their forward (the
efficientnet-pytorch pair, written here as that package defines them), direct F.conv2d calls on
a module's parameters and wrappers; what cannot be proven exact is left with the reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
import compress_ops.fuse as fuse
from compress_ops.nn import FusedDWSepConv2d

from .models import random_bn


class Conv2dStaticSamePadding(nn.Conv2d):
    """efficientnet-pytorch's TF "same" conv for a known image size: a ZeroPad2d child computed
    once, then ``F.conv2d`` on its own parameters."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image_size=12):
        super().__init__(cin, cout, k, stride, 0, 1, groups, bias)
        oh = math.ceil(image_size / stride)
        pad = max((oh - 1) * stride + k - image_size, 0)
        self.static_padding = (nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
                               if pad > 0 else nn.Identity())

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Conv2dDynamicSamePadding(nn.Conv2d):
    """efficientnet-pytorch's TF "same" conv for any size: the padding is computed per call."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False):
        super().__init__(cin, cout, k, stride, 0, 1, groups, bias)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class MBConv(nn.Module):
    """efficientnet-pytorch's block without squeeze-excite: expand, depthwise, project."""

    def __init__(self, conv, c=8, k=3, stride=2) -> None:
        super().__init__()
        self._expand_conv = conv(c, 4 * c, 1)
        self._bn0 = nn.BatchNorm2d(4 * c)
        self._depthwise_conv = conv(4 * c, 4 * c, k, stride=stride, groups=4 * c)
        self._bn1 = nn.BatchNorm2d(4 * c)
        self._project_conv = conv(4 * c, c, 1)
        self._bn2 = nn.BatchNorm2d(c)
        self._swish0, self._swish1 = nn.SiLU(), nn.SiLU()  # (the package shares one: below)

    def forward(self, x):
        x = self._swish0(self._bn0(self._expand_conv(x)))
        x = self._swish1(self._bn1(self._depthwise_conv(x)))
        return self._bn2(self._project_conv(x))


def _fused(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, FusedDWSepConv2d)]


def _notes(model: nn.Module) -> dict[str, str]:
    return {r.name: r.note for r in co.report(model)}


@pytest.mark.parametrize("k,stride", [(3, 2), (5, 2), (3, 1)])
def test_efficientnet_pytorch_static_same_padding_fuses_and_matches(k, stride):
    torch.manual_seed(0)
    model = random_bn(MBConv(lambda *a, **kw: Conv2dStaticSamePadding(*a, **kw, image_size=12),
                             k=k, stride=stride))
    x = torch.randn(2, 8, 12, 12)
    ref = model(x)
    # without example_inputs: torch.fx sees a Conv2d subclass and leaves it, then torch.export
    # captures it on an inferred [1, 8, 224, 224] input; the padding is static, so the fused
    # module is exact at every size
    guessed = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"inferred input \[1, 8, 224, 224\].*1 fused"):
        co.compress_(guessed, co.DWSepFuseConfig())
    assert _fused(guessed) == ["_depthwise_conv"] and _notes(guessed)["_depthwise_conv"] == ""
    torch.testing.assert_close(guessed(x), ref, rtol=1e-4, atol=1e-5)
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    assert _fused(model) == ["_depthwise_conv"]
    fused = model._depthwise_conv
    pad = max((math.ceil(12 / stride) - 1) * stride + k - 12, 0)
    assert fused.padding == (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)
    assert (fused.act1, fused.act2, fused.stride) == ("silu", "none", stride)
    assert isinstance(model._bn1, nn.Identity) and isinstance(model._project_conv, nn.Identity)
    assert fused.input_size is None  # a static padding: any size runs
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert _notes(model)["_depthwise_conv"] == ""
    model(torch.randn(1, 8, 10, 14))


def test_padding_computed_from_the_input_size_needs_fix_input_size_and_is_then_guarded():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    model = random_bn(MBConv(Conv2dDynamicSamePadding))
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    assert _fused(model) == []
    note = _notes(model)["_depthwise_conv"]
    assert "Conv2dDynamicSamePadding" in note and "depend on the input size" in note
    assert "fix_input_size=True" in note
    co.compress_(model, co.DWSepFuseConfig(fix_input_size=True), example_inputs=(x,))
    assert _fused(model) == ["_depthwise_conv"]
    assert model._depthwise_conv.padding == (0, 1, 0, 1)  # TF: the extra pixel right/bottom
    assert model._depthwise_conv.input_size == (12, 12)
    assert "input size 12x12 only" in _notes(model)["_depthwise_conv"]
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fused for 12x12 inputs only"):
        model(torch.randn(2, 8, 13, 13))  # its padding would have been (1, 1, 1, 1)


def test_without_example_inputs_an_inferred_input_never_fixes_a_size():
    """No example_inputs: the inferred input captures the model, but a padding computed from
    the input size stays unfused (the inferred size is a guess), with both reasons named;
    fix_input_size=True without example_inputs is refused by name."""
    torch.manual_seed(0)
    model = random_bn(MBConv(Conv2dDynamicSamePadding))
    x = torch.randn(2, 8, 12, 12)
    ref = model(x)
    with pytest.warns(UserWarning, match="inferred input.*0 fused"):
        co.compress_(model, co.DWSepFuseConfig())
    assert _fused(model) == []
    note = _notes(model)["_depthwise_conv"]
    assert "depend on the input size" in note and "fix_input_size=True" in note
    with pytest.raises(ValueError, match="example_inputs"):
        co.compress_(model, co.DWSepFuseConfig(fix_input_size=True))
    torch.testing.assert_close(model(x), ref)


class _TokenModel(nn.Module):
    """Takes token ids: no image input can be inferred for it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.block = MBConv(Conv2dDynamicSamePadding)

    def forward(self, ids):
        return self.block(self.emb(ids).permute(0, 2, 1).reshape(ids.shape[0], 8, 2, -1))


def test_without_example_inputs_a_model_that_takes_no_image_keeps_the_fx_reasons():
    model = random_bn(_TokenModel())
    co.compress_(model, co.DWSepFuseConfig())
    assert _fused(model) == []
    note = _notes(model)["block._depthwise_conv"]
    assert "torch.fx cannot trace" in note
    assert "does not run on an inferred [1, 8, 224, 224]" in note
    assert "pass example_inputs=(x,)" in note


class _ConvBnAct(nn.Module):
    """A wrapper that owns its weight and calls F.conv2d / F.batch_norm / F.relu6 itself."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu6(self.bn(F.conv2d(x, self.weight, None, 1, 1, 1, self.weight.shape[0])))


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw, self.pw = _ConvBnAct(8), nn.Conv2d(8, 16, 1)
        self.dw2, self.pw2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)
        self.dw3, self.pw3 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.pw(self.dw(x))
        x = x + self.pw2(F.relu(self.dw2(x)))  # a functional relu in this forward
        return self.pw3(self.dw3(x) * 2)  # an op the chain cannot hold


def test_functional_convs_on_module_parameters_fuse_and_functional_links_are_refused():
    torch.manual_seed(0)
    model = random_bn(_Wrapped())
    x = torch.randn(1, 8, 7, 9)
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    assert _fused(model) == ["dw"] and model.dw.act1 == "relu6"  # the wrapper is replaced whole
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    notes = _notes(model)
    assert "relu is called in the model's own forward" in notes["dw2"]
    assert "mul" in notes["dw3"] and "before any 1x1 conv" in notes["dw3"]
    sd = model.state_dict()
    assert "dw.dw_weight" in sd and "pw.weight" not in sd


class _Leaky(nn.Module):
    """The depthwise conv's module also computes something after it; the pointwise weight is
    read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw2, self.pw2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.pw(self.dw(x))
        return self.pw2(self.dw2(x)) + F.conv2d(x, self.pw2.weight)


def test_modules_that_compute_more_than_the_chain_or_share_tensors_are_not_replaced():
    torch.manual_seed(0)
    model = _Leaky().eval()
    x = torch.randn(1, 8, 6, 6)
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    assert _fused(model) == ["dw.0"]  # dw.0 -> dw.1 (ReLU) -> pw: three modules
    notes = _notes(model)
    assert "pw2.weight is also read outside the chain" in notes["dw2"]
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    # efficientnet-pytorch calls one activation module after every BatchNorm of a block
    shared = random_bn(MBConv(nn.Conv2d, stride=1))
    shared._swish1 = shared._swish0
    co.compress_(shared, co.DWSepFuseConfig(), example_inputs=(torch.randn(1, 8, 6, 6),))
    assert _fused(shared) == []
    assert "called 2 times in the forward (a shared module)" in _notes(shared)["_depthwise_conv"]


def test_a_mismatch_after_fusing_undoes_every_swap(monkeypatch):
    torch.manual_seed(0)
    model = random_bn(MBConv(nn.Conv2d, stride=1))
    model._depthwise_conv.padding = (1, 1)
    x = torch.randn(1, 8, 6, 6)
    ref = model(x)
    build = fuse.build_fused

    def wrong(chain, tensor):  # a fusion bug: a wrong weight index
        new = build(chain, tensor)
        with torch.no_grad():
            new.pw_weight.copy_(new.pw_weight.roll(1, 0))
        return new

    monkeypatch.setattr(fuse, "build_fused", wrong)
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    assert _fused(model) == [] and type(model._project_conv) is nn.Conv2d
    assert "differs from the original" in _notes(model)["_depthwise_conv"]
    torch.testing.assert_close(model(x), ref)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw, self.pw = nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            x = -x
        return self.pw(self.dw(x))


def test_capture_failures_train_mode_and_bad_arguments_are_named():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    model = _DataDependent().eval()
    co.compress_(model, co.DWSepFuseConfig(), example_inputs=(x,))
    notes = _notes(model)
    assert _fused(model) == [] and "torch.export could not capture" in notes["dw"]
    train = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    co.compress_(train.train(), co.DWSepFuseConfig(), example_inputs=(x,))
    assert _fused(train) == [] and "model.eval()" in _notes(train)["0"]
    kept = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)).eval()
    co.compress_(kept, co.DWSepFuseConfig(), filter_fn=lambda m, name: name != "0",
                 example_inputs=(x,))
    assert _notes(kept)["0"] == "excluded by filter_fn"
    with pytest.raises(TypeError, match="tuple"):
        co.compress_(kept, co.DWSepFuseConfig(), example_inputs=[x])
    with pytest.raises(TypeError, match="DWSepFuseConfig only"):
        co.compress_(kept, co.QuantConfig(), example_inputs=(x,))
    with pytest.raises(TypeError, match="fix_input_size"):
        co.DWSepFuseConfig(fix_input_size="yes")


def test_size_dependent_reads_the_modules_own_forward():
    from compress_ops.capture import size_dependent

    assert size_dependent(nn.Conv2d(4, 4, 3)) is None
    assert size_dependent(Conv2dStaticSamePadding(4, 4, 3, 2, image_size=8)) is None
    assert "input size" in size_dependent(Conv2dDynamicSamePadding(4, 4, 3, 2))

    class ShapePad(nn.Conv2d):  # traceable, but the padding is computed from the input
        def forward(self, x):
            return super().forward(F.pad(x, (0, x.shape[-1] % 2, 0, 0)))

    assert "computes the arguments of pad" in size_dependent(ShapePad(4, 4, 3))

    class InputGroups(nn.Conv2d):  # groups from the input's channels, not from the weight
        def forward(self, x):
            return F.conv2d(x, self.weight, None, 1, 1, 1, x.shape[1])

    assert "arguments of conv2d" in size_dependent(InputGroups(4, 4, 3, groups=4))
    assert size_dependent(_ConvBnAct(4)) is None  # groups from self.weight.shape[0]: static
