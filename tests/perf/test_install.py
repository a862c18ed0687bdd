"""``python -m compress_ops bench`` from a regular (non-editable) install, outside the checkout.

The test session imports this checkout through its editable install, whose import hook (a
``.pth`` file in the session's site-packages) would serve the checkout to any interpreter that
processes that site-packages. So the package is built from a copy of the sources and installed
into the site-packages of a fresh virtual environment (no pip, no editable hook), which reaches
the session's third-party packages (torch, numpy, triton) through plain path entries: a path
entry adds a folder to ``sys.path`` but runs none of that folder's ``.pth`` files, so the
editable hook never loads and the installed copy is what ``import compress_ops`` finds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compress_ops.perf import schema

REPO = Path(__file__).resolve().parents[2]
#: What a build of the package reads (pyproject.toml names README.md as the readme).
SOURCES = ("pyproject.toml", "README.md", "compress_ops", "kernels", "integrations", "perf")

PROBE = """
import json, sys
import compress_ops, compress_ops.kernels, compress_ops.perf.bench
from compress_ops.perf import machine, schema
print(json.dumps({
    "files": [compress_ops.__file__, compress_ops.kernels.__file__,
              compress_ops.perf.bench.__file__],
    "checkout": str(machine.source_checkout()),
    "results_dir": str(schema.default_results_dir()),
    "editable_hook": any("editable" in type(f).__name__.lower() or
                         "editable" in getattr(f, "__name__", "").lower() for f in sys.meta_path),
}))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _fresh_install(tmp: Path) -> tuple[Path, Path]:
    """A new venv with a regular install of a copy of this checkout: (python, site-packages)."""
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .stdout.strip())
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(src)])
    deps = [p for p in sys.path
            if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (site / "zz_test_session_packages.pth").write_text("\n".join(deps) + "\n")
    return python, site


@pytest.mark.slow
def test_bench_runs_from_a_regular_install_outside_the_checkout(tmp_path: Path) -> None:
    python, site = _fresh_install(tmp_path)
    installed = site / "compress_ops"
    assert (installed / "perf" / "bench.py").is_file()
    assert not (installed / "perf" / "results").exists()  # results stay in the repository
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"

    probe = json.loads(_run([str(python), "-c", PROBE], cwd=work, env=env)
                       .stdout.strip().splitlines()[-1])
    for f in probe["files"]:
        assert Path(f).resolve().is_relative_to(installed.resolve()), probe
    assert not probe["editable_hook"], probe
    assert probe["checkout"] == "None"
    assert Path(probe["results_dir"]) == work / "perf-results"

    out = tmp_path / "r.json"
    _run([str(python), "-m", "compress_ops", "bench", "--device", "cpu", "--quick",
          "--families", "lowrank", "--out", str(out)], cwd=work, env=env)
    obj, problems = schema.load_results(out)
    assert out.is_file() and problems == []
    assert obj["meta"]["complete"] is True and obj["meta"]["families"] == ["lowrank"]
    assert {r["kernel"] for r in obj["rows"]} == {"lowrank_linear"}
    assert all(r["median_us"] for r in obj["rows"])
