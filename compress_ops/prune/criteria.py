"""Pruning criteria: a saliency per weight (larger means keep), and the calibration passes that
measure what they need (activation norms for Wanda, the diagonal Fisher for OBD)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from compress_ops.calibrate import eval_mode, run_batch, run_with_hooks

__all__ = ["eval_mode", "run_batch", "magnitude_scores", "wanda_scores", "obd_scores",
           "activation_norms", "fisher_diagonal"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|w|``."""
    return weight.detach().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|w[n, j]| * ||x_j||``: ``input_norms [in_features]`` (or ``[C_in]`` for a conv,
    broadcast over its kernel) from :func:`activation_norms`."""
    w = weight.detach()
    if input_norms.shape != (w.shape[1],):
        raise ValueError(f"input_norms shape {tuple(input_norms.shape)} must be "
                         f"({w.shape[1]},): one norm per input feature")
    return w.abs() * input_norms.to(w.dtype).reshape(1, -1, *([1] * (w.dim() - 2)))


def obd_scores(weight: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``F_jj w_j^2 / 2``: the loss increase of removing ``w_j`` under a diagonal quadratic
    model (Optimal Brain Damage), ``fisher`` from :func:`fisher_diagonal` (same shape)."""
    if fisher.shape != weight.shape:
        raise ValueError(f"fisher shape {tuple(fisher.shape)} must equal the weight's "
                         f"{tuple(weight.shape)}")
    return 0.5 * fisher.to(weight.dtype) * weight.detach().pow(2)


@torch.no_grad()
def activation_norms(model: nn.Module, batches: Iterable, layers: dict[str, nn.Module],
                     forward: Callable[[nn.Module, object], object] | None = None
                     ) -> dict[str, torch.Tensor]:
    """``{name: ||x_j||_2}`` per input feature of each ``nn.Linear`` / ``nn.Conv2d`` in
    ``layers``, over every token / pixel of the calibration ``batches`` (``forward(model,
    batch)`` runs one; default as :func:`run_batch`: ``model(**batch)`` for a mapping,
    ``model(batch[0])`` for tuples, else ``model(batch)``)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod, args, out):
            x = args[0].detach().float()
            x = x.movedim(1, -1) if isinstance(mod, nn.Conv2d) else x
            s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return fn

    run_with_hooks(model, [m.register_forward_hook(hook(n)) for n, m in layers.items()],
                   batches, forward)
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"layers never ran on the calibration data: {missing}")
    return {n: s.sqrt() for n, s in sums.items()}


def _batch_targets(batch: object) -> object:
    """The targets ``loss_fn(outputs, targets)`` gets for a calibration ``batch``: the second
    element of a tuple / list ``(inputs, targets, ...)``, else the batch itself (a mapping such
    as ``{"input_ids": ..., "labels": ...}``, whose loss reads what it needs from it, or a
    tensor)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    return batch


def fisher_diagonal(model: nn.Module, batches: Iterable, loss_fn: Callable,
                    params: dict[str, nn.Parameter],
                    forward: Callable[[nn.Module, object], object] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``E[g^2]`` of each parameter in ``params`` over the
    calibration ``batches``: one backward per batch of ``loss_fn(outputs, targets)``, in eval
    mode; every gradient of the model is left as it was. ``outputs`` is what
    :func:`run_batch` returns (``forward(model, batch)``; by default ``model(**batch)`` for a
    mapping, ``model(batch[0])`` for a tuple / list, else ``model(batch)``), ``targets`` what
    :func:`_batch_targets` picks (``batch[1]`` of ``(inputs, targets)``, else the batch itself:
    a loss on a mapping batch reads its labels from it)."""
    everything = list(dict.fromkeys([*model.parameters(), *params.values()]))
    saved = [p.grad for p in everything]
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    try:
        with eval_mode(model):
            for batch in batches:
                for p in everything:
                    p.grad = None
                loss = loss_fn(run_batch(model, batch, forward), _batch_targets(batch))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                           else type(loss).__name__)
                    raise ValueError(f"loss_fn(outputs, targets) must return a scalar tensor "
                                     f"to backpropagate, got {got}")
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += p.grad.detach().float().pow(2)
                count += 1
    finally:
        for p, g in zip(everything, saved, strict=True):
            p.grad = g
    if count == 0:
        raise ValueError("fisher_diagonal needs at least one calibration batch")
    return {n: a / count for n, a in acc.items()}
