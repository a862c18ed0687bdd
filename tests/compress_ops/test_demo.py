"""python -m compress_ops demo: the main job runs, checks and prints its table."""

from __future__ import annotations

from compress_ops.__main__ import main


def test_demo_prints_table_and_passes(capsys):
    rc = main(["demo", "--compile-backend", "aot_eager", "--batch", "1", "--seq", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sparse24" in out and "blocks.0.up" in out and "OK:" in out
    rows = {line.split()[0]: line for line in out.splitlines() if "<model>" in line}
    (up,) = [line.split() for line in out.splitlines()
             if line.split()[:2] == ["sparse24", "blocks.0.up"]]
    assert up[4] == "0.5312"  # fp32 layers: (2 + 1/8) / 4 bytes per weight
    # the model row: its whole weights, the embedding and norms (dense) included
    assert 0.5312 < float(rows["sparse24"].split()[4]) < 0.6
    for family in ("int8", "int4-g128", "int2-g32", "codebook4", "cb3-shared-ffn",
                   "lowrank-r64"):
        assert family in rows, out
    assert "dwsep-mbv2" in out and "<model vs unfused>" in out
    ratio = {f: float(rows[f].split()[4]) for f in rows if f != "dwsep-mbv2"}
    assert ratio["int2-g32"] < ratio["int4-g128"] < ratio["int8"] < ratio["sparse24"] < 1


def test_cli_usage(capsys):
    assert main([]) == 0
    assert main(["frobnicate"]) == 2


def test_cli_bench_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file() and '"rows"' in out.read_text()
