"""dwsep_conv2d op, FusedDWSepConv2d (BatchNorm folding), DWSepFuseConfig (torch.fx chains) and
the efficient blocks of compress_ops.archs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops import archs
from compress_ops.configs import UnfusableError
from compress_ops.nn import FusedDWSepConv2d
from compress_ops.reference import dwsep_conv2d_ref

op = torch.ops.compress_ops.dwsep_conv2d


def _random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial eval statistics, so that folding is actually tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _args(dtype=torch.float32, device="cpu", grad=False, residual=True, k=3, stride=1,
          pad=(1, 1, 1, 1)):
    g = torch.Generator().manual_seed(1)

    def t(*s):
        return torch.randn(*s, generator=g).to(dtype).to(device).requires_grad_(grad)

    from compress_ops.kernels.formats.dwsep_conv import output_size
    ho, wo = output_size(7, 6, k, stride, pad)
    return (t(2, 12, 7, 6), t(12, k, k), t(12), t(10, 12), t(10),
            t(2, 10, ho, wo) if residual else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("act1", "act2", "stride", "pad"),
                         [("relu6", "none", 1, (1, 1, 1, 1)),
                          ("hardswish", "silu", 2, (0, 1, 0, 1))])
def test_op_matches_reference_on_both_backends(op_device, dtype, act1, act2, stride, pad):
    args = _args(dtype, op_device, stride=stride, pad=pad)
    y = op(*args, stride, list(pad), act1, act2)
    ref = dwsep_conv2d_ref(*args, stride, list(pad), act1, act2, dtype=torch.float64)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize(("act1", "act2"), [("relu", "none"), ("silu", "hardswish"),
                                            ("none", "relu6")])
def test_opcheck(op_device, act1, act2):
    args = _args(device=op_device, grad=True)
    torch.library.opcheck(op, (*args, 1, [1, 1, 1, 1], act1, act2))
    x, dw, _, pw, _, _ = args
    torch.library.opcheck(op, (x, dw.detach(), None, pw.detach(), None, None, 2, [0, 1, 0, 1],
                               act1, act2))


@pytest.mark.parametrize(("act1", "act2"), [("relu6", "none"), ("hardswish", "silu"),
                                            ("silu", "relu")])
def test_autograd_matches_float64(op_device, act1, act2):
    args = _args(device=op_device, grad=True, stride=2, pad=(1, 0, 0, 1))
    y = op(*args, 2, [1, 0, 0, 1], act1, act2)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = dwsep_conv2d_ref(*ref_args, 2, [1, 0, 0, 1], act1, act2)
    ref_grads = torch.autograd.grad(ref, ref_args, g.double())
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_batch_zero_and_fake_impl():
    x, dw, dwb, pw, pwb, _ = _args(residual=False)
    assert op(x[:0], dw, dwb, pw, pwb, None, 1, [1, 1, 1, 1], "relu", "none").shape == (0, 10, 7, 6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx_, fdw, fpw = (mode.from_tensor(t) for t in (x, dw, pw))
        y = op(fx_, fdw, None, fpw, None, None, 2, [1, 1, 1, 1], "relu", "none")
        assert y.shape == (2, 10, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Module: BatchNorm folding, refusals, state_dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("acts", [(nn.ReLU6(), None), (nn.Hardswish(), nn.SiLU()),
                                  (nn.ReLU(), nn.ReLU6())])
@pytest.mark.parametrize("stride", [1, 2])
def test_bn_folding_is_exact_in_float64(acts, stride):
    torch.manual_seed(0)
    dw = nn.Conv2d(8, 8, 3, stride, 1, groups=8).double()
    pw = nn.Conv2d(8, 6, 1, bias=False).double()
    bn1, bn2 = nn.BatchNorm2d(8).double(), nn.BatchNorm2d(6, affine=False).double()
    seq = _random_bn(nn.Sequential(dw, bn1, *(a for a in acts[:1]), pw, bn2,
                                   *([acts[1]] if acts[1] else [])))
    fused = FusedDWSepConv2d.from_modules(dw, pw, bn1, acts[0], bn2, acts[1])
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    # the folded parameters through the float64 reference (the op itself takes fp32/16/bf16)
    y = dwsep_conv2d_ref(x, fused.dw_weight, fused.dw_bias, fused.pw_weight, fused.pw_bias,
                         None, fused.stride, list(fused.padding), fused.act1, fused.act2)
    torch.testing.assert_close(y, seq(x), rtol=1e-12, atol=1e-12)
    # and the op on the float32 copy
    f32, x32 = copy.deepcopy(fused).float(), x.float()
    torch.testing.assert_close(f32(x32).double(), seq(x), rtol=1e-5, atol=1e-5)


def test_zero_pad_is_absorbed_and_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    pad = nn.ZeroPad2d((0, 1, 0, 1))  # TensorFlow 'same' for a stride-2 3x3
    dw, pw = nn.Conv2d(8, 8, 3, 2, groups=8), nn.Conv2d(8, 4, 1)
    fused = FusedDWSepConv2d.from_modules(dw, pw, pad=pad)
    assert fused.padding == (0, 1, 0, 1)
    x = torch.randn(1, 8, 10, 10)
    torch.testing.assert_close(fused(x), pw(dw(pad(x))), rtol=1e-5, atol=1e-5)
    torch.save(fused.state_dict(), tmp_path / "f.pt")
    fresh = FusedDWSepConv2d(8, 4, 3, 2, (0, 1, 0, 1), "none", "none")
    fresh.load_state_dict(torch.load(tmp_path / "f.pt"))
    torch.testing.assert_close(fresh(x), fused(x), rtol=0, atol=0)


class _PaddingConv(nn.Conv2d):
    """A TensorFlow-port conv that pads inside its own forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


@pytest.mark.parametrize(
    ("dw", "pw", "match"),
    [
        (_PaddingConv(8, 8, 3, 2, groups=8), nn.Conv2d(8, 4, 1), "not a plain nn.Conv2d"),
        (nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 4, 1), "not depthwise"),
        (nn.Conv2d(8, 8, 7, groups=8), nn.Conv2d(8, 4, 1), "not 3x3 or 5x5"),
        (nn.Conv2d(8, 8, 3, dilation=2, groups=8), nn.Conv2d(8, 4, 1), "dilation"),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), nn.Conv2d(8, 4, 1),
         "padding_mode"),
        (nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 3), "1x1"),
    ],
)
def test_from_modules_refuses_what_it_cannot_reproduce(dw, pw, match):
    with pytest.raises(UnfusableError, match=match):
        FusedDWSepConv2d.from_modules(dw, pw)
    with pytest.raises(UnfusableError, match="GELU"):
        FusedDWSepConv2d.from_modules(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1),
                                      act1=nn.GELU())


# --------------------------------------------------------------------------------------------
# DWSepFuseConfig on models
# --------------------------------------------------------------------------------------------


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
        self.sub, self.pw_s = _PaddingConv(16, 16, 3, groups=16), nn.Conv2d(16, 16, 1)
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
    model = _random_bn(_Mixed())
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
    assert "forward hooks" in {r.name: r.note for r in co.report(hooked)}["0"]
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
    co.compress_(train.train(), co.DWSepFuseConfig())
    assert "model.eval()" in {r.name: r.note for r in co.report(train)}["0"]
    # filter_fn keeps chains unfused
    kept = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)).eval()
    co.compress_(kept, co.DWSepFuseConfig(), filter_fn=lambda m, name: name != "0")
    assert {r.name: r.note for r in co.report(kept)}["0"] == "excluded by filter_fn"


def test_nchw_models_get_nchw_outputs_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)).eval()
    co.compress_(model, co.DWSepFuseConfig())
    y = model(torch.randn(2, 4, 5, 5))
    assert y.is_contiguous() and y.view(2, -1).shape == (2, 150)
    y = model(torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_mobilenet_v2_fused_every_way_matches_eval_model():
    torch.manual_seed(0)
    model = _random_bn(archs.mobilenet_v2(num_classes=10, width=0.35, stages=4))
    x = torch.randn(2, 3, 48, 48)
    ref = model(x)
    by_config = co.compress_(copy.deepcopy(model), co.DWSepFuseConfig())
    fused = [m for m in by_config.modules() if isinstance(m, FusedDWSepConv2d)]
    blocks = [m for m in model.modules() if isinstance(m, archs.InvertedResidual)]
    assert len(fused) == len(blocks) == 10
    torch.testing.assert_close(by_config(x), ref, rtol=1e-4, atol=1e-4)
    # the blocks' own fuse(): the shortcut is added inside the kernel too
    by_block = nn.Sequential(*(b.fuse() if isinstance(b, archs.InvertedResidual) else b
                               for b in model))
    torch.testing.assert_close(by_block(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="Recipe"):
        co.Recipe({".*": co.DWSepFuseConfig()})


def test_fused_mobilenet_compiles_fullgraph_and_matches(op_device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _random_bn(archs.mobilenet_v2(num_classes=10, width=0.35, stages=2))
    co.compress_(model, co.DWSepFuseConfig())
    model = model.to(op_device)
    x = torch.randn(1, 3, 32, 32, device=op_device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fused_block_inductor_matches_with_grad():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _random_bn(archs.InvertedResidual(8, 8, 1, 3)).fuse()
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, block(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cin", "cout", "stride"), [(48, 48, 1), (24, 96, 2)])
def test_shuffle_folding_is_equivalent(cin, cout, stride):
    torch.manual_seed(0)
    unit = _random_bn(archs.ShuffleUnit(cin, cout, groups=3, stride=stride))
    x = torch.randn(2, cin, 9, 9)
    folded = unit.fold_shuffle()
    assert folded.folded is not None and isinstance(folded.dw, nn.Identity)
    torch.testing.assert_close(folded(x), unit(x), rtol=1e-5, atol=1e-5)
    assert unit(x).shape == (2, cout, 9 // stride + (stride == 2), 9 // stride + (stride == 2))


def test_channel_shuffle_definition():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert archs.channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_fire_dense_block_and_profile_counts():
    fire = archs.Fire(16, 8, 16, 16)
    x = torch.randn(1, 16, 8, 8)
    assert fire(x).shape == (1, 32, 8, 8)
    prof = archs.profile(fire, x)
    assert prof.params == sum(p.numel() for p in fire.parameters())
    # squeeze 16->8 1x1, expand 8->16 1x1 and 8->16 3x3, on 64 pixels
    assert prof.flops == 2 * 64 * (16 * 8 + 8 * 16 + 8 * 16 * 9)
    dense = archs.DenseBlock(3, 16, 8)
    assert dense(x).shape == (1, 16 + 3 * 8, 8, 8) and dense.out_channels == 40
    block = archs.InvertedResidual(16, 16, 1, 6).eval().fuse()
    prof = archs.profile(block, x)
    fused = block.dwpw
    assert fused.flops(8, 8) == 2 * 64 * 96 * (9 + 16)
    assert prof.flops == 2 * 64 * 16 * 96 + fused.flops(8, 8)
    assert "TOTAL" in str(prof)


def test_activation_derivatives_follow_torch_at_the_kinks():
    from compress_ops.kernels.formats.dwsep_conv import ACTIVATION_FNS
    from compress_ops.ops.dwsep_conv import _act_grad

    v = torch.tensor([-6.5, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 7.0], dtype=torch.float64)
    for act in ("relu", "relu6", "hardswish", "silu"):
        vv = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(ACTIVATION_FNS[act](vv).sum(), vv)
        torch.testing.assert_close(_act_grad(v, act), g, msg=act)


def test_profile_sums_a_module_called_twice():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    twice = nn.Sequential(conv, conv)
    prof = archs.profile(twice, torch.randn(1, 4, 6, 6))
    assert prof.flops == 2 * (2 * 36 * 4 * 4 * 9)
