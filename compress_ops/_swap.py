"""The one module-swap mechanism: index a model's modules, decide per layer, build the
replacements, swap them in at every name a module is registered under, and keep the notes
``report()`` reads.

Every in-place rewrite of the package goes through here: :func:`compress_ops.compress_` and
:func:`compress_ops.qat.prepare_qat` (:func:`replace_layers`), the dw+pw fusion, structured
pruning and :meth:`compress_ops.prune.Pruner.finalize` (:func:`replace_everywhere`). A module
reachable under several names (shared) is decided once, built once and replaced at every
name, so the model keeps one module where it had one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress_ops._linear import is_conv1d
from compress_ops.configs import UnsupportedModule, UnsupportedWeight

__all__ = ["SKIPPED_ATTR", "CONFIGS_ATTR", "AFTER_COMPRESS", "after_compress",
           "applied_configs", "record_config", "RESIZED_ATTR", "resized", "record_resized",
           "Index", "index", "dense_reason", "hooks_reason", "carry_state", "keep_layout",
           "set_submodule",
           "replace_everywhere", "notes", "record_notes", "replace_layers"]

#: Attribute of a model holding ``{name: why it stays dense}`` for ``report()``.
SKIPPED_ATTR = "_compress_ops_skipped"
#: Attribute of a model holding the configs ``compress_`` applied to it (for ``co.save``).
CONFIGS_ATTR = "_compress_ops_configs"
#: Attribute of a model holding the names of modules structured pruning resized.
RESIZED_ATTR = "_compress_ops_resized"

FilterFn = Callable[[nn.Module, str], bool]
Decision = tuple[bool, object]  # (some rule matched, its config or None)


@dataclass(frozen=True)
class Index:
    """``names``: every name of each module (by id, in ``named_modules`` order); ``modules``:
    the modules by id; ``owners``: the first names of the modules holding each parameter (by
    id), to see weights tied across modules."""

    names: dict[int, list[str]]
    modules: dict[int, nn.Module]
    owners: dict[int, list[str]]

    def by_name(self) -> dict[str, nn.Module]:
        """``{name: module}`` for every name, aliases included."""
        return {n: self.modules[mid] for mid, aliases in self.names.items() for n in aliases}

    def tied(self, module: nn.Module, aliases: list[str], attr: str = "weight") -> list[str]:
        """Names of the other modules holding ``module.<attr>`` (the weight, or the bias)."""
        param = getattr(module, attr, None)
        if not isinstance(param, nn.Parameter):
            return []
        return [o for o in self.owners.get(id(param), []) if o not in aliases]


def index(model: nn.Module) -> Index:
    """The :class:`Index` of ``model``."""
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
    return Index(names, modules, owners)


def hooks_reason(module: nn.Module) -> str | None:
    """Why a hooked module cannot be replaced (None: it has no hooks): forward, forward-pre and
    backward hooks live on the module object, so a replacement would silently not run them."""
    kinds = [kind for kind, hooks in (("forward", module._forward_hooks),
                                      ("forward-pre", module._forward_pre_hooks),
                                      ("backward", module._backward_hooks),
                                      ("backward-pre", module._backward_pre_hooks)) if hooks]
    if not kinds:
        return None
    return (f"has {' and '.join(kinds)} hooks, which a replacement would not run; remove them "
            f"to compress it")


def dense_reason(idx: Index, module: nn.Module, aliases: list[str], cfg: object,
                 filter_fn: FilterFn | None) -> str | None:
    """Why a matched layer stays dense under ``cfg`` before any transform looks at it (None:
    it does not): a ``None`` rule, ``filter_fn``, hooks, or a weight tied to another module."""
    if cfg is None:
        return "kept dense by recipe"
    if filter_fn is not None and not all(filter_fn(module, n) for n in aliases):
        return "excluded by filter_fn"
    hooked = hooks_reason(module)
    if hooked:
        return hooked
    tied = idx.tied(module, aliases)
    if tied:
        return f"weight tied to {tied[0]}; compressing would break the tie"
    return None


def keep_layout(old: nn.Module, new: nn.Module) -> None:
    """``new`` replaces ``old``, a Hugging Face ``Conv1D`` or a module that replaced one: its
    ``.weight`` reads in the Conv1D's ``[in, out]`` layout (``weight_layout``); a module
    without that attribute (a ``FakeQuantLinear``) carries the mark to its own replacement."""
    if is_conv1d(old) or getattr(old, "weight_layout", None) == "in_out" \
            or old.__dict__.get("_conv1d_layout"):
        if getattr(new, "weight_layout", None) == "out_in":
            new.weight_layout = "in_out"
        elif not hasattr(new, "weight_layout"):
            new._conv1d_layout = True


def carry_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` (built from ``old``) the state a replacement must keep: the train/eval mode;
    a Hugging Face ``Conv1D``'s ``[in, out]`` layout of ``.weight`` (``weight_layout``);
    ``old``'s bias Parameter itself where ``new`` holds an equal copy (so bias ties, its
    ``requires_grad`` and optimizer references carry over); and a frozen weight stays frozen
    (every other parameter of ``new`` then has ``requires_grad=False``). Returns ``new``.

    Biases on the meta device have no values to compare (a model built for loading, e.g. the
    resized skeleton of :func:`compress_ops.integrations.serialization.apply_manifest` under
    ``from_pretrained``): ``new`` keeps its own bias, which the load fills."""
    new.train(old.training)
    keep_layout(old, new)
    old_bias, new_bias = getattr(old, "bias", None), getattr(new, "bias", None)
    if (isinstance(old_bias, nn.Parameter) and isinstance(new_bias, nn.Parameter)
            and old_bias.shape == new_bias.shape and old_bias.dtype == new_bias.dtype
            and old_bias.device == new_bias.device and old_bias.device.type != "meta"
            and torch.equal(old_bias, new_bias)):
        new.bias = old_bias
    old_weight = getattr(old, "weight", None)
    if isinstance(old_weight, nn.Parameter) and not old_weight.requires_grad:
        for name, param in new.named_parameters():
            if name != "bias":
                param.requires_grad_(False)
    return new


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the (non-empty) dotted ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@contextlib.contextmanager
def swapped_in(model: nn.Module, swaps: Iterable[tuple[Sequence[str], nn.Module, nn.Module]]
               ) -> Iterator[nn.Module]:
    """``model`` with each ``(names, old, new)`` of ``swaps`` in place (``new`` at every name,
    in ``old``'s train/eval mode; ``swaps`` may build lazily: it is read inside the guard);
    yields the module to run (``new`` itself where a name is the root, ``""``). Every layer is
    put back afterwards, also on an error: what ``plan()`` and the search measure."""
    root, done = model, []
    try:
        for names, old, new in swaps:
            new.train(old.training)
            for name in names:
                if name:
                    set_submodule(model, name, new)
                    done.append((name, old))
                else:
                    root = new
        yield root
    finally:
        for name, old in reversed(done):
            set_submodule(model, name, old)


def replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Replace ``old`` by ``new`` at every name it is registered under in ``root`` (not
    ``root`` itself); return those names."""
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old and n]
    carry_state(old, new)
    for name in names:
        set_submodule(root, name, new)
    return names


def notes(model: nn.Module) -> dict[str, str]:
    """A copy of the ``{name: reason}`` notes recorded on ``model``."""
    return dict(getattr(model, SKIPPED_ATTR, {}))


#: Functions ``compress_`` calls with the model after it compressed something (e.g. the
#: Hugging Face integration attaches its quantizer, so ``save_pretrained`` writes a manifest).
AFTER_COMPRESS: list[Callable[[nn.Module], None]] = []


def after_compress(model: nn.Module) -> None:
    """Run every :data:`AFTER_COMPRESS` function on ``model``."""
    for fn in AFTER_COMPRESS:
        fn(model)


def resized(model: nn.Module) -> list[str]:
    """Names of the dense modules structured pruning resized in ``model`` (for checkpoints:
    a freshly built model has them at their original sizes)."""
    return list(getattr(model, RESIZED_ATTR, []))


def record_resized(model: nn.Module, name: str) -> None:
    """Note that the module at ``name`` of ``model`` was resized."""
    object.__setattr__(model, RESIZED_ATTR, list(dict.fromkeys([*resized(model), name])))


def applied_configs(model: nn.Module) -> list[object]:
    """The configs (or Recipes) ``compress_`` applied to ``model``, in order."""
    return list(getattr(model, CONFIGS_ATTR, []))


BUILT_BY_ATTR = "_compress_ops_built_by"


def mark_built_by(module: nn.Module, config: object) -> nn.Module:
    """Record on a compressed ``module`` the config that built it (not in the state_dict;
    lost by ``co.load``, which rebuilds modules from the manifest); return it."""
    object.__setattr__(module, BUILT_BY_ATTR, config)
    return module


def built_by(module: nn.Module) -> object | None:
    """The config :func:`mark_built_by` recorded on ``module``, or None."""
    return module.__dict__.get(BUILT_BY_ATTR)


def record_config(model: nn.Module, config: object) -> None:
    """Append ``config`` to the configs applied to ``model`` (kept for checkpoints; not a
    submodule, not in the state_dict)."""
    object.__setattr__(model, CONFIGS_ATTR, [*applied_configs(model), config])


def record_notes(model: nn.Module, skipped: dict[str, str]) -> None:
    """Store ``{name: reason}`` notes on ``model`` for ``report()`` (not a submodule, not in
    the state_dict)."""
    object.__setattr__(model, SKIPPED_ATTR, skipped)


def _swap_in(model: nn.Module, built: Iterable[tuple[list[str], nn.Module | None, str | None]],
             skipped: dict[str, str]) -> nn.Module:
    """Put each built module in at all of its names (or note why it stays dense); record the
    notes; return the model, or the new root if the model was replaced."""
    replaced_root: nn.Module | None = None
    for aliases, new, reason in built:
        for name in aliases:
            if new is None:
                skipped[name] = reason
                continue
            skipped.pop(name, None)
            if name:
                set_submodule(model, name, new)
            else:
                replaced_root = new
    result = replaced_root if replaced_root is not None else model
    record_notes(result, skipped)
    return result


def replace_layers(
    model: nn.Module,
    decide: Callable[[str], Decision],
    *,
    in_scope: Callable[[nn.Module, set[Decision]], bool],
    build: Callable[..., nn.Module],
    reason: Callable[[Index, nn.Module, list[str], object], str | None],
    prepare: Callable[[object], Callable[[list[nn.Module], object], dict[int, dict]] | None]
    = lambda cfg: None,
    idx: Index | None = None,
) -> nn.Module:
    """Plan, prepare, build, then swap in; return the model (the new module if ``model``
    itself was replaced). Nothing in the model changes before every replacement is built.

    1. **Plan.** Every module (once, with all its names) for which ``in_scope(module,
       decisions)`` holds, where ``decisions`` is ``{decide(name)}`` over its names. Names
       decided differently keep it dense; else ``reason(idx, module, names, cfg)`` says why it
       stays dense (None: it does not).
    2. **Prepare.** Layers of equal configs for which ``prepare(cfg)`` gives a function are
       handed to it together (``fn(modules, cfg) -> {id(module): extra build kwargs}``, e.g. one
       shared codebook); its ``UnsupportedModule`` keeps the whole group dense.
    3. **Build.** ``build(module, cfg, **extras)`` for each layer; ``UnsupportedModule`` keeps
       that layer dense with its message, except :class:`UnsupportedWeight`, which is raised.
    4. **Swap in** at every name; the notes of the layers left dense go to ``report()``.
    """
    idx = idx or index(model)
    skipped = notes(model)
    plan: list[tuple[int, list[str], object, str | None]] = []
    for mid, aliases in idx.names.items():
        module = idx.modules[mid]
        decisions = {decide(name) for name in aliases}
        if not in_scope(module, decisions):
            continue
        cfg = None
        if len(decisions) > 1:
            why = f"shared under {aliases} with different recipe rules"
        else:
            ((_, cfg),) = decisions
            why = reason(idx, module, aliases, cfg)
        plan.append((mid, aliases, cfg, why))
    extras: dict[int, dict] = {}
    failed: dict[int, str] = {}
    groups: dict[object, list[int]] = {}
    for mid, _, cfg, why in plan:
        if why is None and prepare(cfg) is not None:
            groups.setdefault(cfg, []).append(mid)
    for cfg, mids in groups.items():
        try:
            extras.update(prepare(cfg)([idx.modules[m] for m in mids], cfg))
        except UnsupportedModule as exc:
            failed.update(dict.fromkeys(mids, str(exc)))
    built: list[tuple[list[str], nn.Module | None, str | None]] = []
    for mid, aliases, cfg, why in plan:
        why = why or failed.get(mid)
        new = None
        if why is None:
            try:
                new = carry_state(idx.modules[mid],
                                  build(idx.modules[mid], cfg, **extras.get(mid, {})))
            except UnsupportedWeight:
                raise
            except UnsupportedModule as exc:
                why = str(exc)
        built.append((aliases, new, why))
    return _swap_in(model, built, skipped)
