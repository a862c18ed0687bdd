"""Shared benchmark machinery: the result-row schema, timing, measured peaks, results files.

Every kernel family's ``perf/bench_<family>.py`` builds its rows with :func:`make_row`, times
with :func:`time_fn` and lets ``perf/bench.py`` write one results file per run:

    perf/results/<YYYY-MM-DD>-<device-slug>.json
    {"schema": 1, "meta": {device, backend, torch, triton, git_sha, date, peaks, ...},
     "rows": [{kernel, provider, shape, dtype, median_us, tflops, gbps, pct_peak, peak_kind,
               speedup_vs_dense, device, torch, triton, git_sha, backend, [samples, note,
               max_rel_err]}, ...]}

Timing: on CUDA ``triton.testing.do_bench`` (L2 flushed before every run, CUDA-event timed, the
median of all samples, at least :data:`MIN_SAMPLES`); on the CPU a ``time.perf_counter`` loop,
median of at least :data:`MIN_SAMPLES` runs (fewer, down to :data:`MIN_SAMPLES_SLOW`, for very
slow cases; the count is recorded in ``samples``).

``pct_peak`` is the percentage of a *measured* peak of the machine the row ran on, taken once
per run and stored in ``meta.peaks``: a large device-to-device copy for memory bandwidth
(``peak_kind = "hbm"``; on the CPU this is DRAM bandwidth) and a large matmul of the row's dtype
for FLOP/s (``peak_kind = "flops"``). Which one applies is decided by the roofline: a row whose
arithmetic intensity (FLOPs / minimum bytes) is below the machine's ridge point
(peak FLOP/s / peak B/s) is memory-bound and reported against bandwidth, otherwise against
FLOP/s.

Rows whose provider could not run keep ``median_us`` and the derived numbers ``null`` and say
why in ``note``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
PERF_DIR = Path(__file__).resolve().parent
REPO_ROOT = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"

MIN_SAMPLES = 50
MIN_SAMPLES_SLOW = 10

#: Fields every row must carry (DESIGN.md "Performance", plus ``peak_kind`` and ``backend``).
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
OPTIONAL_ROW_FIELDS: tuple[str, ...] = ("samples", "note", "max_rel_err")
#: Fields that may be ``null`` (a provider that could not run, a missing baseline).
NULLABLE_ROW_FIELDS: frozenset[str] = frozenset(
    {"median_us", "tflops", "gbps", "pct_peak", "peak_kind", "speedup_vs_dense",
     "samples", "note", "max_rel_err"}
)
META_FIELDS: tuple[str, ...] = ("device", "backend", "torch", "triton", "git_sha", "date", "peaks")
OPTIONAL_META_FIELDS: tuple[str, ...] = (
    "python", "cuda", "host", "cpu_threads", "argv", "quick", "families", "duration_s",
    "complete", "errors", "load_avg",
)
TOP_FIELDS: tuple[str, ...] = ("schema", "meta", "rows")
PEAK_KINDS = ("hbm", "flops")

_STR_FIELDS = ("kernel", "provider", "dtype", "device", "torch", "triton", "git_sha", "backend")
_NUM_FIELDS = ("median_us", "tflops", "gbps", "pct_peak", "speedup_vs_dense", "max_rel_err")


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


@dataclass
class Env:
    """What a row says about where it ran."""

    device: str
    torch: str
    triton: str
    git_sha: str


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


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
) -> Row:
    """Build a row, deriving TFLOP/s, GB/s and % of peak from the timing and the roofline.

    ``flops`` are dense-equivalent FLOPs of the call and ``min_bytes`` the bytes this provider
    must move at least (its stored weight + activations + output). ``speedup_vs_dense`` is
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
# Environment
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """GPU name (``"NVIDIA H200"``) or ``"cpu: <model>"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}"


def device_slug(name: str) -> str:
    """File-name form of a device name: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    s = re.sub(r"\((r|tm|c)\)", "", name.lower())
    s = re.sub(r"\b(cpu|processor)\b", "", s) if s.startswith("cpu:") else s
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    s = "cpu-" + s if name.lower().startswith("cpu") else s
    return s[:60].strip("-") or "unknown"


def git_sha(repo: Path = REPO_ROOT) -> str:
    """Short commit of ``repo`` (``+dirty`` when the tree has changes), else ``"unknown"``.

    ``COMPRESS_OPS_GIT_SHA`` overrides (a checkout copied without ``.git``, e.g. a GPU box).
    """
    env = os.environ.get("COMPRESS_OPS_GIT_SHA")
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "") if sha else "unknown"


def triton_version() -> str:
    """Triton's version, or ``"none"`` when it is not importable."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "none"
    return triton.__version__


def backend_name(device: torch.device) -> str:
    """``"cuda"`` or ``"cpu"``: the machine kind stored in ``meta.backend``."""
    return "cuda" if device.type == "cuda" else "cpu"


def make_env(device: torch.device) -> Env:
    """Collect device name, versions and commit once per run."""
    return Env(device=device_name(device), torch=torch.__version__, triton=triton_version(),
               git_sha=git_sha())


def load_avg() -> list[float] | None:
    """1-, 5- and 15-minute load averages (CPU timings are only as good as the machine was
    quiet), or ``None`` where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


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


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Median time of a callable and how many samples it came from."""

    median_us: float
    samples: int


def time_fn(fn: Callable[[], Any], device: torch.device, *, max_seconds: float = 3.0,
            rep_ms: int = 100, warmup_ms: int = 25) -> Timing:
    """Median time of ``fn()`` on ``device``.

    CUDA: ``triton.testing.do_bench`` with ``return_mode="all"`` (L2 flushed before each run);
    ``rep_ms`` is raised until at least :data:`MIN_SAMPLES` samples are taken.
    CPU: ``time.perf_counter`` around each call, :data:`MIN_SAMPLES` runs, or as many as fit in
    ``max_seconds`` when a run is slow (never fewer than :data:`MIN_SAMPLES_SLOW`).
    """
    if device.type == "cuda":
        return _time_cuda(fn, rep_ms=rep_ms, warmup_ms=warmup_ms)
    return _time_cpu(fn, max_seconds=max_seconds)


def _time_cuda(fn: Callable[[], Any], *, rep_ms: int, warmup_ms: int) -> Timing:
    from triton.testing import do_bench

    rep = rep_ms
    times: list[float] = []
    for _ in range(4):
        try:
            out = do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="all")
        except (AssertionError, TypeError, ValueError):  # an old Triton without "all"
            med = do_bench(fn, warmup=warmup_ms, rep=max(rep, 500), return_mode="median")
            return Timing(median_us=float(med) * 1e3, samples=-1)
        times = [float(t) for t in (out.tolist() if hasattr(out, "tolist") else out)]
        if len(times) >= MIN_SAMPLES:
            break
        # do_bench sizes the sample count from a 5-run estimate: scale rep up to reach 50+.
        per = max(statistics.median(times), 1e-3)
        rep = int(max(rep * 2, per * MIN_SAMPLES * 1.5 + 1))
    return Timing(median_us=statistics.median(times) * 1e3, samples=len(times))


def _time_cpu(fn: Callable[[], Any], *, max_seconds: float) -> Timing:
    t0 = time.perf_counter()
    fn()  # warm-up (first-call allocations, lazy init)
    first = time.perf_counter() - t0
    if first * 4 < max_seconds:
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        n = len(times)
        if n >= MIN_SAMPLES:
            break
        if n >= MIN_SAMPLES_SLOW and time.perf_counter() - t_start > max_seconds:
            break
    return Timing(median_us=statistics.median(times) * 1e6, samples=len(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_bandwidth(device: torch.device, *, nbytes: int | None = None) -> float:
    """Measured memory bandwidth in GB/s: a large device-to-device copy, bytes = 2 * size.

    1 GiB on CUDA (far beyond L2), 256 MiB on the CPU (beyond the last-level cache). On the CPU
    a copy also pays write-allocate traffic that the 2 * size count does not see, so there the
    result is the larger of the copy and a read-only pass (a sum, bytes = size): memory-bound
    CPU kernels mostly read.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, max_seconds=2.0)
    gbps = 2 * src.numel() * 4 / (t.median_us * 1e-6) / 1e9
    if device.type == "cpu":
        t_read = time_fn(lambda: src.sum(), device, max_seconds=2.0)
        gbps = max(gbps, src.numel() * 4 / (t_read.median_us * 1e-6) / 1e9)
    return gbps


def measure_peak_flops(device: torch.device, dtype: torch.dtype, *, size: int | None = None
                       ) -> float:
    """Measured matmul TFLOP/s of ``dtype``: a square ``size``-cubed matmul (8192 on CUDA)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    out = torch.empty(size, size, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=out), device, max_seconds=3.0)
    return 2 * size**3 / (t.median_us * 1e-6) / 1e12


def measure_peaks(device: torch.device, dtypes: Iterable[torch.dtype], *, quick: bool = False
                  ) -> Peaks:
    """Bandwidth and per-dtype matmul peaks, measured once per run (smaller when ``quick``)."""
    if quick:
        nbytes = 64 << 20
        size = 2048 if device.type == "cuda" else 512
    else:
        nbytes, size = None, None
    hbm = measure_peak_bandwidth(device, nbytes=nbytes)
    flops = {dtype_name(d): measure_peak_flops(device, d, size=size) for d in dtypes}
    nb = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    sz = size or (8192 if device.type == "cuda" else 1024)
    how = "copy" if device.type == "cuda" else "max(copy, read-only sum)"
    method = (f"{how} of {nb >> 20} MiB (copy bytes = 2 x size); square matmul {sz}^3; "
              f"{'do_bench median' if device.type == 'cuda' else 'perf_counter median'}")
    _sync(device)
    return Peaks(hbm_gbps=hbm, flops_tflops=flops, method=method)


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------


def results_path(device_label: str, *, results_dir: Path = RESULTS_DIR,
                 date: _dt.date | None = None) -> Path:
    """``<results_dir>/<YYYY-MM-DD>-<device-slug>.json`` (a rerun the same day overwrites)."""
    date = date or _dt.date.today()
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
        if k in r and v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            out.append(f"{where}: field {k!r} should be a number or null, got {v!r}")
    for k in ROW_FIELDS:
        if k in r and r[k] is None and k not in NULLABLE_ROW_FIELDS and k not in _STR_FIELDS:
            out.append(f"{where}: field {k!r} is null")
    if "shape" in r and not (
        isinstance(r["shape"], dict) and r["shape"]
        and all(isinstance(v, int) and not isinstance(v, bool) for v in r["shape"].values())
    ):
        out.append(f"{where}: shape should be a non-empty object of integers, got {r['shape']!r}")
    if r.get("peak_kind") is not None and r["peak_kind"] not in PEAK_KINDS:
        out.append(f"{where}: peak_kind should be one of {PEAK_KINDS}, got {r['peak_kind']!r}")
    return out


def load_results(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Read and validate one results file: ``(object or None, problems)``."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return None, [f"cannot read: {e}"]
    return obj, validate_results(obj)


# ---------------------------------------------------------------------------------------------
# Helpers for the family benchmarks
# ---------------------------------------------------------------------------------------------


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` in fp32."""
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def time_provider(fn: Callable[[], torch.Tensor], x: torch.Tensor, ref: torch.Tensor,
                   time_it: Callable[[Callable[[], object]], Timing], *, provider: str,
                   backend: str, note: str | None, min_bytes: float, dtype: torch.dtype,
                   **common) -> Row:
    """Check one call against the dense result, then time it; errors become a null row."""
    try:
        y = fn()[: x.shape[0]]
        err = rel_err(y, ref)
        if not err <= TOL[dtype]:
            note = f"{note}; MISMATCH vs dense: rel err {err:.3g}" if note else "MISMATCH"
        t = time_it(fn)
    except Exception as ex:  # noqa: BLE001 - a failing provider must not stop the run
        msg = f"error: {type(ex).__name__}: {ex}"[:300]
        return make_row(provider=provider, median_us=None, min_bytes=min_bytes,
                               backend=backend, dtype=dtype,
                               note=f"{note}; {msg}" if note else msg, **common)
    return make_row(provider=provider, median_us=t.median_us, min_bytes=min_bytes,
                           backend=backend, dtype=dtype, samples=t.samples, note=note,
                           max_rel_err=err, **common)


def logged(log: Callable[[str], None], row: Row) -> Row:
    s = row.shape
    t = f"{row.median_us:10.1f} us" if row.median_us is not None else "         - us"
    gb = f"{row.gbps:8.1f} GB/s" if row.gbps is not None else ""
    log(f"  {row.kernel} {row.provider:<30} M={s['M']:<5} N={s['N']:<6} K={s['K']:<6} "
        f"{row.dtype:<9} {t} {gb}  {row.note or ''}")
    return row
