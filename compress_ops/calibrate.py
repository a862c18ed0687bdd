"""Calibration passes: running a model on a user's batches and collecting what one-shot
methods need from each layer's inputs (the Hessian ``H = 2 X^T X / n`` of GPTQ and SparseGPT).

Batches are run as :func:`run_batch` runs them (``model(**batch)`` for a mapping, ``model(x)``
for ``(x, y)`` tuples, else ``model(batch)``; or the user's ``forward(model, batch)``), in eval
mode, without gradients. Each layer here is calibrated from the dense model's inputs; the
layers' inputs are never the already-compressed ones of earlier layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from compress_ops._linear import in_features

__all__ = ["eval_mode", "run_batch", "run_with_hooks", "input_hessians"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run calibration in eval mode (BatchNorm statistics untouched, dropout off); every
    module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def run_batch(model: nn.Module, batch, forward: Callable[[nn.Module, object], object] | None):
    """Run one calibration ``batch``: ``forward(model, batch)``, or by default ``model(**batch)``
    for a mapping (a Hugging Face ``BatchEncoding``, ``{"input_ids": ...}``), ``model(batch[0])``
    for a tuple / list (``(x, y)`` from a DataLoader), else ``model(batch)``."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def run_with_hooks(model: nn.Module, hooks: list, batches: Iterable,
                   forward: Callable[[nn.Module, object], object] | None = None) -> int:
    """Run every batch (:func:`run_batch`, eval mode), then remove ``hooks`` (the handles the
    caller registered to collect what it needs), also on an error; returns the batch count."""
    ran = 0
    try:
        with eval_mode(model):
            for batch in batches:
                run_batch(model, batch, forward)
                ran += 1
    finally:
        for h in hooks:
            h.remove()
    return ran


@torch.no_grad()
def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                   forward: Callable[[nn.Module, object], object] | None = None, *,
                   strict: bool = True) -> dict[str, torch.Tensor]:
    """``{name: H}`` with ``H = 2 X^T X / n`` (float32 ``[K, K]``, on the layer's device) over
    every row ``x`` (a token, a sample) each linear layer of ``layers`` (``nn.Linear`` or
    Hugging Face ``Conv1D``) reads on ``batches``. ``ValueError`` for a layer that never ran
    (``strict=False``: it is left out), for non-finite inputs (named), and for no batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, k: int):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, k).float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"calibration: the inputs of {name} hold NaN or Inf; GPTQ's "
                                 f"Hessian needs finite activations")
            h = x.t() @ x
            sums[name] = sums[name] + h if name in sums else h
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    hooks = [m.register_forward_hook(hook(n, in_features(m))) for n, m in layers.items()]
    if run_with_hooks(model, hooks, batches, forward) == 0:
        raise ValueError("calibration needs at least one batch (calib= was empty)")
    missing = [n for n in layers if n not in sums]
    if missing and strict:
        raise ValueError(f"layers never ran on the calibration data: {missing}")
    return {n: 2.0 * s / counts[n] for n, s in sums.items()}
