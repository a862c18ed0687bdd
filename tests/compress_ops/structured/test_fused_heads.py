"""Fused q/k/v projections (one projection split into q, k, v; GPT-2's ``c_attn``) are head
groups: removing a head removes its rows in every chunk and its input columns of the output
projection, and rescales the attention's ``split_size`` / head counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co


class _Fused(nn.Module):
    """Self-attention with one fused projection ``qkv`` (``H * D + 2 * H_kv * D`` outputs)
    split into q, k, v, grouped-query repeat of k and v, and output projection ``o``.

    ``mode``: ``"sizes"`` splits with sizes computed from ``num_heads`` /
    ``num_key_value_heads`` (``split_with_sizes``); ``"split_size"`` with ``split_size``
    (equal chunks); ``"literal"`` with a constant 64 (while holding ``split_size``);
    ``"no_attr"`` with a constant 64 and no ``split_size``; ``"leak"`` also adds the v chunk
    to the output (a chunk read elsewhere)."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, d: int = 16,
                 mode: str = "split_size") -> None:
        super().__init__()
        e = 64
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, d
        if mode != "no_attr":
            self.split_size = heads * d
        self.mode = mode
        self.qkv = nn.Linear(e, (heads + 2 * kv_heads) * d)
        self.o = nn.Linear(heads * d, e)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.qkv(x)
        if self.mode == "sizes":
            kv = self.num_key_value_heads * self.head_dim
            q, k, v = y.split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        elif self.mode == "split_size":
            q, k, v = y.split(self.split_size, dim=2)
        else:
            q, k, v = y.split(64, dim=2)
        q, k, v = (z.view(b, s, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        rep = self.num_heads // self.num_key_value_heads
        if rep > 1:
            k, v = (z[:, :, None].expand(b, z.shape[1], rep, s, self.head_dim)
                    .reshape(b, -1, s, self.head_dim) for z in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        if self.mode == "leak":
            out = out + v.transpose(1, 2).reshape(b, s, -1)
        return out


def _masked(model: _Fused, removed: list[int], per: int) -> _Fused:
    """A copy of ``model`` with the output projection's input columns of the removed units
    zeroed: exactly what removing them does."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for u in removed:
            ref.o.weight[:, u * per:(u + 1) * per] = 0
    return ref


def test_a_fused_projection_split_by_split_size_is_a_head_group_and_prunes_exactly():
    torch.manual_seed(0)
    model = _Fused().double().eval()
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    (g,), skipped = co.structured.channel_groups(model, (x,))
    assert (g.unit, g.producers, g.consumers, g.width) == ("head", ["qkv"], ["o"], 4)
    assert g.rows == {"qkv": 48} and g.columns == {"o": 16}
    assert g.chunks == {"qkv": [(0, 16), (64, 16), (128, 16)]}
    assert g.attrs == {"": {"num_heads": 1, "num_key_value_heads": 1, "split_size": 16}}
    ref = _masked(model, [1], 16)(x)
    w = model.qkv.weight.detach().clone()
    rep = co.structured.prune_channels(model, (x,), keep={0: torch.tensor([0, 2, 3])})
    assert rep.groups == [(("qkv",), 4, 3)]
    rows = [r for c in (0, 64, 128) for r in range(c, c + 64) if not 16 <= r - c < 32]
    assert torch.equal(model.qkv.weight, w[rows])
    assert (model.split_size, model.num_heads, model.num_key_value_heads) == (48, 3, 3)
    assert model.o.in_features == 48
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_grouped_query_chunks_remove_a_kv_head_with_its_query_heads():
    torch.manual_seed(1)
    model = _Fused(heads=4, kv_heads=2, mode="sizes").double().eval()
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    (g,), _ = co.structured.channel_groups(model, (x,))
    assert g.width == 2 and g.rows == {"qkv": 64} and g.columns == {"o": 32}
    assert g.chunks == {"qkv": [(0, 32), (64, 16), (96, 16)]}
    assert g.attrs == {"": {"num_heads": 2, "num_key_value_heads": 1}}
    ref = _masked(model, [0], 32)(x)
    co.structured.prune_channels(model, (x,), keep={0: torch.tensor([1])})
    assert model.qkv.out_features == 64 and model.o.in_features == 32
    assert (model.num_heads, model.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_fused_projections_the_analysis_cannot_prove_stay_refused():
    x = torch.randn(2, 6, 64)
    groups, skipped = co.structured.channel_groups(_Fused(mode="no_attr"), (x,))
    assert groups == [] and "fixed size (64)" in skipped["qkv"]
    groups, skipped = co.structured.channel_groups(_Fused(mode="leak"), (x,))
    assert groups == [] and "attention heads cannot be removed" in skipped["qkv"]
    # the forward splits by a constant, not its split_size: the pruned forward fails, and the
    # heads are put back, split_size and head counts included
    model = _Fused(mode="literal").eval()
    ref = model(x)
    rep = co.structured.prune_channels(model, (x,), sparsity=0.5)
    assert rep.groups == [(("qkv",), 4, 4)] and "failed to run" in rep.skipped["qkv"]
    assert (model.split_size, model.num_heads, model.qkv.out_features) == (64, 4, 192)
    torch.testing.assert_close(model(x), ref)


transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 97, (2, 12))


def test_gpt2_c_attn_is_a_head_group():
    model, ids = _gpt2()
    groups, skipped = co.structured.channel_groups(model, (ids,))
    heads = [g for g in groups if g.unit == "head"]
    assert [(g.producers, g.consumers, g.width) for g in heads] == [
        ([f"transformer.h.{i}.attn.c_attn"], [f"transformer.h.{i}.attn.c_proj"], 4)
        for i in range(2)]
    assert heads[0].chunks == {"transformer.h.0.attn.c_attn": [(0, 16), (64, 16), (128, 16)]}
    assert heads[0].attrs == {"transformer.h.0.attn": {"num_heads": 1, "split_size": 16}}
    assert "transformer.h.0.attn.c_attn" not in skipped


def test_removing_a_gpt2_head_equals_masking_its_output_and_generates():
    model, ids = _gpt2()
    model.double()
    groups, _ = co.structured.channel_groups(model, (ids,))
    i0, i1 = (i for i, g in enumerate(groups) if g.unit == "head")
    ref = copy.deepcopy(model)
    with torch.no_grad():  # c_proj (Conv1D, weight [in, out]): the head's input rows
        ref.transformer.h[0].attn.c_proj.weight[16:32] = 0
        ref.transformer.h[1].attn.c_proj.weight[48:64] = 0
        expected = ref(ids).logits
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    b = model.transformer.h[0].attn.c_attn.bias.detach().clone()
    co.structured.prune_channels(model, (ids,), keep={i0: torch.tensor([0, 2, 3]),
                                                      i1: torch.tensor([0, 1, 2])})
    attn = model.transformer.h[0].attn
    cols = [c for c in range(192) if not 16 <= c % 64 < 32]
    assert attn.c_attn.weight.shape == (64, 144) and attn.c_attn.nf == 144
    assert torch.equal(attn.c_attn.weight, w[:, cols]) and torch.equal(attn.c_attn.bias, b[cols])
    assert attn.c_proj.weight.shape == (48, 64) and attn.c_proj.nx == 48
    assert (attn.split_size, attn.num_heads, attn.head_dim) == (48, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)
    out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_gpt2_heads_pruned_by_saliency_drop_the_weakest_fused_head():
    model, ids = _gpt2()
    with torch.no_grad():  # head 2 of layer 0: small in its q, k and v columns
        for c in (0, 64, 128):
            model.transformer.h[0].attn.c_attn.weight[:, c + 32:c + 48] *= 0.01
    rep = co.structured.prune_channels(model, (ids,), sparsity={
        "transformer.h.0.attn.c_attn": 0.25})
    (i,) = [i for i, (p, _, _) in enumerate(rep.groups) if p == ("transformer.h.0.attn.c_attn",)]
    assert rep.groups[i][1:] == (4, 3) and rep.kept[i].tolist() == [0, 1, 3]
    assert model.transformer.h[0].attn.c_attn.nf == 144
    assert model.transformer.h[1].attn.c_attn.nf == 192
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 12, 97)
