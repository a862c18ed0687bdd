"""Render every results file into ``dashboard.html`` and ``dashboard.png``.

    python -m compress_ops dashboard [--results-dir DIR] [--out-dir DIR] [--strict]
    python -m compress_ops.perf.dashboard [same options]
    python -m compress_ops bench --dashboard

Defaults: from a source checkout, ``perf/results/`` in and ``perf/`` out; from an installed
copy, ``./perf-results/`` in and out (where ``python -m compress_ops bench`` writes there).

The PNG has one row of plots per (kernel, shape without M, dtype): speedup vs dense over M
(left) and % of the measured peak over M (right; circles: % of memory bandwidth, triangles: %
of matmul FLOP/s). One line per (device, commit, provider, backend). The HTML holds a summary
per (kernel, device, commit, provider, dtype) saying where it wins and loses, the picture, the
files and their measured peaks, a "problems" section listing every file or row with missing or
unknown fields (such rows are still shown and plotted as far as their fields allow), and a table
of all rows.

End-to-end rows (``perf/bench_e2e.py``: rows with an ``e2e`` object, files
``<date>-<device>-e2e.json``) get their own table, "End to end", one line per (model, size,
config, mode): tokens/s or images/s, speedup against the dense (unfused) row of the same mode,
weight and peak-memory bytes, the output check, and why a row did not run. They are left out of
the kernel summary and the plots (whose axis is a kernel's M), and shown in the table of all rows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress_ops._validate import is_number
from compress_ops.perf import schema

#: Providers that are the dense baseline (speedup 1 by definition; drawn as a reference line).
BASELINE_PROVIDERS = frozenset({"cublas-dense", "dense"})


@dataclass
class Loaded:
    """All results files of a folder: rows tagged with their file, and every problem found."""

    files: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, meta)
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, message)


# not benchmark results: the static model's predictions, the quick GPU check's own schema and
# perf/gpu_diag.py's diagnostic rows
OTHER_FILES = ("static-triton*.json", "*-quick-*.json", "*-diag*-*.json")


def load_dir(results_dir: Path) -> Loaded:
    """Read every benchmark ``*.json`` of ``results_dir`` (not :data:`OTHER_FILES`); problems
    are collected, not raised."""
    out = Loaded()
    for path in sorted(Path(results_dir).glob("*.json")):
        if any(path.match(pat) for pat in OTHER_FILES):
            continue
        obj, problems = schema.load_results(path)
        out.problems.extend((path.name, p) for p in problems)
        if not isinstance(obj, dict):
            continue
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        out.files.append((path.name, meta))
        rows = obj.get("rows") if isinstance(obj.get("rows"), list) else []
        for r in rows:
            if isinstance(r, dict):
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
    """(kernel, shape without the swept dim, dtype): one row of plots."""
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


# ---------------------------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------------------------


def render_png(loaded: Loaded, path: Path) -> None:
    """Speedup and % of peak over M, one row of axes per panel key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = defaultdict(list)
    kernel_rows = [r for r in loaded.rows if not is_e2e(r)]
    for r in kernel_rows:
        if _xkey(_shape(r)) is not None:
            panels[panel_key(r)].append(r)
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no plottable results", ha="center", va="center")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return

    lines = sorted({line_key(r) for r in kernel_rows})
    providers = sorted({lk[2] for lk in lines})
    machines = sorted({(lk[0], lk[1]) for lk in lines})
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(i % 10) for i, p in enumerate(providers)}
    styles = ["-", "--", ":", "-."]
    style = {mc: styles[i % len(styles)] for i, mc in enumerate(machines)}

    keys = sorted(panels)
    fig, axes = plt.subplots(len(keys), 2, figsize=(14, 3.3 * len(keys)), squeeze=False)
    for row_axes, key in zip(axes, keys, strict=True):
        ax_s, ax_p = row_axes
        by_line: dict[tuple, list[dict]] = defaultdict(list)
        for r in panels[key]:
            by_line[line_key(r)].append(r)
        for lk, rs in sorted(by_line.items()):
            rs = sorted(rs, key=lambda r: _shape(r).get(_xkey(_shape(r)), 0))
            label = f"{lk[2]} [{lk[3]}] {lk[0]} @{lk[1]}"
            kw = dict(color=color[lk[2]], linestyle=style[(lk[0], lk[1])])
            xs = [_shape(r)[_xkey(_shape(r))] for r in rs]
            if lk[2] not in BASELINE_PROVIDERS:
                pts = [(x, _num(r.get("speedup_vs_dense"))) for x, r in zip(xs, rs, strict=True)]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax_s.plot(*zip(*pts, strict=True), marker="o", label=label, **kw)
            pts = [(x, _num(r.get("pct_peak")), r.get("peak_kind"))
                   for x, r in zip(xs, rs, strict=True)]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax_p.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **kw)
                for x, y, kind in pts:
                    ax_p.plot(x, y, marker="o" if kind == "hbm" else "^", color=kw["color"])
        kernel, rest, dtype = key
        ax_s.axhline(1.0, color="gray", linewidth=1)
        ax_s.set_title(f"{kernel}  {rest}  {dtype}: speedup vs dense", fontsize=9)
        ax_p.set_title(f"{kernel}  {rest}  {dtype}: % of measured peak "
                       "(o bandwidth, ^ FLOP/s)", fontsize=9)
        for ax in row_axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M")
            ax.grid(True, alpha=0.3)
        ax_s.set_ylabel("x dense (higher is better)")
        ax_p.set_ylabel("% of peak")
        for ax in row_axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="best")
    fig.suptitle("compress_ops benchmarks (dense = 1.0)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.995))
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
.win { background: #d8f5d8; } .lose { background: #f8dada; }
.bad { background: #fff0c0; }
.problems li { color: #a00; }
img { max-width: 100%; }
"""


def render_html(loaded: Loaded, path: Path, png_name: str | None) -> None:
    """The dashboard page (picture referenced by relative name)."""
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>compress_ops benchmarks</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>compress_ops benchmarks</h1>",
        f"<p>Generated {e(now)} from {len(loaded.files)} results file(s), "
        f"{len(loaded.rows)} row(s). Speedup = dense time / provider time for the same case "
        "(dense = cuBLAS <code>F.linear</code> on GPU, <code>F.linear</code> on CPU). "
        "% of peak is against peaks measured on the same machine in the same run: memory "
        "bandwidth (a large copy) for memory-bound cases, matmul FLOP/s of the dtype otherwise. "
        "CPU rows time the CPU paths (backend <code>cpu-reference</code>, "
        "<code>cpu-dense</code>), not the GPU kernels.</p>",
    ]

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

    if png_name is not None:  # None: no plots (matplotlib is not installed)
        parts.append(f"<h2>Plots</h2><p><img src='{e(png_name)}' alt='benchmark plots'></p>")

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
    try:
        render_png(loaded, png)
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print("dashboard: matplotlib is not installed (pip install 'compress_ops[bench]'): "
              "the HTML tables are written without the plots", file=sys.stderr)
        png = None
    render_html(loaded, out_html, None if png is None else png.name)
    for f, msg in loaded.problems:
        print(f"dashboard: problem: {f}: {msg}", file=sys.stderr)
    print(f"dashboard: {len(loaded.files)} file(s), {len(loaded.rows)} row(s), "
          f"{len(loaded.problems)} problem(s) -> {out_html}" + (f", {png}" if png else ""))
    return 1 if (args.strict and loaded.problems) else 0


if __name__ == "__main__":
    raise SystemExit(main())
