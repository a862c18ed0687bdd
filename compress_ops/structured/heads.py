"""Attention heads as channel groups, read from the ``torch.export`` capture.

A head group is the query, key and value projections (``nn.Linear``, their own calls) whose
outputs are split into heads (``view(B, S, H, D)``), carried through per-head ops (transposes;
rotary embeddings: slices and concatenations along ``D``, products with tensors that broadcast
over the heads; the grouped-query repeat ``unsqueeze -> expand -> reshape``) into
``scaled_dot_product_attention``, whose output is merged back (``[B, S, H * D]``, head-major)
and read by the output projection. Head ``h`` of the output depends on head ``h`` of q, k and v
only, so removing a head removes ``D`` rows of each projection and ``D`` input columns of the
output projection. With grouped-query attention one unit is a key/value head with the
``H / H_kv`` query heads that read it. Anything else that reads these tensors (a head-specific
scale, another reader, an unknown op) leaves the projections out, with the reason.

The unit of such a group is a head: :class:`~compress_ops.structured.graph.ChannelGroup` has
``unit="head"``, ``width`` = heads (units), ``rows[p]`` weight rows per unit of producer ``p`` and
``columns[o]`` input columns per unit of the output projection. Their removal always changes
the function (there are no "dead" heads to fold): ``prune_channels(zero_only=True)`` keeps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_A = torch.ops.aten
_UNARY = {_A.neg.default, _A.clone.default, _A.contiguous.default, _A.alias.default,
          _A.detach.default, _A._to_copy.default, _A.to.dtype, _A.to.dtype_layout}
_BINARY = {_A.mul.Tensor, _A.add.Tensor, _A.sub.Tensor, _A.div.Tensor}
_VIEWS = {_A.view.default, _A.reshape.default, _A._unsafe_view.default}


@dataclass(frozen=True)
class _Tag:
    """A tensor carrying heads of ``space``: ``n`` heads along dim ``hdim``, each head's
    ``d`` entries along ``ddim`` (``merged``: heads * d along ``hdim`` = ``ddim``, head-major),
    ``rep`` consecutive heads per head of the producer (grouped-query repeat), ``extra``: the
    dim right after ``hdim`` being expanded by a grouped-query repeat (its size), else None."""

    space: int
    hdim: int
    ddim: int
    n: int
    d: int
    merged: bool = False
    rep: int = 1
    extra: int | None = None


@dataclass
class _Space:
    producer: str
    heads: int = 0
    d: int = 0
    poison: list[str] = field(default_factory=list)


@dataclass
class HeadGroup:
    producers: list[str]
    rows: dict[str, int]
    consumer: str
    columns: int
    heads: int


def _shape(node) -> tuple[int, ...] | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _norm(dim: int, nd: int) -> int:
    return dim % nd if nd else dim


class _Heads:
    def __init__(self, model: nn.Module, cap, own_call) -> None:
        self.model, self.cap, self.own_call = model, cap, own_call
        self.tags: dict[fx.Node, _Tag] = {}
        self.spaces: list[_Space] = []
        # attention outputs: space -k-1 -> ([(q/k/v space, rep)], heads, heads per unit)
        self.outs: list[tuple[list[tuple[int, int]], int, int]] = []
        self.out_poison: dict[int, list[str]] = {}
        self.groups: list[tuple[HeadGroup, int]] = []  # (group, its output space)
        self.split_reasons: dict[str, str] = {}  # projections split into heads, refused

    def poison(self, node: fx.Node, why: str) -> None:
        t = self.tags.get(node)
        if t is None:
            return
        if t.space >= 0:
            self.spaces[t.space].poison.append(why)
        else:
            self.out_poison.setdefault(t.space, []).append(why)

    def run(self) -> None:
        for node in self.cap.graph.nodes:
            ins = [a for a in node.all_input_nodes if a in self.tags]
            if node.op == "call_function":
                own = self.own_call(self.model, self.cap, node)
                if own is not None and own[1] == "linear":
                    if ins:
                        self.consume(node, own[0], ins)
                    shape = _shape(node)
                    if shape:
                        self.spaces.append(_Space(own[0]))
                        s = len(self.spaces) - 1
                        self.tags[node] = _Tag(s, len(shape) - 1, len(shape) - 1, 0, 0, True)
                    continue
                if ins:
                    self.function(node, ins)
            else:
                for a in ins:
                    self.poison(a, f"they reach the {node.op} ({node.name})")

    # ------------------------------------------------------------------ readers
    def consume(self, node: fx.Node, name: str, ins: list[fx.Node]) -> None:
        x = node.args[0]
        t = self.tags.get(x)
        if len(ins) != 1 or t is None or t.space >= 0 or not t.merged:
            for a in ins:
                self.poison(a, f"{name} reads them other than as merged attention heads")
            return
        members, n, unit = self.outs[-t.space - 1]
        self.groups.append((HeadGroup(
            [self.spaces[s].producer for s, _ in members],
            {self.spaces[s].producer: (unit // r) * self.spaces[s].d for s, r in members},
            name, unit * t.d, n // unit), t.space))

    def function(self, node: fx.Node, ins: list[fx.Node]) -> None:
        t, target = self.tags[ins[0]], node.target
        x = node.args[0] if node.args else None
        shape, in_shape = _shape(node), _shape(x)
        name = getattr(target, "__name__", str(target))
        if target is _A.scaled_dot_product_attention.default:
            self.sdpa(node, ins)
            return
        first = x is ins[0]
        if len(ins) == 1 and first and (target in _UNARY or name.startswith("dropout")):
            if name.startswith("dropout") and len(node.args) > 2 and node.args[2]:
                self.poison(ins[0], f"dropout (node {node.name}) in training mode")
                return
            self.tags[node] = t
            return
        if target in _BINARY:
            self.binary(node, ins)
            return
        if target is _A.cat.default:
            self.cat(node, ins)
            return
        if len(ins) != 1 or not first or shape is None or in_shape is None:
            self.poison_all(ins, f"{name} (node {node.name}) combines them with other tensors")
            return
        nd = len(in_shape)
        if target is _A.transpose.int:
            a, b = (_norm(int(d), nd) for d in node.args[1:3])
            swap = {a: b, b: a}
            self.tags[node] = _Tag(t.space, swap.get(t.hdim, t.hdim), swap.get(t.ddim, t.ddim),
                                   t.n, t.d, t.merged, t.rep, t.extra)
            if t.extra is not None and (t.hdim + 1) in swap:
                self.poison(ins[0], f"transpose (node {node.name}) moves a repeat dim")
            return
        if target in _VIEWS:
            self.view(node, ins[0], t, in_shape, shape)
            return
        if target is _A.slice.Tensor:
            dim = _norm(int(node.args[1]) if len(node.args) > 1 else 0, nd)
            if dim == t.ddim and not t.merged:
                self.tags[node] = _Tag(t.space, t.hdim, t.ddim, t.n, shape[dim], False, t.rep,
                                       t.extra)
                return
        if target is _A.unsqueeze.default:
            dim = _norm(int(node.args[1]), nd + 1)
            if not t.merged and t.extra is None and dim == t.hdim + 1:
                self.tags[node] = _Tag(t.space, t.hdim, t.ddim + (t.ddim > t.hdim), t.n, t.d,
                                       False, t.rep, 1)
                return
            if not t.merged and dim <= min(t.hdim, t.ddim):
                self.tags[node] = _Tag(t.space, t.hdim + 1, t.ddim + 1, t.n, t.d, False, t.rep,
                                       t.extra)
                return
        if target is _A.expand.default and t.extra is not None:
            sizes = list(node.args[1])
            ok = all(s == -1 or s == o or i == t.hdim + 1
                     for i, (s, o) in enumerate(zip(sizes, in_shape, strict=True)))
            if ok and len(sizes) == nd:
                self.tags[node] = _Tag(t.space, t.hdim, t.ddim, t.n, t.d, False, t.rep,
                                       shape[t.hdim + 1])
                return
        self.poison(ins[0], f"{name} (node {node.name}) is applied to them, which the head "
                            f"analysis does not understand")

    def poison_all(self, ins, why: str) -> None:
        for a in ins:
            self.poison(a, why)

    def binary(self, node: fx.Node, ins: list[fx.Node]) -> None:
        shape = _shape(node)
        tags = [self.tags[a] for a in ins]
        t = tags[0]
        if len(ins) == 2 and tags[0] != tags[1]:
            self.poison_all(ins, f"{node.name} combines tensors of different head layouts")
            return
        if t.merged or shape is None:
            self.poison_all(ins, f"{node.name} on heads not yet split")
            return
        for a in node.args:
            if isinstance(a, fx.Node) and a not in self.tags:
                other = _shape(a)
                if other is None:
                    self.poison_all(ins, f"{node.name} combines them with an unknown tensor")
                    return
                k = len(shape) - len(other)
                dims = [t.hdim] + ([t.hdim + 1] if t.extra is not None else [])
                if any(i - k >= 0 and other[i - k] != 1 for i in dims):
                    self.poison_all(ins, f"{node.name} combines them with a tensor that "
                                         f"varies across heads (a per-head scale)")
                    return
        self.tags[node] = t

    def cat(self, node: fx.Node, ins: list[fx.Node]) -> None:
        """Concatenation along the head size (rotary embeddings' rotate_half)."""
        parts = node.args[0]
        shape = _shape(node)
        tags = [self.tags.get(p) for p in parts]
        t = tags[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        if shape is None or t is None or any(x is None for x in tags) or t.merged \
                or dim % len(shape) != t.ddim or any(
                    (x.space, x.hdim, x.ddim, x.n, x.rep, x.extra)
                    != (t.space, t.hdim, t.ddim, t.n, t.rep, t.extra) for x in tags):
            self.poison_all(ins, f"cat (node {node.name}) joins them with other tensors or "
                                 f"across heads")
            return
        self.tags[node] = _Tag(t.space, t.hdim, t.ddim, t.n, shape[t.ddim], False, t.rep,
                               t.extra)

    def view(self, node: fx.Node, src: fx.Node, t: _Tag, ins: tuple, out: tuple) -> None:
        if ins == out:
            self.tags[node] = t
            return
        h = t.hdim
        if t.merged and out[:h] == ins[:h] and out[h + 2:] == ins[h + 1:] \
                and len(out) == len(ins) + 1 and out[h] * out[h + 1] == ins[h]:
            sp = self.spaces[t.space] if t.space >= 0 else None
            n, d = out[h], out[h + 1]
            asked = node.args[1] if len(node.args) > 1 else None
            if isinstance(asked, (list, tuple)) and len(asked) == len(out) and asked[h] != -1:
                # view(B, S, self.heads, -1) would silently re-split fewer rows into the same
                # number of heads: only a head count the forward infers (-1) can shrink
                why = (f"{node.target.__name__} (node {node.name}) splits them into a fixed "
                       f"number of heads ({asked[h]}), which pruning would not change")
                self.poison(src, why)
                if sp is not None:
                    self.split_reasons.setdefault(sp.producer, why)
                return
            if sp is not None:
                if sp.heads and (sp.heads, sp.d) != (n, d):
                    self.poison(src, "split into heads two different ways")
                    return
                sp.heads, sp.d = n, d
            self.tags[node] = _Tag(t.space, h, h + 1, n, d, False, t.rep)
            return
        if not t.merged and t.extra is not None and len(out) == len(ins) - 1 \
                and out[:h] == ins[:h] and out[h] == ins[h] * ins[h + 1] \
                and out[h + 1:] == ins[h + 2:]:
            self.tags[node] = _Tag(t.space, h, t.ddim - 1, t.n * t.extra, t.d, False,
                                   t.rep * t.extra)
            return
        if not t.merged and t.ddim == h + 1 and t.extra is None and len(out) == len(ins) - 1 \
                and out[:h] == ins[:h] and out[h] == ins[h] * ins[h + 1] \
                and out[h + 1:] == ins[h + 2:]:
            self.tags[node] = _Tag(t.space, h, h, t.n, t.d, True, t.rep)
            return
        self.poison(src, f"{node.target.__name__} (node {node.name}) to {out} mixes heads")

    def sdpa(self, node: fx.Node, ins: list[fx.Node]) -> None:
        q, k, v = node.args[:3]
        rest = [a for a in list(node.args[3:]) + list(node.kwargs.values())
                if isinstance(a, fx.Node)]
        if any(a in self.tags for a in rest) or any(a not in self.tags for a in (q, k, v)) \
                or node.kwargs.get("enable_gqa", False) \
                or (len(node.args) > 4 and node.args[4]) or node.kwargs.get("dropout_p", 0.0):
            self.poison_all(ins, f"scaled_dot_product_attention (node {node.name}) with "
                                 f"arguments the head analysis does not understand")
            return
        tq, tk, tv = (self.tags[a] for a in (q, k, v))
        nd = len(_shape(q) or ())
        if any(t.merged or t.hdim != nd - 3 or t.ddim != nd - 1 or t.extra is not None
               or t.space < 0 for t in (tq, tk, tv)) or not tq.n == tk.n == tv.n:
            self.poison_all(ins, f"scaled_dot_product_attention (node {node.name}) reads "
                                 f"them in another layout")
            return
        spaces = [tq.space, tk.space, tv.space]
        if len(set(spaces)) != 3:
            self.poison_all(ins, "one projection feeds two of q, k, v")
            return
        unit = math.lcm(tq.rep, tk.rep, tv.rep)  # output heads per removable unit
        if tq.n % unit:
            self.poison_all(ins, f"scaled_dot_product_attention (node {node.name}): heads do "
                                 f"not divide into whole key/value groups")
            return
        self.outs.append(([(s, t.rep) for s, t in zip(spaces, (tq, tk, tv), strict=True)],
                          tq.n, unit))
        self.tags[node] = _Tag(-len(self.outs), nd - 3, nd - 1, tq.n, tv.d, False, 1)


def head_groups(model: nn.Module, cap, own_call) -> tuple[list[HeadGroup], dict[str, str]]:
    """Head groups of the exported model and ``{projection: reason}`` for projections split
    into heads that could not be grouped."""
    an = _Heads(model, cap, own_call)
    an.run()
    out: list[HeadGroup] = []
    reasons = {p: "its attention heads cannot be removed: " + why
               for p, why in an.split_reasons.items()}
    used: dict[str, int] = {}
    for g, _ in an.groups:
        for p in g.producers + [g.consumer]:
            used[p] = used.get(p, 0) + 1
    for g, space in an.groups:
        why = list(an.out_poison.get(space, []))
        for p in g.producers:
            why += [w for sp in an.spaces if sp.producer == p for w in sp.poison]
        if any(used[p] > 1 for p in g.producers + [g.consumer]):
            why.append("a projection is shared by two attentions")
        if why:
            for p in g.producers:
                reasons[p] = "its attention heads cannot be removed: " + why[0]
            continue
        out.append(g)
    return out, reasons
