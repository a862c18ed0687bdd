"""DWSepFuseConfig (compress_ops/fuse.py): torch.fx chains fused in place, untraceable parts,
aliases, hooks, crops, train mode and filter_fn, all reported."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.configs import UnfusableError
from compress_ops.nn import FusedDWSepConv2d

from .models import PaddingConv, random_bn

op = torch.ops.compress_ops.dwsep_conv2d


class _Mixed(nn.Module):
    """Chains in a Sequential, in a forward, behind a ZeroPad2d; a functional activation, a
    Conv2d subclass and a branch that reads the depthwise output twice."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                 nn.ReLU6(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))
        self.pad, self.dw, self.bn = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 16, 3, 2,
                                                                           groups=16), \
            nn.BatchNorm2d(16)
        self.act, self.pw = nn.Hardswish(), nn.Conv2d(16, 16, 1)
        self.dw_f, self.pw_f = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)
        self.sub, self.pw_s = PaddingConv(16, 16, 3, groups=16), nn.Conv2d(16, 16, 1)
        self.dw_twice, self.pw_t = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.seq(x)
        x = self.pw(self.act(self.bn(self.dw(self.pad(x)))))
        x = x + self.pw_f(F.relu(self.dw_f(x)))
        x = self.pw_s(self.sub(x))[..., :x.shape[2], :x.shape[3]]
        d = self.dw_twice(x)
        return self.pw_t(d) + d


def test_fuse_config_on_mixed_model_matches_and_reports():
    torch.manual_seed(0)
    model = random_bn(_Mixed())
    x = torch.randn(2, 8, 12, 12)
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig())
    assert isinstance(model.seq[0], FusedDWSepConv2d) and isinstance(model.dw, FusedDWSepConv2d)
    assert model.dw.padding == (0, 1, 0, 1) and model.dw.act1 == "hardswish"
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    notes = {r.name: r.note for r in co.report(model)}
    assert "relu is called on it" in notes["dw_f"]
    assert "Conv2d subclass" in notes["sub"]
    assert "read 2 times" in notes["dw_twice"]
    assert notes["seq.0"] == "" and notes["dw"] == ""


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 1))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.block(x)
        return self.block(-x)


def test_untraceable_parts_stay_unfused_listed_in_report_and_fuse_when_passed_directly():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    x = torch.randn(1, 8, 6, 6)
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig())
    assert not isinstance(model.block[0], FusedDWSepConv2d)  # its forward is not known
    notes = {r.name: (r.kind, r.note) for r in co.report(model)}
    assert notes[""][0] == "skipped" and "not traceable by torch.fx" in notes[""][1]
    assert "inside <root>" in notes["block.0"][1]
    co.compress_(model.block, co.DWSepFuseConfig())  # the user vouches for the submodule
    assert isinstance(model.block[0], FusedDWSepConv2d)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


class _Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)
        self.body = nn.Sequential(self.dw, nn.ReLU(), self.pw)

    def forward(self, x):
        return self.body(x)


def test_aliases_hooks_crops_train_mode_and_filter_fn():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 5)
    model = _Aliased().eval()  # a chain registered under two names: replaced at both
    ref = model(x)
    co.compress_(model, co.DWSepFuseConfig())
    assert model.dw is model.body[0] and isinstance(model.dw, FusedDWSepConv2d)
    assert model.dw.act1 == "relu"
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    # a forward pre-hook (here: TF-style padding) would be lost: refused
    hooked = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)).eval()
    hooked[0].register_forward_pre_hook(lambda m, a: (F.pad(a[0], (1, 1, 1, 1)),))
    ref = hooked(x)
    co.compress_(hooked, co.DWSepFuseConfig())
    assert "forward-pre hooks" in {r.name: r.note for r in co.report(hooked)}["0"]
    torch.testing.assert_close(hooked(x), ref)
    # a negative ZeroPad2d is a crop: it stays in front, the conv keeps its own padding
    crop = nn.Sequential(nn.ZeroPad2d((-1, 0, 0, 0)), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                         nn.Conv2d(4, 4, 1)).eval()
    ref = crop(x)
    co.compress_(crop, co.DWSepFuseConfig())
    assert isinstance(crop[0], nn.ZeroPad2d) and crop[1].padding == (1, 1, 1, 1)
    torch.testing.assert_close(crop(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(UnfusableError, match="crops"):
        FusedDWSepConv2d.from_modules(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1),
                                      pad=nn.ZeroPad2d((-1, 0, 0, 0)))
    # BatchNorm in training mode normalises with batch statistics: refused, with the reason
    train = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match=r"changed nothing: 1 depthwise convs stayed unfused "
                                         r"\(0: BatchNorm runs in training mode"):
        co.compress_(train.train(), co.DWSepFuseConfig())
    assert "model.eval()" in {r.name: r.note for r in co.report(train)}["0"]
    # nothing to fuse at all: said, never silent
    for plain in (nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Conv2d(4, 4, 3))):
        with pytest.warns(UserWarning, match="changed nothing: the model has no depthwise conv"):
            co.compress_(plain.eval(), co.DWSepFuseConfig())
    # filter_fn keeps chains unfused
    kept = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)).eval()
    co.compress_(kept, co.DWSepFuseConfig(), filter_fn=lambda m, name: name != "0")
    assert {r.name: r.note for r in co.report(kept)}["0"] == "excluded by filter_fn"


def test_a_model_compressed_first_still_fuses_and_its_compressed_layers_are_listed():
    """compress_ops.capture: the package's own modules are leaves of the trace, so a model whose
    linears were quantized (their forwards check shapes, which fx cannot trace) still fuses its
    dw + pw chains, and the channel analysis lists the compressed layers with the reason."""
    torch.manual_seed(0)
    m = random_bn(nn.Sequential(
        nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))).eval()
    x = torch.randn(2, 16, 8, 8)
    co.compress_(m, co.QuantConfig(bits=4))
    ref = m(x)
    co.compress_(m, co.DWSepFuseConfig())
    assert isinstance(m[0], FusedDWSepConv2d) and isinstance(m[3], nn.Identity)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    gm = co.capture.trace(m)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called[0] == "0" and "7" in called and "9" in called  # leaves, not traced into
    groups, skipped = co.structured.channel_groups(m, (x,))
    assert groups == []
    for name in ("0", "7", "9"):
        assert "already compressed" in skipped[name], skipped
