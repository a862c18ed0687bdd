"""AWQ (``QuantConfig(method="awq")``): the scale search never does worse than round-to-nearest
on its objective; folds are exact (the dense model's output is unchanged) and refused where
they would not be; the pipeline applies them and says which layers stayed unscaled."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops import awq
from compress_ops.calibrate import input_hessians
from compress_ops.kernels.formats.dequant import dequantize
from compress_ops.quantize import quantize_affine

AWQ = co.QuantConfig(bits=3, group_size=32, method="awq")


class NormLinear(nn.Module):
    """A norm whose few large channels (salient inputs) feed a Gaussian-initialized linear,
    and an MLP after it: the case AWQ is for."""

    def __init__(self, k: int = 128, salient: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(k)
        self.fc = nn.Linear(k, k)
        self.up = nn.Linear(k, 96)
        self.down = nn.Linear(96, 40)
        with torch.no_grad():
            self.norm.weight.fill_(1.0)
            self.norm.weight[torch.randperm(k, generator=g)[:salient]] = 30.0
            self.norm.bias.normal_(0, 0.1, generator=g)
            for lin in (self.fc, self.up, self.down):
                lin.weight.normal_(0, 0.05, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(self.fc(self.norm(x)))))


def calib(k: int = 128, n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, k, generator=g) for _ in range(n)]


def objective(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, bits=3, gs=32) -> float:
    q = quantize_affine((w.double() * s.double()).float(), bits, gs)
    w_hat = dequantize(q.qweight, q.scales, q.zeros, bits, q.group_size, w.shape[1]).double()
    dw = w.double() - w_hat / s.double()
    return float(((dw @ h.double()) * dw).sum())


def test_scale_search_is_never_worse_than_round_to_nearest():
    m = NormLinear().eval()
    h = input_hessians(m, {"fc": m.fc}, calib())["fc"]
    w = m.fc.weight.detach()
    s, alpha = awq.awq_scales([w], h, 3, 32)
    one = torch.ones_like(s)
    assert objective(w, h, s) < objective(w, h, one)  # salient channels: a real gain
    assert 0 < alpha <= 1 and float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    # uniform inputs: nothing to protect, and the search never does worse than s = 1
    h_flat = torch.eye(128) * 2
    s_flat, _ = awq.awq_scales([w], h_flat, 3, 32)
    assert objective(w, h_flat, s_flat) <= objective(w, h_flat, one) + 1e-12
    torch.testing.assert_close(awq.awq_scales([w], torch.zeros(128, 128), 3, 32)[0], one)
    with pytest.raises(ValueError, match="NaN or Inf"):
        awq.awq_scales([w], torch.full((128, 128), float("nan")), 3, 32)
    with pytest.raises(ValueError, match=r"\[N, 128\]"):
        awq.awq_scales([w[:, :64]], h, 3, 32)


@torch.no_grad()
def test_folds_are_exact_and_found_by_running_the_model():
    m = NormLinear().eval()
    x = calib()[0]
    ref = m(x)
    folds, why = awq.find_folds(m, {"fc": m.fc, "down": m.down}, lambda: m(x), torch.float32)
    assert [(f.producer, f.consumers) for f in folds] == [("norm", ["fc"])]
    assert "down" in why  # GELU between up and down: no exact fold (ReLU would fold)
    s = torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(3)))
    awq.apply_fold(m, folds[0], s)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # the dense model unchanged
    assert not torch.equal(m.norm.weight, NormLinear().norm.weight)


def _llama(kv_heads: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   intermediate_size=96, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens(n: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 96, (2, 12), generator=g)} for _ in range(n)]


@torch.no_grad()
def test_llama_folds_norms_value_and_up_projections():
    m = _llama(kv_heads=4)
    block = m.model.layers[0]
    batch = _tokens(1)[0]
    names = {n: x for n, x in block.named_modules() if isinstance(x, nn.Linear)}
    h = m.model.embed_tokens(batch["input_ids"])
    pos = m.model.rotary_emb(h, torch.arange(12)[None])
    run = lambda: block(h, position_embeddings=pos, attention_mask=None)  # noqa: E731
    ref = run()
    folds, why = awq.find_folds(block, names, run, torch.float32)
    got = {f.producer: f.consumers for f in folds}
    assert got == {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj",
                                       "self_attn.v_proj"],
                   "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
                   "self_attn.v_proj": ["self_attn.o_proj"], "mlp.up_proj": ["mlp.down_proj"]}
    assert why == {}
    g = torch.Generator().manual_seed(5)
    for f in folds:
        k = block.get_submodule(f.consumers[0]).in_features
        awq.apply_fold(block, f, torch.exp(0.5 * torch.randn(k, generator=g)))
    torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-5)


def test_compress_applies_awq_and_lists_layers_without_a_fold():
    dense = _llama(kv_heads=4)
    batches = _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        m = co.compress_(copy.deepcopy(dense), co.Recipe({"model[.].*": AWQ}), calib=batches)
    assert type(m.model.layers[1].self_attn.o_proj).__name__ == "QuantLinear"
    assert not torch.equal(m.model.layers[0].input_layernorm.weight,
                           dense.model.layers[0].input_layernorm.weight)  # folded
    # grouped-query attention: a value row serves several heads, so o_proj has no exact fold
    with pytest.warns(UserWarning, match=r"no exact fold for 2 of 14.*o_proj"):
        g = co.compress_(_llama(kv_heads=2), co.Recipe({"model[.].*": AWQ}), calib=batches)
    assert type(g.model.layers[0].self_attn.o_proj).__name__ == "QuantLinear"


@torch.no_grad()
def test_awq_beats_rtn_end_to_end_on_salient_channels_and_needs_calib():
    data = calib(seed=4)
    ref = torch.cat([NormLinear()(x) for x in data])
    err = {}
    for method in ("rtn", "awq"):
        m = NormLinear().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (up, down: no fold)
            co.compress_(m, co.QuantConfig(bits=3, group_size=32, method=method),
                         calib=data if method == "awq" else None)
        err[method] = float((torch.cat([m(x) for x in data]) - ref).norm() / ref.norm())
    assert err["awq"] < err["rtn"]
    with pytest.raises(ValueError, match="calib=batches"):
        co.compress_(NormLinear(), AWQ)
    with pytest.raises(co.UnsupportedModule, match="AWQ folds"):
        co.configs.transform_for(AWQ).build(nn.Linear(64, 8), AWQ, hessian=torch.eye(64))


@torch.no_grad()
def test_an_awq_model_round_trips_through_co_save(tmp_path):
    batches = _tokens()
    m = co.compress_(_llama(kv_heads=4), co.Recipe({"model[.].*": AWQ}), calib=batches)
    co.save(m, tmp_path / "awq.safetensors")
    back = co.load(_llama(kv_heads=4), tmp_path / "awq.safetensors")  # folded norms included
    assert torch.equal(m(**batches[0]).logits, back(**batches[0]).logits)


# ----------------------------------------------------------------- Hugging Face Conv1D (GPT-2)


@torch.no_grad()
def test_conv1d_folds_are_exact_as_producer_and_consumer():
    """A Conv1D stores its weight [in, out]: a fold scales its columns as a producer and its
    rows as a consumer; the container's output must not change."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(24), Conv1D(40, 24), Conv1D(16, 40)).eval()
    for p in net.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(5, 24)
    ref = net(x)
    layers = {"1": net[1], "2": net[2]}
    folds, why = awq.find_folds(net, layers, lambda: net(x), torch.float32)
    assert {f.producer: f.consumers for f in folds} == {"0": ["1"], "1": ["2"]} and why == {}
    g = torch.Generator().manual_seed(3)
    before = [p.detach().clone() for p in net.parameters()]
    for f in folds:
        k = 24 if f.producer == "0" else 40
        awq.apply_fold(net, f, torch.exp(0.5 * torch.randn(k, generator=g)))
    after = [net[0].weight, net[1].weight, net[2].weight]
    assert not any(torch.equal(a, b) for a, b in zip(before[0::2], after, strict=True))
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)


def test_gpt2_awq_folds_the_norms_into_conv1d_and_smoothquant_too():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=96, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    dense = tf.GPT2LMHeadModel(cfg).eval()
    batches = _tokens(1)
    with torch.no_grad():
        for p in dense.parameters():  # (non-trivial norms: a fold must scale them)
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
        ref = dense(**batches[0]).logits
    # c_attn reads ln_1, c_fc reads ln_2, attn.c_proj the value chunk of c_attn (through the
    # attention, linear in v); mlp.c_proj reads a gelu: no fold
    block = dense.transformer.h[0]
    h = dense.transformer.wte(batches[0]["input_ids"]) + dense.transformer.wpe.weight[:12]
    layers = {n: m for n, m in block.named_modules() if type(m).__name__ == "Conv1D"}
    def run() -> torch.Tensor:
        out = block(h)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        ref_block = run()
        folds, why = awq.find_folds(block, layers, run, torch.float32)
        assert {(f.producer, f.offset): f.consumers for f in folds} == {
            ("ln_1", 0): ["attn.c_attn"], ("ln_2", 0): ["mlp.c_fc"],
            ("attn.c_attn", 128): ["attn.c_proj"]}  # (the value chunk: rows 128..191)
        assert list(why) == ["mlp.c_proj"]
        gen = torch.Generator().manual_seed(2)
        for f in folds:
            awq.apply_fold(block, f, torch.exp(0.3 * torch.randn(64, generator=gen)))
        torch.testing.assert_close(run(), ref_block, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)  # (the same weights again, the folds undone)
    dense = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    with pytest.warns(UserWarning, match=r"no exact fold for 1 of 4 layers.*h\.0\.mlp\.c_proj"):
        m = co.compress_(copy.deepcopy(dense), co.QuantConfig(
            bits=3, group_size=32, method="awq", search_steps=0), calib=batches)  # (quick grid)
    assert type(m.transformer.h[0].attn.c_attn).__name__ == "QuantLinear"
    w = co.compress_(copy.deepcopy(dense), co.W8A8Config(smoothing=0.5), calib=batches)
    notes = {r.name.removeprefix("transformer.h.0."): r.note for r in co.report(w)}
    assert notes["attn.c_attn"].endswith("SmoothQuant folded into transformer.h.0.ln_1")
    assert notes["mlp.c_fc"].endswith("SmoothQuant folded into transformer.h.0.ln_2")
    assert notes["attn.c_proj"].endswith("SmoothQuant folded into transformer.h.0.attn.c_attn")
    assert "in the op" in notes["mlp.c_proj"]
    assert not torch.equal(w.transformer.h[0].ln_2.weight, dense.transformer.h[0].ln_2.weight)
    with torch.no_grad():  # folds change nothing but the rounding: both stay close to dense
        for model, tol in ((m, 0.3), (w, 0.05)):
            out = model(**batches[0]).logits
            assert float((out - ref).norm() / ref.norm()) < tol
