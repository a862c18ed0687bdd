"""Importing torchvision (and so transformers, which imports it) on a torch without
torchvision's compiled ops: used by the test suite (``tests/conftest.py``) and the benchmarks
that build torchvision, timm or Hugging Face models (``bench_e2e``, ``models_table``).

The torchvision wheel on the package index is built against the CUDA torch of the same
release; with the CPU wheel pinned for development its ``_C`` extension does not load, and the
import then fails while it registers fake impls for ``torchvision::nms`` ("operator
torchvision::nms does not exist"), though its models are pure Python. Defining the two op
schemas it registers fakes for (``nms``, ``qnms``; no kernel behind them, so calling them
raises) lets the import finish. The library itself never imports torchvision.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["import_torchvision"]

_SCHEMAS: list = []  # the definitions live as long as the library objects


def import_torchvision() -> bool:
    """Import torchvision if it is installed; True when the workaround above was needed
    (False also when torchvision is not installed: then nothing that needs it can run)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        if not _SCHEMAS:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _SCHEMAS.append(lib)
        import torchvision  # noqa: F401
        return True
    return False
