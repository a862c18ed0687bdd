"""Removing channels: :func:`prune_channels` chooses the channels of every provable group (by
saliency, by index, or exactly the dead ones, whose constant it folds into the next layers'
biases where that is exact) and removes them; :class:`StructuredReport` says what it did."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compress_ops._linear import LINEAR_TYPES, oriented
from compress_ops._swap import replace_everywhere
from compress_ops._text import format_table
from compress_ops._validate import check_number
from compress_ops.structured.graph import ChannelGroup, channel_groups, zero_pads
from compress_ops.structured.surgery import check_index, select_channels, unit_rows

__all__ = ["StructuredReport", "prune_channels"]


@dataclass
class StructuredReport:
    """What :func:`prune_channels` did: per group ``(producers, width before, width after)``,
    the kept channel indices (of the group before pruning, sorted), and ``{layer: reason}`` for
    every Linear/Conv2d left untouched because its channels could not be proven removable."""

    groups: list[tuple[tuple[str, ...], int, int]]
    kept: list[torch.Tensor]
    skipped: dict[str, str]
    params_before: int
    params_after: int

    def __str__(self) -> str:
        rows = [(str(i), ", ".join(p), str(b), str(a), str(b - a))
                for i, (p, b, a) in enumerate(self.groups)]
        out = [format_table(("group", "producers", "channels", "kept", "removed"), rows)]
        out.append(f"parameters: {self.params_before} -> {self.params_after}")
        if self.skipped:
            out.append("left untouched:")
            out.append(format_table(("layer", "reason"), sorted(self.skipped.items())))
        return "\n".join(out)


def _dead(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    dead = torch.ones(group.width, dtype=torch.bool)
    if group.unit == "head":  # a head with zero weights still outputs softmax-weighted v bias
        return ~dead
    for p in group.producers:
        m = model.get_submodule(p)
        w = oriented(m, m.weight.detach())
        dead &= (w.reshape(group.width, -1) == 0).all(1).cpu()
    return dead


def _constants(model: nn.Module, group: ChannelGroup) -> dict[str, torch.Tensor]:
    """Per consumer: the float64 value each channel has at its input when the channel's
    producer rows are zero (NaN where it is not a known constant), in eval mode."""
    nan = torch.full((group.width,), math.nan, dtype=torch.float64)
    vals: dict[str, torch.Tensor] = {}
    reads: dict[str, torch.Tensor] = {}

    def d(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to("cpu", torch.float64)

    with torch.no_grad():
        for kind, out, ins, payload in group.steps:
            v = vals[ins[0]] if ins else None
            if kind == "src":
                m = model.get_submodule(payload)
                w = oriented(m, m.weight.detach())
                zero = (w.reshape(w.shape[0], -1) == 0).all(1).cpu()
                b = d(m.bias) if m.bias is not None else torch.zeros_like(nan)
                vals[out] = torch.where(zero, b, nan)
            elif kind == "fn":
                vals[out] = v if payload is None else payload(v.clone())
            elif kind == "border":
                vals[out] = torch.where(v == 0, v, nan)
            elif kind == "sum":
                vals[out] = vals[ins[0]] * payload[0] + vals[ins[1]] * payload[1]
            elif kind == "prod":
                vals[out] = vals[ins[0]] * vals[ins[1]]
            elif kind == "bn":
                m = model.get_submodule(payload)
                g = d(m.weight) if m.weight is not None else torch.ones_like(nan)
                b = d(m.bias) if m.bias is not None else torch.zeros_like(nan)
                if m.running_mean is None:  # batch statistics: a constant channel -> beta
                    vals[out] = torch.where(v.isnan(), v, b)
                else:
                    vals[out] = (v - d(m.running_mean)) / torch.sqrt(d(m.running_var) + m.eps) \
                        * g + b
            elif kind == "dw":
                m = model.get_submodule(payload)
                s = d(m.weight).reshape(group.width, -1).sum(1)
                b = d(m.bias) if m.bias is not None else torch.zeros_like(nan)
                r = v * s + b  # with zero padding, exact only where the input is 0
                vals[out] = torch.where(v == 0, r, nan) if zero_pads(m) else r
            elif kind == "read":
                reads[payload] = v
    return {k: torch.where(torch.isfinite(v), v, nan) for k, v in reads.items()}


def _foldable(m: nn.Module) -> bool:
    return isinstance(m, LINEAR_TYPES) or not zero_pads(m)


def _exactly_removable(model: nn.Module, group: ChannelGroup,
                       reads: dict[str, torch.Tensor]) -> torch.Tensor:
    ok = _dead(model, group)
    for name, v in reads.items():
        fine = torch.isfinite(v) & ((v == 0) | _foldable(model.get_submodule(name)))
        ok &= fine
    return ok


def _fold(model: nn.Module, group: ChannelGroup, removed: torch.Tensor,
          reads: dict[str, torch.Tensor]) -> None:
    """Add the constants of the removed dead channels to the consumers' biases."""
    removed = removed & _dead(model, group)
    for name, v in reads.items():
        m = model.get_submodule(name)
        sel = removed & torch.isfinite(v) & (v != 0)
        if not sel.any() or not _foldable(m):
            continue
        w = oriented(m, m.weight.detach()).to("cpu", torch.float64)
        if isinstance(m, LINEAR_TYPES):
            w = w.reshape(w.shape[0], group.width, group.columns.get(name, 1)).sum(2)
        else:
            w = w.sum((2, 3))
        delta = w[:, sel] @ v[sel]
        with torch.no_grad():
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=m.weight.dtype,
                                                  device=m.weight.device),
                                      requires_grad=m.weight.requires_grad)
            m.bias.add_(delta.to(m.bias.device, m.bias.dtype))


def _saliency(model: nn.Module, group: ChannelGroup,
              scores: dict[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(group.width, dtype=torch.float64)
    for p in group.producers:
        m = model.get_submodule(p)
        s = oriented(m, scores.get(p, m.weight).detach()).to("cpu", torch.float64)
        if p in group.chunks:  # a fused producer: each unit's rows in each chunk
            s = s.reshape(s.shape[0], -1)[unit_rows(torch.arange(group.width),
                                                    chunks=group.chunks[p])]
        total += s.reshape(group.width, -1).norm(dim=1)
    return total


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_channels(model: nn.Module, example_inputs: tuple,
                   sparsity: float | dict[str, float] | None = None, *,
                   scores: dict[str, torch.Tensor] | None = None,
                   keep: dict[int, torch.Tensor] | None = None,
                   zero_only: bool = False) -> StructuredReport:
    """Remove channels of every prunable group of ``model``, in place (see
    :func:`channel_groups` for what is prunable; the rest stays untouched and is listed in the
    report's ``skipped``).

    * ``sparsity`` (a float in [0, 1), or ``{producer name: sparsity}``; groups none of whose
      producers is named stay whole; the producers of one group must not be given different
      values): remove that fraction of each group's channels (rounded; at least one stays),
      the lowest by saliency: the sum over the group's producers of the L2 norm of each
      output row of ``scores[name]`` (shaped like the weight, e.g. from
      :func:`compress_ops.prune.wanda_scores` / ``obd_scores``), of the weight where
      ``scores`` has no entry. Removed channels whose weights were zero have their constant
      folded into the consumers' bias where that is exact; other removals change the outputs
      (an approximation, to be followed by fine-tuning).
    * ``keep={group index: kept channel indices}``: keep exactly those channels of those
      groups (indices into :func:`channel_groups`' list; e.g. a previous report's ``kept``).
    * ``zero_only=True``: remove exactly the channels whose weight rows are zero in every
      producer and whose constant value can be dropped or folded without changing any output
      (see the module docstring): the eval-mode outputs are unchanged. At least one channel
      stays.

    Returns a :class:`StructuredReport`; ``str()`` renders it as a table.
    """
    if zero_only and (sparsity is not None or keep is not None):
        raise ValueError("zero_only=True removes exactly the dead channels: give neither "
                         "sparsity nor keep with it")
    if not zero_only and sparsity is None and keep is None:
        raise ValueError("give sparsity, keep, or zero_only=True")
    first = {id(m): n for n, m in model.named_modules()}
    layers = {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, (*LINEAR_TYPES, nn.Conv2d))}  # every name -> the name groups use
    if isinstance(sparsity, dict):
        unknown = sorted(set(sparsity) - set(layers))
        if unknown:
            raise ValueError(f"sparsity names unknown layers (not an nn.Linear/nn.Conv2d of the "
                             f"model): {unknown}")
        for v in sparsity.values():
            check_number("sparsity", v, low=0.0, high=1.0, high_open=True)
        sparsity = {layers[n]: v for n, v in sparsity.items()}
    elif sparsity is not None:
        check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    scores = dict(scores or {})
    unknown = sorted(set(scores) - set(layers))
    if unknown:
        raise ValueError(f"scores names unknown layers (not an nn.Linear/nn.Conv2d of the "
                         f"model): {unknown}")
    for name, s in scores.items():
        w = model.get_submodule(name).weight
        if not isinstance(s, torch.Tensor) or s.shape != w.shape:
            raise ValueError(f"scores[{name!r}] must be a tensor shaped like its weight "
                             f"{tuple(w.shape)}, got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s)}")
    scores = {layers[n]: s for n, s in scores.items()}

    groups, skipped = channel_groups(model, example_inputs, strict=True)
    keep = dict(keep or {})
    bad = sorted(k for k in keep if not isinstance(k, int) or not 0 <= k < len(groups))
    if bad:
        raise ValueError(f"keep has group indices {bad} outside [0, {len(groups)})")
    plan: list[torch.Tensor] = []
    for i, g in enumerate(groups):
        if i in keep:
            plan.append(check_index(keep[i], g.width, f"keep[{i}]").sort().values)
            continue
        if zero_only:
            drop = _exactly_removable(model, g, _constants(model, g))
            if drop.all():
                drop[-1] = False
            plan.append(torch.nonzero(~drop).flatten())
            continue
        s = _group_sparsity(g, sparsity)
        n_drop = min(int(round(s * g.width)), g.width - 1)
        sal = _saliency(model, g, scores)
        plan.append(torch.topk(sal, g.width - n_drop).indices.sort().values)

    before = _num_params(model)
    rows: list[tuple[tuple[str, ...], int, int]] = []
    # head groups cut, and what they were (modules, then rescaled attributes)
    heads: list[tuple[int, dict[str, nn.Module], dict[tuple[str, str], object]]] = []
    for g, kept in zip(groups, plan, strict=True):
        width = g.width
        if kept.numel() < width:
            if g.unit == "head":
                heads.append((len(rows), {n: model.get_submodule(n)
                                          for n in g.producers + g.consumers},
                              {(n, a): getattr(model.get_submodule(n), a)
                               for n, attrs in g.attrs.items() for a in attrs}))
            removed = torch.ones(width, dtype=torch.bool)
            removed[kept] = False
            _fold(model, g, removed, _constants(model, g))
            select_channels(model, g, kept)
        rows.append((tuple(g.producers), width, kept.numel()))
    if heads:
        _check_heads(model, example_inputs, heads, rows, plan, groups, skipped)
    return StructuredReport(groups=rows, kept=plan, skipped=skipped, params_before=before,
                            params_after=_num_params(model))


def _check_heads(model: nn.Module, example_inputs: tuple, heads: list, rows: list, plan: list,
                 groups: list, skipped: dict[str, str]) -> None:
    """Run the pruned model once: a forward that fixes its head count or width somewhere the
    capture could not see (a reshape to a constant size) fails now; then every head group is
    put back as it was and listed in ``skipped``."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
        return
    except Exception as exc:  # noqa: BLE001 - any failure: undo the head removal
        why = (f"its attention heads were not removed: the pruned model failed to run "
               f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}), so its "
               f"forward fixes the number of heads somewhere")
    finally:
        for m, t in flags.items():
            m.training = t
    for i, old, attrs in heads:
        for name, module in old.items():
            replace_everywhere(model, model.get_submodule(name), module)
        for (name, a), v in attrs.items():
            setattr(model.get_submodule(name), a, v)
        g = groups[i]
        rows[i] = (tuple(g.producers), rows[i][1], rows[i][1])
        plan[i] = torch.arange(rows[i][1])
        g.width = rows[i][1]
        for n in g.producers:
            skipped[n] = why


def _group_sparsity(group: ChannelGroup, sparsity: float | dict[str, float] | None) -> float:
    if sparsity is None:
        return 0.0
    if not isinstance(sparsity, dict):
        return float(sparsity)
    given = {sparsity[p] for p in group.producers if p in sparsity}
    if len(given) > 1:
        raise ValueError(f"layers {group.producers} share their output channels (one group) "
                         f"but are given different sparsities {sorted(given)}")
    return float(given.pop()) if given else 0.0
