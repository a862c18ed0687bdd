"""The channel analysis: which output channels of which layers can be removed together, read
from a ``torch.fx`` trace of the model plus shape propagation (:func:`channel_groups`)."""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from compress_ops._linear import LINEAR_TYPES, is_conv1d, oriented
from compress_ops._validate import is_number
from compress_ops.capture import canonical
from compress_ops.capture import export as capture_export
from compress_ops.capture import trace as capture_trace
from compress_ops.nn.base import CompressedModule
from compress_ops.structured.heads import head_groups

__all__ = ["ChannelGroup", "UncapturableModel", "channel_groups", "zero_pads", "widths_agree"]

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Tanh, nn.Sigmoid)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# functional pooling -> its parameters after the input, in order
_POOL_FUNCTIONS = {
    F.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                   "return_indices"),
    F.avg_pool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
    F.adaptive_avg_pool2d: ("output_size",),
    F.adaptive_max_pool2d: ("output_size", "return_indices"),
}
_ACT_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish,
                  F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh, torch.tanh,
                  F.tanh, torch.sigmoid, F.sigmoid,
                  torch.pow}  # (x ** a number: elementwise; a tensor exponent is refused)
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "pow"}
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_ADD_FUNCTIONS = {operator.add: 1, operator.iadd: 1, torch.add: 1, operator.sub: -1,
                  operator.isub: -1, torch.sub: -1}
_ADD_METHODS = {"add": 1, "add_": 1, "sub": -1, "sub_": -1}
_SCALE_FUNCTIONS = {operator.mul: operator.mul, operator.imul: operator.mul,
                    torch.mul: operator.mul, operator.truediv: operator.truediv,
                    operator.itruediv: operator.truediv, torch.div: operator.truediv}
_SCALE_METHODS = {"mul": operator.mul, "mul_": operator.mul, "div": operator.truediv,
                  "div_": operator.truediv}
_BENIGN_ATTRS = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_PAD_FUNCTIONS = {F.pad, torch._C._nn.pad}


@dataclass
class ChannelGroup:
    """A set of channels that must be kept/removed together.

    ``producers`` define the channels with their output rows / channels, ``consumers`` read
    them with their input columns / channels (``columns[name]`` columns per channel: ``H*W``
    for a Linear after a flattened ``[B, C, H, W]``, else 1), ``norms`` and ``depthwise`` lie on
    the path and are sliced channel by channel. ``width`` is the current number of channels.
    """

    producers: list[str]
    consumers: list[str]
    norms: list[str]
    width: int
    depthwise: list[str] = field(default_factory=list)
    columns: dict[str, int] = field(default_factory=dict)
    # The path's per-channel value program, in graph order (used for exact dead-channel removal).
    steps: list[tuple] = field(default_factory=list, repr=False, compare=False)
    # "channel", or "head": one unit is an attention head (a key/value head with the query
    # heads that read it), ``rows[name]`` consecutive output rows of each producer
    # (:mod:`compress_ops.structured.heads`); a head is never "dead" (no exact removal)
    unit: str = "channel"
    rows: dict[str, int] = field(default_factory=dict)
    # a fused producer (q, k, v in one projection, split): ``(offset, rows per unit)`` of each
    # chunk of its output; unit ``u`` is rows ``offset + u * r .. offset + (u + 1) * r - 1`` of
    # every chunk (``rows[name]`` is their sum)
    chunks: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # ``{module name: {int attribute: value per unit}}``: sizes the forward reads (a fused
    # attention's ``split_size``, head counts), set to ``width * value`` when pruned
    attrs: dict[str, dict[str, int]] = field(default_factory=dict)


class _Tag(NamedTuple):
    """A tensor carrying channels of ``space``: along dim ``cdim``, each channel occupying
    ``rep`` consecutive entries (``rep > 1`` after flattening ``[C, H, W]``)."""

    space: int
    cdim: int
    rep: int


def _is_producer(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)


def _is_depthwise(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def zero_pads(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` pads its input with zeros (then a constant input is not constant at the
    borders of the output)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(*args) -> list[fx.Node]:
    found: list[fx.Node] = []
    for a in args:
        fx.node.map_arg(a, found.append)
    return found


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch") and not mod.startswith("torch.nn"):
        return f"torch.{name}"
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"F.{name}"
    return name


def _inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_")
    t = node.target
    if getattr(t, "__name__", "").endswith("_") or t in (operator.iadd, operator.isub,
                                                           operator.imul, operator.itruediv):
        return True
    try:
        return bool(inspect.signature(t).bind(*node.args, **node.kwargs).arguments
                    .get("inplace", False))
    except (TypeError, ValueError):
        return False


class _Analysis:
    """Walks the traced graph once, tagging channel-carrying tensors and recording facts."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.parent: list[int] = []
        self.facts: list[tuple[int, str, object]] = []
        self.steps: list[tuple[int, tuple]] = []
        self.tags: dict[fx.Node, _Tag] = {}

    # union-find over channel spaces
    def new_space(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def poison(self, nodes, reason: str) -> None:
        for n in nodes:
            self.facts.append((self.tags[n].space, "poison", reason))

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            ins = list(dict.fromkeys(a for a in _nodes_in(node.args, node.kwargs)
                                     if a in self.tags))
            if node.op == "call_module":
                self.module(node, ins)
            elif node.op in ("call_function", "call_method") and ins:
                self.function(node, ins)
            elif node.op == "output" and ins:
                self.poison(ins, "they reach the model output (its width is the model's "
                                 "contract)")
            elif ins:
                self.poison(ins, f"they reach a {node.op} node ({node.name})")

    # ------------------------------------------------------------------ call_module
    def module(self, node: fx.Node, ins: list[fx.Node]) -> None:
        name = node.target
        m = self.model.get_submodule(name)
        if ins and (len(ins) > 1 or node.args != (ins[0],) or node.kwargs):
            self.poison(ins, f"they are passed to {name} ({type(m).__name__}) with other "
                             f"arguments")
            return
        tin = self.tags[ins[0]] if ins else None
        in_shape = _shape(ins[0]) if ins else None
        out_shape = _shape(node)
        lifted = node.meta.get("lifted")  # an exported op proven to be this module's own call
        if lifted is not None:
            producer = lifted == "linear" or (lifted == "conv" and m.groups == 1)
            depthwise = lifted == "conv" and m.groups > 1 and \
                m.groups == m.in_channels == m.out_channels
            norm = lifted == "bn"
        else:
            producer, depthwise = _is_producer(m), _is_depthwise(m)
            norm = type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)
        if producer:
            if tin is not None:
                self.consume(ins[0], tin, name, m, in_shape)
            if out_shape is None:
                return
            s = self.new_space()
            cdim = len(out_shape) - (1 if isinstance(m, LINEAR_TYPES) else 3)
            self.tags[node] = _Tag(s, cdim, 1)
            self.facts.append((s, "producer", name))
            self.steps.append((s, ("src", node.name, [], name)))
            return
        if tin is None:
            return
        kind = type(m).__name__
        nd = len(in_shape) if in_shape is not None else -1
        if depthwise:
            if tin.rep != 1 or tin.cdim != nd - 3:
                self.poison(ins, f"depthwise conv {name} reads them along another dim")
                return
            self.facts.append((tin.space, "depthwise", name))
            self.step(node, tin, "dw", [ins[0]], name)
        elif norm:
            if tin.rep != 1 or tin.cdim != 1:
                self.poison(ins, f"{kind} {name} normalizes a dim that is not their channel dim")
                return
            self.facts.append((tin.space, "norm", name))
            self.step(node, tin, "bn", [ins[0]], name)
        elif type(m) in _ACT_MODULES or type(m) in _IDENTITY_MODULES:
            if getattr(m, "inplace", False) and len(ins[0].users) > 1:
                self.poison(ins, f"in-place {kind} {name} changes a tensor that is also read "
                                 f"elsewhere")
                return
            fn = None if type(m) in _IDENTITY_MODULES else m
            self.step(node, tin, "fn", [ins[0]], fn)
        elif type(m) in _POOL_MODULES:
            if tin.rep != 1 or tin.cdim != nd - 3 or getattr(m, "return_indices", False):
                self.poison(ins, f"{kind} {name} does not pool them channel by channel")
                return
            border = isinstance(m, nn.AvgPool2d) and (
                m.divisor_override is not None
                or (m.count_include_pad and any(p > 0 for p in _pair(m.padding))))
            self.step(node, tin, "border" if border else "fn", [ins[0]], None)
        elif type(m) is nn.Flatten:
            self.flatten(node, ins[0], tin, m.start_dim, m.end_dim)
        elif isinstance(m, nn.Conv2d):
            self.poison(ins, f"they pass through {name}, a {kind} with groups={m.groups}, which "
                             f"mixes channels in groups")
        else:
            self.poison(ins, f"they pass through {name} ({kind}), which the channel analysis "
                             f"does not understand")

    def consume(self, src: fx.Node, tin: _Tag, name: str, m: nn.Module, in_shape) -> None:
        nd = len(in_shape) if in_shape is not None else -1
        if isinstance(m, LINEAR_TYPES):
            ok = tin.cdim == nd - 1
        else:
            ok = tin.rep == 1 and tin.cdim == nd - 3
        if not ok:
            self.poison([src], f"{name} ({type(m).__name__}) reads them along a dim that is "
                               f"not its input-channel dim")
            return
        self.facts.append((tin.space, "consumer", (name, tin.rep)))
        self.steps.append((tin.space, ("read", None, [src.name], name)))

    def step(self, node: fx.Node, tag: _Tag, kind: str, srcs: list[fx.Node], payload) -> None:
        self.tags[node] = tag
        self.steps.append((tag.space, (kind, node.name, [s.name for s in srcs], payload)))

    # ------------------------------------------------------------------ functions / methods
    def function(self, node: fx.Node, ins: list[fx.Node]) -> None:
        t, op = node.target, _op_name(node)
        tin = self.tags[ins[0]]
        is_fn = node.op == "call_function"
        others = [a for a in _nodes_in(node.args, node.kwargs) if a is not ins[0]]
        first = bool(node.args) and node.args[0] is ins[0]
        if (is_fn and t in _ADD_FUNCTIONS) or (not is_fn and t in _ADD_METHODS):
            self.add(node, ins, _ADD_FUNCTIONS[t] if is_fn else _ADD_METHODS[t], op)
            return
        if (is_fn and t in _SCALE_FUNCTIONS) or (not is_fn and t in _SCALE_METHODS):
            f = _SCALE_FUNCTIONS[t] if is_fn else _SCALE_METHODS[t]
            a = node.args[:2]
            if f is operator.mul and len(ins) == 2 and len(node.args) == 2 and not node.kwargs \
                    and set(node.args) == set(ins):
                self.product(node, ins, op)  # gate * up: two channel tensors, one group
                return
            if len(node.args) == 2 and not node.kwargs and not others and (
                    (first and is_number(a[1])) or (f is operator.mul and is_number(a[0]))):
                if self.inplace_guard(node, ins):
                    self.step(node, tin, "fn", [ins[0]], _scalar_fn(f, a[0], a[1], first))
                return
            self.poison(ins, f"{op} (node {node.name}) multiplies them by a tensor")
            return
        if (is_fn and t is torch.reshape) or (not is_fn and t in ("view", "reshape")):
            if len(ins) == 1 and first and all(_shape(o) is None for o in others):
                self.view(node, ins[0], tin, op)
            else:
                self.poison(ins, f"{op} (node {node.name}) reshapes with a tensor argument")
            return
        if len(ins) > 1 or others or not first:
            self.poison(ins, f"{op} (node {node.name}) combines them with another tensor, "
                             f"which the channel analysis does not understand")
            return
        if (is_fn and t in _ACT_FUNCTIONS) or (not is_fn and t in _ACT_METHODS):
            if self.inplace_guard(node, ins):
                rest, kw = node.args[1:], dict(node.kwargs)
                fn = (_call(t, rest, kw) if is_fn else _method(t, rest, kw))
                self.step(node, tin, "fn", [ins[0]], fn)
        elif (is_fn and t in _IDENTITY_FUNCTIONS) or (not is_fn and t in _IDENTITY_METHODS):
            if self.inplace_guard(node, ins):
                self.step(node, tin, "fn", [ins[0]], None)
        elif (is_fn and t is torch.flatten) or (not is_fn and t == "flatten"):
            try:
                bound = inspect.signature(_flatten_sig).bind(*node.args, **node.kwargs)
            except TypeError:
                self.poison(ins, f"{op} (node {node.name}) has unexpected arguments")
                return
            bound.apply_defaults()
            self.flatten(node, ins[0], tin, bound.arguments["start_dim"],
                         bound.arguments["end_dim"])
        elif (is_fn and t is torch.mean) or (not is_fn and t == "mean"):
            self.mean(node, ins[0], tin, op)
        elif is_fn and t in _POOL_FUNCTIONS:
            nd = len(_shape(ins[0]) or ())
            params = _POOL_FUNCTIONS[t]
            got = dict(zip(params, node.args[1:], strict=False)) | dict(node.kwargs)
            if tin.rep != 1 or tin.cdim != nd - 3 or got.get("return_indices", False):
                self.poison(ins, f"{op} (node {node.name}) does not pool them channel by "
                                 f"channel")
                return
            # average pooling that divides by a count including zero padding (or by a fixed
            # divisor) does not keep a constant channel constant at the border
            border = t is F.avg_pool2d and (
                got.get("divisor_override") is not None
                or (got.get("count_include_pad", True)
                    and any(p > 0 for p in _pair(got.get("padding", 0)))))
            self.step(node, tin, "border" if border else "fn", [ins[0]], None)
        elif is_fn and t in _PAD_FUNCTIONS:
            self.pad(node, ins[0], tin, op)
        elif not is_fn and t == "size":
            self.size(node, ins[0], tin, op)
        elif not is_fn and t == "dim":
            pass
        elif is_fn and t is getattr and len(node.args) == 2:
            attr = node.args[1]
            if attr == "shape":
                self.shape_users(node, ins[0], tin, "x.shape")
            elif attr not in _BENIGN_ATTRS:
                self.poison(ins, f"attribute .{attr} of them is read (node {node.name})")
        else:
            self.poison(ins, f"they reach {op} (node {node.name}), which the channel analysis "
                             f"does not understand")

    def inplace_guard(self, node: fx.Node, ins: list[fx.Node]) -> bool:
        if _inplace(node) and len(ins[0].users) > 1:
            self.poison(ins, f"in-place {_op_name(node)} (node {node.name}) changes a tensor "
                             f"that is also read elsewhere")
            return False
        return True

    def add(self, node: fx.Node, ins: list[fx.Node], sign: int, op: str) -> None:
        args, kw = list(node.args), dict(node.kwargs)
        if len(args) == 1 and "other" in kw:
            args.append(kw.pop("other"))
        alpha = kw.pop("alpha", 1)
        if len(args) != 2 or kw or not is_number(alpha):
            self.poison(ins, f"{op} (node {node.name}) has unsupported arguments")
            return
        a, b = args
        if not self.inplace_guard(node, ins):
            return
        coef = (1, sign * alpha)
        tagged = [x for x in (a, b) if isinstance(x, fx.Node) and x in self.tags]
        untagged = [x for x in (a, b) if isinstance(x, fx.Node) and x not in self.tags]
        if untagged:
            self.poison(ins, f"{op} (node {node.name}) adds them to {untagged[0].name}, a "
                             f"tensor whose channels are not those of prunable layers (e.g. the "
                             f"model input, or the result of an op not understood)")
            return
        if len(tagged) == 2:
            ta, tb = self.tags[a], self.tags[b]
            if _shape(a) is None or _shape(a) != _shape(b) or (ta.cdim, ta.rep) != (tb.cdim,
                                                                                   tb.rep):
                self.poison(ins, f"{op} (node {node.name}) adds tensors of different shapes or "
                                 f"channel layouts")
                return
            self.union(ta.space, tb.space)
            self.step(node, ta, "sum", [a, b], coef)
            return
        x = tagged[0]
        other = b if x is a else a
        if not is_number(other):
            self.poison(ins, f"{op} (node {node.name}) adds a non-number {type(other).__name__}")
            return
        if x is a:
            fn = _affine(1.0, float(coef[1]) * other)
        else:
            fn = _affine(float(coef[1]), float(other))
        self.step(node, self.tags[x], "fn", [x], fn)

    def product(self, node: fx.Node, ins: list[fx.Node], op: str) -> None:
        a, b = node.args
        ta, tb = self.tags[a], self.tags[b]
        if not self.inplace_guard(node, ins):
            return
        sa, sb = _shape(a), _shape(b)
        # channel by channel: the same channel dim and width; other dims equal or broadcast
        # from 1 (squeeze-excite: x [B, C, H, W] * gate [B, C, 1, 1])
        if sa is None or sb is None or len(sa) != len(sb) or (ta.cdim, ta.rep) != (tb.cdim,
                                                                                   tb.rep) \
                or ta.rep != 1 or sa[ta.cdim] != sb[ta.cdim] \
                or any(p != q and 1 not in (p, q) for p, q in zip(sa, sb, strict=True)):
            self.poison(ins, f"{op} (node {node.name}) multiplies tensors of different shapes "
                             f"or channel layouts")
            return
        self.union(ta.space, tb.space)
        self.step(node, ta, "prod", [a, b], None)

    def pad(self, node: fx.Node, src: fx.Node, tin: _Tag, op: str) -> None:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        nd = len(_shape(src) or ())
        if not isinstance(pads, (list, tuple)) or not all(isinstance(p, int) for p in pads) \
                or mode != "constant" or value not in (None, 0, 0.0) \
                or len(pads) > 2 * (nd - 1 - tin.cdim) or tin.rep != 1:
            self.poison([src], f"{op} (node {node.name}) pads their channel dim, or not with "
                               f"zeros")
            return
        # zero padding: a constant channel stays constant only where it was zero
        self.step(node, tin, "border", [src], None)

    def flatten(self, node: fx.Node, src: fx.Node, tin: _Tag, start, end) -> None:
        shape = _shape(src)
        if shape is None or not isinstance(start, int) or not isinstance(end, int):
            self.poison([src], f"flatten (node {node.name}) with unknown shape or dims")
            return
        nd = len(shape)
        start, end = start % max(nd, 1), end % max(nd, 1)
        if tin.cdim < start:
            self.step(node, tin, "fn", [src], None)
        elif tin.cdim > end:
            self.step(node, tin._replace(cdim=tin.cdim - (end - start)), "fn", [src], None)
        elif start == tin.cdim:
            rep = tin.rep * math.prod(shape[tin.cdim + 1:end + 1])
            self.step(node, tin._replace(rep=rep), "fn", [src], None)
        else:
            self.poison([src], f"flatten (node {node.name}) merges their channel dim with the "
                               f"dims before it")

    def view(self, node: fx.Node, src: fx.Node, tin: _Tag, op: str) -> None:
        rest = list(node.args[1:]) or list(node.kwargs.values())
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            rest = list(rest[0])
        shape, out = _shape(src), _shape(node)
        c = tin.cdim
        if (shape is not None and out is not None and len(rest) == c + 1 == len(out)
                and isinstance(rest[-1], int) and rest[-1] == -1 and out[:c] == shape[:c]):
            self.step(node, tin._replace(rep=tin.rep * math.prod(shape[c + 1:])), "fn", [src],
                      None)
            return
        self.poison([src], f"{op} (node {node.name}) to shape {out}: only flattening from the "
                           f"channel dim, x.view(x.size(0), -1), is understood")

    def mean(self, node: fx.Node, src: fx.Node, tin: _Tag, op: str) -> None:
        args, kw = list(node.args[1:]), dict(node.kwargs)
        dims = args[0] if args else kw.get("dim")
        keep = args[1] if len(args) > 1 else kw.get("keepdim", False)
        nd = len(_shape(src) or ())
        if isinstance(dims, int):
            dims = (dims,)
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims) \
                or nd == 0 or set(kw) - {"dim", "keepdim"} or len(args) > 2:
            self.poison([src], f"{op} (node {node.name}) reduces over all dims or has "
                               f"unsupported arguments")
            return
        dims = {d % nd for d in dims}
        if tin.cdim in dims:
            self.poison([src], f"{op} (node {node.name}) reduces over their channel dim")
            return
        cdim = tin.cdim if keep else tin.cdim - sum(d < tin.cdim for d in dims)
        self.step(node, tin._replace(cdim=cdim), "fn", [src], None)

    def size(self, node: fx.Node, src: fx.Node, tin: _Tag, op: str) -> None:
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if d is None:
            self.shape_users(node, src, tin, "x.size()")
        elif not isinstance(d, int) or d % len(_shape(src) or (1,)) == tin.cdim:
            self.poison([src], f"{op} (node {node.name}) reads their number of channels")

    def shape_users(self, node: fx.Node, src: fx.Node, tin: _Tag, what: str) -> None:
        nd = len(_shape(src) or ())
        for u in node.users:
            if not (u.op == "call_function" and u.target is operator.getitem
                    and isinstance(u.args[1], int) and nd and u.args[1] % nd != tin.cdim):
                self.poison([src], f"{what} (node {node.name}) is used in a way that may read "
                                   f"their number of channels")
                return


def _flatten_sig(input, start_dim=0, end_dim=-1):
    pass


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _affine(scale: float, shift: float) -> Callable:
    return lambda v: v * scale + shift


def _scalar_fn(f: Callable, a, b, tensor_first: bool) -> Callable:
    return (lambda v: f(v, b)) if tensor_first else (lambda v: f(a, v))


def _call(fn: Callable, rest: tuple, kw: dict) -> Callable:
    return lambda v: fn(v, *rest, **kw)


def _method(name: str, rest: tuple, kw: dict) -> Callable:
    return lambda v: getattr(v, name)(*rest, **kw)


# ---------------------------------------------------------------------- channel_groups


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (*LINEAR_TYPES, nn.Conv2d, CompressedModule))}


# ---------------------------------------------------------------------- the exported graph

_A = torch.ops.aten


# ATen op -> the torch-level callable the analysis reads, taking the same arguments in the same
# order (the analysis also calls it on per-channel constants)
_ATEN_AS: dict = {
    _A.relu.default: F.relu, _A.relu_.default: F.relu_, _A.gelu.default: F.gelu,
    _A.silu.default: F.silu, _A.hardswish.default: F.hardswish,
    _A.hardsigmoid.default: F.hardsigmoid, _A.hardtanh.default: F.hardtanh,
    _A.sigmoid.default: torch.sigmoid, _A.tanh.default: torch.tanh,
    _A.leaky_relu.default: F.leaky_relu, _A.mish.default: F.mish,
    _A.softplus.default: F.softplus, _A.pow.Tensor_Scalar: torch.pow,
    _A.add.Tensor: torch.add, _A.sub.Tensor: torch.sub, _A.mul.Tensor: torch.mul,
    _A.div.Tensor: torch.div, _A.add_.Tensor: operator.iadd, _A.mul_.Tensor: operator.imul,
    _A.reshape.default: torch.reshape, _A.flatten.using_ints: torch.flatten,
    _A.mean.dim: torch.mean, _A.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    _A.max_pool2d.default: F.max_pool2d, _A.avg_pool2d.default: F.avg_pool2d,
    _A.dropout.default: F.dropout, _A.pad.default: F.pad,
}
_ATEN_METHODS = {_A.view.default: "view", _A.clone.default: "clone"}
_ATEN_INPLACE_AS = {_A.silu_.default: F.silu, _A.hardswish_.default: F.hardswish,
                    _A.hardtanh_.default: F.hardtanh, _A.dropout_.default: F.dropout}
_ATEN_DROP = ("_assert", "sym_constrain")  # checks with no value: not part of the data flow


class _Meta(NamedTuple):
    shape: tuple


def _owner_attr(cap, node) -> tuple[str, str] | None:
    qualified = cap.state.get(node.name) if isinstance(node, fx.Node) else None
    if qualified is None:
        return None
    mod, _, attr = qualified.rpartition(".")
    return mod, attr


def _own_call(model: nn.Module, cap, node: fx.Node) -> tuple[str, str] | None:
    """``(module name, "linear" | "conv" | "bn")`` when exported op ``node`` is exactly what
    that module's own ``forward`` computes with its own tensors and attributes."""
    kw: dict = {}
    if node.target is _A.linear.default:
        names = ("input", "weight", "bias")
        kw = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        kind, cls = "linear", nn.Linear
    else:
        c = canonical(node)
        if c is None or c[0] not in ("conv2d", "batch_norm"):
            return None
        kind, kw = ("conv", c[1]) if c[0] == "conv2d" else ("bn", c[1])
        cls = nn.Conv2d if kind == "conv" else (nn.BatchNorm1d, nn.BatchNorm2d)
    owner = _owner_attr(cap, kw.get("weight" if kind != "bn" else "running_mean"))
    if owner is None:
        return None
    name = owner[0]
    m = model.get_submodule(name)
    if not isinstance(m, cls):
        return None
    slots = ("weight", "bias") if kind != "bn" else ("weight", "bias", "running_mean",
                                                    "running_var")
    for slot in slots:
        arg = kw.get(slot)
        mine = getattr(m, slot, None)
        if (arg is None) != (mine is None):
            return None
        if arg is not None and _owner_attr(cap, arg) != (name, slot):
            return None
    if kind == "conv":
        pad = kw["padding"]
        mine = m.padding if isinstance(m.padding, str) else list(m.padding)
        if m.padding_mode != "zeros" or list(kw["stride"]) != list(m.stride) \
                or list(kw["dilation"]) != list(m.dilation) or kw["groups"] != m.groups \
                or (list(pad) if not isinstance(pad, str) else pad) != mine:
            return None
    if kind == "bn" and float(kw["eps"]) != float(m.eps):
        return None
    return name, kind


def _conv1d_calls(model: nn.Module, cap) -> tuple[dict, set, dict]:
    """Hugging Face ``Conv1D`` calls in the exported graph: ``view(x, [-1, in])`` ->
    ``addmm(bias, ., weight)`` -> ``view(., [..., out])`` with the module's own tensors.
    Returns ``{addmm: (module name, x)}``, the input views read only by such a call (left
    out) and ``{final view: addmm}`` (the call's output)."""
    calls: dict = {}
    dropped: set = set()
    same: dict = {}
    views = (_A.view.default, _A._unsafe_view.default, _A.reshape.default)
    for node in cap.graph.nodes:
        if node.op != "call_function" or node.target is not _A.addmm.default \
                or len(node.args) != 3 or node.kwargs:
            continue
        bias, flat, weight = node.args
        owner = _owner_attr(cap, weight)
        if owner is None or owner[1] != "weight" or _owner_attr(cap, bias) != (owner[0],
                                                                              "bias"):
            continue
        m = model.get_submodule(owner[0])
        if not is_conv1d(m, exact=True) or not isinstance(flat, fx.Node) \
                or flat.target not in views:
            continue
        x = flat.args[0]
        xv, ov = x.meta.get("val") if isinstance(x, fx.Node) else None, None
        users = list(node.users)
        if len(users) == 1 and users[0].target in views:
            ov = users[0].meta.get("val")
        if not isinstance(xv, torch.Tensor) or not isinstance(ov, torch.Tensor) \
                or tuple(ov.shape) != (*xv.shape[:-1], m.weight.shape[1]) \
                or xv.shape[-1] != m.weight.shape[0]:
            continue
        calls[node] = (owner[0], x)
        same[users[0]] = node
        if len(flat.users) == 1:
            dropped.add(flat)
    return calls, dropped, same


def _lift(model: nn.Module, cap) -> tuple[fx.GraphModule, set[str]]:
    """The exported ATen graph in the vocabulary the analysis reads: each op proven to be a
    Linear / Conv2d / BatchNorm module's own call becomes a ``call_module`` of it (whatever its
    class: a ``Conv2d`` subclass that pads first is a pad and then this), other ops their
    ``torch`` / ``F`` equivalents, a parameter read any other way a ``get_attr`` (so the owner
    is listed), and unknown ops stay as they are (the analysis stops at them). Shapes come from
    the export."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, fx.Node] = {}
    lifted: set[str] = set()
    conv1d, dropped, same = _conv1d_calls(model, cap)

    def arg(a):
        def one(n: fx.Node) -> fx.Node:
            if n.name in cap.state:
                if n.name not in attrs:
                    attrs[n.name] = g.get_attr(cap.state[n.name])
                    t = cap.tensors[n.name]
                    attrs[n.name].meta["tensor_meta"] = _Meta(tuple(t.shape))
                return attrs[n.name]
            return env[n]
        return fx.node.map_arg(a, one)

    for node in cap.graph.nodes:
        if node.op == "placeholder":
            if node.name not in cap.state:
                env[node] = g.placeholder(node.name)
        elif node.op == "output":
            g.output(arg(node.args[0]))
            continue
        elif node.op == "call_function":
            t = node.target
            name = getattr(t, "__name__", "")
            own = _own_call(model, cap, node)
            if name.startswith(_ATEN_DROP) or node in dropped:
                continue
            if node in same:  # a Conv1D's final view: its call's output
                env[node] = env[same[node]]
            elif node in conv1d:
                env[node] = g.call_module(conv1d[node][0], (arg(conv1d[node][1]),))
                env[node].meta["lifted"] = "linear"
                lifted.add(conv1d[node][0])
            elif own is not None:
                env[node] = g.call_module(own[0], (arg(node.args[0]),))
                env[node].meta["lifted"] = own[1]
                lifted.add(own[0])
            elif t in _ATEN_METHODS:
                env[node] = g.call_method(_ATEN_METHODS[t], arg(node.args), arg(node.kwargs))
            elif t in _ATEN_INPLACE_AS:
                env[node] = g.call_function(_ATEN_INPLACE_AS[t], arg(node.args),
                                            arg(node.kwargs) | {"inplace": True})
            elif t in _ATEN_AS:
                env[node] = g.call_function(_ATEN_AS[t], arg(node.args), arg(node.kwargs))
            else:
                env[node] = g.call_function(t, arg(node.args), arg(node.kwargs))
        else:
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and node in env:
            env[node].meta["tensor_meta"] = _Meta(tuple(v.shape))
    return fx.GraphModule(model, g), lifted


def _propagate(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple) -> None:
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()  # shape propagation must not update BatchNorm running statistics
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise ValueError(f"running the traced model on example_inputs failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for m, t in flags.items():
            m.training = t


def _module_problems(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """``{module name: reason}`` for modules whose shapes must not change underneath others."""
    problems: dict[str, str] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            problems.setdefault(owner, f"its parameter/buffer {node.target} is read directly in "
                                       f"the forward")
    for name, n in calls.items():
        if n > 1:
            problems.setdefault(name, f"called {n} times in the forward (shared module)")
    first = {id(m): n for n, m in model.named_modules()}
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in list(m._parameters.values()) + list(m._buffers.values()):
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks \
                or getattr(m, "_backward_pre_hooks", None):
            problems.setdefault(name, "has hooks, which may depend on its width")
        if "forward" in vars(m):
            problems.setdefault(name, "has its forward replaced on the instance")
        for p in list(m._parameters.values()) + list(m._buffers.values()):
            if p is not None and len(owners[id(p)]) > 1:
                other = sorted(first[o] for o in owners[id(p)] if o != id(m))
                problems.setdefault(name, f"shares a parameter/buffer with {other[0]}")
    return problems


class UncapturableModel(ValueError):
    """Raised by ``channel_groups(..., strict=True)`` (``prune_channels``, the channel
    ``Pruner``) when neither capture can read the model: nothing would be pruned."""


def _uncaptured(layers: dict, why: str, strict: bool) -> tuple[list, dict[str, str]]:
    if strict:
        raise UncapturableModel(f"no channel can be proven removable: {why}; capture a "
                                f"submodule that torch.export or torch.fx can read instead")
    return [], dict.fromkeys(layers, why)


def _analyse(model: nn.Module, example_inputs: tuple, capture: str = "auto",
             strict: bool = False) -> tuple[list[ChannelGroup], dict[str, str]]:
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple of the model's inputs, got "
                        f"{type(example_inputs).__name__}")
    layers = _layers(model)
    lifted: set[str] = set()
    gm = None
    captured = None
    export_failed = ""
    if capture in ("auto", "export"):
        try:
            if "forward" in vars(model):
                raise TypeError("forward is replaced on the instance")
            flags = {m: m.training for m in model.modules()}
            try:
                model.eval()  # BatchNorm statistics must not move
                with torch.no_grad():
                    cap = capture_export(model, tuple(example_inputs))
            finally:
                for m, t in flags.items():
                    m.training = t
            gm, lifted = _lift(model, cap)
            captured = cap
        except Exception as exc:  # noqa: BLE001 - any capture failure: try torch.fx
            msg = (str(exc).splitlines() or [""])[0][:200]
            export_failed = (f"torch.export could not capture the model "
                             f"({type(exc).__name__}: {msg})")
            if capture == "export":
                return _uncaptured(layers, export_failed + "; left as it is", strict)
    if gm is None:
        try:
            if "forward" in vars(model):
                raise TypeError("forward is replaced on the instance, which torch.fx does not "
                                "see")
            gm = capture_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: leave the model as it is
            why = (f"the model is not traceable by torch.fx ({type(exc).__name__}: {exc}); left "
                   f"as it is")
            if export_failed:
                why = f"{export_failed}, and {why}"
            return _uncaptured(layers, why, strict)
        _propagate(model, gm, tuple(example_inputs))
    an = _Analysis(model, gm)
    an.run()
    problems = _module_problems(model, gm)
    spaces: dict[int, dict] = {}
    for s in range(len(an.parent)):
        spaces.setdefault(an.find(s), {"producer": [], "consumer": [], "norm": [],
                                       "depthwise": [], "poison": [], "steps": []})
    for s, kind, payload in an.facts:
        spaces[an.find(s)][kind].append(payload)
    for s, step in an.steps:
        spaces[an.find(s)]["steps"].append(step)

    groups: list[ChannelGroup] = []
    reasons: dict[str, str] = {}
    for root in sorted(spaces):
        sp = spaces[root]
        members = sp["producer"] + [c for c, _ in sp["consumer"]] + sp["norm"] + sp["depthwise"]
        why = list(dict.fromkeys(sp["poison"]))
        why += [f"{n} {problems[n]}" for n in dict.fromkeys(members) if n in problems]
        first = model.get_submodule(sp["producer"][0])
        width = oriented(first, first.weight).shape[0]
        if not why and not widths_agree(model, sp, width):
            why.append("the layers' widths disagree with the traced shapes")
        if why:
            prods = list(dict.fromkeys(sp["producer"]))
            coupled = f" (coupled with {', '.join(prods)})" if len(prods) > 1 else ""
            text = "; ".join(why) + coupled
            for n in prods + sp["depthwise"]:
                reasons.setdefault(n, "its output channels cannot be removed: " + text)
            continue
        groups.append(ChannelGroup(
            producers=list(dict.fromkeys(sp["producer"])),
            consumers=list(dict.fromkeys(c for c, _ in sp["consumer"])),
            norms=list(dict.fromkeys(sp["norm"])), width=width,
            depthwise=list(dict.fromkeys(sp["depthwise"])),
            columns={c: r for c, r in sp["consumer"]}, steps=sp["steps"]))

    if captured is not None:
        heads, head_reasons = head_groups(model, captured, _own_call,
                                          _conv1d_calls(model, captured))
        for h in heads:
            names = h.producers + [h.consumer]
            why = [f"{n} {problems[n]}" for n in names if n in problems]
            if why:
                for n in h.producers:
                    head_reasons[n] = "its attention heads cannot be removed: " + why[0]
                continue
            groups.append(ChannelGroup(producers=h.producers, consumers=[h.consumer], norms=[],
                                       width=h.heads, columns={h.consumer: h.columns},
                                       unit="head", rows=dict(h.rows),
                                       chunks={p: list(c) for p, c in h.chunks.items()},
                                       attrs={m: dict(a) for m, a in h.attrs.items()}))
            for n in h.producers:
                reasons.pop(n, None)
        in_heads = {n for g in groups for n in g.producers}
        for n, why in head_reasons.items():  # (more telling than the channel analysis' view)
            if n not in in_heads:
                reasons[n] = why
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    in_group = {n for g in groups for n in g.producers + g.depthwise}
    skipped: dict[str, str] = {}
    for name, m in layers.items():
        if name in in_group:
            continue
        if isinstance(m, CompressedModule):  # a leaf of the trace (compress_ops.capture)
            skipped[name] = (f"already compressed ({type(m).__name__}): structured pruning "
                             f"runs on the dense model, before compress_; not pruned")
        elif name in reasons:
            skipped[name] = reasons[name]
        elif type(m) not in (nn.Linear, nn.Conv2d) and not is_conv1d(m, exact=True) \
                and name not in lifted:
            base = ("nn.Linear" if isinstance(m, nn.Linear) else "Conv1D"
                    if is_conv1d(m) else "nn.Conv2d")
            skipped[name] = (f"a {type(m).__name__} (subclass of {base}): its "
                             f"forward may do more than the base class; not pruned")
        elif name not in called:
            skipped[name] = "not called as a module in the traced forward"
        elif name in problems:
            skipped[name] = problems[name]
        elif _is_depthwise(m):
            skipped[name] = ("a depthwise conv: its channels follow its input's, which do not "
                             "come from a prunable layer")
        else:
            skipped[name] = f"a grouped conv (groups={m.groups}): its channels are not sliced"
    return groups, skipped


def widths_agree(model: nn.Module, sp: dict, width: int) -> bool:
    """Whether the layers of a group, ``sp`` = ``{"producer": [names], "depthwise": [names],
    "norm": [names], "consumer": [(name, columns per channel)]}``, all have ``width`` channels
    in ``model``."""
    rows = sp.get("rows", {})  # weight rows per unit (attention heads), default 1
    for n in sp["producer"] + sp["depthwise"]:
        m = model.get_submodule(n)
        if oriented(m, m.weight).shape[0] != width * rows.get(n, 1):
            return False
    for n in sp["norm"]:
        if model.get_submodule(n).num_features != width:
            return False
    for n, rep in sp["consumer"]:
        m = model.get_submodule(n)
        if oriented(m, m.weight).shape[1] != width * rep:
            return False
    return True


def channel_groups(model: nn.Module, example_inputs: tuple, capture: str = "auto",
                   strict: bool = False) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Capture ``model`` on ``example_inputs`` (a tuple of the forward's arguments, run in
    eval mode under ``no_grad``; the model is not changed) and return the prunable
    :class:`ChannelGroup`\\ s in graph order and ``{layer name: reason}`` for every
    ``nn.Linear`` / ``nn.Conv2d`` whose output channels cannot be proven safe to remove (see
    the module docstring for what is understood).

    ``capture``: ``"export"`` reads the ATen ops ``torch.export`` records
    (:func:`compress_ops.capture.export`), which sees through module classes (a ``Conv2d``
    subclass that pads first, timm's ``BatchNormAct2d``, Hugging Face blocks): an op is taken
    as a layer's own call only when it is exactly that (its weight, bias and attributes).
    ``"fx"`` traces with ``torch.fx`` plus shape propagation, where only plain ``torch.nn``
    layers count. ``"auto"`` (default): export, and ``torch.fx`` if export fails.

    A model neither capture can read gives no group and the same reason for every layer;
    with ``strict=True`` it raises :class:`UncapturableModel` (a ``ValueError``) instead, with
    the capture errors (``prune_channels`` and the channel ``Pruner`` do, so that pruning never
    silently does nothing).

    Raises ``TypeError`` when ``example_inputs`` is not a tuple, ``ValueError`` when the traced
    model fails on them or ``capture`` is not one of the three.
    """
    if capture not in ("auto", "export", "fx"):
        raise ValueError(f"capture must be 'auto', 'export' or 'fx', got {capture!r}")
    return _analyse(model, example_inputs, capture, strict)
