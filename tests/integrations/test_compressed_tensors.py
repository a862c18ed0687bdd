"""compressed-tensors ``pack-quantized`` interop: hand-built checkpoints in their layout (packed by
a reference packer written here from the documented format, not by the module under test) load
bit for bit; our models round-trip; the refusals are named."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import compress_ops as co
from compress_ops.integrations.compressed_tensors import (
    CompressedTensorsError,
    from_compressed_tensors,
    to_compressed_tensors,
)
from compress_ops.kernels.formats.dequant import dequantize
from compress_ops.nn import QuantLinear

# -- the reference: compressed-tensors' layout, from its documented formula --------------------


def ref_pack(q_signed: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed values -> int32 words: offset 2**(b-1), 32 // b fields a word along ``dim``,
    element i of a word at bits [i b, (i + 1) b), zero-padded. One Python int per word."""
    pf, off = 32 // bits, 2 ** (bits - 1)
    rows = q_signed.tolist() if dim == 1 else q_signed.t().tolist()
    out = []
    for row in rows:
        words = []
        for j in range(0, len(row), pf):
            word = 0
            for i, v in enumerate(row[j:j + pf]):
                assert -off <= v < off
                word |= (v + off) << (bits * i)
            words.append(word - 2**32 if word >= 2**31 else word)
        out.append(words)
    t = torch.tensor(out, dtype=torch.int32)
    return t if dim == 1 else t.t().contiguous()


def ref_weight(q_s, scale, zp, strategy, gs, dtype):
    """Their dequantization, ``(q_s - zp) * scale`` in ``dtype``, column c in group c // gs."""
    n, k = q_s.shape
    if strategy == "tensor":
        s = scale.reshape(1, 1).expand(n, k)
        z = None if zp is None else zp.reshape(1, 1).expand(n, k)
    elif strategy == "channel":
        s = scale.reshape(n, 1).expand(n, k)
        z = None if zp is None else zp.reshape(n, 1).expand(n, k)
    else:
        idx = torch.arange(k) // gs
        s, z = scale[:, idx], None if zp is None else zp[:, idx]
    w = q_s.to(dtype)
    if z is not None:
        w = w - z.to(dtype)
    return w * s.to(dtype)


class Tiny(nn.Module):
    def __init__(self, k: int, h: int, n: int, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(k, h, dtype=dtype)
        self.norm = nn.LayerNorm(h, dtype=dtype)
        self.fc2 = nn.Linear(h, n, bias=False, dtype=dtype)
        self.head = nn.Linear(n, 5, dtype=dtype)

    def forward(self, x):
        return self.head(self.fc2(F.gelu(self.norm(self.fc1(x)))))


def _layer(n, k, bits, strategy, gs, symmetric, dtype, gen):
    """Random never-zero data of one layer in their layout: (tensors, q_s, scale, zp)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q_s = torch.randint(lo, hi, (n, k), generator=gen)
    groups = {"tensor": 1, "channel": 1, "group": -(-k // (gs or 1))}[strategy]
    shape = {"tensor": (1,), "channel": (n, 1), "group": (n, groups)}[strategy]
    scale = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.05 + 0.01).to(dtype)
    t = {"weight_packed": ref_pack(q_s, bits), "weight_scale": scale,
         "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    zp = None
    if not symmetric:
        zshape = (1,) if strategy == "tensor" else (n, groups)
        zp = torch.randint(lo, hi, zshape, generator=gen)
        t["weight_zero_point"] = (zp.to(torch.int8) if strategy == "tensor"
                                  else ref_pack(zp, bits, dim=0))
    return t, q_s, scale, zp


def _config(bits, strategy, gs, symmetric, targets=("fc1", "fc2"), **extra):
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": gs, "actorder": None, "dynamic": False, **extra}
    return {"architectures": ["Tiny"], "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "ignore": ["head"],
        "config_groups": {"group_0": {"targets": list(targets), "weights": weights,
                                      "input_activations": None,
                                      "output_activations": None}}}}


def _checkpoint(tmp_path, k, h, n, bits, strategy, gs, symmetric, dtype=torch.float32,
                seed=0, shards=1):
    gen = torch.Generator().manual_seed(seed)
    tensors, ref = {}, {}
    for name, (rows, cols) in {"fc1": (h, k), "fc2": (n, h)}.items():
        t, q_s, scale, zp = _layer(rows, cols, bits, strategy, gs, symmetric, dtype, gen)
        tensors.update({f"{name}.{key}": v for key, v in t.items()})
        ref[name] = (q_s, scale, zp)
    dense = Tiny(k, h, n, dtype)
    for key, v in dense.state_dict().items():
        if not key.startswith("fc2.") and not key == "fc1.weight":
            tensors[key] = torch.randn(v.shape, generator=gen).to(dtype)
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = keys[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({key: tensors[key] for key in part}, str(tmp_path / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(_config(bits, strategy, gs, symmetric)))
    return tensors, ref


CASES = [  # (K, H, N, bits, strategy, group_size, symmetric)
    pytest.param(96, 64, 40, 4, "group", 32, True, id="int4-g32"),
    pytest.param(256, 128, 48, 4, "group", 128, True, id="int4-g128"),
    pytest.param(96, 64, 40, 8, "channel", None, True, id="int8-channel"),
    pytest.param(96, 64, 40, 4, "tensor", None, True, id="int4-tensor"),
    pytest.param(128, 64, 40, 4, "group", 64, False, id="int4-g64-asym"),
    pytest.param(100, 72, 36, 4, "group", 32, False, id="int4-g32-asym-ragged"),
    pytest.param(100, 50, 36, 8, "channel", None, False, id="int8-channel-asym-ragged"),
    pytest.param(200, 96, 24, 4, "group", 128, True, id="int4-g128-ragged"),
    pytest.param(96, 64, 40, 4, "tensor", None, False, id="int4-tensor-asym"),
    pytest.param(160, 70, 40, 3, "group", 32, True, id="int3-g32-ragged"),
    pytest.param(96, 64, 40, 2, "group", 64, False, id="int2-g64-asym"),
    pytest.param(600, 64, 24, 4, "group", 512, True, id="int4-g512-repeated"),
    pytest.param(96, 40, 24, 6, "channel", None, True, id="int6-widened"),
]


@pytest.mark.parametrize(("k", "h", "n", "bits", "strategy", "gs", "sym"), CASES)
def test_load_matches_their_formula(tmp_path, k, h, n, bits, strategy, gs, sym):
    tensors, ref = _checkpoint(tmp_path, k, h, n, bits, strategy, gs, sym)
    model = from_compressed_tensors(Tiny(k, h, n), tmp_path)
    for name in ("fc1", "fc2"):
        mod = getattr(model, name)
        assert isinstance(mod, QuantLinear)
        q_s, scale, zp = ref[name]
        want = ref_weight(q_s, scale, zp, strategy, gs, torch.float32)
        assert torch.equal(mod.dense_weight(), want), name  # bit for bit
    assert torch.equal(model.fc1.bias, tensors["fc1.bias"])
    assert torch.equal(model.head.weight, tensors["head.weight"])
    assert torch.equal(model.norm.weight, tensors["norm.weight"])
    # outputs against the float64 dequantized reference
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    w1 = ref_weight(*ref["fc1"], strategy, gs, torch.float64)
    w2 = ref_weight(*ref["fc2"], strategy, gs, torch.float64)
    d = {key: v.double() for key, v in tensors.items() if "weight_" not in key}
    y1 = F.linear(x.double(), w1, d["fc1.bias"])
    assert (model.fc1(x).double() - y1).abs().max() <= 1e-5 * y1.abs().max()
    h1 = F.gelu(F.layer_norm(y1, (h,), d["norm.weight"], d["norm.bias"]))
    want_y = F.linear(F.linear(h1, w2), d["head.weight"], d["head.bias"])
    assert (model(x).double() - want_y).abs().max() <= 1e-4 * want_y.abs().max()
    assert (w1 != 0).double().mean() > 0.5 and (w2 != 0).double().mean() > 0.5  # never zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_bit_exact_and_sharded_loads(tmp_path, dtype):
    tensors, ref = _checkpoint(tmp_path, 100, 64, 40, 4, "group", 32, False, dtype=dtype,
                               shards=3)
    model = from_compressed_tensors(Tiny(100, 64, 40, dtype), tmp_path)
    for name in ("fc1", "fc2"):
        mod = getattr(model, name)
        assert mod.scales.dtype == dtype
        assert torch.equal(mod.dense_weight(), ref_weight(*ref[name], "group", 32, dtype))


def _quantized_model(symmetric, bits=4, group_size=32):
    torch.manual_seed(0)
    model = Tiny(100, 64, 40)
    cfg = co.QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    co.compress_(model, co.Recipe({"fc1": cfg, "fc2": cfg}))
    return model


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (8, None), (3, 64), (2, 128),
                                                  (1, 32)])
def test_round_trip_symmetric_is_exact(tmp_path, bits, group_size):
    model = _quantized_model(True, bits, group_size)
    rep = to_compressed_tensors(model, tmp_path)
    assert set(rep.quantized) == {"fc1", "fc2"} and not rep.sqnr_db
    assert set(rep.dense) == set()
    if group_size is not None and group_size < 100 and 100 % group_size:
        assert "K=100 is not a multiple" in rep.notes["fc1"]
    if bits == 3:
        assert "3-bit fields" in rep.notes["fc2"]
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["head"]
    back = from_compressed_tensors(Tiny(100, 64, 40), tmp_path)
    x = torch.randn(4, 100)
    for name in ("fc1", "fc2"):
        assert torch.equal(getattr(back, name).dense_weight(),
                           getattr(model, name).dense_weight())
    if bits == 1:  # binary comes back as 2-bit fields: the same weight, another kernel path
        assert back.fc1.bits == 2 and torch.allclose(back(x), model(x), rtol=1e-5, atol=1e-6)
    else:  # the same module: the same fields, the same outputs
        assert torch.equal(back.fc1.qweight, model.fc1.qweight)
        assert torch.equal(back(x), model(x))


def test_written_words_are_their_layout(tmp_path):
    model = _quantized_model(True, 4, 32)
    to_compressed_tensors(model, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    w = model.fc1.dense_weight().double()
    q_s = torch.round(w / t["fc1.weight_scale"].double().repeat_interleave(32, 1)[:, :100])
    assert torch.equal(t["fc1.weight_packed"], ref_pack(q_s.long(), 4))
    assert t["fc1.weight_shape"].tolist() == [64, 100]
    assert "fc1.weight_zero_point" not in t


def test_asymmetric_needs_round_zero_points_and_reports_sqnr(tmp_path):
    model = _quantized_model(False, 4, 32)
    with pytest.raises(CompressedTensorsError, match="round_zero_points=True"):
        to_compressed_tensors(model, tmp_path)
    with pytest.warns(UserWarning, match="SQNR"):
        rep = to_compressed_tensors(model, tmp_path, round_zero_points=True)
    assert set(rep.sqnr_db) == {"fc1", "fc2"}
    assert all(10 < db < math.inf for db in rep.sqnr_db.values())
    back = from_compressed_tensors(Tiny(100, 64, 40), tmp_path)
    mod = model.fc1
    z = mod.zeros.round().clamp(0, 15)
    exp = dequantize(mod.qweight, mod.scales, z, 4, mod.group_size, 100)
    assert torch.equal(back.fc1.dense_weight(), exp)
    # loaded integer zero points write back exactly, without rounding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep2 = to_compressed_tensors(back, tmp_path / "again")
    assert not rep2.sqnr_db


def test_dense_fallbacks_are_listed_and_ignored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("a", nn.Linear(64, 64))
    model.add_module("b", nn.Linear(64, 64))
    model.add_module("c", nn.Linear(64, 64))
    model.add_module("d", nn.Linear(64, 64))
    model.add_module("w", nn.Linear(64, 64))
    model.add_module("e", nn.Linear(64, 8))
    co.compress_(model, co.Recipe({"a": co.Sparse24Config(), "b": co.CodebookConfig(bits=3),
                                   "c": co.LowRankConfig(rank=8), "w": co.W8A8Config(),
                                   "d": co.QuantConfig(bits=4, group_size=64, symmetric=True)}))
    ref = {n: getattr(model, n).dense_weight() for n in "abcdw"}
    rep = to_compressed_tensors(model, tmp_path)
    assert set(rep.dense) == {"a", "b", "c", "w"} and set(rep.quantized) == {"d"}
    assert "2:4" in rep.dense["a"] and "W8A8" in rep.dense["w"]
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["a", "b", "c", "e", "w"]
    assert qc["config_groups"]["group_0"]["targets"] == ["d"]
    back = nn.Sequential()
    for name in "abcdw":
        back.add_module(name, nn.Linear(64, 64))
    back.add_module("e", nn.Linear(64, 8))
    from_compressed_tensors(back, tmp_path)
    for n in "abcw":
        assert type(getattr(back, n)) is nn.Linear
        assert torch.equal(getattr(back, n).weight, ref[n])
    assert isinstance(back.d, QuantLinear) and torch.equal(back.d.dense_weight(), ref["d"])


def _edit_config(tmp_path, fn):
    cfg = json.loads((tmp_path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def _weights(qc):
    return qc["config_groups"]["group_0"]["weights"]


def test_refuses_activation_order(tmp_path):
    _checkpoint(tmp_path, 96, 64, 40, 4, "group", 32, True)
    _edit_config(tmp_path, lambda qc: _weights(qc).update(actorder="group"))
    with pytest.raises(CompressedTensorsError, match="activation-ordered"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)


def test_refuses_a_permuted_g_idx(tmp_path):
    tensors, _ = _checkpoint(tmp_path, 96, 64, 40, 4, "group", 32, True)
    tensors["fc1.weight_g_idx"] = (torch.randperm(96) // 32).to(torch.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CompressedTensorsError, match="weight_g_idx: activation-ordered"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)


def test_refuses_unsupported_group_size(tmp_path):
    _checkpoint(tmp_path, 96, 64, 40, 4, "group", 16, True)
    with pytest.raises(CompressedTensorsError, match="group_size 16 is not supported"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)


def test_refuses_fp8(tmp_path):
    _checkpoint(tmp_path, 96, 64, 40, 8, "channel", None, True)

    def fp8(qc):
        qc["format"] = "float-quantized"
        _weights(qc).update(type="float")
    _edit_config(tmp_path, fp8)
    with pytest.raises(CompressedTensorsError, match="float weights .* not supported by this "
                                                     "loader"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)


def test_refuses_unknown_format_bits_and_missing_tensors(tmp_path):
    tensors, _ = _checkpoint(tmp_path, 96, 64, 40, 4, "group", 32, True)
    _edit_config(tmp_path, lambda qc: qc.update(format="marlin-24"))
    with pytest.raises(CompressedTensorsError, match="format 'marlin-24' is not supported"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)
    _edit_config(tmp_path, lambda qc: (qc.update(format="pack-quantized"),
                                       _weights(qc).update(num_bits=16)))
    with pytest.raises(CompressedTensorsError, match="num_bits=16 is not supported"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)
    _edit_config(tmp_path, lambda qc: _weights(qc).update(num_bits=4))
    del tensors["fc2.weight_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CompressedTensorsError, match="missing tensor 'fc2.weight_scale'"):
        from_compressed_tensors(Tiny(96, 64, 40), tmp_path)


def test_hf_config_fields_are_kept(tmp_path):
    model = _quantized_model(True)

    class Cfg:
        def to_dict(self):
            return {"model_type": "tiny", "hidden_size": 64}
    model.config = Cfg()
    to_compressed_tensors(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "tiny" and cfg["hidden_size"] == 64
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"


def test_unpacked_int8_zero_points_and_all_zero_symmetric_ones(tmp_path):
    """Older checkpoints hold zero points unpacked (int8 [N, groups], signed); a symmetric
    scheme may carry an all-zero one."""
    tensors, ref = _checkpoint(tmp_path, 96, 64, 40, 4, "group", 32, False)
    tensors["fc1.weight_zero_point"] = ref["fc1"][2].to(torch.int8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = from_compressed_tensors(Tiny(96, 64, 40), tmp_path)
    assert torch.equal(model.fc1.dense_weight(),
                       ref_weight(*ref["fc1"], "group", 32, torch.float32))
    sym = tmp_path / "sym"
    sym.mkdir()
    tensors, ref = _checkpoint(sym, 96, 64, 40, 4, "group", 32, True)
    tensors["fc1.weight_zero_point"] = torch.zeros(64, 3, dtype=torch.int8)
    save_file(tensors, str(sym / "model.safetensors"))
    model = from_compressed_tensors(Tiny(96, 64, 40), sym)
    assert model.fc1.zeros is None
    tensors["fc1.weight_zero_point"][3, 1] = 2
    save_file(tensors, str(sym / "model.safetensors"))
    with pytest.raises(CompressedTensorsError, match="symmetric but weight_zero_point"):
        from_compressed_tensors(Tiny(96, 64, 40), sym)


def test_transformers_llama_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    co.compress_(model, co.Recipe({r".*layers.*proj": co.QuantConfig(bits=4, group_size=32,
                                                                       symmetric=True)}))
    rep = to_compressed_tensors(model, tmp_path)
    assert len(rep.quantized) == 7 and not rep.dense
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["quantization_config"]["ignore"] == [
        "lm_head"]
    torch.manual_seed(1)
    back = from_compressed_tensors(transformers.LlamaForCausalLM(cfg).eval(), tmp_path)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("config", [co.QuantConfig(bits=4, group_size=32, symmetric=True),
                                    co.Sparse24Config()], ids=["int4", "2:4"])
def test_gpt2_conv1d_round_trips_in_its_layout(tmp_path, config):
    """GPT-2's Conv1D: a quantized layer loads back as a QuantLinear answering .weight [in,
    out]; a layer written dense (2:4) is written in Conv1D's [in, out], as the model reads it."""
    tf = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=96,
                                                n_positions=32)).eval()

    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    model = co.compress_(gpt2(), config)
    to_compressed_tensors(model, tmp_path)
    back = from_compressed_tensors(gpt2(), tmp_path)
    c_attn = back.transformer.h[0].attn.c_attn
    assert c_attn.weight.shape == (64, 192)  # (Conv1D's [in, out] either way)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
