"""FusedDWSepConv2d: exact BatchNorm folding, padding absorbed, state_dict round trip, the
refusals of from_modules, NCHW in / NCHW out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import compress_ops as co
from compress_ops.configs import UnfusableError
from compress_ops.nn import FusedDWSepConv2d
from compress_ops.reference import dwsep_conv2d_ref

from ..models import PaddingConv, random_bn

op = torch.ops.compress_ops.dwsep_conv2d


@pytest.mark.parametrize("acts", [(nn.ReLU6(), None), (nn.Hardswish(), nn.SiLU()),
                                  (nn.ReLU(), nn.ReLU6())])
@pytest.mark.parametrize("stride", [1, 2])
def test_bn_folding_is_exact_in_float64(acts, stride):
    torch.manual_seed(0)
    dw = nn.Conv2d(8, 8, 3, stride, 1, groups=8).double()
    pw = nn.Conv2d(8, 6, 1, bias=False).double()
    bn1, bn2 = nn.BatchNorm2d(8).double(), nn.BatchNorm2d(6, affine=False).double()
    seq = random_bn(nn.Sequential(dw, bn1, *(a for a in acts[:1]), pw, bn2,
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
    # dw_weight stays tap-major (the kernel's vector loads) through every copy a user makes
    tap_major = (1, 3 * 8, 8)
    for m in (fused, fresh, copy.deepcopy(fused), copy.deepcopy(fused).half(),
              FusedDWSepConv2d(8, 4).to(torch.bfloat16)):
        assert m.dw_weight.stride() == tap_major and m.dw_weight.shape == (8, 3, 3)
    assert fused.state_dict()["dw_weight"].stride() == tap_major



@pytest.mark.parametrize(
    ("dw", "pw", "match"),
    [
        (PaddingConv(8, 8, 3, 2, groups=8), nn.Conv2d(8, 4, 1), "not a plain nn.Conv2d"),
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



def test_nchw_models_get_nchw_outputs_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)).eval()
    co.compress_(model, co.DWSepFuseConfig())
    y = model(torch.randn(2, 4, 5, 5))
    assert y.is_contiguous() and y.view(2, -1).shape == (2, 150)
    y = model(torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
