"""Binary (QuantConfig(bits=1)) and ternary (TernaryConfig) weights: the absmean grids against
a float64 reference, compress_ then forward on both CPU backends, QAT whose forward is the
finalized module's weight, and the named refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.kernels.formats.dequant import affine_bytes, dequantize
from compress_ops.quantize import quantize_absmean
from tests.kernels.tolerances import rel_err, tol


def _ref_levels(w: torch.Tensor, levels: str, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: per group of ``gs`` columns (the last one ragged), the mean |w| rounded to
    ``w.dtype`` and the levels in {-1, 0, 1}."""
    n, k = w.shape
    w64 = w.double()
    scales, out = [], torch.empty_like(w64)
    for c0 in range(0, k, gs):
        g = w64[:, c0:c0 + gs]
        s = g.abs().mean(1).to(w.dtype).double()
        scales.append(s)
        if levels == "binary":
            t = torch.where(g >= 0, 1.0, -1.0).double()
        else:
            r = g / torch.where(s > 0, s, 1.0)[:, None]
            t = torch.sign(r) * torch.floor(r.abs() + 0.5)  # ties away from zero...
            t = torch.where((r.abs() - 0.5).abs() < 1e-12, torch.zeros_like(t), t)  # ...but
            t = t.clamp(-1, 1)                                  # 0.5 rounds to even (0)
        out[:, c0:c0 + gs] = t
    return out, torch.stack(scales, 1)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_absmean_levels_and_scales_match_float64(levels, group_size, dtype):
    torch.manual_seed(0)
    w = (torch.randn(12, 70) * torch.linspace(0.05, 2, 12)[:, None]).to(dtype)
    w[3] = 0.0
    qw = quantize_absmean(w, levels, group_size)
    gs = qw.group_size
    t, s = _ref_levels(w, levels, gs if group_size else 70)
    assert qw.scales.dtype == dtype
    if levels == "binary":  # 1-bit fields: W = (q - 1/2) * 2s, q in {0, 1}
        assert qw.bits == 1 and qw.zeros is None  # the symmetric 1-bit grid: z = 1/2
        # the same weight as an asymmetric grid with its zero points 1/2 stored
        half = torch.full_like(qw.scales, 0.5)
        assert torch.equal(dequantize(qw.qweight, qw.scales, None, 1, gs, 70),
                           dequantize(qw.qweight, qw.scales, half, 1, gs, 70))
        assert torch.equal(qw.scales.double()[:, :s.shape[1]], 2 * s)
        assert qw.qweight.shape == (12, -(-70 // gs) * gs // 32)
    else:
        assert qw.bits == 2 and qw.zeros is None
        assert torch.equal(qw.scales.double()[:, :s.shape[1]], s)
    deq = dequantize(qw.qweight, qw.scales, qw.zeros, qw.bits, gs, 70, dtype=torch.float64)
    # the stored dtype's own dequantization is exactly +-s too (2s and q - 0.5 are exact)
    assert torch.equal(dequantize(qw.qweight, qw.scales, qw.zeros, qw.bits, gs, 70).double(),
                       deq)
    want = t * s.repeat_interleave(gs if group_size else 70, 1)[:, :70]
    torch.testing.assert_close(deq, want, rtol=0, atol=0)
    assert (deq[3] == 0).all()  # a zero row stays zero
    used = set(t.unique().tolist())
    assert used <= ({-1.0, 1.0} if levels == "binary" else {-1.0, 0.0, 1.0})


def test_absmean_refuses_nonfinite_weights_and_unknown_levels():
    with pytest.raises(co.UnsupportedWeight):
        quantize_absmean(torch.tensor([[float("nan"), 1.0]]), "ternary")
    with pytest.raises(ValueError, match="levels"):
        quantize_absmean(torch.ones(2, 2), "quaternary")


@pytest.mark.parametrize("cfg", [co.TernaryConfig(), co.TernaryConfig(group_size=32),
                                 co.QuantConfig(bits=1, group_size=None),
                                 co.QuantConfig(bits=1, group_size=64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_compress_then_forward_on_both_backends(op_device, cfg, dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(70, 24), nn.ReLU(), nn.Linear(24, 8)).to(dtype)
    co.compress_(model, cfg)
    layer = model[0]
    binary = getattr(cfg, "bits", 2) == 1
    assert isinstance(layer, co.nn.QuantLinear) and layer.bits == (1 if binary else 2)
    assert layer.symmetric  # no zero points stored (binary: z = 1/2 implied)
    gs = layer.group_size
    two_bit = affine_bytes(24, 70, 2, gs, dtype, symmetric=True)  # binary's bytes before
    if binary:  # half the fields of 2 bits, the same scales
        assert layer.stored_weight_bytes() == affine_bytes(24, 70, 1, gs, dtype,
                                                           symmetric=True) < two_bit
        assert 2 * layer.qweight.nbytes == 24 * (-(-70 // gs) * gs) * 2 // 8
        assert two_bit - layer.stored_weight_bytes() == layer.qweight.nbytes
    else:
        assert layer.stored_weight_bytes() == two_bit
    note = {r.name: r.note for r in co.report(model)}["0"]
    assert note.startswith("binary" if getattr(cfg, "bits", 2) == 1 else "ternary")
    x = torch.randn(3, 70).to(dtype).to(op_device)
    model = model.to(op_device)
    y = model[0](x)
    ref = F.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
    assert rel_err(y, ref) <= tol(dtype, 70)
    fresh = co.nn.QuantLinear(70, 24, bits=layer.bits, group_size=layer.group_size,
                              symmetric=layer.symmetric, dtype=dtype)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.to(op_device)(x), y)
    if binary:  # the format record names the width: a 2-bit state_dict is refused
        other = co.nn.QuantLinear(70, 24, bits=2, group_size=layer.group_size, symmetric=True,
                                  dtype=dtype)
        with pytest.raises(ValueError, match="bits=2"):
            fresh.load_state_dict(other.state_dict())


@pytest.mark.parametrize("cfg", [co.TernaryConfig(group_size=32),
                                 co.QuantConfig(bits=1, group_size=32)], ids=str)
def test_qat_forward_is_the_finalized_weight_and_training_moves_it(cfg):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    co.qat.prepare_qat(model, cfg)
    fake = model[0]
    x = torch.randn(128, 64)
    target = (x[:, :4] * 3).argmax(1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    before = fake.quantized_weight().clone()
    for _ in range(30):
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fake.quantized_weight()
    assert not torch.equal(before, after)
    groups = after.abs().reshape(32, 2, 32)  # every weight is its group's +-s (or 0: ternary)
    s = groups.amax(-1, keepdim=True)
    on_grid = (groups == s) if isinstance(cfg, co.QuantConfig) else (groups == s) | (groups == 0)
    assert on_grid.all()
    packed = fake.finalize()
    assert torch.equal(packed.dense_weight(), after)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, after, fake.bias), rtol=1e-5,
                                   atol=1e-5)


def test_config_refusals():
    with pytest.raises(ValueError, match="bits=1"):
        co.QuantConfig(bits=1, method="gptq")
    with pytest.raises(ValueError, match="group_size"):
        co.TernaryConfig(group_size=48)
    with pytest.raises(ValueError, match="refresh_every must be 1"):
        co.qat.prepare_qat(nn.Sequential(nn.Linear(8, 4)), co.TernaryConfig(), refresh_every=4)
    model = nn.Sequential(nn.Linear(8, 4))
    ternary = copy.deepcopy(model)
    co.compress_(ternary, co.TernaryConfig())
    w = ternary[0].dense_weight()
    s = model[0].weight.detach().abs().mean(1)
    assert torch.allclose(w.abs().amax(1), s) or (w == 0).all()
