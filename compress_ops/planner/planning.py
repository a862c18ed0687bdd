"""``plan()``: measure every candidate config on every layer in scope, then let the solver
choose one per layer under the size budget; the choice is a :class:`Plan` (a ``Recipe``).

Each option's error is its predicted contribution to the *end-to-end* output error
(``metric="output"``, the default), or its local output error (``"relative_mse"``, ``"mse"``);
the chosen plan is then measured end to end against every uniform candidate that fits the
same budget, and the best of them is returned (``verify=True``, the default)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from compress_ops._linear import LINEAR_TYPES
from compress_ops._swap import hooks_reason, index, swapped_in
from compress_ops._text import format_table
from compress_ops._validate import check_bool, check_choice, check_number
from compress_ops.api import Recipe, compress_
from compress_ops.calibrate import eval_mode, input_hessians, run_batch, run_with_hooks
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

__all__ = ["DEFAULT_CANDIDATES", "METRICS", "PROBES", "Plan", "PlanRow", "model_output", "pinned",
           "plan"]

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

METRICS = ("output", "relative_mse", "mse")
_DENSE = "dense"
_KEY_FIELDS = ("bits", "rank", "energy")
#: Random probes (backward passes) per calibration batch for ``metric="output"``.
PROBES = 4
_SOLVED = "solved"


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
    ``total_error``: the sum of the chosen options' errors (under ``metric="output"``: the
    predicted relative end-to-end error); ``exact``: the solver's choice is optimal for the
    summed errors, else it is within ``total_error - lower_bound`` of the optimum (a lower
    bound for every choice). ``chosen``: ``"solved"`` (the solver's choice) or
    ``"uniform <candidate>"`` (one candidate wherever it applies, when that measured better end
    to end). ``end_to_end``: ``{"solved" or candidate label: measured error}`` for the solver's
    choice and every uniform candidate that fits the budget, the error being
    ``sum ||f_c(x) - f(x)||**2 / sum ||f(x)||**2`` of the model output over the calibration
    data (empty with ``verify=False``); ``solved_error``: the solver's choice's summed error
    (``total_error`` unless a uniform candidate was chosen). ``str(plan)`` renders the table.
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
    chosen: str = _SOLVED
    end_to_end: dict[str, float] = field(default_factory=dict, repr=False)
    solved_error: float | None = None

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
        solved = self.total_error if self.solved_error is None else self.solved_error
        if self.exact:
            solver = "optimal (exact solver)"
        else:
            solver = (f"within {solved - self.lower_bound:.4g} of optimal "
                      f"(LP bound {self.lower_bound:.4g})")
        what = "predicted end-to-end" if self.metric == "output" else "summed layer"
        lines = [f"metric {self.metric} ({what} error); the solver's choice, total error "
                 f"{solved:.4g}, is {solver}"]
        if self.end_to_end:
            measured = ", ".join(f"{k} {v:.4g}" for k, v in self.end_to_end.items())
            lines.append(f"measured end-to-end error on the calibration data: {measured}")
            lines.append(f"chosen: {self.chosen}"
                         + ("" if self.chosen == _SOLVED else
                            " (it measured below the solver's choice)"))
        return format_table(head, rows) + "\n" + "\n".join(lines)


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


def pinned(config: object, new: nn.Module) -> object:
    """The rule ``compress_`` gets: an energy-based LowRankConfig pinned to the rank that was
    measured (so a re-run of the SVD cannot land one rank higher, over the budget)."""
    if isinstance(config, LowRankConfig) and config.energy is not None:
        if isinstance(new, LowRankLinear):
            return LowRankConfig(rank=new.rank, method=config.method)
        if isinstance(new, LowRankConv2d) and new.ranks[0] == new.ranks[1]:
            return LowRankConfig(rank=new.ranks[0], method=config.method)
    return config


def model_output(out: object, output: Callable[[object], torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """The tensor of a model's output that :func:`plan` compares: ``output(out)`` if given;
    else ``out`` itself if it is a tensor; else its ``logits``, else its
    ``last_hidden_state`` (a Hugging Face ``ModelOutput`` or any mapping), else its first
    tensor (a mapping's first tensor value, a tuple's or list's first tensor element).
    ``TypeError`` when there is none, or it is not a floating-point tensor."""
    if output is not None:
        t = output(out)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"output(model output) must return a tensor, got "
                            f"{type(t).__name__}")
    elif isinstance(out, torch.Tensor):
        t = out
    else:
        t = None
        if isinstance(out, Mapping):
            for key in ("logits", "last_hidden_state"):
                if isinstance(out.get(key), torch.Tensor):
                    t = out[key]
                    break
            values: Iterable = out.values() if t is None else ()
        else:
            values = out if isinstance(out, (tuple, list)) else ()
        t = t if t is not None else next((v for v in values if isinstance(v, torch.Tensor)),
                                         None)
        if t is None:
            raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor to "
                            f"compare; pass plan(..., output=fn) taking the output to a tensor, "
                            f"or a forward(model, batch) that returns one")
    if not t.is_floating_point():
        raise TypeError(f"the model output compared must be a floating-point tensor, got "
                        f"{t.dtype}; pass plan(..., output=fn)")
    return t


@dataclass(eq=False)
class _Layer:
    names: list[str]
    module: nn.Module
    dense_bytes: int
    note: str = ""  # why it stays dense (or, with options, what the table should say)
    budgeted: bool = True  # False: a tied weight, which no config may compress
    # one per applicable candidate: [config, replacement, stored bytes, sq err, sq ref, numel]
    # (after scoring: [config, replacement, stored bytes, error])
    options: list[list] = field(default_factory=list)
    refused: list[tuple[object, str]] = field(default_factory=list)
    calls: int = 0
    reached: bool = False  # metric "output": some gradient from the model output reached it


@torch.no_grad()
def plan(model: nn.Module, calib_data: Iterable, budget: float, *,
         candidates: Iterable[object] = DEFAULT_CANDIDATES,
         forward: Callable[[nn.Module, object], object] | None = None,
         metric: str = "output", output: Callable[[object], torch.Tensor] | None = None,
         verify: bool = True, verbose: bool = True,
         layers: Iterable[str] | None = None,
         verify_data: Iterable | None = None) -> Plan:
    """Choose a config (or dense) per layer so the compressed weights take at most ``budget``
    x their dense bytes with the least error of the model output on ``calib_data``.

    ``calib_data``: an iterable of batches (a list, a DataLoader; a one-shot iterator is read
    into a list, since it is run several times); ``forward(model, batch)`` runs one batch and
    returns the model's output (default ``model(**batch)`` for a mapping such as a Hugging
    Face ``BatchEncoding``, ``model(batch[0])`` for tuples/lists, else ``model(batch)``). The
    model runs in eval mode (BatchNorm statistics untouched, no dropout; each module's mode is
    restored afterwards). ``output``: takes the model's output to the tensor that is compared
    (default :func:`model_output`: the output if it is a tensor, else its ``logits``, else its
    ``last_hidden_state``, else its first tensor; for a sentence encoder whose padded
    positions do not count, return e.g. the mean-pooled embedding).

    ``candidates``: per-layer configs (default :data:`DEFAULT_CANDIDATES`), calibrated ones
    (GPTQ, SparseGPT, Wanda) included; a shared ``CodebookConfig`` is a ``ValueError`` (its
    table depends on which other layers share it). ``metric`` scores each option:

    - ``"output"`` (default): its predicted contribution to the end-to-end error ``D = sum
      ||f_c(x) - f(x)||**2 / sum ||f(x)||**2`` of the model output. To second order ``D`` adds
      ``dy^T J^T J dy`` per layer, ``dy`` the error the option adds to the layer's own output
      and ``J`` the Jacobian of the model output with respect to that output; ``diag(J^T J)``
      is estimated per element of ``y`` by back-propagating :data:`PROBES` random Gaussian
      vectors ``v`` from the model output (``E[(J^T v)**2] = diag(J^T J)``), so the error is
      ``sum g**2 * dy**2`` over the calibration data: a layer whose errors the rest of the
      network amplifies counts more. Needs the output to be differentiable with respect to
      the layers (``ValueError`` otherwise); a layer no gradient reaches (say BERT's pooler
      when the output compared is ``last_hidden_state``) scores 0 for every option. Costs
      one forward pass with gradients and :data:`PROBES` backward passes (to the activations
      only) per batch, and holds one batch's activations, inputs and outputs of the layers in
      scope at a time (as a training step does).
    - ``"relative_mse"``: ``sum ||y_c - y||**2 / sum ||y||**2`` of the layer's own output;
      ``"mse"``: ``sum ||y_c - y||**2 / numel``. One forward pass, no gradients.

    ``verify`` (default True): the solver's choice is then run end to end on ``calib_data``,
    and so is every *uniform* candidate (that candidate on every layer in scope it applies to,
    the rest dense, exactly as ``compress_(model, candidate)`` would; layers that must stay
    dense stay dense) whose bytes, counted as the plan's, fit the same budget; if a uniform
    candidate's measured error ``D`` is lower, it is returned instead (``Plan.chosen``; every
    measured ``D`` is ``Plan.end_to_end``). The returned plan is therefore never worse on the
    calibration data than the best uniform candidate that fits. ``verify_data``: batches
    (the same form as ``calib_data``) the check runs on instead, the choices still calibrated
    on ``calib_data``. Pass batches the model is not calibrated on: on the calibration data
    itself a mix of calibrated options (GPTQ) can measure better than it generalizes (on
    all-MiniLM-L6-v2 at uniform int4's bytes, a mix won on its 128 calibration sentences and
    lost to uniform int4 GPTQ on held-out ones). The plan is then never worse than the best
    uniform candidate on those batches.
    Cost: one forward pass of the dense model plus one per measured choice per batch. A choice
    of uncalibrated options runs with the replacements already built for the table swapped
    into ``model`` (the same modules ``compress_`` builds; the layers are put back afterwards,
    also on an error): no copy. A choice holding a calibrated option (GPTQ, SparseGPT, Wanda)
    is measured as it will be applied, on a copy of the model compressed by
    ``compress_(copy, choice, calib=calib_data, forward=forward)``: one model copy (deleted
    before the next) and that calibration, plus a dense forward pass per batch, each. (The
    table's errors of calibrated options come from modules calibrated on the dense model's
    inputs; ``compress_`` calibrates block by block on the compressed blocks' outputs.)

    ``layers``: names of the layers in scope (default: every module of a type a candidate
    handles). ``budget`` in ``(0, 1]`` counts the stored weight bytes of the layers in scope
    against their dense bytes in the model's own dtype (fp32 weights: a fraction of fp32
    bytes); 1 allows keeping everything dense. ``verbose`` prints the table.

    Returns a :class:`Plan` (a Recipe: ``compress_(model, plan)`` applies it; with calibrated
    candidates ``compress_(model, plan, calib=calib_data)``). ``ValueError``: a budget below
    the smallest achievable fraction (named in the message), empty ``calib_data``, or no layer
    any candidate applies to. The model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = check_number("budget", budget, low=0.0, high=1.0, low_open=True,
                          hint="(stored bytes / dense bytes)")
    cands = _check_candidates(candidates)
    check_choice("metric", metric, METRICS)
    check_bool("verify", verify)
    if isinstance(calib_data, torch.Tensor) or not isinstance(calib_data, Iterable):
        raise TypeError(f"calib_data must be an iterable of batches (e.g. [x] or a DataLoader), "
                        f"got {type(calib_data).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError("forward must be a callable forward(model, batch)")
    if output is not None and not callable(output):
        raise TypeError("output must be a callable output(model_output) -> tensor")
    calibrated = any(getattr(cfg, "needs_calibration", False) for cfg in cands)
    if (calibrated or verify or metric == "output") and iter(calib_data) is calib_data:
        calib_data = list(calib_data)  # run more than once
    if verify_data is not None:
        if isinstance(verify_data, torch.Tensor) or not isinstance(verify_data, Iterable):
            raise TypeError(f"verify_data must be an iterable of batches, got "
                            f"{type(verify_data).__name__}")
        if not verify:
            raise ValueError("verify_data is read by the end-to-end check: pass verify=True")
        verify_data = list(verify_data)
        if not verify_data:
            raise ValueError("verify_data is empty")

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
        hooked = hooks_reason(module)
        if len(aliases) > 1:
            layer.note = f"reached under {len(aliases)} names {aliases}; kept dense"
        elif tied:
            layer.note = (f"weight tied to {tied[0]}; kept dense and outside the budget (no "
                          f"config may compress it)")
            layer.budgeted = False
        elif hooked:
            layer.note = f"{hooked}; kept dense (compress_ would)"
        found.append(layer)
    if wanted is not None:
        missing = sorted(wanted - {n for la in found for n in la.names})
        if missing:
            raise ValueError(f"layers {missing} are not modules of the model that the "
                             f"candidates handle ({[t.__name__ for t in types]})")

    # 2. every candidate for every layer (the transforms build new modules; the model is kept);
    # calibrated candidates (GPTQ, SparseGPT, Wanda) from each layer's input Hessian
    hessians: dict[str, torch.Tensor] = {}
    if calibrated:
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

    # 3. the errors: one calibration pass, each option run on the layer's real input
    active = [la for la in found if la.options]
    if metric == "output":
        _measure_output(model, active, calib_data, forward, output)
    else:
        _measure_local(model, active, calib_data, forward, metric)
    if not any(layer.options for layer in found):
        why = [f"{la.names[0]}: " + ("never ran on calib_data (check forward)" if la.calls == 0
                                      else "; ".join(dict.fromkeys(r for _, r in la.refused))
                                      or la.note)
               for la in active]
        raise ValueError("no layer in scope has a usable candidate after calibration:\n  "
                         + "\n  ".join(why))
    _check_reachable([la for la in found if la.options], found, budget, capacity, dense_total)

    # 4. the choice: each layer's options plus dense
    active = [la for la in found if la.options]
    fixed = sum(la.dense_bytes for la in found if not la.options and la.budgeted)
    sol = solve([[(o[2], o[3]) for o in la.options] + [(la.dense_bytes, 0.0)] for la in active],
                capacity - fixed)
    picked = {id(la): j for la, j in zip(active, sol.choice, strict=True)
              if j < len(la.options)}

    # 5. the check: the solver's choice against every uniform candidate that fits, end to end
    chosen, end_to_end = _SOLVED, {}
    if verify:
        choices = {_SOLVED: picked}
        for cfg in cands:
            uniform = {id(la): k for la in active for k, o in enumerate(la.options)
                       if o[0] == cfg}
            if uniform and fixed + sum(la.options[uniform[id(la)]][2] if id(la) in uniform
                                       else la.dense_bytes for la in active) <= capacity:
                choices[_label(cfg)] = uniform
        end_to_end = _end_to_end(model, found, choices, calib_data, forward, output,
                                 verify_data)
        best = min(end_to_end, key=lambda k: (end_to_end[k], k != _SOLVED))
        if best != _SOLVED:
            chosen, picked = f"uniform {best}", choices[best]

    rules = _rules(found, picked)
    table: list[PlanRow] = []
    stored = fixed
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
        table.append(PlanRow(name, _DENSE, None, layer.dense_bytes, layer.dense_bytes, 0.0,
                             j is None, layer.note))
        if layer.options:
            stored += layer.dense_bytes if j is None else layer.options[j][2]
    total = math.fsum(la.options[j][3] for la in active
                      for j in [picked.get(id(la))] if j is not None)
    result = Plan(rules, table=tuple(table), budget=budget, dense_bytes=dense_total,
                  stored_bytes=stored, total_error=total, metric=metric, exact=sol.exact,
                  lower_bound=sol.lower_bound, scope_types=types, chosen=chosen,
                  end_to_end=end_to_end, solved_error=sol.error)
    if verbose:
        print(result)
    return result


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _score(layer: _Layer, scored: list, cfg: object, new: nn.Module, nbytes: int,
           err: float, ref: float, what: str) -> None:
    """Append ``[cfg, new, nbytes, err / ref]`` to ``scored``, or refuse the option."""
    if not math.isfinite(err):
        layer.refused.append((cfg, "non-finite output on the calibration data"))
    elif ref > 0:
        scored.append([cfg, new, nbytes, err / ref])
    else:
        layer.refused.append((cfg, f"{what} is all zero on the calibration data: relative "
                                   f"error undefined"))


def _measure_local(model: nn.Module, active: list[_Layer], calib_data: Iterable,
                   forward: Callable | None, metric: str) -> None:
    """``metric="relative_mse"`` / ``"mse"``: hooks run every option on the layer's real input
    and accumulate, in float64, ``||y_c - y||**2`` and ``||y||**2``; then score the options
    (``layer.options`` becomes ``[config, replacement, bytes, error]``)."""
    def hook(layer: _Layer):
        def fn(module, args, kwargs, out):
            layer.calls += 1
            y = out.detach()
            ref = y.double().pow(2).sum()
            x = _layer_input(args, kwargs)
            for opt in layer.options:
                yc = opt[1](x)
                opt[3] = opt[3] + (yc.double() - y.double()).pow(2).sum()
                opt[4] = opt[4] + ref
                opt[5] += y.numel()
        return fn

    handles = [la.module.register_forward_hook(hook(la), with_kwargs=True) for la in active]
    if run_with_hooks(model, handles, calib_data, forward) == 0:
        raise ValueError("calib_data yielded no batches; plan needs calibration data")
    for layer in active:
        if layer.calls == 0:
            layer.note = "never ran on the calibration data; kept dense"
            layer.options = []
            continue
        scored: list = []
        for cfg, new, nbytes, sq_err, sq_ref, numel in layer.options:
            if metric == "mse":
                _score(layer, scored, cfg, new, nbytes, float(sq_err), max(numel, 1),
                       "the layer's output")
            else:
                _score(layer, scored, cfg, new, nbytes, float(sq_err), float(sq_ref),
                       "the layer's output")
        layer.options = scored
        if not scored:
            layer.note = "no candidate applies; kept dense"


def _measure_output(model: nn.Module, active: list[_Layer], calib_data: Iterable,
                    forward: Callable | None,
                    output: Callable[[object], torch.Tensor] | None) -> None:
    """``metric="output"``: per batch, a forward pass with gradients keeps each layer's input
    ``x`` and output ``y``; :data:`PROBES` random vectors ``v`` from the model output give
    ``g = J^T v`` at every ``y`` (``autograd.grad``: no parameter gradients); then every option
    adds ``sum mean(g**2) * (y_c - y)**2`` (float64). Scored against ``sum ||f(x)||**2``."""
    gen = torch.Generator().manual_seed(0)  # probes on the CPU: the same plan on any device
    ref = 0.0
    ran = 0
    calls: list[tuple[_Layer, torch.Tensor, int, torch.Tensor]] = []  # of the current batch

    def hook(layer: _Layer):
        def fn(module, args, kwargs, out):
            x = _layer_input(args, kwargs).detach()
            y = out if out.requires_grad else out.detach().requires_grad_(True)
            calls.append((layer, x, x._version, y))
            # what follows gets a copy: an in-place op after the layer (ReLU(inplace=True))
            # leaves y, and the gradient at y, those of the layer's own output
            return y.clone()
        return fn

    handles = [la.module.register_forward_hook(hook(la), with_kwargs=True) for la in active]
    try:
        with eval_mode(model):
            for batch in calib_data:
                calls.clear()
                with torch.enable_grad():
                    f = model_output(run_batch(model, batch, forward), output)
                ran += 1
                ref += float(f.detach().double().pow(2).sum())
                if calls:
                    _accumulate(f, calls, gen)
    finally:
        calls.clear()
        for h in handles:
            h.remove()
    if ran == 0:
        raise ValueError("calib_data yielded no batches; plan needs calibration data")
    for layer in active:
        if layer.calls == 0:
            layer.note = "never ran on the calibration data; kept dense"
            layer.options = []
            continue
        if not layer.reached:  # its errors do not change the output compared: all count 0
            layer.note = "no gradient from the model output reaches it: its errors count 0"
        scored: list = []
        for cfg, new, nbytes, sq_err, _, _ in layer.options:
            _score(layer, scored, cfg, new, nbytes, float(sq_err), ref, "the model output")
        layer.options = scored
        if not scored:
            layer.note = "no candidate applies; kept dense"


def _accumulate(f: torch.Tensor, calls: list, gen: torch.Generator) -> None:
    """One batch of ``metric="output"``: ``g = J^T v`` at every call's output ``y`` for
    :data:`PROBES` random ``v``, then every option's ``sum mean(g**2) * (y_c - y)**2``."""
    if not f.requires_grad:
        raise ValueError(
            "metric='output' needs the model output to be differentiable with respect to the "
            "layers, but it carries no gradient (computed under no_grad, or from integers); "
            "pass output=fn returning a float tensor of the model, or metric='relative_mse'")
    ys = [c[3] for c in calls]
    sq: list[torch.Tensor | None] = [None] * len(ys)
    with torch.enable_grad():
        for p in range(PROBES):
            v = torch.randn(f.shape, generator=gen).to(f.device, f.dtype)
            grads = torch.autograd.grad(f, ys, v, retain_graph=p < PROBES - 1,
                                        allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    g2 = g.detach().float().pow(2)
                    sq[i] = g2 if sq[i] is None else sq[i].add_(g2)
    for (layer, x, version, y), s in zip(calls, sq, strict=True):
        layer.calls += 1
        if x._version != version:
            raise ValueError(
                f"layer {layer.names[0]}: the model changes the layer's input in place after "
                f"the layer read it, so its options cannot be run on it afterwards; use "
                f"metric='relative_mse'")
        if s is None:
            continue
        layer.reached = True
        w = s.double().div_(PROBES)
        y = y.detach().double()
        for opt in layer.options:
            opt[3] = opt[3] + (w * (opt[1](x).double() - y).pow_(2)).sum()  # (on its device)


@contextlib.contextmanager
def _swapped(model: nn.Module, found: list[_Layer], choice: dict[int, int]
             ) -> Iterator[nn.Module]:
    """``model`` with the chosen replacements (built for the table) in place of their layers,
    at every name; yields the model to run (the replacement itself if it is the root).
    Every layer is put back afterwards."""
    with swapped_in(model, ((layer.names, layer.module, layer.options[choice[id(layer)]][1])
                            for layer in found if id(layer) in choice)) as root:
        yield root


def _rules(found: list[_Layer], choice: dict[int, int]) -> dict[str, object]:
    """The Recipe rules of a choice: one exact rule per name of every layer in scope."""
    rules: dict[str, object] = {}
    for layer in found:
        j = choice.get(id(layer))
        for alias in layer.names:
            rules[re.escape(alias)] = (None if j is None
                                       else pinned(layer.options[j][0], layer.options[j][1]))
    return rules


def _end_to_end(model: nn.Module, found: list[_Layer], choices: dict[str, dict[int, int]],
                calib_data: Iterable, forward: Callable | None,
                output: Callable[[object], torch.Tensor] | None,
                eval_data: Iterable | None = None) -> dict[str, float]:
    """``{label: sum ||f_c(x) - f(x)||**2 / sum ||f(x)||**2}`` over ``eval_data`` (default
    ``calib_data``) for every choice (``{id(layer): option index}``, other layers dense); equal
    choices run once. Calibrated options are calibrated on ``calib_data`` either way.

    A choice of uncalibrated options is measured with the replacements built for the table
    swapped into ``model`` (what ``compress_`` would build, bit for bit): per batch, the dense
    output once, then each such choice. A choice holding a calibrated option (GPTQ,
    SparseGPT...) is measured on a copy of the model compressed by ``compress_(copy, choice,
    calib=calib_data)``, since ``compress_`` calibrates block by block on the outputs of the
    blocks before, already compressed, where the table's options saw the dense inputs."""
    runs: dict[tuple, str] = {}
    for label, choice in choices.items():
        runs.setdefault(tuple(sorted(choice.items())), label)
    labels = list(runs.values())
    by_id = {id(la): la for la in found}
    copied = [lb for lb in labels if any(getattr(by_id[i].options[j][0], "needs_calibration",
                                                 False) for i, j in choices[lb].items())]
    sq = dict.fromkeys(labels, 0.0)
    ref = 0.0

    def dense(batch) -> torch.Tensor:
        return model_output(run_batch(model, batch, forward), output).double()

    if eval_data is None:
        eval_data = calib_data
    with eval_mode(model):
        for batch in eval_data:
            f = dense(batch)
            ref += float(f.pow(2).sum())
            for label in labels:
                if label in copied:
                    continue
                with _swapped(model, found, choices[label]) as root:
                    fc = model_output(run_batch(root, batch, forward), output).double()
                sq[label] += float((fc - f).pow(2).sum())
        for label in copied:
            with warnings.catch_warnings():  # (compress_(model, plan) says them again)
                warnings.simplefilter("ignore")
                other = compress_(copy.deepcopy(model), Recipe(_rules(found, choices[label])),
                                  calib=calib_data, forward=forward, progress=False)
            with eval_mode(other):
                for batch in eval_data:
                    fc = model_output(run_batch(other, batch, forward), output).double()
                    sq[label] += float((fc - dense(batch)).pow(2).sum())
            del other
    scale = 1.0 / ref if ref > 0 else 1.0
    return {label: sq[runs[tuple(sorted(choice.items()))]] * scale
            for label, choice in choices.items()}


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
