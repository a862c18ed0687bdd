"""Weight sharing before training: tying layers, in the manner of ALBERT's cross-layer sharing
(``co.share``).

:func:`tie_` makes the layers of each group (``nn.Linear``, Hugging Face ``Conv1D``,
``nn.Conv2d``; same type, same weight shape) use one weight: the first layer's
(``init="first"``) or the elementwise mean of the group's weights (``init="mean"``, written
into the first layer's Parameter in place, so its ``requires_grad`` and optimizer references
stay). Training then accumulates into that one tensor the gradient of every use (autograd does
it: the layers hold one Parameter). :func:`tie_blocks` ties every linear of a model's repeated
transformer blocks to the first block's; :func:`tie_convs` ties the equal convs inside each
stage of a CNN. All three check every group before they change anything, and return a
:class:`Tied` (the groups and what they saved).

**Two ways to tie**, and what ``compress_`` does afterwards:

- ``share_module=True`` (the default with ``bias="share"``): the first layer's *module* is
  registered under every name of its group (so the biases are shared too, and the group's
  convs must have one geometry: stride, padding, dilation, groups, padding mode). The model
  then holds one module where it had several; ``compress_`` plans each module once with all
  its names, builds ONE compressed module and puts it in at every name, so the tie survives
  compression, and ``report()`` lists it once (``named_modules`` yields a module once).
  Hooks live on module objects: a later member with hooks is refused (they would stop running),
  and the first member's hooks run at every use.
- ``share_module=False`` (required with ``bias="keep"``: each layer keeps its own bias): only
  the weight Parameter is shared. The modules stay distinct; ``compress_`` keeps every layer
  whose weight another module holds dense, with the reason ``"weight tied to <name>;
  compressing would break the tie"`` (a compressed copy per module would untie them).

What survives: ``state_dict`` / ``load_state_dict`` hold one value per name, so a checkpoint
of a tied model loads into a freshly built model tied the same way (tie first, then load;
``load_state_dict`` copies into the shared Parameter once per name, the same value).
``co.save`` stores a tied tensor once and ``co.load`` re-ties it, even into an untied model
(the weight Parameters; the module objects stay distinct there). ``Module.to`` and
``torch.compile`` keep one Parameter per tie. ``report()`` counts a tied weight once: the later
holders report 0 stored bytes with the note ``"weight tied to <first name>"``.

Refused, with a named error naming the layer (``TypeError`` for a layer of the wrong kind,
``ValueError`` otherwise): an unknown name, the model itself, a group of fewer than two
layers, a layer in two groups (or twice in one), a compressed module, a layer that is not a
linear or a Conv2d, a parametrized weight, different types, weight shapes, dtypes or devices,
conv groups that differ, a bias on some members only (``bias="share"``), and a weight (or
shared bias) another module outside the group holds already (e.g. an output projection tied
to the embedding): retying it would silently break that tie.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_ops._linear import LINEAR_TYPES
from compress_ops._swap import Index, hooks_reason, index, set_submodule
from compress_ops._text import format_table
from compress_ops._validate import check_bool, check_choice
from compress_ops.nn.base import CompressedModule

__all__ = ["TIE_TYPES", "INITS", "BIASES", "Tied", "tie_", "tie_blocks", "tie_convs",
           "find_blocks", "find_stages"]

#: The layer types :func:`tie_` ties (``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv2d``).
TIE_TYPES: tuple[type, ...] = (*LINEAR_TYPES, nn.Conv2d)
#: ``init``: keep the first layer's weight, or write the elementwise mean of the group's.
INITS = ("first", "mean")
#: ``bias``: share the biases like the weights (``init`` applies), or keep each layer's own.
BIASES = ("share", "keep")

_GEOMETRY = ("stride", "padding", "dilation", "groups", "padding_mode")


@dataclass(frozen=True)
class Tied:
    """What a tie did. ``groups``: the tied names, each group's first (kept) layer first;
    ``share_module``: whether the groups share module objects or only weights (and ``bias``:
    ``"share"`` or ``"keep"``); ``params_before`` / ``params_after``: the model's distinct
    parameter elements (``model.parameters()``, each tensor once) before and after;
    ``bytes_saved``: the bytes of the parameters no longer stored."""

    groups: tuple[tuple[str, ...], ...]
    share_module: bool
    bias: str
    params_before: int
    params_after: int
    bytes_saved: int

    @property
    def params_saved(self) -> int:
        """Parameter elements no longer stored (``params_before - params_after``)."""
        return self.params_before - self.params_after

    def __str__(self) -> str:
        rows = [(g[0], str(len(g) - 1), ", ".join(g[1:])) for g in self.groups]
        head = format_table(("kept", "tied", "tied to it"), rows)
        how = "modules" if self.share_module else f"weights (bias={self.bias!r})"
        return (f"{head}\n{len(self.groups)} group(s), shared {how}: parameters "
                f"{self.params_before} -> {self.params_after} ({self.params_saved} and "
                f"{self.bytes_saved} bytes saved)")


def _param_count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # (each Parameter once)
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _group_list(groups: object) -> list[list[str]]:
    """``groups`` as a list of lists of names (a single list of names is one group)."""
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of lists of layer names (or one list of "
                        f"names), got {type(groups).__name__}")
    groups = list(groups)
    if not groups:
        raise ValueError("groups must name at least one group of layers, got []")
    if all(isinstance(g, str) for g in groups):
        groups = [groups]
    out = []
    for g in groups:
        if isinstance(g, str) or not isinstance(g, Sequence) \
                or not all(isinstance(n, str) for n in g):
            raise TypeError(f"each group must be a list of layer names (str), got {g!r}")
        out.append(list(g))
    return out


def _resolve(bias: str, share_module: bool | None) -> bool:
    check_choice("bias", bias, BIASES)
    if share_module is None:
        return bias == "share"
    check_bool("share_module", share_module)
    if share_module and bias != "share":
        raise ValueError("share_module=True shares the whole module, biases included; it needs "
                         "bias='share' (bias='keep' shares the weight Parameters only)")
    return share_module


def _check_layer(name: str, by_name: dict[str, nn.Module]) -> nn.Module:
    if name == "":
        raise ValueError("the model itself ('') cannot be tied; name its layers")
    if name not in by_name:
        raise ValueError(f"{name!r} is not a module of the model")
    m = by_name[name]
    if isinstance(m, CompressedModule):
        raise TypeError(f"{name} is already compressed ({type(m).__name__}); tie the dense "
                        f"layers first, then compress (with share_module=True the tie "
                        f"survives compress_)")
    if not isinstance(m, TIE_TYPES):
        raise TypeError(f"{name} is a {type(m).__name__}; only nn.Linear, Hugging Face "
                        f"Conv1D and nn.Conv2d layers can be tied")
    if parametrize.is_parametrized(m):
        raise ValueError(f"{name} has a parametrized weight; remove the parametrization "
                         f"before tying it")
    if not isinstance(m.weight, nn.Parameter):
        raise ValueError(f"{name}.weight is not an nn.Parameter")
    return m


def _check_member(name: str, m: nn.Module, first_name: str, first: nn.Module, *, bias: str,
                  share_module: bool) -> None:
    if type(m) is not type(first):
        raise TypeError(f"{name} is a {type(m).__name__}, {first_name} a "
                        f"{type(first).__name__}: tied layers must have the same type")
    w, w0 = m.weight, first.weight
    for what, a, b in (("shape", tuple(w.shape), tuple(w0.shape)), ("dtype", w.dtype, w0.dtype),
                       ("device", w.device, w0.device)):
        if a != b:
            raise ValueError(f"{name}'s weight has {what} {a}, {first_name}'s {b}: tied "
                             f"layers need one weight {what}")
    if isinstance(m, nn.Conv2d):
        if m.groups != first.groups:
            raise ValueError(f"{name} has groups={m.groups}, {first_name} groups={first.groups}: "
                             f"tied convs need equal groups")
        for attr in _GEOMETRY if share_module else ():
            if getattr(m, attr) != getattr(first, attr):
                raise ValueError(f"{name} has {attr}={getattr(m, attr)!r}, {first_name} "
                                 f"{getattr(first, attr)!r}: one shared conv module needs one "
                                 f"geometry (share_module=False ties the weights only)")
    if bias == "share" and (m.bias is None) != (first.bias is None):
        has, lacks = (name, first_name) if first.bias is None else (first_name, name)
        raise ValueError(f"{has} has a bias and {lacks} has none: bias='share' needs a bias on "
                         f"every layer of the group or on none (or use bias='keep')")
    if share_module:
        hooked = hooks_reason(m)
        if hooked:
            raise ValueError(f"{name} {hooked.split(',')[0]}, which would stop running once "
                             f"{first_name}'s module is registered in its place; remove them "
                             f"or tie with share_module=False")


def _check_outside(idx: Index, names: list[str], mods: list[nn.Module], attrs: list[str]) -> None:
    inside = {idx.names[id(m)][0] for m in mods}
    for name, m in zip(names, mods, strict=True):
        for attr in attrs:
            holders = [o for o in idx.tied(m, idx.names[id(m)], attr) if o not in inside]
            if holders:
                raise ValueError(f"{name}.{attr} is already tied to {holders[0]}, outside the "
                                 f"group; tying {name} would break that tie")


def tie_(model: nn.Module, groups: Sequence[Sequence[str]] | Sequence[str], *,
         init: str = "first", bias: str = "share", share_module: bool | None = None) -> Tied:
    """Tie the layers of each group of ``model`` in place, so they use ONE weight; return a
    :class:`Tied`.

    ``groups``: a list of lists of layer names (dotted, as ``named_modules`` gives them), or a
    single list of names (one group). Each group's layers are ``nn.Linear``, Hugging Face
    ``Conv1D`` or ``nn.Conv2d`` modules of one type, with one weight shape, dtype and device
    (and, for convs, equal ``groups``). The first name of a group is the layer kept.

    ``init``: ``"first"`` keeps the first layer's weight; ``"mean"`` writes the elementwise
    mean over the group's layers (``torch.stack(weights).mean(0)``, each layer counted once)
    into the first layer's weight Parameter in place. Shared biases follow the same rule.

    ``bias``: ``"share"`` (default) shares the biases too (every layer of a group has a bias,
    or none has); ``"keep"`` leaves each layer its own bias and shares the weight only.

    ``share_module``: ``None`` (default) means ``bias == "share"``. ``True`` registers the
    first layer's module under every name of the group, and under any other name a later
    member had (conv geometry must match; a later member with hooks is refused), so
    ``compress_`` builds one compressed module for the group and the tie survives it.
    ``False`` assigns the first layer's weight Parameter (and, with ``bias="share"``, its bias
    Parameter) to the other modules, which stay distinct objects; ``compress_`` then keeps
    them dense (``"weight tied to <name>; compressing would break the tie"``).

    Every group is checked before anything changes; the errors are listed in the module docs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("init", init, INITS)
    share_module = _resolve(bias, share_module)
    groups = _group_list(groups)
    idx = index(model)
    by_name = idx.by_name()
    seen: dict[int, str] = {}
    plan: list[tuple[list[str], list[nn.Module]]] = []
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"the group {group} has {len(group)} layer(s); a tie needs at least "
                             f"two")
        mods = []
        for name in group:
            m = _check_layer(name, by_name)
            if id(m) in seen:
                raise ValueError(f"{name} is in two groups (or twice in one): it is the module "
                                 f"{seen[id(m)]} named already")
            seen[id(m)] = name
            mods.append(m)
        for name, m in zip(group[1:], mods[1:], strict=True):
            _check_member(name, m, group[0], mods[0], bias=bias, share_module=share_module)
        _check_outside(idx, group, mods, ["weight", "bias"] if bias == "share" else ["weight"])
        plan.append((group, mods))
    params_before, bytes_before = _param_count(model)
    with torch.no_grad():
        for _, mods in plan:
            first = mods[0]
            attrs = ["weight"] + (["bias"] if bias == "share" and first.bias is not None else [])
            if init == "mean":
                for attr in attrs:
                    mean = torch.stack([getattr(m, attr).detach() for m in mods]).mean(0)
                    getattr(first, attr).copy_(mean)
            for m in mods[1:]:
                if share_module:
                    for alias in idx.names[id(m)]:
                        set_submodule(model, alias, first)
                else:
                    for attr in attrs:
                        setattr(m, attr, getattr(first, attr))
    params_after, bytes_after = _param_count(model)
    return Tied(tuple(tuple(g) for g, _ in plan), share_module, bias, params_before,
                params_after, bytes_before - bytes_after)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _signature(block: nn.Module) -> tuple:
    return (type(block), tuple((n, tuple(p.shape)) for n, p
                               in block.named_parameters(remove_duplicate=False)))


def find_blocks(model: nn.Module) -> str:
    """The name of ``model``'s repeated blocks: the longest ``nn.ModuleList`` (at least two
    entries) whose entries have one type and the same parameter names and shapes and hold a
    linear (``""``: the model itself). ``ValueError`` when there is none, or when several are
    equally long (an encoder and a decoder): then name one with ``blocks=``."""
    found: list[tuple[int, str]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2:
            sigs = [_signature(b) for b in m]
            if all(s == sigs[0] for s in sigs) and sigs[0][1] \
                    and any(isinstance(x, LINEAR_TYPES) for x in m[0].modules()):
                found.append((len(m), name))
    if not found:
        raise ValueError("the model has no nn.ModuleList of repeated blocks (equal types and "
                         "parameter shapes, holding linears); name the blocks with blocks=")
    longest = max(n for n, _ in found)
    names = [name for n, name in found if n == longest]
    if len(names) > 1:
        raise ValueError(f"several lists of {longest} repeated blocks: {names}; choose one with "
                         f"blocks=")
    return names[0]


def tie_blocks(model: nn.Module, blocks: str | None = None, *, init: str = "first",
               bias: str = "share", share_module: bool | None = None) -> Tied:
    """Tie every linear (``nn.Linear``, Hugging Face ``Conv1D``) of each repeated block to the
    first block's at the same relative name (ALBERT's all-layer sharing of the projections;
    norms and embeddings stay per block). Returns the :class:`Tied` of :func:`tie_`, whose
    ``groups`` are ``[blocks.0.<r>, blocks.1.<r>, ...]`` per linear ``<r>`` of the first block.

    ``blocks``: the name of the ``nn.ModuleList`` (or ``nn.Sequential``) of blocks; ``None``
    finds it (:func:`find_blocks`). ``init``, ``bias``, ``share_module``: as for :func:`tie_`
    (by default whole modules, biases included, so ``compress_`` keeps the sharing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    name = find_blocks(model) if blocks is None else blocks
    if not isinstance(name, str):
        raise TypeError(f"blocks must be the name of a module list (str), got "
                        f"{type(name).__name__}")
    try:
        container = model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"blocks={name!r} is not a module of the model") from None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
        raise ValueError(f"blocks={name!r} must be an nn.ModuleList or nn.Sequential of at least "
                         f"two blocks, got {type(container).__name__}")
    children = [c for c, _ in container.named_children()]
    first = container.get_submodule(children[0])
    rel = [r for r, m in first.named_modules() if isinstance(m, LINEAR_TYPES)]
    if not rel:
        raise ValueError(f"the first block {_join(name, children[0])} has no dense linear "
                         f"layer to tie")
    groups = [[_join(name, c, r) for c in children] for r in rel]
    return tie_(model, groups, init=init, bias=bias, share_module=share_module)


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def find_stages(model: nn.Module) -> list[str]:
    """Names of ``model``'s conv stages: the innermost ``nn.Sequential`` / ``nn.ModuleList``
    with no ``nn.Conv2d`` child and at least two children holding convs (blocks), such as
    torchvision ResNet's ``layer1`` .. ``layer4``. A container holding such a stage is not one
    itself, so no conv belongs to two stages."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            kids = list(m.children())
            if not any(isinstance(k, nn.Conv2d) for k in kids) \
                    and sum(_has_conv(k) for k in kids) >= 2:
                found.append((name, m))
    ids = {id(m) for _, m in found}
    return [name for name, m in found
            if not any(id(x) in ids for x in m.modules() if x is not m)]


def tie_convs(model: nn.Module, stages: str | Sequence[str] | None = None, *,
              init: str = "first", bias: str = "share",
              share_module: bool | None = None) -> Tied:
    """Inside each stage, tie every ``nn.Conv2d`` to the first conv of the stage (in
    ``named_modules`` order) with the same type, weight shape, groups, dtype, device and bias
    presence, and with ``share_module`` (the default) the same stride, padding, dilation and
    padding mode (equal weights with another geometry form a group of their own). Returns the
    :class:`Tied` of :func:`tie_` (its ``groups``: the groups found; groups of one are not
    tied). Nothing to tie warns (``UserWarning``) and returns an empty :class:`Tied`.

    ``stages``: a stage name or a list of them; ``None`` finds them (:func:`find_stages`).
    ``init``, ``bias``, ``share_module``: as for :func:`tie_`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("init", init, INITS)
    module_level = _resolve(bias, share_module)
    names = find_stages(model) if stages is None else \
        [stages] if isinstance(stages, str) else list(stages)
    groups: list[list[str]] = []
    for stage_name in names:
        if not isinstance(stage_name, str):
            raise TypeError(f"stages must be names (str), got {stage_name!r}")
        try:
            stage = model.get_submodule(stage_name) if stage_name else model
        except AttributeError:
            raise ValueError(f"stage {stage_name!r} is not a module of the model") from None
        buckets: dict[tuple, list[str]] = {}
        for r, m in stage.named_modules():
            if isinstance(m, nn.Conv2d):
                key = (type(m), tuple(m.weight.shape), m.groups, m.weight.dtype,
                       m.weight.device, m.bias is None)
                if module_level:
                    key += tuple(getattr(m, a) for a in _GEOMETRY)
                buckets.setdefault(key, []).append(_join(stage_name, r))
        groups += [g for g in buckets.values() if len(g) >= 2]
    if not groups:
        warnings.warn(f"tie_convs found no two equal convs in the stages {names}; nothing tied",
                      UserWarning, stacklevel=2)
        count, _ = _param_count(model)
        return Tied((), module_level, bias, count, count, 0)
    return tie_(model, groups, init=init, bias=bias, share_module=share_module)
