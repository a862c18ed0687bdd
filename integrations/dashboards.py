"""Dashboards other tools read: our results files in three public formats.

Pure Python (``json`` and ``csv``; nothing from ``compress_ops.perf`` or torch), so it converts a
results file anywhere, from the files alone::

    python -m compress_ops.integrations.dashboards --to oss-v3 FILE... -o OUT.jsonl
    python -m compress_ops.integrations.dashboards --to liger-csv FILE... -o OUT.csv
    python -m compress_ops.integrations.dashboards --to triton-csv FILE... -o OUT_DIR

Inputs (``perf/results/*.json``; :func:`measurements` tells them apart):

* a bench file (``"schema": 1``, :mod:`compress_ops.perf.schema`): kernel rows and end-to-end
  rows (``e2e``; their ``e2e.mode``, eager or compiled, becomes the mode);
* a quick-check file (``"schema": "quick-1"``, :mod:`compress_ops.perf.quick_check`): every row
  twice, mode ``eager`` and, when its graph ran, ``cuda-graph``;
* the static model's file (``static-triton<version>.json``, :mod:`compress_ops.perf.static_perf`):
  *predictions*, never measurements: mode ``predicted``, provider ``ours`` and the row's baseline.

Every time is converted from our microseconds to milliseconds (the unit all three formats use).
The 20th / 80th percentiles come from the row's ``p20_us`` / ``p80_us`` (quick check:
``eager_p20_us`` / ``eager_p80_us`` / ``graph_p20_us`` / ``graph_p80_us``) and are left empty or
out where a file does not record them: they are never estimated. Rows without a time (a provider
that could not run, a skipped end-to-end config) have nothing to convert and are left out, except
as an empty cell of a Triton table.

The formats
-----------

``oss-v3``: the PyTorch OSS benchmark database, table ``benchmark.oss_ci_benchmark_v3``
(pytorch/test-infra ``clickhouse_db_schema/oss_ci_benchmark_v3/schema.sql``; the format is
described on the pytorch/pytorch wiki page "PyTorch OSS benchmark infra" and written by
torchao's ``benchmarks/dashboard/ci_microbenchmark_runner.py``): one JSON object per metric with
``benchmark {name, mode, dtype, extra_info}``, ``model {name, type, backend, origins,
extra_info}``, ``metric {name, benchmark_values, extra_info}``, ``runners [{name, type, cpu_info,
cpu_count, gpu_info, avail_gpu_mem_in_gb, extra_info}]`` (fields of test-infra's
``.github/scripts/benchmarks/gather_runners_info.py``), ``dependencies {name: {repo, branch, sha,
version, extra_info}}`` and ``timestamp`` (UInt64, Unix seconds: ``meta.date``). Every
``extra_info`` is ``Map(String, String)`` in the table, so its values are strings here. A runner
field we do not know is left out, never zero-filled; ``metric.target_value`` is left out (we set
no target; torchao writes 0.0). Metrics per row: ``latency_ms`` (the median), ``latency_p20_ms``
/ ``latency_p80_ms`` (when recorded), ``speedup_vs_dense`` (x), ``tflops``, ``gbps``, an
end-to-end row's rate (``tokens_per_s`` / ``images_per_s``); the static model's are
``predicted_latency_ms`` and ``predicted_speedup``. Written as JSON lines (``.jsonl``; a ``.json``
output gets one JSON list, the layout torchao writes).

``liger-csv``: Liger-Kernel's ``benchmark/data/all_benchmark_data.csv`` (columns in the order of
``BenchmarkDataCSVRow`` in linkedin/Liger-Kernel ``benchmark/scripts/utils.py``): ``kernel_name,
kernel_provider, kernel_operation_mode, metric_name, metric_unit, x_name, x_label, x_value,
y_value_50, y_value_20, y_value_80, extra_benchmark_config_str, gpu_name, timestamp,
liger_version``. ``y_value_50/20/80`` are the 50th / 20th / 80th percentiles (Liger's
``QUANTILES = [0.5, 0.2, 0.8]`` of ``do_bench``), ``metric_name`` ``speed`` (``predicted_speed``
for the static model), ``metric_unit`` ``ms``, ``kernel_operation_mode`` ``forward`` (our ops run
inference forwards), ``extra_benchmark_config_str`` the JSON of the rest of the shape and the
dtype (Liger's readers ``json.loads`` it), ``timestamp`` ``%Y-%m-%d %H:%M:%S`` (UTC, from
``meta.date``), ``gpu_name`` the device, ``liger_version`` empty (this is not Liger). A missing
p20 / p80 is an empty cell (Liger itself writes ``nan``; pandas reads both as NaN). ``csv``
module defaults, as Liger's ``csv.DictWriter`` (``\\r\\n`` line ends).

``triton-csv``: what ``triton.testing.perf_report``'s ``Mark.run(save_path=...)`` writes per
benchmark (triton/testing.py, ``Mark._run``, checked against Triton 3.9.0): ``<plot_name>.csv``,
``pandas.DataFrame.to_csv(float_format="%.6f", index=False)``; the columns are the ``x_names``,
then ``"<line_name> (<ylabel>)"`` per line; every number ``%.6f`` (the x values too), a missing
value an empty cell, ``\\n`` line ends. One table per kernel, dtype, mode-free provider set and
fixed shape: x is ``M`` where the shape has one (the other dimensions name the table), else every
dimension; one line per provider (``"<provider> [<mode>]"`` where the mode is not the only one);
``ylabel`` ``ms``. Where p20 / p80 are recorded, the columns ``"<line>-min (ms)"`` and
``"<line>-max (ms)"`` follow: the labels ``Mark._run`` gives the ``(y_min, y_max)`` a benchmark
returns (Triton's tutorials return ``do_bench(quantiles=[0.5, 0.2, 0.8])``); Triton's own save
drops them, so a reader that wants only Triton's columns reads the mean ones. The files go to
``OUT_DIR/<input file stem>/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("oss-v3", "liger-csv", "triton-csv")

#: Liger-Kernel's CSV columns, in its order (``BenchmarkDataCSVRow``).
LIGER_COLUMNS: tuple[str, ...] = (
    "kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name", "metric_unit",
    "x_name", "x_label", "x_value", "y_value_50", "y_value_20", "y_value_80",
    "extra_benchmark_config_str", "gpu_name", "timestamp", "liger_version",
)
#: ``benchmark.name`` of the OSS records, per kind of input row.
OSS_BENCHMARK_NAMES = {
    "bench": "compress_ops kernels",
    "e2e": "compress_ops end to end",
    "quick": "compress_ops quick check",
    "static": "compress_ops static model (predicted)",
}
#: The x axis: the first of these a shape has (else every dimension), and its label.
X_NAMES: tuple[str, ...] = ("M", "batch", "B")
X_LABELS = {"M": "rows of the input (M)", "batch": "batch size", "B": "batch size"}
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp8": "float8"}
TRITON_YLABEL = "ms"


@dataclass(frozen=True)
class Run:
    """What a results file says about where and when it ran (its ``meta``)."""

    file: str
    date: str | None
    device: str
    backend: str
    torch: str | None
    triton: str | None
    git_sha: str | None
    host: str | None = None
    cpu_threads: int | None = None
    gpu_memory_gib: float | None = None


@dataclass(frozen=True)
class Measurement:
    """One time of one provider at one shape, in the terms every format needs (times in us)."""

    source: str  # "bench", "e2e", "quick", "static"
    kernel: str
    provider: str
    mode: str  # "" (a kernel row), "eager", "compiled", "cuda-graph", "predicted"
    shape: tuple[tuple[str, int], ...]
    dtype: str
    median_us: float | None
    p20_us: float | None = None
    p80_us: float | None = None
    samples: int | None = None
    speedup: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    rate: float | None = None
    rate_unit: str | None = None
    note: str | None = None
    run: Run | None = None

    @property
    def predicted(self) -> bool:
        """A static-model prediction, not a measurement."""
        return self.source == "static"


# ---------------------------------------------------------------------------------------------
# Reading results files
# ---------------------------------------------------------------------------------------------


def load(path: str | Path) -> dict[str, Any]:
    """A results file's JSON object."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top level is {type(obj).__name__}, expected an object")
    return obj


def kind(obj: dict[str, Any]) -> str:
    """``"bench"``, ``"quick"`` or ``"static"``: which results file ``obj`` is (ValueError if
    none of them)."""
    rows = obj.get("rows")
    meta = obj.get("meta")
    if not isinstance(rows, list) or not isinstance(meta, dict):
        raise ValueError("not a results file: no 'meta' object and 'rows' list")
    schema = obj.get("schema")
    if schema == 1:
        return "bench"
    if isinstance(schema, str) and schema.startswith("quick"):
        return "quick"
    if "model" in meta and all(isinstance(r, dict) and "predicted_us" in r for r in rows):
        return "static"
    raise ValueError(f"not a results file this converter knows (schema {schema!r})")


def measurements(obj: dict[str, Any], file: str = "") -> list[Measurement]:
    """Every time in a results object, in file order (``file`` names it in the outputs)."""
    k = kind(obj)
    meta = obj["meta"]
    if k == "bench":
        return [_bench(r, _run(meta, file)) for r in obj["rows"]]
    if k == "quick":
        run = _run(meta, file)
        return [m for r in obj["rows"] for m in _quick(r, run)]
    model = meta.get("model") or {}
    run = Run(file=file, date=meta.get("date"), device=str(model.get("gpu", "unknown")),
              backend="cuda", torch=meta.get("torch"), triton=meta.get("triton"),
              git_sha=meta.get("git_sha"))
    return [m for r in obj["rows"] for m in _static(r, run)]


def read(paths: Iterable[str | Path]) -> list[Measurement]:
    """:func:`measurements` of every file, in order."""
    out: list[Measurement] = []
    for p in paths:
        out.extend(measurements(load(p), Path(p).name))
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _dtype(v: Any) -> str:
    s = str(v).removeprefix("torch.")
    return DTYPE_NAMES.get(s, s)


def _run(meta: dict[str, Any], file: str) -> Run:
    mem = _num(meta.get("memory_gib"))
    return Run(file=file, date=meta.get("date"), device=str(meta.get("device", "unknown")),
               backend=str(meta.get("backend", "")), torch=meta.get("torch"),
               triton=meta.get("triton"), git_sha=meta.get("git_sha"), host=meta.get("host"),
               cpu_threads=_int(meta.get("cpu_threads")), gpu_memory_gib=mem)


def _bench(r: dict[str, Any], run: Run) -> Measurement:
    e2e = r.get("e2e") if isinstance(r.get("e2e"), dict) else None
    shape = tuple((str(k), int(v)) for k, v in (r.get("shape") or {}).items())
    return Measurement(
        source="e2e" if e2e is not None else "bench", kernel=str(r["kernel"]),
        provider=str(r["provider"]), mode=str(e2e.get("mode") or "") if e2e else "",
        shape=shape, dtype=_dtype(r.get("dtype")), median_us=_num(r.get("median_us")),
        p20_us=_num(r.get("p20_us")), p80_us=_num(r.get("p80_us")),
        samples=_int(r.get("samples")), speedup=_num(r.get("speedup_vs_dense")),
        tflops=_num(r.get("tflops")), gbps=_num(r.get("gbps")),
        rate=_num(e2e.get("rate")) if e2e else None,
        rate_unit=str(e2e["rate_unit"]) if e2e and e2e.get("rate_unit") else None,
        note=r.get("note"), run=run)


def _quick(r: dict[str, Any], run: Run) -> list[Measurement]:
    shape = tuple((k, int(r[k])) for k in ("M", "N", "K") if _int(r.get(k)) is not None)
    ok = r.get("status") == "ok"
    out = []
    for mode, key in (("eager", "eager"), ("cuda-graph", "graph")):
        if key == "graph" and r.get("graph_status") not in (None, "ok"):
            continue
        med = _num(r.get(f"{key}_us")) if ok else None
        if key == "graph" and med is None:
            continue
        out.append(Measurement(
            source="quick", kernel=str(r["case"]), provider=str(r["provider"]), mode=mode,
            shape=shape, dtype=_dtype(r.get("dtype")), median_us=med,
            p20_us=_num(r.get(f"{key}_p20_us")) if med is not None else None,
            p80_us=_num(r.get(f"{key}_p80_us")) if med is not None else None,
            samples=_int(r.get(f"{key}_samples")), speedup=_num(r.get(f"speedup_{key}")),
            note=r.get("note"), run=run))
    return out


def _static(r: dict[str, Any], run: Run) -> list[Measurement]:
    shape = tuple((k, int(r[k])) for k in ("M", "N", "K") if _int(r.get(k)) is not None)
    common = dict(source="static", kernel=str(r["config"]), mode="predicted", shape=shape,
                  dtype=_dtype(r.get("dtype")), run=run)
    out = [Measurement(provider="ours", median_us=_num(r.get("predicted_us")),
                       speedup=_num(r.get("predicted_speedup_vs_baseline")),
                       note=f"kernel {r.get('kernel')}", **common)]
    if _num(r.get("predicted_baseline_us")) is not None:
        out.append(Measurement(provider=str(r.get("baseline") or "baseline"),
                               median_us=_num(r.get("predicted_baseline_us")), speedup=1.0,
                               **common))
    return out


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000.0


def _unix(date: str | None) -> int | None:
    if not date:
        return None
    d = _dt.datetime.fromisoformat(date)
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return int(d.timestamp())


def _utc_text(date: str | None) -> str:
    if not date:
        return ""
    d = _dt.datetime.fromisoformat(date)
    if d.tzinfo is not None:
        d = d.astimezone(_dt.timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M:%S")


def x_axis(shape: Sequence[tuple[str, int]]) -> tuple[str, ...]:
    """The x dimensions of a shape: the first of :data:`X_NAMES` it has, else all of them."""
    names = [k for k, _ in shape]
    for x in X_NAMES:
        if x in names:
            return (x,)
    return tuple(names)


def _shape_text(shape: Iterable[tuple[str, int]]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape)


def _line(m: Measurement, modes: set[str]) -> str:
    """The provider's line label: with its mode where the table has more than one mode."""
    return f"{m.provider} [{m.mode}]" if m.mode and len(modes) > 1 else m.provider


# ---------------------------------------------------------------------------------------------
# PyTorch OSS benchmark database (v3)
# ---------------------------------------------------------------------------------------------


def _strs(d: dict[str, Any]) -> dict[str, str]:
    """An ``extra_info`` map: ``Map(String, String)`` in the v3 table; ``None`` values left out."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items() if v is not None}


def _runner(run: Run) -> dict[str, Any]:
    r: dict[str, Any] = {"name": run.backend, "type": run.device}
    if run.host:
        r["cpu_info"] = run.host
    if run.cpu_threads is not None:
        r["cpu_count"] = run.cpu_threads
    if run.backend == "cuda":
        r["gpu_info"] = run.device
        if run.gpu_memory_gib is not None:
            r["avail_gpu_mem_in_gb"] = int(run.gpu_memory_gib)
    r["extra_info"] = {}
    return r


def _dependencies(run: Run) -> dict[str, Any]:
    deps: dict[str, Any] = {}
    if run.torch:
        deps["pytorch"] = {"repo": "pytorch/pytorch", "version": run.torch, "extra_info": {}}
    if run.triton:
        deps["triton"] = {"repo": "triton-lang/triton", "version": run.triton, "extra_info": {}}
    if run.git_sha:
        deps["compress_ops"] = {"sha": run.git_sha, "extra_info": {}}
    return deps


def oss_v3_records(ms: Iterable[Measurement]) -> list[dict[str, Any]]:
    """One v3 record per metric of every measurement with a time (module docstring)."""
    out: list[dict[str, Any]] = []
    for m in ms:
        if m.median_us is None:
            continue
        run = m.run or Run("", None, "unknown", "", None, None, None)
        shape = dict(m.shape)
        benchmark = {
            "name": OSS_BENCHMARK_NAMES[m.source], "mode": "inference", "dtype": m.dtype,
            "extra_info": _strs({"device": run.device, "backend": run.backend,
                                 "mode": m.mode or None, "results_file": run.file or None}),
        }
        model = {
            "name": f"{m.kernel} {_shape_text(m.shape)}".strip(),
            "type": {"e2e": "end-to-end model"}.get(m.source, "compressed layer"),
            "backend": m.provider, "origins": ["compress_ops"],
            "extra_info": _strs({"kernel": m.kernel, "shape": shape, "note": m.note}),
        }
        pre = "predicted_" if m.predicted else ""
        metrics: list[tuple[str, float, dict[str, Any]]] = [
            (f"{pre}latency_ms", _ms(m.median_us), {"unit": "ms", "statistic": "median",
                                                    "samples": m.samples}),
        ]
        if m.p20_us is not None:
            metrics.append(("latency_p20_ms", _ms(m.p20_us), {"unit": "ms", "quantile": "0.2"}))
        if m.p80_us is not None:
            metrics.append(("latency_p80_ms", _ms(m.p80_us), {"unit": "ms", "quantile": "0.8"}))
        if m.speedup is not None:
            metrics.append((f"{pre}speedup" if pre else "speedup_vs_dense", m.speedup,
                            {"unit": "x"}))
        if m.tflops is not None:
            metrics.append(("tflops", m.tflops, {"unit": "TFLOP/s"}))
        if m.gbps is not None:
            metrics.append(("gbps", m.gbps, {"unit": "GB/s"}))
        if m.rate is not None and m.rate_unit:
            name = m.rate_unit.replace("/", "_per_")
            metrics.append((name, m.rate, {"unit": m.rate_unit}))
        for name, value, info in metrics:
            rec: dict[str, Any] = {
                "benchmark": benchmark, "model": model,
                "metric": {"name": name, "benchmark_values": [value], "extra_info": _strs(info)},
                "runners": [_runner(run)], "dependencies": _dependencies(run),
            }
            ts = _unix(run.date)
            if ts is not None:
                rec["timestamp"] = ts
            out.append(rec)
    return out


def oss_v3_text(records: Sequence[dict[str, Any]], *, json_list: bool = False) -> str:
    """JSON lines (one record a line), or one JSON list (``json_list``, torchao's layout)."""
    if json_list:
        return json.dumps(list(records), indent=2) + "\n"
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------
# Liger-Kernel CSV
# ---------------------------------------------------------------------------------------------


def liger_rows(ms: Iterable[Measurement]) -> list[dict[str, Any]]:
    """One Liger row per measurement with a time (module docstring); p20 / p80 ``""`` when not
    recorded."""
    ms = list(ms)
    modes: dict[tuple, set[str]] = {}
    for m in ms:
        modes.setdefault((m.run.file if m.run else "", m.kernel), set()).add(m.mode)
    out = []
    for m in ms:
        if m.median_us is None:
            continue
        run = m.run or Run("", None, "unknown", "", None, None, None)
        xs = x_axis(m.shape)
        shape = dict(m.shape)
        x_name = ",".join(xs)
        x_value: Any = shape[xs[0]] if len(xs) == 1 else ",".join(str(shape[x]) for x in xs)
        extra = {k: v for k, v in m.shape if k not in xs}
        extra["dtype"] = m.dtype
        if m.mode:
            extra["mode"] = m.mode
        out.append({
            "kernel_name": m.kernel,
            "kernel_provider": _line(m, modes[(run.file, m.kernel)]),
            "kernel_operation_mode": "forward",
            "metric_name": "predicted_speed" if m.predicted else "speed",
            "metric_unit": "ms",
            "x_name": x_name,
            "x_label": X_LABELS.get(x_name, x_name),
            "x_value": x_value,
            "y_value_50": _ms(m.median_us),
            "y_value_20": "" if m.p20_us is None else _ms(m.p20_us),
            "y_value_80": "" if m.p80_us is None else _ms(m.p80_us),
            "extra_benchmark_config_str": json.dumps(extra),
            "gpu_name": run.device,
            "timestamp": _utc_text(run.date),
            "liger_version": "",
        })
    return out


def liger_csv_text(rows: Iterable[dict[str, Any]]) -> str:
    """The CSV text of :func:`liger_rows` (header first; ``csv`` defaults, as Liger's writer)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LIGER_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Triton perf_report CSVs
# ---------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")
    return s or "x"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def triton_tables(ms: Iterable[Measurement]) -> dict[str, str]:
    """``{"<input stem>/<plot_name>.csv": text}``: Triton ``perf_report`` CSVs (module
    docstring). Two times for one cell raise ``ValueError``."""
    groups: dict[tuple, list[Measurement]] = {}
    for m in ms:
        xs = x_axis(m.shape)
        fixed = tuple((k, v) for k, v in m.shape if k not in xs)
        key = (m.run.file if m.run else "", m.kernel, m.dtype, xs, fixed)
        groups.setdefault(key, []).append(m)
    out: dict[str, str] = {}
    for (file, kernel, dtype, xs, fixed), group in groups.items():
        modes = {m.mode for m in group}
        lines: list[str] = []
        cells: dict[tuple[tuple[int, ...], str], Measurement] = {}
        for m in group:
            line = _line(m, modes)
            if line not in lines:
                lines.append(line)
            x = tuple(dict(m.shape)[k] for k in xs)
            if (x, line) in cells:
                raise ValueError(f"{file}: two times for {kernel} {dtype} {line} at "
                                 f"{dict(zip(xs, x, strict=True))}")
            cells[(x, line)] = m
        quantiles = any(m.p20_us is not None or m.p80_us is not None for m in group)
        header = list(xs) + [f"{ln} ({TRITON_YLABEL})" for ln in lines]
        if quantiles:
            header += [f"{ln}-min ({TRITON_YLABEL})" for ln in lines]
            header += [f"{ln}-max ({TRITON_YLABEL})" for ln in lines]
        body = []
        for x in sorted({x for x, _ in cells}):
            got = [cells.get((x, ln)) for ln in lines]
            row = [_fmt(float(v)) for v in x]
            row += [_fmt(_ms(c.median_us) if c else None) for c in got]
            if quantiles:
                row += [_fmt(_ms(c.p20_us) if c else None) for c in got]
                row += [_fmt(_ms(c.p80_us) if c else None) for c in got]
            body.append(row)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(body)
        plot = "-".join([_slug(kernel), dtype] + [f"{k}{v}" for k, v in fixed])
        stem = Path(file).stem or "results"
        name = f"{stem}/{plot}.csv"
        if name in out:
            raise ValueError(f"two tables named {name}")
        out[name] = buf.getvalue()
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Writing and the CLI
# ---------------------------------------------------------------------------------------------


def convert(paths: Sequence[str | Path], fmt: str, out: str | Path) -> list[Path]:
    """Convert results files to ``fmt`` (one of :data:`FORMATS`) at ``out`` (a file; a folder
    for ``triton-csv``); returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    ms = read(paths)
    out = Path(out)
    if fmt == "triton-csv":
        written = []
        for name, text in triton_tables(ms).items():
            p = out / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            written.append(p)
        return written
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "oss-v3":
        text = oss_v3_text(oss_v3_records(ms), json_list=out.suffix == ".json")
        out.write_text(text)
    else:
        with open(out, "w", newline="") as f:
            f.write(liger_csv_text(liger_rows(ms)))
    return [out]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m compress_ops.integrations.dashboards --to FORMAT FILE... -o OUT``."""
    ap = argparse.ArgumentParser(
        prog="python -m compress_ops.integrations.dashboards",
        description="Convert results files (perf/results/*.json) for other dashboards: the "
                    "PyTorch OSS benchmark database v3 (JSON lines; a .json OUT gets a list), "
                    "Liger-Kernel's benchmark CSV, Triton perf_report CSVs (OUT: a folder).")
    ap.add_argument("--to", required=True, choices=FORMATS, help="output format")
    ap.add_argument("files", nargs="+", metavar="FILE", help="results files to convert")
    ap.add_argument("-o", "--out", required=True, help="output file (triton-csv: a folder)")
    args = ap.parse_args(argv)
    try:
        written = convert(args.files, args.to, args.out)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
