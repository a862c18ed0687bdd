"""``co.save`` / ``co.load``: one safetensors file holds a compressed model, and the dense model
the user builds becomes exactly that model again.

The file holds every tensor once (shared codebooks and tied weights are stored under one key)
and, in its header (``__metadata__["compress_ops"]``), a JSON manifest:

``format_version``
    :data:`FORMAT_VERSION`; ``co.load`` refuses any other.
``modules``
    each compressed module once: its class, constructor arguments (ranks, bit widths, group
    sizes), compute dtype, every name it is registered under, and its ``saved_attrs``.
``identity``
    names that are ``nn.Identity`` in the compressed model (the later members of a fused
    chain, a BatchNorm folded away).
``resized``
    dense modules structured pruning made smaller: their class, size attributes and tensor
    shapes (applied before anything else on load).
``aliases``
    ``{key: the key it is stored under}`` for tensors held under several names.
``frozen``
    parameters with ``requires_grad=False``.
``notes``
    ``report()``'s reasons (``{layer: why it stayed dense}``).
``configs``
    the configs (or Recipes) ``compress_`` applied, as JSON (:func:`config_to_json`).

``co.load(model, path)`` applies the manifest to the dense model (or to what a factory
returns): each compressed module is built on the meta device from its arguments (nothing is
computed) and put in at its names, then ``load_state_dict(assign=True)`` gives every tensor
its stored value, and the aliases are re-tied (one Parameter / buffer object again). Every
mismatch is a :class:`CheckpointError` naming the key or the module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_ops import _swap
from compress_ops._linear import LINEAR_TYPES, linear_weight
from compress_ops.api import Recipe, report
from compress_ops.configs import DWSepFuseConfig, per_layer_configs
from compress_ops.nn import FusedDWSepConv2d, LowRankConv2d, SharedFilterConv2d
from compress_ops.nn.base import CompressedLinear, CompressedModule
from compress_ops.structured.heads import SIZE_ATTRS as _HEAD_SIZE_ATTRS
from compress_ops.structured.surgery import resized_copy

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "CheckpointError", "save", "load", "load_into",
           "manifest", "read_manifest", "checked_manifest", "apply_manifest", "finish_load",
           "config_to_json", "config_from_json"]

#: The version of the manifest and of the tensors' layout it describes.
FORMAT_VERSION = 1
def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied where its data is not 64-byte aligned: safetensors hands back tensors at
    their offsets in the file, and CPU kernels pick their vector loops by alignment, so a
    misaligned weight can give results one ulp away from the saved model's (seen with one
    intra-op thread)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


#: The safetensors metadata key holding the manifest.
METADATA_KEY = "compress_ops"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into (the message names the key
    or module), or one this version cannot read."""


# -- configs as JSON ----------------------------------------------------------------------------


def _config_types() -> dict[str, type]:
    return {t.__name__: t for t in (*per_layer_configs(), DWSepFuseConfig)}


def config_to_json(config: object) -> dict[str, Any] | None:
    """A config (``None``, a per-layer config, ``DWSepFuseConfig`` or a :class:`Recipe`, e.g.
    a ``Plan``) as JSON values: ``{"type": name, **fields}``, a Recipe as ``{"type":
    "Recipe", "rules": [[pattern, config], ...]}``."""
    if config is None:
        return None
    if isinstance(config, Recipe):
        return {"type": "Recipe",
                "rules": [[p, config_to_json(c)] for p, c in config.rules.items()]}
    if type(config).__name__ not in _config_types():
        raise TypeError(f"cannot write config {config!r} as JSON")
    return {"type": type(config).__name__,
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}}


def config_from_json(data: dict[str, Any] | None) -> object:
    """The inverse of :func:`config_to_json`; ``CheckpointError`` for an unknown type."""
    if data is None:
        return None
    if not isinstance(data, dict) or "type" not in data:
        raise CheckpointError(f"not a config: {data!r}")
    kind, fields = data["type"], {k: v for k, v in data.items() if k != "type"}
    if kind == "Recipe":
        return Recipe({p: config_from_json(c) for p, c in fields["rules"]})
    types = _config_types()
    if kind not in types:
        raise CheckpointError(f"unknown config type {kind!r} (known: {sorted(types)})")
    return types[kind](**fields)


# -- save -----------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _all_resized(model: nn.Module) -> set[str]:
    return {".".join(p for p in (prefix, rel) if p)
            for prefix, sub in model.named_modules() for rel in _swap.resized(sub)}


def _module_entries(model: nn.Module) -> tuple[list[dict[str, Any]], list[str]]:
    idx = _swap.index(model)
    resized = _all_resized(model)
    entries, identity = [], []
    for mid, names in idx.names.items():
        module = idx.modules[mid]
        if isinstance(module, CompressedModule):
            if "" in names:
                raise CheckpointError(f"the model itself is a {type(module).__name__}: save "
                                      f"the model that holds it")
            entries.append({
                "class": type(module).__name__,
                "names": names,
                "args": module.init_args(),
                "dtype": _dtype_name(module.weight_dtype),
                "attrs": {a: getattr(module, a) for a in module.saved_attrs},
                "resized": any(n in resized for n in names),
            })
        elif type(module) is nn.Identity:
            identity += [n for n in names if n]
        elif type(module).__name__ == "FakeQuantLinear":
            raise CheckpointError(f"{names[0]} is a FakeQuantLinear (quantization-aware "
                                  f"training): co.qat.finalize_qat(model) first")
        elif parametrize.is_parametrized(module):
            kinds = sorted({type(p).__name__ for plist in module.parametrizations.values()
                            for p in plist})
            raise CheckpointError(f"{names[0] or '<root>'} carries parametrizations "
                                  f"({', '.join(kinds)}; a co.prune.Pruner's masks while it "
                                  f"prunes): pruner.finalize() first, which makes them part "
                                  f"of the weights")
    return entries, identity


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.device, t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


#: The size attributes structured pruning changes (``select_channels``), by module type (an
#: attention module whose fused q/k/v heads were removed: its split size and head counts).
SIZE_ATTRS = ("in_features", "out_features", "nf", "nx", "in_channels", "out_channels",
              "groups", "num_features", *_HEAD_SIZE_ATTRS)


def _resized_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: {"class", "attrs", "shapes"}}`` of the dense modules structured pruning
    resized (their sizes and own tensors' shapes; compressed ones have their own entry)."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(_all_resized(model)):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(m, CompressedModule):
            tensors = {**{k: v for k, v in m._parameters.items() if v is not None},
                       **{k: v for k, v in m._buffers.items() if v is not None}}
            out[name] = {"class": type(m).__name__,
                         "attrs": {a: getattr(m, a) for a in SIZE_ATTRS if hasattr(m, a)},
                         "shapes": {k: list(v.shape) for k, v in tensors.items()}}
    return out


def _apply_resized(model: nn.Module, resized: dict[str, dict[str, Any]]) -> None:
    """Give each recorded dense module the sizes it was saved with (a same-class copy holding
    meta tensors of the saved shapes, put in at every name)."""
    for name, entry in resized.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint resized {name!r} (structured pruning), "
                                  f"which the model does not have") from None
        if type(old).__name__ != entry["class"]:
            raise CheckpointError(f"{name} is a {type(old).__name__}; the checkpoint resized a "
                                  f"{entry['class']} there")
        new = resized_copy(old)
        for attr, value in entry["attrs"].items():
            setattr(new, attr, value)
        for key, shape in entry["shapes"].items():
            if key in old._parameters and old._parameters[key] is not None:
                p = old._parameters[key]
                new._parameters[key] = nn.Parameter(
                    torch.empty(shape, dtype=p.dtype, device="meta"),
                    requires_grad=p.requires_grad)
            elif key in old._buffers and old._buffers[key] is not None:
                b = old._buffers[key]
                new._buffers[key] = torch.empty(shape, dtype=b.dtype, device="meta")
            else:
                raise CheckpointError(f"{name}.{key}: the checkpoint has it, the model's "
                                      f"{type(old).__name__} does not")
        _swap.replace_everywhere(model, old, new)
        _swap.record_resized(model, name)


def manifest(model: nn.Module, *, tensors: bool = True
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(manifest, tensors)``: what :func:`save` writes (tensors deduplicated, on the CPU,
    contiguous; ``tensors=False``: the manifest only, and no tensor is copied)."""
    want = tensors
    entries, identity = _module_entries(model)
    state = model.state_dict(keep_vars=True)
    tensors = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: dict[tuple, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key}: extra state {type(value).__name__} is not a tensor; "
                                  f"a safetensors file holds tensors only")
        if value.device.type == "meta":
            raise CheckpointError(f"{key} is on the meta device (no values to save)")
        sk = _storage_key(value)
        if sk in first:
            aliases[key] = first[sk]
            continue
        first[sk] = key
        tensor = value.detach()
        storage = (tensor.untyped_storage().data_ptr(), tensor.device)
        if want and (storage in storages or not tensor.is_contiguous()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # a partial view
        storages.setdefault(storage, key)
        if want:
            tensors[key] = tensor.cpu().contiguous()
    notes: dict[str, str] = {}
    for prefix, sub in model.named_modules():  # as report() gathers them
        for name, note in _swap.notes(sub).items():
            notes.setdefault(".".join(p for p in (prefix, name) if p), note)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    resized = _resized_entries(model)
    man = {"format_version": FORMAT_VERSION, "modules": entries, "identity": identity,
           "resized": resized,
           "aliases": aliases, "frozen": frozen, "notes": notes,
           "configs": [config_to_json(c) for c in _swap.applied_configs(model)],
           "torch": torch.__version__}
    return man, tensors


def save(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` (compressed or not) to one safetensors file at ``path``: every tensor
    once, and the manifest :func:`load` rebuilds it from (see the module docs). ``metadata``:
    extra ``{str: str}`` for the header."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    man, tensors = manifest(model)
    header = {**(metadata or {}), METADATA_KEY: json.dumps(man)}
    save_file(tensors, str(path), metadata=header)


# -- load -----------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest in the header of a :func:`save` file (checked for its version)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return checked_manifest(meta.get(METADATA_KEY), path)


def checked_manifest(raw: str | dict | None, where: object) -> dict[str, Any]:
    """The manifest (JSON text or parsed), refused unless this version can read it."""
    if raw is None:
        raise CheckpointError(f"{where}: no compress_ops manifest in the header (not written "
                              f"by co.save)")
    man = json.loads(raw) if isinstance(raw, str) else raw
    version = man.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version!r}; this compress_ops reads "
                              f"version {FORMAT_VERSION} (upgrade compress_ops to read it)")
    return man


def _classes() -> dict[str, type[CompressedModule]]:
    from compress_ops import nn as co_nn

    return {name: getattr(co_nn, name) for name in co_nn.__all__
            if isinstance(getattr(co_nn, name), type)
            and issubclass(getattr(co_nn, name), CompressedModule)}


def _fits(cls: type, args: dict[str, Any], target: nn.Module) -> str | None:
    """Why the compressed ``cls(**args)`` cannot stand where ``target`` is (None: it can)."""
    if isinstance(target, cls) and target.init_args() == args:
        return None  # (applied twice: the same module)
    if issubclass(cls, CompressedLinear):
        if not isinstance(target, LINEAR_TYPES):
            return f"is a {type(target).__name__}, not a linear layer"
        shape = tuple(linear_weight(target).shape)
        want = (args["out_features"], args["in_features"])
        return None if shape == want else f"has a weight of {shape}, the checkpoint {want}"
    if cls is FusedDWSepConv2d and not isinstance(target, nn.Conv2d):
        # the chain's first module: a zero pad before the depthwise conv
        pads = (nn.ZeroPad2d, nn.ConstantPad2d)
        return None if isinstance(target, pads) else (
            f"is a {type(target).__name__}, neither a depthwise conv nor a zero pad")
    if not isinstance(target, nn.Conv2d):
        return f"is a {type(target).__name__}, not an nn.Conv2d"
    if cls in (LowRankConv2d, SharedFilterConv2d):
        want = (args["out_channels"], args["in_channels"], *args["kernel_size"])
        got = tuple(target.weight.shape)
        return None if got == want else f"has a weight of {got}, the checkpoint {want}"
    if cls is FusedDWSepConv2d:  # stands where the depthwise conv was
        c = args["in_channels"]
        if target.groups != c or target.weight.shape[0] != c:
            return (f"is not a depthwise conv of {c} channels (groups={target.groups}, "
                    f"{target.weight.shape[0]} outputs)")
        return None
    return None


def apply_manifest(model: nn.Module, man: dict[str, Any]) -> nn.Module:
    """Put the manifest's compressed modules (built on the meta device) and identities into
    ``model``; every module must be where the manifest says, and fit."""
    classes = _classes()
    _apply_resized(model, man.get("resized", {}))
    names = dict(model.named_modules(remove_duplicate=False))
    for entry in man["modules"]:
        cls = classes.get(entry["class"])
        if cls is None:
            raise CheckpointError(f"unknown compressed module class {entry['class']!r} for "
                                  f"{entry['names'][0]} (known: {sorted(classes)})")
        for name in entry["names"]:
            if name not in names:
                raise CheckpointError(f"the checkpoint compresses {name!r}, which the model "
                                      f"does not have: build the model the way it was built "
                                      f"before compress_")
            why = _fits(cls, entry["args"], names[name])
            if why and entry.get("resized") and "has a weight of" in why:
                why = None  # structured pruning made it smaller before it was compressed
            if why:
                raise CheckpointError(f"{name} {why}: the checkpoint's {entry['class']} does "
                                      f"not fit it")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["args"].items()}
        module = cls(**args, device="meta", dtype=getattr(torch, entry["dtype"]))
        for attr, value in entry.get("attrs", {}).items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        old = names[entry["names"][0]]
        module.train(old.training)
        if "weight_layout" not in entry.get("attrs", {}):  # (a checkpoint from before it)
            _swap.keep_layout(old, module)
        for name in entry["names"]:
            _swap.set_submodule(model, name, module)
    for name in man["identity"]:
        if name not in names:
            raise CheckpointError(f"the checkpoint replaces {name!r} by nn.Identity (a fused "
                                  f"chain), but the model has no module of that name")
        if type(model.get_submodule(name)) is not nn.Identity:
            _swap.set_submodule(model, name, nn.Identity())
    return model


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, attr = key.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    for key, target in aliases.items():
        owner, attr = _owner(model, key)
        src, src_attr = _owner(model, target)
        if attr in owner._parameters and src_attr in src._parameters:
            owner._parameters[attr] = src._parameters[src_attr]
        elif attr in owner._buffers and src_attr in src._buffers:
            owner._buffers[attr] = src._buffers[src_attr]


def load(model: nn.Module | Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """The model saved at ``path`` by :func:`save`, rebuilt from ``model``: the dense model,
    built the way it was built before ``compress_`` (its values are replaced), or a factory
    returning it. Returns the model: same outputs bit for bit, same ``report()``.

    ``CheckpointError`` names the problem: a missing or unexpected tensor, a wrong shape, a
    compressed module's tensor in another dtype, a format record (``_extra_state``) that does
    not fit, an unknown format version, a manifest module the model does not have or that
    does not fit.
    """
    from safetensors import safe_open

    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a factory returning one, got "
                            f"{type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
    with safe_open(str(path), framework="pt") as f:
        man = checked_manifest((f.metadata() or {}).get(METADATA_KEY), path)
        tensors = {k: _aligned(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    return load_into(model, man, tensors)


def load_into(model: nn.Module, man: dict[str, Any],
              tensors: dict[str, torch.Tensor]) -> nn.Module:
    """:func:`load` from a manifest and its tensors already read (the Hugging Face route)."""
    man = checked_manifest(man, "manifest")
    apply_manifest(model, man)
    state = dict(tensors)
    for key, target in man["aliases"].items():
        if target not in state:
            raise CheckpointError(f"alias {key} -> {target}: {target} is not in the file")
        state[key] = state[target]
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not fit the model: "
            + (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
               if unexpected else ""))
    built = tuple(f"{n}." for e in man["modules"] for n in e["names"])  # compressed modules
    for key, value in expected.items():
        if not isinstance(value, torch.Tensor):
            continue
        if tuple(value.shape) != tuple(state[key].shape):
            raise CheckpointError(f"{key}: the checkpoint holds {tuple(state[key].shape)}, the "
                                  f"model {tuple(value.shape)}")
        # a compressed module is built in the manifest's dtype, its packed tensors in theirs:
        # another dtype in the file is a corrupt or foreign checkpoint (a dense layer takes
        # the file's dtype, as load_state_dict(assign=True) does)
        if key.startswith(built) and value.dtype != state[key].dtype:
            raise CheckpointError(f"{key}: the checkpoint holds {state[key].dtype}, the "
                                  f"compressed module {value.dtype}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (ValueError, RuntimeError) as exc:  # (a format record that does not fit)
        raise CheckpointError(f"the checkpoint does not fit the model: {exc}") from exc
    return finish_load(model, man)


def finish_load(model: nn.Module, man: dict[str, Any]) -> nn.Module:
    """After the tensors are in: re-tie the aliases, freeze what was frozen, check that no
    tensor is left on the meta device, restore ``report()``'s notes and the configs."""
    _retie(model, man["aliases"])
    frozen = set(man.get("frozen", []))
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name not in frozen)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"tensors left without values (on the meta device): {left[:8]}")
    _swap.record_notes(model, dict(man.get("notes", {})))
    for sub in model.modules():
        if sub is not model and hasattr(sub, _swap.SKIPPED_ATTR):
            object.__delattr__(sub, _swap.SKIPPED_ATTR)
    object.__setattr__(model, _swap.CONFIGS_ATTR,
                       [config_from_json(c) for c in man.get("configs", [])])
    return model


def same_report(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models' ``report()`` tables are equal (a check for tests and users)."""
    return str(report(a)) == str(report(b))
