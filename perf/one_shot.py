"""One-shot compression with calibration data, on real data: GPTQ against round-to-nearest,
SparseGPT and Wanda against magnitude 2:4, AWQ, codebooks (the old 25-step Lloyd, Lloyd to its
fixed point, the exact optimal table and the optimal table weighted by input energy).

The model is ``perf/digits.py``'s MLP (64-256-256-10) trained on scikit-learn's
``load_digits`` (real handwritten digits shipped inside the package; a fixed stratified 70/30
split). Calibration: 256 training images (``--calib``). Each row: held-out accuracy, and the
relative error of the held-out logits against the dense model's
(``||y - y_dense|| / ||y_dense||``), which is what the one-shot methods minimize layer by
layer. The MLP has no stack of blocks, so every layer is calibrated from the dense model's
inputs.

    python -m compress_ops.perf.one_shot [--markdown] [--steps 1500] [--calib 256]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import compress_ops as co
from compress_ops._text import format_table, markdown_table
from compress_ops.perf import digits

ROWS: list[tuple[str, object, bool]] = [
    ("int4 g128 RTN", co.QuantConfig(bits=4, group_size=128), False),
    ("int4 g128 GPTQ", co.QuantConfig(bits=4, group_size=128, method="gptq"), True),
    ("int3 g128 RTN", co.QuantConfig(bits=3, group_size=128), False),
    ("int3 g128 GPTQ", co.QuantConfig(bits=3, group_size=128, method="gptq"), True),
    ("int2 g64 RTN", co.QuantConfig(bits=2, group_size=64), False),
    ("int2 g64 GPTQ", co.QuantConfig(bits=2, group_size=64, method="gptq"), True),
    ("2:4 magnitude", co.Sparse24Config(), False),
    ("2:4 Wanda", co.Sparse24Config(method="wanda"), True),
    ("2:4 SparseGPT", co.Sparse24Config(method="sparsegpt"), True),
    ("int4 g128 AWQ", co.QuantConfig(bits=4, group_size=128, method="awq"), True),
    ("int3 g128 AWQ", co.QuantConfig(bits=3, group_size=128, method="awq"), True),
]
for _bits in (3, 2):
    ROWS += [
        (f"codebook {_bits}-bit, 25 Lloyd steps",
         co.CodebookConfig(bits=_bits, iters=25, method="lloyd"), False),
        (f"codebook {_bits}-bit, Lloyd converged", co.CodebookConfig(bits=_bits, method="lloyd"),
         False),
        (f"codebook {_bits}-bit, optimal", co.CodebookConfig(bits=_bits), False),
        (f"codebook {_bits}-bit, optimal, weighted", co.CodebookConfig(bits=_bits, weighted=True),
         True),
    ]


@torch.no_grad()
def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    x_tr, y_tr, x_te, y_te = digits.load()
    data = digits.batches(x_tr, y_tr, seed=1)
    torch.manual_seed(0)
    with torch.enable_grad():
        dense = digits.train(digits.MODELS["mlp"](1), data, args.steps)
    calib = [x_tr[i:i + 64] for i in range(0, min(args.calib, len(x_tr)), 64)]
    ref = dense(x_te)
    out = [("dense", f"{digits.accuracy(dense, x_te, y_te):.2f}", "0")]
    for label, config, needs in ROWS:
        model = copy.deepcopy(dense).eval()
        co.compress_(model, config, calib=calib if needs else None)
        err = float((model(x_te) - ref).norm() / ref.norm())
        out.append((label, f"{digits.accuracy(model, x_te, y_te):.2f}", f"{err:.4f}"))
        print(f"  {label:34s} {out[-1][1]:>6s}%  logits error {out[-1][2]}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--calib", type=int, default=256)
    args = ap.parse_args(argv)
    rows = run(args)
    head = ("digits MLP, held out", "accuracy %", "logits error vs dense")
    print(markdown_table(head, rows) if args.markdown else format_table(head, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
