"""The end-to-end benchmark (perf/bench_e2e.py) on the CPU: tiny models, eager only, a few
decode steps; every row measured or its error recorded, the file valid against the schema, the
run without transformers, the dashboard's section."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from compress_ops.perf import bench_e2e, dashboard, schema

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None

# eager only (no torch.compile in the test), 8 decode steps, 3 timed pairs, no bandwidth run,
# MobileNetV2 at batch 1 and 32x32, one thread (a second process on a 2-core machine stalls a
# 2-thread pool: 50x slower SVDs)
FAST = ["--size", "tiny", "--device", "cpu", "--no-compile", "--decode-tokens", "8",
        "--prompt-tokens", "8", "--reps", "3", "--no-peaks", "--image-seconds", "0.3",
        "--image-batch", "1", "--image-size", "32", "--threads", "1"]


def _rows(path: Path) -> tuple[dict, list[dict]]:
    obj, problems = schema.load_results(path)
    assert problems == [], problems
    return obj, obj["rows"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    rc = bench_e2e.main([*FAST, "--out", str(out)], log=lambda s: None)
    return rc, out


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_tiny_cpu_run_measures_every_row_or_records_why(tiny_run) -> None:
    rc, out = tiny_run
    obj, rows = _rows(out)
    assert obj["meta"]["complete"] is True
    assert obj["meta"]["e2e"]["size"] == "tiny"
    assert obj["meta"]["e2e"]["modes"] == ["eager"]
    for r in rows:
        e = r["e2e"]
        assert (e["status"] == "ok" and e["rate"] > 0 and r["median_us"] > 0) or \
            (e["status"] in ("error", "skipped") and e["error"]), r
    llama = {r["provider"]: r for r in rows if r["kernel"] == bench_e2e.LLAMA_KERNEL}
    assert set(llama) == {"dense", "int4-g128", "int8-row", "2:4", "lowrank-r16",
                          "codebook-4bit", "w8a8-int8", "w8a8-fp8", "ternary", "int2-g64",
                          "hashed-1/8"}
    for name in llama:  # every config runs
        e = llama[name]["e2e"]
        assert e["status"] == "ok" and e["tokens_per_s"] > 0, llama[name]
        assert e["mode"] == "eager" and e["model"] == "llama" and e["size"] == "tiny"
        assert e["weight_bytes"] > 0 and e["peak_mem_bytes"] is None
        assert 0.0 <= e["token_match"] <= 1.0
        assert llama[name]["backend"] == "cpu-eager" and llama[name]["dtype"] == "float32"
    dense = llama["dense"]
    assert dense["speedup_vs_dense"] == pytest.approx(1.0)
    assert dense["max_rel_err"] == 0.0 and dense["e2e"]["token_match"] == 1.0
    # compressed rows: smaller weights, a speedup against the dense row of the same mode
    for name in set(llama) - {"dense", "lowrank-r16"}:  # (lowrank: the tiny layers stay dense)
        r = llama[name]
        assert r["e2e"]["weight_bytes"] < dense["e2e"]["weight_bytes"]
        assert r["speedup_vs_dense"] == pytest.approx(dense["median_us"] / r["median_us"])
        assert r["e2e"]["compressed_linears"] == 14  # 2 layers x 7; lm_head kept dense
        assert 0.0 < r["max_rel_err"] < 2.0
    mb = {r["provider"]: r for r in rows if r["kernel"] == bench_e2e.MBV2_KERNEL}
    assert set(mb) == {"unfused", "fused"}
    assert all(r["e2e"]["status"] == "ok" and r["e2e"]["images_per_s"] > 0 for r in mb.values())
    assert mb["fused"]["e2e"]["fused_units"] == 17
    assert mb["fused"]["max_rel_err"] < 1e-3
    assert rc == 0


def test_without_transformers_mobilenet_still_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main([*FAST, "--out", str(out)], log=lambda s: None)
    obj, rows = _rows(out)
    assert rc == 0
    assert obj["meta"]["e2e"]["transformers"].startswith("transformers missing")
    llama = [r for r in rows if r["kernel"] == bench_e2e.LLAMA_KERNEL]
    assert len(llama) == 1 and llama[0]["e2e"]["status"] == "skipped"
    assert "transformers missing" in llama[0]["e2e"]["error"]
    mb = [r for r in rows if r["kernel"] == bench_e2e.MBV2_KERNEL]
    assert [r["e2e"]["status"] for r in mb] == ["ok", "ok"]


def test_budget_skips_rows_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main([*FAST, "--out", str(out), "--budget-s", "0", "--parts",
                         "mobilenet_v2"], log=lambda s: None)
    _, rows = _rows(out)
    assert rc == 0 and len(rows) == 2
    assert all(r["e2e"]["status"] == "skipped" and "time budget" in r["e2e"]["error"]
               and r["median_us"] is None for r in rows)


def test_schema_checks_the_e2e_object() -> None:
    row = {"e2e": {"model": "llama", "size": "tiny", "config": "dense", "mode": "eager",
                   "status": "ok", "rate": None, "rate_unit": "tokens/s"}}
    problems = schema._validate_e2e("row 0", row["e2e"])
    assert problems == ["row 0: e2e: status ok without a positive rate"]
    assert schema._validate_e2e("row 0", {"status": "error"})[-1].endswith("saying why")
    assert "e2e should be an object" in schema._validate_e2e("row 0", [])[0]


def test_unknown_config_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        bench_e2e.main([*FAST, "--configs", "int5"])


@pytest.mark.skipif(not (HAS_TRANSFORMERS and HAS_MPL),
                    reason="needs transformers and matplotlib")
def test_dashboard_has_an_e2e_section(tiny_run, tmp_path: Path) -> None:
    _, out = tiny_run
    res = tmp_path / "results"
    res.mkdir()
    (res / "2026-01-01-cpu-test-e2e.json").write_text(out.read_text())
    assert dashboard.main(["--results-dir", str(res), "--out-dir", str(tmp_path),
                           "--strict"]) == 0
    page = (tmp_path / "dashboard.html").read_text()
    assert "End to end (models)" in page and "Problems (0)" in page
    assert "tokens/s" in page and "images/s" in page and "int4-g128" in page
    # e2e rows stay out of the kernel summary
    summary = page.split("Where each kernel wins and loses")[1].split("End to end")[0]
    assert "e2e_llama_decode" not in summary
    assert json.loads(out.read_text())["rows"]
