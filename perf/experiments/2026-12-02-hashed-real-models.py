"""Hashed layers on real architectures built from configs (no weights downloaded): Hugging Face
BERT (hidden 256, 4 layers) and GPT-2 (Conv1D, 4 layers), torchvision ResNet-18 (its fc) and
all-MiniLM-L6-v2 (pretrained, shipped in a pip package) where installed. For each:
``compress_(model, HashedConfig(compression=1/8))`` (buckets = the means of their members), the
layers hashed, report() bytes, the relative output change against the dense model, and an
eager vs torch.compile(aot_eager) check. One-shot hashing of trained weights is not how
HashedNets are meant to be used (they are trained hashed); the output change shows how much a
hashed start loses before fine-tuning.

    PYTHONPATH=. python perf/experiments/2026-12-02-hashed-real-models.py
"""

import copy

import torch

import compress_ops as co
from compress_ops.perf.compat import import_torchvision

import_torchvision()
import torchvision  # noqa: E402
import transformers  # noqa: E402

torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check(name: str, model: torch.nn.Module, x: object, out=lambda y: y) -> None:
    model.eval()
    dense = copy.deepcopy(model)
    co.compress_(model, co.HashedConfig(compression=1 / 8))
    rep = [r for r in co.report(model) if r.kind == "hashed"]  # (the hashed layers' bytes)
    n = len(rep)
    dense_b, stored_b = sum(r.dense_bytes for r in rep), sum(r.stored_bytes for r in rep)
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
    with torch.no_grad():
        want, got = out(call(dense)), out(call(model))
        torch._dynamo.reset()
        comp = out(call(torch.compile(model, backend="aot_eager")))
    print(f"{name}: {n} layers hashed, their report bytes {dense_b} -> {stored_b} "
          f"({stored_b / dense_b:.3f}), relative output change "
          f"{rel(got, want):.3f}, compiled == eager: "
          f"{torch.allclose(comp, got, atol=1e-5, rtol=1e-5)}")


ids = torch.randint(0, 1000, (2, 16))
bert = transformers.BertModel(transformers.BertConfig(hidden_size=256, num_hidden_layers=4,
                                                      num_attention_heads=4,
                                                      intermediate_size=1024))
check("HF BERT (config)", bert, {"input_ids": ids}, lambda y: y.last_hidden_state)
gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4))
check("HF GPT-2 (config, Conv1D)", gpt2, {"input_ids": ids}, lambda y: y.last_hidden_state)
check("torchvision ResNet-18 (fc)", torchvision.models.resnet18(weights=None),
      torch.randn(2, 3, 64, 64))
try:
    from compress_ops.perf import one_shot_bert as ob

    minilm, tok = ob.load_minilm()
    (batch,) = ob.tokenize(tok, ob.corpus()[:8], 8)
    check("all-MiniLM-L6-v2 (pretrained)", minilm, dict(batch), lambda y: y.last_hidden_state)
except Exception as ex:  # noqa: BLE001 - the package is optional (make one-shot-bert)
    print(f"all-MiniLM-L6-v2: skipped ({type(ex).__name__}: {ex})"[:200])
