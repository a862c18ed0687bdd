"""ONNX export of a compressed MLP: file size against report()'s stored bytes and dense fp32,
and ONNX Runtime against eager (issue 20). CPU; run from the repository root:

    PYTHONPATH=. .venv/bin/python perf/experiments/2026-12-01-onnx-size.py
"""

import os
import tempfile
import time

import onnxruntime as ort
import torch
from torch import nn

import compress_ops as co
from compress_ops.integrations.onnx import to_onnx

torch.manual_seed(0)
m = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                  nn.Linear(1024, 512)).eval()
dense_bytes = sum(p.numel() * 4 for p in m.parameters())
co.compress_(m, co.QuantConfig(bits=4, group_size=128))
stored = sum(r.stored_bytes for r in co.report(m))
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "m.onnx")
    t0 = time.time()
    to_onnx(m, (torch.randn(3, 1024),), path)
    seconds = time.time() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xb = torch.randn(7, 1024)
    y = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0])
    with torch.no_grad():
        ref = m(xb)
print(f"int4 g128 MLP 1024-1024-1024-512: export {seconds:.1f} s; file {size} bytes; "
      f"report() stored {stored} bytes (+ fp32 biases {(1024 + 1024 + 512) * 4}); "
      f"dense fp32 {dense_bytes} bytes; file / dense {size / dense_bytes:.3f}")
print(f"ONNX Runtime (CPU) at batch 7 (exported at 3): max |y - eager| "
      f"{float((y - ref).abs().max()):.2e} (max |eager| {float(ref.abs().max()):.3f})")
