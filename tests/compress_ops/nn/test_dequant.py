"""compress_ops/nn/dequant.py: QuantLinear and CodebookLinear as drop-in nn.Linear replacements."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.kernels.formats import dequant as dqf
from compress_ops.nn import CodebookLinear, QuantLinear


def _linear(k: int = 70, n: int = 24, bias: bool = True, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


CONFIGS = [co.QuantConfig(), co.QuantConfig(bits=8, group_size=None, symmetric=True),
           co.QuantConfig(bits=2, group_size=32), co.CodebookConfig(),
           co.CodebookConfig(bits=3, row_groups=4)]
IDS = ["int4", "int8sym", "int2", "cb4", "cb3x4"]


def _module(lin: nn.Linear, cfg):
    cls = QuantLinear if isinstance(cfg, co.QuantConfig) else CodebookLinear
    return cls.from_dense(lin, cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_its_dense_weight(op_device, cfg, bias):
    lin = _linear(bias=bias).to(op_device)
    m = _module(lin, cfg)
    x = torch.randn(2, 5, 70, device=op_device)
    w = m.dense_weight()
    assert w.shape == lin.weight.shape
    b = None if m.bias is None else m.bias.double()
    torch.testing.assert_close(m(x).double(), F.linear(x.double(), w.double(), b),
                               rtol=1e-5, atol=1e-5)
    # and it approximates the original layer
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < {8: 0.01, 4: 0.15, 3: 0.3, 2: 0.6}[cfg.bits]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_round_trip_into_fresh_module(cfg):
    m = _module(_linear(seed=1), cfg)
    if isinstance(cfg, co.QuantConfig):
        expect = {"qweight", "scales", "bias", "_extra_state"} | (set() if cfg.symmetric
                                                                   else {"zeros"})
        fresh = QuantLinear(70, 24, bits=cfg.bits, group_size=cfg.group_size,
                            symmetric=cfg.symmetric)
    else:
        expect = {"indices", "codebook", "bias", "_extra_state"}
        fresh = CodebookLinear(70, 24, bits=cfg.bits, row_groups=cfg.row_groups)
    assert set(m.state_dict()) == expect
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    x = torch.randn(3, 70)
    assert not torch.equal(fresh(x), m(x))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fresh_quant_module_is_a_valid_zero_weight(bits, symmetric):
    m = QuantLinear(40, 8, bias=False, bits=bits, group_size=32, symmetric=symmetric)
    assert torch.equal(m.dense_weight(), torch.zeros(8, 40))
    assert torch.equal(m(torch.randn(2, 40)), torch.zeros(2, 8))
    c = CodebookLinear(40, 8, bias=False, bits=bits)
    assert torch.equal(c(torch.randn(2, 40)), torch.zeros(2, 8))


def test_stored_bytes_match_the_buffers():
    for cfg in CONFIGS:
        m = _module(_linear(k=300, n=32, dtype=torch.float16), cfg)
        buffers = sum(b.numel() * b.element_size() for name, b in m.named_buffers())
        assert m.stored_weight_bytes() == buffers
    m = QuantLinear.from_dense(_linear(k=4096, n=64, dtype=torch.float16),
                               co.QuantConfig(bits=4, group_size=128))
    assert m.stored_weight_bytes() / m.dense_weight_bytes() <= 0.27


def test_deepcopy_to_dtype_and_in_features_check():
    m = QuantLinear.from_dense(_linear(seed=2))
    c = copy.deepcopy(m)
    assert torch.equal(c.qweight, m.qweight) and c.qweight.data_ptr() != m.qweight.data_ptr()
    h = c.to(torch.bfloat16)
    assert h.scales.dtype == torch.bfloat16 and h.qweight.dtype == torch.int32
    assert h(torch.randn(3, 70, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="in_features=70"):
        m(torch.randn(2, 80))  # inside the padding of Kp = 96: the module still refuses


def test_codebook_fine_tuning_moves_shared_values_only():
    m = CodebookLinear.from_dense(_linear(seed=4), co.CodebookConfig(bits=2))
    m.codebook = nn.Parameter(m.codebook.clone())  # opt-in: train the shared values
    idx = m.indices.clone()
    opt = torch.optim.SGD([m.codebook], lr=0.05)
    x, target = torch.randn(32, 70), torch.randn(32, 24)
    before = F.mse_loss(m(x), target).item()
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(m(x), target).backward()
        opt.step()
    assert F.mse_loss(m(x), target).item() < before
    assert torch.equal(m.indices, idx)
    assert m.dense_weight().unique().numel() <= 4


def test_from_dense_validates():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="row_groups"):
        CodebookLinear(40, 6, row_groups=4)
    with pytest.raises(ValueError, match="shared codebook"):
        CodebookLinear.from_dense(_linear(), co.CodebookConfig(bits=2),
                                  codebook=torch.zeros(1, 16))


def test_quant_module_rounds_k_up_to_the_group():
    m = QuantLinear.from_dense(_linear(k=300, n=8), co.QuantConfig(bits=4, group_size=128))
    assert m.group_size == 128 and m.scales.shape == (8, 3)
    assert m.qweight.shape == (8, dqf.padded_k(300, 128) * 4 // 32)
    m = QuantLinear.from_dense(_linear(k=70, n=8), co.QuantConfig(bits=4, group_size=128))
    assert m.group_size == 96 and m.scales.shape == (8, 1)  # one group: the padded row
