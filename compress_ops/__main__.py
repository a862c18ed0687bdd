"""Command line: ``python -m compress_ops {demo,bench,dashboard} [options]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m compress_ops {demo,bench,dashboard} [--help]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("  demo       compress a built-in model every way, check it, time it, print a table")
        print("  bench      run the benchmark suite -> <date>-<device>.json in perf/results/ of a")
        print("             source checkout, else in ./perf-results/ (+ --dashboard)")
        print("  dashboard  render every results file into dashboard.html + dashboard.png")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from compress_ops.demo import main as demo_main

        return demo_main(rest)
    if cmd == "bench":
        from compress_ops.perf.bench import main as bench_main

        return bench_main(rest)
    if cmd == "dashboard":
        from compress_ops.perf.dashboard import main as dashboard_main

        return dashboard_main(rest)
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
