"""GPTQ (``QuantConfig(method="gptq")``): the same grids and packed format as round-to-nearest,
levels chosen with error feedback through the layer's input Hessian."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.calibrate import input_hessians
from compress_ops.kernels.formats.dequant import dequantize
from compress_ops.quantize import gptq_affine, quantize_affine

CASES = [(48, 100, 4, 32, False, torch.float32), (40, 256, 3, 128, True, torch.float16),
         (16, 64, 2, None, False, torch.bfloat16), (24, 96, 8, 64, False, torch.float32),
         (8, 72, 4, 64, True, torch.float32)]


def correlated(k: int, rows: int = 384, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3
            + torch.randn(rows, k, generator=g) + 0.5)


@pytest.mark.parametrize("n,k,bits,gs,sym,dtype", CASES)
@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_is_round_to_nearest_exactly(n, k, bits, gs, sym, dtype, act_order):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    rtn = quantize_affine(w, bits, gs, symmetric=sym)
    for h in (torch.eye(k), torch.diag(torch.rand(k) + 0.5)):  # any diagonal: no feedback
        got = gptq_affine(w, h, bits, gs, symmetric=sym, act_order=act_order)
        assert torch.equal(got.qweight, rtn.qweight)
        assert torch.equal(got.scales, rtn.scales)
        assert (got.zeros is None) == (rtn.zeros is None)
        assert got.zeros is None or torch.equal(got.zeros, rtn.zeros)


@pytest.mark.parametrize("n,k,bits,gs,sym,dtype", CASES)
def test_output_error_is_at_most_round_to_nearest(n, k, bits, gs, sym, dtype):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    x = correlated(k)
    h = 2 * x.T @ x / x.shape[0]
    errs = {}
    for name, a in (("rtn", quantize_affine(w, bits, gs, symmetric=sym)),
                    ("gptq", gptq_affine(w, h, bits, gs, symmetric=sym)),
                    ("gptq-in-order", gptq_affine(w, h, bits, gs, symmetric=sym,
                                                  act_order=False))):
        w_hat = dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, k).double()
        errs[name] = float((x.double() @ (w.double() - w_hat).T).square().sum())
    assert errs["gptq"] <= errs["rtn"] and errs["gptq-in-order"] <= errs["rtn"]
    if bits <= 4:
        assert errs["gptq"] < 0.9 * errs["rtn"]  # correlated inputs: a clear gain


def test_dead_inputs_and_bad_hessians():
    w = torch.randn(16, 64)
    x = correlated(64)
    x[:, :8] = 0  # inputs that never fire: their weights carry no output
    h = 2 * x.T @ x / x.shape[0]
    a = gptq_affine(w, h, 4, 32)
    assert torch.isfinite(dequantize(a.qweight, a.scales, a.zeros, 4, 32, 64)).all()
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        gptq_affine(w, torch.eye(63), 4, 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_affine(w, torch.full((64, 64), float("nan")), 4, 32)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_affine(w, -torch.eye(64), 4, 32, damp=0.0)
    with pytest.raises(ValueError, match="damp"):
        gptq_affine(w, torch.eye(64), 4, 32, damp=1.5)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(96, 160)
        self.down = nn.Linear(160, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def mlp_and_data():
    torch.manual_seed(0)
    model = MLP().eval()
    batches = [correlated(96, rows=64, seed=s).reshape(4, 16, 96) for s in range(4)]
    return model, batches


def test_compress_with_gptq_beats_rtn_on_the_calibration_data():
    model, batches = mlp_and_data()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
    errs = {}
    for method in ("rtn", "gptq"):
        m, _ = mlp_and_data()
        cfg = co.QuantConfig(bits=3, group_size=32, method=method)
        co.compress_(m, cfg, calib=batches if method == "gptq" else None)
        assert type(m.up).__name__ == "QuantLinear" and m.up.bits == 3
        with torch.no_grad():
            errs[method] = float((torch.cat([m(b) for b in batches]) - ref).norm() / ref.norm())
    assert errs["gptq"] < errs["rtn"]


def test_gptq_needs_calibration_and_says_so():
    model, batches = mlp_and_data()
    with pytest.raises(ValueError, match="calib=batches"):
        co.compress_(model, co.QuantConfig(method="gptq"))
    with pytest.raises(TypeError, match="iterable of batches"):
        co.compress_(model, co.QuantConfig(method="gptq"), calib=batches[0])
    with pytest.raises(ValueError, match="method"):
        co.QuantConfig(method="awq-ish")
    for one_shot in (co.QuantConfig(method="gptq"), co.QuantConfig(method="awq"),
                     co.CodebookConfig(weighted=True)):
        with pytest.raises(ValueError, match="one-shot"):
            co.qat.prepare_qat(model, one_shot)
    nan = [torch.full((2, 96), float("nan"))]
    with pytest.raises(ValueError, match="NaN or Inf"):
        co.compress_(model, co.QuantConfig(method="gptq"), calib=nan)
    assert isinstance(model.up, nn.Linear)  # nothing changed on the errors


def test_recipe_mixes_gptq_with_other_configs_and_forward_hook():
    model, batches = mlp_and_data()
    calls = []

    def forward(m, batch):
        calls.append(batch.shape)
        return m(batch)

    co.compress_(model, co.Recipe({"up": co.QuantConfig(bits=4, method="gptq"),
                                   "down": co.Sparse24Config()}),
                 calib=batches, forward=forward)
    assert len(calls) == len(batches)
    assert type(model.up).__name__ == "QuantLinear"
    assert type(model.down).__name__ == "Sparse24Linear"


def test_input_hessians_average_over_rows():
    model, batches = mlp_and_data()
    h = input_hessians(model, {"up": model.up}, batches)["up"]
    x = torch.cat([b.reshape(-1, 96) for b in batches])
    torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least one batch"):
        input_hessians(model, {"up": model.up}, [])


# -- SparseGPT and Wanda at 2:4 -------------------------------------------------------------


@pytest.mark.parametrize("k", [64, 102])
def test_sparsegpt_mask_is_2to4_and_beats_wanda_and_magnitude(k):
    from compress_ops.kernels.formats.sparse24 import is_2to4, prune_2to4
    from compress_ops.sparsify import sparsegpt_2to4, wanda_2to4

    w = torch.randn(48, k, generator=torch.Generator().manual_seed(3))
    # uneven input energy inside the groups of four: Wanda's and SparseGPT's reason to exist
    x = correlated(k) * (torch.rand(k, generator=torch.Generator().manual_seed(5)) * 3 + 0.2)
    h = 2 * x.T @ x / x.shape[0]
    out = {"magnitude": prune_2to4(w), "wanda": wanda_2to4(w, h),
           "sparsegpt": sparsegpt_2to4(w, h, block_size=32)}
    err = {name: float((x.double() @ (w.double() - v.double()).T).square().sum())
           for name, v in out.items()}
    assert all(is_2to4(v) for v in out.values())
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]
    # a diagonal Hessian spreads nothing: SparseGPT is magnitude pruning exactly
    assert torch.equal(sparsegpt_2to4(w, torch.eye(k)), prune_2to4(w))


def test_sparse24_methods_through_compress():
    model, batches = mlp_and_data()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m, _ = mlp_and_data()
        cfg = co.Sparse24Config(method=method)
        co.compress_(m, cfg, calib=None if method == "magnitude" else batches)
        assert type(m.up).__name__ == "Sparse24Linear"
        with torch.no_grad():
            errs[method] = float((torch.cat([m(b) for b in batches]) - ref).norm() / ref.norm())
    assert errs["sparsegpt"] < errs["magnitude"]
    with pytest.raises(ValueError, match="calib=batches"):
        co.compress_(mlp_and_data()[0], co.Sparse24Config(method="sparsegpt"))
    with pytest.raises(ValueError, match="2:4 already"):
        co.Sparse24Config(prune=False, method="wanda")


def test_plan_weighs_calibrated_candidates_and_applies_with_calib():
    model, batches = mlp_and_data()
    cands = [co.QuantConfig(bits=3, group_size=32), co.QuantConfig(bits=3, group_size=32,
                                                                   method="gptq")]
    pl = co.plan(model, iter(batches), 0.3, candidates=cands, verbose=False)
    for name in ("up", "down"):
        err = {r.config.method: r.error for r in pl.table if r.layer == name and r.config}
        assert err["gptq"] < err["rtn"]  # measured on the calibration data
    with pytest.raises(ValueError, match="calib=batches"):
        co.compress_(mlp_and_data()[0], pl)
    m, _ = mlp_and_data()
    co.compress_(m, pl, calib=batches)
    assert type(m.up).__name__ == "QuantLinear"


def test_nan_calibration_and_singular_hessians_are_named_without_a_false_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (NaN != NaN once read as "not a chain of blocks")
        with pytest.raises(ValueError, match="inputs of 0 hold NaN or Inf"):
            co.compress_(model, co.QuantConfig(bits=4, group_size=32, method="gptq"),
                         calib=[torch.full((4, 64), float("nan"))])
    # 2 rows, 64 inputs, no dampening: H is singular; the error names the layer
    with pytest.raises(ValueError, match=r"^0: GPTQ: the Hessian is not positive definite"):
        co.compress_(model, co.QuantConfig(bits=4, group_size=32, method="gptq", damp=0.0),
                     calib=[torch.randn(2, 64)])
    assert type(model[0]) is nn.Linear  # nothing changed
