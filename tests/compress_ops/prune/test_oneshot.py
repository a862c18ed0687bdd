"""One-shot unstructured pruning: SparseGPT, Wanda and magnitude (``compress_ops.sparsify``)
prune exactly the counts they document, at the weights they say, and SparseGPT's updates give
the least layer output error; ``prune.prune_one_shot_`` applies them to a model in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops.calibrate import input_hessians
from compress_ops.prune.oneshot import output_error, pruning_step
from compress_ops.sparsify import (
    magnitude_unstructured,
    pruned_count,
    sparsegpt_unstructured,
    wanda_unstructured,
)

N, K = 20, 36  # ragged: no multiple of 8, 16 or the block size
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def correlated(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and uneven energy (SparseGPT's and Wanda's reason)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) * 0.4
            + torch.randn(rows, k, generator=g) * 0.5 + 0.3)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def weight(seed: int = 1, dtype: torch.dtype = torch.float32, n: int = N, k: int = K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def layer_error(w: torch.Tensor, pruned: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the layer's squared output error on the inputs of H."""
    d = w.detach().double() - pruned.detach().double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


def prune_all(w: torch.Tensor, h: torch.Tensor, s: float, block_size: int = 16):
    return {"sparsegpt": sparsegpt_unstructured(w, h, s, block_size=block_size),
            "wanda": wanda_unstructured(w, h, s), "magnitude": magnitude_unstructured(w, s)}


# -- the functions ----------------------------------------------------------------------------


def test_pruned_count_rounds_half_up():
    assert [pruned_count(s, 20) for s in (0.0, 0.5, 0.7, 0.725, 0.99)] == [0, 10, 14, 15, 20]
    assert pruned_count(0.5, 9) == 5 and pruned_count(0.3, 36) == 11


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.7])
def test_exact_counts_zeros_at_pruned_positions_and_dtype(dtype, s):
    w = weight(1, dtype)
    w_before = w.clone()
    h = hessian_of(correlated(128, K, seed=2))
    per_row = pruned_count(s, K)
    norms = torch.diagonal(h).sqrt()
    for name, out in prune_all(w, h, s).items():
        assert out.dtype == dtype and out.shape == w.shape and out.data_ptr() != w.data_ptr()
        assert torch.isfinite(out).all()
        zero = out == 0
        if name == "sparsegpt":
            # blocks of 16, 16 and 4 columns: each loses exactly pruned_count(s, N * width)
            for i in range(0, K, 16):
                width = min(16, K - i)
                assert int(zero[:, i:i + 16].sum()) == pruned_count(s, N * width)
            total = sum(pruned_count(s, N * min(16, K - i)) for i in range(0, K, 16))
            assert abs(total - pruned_count(s, N * K)) <= 3  # one per block at most
        else:
            assert (zero.sum(1) == per_row).all()  # exactly per row
            # kept weights are w's own values; the zeros are the least-score ones of each row
            assert torch.equal(out[~zero], w[~zero])
            score = w.double().abs() * (norms.double()[None, :] if name == "wanda" else 1)
            if 0 < per_row:
                pruned_max = score.masked_fill(~zero, -1).amax(1)
                kept_min = score.masked_fill(zero, float("inf")).amin(1)
                assert (pruned_max <= kept_min).all()
    assert torch.equal(w, w_before)  # the input is never modified
    layer = magnitude_unstructured(w, s, per="layer")
    assert int((layer == 0).sum()) == pruned_count(s, N * K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("block_size", [16, 36, 128])
@pytest.mark.parametrize("s", [0.5, 0.7])
def test_scaled_identity_hessian_sparsegpt_is_magnitude_per_tile(dtype, block_size, s):
    """With a diagonal H nothing spreads; with H = c I the saliency w^2 / U_jj^2 is c' w^2,
    so SparseGPT is magnitude pruning over each [N, block_size] tile, bit for bit (with
    block_size >= K: layer-wise magnitude)."""
    w = weight(3, dtype)
    got = sparsegpt_unstructured(w, 2.5 * torch.eye(K, dtype=dtype), s, block_size=block_size)
    tiles = [magnitude_unstructured(w[:, i:i + block_size], s, per="layer")
             for i in range(0, K, block_size)]
    assert torch.equal(got, torch.cat(tiles, 1))
    if block_size >= K:
        assert torch.equal(got, magnitude_unstructured(w, s, per="layer"))
    # Wanda with an equal diagonal is per-row magnitude, exactly
    assert torch.equal(wanda_unstructured(w, 4.0 * torch.eye(K, dtype=dtype), s),
                       magnitude_unstructured(w, s))


def test_unequal_diagonal_hessian_sparsegpt_weighs_by_dampened_diagonal():
    """A diagonal H still spreads nothing (kept weights unchanged); the saliency is then
    w_ij^2 (H_jj + damp * mean(diag H)), taken over the tile."""
    w = weight(4, torch.float64)
    d = torch.rand(K, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    got = sparsegpt_unstructured(w, torch.diag(d), 0.6, block_size=64, damp=0.05)
    scale = (d + 0.05 * d.mean()).sqrt()
    want = magnitude_unstructured(w * scale[None, :], 0.6, per="layer") != 0
    assert torch.equal(got != 0, want)
    assert torch.equal(got[want], w[want])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size,s", [(8, 0.5), (8, 0.7), (16, 0.5), (16, 0.7), (128, 0.5)])
def test_sparsegpt_has_the_least_layer_output_error(seed, s, block_size):
    """Several blocks per layer (the adaptive mask selection): 0.75-0.85 of Wanda's error.
    One block for the whole layer (128 >= K) chooses the mask once, from the original weights:
    still 0.85 of Wanda's at 50%, but at 70% no better than Wanda's (1792 against 1766, seed
    0), so that case is not asserted."""
    w = weight(10 + seed)
    h = hessian_of(correlated(256, K, seed=20 + seed))
    out = prune_all(w, h, s, block_size)
    err = {name: layer_error(w, v, h) for name, v in out.items()}
    # SparseGPT prunes at least as many weights here, and still loses the least
    assert int((out["sparsegpt"] == 0).sum()) >= int((out["wanda"] == 0).sum())
    assert err["sparsegpt"] <= 0.9 * err["wanda"] and err["sparsegpt"] <= 0.9 * err["magnitude"]


def test_dead_inputs_are_zeroed_and_pruned_first():
    w = weight(6)
    x = correlated(128, K, seed=7)
    x[:, :3] = 0  # inputs that never fire
    h = hessian_of(x)
    sg = sparsegpt_unstructured(w, h, 0.5, block_size=16)
    assert torch.isfinite(sg).all() and (sg[:, :3] == 0).all()
    assert int((sg[:, :16] == 0).sum()) == pruned_count(0.5, N * 16)  # within the count
    wa = wanda_unstructured(w, h, 0.5)
    assert (wa[:, :3] == 0).all() and ((wa == 0).sum(1) == pruned_count(0.5, K)).all()


def test_strided_inputs_give_what_contiguous_ones_do():
    w = weight(12, k=N, n=K).t()  # a transposed view, as a Conv1D's [out, in] weight
    h = hessian_of(correlated(128, K, seed=13))
    dense = prune_all(w.contiguous(), h, 0.6)
    for name, out in prune_all(w, h, 0.6).items():
        assert torch.equal(out == 0, dense[name] == 0), name  # the same mask
        # (SparseGPT's updates: the same arithmetic, matmuls on other strides round apart)
        torch.testing.assert_close(out, dense[name], rtol=1e-5, atol=1e-5)


def test_validation():
    w, h = weight(), torch.eye(K)
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        for call in (lambda b: sparsegpt_unstructured(w, h, b),
                     lambda b: wanda_unstructured(w, h, b),
                     lambda b: magnitude_unstructured(w, b)):
            with pytest.raises(ValueError, match="sparsity"):
                call(bad)
    nan_w = w.clone()
    nan_w[3, 4] = float("nan")
    nan_h = h.clone()
    nan_h[1, 1] = float("inf")
    for fn in (sparsegpt_unstructured, wanda_unstructured):
        with pytest.raises(ValueError, match="weight w holds NaN"):
            fn(nan_w, h, 0.5)
        with pytest.raises(ValueError, match="hessian holds NaN"):
            fn(w, nan_h, 0.5)
        with pytest.raises(ValueError, match=r"hessian must be a \[36, 36\]"):
            fn(w, torch.eye(K + 1), 0.5)
    with pytest.raises(ValueError, match="weight w holds NaN"):
        magnitude_unstructured(nan_w, 0.5)
    with pytest.raises(TypeError, match="2-D floating-point"):
        magnitude_unstructured(torch.ones(4, 4, dtype=torch.int32), 0.5)
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt_unstructured(w, h, 0.5, block_size=0)
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_unstructured(w, h, 0.5, damp=1.0)
    with pytest.raises(ValueError, match="per"):
        magnitude_unstructured(w, 0.5, per="column")
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_unstructured(w, -torch.eye(K), 0.5, damp=0.0)


# -- prune_one_shot_ --------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, K), nn.GELU(), nn.Linear(K, N), nn.GELU(),
                         nn.Linear(N, 8))


def batches(seed: int = 0) -> list[torch.Tensor]:
    x = correlated(256, 24, seed)
    return [x[i:i + 64] for i in range(0, 256, 64)]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("s", [0.5, 0.7])
def test_prune_one_shot_prunes_every_linear_in_place(method, s):
    model, data = mlp(), batches()
    params = [id(p) for p in model.parameters()]
    got = co.prune.prune_one_shot_(model, s, method=method, calib=data)
    assert list(got) == ["0", "2", "4"]
    assert [id(p) for p in model.parameters()] == params  # same Parameters, updated in place
    for name, frac in got.items():
        w = model.get_submodule(name).weight
        n, k = w.shape
        assert frac == float((w == 0).sum()) / w.numel()
        if method == "sparsegpt":  # default blocks of 128 columns: one block per layer here
            assert int((w == 0).sum()) == pruned_count(s, n * k)
        else:
            assert ((w == 0).sum(1) == pruned_count(s, k)).all()
    with torch.no_grad():
        assert torch.isfinite(model(data[0])).all() and type(model[0]) is nn.Linear


@torch.no_grad()
def test_one_shot_sparsegpt_is_never_worse_than_wanda_on_the_layer_objective():
    """At 70% with as few calibration rows as inputs, SparseGPT's mask of one 256-column
    block loses to Wanda's (the sparsify functions, as measured); prune_one_shot_ keeps
    whichever changes the layer's output less."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 256, generator=g) * (torch.rand(256, generator=g) * 3 + 0.1)
    layer = nn.Linear(256, 32, bias=False)
    layer.weight.copy_(torch.randn(32, 256, generator=g))
    w = layer.weight.detach().clone()
    h = 2 * x.T @ x / 64
    errors = {m: output_error(w, f(w, h, 0.7), h) for m, f in
              (("sparsegpt", sparsegpt_unstructured), ("wanda", wanda_unstructured))}
    assert errors["sparsegpt"] > errors["wanda"]  # (the case this guards against)
    model = nn.Sequential(layer)
    co.prune.prune_one_shot_(model, 0.7, method="sparsegpt", calib=[x], sequential=False)
    got = output_error(w, model[0].weight, h)
    assert got == pytest.approx(errors["wanda"], rel=1e-6)
    assert got <= output_error(w, wanda_unstructured(w, h, 0.7), h) * (1 + 1e-9)


def test_prune_one_shot_errors_leave_the_model_unchanged():
    model, data = mlp(), batches()
    before = copy.deepcopy(model.state_dict())
    for bad in (1.0, -0.2, True):
        with pytest.raises(ValueError, match="sparsity"):
            co.prune.prune_one_shot_(model, bad, calib=data)
    with pytest.raises(ValueError, match="method"):
        co.prune.prune_one_shot_(model, 0.5, method="obs", calib=data)
    with pytest.raises(ValueError, match="block_size"):
        co.prune.prune_one_shot_(model, 0.5, calib=data, block_size=0)
    for method in ("sparsegpt", "wanda"):
        with pytest.raises(ValueError, match="calib"):
            co.prune.prune_one_shot_(model, 0.5, method=method)
    with pytest.raises(TypeError, match="calib"):
        co.prune.prune_one_shot_(model, 0.5, calib=data[0])
    nan = data[0].clone()
    nan[5, 3] = float("nan")
    with pytest.raises(ValueError, match="inputs of 0 hold NaN"):
        co.prune.prune_one_shot_(model, 0.5, calib=[data[1], nan])
    two = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    a_before = two["a"].weight.clone()
    with pytest.raises(ValueError, match=r"never ran on the calibration data: \['b'\]"):
        co.prune.prune_one_shot_(two, 0.5, calib=[torch.randn(2, 4)],
                                 forward=lambda m, b: m["a"](b))  # b is never reached
    assert torch.equal(two["a"].weight, a_before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_tied_compressed_and_filtered_layers_are_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 12), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 12), nn.Linear(12, 16, bias=False))
    model[4].weight = model[0].weight  # an lm_head tied to the embedding
    co.compress_(model, co.QuantConfig(bits=8, group_size=None), filter_fn=lambda m, n: n == "3")
    tied = model[4].weight.clone()
    data = [torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    got = co.prune.prune_one_shot_(model, 0.5, calib=data)
    assert list(got) == ["1"] and got["1"] == pruned_count(0.5, 144) / 144
    assert torch.equal(model[4].weight, tied) and model[4].weight is model[0].weight
    got = co.prune.prune_one_shot_(mlp(), 0.5, method="magnitude",
                                   filter_fn=lambda m, name: name != "4")
    assert list(got) == ["0", "2"]
    with pytest.warns(UserWarning, match="no linear layer"):
        assert co.prune.prune_one_shot_(nn.Sequential(nn.ReLU()), 0.5, method="magnitude") == {}


def test_sparsegpt_beats_wanda_on_a_model_with_correlated_inputs():
    data = batches(0)
    x = torch.cat(data)
    base = mlp(0)
    hessians = input_hessians(base, {"0": base[0], "2": base[2], "4": base[4]}, data)
    with torch.no_grad():
        ref = base(x)
    out_err, layer_err = {}, {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        m = copy.deepcopy(base)
        co.prune.prune_one_shot_(m, 0.5, method=method, calib=data)
        with torch.no_grad():
            out_err[method] = float((m(x) - ref).norm() / ref.norm())
        layer_err[method] = {n: layer_error(base.get_submodule(n).weight,
                                            m.get_submodule(n).weight, h)
                             for n, h in hessians.items()}
    # each layer's own objective (on the dense model's inputs, what is minimized): robust
    for n in hessians:
        assert layer_err["sparsegpt"][n] <= layer_err["wanda"][n] <= layer_err["magnitude"][n]
    # end to end (seed 0: 0.41 against 0.52 and 0.60)
    assert out_err["sparsegpt"] < 0.9 * out_err["wanda"] < 0.9 * out_err["magnitude"]


def test_pruning_step_is_a_per_layer_function_and_handles_conv1d():
    h = hessian_of(correlated(128, K, seed=8))
    lin = nn.Linear(K, N)
    step = pruning_step(0.5, "sparsegpt")
    new = step("lin", lin, h)
    assert new.shape == lin.weight.shape
    assert torch.equal(new, sparsegpt_unstructured(lin.weight, h, 0.5))
    assert torch.equal(pruning_step(0.5, block_size=8)("lin", lin, h),
                       sparsegpt_unstructured(lin.weight, h, 0.5, block_size=8))
    with pytest.raises(ValueError, match="lin: method='wanda' needs"):
        pruning_step(0.5, "wanda")("lin", lin, None)
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(N, K)  # weight [in, out]
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
    assert torch.equal(step("conv", conv, h), new.t())
    model = nn.Sequential(conv)
    got = co.prune.prune_one_shot_(model, 0.5, calib=[correlated(64, K, seed=9)])
    assert got == {"0": pruned_count(0.5, N * K) / (N * K)}
    assert conv.weight.shape == (K, N)
