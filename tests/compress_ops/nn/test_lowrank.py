"""LowRankLinear, LowRankConv2d and LowRankConfig through compress_ / report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.nn import LowRankConv2d, LowRankLinear

from ..models import MLP


def _low_rank_linear(n: int, k: int, r: int, seed: int = 0, noise: float = 0.0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g) / k
                         + noise * torch.randn(n, k, generator=g))
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_its_dense_weight(op_device, bias):
    lin = _low_rank_linear(40, 70, 6)
    if not bias:
        lin.bias = None
    mod = LowRankLinear.from_dense(lin, rank=6).to(op_device)
    x = torch.randn(3, 5, 70, device=op_device)
    ref = F.linear(x.double(), mod.dense_weight().double(),
                   None if mod.bias is None else mod.bias.double())
    assert ((mod(x).double() - ref).norm() / ref.norm()) < 1e-5
    # rank 6 of an exactly rank-6 weight: the factorization is exact
    torch.testing.assert_close(mod.dense_weight().cpu(), lin.weight.detach(), rtol=1e-4,
                               atol=1e-5)


def test_energy_and_config_construction():
    lin = _low_rank_linear(64, 80, 5, noise=1e-3)
    assert LowRankLinear.from_dense(lin, energy=0.99).rank == 5
    assert LowRankLinear.from_dense(lin, co.LowRankConfig(rank=3)).rank == 3
    with pytest.raises(ValueError, match="exactly one"):
        LowRankLinear.from_dense(lin)
    with pytest.raises(ValueError, match="not both"):
        LowRankLinear.from_dense(lin, co.LowRankConfig(rank=3), rank=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_dense(nn.Conv2d(3, 3, 1), rank=2)


def test_state_dict_round_trip_into_fresh_module(tmp_path):
    mod = LowRankLinear.from_dense(_low_rank_linear(24, 40, 4, noise=0.1), rank=7)
    path = tmp_path / "m.pt"
    torch.save(mod.state_dict(), path)
    fresh = LowRankLinear(40, 24, rank=7)
    fresh.load_state_dict(torch.load(path))
    x = torch.randn(5, 40)
    torch.testing.assert_close(fresh(x), mod(x), rtol=0, atol=0)
    assert set(mod.state_dict()) == {"u", "v", "bias"}


def test_fresh_module_is_a_trainable_zero_weight_and_base_is_lora_shaped():
    mod = LowRankLinear(16, 12, rank=4, base=True)
    assert torch.count_nonzero(mod.dense_weight()) == 0
    with torch.no_grad():
        mod.base_weight.copy_(torch.randn(12, 16))  # a frozen base, the adapter trains
    mod.base_weight.requires_grad_(False)
    x = torch.randn(8, 16)
    torch.testing.assert_close(mod(x), F.linear(x, mod.base_weight, mod.bias))
    opt = torch.optim.SGD([mod.u, mod.v], lr=0.1)
    target = torch.randn(8, 12)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(mod(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.count_nonzero(mod.u) > 0
    assert mod.stored_weight_bytes() == (4 * (12 + 16) + 12 * 16) * 4


def test_bytes_and_parameter_count_match_r_n_plus_k_exactly():
    lin = nn.Linear(96, 64).half()
    mod = LowRankLinear.from_dense(lin, rank=16)
    n_params = sum(p.numel() for p in (mod.u, mod.v))
    assert n_params == 16 * (64 + 96)
    assert mod.stored_weight_bytes() == 16 * (64 + 96) * 2
    assert mod.stored_weight_bytes() / mod.dense_weight_bytes() == 16 * (64 + 96) / (64 * 96)


def test_deepcopy_to_dtype_and_in_features_check():
    mod = LowRankLinear.from_dense(nn.Linear(32, 16), rank=4)
    half = copy.deepcopy(mod).to(torch.bfloat16)
    assert half.u.dtype == torch.bfloat16 and half(torch.randn(2, 32).bfloat16()).shape == (2, 16)
    with pytest.raises(ValueError, match="in_features=32"):
        mod(torch.randn(2, 31))
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear(8, 8, rank=0)


# --------------------------------------------------------------------------------------------
# LowRankConv2d (Tucker-2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv_kw",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "padding": 1, "stride": 2, "bias": False},
        {"kernel_size": (3, 5), "padding": (2, 1), "dilation": 2},
        {"kernel_size": 3, "padding": "same", "dilation": (1, 2)},
        {"kernel_size": 4, "padding": "same"},  # asymmetric 'same' padding
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "stride": 2},
        {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
    ],
)
def test_tucker_conv_equals_its_factors_composed(conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **conv_kw).double()
    mod = LowRankConv2d.from_dense(conv, ranks=(5, 3))
    assert mod.ranks == (5, 3)
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    # the original conv (its padding, mode, stride, dilation) with the composed kernel
    ref = conv._conv_forward(x, mod.dense_weight(), conv.bias)
    torch.testing.assert_close(mod(x), ref, rtol=1e-10, atol=1e-10)
    # full ranks reproduce the conv itself
    full = LowRankConv2d.from_dense(conv, ranks=(12, 8))
    torch.testing.assert_close(full(x), conv(x), rtol=1e-9, atol=1e-9)


def test_tucker_conv_parameters_state_dict_and_errors(tmp_path):
    conv = nn.Conv2d(16, 32, 3, padding=1)
    mod = LowRankConv2d.from_dense(conv, ranks=(8, 4))
    n = sum(p.numel() for p in (mod.reduce_weight, mod.core, mod.restore_weight))
    assert n == 16 * 4 + 8 * 4 * 9 + 32 * 8
    assert mod.stored_weight_bytes() == n * 4 and mod.dense_weight_bytes() == 32 * 16 * 9 * 4
    fresh = LowRankConv2d(16, 32, 3, (8, 4), padding=1)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(fresh(x), mod(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="groups=1"):
        LowRankConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), ranks=(2, 2))
    with pytest.raises(TypeError, match="plain nn.Conv2d"):
        LowRankConv2d.from_dense(type("MyConv", (nn.Conv2d,), {})(4, 4, 3), ranks=(2, 2))


# --------------------------------------------------------------------------------------------
# compress_ / report
# --------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.fc(self.dw(x).flatten(1))))


def test_compress_factorizes_linears_and_convs_and_reports_why_not():
    torch.manual_seed(0)
    model = ConvNet().eval()
    co.compress_(model, co.LowRankConfig(rank=8))
    assert isinstance(model.conv2, LowRankConv2d) and model.conv2.ranks == (8, 8)
    assert isinstance(model.fc, LowRankLinear) and model.fc.rank == 8
    # conv1: 3 input channels, ranks (8, 3): 3*3 + 8*3*9 + 8*32 = 481 < 864 parameters
    assert isinstance(model.conv1, LowRankConv2d) and model.conv1.ranks == (8, 3)
    rows = {r.name: r for r in co.report(model)}
    assert rows["dw"].kind == "dense" and "groups=1" in rows["dw"].note
    assert rows["fc"].stored_bytes == 8 * (1024 + 128) * 4
    assert rows["fc"].ratio == 8 * (1024 + 128) / (1024 * 128)
    x = torch.randn(2, 3, 8, 8)
    ref = F.linear(F.relu(F.linear(model.dw(F.relu(model.conv2(F.relu(model.conv1(x)))))
                                   .flatten(1), model.fc.dense_weight(), model.fc.bias)),
                   model.head.dense_weight(), model.head.bias)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_layers_that_would_not_shrink_stay_dense_with_the_reason():
    model = MLP(d_in=64, d_hidden=96, d_out=40)
    co.compress_(model, co.LowRankConfig(rank=30))  # head: 30*(96+40) = 4080 >= 3840
    rows = {r.name: r for r in co.report(model)}
    assert rows["fc1"].kind == "lowrank"
    assert rows["head"].kind == "dense" and ">= dense 3840" in rows["head"].note
    # energy 1.0 keeps every singular value: nothing shrinks, everything stays dense
    model = MLP()
    co.compress_(model, co.LowRankConfig(energy=1.0))
    assert all(r.kind == "dense" and "kept dense" in r.note for r in co.report(model))


def test_recipe_none_and_conv_subclasses_get_their_reason():
    class PaddingConv(nn.Conv2d):  # pads in its own forward: not a plain conv
        def forward(self, x):
            return super().forward(F.pad(x, (1, 0, 1, 0)))

    model = nn.Sequential(nn.Conv2d(3, 16, 3), PaddingConv(16, 16, 3), nn.Conv2d(16, 16, 3))
    co.compress_(model, co.Recipe({"0": None, r"\d": co.LowRankConfig(rank=4)}))
    rows = {r.name: r for r in co.report(model)}
    assert rows["0"].note == "kept dense by recipe"
    assert rows["1"].kind == "dense" and "not a plain nn.Conv2d" in rows["1"].note
    assert rows["2"].kind == "tucker2"


def test_energy_config_on_a_low_rank_model_is_nearly_exact():
    torch.manual_seed(0)
    model = nn.Sequential(_low_rank_linear(96, 64, 4, seed=1, noise=1e-4), nn.GELU(),
                          _low_rank_linear(32, 96, 6, seed=2, noise=1e-4))
    x = torch.randn(10, 64)
    ref = model(x)
    co.compress_(model, co.LowRankConfig(energy=0.999))
    assert [m.rank for m in model if isinstance(m, LowRankLinear)] == [4, 6]
    torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: co.LowRankConfig(), "exactly one"),
        (lambda: co.LowRankConfig(rank=4, energy=0.9), "exactly one"),
        (lambda: co.LowRankConfig(rank=0), "rank must be"),
        (lambda: co.LowRankConfig(rank=True), "rank must be"),
        (lambda: co.LowRankConfig(energy=0.0), "energy must be"),
        (lambda: co.LowRankConfig(energy=1.5), "energy must be"),
        (lambda: co.LowRankConfig(rank=4, method="qr"), "method must be"),
    ],
)
def test_lowrank_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()
