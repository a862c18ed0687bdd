"""Command line: ``python -m compress_ops {demo,bench} [options]``."""

from __future__ import annotations

import sys
from pathlib import Path


def _perf_dir() -> Path | None:
    """``perf/`` of the source checkout (the benchmarks are not part of the wheel)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "perf" / "bench.py").is_file():
            return base / "perf"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m compress_ops {demo,bench} [--help]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("  demo   compress a built-in model every way, check it, time it, print a table")
        print("  bench  run the benchmark suite -> perf/results/<stamp>.json (+ --dashboard)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from compress_ops.demo import main as demo_main

        return demo_main(rest)
    if cmd == "bench":
        perf = _perf_dir()
        if perf is None:
            print("bench needs a source checkout (perf/bench.py not found)", file=sys.stderr)
            return 2
        sys.path.insert(0, str(perf))
        import bench  # perf/bench.py

        return bench.main(rest)
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
