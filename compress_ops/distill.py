"""Knowledge distillation: train a compressed (or smaller) student against a dense teacher.

* :class:`DistillationLoss` -- Hinton et al. (2015): ``alpha * T^2 * KL(softmax(t / T) ||
  softmax(s / T)) + (1 - alpha) * CE(s, y)``, plus optional feature matching (mean squared
  error between named layers' outputs of student and teacher).
* :func:`fit` -- a small training loop (teacher frozen in eval mode, progress bar) usable for
  retraining after compression and for training a student; with ``teacher=None`` it trains on
  the labels alone (the "trained alone" baseline).

Plain PyTorch: runs on the CPU.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from compress_ops._validate import check_int, check_number

__all__ = ["DistillationLoss", "fit"]


class DistillationLoss(nn.Module):
    """``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y) + feature_weight * sum MSE``.

    ``p = softmax(logits / T)``; the ``T^2`` keeps the soft term's gradients on the scale of
    the hard term's as ``T`` changes. ``feature_layers`` maps student module names to teacher
    module names whose outputs :func:`fit` matches (equal shapes; mean squared error).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9,
                 feature_layers: dict[str, str] | None = None,
                 feature_weight: float = 1.0) -> None:
        super().__init__()
        check_number("temperature", temperature, low=0.0, low_open=True)
        check_number("alpha", alpha, low=0.0, high=1.0)
        check_number("feature_weight", feature_weight, low=0.0)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.feature_layers = dict(feature_layers or {})
        self.feature_weight = float(feature_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                labels: torch.Tensor, student_features: dict[str, torch.Tensor] | None = None,
                teacher_features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        hard = F.cross_entropy(student_logits, labels)
        if teacher_logits is None:
            return hard
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ")
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, -1),
                        F.log_softmax(teacher_logits.detach() / t, -1),
                        reduction="batchmean", log_target=True) * t * t
        loss = self.alpha * soft + (1 - self.alpha) * hard
        for s_name, t_name in self.feature_layers.items():
            fs, ft = (student_features or {}).get(s_name), (teacher_features or {}).get(t_name)
            if fs is None or ft is None:
                raise ValueError(f"feature pair {s_name!r} -> {t_name!r} was not captured")
            if fs.shape != ft.shape:
                raise ValueError(f"feature shapes differ: student {s_name} {tuple(fs.shape)}, "
                                 f"teacher {t_name} {tuple(ft.shape)}")
            loss = loss + self.feature_weight * F.mse_loss(fs, ft.detach())
        return loss


def _capture(model: nn.Module, names: Iterable[str]) -> tuple[dict, list]:
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"no module named {name!r} in {type(model).__name__}") from exc
        hooks.append(module.register_forward_hook(
            lambda m, a, o, name=name: out.__setitem__(name, o)))
    return out, hooks


class _Progress:
    """tqdm when installed, else a plain line on stderr every ~2 s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.n, self.t0, self.last = total, enabled, 0, 0.0, 0.0
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc="fit", leave=False)
            except ImportError:
                self.t0 = self.last = time.perf_counter()

    def update(self, loss: float) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        now = time.perf_counter()
        if now - self.last > 2.0 or self.n == self.total:
            self.last = now
            print(f"\rfit {self.n}/{self.total} loss {loss:.4f} ({now - self.t0:.0f} s)",
                  end="\n" if self.n == self.total else "", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(student: nn.Module, teacher: nn.Module | None,
        data: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
        optimizer: torch.optim.Optimizer, loss: DistillationLoss | None = None, *,
        device: torch.device | str | None = None, progress: bool = True,
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` for ``steps`` optimizer steps on ``(inputs, labels)`` batches of
    ``data`` (cycled when shorter), against ``teacher`` (frozen, eval mode, no gradients) with
    ``loss`` (default ``DistillationLoss()``); ``teacher=None`` trains on the labels alone.
    Returns the loss of every step. ``on_step(step, loss)`` is called after each step.
    """
    check_int("steps", steps, min=1)
    loss_fn = loss if loss is not None else DistillationLoss()
    if teacher is None and loss_fn.feature_layers:
        raise ValueError("feature matching needs a teacher")
    s_feats, s_hooks = _capture(student, loss_fn.feature_layers.keys())
    t_feats, t_hooks = ({}, []) if teacher is None else _capture(
        teacher, loss_fn.feature_layers.values())
    was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    student.train()
    history: list[float] = []
    bar = _Progress(steps, progress)
    batches = itertools.cycle(data) if not isinstance(data, torch.utils.data.DataLoader) \
        else itertools.chain.from_iterable(itertools.repeat(data))
    try:
        for step, (x, y) in zip(range(steps), batches, strict=False):
            if device is not None:
                x, y = x.to(device), y.to(device)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            value = loss_fn(student(x), t_logits, y, s_feats, t_feats)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            history.append(value.item())
            bar.update(history[-1])
            if on_step is not None:
                on_step(step, history[-1])
    finally:
        bar.close()
        for h in s_hooks + t_hooks:
            h.remove()
        if teacher is not None:
            teacher.train(was_training)
    return history
