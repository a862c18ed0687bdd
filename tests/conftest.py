"""Test-suite setup: the Triton interpreter on machines without CUDA, hypothesis profiles.

``TRITON_INTERPRET`` must be set before triton is first imported, so this runs before any
project import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile


def _has_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# A fresh torch.compile cache per run: a warm one can hand back a graph compiled from an older
# checkout (AOTAutograd's key does not cover a custom op's autograd formula,
# pytorch/pytorch#144344), and a test must not pass or fail on what a previous run left.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      tempfile.mkdtemp(prefix="compress-ops-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from compress_ops.perf.compat import import_torchvision  # noqa: E402

# Under pytest-xdist (make test: two workers on two cores) each worker gets one intra-op thread:
# two workers of two threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# torchvision (a test dependency: the real-model tests build its models, and timm's) on a
# torch without its compiled ops: see compress_ops.perf.compat. Only the test process and the
# benchmarks do this; the library never imports torchvision.
import_torchvision()

_COMMON = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", max_examples=40, **_COMMON)
settings.register_profile("gpu", max_examples=50, **_COMMON)  # with larger shapes (tests)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernels run: CUDA when present, else the CPU under the Triton interpreter."""
    return DEVICE


@pytest.fixture(params=["reference", "triton"])
def op_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Device to run an op on, covering both implementations of every op.

    ``reference``: CPU tensors, the CPU path. ``triton``: the Triton kernel — on CUDA when a GPU
    is present, else CPU tensors routed through the interpreter.
    """
    if request.param == "reference":
        monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "triton")
    return "cpu"
