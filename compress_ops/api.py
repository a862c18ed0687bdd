"""``compress_()``, ``Recipe`` and ``report()``: the user's entry points.

Data flows one way: config (:mod:`compress_ops.configs`) -> transform
(:mod:`compress_ops.transforms`, found with ``transform_for``) -> module (:mod:`compress_ops.nn`)
-> op (:mod:`compress_ops.ops`) -> kernel (:mod:`compress_ops.kernels`). The swap itself (every
name of a shared module, the notes ``report()`` reads) is :mod:`compress_ops._swap`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

import compress_ops.transforms  # noqa: F401  (registers every config's transform)
from compress_ops import _swap, awq, smoothquant
from compress_ops._linear import LINEAR_TYPES, is_conv1d, linear_weight, plain_linear
from compress_ops._text import format_table
from compress_ops.calibrate import NO_BLOCKS, sequential_build
from compress_ops.configs import (
    AlreadyCompressedError,
    CompressionConfig,
    DWSepFuseConfig,
    QuantConfig,
    UnsupportedModule,
    UnsupportedWeight,
    W8A8Config,
    handled_types,
    per_layer_configs,
    transform_for,
)
from compress_ops.fuse import fuse_dwsep
from compress_ops.nn.base import CompressedLinear, CompressedModule
from compress_ops.nn.dequant import CodebookLinear

__all__ = [
    "Recipe",
    "compress_",
    "report",
    "Report",
    "ReportRow",
    "config_for",
    "check_config",
    "index",
]


@dataclass(frozen=True, eq=False)
class Recipe:
    """Per-layer configs: ``{regex: config or None}``, matched against module names.

    The first rule whose pattern ``re.fullmatch``-es a module's qualified name decides; ``None``
    keeps that module dense. Modules that match no rule are left alone. Rules match the layers
    themselves, not their containers: ``{"encoder": None}`` keeps nothing dense, use
    ``{"encoder[.].*": None}``. ``compress_`` raises ``ValueError`` for a rule that matches no
    layer its config could apply to (a misspelt name, or only containers).
    """

    rules: dict[str, object]
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rules, dict):
            raise TypeError("Recipe takes a dict {regex: config or None}")
        object.__setattr__(self, "rules", dict(self.rules))  # later edits of the caller's dict
        # must not desynchronise rules and the compiled patterns
        compiled = []
        for pattern, cfg in self.rules.items():
            if not isinstance(pattern, str):
                raise TypeError(f"Recipe keys are regex strings matched against module names, "
                                f"got {pattern!r} ({type(pattern).__name__})")
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad Recipe pattern {pattern!r}: {exc}") from exc
            if isinstance(cfg, CompressionConfig) and not cfg.per_layer:
                raise TypeError(f"{type(cfg).__name__} matches chains of layers and cannot be a "
                                f"Recipe rule: call compress_(model, {type(cfg).__name__}()) on "
                                f"its own")
            if cfg is not None and type(cfg) not in per_layer_configs():
                raise TypeError(f"Recipe rule {pattern!r}: unknown config {cfg!r}")
            compiled.append((rx, cfg))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def check_names(self, modules: dict[str, nn.Module]) -> None:
        """``ValueError`` naming every rule that matches no layer it could apply to among
        ``modules`` (``{name: module}``): a rule with a config must match a module of a type
        the config handles (or one already compressed), a ``None`` rule any such layer. A
        misspelt name, or a rule matching only containers, would otherwise change nothing."""
        handled = handled_types() + (CompressedModule,)
        unknown = []
        for pattern, (rx, cfg) in zip(self.rules, self._compiled, strict=True):
            types = transform_for(cfg).handles + (CompressedModule,) if cfg is not None \
                else handled
            if not any(rx.fullmatch(n) and isinstance(m, types) for n, m in modules.items()):
                unknown.append(pattern)
        if unknown:
            shown = [n for n, m in modules.items() if n and isinstance(m, handled)][:8]
            raise ValueError(f"Recipe rules {unknown} match no layer of the model they could "
                             f"apply to; its layers are named like {shown}")

    def noted_types(self) -> tuple[type, ...]:
        """The layer types a ``None`` rule notes as "kept dense by recipe" (for ``report()``):
        those the recipe's configs handle."""
        return tuple(dict.fromkeys(t for cfg in self.rules.values() if cfg is not None
                                   for t in transform_for(cfg).handles))

    def config_for(self, name: str) -> tuple[bool, object]:
        """``(matched, config)`` for a module name."""
        for rx, cfg in self._compiled:
            if rx.fullmatch(name):
                return True, cfg
        return False, None


def config_for(config: object, name: str) -> tuple[bool, object]:
    """``(matched, config or None)`` of a module name under a config or a :class:`Recipe`."""
    if isinstance(config, Recipe):
        return config.config_for(name)
    return True, config


def check_config(config: object, allowed: tuple[type, ...] | None = None) -> None:
    """``TypeError`` unless ``config`` is a per-layer config (of ``allowed`` types, default
    every registered one) or a :class:`Recipe`."""
    allowed = allowed or per_layer_configs()
    if not isinstance(config, Recipe) and type(config) not in allowed:
        raise TypeError(f"unknown config {config!r}; expected one of "
                        f"{[t.__name__ for t in allowed]} or a Recipe")


def index(model: nn.Module, config: object) -> _swap.Index:
    """The model's :class:`~compress_ops._swap.Index`; a ``Recipe``'s rules are checked
    against it (:meth:`Recipe.check_names`)."""
    idx = _swap.index(model)
    if isinstance(config, Recipe):
        config.check_names(idx.by_name())
    return idx


def compress_(
    model: nn.Module,
    config: object,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    example_inputs: tuple | None = None,
    calib: Iterable | None = None,
    forward: Callable[[nn.Module, object], object] | None = None,
    sequential: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Replace the modules of ``model`` that ``config`` handles, in place; return the model.

    ``config`` is one config (applied to every module of the types it handles) or a
    :class:`Recipe`. ``filter_fn(module, name)`` returning False keeps a module dense. A module
    the transform cannot handle is left dense and listed by :func:`report` with the reason.
    If ``model`` itself is replaced (a bare ``nn.Linear``), the new module is returned.
    Layers compressed already (an earlier call) are never recompressed nor skipped silently:
    if ``config`` would take one of them (it handles the type of layer it replaced, and a
    ``Recipe`` rule with a config or one config matches it, and ``filter_fn`` keeps it),
    ``AlreadyCompressedError`` names them before anything changes; leave them out with
    ``filter_fn`` or a ``Recipe`` to compress the other layers. A layer built by the very config
    that would take it (the same Recipe applied again, or after ``finalize_qat``) is already as
    asked and is left as it is.
    A module reachable under several names is compressed once and replaced at every name; a
    weight tied to another module (e.g. an embedding) is left alone.

    ``example_inputs`` (a tuple of the forward's positional arguments) is read by
    ``DWSepFuseConfig``: the model is then captured with ``torch.export`` on them, which sees
    through module classes, and the fused model is checked against the original on them.

    ``calib`` (an iterable of batches, read once into a list, run as ``forward(model,
    batch)``, by default as ``co.plan`` runs them) is read by configs that need calibration
    data (GPTQ, SparseGPT, Wanda: each layer's input Hessian); such a config without ``calib``
    is a ``ValueError``. With ``sequential=True`` the layers are calibrated block by block
    (:func:`compress_ops.calibrate.sequential_build`): each block of the model's stack (a
    transformer's layers, a Sequential's children) on the outputs of the blocks before it,
    already compressed. A model without such a chain (or ``sequential=False``) is calibrated
    layer by layer from the dense model's inputs (a ``UserWarning`` says why when the model
    has a stack of blocks that failed the check). ``progress``
    shows a bar over the blocks (None: when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of the model's positional inputs, got "
                        f"{type(example_inputs).__name__}")
    if isinstance(config, DWSepFuseConfig):
        if calib is not None or forward is not None:
            raise TypeError("calib / forward are read by configs that need calibration data "
                            "(QuantConfig(method='gptq')); DWSepFuseConfig folds BatchNorm "
                            "exactly and reads none")
        return _fuse_dwsep(model, config, filter_fn, example_inputs)
    if example_inputs is not None:
        raise TypeError(f"example_inputs is read by DWSepFuseConfig only; {type(config).__name__} "
                        f"compresses each layer from its own weights")
    check_config(config)
    if calib is not None and (isinstance(calib, torch.Tensor) or not isinstance(calib, Iterable)):
        raise TypeError(f"calib must be an iterable of batches, got {type(calib).__name__}")
    idx = index(model, config)
    others, same = _compressed_matches(idx, config, filter_fn)
    _refuse_compressed(config, others, model)
    none_types = (config.noted_types() if isinstance(config, Recipe) else ()) or LINEAR_TYPES

    def in_scope(module: nn.Module, decisions: set[tuple[bool, object]]) -> bool:
        # layers some matching config handles (or, for "kept dense" notes, layers of a type
        # some config of the recipe handles); modules already compressed are left alone
        return not isinstance(module, CompressedModule) and any(
            matched and isinstance(module, transform_for(cfg).handles if cfg else none_types)
            for matched, cfg in decisions)

    before = {id(m) for m in model.modules() if isinstance(m, CompressedModule)}
    built = _calibrate(model, config, idx, in_scope, filter_fn, calib, forward, sequential,
                       progress)

    def build(module: nn.Module, cfg: object, **extras: object) -> nn.Module:
        if id(module) in built:  # calibrated (and built) block by block already
            if isinstance(built[id(module)], Exception):
                raise built[id(module)]
            return _swap.mark_built_by(built[id(module)], cfg)
        return _swap.mark_built_by(transform_for(cfg).build(module, cfg, **extras), cfg)

    out = _swap.replace_layers(
        model, lambda name: config_for(config, name), idx=idx, in_scope=in_scope,
        reason=lambda idx, module, aliases, cfg: _swap.dense_reason(idx, module, aliases, cfg,
                                                                    filter_fn),
        prepare=lambda cfg: transform_for(cfg).prepare, build=build)
    if not any(isinstance(m, CompressedModule) and id(m) not in before
               for m in out.modules()):
        _refuse_compressed(config, same, model)  # the same config again, on its own layers
        _nothing_changed(out, config, idx, filter_fn)
    _swap.record_config(out, config)
    _swap.after_compress(out)
    return out


def _calibrate(model: nn.Module, config: object, idx: _swap.Index,
               in_scope: Callable[[nn.Module, set], bool],
               filter_fn: Callable[[nn.Module, str], bool] | None, calib: Iterable | None,
               forward: Callable[[nn.Module, object], object] | None, sequential: bool,
               progress: bool | None) -> dict[int, nn.Module | Exception]:
    """``{id(layer): its compressed module, or the UnsupportedModule keeping it dense}`` for
    the layers whose config needs calibration, built block by block on ``calib``
    (:func:`~compress_ops.calibrate.sequential_build`); ``ValueError`` naming them without
    it. With any such layer, the linears whose config needs no data (a mixed Recipe or Plan)
    are built in the same walk (shared codebooks excepted), so every calibrated layer sees
    every earlier block compressed, whatever its configs. (Within a block, every layer's
    Hessian is taken on the block's dense pass, as for a uniform config.)"""
    wanted: dict[str, nn.Module] = {}
    configs: dict[str, object] = {}
    for mid, aliases in idx.names.items():
        module = idx.modules[mid]
        decisions = {config_for(config, n) for n in aliases}
        if len(decisions) != 1 or not in_scope(module, decisions):
            continue
        ((_, cfg),) = decisions
        if isinstance(module, LINEAR_TYPES) and cfg is not None \
                and _swap.dense_reason(idx, module, aliases, cfg, filter_fn) is None:
            wanted[aliases[0]] = module
            configs[aliases[0]] = cfg
    # a mixed Recipe / Plan: the layers whose config needs no data are built in their block
    # too (no Hessian), so the calibrated layers after them see their compressed outputs; a
    # shared codebook is fitted over all its layers first, so it is built after the walk
    plain = frozenset(n for n, c in configs.items()
                      if not getattr(c, "needs_calibration", False))
    if len(plain) == len(wanted):
        return {}
    for n in [n for n in plain if getattr(configs[n], "shared", False)]:
        del wanted[n], configs[n]
    plain = frozenset(n for n in plain if n in wanted)
    if calib is None:
        need = [n for n in wanted if n not in plain]
        raise ValueError(f"{len(need)} layers ({', '.join(need[:4])}"
                         f"{', ...' if len(need) > 4 else ''}) have a config that needs "
                         f"calibration data (GPTQ: each layer's input Hessian): pass "
                         f"compress_(model, config, calib=batches[, forward=fn])")

    awq = [n for n, c in configs.items() if isinstance(c, QuantConfig) and c.method == "awq"]
    w8a8 = [n for n, c in configs.items() if isinstance(c, W8A8Config) and n not in plain]
    smooth = [n for n in w8a8 if configs[n].smoothing is not None]
    unfolded: dict[str, str] = {}
    smoothing: dict[str, dict] = {}  # SmoothQuant: {name: {"smooth_scales"?, "note"}}
    absmax: dict[str, torch.Tensor] | None = {} if w8a8 else None

    def build(name: str, module: nn.Module, hessian: torch.Tensor | None
              ) -> nn.Module | Exception:
        extras: dict[str, object] = {"awq_applied": True} if name in awq else {}
        if name in w8a8:
            extras = {"calibrated": True, "absmax": absmax.get(name),
                      **smoothing.get(name, {})}
        if name not in plain:
            extras["hessian"] = hessian
        try:
            return transform_for(configs[name]).build(module, configs[name], **extras)
        except UnsupportedWeight:
            raise
        except UnsupportedModule as exc:
            return exc
        except ValueError as exc:  # (a Hessian not positive definite, ...: name the layer)
            raise ValueError(f"{name}: {exc}") from exc

    def fallback(why: str) -> None:  # (silent without a stack; no_grad adds a frame)
        if sequential and why != NO_BLOCKS:
            warnings.warn(f"compress_: calibrated layer by layer from the dense model's "
                          f"inputs, not block by block: {why}", UserWarning, stacklevel=6)

    def prepare(container: nn.Module, group: dict[str, nn.Module],
                hessians: dict[str, torch.Tensor], run: Callable[[], object]) -> None:
        if awq:
            unfolded.update(_awq_fold(
                container, {n: m for n, m in group.items() if n in awq and n in hessians},
                {n: configs[n] for n in group}, hessians, run))
        if smooth:
            smoothing.update(_smooth(
                container, {n: m for n, m in group.items() if n in smooth and n in absmax},
                {n: configs[n] for n in group}, absmax, hessians, run))

    built = sequential_build(model, wanted, calib, forward, build, sequential=sequential,
                             progress=progress, on_fallback=fallback,
                             prepare=prepare if awq or smooth else None, absmax=absmax,
                             plain=plain)
    if unfolded:
        listed = "; ".join(f"{n}: {why}" for n, why in list(unfolded.items())[:4])
        warnings.warn(f"compress_: AWQ found no exact fold for {len(unfolded)} of {len(awq)} "
                      f"layers, quantized by round-to-nearest unscaled ({listed}"
                      f"{'; ...' if len(unfolded) > 4 else ''})", UserWarning, stacklevel=3)
    return {id(wanted[n]): m for n, m in built.items()}


def _exact_folds(container: nn.Module, layers: dict[str, nn.Module], run: Callable[[], object],
                 not_linear: str) -> tuple[list[tuple[awq.Fold, list[str]]], dict[str, str]]:
    """The exact folds (:func:`~compress_ops.awq.find_folds`) for ``layers`` (``{name:
    linear}``, names as in the model) of ``container``: ``([(fold, its consumers' names)],
    {name: why it has no fold})``; a layer that is not exactly an ``nn.Linear`` or a Hugging Face
    ``Conv1D`` gets ``not_linear``."""
    rel = {id(m): n for n, m in container.named_modules() if n}
    plain = {n: m for n, m in layers.items() if type(m) is nn.Linear or is_conv1d(m, exact=True)}
    local = {rel[id(m)]: m for m in plain.values() if id(m) in rel}
    name_of = {rel[id(m)]: n for n, m in layers.items() if id(m) in rel}
    why = {n: not_linear for n in layers if n not in plain}
    if not local:
        return [], why
    dtype = next(iter(local.values())).weight.dtype
    folds, missing = awq.find_folds(container, local, run, dtype)
    why.update({name_of[c]: w for c, w in missing.items()})
    return [(f, [name_of[c] for c in f.consumers]) for f in folds], why


def _awq_fold(container: nn.Module, layers: dict[str, nn.Module], configs: dict[str, object],
              hessians: dict[str, torch.Tensor], run: Callable[[], object]) -> dict[str, str]:
    """AWQ for ``layers`` (``{name: linear}``, names as in the model) of ``container``: find
    the exact folds, search each fold's scales, fold them in place; returns ``{name: why it
    is not scaled}``."""
    if not layers:
        return {}
    folds, why = _exact_folds(container, layers, run,
                              "AWQ scales nn.Linear and Conv1D layers only (not a subclass)")
    for fold, names in folds:
        cfgs = {configs[n] for n in names}
        if len(cfgs) > 1:
            why.update(dict.fromkeys(names, f"the layers reading {fold.producer}'s output have "
                                            f"different configs"))
            continue
        (cfg,) = cfgs
        s, _ = awq.awq_scales([linear_weight(layers[n]) for n in names], hessians[names[0]],
                              cfg.bits, cfg.group_size, symmetric=cfg.symmetric,
                              search_steps=cfg.search_steps)
        awq.apply_fold(container, fold, s)
    return why


def _smooth(container: nn.Module, layers: dict[str, nn.Module], configs: dict[str, object],
            absmax: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
            run: Callable[[], object]) -> dict[str, dict]:
    """SmoothQuant for ``layers`` (``{name: linear}``, names as in the model) of
    ``container``: per input channel ``s = max|X|^alpha / max|W|^(1 - alpha)``
    (:mod:`compress_ops.smoothquant`; ``smoothing="auto"``: ``alpha`` searched on the layers'
    Hessians), folded in place where :func:`~compress_ops.awq.find_folds` finds an exact fold
    (the layers reading one output share one ``s``), else carried in the op
    (``smooth_scales``, from the layer's own weight). Each layer's recorded input absmax is
    divided by its ``s`` (its input is now ``x / s``). Returns the transform's extras:
    ``{name: {"smooth_scales"?, "note"}}``."""
    if not layers:
        return {}

    def scales(names: list[str], weights: list[torch.Tensor]) -> tuple[torch.Tensor | None, str]:
        cfg = configs[names[0]]
        x_max = torch.stack([absmax[n].double() for n in names]).amax(0)
        if cfg.smoothing == "auto":
            alpha, s = smoothquant.search_alpha(x_max, weights, hessians[names[0]], cfg.dtype)
            if alpha is None:
                return None, "SmoothQuant searched: no smoothing predicted best"
            label = f"SmoothQuant (alpha {alpha:g}, searched)"
        else:
            s, label = smoothquant.smooth_factors(x_max, weights, cfg.smoothing), "SmoothQuant"
        for n in names:
            absmax[n] = (absmax[n].double() / s.to(absmax[n].device)).float()
        return s, label

    folds, why = _exact_folds(container, layers, run, "the fold search reads nn.Linear and "
                              "Conv1D layers only (not a subclass)")
    out: dict[str, dict] = {}
    for fold, names in folds:
        if len({configs[n].smoothing for n in names}) > 1:
            why.update(dict.fromkeys(names, f"the layers reading {fold.producer}'s output "
                                            f"have different smoothing"))
            continue
        s, label = scales(names, [linear_weight(layers[n]) for n in names])
        if s is None:
            out.update({n: {"note": label} for n in names})
            continue
        awq.apply_fold(container, fold, s)
        out.update({n: {"note": f"{label} folded into {fold.producer}"} for n in names})
    for n, reason in why.items():
        s, label = scales([n], [plain_linear(layers[n]).weight])
        out[n] = ({"note": label} if s is None else
                  {"smooth_scales": s, "note": f"{label} in the op (no exact fold: {reason})"})
    return out


def _replaced_types(module: CompressedModule) -> tuple[type, ...]:
    """The dense layer types a compressed module stands in for: a ``CompressedLinear`` an
    ``nn.Linear`` (or a Hugging Face ``Conv1D``), any other (the convs) an ``nn.Conv2d``."""
    return LINEAR_TYPES if isinstance(module, CompressedLinear) else (nn.Conv2d,)


def _compressed_matches(idx: _swap.Index, config: object,
                        filter_fn: Callable[[nn.Module, str], bool] | None
                        ) -> tuple[list[str], list[str]]:
    """The first names of the modules compressed already (the model itself among them) that
    ``config`` would take if they were dense: every name decided alike, by a config (a
    ``Recipe`` rule matching it with a config; one config matches every layer) whose transform
    handles the layer type the module replaced, and ``filter_fn`` keeps every name. Returned
    as (built by another config, built by that very config)."""
    found: list[str] = []
    done: list[str] = []
    for mid, aliases in idx.names.items():
        module = idx.modules[mid]
        if not isinstance(module, CompressedModule):
            continue
        decisions = {config_for(config, n) for n in aliases}
        if len(decisions) != 1:  # shared under rules that disagree: it would stay dense
            continue
        ((matched, cfg),) = decisions
        if not matched or cfg is None or not any(
                issubclass(t, transform_for(cfg).handles) for t in _replaced_types(module)):
            continue
        if filter_fn is not None and not all(filter_fn(module, n) for n in aliases):
            continue
        # what this very config built (the same Recipe again, or after finalize_qat) is
        # already as asked: left alone, unless the call would change nothing at all
        (done if _swap.built_by(module) == cfg else found).append(aliases[0])
    return found, done


def _refuse_compressed(config: object, names: list[str], model: nn.Module) -> None:
    """``AlreadyCompressedError`` naming the compressed layers ``config`` would take (``names``,
    from :func:`_compressed_matches`; ``""`` is the model itself), before anything changes:
    ``compress_`` never skips a layer it applies to silently (a second config on a compressed
    layer would compress its stored tensors again, so it cannot apply either)."""
    if not names:
        return
    what = type(config).__name__
    shown = [n or f"<root> ({type(model).__name__})" for n in names[:8]]
    raise AlreadyCompressedError(
        f"compress_({what}) applies to layers that are compressed already ({', '.join(shown)}"
        f"{', ...' if len(names) > 8 else ''}); nothing was changed. Compress the dense model "
        f"(one compress_ call with a Recipe gives each layer its config), or leave these "
        f"layers out: filter_fn=lambda m, name: not isinstance(m, co.nn.CompressedModule), or "
        f"a Recipe whose rules do not match them")


def _nothing_changed(model: nn.Module, config: object, idx: _swap.Index,
                     filter_fn: Callable[[nn.Module, str], bool] | None) -> None:
    """``compress_`` replaced no layer: never silently. (Layers the config would have taken
    that are compressed already were an ``AlreadyCompressedError`` before anything changed,
    :func:`_refuse_compressed`.) A ``UserWarning`` with the reasons every candidate stayed
    dense, or saying that the layers of a type the config handles are compressed already and
    ``filter_fn`` left them out, or that no layer is of a type the config handles."""
    names = {n: m for n, m in idx.by_name().items() if n}
    what = type(config).__name__
    notes = _swap.notes(model)
    refused = {n: notes[n] for n in names if n in notes}
    excluded: list[str] = []
    if filter_fn is not None:  # (in the model's order)
        order = {aliases[0]: i for i, aliases in enumerate(idx.names.values())}
        excluded = sorted(sum(_compressed_matches(idx, config, None), []), key=order.get)
    if refused:
        listed = "; ".join(f"{n}: {why}" for n, why in list(refused.items())[:5])
        warnings.warn(f"compress_({what}) changed nothing: every candidate layer stayed dense "
                      f"({listed}{'; ...' if len(refused) > 5 else ''}); see report()",
                      UserWarning, stacklevel=3)
    elif excluded:
        shown = [n or "<root>" for n in excluded[:8]]
        warnings.warn(f"compress_({what}) changed nothing: the layers of a type it handles "
                      f"are compressed already and filter_fn left them out ({', '.join(shown)}"
                      f"{', ...' if len(excluded) > 8 else ''})", UserWarning, stacklevel=3)
    else:
        root = (f" (the model itself is a compressed {type(model).__name__})"
                if isinstance(model, CompressedModule) else "")
        warnings.warn(f"compress_({what}) changed nothing: the model has no layer of a type "
                      f"it handles{root}", UserWarning, stacklevel=3)


def _fuse_dwsep(model: nn.Module, config: DWSepFuseConfig,
                filter_fn: Callable[[nn.Module, str], bool] | None,
                example_inputs: tuple | None) -> nn.Module:
    skipped = _swap.notes(model)
    fused, reasons = fuse_dwsep(model, filter_fn, example_inputs, config.fix_input_size)
    for name in fused:
        skipped.pop(name, None)
    skipped.update(reasons)
    _swap.record_notes(model, skipped)
    if fused:
        _swap.record_config(model, config)
        _swap.after_compress(model)
        return model
    # never silently: why each depthwise conv stayed unfused, or that there is none
    depthwise = {n: reasons[n] for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                 and n in reasons}
    if depthwise:
        listed = "; ".join(f"{n}: {why}" for n, why in list(depthwise.items())[:3])
        warnings.warn(f"compress_(DWSepFuseConfig) changed nothing: {len(depthwise)} depthwise "
                      f"convs stayed unfused ({listed}{'; ...' if len(depthwise) > 3 else ''})"
                      f"; see report()", UserWarning, stacklevel=3)
    else:
        warnings.warn("compress_(DWSepFuseConfig) changed nothing: the model has no depthwise "
                      "conv (nn.Conv2d with groups == in_channels > 1) followed by a 1x1 conv "
                      "to fuse", UserWarning, stacklevel=3)
    return model


@dataclass(frozen=True)
class ReportRow:
    name: str
    kind: str
    dense_bytes: int
    stored_bytes: int
    note: str = ""
    # False for a layer no config compresses (embeddings, norms, raw parameters)
    compressible: bool = True

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0


class Report(list):
    """Rows of :func:`report`; ``str()`` renders a table with a total line."""

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self)

    def __str__(self) -> str:
        head = ("layer", "kind", "dense B", "stored B", "ratio", "note")
        rows = [(r.name or "<root>", r.kind, str(r.dense_bytes), str(r.stored_bytes),
                 f"{r.ratio:.4f}", r.note) for r in self]
        total = self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0
        rows.append(("TOTAL", "", str(self.dense_bytes), str(self.stored_bytes),
                     f"{total:.4f}", ""))
        return format_table(head, rows)


def _kept_reason(module: nn.Module) -> str:
    """Why a weight-bearing layer no config compresses stays dense (:func:`report`)."""
    kind = type(module).__name__
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{kind}: a table lookup, not a matmul; no config compresses embeddings"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                           *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))) \
            or "norm" in kind.lower():
        return f"{kind}: a normalization's per-channel scale and shift; kept dense"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{kind}: no config compresses it (convolutions: nn.Conv2d only)"
    own = ", ".join(n for n, _ in module.named_parameters(recurse=False))
    return (f"{kind}: its own parameters ({own}) are read by its own forward, not a layer "
            "compress_ops replaces")


def _own_tensors(module: nn.Module, listed: bool) -> list[torch.Tensor]:
    """The stored tensors a dense row of :func:`report` counts: a linear's or conv's weight
    (``listed``), else every parameter of the module's own; a parametrized one's originals
    (a ``Pruner``'s mask, ``weight_norm``: what ``state_dict`` holds)."""
    from torch.nn.utils import parametrize

    plists = module.parametrizations if parametrize.is_parametrized(module) else {}
    if listed:
        if "weight" in plists:
            return list(plists["weight"].parameters(recurse=False))
        return [module.weight]
    out = [t for t in module.parameters(recurse=False) if t is not None]
    for plist in plists.values():
        out += list(plist.parameters(recurse=False))
    return out


def report(model: nn.Module) -> Report:
    """Per weight-bearing layer: name, kind, dense bytes, stored bytes (weights only), ratio.

    Every module that holds parameters of its own is listed, so the total is the model's
    weights (the biases of linear and conv layers aside).
    Compressed modules report their stored tensors; dense ``nn.Linear``, Hugging Face
    ``Conv1D`` and ``nn.Conv2d`` layers report ``kind="dense"`` with the reason ``compress_``
    left them dense, if it tried. Every other weight-bearing module (embeddings, norms, other
    convolutions, modules with raw parameters such as ``nn.MultiheadAttention`` or a class
    token) is a ``kind="dense"`` row with ``compressible=False`` and the reason no config takes
    it; its dense bytes are all its own parameters (biases included).

    Every tensor is counted once. A module registered under several names is one row (at its
    first name, noted ``"also at <other names>"``). A dense weight held by several layers
    (tied: ``co.share.tie_`` with ``share_module=False``, or an output embedding tied to the
    input one) is counted at its first holder; each later holder reports 0 dense and 0 stored
    bytes (the dense model holds it once too) with the note ``"weight tied to <first
    holder>"``. A shared codebook is counted at its first holder (its layers' dense bytes
    each, their own weights).
    """
    from torch.nn.utils.parametrize import ParametrizationList

    skipped: dict[str, str] = {}
    for prefix, sub in model.named_modules():  # notes of compress_ calls on submodules too
        for name, note in _swap.notes(sub).items():
            skipped.setdefault(".".join(p for p in (prefix, name) if p), note)
    names: dict[int, list[str]] = {}  # id(module) -> every name it is registered under
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    inside: list[str] = []  # compressed / linear layers: their submodules are theirs
    # once compress_ ran, a dense linear / conv it did not take says so
    tried = bool(skipped) or any(isinstance(m, CompressedModule) for m in model.modules())
    rows = Report()
    tables: dict[int, str] = {}  # id(shared codebook) -> first layer that holds it
    weights: dict[int, str] = {}  # id(dense tensor) -> first layer that holds it
    keep: list[torch.Tensor] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, CodebookLinear):
            first = tables.setdefault(id(module.codebook), name)
            if first != name:  # a shared table is stored once: count it at its first holder
                inside.append(name)
                rows.append(ReportRow(name, module.kind, module.dense_weight_bytes(),
                                      module.index_bytes(), f"codebook shared with {first}"))
                continue
        also = names[id(module)][1:]  # a module under several names is one row, noted
        shared = f"also at {', '.join(also)}" if also else ""
        if isinstance(module, CompressedModule):  # (a note: e.g. fused for one input size)
            inside.append(name)
            note = "; ".join(n for n in (skipped.get(name, ""), module.report_note(), shared)
                             if n)
            rows.append(ReportRow(name, module.kind, module.dense_weight_bytes(),
                                  module.stored_weight_bytes(), note))
            continue
        if isinstance(module, ParametrizationList):  # a Pruner's mask: its layer's row
            continue
        qat = getattr(module, "_compress_ops_fake_quant", False)  # co.qat's FakeQuantLinear
        listed = qat or isinstance(module, (*LINEAR_TYPES, nn.Conv2d))
        if listed:
            inside.append(name)
        tensors = _own_tensors(module, listed)
        if tensors:
            stored, ties = 0, []
            for t in tensors:
                keep.append(t)  # (alive until the end: no id is reused)
                first = weights.setdefault(id(t), name)
                if first == name:
                    stored += t.numel() * t.element_size()
                else:  # a tied tensor is stored once, dense too: at its first holder
                    ties.append(first)
            nbytes = stored
            tie = f"weight tied to {ties[0]}" if ties else ""
            note = skipped.get(name, "")
            if qat:
                note = note or "in quantization-aware training: co.qat.finalize_qat packs it"
            elif listed and not note and tried:
                note = "not taken by the configs applied"
            if not listed:
                note = "; ".join(n for n in (note, _kept_reason(module)) if n)
            if tie and tie in note:  # (compress_'s reason names the tie already)
                tie = ""
            note = "; ".join(n for n in (tie, note, shared) if n)
            rows.append(ReportRow(name, "dense", nbytes, stored, note, compressible=listed))
        elif name in skipped or (name == "" and "<root>" in skipped):
            # a note about a container (e.g. a module torch.fx could not trace)
            rows.append(ReportRow(name, "skipped", 0, 0, skipped.get(name or "<root>", "")))
    return rows
