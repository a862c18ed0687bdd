"""Hugging Face transformers: co.save / co.load and save_pretrained / from_pretrained of
compressed GPT-2 (Conv1D), Llama (tied embeddings), BERT and ViT built from configs (random
weights, no downloads); compress on load; the refusals."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch

import compress_ops as co

transformers = pytest.importorskip("transformers")  # (not on the GPU image)
hf = pytest.importorskip("compress_ops.integrations.hf")



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96)
    return transformers.ViTModel(cfg).eval()


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit}
IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
CONFIGS = {"int4": co.QuantConfig(bits=4, group_size=32), "2:4": co.Sparse24Config(),
           "lowrank": co.LowRankConfig(energy=0.8),
           "codebook": co.CodebookConfig(bits=4, shared=True), "w8a8": co.W8A8Config(),
           "ternary": co.TernaryConfig(group_size=32)}


def run(model):
    out = model(PIXELS) if isinstance(model, transformers.ViTModel) else model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_co_save_load_is_exact(name, config, tmp_path):
    build = MODELS[name]
    model = co.compress_(build(), CONFIGS[config])
    ref = run(model)
    co.save(model, tmp_path / "m.safetensors")
    loaded = co.load(build, tmp_path / "m.safetensors")
    assert torch.equal(run(loaded), ref)
    assert str(co.report(loaded)) == str(co.report(model))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_from_pretrained_is_exact(name, config, tmp_path):
    model = co.compress_(MODELS[name](), CONFIGS[config])
    ref = run(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compress_ops" and saved["manifest"]["modules"]
    placeholders = saved["manifest"]["placeholders"]  # 0-element, at the dense weights
    assert sorted(placeholders) == sorted(f"{n}.weight" for e in saved["manifest"]["modules"]
                                          for n in e["names"])
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert torch.equal(run(loaded), ref)
    assert str(co.report(loaded)) == str(co.report(model))
    assert not [n for n, t in loaded.state_dict().items() if t.device.type == "meta"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_gives_equal_tokens_after_reload(name, tmp_path):
    model = co.compress_(MODELS[name](), co.QuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(IDS[:1], **kw), loaded.generate(IDS[:1], **kw))
    if name == "llama":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie holds


ON_LOAD = [(n, c) for n in ("gpt2", "llama") for c in [*CONFIGS, "hashed"]] + [
    (n, c) for n in ("bert", "vit") for c in ("int4", "2:4", "lowrank", "codebook", "hashed")]


@pytest.mark.parametrize(("name", "config"), ON_LOAD)
def test_compress_on_load_equals_compress_after_load(name, config, tmp_path, monkeypatch):
    recipe = CONFIGS.get(config) or co.HashedConfig(compression=0.25)
    dense = MODELS[name]()
    dense.save_pretrained(tmp_path / "dense")
    cls = type(dense)
    after = co.compress_(cls.from_pretrained(tmp_path / "dense"), recipe)
    calls = []
    monkeypatch.setattr(hf, "compress_", lambda *a, **k: calls.append(a) or co.compress_(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning: ViT's patch embedding stays dense too)
        on_load, info = cls.from_pretrained(
            tmp_path / "dense", quantization_config=hf.CompressOpsConfig(recipe=recipe),
            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(run(on_load), run(after))
    # the same layers, bytes and reasons (a tied head: compress_'s reason on both paths)
    assert str(co.report(on_load)) == str(co.report(after))
    shared = config == "codebook"  # one table over every layer: after loading
    assert bool(on_load.hf_quantizer.streamed) != shared
    # (ViT with low rank: its patch conv, a conv the config takes, is tried after loading)
    assert bool(calls) == (shared or (name, config) == ("vit", "lowrank"))
    if config != "int4":
        return
    on_load.save_pretrained(tmp_path / "q")  # and the compressed-on-load model saves
    again = cls.from_pretrained(tmp_path / "q")
    assert torch.equal(run(again), run(on_load))


def test_an_untied_output_embedding_stays_dense_on_load_as_transformers_keeps_it(tmp_path):
    cfg = llama().config
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    recipe = co.QuantConfig(bits=4, group_size=32)
    on_load = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=hf.CompressOpsConfig(recipe=recipe))
    assert type(on_load.lm_head) is torch.nn.Linear
    assert {r.name: r.note for r in co.report(on_load)}["lm_head"] == (
        "output embeddings: kept dense, as transformers' quantizers keep them")
    after = co.compress_(transformers.LlamaForCausalLM.from_pretrained(tmp_path), recipe,
                         filter_fn=lambda m, name: name != "lm_head")
    assert torch.equal(run(on_load), run(after))  # (compress_ alone would take lm_head too)


def test_layers_refused_while_loading_are_noted(tmp_path):
    gpt2().save_pretrained(tmp_path)
    config = hf.CompressOpsConfig(recipe=co.LowRankConfig(rank=48))  # saves nothing on c_proj
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=config)
    rows = {r.name: r for r in co.report(model)}
    assert rows["transformer.h.0.attn.c_proj"].kind == "dense"
    assert "SVD rank 48" in rows["transformer.h.0.attn.c_proj"].note
    assert rows["transformer.h.0.mlp.c_fc"].kind == "lowrank"


def test_config_json_roundtrip_and_bad_recipes():
    cfg = hf.CompressOpsConfig(recipe=co.Recipe({r".*mlp.*": co.Sparse24Config(),
                                                 r".*attn.*": None}),
                               modules_to_not_convert=["model.layers.0.*"])
    back = hf.CompressOpsConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert back.recipe.rules[r".*mlp.*"] == co.Sparse24Config()
    with pytest.raises(TypeError, match="cannot write config"):
        hf.CompressOpsConfig(recipe=object())
    with pytest.raises(ValueError, match="needs calibration data"):
        hf.CompressOpsConfig(recipe=co.QuantConfig(method="gptq"))


def test_offload_is_refused_with_the_reason():
    q = hf.CompressOpsHfQuantizer(hf.CompressOpsConfig(recipe=co.Sparse24Config()),
                                  pre_quantized=False)
    for device_map in ({"model": "cpu", "lm_head": "disk"}, {"model": 0, "lm_head": "cpu"}):
        with pytest.raises(ValueError, match="offload"):
            q.validate_environment(device_map=device_map)
    q.validate_environment(device_map={"": "cpu"})  # one device: fine
    bare = hf.CompressOpsHfQuantizer(hf.CompressOpsConfig(), pre_quantized=True)
    with pytest.raises(ValueError, match="no manifest"):
        bare.validate_environment(device_map=None)


PLAIN_LOAD = """
import sys, torch
try:
    import torchvision  # noqa: F401
except RuntimeError:  # the CPU torch here: see tests/conftest.py
    for n in [n for n in sys.modules if n.startswith("torchvision")]:
        del sys.modules[n]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
import transformers
try:
    transformers.{cls}.from_pretrained({path!r})
except RuntimeError as exc:
    print("RAISED:", exc)
else:
    print("LOADED")
assert "compress_ops" not in sys.modules
"""


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_without_compress_ops_imported_transformers_raises(name, tmp_path):
    model = co.compress_(MODELS[name](), co.QuantConfig(bits=4, group_size=32))
    ref = run(model)
    model.save_pretrained(tmp_path)
    code = PLAIN_LOAD.format(cls=type(model).__name__, path=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RAISED:" in out.stdout and "ignore_mismatched_sizes" in out.stdout, out.stdout
    assert "Unknown quantization type, got compress_ops" in out.stderr
    layer = ("transformer.h.{0, 1}.mlp.c_fc.weight" if name == "gpt2"
             else "model.layers.{0, 1}.mlp.down_proj.weight")
    assert layer in out.stderr and "torch.Size([0])" in out.stderr  # the report says where
    # with compress_ops (imported here) the same directory loads: placeholders dropped
    loaded = load_reporting(type(model), tmp_path)
    assert torch.equal(run(loaded), ref)
    assert not [k for k in loaded.state_dict() if k.endswith(".mlp.c_fc.weight")
                or k.endswith(".mlp.down_proj.weight")]


def test_checkpoint_without_placeholders_still_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = co.compress_(gpt2(), co.Sparse24Config())
    ref = run(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    placeholders = config["quantization_config"]["manifest"].pop("placeholders")
    assert "transformer.h.0.attn.c_attn.weight" in placeholders and len(placeholders) == 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert all(tensors.pop(k).shape == (0,) for k in placeholders)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    loaded = load_reporting(type(model), tmp_path)  # as written before placeholders
    assert torch.equal(run(loaded), ref)


def test_structured_pruned_llama_roundtrips_through_save_pretrained(tmp_path):
    model = llama()
    co.structured.prune_channels(model, (IDS,), sparsity=0.25)
    up = model.model.layers[0].mlp.up_proj
    assert up.out_features == 72  # 96 -> 72 channels
    co.compress_(model, co.QuantConfig(bits=8, group_size=None))
    ref = run(model)
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.equal(run(loaded), ref)
    co.save(model, tmp_path / "m.safetensors")
    assert torch.equal(run(co.load(llama, tmp_path / "m.safetensors")), ref)


def test_pruner_and_qat_results_save_with_their_manifest(tmp_path):
    model = gpt2()
    p = co.prune.Pruner(model, pattern="2:4", sparsity=None)
    model = p.finalize()  # Conv1D -> Sparse24Linear, outside compress_
    ref = run(model)
    model.save_pretrained(tmp_path / "pruned")
    assert torch.equal(run(type(model).from_pretrained(tmp_path / "pruned")), ref)
    model = co.qat.finalize_qat(co.qat.prepare_qat(llama(), co.QuantConfig(bits=4,
                                                                           group_size=32)))
    ref = run(model)
    model.save_pretrained(tmp_path / "qat")
    assert torch.equal(run(type(model).from_pretrained(tmp_path / "qat")), ref)


def test_save_pretrained_refuses_a_pruner_or_qat_still_in_progress(tmp_path):
    model = gpt2()
    p = co.prune.Pruner(model, sparsity=0.5)  # masks are parametrizations until finalize()
    with pytest.raises(co.CheckpointError, match=r"c_attn carries parametrizations.*finalize"):
        model.save_pretrained(tmp_path / "masked")
    model = p.finalize()
    model.save_pretrained(tmp_path / "masked")  # (then it saves, and reloads exactly)
    assert torch.equal(run(type(model).from_pretrained(tmp_path / "masked")), run(model))
    model = co.qat.prepare_qat(llama(), co.QuantConfig(bits=4, group_size=32))
    with pytest.raises(co.CheckpointError, match=r"FakeQuantLinear.*finalize_qat"):
        model.save_pretrained(tmp_path / "qat")


def test_compressed_models_convert_with_half_and_float_and_may_train(tmp_path):
    """transformers refuses .half() / .float() and Trainer of a model it calls quantized: a
    compressed model is not one to it (its modules convert as .to() converts them)."""
    from transformers.trainer_utils import validate_quantization_for_training

    model = co.compress_(llama(), co.QuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    for m in (model, type(model).from_pretrained(tmp_path)):
        layer = m.model.layers[0].mlp.up_proj
        assert m.half() is m and layer.scales.dtype == torch.float16
        assert run(m).dtype == torch.float16
        assert m.float() is m and layer.scales.dtype == torch.float32
        validate_quantization_for_training(m)  # (raises for a model it cannot train)
        assert isinstance(m.hf_quantizer, hf.CompressOpsHfQuantizer)


def test_smoothquant_static_llama_roundtrips_with_its_notes(tmp_path):
    model = llama()
    calib = [{"input_ids": IDS}, {"input_ids": IDS.flip(1)}]
    co.compress_(model, co.W8A8Config(smoothing=0.5, act_scale="static"), calib=calib)
    notes = {r.name: r.note for r in co.report(model)}
    assert "SmoothQuant folded into input_layernorm" in notes["model.layers.0.self_attn.q_proj"]
    assert "SmoothQuant in the op" in notes["model.layers.0.self_attn.o_proj"]  # GQA: no fold
    ref = run(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(run(loaded), ref)
    assert str(co.report(loaded)) == str(co.report(model))


def load_reporting(cls, path, **kwargs):
    """``cls.from_pretrained(path, **kwargs)``, asserting that transformers found every tensor
    where the model has it (no missing, unexpected or resized keys, no load report)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        loaded, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    said = [r.getMessage() for r in records]
    assert not [m for m in said if "LOAD REPORT" in m or "initialized" in m], said
    assert not [n for n, t in loaded.state_dict().items() if t.device.type == "meta"]
    return loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("config", ["int4", "2:4", "lowrank", "codebook", "w8a8"])
def test_from_pretrained_dtype_converts_compressed_modules_as_to_does(config, dtype, tmp_path):
    saved_in = torch.bfloat16 if dtype == torch.float32 else torch.float32
    model = co.compress_(gpt2().to(saved_in), CONFIGS[config])
    model.save_pretrained(tmp_path)
    loaded = load_reporting(type(model), tmp_path, dtype=dtype)
    ref = model.to(dtype)  # what the loaded model must be: the saved one, converted by .to
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == \
        {k: v.dtype for k, v in ref.state_dict().items()}
    out = run(loaded)
    assert out.dtype == dtype
    torch.testing.assert_close(out, run(ref))
    if config == "codebook":  # one shared table still (ref's .to copied it per layer)
        tables = {id(m.codebook) for m in loaded.modules() if isinstance(m, co.nn.CodebookLinear)}
        assert len(tables) == 1


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_channel_pruned_models_with_biases_roundtrip_through_save_pretrained(name, tmp_path):
    model = MODELS[name]()
    co.structured.prune_channels(model, (PIXELS if name == "vit" else IDS,), sparsity=0.25)
    ref = run(model)
    model.save_pretrained(tmp_path)
    loaded = load_reporting(type(model), tmp_path)
    assert torch.equal(run(loaded), ref)
    assert str(co.report(loaded)) == str(co.report(model))


def test_compress_leaves_the_users_config_object_alone(tmp_path):
    cfg = gpt2().config
    model = co.compress_(transformers.GPT2LMHeadModel(cfg).eval(), co.QuantConfig(bits=4))
    assert getattr(cfg, "quantization_config", None) is None  # (the object the user holds)
    assert model.config.quantization_config.quant_method == "compress_ops"
    assert model.transformer.config is model.config  # (submodules see the model's copy)
    dense = transformers.GPT2LMHeadModel(cfg).eval()  # a dense model from the same object
    dense.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert torch.equal(run(type(dense).from_pretrained(tmp_path)), run(dense))
