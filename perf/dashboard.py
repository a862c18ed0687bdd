"""Render every results file into ``dashboard.html`` and ``dashboard.png``.

    python -m compress_ops dashboard [--results-dir DIR] [--out-dir DIR] [--strict]
    python -m compress_ops.perf.dashboard [same options]
    python -m compress_ops bench --dashboard

Defaults: from a source checkout, ``perf/results/`` in and ``perf/`` out; from an installed
copy, ``./perf-results/`` in and out (where ``python -m compress_ops bench`` writes there).

Inputs, by kind (every ``*.json`` of the folder):

- benchmark files (schema 1: ``perf/bench*.py``, ``perf/cpu_lowbit.py``): rows with kernel,
  provider, shape, speedup_vs_dense; validated by :mod:`compress_ops.perf.schema`;
- the static performance model's predictions, ``static-triton<version>.json``
  (``perf/static_perf.py``: family, config, M, N, K, dtype, predicted_speedup; the GPU is
  ``meta.model.gpu``);
- the quick GPU check's files, ``<date>-quick-<device>.json`` (``perf/quick_check.py``, schema
  ``quick-1``: case, M, provider, speedup_eager, speedup_graph). A file named
  ``<date>-quick-<tag>-<device>.json`` is an experiment (a patch measured and not kept,
  ``perf/experiments/``): listed, left out of the headline and the plots, since it measures code
  that is not in the tree;
- not rendered, listed with the reason: ``perf/gpu_diag.py``'s diagnostic rows
  (``*-diag*-*.json``) and the accuracy runs of ``perf/one_shot_bert.py`` (rows with a
  ``section`` and a ``label``, no ``schema``).

The HTML starts with the headline table: one row per (device, family, config), speedup vs
dense at M = 1 / 16 / 2048, measured where measured (the quick check's CUDA-graph replay on a
GPU, the benchmark's median on a CPU) with the static model's prediction next to it, and the
prediction alone, marked "predicted", where nothing was measured (:func:`headline_rows`). Then
one section per device (a heading, its picture, and on a GPU the predicted-vs-measured table
of every (config, M) with both Tritons' predictions), the problems (every file or row with
missing or unknown fields; such rows are still shown as far as their fields allow), a summary
per (kernel, device, commit, provider, dtype) of where it wins and loses, the files with their
measured peaks, and a table of all benchmark rows.

The pictures: ``dashboard-<device slug>.png`` per device, and ``dashboard.png``, all devices'
blocks stacked in one picture. A device's block has one plot of speedup vs dense over M per
family of the quick check / static model (colour: config; solid: measured, dashed: predicted)
and one per (kernel, shape without M, dtype) of its benchmark files (a line per (provider,
backend, commit)); the y axis is logarithmic, dense = 1, legends sit right of their plot.
% of the measured peak is in the table of all rows.

End-to-end rows (``perf/bench_e2e.py``: rows with an ``e2e`` object, files
``<date>-<device>-e2e.json``) get their own table, "End to end", one line per (model, size,
config, mode): tokens/s or images/s, speedup against the dense (unfused) row of the same mode,
weight and peak-memory bytes, the output check, and why a row did not run. They are left out of
the kernel summary, the headline and the plots (whose axis is a kernel's M), and shown in the
table of all rows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress_ops._validate import is_number
from compress_ops.perf import schema

#: Providers that are the dense baseline (speedup 1 by definition; drawn as a reference line).
BASELINE_PROVIDERS = frozenset({"cublas-dense", "dense"})

#: The M columns of the headline table.
HEADLINE_MS = (1, 16, 2048)

#: family key -> the headline's name, in the headline's order.
FAMILIES = {"dequant": "low-bit", "sparse24": "2:4", "lowrank": "low rank",
            "dwsep_conv": "dwsep conv", "w8a8": "w8a8"}

#: benchmark kernel -> family key
KERNEL_FAMILY = {"dequant_linear": "dequant", "sparse24_linear": "sparse24",
                 "lowrank_linear": "lowrank", "dwsep_conv2d": "dwsep_conv",
                 "w8a8_linear": "w8a8"}

#: Provider suffixes of alternative routes (shown in the plots, not the headline).
_ALT_ROUTES = ("-dequant", "-dense-cache", "-gemv")

#: Dtype preference for the headline's shape (the GPU headline is fp16).
_DTYPE_ORDER = ("fp16", "float16", "bfloat16", "bf16", "float32", "fp32")


@dataclass
class Loaded:
    """All results files of a folder: rows tagged with their file, and every problem found.

    ``files``/``rows``: benchmark files; ``static``: (name, meta, rows) of the static model;
    ``quick``: (name, meta, rows, experiment tag or None) of the quick GPU check;
    ``skipped``: (name, why) of files listed but not rendered."""

    files: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, meta)
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, message)
    static: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = field(default_factory=list)
    quick: list[tuple[str, dict[str, Any], list[dict[str, Any]], str | None]] = field(
        default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: a quick file's own ``predicted_vs_measured`` section, by file name
    pvm: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


STATIC_FILES = "static-triton*.json"
QUICK_FILES = "*-quick-*.json"
#: not rendered: perf/gpu_diag.py's diagnostic rows (the accuracy runs are told by content)
OTHER_FILES = ("*-diag*-*.json",)


def device_slug(device: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``; ``"cpu: AMD EPYC"`` -> ``"cpu-amd-epyc"``."""
    s = re.sub(r"\((r|tm)\)|processor|cpu\(s\)", "", device.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def _read_json(path: Path, out: Loaded) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        out.problems.append((path.name, f"cannot read: {e}"))
        return None


def _meta_rows(obj: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    rows = obj.get("rows") if isinstance(obj.get("rows"), list) else []
    return meta, [r for r in rows if isinstance(r, dict)]


def _load_static(path: Path, out: Loaded) -> None:
    obj = _read_json(path, out)
    if obj is None:
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        out.problems.append((path.name, "not a static-model file (no rows list)"))
        return
    meta, rows = _meta_rows(obj)
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if not isinstance(model.get("gpu"), str):
        out.problems.append((path.name, "meta.model.gpu missing: the GPU is unknown"))
    for i, r in enumerate(rows):
        missing = [k for k in ("family", "config", "M", "N", "K", "dtype") if k not in r]
        if missing:
            out.problems.append((path.name, f"row {i}: missing {', '.join(missing)}"))
        elif _num(r.get("predicted_speedup")) is None:
            out.problems.append((path.name, f"row {i} ({r['config']} M={r['M']}): "
                                            "no predicted_speedup"))
    out.static.append((path.name, meta, rows))


def _load_quick(path: Path, out: Loaded) -> None:
    obj = _read_json(path, out)
    if obj is None:
        return
    if not isinstance(obj, dict) or obj.get("schema") != "quick-1":
        out.problems.append((path.name, "not a quick-check file (schema is not 'quick-1')"))
        return
    meta, rows = _meta_rows(obj)
    device = meta.get("device")
    if not isinstance(device, str):
        out.problems.append((path.name, "meta.device missing"))
        device = "?"
    for i, r in enumerate(rows):
        missing = [k for k in ("case", "M", "N", "K", "dtype", "provider") if k not in r]
        if missing:
            out.problems.append((path.name, f"row {i}: missing {', '.join(missing)}"))
    m = re.match(r"\d{4}-\d\d-\d\d-quick-(.+)\.json$", path.name)
    tag = None
    if m and m.group(1) != device_slug(device) and m.group(1).endswith(device_slug(device)):
        tag = m.group(1)[: -len(device_slug(device))].strip("-") or None
    out.quick.append((path.name, meta, rows, tag))
    pvm = obj.get("predicted_vs_measured")
    out.pvm[path.name] = [p for p in pvm if isinstance(p, dict)] if isinstance(pvm, list) else []


def _is_accuracy_file(obj: Any) -> bool:
    """perf/one_shot_bert.py's output: no schema, rows with a section and a label."""
    if not isinstance(obj, dict) or "schema" in obj or not isinstance(obj.get("rows"), list):
        return False
    rows = [r for r in obj["rows"] if isinstance(r, dict)]
    return bool(rows) and all("section" in r and "label" in r for r in rows)


def load_dir(results_dir: Path) -> Loaded:
    """Read every ``*.json`` of ``results_dir``, by kind (see the module's docstring); problems
    are collected, not raised."""
    out = Loaded()
    for path in sorted(Path(results_dir).glob("*.json")):
        if path.match(STATIC_FILES):
            _load_static(path, out)
            continue
        if path.match(QUICK_FILES):
            _load_quick(path, out)
            continue
        if any(path.match(pat) for pat in OTHER_FILES):
            out.skipped.append((path.name, "perf/gpu_diag.py's diagnostic rows (not a "
                                           "benchmark: probes of one kernel's loop)"))
            continue
        obj, problems = schema.load_results(path)
        if _is_accuracy_file(obj):
            out.skipped.append((path.name, "an accuracy run (perf/one_shot_bert.py: cosine, "
                                           "nearest neighbours), not timings"))
            continue
        out.problems.extend((path.name, p) for p in problems)
        if not isinstance(obj, dict):
            continue
        meta, rows = _meta_rows(obj)
        out.files.append((path.name, meta))
        for r in rows:
            out.rows.append({**r, "_file": path.name})
    return out


# ---------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------


def _shape(r: dict[str, Any]) -> dict[str, Any]:
    s = r.get("shape")
    return s if isinstance(s, dict) else {}


def _xkey(shape: dict[str, Any]) -> str | None:
    """The swept dimension: ``M`` for linear kernels, the batch ``N`` for conv geometry."""
    if "M" in shape:
        return "M"
    return "N" if "N" in shape else None


def panel_key(r: dict[str, Any]) -> tuple[str, str, str]:
    """(kernel, shape without the swept dim, dtype): one plot."""
    s = _shape(r)
    xk = _xkey(s)
    rest = " ".join(f"{k}={v}" for k, v in s.items() if k != xk)
    return (str(r.get("kernel", "?")), rest or "-", str(r.get("dtype", "?")))


def line_key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """(device, commit, provider, backend): one line."""
    return (str(r.get("device", "?")), str(r.get("git_sha", "?")),
            str(r.get("provider", "?")), str(r.get("backend", "?")))


def is_e2e(r: dict[str, Any]) -> bool:
    """An end-to-end row (``perf/bench_e2e.py``): a whole model, not a kernel."""
    return isinstance(r.get("e2e"), dict)


def _num(v: Any) -> float | None:
    if not is_number(v) or not math.isfinite(v):
        return None
    return float(v)


def _short_sha(sha: str) -> str:
    base, dirty = sha.split("+", 1) if "+" in sha else (sha, "")
    return base[:7] + (f"+{dirty}" if dirty else "")


def _version(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def _is_gpu(device: str) -> bool:
    return not device.lower().startswith("cpu")


def devices(loaded: Loaded) -> list[str]:
    """Every device with something to show: GPUs first, then CPUs, each sorted."""
    found = {str(r.get("device", "?")) for r in loaded.rows if not is_e2e(r)}
    found |= {_static_gpu(meta) for _, meta, _ in loaded.static} - {None}
    found |= {str(meta.get("device", "?")) for _, meta, _, tag in loaded.quick if tag is None}
    return sorted(found, key=lambda d: (not _is_gpu(d), d))


def _static_gpu(meta: dict[str, Any]) -> str | None:
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    gpu = model.get("gpu")
    return gpu if isinstance(gpu, str) else None


def static_files_for(loaded: Loaded, device: str
                     ) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(file, triton, rows) of the static model's predictions for ``device``, oldest Triton
    first."""
    out = [(name, str(meta.get("triton", "?")), rows) for name, meta, rows in loaded.static
           if _static_gpu(meta) == device]
    return sorted(out, key=lambda t: _version(t[1]))


def measured_triton(loaded: Loaded, device: str) -> str | None:
    """The Triton of the newest quick-check file of ``device`` (not experiments)."""
    metas = [meta for _, meta, _, tag in loaded.quick
             if tag is None and meta.get("device") == device]
    return str(metas[-1].get("triton")) if metas else None


def matching_static(loaded: Loaded, device: str
                    ) -> tuple[str, str, list[dict[str, Any]]] | None:
    """The static file whose Triton is the one the device's measurements used (else the
    newest Triton's)."""
    files = static_files_for(loaded, device)
    if not files:
        return None
    want = measured_triton(loaded, device)
    same = [f for f in files if f[1] == want]
    return same[-1] if same else files[-1]


def _guess_family(config: str) -> str:
    c = config.lower()
    if "2:4" in c:
        return "sparse24"
    if "rank" in c:
        return "lowrank"
    if "w8a8" in c:
        return "w8a8"
    if c.startswith("dw") or "mbv2" in c or "conv" in c:
        return "dwsep_conv"
    return "dequant"


def _quick_measured(loaded: Loaded, device: str) -> dict[tuple[str, int], dict[str, dict]]:
    """(case, M) -> provider -> row, of the device's quick-check files (not experiments; a
    later file replaces an earlier one's rows)."""
    out: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for name, meta, rows, tag in loaded.quick:
        if tag is not None or meta.get("device") != device:
            continue
        for r in rows:
            if isinstance(r.get("M"), int) and "case" in r:
                out[(str(r["case"]), r["M"])][str(r.get("provider"))] = {**r, "_file": name}
    return out


def _quick_speedup(r: dict[str, Any] | None) -> float | None:
    """A quick-check row's headline speedup: the CUDA-graph replay's (None if not ok)."""
    if r is None or r.get("status") != "ok" or r.get("graph_status") not in (None, "ok"):
        return None
    return _num(r.get("speedup_graph"))


@dataclass
class Cell:
    """One headline value: measured and/or predicted speedup vs dense."""

    measured: float | None = None
    predicted: float | None = None

    def text(self) -> str:
        m, p = self.measured, self.predicted
        if m is not None and p is not None:
            return f"{m:.2f} (pred {p:.2f})"
        if m is not None:
            return f"{m:.2f}"
        if p is not None:
            return f"{p:.2f} predicted"
        return "—"


@dataclass
class HeadlineRow:
    """One line of the headline table."""

    device: str
    family: str  # a key of FAMILIES (or a kernel name)
    config: str
    dtype: str
    shape: str  # the shape without M (the footnote says how it was chosen)
    cells: dict[int, Cell]
    other: list[tuple[str, Cell]] = field(default_factory=list)  # not swept over M (conv)
    measured_by: str = ""
    predicted_by: str = ""

    def text_cells(self) -> list[str]:
        return [self.cells.get(m, Cell()).text() for m in HEADLINE_MS]


def _nk_shape(n: Any, k: Any, dtype: Any) -> str:
    return (f"N=K={n}" if n == k else f"N={n} K={k}") + f" {dtype}"


def _gpu_headline(loaded: Loaded, device: str) -> list[HeadlineRow]:
    static = matching_static(loaded, device)
    srows = static[2] if static else []
    measured = _quick_measured(loaded, device)
    fam_of = {str(r.get("config")): str(r.get("family")) for _, _, rows in loaded.static
              for r in rows}
    configs: list[str] = []
    for r in srows:
        if str(r.get("config")) not in configs:
            configs.append(str(r.get("config")))
    for case, _ in measured:
        if case not in configs:
            configs.append(case)
    out = []
    for config in configs:
        fam = fam_of.get(config) or _guess_family(config)
        preds = [r for r in srows if str(r.get("config")) == config]
        ms = sorted({m for c, m in measured if c == config})
        ours = {m: measured[(config, m)].get("ours") for m in ms}
        swept = any(r.get("M") in HEADLINE_MS for r in preds) or any(m in HEADLINE_MS
                                                                      for m in ms)
        if ours and any(r is not None for r in ours.values()):
            ref = next(r for r in ours.values() if r is not None)
            n, k, dt = ref.get("N"), ref.get("K"), ref.get("dtype")
        elif preds:
            n, k, dt = preds[0].get("N"), preds[0].get("K"), preds[0].get("dtype")
        else:
            continue

        def pred_at(m: int, n=n, k=k, dt=dt, preds=preds) -> float | None:
            hit = [r for r in preds if r.get("M") == m and r.get("N") == n
                   and r.get("K") == k and r.get("dtype") == dt]
            return _num(hit[0].get("predicted_speedup")) if hit else None

        row = HeadlineRow(device, fam, config, str(dt), _nk_shape(n, k, dt), {},
                          predicted_by=static[0] if static and preds else "")
        got_measured = False
        for m in HEADLINE_MS:
            cell = Cell(_quick_speedup(ours.get(m)), pred_at(m))
            got_measured |= cell.measured is not None
            row.cells[m] = cell
        if not swept:  # the conv pairs: M is the pixel count, not a batch
            row.shape = "conv pair" if "sum" not in config else "MobileNetV2's pairs"
            for r in preds:
                label = "sum of the pairs" if r.get("M") == 0 else (
                    f"M={r.get('M')} N={r.get('N')} K={r.get('K')}")
                meas = _quick_speedup(measured.get((config, r.get("M")), {}).get("ours"))
                got_measured |= meas is not None
                row.other.append((label, Cell(meas, _num(r.get("predicted_speedup")))))
        if got_measured:
            files = sorted({r["_file"] for r in ours.values() if r is not None})
            row.measured_by = "quick check, CUDA-graph replay: " + ", ".join(files)
        out.append(row)
    # conv pairs: one line for the whole network unless a pair was measured
    convs = [r for r in out if r.other and not r.measured_by]
    keep_sum = [r for r in convs if "sum" in r.config]
    drop = {id(r) for r in convs if keep_sum and r not in keep_sum}
    return [r for r in out if id(r) not in drop]


def _bench_config(r: dict[str, Any], family: str) -> str | None:
    """The headline's config of a benchmark row, or None when it is not a headline provider
    (the dense baseline, torch's kernels, alternative routes, experiments' variants)."""
    p = str(r.get("provider", ""))
    if p != "ours" and not (p.startswith("ours-") and not p.endswith(_ALT_ROUTES)):
        return None
    name = p[len("ours-"):].replace("-", " ") if p.startswith("ours-") else {
        "sparse24": "2:4", "dwsep_conv": "dw + pw", "w8a8": "w8a8"}.get(family, p)
    if family == "lowrank" and "R" in _shape(r):
        name = f"rank {_shape(r)['R']}"
    return name


def _dtype_rank(dt: str) -> int:
    return _DTYPE_ORDER.index(dt) if dt in _DTYPE_ORDER else len(_DTYPE_ORDER)


def _bench_headline(loaded: Loaded, device: str) -> list[HeadlineRow]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in loaded.rows:
        if is_e2e(r) or str(r.get("device", "?")) != device:
            continue
        fam = KERNEL_FAMILY.get(str(r.get("kernel")), str(r.get("kernel")))
        config = _bench_config(r, fam)
        if config is not None:
            groups[(fam, config)].append(r)
    out = []
    for (fam, config), rs in groups.items():
        def rest(r: dict[str, Any]) -> str:
            return " ".join(f"{k}={v}" for k, v in _shape(r).items() if k not in ("M", "R"))

        if fam == "dwsep_conv":  # M is the pixel count: every shape in "other"
            dts = sorted({str(r.get("dtype")) for r in rs}, key=_dtype_rank)
            pick = [r for r in rs if str(r.get("dtype")) == dts[0]]
            row = HeadlineRow(device, fam, config, dts[0], "the conv shapes benched",
                              {m: Cell() for m in HEADLINE_MS})
            for r in pick:
                row.other.append((_case_str(r), Cell(_num(r.get("speedup_vs_dense")))))
        else:
            def score(key: tuple[str, str], rs: list[dict] = rs) -> tuple:
                sub = [r for r in rs if (rest(r), str(r.get("dtype"))) == key]
                s = _shape(sub[0])
                nk = (s.get("N") or 0) * (s.get("K") or 0) if all(
                    isinstance(s.get(d, 0), int) for d in ("N", "K")) else 0
                hits = len({_shape(r).get("M") for r in sub} & set(HEADLINE_MS))
                return (nk, -_dtype_rank(key[1]), hits)

            best = max({(rest(r), str(r.get("dtype"))) for r in rs}, key=score)
            pick = [r for r in rs if (rest(r), str(r.get("dtype"))) == best]
            row = HeadlineRow(device, fam, config, best[1], f"{best[0]} {best[1]}", {})
            for m in HEADLINE_MS:
                at = [r for r in pick if _shape(r).get("M") == m]  # files in date order
                row.cells[m] = Cell(_num(at[-1].get("speedup_vs_dense")) if at else None)
        files = sorted({r["_file"] for r in pick})
        row.measured_by = "benchmark median: " + ", ".join(files)
        out.append(row)
    return out


def headline_rows(loaded: Loaded) -> list[HeadlineRow]:
    """The headline table: per device (GPUs first), per family (in :data:`FAMILIES`' order), per
    config. On a GPU: the quick check's graph-replay speedup of ``ours`` where measured and the
    static model's prediction (the file of the measurement's Triton); on any device: the
    benchmark files' ``speedup_vs_dense`` of the ``ours`` providers, at the largest N x K they
    timed (then half precision first)."""
    order = list(FAMILIES)
    out = []
    for dev in devices(loaded):
        rows = _gpu_headline(loaded, dev) + _bench_headline(loaded, dev)
        rows.sort(key=lambda r: (order.index(r.family) if r.family in order else len(order),
                                 r.config))
        out += rows
    return out


def headline_text(rows: list[HeadlineRow]) -> str:
    """The headline table as plain text (printed by :func:`main`)."""
    head = ["device", "family", "config", "shape"] + [f"M={m}" for m in HEADLINE_MS] + [
        "other"]
    body = [[r.device, FAMILIES.get(r.family, r.family), r.config, r.shape, *r.text_cells(),
             "; ".join(f"{lbl}: {c.text()}" for lbl, c in r.other)] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip()
                     for x in [head, *body])


def predicted_vs_measured(loaded: Loaded, device: str) -> list[dict[str, Any]]:
    """Every (config, M) of ``device`` with a measurement or a prediction: measured graph and
    eager speedups of ``ours``, the other providers' graph speedups, and each Triton's
    prediction."""
    measured = _quick_measured(loaded, device)
    statics = static_files_for(loaded, device)
    keys: list[tuple[str, Any, Any, Any, Any]] = []
    fam_of: dict[str, str] = {}
    for _, _, rows in statics:
        for r in rows:
            k = (str(r.get("config")), r.get("M"), r.get("N"), r.get("K"), r.get("dtype"))
            fam_of[k[0]] = str(r.get("family"))
            if k not in keys:
                keys.append(k)
    for (case, m), provs in measured.items():
        ref = next(iter(provs.values()))
        k = (case, m, ref.get("N"), ref.get("K"), ref.get("dtype"))
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        config, m, n, kk, dt = k
        provs = measured.get((config, m), {})
        ours = provs.get("ours")
        if ours is not None and (ours.get("N"), ours.get("K"), ours.get("dtype")) != (n, kk, dt):
            ours, provs = None, {}
        preds = {}
        for _, triton, rows in statics:
            hit = [r for r in rows if (str(r.get("config")), r.get("M"), r.get("N"),
                                       r.get("K"), r.get("dtype")) == k]
            preds[triton] = _num(hit[0].get("predicted_speedup")) if hit else None
        out.append({
            "family": fam_of.get(config) or _guess_family(config), "config": config, "M": m,
            "N": n, "K": kk, "dtype": dt,
            "measured_graph": _quick_speedup(ours),
            "measured_eager": _num(ours.get("speedup_eager")) if ours else None,
            "others": {p: _quick_speedup(r) for p, r in provs.items()
                       if p not in ("ours", *BASELINE_PROVIDERS)},
            "predicted": preds,
        })
    order = list(FAMILIES)
    out.sort(key=lambda d: (order.index(d["family"]) if d["family"] in order else len(order),
                            keys.index((d["config"], d["M"], d["N"], d["K"], d["dtype"]))))
    return out


def stale_predictions(loaded: Loaded, device: str) -> list[str]:
    """The quick files' own ``predicted_vs_measured`` entries whose prediction differs (> 1 %)
    from today's static file of the same Triton: they were joined against an older one."""
    out = []
    for name, meta, _, tag in loaded.quick:
        if tag is not None or meta.get("device") != device:
            continue
        for p in loaded.pvm.get(name, []):
            for sname, _triton, rows in static_files_for(loaded, device):
                if sname != p.get("static_file"):
                    continue
                hit = [r for r in rows if (r.get("config"), r.get("M"), r.get("N"), r.get("K"),
                                           r.get("dtype")) == (p.get("config"), p.get("M"),
                                                               p.get("N"), p.get("K"),
                                                               p.get("dtype"))]
                now = _num(hit[0].get("predicted_speedup")) if hit else None
                then = _num(p.get("predicted_speedup"))
                if now is not None and then is not None and abs(now - then) > 0.01 * now:
                    out.append(f"{name}: {p.get('config')} M={p.get('M')}: predicted "
                               f"{then:.3g} then, {now:.3g} in today's {sname}")
    return out


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


@dataclass
class Series:
    """One line (or set of markers) of a plot."""

    label: str
    xs: list[float]
    ys: list[float]
    group: str  # colour key: the config (model plots) or the line's own label (bench plots)
    style: str = "line"  # "measured", "predicted", "marker" (another provider) or "line"
    marker_of: str = ""  # the provider, for "marker"


@dataclass
class Panel:
    """One plot: speedup vs dense over M."""

    title: str
    series: list[Series]
    kind: str = "bench"  # "model": colour = config, style = measured / predicted / provider
    xlabel: str = "M"


_OTHER_MARKERS = ("^", "v", "s", "D", "P", "*")


def _provider_label(p: str) -> str:
    """``"QuantConfig(bits=2) [int2 g128 asym] via-bf16"`` -> ``"int2 g128 asym via-bf16"``
    (perf/cpu_lowbit.py's names; others unchanged)."""
    short = re.sub(r"^\w+Config\([^)]*\)\s*\[([^\]]+)\]", r"\1", p)
    return short.strip() or p


def device_panels(loaded: Loaded, device: str) -> list[Panel]:
    """The plots of one device: per family, the quick check's measurements next to the static
    model's predictions (the families only predicted share one plot); then per (benchmark
    file, kernel, dtype) its rows, a line per (provider, backend, commit, shape without M)."""
    panels = []
    pvm = predicted_vs_measured(loaded, device)
    static = matching_static(loaded, device)
    triton = static[1] if static else None
    predicted_only: list[Series] = []
    predicted_fams: list[str] = []
    for fam in dict.fromkeys(d["family"] for d in pvm):
        series: list[Series] = []
        rows = [d for d in pvm if d["family"] == fam]
        if not any(d["M"] in HEADLINE_MS for d in rows):
            continue  # the conv pairs: M is a pixel count; they are in the table
        for config in dict.fromkeys(d["config"] for d in rows):
            rs = sorted((d for d in rows if d["config"] == config), key=lambda d: d["M"])
            pts = [(d["M"], d["measured_graph"]) for d in rs if d["measured_graph"] is not None]
            if pts:
                series.append(Series(f"{config} measured", *map(list, zip(*pts, strict=True)),
                                     group=config, style="measured"))
            pts = [(d["M"], d["predicted"].get(triton)) for d in rs
                   if d["predicted"].get(triton) is not None]
            if pts:
                series.append(Series(f"{config} predicted", *map(list, zip(*pts, strict=True)),
                                     group=config, style="predicted"))
            for prov in dict.fromkeys(p for d in rs for p in d["others"]):
                pts = [(d["M"], d["others"][prov]) for d in rs
                       if d["others"].get(prov) is not None]
                if pts:
                    series.append(Series(f"{config} {prov}", *map(list, zip(*pts, strict=True)),
                                         group=config, style="marker", marker_of=prov))
        if any(s.style != "predicted" for s in series):
            panels.append(Panel(f"{FAMILIES.get(fam, fam)}: measured (quick check, graph "
                                f"replay) vs predicted (static model, Triton {triton})",
                                series, kind="model"))
        elif series:
            predicted_only += series
            predicted_fams.append(FAMILIES.get(fam, fam))
    if predicted_only:
        panels.append(Panel(f"{', '.join(predicted_fams)}: predicted only (static model, "
                            f"Triton {triton})", predicted_only, kind="model"))

    by_panel: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in loaded.rows:
        if is_e2e(r) or str(r.get("device", "?")) != device or _xkey(_shape(r)) is None:
            continue
        p = str(r.get("provider", "?"))
        if p in BASELINE_PROVIDERS | {"unfused"} or p.startswith("dense"):
            continue  # the baseline is the line at 1 (conv: the unfused dw + pw pair)
        rest = panel_key(r)[1]
        by_panel[(r["_file"], str(r.get("kernel", "?")), str(r.get("dtype", "?")))][
            line_key(r) + (rest,)].append(r)
    for key in sorted(by_panel):
        fname, kernel, dtype = key
        rests = sorted({lk[4] for lk in by_panel[key]})
        series = []
        for lk, rs in sorted(by_panel[key].items(), key=lambda t: (t[0][2], t[0][4])):
            pts = sorted((_shape(r)[_xkey(_shape(r))], _num(r.get("speedup_vs_dense")))
                         for r in rs)
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                label = f"{_provider_label(lk[2])} [{lk[3]}] @{_short_sha(lk[1])}"
                if len(rests) > 1:
                    label += f" {lk[4]}"
                series.append(Series(label, *map(list, zip(*pts, strict=True)), group=label))
        if series:
            xk = _xkey(_shape(next(iter(by_panel[key].values()))[0])) or "M"
            shape = f"  {rests[0]}" if len(rests) == 1 else ""
            panels.append(Panel(f"{kernel}{shape}  {dtype}\n{fname}", series, xlabel=xk))
    return panels


def _legend(ax: Any, handles: list, labels: list[str]) -> None:
    """Right of the axes, never over the data."""
    ncol = 2 if len(labels) > 22 else 1
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              fontsize=6.5, ncol=ncol, frameon=False)


def draw_panel(ax: Any, panel: Panel) -> None:
    """One plot: log-log speedup vs dense over M, the legend right of it."""
    from matplotlib.lines import Line2D

    cmap = ax.figure.colormaps["tab10"] if hasattr(ax.figure, "colormaps") else None
    if cmap is None:  # pragma: no cover - old matplotlib
        import matplotlib

        cmap = matplotlib.colormaps["tab10"]
    groups = list(dict.fromkeys(s.group for s in panel.series))
    color = {g: cmap(i % 10) for i, g in enumerate(groups)}
    others = list(dict.fromkeys(s.marker_of for s in panel.series if s.style == "marker"))
    marker = {p: _OTHER_MARKERS[i % len(_OTHER_MARKERS)] for i, p in enumerate(others)}
    ys_all = []
    for s in panel.series:
        ys_all += s.ys
        c = color[s.group]
        if s.style == "measured":
            ax.plot(s.xs, s.ys, color=c, marker="o", linewidth=1.8)
        elif s.style == "predicted":
            ax.plot(s.xs, s.ys, color=c, marker="x", linestyle="--", linewidth=1, alpha=0.8)
        elif s.style == "marker":
            ax.plot(s.xs, s.ys, color=c, marker=marker[s.marker_of], linestyle="none",
                    markersize=6, markerfacecolor="none")
        else:
            styles = ["-", "--", "-.", ":"]
            ax.plot(s.xs, s.ys, color=c, marker="o", markersize=3,
                    linestyle=styles[(groups.index(s.group) // 10) % len(styles)])
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lo, hi = min([*ys_all, 1.0]), max([*ys_all, 1.0])
    ax.set_ylim(lo / 1.4, hi * 1.4)
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # no mathtext: faster, and reads as numbers
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel("x dense (higher is better)", fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ax.grid(True, alpha=0.25)
    if panel.kind == "model":
        handles = [Line2D([], [], color=color[g], linewidth=6) for g in groups]
        labels = list(groups)
        styles = {s.style for s in panel.series}
        if "measured" in styles:
            handles.append(Line2D([], [], color="k", marker="o", linewidth=1.8))
            labels.append("measured: ours")
        if "predicted" in styles:
            handles.append(Line2D([], [], color="k", marker="x", linestyle="--", linewidth=1))
            labels.append("predicted: ours")
        handles += [Line2D([], [], color="k", marker=marker[p], linestyle="none",
                           markerfacecolor="none") for p in others]
        labels += [f"measured: {p}" for p in others]
    else:
        handles = [Line2D([], [], color=color[s.group], marker="o", markersize=3,
                          linestyle=["-", "--", "-.", ":"][(groups.index(s.group) // 10) % 4])
                   for s in panel.series]
        labels = [s.label for s in panel.series]
    _legend(ax, handles, labels)


def _grid(n: int) -> tuple[int, int]:
    cols = 1 if n == 1 else 2
    return (n + cols - 1) // cols, cols


def draw_device(fig: Any, device: str, panels: list[Panel]) -> list[Any]:
    """A device's plots on ``fig`` (a Figure or SubFigure), two per line; its axes."""
    if not panels:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center")
        return []
    nrows, ncols = _grid(len(panels))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, panel in zip(flat, panels, strict=False):
        draw_panel(ax, panel)
    for ax in flat[len(panels):]:
        ax.axis("off")
    return flat[:len(panels)]


_ROW_IN = 3.3  # inches per line of plots
_DPI = 72
_FIG_W = 17.0


def device_figure(device: str, panels: list[Panel]) -> Any:
    """A figure of one device's plots (constrained layout: legends outside the axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows, ncols = _grid(max(1, len(panels)))
    fig = plt.figure(figsize=(_FIG_W if ncols == 2 else _FIG_W / 2 + 1, _ROW_IN * nrows + 0.6),
                     layout="constrained")
    fig.suptitle(f"{device}: speedup vs dense (dense = 1)", fontsize=12, fontweight="bold")
    draw_device(fig, device, panels)
    return fig


def render_png(loaded: Loaded, path: Path) -> dict[str, str]:
    """One ``dashboard-<slug>.png`` per device next to ``path``, and ``path``: those pictures
    stacked (a grey bar between devices). Returns device -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    import numpy as np  # matplotlib's own dependency

    path = Path(path)
    devs = [(d, device_panels(loaded, d)) for d in devices(loaded)]
    devs = [(d, p) for d, p in devs if p]
    if not devs:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no plottable results", ha="center", va="center")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return {}
    names, images = {}, []
    for d, panels in devs:
        fig = device_figure(d, panels)
        name = f"{path.stem}-{device_slug(d)}{path.suffix}"
        fig.savefig(path.with_name(name), dpi=_DPI, facecolor="white")
        plt.close(fig)
        names[d] = name
        images.append(mpimg.imread(path.with_name(name))[..., :3])
    width = max(im.shape[1] for im in images)
    bar = np.full((8, width, 3), 0.55, dtype=images[0].dtype)
    blocks = []
    for i, im in enumerate(images):
        pad = np.ones((im.shape[0], width - im.shape[1], 3), dtype=im.dtype)
        blocks += ([bar] if i else []) + [np.concatenate([im, pad], axis=1)]
    plt.imsave(path, np.concatenate(blocks, axis=0))
    return names


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".3g") -> str:
    n = _num(v)
    if n is None:
        return "-" if v is None else html.escape(str(v))
    return format(n, spec)


def _case_str(r: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in _shape(r).items())


def summary_rows(loaded: Loaded) -> list[dict[str, Any]]:
    """Per (kernel, device, commit, provider, backend, dtype): wins, best and worst speedup."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in loaded.rows:
        if r.get("provider") in BASELINE_PROVIDERS or is_e2e(r):
            continue
        groups[(str(r.get("kernel")),) + line_key(r) + (str(r.get("dtype")),)].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        timed = [r for r in rs if _num(r.get("speedup_vs_dense")) is not None]
        best = max(timed, key=lambda r: r["speedup_vs_dense"], default=None)
        worst = min(timed, key=lambda r: r["speedup_vs_dense"], default=None)
        out.append({
            "kernel": key[0], "device": key[1], "git_sha": key[2], "provider": key[3],
            "backend": key[4], "dtype": key[5], "cases": len(rs), "timed": len(timed),
            "wins": sum(r["speedup_vs_dense"] > 1.0 for r in timed),
            "best": best, "worst": worst,
        })
    return out


_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 12px; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; }
td.l { text-align: left; }
td.src { text-align: left; font-size: 10px; color: #666; }
.win { background: #d8f5d8; } .lose { background: #f8dada; }
.bad { background: #fff0c0; }
.pred { color: #555; font-size: 11px; }
.predonly { color: #555; font-style: italic; }
.problems li { color: #a00; }
section.device { border-top: 2px solid #888; margin-top: 1.5em; }
p.foot { font-size: 11px; color: #444; max-width: 70em; }
img { max-width: 100%; }
"""


def _cell_inner(c: Cell) -> tuple[str, str]:
    """(class, inner HTML) of a headline value: measured (class win / lose) with the
    prediction next to it, or the prediction alone marked "predicted"; "—" when neither."""
    m, p = c.measured, c.predicted
    if m is None and p is None:
        return "", "—"
    if m is None:
        return "", f"<span class='predonly'>{p:.2f}&times; predicted</span>"
    pred = f" <span class='pred'>(pred {p:.2f}&times;)</span>" if p is not None else ""
    return ("win" if m > 1.0 else "lose"), f"{m:.2f}&times;{pred}"


def _cell_html(c: Cell) -> str:
    cls, inner = _cell_inner(c)
    return f"<td class='{cls}'>{inner}</td>" if cls else f"<td>{inner}</td>"


def headline_html(loaded: Loaded, rows: list[HeadlineRow]) -> list[str]:
    """The headline table and its footnotes."""
    e = html.escape
    parts = ["<h2>Headline: speedup vs dense</h2>"]
    if not rows:
        return parts + ["<p>No results.</p>"]
    parts.append("<table><tr><th>device</th><th>family</th><th>config</th><th>shape "
                 "<sup>1</sup></th>" + "".join(f"<th>M = {m}</th>" for m in HEADLINE_MS)
                 + "<th>other shapes <sup>2</sup></th><th>source</th></tr>")
    for r in rows:
        other = "; ".join(f"{e(lbl)}: {_cell_inner(c)[1]}" for lbl, c in r.other)
        src = "<br>".join(e(s) for s in (r.measured_by, (
            f"predicted: {r.predicted_by}" if r.predicted_by else "")) if s)
        parts.append(
            f"<tr><td class='l'>{e(r.device)}</td><td class='l'>"
            f"{e(FAMILIES.get(r.family, r.family))}</td><td class='l'>{e(r.config)}</td>"
            f"<td class='l'>{e(r.shape)}</td>" + "".join(_cell_html(r.cells.get(m, Cell()))
                                                        for m in HEADLINE_MS)
            + f"<td class='l'>{other}</td><td class='src'>{src}</td></tr>")
    parts.append("</table>")
    gpu_notes = []
    for dev in devices(loaded):
        st = matching_static(loaded, dev)
        if st is None:
            continue
        tri = measured_triton(loaded, dev)
        why = (f"the Triton of its measurements ({tri})" if tri == st[1] else
               f"the newest Triton's: no static file of the measurements' Triton ({tri})"
               if tri else "the newest Triton's (nothing measured)")
        gpu_notes.append(f"{e(dev)}: <code>{e(st[0])}</code>, {why}")
    parts.append(
        "<p class='foot'>Measured: on a GPU, the quick check's (<code>perf/quick_check.py</code>"
        ") <b>CUDA-graph replay</b> speedup of <code>ours</code> (the module's own dispatch) "
        "against <code>F.linear</code> (cuBLAS) on the same weights, both <code>do_bench</code>"
        " medians with L2 flushed: the graph has no host launch overhead, which the eager "
        "figures of the same file include (they are in the device's table below); on a CPU, the "
        "benchmark's median speedup_vs_dense of the <code>ours</code> providers (torch's kernels"
        ", the alternative routes <code>-dequant</code> / <code>-dense-cache</code> / "
        "<code>-gemv</code> and <code>perf/cpu_lowbit.py</code>'s variants are in the plots). "
        "Green: faster than dense. <i>predicted</i>: the static performance model "
        "(<code>perf/static_perf.py</code>, SASS instruction counts; not a measurement), shown "
        "next to the measurement where both exist and alone, in italics, where nothing was "
        "measured. Predictions used here: " + ("; ".join(gpu_notes) or "none") + ".</p>")
    parts.append(
        "<p class='foot'><sup>1</sup> The shape the row is taken at: on a GPU the quick check's "
        "and static model's headline (N = K = 8192, fp16); for a benchmark file the largest "
        "N &times; K it timed for that family and config, then fp16 / bf16 before fp32, then the "
        "shape with most of M = 1 / 16 / 2048. &mdash;: that M was not measured or predicted. "
        "<sup>2</sup> Depthwise-separable convs are not swept over a batch M (their M is the "
        "pixel count): the shapes benched, or the static model's sum over MobileNetV2's pairs "
        "(per pair in the device's table below).</p>")
    return parts


def device_html(loaded: Loaded, device: str, png_name: str | None) -> list[str]:
    """One device's section: heading, picture, and on a GPU its predicted-vs-measured table."""
    e = html.escape
    parts = [f"<section class='device' id='{e(device_slug(device))}'>",
             f"<h2>{e(device)}</h2>"]
    if png_name is not None:
        parts.append(f"<p><img src='{e(png_name)}' alt='plots of {e(device)}'></p>")
    pvm = predicted_vs_measured(loaded, device)
    statics = [t for _, t, _ in static_files_for(loaded, device)]
    if pvm:
        tri = measured_triton(loaded, device)
        parts.append(
            f"<h3>Predicted and measured ({e(device)})</h3><p>Measured: the quick check's "
            "speedup of <code>ours</code> vs <code>F.linear</code>, CUDA-graph replay (the "
            "headline) and eager; other providers' graph-replay speedups; the static model's "
            "predicted speedup for each Triton it was run with"
            + (f" (the measurements used Triton {e(tri)})" if tri else "")
            + ". measured / predicted below 1: slower than the model says.</p>")
        parts.append("<table><tr><th>family</th><th>config</th><th>M</th><th>N</th><th>K</th>"
                     "<th>dtype</th><th>measured (graph)</th><th>measured (eager)</th>"
                     + "".join(f"<th>predicted, Triton {e(t)}</th>" for t in statics)
                     + "<th>measured / predicted</th><th>other providers (graph)</th></tr>")
        match = matching_static(loaded, device)
        for d in pvm:
            pm = d["predicted"].get(match[1]) if match else None
            ratio = (d["measured_graph"] / pm) if d["measured_graph"] and pm else None
            g = d["measured_graph"]
            g_cls = "" if g is None else (" class='win'" if g > 1 else " class='lose'")
            others = ", ".join(f"{p} {_fmt(v, '.2g')}" for p, v in d["others"].items())
            parts.append(
                f"<tr><td class='l'>{e(FAMILIES.get(d['family'], d['family']))}</td>"
                f"<td class='l'>{e(d['config'])}</td><td>{e(str(d['M']))}</td>"
                f"<td>{e(str(d['N']))}</td><td>{e(str(d['K']))}</td>"
                f"<td class='l'>{e(str(d['dtype']))}</td><td{g_cls}>{_fmt(g, '.2f')}</td>"
                f"<td>{_fmt(d['measured_eager'], '.2f')}</td>"
                + "".join(f"<td>{_fmt(d['predicted'].get(t), '.2f')}</td>" for t in statics)
                + f"<td>{_fmt(ratio, '.2f')}</td><td class='l'>{e(others)}</td></tr>")
        parts.append("</table>")
        stale = stale_predictions(loaded, device)
        if stale:
            parts.append(
                f"<p class='foot'>The quick files' own <code>predicted_vs_measured</code> "
                f"sections were joined against the static file of their day: {len(stale)} of "
                "their predictions differ from today's static files, which this table and the "
                "headline use:</p><ul class='foot'>"
                + "".join(f"<li>{e(s)}</li>" for s in stale) + "</ul>")
    exps = [(n, tag) for n, meta, _, tag in loaded.quick
            if tag is not None and meta.get("device") == device]
    for name, tag in exps:
        parts.append(f"<p class='foot'>Experiment <b>{e(tag)}</b> (<code>{e(name)}</code>): "
                     "a change measured and not kept (<code>perf/experiments/</code>); left out "
                     "of the headline and the plots, which show the code in the tree.</p>")
    parts.append("</section>")
    return parts


def render_html(loaded: Loaded, path: Path, png_name: str | None,
                device_pngs: dict[str, str] | None = None) -> None:
    """The dashboard page (pictures referenced by relative name; ``png_name`` None: no
    pictures)."""
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    device_pngs = device_pngs or {}
    n_other = len(loaded.static) + len(loaded.quick)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>compress_ops benchmarks</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>compress_ops benchmarks</h1>",
        f"<p>Generated {e(now)} from {len(loaded.files)} benchmark file(s) "
        f"({len(loaded.rows)} row(s)) and {n_other} static-model / quick-check file(s). "
        "Speedup = dense time / provider time for the same case "
        "(dense = cuBLAS <code>F.linear</code> on GPU, <code>F.linear</code> on CPU). "
        "% of peak (in the table of all rows) is against peaks measured on the same machine in "
        "the same run: memory bandwidth (a large copy) for memory-bound cases, matmul FLOP/s of "
        "the dtype otherwise. CPU rows time the CPU paths (backend <code>cpu-reference</code>, "
        "<code>cpu-dense</code>), not the GPU kernels.</p>",
    ]
    parts += headline_html(loaded, headline_rows(loaded))

    parts.append("<h2>By device</h2><p class='foot'>Per device: speedup vs dense over M, "
                 "log scales, dense = 1 (grey line). Quick check / static model plots: colour = "
                 "config, solid = measured (graph replay), dashed = predicted, hollow markers = "
                 "other providers measured. Benchmark plots: one line per provider [backend] "
                 "@commit.</p>")
    if png_name is not None:
        parts.append(f"<p class='foot'>All devices in one picture: "
                     f"<a href='{e(png_name)}'>{e(png_name)}</a>.</p>")
    for dev in devices(loaded):
        parts += device_html(loaded, dev, device_pngs.get(dev) if png_name else None)

    parts.append(f"<h2>Problems ({len(loaded.problems)})</h2>")
    if loaded.problems:
        parts.append("<ul class='problems'>")
        parts += [f"<li><b>{e(f)}</b>: {e(p)}</li>" for f, p in loaded.problems]
        parts.append("</ul>")
    else:
        parts.append("<p>None: every file and row has exactly the schema's fields.</p>")

    parts.append("<h2>Where each kernel wins and loses</h2>")
    parts.append("<table><tr><th>kernel</th><th>provider</th><th>backend</th><th>device</th>"
                 "<th>commit</th><th>dtype</th><th>faster than dense</th>"
                 "<th>best x dense</th><th>at</th><th>worst x dense</th><th>at</th></tr>")
    for s in summary_rows(loaded):
        b, w = s["best"], s["worst"]
        failed = s["cases"] - s["timed"]
        failed_s = f" ({failed} not timed)" if failed else ""
        parts.append(
            f"<tr><td class='l'>{e(s['kernel'])}</td><td class='l'>{e(s['provider'])}</td>"
            f"<td class='l'>{e(s['backend'])}</td><td class='l'>{e(s['device'])}</td>"
            f"<td class='l'>{e(s['git_sha'])}</td><td class='l'>{e(s['dtype'])}</td>"
            f"<td>{s['wins']} / {s['timed']}{failed_s}</td>"
            f"<td>{_fmt(b and b['speedup_vs_dense'], '.2f')}</td>"
            f"<td class='l'>{e(_case_str(b)) if b else '-'}</td>"
            f"<td>{_fmt(w and w['speedup_vs_dense'], '.2f')}</td>"
            f"<td class='l'>{e(_case_str(w)) if w else '-'}</td></tr>")
    parts.append("</table>")

    parts += e2e_html(loaded)

    parts.append("<h2>Files</h2><table><tr><th>file</th><th>device</th><th>backend</th>"
                 "<th>date</th><th>commit</th><th>torch</th><th>triton</th>"
                 "<th>peak GB/s</th><th>peak TFLOP/s</th><th>complete</th><th>rows</th></tr>")
    nrows = defaultdict(int)
    for r in loaded.rows:
        nrows[r["_file"]] += 1
    for name, meta in loaded.files:
        peaks = meta.get("peaks") if isinstance(meta.get("peaks"), dict) else {}
        fl = peaks.get("flops_tflops") if isinstance(peaks.get("flops_tflops"), dict) else {}
        fl_s = ", ".join(f"{k} {_fmt(v, '.3g')}" for k, v in fl.items()) or "-"
        parts.append(
            f"<tr><td class='l'>{e(name)}</td><td class='l'>{e(str(meta.get('device', '?')))}"
            f"</td><td class='l'>{e(str(meta.get('backend', '?')))}</td>"
            f"<td class='l'>{e(str(meta.get('date', '?')))}</td>"
            f"<td class='l'>{e(str(meta.get('git_sha', '?')))}</td>"
            f"<td class='l'>{e(str(meta.get('torch', '?')))}</td>"
            f"<td class='l'>{e(str(meta.get('triton', '?')))}</td>"
            f"<td>{_fmt(peaks.get('hbm_gbps'), '.1f')}</td><td class='l'>{e(fl_s)}</td>"
            f"<td>{e(str(meta.get('complete', '?')))}</td><td>{nrows[name]}</td></tr>")
    parts.append("</table>")
    if loaded.static or loaded.quick or loaded.skipped:
        parts.append("<table><tr><th>file</th><th>kind</th><th>device</th><th>triton</th>"
                     "<th>commit</th><th>rows</th><th>shown</th></tr>")
        for name, meta, rows in loaded.static:
            parts.append(f"<tr><td class='l'>{e(name)}</td><td class='l'>static model</td>"
                         f"<td class='l'>{e(str(_static_gpu(meta)))}</td>"
                         f"<td class='l'>{e(str(meta.get('triton', '?')))}</td><td>-</td>"
                         f"<td>{len(rows)}</td><td class='l'>predictions</td></tr>")
        for name, meta, rows, tag in loaded.quick:
            shown = "measurements" if tag is None else f"no: experiment {tag}"
            parts.append(f"<tr><td class='l'>{e(name)}</td><td class='l'>quick check</td>"
                         f"<td class='l'>{e(str(meta.get('device', '?')))}</td>"
                         f"<td class='l'>{e(str(meta.get('triton', '?')))}</td>"
                         f"<td class='l'>{e(str(meta.get('git_sha', '?')))}</td>"
                         f"<td>{len(rows)}</td><td class='l'>{e(shown)}</td></tr>")
        for name, why in loaded.skipped:
            parts.append(f"<tr><td class='l'>{e(name)}</td><td class='l'>other</td><td>-</td>"
                         f"<td>-</td><td>-</td><td>-</td><td class='l'>no: {e(why)}</td></tr>")
        parts.append("</table>")

    bad_rows = {(f, p.split(":", 1)[0]) for f, p in loaded.problems if p.startswith("row ")}
    parts.append("<h2>All rows</h2><table><tr><th>file</th><th>kernel</th><th>provider</th>"
                 "<th>backend</th><th>device</th><th>commit</th><th>dtype</th><th>shape</th>"
                 "<th>median us</th><th>samples</th><th>TFLOP/s</th><th>GB/s</th>"
                 "<th>% peak</th><th>x dense</th><th>max rel err</th><th>note</th></tr>")
    per_file_index: dict[str, int] = defaultdict(int)
    for r in loaded.rows:
        i = per_file_index[r["_file"]]
        per_file_index[r["_file"]] += 1
        tag = f"row {i} ({r.get('kernel', '?')}/{r.get('provider', '?')})"
        cls = " class='bad'" if (r["_file"], tag) in bad_rows else ""
        sp = _num(r.get("speedup_vs_dense"))
        sp_cls = "" if sp is None or r.get("provider") in BASELINE_PROVIDERS else (
            " class='win'" if sp > 1.0 else " class='lose'")
        pk = f"{_fmt(r.get('pct_peak'), '.1f')} {e(str(r.get('peak_kind') or ''))}"
        parts.append(
            f"<tr{cls}><td class='l'>{e(r['_file'])}</td>"
            f"<td class='l'>{e(str(r.get('kernel', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('provider', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('backend', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('device', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('git_sha', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('dtype', '?')))}</td>"
            f"<td class='l'>{e(_case_str(r))}</td><td>{_fmt(r.get('median_us'), '.1f')}</td>"
            f"<td>{_fmt(r.get('samples'), '.0f')}</td>"
            f"<td>{_fmt(r.get('tflops'), '.3g')}</td><td>{_fmt(r.get('gbps'), '.1f')}</td>"
            f"<td>{pk}</td><td{sp_cls}>{_fmt(sp, '.2f')}</td>"
            f"<td>{_fmt(r.get('max_rel_err'), '.2g')}</td>"
            f"<td class='l'>{e(str(r.get('note') or ''))}</td></tr>")
    parts.append("</table></body></html>")
    Path(path).write_text("\n".join(parts) + "\n")


def _mb(v: Any) -> str:
    n = _num(v)
    return "-" if n is None else f"{n / 1e6:.1f}"


def e2e_html(loaded: Loaded) -> list[str]:
    """The "End to end" section: one line per end-to-end row (nothing when there is none)."""
    rows = [r for r in loaded.rows if is_e2e(r)]
    if not rows:
        return []
    e = html.escape
    parts = [
        "<h2>End to end (models)</h2>",
        "<p>Whole models with random weights (<code>python -m compress_ops.perf.bench_e2e</code>"
        "): batch-1 greedy decode of a Llama-shaped decoder (tokens/s) and MobileNetV2 "
        "(images/s). x dense: against the dense (unfused) row of the same model, size and "
        "mode. Max rel err: logits against the dense model (a sanity number). Peak memory is "
        "measured on CUDA only.</p>",
        "<table><tr><th>file</th><th>model</th><th>size</th><th>config</th><th>mode</th>"
        "<th>device</th><th>commit</th><th>dtype</th><th>rate</th><th>x dense</th>"
        "<th>weight MB</th><th>peak MB</th><th>max rel err</th><th>token match</th>"
        "<th>status</th></tr>",
    ]
    for r in rows:
        x = r["e2e"]
        sp = _num(r.get("speedup_vs_dense"))
        sp_cls = "" if sp is None or r.get("provider") in BASELINE_PROVIDERS | {"unfused"} \
            else (" class='win'" if sp > 1.0 else " class='lose'")
        rate = _num(x.get("rate"))
        rate_s = f"{rate:.1f} {e(str(x.get('rate_unit', '')))}" if rate is not None else "-"
        status = str(x.get("status", "?"))
        if x.get("error"):
            status += f": {x['error']}"
        parts.append(
            f"<tr><td class='l'>{e(r['_file'])}</td><td class='l'>{e(str(x.get('model')))}</td>"
            f"<td class='l'>{e(str(x.get('size')))}</td>"
            f"<td class='l'>{e(str(r.get('provider', '?')))}</td>"
            f"<td class='l'>{e(str(x.get('mode')))}</td>"
            f"<td class='l'>{e(str(r.get('device', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('git_sha', '?')))}</td>"
            f"<td class='l'>{e(str(r.get('dtype', '?')))}</td><td>{rate_s}</td>"
            f"<td{sp_cls}>{_fmt(sp, '.2f')}</td><td>{_mb(x.get('weight_bytes'))}</td>"
            f"<td>{_mb(x.get('peak_mem_bytes'))}</td>"
            f"<td>{_fmt(r.get('max_rel_err'), '.2g')}</td>"
            f"<td>{_fmt(x.get('token_match'), '.2f')}</td>"
            f"<td class='l'>{e(status)}</td></tr>")
    parts.append("</table>")
    return parts


def main(argv: list[str] | None = None) -> int:
    """Render the dashboard; 0 unless ``--strict`` and some file or row has problems."""
    p = argparse.ArgumentParser(prog="dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=schema.default_results_dir(),
                   help="folder of results *.json (default: perf/results/ of a checkout, "
                        "else ./perf-results/)")
    p.add_argument("--out-dir", type=Path, default=schema.default_dashboard_dir(),
                   help="where dashboard.html/.png go (default: perf/ of a checkout, else "
                        "./perf-results/)")
    p.add_argument("--strict", action="store_true", help="exit 1 when there are problems")
    args = p.parse_args(argv)

    loaded = load_dir(args.results_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png: Path | None = args.out_dir / "dashboard.png"
    out_html = args.out_dir / "dashboard.html"
    device_pngs: dict[str, str] = {}
    try:
        device_pngs = render_png(loaded, png)
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print("dashboard: matplotlib is not installed (pip install 'compress_ops[bench]'): "
              "the HTML tables are written without the plots", file=sys.stderr)
        png = None
    render_html(loaded, out_html, None if png is None else png.name, device_pngs)
    for f, msg in loaded.problems:
        print(f"dashboard: problem: {f}: {msg}", file=sys.stderr)
    rows = headline_rows(loaded)
    if rows:
        print(headline_text(rows))
    pngs = [png.name, *device_pngs.values()] if png else []
    print(f"dashboard: {len(loaded.files)} benchmark file(s), {len(loaded.rows)} row(s), "
          f"{len(loaded.static)} static and {len(loaded.quick)} quick-check file(s), "
          f"{len(loaded.problems)} problem(s) -> {out_html}"
          + (f", {', '.join(pngs)} in {png.parent}" if png else ""))
    return 1 if (args.strict and loaded.problems) else 0


if __name__ == "__main__":
    raise SystemExit(main())
