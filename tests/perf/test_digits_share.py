"""The ``share`` section of compress_ops.perf.digits (weight sharing before training), at a
couple of steps: every row is produced, the weight counts and fractions are what each model
stores, and the CLI prints the table (accuracy at two steps means nothing and is not
asserted)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("sklearn")

from compress_ops.perf import digits  # noqa: E402


def _rows(kind: str) -> dict[str, tuple]:
    args = argparse.Namespace(share_steps=2, seeds=2)
    rows = digits.share_rows(kind, args, digits.load())
    assert all(0.0 <= r[4] <= 100.0 and r[5] >= 0.0 and r[6] > 0.0 for r in rows)
    return {name: (w, frac) for name, w, frac, *_ in rows}


def test_share_mlp_rows_store_the_promised_weights():
    rows = _rows("mlp")
    assert rows["dense 64-256-256-10"][0] == 64 * 256 + 256 * 256 + 256 * 10
    assert rows["hashed 1/8 (every layer)"] == (10560, 0.125)
    assert rows["hashed 1/64 (every layer)"][0] == 1320  # 256 + 1024 + 40 buckets
    assert rows["dense 64-72-72-10 (equal count)"][0] == 10512
    assert rows["dense 64-15-15-10 (equal count)"][0] == 1335
    deep = "deep 64-256-[256x256]x10-10 untied"
    assert rows[deep] == (16384 + 10 * 65536 + 2560, 1.0)
    # the ten tied hidden layers store one weight: the deep model's count is the plain MLP's
    tied = rows["deep tied (10 hidden layers, one weight)"]
    assert tied[0] == rows["dense 64-256-256-10"][0]
    assert tied[1] == pytest.approx(1 / 8, rel=0.01)
    assert rows["deep tied + hashed 1/8 (every layer)"][1] == pytest.approx(1 / 64, rel=0.01)


def test_share_cnn_rows_store_the_promised_weights():
    rows = _rows("cnn")
    assert rows["dense CNN width 32"] == (151072, 1.0)
    if any("shared-filter" in name for name in rows):
        # convs: 4 and 8 bank filters + one scale per channel; fc: 16384 + 160 buckets
        assert rows["hashed fc 1/8 + shared-filter convs 1/8"][0] == 68 + 2368 + 16384 + 160
        assert rows["hashed fc 1/64 + shared-filter convs 1/64"][0] == 41 + 352 + 2048 + 20
    for name, (w, frac) in rows.items():
        assert frac == pytest.approx(w / 151072)
        if name.startswith("hashed"):
            assert frac == pytest.approx(1 / 8 if "1/8" in name else 1 / 64, rel=0.1)


def test_share_cli_prints_the_table(capsys):
    assert digits.main(["--models", "mlp", "--sections", "share", "--share-steps", "1",
                        "--seeds", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | weight sharing before training |")
    assert out.count("\n| mlp |") == 10
