"""Weight error of the low-bit formats: SQNR (dB) per bits, group size and grid, on Gaussian and
heavy-tailed (Student-t, 3 degrees of freedom) weights.

Affine rows compare plain min/max round-to-nearest with the per-group range search that
``QuantConfig`` uses by default (``search_steps=20``); codebook rows are k-means tables per layer
and per row. Higher is better; every 6 dB is one bit. Bits per weight count the scales and zero
points (fp16) or the tables.

    python -m compress_ops.perf.sqnr [--rows 512] [--cols 1024] [--markdown]
"""

from __future__ import annotations

import argparse

import torch

from compress_ops._text import format_table, markdown_table
from compress_ops.kernels.formats.dequant import affine_bytes, codebook_weight, dequantize
from compress_ops.quantize import encode_codebook, fit_codebook, quantize_affine, sqnr_db


def weights(rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(rows, cols, generator=g)
    torch.manual_seed(0)
    student = torch.distributions.StudentT(3.0).sample((rows, cols))
    return {"gaussian": gauss, "student-t3": student}


def table(rows: int, cols: int) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    ws = weights(rows, cols)
    head = ("format", "bits/weight", *(f"{d} dB" for d in ws))
    body: list[tuple[str, ...]] = []
    for bits in (8, 4, 3, 2):
        for group in (32, 128, None):
            for sym in (False, True):
                gname = "row" if group is None else f"g{group}"
                bpw = 8 * affine_bytes(rows, cols, bits, group, torch.float16, sym) / (rows * cols)
                for steps, grid in ((0, "min/max"), (20, "search")):
                    cells = []
                    for w in ws.values():
                        a = quantize_affine(w, bits, group, symmetric=sym, search_steps=steps,
                                            dtype=torch.float16)
                        w_hat = dequantize(a.qweight, a.scales, a.zeros, bits, a.group_size, cols,
                                           dtype=torch.float32)
                        cells.append(f"{sqnr_db(w, w_hat):.2f}")
                    name = f"int{bits} {gname} {'sym' if sym else 'asym'} {grid}"
                    body.append((name, f"{bpw:.3f}", *cells))
    for bits in (8, 4, 3, 2):
        for groups, gname in ((1, "layer"), (rows, "row")):
            bpw = bits + groups * 2**bits * 16 / (rows * cols)
            cells = []
            for w in ws.values():
                cb = fit_codebook([w], bits, groups, dtype=torch.float16)
                enc = encode_codebook(w, cb, bits)
                w_hat = codebook_weight(enc.indices, enc.codebook, bits, cols,
                                        dtype=torch.float32)
                cells.append(f"{sqnr_db(w, w_hat):.2f}")
            body.append((f"codebook{bits} per {gname}", f"{bpw:.3f}", *cells))
    return head, body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    head, body = table(args.rows, args.cols)
    print(f"SQNR of {args.rows} x {args.cols} weights (fp16 scales/zeros/tables)")
    print((markdown_table if args.markdown else format_table)(head, body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
