"""``plan()``: choose one compression config per layer under a size budget.

    plan = co.plan(model, calib_batches, budget=0.25)   # prints the table it chose from
    co.compress_(model, plan)                           # a Plan is a Recipe

1. **Scope.** The layers in scope are the modules of the types the candidates handle
   (``nn.Linear``; ``nn.Conv2d`` too when a :class:`~compress_ops.api.LowRankConfig` is a
   candidate), optionally narrowed by ``layers=``. The budget counts the *weight* bytes of
   exactly these layers (biases, norms, embeddings and layers out of scope are not counted).
2. **Options.** Every candidate is built for every layer it applies to with the same transform
   ``compress_`` uses (``api._TRANSFORMS``; the transforms read ``module.weight`` and build a
   new module, the model is not modified). A candidate the transform refuses
   (``UnsupportedModule``, or a ``ValueError`` for a shape it cannot take) is not an option for
   that layer and the table says why. Keeping the layer dense is always an option (error 0, the
   dense bytes). Layers whose weight is tied to another module, modules reachable under several
   names, and layers that never ran on the calibration data stay dense and count at their dense
   size.
3. **Sensitivity.** One pass of the calibration data through the (unmodified) model; a forward
   hook on every layer runs each option on the layer's real input and accumulates, in float64,
   ``||y_c - y||**2`` and ``||y||**2`` over all batches. ``metric="relative_mse"`` (default)
   scores an option by ``sum ||y_c - y||**2 / sum ||y||**2`` (comparable across layers);
   ``"mse"`` by ``sum ||y_c - y||**2 / numel``. Activations are not stored.
4. **Choice.** :func:`choose` solves the multiple-choice knapsack "least total error with total
   stored bytes <= ``budget`` x dense bytes": exact (a Pareto-frontier dynamic program) unless
   the frontier outgrows ``MAX_STATES``, then a greedy on the LP relaxation plus an improvement
   pass, whose gap to the optimum is bounded by the LP bound it reports (``Plan.lower_bound``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from compress_ops._text import format_table
from compress_ops.api import Recipe
from compress_ops.configs import (
    CodebookConfig,
    LowRankConfig,
    QuantConfig,
    Sparse24Config,
    UnsupportedModule,
)
from compress_ops.nn.lowrank import LowRankConv2d, LowRankLinear
from compress_ops.prune import eval_mode

__all__ = ["DEFAULT_CANDIDATES", "MAX_STATES", "Plan", "PlanRow", "Solution", "choose", "plan",
           "solve"]

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

#: The exact solver gives up (and the LP-greedy takes over) when its Pareto frontier of partial
#: plans would hold more states than this after some layer, or when it would have kept more
#: than ``MAX_STATES * 200`` back pointers in all (6 bytes each: ~120 MB).
MAX_STATES = 100_000

METRICS = ("relative_mse", "mse")
_DENSE = "dense"
_KEY_FIELDS = ("bits", "rank", "energy")


# --------------------------------------------------------------------------------------------
# the solver


@dataclass(frozen=True)
class Solution:
    """What :func:`solve` found: ``choice[i]`` indexes layer ``i``'s options.

    ``exact`` says ``error`` is the optimum; otherwise ``lower_bound`` (the LP relaxation's
    optimum) is at most the optimum, so ``error - lower_bound`` bounds the gap.
    """

    choice: list[int]
    bytes: int
    error: float
    exact: bool
    lower_bound: float


def _check_options(options: Sequence[Sequence[tuple[int, float]]], capacity: int) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int (bytes), got {type(capacity).__name__}")
    for i, opts in enumerate(options):
        if len(opts) == 0:
            raise ValueError(f"options[{i}] is empty: every layer needs at least one option")
        for j, (b, e) in enumerate(opts):
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"options[{i}][{j}] bytes must be an int >= 0, got {b!r}")
            if not math.isfinite(e):
                raise ValueError(f"options[{i}][{j}] error must be finite, got {e!r}")


def _pareto(opts: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the options no other option beats (fewer or equal bytes and lower or equal
    error), by increasing bytes (so by strictly decreasing error)."""
    keep: list[int] = []
    for j in sorted(range(len(opts)), key=lambda j: (opts[j][0], opts[j][1], j)):
        if not keep or opts[j][1] < opts[keep[-1]][1]:
            keep.append(j)
    return keep


def _frontier_dp(front: list[list[tuple[int, float]]], capacity: int,
                 max_states: int) -> list[int] | None:
    """Exact: the Pareto frontier of (bytes, error) over the first ``i`` layers, grown layer by
    layer; a partial plan that no longer fits (with the remaining layers at their smallest) or
    that another beats is dropped. ``None`` when the frontier outgrows ``max_states``."""
    n = len(front)
    rest = [0] * (n + 1)  # smallest bytes of layers i..n-1
    for i in range(n - 1, -1, -1):
        rest[i] = rest[i + 1] + front[i][0][0]
    states_b = torch.zeros(1, dtype=torch.int64)
    states_e = torch.zeros(1, dtype=torch.float64)
    back: list[tuple[torch.Tensor, torch.Tensor]] = []
    kept = 0
    for i, opts in enumerate(front):
        ob = torch.tensor([b for b, _ in opts], dtype=torch.int64)
        oe = torch.tensor([e for _, e in opts], dtype=torch.float64)
        nb = (states_b[:, None] + ob[None, :]).reshape(-1)
        ne = (states_e[:, None] + oe[None, :]).reshape(-1)
        idx = torch.nonzero(nb <= capacity - rest[i + 1]).reshape(-1)
        # by bytes, ties by error: then a state is kept iff its error is below every earlier one
        idx = idx[torch.argsort(ne[idx], stable=True)]
        idx = idx[torch.argsort(nb[idx], stable=True)]
        e_sorted = ne[idx]
        best_before = torch.cat([e_sorted.new_full((1,), math.inf),
                                 torch.cummin(e_sorted, 0).values[:-1]])
        idx = idx[e_sorted < best_before]
        kept += idx.numel()
        if idx.numel() > max_states or kept > 200 * max_states:
            return None
        states_b, states_e = nb[idx], ne[idx]
        back.append(((idx // len(opts)).to(torch.int32), (idx % len(opts)).to(torch.int16)))
    # the frontier is sorted by bytes with strictly decreasing error: the last state is best
    state = states_b.numel() - 1
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        parent, opt = back[i]
        choice[i] = int(opt[state])
        state = int(parent[state])
    return choice


def _hull(opts: list[tuple[int, float]]) -> list[int]:
    """Indices (into the Pareto list ``opts``) of its lower convex hull, from the smallest: the
    error drop per extra byte strictly decreases along it."""
    hull: list[int] = []
    for j, (b, e) in enumerate(opts):
        while len(hull) >= 2:
            (b1, e1), (b2, e2) = opts[hull[-2]], opts[hull[-1]]
            # drop the middle point unless it lies strictly below the chord (b1,e1)-(b,e)
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _lp_greedy(front: list[list[tuple[int, float]]],
               capacity: int) -> tuple[list[int], float]:
    """Greedy on the LP relaxation: start every layer at its smallest option, take the hull
    upgrades by decreasing error drop per byte while they fit, then improve single layers while
    any change fits and lowers the error. Returns ``(choice, LP lower bound)``."""
    n = len(front)
    choice = [0] * n
    left = capacity - sum(opts[0][0] for opts in front)
    error = sum(opts[0][1] for opts in front)
    steps = []  # (-drop per byte, layer, from, to)
    for i, opts in enumerate(front):
        h = _hull(opts)
        for a, b in zip(h, h[1:], strict=False):
            db, de = opts[b][0] - opts[a][0], opts[a][1] - opts[b][1]
            steps.append((-de / db, i, a, b))
    steps.sort()
    bound = None
    for neg_rate, i, a, b in steps:
        db = front[i][b][0] - front[i][a][0]
        if choice[i] != a:
            continue  # an earlier upgrade of this layer did not fit
        if db <= left:
            choice[i] = b
            left -= db
            error -= front[i][a][1] - front[i][b][1]
        elif bound is None:  # the LP optimum takes this upgrade fractionally
            bound = error + neg_rate * left
    lower_bound = error if bound is None else bound
    while True:  # improvement: the single-layer change with the largest error drop that fits
        best = None
        for i, opts in enumerate(front):
            cb, ce = opts[choice[i]]
            for j, (b, e) in enumerate(opts):
                if e < ce and b - cb <= left and (best is None or ce - e > best[0]):
                    best = (ce - e, i, j)
        if best is None:
            break
        _, i, j = best
        left -= front[i][j][0] - front[i][choice[i]][0]
        choice[i] = j
    return choice, lower_bound


def solve(options: Sequence[Sequence[tuple[int, float]]], capacity: int, *,
          max_states: int = MAX_STATES) -> Solution:
    """Multiple-choice knapsack: one option ``(bytes, error)`` per layer, least total error with
    total bytes ``<= capacity``.

    Dominated options are dropped, then a dynamic program over the Pareto frontier of partial
    plans finds the optimum (ties: fewer bytes). If that frontier would hold more than
    ``max_states`` states, a greedy on the LP relaxation plus an improvement pass answers
    instead (``exact=False``; ``lower_bound`` certifies the gap). The result always fits.
    ``ValueError`` when even the smallest option of every layer does not fit.
    """
    _check_options(options, capacity)
    keep = [_pareto(opts) for opts in options]
    front = [[(int(options[i][j][0]), float(options[i][j][1])) for j in k]
             for i, k in enumerate(keep)]
    smallest = sum(opts[0][0] for opts in front)
    if smallest > capacity:
        raise ValueError(f"no choice fits: the smallest options take {smallest} bytes > "
                         f"capacity {capacity}")
    local = _frontier_dp(front, capacity, max_states) if front else []
    exact = local is not None
    if local is None:
        local, lower_bound = _lp_greedy(front, capacity)
    choice = [keep[i][j] for i, j in enumerate(local)]
    total_b = sum(options[i][j][0] for i, j in enumerate(choice))
    total_e = math.fsum(options[i][j][1] for i, j in enumerate(choice))
    if total_b > capacity:  # cannot happen; never hand back a plan over budget
        raise AssertionError(f"solver bug: {total_b} bytes > capacity {capacity}")
    return Solution(choice, total_b, total_e, exact, total_e if exact else min(lower_bound,
                                                                                total_e))


def choose(options: Sequence[Sequence[tuple[int, float]]], capacity: int) -> list[int]:
    """``options[i]``: layer ``i``'s ``(bytes, error)`` options; returns the index of the option
    chosen per layer (least total error with total bytes ``<= capacity``). See :func:`solve`."""
    return solve(options, capacity).choice


# --------------------------------------------------------------------------------------------
# the plan


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
    compression (``stored_bytes <= budget * dense_bytes``); ``total_error``: the sum of the
    chosen options' errors; ``exact``: the choice is optimal, else it is within
    ``total_error - lower_bound`` of the optimum. ``str(plan)`` renders the table.
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
        if type(cfg) not in _TRANSFORMS:
            raise TypeError(f"candidate {cfg!r} is not a per-layer config; expected one of "
                            f"{[t.__name__ for t in _TRANSFORMS]}")
        if getattr(cfg, "shared", False):
            raise ValueError(f"candidate {cfg!r}: a shared codebook spans several layers and "
                             f"cannot be measured layer by layer; use shared=False")
        if cfg not in out:
            out.append(cfg)
    if not out:
        raise ValueError("candidates is empty")
    return out


def _check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
            or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a number in (0, 1] (stored bytes / dense bytes), "
                         f"got {budget!r}")
    return float(budget)


def _run(model: nn.Module, batch: object, forward: Callable | None) -> object:
    if forward is not None:
        return forward(model, batch)
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


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
    batch)`` runs one batch (default ``model(batch[0])`` for tuples/lists, else
    ``model(batch)``). The model runs in eval mode (BatchNorm statistics untouched, no dropout;
    each module's mode is restored afterwards). ``candidates``:
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
    budget = _check_budget(budget)
    cands = _check_candidates(candidates)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(calib_data, torch.Tensor) or not isinstance(calib_data, Iterable):
        raise TypeError(f"calib_data must be an iterable of batches (e.g. [x] or a DataLoader), "
                        f"got {type(calib_data).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError("forward must be a callable forward(model, batch)")

    # 1. the layers in scope, and those that must stay dense
    types = tuple({t for cfg in cands for t in _TRANSFORMS[type(cfg)][0]})
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    owners: dict[int, list[str]] = {}
    for mid, module in modules.items():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(names[mid][0])
    wanted = None if layers is None else set(layers) if not isinstance(layers, str) else {layers}
    found: list[_Layer] = []
    for mid, aliases in names.items():
        module = modules[mid]
        if not isinstance(module, types) or isinstance(
                module, (CompressedLinear, LowRankConv2d, FusedDWSepConv2d)):
            continue
        if wanted is not None and not wanted.intersection(aliases):
            continue
        layer = _Layer(aliases, module, _weight_bytes(module))
        tied = [o for o in owners.get(id(module.weight), []) if o not in aliases]
        if len(aliases) > 1:
            layer.note = f"reached under {len(aliases)} names {aliases}; kept dense"
        elif tied:
            layer.note = f"weight tied to {tied[0]}; kept dense"
        found.append(layer)
    if wanted is not None:
        missing = sorted(wanted - {n for la in found for n in la.names})
        if missing:
            raise ValueError(f"layers {missing} are not modules of the model that the "
                             f"candidates handle ({[t.__name__ for t in types]})")

    # 2. every candidate for every layer (the transforms build new modules; the model is kept)
    for layer in found:
        if layer.note:
            continue
        for cfg in cands:
            if not isinstance(layer.module, _TRANSFORMS[type(cfg)][0]):
                continue
            try:
                new = _TRANSFORMS[type(cfg)][1](layer.module, cfg)
            except (UnsupportedModule, ValueError) as exc:
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
    dense_total = sum(layer.dense_bytes for layer in found)
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
    batches = 0
    try:
        with eval_mode(model):
            for batch in calib_data:
                _run(model, batch, forward)
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
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
        idle = [la.names[0] for la in active if la.calls == 0]
        raise ValueError(f"no layer in scope has a usable candidate after calibration; layers "
                         f"that never ran on calib_data (check forward): {idle}")
    _check_reachable([la for la in found if la.options], found, budget, capacity, dense_total)

    # 4. the choice: each layer's options plus dense
    active = [la for la in found if la.options]
    fixed = sum(la.dense_bytes for la in found if not la.options)
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
        + sum(la.dense_bytes for la in found if la not in active)
    if smallest > capacity:
        dense = [la.names[0] or "<root>" for la in found if la not in active]
        raise ValueError(
            f"budget {budget:g} cannot be met: the smallest plan stores {smallest} of "
            f"{dense_total} dense weight bytes ({smallest / dense_total:.4f} of dense) with "
            f"candidates {sorted({_label(o[0]) for la in active for o in la.options})}"
            + (f" and {len(dense)} layer(s) that must stay dense ({dense[:5]})" if dense
               else "")
            + f"; raise the budget to at least "
            f"{math.ceil(smallest / dense_total * 1e4) / 1e4:g} or add smaller candidates")
