"""What each config does to models people have: Hugging Face GPT-2 (Conv1D), Llama (tied
embeddings), BERT and ViT built from configs, torchvision and timm models built from code
(random weights, no downloads; CPU, fp32, eval mode).

Per model and config: the layers compressed out of the candidates, the stored / dense bytes of
the whole model's weights (``report()``'s total), the output's relative error against the dense
model (``||y - y_dense|| / ||y_dense||``, random weights: a size of the change, not an accuracy),
and whether ``co.save`` -> ``co.load`` and (Hugging Face) ``save_pretrained`` ->
``from_pretrained`` give the outputs back bit for bit.

    python -m compress_ops.perf.models_table            # the markdown table (README)
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import compress_ops as co
from compress_ops.perf.compat import import_torchvision

CONFIGS: dict[str, object] = {
    "int8": co.QuantConfig(bits=8, group_size=None),
    "int4 g32": co.QuantConfig(bits=4, group_size=32),
    "2:4": co.Sparse24Config(),
    "low-rank 90%": co.LowRankConfig(energy=0.9),
    "codebook 4-bit shared": co.CodebookConfig(bits=4, shared=True),
}


def _hf() -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor]]:
    import transformers as tf

    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    small = dict(num_hidden_layers=2, num_attention_heads=4)
    return {
        "HF GPT-2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0,
            eos_token_id=0)), ids),
        "HF Llama (tied)": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_key_value_heads=2,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            **small)), ids),
        "HF BERT": (lambda: tf.BertModel(tf.BertConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256,
            max_position_embeddings=64, **small)), ids),
        "HF ViT": (lambda: tf.ViTModel(tf.ViTConfig(
            image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, **small)),
            pixels),
    }


def _vision() -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor]]:
    import timm
    import torchvision

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return {
        "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=100), x),
        "torchvision mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=100),
                                     x),
        "timm vit_tiny_patch16": (lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=100), x),
        "timm convnext_atto": (lambda: timm.create_model(
            "convnext_atto", pretrained=False, num_classes=100), x),
        "timm tf_efficientnet_lite0": (lambda: timm.create_model(
            "tf_efficientnet_lite0", pretrained=False, num_classes=100), x),
    }


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def _built(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def row(name: str, build: Callable[[], nn.Module], x: torch.Tensor, label: str,
        config: object, tmp: Path) -> list[str]:
    dense = _built(build)
    with torch.no_grad():
        ref = _out(dense, x)
    model = _built(build)
    try:
        if isinstance(config, co.DWSepFuseConfig):
            model = co.compress_(model, config, example_inputs=(x,))
        else:
            model = co.compress_(model, config)
    except (UserWarning, co.UnsupportedModule, ValueError) as exc:
        return [name, label, "-", "-", "-", "-", "-", f"{type(exc).__name__}: {exc}"[:80]]
    rows = co.report(model)
    # candidates: linear and conv layers (report() lists embeddings and norms too, as dense
    # layers no config compresses; they count in the bytes, not here)
    candidates = [r for r in rows if r.kind != "skipped" and r.compressible]
    done = [r for r in candidates if r.kind != "dense"]
    with torch.no_grad():
        out = _out(model, x)
    err = float((out - ref).norm() / ref.norm())
    path = tmp / "m.safetensors"
    co.save(model, path)
    with torch.no_grad():
        same = torch.equal(_out(co.load(lambda: _built(build), path), x), out)
    hf = "-"
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp / "hf")
        with torch.no_grad():
            hf = "exact" if torch.equal(_out(type(model).from_pretrained(tmp / "hf"), x),
                                        out) else "DIFFERS"
    kept = [r.note for r in candidates if r.kind == "dense" and r.note]
    why = sorted({re.sub(r"(?<![-\w])\d+", "N", n.split(";")[0]) for n in kept})
    ratio = rows.stored_bytes / rows.dense_bytes
    return [name, label, f"{len(done)} / {len(candidates)}", f"{ratio:.3f}", f"{err:.2g}",
            "exact" if same else "DIFFERS", hf,
            (f"{len(kept)}: " + "; ".join(why))[:110] if kept else ""]


def main(argv: list[str] | None = None) -> int:
    import_torchvision()
    import transformers

    transformers.logging.set_verbosity_error()
    head = ["model", "config", "compressed / candidate layers",
            "stored / dense bytes (whole model)",
            "relative output change", "co.save -> co.load", "save_pretrained -> from_pretrained",
            "kept dense: count, reasons"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    models = {**_hf(), **_vision()}
    with tempfile.TemporaryDirectory() as d:
        for name, (build, x) in models.items():
            configs = dict(CONFIGS)
            if "mobilenet" in name or "efficientnet" in name:
                configs = {"dw+pw fused": co.DWSepFuseConfig(), "low-rank 90%":
                           co.LowRankConfig(energy=0.9)}
            for label, config in configs.items():
                cells = row(name, build, x, label, config, Path(d))
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
