"""Shared by the kernel tests: the NaN-poisoned output allocator."""

from __future__ import annotations

import pytest
import torch

from compress_ops.kernels import _launch


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs start as NaN, so any element the kernel does not write fails."""
    monkeypatch.setattr(_launch, "_empty", lambda *s, **kw: torch.full(*s, float("nan"), **kw))
