"""torch.export (save, load) and ONNX (ONNX Runtime, CPU) on real architectures built from code
with random weights: torchvision resnet18 (int4 g32), torchvision mobilenet_v2 (fused dw+pw)
and a Hugging Face BERT from a config (int4 g32). Run from the repository root:

    PYTHONPATH=. .venv/bin/python perf/experiments/2026-12-01-real-model-export.py
"""

import tempfile
import warnings

import torch

import compress_ops as co
from compress_ops.integrations import export as ex
from compress_ops.integrations.onnx import to_onnx
from compress_ops.perf.compat import import_torchvision

import_torchvision()
import onnxruntime as ort  # noqa: E402
import torchvision as tv  # noqa: E402
import transformers  # noqa: E402

warnings.simplefilter("ignore")
torch.manual_seed(0)


class _Bert(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids).last_hidden_state


img = torch.randn(2, 3, 64, 64)
resnet = tv.models.resnet18(num_classes=10).eval()
co.compress_(resnet, co.QuantConfig(bits=4, group_size=32))
mbv2 = tv.models.mobilenet_v2(num_classes=10).eval()
co.compress_(mbv2, co.DWSepFuseConfig(), example_inputs=(img[:1],))
bert = transformers.BertModel(transformers.BertConfig(
    vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128)).eval()
co.compress_(bert, co.QuantConfig(bits=4, group_size=32))
cases = [("torchvision resnet18, int4 g32", resnet, img),
         ("torchvision mobilenet_v2, dw+pw fused", mbv2, img),
         ("HF BERT (config), int4 g32", _Bert(bert), torch.randint(0, 200, (2, 12)))]
print("| model | our ops in the program | export -> save -> load vs eager "
      "| ONNX Runtime max abs err |")
print("|---|---|---|---|")
for name, m, x in cases:
    with torch.no_grad():
        ref = m(x)
    d = tempfile.mkdtemp()
    ep = ex.export(m, (x,))
    ex.save(ep, d + "/m.pt2")
    same = torch.equal(ex.load(d + "/m.pt2").module()(x), ref)
    to_onnx(m, (x,), d + "/m.onnx")
    sess = ort.InferenceSession(d + "/m.onnx", providers=["CPUExecutionProvider"])
    y = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    print(f"| {name} | {len(ex.compress_ops_nodes(ep))} | {'identical' if same else 'differs'} "
          f"| {float((y - ref).abs().max()):.1e} |")
