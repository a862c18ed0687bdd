"""``torch.compile(model, backend="compress_ops")``: Inductor, after a graph pass that runs every
depthwise + pointwise chain of the captured graph as one ``compress_ops::dwsep_conv2d`` op.

The pass (:class:`CompressOpsPass`) works on the graph Dynamo captured, not on the user's
modules, so nothing has to be traceable by ``torch.fx`` and the model is never changed. It
matches the same chains as ``compress_(model, DWSepFuseConfig(), example_inputs=...)``
(:func:`compress_ops.fuse.match_chain` over :func:`compress_ops.capture.canonical`, which reads
Dynamo's torch-level calls and ``torch.export``'s ATen ops alike): ``[zero pad] -> depthwise conv
-> [batch_norm] -> [act] -> 1x1 conv -> [batch_norm] -> [act]``, each value read only by the
next op. Eval-mode BatchNorm is folded *in the graph*: the folded weights are computed from the
graph's own parameter inputs on every call (Inductor fuses it into one small kernel per chain,
~C·(k² + Cout) elements), so a later ``load_state_dict`` is never served stale weights; with
``torch._inductor.config.freezing = True`` set before compiling, under ``torch.no_grad()``,
the weights are constants and Inductor folds it once (tested: the fold kernels disappear).
``options={"freezing": True}`` alone does not do that: Dynamo has already made the weights
graph inputs. Weights are never compressed here: that stays an explicit
``compress_``.

A second rewrite runs the low-bit linears that read one input with one format (q, k and v)
as one ``dequant_linear`` launch on their packed weights concatenated along N
(:func:`merge_shared_inputs`), where Inductor freezes the weights (``torch._inductor.config
.freezing = True`` before compiling, under ``torch.no_grad()``): the concatenation is then
folded once; anywhere else it would copy every packed weight per call, so the layers are left
as they are, with that reason.

Where it applies: on CUDA tensors. On the CPU the op runs ATen's two convolutions plus a
custom-op dispatch, slower than Inductor's own convolutions, so chains there are left as they
are unless ``options={"cpu": True}`` (for tests and the curious).

* ``torch.compile(model, backend="compress_ops", mode=..., options=...)``: ``mode`` and every
  option but ``cpu`` go to Inductor (``compile_fx``'s ``config_patches``). Registered when this
  module is imported and through the ``torch_dynamo_backends`` entry point (``pip install``
  makes ``backend="compress_ops"`` work without an import).
* :func:`explain` ``(model, *args)``: what the backend would rewrite and why it left the rest.
* :func:`install` ``()``: the same pass for ``backend="inductor"`` users, as Inductor's
  ``pre_grad_custom_pass`` (a ``CustomGraphPass`` with a stable ``uuid()``, so FX graph caching
  keeps working), chained after any pass already set.

Chains whose padding Dynamo computed from the input's shape are safe here: Dynamo guards the
shapes it specialized on and recompiles for others; with dynamic spatial sizes
(``mark_dynamic``) the pad stays a symbolic op in front of the fused unit (tested).
``torch.compile(dynamic=True)`` also makes Python numbers such as BatchNorm's ``eps`` graph
inputs; such chains are left, with the reason.
"""

from __future__ import annotations

import hashlib
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

import compress_ops.capture as capture
import compress_ops.fuse as fuse
import compress_ops.nn.dwsep_conv as dwsep_module
from compress_ops.capture import canonical, example_value
from compress_ops.configs import UnfusableError
from compress_ops.fuse import build_fused, is_dw_conv, match_chain

__all__ = ["compress_ops_backend", "CompressOpsPass", "Explanation", "explain", "install",
           "rewrite", "uninstall"]

BACKEND = "compress_ops"
_DEQUANT_OP = torch.ops.compress_ops.dequant_linear.default
_DEQUANT = {torch.ops.compress_ops.dequant_linear, _DEQUANT_OP}


# ------------------------------------------------------------------------------------------
# What replaces a chain in the graph
# ------------------------------------------------------------------------------------------


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: tuple | None):
    """``weight`` (one row per output channel) and ``bias`` with an eval-mode BatchNorm
    ``(gamma, beta, mean, var, eps)`` folded in, computed in fp32 and returned in the
    weight's dtype."""
    if bn is None:
        return weight, bias
    gamma, beta, mean, var, eps = bn
    s = torch.rsqrt(var.float() + eps)
    if gamma is not None:
        s = s * gamma.float()
    shift = -mean.float() * s
    if beta is not None:
        shift = shift + beta.float()
    w = weight.float() * s.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.float() * s + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fused_dwsep(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                bn1: tuple | None, pw_weight: torch.Tensor, pw_bias: torch.Tensor | None,
                bn2: tuple | None, stride: int, padding: list[int], act1: str, act2: str,
                nchw: bool) -> torch.Tensor:
    """What a rewritten chain computes: fold, lay the depthwise weight out tap-major, one op.

    ``dw_weight [C, 1, k, k]`` and ``pw_weight [Cout, C, 1, 1]`` are the convs' own weights;
    ``bn1`` / ``bn2`` are ``(gamma, beta, mean, var, eps)`` or None. ``nchw``: return a
    contiguous NCHW tensor, as the convolutions did for a contiguous NCHW input.
    """
    dw_w, dw_b = _fold(dw_weight[:, 0], dw_bias, bn1)
    pw_w, pw_b = _fold(pw_weight[:, :, 0, 0], pw_bias, bn2)
    dw_w = dw_w.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # [C, k, k], tap-major
    y = torch.ops.compress_ops.dwsep_conv2d(x, dw_w, dw_b, pw_w, pw_b, None, stride, padding,
                                            act1, act2)
    return y.contiguous() if nchw else y


# ------------------------------------------------------------------------------------------
# The rewrite
# ------------------------------------------------------------------------------------------


def _where(node: fx.Node) -> str:
    """A readable name for where ``node`` ran: the module path Dynamo recorded
    (``L['self'].features[1].conv[1][0]`` -> ``features.1.conv.1.0``), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\[['\"]\w+['\"]\]\.?", "", path)
    path = re.sub(r"\[['\"]?([\w.]+?)['\"]?\]", r".\1", path).replace("_modules.", "")
    return path.strip(".") or node.name


def _meta(arg) -> torch.Tensor | None:
    """A meta stand-in for a graph value (shape and dtype only)."""
    v = example_value(arg)
    return None if v is None else torch.empty(v.shape, dtype=v.dtype, device="meta")


def _bn_args(node: fx.Node | None) -> tuple | None:
    if node is None:
        return None
    kw = canonical(node)[1]
    return (kw["weight"], kw["bias"], kw["running_mean"], kw["running_var"], float(kw["eps"]))


def rewrite(graph: fx.Graph, cpu: bool = False) -> tuple[list[str], list[str]]:
    """Replace every fusable dw + pw chain of a Dynamo graph by one :func:`fused_dwsep` call,
    in place; return ``(rewritten, left)``: one ``"name: what"`` line per depthwise conv."""
    rewritten: list[str] = []
    left: list[str] = []
    for node in list(graph.nodes):
        if node.graph is not graph or not is_dw_conv(node):
            continue
        name = _where(node)
        chain, why = match_chain(node)
        if chain is None:
            left.append(f"{name}: {why}")
            continue
        src = chain["nodes"][0].args[0]
        x = example_value(src)
        if x is None:
            left.append(f"{name}: the chain's input has no recorded shape")
            continue
        if x.device.type != "cuda" and not cpu:
            left.append(f"{name}: on {x.device.type} the fused op is slower than the two "
                        f"convolutions; options={{'cpu': True}} forces it")
            continue
        try:
            meta = build_fused(chain, _meta)
        except UnfusableError as exc:
            left.append(f"{name}: {exc}")
            continue
        dw, pw = canonical(chain["dw"])[1], canonical(chain["pw"])[1]
        nchw = x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        args = (src, dw["weight"], dw["bias"], _bn_args(chain["bn1"]), pw["weight"], pw["bias"],
                _bn_args(chain["bn2"]), meta.stride, list(meta.padding), meta.act1, meta.act2,
                nchw)
        last = chain["nodes"][-1]
        with graph.inserting_before(last):
            new = graph.call_function(fused_dwsep, args)
        new.meta.update({k: v for k, v in chain["dw"].meta.items()
                         if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        mode = getattr(x, "fake_mode", None)  # the mode Dynamo recorded the graph in
        if mode is not None:
            fake = fx.node.map_arg(args, lambda n: example_value(n))
            with mode:
                new.meta["example_value"] = fused_dwsep(*fake)
        last.replace_all_uses_with(new)
        for n in reversed(chain["nodes"]):
            graph.erase_node(n)
        rewritten.append(f"{name}: {meta.kernel_size}x{meta.kernel_size} depthwise "
                         f"(stride {meta.stride}) + {meta.act1} + 1x1 -> {meta.out_channels}"
                         f" + {meta.act2} -> compress_ops::dwsep_conv2d")
    if rewritten:
        graph.lint()
    return rewritten, left


def _dequant_call(node: fx.Node) -> dict | None:
    """The arguments of a ``compress_ops::dequant_linear`` call, by name, else None."""
    if node.op != "call_function" or node.target not in _DEQUANT:
        return None
    names = ("x", "qweight", "scales", "zeros", "bias", "bits", "group_size", "format_version")
    kw = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return kw if {"x", "qweight", "scales", "bits", "group_size"} <= set(kw) else None


def merge_shared_inputs(graph: fx.Graph, freezing: bool) -> tuple[list[str], list[str]]:
    """Run the low-bit linears that read one input with one format (q, k and v of an
    attention) as one ``dequant_linear`` call on their packed weights concatenated along the
    output rows, then split: one launch instead of one per layer. Each output column is the
    same dot product as before (the kernel may tile K differently for the larger N: equal
    within rounding). The concatenation is computed in the graph from the layers' own buffers,
    so it runs on every call unless Inductor freezes them (``torch._inductor.config.freezing =
    True`` set before compiling: Dynamo then passes them as constants and the concatenation is
    folded once); without freezing it would copy every packed weight per call, more
    traffic than the launches it saves, so the layers are left as they are. Returns
    ``(merged, left)`` lines."""
    groups: dict[tuple, list[tuple[fx.Node, dict]]] = {}
    for node in graph.nodes:
        kw = _dequant_call(node)
        if kw is None:
            continue
        vals = [example_value(kw[k]) for k in ("x", "qweight", "scales")]
        if any(v is None for v in vals) or not isinstance(kw["x"], fx.Node):
            continue
        zeros, bias = kw.get("zeros"), kw.get("bias")
        key = (kw["x"], kw["bits"], kw["group_size"], kw.get("format_version"),
               tuple(vals[1].shape[1:]), vals[1].dtype, tuple(vals[2].shape[1:]), vals[2].dtype,
               zeros is None, bias is None)
        groups.setdefault(key, []).append((node, kw))
    merged: list[str] = []
    left: list[str] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        names = ", ".join(_where(n) for n, _ in members)
        weights = [kw[k] for _, kw in members for k in ("qweight", "scales", "zeros", "bias")
                   if kw.get(k) is not None]
        if not freezing or any(not isinstance(w, fx.Node) or w.op != "get_attr"
                               for w in weights):
            left.append(f"{names}: {len(members)} dequant_linear calls on one input; merging "
                        f"them would copy their packed weights on every call, as Inductor "
                        f"does not freeze them here (set torch._inductor.config.freezing = "
                        f"True before compiling, under torch.no_grad())")
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((n for n, _ in members), key=order.__getitem__)
        for _, kw in members:  # weights Dynamo lifted as attributes next to their use: hoist
            for k in ("qweight", "scales", "zeros", "bias"):
                a = kw.get(k)
                if isinstance(a, fx.Node) and a.op == "get_attr" and order[a] > order[first]:
                    first.prepend(a)
        kw0 = members[0][1]
        sizes = [int(example_value(kw["qweight"]).shape[0]) for _, kw in members]
        with graph.inserting_before(first):
            cat = {k: graph.call_function(torch.cat, ([kw[k] for _, kw in members], 0))
                   for k in ("qweight", "scales", "zeros", "bias") if kw0.get(k) is not None}
            call = graph.call_function(
                _DEQUANT_OP, (kw0["x"], cat["qweight"], cat["scales"], cat.get("zeros"),
                              cat.get("bias"), kw0["bits"], kw0["group_size"])
                + ((kw0["format_version"],) if "format_version" in kw0 else ()))
            parts = graph.call_function(torch.split, (call, sizes, -1))
            outs = [graph.call_function(operator.getitem, (parts, i))
                    for i in range(len(members))]
        x = example_value(kw0["x"])
        mode = getattr(x, "fake_mode", None)
        if mode is not None:
            with mode:
                for n in list(cat.values()) + [call, parts] + outs:
                    args = fx.node.map_arg(n.args, lambda a: a.meta.get("example_value"))
                    n.meta["example_value"] = n.target(*args)
        for (node, _), out in zip(members, outs, strict=True):
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        merged.append(f"{names}: {len(members)} dequant_linear calls (int{kw0['bits']}, "
                      f"g{kw0['group_size']}) on one input -> one call, N = {sum(sizes)}")
    if merged:
        graph.lint()
    return merged, left


def _source_hash() -> str:
    """A hash of the code that decides and performs the rewrite."""
    h = hashlib.sha256()
    for mod in (capture, fuse, dwsep_module):
        h.update(Path(mod.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


class CompressOpsPass(CustomGraphPass):
    """Inductor ``pre_grad_custom_pass``: :func:`rewrite`, then ``previous`` (a pass that was
    set before, kept in the chain). ``uuid()`` hashes this package's rewrite code, the ``cpu``
    flag and ``previous``'s uuid; None (no FX graph caching) if ``previous`` has none."""

    def __init__(self, cpu: bool = False, previous=None) -> None:
        self.cpu = bool(cpu)
        self.previous = previous
        self.log: list[tuple[list[str], list[str]]] = []

    def __call__(self, graph: fx.Graph) -> None:
        from torch._inductor import config as inductor_config

        rewritten, left = rewrite(graph, self.cpu)
        merged, kept = merge_shared_inputs(graph, bool(inductor_config.freezing))
        self.log.append((rewritten + merged, left + kept))
        if self.previous is not None:
            self.previous(graph)

    def uuid(self) -> str | None:
        prev = ""
        if self.previous is not None:
            prev = getattr(self.previous, "uuid", lambda: None)()
            if prev is None:
                return None
        return hashlib.sha256(f"{_source_hash()}|cpu={self.cpu}|{prev}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# Backend, explain, install
# ------------------------------------------------------------------------------------------


def _split_options(options: dict | None) -> tuple[bool, dict]:
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    opts = dict(options or {})
    cpu = opts.pop("cpu", False)
    if not isinstance(cpu, bool):
        raise TypeError(f"options['cpu'] must be a bool, got {cpu!r}")
    return cpu, opts


def compress_ops_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None,
                         options: dict | None = None):
    """The ``backend="compress_ops"`` compiler: Inductor (``compile_fx``) with
    :class:`CompressOpsPass` first among its pre-grad passes. ``mode`` and ``options`` (less
    ``cpu``) are Inductor's."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    cpu, patches = _split_options(options)
    patches = dict(list_mode_options(mode)) | patches if mode else patches
    previous = patches.get("pre_grad_custom_pass", inductor_config.pre_grad_custom_pass)
    if isinstance(previous, CompressOpsPass):  # install() was called: run the rewrite once
        previous = previous.previous
    patches["pre_grad_custom_pass"] = CompressOpsPass(cpu=cpu, previous=previous)
    return compile_fx(gm, example_inputs, config_patches=patches)


@dataclass
class Explanation:
    """What the backend would do to a model: ``rewritten`` and ``left`` hold one ``"name:
    what"`` line per depthwise conv and per set of low-bit linears sharing an input, over every
    graph Dynamo captured (``graphs``; graph breaks split a model into several)."""

    rewritten: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    graphs: int = 0

    def __str__(self) -> str:
        lines = [f"compress_ops backend: {len(self.rewritten)} rewritten, {len(self.left)} "
                 f"left, {self.graphs} graph(s)"]
        lines += ["rewritten:"] + [f"  {r}" for r in self.rewritten]
        lines += ["left:"] + [f"  {r}" for r in self.left]
        return "\n".join(lines)


def explain(model, *args, options: dict | None = None, **kwargs) -> Explanation:
    """Run ``model(*args, **kwargs)`` under Dynamo and report what ``backend="compress_ops"``
    would rewrite and why it left the rest (the rewritten graphs run eagerly; nothing is
    compiled and the model is not changed). Like ``torch._dynamo.explain``, it resets Dynamo's
    caches first. ``options`` as for the backend (``{"cpu": True}`` rewrites CPU graphs)."""
    cpu, rest = _split_options(options)
    out = Explanation()

    def backend(gm: fx.GraphModule, example_inputs):
        rewritten, left = rewrite(gm.graph, cpu)
        from torch._inductor import config as inductor_config

        freezing = bool(rest.get("freezing", inductor_config.freezing))
        merged, kept = merge_shared_inputs(gm.graph, freezing)
        rewritten, left = rewritten + merged, left + kept
        gm.recompile()
        out.rewritten += rewritten
        out.left += left
        out.graphs += 1
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*args, **kwargs)
    torch._dynamo.reset()
    return out


def install(cpu: bool = False) -> CompressOpsPass:
    """Put :class:`CompressOpsPass` in Inductor's ``pre_grad_custom_pass``, chained before any
    pass already there, so ``torch.compile(model)`` (``backend="inductor"``) fuses too. Returns
    the pass; ``uninstall(p)`` puts the previous one back. Installing twice replaces the first."""
    from torch._inductor import config as inductor_config

    previous = inductor_config.pre_grad_custom_pass
    if isinstance(previous, CompressOpsPass):
        previous = previous.previous
    p = CompressOpsPass(cpu=cpu, previous=previous)
    inductor_config.pre_grad_custom_pass = p
    return p


def uninstall(p: CompressOpsPass) -> None:
    """Undo :func:`install`: Inductor's ``pre_grad_custom_pass`` goes back to what ``p``
    chained."""
    from torch._inductor import config as inductor_config

    if inductor_config.pre_grad_custom_pass is p:
        inductor_config.pre_grad_custom_pass = p.previous


def _register() -> None:
    """``backend="compress_ops"`` after this import. When the ``torch_dynamo_backends`` entry
    point is what imports this module, Dynamo registers the backend itself right after, and a
    second registration would be refused: leave the name to it then."""
    from torch._dynamo.backends import registry

    if BACKEND not in registry._BACKENDS:
        registry.register_backend(compress_ops_backend, name=BACKEND)


_register()
