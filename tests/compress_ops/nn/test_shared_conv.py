"""SharedFilterConv2d (shared filters within a layer) and SharedFilterConfig through compress_ /
report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.configs import SharedFilterConfig, UnsupportedWeight
from compress_ops.nn.shared_conv import (
    SHARED_FILTER_DEFAULTS,
    SharedFilterConv2d,
    assign_dtype,
    cluster_filters,
)

from ..models import PaddingConv


def _reference(m: SharedFilterConv2d, x: torch.Tensor) -> torch.Tensor:
    """The dense conv (an nn.Conv2d of the same hyperparameters) with ``m.dense_weight()``."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                     m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode,
                     device="meta")
    return conv._conv_forward(x, m.dense_weight(), m.bias)


def _randomize(m: SharedFilterConv2d, seed: int = 0) -> SharedFilterConv2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


CONV_KW = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 1, "stride": 2},
    {"kernel_size": (3, 5), "padding": (2, 1), "dilation": 2},
    {"kernel_size": 3, "padding": "same", "dilation": (1, 2)},
    {"kernel_size": 4, "padding": "same"},  # asymmetric 'same' padding
    {"kernel_size": 3, "padding": "valid", "stride": (2, 1)},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "stride": 2},
    {"kernel_size": 3, "padding": 1, "padding_mode": "replicate", "bias": False},
    {"kernel_size": 1},
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv_kw", CONV_KW)
def test_forward_is_the_dense_conv_of_its_dense_weight(conv_kw):
    # ragged: 7 inputs, 13 outputs, 5 shared filters (5 does not divide 13)
    torch.manual_seed(0)
    conv = nn.Conv2d(7, 13, **conv_kw).double()
    m = SharedFilterConv2d.from_dense(conv, filters=5)
    assert m.filters == 5 and m.bank.shape == (5, 7, *m.kernel_size)
    x = torch.randn(2, 7, 11, 10, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-12, atol=1e-12)
    # random non-zero values in every tensor (not the clustered ones), unbatched input too
    _randomize(m, 1)
    torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x[0]), _reference(m, x[0]), rtol=1e-12, atol=1e-12)
    # float32: within float rounding
    m32 = copy.deepcopy(m).float()
    torch.testing.assert_close(m32(x.float()), _reference(m, x).float(), rtol=1e-4, atol=1e-4)


def test_dense_weight_is_scaled_bank_filters_and_the_sizes_are_exact():
    m = SharedFilterConv2d(6, 10, 3, filters=4, padding=1)
    w = m.dense_weight()
    for o in range(10):
        torch.testing.assert_close(w[o], m.scale[o] * m.bank[int(m.assign[o])])
    assert m.stored_params() == 4 * 6 * 9 + 10
    assert m.dense_params() == 10 * 6 * 9
    assert m.assign.dtype == torch.uint8  # one byte per channel up to 256 filters
    assert m.stored_weight_bytes() == (4 * 6 * 9 + 10) * 4 + 10
    assert m.dense_weight_bytes() == 10 * 6 * 9 * 4
    assert sum(p.numel() for p in m.parameters()) == m.stored_params() + 10  # + bias
    assert (assign_dtype(256), assign_dtype(257), assign_dtype(2**15),
            assign_dtype(2**15 + 1)) == (torch.uint8, torch.int16, torch.int16, torch.int32)
    assert m.weight.shape == (10, 6, 3, 3) and m.kind == "shared_filter"


def test_fresh_module_has_a_seeded_balanced_assignment_and_sign_scales():
    m = SharedFilterConv2d(8, 30, 3, filters=7, seed=3)
    counts = torch.bincount(m.assign.long(), minlength=7)
    assert counts.min() >= 30 // 7 and counts.max() <= 30 // 7 + 1 and counts.sum() == 30
    assert set(m.scale.detach().tolist()) <= {-1.0, 1.0}
    same = SharedFilterConv2d(8, 30, 3, filters=7, seed=3)
    other = SharedFilterConv2d(8, 30, 3, filters=7, seed=4)
    assert torch.equal(m.assign, same.assign) and torch.equal(m.scale, same.scale)
    assert not torch.equal(m.assign, other.assign)
    assert torch.count_nonzero(m.bias) == 0
    assert not m.assign.requires_grad
    assert {n for n, _ in m.named_parameters()} == {"bank", "scale", "bias"}


def test_from_dense_recovers_shared_filters_and_error_falls_as_filters_grow():
    # a conv built from 6 filters (random signs and scales) is recovered exactly with 6
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 24, 3).double()
    base = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 6, (24,), generator=g)
    idx[:6] = torch.arange(6)
    s = torch.randn(24, generator=g, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(base[idx] * s[:, None, None, None])
    m = SharedFilterConv2d.from_dense(conv, filters=6)
    assert m.relative_error(conv.weight) < 1e-10
    assert "weight error" in m.note
    # a random conv: the relative weight error falls as F grows, 0 at F = C_out
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 48, 3)
    errs = [SharedFilterConv2d.from_dense(conv, filters=f).relative_error(conv.weight)
            for f in (1, 4, 12, 24, 40, 48)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-5 and errs[0] < 1.0
    # deterministic
    a = SharedFilterConv2d.from_dense(conv, filters=12)
    b = SharedFilterConv2d.from_dense(conv, filters=12)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.bank, b.bank)


def test_cluster_filters_scales_are_least_squares_and_the_fit_is_sign_blind():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20, 12, generator=g, dtype=torch.float64)
    w[10:] = -3.0 * w[:10]  # the negatives of the first ten, scaled: same clusters
    centers, assign, scale = cluster_filters(w, 10)
    torch.testing.assert_close(centers.norm(dim=1), torch.ones(10, dtype=torch.float64))
    assert torch.equal(assign[:10], assign[10:])
    torch.testing.assert_close(scale[10:], -3.0 * scale[:10])
    torch.testing.assert_close(scale, (w * centers[assign]).sum(1))


def test_gradients_match_the_dense_reference_in_float64():
    torch.manual_seed(0)
    m = _randomize(SharedFilterConv2d(3, 5, 3, filters=2, stride=2, padding=1,
                                      padding_mode="reflect", dtype=torch.float64))
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    params = (m.bank, m.scale, m.bias)

    def run(x, bank, scale, bias):
        return torch.func.functional_call(m, {"bank": bank, "scale": scale, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(run, (x, *params))
    # against the dense reference's gradients
    gy = torch.randn_like(m(x))
    got = torch.autograd.grad(m(x), (x, *params), gy)
    want = torch.autograd.grad(_reference(m, x), (x, *params), gy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_compile_parity_and_to_dtype():
    torch.manual_seed(0)
    m = SharedFilterConv2d.from_dense(nn.Conv2d(6, 11, 3, padding=1, stride=2), filters=4)
    x = torch.randn(2, 6, 9, 9)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-6, atol=1e-6)
    compiled(x).sum().backward()
    assert m.bank.grad is not None and m.scale.grad is not None and m.bias.grad is not None
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert half.bank.dtype == half.scale.dtype == half.weight_dtype == torch.bfloat16
    assert half.assign.dtype == torch.uint8 and torch.equal(half.assign, m.assign)
    assert half.stored_weight_bytes() == (4 * 6 * 9 + 11) * 2 + 11
    torch.testing.assert_close(half(x.bfloat16()).float(), m(x), rtol=5e-2, atol=5e-2)


def test_autocast_runs_it_as_the_converted_module():
    torch.manual_seed(0)
    m = SharedFilterConv2d.from_dense(nn.Conv2d(6, 10, 3, padding=1), filters=3)
    x = torch.randn(2, 6, 7, 7)
    with torch.autocast("cpu", torch.bfloat16):
        y = m(x)
        ref = nn.Conv2d(6, 10, 3, padding=1)(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    conv = copy.deepcopy(m).to(torch.bfloat16)
    torch.testing.assert_close(y, conv(x.bfloat16()), rtol=0, atol=0)


def test_state_dict_round_trip_into_a_fresh_module(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(9, 21, (3, 2), padding=(1, 0), padding_mode="circular")
    m = SharedFilterConv2d.from_dense(conv, filters=8)
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    assert set(m.state_dict()) == {"bank", "scale", "assign", "bias"}
    fresh = SharedFilterConv2d(**m.init_args(), seed=5)
    assert not torch.equal(fresh.assign, m.assign)  # a different random assignment ...
    fresh.load_state_dict(torch.load(path))
    assert torch.equal(fresh.assign, m.assign)  # ... replaced by the stored one
    x = torch.randn(2, 9, 7, 6)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    # on the meta device (as co.load builds modules), then assigned
    meta = SharedFilterConv2d(**m.init_args(), device="meta")
    meta.load_state_dict(m.state_dict(), assign=True)
    torch.testing.assert_close(meta(x), m(x), rtol=0, atol=0)
    # an int64 assign (any integer dtype) loads; out-of-range indices are refused by name
    sd = m.state_dict()
    sd["assign"] = sd["assign"].long()
    fresh.load_state_dict(sd)
    sd["assign"] = sd["assign"].clone()
    sd["assign"][3] = 8
    with pytest.raises(ValueError, match=r"assign values must be in \[0, 8\)"):
        fresh.load_state_dict(sd)
    sd["assign"] = sd["assign"].float()
    with pytest.raises(ValueError, match="assign must hold integers"):
        fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)  # nothing was copied


def test_bad_inputs_raise_named_errors():
    m = SharedFilterConv2d(4, 8, 3, filters=2)
    with pytest.raises(ValueError, match="in_channels=4"):
        m(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        m(torch.randn(4, 5))
    with pytest.raises(ValueError, match="filters must be <= out_channels=8"):
        SharedFilterConv2d(4, 8, 3, filters=9)
    with pytest.raises(ValueError, match="filters must be an int >= 1"):
        SharedFilterConv2d(4, 8, 3, filters=0)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        SharedFilterConv2d(4, 8, 3, filters=2, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding must be one of"):
        SharedFilterConv2d(4, 8, 3, filters=2, padding="full")
    with pytest.raises(ValueError, match="stride 1"):
        SharedFilterConv2d(4, 8, 3, filters=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="floating-point"):
        SharedFilterConv2d(4, 8, 3, filters=2, dtype=torch.int32)
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match="exactly one of filters and fraction"):
        SharedFilterConv2d.from_dense(conv)
    with pytest.raises(ValueError, match="exactly one of filters and fraction"):
        SharedFilterConv2d.from_dense(conv, filters=2, fraction=0.5)
    with pytest.raises(ValueError, match="fraction must be a number in"):
        SharedFilterConv2d.from_dense(conv, fraction=1.0)
    with pytest.raises(ValueError, match="not both"):
        SharedFilterConv2d.from_dense(conv, SharedFilterConfig(filters=2), filters=2)
    with pytest.raises(TypeError, match="unknown keyword"):
        SharedFilterConv2d.from_dense(conv, filterz=2)
    with pytest.raises(TypeError, match="plain nn.Conv2d"):
        SharedFilterConv2d.from_dense(PaddingConv(4, 8, 3), filters=2)
    with pytest.raises(ValueError, match="groups=1"):
        SharedFilterConv2d.from_dense(nn.Conv2d(4, 8, 3, groups=2), filters=2)
    with pytest.raises(ValueError, match="filters must be <= out_channels=8"):
        SharedFilterConv2d.from_dense(conv, filters=9)
    bad = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UnsupportedWeight, match="non-finite"):
        SharedFilterConv2d.from_dense(bad, filters=2)


def test_from_dense_takes_a_config_or_its_plain_values():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 16, 3)
    a = SharedFilterConv2d.from_dense(conv, SharedFilterConfig(fraction=0.25, iters=5))
    b = SharedFilterConv2d.from_dense(conv, fraction=0.25, iters=5)
    assert a.filters == 4 and torch.equal(a.dense_weight(), b.dense_weight())
    config = SharedFilterConfig(filters=3)
    assert {k: getattr(config, k) for k in SHARED_FILTER_DEFAULTS} == {
        **SHARED_FILTER_DEFAULTS, "filters": 3}


@pytest.mark.parametrize(("make", "match"), [
    (lambda: SharedFilterConfig(), "exactly one of filters and fraction"),
    (lambda: SharedFilterConfig(filters=4, fraction=0.5), "exactly one of filters and fraction"),
    (lambda: SharedFilterConfig(filters=0), "filters must be an int >= 1"),
    (lambda: SharedFilterConfig(filters=2.0), "filters must be an int >= 1"),
    (lambda: SharedFilterConfig(filters=True), "filters must be an int >= 1"),
    (lambda: SharedFilterConfig(fraction=0.0), r"fraction must be a number in \(0, 1\)"),
    (lambda: SharedFilterConfig(fraction=1), r"fraction must be a number in \(0, 1\)"),
    (lambda: SharedFilterConfig(fraction=float("nan")), "fraction must be a number"),
    (lambda: SharedFilterConfig(fraction=0.5, iters=0), "iters must be an int >= 1")])
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_is_frozen_hashable_and_registered():
    from compress_ops import configs

    c = SharedFilterConfig(fraction=0.25)
    assert hash(c) == hash(SharedFilterConfig(fraction=0.25)) and c.per_layer
    with pytest.raises(AttributeError):
        c.fraction = 0.5
    assert configs.transform_for(c).handles == (nn.Conv2d,)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.few = nn.Conv2d(64, 3, 1)  # fraction 0.25 of 3 outputs: 1 filter
        self.pad = PaddingConv(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.pad(self.few(self.dw(x))).flatten(1))


def test_compress_shares_filters_on_a_cnn_and_report_shows_the_rows():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 10, 10)
    co.compress_(model, SharedFilterConfig(fraction=0.25))
    assert isinstance(model.conv1, SharedFilterConv2d) and model.conv1.filters == 8
    assert isinstance(model.conv2, SharedFilterConv2d) and model.conv2.filters == 16
    assert isinstance(model.few, SharedFilterConv2d) and model.few.filters == 1
    assert type(model.dw) is nn.Conv2d and type(model.pad) is PaddingConv
    rows = {r.name: r for r in co.report(model)}
    assert rows["conv2"].kind == "shared_filter"
    assert rows["conv2"].dense_bytes == 64 * 32 * 9 * 4
    assert rows["conv2"].stored_bytes == (16 * 32 * 9 + 64) * 4 + 64
    assert rows["conv2"].ratio == ((16 * 32 * 9 + 64) * 4 + 64) / (64 * 32 * 9 * 4)
    assert "16 shared filters for 64 channels" in rows["conv2"].note
    assert "4,672 weight params (dense 18,432)" in rows["conv2"].note
    assert "weight error" in rows["conv2"].note
    assert rows["dw"].kind == "dense" and "groups=1" in rows["dw"].note
    assert rows["pad"].kind == "dense" and "not a plain nn.Conv2d" in rows["pad"].note
    assert "fc" in rows and rows["fc"].kind == "dense"
    # the model computes the dense convs of the shared weights
    h = F.relu(F.conv2d(x, model.conv1.dense_weight(), model.conv1.bias, padding=1))
    h = F.relu(F.conv2d(h, model.conv2.dense_weight(), model.conv2.bias, stride=2, padding=1))
    h = F.conv2d(model.dw(h), model.few.dense_weight(), model.few.bias)
    ref = model.fc(model.pad(h).flatten(1))
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_layers_without_sharing_or_saving_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Conv2d(6, 8, 1), nn.Conv2d(1, 4, 1))
    with pytest.warns(UserWarning, match="kept dense"):
        co.compress_(model, SharedFilterConfig(filters=7))
    rows = {r.name: r for r in co.report(model)}
    assert rows["0"].kind == "dense" and "7 shared filters for 6 output channels" in rows["0"].note
    # 1x1 conv 6 -> 8: 7 * 6 + 8 = 50 >= 48 parameters
    assert rows["1"].kind == "dense" and ">= dense 48" in rows["1"].note
    assert rows["2"].kind == "dense" and "kept dense" in rows["2"].note


def test_training_from_scratch_reduces_the_loss():
    torch.manual_seed(0)
    teacher = nn.Conv2d(4, 16, 3, padding=1)
    student = SharedFilterConv2d(4, 16, 3, filters=4, padding=1, seed=0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    x = torch.randn(16, 4, 8, 8)
    with torch.no_grad():
        y = teacher(x)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert student.assign.dtype == torch.uint8  # the assignment stayed fixed


def test_degenerate_weights_give_finite_exact_fits():
    conv = nn.Conv2d(4, 12, 3)
    with torch.no_grad():
        conv.weight.zero_()
    m = SharedFilterConv2d.from_dense(conv, filters=5)
    assert torch.count_nonzero(m.dense_weight()) == 0 and torch.isfinite(m.bank).all()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # one direction (scaled copies) and zero filters: 1 cluster suffices
        conv.weight.copy_(torch.randn(1, 4, 3, 3, generator=g)
                          * torch.randn(12, 1, 1, 1, generator=g))
        conv.weight[3:] = 0
    m = SharedFilterConv2d.from_dense(conv, filters=5)
    assert torch.isfinite(m.bank).all() and torch.isfinite(m.scale).all()
    assert m.relative_error(conv.weight) < 1e-6
    assert torch.bincount(m.assign.long(), minlength=5).min() >= 1  # no filter left unused
