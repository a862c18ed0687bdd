"""Graph capture shared by fusion (:mod:`compress_ops.fuse`) and the structured channel analysis
(:mod:`compress_ops.structured`): two ways to read what a model computes.

* :func:`trace` - ``torch.fx`` symbolic tracing, no inputs needed. Every module this package
  builds (:class:`~compress_ops.nn.base.CompressedModule`) is a leaf: its ``forward`` calls one
  op after input checks that branch on shapes and dtypes, which ``fx.symbolic_trace`` cannot
  follow (``symbolically traced variables cannot be used as inputs to control flow``). As a
  leaf it is one ``call_module`` node, so a model compressed in one step can still be fused or
  analysed in the next; the analyses treat a leaf they do not understand as opaque.
* :func:`export` - ``torch.export`` (non-strict) on example inputs: the ATen ops that run, at
  the level of functions, not module classes. It sees through ``Conv2d`` subclasses, wrappers
  (``Conv2dNormActivation``, timm's ``BatchNormAct2d``) and direct ``F.pad`` / ``F.conv2d``
  calls, and through code ``fx.symbolic_trace`` cannot follow (a padding computed from the
  input's size becomes the constant it is at the traced size). Each node records the modules
  whose ``forward`` it ran in (``nn_module_stack``), which is how a match on the graph is
  mapped back to the modules to replace. Compressed modules appear as their custom op.

What ``export`` cannot tell is whether a number it recorded would differ for another input
size: :func:`size_dependent` reads a module's own ``forward`` with ``torch.fx`` to decide that
for the padding and convolution geometry it computes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from compress_ops.nn.base import CompressedModule

__all__ = ["Tracer", "trace", "Captured", "export", "size_dependent"]


class Tracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are torch's own (``torch.nn`` modules) plus every
    :class:`~compress_ops.nn.base.CompressedModule`."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, CompressedModule) or super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace(module)`` with :class:`Tracer`: raises what tracing raises."""
    tracer = Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


@dataclass
class Captured:
    """A model's computation as exported ATen ops.

    ``graph``: the ``torch.export`` graph (placeholders for parameters, buffers and inputs,
    ``call_function`` nodes on ``torch.ops.aten`` and ``torch.ops.compress_ops`` ops).
    ``state``: ``{placeholder name: qualified name}`` of every parameter and buffer the graph
    reads. :meth:`modules_of` gives the module paths a node ran inside, outermost first.
    """

    model: nn.Module
    program: torch.export.ExportedProgram
    state: dict[str, str] = field(default_factory=dict)
    # placeholder name -> the tensor itself, resolved at capture (the model may change later)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    def modules_of(self, node: fx.Node) -> list[str]:
        """The qualified names of the modules whose ``forward`` ran ``node``, outermost first
        (the root model itself is not listed)."""
        stack = node.meta.get("nn_module_stack") or {}
        return [path for path, _ in stack.values() if path]

    def owner(self, node: fx.Node) -> str:
        """The innermost module that ran ``node`` (``""``: the root model's own forward)."""
        mods = self.modules_of(node)
        return mods[-1] if mods else ""

    def nodes_in(self, path: str) -> list[fx.Node]:
        """Every op node that ran inside module ``path`` (any call of it)."""
        return [n for n in self.graph.nodes if n.op == "call_function"
                and path in self.modules_of(n)]

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        """The model's parameter or buffer that placeholder ``node`` stands for, else None."""
        return self.tensors.get(node.name) if isinstance(node, fx.Node) else None

    def placeholder_of(self, tensor: torch.Tensor) -> fx.Node | None:
        """The placeholder that stands for the model's ``tensor``, if the graph reads it."""
        for node in self.graph.nodes:
            if node.op == "placeholder" and self.tensors.get(node.name) is tensor:
                return node
        return None


def export(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None
           ) -> Captured:
    """Capture ``model(*example_inputs, **example_kwargs)`` with ``torch.export`` (non-strict,
    the model's current train/eval mode, the inputs' static shapes). Raises what export raises;
    ``TypeError`` when ``example_inputs`` is not a tuple. The model is not changed.

    A model with ``config.use_cache`` (Hugging Face) is captured with it off: its key/value
    cache object is no output ``torch.export`` can hold, and the layers are the same."""
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of the model's positional inputs, got "
                        f"{type(example_inputs).__name__}")
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    try:
        if cache:
            config.use_cache = False
        program = torch.export.export(model, example_inputs, example_kwargs or {},
                                      strict=False)
    finally:
        if cache:
            config.use_cache = cache
    sig = program.graph_signature
    state = dict(sig.inputs_to_parameters) | dict(sig.inputs_to_buffers)
    tensors = {}
    for node_name, qualified in state.items():
        mod, _, attr = qualified.rpartition(".")
        tensors[node_name] = getattr(model.get_submodule(mod), attr)
    return Captured(model, program, state, tensors)


# The ops whose non-tensor arguments fix the geometry a fusion bakes in.
_GEOMETRY_FUNCTIONS = {"pad", "constant_pad_nd", "conv2d", "convolution", "conv1d", "conv3d"}


def infer_image_input(model: nn.Module) -> tuple[tuple | None, str]:
    """An example input for an image model that states none: ``(x,)`` with ``x`` of shape
    ``[1, C, H, W]``, and where its shape came from; ``(None, why)`` if ``model`` does not run
    on it.

    ``C`` is the first ``Conv2d``'s (any subclass) input channels; ``H, W`` the size the model
    declares (timm's ``pretrained_cfg["input_size"]``, a Hugging Face ``config.image_size``),
    else 224. dtype and device are the first parameter's. The input's values are random
    normal: a capture reads the ops that run, and what depends on the values (data-dependent
    control flow) is refused by the capture itself."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None, "no Conv2d to infer an image input from"
    c, (h, w), source = conv.in_channels, (224, 224), "224 x 224, no size declared"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    hf = getattr(model, "config", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size") or ()) == 3:
        h, w = (int(v) for v in cfg["input_size"][1:])
        source = "timm pretrained_cfg['input_size']"
    elif isinstance(getattr(hf, "image_size", None), (int, tuple, list)):
        size = hf.image_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        source = "config.image_size"
    p = conv.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=gen).to(p.device, p.dtype)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure: the input is not one it takes
        return None, (f"the model does not run on an inferred [1, {c}, {h}, {w}] input "
                      f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})")
    return (x,), f"[1, {c}, {h}, {w}] ({source})"


def _call_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[-1]


def size_dependent(module: nn.Module) -> str | None:
    """Why the padding or convolution geometry ``module``'s own ``forward`` computes may
    depend on its input's size, or None when it provably does not.

    ``torch.nn``'s own modules take theirs from attributes. Any other module's ``forward`` is
    traced with ``torch.fx`` (no values, so nothing computed from an input's shape can become a
    constant): every pad and convolution call in it must take constants and attributes only.
    """
    if type(module).__module__.startswith("torch.nn.") or isinstance(module, CompressedModule):
        return None
    try:
        gm = trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: nothing is proven
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return (f"torch.fx cannot read its forward without running it ({type(exc).__name__}: "
                f"{msg[:120]}), so its padding may depend on the input size")
    for node in gm.graph.nodes:
        if node.op != "call_function" or _call_name(node) not in _GEOMETRY_FUNCTIONS:
            continue
        geometry = list(node.args[1:]) + [v for k, v in node.kwargs.items()
                                          if k not in ("input", "weight", "bias")]
        if _call_name(node) in ("conv2d", "convolution", "conv1d", "conv3d"):
            geometry = list(node.args[3:]) + [v for k, v in node.kwargs.items()
                                              if k not in ("input", "weight", "bias")]
        if any(_reads_inputs(n) for n in _nodes(geometry)):
            return (f"its forward computes the arguments of {_call_name(node)} from its inputs "
                    f"(node {node.name}), so they may depend on the input size")
    return None


def _reads_inputs(node: fx.Node) -> bool:
    """Whether ``node``'s value is computed from the forward's inputs (not only from the
    module's own attributes and constants, e.g. ``self.weight.shape[0]``)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _nodes(args: Iterable) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(list(args), found.append)
    return found


# ------------------------------------------------------------------------------------------
# One vocabulary for the ops a pattern matches, in both dialects
# ------------------------------------------------------------------------------------------

_aten = torch.ops.aten
F = torch.nn.functional

# function -> (kind, its parameter names in order, defaults); kinds: conv2d, batch_norm, pad,
# act:<name> (relu, relu6, hardswish, silu, hardtanh), dropout. ATen overloads and the
# torch-level functions a Dynamo graph calls share one entry each.
_SIGNATURES: dict[object, tuple[str, tuple[str, ...], dict]] = {}


def _sig(kind: str, params: tuple[str, ...], defaults: dict, *targets) -> None:
    for t in targets:
        _SIGNATURES[t] = (kind, params, defaults)


_sig("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
     {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
     _aten.conv2d.default, _aten.conv2d.padding, torch.conv2d)
_sig("batch_norm", ("input", "weight", "bias", "running_mean", "running_var", "training",
                    "momentum", "eps", "cudnn_enabled"),
     {"weight": None, "bias": None, "running_mean": None, "running_var": None},
     _aten.batch_norm.default)
_sig("batch_norm", ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps"),
     {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
     F.batch_norm)
_sig("pad", ("input", "pad", "mode", "value"), {"mode": "constant", "value": None},
     _aten.pad.default, F.pad, torch._C._nn.pad)
_sig("pad", ("input", "pad", "value"), {"value": 0.0}, _aten.constant_pad_nd.default,
     torch.constant_pad_nd)
for _name in ("relu", "hardswish", "silu", "relu6"):
    _fns = [getattr(_aten, _name).default, getattr(F, _name)]
    if hasattr(_aten, _name + "_"):
        _fns.append(getattr(_aten, _name + "_").default)
    if hasattr(torch, _name):
        _fns.append(getattr(torch, _name))
    if hasattr(F, _name + "_"):
        _fns.append(getattr(F, _name + "_"))
    if hasattr(torch, _name + "_"):
        _fns.append(getattr(torch, _name + "_"))
    _sig("act:" + _name, ("input", "inplace"), {"inplace": False}, *_fns)
_sig("act:hardtanh", ("input", "min_val", "max_val", "inplace"),
     {"min_val": -1.0, "max_val": 1.0, "inplace": False},
     _aten.hardtanh.default, _aten.hardtanh_.default, F.hardtanh, F.hardtanh_)
_sig("dropout", ("input", "p", "train"), {}, _aten.dropout.default,
     _aten.feature_dropout.default)
_sig("dropout", ("input", "p", "training", "inplace"),
     {"p": 0.5, "training": True, "inplace": False}, F.dropout, F.dropout2d)


def canonical(node: fx.Node) -> tuple[str, dict] | None:
    """``(kind, {parameter: argument})`` for the ops patterns match, in the ``torch.export``
    ATen dialect and in the torch-level dialect of a Dynamo graph alike, else None. Kinds:
    ``conv2d``, ``batch_norm`` (``training`` named so in both), ``pad`` (``mode``,
    ``value``), ``act:relu|relu6|hardswish|silu|hardtanh``, ``dropout`` (``training``)."""
    if node.op != "call_function":
        return None
    try:
        entry = _SIGNATURES.get(node.target)
    except TypeError:  # an unhashable target
        return None
    if entry is None:
        return None
    kind, params, defaults = entry
    if len(node.args) > len(params) or set(node.kwargs) - set(params):
        return None
    kw = dict(defaults) | dict(zip(params, node.args, strict=False)) | dict(node.kwargs)
    if any(p not in kw for p in params if p not in ("cudnn_enabled", "inplace", "momentum")):
        return None
    if "train" in kw:
        kw["training"] = kw.pop("train")
    if kind == "conv2d":
        for key in ("stride", "dilation") + (() if isinstance(kw["padding"], str)
                                             else ("padding",)):
            v = kw[key]
            kw[key] = [v, v] if isinstance(v, int) else list(v)
    return kind, kw


def example_value(node) -> torch.Tensor | None:
    """The (fake) tensor a node computes, as ``torch.export`` (``val``) or Dynamo
    (``example_value``) records it."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None
