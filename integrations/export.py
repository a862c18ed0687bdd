"""Leaving Python's eager mode: ``torch.export`` programs and AOTInductor packages of compressed
models (``compress_ops.integrations.export``).

A compressed module's forward is one custom op (``compress_ops::dequant_linear``,
``w8a8_linear``, ...), so an exported program holds that op as one node, with the packed
tensors as its inputs: the program keeps the compressed bytes and runs our kernels.

* :func:`export` wraps :func:`torch.export.export`, with the leading (batch) dimension of every
  tensor argument dynamic by default, so one graph serves every batch size.
* :func:`save` writes the ``.pt2`` file with a manifest of the ``compress_ops`` ops its graph
  calls (``extra_files``).
* :func:`load` registers those ops (this module imports ``compress_ops``'s ops first), loads
  the file, and then checks that every ``compress_ops::*`` node resolved to a registered
  operator. An op this build does not have is a :class:`MissingOpError` naming it, never a
  node left holding a string.
* :func:`aoti_package` compiles a program ahead of time with AOTInductor
  (:func:`torch._inductor.aoti_compile_and_package`) into a ``.pt2`` package, and
  :func:`aoti_load` loads one. **Limit:** our ops are Python custom ops
  (``torch.library.custom_op``): the compiled package calls them back through the dispatcher,
  so it runs in a Python process that has imported ``compress_ops`` (which :func:`aoti_load`
  does), not from C++ alone. The aten parts (norms, activations, attention) are compiled.

Shared tensors (a codebook several layers read) stay one input of the program: ``torch.export``
lifts each parameter or buffer once, whatever the number of modules holding it.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers every compress_ops:: op before a load)

__all__ = ["MissingOpError", "export", "save", "load", "aoti_package", "aoti_load",
           "compress_ops_nodes"]

_NAMESPACE = "compress_ops"
_MANIFEST = "compress_ops.json"  # the extra file save() writes next to the program


class MissingOpError(RuntimeError):
    """A saved program calls a ``compress_ops::`` op this build does not register."""


def _op_name(target: object) -> str:
    """``"compress_ops::dequant_linear"`` of an op overload, a packet or the string a loader
    left; ``""`` for anything else."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ns, _, rest = target.name().partition("::")
        return f"{ns}::{rest.split('.')[0]}" if ns == _NAMESPACE else ""
    text = str(target)
    for prefix in (f"torch.ops.{_NAMESPACE}.", f"{_NAMESPACE}."):
        if text.startswith(prefix):
            return f"{_NAMESPACE}::{text[len(prefix):].split('.')[0]}"
    return ""


def compress_ops_nodes(ep: torch.export.ExportedProgram) -> list[str]:
    """The ``compress_ops::`` op of every call node of ``ep``'s graph, in graph order."""
    return [name for node in ep.graph.nodes if node.op == "call_function"
            for name in [_op_name(node.target)] if name]


def _batch_shapes(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``dynamic_shapes`` for ``(args, kwargs)``: dimension 0 of every tensor of rank >= 1
    dynamic (``Dim.DYNAMIC``: the exporter picks its range, and keeps it static, with no
    error, where the model does need a fixed size), everything else static."""

    def spec(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return {0: torch.export.Dim.DYNAMIC} if v.dim() >= 1 else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(e) for e in v)
        if isinstance(v, dict):
            return {k: spec(e) for k, e in v.items()}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def export(model: nn.Module, args: Sequence[Any] | torch.Tensor, kwargs: dict | None = None, *,
           dynamic_batch: bool = True, strict: bool = False) -> torch.export.ExportedProgram:
    """The :class:`torch.export.ExportedProgram` of ``model`` on ``args`` (a tensor or a tuple)
    and ``kwargs``, each compressed module one ``compress_ops::`` node. ``dynamic_batch``:
    dimension 0 of every tensor input is symbolic (one graph for any batch size).
    ``strict``: :func:`torch.export.export`'s tracing mode (non-strict by default).

    ``TypeError`` if ``model`` is not an ``nn.Module``. (Tucker-2 convs,
    ``LowRankConv2d``, are three aten convolutions: no op of ours.)"""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export needs an nn.Module, got {type(model).__name__}")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    kwargs = dict(kwargs or {})
    from compress_ops.nn.base import CompressedModule

    if isinstance(model, CompressedModule):
        model = _root(model)  # its tensors' names must not meet the program module's own
    shapes = _batch_shapes(args, kwargs) if dynamic_batch else None
    if shapes is not None and kwargs:
        names = _arg_names(model, len(args))
        shapes = {**dict(zip(names, shapes[0], strict=True)), **shapes[1]}
    elif shapes is not None:
        shapes = shapes[0]
    return torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes,
                               strict=strict)


def _arg_names(model: nn.Module, n: int) -> list[str]:
    return list(inspect.signature(model.forward).parameters)[:n]


def _root(module: nn.Module) -> nn.Module:
    """A compressed module exported on its own, one level down (``module.``): the program's
    module is a ``GraphModule``, whose ``meta`` (say) a 2:4 layer's ``meta`` buffer would meet
    at the root. The wrapper's forward has the module's own signature (keyword inputs)."""
    sig = inspect.signature(module.forward)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    root = type(f"Exported{type(module).__name__}", (nn.Module,), {"forward": forward})()
    root.module = module
    return root


def save(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """Write ``ep`` to ``path`` (:func:`torch.export.save`), with a manifest of the
    ``compress_ops`` ops it calls and the torch version that wrote it."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"save needs an ExportedProgram (from export()), got "
                        f"{type(ep).__name__}")
    manifest = {"ops": sorted(set(compress_ops_nodes(ep))), "torch": torch.__version__}
    torch.export.save(ep, path, extra_files={_MANIFEST: json.dumps(manifest)})


def _missing(names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        ns, _, op = name.partition("::")
        if not hasattr(getattr(torch.ops, ns), op):
            out.append(name)
    return out


def load(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """The program :func:`save` wrote, with every ``compress_ops::`` node resolved to a
    registered op (``MissingOpError`` naming the ops this build lacks; ``FileNotFoundError``
    for a missing file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no exported program at {os.fspath(path)!r}")
    extra = {_MANIFEST: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # the loader names no op: read the manifest we wrote
        listed = _manifest_ops(path)
        missing = _missing(listed)
        if missing:
            raise MissingOpError(f"{os.fspath(path)!r} calls {', '.join(missing)}, which this "
                                 f"build of compress_ops does not register (it was exported "
                                 f"by a build that had them)") from exc
        raise
    unresolved = sorted({_op_name(n.target) or str(n.target) for n in ep.graph.nodes
                         if n.op == "call_function"
                         and not isinstance(n.target, torch._ops.OpOverload)
                         and _op_name(n.target)})
    listed = json.loads(extra[_MANIFEST])["ops"] if extra[_MANIFEST] else []
    unresolved += [m for m in _missing(listed) if m not in unresolved]
    if unresolved:
        raise MissingOpError(f"{os.fspath(path)!r}: {', '.join(unresolved)} did not resolve "
                             f"to a registered operator")
    return ep


def _manifest_ops(path: str | os.PathLike) -> list[str]:
    """The ops listed in the manifest of the ``.pt2`` archive at ``path`` ([] if none)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(f"extra/{_MANIFEST}") or name.endswith(f"/{_MANIFEST}"):
                    return json.loads(z.read(name))["ops"]
    except (zipfile.BadZipFile, KeyError, ValueError):
        return []
    return []


def aoti_package(model: nn.Module | torch.export.ExportedProgram, args: Sequence[Any] | None,
                 path: str | os.PathLike, *, dynamic_batch: bool = True) -> str:
    """Compile ``model`` (exported first on ``args``, or an :class:`ExportedProgram`) ahead of
    time with AOTInductor into the package ``path`` (``.pt2``); returns the path.

    The package's compiled code calls our Python custom ops back through the dispatcher: load
    and run it in a process that imported ``compress_ops`` (:func:`aoti_load`). It compiles
    for the device of the program's tensors (a C++ compiler for the CPU)."""
    ep = model if isinstance(model, torch.export.ExportedProgram) else export(
        model, args if args is not None else (), dynamic_batch=dynamic_batch)
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"an AOTInductor package path ends in .pt2, got {path!r}")
    return torch._inductor.aoti_compile_and_package(ep, package_path=path)


def aoti_load(path: str | os.PathLike) -> Callable[..., Any]:
    """The callable of the AOTInductor package at ``path`` (our ops registered first)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no AOTInductor package at {os.fspath(path)!r}")
    return torch._inductor.aoti_load_package(os.fspath(path))
