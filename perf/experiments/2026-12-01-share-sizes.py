"""Sizes of weight sharing before training on models built from configs (no weights): tied
convs (ResNet-18/50, co.share.tie_convs), tied BERT-base blocks (co.share.tie_blocks) then int4,
and ResNet-18 with shared filters (SharedFilterConfig(fraction=0.25)). Prints parameter counts
(before, after, groups) and report() bytes (dense, stored, seconds).

    PYTHONPATH=. python perf/experiments/2026-12-01-share-sizes.py
"""

import time

import torch

import compress_ops as co
from compress_ops.perf.compat import import_torchvision

import_torchvision()
import torchvision  # noqa: E402
import transformers  # noqa: E402


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


torch.manual_seed(0)
for name in ("resnet18", "resnet50"):
    r = getattr(torchvision.models, name)(weights=None)
    before = nparams(r)
    t = co.share.tie_convs(r)
    print(f"{name} tie_convs", before, nparams(r), len(t.groups))
b = transformers.BertModel(transformers.BertConfig())
before = nparams(b)
t = co.share.tie_blocks(b)
print("bert-base tie_blocks", before, nparams(b), len(t.groups))
t0 = time.time()
co.compress_(b, co.QuantConfig(bits=4))
rep = co.report(b)
lin = [r for r in rep if r.compressible]  # (the linears; report() lists embeddings too)
print("bert int4 after tie", rep.dense_bytes, rep.stored_bytes, round(time.time() - t0, 1),
      "linears", sum(r.dense_bytes for r in lin), sum(r.stored_bytes for r in lin))
r = torchvision.models.resnet18(weights=None).eval()
t0 = time.time()
co.compress_(r, co.SharedFilterConfig(fraction=0.25))
rep = co.report(r)
print("resnet18 shared filters", rep.dense_bytes, rep.stored_bytes, nparams(r),
      round(time.time() - t0, 1))
