"""compress_ops.perf.digits, the real-data evidence script, end to end at a few steps: every row
is produced and the stored sizes / nonzero fractions are what each method promises (accuracy at
a few steps means nothing and is not asserted)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("sklearn")

from compress_ops.perf import digits  # noqa: E402


def test_digits_rows_have_the_promised_sizes():
    args = argparse.Namespace(steps=3, retrain=4, seeds=1, verbose=False,
                              sections=",".join(digits.SECTIONS))
    rows = {name: (acc, size, nonzero)
            for name, acc, size, nonzero in digits.run_model("mlp", args, digits.load())}
    assert len(rows) == 29
    assert all(0.0 <= acc <= 100.0 for acc, _, _ in rows.values())
    assert rows["dense"][1:] == (1.0, 1.0)
    # 2:4: half the weights, values + 2-bit metadata (64 + 256 + 256 inputs, fp32)
    assert rows["2:4 one-shot"][2] == rows["2:4 retrained (permuted)"][2] == 0.5
    assert rows["2:4 one-shot"][1] == pytest.approx(0.53125)
    for s in (0.5, 0.9):  # unstructured: exact sparsity, dense storage
        assert rows[f"unstructured {s:.0%} retrained"][1:] == pytest.approx((1.0, 1 - s),
                                                                            abs=1e-3)
        assert rows[f"structured {s:.0%} retrained"][1] < (1 - s) + 0.02  # smaller layers
    assert rows["int4 g32 PTQ"][1] == rows["int4 g32 QAT"][1] == pytest.approx(0.1875)
    assert rows["int2 g32 QAT"][1] == pytest.approx(0.125)
    # ternary: 2-bit fields, binary: 1-bit fields, + one fp32 scale per group (no zero points)
    for label, size in (("ternary g32", 0.09375), ("binary g32", 0.0625)):
        assert rows[f"{label} PTQ"][1] == rows[f"{label} QAT"][1] == pytest.approx(size)
    assert rows["binary (per row) PTQ"][2] == 1.0  # a binary weight is never zero
    assert rows["plan budget 0.5"][1] <= 0.5 and rows["plan budget 0.25"][1] <= 0.25
