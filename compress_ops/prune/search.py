"""``evolve()``: an evolutionary search over one config (or dense) per layer under a size
budget, every individual scored on the real compressed model; seeded from ``co.plan``.

    result = co.prune.search.evolve(model, calib_batches, budget=0.25)
    co.compress_(model, result)                    # a SearchResult is a Recipe, like a Plan

1. **Options.** :func:`compress_ops.plan` (or the ``plan=`` passed in) gives, for every layer in
   scope, the candidates that apply, their stored bytes and their predicted error. A *genome*
   is one option index per layer that has options (``len(options)`` = dense); the layers the
   plan keeps dense stay dense and count at the bytes the plan counted them.
2. **Budget.** Every individual stores at most ``floor(budget * dense_bytes)`` weight bytes (the
   plan's accounting). After crossover and mutation a *repair* moves, while over budget, the
   layer with the most bytes saved per unit of predicted error added to a smaller option; an
   individual over budget is never evaluated.
3. **Fitness** (lower is better). Default: ``sum ||f_c(x) - f(x)||**2 / sum ||f(x)||**2`` of
   the model output over ``calib_data`` (what ``co.plan``'s ``verify`` measures), with the
   replacements swapped into the model (the modules ``compress_`` builds; the layers are put
   back afterwards, also on an error); a genome holding a calibrated option (GPTQ, SparseGPT,
   Wanda) runs on a copy compressed by ``compress_(copy, recipe, calib=calib_data)``. Or a
   user ``fitness(model) -> float`` (e.g. a loss, ``1 - accuracy``), called the same way, in
   eval mode and under ``no_grad``. Fitness is cached by genome.
4. **Search.** Generation 0: the plan's choice, every uniform candidate that fits the budget,
   mutants of the plan and random (repaired) genomes. Each next generation keeps the
   ``elite`` best and fills the rest with tournament-selected parents, uniform crossover,
   per-gene mutation and the repair. All randomness comes from ``random.Random(seed)``: the
   same seed gives the same result and history, and no global RNG state is touched.
5. **Result.** The best genome ever evaluated (the plan's choice on a tie), so the result is
   never worse than the plan's choice on the fitness data; ``history`` holds the best fitness
   after each generation (non-increasing).

No FLOPs budget: a FLOPs count per option depends on the shapes each layer runs at and on
the kernel the compressed module uses (dequantize-then-matmul costs the dense FLOPs), which
the option table does not know; bytes are exact.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from compress_ops._swap import swapped_in
from compress_ops._text import format_table
from compress_ops._validate import check_bool, check_int, check_number
from compress_ops.api import Recipe, compress_
from compress_ops.calibrate import eval_mode, run_batch
from compress_ops.configs import transform_for
from compress_ops.planner import planning
from compress_ops.planner.planning import Plan, PlanRow, model_output, pinned

__all__ = ["SearchResult", "SearchRow", "evolve"]

DENSE = "dense"


@dataclass(frozen=True)
class SearchRow:
    """One layer of :attr:`SearchResult.table`: the search's choice (``candidate``, the rule
    ``config``, ``None`` for dense) and the plan's (``planned``); ``error`` is the plan's
    predicted error of the chosen option (0 for dense)."""

    layer: str
    candidate: str
    config: object
    dense_bytes: int
    stored_bytes: int
    error: float
    planned: str


@dataclass(frozen=True, eq=False)
class SearchResult(Recipe):
    """A :class:`~compress_ops.api.Recipe` (one exact rule per layer in scope) found by
    :func:`evolve`.

    ``stored_bytes``/``dense_bytes``: weight bytes of the layers in scope after/before
    (``stored_bytes <= budget * dense_bytes``, the plan's accounting). ``fitness``: the best
    measured fitness; ``plan_fitness``: the plan's choice's (the seed; ``fitness <=
    plan_fitness``); ``uniform_fitness``: ``{candidate: fitness}`` of every uniform candidate
    that fits the budget; ``history``: the best fitness after generation 0, 1, ...;
    ``evaluations``: distinct genomes measured; ``seconds``: wall time of ``evolve`` (the plan
    included, ``plan_seconds`` of it); ``genome``: option index per searched layer (the index
    past the last option is dense); ``plan``: the seed plan."""

    table: tuple[SearchRow, ...] = field(repr=False)
    budget: float
    dense_bytes: int
    stored_bytes: int
    fitness: float
    plan_fitness: float
    uniform_fitness: dict[str, float] = field(repr=False)
    history: tuple[float, ...] = field(repr=False)
    evaluations: int
    seconds: float
    plan_seconds: float
    seed: int
    genome: tuple[int, ...] = field(repr=False)
    plan: Plan = field(repr=False)
    default_fitness: bool = True

    def noted_types(self) -> tuple[type, ...]:
        """Every type in the plan's scope: ``report()`` lists the layers kept dense too."""
        return tuple(dict.fromkeys(super().noted_types() + self.plan.noted_types()))

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def __str__(self) -> str:
        head = ("layer", "plan", "search", "stored B", "ratio")
        rows = [(r.layer or "<root>", r.planned, r.candidate + ("" if r.candidate == r.planned
                                                                  else " *"),
                 str(r.stored_bytes), f"{r.stored_bytes / r.dense_bytes:.4f}"
                 if r.dense_bytes else "-") for r in self.table]
        rows.append(("TOTAL", f"{self.plan.stored_bytes} B", f"{self.stored_bytes} B",
                     str(self.stored_bytes), f"{self.ratio:.4f}"))
        what = "relative end-to-end error" if self.default_fitness else "fitness"
        lines = [f"budget {self.budget:g} x {self.dense_bytes} B dense; {what}: search "
                 f"{self.fitness:.6g}, plan {self.plan_fitness:.6g}"]
        if self.uniform_fitness:
            lines.append("uniform candidates that fit: " + ", ".join(
                f"{k} {v:.6g}" for k, v in self.uniform_fitness.items()))
        lines.append(f"{len(self.history) - 1} generations, {self.evaluations} evaluations, "
                     f"{self.seconds:.1f} s (plan {self.plan_seconds:.1f} s); best per "
                     f"generation: " + " ".join(f"{h:.4g}" for h in self.history))
        return format_table(head, rows) + "\n" + "\n".join(lines)


@dataclass(eq=False)
class _Layer:
    """A layer with options: the plan's rows for it, and the replacements built so far."""

    name: str
    module: nn.Module
    dense_bytes: int
    options: list[PlanRow]
    built: dict[int, nn.Module] = field(default_factory=dict)

    @property
    def dense(self) -> int:
        return len(self.options)

    def nbytes(self, j: int) -> int:
        return self.dense_bytes if j == self.dense else self.options[j].stored_bytes

    def error(self, j: int) -> float:
        return 0.0 if j == self.dense else self.options[j].error

    def label(self, j: int) -> str:
        return DENSE if j == self.dense else self.options[j].candidate

    def calibrated(self, j: int) -> bool:
        return j != self.dense and bool(getattr(self.options[j].config, "needs_calibration",
                                                False))

    def build(self, j: int) -> nn.Module:
        """The replacement ``compress_`` builds for option ``j`` (uncalibrated), once."""
        if j not in self.built:
            row = self.options[j]
            new = transform_for(row.config).build(self.module, row.config)
            if new.stored_weight_bytes() != row.stored_bytes:
                raise RuntimeError(
                    f"layer {self.name}: {row.candidate} stores {new.stored_weight_bytes()} B, "
                    f"the plan counted {row.stored_bytes} B; was the plan made for this model "
                    f"(its weights unchanged since)?")
            self.built[j] = new
        return self.built[j]

    def rule(self, j: int) -> object:
        if j == self.dense:
            return None
        cfg = self.options[j].config
        return cfg if self.calibrated(j) else pinned(cfg, self.build(j))


@contextlib.contextmanager
def _swapped(model: nn.Module, layers: Sequence[_Layer], genome: Sequence[int]
             ) -> Iterator[nn.Module]:
    """``model`` with the genome's replacements in place; yields the module to run (the
    replacement itself if it is the root). Every layer is put back afterwards."""
    with swapped_in(model, (((layer.name,), layer.module, layer.build(j))
                            for layer, j in zip(layers, genome, strict=True)
                            if j != layer.dense)) as root:
        yield root


def _layers_of(model: nn.Module, plan: Plan) -> tuple[list[_Layer], tuple[int, ...]]:
    """The plan's layers with options (in table order) and the plan's genome."""
    by_layer: dict[str, list[PlanRow]] = {}
    for row in plan.table:
        by_layer.setdefault(row.layer, []).append(row)
    modules = dict(model.named_modules())
    layers, genome = [], []
    for name, rows in by_layer.items():
        options = [r for r in rows if r.config is not None and r.stored_bytes is not None
                   and r.error is not None]
        if not options:
            continue
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) \
                or weight.numel() * weight.element_size() != rows[0].dense_bytes:
            raise ValueError(f"plan was not made for this model: layer {name!r} is missing or "
                             f"its weight is not {rows[0].dense_bytes} bytes")
        layer = _Layer(name, module, rows[0].dense_bytes, options)
        layers.append(layer)
        genome.append(next((k for k, r in enumerate(options) if r.chosen), layer.dense))
    if not layers:
        raise ValueError("plan has no layer with a candidate to search over")
    return layers, tuple(genome)


def _check_calib(calib_data: object) -> Sequence:
    if isinstance(calib_data, torch.Tensor) or not isinstance(calib_data, Iterable):
        raise TypeError(f"calib_data must be an iterable of batches (e.g. [x] or a DataLoader), "
                        f"got {type(calib_data).__name__}")
    if not isinstance(calib_data, Sequence):
        calib_data = list(calib_data)  # the same batches on every pass (a shuffling loader)
    if len(calib_data) == 0:
        raise ValueError("calib_data is empty; evolve needs calibration batches")
    return calib_data


def evolve(model: nn.Module, calib_data: Iterable, budget: float, *,
           candidates: Iterable[object] | None = None, population: int = 16,
           generations: int = 10, seed: int = 0,
           fitness: Callable[[nn.Module], float] | None = None,
           forward: Callable[[nn.Module, object], object] | None = None,
           output: Callable[[object], torch.Tensor] | None = None,
           layers: Iterable[str] | str | None = None, plan: Plan | None = None,
           metric: str = "output", elite: int | None = None, tournament: int = 3,
           crossover: float = 0.9, mutation: float | None = None,
           verbose: bool = True) -> SearchResult:
    """Search one config (or dense) per layer under ``budget`` (stored / dense weight bytes of
    the layers in scope, as in :func:`compress_ops.plan`) for the lowest fitness measured on
    the compressed model (see the module docstring).

    ``candidates``, ``layers``, ``metric``, ``forward``, ``output``: as in ``co.plan``, which
    is called first (``verify=True``, quietly) unless ``plan=`` (a ``Plan`` of this model whose
    choice fits ``budget``) is given; then ``candidates``/``layers`` must be left ``None``.
    ``forward``/``output`` also run the default fitness. ``fitness(model) -> float``: lower is
    better; called with the compressed model (eval mode, ``no_grad``); it must not change the
    model. ``population`` (>= 2) individuals, ``generations`` (>= 1) after generation 0,
    ``elite`` kept each generation (default ``max(1, population // 8)``), ``tournament`` size,
    ``crossover`` probability, ``mutation`` probability per gene (default 1 / genes; at least
    one gene changes). ``verbose``: a progress bar (tqdm if installed, else one line per
    generation on stderr). The model is not modified.

    ``ValueError``: an unreachable budget (the message names the smallest fraction), empty
    ``calib_data``, ``population < 2``, ``generations < 1``; ``TypeError``: a model that is
    not an ``nn.Module``, a ``fitness`` that is not callable.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = check_number("budget", budget, low=0.0, high=1.0, low_open=True,
                          hint="(stored bytes / dense bytes)")
    calib_data = _check_calib(calib_data)
    if check_int("population", population, min=0) < 2:
        raise ValueError(f"population must be >= 2 individuals, got {population}")
    check_int("generations", generations, min=1)
    check_int("seed", seed)
    check_int("tournament", tournament, min=1)
    elite = max(1, population // 8) if elite is None else check_int("elite", elite, min=1)
    if elite >= population:
        raise ValueError(f"elite must be < population ({population}), got {elite}")
    crossover = check_number("crossover", crossover, low=0.0, high=1.0)
    if mutation is not None:
        mutation = check_number("mutation", mutation, low=0.0, high=1.0)
    check_bool("verbose", verbose)
    for name, fn in (("fitness", fitness), ("forward", forward), ("output", output)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")

    if plan is None:
        plan = planning.plan(model, calib_data, budget,
                             candidates=planning.DEFAULT_CANDIDATES if candidates is None
                             else candidates, metric=metric, layers=layers, forward=forward,
                             output=output, verify=True, verbose=False)
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan from co.plan, got {type(plan).__name__}")
    elif candidates is not None or layers is not None:
        raise ValueError("pass candidates= and layers= to co.plan, not with plan=")
    plan_seconds = time.perf_counter() - t0

    found, seed_genome = _layers_of(model, plan)
    capacity = math.floor(Fraction(budget) * plan.dense_bytes)
    fixed = plan.stored_bytes - sum(la.nbytes(j) for la, j in zip(found, seed_genome,
                                                                   strict=True))

    def nbytes(genome: Sequence[int]) -> int:
        return fixed + sum(la.nbytes(j) for la, j in zip(found, genome, strict=True))

    smallest = fixed + sum(min(la.nbytes(j) for j in range(la.dense + 1)) for la in found)
    if smallest > capacity:
        raise ValueError(
            f"budget {budget:g} cannot be met: the smallest choice stores {smallest} of "
            f"{plan.dense_bytes} dense weight bytes ({smallest / plan.dense_bytes:.4f} of "
            f"dense); raise the budget to at least "
            f"{math.ceil(smallest / plan.dense_bytes * 1e4) / 1e4:g} or add smaller candidates")
    if nbytes(seed_genome) > capacity:
        raise ValueError(f"plan was made for budget {plan.budget:g}: its choice stores "
                         f"{nbytes(seed_genome)} B, over budget {budget:g} ({capacity} B)")

    # ---- fitness
    dense_out: list[torch.Tensor] = []
    ref = 0.0
    if fitness is None:
        with torch.no_grad(), eval_mode(model):
            for batch in calib_data:
                f = model_output(run_batch(model, batch, forward), output).double()
                dense_out.append(f)
                ref += float(f.pow(2).sum())
    scale = 1.0 / ref if ref > 0 else 1.0

    def score(root: nn.Module) -> float:
        with torch.no_grad(), eval_mode(root):
            if fitness is not None:
                return float(fitness(root))
            sq = 0.0
            for f, batch in zip(dense_out, calib_data, strict=True):
                fc = model_output(run_batch(root, batch, forward), output).double()
                sq += float((fc - f).pow(2).sum())
            return sq * scale

    def rules(genome: Sequence[int]) -> dict[str, object]:
        out = dict(plan.rules)
        for la, j in zip(found, genome, strict=True):
            out[re.escape(la.name)] = la.rule(j)
        return out

    cache: dict[tuple[int, ...], float] = {}
    order: dict[tuple[int, ...], int] = {}

    def evaluate(genome: tuple[int, ...]) -> float:
        if genome in cache:
            return cache[genome]
        if nbytes(genome) > capacity:  # (the repair makes this unreachable)
            raise AssertionError(f"genome {genome} over budget")
        if any(la.calibrated(j) for la, j in zip(found, genome, strict=True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                other = compress_(copy.deepcopy(model), Recipe(rules(genome)), calib=calib_data,
                                  forward=forward, progress=False)
            value = score(other)
            del other
        else:
            with _swapped(model, found, genome) as root:
                value = score(root)
        value = value if math.isfinite(value) else math.inf
        cache[genome] = value
        order[genome] = len(order)
        return value

    def key(genome: tuple[int, ...]) -> tuple[float, int]:
        return cache[genome], order[genome]

    # ---- operators (all randomness from rng)
    rng = random.Random(seed)
    genes = len(found)
    rate = 1.0 / genes if mutation is None else mutation

    def repair(genome: list[int]) -> tuple[int, ...]:
        total = nbytes(genome)
        while total > capacity:
            best = None
            for i, la in enumerate(found):
                cur_b, cur_e = la.nbytes(genome[i]), la.error(genome[i])
                for j in range(la.dense + 1):
                    saved = cur_b - la.nbytes(j)
                    if saved <= 0:
                        continue
                    added = la.error(j) - cur_e
                    ratio = saved / added if added > 0 else math.inf
                    k = (-ratio, -saved, i, j)
                    if best is None or k < best[0]:
                        best = (k, i, j, saved)
            _, i, j, saved = best  # (some smaller option exists while over the smallest)
            genome[i] = j
            total -= saved
        return tuple(genome)

    def mutate(genome: list[int]) -> list[int]:
        changed = False
        for i, la in enumerate(found):
            if la.dense > 0 and rng.random() < rate:
                genome[i] = (genome[i] + 1 + rng.randrange(la.dense)) % (la.dense + 1)
                changed = True
        if not changed:
            movable = [i for i, la in enumerate(found) if la.dense > 0]
            if movable:
                i = movable[rng.randrange(len(movable))]
                n = found[i].dense + 1
                genome[i] = (genome[i] + 1 + rng.randrange(n - 1)) % n
        return genome

    def pick(pop: list[tuple[int, ...]]) -> tuple[int, ...]:
        return min((pop[rng.randrange(len(pop))] for _ in range(tournament)), key=key)

    # ---- generation 0: the plan, the uniform candidates that fit, mutants, random genomes
    uniform: dict[str, tuple[int, ...]] = {}
    labels = list(dict.fromkeys(r.candidate for la in found for r in la.options))
    for label in labels:
        g = tuple(next((k for k, r in enumerate(la.options) if r.candidate == label), la.dense)
                  for la in found)
        if nbytes(g) <= capacity:
            uniform[label] = g
    pop: list[tuple[int, ...]] = [seed_genome]
    for g in uniform.values():
        if g not in pop and len(pop) < population:
            pop.append(g)
    tries = 0
    while len(pop) < population and tries < 20 * population:
        tries += 1
        if tries % 2:
            g = repair(mutate(list(seed_genome)))
        else:
            g = repair([rng.randrange(la.dense + 1) for la in found])
        if g not in pop:
            pop.append(g)
    bar = _progress(generations, verbose)
    for g in pop:
        evaluate(g)
    uniform_fitness = {label: evaluate(g) for label, g in uniform.items()}
    best = min(cache, key=key)  # (a uniform genome the population had no room for included)
    if best not in pop:
        pop[max(range(len(pop)), key=lambda i: key(pop[i]))] = best
    history = [cache[best]]
    bar(0, history[-1], len(cache))

    for gen in range(1, generations + 1):
        ranked = sorted(pop, key=key)
        nxt = ranked[:elite]
        while len(nxt) < population:
            for _ in range(10):  # prefer a genome not measured yet
                a = pick(pop)
                child = list(a)
                if rng.random() < crossover:
                    b = pick(pop)
                    child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
                child = repair(mutate(child))
                if child not in cache and child not in nxt:
                    break
            evaluate(child)
            nxt.append(child)
        pop = nxt
        best = min(cache, key=key)  # the best ever measured (the elite keeps it in pop)
        history.append(cache[best])
        bar(gen, history[-1], len(cache))
    bar(None, history[-1], len(cache))

    table = []
    for la, j, p in zip(found, best, seed_genome, strict=True):
        table.append(SearchRow(la.name, la.label(j), la.rule(j), la.dense_bytes, la.nbytes(j),
                               la.error(j), la.label(p)))
    result = SearchResult(rules(best), table=tuple(table), budget=budget,
                          dense_bytes=plan.dense_bytes, stored_bytes=nbytes(best),
                          fitness=cache[best], plan_fitness=cache[seed_genome],
                          uniform_fitness=uniform_fitness, history=tuple(history),
                          evaluations=len(cache), seconds=time.perf_counter() - t0,
                          plan_seconds=plan_seconds, seed=seed, genome=best, plan=plan,
                          default_fitness=fitness is None)
    if verbose:
        print(result, file=sys.stderr)
    return result


def _progress(generations: int, verbose: bool) -> Callable[[int | None, float, int], None]:
    """``update(generation, best, evaluations)`` (``None``: done): a tqdm bar when tqdm is
    installed, else one line per generation on stderr; nothing unless ``verbose``."""
    if not verbose:
        return lambda *_: None
    try:
        from tqdm import tqdm
    except ImportError:
        def line(gen: int | None, best: float, evaluations: int) -> None:
            if gen is not None:
                print(f"evolve: generation {gen}/{generations}, best {best:.6g}, "
                      f"{evaluations} evaluations", file=sys.stderr, flush=True)
        return line
    bar = tqdm(total=generations, desc="evolve", file=sys.stderr, leave=True)

    def update(gen: int | None, best: float, evaluations: int) -> None:
        if gen is None:
            bar.close()
            return
        bar.set_postfix(best=f"{best:.4g}", evals=evaluations)
        if gen:
            bar.update(1)
    return update
