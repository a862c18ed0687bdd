"""The results schema: rows, measured peaks, the file header, results files and their checks.

One results file per run:

    <results dir>/<YYYY-MM-DD>-<device-slug>.json
    {"schema": 1, "meta": {device, backend, torch, triton, git_sha, date, peaks, ...},
     "rows": [{kernel, provider, shape, dtype, median_us, tflops, gbps, pct_peak, peak_kind,
               speedup_vs_dense, device, torch, triton, git_sha, backend, [samples, note,
               max_rel_err, e2e, p20_us, p80_us]}, ...]}

The results dir is :func:`default_results_dir`: ``perf/results/`` when this package runs from a
source checkout (an editable install included), else ``./perf-results/`` under the current
directory (a regular install has no ``perf/results/`` to write into).

``pct_peak`` is the percentage of a *measured* peak of the machine the row ran on, taken once
per run (:func:`compress_ops.perf.timing.measure_peaks`) and stored in ``meta.peaks``: memory
bandwidth (``peak_kind = "hbm"``; on the CPU this is DRAM bandwidth) or matmul FLOP/s of the
row's dtype (``peak_kind = "flops"``). Which one applies is decided by the roofline: a row whose
arithmetic intensity (FLOPs / minimum bytes) is below the machine's ridge point
(peak FLOP/s / peak B/s) is memory-bound and reported against bandwidth, otherwise against
FLOP/s.

``p20_us`` / ``p80_us`` are the 20th / 80th percentiles of the same samples as ``median_us``
(:func:`compress_ops.perf.timing.time_fn`); rows written before they were recorded, and rows
whose time is not a sample statistic (a decode time is a difference of medians), leave them out.

Rows whose provider could not run keep ``median_us`` and the derived numbers ``null`` and say
why in ``note``.

End-to-end rows (:mod:`compress_ops.perf.bench_e2e`: a whole model, ``kernel`` ``e2e_*``) are
rows of the same schema with one more field, ``e2e``: an object with what a kernel row has no
field for (model, size, config, mode, status, rate and its unit, weight and peak-memory bytes,
...; :data:`E2E_FIELDS` are required in it). Their file header may carry ``meta.e2e`` (the run's
settings and what was skipped and why).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress_ops._validate import is_int, is_number
from compress_ops.perf.machine import (
    PERF_DIR,
    Env,
    backend_name,
    cpu_model,
    device_slug,
    load_avg,
    source_checkout,
)

SCHEMA_VERSION = 1
#: Fields every row must carry (ARCHITECTURE.md "Benchmarking", plus ``peak_kind`` and ``backend``).
ROW_FIELDS: tuple[str, ...] = (
    "kernel",
    "provider",
    "shape",
    "dtype",
    "median_us",
    "tflops",
    "gbps",
    "pct_peak",
    "peak_kind",
    "speedup_vs_dense",
    "device",
    "torch",
    "triton",
    "git_sha",
    "backend",
)
#: Fields a row may carry in addition.
OPTIONAL_ROW_FIELDS: tuple[str, ...] = ("samples", "note", "max_rel_err", "e2e", "p20_us",
                                         "p80_us")
#: Fields that may be ``null`` (a provider that could not run, a missing baseline).
NULLABLE_ROW_FIELDS: frozenset[str] = frozenset(
    {"median_us", "tflops", "gbps", "pct_peak", "peak_kind", "speedup_vs_dense",
     "samples", "note", "max_rel_err", "p20_us", "p80_us"}
)
#: Fields the ``e2e`` object of an end-to-end row must carry (``rate``: tokens/s or images/s,
#: as ``rate_unit`` says; ``null`` when the row did not run, ``status`` then says why not).
E2E_FIELDS: tuple[str, ...] = ("model", "size", "config", "mode", "status", "rate", "rate_unit")
E2E_STATUSES = ("ok", "error", "skipped")
META_FIELDS: tuple[str, ...] = ("device", "backend", "torch", "triton", "git_sha", "date", "peaks")
OPTIONAL_META_FIELDS: tuple[str, ...] = (
    "python", "cuda", "host", "cpu_threads", "argv", "quick", "families", "duration_s",
    "complete", "errors", "load_avg", "e2e",
)
TOP_FIELDS: tuple[str, ...] = ("schema", "meta", "rows")
PEAK_KINDS = ("hbm", "flops")

_STR_FIELDS = ("kernel", "provider", "dtype", "device", "torch", "triton", "git_sha", "backend")
_NUM_FIELDS = ("median_us", "tflops", "gbps", "pct_peak", "speedup_vs_dense", "max_rel_err",
               "p20_us", "p80_us")


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement: a provider running one kernel at one shape and dtype.

    ``shape`` is ``{"M": .., "N": .., "K": ..}`` for linear kernels or the conv geometry
    (``N, C, H, W, Cout, kh, kw, ...``) for conv kernels.
    """

    kernel: str
    provider: str
    shape: dict[str, int]
    dtype: str
    median_us: float | None
    tflops: float | None
    gbps: float | None
    pct_peak: float | None
    peak_kind: str | None
    speedup_vs_dense: float | None
    device: str
    torch: str
    triton: str
    git_sha: str
    backend: str
    samples: int | None = None
    note: str | None = None
    max_rel_err: float | None = None
    e2e: dict[str, Any] | None = None  # end-to-end rows only (module docstring)
    p20_us: float | None = None  # 20th / 80th percentiles of the samples of median_us
    p80_us: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to JSON (optional fields left out when ``None``)."""
        d = asdict(self)
        for k in OPTIONAL_ROW_FIELDS:
            if d[k] is None:
                del d[k]
        return d


@dataclass
class Peaks:
    """Measured peaks of one device: memory bandwidth (GB/s) and matmul TFLOP/s per dtype."""

    hbm_gbps: float | None = None
    flops_tflops: dict[str, float] = field(default_factory=dict)
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in ``meta.peaks``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Peaks:
        """Inverse of :meth:`to_dict`."""
        return cls(d.get("hbm_gbps"), dict(d.get("flops_tflops") or {}), d.get("method", ""))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def make_row(
    *,
    kernel: str,
    provider: str,
    shape: dict[str, int],
    dtype: torch.dtype,
    median_us: float | None,
    flops: float,
    min_bytes: float,
    env: Env,
    peaks: Peaks,
    backend: str,
    samples: int | None = None,
    note: str | None = None,
    max_rel_err: float | None = None,
    p20_us: float | None = None,
    p80_us: float | None = None,
) -> Row:
    """Build a row, deriving TFLOP/s, GB/s and % of peak from the timing and the roofline.

    ``flops`` are dense-equivalent FLOPs of the call and ``min_bytes`` the bytes this provider
    must move at least (its stored weight + activations + output); ``p20_us`` / ``p80_us`` are
    kept only with a timing (:class:`compress_ops.perf.timing.Timing`). ``speedup_vs_dense`` is
    filled in later by :func:`fill_speedups`, once the dense baseline of the case is known.
    """
    tflops = gbps = pct = None
    kind = None
    if median_us is not None and median_us > 0:
        sec = median_us * 1e-6
        tflops = flops / sec / 1e12
        gbps = min_bytes / sec / 1e9
        kind = roofline_kind(flops, min_bytes, dtype, peaks)
        if kind == "hbm" and peaks.hbm_gbps:
            pct = 100.0 * gbps / peaks.hbm_gbps
        elif kind == "flops" and peaks.flops_tflops.get(dtype_name(dtype)):
            pct = 100.0 * tflops / peaks.flops_tflops[dtype_name(dtype)]
        else:
            kind = None
    return Row(
        kernel=kernel, provider=provider, shape=dict(shape), dtype=dtype_name(dtype),
        median_us=median_us, tflops=tflops, gbps=gbps, pct_peak=pct, peak_kind=kind,
        speedup_vs_dense=None, device=env.device, torch=env.torch, triton=env.triton,
        git_sha=env.git_sha, backend=backend, samples=samples, note=note,
        max_rel_err=max_rel_err,
        p20_us=p20_us if median_us is not None else None,
        p80_us=p80_us if median_us is not None else None,
    )


def roofline_kind(flops: float, min_bytes: float, dtype: torch.dtype, peaks: Peaks) -> str:
    """``"hbm"`` when the call is memory-bound on this machine, else ``"flops"``."""
    peak_f = peaks.flops_tflops.get(dtype_name(dtype))
    if not peaks.hbm_gbps or not peak_f:
        return "hbm" if peaks.hbm_gbps else "flops"
    ridge = peak_f * 1e12 / (peaks.hbm_gbps * 1e9)  # FLOP per byte
    return "hbm" if flops / max(min_bytes, 1.0) < ridge else "flops"


def case_key(row: Row | dict[str, Any]) -> tuple:
    """What identifies a case across providers: kernel, shape, dtype, device."""
    d = row.to_dict() if isinstance(row, Row) else row
    return (d["kernel"], tuple(sorted(d["shape"].items())), d["dtype"], d["device"])


def fill_speedups(rows: list[Row], baseline_providers: Iterable[str]) -> None:
    """Set ``speedup_vs_dense = t_dense / t_row`` for every row whose case has a dense time."""
    base = set(baseline_providers)
    dense: dict[tuple, float] = {}
    for r in rows:
        if r.provider in base and r.median_us:
            dense[case_key(r)] = r.median_us
    for r in rows:
        t = dense.get(case_key(r))
        r.speedup_vs_dense = t / r.median_us if (t and r.median_us) else None


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------


def make_meta(device: torch.device, env: Env, peaks: Peaks, **extra: Any) -> dict[str, Any]:
    """The results file header."""
    meta: dict[str, Any] = {
        "device": env.device,
        "backend": backend_name(device),
        "torch": env.torch,
        "triton": env.triton,
        "git_sha": env.git_sha,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "peaks": peaks.to_dict(),
        "python": platform.python_version(),
        "host": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    load = load_avg()
    if load is not None:
        meta["load_avg"] = load
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    meta.update(extra)
    return meta


def default_results_dir() -> Path:
    """Where results files go by default: ``perf/results/`` of the source checkout this package
    runs from, else ``perf-results/`` under the current directory (an installed copy)."""
    if source_checkout() is not None:
        return PERF_DIR / "results"
    return Path.cwd() / "perf-results"


def default_dashboard_dir() -> Path:
    """Where ``dashboard.html`` / ``.png`` go by default: ``perf/`` of the checkout, else the
    default results folder (next to the files they render)."""
    if source_checkout() is not None:
        return PERF_DIR
    return default_results_dir()


def results_path(device_label: str, *, results_dir: Path | None = None,
                 date: _dt.date | None = None) -> Path:
    """``<results_dir>/<YYYY-MM-DD>-<device-slug>.json`` (a rerun the same day overwrites);
    ``results_dir`` defaults to :func:`default_results_dir`."""
    date = date or _dt.date.today()
    results_dir = default_results_dir() if results_dir is None else Path(results_dir)
    return results_dir / f"{date.isoformat()}-{device_slug(device_label)}.json"


def results_object(meta: dict[str, Any], rows: Iterable[Row | dict[str, Any]]
                   ) -> dict[str, Any]:
    """The JSON object of a results file."""
    return {
        "schema": SCHEMA_VERSION,
        "meta": meta,
        "rows": [r.to_dict() if isinstance(r, Row) else r for r in rows],
    }


def write_results(path: Path, meta: dict[str, Any], rows: Iterable[Row | dict[str, Any]]
                  ) -> Path:
    """Write a results file atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = results_object(meta, rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def validate_results(obj: Any) -> list[str]:
    """Problems with a results object: missing/unknown fields, wrong types. Empty when valid.

    Each message names where it is (``meta``, ``row 3 (sparse24_linear/ours)``) so a reader can
    find it; nothing is dropped silently.
    """
    problems: list[str] = []
    if not isinstance(obj, dict):
        return [f"top level is {type(obj).__name__}, expected an object"]
    for k in TOP_FIELDS:
        if k not in obj:
            problems.append(f"missing top-level field {k!r}")
    for k in obj:
        if k not in TOP_FIELDS:
            problems.append(f"unknown top-level field {k!r}")
    if "schema" in obj and obj["schema"] != SCHEMA_VERSION:
        problems.append(f"schema is {obj['schema']!r}, expected {SCHEMA_VERSION}")

    meta = obj.get("meta")
    if "meta" in obj and not isinstance(meta, dict):
        problems.append("meta is not an object")
    elif isinstance(meta, dict):
        problems.extend(_field_problems("meta", meta, META_FIELDS, OPTIONAL_META_FIELDS))

    rows = obj.get("rows")
    if "rows" in obj and not isinstance(rows, list):
        problems.append("rows is not a list")
    elif isinstance(rows, list):
        for i, r in enumerate(rows):
            problems.extend(_validate_row(i, r))
    return problems


def _field_problems(where: str, obj: dict, required, optional) -> list[str]:
    """Missing required and unknown fields of one object, named."""
    out = [f"{where}: missing field {k!r}" for k in required if k not in obj]
    out += [f"{where}: unknown field {k!r}" for k in obj if k not in required and k not in optional]
    return out


def _validate_row(i: int, r: Any) -> list[str]:
    if not isinstance(r, dict):
        return [f"row {i}: is {type(r).__name__}, expected an object"]
    where = f"row {i} ({r.get('kernel', '?')}/{r.get('provider', '?')})"
    out = _field_problems(where, r, ROW_FIELDS, OPTIONAL_ROW_FIELDS)
    for k in _STR_FIELDS:
        if k in r and not isinstance(r[k], str):
            out.append(f"{where}: field {k!r} should be a string, got {r[k]!r}")
    for k in _NUM_FIELDS:
        v = r.get(k)
        if k in r and v is not None and not is_number(v):
            out.append(f"{where}: field {k!r} should be a number or null, got {v!r}")
    for k in ROW_FIELDS:
        if k in r and r[k] is None and k not in NULLABLE_ROW_FIELDS and k not in _STR_FIELDS:
            out.append(f"{where}: field {k!r} is null")
    if "shape" in r and not (
        isinstance(r["shape"], dict) and r["shape"]
        and all(is_int(v) for v in r["shape"].values())
    ):
        out.append(f"{where}: shape should be a non-empty object of integers, got {r['shape']!r}")
    if r.get("peak_kind") is not None and r["peak_kind"] not in PEAK_KINDS:
        out.append(f"{where}: peak_kind should be one of {PEAK_KINDS}, got {r['peak_kind']!r}")
    if "e2e" in r:
        out.extend(_validate_e2e(where, r["e2e"]))
    return out


def _validate_e2e(where: str, e: Any) -> list[str]:
    """Problems with the ``e2e`` object of an end-to-end row."""
    if not isinstance(e, dict):
        return [f"{where}: e2e should be an object, got {e!r}"]
    out = [f"{where}: e2e: missing field {k!r}" for k in E2E_FIELDS if k not in e]
    for k in ("model", "size", "config", "mode", "rate_unit"):
        if k in e and not isinstance(e[k], str):
            out.append(f"{where}: e2e: field {k!r} should be a string, got {e[k]!r}")
    if "status" in e and e["status"] not in E2E_STATUSES:
        out.append(f"{where}: e2e: status should be one of {E2E_STATUSES}, got {e['status']!r}")
    rate = e.get("rate")
    if rate is not None and not is_number(rate):
        out.append(f"{where}: e2e: rate should be a number or null, got {rate!r}")
    if e.get("status") == "ok" and not (is_number(rate) and rate > 0):
        out.append(f"{where}: e2e: status ok without a positive rate")
    if e.get("status") in ("error", "skipped") and not e.get("error"):
        out.append(f"{where}: e2e: status {e['status']} without an error saying why")
    return out


def load_results(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Read and validate one results file: ``(object or None, problems)``."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return None, [f"cannot read: {e}"]
    return obj, validate_results(obj)
