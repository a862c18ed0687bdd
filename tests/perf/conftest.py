"""Make ``perf/`` (scripts, not an installed package) importable for these tests."""

import sys
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parents[2] / "perf"
if str(PERF_DIR) not in sys.path:
    sys.path.insert(0, str(PERF_DIR))
