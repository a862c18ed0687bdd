"""The benchmark machinery: schema validation, the dashboard, a quick CPU bench run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from compress_ops.perf import bench, dashboard, machine, schema, timing

# The GPU image may lack matplotlib: the dashboard tests skip there instead of failing the run.
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")


def _rows(device: str = "cpu: test", sha: str = "abc123") -> list[schema.Row]:
    env = machine.Env(device=device, torch="2.x", triton="3.x", git_sha=sha)
    peaks = schema.Peaks(hbm_gbps=100.0, flops_tflops={"float16": 10.0})
    rows = []
    for m in (1, 16, 128):
        common = dict(kernel="sparse24_linear", shape={"M": m, "N": 256, "K": 512},
                      dtype=torch.float16, flops=2.0 * m * 256 * 512, env=env, peaks=peaks,
                      backend="cpu-reference")
        rows.append(schema.make_row(provider="dense", median_us=10.0 + m, min_bytes=1e5,
                                    samples=50, **common))
        rows.append(schema.make_row(provider="ours", median_us=8.0 + m, min_bytes=6e4,
                                    samples=50, note="test", **common))
    rows.append(schema.make_row(provider="ours", median_us=None, min_bytes=6e4,
                                note="error: unavailable", **{**common, "shape": {"M": 2048,
                                                                             "N": 256,
                                                                             "K": 512}}))
    schema.fill_speedups(rows, ["dense"])
    return rows


def _obj(rows: list[schema.Row] | None = None) -> dict:
    meta = {"device": "cpu: test", "backend": "cpu", "torch": "2.x", "triton": "3.x",
            "git_sha": "abc123", "date": "2025-01-01T00:00:00+00:00",
            "peaks": schema.Peaks(100.0, {"float16": 10.0}).to_dict()}
    return json.loads(json.dumps(schema.results_object(meta, rows or _rows())))


def test_valid_object_has_no_problems() -> None:
    obj = _obj()
    assert schema.validate_results(obj) == []
    ours = [r for r in obj["rows"] if r["provider"] == "ours" and r["median_us"]]
    assert all(r["speedup_vs_dense"] > 1.0 for r in ours)
    assert all(r["peak_kind"] in ("hbm", "flops") and r["pct_peak"] > 0 for r in ours)


def test_validate_reports_missing_and_unknown_fields() -> None:
    obj = _obj()
    del obj["rows"][1]["gbps"]
    obj["rows"][2]["flux_capacitor"] = 1.21
    del obj["meta"]["peaks"]
    obj["extra"] = True
    problems = schema.validate_results(obj)
    text = "\n".join(problems)
    assert "row 1 (sparse24_linear/ours): missing field 'gbps'" in text
    assert "row 2 (sparse24_linear/dense): unknown field 'flux_capacitor'" in text
    assert "meta: missing field 'peaks'" in text
    assert "unknown top-level field 'extra'" in text
    assert len(problems) == 4


def test_validate_reports_wrong_types() -> None:
    obj = _obj()
    obj["rows"][0]["median_us"] = "fast"
    obj["rows"][0]["shape"] = [1, 2, 3]
    obj["rows"][0]["peak_kind"] = "vibes"
    obj["rows"][0]["kernel"] = None
    assert len(schema.validate_results(obj)) == 4
    assert schema.validate_results([]) != []


def test_device_slug_and_results_path(tmp_path: Path) -> None:
    assert machine.device_slug("NVIDIA H200") == "nvidia-h200"
    assert machine.device_slug("cpu: Intel(R) Xeon(R) Processor @ 2.50GHz") == \
        "cpu-intel-xeon-2-50ghz"
    p = schema.results_path("NVIDIA H200", results_dir=tmp_path)
    assert p.parent == tmp_path and p.name.endswith("-nvidia-h200.json")


@needs_mpl
def test_dashboard_renders_and_reports_bad_files(tmp_path: Path) -> None:
    res, out = tmp_path / "results", tmp_path / "out"
    res.mkdir()
    (res / "good.json").write_text(json.dumps(_obj()))
    bad = _obj(_rows(device="NVIDIA Test", sha="def456"))
    del bad["rows"][0]["tflops"]
    bad["rows"][1]["mystery"] = 0
    (res / "bad.json").write_text(json.dumps(bad))
    (res / "broken.json").write_text("{not json")

    assert dashboard.main(["--results-dir", str(res), "--out-dir", str(out)]) == 0
    assert dashboard.main(["--results-dir", str(res), "--out-dir", str(out), "--strict"]) == 1
    page = (out / "dashboard.html").read_text()
    assert (out / "dashboard.png").stat().st_size > 10_000
    assert "Problems (3)" in page
    assert "missing field &#x27;tflops&#x27;" in page
    assert "unknown field &#x27;mystery&#x27;" in page
    assert "broken.json" in page and "cannot read" in page
    # rows of the bad file are still shown, not skipped: a file-table line + 7 rows per file
    assert page.count("<td class='l'>bad.json</td>") == 8
    assert page.count("<td class='l'>good.json</td>") == 8


@needs_mpl
def test_dashboard_with_no_results(tmp_path: Path) -> None:
    assert dashboard.main(["--results-dir", str(tmp_path), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "dashboard.png").exists()
    assert "Problems (0)" in (tmp_path / "dashboard.html").read_text()


def test_quick_cpu_bench_writes_valid_rows(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(out)]
                    + (["--dashboard"] if HAS_MPL else []))
    obj, problems = schema.load_results(out)
    assert problems == [] and rc == 0
    assert obj["meta"]["complete"] is True and obj["meta"]["errors"] == []
    rows = obj["rows"]
    providers = {k: {r["provider"] for r in rows if r["kernel"] == k}
                 for k in ("sparse24_linear", "dequant_linear", "lowrank_linear", "dwsep_conv2d")}
    assert providers["sparse24_linear"] == {"ours", "ours-dense-cache", "dense"}
    assert providers["dequant_linear"] == {
        "dense", "ours-int8", "ours-int4-g128", "torch-int8pack", "torch-int4pack",
        "ours-int8-dequant", "ours-int4-g128-dequant", "ours-int4-g128-dense-cache"}
    assert providers["lowrank_linear"] == {"dense", "ours"}
    assert providers["dwsep_conv2d"] == {"unfused", "ours"}
    assert {r["backend"] for r in rows} <= {"cpu", "cpu-reference", "cpu-interpreter",
                                            "cpu-dense", "cpu-dense-cache"}
    # every dequant row names the CPU route it took
    assert all("route=" in r["note"] for r in rows if r["provider"].startswith("ours-int")
               and not r["provider"].endswith("dense-cache"))
    assert all(r["note"] == "route=unfused" for r in rows
               if r["kernel"] == "lowrank_linear" and r["provider"] == "ours")
    for r in rows:
        assert r["shape"]["N"] * r["shape"]["K"] <= 256 * 512
        assert r["median_us"] > 0 and r["samples"] >= timing.MIN_SAMPLES_SLOW
        assert r["speedup_vs_dense"] > 0 and r["device"].startswith("cpu: ")
    assert all(r["max_rel_err"] <= 3e-2 for r in rows if r["provider"].startswith("ours"))
    if HAS_MPL:
        assert (tmp_path / "dashboard.html").exists() and (tmp_path / "dashboard.png").exists()


def test_dashboard_without_matplotlib_writes_the_tables_and_says_so(tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    (tmp_path / "good.json").write_text(json.dumps(_obj()))
    assert dashboard.main(["--results-dir", str(tmp_path), "--out-dir", str(tmp_path)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    page = (tmp_path / "dashboard.html").read_text()
    assert "good.json" in page and "<img" not in page
    assert not (tmp_path / "dashboard.png").exists()
