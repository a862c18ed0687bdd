"""compress_ops/qat.py: fake-quant with a straight-through estimator, then finalize."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.nn import CodebookLinear, QuantLinear
from compress_ops.qat import FakeQuantLinear, finalize_qat, prepare_qat

from .models import MLP


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (10x on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _linear(k: int = 40, n: int = 48, bias: bool = True, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():  # non-zero bias and a few outliers, so grids are not trivial
        if bias:
            lin.bias.normal_()
        lin.weight[0, :3] *= 6.0
    return lin


def _packed(lin: nn.Linear, cfg):
    """What compress_ would build: the module whose dense_weight() Q(w) must equal."""
    return (QuantLinear if isinstance(cfg, co.QuantConfig) else CodebookLinear).from_dense(lin, cfg)


QUANT = [co.QuantConfig(bits=b, group_size=g, symmetric=s)
         for b in (2, 4, 8) for s in (False, True) for g in (None, 32, 128)]
QUANT_IDS = [f"int{c.bits}-{'sym' if c.symmetric else 'asym'}-g{c.group_size}" for c in QUANT]
CODEBOOK = [co.CodebookConfig(bits=2), co.CodebookConfig(bits=4),
            co.CodebookConfig(bits=2, row_groups=4), co.CodebookConfig(bits=4, row_groups=3)]
CB_IDS = ["cb2", "cb4", "cb2x4", "cb4x3"]


# -- forward == F.linear(x, Q(w), b), Q(w) == what the packed module stores --------------------


@pytest.mark.parametrize("cfg", QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("k", [40, 64])
def test_quant_forward_is_linear_on_the_packed_weight(cfg, k):
    lin = _linear(k=k)
    fq = FakeQuantLinear.from_linear(copy.deepcopy(lin), cfg)
    wq = fq.quantized_weight()
    assert torch.equal(wq, _packed(lin, cfg).dense_weight())
    assert not torch.equal(wq, lin.weight)  # it does quantize
    x = torch.randn(3, 5, k)
    assert torch.equal(fq(x), F.linear(x, wq, fq.bias))
    fq.eval()
    assert torch.equal(fq(x), F.linear(x, wq, fq.bias))


def test_quant_plain_rtn_search_steps_zero():
    cfg = co.QuantConfig(bits=4, group_size=32, search_steps=0)
    lin = _linear(k=64)
    wq = FakeQuantLinear.from_linear(lin, cfg).quantized_weight()
    assert torch.equal(wq, _packed(lin, cfg).dense_weight())


@pytest.mark.parametrize("cfg", CODEBOOK, ids=CB_IDS)
def test_codebook_forward_is_linear_on_the_packed_weight(cfg):
    lin = _linear()
    fq = FakeQuantLinear.from_linear(copy.deepcopy(lin), cfg)
    assert isinstance(fq.codebook, nn.Parameter)
    assert fq.codebook.shape == (cfg.row_groups, 2**cfg.bits)
    wq = fq.quantized_weight()
    assert torch.equal(wq, _packed(lin, cfg).dense_weight())  # same k-means fit
    assert wq.unique().numel() <= cfg.row_groups * 2**cfg.bits
    x = torch.randn(7, 40)
    assert torch.equal(fq(x), F.linear(x, wq, fq.bias))


def test_shared_codebook_is_one_parameter_and_matches_compress():
    torch.manual_seed(0)
    model = MLP()
    ref = co.compress_(copy.deepcopy(model), co.CodebookConfig(bits=2, shared=True))
    prepare_qat(model, co.CodebookConfig(bits=2, shared=True))
    layers = [model.fc1, model.fc2, model.head]
    assert all(isinstance(m, FakeQuantLinear) for m in layers)
    assert all(m.codebook is model.fc1.codebook for m in layers)
    assert sum(p is model.fc1.codebook for p in model.parameters()) == 1
    torch.testing.assert_close(model.fc1.codebook.data, ref.fc1.codebook, rtol=0, atol=0)
    for m, r in zip(layers, (ref.fc1, ref.fc2, ref.head), strict=True):
        assert torch.equal(m.quantized_weight(), r.dense_weight())


# -- straight-through gradients ---------------------------------------------------------------


def _grads_at_q(fq: FakeQuantLinear, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient of <F.linear(x, W, b), g> w.r.t. W, evaluated at W = Q(w)."""
    w_leaf = fq.quantized_weight().clone().requires_grad_(True)
    (F.linear(x, w_leaf, fq.bias.detach()) * g).sum().backward()
    return w_leaf.grad


@pytest.mark.parametrize("cfg", [co.QuantConfig(bits=2, group_size=32),
                                 co.QuantConfig(bits=4, group_size=None, symmetric=True)],
                         ids=["int2", "int4sym"])
def test_ste_passes_the_gradient_at_q_to_the_weight(cfg):
    fq = FakeQuantLinear.from_linear(_linear(), cfg)
    x, g = torch.randn(6, 40), torch.randn(6, 48)
    (fq(x) * g).sum().backward()
    expect = _grads_at_q(fq, x, g)
    torch.testing.assert_close(fq.weight.grad, expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fq.bias.grad, g.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [co.CodebookConfig(bits=2), co.CodebookConfig(bits=4,
                                                                             row_groups=4)],
                         ids=["cb2", "cb4x4"])
def test_codebook_centroids_get_the_summed_gradient_of_their_members(cfg):
    fq = FakeQuantLinear.from_linear(_linear(), cfg)
    x, g = torch.randn(6, 40), torch.randn(6, 48)
    (fq(x) * g).sum().backward()
    gw = _grads_at_q(fq, x, g)
    torch.testing.assert_close(fq.weight.grad, gw, rtol=1e-6, atol=1e-6)  # STE to w
    r, levels = fq.codebook.shape
    # member index of every weight: the position of its value in its row group's table
    wq = fq.quantized_weight().reshape(r, -1)
    idx = (wq[:, :, None] == fq.codebook.detach()[:, None, :]).float().argmax(-1)
    expect = torch.zeros(r, levels).scatter_add_(1, idx, gw.reshape(r, -1))
    torch.testing.assert_close(fq.codebook.grad, expect, rtol=1e-5, atol=1e-6)


def test_shared_codebook_gradient_sums_over_layers():
    torch.manual_seed(1)
    model = prepare_qat(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16)),
                        co.CodebookConfig(bits=2, shared=True))
    x = torch.randn(4, 32)
    model(x).square().sum().backward()
    table = model[0].codebook
    # the same loss on leaf weights at Q(w): their gradients, scattered onto the entries
    w0, w1 = (m.quantized_weight().requires_grad_(True) for m in model)
    b0, b1 = (m.bias.detach() for m in model)
    F.linear(F.linear(x, w0, b0), w1, b1).square().sum().backward()
    expect = torch.zeros_like(table)
    for m, w in zip(model, (w0, w1), strict=True):
        torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-6, atol=1e-6)
        idx = (w.detach().reshape(1, -1, 1) == table.detach()[:, None, :]).float().argmax(-1)
        expect.scatter_add_(1, idx, w.grad.reshape(1, -1))
    torch.testing.assert_close(table.grad, expect, rtol=1e-5, atol=1e-5)


def test_a_training_step_moves_assignments_and_centroids():
    fq = FakeQuantLinear.from_linear(_linear(), co.CodebookConfig(bits=2))
    before_w, before_c = fq.quantized_weight(), fq.codebook.detach().clone()
    opt = torch.optim.SGD(fq.parameters(), lr=0.5)
    x = torch.randn(16, 40)
    for _ in range(3):
        opt.zero_grad()
        (fq(x) - 1.0).square().mean().backward()
        opt.step()
    assert not torch.equal(fq.codebook.detach(), before_c)
    assert not torch.equal(fq.quantized_weight(), before_w)


# -- grid caching ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [co.QuantConfig(bits=2, group_size=32),
                                 co.QuantConfig(bits=8, group_size=None, symmetric=True),
                                 co.QuantConfig(bits=4, group_size=32)],
                         ids=["int2", "int8sym", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_grid_rounds_like_the_fresh_quantizer(cfg, dtype):
    fq = FakeQuantLinear.from_linear(_linear(dtype=dtype), cfg, refresh_every=3)
    x = torch.randn(4, 40, dtype=dtype)
    fresh = F.linear(x, fq.quantized_weight(), fq.bias)
    outs = [fq(x) for _ in range(4)]  # refresh, cached, cached, refresh
    for y in outs:
        assert torch.equal(y, fresh)


def test_refresh_every_recomputes_the_grid_every_n_training_steps():
    fq = FakeQuantLinear.from_linear(_linear(), co.QuantConfig(bits=4, group_size=32),
                                     refresh_every=2)
    x = torch.randn(4, 40)
    grids = []
    for _ in range(4):
        fq(x)
        grids.append(fq._grid[0])
    assert grids[0] is grids[1] and grids[1] is not grids[2] and grids[2] is grids[3]
    # between refreshes, the cached grid lags; eval mode always uses the fresh quantizer
    with torch.no_grad():
        fq.weight.mul_(1.5)
    fq.eval()
    assert torch.equal(fq(x), F.linear(x, fq.quantized_weight(), fq.bias))


# -- finalize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [co.QuantConfig(bits=4, group_size=32),
                                 co.QuantConfig(bits=2, group_size=None, symmetric=True),
                                 co.QuantConfig(bits=8, group_size=None, symmetric=True),
                                 co.CodebookConfig(bits=4),
                                 co.CodebookConfig(bits=2, row_groups=4),
                                 co.CodebookConfig(bits=2, shared=True)],
                         ids=["int4", "int2sym", "int8sym", "cb4", "cb2x4", "cb2shared"])
def test_finalize_matches_the_fake_quant_model(cfg):
    torch.manual_seed(0)
    model = prepare_qat(MLP(), cfg)
    x = torch.randn(5, 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # trained weights (and tables), not just the initial ones
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    qws = {n: m.quantized_weight() for n, m in model.named_modules()
           if isinstance(m, FakeQuantLinear)}
    with torch.no_grad():
        expect = model(x)
    out = finalize_qat(model)
    assert out is model
    kind = QuantLinear if isinstance(cfg, co.QuantConfig) else CodebookLinear
    for name, wq in qws.items():
        m = model.get_submodule(name)
        assert type(m) is kind
        assert torch.equal(m.dense_weight(), wq)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-5)
    if isinstance(cfg, co.CodebookConfig) and cfg.shared:
        assert model.fc1.codebook is model.fc2.codebook is model.head.codebook
        assert not model.fc1.codebook.requires_grad
        rows = {r.name: r for r in co.report(model)}
        assert "shared with fc1" in rows["head"].note


def test_finalized_table_is_a_copy_of_the_trained_one():
    fq = FakeQuantLinear.from_linear(_linear(), co.CodebookConfig(bits=2))
    packed = fq.finalize()
    with torch.no_grad():
        fq.codebook.add_(1.0)  # further training does not touch the finalized module
    assert not torch.equal(packed.codebook, fq.codebook.detach())
    assert torch.equal(fq.finalize().dense_weight(), fq.quantized_weight())


@pytest.mark.parametrize("cfg", [co.QuantConfig(bits=4, group_size=32), co.CodebookConfig()],
                         ids=["int4", "cb4"])
def test_dtype_preserved_and_bare_linear_root(cfg):
    lin = _linear(dtype=torch.bfloat16)
    fq = prepare_qat(lin, cfg)
    assert isinstance(fq, FakeQuantLinear) and fq.weight is lin.weight and fq.bias is lin.bias
    assert fq.weight.dtype == torch.bfloat16
    if fq.codebook is not None:
        assert fq.codebook.dtype == torch.bfloat16
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    y = fq(x)
    assert y.dtype == torch.bfloat16
    wq = fq.quantized_weight()
    packed = finalize_qat(fq)
    assert isinstance(packed, QuantLinear if isinstance(cfg, co.QuantConfig) else CodebookLinear)
    assert packed.weight_dtype == torch.bfloat16
    assert torch.equal(packed.dense_weight(), wq)
    torch.testing.assert_close(packed(x).float(), y.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cfg", [co.QuantConfig(bits=2, group_size=32),
                                 co.CodebookConfig(bits=2, row_groups=4)], ids=["int2", "cb2x4"])
def test_state_dict_round_trip_and_repr(cfg):
    fq = FakeQuantLinear.from_linear(_linear(), cfg)
    with torch.no_grad():
        fq.weight.add_(0.01)
        if fq.codebook is not None:
            fq.codebook.mul_(1.1)
    sd = fq.state_dict()
    expect = {"weight", "bias"} | ({"codebook"} if isinstance(cfg, co.CodebookConfig) else set())
    assert set(sd) == expect
    fresh = FakeQuantLinear(40, 48, config=cfg)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 40)
    assert torch.equal(fresh(x), fq(x))
    assert torch.equal(copy.deepcopy(fq)(x), fq(x))
    r = repr(fq)
    assert "in_features=40" in r and "bits=2" in r and "FakeQuantLinear" in r


# -- QAT recovers what PTQ loses ---------------------------------------------------------------


def _clusters(n: int = 512, d: int = 16, classes: int = 8):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + 1.2 * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("cfg", [co.QuantConfig(bits=2, group_size=None),
                                 co.CodebookConfig(bits=2)], ids=["int2", "cb2"])
def test_qat_recovers_task_loss_lost_by_ptq(cfg):
    x, y = _clusters()
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    opt = torch.optim.Adam(dense.parameters(), lr=2e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(dense(x), y).backward()
        opt.step()

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return F.cross_entropy(m(x), y).item()

    ptq = co.compress_(copy.deepcopy(dense), cfg)
    qat = prepare_qat(copy.deepcopy(dense), cfg)
    assert loss(qat) == pytest.approx(loss(ptq), rel=1e-4)  # before training: PTQ exactly
    assert loss(ptq) > 2 * loss(dense)  # int2 PTQ loses
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(qat(x), y).backward()
        opt.step()
    final = finalize_qat(qat)
    assert isinstance(final[0], QuantLinear if isinstance(cfg, co.QuantConfig) else CodebookLinear)
    assert loss(final) < 0.8 * loss(ptq)


# -- which layers, errors ------------------------------------------------------------------------


def test_prepare_with_a_recipe_keeps_none_layers_dense_and_leaves_other_configs():
    torch.manual_seed(0)
    model = MLP()
    recipe = co.Recipe({"fc1": co.QuantConfig(bits=4, group_size=32), "fc2": None,
                        "head": co.Sparse24Config()})
    assert prepare_qat(model, recipe) is model
    assert isinstance(model.fc1, FakeQuantLinear)
    assert type(model.fc2) is nn.Linear and type(model.head) is nn.Linear
    rows = {r.name: r for r in co.report(model)}
    assert rows["fc2"].note == "kept dense by recipe"
    finalize_qat(model)
    assert isinstance(model.fc1, QuantLinear)
    co.compress_(model, recipe)  # the 2:4 rule, after QAT
    assert isinstance(model.fc1, QuantLinear) and type(model.head) is not nn.Linear
    assert type(model.fc2) is nn.Linear


def test_prepare_filter_fn_tied_and_shared_modules():
    torch.manual_seed(0)
    model = MLP()
    model.alias = model.fc1  # one module under two names: one FakeQuantLinear
    prepare_qat(model, co.QuantConfig(bits=4), filter_fn=lambda m, name: name != "head")
    assert isinstance(model.fc1, FakeQuantLinear) and model.alias is model.fc1
    assert type(model.head) is nn.Linear
    assert {r.name: r for r in co.report(model)}["head"].note == "excluded by filter_fn"
    finalize_qat(model)
    assert isinstance(model.fc1, QuantLinear) and model.alias is model.fc1

    tied = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 10, bias=False))
    tied[1].weight = tied[0].weight
    prepare_qat(tied, co.QuantConfig(bits=4))
    assert type(tied[1]) is nn.Linear


def test_errors():
    lin = _linear()
    with pytest.raises(TypeError, match="expected nn.Linear"):
        FakeQuantLinear.from_linear(nn.Conv2d(3, 4, 1), co.QuantConfig())
    with pytest.raises(TypeError, match="QuantConfig, CodebookConfig or TernaryConfig"):
        FakeQuantLinear.from_linear(lin, co.Sparse24Config())
    with pytest.raises(TypeError, match="unknown config"):
        prepare_qat(MLP(), co.LowRankConfig(rank=4))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prepare_qat("model", co.QuantConfig())
    with pytest.raises(ValueError, match="row_groups=5 must divide out_features=48"):
        FakeQuantLinear.from_linear(lin, co.CodebookConfig(row_groups=5))
    with pytest.raises(ValueError, match="codebook must be"):
        FakeQuantLinear.from_linear(lin, co.CodebookConfig(bits=2), codebook=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="only used with a CodebookConfig"):
        FakeQuantLinear.from_linear(lin, co.QuantConfig(), codebook=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="refresh_every"):
        FakeQuantLinear.from_linear(lin, co.QuantConfig(), refresh_every=0)
    with pytest.raises(ValueError, match="in_features=40"):
        FakeQuantLinear.from_linear(lin, co.QuantConfig())(torch.randn(2, 41))
    # via prepare_qat, an unsupported row grouping leaves the layer dense with the reason
    model = prepare_qat(nn.Sequential(nn.Linear(8, 50), nn.Linear(50, 48)),
                        co.CodebookConfig(row_groups=4))
    assert type(model[0]) is nn.Linear and isinstance(model[1], FakeQuantLinear)
    assert "row_groups=4" in {r.name: r for r in co.report(model)}["0"].note


def test_prepare_qat_rejects_a_recipe_rule_that_matches_no_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="match no layer"):
        prepare_qat(model, co.Recipe({"0": co.QuantConfig(bits=4), "typo": None}))
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_at_the_fp16_maximum_is_finite(symmetric):
    """The grid's unused overflowing end level (fp16 weights at +-65504) is never chosen."""
    lin = nn.Linear(64, 4).half()
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.rand(4, 64) < 0.5, 65504.0, -65504.0))
    model = nn.Sequential(lin)
    prepare_qat(model, co.QuantConfig(8, None, symmetric))
    assert torch.isfinite(model[0].quantized_weight()).all()
    x = torch.full((1, 64), 1e-4, dtype=torch.float16)
    assert torch.isfinite(model(x)).all()
    finalize_qat(model)
    assert torch.isfinite(model[0].dense_weight()).all()


def test_round_to_grid_never_picks_an_overflowing_level():
    """A grid whose top level overflows fp16 (scale 516: 127 x 516 > 65504, what rounding
    65504 / 127 up gives) rounds the weights at the top to the level below instead."""
    from compress_ops.qat import _round_to_grid

    w = torch.full((2, 32), 65504.0, dtype=torch.float16)
    scales = torch.full((2, 1), 516.0, dtype=torch.float16)
    out = _round_to_grid(w, scales, None, 8, 32)
    assert torch.isfinite(out).all() and (out == 126 * 516).all()
