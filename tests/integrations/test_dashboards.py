"""integrations/dashboards.py: committed results files converted to the PyTorch OSS benchmark
database v3 records, Liger-Kernel's benchmark CSV and Triton perf_report CSVs, byte for byte as
the golden files in ``golden/``; each mapping's fields and units; p20 / p80 where a row records
them and nowhere else; the timing that records them.

``COMPRESS_OPS_REGEN_GOLDEN=1 pytest tests/integrations/test_dashboards.py`` rewrites the golden
files (review the diff).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress_ops.integrations import dashboards as d

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "perf" / "results"
GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("COMPRESS_OPS_REGEN_GOLDEN") == "1"

#: (golden name, committed results file, rows kept (None: all), formats)
CASES = [
    ("dwsep", "2026-11-28-cpu-intel-xeon-2-50ghz-dwsep_conv.json", None, d.FORMATS),
    ("e2e-tiny", "2026-12-01-cpu-amd-epyc-e2e-tiny.json", None, ("liger-csv", "triton-csv")),
    ("quick-h200", "2026-11-30-quick-nvidia-h200.json", slice(0, 2), d.FORMATS),
    ("static-3.9.0", "static-triton3.9.0.json", ("int4 g128 asym", "rank 64"),
     ("liger-csv", "triton-csv")),
]
OUT_NAMES = {"oss-v3": "oss-v3.jsonl", "liger-csv": "liger.csv", "triton-csv": "triton"}


def _input(tmp_path: Path, name: str, keep) -> Path:
    """The committed file, or a subset of its rows under the same file name."""
    src = RESULTS / name
    if keep is None:
        return src
    obj = json.loads(src.read_text())
    if isinstance(keep, slice):
        obj["rows"] = obj["rows"][keep]
    else:
        obj["rows"] = [r for r in obj["rows"] if r.get("config") in keep]
    p = tmp_path / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


def _files(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize(("case", "name", "keep", "formats"), CASES, ids=[c[0] for c in CASES])
def test_golden_outputs(tmp_path: Path, case: str, name: str, keep, formats) -> None:
    src = _input(tmp_path, name, keep)
    for fmt in formats:
        out = tmp_path / "out" / f"{case}.{OUT_NAMES[fmt]}"
        d.convert([src], fmt, out)
        golden = GOLDEN / out.name
        if REGEN:
            if golden.is_dir():
                for p in sorted(golden.rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
            for rel, data in _files(out).items():
                target = golden if out.is_file() else golden / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        assert golden.exists(), f"no golden {golden.name}: COMPRESS_OPS_REGEN_GOLDEN=1"
        assert _files(out) == _files(golden), f"{case} {fmt} differs from {golden}"


def test_golden_files_are_small() -> None:
    sizes = {str(p.relative_to(GOLDEN)): p.stat().st_size for p in GOLDEN.rglob("*")
             if p.is_file()}
    assert sizes and max(sizes.values()) < 20_000, sizes
    assert sum(sizes.values()) < 80_000, sum(sizes.values())


def test_every_committed_results_file_converts_or_is_named() -> None:
    """Every bench / quick / static file converts to all three formats; the other JSON files
    (diagnostics, accuracy tables) are refused with a reason, never half-converted."""
    converted = 0
    for p in sorted(RESULTS.glob("*.json")):
        obj = json.loads(p.read_text())
        try:
            ms = d.measurements(obj, p.name)
        except ValueError as e:
            assert "not a results file" in str(e)
            continue
        assert ms and d.oss_v3_records(ms) and d.liger_rows(ms) and d.triton_tables(ms)
        converted += 1
    assert converted >= 8


# ---------------------------------------------------------------------------------------------
# The mappings, on small synthetic files
# ---------------------------------------------------------------------------------------------


def _row(provider: str, m: int, us: float | None, **extra) -> dict:
    return {"kernel": "dequant_linear", "provider": provider, "shape": {"M": m, "N": 64, "K": 32},
            "dtype": "float16", "median_us": us, "tflops": None if us is None else 1.5,
            "gbps": None if us is None else 100.0, "pct_peak": None, "peak_kind": None,
            "speedup_vs_dense": None if us is None else 2.0, "device": "NVIDIA H200",
            "torch": "2.9.0", "triton": "3.9.0", "git_sha": "abc123", "backend": "cuda",
            "samples": 50, **extra}


def _bench(*rows: dict) -> dict:
    meta = {"device": "NVIDIA H200", "backend": "cuda", "torch": "2.9.0", "triton": "3.9.0",
            "git_sha": "abc123", "date": "2026-12-01T10:00:00+00:00", "peaks": {},
            "host": "Intel Xeon", "cpu_threads": 16}
    return {"schema": 1, "meta": meta, "rows": list(rows)}


ROWS = (
    _row("ours", 1, 8.0, p20_us=7.5, p80_us=9.0),
    _row("dense", 1, 16.0),  # an old row: no p20 / p80
    _row("ours", 16, None, note="error: it failed"),
)


def test_oss_v3_fields_units_and_quantiles() -> None:
    recs = d.oss_v3_records(d.measurements(_bench(*ROWS), "run.json"))
    by = {(r["model"]["backend"], r["metric"]["name"]): r for r in recs}
    # the documented v3 fields, benchmark_values a list of numbers, every extra_info str -> str
    r = by[("ours", "latency_ms")]
    assert set(r) == {"benchmark", "model", "metric", "runners", "dependencies", "timestamp"}
    assert set(r["benchmark"]) == {"name", "mode", "dtype", "extra_info"}
    assert set(r["model"]) == {"name", "type", "backend", "origins", "extra_info"}
    assert set(r["metric"]) == {"name", "benchmark_values", "extra_info"}
    assert r["benchmark"]["mode"] == "inference" and r["benchmark"]["dtype"] == "float16"
    assert r["model"]["name"] == "dequant_linear M=1,N=64,K=32"
    assert r["model"]["origins"] == ["compress_ops"]
    assert r["metric"]["benchmark_values"] == [0.008]  # 8 us in ms
    assert r["metric"]["extra_info"] == {"unit": "ms", "statistic": "median", "samples": "50"}
    for rec in recs:
        for part in (rec["benchmark"], rec["model"], rec["metric"], rec["runners"][0]):
            assert all(isinstance(k, str) and isinstance(v, str)
                       for k, v in part["extra_info"].items())
    assert r["runners"] == [{"name": "cuda", "type": "NVIDIA H200", "cpu_info": "Intel Xeon",
                             "cpu_count": 16, "gpu_info": "NVIDIA H200", "extra_info": {}}]
    assert r["dependencies"]["pytorch"]["version"] == "2.9.0"
    assert r["dependencies"]["triton"]["version"] == "3.9.0"
    assert r["dependencies"]["compress_ops"]["sha"] == "abc123"
    assert r["timestamp"] == 1796119200  # 2026-12-01 10:00:00 UTC
    # p20 / p80 where recorded, absent where not; a row without a time has no record
    assert by[("ours", "latency_p20_ms")]["metric"]["benchmark_values"] == [0.0075]
    assert by[("ours", "latency_p80_ms")]["metric"]["benchmark_values"] == [0.009]
    assert ("dense", "latency_ms") in by
    assert ("dense", "latency_p20_ms") not in by and ("dense", "latency_p80_ms") not in by
    assert {k[1] for k in by if k[0] == "ours"} == {
        "latency_ms", "latency_p20_ms", "latency_p80_ms", "speedup_vs_dense", "tflops", "gbps"}
    assert len(recs) == 6 + 4
    assert all("target_value" not in rec["metric"] for rec in recs)


def test_oss_v3_text_is_json_lines_or_a_list() -> None:
    recs = d.oss_v3_records(d.measurements(_bench(*ROWS)))
    lines = d.oss_v3_text(recs).splitlines()
    assert [json.loads(s) for s in lines] == recs
    assert json.loads(d.oss_v3_text(recs, json_list=True)) == recs


def test_liger_columns_units_and_quantiles() -> None:
    rows = d.liger_rows(d.measurements(_bench(*ROWS), "run.json"))
    text = d.liger_csv_text(rows)
    assert text.splitlines()[0] == (
        "kernel_name,kernel_provider,kernel_operation_mode,metric_name,metric_unit,x_name,"
        "x_label,x_value,y_value_50,y_value_20,y_value_80,extra_benchmark_config_str,gpu_name,"
        "timestamp,liger_version")
    assert text.endswith("\r\n")  # csv.DictWriter's default, as Liger's writer
    got = list(csv.DictReader(io.StringIO(text)))
    assert [g["kernel_provider"] for g in got] == ["ours", "dense"]  # the failed row is left out
    ours, dense = got
    assert (ours["kernel_name"], ours["kernel_operation_mode"], ours["metric_name"],
            ours["metric_unit"]) == ("dequant_linear", "forward", "speed", "ms")
    assert (ours["x_name"], ours["x_value"]) == ("M", "1")
    assert float(ours["y_value_50"]) == 0.008
    assert (float(ours["y_value_20"]), float(ours["y_value_80"])) == (0.0075, 0.009)
    assert (dense["y_value_20"], dense["y_value_80"]) == ("", "")  # not recorded: empty
    assert json.loads(ours["extra_benchmark_config_str"]) == {"N": 64, "K": 32,
                                                              "dtype": "float16"}
    assert ours["gpu_name"] == "NVIDIA H200"
    assert ours["timestamp"] == "2026-12-01 10:00:00"
    assert ours["liger_version"] == ""


def test_triton_csv_layout_and_quantile_columns() -> None:
    tables = d.triton_tables(d.measurements(_bench(*ROWS[:2], _row("ours", 16, 20.0),
                                                   _row("dense", 16, 30.0)), "run.json"))
    assert list(tables) == ["run/dequant_linear-float16-N64-K32.csv"]
    lines = tables["run/dequant_linear-float16-N64-K32.csv"].split("\n")
    assert lines == [
        "M,ours (ms),dense (ms),ours-min (ms),dense-min (ms),ours-max (ms),dense-max (ms)",
        "1.000000,0.008000,0.016000,0.007500,,0.009000,",
        "16.000000,0.020000,0.030000,,,,",
        "",
    ]
    # no p20 / p80 anywhere: Triton's own columns only; a row without a time is an empty cell
    tables = d.triton_tables(d.measurements(_bench(_row("ours", 1, None), _row("dense", 1, 4.0),
                                                   _row("dense", 2, 5.0)), "run.json"))
    assert tables["run/dequant_linear-float16-N64-K32.csv"] == (
        "M,ours (ms),dense (ms)\n1.000000,,0.004000\n2.000000,,0.005000\n")


def test_triton_refuses_two_times_for_one_cell() -> None:
    with pytest.raises(ValueError, match="two times"):
        d.triton_tables(d.measurements(_bench(_row("ours", 1, 1.0), _row("ours", 1, 2.0))))


def test_quick_and_static_files_map_modes_and_predictions() -> None:
    quick = json.loads((RESULTS / "2026-11-30-quick-nvidia-h200.json").read_text())
    ms = d.measurements(quick, "q.json")
    assert {m.mode for m in ms} == {"eager", "cuda-graph"}
    assert {m.dtype for m in ms} == {"float16"}
    assert all(m.p20_us is None and m.p80_us is None for m in ms)  # the file has none
    first = quick["rows"][0]
    # a quick-check row that records its quantiles (the names dashboards reads) keeps them
    first = {**first, "eager_p20_us": 90.0, "eager_p80_us": 99.0}
    eager, graph = d.measurements({**quick, "rows": [first]}, "q.json")
    assert (eager.mode, eager.p20_us, eager.p80_us) == ("eager", 90.0, 99.0)
    assert (graph.mode, graph.p20_us, graph.p80_us) == ("cuda-graph", None, None)

    static = json.loads((RESULTS / "static-triton3.9.0.json").read_text())
    ms = d.measurements(static, "s.json")
    assert all(m.predicted and m.mode == "predicted" for m in ms)
    names = {r["metric"]["name"] for r in d.oss_v3_records(ms)}
    assert names == {"predicted_latency_ms", "predicted_speedup"}
    assert {r["metric_name"] for r in d.liger_rows(ms)} == {"predicted_speed"}


def test_unknown_files_are_refused() -> None:
    for obj in ({"rows": []}, {"meta": {}, "rows": [{"cosine": 1.0}]}):
        with pytest.raises(ValueError, match="not a results file"):
            d.measurements(obj)


# ---------------------------------------------------------------------------------------------
# The CLI and the module's imports
# ---------------------------------------------------------------------------------------------


def test_cli_writes_each_format(tmp_path: Path, capsys) -> None:
    src = RESULTS / "2026-11-28-cpu-intel-xeon-2-50ghz-dwsep_conv.json"
    assert d.main(["--to", "oss-v3", str(src), "-o", str(tmp_path / "o.jsonl")]) == 0
    assert d.main(["--to", "oss-v3", str(src), "-o", str(tmp_path / "o.json")]) == 0
    assert d.main(["--to", "liger-csv", str(src), "-o", str(tmp_path / "l.csv")]) == 0
    assert d.main(["--to", "triton-csv", str(src), "-o", str(tmp_path / "t")]) == 0
    assert isinstance(json.loads((tmp_path / "o.json").read_text()), list)
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 16
    assert len(list((tmp_path / "t").rglob("*.csv"))) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"meta": {}, "rows": [{"x": 1}]}))
    assert d.main(["--to", "liger-csv", str(bad), "-o", str(tmp_path / "x.csv")]) == 2
    assert "not a results file" in capsys.readouterr().err


def test_module_runs_on_the_standard_library_alone(tmp_path: Path) -> None:
    """Only stdlib imports, and it converts without torch or compress_ops imported."""
    tree = ast.parse((REPO / "integrations" / "dashboards.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert mods <= set(sys.stdlib_module_names) | {"__future__"}, mods
    src = RESULTS / "2026-12-01-cpu-amd-epyc-e2e-tiny.json"
    code = ("import runpy, sys\n"
            f"sys.argv = ['dashboards', '--to', 'liger-csv', {str(src)!r}, '-o', "
            f"{str(tmp_path / 'l.csv')!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'integrations' / 'dashboards.py')!r}, "
            "run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules and 'compress_ops' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)
    assert (tmp_path / "l.csv").read_text().startswith("kernel_name,")


# ---------------------------------------------------------------------------------------------
# p20 / p80 recorded by new runs (compress_ops.perf.timing and .schema)
# ---------------------------------------------------------------------------------------------


def test_timing_records_p20_and_p80() -> None:
    import torch

    from compress_ops.perf import timing

    assert timing.quantile([5.0, 1.0, 3.0, 2.0, 4.0], 0.2) == pytest.approx(1.8)
    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0.2, 0.5, 0.8):
        assert timing.quantile(xs, q) == pytest.approx(
            torch.quantile(torch.tensor(xs, dtype=torch.float64), q).item())
    t = timing.timing_of([3e-6, 1e-6, 2e-6, 4e-6, 5e-6], 1e6)
    assert (t.samples, t.median_us) == (5, pytest.approx(3.0))
    assert (t.p20_us, t.p80_us) == (pytest.approx(1.8), pytest.approx(4.2))
    t = timing.time_fn(lambda: None, torch.device("cpu"), max_seconds=0.2)
    assert t.p20_us is not None and t.p80_us is not None
    assert t.p20_us <= t.median_us <= t.p80_us


def test_rows_carry_p20_and_p80_and_validate() -> None:
    import torch

    from compress_ops.perf import schema
    from compress_ops.perf.machine import Env

    env = Env(device="cpu: test", torch="2.9", triton="3.9", git_sha="abc")
    common = dict(kernel="k", shape={"M": 1, "N": 2, "K": 3}, dtype=torch.float32, flops=12.0,
                  min_bytes=24.0, env=env, peaks=schema.Peaks(), backend="cpu", provider="p")
    row = schema.make_row(median_us=2.0, samples=50, p20_us=1.5, p80_us=2.5, **common).to_dict()
    assert (row["p20_us"], row["p80_us"]) == (1.5, 2.5)
    old = schema.make_row(median_us=2.0, samples=50, **common).to_dict()
    assert "p20_us" not in old and "p80_us" not in old
    failed = schema.make_row(median_us=None, p20_us=1.0, p80_us=2.0, **common).to_dict()
    assert "p20_us" not in failed and "p80_us" not in failed
    obj = {"schema": 1, "meta": {"device": "cpu", "backend": "cpu", "torch": "2.9",
                                 "triton": "3.9", "git_sha": "abc", "date": "2026-12-01",
                                 "peaks": {}}, "rows": [row, old]}
    assert schema.validate_results(obj) == []
    ms = d.measurements(obj, "new.json")
    assert [(m.p20_us, m.p80_us) for m in ms] == [(1.5, 2.5), (None, None)]
