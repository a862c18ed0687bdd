"""Hugging Face ``Conv1D`` (GPT-2's projections: a linear with the weight stored ``[in, out]``)
is compressed, pruned, planned and fake-quantized like the linear it is, never skipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops._linear import HFConv1D, is_conv1d

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")  # (not on the GPU image)
Conv1D = pytorch_utils.Conv1D

CONFIGS = [co.QuantConfig(bits=4, group_size=32), co.QuantConfig(bits=8, group_size=None),
           co.Sparse24Config(), co.LowRankConfig(rank=8), co.CodebookConfig(bits=4)]


def conv1d(nf: int = 48, nx: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Conv1D(nf, nx)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


def as_linear(c: nn.Module) -> nn.Linear:
    lin = nn.Linear(c.nx, c.nf)
    with torch.no_grad():
        lin.weight.copy_(c.weight.t())
        lin.bias.copy_(c.bias)
    return lin


def test_conv1d_is_recognised_without_subclasses():
    c = conv1d()
    assert isinstance(c, HFConv1D) and is_conv1d(c, exact=True)
    assert not isinstance(nn.Linear(2, 2), HFConv1D)

    class Sub(Conv1D):
        pass

    assert isinstance(Sub(4, 4), HFConv1D) and not is_conv1d(Sub(4, 4), exact=True)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_a_conv1d_compresses_to_what_its_transposed_linear_does(config):
    c = conv1d()
    x = torch.randn(3, 5, 64)
    new = co.compress_(c, config)
    ref = co.compress_(as_linear(c), config)
    assert type(new) is type(ref) and type(new).__name__ != "Conv1D"
    theirs = ref.state_dict()
    for k, v in new.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert new.bias is c.bias  # the bias Parameter itself carries over
    torch.testing.assert_close(new(x), ref(x), rtol=0, atol=0)
    exact = F.linear(x.double(), new.dense_weight().double(), new.bias.double())
    torch.testing.assert_close(new(x).double(), exact, rtol=1e-4, atol=1e-4)


def test_a_conv1d_subclass_stays_dense_with_the_reason():
    class Scaled(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(8, 64), nn.ReLU())
    with pytest.warns(UserWarning, match="changed nothing"):
        co.compress_(model, co.QuantConfig(bits=4, group_size=32))
    (row,) = co.report(model)
    assert row.kind == "dense" and "Conv1D subclass" in row.note


transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 128, (2, 12))


PROJ = [f"transformer.h.{i}.{p}" for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_gpt2_is_compressed_and_reported():
    model, ids = gpt2()
    ref = model(ids).logits
    before = co.report(model)  # the whole model's weights, each tensor once (biases aside)
    biases = sum(model.get_submodule(n).bias.numel() * 4 for n in PROJ)
    assert before.stored_bytes == sum(p.numel() * 4 for p in model.parameters()) - biases
    co.compress_(model, co.QuantConfig(bits=8, group_size=None))
    report = co.report(model)
    rows = {r.name: r for r in report}
    assert [n for n, r in rows.items() if r.compressible and n != "lm_head"] == PROJ
    assert all(rows[n].kind == "quant" for n in PROJ)
    assert rows["lm_head"].kind == "dense" and "tied to transformer.wte" in rows["lm_head"].note
    # every other weight-bearing layer is listed, with why it stays dense, counted once
    others = {n: r.note for n, r in rows.items() if not r.compressible}
    assert sorted(others) == sorted(["transformer.wte", "transformer.wpe", "transformer.ln_f",
                                     *(f"transformer.h.{i}.ln_{j}" for i in range(2)
                                       for j in (1, 2))])
    assert others["transformer.wte"].startswith("Embedding: a table lookup")
    assert others["transformer.ln_f"].startswith("LayerNorm: a normalization")
    assert rows["lm_head"].stored_bytes == 0  # (stored once, at the embedding)
    listed = [p for n, m in model.named_modules() if n in others for p in m.parameters()]
    assert report.stored_bytes == sum(rows[n].stored_bytes for n in PROJ) + sum(
        p.numel() * 4 for p in listed)
    assert report.dense_bytes == before.dense_bytes
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.02  # 8-bit: close to the dense model
    # the README's sequence run twice is an error naming the layers, not a silent no-op
    with pytest.raises(co.AlreadyCompressedError, match="c_attn"):
        co.compress_(model, co.QuantConfig(bits=4, group_size=32))


def test_filter_fn_keeps_a_conv1d_dense_and_report_says_so():
    model, _ = gpt2()
    co.compress_(model, co.Sparse24Config(), filter_fn=lambda m, n: "c_fc" not in n)
    rows = {r.name: r for r in co.report(model)}
    assert rows["transformer.h.0.mlp.c_fc"].kind == "dense"
    assert rows["transformer.h.0.mlp.c_fc"].note == "excluded by filter_fn"
    assert rows["transformer.h.0.mlp.c_proj"].kind == "sparse24"


def test_pruner_masks_a_conv1d_along_its_inputs_and_finalizes_to_sparse24():
    model, ids = gpt2()
    p = co.prune.Pruner(model, pattern="2:4", sparsity=None, criterion="wanda",
                        calib=[{"input_ids": ids}])
    assert set(p.layers) == set(PROJ) and "lm_head" in p.skipped
    keep = p.masks[("transformer.h.0.mlp.c_fc", "weight")]
    assert keep.shape == (64, 256)  # Conv1D layout [in, out]
    per_group = keep.t().reshape(256, 16, 4).sum(-1)  # 2 of every 4 inputs of each output
    assert torch.equal(per_group, torch.full_like(per_group, 2))
    with torch.no_grad():
        masked = model(ids).logits
    model = p.finalize()
    assert all(type(model.get_submodule(n)).__name__ == "Sparse24Linear" for n in PROJ)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_group_lasso_reads_a_conv1d_as_out_by_in():
    c = conv1d()
    lin = as_linear(c)
    a = co.prune.GroupLasso(nn.Sequential(c), groups="2:4").penalty()
    b = co.prune.GroupLasso(nn.Sequential(lin), groups="2:4").penalty()
    torch.testing.assert_close(a, b)


def test_qat_on_conv1d_finalizes_to_the_compressed_linear():
    model, ids = gpt2()
    co.qat.prepare_qat(model, co.QuantConfig(bits=4, group_size=32))
    assert all(isinstance(model.get_submodule(n), co.qat.FakeQuantLinear) for n in PROJ)
    with torch.no_grad():
        fake = model(ids).logits
    co.qat.finalize_qat(model)
    assert all(type(model.get_submodule(n)).__name__ == "QuantLinear" for n in PROJ)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake, rtol=1e-4, atol=1e-4)


def test_plan_takes_conv1d_layers():
    model, ids = gpt2()
    pl = co.plan(model, [{"input_ids": ids}], 0.5,
                 candidates=[co.QuantConfig(bits=4, group_size=32)], verbose=False)
    chosen = {r.layer for r in pl.table if r.chosen and r.config is not None}
    assert chosen and chosen <= set(PROJ)


def test_gpt2_mlp_channels_are_groups_through_conv1d_and_gelu_new():
    model, ids = gpt2()
    groups, skipped = co.structured.channel_groups(model, (ids,))
    assert [(g.unit, g.producers, g.consumers, g.width) for g in groups] == [
        ("channel", [f"transformer.h.{i}.mlp.c_fc"], [f"transformer.h.{i}.mlp.c_proj"], 256)
        for i in range(2)] + [  # q, k, v in one Conv1D, split: a head group
        ("head", [f"transformer.h.{i}.attn.c_attn"], [f"transformer.h.{i}.attn.c_proj"], 4)
        for i in range(2)]
    assert "transformer.h.0.attn.c_attn" not in skipped
    with torch.no_grad():
        for g in groups[:2]:  # gelu_new(0) = 0: the first half of the channels contributes nothing
            m = model.get_submodule(g.producers[0])
            m.weight[:, :128] = 0
            m.bias[:128] = 0
        ref = model(ids).logits
    co.structured.prune_channels(model, (ids,), zero_only=True)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert type(c_fc).__name__ == "Conv1D" and c_fc.weight.shape == (64, 128) and c_fc.nf == 128
    assert model.transformer.h[0].mlp.c_proj.weight.shape == (128, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_channel_pruner_masks_conv1d_rows_and_removes_them():
    model, ids = gpt2()
    p = co.prune.Pruner(model, 0.25, pattern="channel", example_inputs=(ids,))
    keep = p.masks[("transformer.h.0.mlp.c_fc", "weight")]
    assert keep.shape == (64, 256) and (keep == keep[:1]).all()  # whole output columns
    with torch.no_grad():
        masked = model(ids).logits
    model = p.finalize()
    assert model.transformer.h[0].mlp.c_fc.nf == 192
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked, rtol=1e-4, atol=1e-4)


def test_weight_of_a_compressed_conv1d_keeps_the_conv1d_layout(tmp_path):
    """Code that reads ``.weight`` of GPT-2's layers expects Conv1D's [in, out]: every path
    that swaps a compressed module in for a Conv1D keeps that layout, and checkpoints too."""
    model, ids = gpt2()
    dense_w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [64, 192]
    co.compress_(model, co.QuantConfig(bits=8, group_size=None))
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.weight_layout == "in_out" and c_attn.weight.shape == (64, 192)
    assert c_attn.dense_weight().shape == (192, 64)  # (the op's reference stays [out, in])
    assert torch.equal(c_attn.weight, c_attn.dense_weight().t())
    assert float((c_attn.weight - dense_w).abs().max()) < 0.02 * float(dense_w.abs().max())
    co.save(model, tmp_path / "m.safetensors")
    loaded = co.load(lambda: gpt2()[0], tmp_path / "m.safetensors")
    assert loaded.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    model.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf")
    assert again.transformer.h[1].mlp.c_fc.weight.shape == (64, 256)
    pruned = co.prune.Pruner(gpt2()[0], pattern="2:4", sparsity=None).finalize()
    assert pruned.transformer.h[0].mlp.c_proj.weight.shape == (256, 64)
    assert co.nn.QuantLinear(4, 8).weight.shape == (8, 4)  # an nn.Linear's stays [out, in]


def test_weight_layout_survives_qat_and_old_checkpoints(tmp_path):
    model, _ = gpt2()
    co.qat.prepare_qat(model, co.QuantConfig(bits=4, group_size=32))
    model = co.qat.finalize_qat(model)
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "QuantLinear" and c_attn.weight.shape == (64, 192)
    co.save(model, tmp_path / "m.safetensors")  # a checkpoint written before weight_layout:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from compress_ops.integrations import serialization as ser

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    import json

    man = json.loads(meta[ser.METADATA_KEY])
    for e in man["modules"]:
        e["attrs"].pop("weight_layout")
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={ser.METADATA_KEY: json.dumps(man)})
    old = co.load(lambda: gpt2()[0], tmp_path / "old.safetensors")
    assert old.transformer.h[0].mlp.c_fc.weight.shape == (64, 256)
