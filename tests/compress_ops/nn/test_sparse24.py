"""compress_ops/nn/sparse24.py: Sparse24Linear as a drop-in nn.Linear."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.kernels.formats import sparse24 as spf
from compress_ops.nn import Sparse24Linear


def _linear(k: int = 70, n: int = 24, bias: bool = True, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_matches_pruned_linear(op_device, bias):
    lin = _linear(bias=bias).to(op_device)
    m = Sparse24Linear.from_dense(lin, co.Sparse24Config())
    pruned = spf.prune_2to4(lin.weight.detach())
    assert torch.equal(m.dense_weight(), pruned)
    x = torch.randn(2, 5, 70, device=op_device)
    ref = F.linear(x.double(), pruned.double(), None if lin.bias is None else lin.bias.double())
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), F.linear(x, m.dense_weight(), m.bias), rtol=1e-5,
                               atol=1e-5)


def test_prune_false_requires_2to4_weight():
    lin = _linear()
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Linear.from_dense(lin, co.Sparse24Config(prune=False))
    with torch.no_grad():
        lin.weight.copy_(spf.prune_2to4(lin.weight))
    m = Sparse24Linear.from_dense(lin, co.Sparse24Config(prune=False))
    assert torch.equal(m.dense_weight(), lin.weight.detach())


def test_state_dict_round_trip_into_fresh_module(tmp_path):
    m = Sparse24Linear.from_dense(_linear(seed=1))
    assert set(m.state_dict()) == {"values", "meta", "bias", "_extra_state"}
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = Sparse24Linear(70, 24)
    x = torch.randn(3, 70)
    assert not torch.equal(fresh(x), m(x))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), m(x))


def test_fresh_module_is_a_valid_zero_weight():
    m = Sparse24Linear(40, 8, bias=False)
    assert torch.equal(m.dense_weight(), torch.zeros(8, 40))
    assert torch.equal(m(torch.randn(2, 40)), torch.zeros(2, 8))


def test_deepcopy_and_to_dtype():
    m = Sparse24Linear.from_dense(_linear(seed=2))
    c = copy.deepcopy(m)
    assert torch.equal(c.values, m.values) and c.values.data_ptr() != m.values.data_ptr()
    h = c.to(torch.bfloat16)
    assert h.values.dtype == torch.bfloat16 and h.meta.dtype == torch.int32
    y = h(torch.randn(3, 70, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_forward_rejects_wrong_in_features_even_inside_padding():
    m = Sparse24Linear.from_dense(_linear(k=70))  # Kp = 96: K=80 would pass the op's check
    with pytest.raises(ValueError, match="in_features=70"):
        m(torch.randn(2, 80))


def test_fine_tuning_updates_values_and_keeps_the_pattern():
    m = Sparse24Linear.from_dense(_linear(seed=4))
    m.values = nn.Parameter(m.values.clone())  # opt-in: train the kept weights
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, target = torch.randn(16, 70), torch.randn(16, 24)
    before = F.mse_loss(m(x), target).item()
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(m(x), target).backward()
        opt.step()
    assert F.mse_loss(m(x), target).item() < before
    assert spf.is_2to4(m.dense_weight().detach())


def test_constructor_validates_sizes():
    with pytest.raises(ValueError, match="in_features"):
        Sparse24Linear(0, 4)
