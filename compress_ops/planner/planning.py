"""``plan()``: measure every candidate config on every layer in scope, then let the solver
choose one per layer under the size budget; the choice is a :class:`Plan` (a ``Recipe``)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from compress_ops._linear import LINEAR_TYPES
from compress_ops._swap import index
from compress_ops._text import format_table
from compress_ops._validate import check_choice, check_number
from compress_ops.api import Recipe
from compress_ops.calibrate import input_hessians, run_with_hooks
from compress_ops.configs import (
    CodebookConfig,
    LowRankConfig,
    QuantConfig,
    Sparse24Config,
    UnsupportedModule,
    per_layer_configs,
    transform_for,
)
from compress_ops.nn.base import CompressedModule
from compress_ops.nn.lowrank import LowRankConv2d, LowRankLinear
from compress_ops.planner.solver import solve

__all__ = ["DEFAULT_CANDIDATES", "METRICS", "Plan", "PlanRow", "plan"]

#: What :func:`plan` tries by default, from nearly lossless to aggressive: 2:4 sparsity (~0.53
#: of fp32 dense bytes), int8/4/3/2 with 128-wide groups (~0.27 / 0.14 / 0.11 / 0.08),
#: 4- and 2-bit k-means codebooks (~0.13 / 0.06) and SVD / Tucker-2 factors keeping 90 % and
#: 60 % of the weight energy (linears and plain convs; only where the factors are smaller than
#: the dense weight). Shared codebooks are not candidates (see :func:`plan`).
DEFAULT_CANDIDATES: tuple[object, ...] = (
    Sparse24Config(),
    QuantConfig(bits=8),
    QuantConfig(bits=4),
    QuantConfig(bits=3),
    QuantConfig(bits=2),
    CodebookConfig(bits=4),
    CodebookConfig(bits=2),
    LowRankConfig(energy=0.9),
    LowRankConfig(energy=0.6),
)

METRICS = ("relative_mse", "mse")
_DENSE = "dense"
_KEY_FIELDS = ("bits", "rank", "energy")


@dataclass(frozen=True)
class PlanRow:
    """One option of one layer in :attr:`Plan.table`. ``stored_bytes``/``error`` are ``None``
    for a candidate that does not apply (``note`` says why)."""

    layer: str
    candidate: str
    config: object
    dense_bytes: int
    stored_bytes: int | None
    error: float | None
    chosen: bool
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.stored_bytes is None:
            return None
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0


@dataclass(frozen=True, eq=False)
class Plan(Recipe):
    """A :class:`~compress_ops.api.Recipe` (one exact rule per layer in scope; ``None`` keeps
    it dense) chosen by :func:`plan`, with the table it was chosen from.

    ``stored_bytes``/``dense_bytes``: weight bytes of the layers in scope after/before
    compression (``stored_bytes <= budget * dense_bytes``; a layer whose weight is tied to
    another module, which no config may compress, is listed but outside both);
    ``total_error``: the sum of the chosen options' errors; ``exact``: the choice is optimal,
    else it is within ``total_error - lower_bound`` of the optimum. ``str(plan)`` renders the table.
    """

    table: tuple[PlanRow, ...] = field(repr=False)
    budget: float
    dense_bytes: int
    stored_bytes: int
    total_error: float
    metric: str
    exact: bool
    lower_bound: float
    scope_types: tuple[type, ...] = ()

    def noted_types(self) -> tuple[type, ...]:
        """Every type in the plan's scope: ``report()`` lists the layers it kept dense too."""
        return tuple(dict.fromkeys(super().noted_types() + self.scope_types))

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def __str__(self) -> str:
        head = ("layer", "candidate", "stored B", "ratio", "error", "chosen", "note")
        rows = [(r.layer or "<root>", r.candidate,
                 "-" if r.stored_bytes is None else str(r.stored_bytes),
                 "-" if r.ratio is None else f"{r.ratio:.4f}",
                 "-" if r.error is None else f"{r.error:.4g}",
                 "*" if r.chosen else "", r.note) for r in self.table]
        layers = {r.layer for r in self.table}
        compressed = sum(r.chosen and r.candidate != _DENSE for r in self.table)
        rows.append(("TOTAL", f"{compressed} of {len(layers)} layers compressed",
                     str(self.stored_bytes), f"{self.ratio:.4f}", f"{self.total_error:.4g}", "",
                     f"budget {self.budget:g} x {self.dense_bytes} B dense"))
        if self.exact:
            solver = "optimal (exact solver)"
        else:
            solver = (f"within {self.total_error - self.lower_bound:.4g} of optimal "
                      f"(LP bound {self.lower_bound:.4g})")
        return (format_table(head, rows)
                + f"\nmetric {self.metric}; total error is {solver}")


def _label(config: object) -> str:
    """``quant(bits=4)``: the config's kind and the fields that matter or differ from the
    defaults."""
    name = type(config).__name__.removesuffix("Config").lower()
    parts = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if (f.name in _KEY_FIELDS and v is not None) or (f.name not in _KEY_FIELDS
                                                          and v != f.default):
            parts.append(f"{f.name}={v}")
    return f"{name}({', '.join(parts)})" if parts else name


def _check_candidates(candidates: Iterable[object]) -> list[object]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a sequence of configs, got "
                        f"{type(candidates).__name__}")
    out: list[object] = []
    for cfg in candidates:
        if type(cfg) not in per_layer_configs():
            raise TypeError(f"candidate {cfg!r} is not a per-layer config; expected one of "
                            f"{[t.__name__ for t in per_layer_configs()]}")
        if getattr(cfg, "shared", False):
            raise ValueError(f"candidate {cfg!r}: a shared codebook spans several layers and "
                             f"cannot be measured layer by layer; use shared=False")
        if cfg not in out:
            out.append(cfg)
    if not out:
        raise ValueError("candidates is empty")
    return out


def _weight_bytes(module: nn.Module) -> int:
    return module.weight.numel() * module.weight.element_size()


def _pinned(config: object, new: nn.Module) -> object:
    """The rule ``compress_`` gets: an energy-based LowRankConfig pinned to the rank that was
    measured (so a re-run of the SVD cannot land one rank higher, over the budget)."""
    if isinstance(config, LowRankConfig) and config.energy is not None:
        if isinstance(new, LowRankLinear):
            return LowRankConfig(rank=new.rank, method=config.method)
        if isinstance(new, LowRankConv2d) and new.ranks[0] == new.ranks[1]:
            return LowRankConfig(rank=new.ranks[0], method=config.method)
    return config


@dataclass(eq=False)
class _Layer:
    names: list[str]
    module: nn.Module
    dense_bytes: int
    note: str = ""  # why it stays dense
    budgeted: bool = True  # False: a tied weight, which no config may compress
    # one per applicable candidate: [config, replacement, stored bytes, sq err, sq ref, numel]
    options: list[list] = field(default_factory=list)
    refused: list[tuple[object, str]] = field(default_factory=list)
    calls: int = 0


@torch.no_grad()
def plan(model: nn.Module, calib_data: Iterable, budget: float, *,
         candidates: Iterable[object] = DEFAULT_CANDIDATES,
         forward: Callable[[nn.Module, object], object] | None = None,
         metric: str = "relative_mse", verbose: bool = True,
         layers: Iterable[str] | None = None) -> Plan:
    """Choose a config (or dense) per layer so the compressed weights take at most ``budget``
    x their dense bytes with the least total output error on ``calib_data``.

    ``calib_data``: an iterable of batches (a list, a DataLoader), run once; ``forward(model,
    batch)`` runs one batch (default ``model(**batch)`` for a mapping such as a Hugging Face
    ``BatchEncoding``, ``model(batch[0])`` for tuples/lists, else ``model(batch)``). The model
    runs in eval mode (BatchNorm statistics untouched, no dropout; each module's mode is
    restored afterwards). ``candidates``:
    per-layer configs (default :data:`DEFAULT_CANDIDATES`); a shared ``CodebookConfig`` is a
    ``ValueError`` (its table depends on which other layers share it). ``metric``:
    ``"relative_mse"`` or ``"mse"`` (module docstring). ``layers``: names of the layers in
    scope (default: every module of a type a candidate handles). ``budget`` in ``(0, 1]``; 1
    allows keeping everything dense. ``verbose`` prints the table.

    Returns a :class:`Plan` (a Recipe: ``compress_(model, plan)`` applies it). ``ValueError``:
    a budget below the smallest achievable fraction (named in the message), empty
    ``calib_data``, or no layer any candidate applies to. The model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = check_number("budget", budget, low=0.0, high=1.0, low_open=True,
                          hint="(stored bytes / dense bytes)")
    cands = _check_candidates(candidates)
    check_choice("metric", metric, METRICS)
    if isinstance(calib_data, torch.Tensor) or not isinstance(calib_data, Iterable):
        raise TypeError(f"calib_data must be an iterable of batches (e.g. [x] or a DataLoader), "
                        f"got {type(calib_data).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError("forward must be a callable forward(model, batch)")

    # 1. the layers in scope, and those that must stay dense
    types = tuple(dict.fromkeys(t for cfg in cands for t in transform_for(cfg).handles))
    idx = index(model)
    wanted = None if layers is None else set(layers) if not isinstance(layers, str) else {layers}
    found: list[_Layer] = []
    for mid, aliases in idx.names.items():
        module = idx.modules[mid]
        if not isinstance(module, types) or isinstance(module, CompressedModule):
            continue
        if wanted is not None and not wanted.intersection(aliases):
            continue
        layer = _Layer(aliases, module, _weight_bytes(module))
        tied = idx.tied(module, aliases)
        if len(aliases) > 1:
            layer.note = f"reached under {len(aliases)} names {aliases}; kept dense"
        elif tied:
            layer.note = (f"weight tied to {tied[0]}; kept dense and outside the budget (no "
                          f"config may compress it)")
            layer.budgeted = False
        found.append(layer)
    if wanted is not None:
        missing = sorted(wanted - {n for la in found for n in la.names})
        if missing:
            raise ValueError(f"layers {missing} are not modules of the model that the "
                             f"candidates handle ({[t.__name__ for t in types]})")

    # 2. every candidate for every layer (the transforms build new modules; the model is kept);
    # calibrated candidates (GPTQ, SparseGPT, Wanda) from each layer's input Hessian
    hessians: dict[str, torch.Tensor] = {}
    if any(getattr(cfg, "needs_calibration", False) for cfg in cands):
        if iter(calib_data) is calib_data:
            calib_data = list(calib_data)  # (run twice: the Hessians, then the errors)
        linears = {la.names[0]: la.module for la in found
                   if not la.note and isinstance(la.module, LINEAR_TYPES)}
        if linears:
            hessians = input_hessians(model, linears, calib_data, forward, strict=False)
    for layer in found:
        if layer.note:
            continue
        for cfg in cands:
            transform = transform_for(cfg)
            if not isinstance(layer.module, transform.handles):
                continue
            extras = {}
            if getattr(cfg, "needs_calibration", False):
                if layer.names[0] not in hessians:
                    layer.refused.append((cfg, "never ran on the calibration data"))
                    continue
                extras["hessian"] = hessians[layer.names[0]]
            try:
                new = transform.build(layer.module, cfg, **extras)
            except UnsupportedModule as exc:  # UnsupportedWeight included
                layer.refused.append((cfg, str(exc)))
                continue
            layer.options.append([cfg, new, new.stored_weight_bytes(), 0.0, 0.0, 0])
        if not layer.options:
            layer.note = "no candidate applies; kept dense"
    if not any(layer.options for layer in found):
        why = "; ".join(f"{la.names[0] or '<root>'}: " + (", ".join(
            f"{_label(c)}: {r}" for c, r in la.refused) or la.note) for la in found[:3])
        raise ValueError(f"no layer of the model can be compressed by the candidates "
                         f"{[_label(c) for c in cands]} (layers of types "
                         f"{sorted(t.__name__ for t in types)}" + (f"; {why})" if why else ")"))
    dense_total = sum(layer.dense_bytes for layer in found if layer.budgeted)
    capacity = math.floor(Fraction(budget) * dense_total)
    _check_reachable([la for la in found if la.options], found, budget, capacity, dense_total)

    # 3. one calibration pass: hooks run every option on the layer's real input
    def hook(layer: _Layer):
        def fn(module, args, kwargs, out):
            layer.calls += 1
            y = out.detach()
            ref = y.double().pow(2).sum()
            x = args[0] if args else next(iter(kwargs.values()))
            for opt in layer.options:
                yc = opt[1](x)
                opt[3] = opt[3] + (yc.double() - y.double()).pow(2).sum()
                opt[4] = opt[4] + ref
                opt[5] += y.numel()
        return fn

    active = [la for la in found if la.options]
    handles = [la.module.register_forward_hook(hook(la), with_kwargs=True) for la in active]
    if run_with_hooks(model, handles, calib_data, forward) == 0:
        raise ValueError("calib_data yielded no batches; plan needs calibration data")
    for layer in active:
        if layer.calls == 0:
            layer.note = "never ran on the calibration data; kept dense"
            layer.options = []
            continue
        scored = []
        for cfg, new, nbytes, sq_err, sq_ref, numel in layer.options:
            sq_err, sq_ref = float(sq_err), float(sq_ref)
            if not math.isfinite(sq_err):
                layer.refused.append((cfg, "non-finite output on the calibration data"))
            elif metric == "mse":
                scored.append([cfg, new, nbytes, sq_err / max(numel, 1)])
            elif sq_ref > 0:
                scored.append([cfg, new, nbytes, sq_err / sq_ref])
            else:
                layer.refused.append((cfg, "the layer's output is all zero on the calibration "
                                           "data: relative error undefined"))
        layer.options = scored
        if not scored:
            layer.note = "no candidate applies; kept dense"
    if not any(layer.options for layer in found):
        why = [f"{la.names[0]}: " + ("never ran on calib_data (check forward)" if la.calls == 0
                                      else "; ".join(dict.fromkeys(r for _, r in la.refused)))
               for la in active]
        raise ValueError("no layer in scope has a usable candidate after calibration:\n  "
                         + "\n  ".join(why))
    _check_reachable([la for la in found if la.options], found, budget, capacity, dense_total)

    # 4. the choice: each layer's options plus dense
    active = [la for la in found if la.options]
    fixed = sum(la.dense_bytes for la in found if not la.options and la.budgeted)
    sol = solve([[(o[2], o[3]) for o in la.options] + [(la.dense_bytes, 0.0)] for la in active],
                capacity - fixed)
    picked = {id(la): j for la, j in zip(active, sol.choice, strict=True)}

    rules: dict[str, object] = {}
    table: list[PlanRow] = []
    for layer in found:
        name = layer.names[0]
        j = picked.get(id(layer))
        rows: list[PlanRow] = []
        for k, (cfg, new, nbytes, err) in enumerate(layer.options):
            note = ""
            if isinstance(new, LowRankLinear):
                note = f"rank {new.rank}"
            elif isinstance(new, LowRankConv2d):
                note = f"ranks {new.ranks}"
            rows.append(PlanRow(name, _label(cfg), cfg, layer.dense_bytes, nbytes, err, k == j,
                                note))
        rows += [PlanRow(name, _label(cfg), cfg, layer.dense_bytes, None, None, False, why)
                 for cfg, why in layer.refused]
        table += sorted(rows, key=lambda r: cands.index(r.config))  # in candidate order
        dense_chosen = j is None or j == len(layer.options)
        table.append(PlanRow(name, _DENSE, None, layer.dense_bytes, layer.dense_bytes, 0.0,
                             dense_chosen, layer.note))
        for alias in layer.names:
            rules[re.escape(alias)] = (None if dense_chosen
                                       else _pinned(layer.options[j][0], layer.options[j][1]))
    result = Plan(rules, table=tuple(table), budget=budget, dense_bytes=dense_total,
                  stored_bytes=sol.bytes + fixed, total_error=sol.error, metric=metric,
                  exact=sol.exact, lower_bound=sol.lower_bound, scope_types=types)
    if verbose:
        print(result)
    return result


def _check_reachable(active: list[_Layer], found: list[_Layer], budget: float, capacity: int,
                     dense_total: int) -> None:
    smallest = sum(min([o[2] for o in la.options] + [la.dense_bytes]) for la in active) \
        + sum(la.dense_bytes for la in found if la not in active and la.budgeted)
    if smallest > capacity:
        dense = [la.names[0] or "<root>" for la in found if la not in active and la.budgeted]
        raise ValueError(
            f"budget {budget:g} cannot be met: the smallest plan stores {smallest} of "
            f"{dense_total} dense weight bytes ({smallest / dense_total:.4f} of dense) with "
            f"candidates {sorted({_label(o[0]) for la in active for o in la.options})}"
            + (f" and {len(dense)} layer(s) that must stay dense ({dense[:5]})" if dense
               else "")
            + f"; raise the budget to at least "
            f"{math.ceil(smallest / dense_total * 1e4) / 1e4:g} or add smaller candidates")
