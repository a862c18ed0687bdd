"""Hugging Face BERT and Llama built from configs (random weights, no downloads): structured
channel groups (MLP intermediate channels) and attention-head groups through the torch.export
capture (torch.fx cannot trace them: "co_varnames is too small")."""

from __future__ import annotations

import pytest
import torch

import compress_ops as co

transformers = pytest.importorskip("transformers")  # (not on the GPU image)

# a tiny config of each: (model class, config)
CONFIGS = {
    "bert": (transformers.BertModel, transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
        use_cache=False)),  # (a DynamicCache in the output is not a pytree torch.export knows)
}
MLP = {"bert": [["encoder.layer.0.intermediate.dense"], ["encoder.layer.1.intermediate.dense"]],
       "llama": [["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                 ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]]}


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def build(name: str):
    torch.manual_seed(0)
    cls, cfg = CONFIGS[name]
    return cls(cfg).eval(), torch.randint(0, 100, (2, 12))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mlp_intermediate_channels_are_groups_and_dead_ones_go_exactly(name):
    model, ids = build(name)
    groups, skipped = co.structured.channel_groups(model, (ids,), capture="fx")
    assert groups == [] and "not traceable by torch.fx" in next(iter(skipped.values()))
    groups, skipped = co.structured.channel_groups(model, (ids,))
    groups = [g for g in groups if g.unit == "channel"]
    assert [g.producers for g in groups] == MLP[name]
    assert all(g.width == 128 for g in groups)
    for reason in skipped.values():  # attention and the residual stream: each with a reason
        assert "cannot be removed" in reason
    with torch.no_grad():
        for g in groups:  # gelu(0) = silu(0) = 0: these channels contribute nothing
            for p in g.producers:
                m = model.get_submodule(p)
                m.weight[:64] = 0
                if m.bias is not None:
                    m.bias[:64] = 0
        ref = _out(model, ids)
    before = sum(p.numel() for p in model.parameters())
    rep = co.structured.prune_channels(model, (ids,), zero_only=True)
    assert [w for _, _, w in rep.groups] == [64, 64] + [u for *_, u in HEADS[name]]
    with torch.no_grad():
        torch.testing.assert_close(_out(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < before
    # saliency pruning of half the MLP: the model still runs
    model, ids = build(name)
    co.structured.prune_channels(model, (ids,), sparsity=0.5)
    assert _out(model, ids).shape[:2] == ids.shape


# q, k, v projections per layer, weight rows per unit (a key/value head and its query heads),
# output-projection columns per unit, units
HEADS = {
    "bert": [([f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")],
              (16, 16, 16), f"encoder.layer.{i}.attention.output.dense", 16, 4) for i in (0, 1)],
    "llama": [([f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"], (32, 16, 16),
               f"model.layers.{i}.self_attn.o_proj", 32, 2) for i in (0, 1)],  # 4 q : 2 kv
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_heads_are_groups_and_removing_a_silent_head_is_exact(name):
    """A head whose output-projection columns are zero contributes nothing: removing exactly
    that unit (q/k/v rows, o columns; with grouped-query attention the key/value head and its
    query heads) leaves the output unchanged, and removing another unit does not."""
    model, ids = build(name)
    groups, _ = co.structured.channel_groups(model, (ids,))
    heads = [(i, g) for i, g in enumerate(groups) if g.unit == "head"]
    assert [(g.producers, tuple(g.rows[p] for p in g.producers), g.consumers[0],
             g.columns[g.consumers[0]], g.width) for _, g in heads] == HEADS[name]
    for silent, removed, exact in ((1, 1, True), (1, 0, False)):
        model, ids = build(name)
        with torch.no_grad():
            for _, g in heads:
                cols = g.columns[g.consumers[0]]
                model.get_submodule(g.consumers[0]).weight[:, silent * cols:(silent + 1) * cols] = 0
            ref = _out(model, ids)
        keep = {i: torch.tensor([u for u in range(g.width) if u != removed]) for i, g in heads}
        rep = co.structured.prune_channels(model, (ids,), keep=keep)
        assert [w for _, w, _ in rep.groups[-2:]] == [g.width for _, g in heads]
        assert [k for _, _, k in rep.groups[-2:]] == [g.width - 1 for _, g in heads]
        with torch.no_grad():
            err = (_out(model, ids) - ref).abs().max().item()
        assert (err < 1e-5) is exact, err
    q = model.get_submodule(HEADS[name][0][0][0])
    assert q.out_features == q.weight.shape[0] == (HEADS[name][0][4] - 1) * HEADS[name][0][1][0]
    # zero_only never removes a head (a zero-weight head still adds its softmax-weighted bias)
    model, ids = build(name)
    rep = co.structured.prune_channels(model, (ids,), zero_only=True)
    assert all(b == a for _, b, a in rep.groups)
