"""Where a benchmark runs: device names and their file-name slug, CPU model, versions, commit,
load, and whether this package runs from a source checkout or from an installed copy.

Nothing here depends on the rest of :mod:`compress_ops.perf`; the results schema
(:mod:`compress_ops.perf.schema`) builds on it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

#: This package's folder: ``perf/`` of a checkout, or ``.../site-packages/compress_ops/perf``.
PERF_DIR = Path(__file__).resolve().parent
#: The folder above it: the checkout's root when :func:`source_checkout` says so.
REPO_ROOT = PERF_DIR.parent


def source_checkout() -> Path | None:
    """The root of the source checkout this package runs from, or ``None`` for an installed copy.

    A checkout (the repository itself, or an editable install of it) has ``pyproject.toml``
    above ``perf/`` and the committed ``perf/results/``; a regular install (a wheel) has neither.
    """
    if (REPO_ROOT / "pyproject.toml").is_file() and (PERF_DIR / "results").is_dir():
        return REPO_ROOT
    return None


@dataclass
class Env:
    """What a row says about where it ran."""

    device: str
    torch: str
    triton: str
    git_sha: str


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_device(choice: str, prog: str) -> torch.device | None:
    """The ``--device`` of a benchmark: ``"auto"`` is CUDA when present, else the CPU; None
    (after saying why on stderr, as ``prog``) for ``cuda`` without a CUDA device."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but no CUDA device is available", file=sys.stderr)
        return None
    return device


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


def git_sha(repo: Path | None = None) -> str:
    """Short commit of ``repo`` (``+dirty`` when the tree has changes), else ``"unknown"``.

    ``repo`` defaults to the source checkout this package runs from; an installed copy has no
    commit of its own, so there the answer is ``"unknown"`` (not the commit of whatever
    repository the current directory or the environment happens to sit in).
    ``COMPRESS_OPS_GIT_SHA`` overrides (a checkout copied without ``.git``, e.g. a GPU box).
    """
    env = os.environ.get("COMPRESS_OPS_GIT_SHA")
    if env:
        return env
    repo = repo if repo is not None else source_checkout()
    if repo is None:
        return "unknown"
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
