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

Hugging Face ``Conv1D`` calls (``view -> addmm -> view``, GPT-2) count as projections too.

Fused projections: one projection whose output is split along its output dim (``split``,
``split_with_sizes``) into chunks that are each split into heads as above and are exactly
the q, k and v of one attention (GPT-2's ``c_attn``: ``split(E, dim=2)``; grouped-query
chunks ``H * D, H_kv * D, H_kv * D``). Removing a unit then removes its rows in every chunk
(``chunks[p]``: ``(offset, rows per unit)`` of each chunk, non-contiguous rows of ``p``). The
split sizes are constants of the export: a fixed chunk size (``split(E)``) is only accepted when
the attention module (the projection's parent) holds it in an int ``split_size`` attribute,
which pruning then rescales (with head counts ``num_heads`` / ``num_key_value_heads`` and
their aliases: ``attrs``); ``prune_channels`` runs the pruned forward once and puts the heads
back if it fails (a size the forward fixes elsewhere). A chunk read by anything else, chunks
that do not cover the output, or a split of another kind leave the projection out.

The unit of such a group is a head: :class:`~compress_ops.structured.graph.ChannelGroup` has
``unit="head"``, ``width`` = heads (units), ``rows[p]`` weight rows per unit of producer ``p`` and
``columns[o]`` input columns per unit of the output projection. Their removal always changes
the function (there are no "dead" heads to fold): ``prune_channels(zero_only=True)`` keeps them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_A = torch.ops.aten
_UNARY = {_A.neg.default, _A.clone.default, _A.contiguous.default, _A.alias.default,
          _A.detach.default, _A._to_copy.default, _A.to.dtype, _A.to.dtype_layout}
_BINARY = {_A.mul.Tensor, _A.add.Tensor, _A.sub.Tensor, _A.div.Tensor}
_VIEWS = {_A.view.default, _A.reshape.default, _A._unsafe_view.default}
_SPLITS = {_A.split.Tensor, _A.split_with_sizes.default}
# attributes of the attention module holding its head counts (rescaled with a fused group)
_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
#: Every attribute of an attention module a fused head group may rescale (``ChannelGroup.attrs``;
#: ``select_channels`` records that module as resized, for checkpoints to restore them).
SIZE_ATTRS = ("split_size", *_HEAD_ATTRS, *_KV_ATTRS)


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
    chunk: tuple[int, int] | None = None  # (offset, size) in a fused projection's output
    split: fx.Node | None = None  # the split that made this chunk


@dataclass
class _Split:
    base: int  # the fused projection's space
    total: int  # its output width
    chunks: list[tuple[int, int]]  # (offset, size) of each output of the split
    size: int | None  # split(size): a fixed chunk size; None: split_with_sizes


@dataclass
class HeadGroup:
    producers: list[str]
    rows: dict[str, int]
    consumer: str
    columns: int
    heads: int
    # fused producers: (offset, rows per unit) of each chunk, in offset order
    chunks: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # {module: {int attribute: its value per unit}} rescaled with the group (fused producers)
    attrs: dict[str, dict[str, int]] = field(default_factory=dict)
    spaces: list[int] = field(default_factory=list)  # q, k, v spaces
    q_heads: int = 0  # query heads (``heads`` units of ``q_heads / heads`` query heads)
    kv_heads: int = 0  # heads of the key projection (grouped-query: fewer than ``q_heads``)


def _shape(node) -> tuple[int, ...] | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _norm(dim: int, nd: int) -> int:
    return dim % nd if nd else dim


class _Heads:
    def __init__(self, model: nn.Module, cap, own_call, conv1d=None) -> None:
        self.model, self.cap, self.own_call = model, cap, own_call
        # Hugging Face Conv1D calls: {addmm: (name, x)}, input views left out, {view: addmm}
        self.calls, self.dropped, self.same = conv1d or ({}, set(), {})
        self.splits: dict[fx.Node, _Split] = {}
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

    def own(self, node: fx.Node) -> tuple[str, fx.Node] | None:
        """``(projection name, its input)`` when ``node`` is the output of a linear's call."""
        if node in self.same:
            return self.calls[self.same[node]]
        own = self.own_call(self.model, self.cap, node)
        if own is not None and own[1] == "linear":
            return own[0], node.args[0]
        return None

    def run(self) -> None:
        for node in self.cap.graph.nodes:
            if node in self.calls or node in self.dropped:
                continue  # (inside a Conv1D's call: read at its output view)
            if node.op == "call_function" and node.target is operator.getitem \
                    and node.args[0] in self.splits:
                self.chunk(node)
                continue
            ins = [a for a in node.all_input_nodes if a in self.tags]
            if node.op == "call_function":
                own = self.own(node)
                if own is not None:
                    x = own[1]
                    ins = [x] if x in self.tags else []
                    if ins:
                        self.consume(node, own[0], ins, x)
                    shape = _shape(node)
                    if shape:
                        self.spaces.append(_Space(own[0]))
                        s = len(self.spaces) - 1
                        self.tags[node] = _Tag(s, len(shape) - 1, len(shape) - 1, 0, 0, True)
                    continue
                if ins and node.target in _SPLITS:
                    self.split(node, ins)
                    continue
                if ins:
                    self.function(node, ins)
            else:
                for a in ins:
                    self.poison(a, f"they reach the {node.op} ({node.name})")

    # ------------------------------------------------------------------ readers
    def consume(self, node: fx.Node, name: str, ins: list[fx.Node], x: fx.Node) -> None:
        t = self.tags.get(x)
        if len(ins) != 1 or t is None or t.space >= 0 or not t.merged:
            for a in ins:
                self.poison(a, f"{name} reads them other than as merged attention heads")
            return
        members, n, unit = self.outs[-t.space - 1]
        rows: dict[str, int] = {}
        chunks: dict[str, list[tuple[int, int]]] = {}
        for s, r in members:
            sp = self.spaces[s]
            per = (unit // r) * sp.d
            rows[sp.producer] = rows.get(sp.producer, 0) + per
            if sp.chunk is not None:
                chunks.setdefault(sp.producer, []).append((sp.chunk[0], per))
        self.groups.append((HeadGroup(
            list(dict.fromkeys(self.spaces[s].producer for s, _ in members)), rows, name,
            unit * t.d, n // unit, {p: sorted(c) for p, c in chunks.items()},
            spaces=[s for s, _ in members], q_heads=n, kv_heads=self.spaces[members[1][0]].heads),
            t.space))

    def split(self, node: fx.Node, ins: list[fx.Node]) -> None:
        """A fused projection's output split along its output dim into chunks (q, k, v)."""
        x = node.args[0]
        t = self.tags[ins[0]]
        shape = _shape(x)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        size = node.args[1] if len(node.args) > 1 else None
        bad = ""
        if len(ins) != 1 or x is not ins[0] or shape is None or not isinstance(dim, int) \
                or t.space < 0 or not t.merged or self.spaces[t.space].chunk is not None \
                or _norm(dim, len(shape)) != t.hdim:
            bad = "along another dim or of a tensor other than a projection's output"
        elif any(u.op != "call_function" or u.target is not operator.getitem
                 or not isinstance(u.args[1], int) for u in node.users):
            bad = "whose chunks are read other than one by one"
        if not bad:
            total = shape[t.hdim]
            if node.target is _A.split.Tensor and isinstance(size, int) and size > 0:
                sizes = [size] * (total // size) + ([total % size] if total % size else [])
            elif node.target is _A.split_with_sizes.default and isinstance(size, (list, tuple)) \
                    and all(isinstance(v, int) for v in size) and sum(size) == total:
                sizes, size = list(size), None
            else:
                sizes = []
                bad = "of sizes the head analysis does not understand"
        if bad:
            self.poison(ins[0], f"{getattr(node.target, '__name__', node.target)} (node "
                                f"{node.name}) splits them {bad}")
            return
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.splits[node] = _Split(t.space, total, list(zip(offsets, sizes, strict=True)),
                                   size)
        self.tags[node] = t  # (its readers are its getitems)

    def chunk(self, node: fx.Node) -> None:
        sp = self.splits[node.args[0]]
        t = self.tags[node.args[0]]
        i = node.args[1]
        if not -len(sp.chunks) <= i < len(sp.chunks):
            self.poison(node.args[0], f"{node.name} reads a chunk that does not exist")
            return
        self.spaces.append(_Space(self.spaces[sp.base].producer, chunk=sp.chunks[i],
                                  split=node.args[0]))
        self.tags[node] = _Tag(len(self.spaces) - 1, t.hdim, t.ddim, 0, 0, True)

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


def _fused(model: nn.Module, an: _Heads, g: HeadGroup) -> str:
    """Check a group's fused producers (their chunks are exactly this attention's q, k, v and
    cover their output) and fill ``g.attrs``; the reason when they cannot be pruned."""
    for p, chunks in g.chunks.items():
        mine = [s for s in g.spaces if an.spaces[s].producer == p]
        if any(an.spaces[s].chunk is None for s in mine):
            return f"{p} feeds this attention both whole and split"
        split = an.spaces[mine[0]].split
        sp = an.splits[split]
        every = [s for s, x in enumerate(an.spaces) if x.producer == p and x.chunk is not None]
        if sorted(every) != sorted(mine) or any(an.spaces[s].split is not split for s in mine) \
                or sorted(an.spaces[s].chunk for s in mine) != sp.chunks \
                or any(size != g.heads * per for (_, size), (_, per)
                       in zip(sp.chunks, chunks, strict=True)):
            return (f"the chunks {p}'s output is split into are not exactly the q, k and v of "
                    f"one attention")
        owner = p.rpartition(".")[0]
        try:
            om = model.get_submodule(owner)
        except AttributeError:
            return f"{p} has no parent module"
        attrs = {a: value // g.heads
                 for names, value in ((_HEAD_ATTRS, g.q_heads), (_KV_ATTRS, g.kv_heads))
                 for a in names if type(vars(om).get(a)) is int and vars(om)[a] == value
                 and value % g.heads == 0}
        if sp.size is not None:
            per = {c for _, c in chunks}
            v = vars(om).get("split_size")
            if len(per) != 1 or type(v) is not int or v != sp.size:
                return (f"{p}'s output is split into chunks of a fixed size ({sp.size}), which "
                        f"pruning would not change ({owner or 'the model'} has no split_size "
                        f"attribute holding it)")
            attrs["split_size"] = per.pop()
        g.attrs.setdefault(owner, {}).update(attrs)
    return ""


def head_groups(model: nn.Module, cap, own_call,
                conv1d=None) -> tuple[list[HeadGroup], dict[str, str]]:
    """Head groups of the exported model and ``{projection: reason}`` for projections split
    into heads that could not be grouped. ``conv1d``: the Hugging Face ``Conv1D`` calls of the
    capture (see :func:`compress_ops.structured.graph._conv1d_calls`)."""
    an = _Heads(model, cap, own_call, conv1d)
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
        if not why and g.chunks:
            bad = _fused(model, an, g)
            if bad:
                why.append(bad)
        if why:
            for p in g.producers:
                reasons[p] = "its attention heads cannot be removed: " + why[0]
            continue
        out.append(g)
    return out, reasons
