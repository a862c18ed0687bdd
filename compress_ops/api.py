"""Configs, ``compress_()``, ``Recipe`` and ``report()``.

Data flows one way: config -> transform (``_TRANSFORMS``) -> module -> op -> kernel.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from compress_ops._text import format_table
from compress_ops.kernels.dequant import BITS, GROUP_SIZES
from compress_ops.nn.base import CompressedLinear
from compress_ops.nn.dwsep import FusedDWSepConv2d
from compress_ops.nn.lowrank import LowRankConv2d, LowRankLinear
from compress_ops.nn.quant import CodebookLinear, QuantLinear
from compress_ops.nn.sparse24 import Sparse24Linear
from compress_ops.quantize import fit_codebook

__all__ = [
    "Sparse24Config",
    "QuantConfig",
    "CodebookConfig",
    "LowRankConfig",
    "DWSepFuseConfig",
    "Recipe",
    "compress_",
    "report",
    "Report",
    "ReportRow",
    "UnsupportedModule",
]

SKIPPED_ATTR = "_compress_ops_skipped"


class UnsupportedModule(Exception):
    """Raised by a transform for a module it leaves dense; the message says why."""


@dataclass(frozen=True)
class Sparse24Config:
    """2:4 structured sparsity for ``nn.Linear`` (along ``in_features``).

    ``prune=True`` keeps the two largest-magnitude weights of every group of four; with
    ``prune=False`` the weights must already be 2:4 (``ValueError`` otherwise).
    """

    prune: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.prune, bool):
            raise TypeError(f"prune must be a bool, got {type(self.prune).__name__}")


def _check_bits(bits: object, allowed: tuple[int, ...]) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only affine quantization of ``nn.Linear``: ``bits`` in {2, 3, 4, 8}, one scale
    (and, unless ``symmetric``, one zero point) per ``group_size`` input features of a row
    (32, 64, 128, 256, or ``None`` for the whole row). ``search_steps`` > 0 searches a
    shrunk range per group (least squared error); 0 is plain min/max round-to-nearest.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    search_steps: int = 20

    def __post_init__(self) -> None:
        _check_bits(self.bits, BITS)
        if self.group_size is not None and (isinstance(self.group_size, bool)
                                            or self.group_size not in GROUP_SIZES):
            raise ValueError(f"group_size must be one of {GROUP_SIZES} or None (whole row), "
                             f"got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) \
                or self.search_steps < 0:
            raise ValueError(f"search_steps must be an int >= 0, got {self.search_steps!r}")


@dataclass(frozen=True)
class CodebookConfig:
    """Weight sharing for ``nn.Linear``: every weight becomes one of ``2**bits`` values
    (``bits`` in {2, 3, 4, 8}) found by k-means (``iters`` Lloyd steps from quantiles).

    ``row_groups`` > 1 fits one table per equal group of output rows. ``shared=True`` fits one
    table over every layer this config compresses in one ``compress_`` call (under a
    ``Recipe``: the layers of every rule with an equal config) and stores it once; the layers
    must share one dtype and device. Compress after moving the model: ``.to()`` converts each
    module's buffers separately, so the layers then hold equal copies instead of one table.
    """

    bits: int = 4
    row_groups: int = 1
    iters: int = 25
    shared: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, BITS)
        for name in ("row_groups", "iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "row_groups"
                                                                     else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'row_groups' else 0}, "
                                 f"got {v!r}")
        if not isinstance(self.shared, bool):
            raise TypeError(f"shared must be a bool, got {type(self.shared).__name__}")
        if self.shared and self.row_groups != 1:
            raise ValueError("a shared codebook has one row group (row_groups=1)")


@dataclass(frozen=True)
class LowRankConfig:
    """Low-rank factorization of ``nn.Linear`` (truncated SVD, ``W ~ U @ V``) and ``nn.Conv2d``
    (Tucker-2: 1x1 reduce, k x k core, 1x1 restore).

    Exactly one of ``rank`` (Linear: r; Conv2d: ``(r, r)``, both clamped to the layer) and
    ``energy`` (the smallest rank keeping that fraction of ``||W||_F**2``; for convs, per
    channel mode). ``method``: ``"auto"``, ``"exact"`` or ``"randomized"`` SVD of linears (see
    :func:`compress_ops.factorize.svd_factors`); Tucker-2 always takes exact SVDs of the
    (small) channel unfoldings. A layer whose factors would not hold fewer
    parameters than the dense weight stays dense, and ``report()`` says why. A ``residual``
    (keeping a compressed remainder next to the factors) is not implemented; the op already
    takes a dense base weight for it.
    """

    rank: int | None = None
    energy: float | None = None
    method: str = "auto"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("LowRankConfig needs exactly one of rank and energy")
        if self.rank is not None and (isinstance(self.rank, bool)
                                      or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if self.energy is not None and (isinstance(self.energy, bool)
                                        or not isinstance(self.energy, (int, float))
                                        or not 0.0 < self.energy <= 1.0):
            raise ValueError(f"energy must be a number in (0, 1], got {self.energy!r}")
        if self.method not in ("auto", "exact", "randomized"):
            raise ValueError(f"method must be 'auto', 'exact' or 'randomized', "
                             f"got {self.method!r}")


@dataclass(frozen=True)
class DWSepFuseConfig:
    """Fuse depthwise-separable units: ``[ZeroPad2d] -> depthwise Conv2d -> [BatchNorm2d] ->
    [act] -> 1x1 Conv2d -> [BatchNorm2d] -> [act]`` chains, found in a ``torch.fx`` trace of
    the model (``nn.Sequential``s and forwards that call the layers in order), become one
    :class:`~compress_ops.nn.FusedDWSepConv2d` each (BatchNorm folded with its running
    statistics: fuse models in eval mode). Activations: ReLU, ReLU6, Hardswish, SiLU modules.
    Depthwise convs left unfused, and modules ``torch.fx`` cannot trace, are listed by
    ``report()`` with the reason. Not usable inside a ``Recipe`` (it matches chains, not
    single layers).
    """


def _plain_linear(module: nn.Module) -> None:
    if type(module) is not nn.Linear:
        raise UnsupportedModule(f"{type(module).__name__} is not a plain nn.Linear")


def _sparse24_transform(module: nn.Module, config: Sparse24Config) -> nn.Module:
    _plain_linear(module)
    return Sparse24Linear.from_dense(module, config)


def _quant_transform(module: nn.Module, config: QuantConfig) -> nn.Module:
    _plain_linear(module)
    return QuantLinear.from_dense(module, config)


def _codebook_transform(module: nn.Module, config: CodebookConfig,
                        codebook: object = None) -> nn.Module:
    _plain_linear(module)
    if config.row_groups > 1 and module.out_features % config.row_groups:
        raise UnsupportedModule(f"out_features={module.out_features} is not divisible by "
                                f"row_groups={config.row_groups}")
    return CodebookLinear.from_dense(module, config, codebook=codebook)


def _codebook_prepare(modules: list[nn.Module], config: CodebookConfig) -> dict[int, dict]:
    """Shared codebooks: one k-means table over every layer the config compresses."""
    if not config.shared:
        return {}
    linears = [m for m in modules if type(m) is nn.Linear]
    kinds = {(m.weight.dtype, m.weight.device) for m in linears}
    if len(kinds) > 1:
        raise UnsupportedModule(f"a shared codebook needs one dtype and device, got {kinds}")
    if not linears:
        return {}
    cb = fit_codebook([m.weight.detach() for m in linears], config.bits, 1, config.iters)
    return {id(m): {"codebook": cb} for m in linears}


def _no_saving(kind: str, factor_params: int, dense_params: int, rank: object) -> None:
    if factor_params >= dense_params:
        raise UnsupportedModule(
            f"{kind} rank {rank}: factors hold {factor_params} parameters >= dense "
            f"{dense_params}; kept dense")


def _lowrank_transform(module: nn.Module, config: LowRankConfig) -> nn.Module:
    if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
        raise UnsupportedModule(f"{type(module).__name__} is not a plain nn.Conv2d (its forward "
                                f"may do more than the conv)")
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            raise UnsupportedModule(f"Tucker-2 needs groups=1, got groups={module.groups}")
        c_out, c_in, kh, kw = module.weight.shape
        if config.rank is not None:
            r_out, r_in = min(config.rank, c_out), min(config.rank, c_in)
            _no_saving("Tucker-2", c_in * r_in + r_out * r_in * kh * kw + r_out * c_out,
                       module.weight.numel(), (r_out, r_in))
        new = LowRankConv2d.from_dense(module, config)
        r_out, r_in = new.ranks
        _no_saving("Tucker-2", c_in * r_in + r_out * r_in * kh * kw + r_out * c_out,
                   module.weight.numel(), (r_out, r_in))
        return new
    _plain_linear(module)
    n, k = module.out_features, module.in_features
    if config.rank is not None:
        r = min(config.rank, n, k)
        _no_saving("SVD", r * (n + k), n * k, r)
    new = LowRankLinear.from_dense(module, config)
    _no_saving("SVD", new.rank * (n + k), n * k, new.rank)
    return new


# config type -> (module types it looks at, transform)
_TRANSFORMS: dict[type, tuple[tuple[type, ...], Callable[..., nn.Module]]] = {
    Sparse24Config: ((nn.Linear,), _sparse24_transform),
    QuantConfig: ((nn.Linear,), _quant_transform),
    CodebookConfig: ((nn.Linear,), _codebook_transform),
    LowRankConfig: ((nn.Linear, nn.Conv2d), _lowrank_transform),
}
# config type -> fn(modules it will transform, config) -> {id(module): extra transform kwargs};
# for transforms that look at several layers at once (shared codebooks).
_PREPARE: dict[type, Callable[[list[nn.Module], object], dict[int, dict]]] = {
    CodebookConfig: _codebook_prepare,
}


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
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad Recipe pattern {pattern!r}: {exc}") from exc
            if isinstance(cfg, DWSepFuseConfig):
                raise TypeError("DWSepFuseConfig fuses chains of layers and cannot be a Recipe "
                                "rule: call compress_(model, DWSepFuseConfig()) on its own")
            if cfg is not None and type(cfg) not in _TRANSFORMS:
                raise TypeError(f"Recipe rule {pattern!r}: unknown config {cfg!r}")
            compiled.append((rx, cfg))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def check_names(self, modules: dict[str, nn.Module]) -> None:
        """``ValueError`` naming every rule that matches no layer it could apply to among
        ``modules`` (``{name: module}``): a rule with a config must match a module of a type
        the config handles (or one already compressed), a ``None`` rule any such layer. A
        misspelt name, or a rule matching only containers, would otherwise change nothing."""
        handled = tuple({t for types, _ in _TRANSFORMS.values() for t in types}) + (
            CompressedLinear, LowRankConv2d, FusedDWSepConv2d)
        unknown = []
        for pattern, (rx, cfg) in zip(self.rules, self._compiled, strict=True):
            types = _TRANSFORMS[type(cfg)][0] + (CompressedLinear, LowRankConv2d) \
                if cfg is not None else handled
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
                                   for t in _TRANSFORMS[type(cfg)][0]))

    def config_for(self, name: str) -> tuple[bool, object]:
        """``(matched, config)`` for a module name."""
        for rx, cfg in self._compiled:
            if rx.fullmatch(name):
                return True, cfg
        return False, None


def _config_for(config: object, name: str) -> tuple[bool, object]:
    """``(matched, config or None)`` of a module name under a config or a Recipe."""
    if isinstance(config, Recipe):
        return config.config_for(name)
    return True, config


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def compress_(
    model: nn.Module,
    config: object,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace the modules of ``model`` that ``config`` handles, in place; return the model.

    ``config`` is one config (applied to every module of the types it handles) or a
    :class:`Recipe`. ``filter_fn(module, name)`` returning False keeps a module dense. A module
    the transform cannot handle is left dense and listed by :func:`report` with the reason.
    If ``model`` itself is replaced (a bare ``nn.Linear``), the new module is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(config, DWSepFuseConfig):
        return _fuse_dwsep(model, filter_fn)
    if not isinstance(config, Recipe) and type(config) not in _TRANSFORMS:
        raise TypeError(f"unknown config {config!r}; expected one of "
                        f"{[t.__name__ for t in _TRANSFORMS]} or a Recipe")
    skipped: dict[str, str] = dict(getattr(model, SKIPPED_ATTR, {}))
    names, modules, owners = _index(model, config)
    none_types = (config.noted_types() if isinstance(config, Recipe) else ()) or (nn.Linear,)
    # 1. plan: the config (or the reason to stay dense) of every layer in scope
    plan: list[tuple[int, list[str], object, str | None]] = []
    for mid, aliases in names.items():
        module = modules[mid]
        if isinstance(module, (CompressedLinear, LowRankConv2d, FusedDWSepConv2d)):
            continue
        decisions = {_config_for(config, name) for name in aliases}
        # Look only at layers some matching config handles (or, for "kept dense" notes, layers
        # of a type some config of the recipe handles).
        if not any(matched and isinstance(module, _TRANSFORMS[type(cfg)][0] if cfg else
                                          none_types) for matched, cfg in decisions):
            continue
        cfg = None
        if len(decisions) > 1:
            reason = f"shared under {aliases} with different recipe rules"
        else:
            ((_, cfg),) = decisions
            reason = _dense_reason(module, aliases, cfg, filter_fn, owners)
        plan.append((mid, aliases, cfg, reason))
    # 2. prepare: transforms that look at several layers at once (e.g. a shared codebook over
    # every layer compressed with an equal config)
    extras: dict[int, dict] = {}
    groups: dict[object, list[int]] = {}
    for mid, _, cfg, reason in plan:
        if reason is None and type(cfg) in _PREPARE:
            groups.setdefault(cfg, []).append(mid)
    prepare_failed: dict[int, str] = {}
    for cfg, mids in groups.items():
        try:
            extras.update(_PREPARE[type(cfg)]([modules[m] for m in mids], cfg))
        except UnsupportedModule as exc:
            prepare_failed.update(dict.fromkeys(mids, str(exc)))
    # 3. build every replacement first, so that an unexpected error leaves the model untouched
    built: list[tuple[list[str], nn.Module | None, str | None]] = []
    for mid, aliases, cfg, reason in plan:
        reason = reason or prepare_failed.get(mid)
        new = None
        if reason is None:
            try:
                new = _TRANSFORMS[type(cfg)][1](modules[mid], cfg, **extras.get(mid, {}))
            except UnsupportedModule as exc:
                reason = str(exc)
        built.append((aliases, new, reason))
    return _swap_in(model, built, skipped)


def _index(model: nn.Module, config: object) -> tuple[dict[int, list[str]],
                                                      dict[int, nn.Module],
                                                      dict[int, list[str]]]:
    """``(names, modules, owners)``: every name of each module (by id), the modules, and the
    first names of the modules holding each parameter (by id). A module reachable under several
    names (shared) is transformed once and replaced at every name; a weight tied to another
    module (e.g. an embedding) is left alone. A ``Recipe``'s rules are checked here."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    if isinstance(config, Recipe):
        config.check_names({n: modules[mid] for mid, aliases in names.items()
                            for n in aliases})
    owners: dict[int, list[str]] = {}
    for mid, module in modules.items():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(names[mid][0])
    return names, modules, owners


def _dense_reason(module: nn.Module, aliases: list[str], cfg: object,
                  filter_fn: Callable[[nn.Module, str], bool] | None,
                  owners: dict[int, list[str]]) -> str | None:
    """Why a matched layer stays dense under ``cfg`` before any transform looks at it (None:
    it does not): a ``None`` rule, ``filter_fn``, or a weight tied to another module."""
    if cfg is None:
        return "kept dense by recipe"
    if filter_fn is not None and not all(filter_fn(module, n) for n in aliases):
        return "excluded by filter_fn"
    tied = [o for o in owners.get(id(getattr(module, "weight", None)), []) if o not in aliases]
    if tied:
        return f"weight tied to {tied[0]}; compressing would break the tie"
    return None


def _swap_in(model: nn.Module, built: list[tuple[list[str], nn.Module | None, str | None]],
             skipped: dict[str, str]) -> nn.Module:
    """Put each built module in at all of its names (or note why it stays dense); record the
    notes for ``report()``; return the model, or the new root if the model was replaced."""
    replaced_root: nn.Module | None = None
    for aliases, new, reason in built:
        for name in aliases:
            if new is None:
                skipped[name] = reason
                continue
            skipped.pop(name, None)
            if name:
                _set_submodule(model, name, new)
            else:
                replaced_root = new
    result = replaced_root if replaced_root is not None else model
    object.__setattr__(result, SKIPPED_ATTR, skipped)
    return result


def _fuse_dwsep(model: nn.Module,
                filter_fn: Callable[[nn.Module, str], bool] | None) -> nn.Module:
    from compress_ops.fuse import fuse_dwsep

    skipped: dict[str, str] = dict(getattr(model, SKIPPED_ATTR, {}))
    fused, reasons = fuse_dwsep(model, filter_fn)
    for name in fused:
        skipped.pop(name, None)
    skipped.update(reasons)
    object.__setattr__(model, SKIPPED_ATTR, skipped)
    return model


@dataclass(frozen=True)
class ReportRow:
    name: str
    kind: str
    dense_bytes: int
    stored_bytes: int
    note: str = ""

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


def report(model: nn.Module) -> Report:
    """Per weight-bearing layer: name, kind, dense bytes, stored bytes (weights only), ratio.

    Compressed modules report their stored tensors; dense ``nn.Linear`` layers (and
    ``nn.Conv2d`` layers, once a conv config has looked at the model) report ``kind="dense"``
    with the reason ``compress_`` left them dense, if it tried.
    """
    skipped: dict[str, str] = {}
    for prefix, sub in model.named_modules():  # notes of compress_ calls on submodules too
        for name, note in getattr(sub, SKIPPED_ATTR, {}).items():
            skipped.setdefault(".".join(p for p in (prefix, name) if p), note)
    # Conv2d layers are listed once some conv was compressed (or compress_ left one dense)
    compressed_convs = any(isinstance(m, (LowRankConv2d, FusedDWSepConv2d))
                           for m in model.modules())
    rows = Report()
    tables: dict[int, str] = {}  # id(shared codebook) -> first layer that holds it
    for name, module in model.named_modules():
        if isinstance(module, CodebookLinear):
            first = tables.setdefault(id(module.codebook), name)
            if first != name:  # a shared table is stored once: count it at its first holder
                rows.append(ReportRow(name, module.kind, module.dense_weight_bytes(),
                                      module.index_bytes(), f"codebook shared with {first}"))
                continue
        if isinstance(module, (CompressedLinear, LowRankConv2d, FusedDWSepConv2d)):
            rows.append(ReportRow(name, module.kind, module.dense_weight_bytes(),
                                  module.stored_weight_bytes()))
        elif isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d)
                                               and (name in skipped or compressed_convs)):
            nbytes = module.weight.numel() * module.weight.element_size()
            rows.append(ReportRow(name, "dense", nbytes, nbytes, skipped.get(name, "")))
        elif name in skipped or (name == "" and "<root>" in skipped):
            # a note about a container (e.g. a module torch.fx could not trace)
            rows.append(ReportRow(name, "skipped", 0, 0, skipped.get(name or "<root>", "")))
    return rows
