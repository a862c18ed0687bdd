"""compress_ops/nn/hashed.py: HashedLinear and HashedConfig -- the module against its dense
reference, sizes in report(), state round trips, training from scratch and from a dense
layer, named errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.kernels.formats import hashed as hf
from compress_ops.nn import HashedLinear


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10))


def test_compress_builds_hashed_layers_that_compute_their_virtual_weight():
    model = _mlp()
    co.compress_(model, co.HashedConfig(compression=1 / 8, seed=5))
    assert all(isinstance(model[i], HashedLinear) for i in (0, 2))
    x = torch.randn(7, 48)
    for m in (model[0], model[2]):
        assert m.buckets == round(m.in_features * m.out_features / 8) and m.seed == 5
    y = model(x)
    h = F.relu(F.linear(x.double(), model[0].dense_weight().double(),
                        model[0].bias.double()))
    ref = F.linear(h, model[2].dense_weight().double(), model[2].bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    rows = {r.name: r for r in co.report(model)}
    assert rows["0"].kind == "hashed"
    assert rows["0"].stored_bytes == model[0].buckets * 4  # B fp32 values, no index
    assert rows["0"].dense_bytes == 48 * 96 * 4
    assert "buckets, seed 5" in rows["0"].note


def test_dense_init_is_the_least_squares_fit_of_the_dense_weight():
    torch.manual_seed(1)
    lin = nn.Linear(40, 30)
    fit = HashedLinear.from_dense(lin, compression=0.25, seed=9)
    rnd = HashedLinear.from_dense(lin, compression=0.25, seed=9, init="random")
    w = lin.weight.detach()
    err_fit = (fit.dense_weight() - w).norm()
    err_rnd = (rnd.dense_weight() - w).norm()
    assert err_fit < 0.95 * err_rnd
    # no perturbation of one bucket lowers the error: each bucket is its members' mean
    for b in (0, 7, fit.buckets - 1):
        for d in (-1e-2, 1e-2):
            moved = copy.deepcopy(fit)
            with torch.no_grad():
                moved.w[b] += d
            assert (moved.dense_weight() - w).norm() >= err_fit
    # a weight that is exactly hashed is recovered exactly
    with torch.no_grad():
        lin.weight.copy_(rnd.dense_weight())
    again = HashedLinear.from_dense(lin, buckets=rnd.buckets, seed=9)
    used = torch.zeros(rnd.buckets, dtype=torch.bool)
    used[hf.virtual_index(30, 40, rnd.buckets, 9)[0].flatten()] = True
    assert 0 < (~used).sum() < 15  # e**-4 of the buckets hold no position, as expected
    torch.testing.assert_close(again.w[used], rnd.w[used])
    assert torch.equal(again.w[~used], torch.zeros_like(again.w[~used]))
    assert torch.equal(fit.bias, lin.bias)


def test_training_from_scratch_fits_a_teacher():
    torch.manual_seed(0)
    teacher = nn.Linear(32, 16)
    m = HashedLinear(32, 16, compression=0.25, seed=3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    x = torch.randn(256, 32)
    with torch.no_grad():
        target = teacher(x)
    first = F.mse_loss(m(x), target).item()
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(m(x), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
    assert m.w.grad is not None and m.bias.grad is not None


def test_state_dict_round_trip_and_refusals():
    model = _mlp()
    co.compress_(model, co.HashedConfig(compression=1 / 16, seed=2**32 - 1))
    fresh = nn.Sequential(HashedLinear(48, 96, buckets=model[0].buckets, seed=2**32 - 1),
                          nn.ReLU(), HashedLinear(96, 10, buckets=model[2].buckets,
                                                  seed=2**32 - 1))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), model(x))
    other = HashedLinear(48, 96, buckets=model[0].buckets, seed=1)
    with pytest.raises(ValueError, match="seed=4294967295"):
        other.load_state_dict(model[0].state_dict())
    state = model[0].state_dict()
    state["_extra_state"] = state["_extra_state"].clone()
    state["_extra_state"][-1] = hf.HASH_VERSION + 1
    with pytest.raises(ValueError, match="hash_version"):
        copy.deepcopy(model[0]).load_state_dict(state)


def test_save_load_and_dtype_conversion(tmp_path):
    model = _mlp()
    co.compress_(model, co.HashedConfig(compression=1 / 8, seed=4))
    co.save(model, tmp_path / "m.safetensors")
    loaded = co.load(_mlp(), tmp_path / "m.safetensors")
    x = torch.randn(2, 48)
    assert torch.equal(loaded(x), model(x))
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half[0].w.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), model(x), rtol=3e-2, atol=3e-2)


def test_compile_parity_and_dynamic_batch():
    model = _mlp()
    co.compress_(model, co.HashedConfig())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (1, 5, 9):
        x = torch.randn(m, 48)
        torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()


def test_layers_without_saving_stay_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 64))
    with pytest.warns(UserWarning):
        co.compress_(model[:1], co.HashedConfig(buckets=8))
    co.compress_(model, co.HashedConfig(buckets=100))
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], HashedLinear)
    assert "no saving" in {r.name: r.note for r in co.report(model)}["0"]


@pytest.mark.parametrize(("make", "match"), [
    (lambda: co.HashedConfig(compression=0.0), "compression"),
    (lambda: co.HashedConfig(compression=1.0), "compression"),
    (lambda: co.HashedConfig(compression=None), "needs compression or buckets"),
    (lambda: co.HashedConfig(compression=0.5, buckets=10), "not both"),
    (lambda: co.HashedConfig(buckets=0), "buckets"),
    (lambda: co.HashedConfig(seed=-1), "seed"),
    (lambda: co.HashedConfig(seed=2**32), "seed"),
    (lambda: co.HashedConfig(init="kmeans"), "init"),
    (lambda: HashedLinear(8, 4), "exactly one of buckets and compression"),
    (lambda: HashedLinear(8, 4, buckets=4, compression=0.5), "exactly one"),
    (lambda: HashedLinear(8, 4, buckets=2**31), "at most"),
    (lambda: HashedLinear(0, 4, buckets=4), "in_features"),
])
def test_bad_configs_and_constructor_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_input_width_and_float64_layers():
    m = HashedLinear(8, 4, buckets=4)
    with pytest.raises(ValueError, match="in_features=8"):
        m(torch.randn(2, 7))
    model = nn.Sequential(nn.Linear(32, 32).double())
    with pytest.warns(UserWarning):
        co.compress_(model, co.HashedConfig())
    assert "float64" in co.report(model)[0].note
