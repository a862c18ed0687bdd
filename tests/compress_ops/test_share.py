"""co.share: tying layers before training (ALBERT-style weight sharing): one weight per group,
gradients summed over every use, ties that survive checkpoints, ``.to``, ``torch.compile`` and
``compress_``, a ``report()`` that counts a tied weight once, and named errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import compress_ops as co
from compress_ops import share
from compress_ops.integrations import serialization as ser
from compress_ops.nn.dequant import QuantLinear


class Stack(nn.Module):
    """Three equal linears used in a chain, a different one, and a conv pair."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 24)
        self.b = nn.Linear(24, 24)
        self.c = nn.Linear(24, 24)
        self.head = nn.Linear(24, 8)
        self.norm = nn.LayerNorm(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        x = torch.tanh(self.b(x))
        return self.head(self.norm(torch.tanh(self.c(x))))


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


X = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))


def _bert(layers: int = 3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _resnet18():
    from compress_ops.perf.compat import import_torchvision

    import_torchvision()
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


# ---------------------------------------------------------------------------------- tie_


@pytest.mark.parametrize("share_module", [False, True])
def test_init_first_keeps_the_first_weight_in_one_parameter(share_module):
    model = stack()
    w_a, b_a = model.a.weight.detach().clone(), model.a.bias.detach().clone()
    param = model.a.weight
    tied = share.tie_(model, [["a", "b", "c"]], share_module=share_module)
    assert model.a.weight is param and model.b.weight is param and model.c.weight is param
    assert model.b.bias is model.a.bias and model.c.bias is model.a.bias
    assert torch.equal(param, w_a) and torch.equal(model.a.bias, b_a)
    assert (model.b is model.a) == share_module and (model.c is model.a) == share_module
    assert tied.groups == (("a", "b", "c"),) and tied.share_module == share_module
    assert tied.params_saved == 2 * (24 * 24 + 24)
    assert tied.bytes_saved == 4 * tied.params_saved
    assert tied.params_after == sum(p.numel() for p in model.parameters())
    assert "a" in str(tied) and str(tied.params_saved) in str(tied)


def test_init_mean_writes_the_mean_in_place_and_bias_keep_keeps_biases():
    model = stack()
    ws = [m.weight.detach().clone() for m in (model.a, model.b, model.c)]
    bs = [m.bias for m in (model.a, model.b, model.c)]
    param = model.a.weight
    tied = share.tie_(model, ["a", "b", "c"], init="mean", bias="keep")  # one list: one group
    assert model.a.weight is param  # (written in place: optimizer references survive)
    assert torch.equal(param, torch.stack(ws).mean(0))
    assert model.b.weight is param and model.c.weight is param
    assert [model.a.bias, model.b.bias, model.c.bias] == bs  # each its own bias Parameter
    assert not tied.share_module and tied.params_saved == 2 * 24 * 24


def test_init_mean_shares_the_mean_bias_too():
    model = stack()
    bs = [m.bias.detach().clone() for m in (model.a, model.b, model.c)]
    share.tie_(model, [["a", "b", "c"]], init="mean")
    assert torch.equal(model.a.bias, torch.stack(bs).mean(0)) and model.c is model.a


def test_several_groups_and_conv_ties():
    model = Convs()
    w1 = model.c1.weight.detach().clone()
    tied = share.tie_(model, [["c1", "c2"]])
    assert model.c2 is model.c1 and torch.equal(model.c1.weight, w1)
    assert tied.params_saved == 8 * 8 * 9 + 8
    model = Convs()  # another stride: weights only
    tied = share.tie_(model, [["c1", "c3"]], share_module=False)
    assert model.c3.weight is model.c1.weight and model.c3.stride == (2, 2)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 8, 3, 3)


def _raises(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


BAD = [
    (lambda m: share.tie_(m, [["a", "nope"]]), ValueError, "'nope' is not a module"),
    (lambda m: share.tie_(m, [["a", "head"]]), ValueError, r"head's weight has shape \(8, 24\)"),
    (lambda m: share.tie_(m, [["a"]]), ValueError, "at least two"),
    (lambda m: share.tie_(m, [["a", "b"], ["b", "c"]]), ValueError, "b is in two groups"),
    (lambda m: share.tie_(m, [["a", "a"]]), ValueError, "a is in two groups"),
    (lambda m: share.tie_(m, [["norm", "a"]]), TypeError, "norm is a LayerNorm"),
    (lambda m: share.tie_(m, [["", "a"]]), ValueError, "the model itself"),
    (lambda m: share.tie_(m, "a"), TypeError, "groups must be a list"),
    (lambda m: share.tie_(m, [["a", 3]]), TypeError, "layer names"),
    (lambda m: share.tie_(m, [["a", "b"]], init="median"), ValueError, "init must be one of"),
    (lambda m: share.tie_(m, [["a", "b"]], bias="drop"), ValueError, "bias must be one of"),
    (lambda m: share.tie_(m, [["a", "b"]], bias="keep", share_module=True), ValueError,
     "needs bias='share'"),
    (lambda m: share.tie_(m, [["a", "b"]], share_module=1), TypeError, "share_module"),
    (lambda m: share.tie_("m", [["a", "b"]]), TypeError, "nn.Module"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_a_named_error_and_changes_nothing(call, exc, match):
    model = stack()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    values = {n: p.detach().clone() for n, p in before.items()}
    _raises(exc, match, lambda: call(model))
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] and torch.equal(after[n], values[n]) for n in before)


def test_bad_layers_are_named():
    model = stack()
    model.b = nn.Linear(24, 24, dtype=torch.float64)
    _raises(ValueError, "b's weight has dtype torch.float64", lambda: share.tie_(model, ["a", "b"]))
    model = stack()
    model.b = nn.Linear(24, 24, bias=False)
    _raises(ValueError, "a has a bias and b has none", lambda: share.tie_(model, ["a", "b"]))
    share.tie_(model, ["a", "b"], bias="keep")  # (weights only: fine)
    model = stack()
    model.b = nn.Conv2d(24, 24, 1)
    _raises(TypeError, "b is a Conv2d, a a Linear", lambda: share.tie_(model, ["a", "b"]))
    model = stack()
    model.b.register_forward_hook(lambda *a: None)
    _raises(ValueError, "b has forward hooks", lambda: share.tie_(model, ["a", "b"]))
    share.tie_(model, ["a", "b"], share_module=False)  # the hook still runs on b
    model = stack()
    model.c.weight = model.a.weight  # tied outside the group
    _raises(ValueError, r"c.weight is already tied to a, outside the group",
            lambda: share.tie_(model, ["b", "c"]))
    model = Convs()
    _raises(ValueError, "c3 has stride=", lambda: share.tie_(model, ["c1", "c3"]))
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(16, 8, 3, groups=4))
    _raises(ValueError, "1 has groups=4", lambda: share.tie_(model, ["0", "1"], bias="keep"))
    model = co.compress_(stack(), co.QuantConfig(bits=4, group_size=None))
    _raises(TypeError, "a is already compressed", lambda: share.tie_(model, ["a", "b"]))


# ------------------------------------------------------------------------------- training


@pytest.mark.parametrize("share_module", [False, True])
def test_gradients_accumulate_over_every_use(share_module):
    untied = stack()
    with torch.no_grad():
        for m in (untied.b, untied.c):
            m.weight.copy_(untied.a.weight)
            m.bias.copy_(untied.a.bias)
    model = stack()
    share.tie_(model, [["a", "b", "c"]], share_module=share_module)
    model(X).square().sum().backward()
    untied(X).square().sum().backward()
    want_w = untied.a.weight.grad + untied.b.weight.grad + untied.c.weight.grad
    want_b = untied.a.bias.grad + untied.b.bias.grad + untied.c.bias.grad
    torch.testing.assert_close(model.a.weight.grad, want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.a.bias.grad, want_b, rtol=1e-5, atol=1e-6)
    assert model.c.weight.grad is model.a.weight.grad
    # one optimizer step moves every use together
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(model.b.weight, model.a.weight)


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("share_module", [False, True])
def test_state_dict_loads_into_a_freshly_tied_model(share_module):
    model = stack()
    share.tie_(model, [["a", "b", "c"]], init="mean", share_module=share_module)
    with torch.no_grad():
        model.a.weight.add_(torch.randn_like(model.a.weight))  # "trained"
    state = model.state_dict()
    fresh = Stack()  # another seed's weights
    share.tie_(fresh, [["a", "b", "c"]], init="mean", share_module=share_module)
    fresh.load_state_dict(state)
    assert fresh.c.weight is fresh.a.weight and fresh.b.bias is fresh.a.bias
    assert torch.equal(fresh.a.weight, model.a.weight)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_co_save_stores_a_tied_weight_once_and_co_load_reties_it(tmp_path):
    model = stack()
    share.tie_(model, [["a", "b", "c"]], share_module=False)
    man, tensors = ser.manifest(model)
    assert "b.weight" not in tensors and man["aliases"]["b.weight"] == "a.weight"
    path = tmp_path / "tied.safetensors"
    co.save(model, path)
    loaded = co.load(Stack, path)  # a fresh, untied model: co.load ties it
    assert loaded.b.weight is loaded.a.weight and loaded.c.weight is loaded.a.weight
    assert loaded.c.bias is loaded.a.bias
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert str(co.report(loaded)) == str(co.report(model))

    def tied_fresh() -> Stack:
        fresh = Stack()
        share.tie_(fresh, [["a", "b", "c"]])  # module-level into the same names
        return fresh

    shared = stack()
    share.tie_(shared, [["a", "b", "c"]])
    co.save(shared, path)
    loaded = co.load(tied_fresh, path)
    assert loaded.c is loaded.a
    with torch.no_grad():
        assert torch.equal(loaded(X), shared(X))


@pytest.mark.parametrize("share_module", [False, True])
def test_to_dtype_and_device_keep_the_tie(share_module):
    model = stack()
    share.tie_(model, [["a", "b", "c"]], share_module=share_module)
    model.to(torch.float64)
    assert model.b.weight is model.a.weight and model.a.weight.dtype == torch.float64
    model.to(device="cpu")
    assert model.c.weight is model.a.weight and model.c.bias is model.a.bias
    model.half().float()
    assert model.c.weight is model.a.weight


# ------------------------------------------------------------------------------ compile


@pytest.fixture
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_parity(backend: str, share_module: bool = False) -> None:
    model = stack()
    share.tie_(model, [["a", "b", "c"]], share_module=share_module)
    ref = copy.deepcopy(model)
    assert ref.b.weight is ref.a.weight  # (deepcopy keeps the tie)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(X), ref(X), rtol=1e-5, atol=1e-5)
    compiled(X).square().sum().backward()
    ref(X).square().sum().backward()
    torch.testing.assert_close(model.a.weight.grad, ref.a.weight.grad, rtol=1e-4, atol=1e-5)
    assert model.b.weight.grad is model.a.weight.grad


@pytest.mark.parametrize("share_module", [False, True])
@pytest.mark.usefixtures("_reset_dynamo")
def test_compile_aot_eager_matches_eager_with_grad(share_module):
    _compile_parity("aot_eager", share_module)


@pytest.mark.slow
@pytest.mark.usefixtures("_reset_dynamo")
def test_compile_inductor_matches_eager_with_grad():
    _compile_parity("inductor")


# ------------------------------------------------------------------------------- report


def test_report_counts_a_tied_weight_once():
    model = stack()
    dense = co.report(model)
    share.tie_(model, [["a", "b", "c"]], share_module=False)
    rows = {r.name: r for r in co.report(model)}
    nbytes = 24 * 24 * 4
    assert rows["a"].stored_bytes == nbytes and rows["a"].note == ""
    assert rows["b"].stored_bytes == 0 and rows["b"].note == "weight tied to a"
    assert rows["c"].dense_bytes == 0 and rows["c"].note == "weight tied to a"
    assert co.report(model).stored_bytes == dense.stored_bytes - 2 * nbytes
    # compress_ keeps weight-tied layers dense with its reason, counted once still
    co.compress_(model, co.QuantConfig(bits=4, group_size=None))
    rows = {r.name: r for r in co.report(model)}
    assert type(model.b) is nn.Linear and rows["b"].stored_bytes == 0
    assert rows["b"].note == "weight tied to a; compressing would break the tie"
    assert rows["head"].kind == "quant"


def test_report_lists_tied_convs_and_shared_modules_once():
    model = Convs()
    assert [(r.name, r.note) for r in co.report(model)] == [("c1", ""), ("c2", ""), ("c3", "")]
    share.tie_(model, ["c1", "c3"], share_module=False)
    rows = {r.name: r for r in co.report(model)}
    assert sorted(rows) == ["c1", "c2", "c3"] and rows["c3"].stored_bytes == 0
    assert rows["c3"].note == "weight tied to c1" and rows["c1"].stored_bytes == 8 * 8 * 9 * 4
    model = Convs()
    share.tie_(model, ["c1", "c2"])
    rows = co.report(model)
    assert [r.name for r in rows] == ["c1", "c3"] and rows[0].note == "also at c2"


def test_compress_after_a_module_tie_builds_one_compressed_module():
    model = stack()
    share.tie_(model, [["a", "b", "c"]], init="mean")
    with torch.no_grad():
        dense_out = model(X)
    co.compress_(model, co.QuantConfig(bits=4, group_size=None))
    assert isinstance(model.a, QuantLinear) and model.b is model.a and model.c is model.a
    rows = [r for r in co.report(model) if r.compressible]
    assert [r.name for r in rows] == ["a", "head"]
    assert rows[0].note == "also at b, c"
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense_out, rtol=0.2, atol=0.2)


# ------------------------------------------------------------------------------ helpers


def test_tie_blocks_ties_every_bert_layer_to_the_first_and_compresses_once():
    model = _bert(3)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    before = sum(p.numel() for p in model.parameters())
    assert share.find_blocks(model) == "encoder.layer"
    q0 = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    tied = share.tie_blocks(model)
    assert len(tied.groups) == 6  # q, k, v, o, up, down
    assert tied.groups[0] == tuple(f"encoder.layer.{i}.attention.self.query" for i in range(3))
    layers = model.encoder.layer
    assert layers[2].output.dense is layers[0].output.dense
    assert layers[1].attention.output.LayerNorm is not layers[0].attention.output.LayerNorm
    assert torch.equal(layers[2].attention.self.query.weight, q0)
    per_block = sum(p.numel() for m in layers[0].modules() if isinstance(m, nn.Linear)
                    for p in m.parameters())
    assert tied.params_saved == 2 * per_block == before - tied.params_after
    co.compress_(model, co.QuantConfig(bits=4, group_size=None))
    assert isinstance(layers[0].intermediate.dense, QuantLinear)
    assert layers[2].intermediate.dense is layers[0].intermediate.dense
    names = [r.name for r in co.report(model) if r.compressible]  # (norms are not tied)
    assert not any(n.startswith(("encoder.layer.1", "encoder.layer.2")) for n in names)
    with torch.no_grad():
        assert model(ids).last_hidden_state.isfinite().all()


def test_tie_blocks_weights_only_with_an_explicit_name_and_mean():
    model = _bert(2)
    ws = [model.encoder.layer[i].intermediate.dense.weight.detach().clone() for i in range(2)]
    tied = share.tie_blocks(model, "encoder.layer", init="mean", bias="keep")
    layers = model.encoder.layer
    assert layers[1].intermediate.dense is not layers[0].intermediate.dense
    assert layers[1].intermediate.dense.weight is layers[0].intermediate.dense.weight
    assert layers[1].intermediate.dense.bias is not layers[0].intermediate.dense.bias
    assert torch.equal(layers[0].intermediate.dense.weight, torch.stack(ws).mean(0))
    assert not tied.share_module


def test_tie_blocks_handles_hf_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    tied = share.tie_blocks(model)
    assert ("h.0.mlp.c_fc", "h.1.mlp.c_fc") in tied.groups
    assert model.h[1].attn.c_attn is model.h[0].attn.c_attn


def test_find_blocks_refuses_ambiguity_and_absence():
    twin = nn.Module()
    twin.enc = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    twin.dec = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    _raises(ValueError, "several lists of 2 repeated blocks", lambda: share.tie_blocks(twin))
    tied = share.tie_blocks(twin, "dec")
    assert tied.groups == (("dec.0", "dec.1"),)
    _raises(ValueError, "no nn.ModuleList of repeated blocks",
            lambda: share.find_blocks(stack()))
    _raises(ValueError, "'nope' is not a module", lambda: share.tie_blocks(twin, "nope"))


def test_tie_convs_ties_equal_convs_inside_each_resnet_stage():
    model = _resnet18()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert share.find_stages(model) == ["layer1", "layer2", "layer3", "layer4"]
    before = sum(p.numel() for p in model.parameters())
    tied = share.tie_convs(model)
    assert tied.groups[0] == ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                              "layer1.1.conv2")
    assert tied.groups[1] == ("layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2")
    assert len(tied.groups) == 4  # (layer2.0.conv1 has stride 2 and another shape)
    assert model.layer4[1].conv2 is model.layer4[0].conv2
    assert model.layer2[0].bn2 is not model.layer2[1].bn1
    saved = 3 * 64 * 64 * 9 + sum(2 * c * c * 9 for c in (128, 256, 512))
    assert tied.params_saved == saved == before - sum(p.numel() for p in model.parameters())
    rows = {r.name: r for r in co.report(model)}
    assert rows["layer1.0.conv1"].note == "also at layer1.0.conv2, layer1.1.conv1, layer1.1.conv2"
    with torch.no_grad():
        assert model(x).shape == (1, 10)


def test_tie_convs_weights_only_and_explicit_stages():
    model = _resnet18()
    tied = share.tie_convs(model, "layer2", share_module=False)
    assert all(n.startswith("layer2.") for g in tied.groups for n in g)
    # weights only: layer2.0.conv1 (stride 2) still has its own shape; conv2 is shared
    assert model.layer2[1].conv1.weight is model.layer2[0].conv2.weight
    assert model.layer2[1].conv1 is not model.layer2[0].conv2
    with pytest.warns(UserWarning, match="nothing tied"):
        empty = share.tie_convs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3)), [""])
    assert empty.groups == () and empty.params_saved == 0


def test_find_stages_takes_the_innermost_containers():
    def block() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())

    model = nn.Sequential(nn.Sequential(block(), block()), nn.Sequential(block(), block()))
    assert share.find_stages(model) == ["0", "1"]
    tied = share.tie_convs(model)
    assert tied.groups == (("0.0.0", "0.1.0"), ("1.0.0", "1.1.0"))


def test_a_compressed_module_tie_roundtrips_through_co_save(tmp_path):
    model = stack()
    share.tie_(model, [["a", "b", "c"]], init="mean")
    co.compress_(model, co.QuantConfig(bits=4, group_size=None))
    path = tmp_path / "tied-int4.safetensors"
    co.save(model, path)
    loaded = co.load(Stack, path)  # a fresh dense, untied model
    assert isinstance(loaded.a, QuantLinear) and loaded.b is loaded.a and loaded.c is loaded.a
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert str(co.report(loaded)) == str(co.report(model))


def test_report_under_parametrizations_counts_the_originals_once():
    """A Pruner's masks and weight_norm keep their tensors in parametrizations: report()
    counts those (what state_dict holds), never a recomputed weight's id as a tie."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))
                            for _ in range(20)])
    dense = co.report(model)
    co.prune.Pruner(model, sparsity=0.5)
    rows = co.report(model)
    assert not [r for r in rows if "tied" in r.note]
    assert rows.stored_bytes == rows.dense_bytes == dense.stored_bytes == 20 * (32 * 32 + 64) * 4
    wn = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 16, 3)),
                       nn.utils.parametrizations.weight_norm(nn.Embedding(10, 4)))
    total = sum(p.numel() * 4 for p in wn.parameters())
    assert co.report(wn).stored_bytes == total  # (g, v and the bias; the table's g, v)
    assert [r.name for r in co.report(wn)] == ["0", "1"]
