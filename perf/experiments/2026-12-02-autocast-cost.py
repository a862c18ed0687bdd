"""What autocast costs a compressed layer on the CPU: one 1024 x 1024 layer, x [8, 1024],
per family: the bytes of floating tensors the op casts on every call under
``torch.autocast("cpu", torch.bfloat16)`` and the median time per call, against the same
module converted once with ``.to(torch.bfloat16)`` (fp32 weights, one thread).

    PYTHONPATH=. python perf/experiments/2026-12-02-autocast-cost.py
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

import compress_ops as co

torch.set_num_threads(1)
CONFIGS = {"int8 per row": co.QuantConfig(bits=8, group_size=None),
           "int4 g128": co.QuantConfig(bits=4, group_size=128),
           "2:4": co.Sparse24Config(), "low rank r=128": co.LowRankConfig(rank=128),
           "codebook 4-bit": co.CodebookConfig(bits=4), "W8A8 int8": co.W8A8Config()}


def median_us(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1024)
    print("| family | floating bytes cast per call | autocast bf16, us | converted bf16, us |")
    print("|---|---|---|---|")
    for name, cfg in CONFIGS.items():
        m = co.compress_(nn.Sequential(nn.Linear(1024, 1024)), cfg)[0].eval()
        floats = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers())
                     if t.is_floating_point())
        conv = copy.deepcopy(m).to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        with torch.no_grad():
            def auto(m=m):
                with torch.autocast("cpu", torch.bfloat16):
                    return m(x)
            a = median_us(auto)
            c = median_us(lambda conv=conv, xb=xb: conv(xb))
        print(f"| {name} | {floats} | {a:.0f} | {c:.0f} |")


if __name__ == "__main__":
    main()
