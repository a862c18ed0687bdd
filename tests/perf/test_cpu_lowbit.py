"""``perf/cpu_lowbit.py``, the interleaved timing script of the low-bit CPU paths: a tiny run
writes a valid results file (what it measures is not checked here)."""

from __future__ import annotations

import json

from compress_ops.perf import cpu_lowbit, schema


def test_cpu_lowbit_writes_valid_results(tmp_path, capsys, monkeypatch):
    """``python -m compress_ops.perf.cpu_lowbit`` (tiny, no waiting): a schema-1 results file
    whose rows name their route and error, and the markdown table."""
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "0")
    monkeypatch.delenv("COMPRESS_OPS_CPU_FP32_VIA_BF16", raising=False)
    out = tmp_path / "r.json"
    assert cpu_lowbit.main(["--n", "64", "--k", "96", "--reps", "2", "--no-wait", "--no-flush",
                            "--only", "int4,int8 row asym,Codebook", "--out", str(out)]) == 0
    obj = json.loads(out.read_text())
    assert schema.validate_results(obj) == []
    providers = {r["provider"] for r in obj["rows"]}
    assert "dense" in providers and "CodebookConfig(bits=4)" in providers
    assert any(p.endswith("via-bf16") for p in providers)
    assert all("route=" in r["note"] and "err=" in r["note"] for r in obj["rows"])
    assert all(r["speedup_vs_dense"] > 0 for r in obj["rows"])
    assert "| config |" in capsys.readouterr().out
