"""compress_ops/api.py: configs, compress_, Recipe, report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops import configs
from compress_ops.nn import Sparse24Linear

from .models import MLP, Block


def test_compress_replaces_every_linear_and_keeps_outputs_close_to_pruned_dense():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 64)
    out = co.compress_(model, co.Sparse24Config())
    assert out is model
    assert all(isinstance(m, Sparse24Linear) for m in (model.fc1, model.fc2, model.head))
    # the model's own dense reference: every layer through F.linear on its dense weight
    ref = x.double()
    for m in (model.fc1, model.fc2, model.head):
        b = None if m.bias is None else m.bias.double()
        ref = torch.nn.functional.linear(ref, m.dense_weight().double(), b)
        ref = torch.relu(ref) if m is model.fc1 else ref
        ref = torch.nn.functional.gelu(ref) if m is model.fc2 else ref
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_filter_fn_and_report():
    model = MLP()
    co.compress_(model, co.Sparse24Config(), filter_fn=lambda m, name: name != "head")
    assert isinstance(model.fc1, Sparse24Linear) and type(model.head) is nn.Linear
    rows = {r.name: r for r in co.report(model)}
    assert rows["head"].kind == "dense" and rows["head"].note == "excluded by filter_fn"
    assert rows["fc1"].kind == "sparse24"
    # fc1: 64 in -> 64 padded columns: (32 values * 4 B + 2 words * 4 B) per row
    assert rows["fc1"].dense_bytes == 96 * 64 * 4
    assert rows["fc1"].stored_bytes == 96 * (32 * 4 + 2 * 4)
    text = str(co.report(model))
    assert "TOTAL" in text and "fc1" in text and "excluded by filter_fn" in text


def test_report_ratio_fp16_meets_target():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)).half()
    co.compress_(model, co.Sparse24Config())
    rep = co.report(model)
    assert all(abs(r.ratio - 0.5625) < 1e-12 for r in rep)
    assert rep.stored_bytes / rep.dense_bytes <= 0.57


def test_recipe_first_match_wins_and_none_keeps_dense():
    model = Block()
    recipe = co.Recipe({r"(q|k|v)": None, r"up|down": co.Sparse24Config()})
    co.compress_(model, recipe)
    assert type(model.q) is nn.Linear and type(model.o) is nn.Linear
    assert isinstance(model.up, Sparse24Linear) and isinstance(model.down, Sparse24Linear)
    notes = {r.name: r.note for r in co.report(model)}
    assert notes["q"] == "kept dense by recipe" and notes["o"] == "not taken by the configs applied"


def test_unsupported_modules_are_left_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(32, 32))
    model.add_module("attn", nn.MultiheadAttention(32, 4))
    co.compress_(model, co.Sparse24Config())
    assert isinstance(model[0], Sparse24Linear)
    assert type(model.attn.out_proj) is not Sparse24Linear  # its weight is read directly
    notes = {r.name: r.note for r in co.report(model)}
    assert "not a plain nn.Linear" in notes["attn.out_proj"]
    out, _ = model.attn(torch.randn(3, 1, 32), torch.randn(3, 1, 32), torch.randn(3, 1, 32))
    assert out.shape == (3, 1, 32)


def test_compress_that_changes_nothing_is_never_silent_and_root_linear_is_returned():
    model = MLP()
    co.compress_(model, co.Sparse24Config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # again (the README's examples run in sequence): an error naming the layers
    with pytest.raises(co.AlreadyCompressedError, match=r"compressed already \(fc1, fc2"):
        co.compress_(model, co.QuantConfig(bits=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="no layer of a type it handles"):
        co.compress_(nn.Sequential(nn.ReLU()), co.QuantConfig())
    tiny = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(UserWarning, match=r"every candidate layer stayed dense \(0: .*rank"):
        co.compress_(tiny, co.LowRankConfig(rank=3))
    assert type(tiny[0]) is nn.Linear
    new = co.compress_(nn.Linear(32, 8), co.Sparse24Config())
    assert isinstance(new, Sparse24Linear)


def test_a_config_over_partly_compressed_layers_is_an_error_before_anything_changes():
    """Issue 17: a second config that would take a layer compressed already never skips it
    silently while compressing the rest: AlreadyCompressedError names it, nothing changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    co.compress_(model, co.QuantConfig(bits=4), filter_fn=lambda m, name: name == "0")
    assert type(model[0]).__name__ == "QuantLinear" and type(model[2]) is nn.Linear
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (co.Sparse24Config(), co.Recipe({".*": co.Sparse24Config()}),
                   co.QuantConfig(bits=8), co.LowRankConfig(rank=2)):
        with pytest.raises(co.AlreadyCompressedError,
                           match=r"compressed already \(0\); nothing was changed.*filter_fn"):
            co.compress_(model, config)
        assert type(model[2]) is nn.Linear  # "2" was not compressed either
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # leaving the compressed layer out compresses the others: a filter_fn, or a Recipe
    again = co.compress_(model, co.Sparse24Config(),
                         filter_fn=lambda m, name: not isinstance(m, co.nn.CompressedModule))
    assert again is model and isinstance(model[2], Sparse24Linear)
    assert type(model[0]).__name__ == "QuantLinear"
    other = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    co.compress_(other, co.Recipe({"0": co.QuantConfig(bits=4)}))
    co.compress_(other, co.Recipe({"0": None, "2": co.Sparse24Config()}))
    assert type(other[0]).__name__ == "QuantLinear" and isinstance(other[2], Sparse24Linear)
    # a filter_fn leaving out every compressed layer when nothing else is left: a warning
    with pytest.warns(UserWarning, match=r"compressed already and filter_fn left them out "
                                         r"\(0, 2\)"):
        co.compress_(other, co.QuantConfig(), filter_fn=lambda m, name: name == "x")


def test_compressed_layers_a_config_would_not_take_do_not_stop_it():
    """Only the compressed layers of a type the new config handles count: a conv config's
    compressed convs do not stop a linear config, and the other way round."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    x = torch.randn(2, 4, 6, 6)
    co.compress_(model, co.SharedFilterConfig(filters=2))
    assert type(model[0]).__name__ == "SharedFilterConv2d"
    co.compress_(model, co.QuantConfig(bits=8, group_size=None))  # the linear only
    assert type(model[2]).__name__ == "QuantLinear" and model(x).shape == (2, 16)
    # a config handling convs too (LowRank) would take the compressed conv: named
    with pytest.raises(co.AlreadyCompressedError, match=r"compressed already \(0, 2\)"):
        co.compress_(model, co.LowRankConfig(rank=2))
    convs = nn.Sequential(nn.Linear(6, 6), nn.Conv2d(4, 8, 3))
    co.compress_(convs, co.QuantConfig(bits=8, group_size=None))
    co.compress_(convs, co.SharedFilterConfig(filters=2))  # the quantized linear is no conv
    assert type(convs[1]).__name__ == "SharedFilterConv2d"


def test_compressing_a_compressed_module_itself_is_an_error_naming_it():
    new = co.compress_(nn.Linear(32, 8), co.Sparse24Config())
    for config in (co.QuantConfig(bits=4), co.Sparse24Config(),
                   co.Recipe({".*": co.QuantConfig()})):
        with pytest.raises(co.AlreadyCompressedError, match=r"<root> \(Sparse24Linear\)"):
            co.compress_(new, config)
    assert isinstance(new, Sparse24Linear)
    # a config that does not handle its type: the warning says what the model is
    with pytest.warns(UserWarning, match="no layer of a type it handles.*compressed "
                                         "Sparse24Linear"):
        co.compress_(new, co.SharedFilterConfig(filters=2))


def test_config_and_argument_validation():
    with pytest.raises(TypeError, match="prune"):
        co.Sparse24Config(prune="yes")
    with pytest.raises(TypeError, match="unknown config"):
        co.compress_(MLP(), object())
    with pytest.raises(TypeError, match="nn.Module"):
        co.compress_("model", co.Sparse24Config())
    with pytest.raises(ValueError, match="bad Recipe pattern"):
        co.Recipe({"(": None})
    with pytest.raises(TypeError, match="unknown config"):
        co.Recipe({"fc1": 3})


def test_shared_linear_is_compressed_once_and_replaced_everywhere():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(4, 32)
    co.compress_(model, co.Sparse24Config())
    assert isinstance(model[0], Sparse24Linear) and model[0] is model[2]
    torch.testing.assert_close(model(x), model[0](torch.relu(model[0](x))))
    rows = co.report(model)
    assert [r.name for r in rows] == ["0"]  # one module, reported once


def test_tied_weight_is_left_dense_with_a_reason():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(t))

    model = TiedLM()
    co.compress_(model, co.Sparse24Config())
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    notes = {r.name: r.note for r in co.report(model)}
    assert "tied to embed" in notes["head"]


def test_shared_module_with_conflicting_rules_stays_dense():
    shared = nn.Linear(32, 32)
    model = nn.Sequential()
    model.add_module("a", shared)
    model.add_module("b", shared)
    co.compress_(model, co.Recipe({"a": co.Sparse24Config(), "b": None}))
    assert type(model.a) is nn.Linear
    assert "different recipe rules" in co.report(model)[0].note


def test_recipe_is_hashable_and_copies_its_rules():
    rules = {"fc1": co.Sparse24Config()}
    recipe = co.Recipe(rules)
    hash(recipe)
    rules["fc2"] = co.Sparse24Config()  # the caller's later edit does not leak into the recipe
    model = MLP()
    co.compress_(model, recipe)
    assert isinstance(model.fc1, Sparse24Linear) and type(model.fc2) is nn.Linear


def test_report_keeps_notes_of_compress_calls_on_submodules():
    model = nn.Sequential(MLP())
    co.compress_(model[0], co.Sparse24Config(), filter_fn=lambda m, name: name != "head")
    notes = {r.name: r.note for r in co.report(model)}
    assert notes["0.head"] == "excluded by filter_fn"


# --------------------------------------------------------------------------------------------
# Low-bit and codebook configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: co.QuantConfig(bits=5), ValueError, "bits must be one of"),
        (lambda: co.QuantConfig(bits=True), ValueError, "bits must be one of"),
        (lambda: co.QuantConfig(group_size=100), ValueError, "group_size must be one of"),
        (lambda: co.QuantConfig(symmetric=1), TypeError, "symmetric"),
        (lambda: co.QuantConfig(search_steps=-1), ValueError, "search_steps"),
        (lambda: co.CodebookConfig(bits=1), ValueError, "bits must be one of"),
        (lambda: co.CodebookConfig(row_groups=0), ValueError, "row_groups"),
        (lambda: co.CodebookConfig(iters=-2), ValueError, "iters"),
        (lambda: co.CodebookConfig(shared=True, row_groups=2), ValueError, "one row group"),
    ],
)
def test_lowbit_config_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("config", [co.QuantConfig(), co.QuantConfig(bits=8, symmetric=True),
                                    co.CodebookConfig(bits=3)], ids=["int4", "int8", "cb3"])
def test_compress_with_lowbit_configs_matches_the_effective_dense_model(config):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 64)
    dense_out = model(x)
    co.compress_(model, config)
    kind = "quant" if isinstance(config, co.QuantConfig) else "codebook"
    assert all(r.kind == kind for r in co.report(model))
    ref = x.double()
    for m in (model.fc1, model.fc2, model.head):
        b = None if m.bias is None else m.bias.double()
        ref = torch.nn.functional.linear(ref, m.dense_weight().double(), b)
        ref = torch.relu(ref) if m is model.fc1 else ref
        ref = torch.nn.functional.gelu(ref) if m is model.fc2 else ref
    out = model(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert ((out - dense_out).norm() / dense_out.norm()) < 0.25


def test_shared_codebook_under_a_recipe_is_one_tensor_stored_once(tmp_path):
    torch.manual_seed(0)
    model = Block()
    originals = [model.up.weight.detach().clone(), model.down.weight.detach().clone()]
    shared = co.CodebookConfig(bits=4, shared=True)
    co.compress_(model, co.Recipe({r"up|down": shared, r"q|k|v|o": co.QuantConfig(bits=8)}))
    from compress_ops.nn import CodebookLinear, QuantLinear

    assert isinstance(model.up, CodebookLinear) and isinstance(model.q, QuantLinear)
    assert model.up.codebook is model.down.codebook  # one table, fit over both layers
    rows = {r.name: r for r in co.report(model)}
    assert rows["down"].note == "codebook shared with up"
    assert rows["down"].stored_bytes == model.down.index_bytes()
    assert rows["up"].stored_bytes == model.up.index_bytes() + 16 * 4
    # torch.save keeps the shared storage once
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["up.codebook"].data_ptr() == loaded["down.codebook"].data_ptr()
    # the shared table is the k-means fit of both layers' weights together
    from compress_ops.quantize import fit_codebook

    torch.testing.assert_close(model.up.codebook, fit_codebook(originals, 4))


def test_unshared_codebooks_are_per_layer():
    model = MLP()
    co.compress_(model, co.CodebookConfig(bits=2))
    assert model.fc1.codebook is not model.fc2.codebook
    assert all(r.note == "" for r in co.report(model))


def test_shared_codebook_refuses_mixed_dtypes_with_a_reason():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32).double())
    co.compress_(model, co.CodebookConfig(shared=True))
    notes = [r.note for r in co.report(model)]
    assert all("one dtype and device" in n for n in notes)
    assert all(type(m) is nn.Linear for m in model)


def test_a_failing_transform_leaves_the_model_untouched(monkeypatch):

    model = MLP()
    before = [type(m) for m in model.modules()]
    calls = []

    def boom(module, config):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("transform failed")
        return Sparse24Linear.from_dense(module, config)

    monkeypatch.setitem(configs._TRANSFORMS, co.Sparse24Config,
                        configs.Transform((nn.Linear,), boom))
    with pytest.raises(RuntimeError, match="transform failed"):
        co.compress_(model, co.Sparse24Config())
    assert [type(m) for m in model.modules()] == before  # nothing swapped in


def test_fp16_model_with_dead_rows_quantizes():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64)).half()
    with torch.no_grad():
        model[2].weight[3] = 0.0  # a dead row: an all-zero group in fp16
        model[0].weight[:, :32] = 0.5  # constant groups
    co.compress_(model, co.QuantConfig(bits=4, group_size=32))
    assert all(r.kind == "quant" for r in co.report(model))
    w = model[2].dense_weight()
    assert torch.isfinite(w).all() and (w[3] == 0).all()


def test_recipe_rule_matching_no_layer_is_an_error():
    model = MLP()
    with pytest.raises(ValueError, match=r"\[.fc3.\] match no layer.*fc1"):
        co.compress_(model, co.Recipe({"fc1": co.Sparse24Config(), "fc3": None}))
    assert type(model.fc1) is nn.Linear  # nothing was changed
    container = nn.Sequential(MLP(), nn.ReLU())
    for rules in ({"0": co.QuantConfig()},  # a container only
                  {"1": None},  # a ReLU only
                  {r"0\.fc1": co.LowRankConfig(rank=2), r"0\.nothing": None}):
        with pytest.raises(ValueError, match="match no layer"):
            co.compress_(container, co.Recipe(rules))
    co.compress_(container, co.Recipe({r"0\.fc1": co.Sparse24Config()}))
    with pytest.raises(co.AlreadyCompressedError, match=r"0\.fc1"):  # again: named
        co.compress_(container, co.Recipe({r"0\.fc1": co.Sparse24Config()}))


@pytest.mark.parametrize("key", [1, None, ("0",), b"0"])
def test_recipe_keys_must_be_regex_strings(key):
    with pytest.raises(TypeError, match="Recipe keys are regex strings"):
        co.Recipe({key: co.QuantConfig()})


def test_lowrank_leaves_patch_embeddings_dense_unless_asked():
    """A ViT patch embedding (stride = kernel, no padding) stays a Conv2d: Hugging Face's ViT
    reads projection.weight.dtype in its forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), nn.Conv2d(64, 64, 3, padding=1))
    co.compress_(model, co.LowRankConfig(rank=8))
    assert type(model[0]) is nn.Conv2d and type(model[1]).__name__ == "LowRankConv2d"
    assert "a patch embedding" in {r.name: r.note for r in co.report(model)}["0"]
    model = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4))
    co.compress_(model, co.LowRankConfig(rank=2, patch_embeddings=True))
    assert type(model[0]).__name__ == "LowRankConv2d"
    with pytest.raises(TypeError, match="patch_embeddings"):
        co.LowRankConfig(rank=2, patch_embeddings=1)


def test_a_recipe_applied_again_leaves_what_it_built_and_does_the_rest():
    """A layer built by the very config that would take it is already as asked: the same
    rule applied again, with a new rule for another layer, keeps it (the same module) and
    compresses the other; the same config with nothing else to do is named, as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    q4 = co.QuantConfig(bits=4)
    co.compress_(model, co.Recipe({"0": q4}))
    first = model[0]
    co.compress_(model, co.Recipe({"0": co.QuantConfig(bits=4), "2": co.Sparse24Config()}))
    assert model[0] is first and isinstance(model[2], Sparse24Linear)
    with pytest.raises(co.AlreadyCompressedError, match=r"compressed already \(0, 2\)"):
        co.compress_(model, co.Recipe({"0": q4, "2": co.Sparse24Config()}))
    with pytest.raises(co.AlreadyCompressedError, match=r"compressed already \(0\)"):
        co.compress_(model, co.Recipe({"0": co.QuantConfig(bits=8)}))  # another config
