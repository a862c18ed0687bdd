"""The benchmark suite: runs every kernel family's ``bench_<family>`` module and writes results.

    python -m compress_ops bench [--quick] [--device auto|cpu|cuda] [--out PATH] [--dashboard]
                                 [--dashboard-dir DIR] [--families sparse24,...]
    python -m compress_ops.perf.bench [same options]

One results file per run (a rerun on the same day and device replaces it). Where it goes by
default (``--out`` overrides):

* run from a source checkout (the repository, or an editable install of it):
  ``perf/results/<YYYY-MM-DD>-<device-slug>.json`` of that checkout, whatever the current
  directory;
* run from an installed copy (``pip install .``): ``./perf-results/<YYYY-MM-DD>-<device-slug>.json``
  under the current directory.

The file is rewritten after every row with ``meta.complete = false``, so a run cut short by a
timeout still leaves its measurements; ``complete`` becomes ``true`` at the end. ``--dashboard``
then renders every results file in the output's folder into ``dashboard.html`` + ``.png``:
``perf/`` of the checkout for its default folder, else next to the results (``--dashboard-dir``
overrides).

A family module (``compress_ops.perf.bench_<family>``) provides ``KERNEL``, ``BASELINES``
(dense providers), ``dtypes(device, quick)`` and ``run(device, env, peaks, quick=, log=) ->
Iterator[Row]`` (see :mod:`compress_ops.perf.family`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from compress_ops.perf import machine, schema, timing

#: Kernel families, in run order: module ``compress_ops.perf.bench_<name>``.
FAMILIES: tuple[str, ...] = ("sparse24", "dequant", "lowrank", "dwsep_conv", "w8a8", "hashed")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: perf/results/<date>-<device>.json of a checkout, "
                        "else ./perf-results/<date>-<device>.json)")
    p.add_argument("--dashboard", action="store_true", help="render the dashboard afterwards")
    p.add_argument("--dashboard-dir", type=Path, default=None,
                   help="where dashboard.html/.png go (default: perf/ of a checkout for its "
                        "default results folder, else the results file's folder)")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated subset of {','.join(FAMILIES)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0, or 1 when a family failed outright (its rows are missing)."""
    args = _parse(argv)
    device = machine.resolve_device(args.device, "bench")
    if device is None:
        return 2
    names = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        print(f"bench: unknown families {unknown}; known: {list(FAMILIES)}", file=sys.stderr)
        return 2
    modules = [importlib.import_module(f"compress_ops.perf.bench_{f}") for f in names]

    t0 = time.perf_counter()
    load_at_start = machine.load_avg()  # before this run adds its own load
    env = machine.make_env(device)
    out = args.out or schema.results_path(env.device)
    print(f"bench: device={env.device} torch={env.torch} triton={env.triton} "
          f"git={env.git_sha} quick={args.quick} -> {out}", flush=True)

    dts = sorted({d for m in modules for d in m.dtypes(device, args.quick)}, key=str)
    peaks = timing.measure_peaks(device, dts, quick=args.quick)
    flops_s = ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peaks.flops_tflops.items())
    print(f"bench: measured peaks: {peaks.hbm_gbps:.1f} GB/s, {flops_s}", flush=True)

    baselines = [b for m in modules for b in m.BASELINES]
    rows: list[schema.Row] = []
    errors: list[str] = []

    def save(complete: bool) -> None:
        schema.fill_speedups(rows, baselines)
        meta = schema.make_meta(
            device, env, peaks, argv=list(sys.argv[1:] if argv is None else argv),
            quick=args.quick, families=names, complete=complete,
            duration_s=round(time.perf_counter() - t0, 1), errors=errors,
            load_avg=load_at_start)
        schema.write_results(out, meta, rows)

    for name, mod in zip(names, modules, strict=True):
        print(f"bench: family {name}", flush=True)
        try:
            for row in mod.run(device, env, peaks, quick=args.quick,
                               log=lambda s: print(s, flush=True)):
                rows.append(row)
                save(complete=False)
        except Exception as e:  # noqa: BLE001 - keep the other families and the partial file
            traceback.print_exc()
            errors.append(f"{name}: {type(e).__name__}: {e}")
    save(complete=True)
    problems = schema.validate_results(schema.load_results(out)[0])
    for p in problems:
        print(f"bench: results problem: {p}", file=sys.stderr)
    print(f"bench: wrote {len(rows)} rows to {out} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    _print_summary(rows)

    rc = 1 if (errors or problems) else 0
    if args.dashboard:
        from compress_ops.perf import dashboard

        default_dir = out.resolve().parent == schema.default_results_dir().resolve()
        ddir = args.dashboard_dir or (schema.default_dashboard_dir() if default_dir
                                      else out.resolve().parent)
        rc = max(rc, dashboard.main(["--results-dir", str(out.resolve().parent),
                                     "--out-dir", str(ddir)]))
    return rc


def _print_summary(rows: list[schema.Row]) -> None:
    """Speedup vs dense per case, one line per provider."""
    print(f"{'kernel':<16} {'provider':<30} {'dtype':<9} {'M':>5} {'N':>6} {'K':>6} "
          f"{'us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'%peak':>10} {'x dense':>8}")
    for r in rows:
        s = r.shape

        def f(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"

        pk = f"{f(r.pct_peak, '.1f')} {r.peak_kind or ''}".strip()
        print(f"{r.kernel:<16} {r.provider:<30} {r.dtype:<9} {s.get('M', ''):>5} "
              f"{s.get('N', ''):>6} {s.get('K', ''):>6} {f(r.median_us, '.1f'):>10} "
              f"{f(r.tflops, '.2f'):>8} {f(r.gbps, '.1f'):>8} {pk:>10} "
              f"{f(r.speedup_vs_dense, '.2f'):>8}")


if __name__ == "__main__":
    raise SystemExit(main())
