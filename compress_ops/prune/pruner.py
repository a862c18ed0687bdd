"""The :class:`Pruner`: keep-masks applied during training (a parametrization of each pruned
weight), updated on a schedule, then finalized into the compressed model."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_ops._linear import LINEAR_TYPES, from_oriented, is_conv1d, oriented, plain_linear
from compress_ops._swap import after_compress, replace_everywhere
from compress_ops._swap import index as module_index
from compress_ops._validate import check_int, check_number
from compress_ops.nn.sparse24 import Sparse24Linear
from compress_ops.prune.criteria import (
    activation_norms,
    fisher_diagonal,
    magnitude_scores,
    obd_scores,
    wanda_scores,
)
from compress_ops.prune.masks import (
    cubic_sparsity,
    is_nm,
    nm_kept,
    nm_mask,
    nm_permutation,
    structured_mask,
    unstructured_masks,
)
from compress_ops.structured import channel_groups, prune_channels, select_channels

__all__ = ["Pruner"]


_PATTERNS = ("unstructured", "channel")
_CRITERIA = ("magnitude", "wanda", "obd")


class Pruner:
    """Masks applied during training: dense weights seen through a keep-mask (a
    ``torch.nn.utils.parametrize`` parametrization, ``weight = original * keep``), so masked
    weights are exactly zero in every forward and get no gradient, under any optimizer
    (momentum and weight decay move only the hidden original, which :meth:`step` re-zeroes);
    then :meth:`finalize` into the compressed model. The masks are buffers of the model: they
    follow ``.to()``. Build the optimizer after the ``Pruner`` if ``permute=True`` (the
    permuted layers are new modules); otherwise before or after.

    ``pattern``:

    * ``"unstructured"`` -- the ``sparsity`` fraction of lowest scores per layer
      (``scope="layer"``) or over all layers (``"global"``). Finalized layers stay dense
      ``nn.Linear`` / ``nn.Conv2d`` with zeros (no kernel here is faster on unstructured zeros).
    * ``"n:m"`` such as ``"2:4"`` -- the ``n`` best of every ``m`` consecutive inputs (fixed 50%
      for 2:4: leave ``sparsity`` at ``None``). 2:4 ``nn.Linear`` layers finalize to
      :class:`~compress_ops.nn.Sparse24Linear`; other layers stay masked-dense.
    * ``"channel"`` -- whole output channels of the coupled groups that
      :func:`compress_ops.structured.channel_groups` proves removable from a ``torch.fx`` trace
      on ``example_inputs`` (residual producers share one mask); the masks zero the producers'
      rows and biases and the following BatchNorms' affine parameters. Finalize removes the
      dead channels with :func:`compress_ops.structured.prune_channels` (``zero_only``), which
      folds a dead channel's constant (e.g. ``sigmoid(0)``) into the next layer's bias where
      that is exact and keeps the channel where it is not (listed in ``skipped``): a
      physically smaller dense model with the masked model's outputs (in eval mode).

    ``criterion``: ``"magnitude"``, ``"wanda"`` (activation norms measured once on ``calib``
    batches), ``"obd"`` (diagonal Fisher measured once on ``calib`` batches of ``(inputs,
    targets)`` with ``loss_fn``), or a callable ``(name, module) -> scores`` shaped like the
    weight. Scores are recomputed from the current weights at every mask update.

    ``schedule=(start, end)``: gradual pruning, Zhu & Gupta's :func:`cubic_sparsity` from
    ``initial_sparsity`` at ``start`` to ``sparsity`` at ``end``, masks updated every
    ``update_every`` calls of :meth:`step` (call it once per optimizer step, e.g. as
    ``distill.fit(..., on_step=pruner.step)``). Without a schedule the masks are set once, now.
    Pruned weights are zero, so they score lowest at the next update: masks only grow.
    ``layers``: qualified names of ``nn.Linear`` / ``nn.Conv2d`` layers (default: all of them;
    for ``"channel"``, those whose channels can be removed; a listed layer coupled with others
    through a residual add must be listed with them).

    ``permute=True`` (N:M only; needs ``example_inputs``): before masking, permute each N:M
    layer's input channels to keep more saliency (:func:`nm_permutation`, as NVIDIA's ASP
    does) and fold the permutation into the layers that produce those channels, so the model
    still computes exactly the same function. ``permuted`` lists the kept saliency before and
    after per layer; layers it could not permute are in ``skipped``.
    """

    def __init__(self, model: nn.Module, sparsity: float | None = 0.5, *,
                 pattern: str = "unstructured", criterion: str | Callable = "magnitude",
                 scope: str = "layer", layers: Iterable[str] | None = None,
                 schedule: tuple[int, int] | None = None, initial_sparsity: float = 0.0,
                 update_every: int = 1, calib: Iterable | None = None,
                 loss_fn: Callable | None = None,
                 forward: Callable[[nn.Module, object], object] | None = None,
                 example_inputs: tuple | None = None, permute: bool = False) -> None:
        if pattern not in _PATTERNS and not is_nm(pattern):
            raise ValueError(f"pattern must be 'unstructured', 'channel' or 'n:m' (e.g. '2:4'), "
                             f"got {pattern!r}")
        self.nm = tuple(int(v) for v in pattern.split(":")) if is_nm(pattern) else None
        if self.nm is not None:
            if sparsity is not None or schedule is not None:
                raise ValueError(f"an {pattern} mask has a fixed sparsity: pass sparsity=None "
                                 f"and no schedule")
        else:
            check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
            check_number("initial_sparsity", initial_sparsity, low=0.0, high=1.0, high_open=True)
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global" and pattern != "unstructured":
            raise ValueError("scope='global' applies to the unstructured pattern only")
        if not callable(criterion) and criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {_CRITERIA} or a callable, "
                             f"got {criterion!r}")
        if criterion in ("wanda", "obd") and calib is None:
            raise ValueError(f"criterion {criterion!r} needs calibration batches (calib=)")
        if criterion == "obd" and loss_fn is None:
            raise ValueError("criterion 'obd' needs loss_fn(outputs, targets)")
        if schedule is not None:
            start, end = schedule
            if end <= start:
                raise ValueError(f"schedule end ({end}) must be after start ({start})")
        check_int("update_every", update_every, min=1)
        if pattern == "channel" and example_inputs is None:
            raise ValueError("pattern='channel' needs example_inputs to trace the model")
        if permute and (self.nm is None or example_inputs is None):
            raise ValueError("permute=True needs an N:M pattern and example_inputs (the "
                             "permutation is folded into the layers producing the inputs)")
        self.model, self.pattern, self.criterion, self.scope = model, pattern, criterion, scope
        self.final, self.initial = sparsity, initial_sparsity
        self.schedule, self.update_every, self.step_count = schedule, update_every, 0
        self.example_inputs = example_inputs
        mods = dict(model.named_modules())
        types = (*LINEAR_TYPES, nn.Conv2d)
        names = list(layers) if layers is not None else [
            n for n, m in mods.items() if isinstance(m, types)]
        unknown = [n for n in names if n not in mods or not isinstance(mods[n], types)]
        if unknown:
            raise ValueError(f"not Linear / Conv1D / Conv2d layers of the model: "
                             f"{unknown}")
        self.skipped: dict[str, str] = {}
        idx = module_index(model)
        tied = {n: idx.tied(mods[n], idx.names[id(mods[n])]) for n in names}
        tied = {n: t for n, t in tied.items() if t}
        if layers is not None and tied:  # as compress_: a tied weight is never pruned
            raise ValueError(f"layers {sorted(tied)} have a weight tied to another module "
                             f"({', '.join(t[0] for t in tied.values())}); pruning it would "
                             f"change that module too")
        for n, t in tied.items():
            self.skipped[n] = f"weight tied to {t[0]}; pruning would change it too"
        names = [n for n in names if n not in tied]
        if self.nm is not None:  # N:M needs whole groups of m inputs
            short = [n for n in names if oriented(mods[n], mods[n].weight).shape[1]
                     % self.nm[1]]
            if layers is not None and short:
                raise ValueError(f"layers {short} have an input dimension that is not a "
                                 f"multiple of m={self.nm[1]}")
            for n in short:
                self.skipped[n] = (f"{oriented(mods[n], mods[n].weight).shape[1]} inputs "
                                   f"are not groups of "
                                   f"{self.nm[1]}; left dense")
            names = [n for n in names if n not in short]
        self.layers = {n: mods[n] for n in names}
        self.groups: list = []
        if pattern == "channel":
            groups, unprovable = channel_groups(model, example_inputs, strict=True)
            self.skipped.update(unprovable)
            for g in [g for g in groups if g.unit != "channel"]:  # masks are per row
                for n in g.producers:
                    unprovable[n] = self.skipped[n] = (
                        "attention heads (a head group): remove them with "
                        "co.structured.prune_channels; not masked channel by channel")
            groups = [g for g in groups if g.unit == "channel"]
            if layers is not None:
                wanted = set(names)
                for n in names:
                    if n in unprovable:
                        raise ValueError(f"layer {n!r}: {unprovable[n]}")
                    found = [g for g in groups if n in g.producers]
                    if not found:
                        owner = [g.producers for g in groups if n in g.depthwise]
                        raise ValueError(
                            f"layer {n!r} does not produce removable channels" + (
                                f": a depthwise conv, its channels follow {owner[0]}; list "
                                f"those" if owner else ""))
                    (g,) = found
                    if not set(g.producers) <= wanted:
                        raise ValueError(f"layer {n!r} is coupled with {g.producers} (their "
                                         f"outputs meet in an add): list all of them")
                groups = [g for g in groups if set(g.producers) <= wanted]
            self.groups = groups
            self.layers = {n: mods[n] for g in self.groups for n in g.producers}
        if calib is not None and iter(calib) is calib:
            calib = list(calib)  # a one-shot iterator: calibration may run twice (permute)
        self._calibrate(calib, loss_fn, forward)
        # layer -> (N:M-kept saliency before, after) the input-channel permutation
        self.permuted: dict[str, tuple[float, float]] = {}
        if permute and self._permute():
            self._calibrate(calib, loss_fn, forward)  # statistics of the permuted inputs
        # (module, parameter name) -> the parametrization holding its keep-mask
        self._masks: dict[tuple[str, str], _Mask] = {}
        self._state = "active"
        self.update(self.target_sparsity())

    def _calibrate(self, calib, loss_fn, forward) -> None:
        self._norms = (activation_norms(self.model, calib, self.layers, forward)
                       if self.criterion == "wanda" else None)
        self._fisher = (fisher_diagonal(self.model, calib, loss_fn,
                                        {n: m.weight for n, m in self.layers.items()},
                                        forward=forward)
                        if self.criterion == "obd" else None)

    @torch.no_grad()
    def _permute(self) -> bool:
        """Permute the input channels of the N:M layers to keep more saliency; the same
        permutation reorders the output channels of the layers that produce them (and any
        BatchNorm between, and every other reader), so the model computes the same function.
        Layers whose inputs no provable channel group produces are listed in ``skipped``."""
        groups, _ = channel_groups(self.model, self.example_inputs)
        scores = self.scores()
        done: set[str] = set()
        for g in groups:
            targets = [c for c in g.consumers if c in self.layers]
            if not targets:
                continue
            if any(scores[t].dim() != 2 for t in targets):
                for t in targets:
                    self.skipped[t] = "input-channel permutation is implemented for linear " \
                                      "consumers only; not permuted"
                done.update(targets)
                continue
            if any(scores[t].shape[1] != g.width for t in targets):
                for t in targets:  # e.g. a Linear after a flatten: channels are not columns
                    self.skipped[t] = "input columns are not the producer's channels 1:1; " \
                                      "not permuted"
                done.update(targets)
                continue
            done.update(targets)
            if g.width % self.nm[1]:
                for t in targets:
                    self.skipped[t] = f"{g.width} channels are not groups of {self.nm[1]}"
                continue
            joint = torch.cat([scores[t] for t in targets])
            perm = nm_permutation(joint, *self.nm)
            before = {t: float(nm_kept(scores[t], *self.nm).sum()) for t in targets}
            select_channels(self.model, g, perm)
            for t in targets:
                self.permuted[t] = (before[t],
                                    float(nm_kept(scores[t][:, perm], *self.nm).sum()))
        for n in self.layers:
            if n not in done:
                self.skipped.setdefault(n, "no provable producer of its inputs to fold a "
                                           "permutation into; not permuted")
        self.layers = {n: self.model.get_submodule(n) for n in self.layers}
        return bool(self.permuted)

    # -- masks ----------------------------------------------------------------------------

    def target_sparsity(self) -> float | None:
        """The sparsity the schedule asks for now (``None`` for N:M)."""
        if self.nm is not None:
            return None
        if self.schedule is None:
            return float(self.final)
        return cubic_sparsity(self.step_count, *self.schedule, self.final, self.initial)

    def scores(self) -> dict[str, torch.Tensor]:
        """The criterion's saliency of every weight of every layer, from the current weights,
        as ``[out, in, ...]`` (a ``Conv1D``'s ``[in, out]`` weight transposed; a callable
        criterion returns scores shaped like ``module.weight``)."""
        out = {}
        for n, m in self.layers.items():
            w = oriented(m, m.weight)
            if callable(self.criterion):
                s = self.criterion(n, m)
                if s.shape != m.weight.shape:
                    raise ValueError(f"criterion gave scores of shape {tuple(s.shape)} for "
                                     f"{n}, expected {tuple(m.weight.shape)}")
                s = oriented(m, s)
            elif self.criterion == "wanda":
                s = wanda_scores(w, self._norms[n])
            elif self.criterion == "obd":
                s = obd_scores(w, oriented(m, self._fisher[n]))
            else:
                s = magnitude_scores(w)
            out[n] = s.detach()
        return out

    @torch.no_grad()
    def update(self, sparsity: float | None) -> None:
        """Recompute the masks for ``sparsity`` from the current scores and apply them."""
        scores = self.scores()
        masks: dict[tuple[str, str], torch.Tensor] = {}
        if self.nm is not None:
            for n, s in scores.items():
                masks[(n, "weight")] = nm_mask(s, *self.nm)
        elif self.pattern == "unstructured":
            for n, keep in unstructured_masks(scores, sparsity, self.scope).items():
                masks[(n, "weight")] = keep
        else:
            mods = dict(self.model.named_modules())
            for g in self.groups:
                sal = sum(scores[p].float().reshape(scores[p].shape[0], -1).norm(dim=1)
                          for p in g.producers)
                keep = structured_mask(sal[:, None], sparsity)[:, 0]
                for p in g.producers:
                    w = oriented(mods[p], mods[p].weight)  # [out, ...]
                    masks[(p, "weight")] = keep.reshape(-1, *([1] * (w.dim() - 1))).expand(
                        w.shape).clone()
                    if mods[p].bias is not None:
                        masks[(p, "bias")] = keep.clone()
                for b in g.norms:
                    if mods[b].weight is not None:
                        masks[(b, "weight")] = keep.clone()
                        masks[(b, "bias")] = keep.clone()
        for key, keep in masks.items():
            module = self.model.get_submodule(key[0])
            if key[1] == "weight":
                keep = from_oriented(module, keep)  # a Conv1D's mask: [in, out] again
            if key in self._masks:
                self._masks[key].keep.copy_(keep)
            else:
                mask = _Mask(keep.to(getattr(module, key[1]).device))
                parametrize.register_parametrization(module, key[1], mask)
                self._masks[key] = mask
        self.apply()
        # (a Hugging Face model's save_pretrained then refuses the masked model, as co.save
        # does, instead of writing weights a reload would re-initialise)
        after_compress(self.model)

    @property
    def masks(self) -> dict[tuple[str, str], torch.Tensor]:
        """``{(layer, parameter name): keep-mask}`` (boolean, shaped like the parameter)."""
        return {key: m.keep for key, m in self._masks.items()}

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the hidden original of every masked weight (what momentum may have moved)."""
        for (name, pname), mask in self._masks.items():
            module = self.model.get_submodule(name)
            module.parametrizations[pname].original.mul_(mask.keep)

    def _check_active(self) -> None:
        if self._state != "active":
            raise RuntimeError(f"this Pruner was {self._state}; build a new one")

    def step(self, *_: object) -> None:
        """Advance the schedule by one optimizer step (arguments ignored, so it can be
        ``fit``'s ``on_step``); updates the masks when due, and re-applies them."""
        self._check_active()
        self.step_count += 1
        end = self.schedule[1] if self.schedule is not None else 0
        if self.step_count <= end and (self.step_count % self.update_every == 0
                                       or self.step_count == end):  # the target, always
            self.update(self.target_sparsity())
        else:
            self.apply()

    def sparsity(self) -> float:
        """The fraction of masked weights over the pruned layers' weights."""
        kept = total = 0
        for (n, p), keep in self.masks.items():
            if p == "weight" and n in self.layers:
                kept += int(keep.sum())
                total += keep.numel()
        return 1.0 - kept / total if total else 0.0

    def remove(self) -> None:
        """Remove the masks' parametrizations: the layers become plain modules again, their
        weights keeping the zeros."""
        self._check_active()
        self.apply()
        for name, pname in self._masks:
            parametrize.remove_parametrizations(self.model.get_submodule(name), pname,
                                                leave_parametrized=True)
        self._state = "removed"

    # -- finalize -------------------------------------------------------------------------

    def finalize(self) -> nn.Module:
        """Remove the masks and convert the masked layers; returns the model (a new module
        when the model itself was a pruned ``nn.Linear``).

        2:4 ``nn.Linear`` layers become :class:`~compress_ops.nn.Sparse24Linear` (the masked
        weights, packed as they are); the channel pattern removes the dead channels
        (:func:`compress_ops.structured.prune_channels` with ``zero_only=True``; its report is
        kept as ``structured``, and masked channels it had to keep are listed in ``skipped``);
        unstructured layers stay dense with their zeros. The finalized model computes what
        the masked model computed (channel pattern: in eval mode, BatchNorm statistics frozen).
        """
        self.remove()
        self._state = "finalized"
        if self.nm == (2, 4):
            for m in dict.fromkeys(self.layers.values()):
                if type(m) is nn.Linear or is_conv1d(m, exact=True):  # once per module,
                    new = Sparse24Linear.from_dense(plain_linear(m), prune=False)  # every name
                    if m is self.model:
                        self.model = new
                    else:
                        replace_everywhere(self.model, m, new)
            after_compress(self.model)
        elif self.pattern == "channel":
            masked = {tuple(g.producers): int((~self._row_keep(g)).sum()) for g in self.groups}
            self.structured = prune_channels(self.model, self.example_inputs, zero_only=True)
            removed = {p: before - after for p, before, after in self.structured.groups}
            for producers, count in masked.items():
                if removed.get(producers, 0) < count:
                    self.skipped[", ".join(producers)] = (
                        f"{count - removed.get(producers, 0)} of {count} masked channels kept: "
                        f"their constant value cannot be folded exactly into the next layers")
        return self.model

    def _row_keep(self, group) -> torch.Tensor:
        name = group.producers[0]
        keep = oriented(self.model.get_submodule(name), self._masks[(name, "weight")].keep)
        return keep.reshape(keep.shape[0], -1)[:, 0]


class _Mask(nn.Module):
    """The parametrization ``weight = original * keep`` (``keep`` a boolean buffer)."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep.bool())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.keep
