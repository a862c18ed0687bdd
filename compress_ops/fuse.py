"""Finding depthwise -> pointwise chains in a model and fusing them (``DWSepFuseConfig``).

Two routes: with example inputs, :func:`fuse_exported` matches the chains on the ATen ops
``torch.export`` records (through module classes, see its docstring); without, the chains are
read from a ``torch.fx`` trace of plain ``torch.nn`` modules, as follows.

A chain is ``[ZeroPad2d] -> depthwise Conv2d -> [BatchNorm2d] -> [act] -> 1x1 Conv2d ->
[BatchNorm2d] -> [act]``, read from a ``torch.fx`` trace of the model, so it is found both in
``nn.Sequential``s and in models whose ``forward`` calls the layers in that order. Every link
must be a module call whose output only the next link reads, every module of the chain must be
called once in the whole trace and carry no forward hooks. The depthwise conv is then replaced
(at every name it is registered under) by a :class:`FusedDWSepConv2d` and the other modules of
the chain by ``nn.Identity``, so the original ``forward`` computes the same thing with one op.
A module that ``torch.fx`` cannot trace is left as it is, with everything inside it (its
forward may use its children in ways no trace shows). Depthwise convs that stay unfused are
reported with the reason (a Conv2d subclass, a functional activation in the chain, no
pointwise conv after it, a shape the kernel does not support, ...).
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from compress_ops._swap import hooks_reason, replace_everywhere, set_submodule
from compress_ops.capture import (
    Captured,
    canonical,
    example_value,
    infer_image_input,
    size_dependent,
)
from compress_ops.capture import export as capture_export
from compress_ops.capture import trace as capture_trace
from compress_ops.configs import UnfusableError
from compress_ops.nn.base import check_compute_dtype
from compress_ops.nn.dwsep_conv import FusedDWSepConv2d, activation_name

__all__ = ["fuse_dwsep", "fuse_exported", "match_chain", "is_dw_conv", "build_fused"]


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels \
        and m.groups > 1


def _is_pointwise(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1


def _is_act(m: nn.Module) -> bool:
    try:
        activation_name(m)
    except UnfusableError:
        return False
    return True


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,) \
            or len(users[0].args) != 1 or users[0].kwargs:
        return None
    return users[0]


def _chains(gm: fx.GraphModule) -> tuple[list[dict], dict[str, str]]:
    """Chains ``{"dw": name, "pad", "bn1", "act1", "pw", "bn2", "act2": name or None}`` and
    ``{dw name: reason}`` for depthwise convs that start no chain."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    mods = dict(gm.named_modules())
    chains, reasons = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_depthwise(mods[node.target]):
            continue
        chain = {"dw": node.target, "pad": None, "bn1": None, "act1": None, "pw": None,
                 "bn2": None, "act2": None}
        prev = node.args[0] if node.args else None
        if isinstance(prev, fx.Node) and prev.op == "call_module" \
                and isinstance(mods[prev.target], nn.ConstantPad2d) and len(prev.users) == 1 \
                and mods[prev.target].value == 0.0 and min(mods[prev.target].padding) >= 0:
            chain["pad"] = prev.target  # (a crop or a non-zero pad stays in front, unfused)
        cur = node
        for slot, test in (("bn1", lambda m: isinstance(m, nn.BatchNorm2d)), ("act1", _is_act),
                           ("pw", _is_pointwise),
                           ("bn2", lambda m: isinstance(m, nn.BatchNorm2d)), ("act2", _is_act)):
            nxt = _only_user(cur)
            if nxt is None or not test(mods[nxt.target]):
                if slot == "pw":
                    break
                continue
            chain[slot] = nxt.target
            cur = nxt
        if chain["pw"] is None:
            users = list(cur.users)
            what = ""
            if len(users) == 1 and users[0].op in ("call_function", "call_method"):
                fn = users[0].target
                what = f" ({getattr(fn, '__name__', fn)} is called on it: only activation " \
                       f"modules can be fused)"
            elif len(users) > 1:
                what = f" (its output is read {len(users)} times)"
            reasons[node.target] = ("no 1x1 conv reads its output (after an optional BatchNorm2d "
                                    f"and activation module) in the traced forward{what}")
            continue
        names = [n for n in chain.values() if n is not None]
        shared = [n for n in names if calls[n] > 1]
        if shared:
            reasons[node.target] = f"{shared[0]} is called more than once in the forward"
            continue
        chains.append(chain)
    return chains, reasons


def fuse_dwsep(model: nn.Module, filter_fn=None, example_inputs: tuple | None = None,
               fix_input_size: bool = False) -> tuple[list[str], dict[str, str]]:
    """Fuse every depthwise-separable chain of ``model`` in place.

    With ``example_inputs`` (a tuple of the forward's positional arguments) the model is
    captured with ``torch.export`` and matched on the ATen ops that run (:func:`fuse_exported`);
    without, it is traced with ``torch.fx`` as described below.

    Returns the names of the fused modules and ``{name: reason}`` for depthwise convs left
    unfused and for modules that ``torch.fx`` could not trace. An untraceable module is left
    as it is, with everything inside it: its ``forward`` may call its children in ways no trace
    shows (a slice of a Sequential, an intermediate output read twice); pass its traceable
    submodules to ``compress_`` directly to fuse them. ``filter_fn(dw_conv, name)`` returning
    False keeps a chain unfused.
    """
    if example_inputs is not None:
        return fuse_exported(model, example_inputs, filter_fn, fix_input_size)
    if fix_input_size:
        raise ValueError("DWSepFuseConfig(fix_input_size=True) fuses for the size of "
                         "example_inputs: pass compress_(model, config, example_inputs=(x,))")
    fused: list[str] = []
    reasons: dict[str, str] = {}
    _search(model, model, "", filter_fn, fused, reasons)
    left = [n for n, m in model.named_modules() if n and _is_depthwise(m) and n in reasons]
    if not left:
        return fused, reasons
    # What torch.fx left (untraceable roots, Conv2d subclasses, wrappers that trace into shape
    # checks): captured with torch.export on an inferred image input, over the model the fx
    # route has already fused (its FusedDWSepConv2d are ops, not chains, there).
    inferred, source = infer_image_input(model)
    if inferred is None:
        for n in left:
            reasons[n] += (f"; no example_inputs, and {source}: pass example_inputs=(x,) to "
                           f"capture it with torch.export")
        return fused, reasons
    more, why = fuse_exported(model, inferred, filter_fn, False)
    if "<root>" in why:  # torch.export could not capture it either: both reasons stand
        for n in left:
            reasons[n] += f"; with an inferred input {source}, {why['<root>']}"
        return fused, reasons
    for n in left:
        reasons.pop(n, None)
    for n in [n for n, r in reasons.items() if r.startswith("not traceable by torch.fx")]:
        reasons.pop(n)  # the export capture read through it
    reasons.update({n: r for n, r in why.items() if n in left or n not in reasons})
    fused += more
    warnings.warn(f"DWSepFuseConfig without example_inputs: {len(left)} depthwise convs the "
                  f"torch.fx route could not fuse were captured with torch.export on an "
                  f"inferred input {source}; {len(more)} fused. Pass example_inputs=(x,) to "
                  f"capture with your own input", stacklevel=3)
    return fused, reasons


def _search(root: nn.Module, module: nn.Module, prefix: str, filter_fn, fused: list[str],
            reasons: dict[str, str]) -> None:
    def full(name: str) -> str:
        return ".".join(p for p in (prefix, name) if p)

    try:
        gm = capture_trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: leave this part unfused
        here = prefix or "<root>"
        reasons[here] = (f"not traceable by torch.fx ({type(exc).__name__}): left unfused with "
                         f"everything inside it; compress_ its traceable submodules directly")
        for name, m in module.named_modules():
            if name and _is_depthwise(m):
                reasons.setdefault(full(name), f"inside {here}, which torch.fx cannot trace")
        return
    chains, unfused = _chains(gm)
    for name, why in unfused.items():
        reasons[full(name)] = why
    for chain in chains:
        mods = {key: None if name is None else module.get_submodule(name)
                for key, name in chain.items()}
        hooked = [(chain[k], hooks_reason(m)) for k, m in mods.items()
                  if m is not None and hooks_reason(m)]
        if hooked:
            reasons[full(chain["dw"])] = f"{hooked[0][0]} {hooked[0][1]}"
            continue
        if filter_fn is not None and not filter_fn(mods["dw"], full(chain["dw"])):
            reasons[full(chain["dw"])] = "excluded by filter_fn"
            continue
        try:  # the op computes in fp16/bf16/fp32 (a float64 fused module is for tests only)
            check_compute_dtype("FusedDWSepConv2d", mods["dw"].weight.dtype, UnfusableError)
            new = FusedDWSepConv2d.from_modules(mods["dw"], mods["pw"], mods["bn1"],
                                                mods["act1"], mods["bn2"], mods["act2"],
                                                mods["pad"])
        except UnfusableError as exc:
            reasons[full(chain["dw"])] = str(exc)
            continue
        replace_everywhere(root, mods["dw"], new)
        for key in ("pad", "bn1", "act1", "pw", "bn2", "act2"):
            if mods[key] is not None:
                replace_everywhere(root, mods[key], nn.Identity())
        fused.append(full(chain["dw"]))
    # Depthwise Conv2d subclasses were traced into (not leaves): name them too.
    for name, m in module.named_modules():
        if _is_depthwise(m) and type(m) is not nn.Conv2d and full(name) not in reasons:
            reasons[full(name)] = (f"a {type(m).__name__} (Conv2d subclass): its forward may "
                                   f"pad or do more than a plain conv; not fused without "
                                   f"example_inputs (compress_(model, DWSepFuseConfig(), "
                                   f"example_inputs=(x,)) captures what it computes with "
                                   f"torch.export)")


# ------------------------------------------------------------------------------------------
# The same chains, matched on the ATen ops torch.export records (example inputs given)
# ------------------------------------------------------------------------------------------

_SE_READS = {"mean", "adaptive_avg_pool2d"}
_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}
_FUSABLE = "only BatchNorm and a ReLU, ReLU6, Hardswish or SiLU can sit in between"


def _op(node: fx.Node) -> str:
    """An op's short name (``relu`` for ``aten.relu.default``, ``F.relu`` and ``x.relu()``)."""
    t = node.target
    return t if isinstance(t, str) else (getattr(t, "_opname", None)
                                         or getattr(t, "__name__", str(t)))


def _kind(node: fx.Node) -> tuple[str | None, dict]:
    c = canonical(node)
    return (None, {}) if c is None else c


_SCALARS = {"conv2d": ("stride", "padding", "dilation", "groups"),
            "batch_norm": ("training", "eps"), "act:hardtanh": ("min_val", "max_val"),
            "pad": ("pad", "mode", "value"), "dropout": ("p", "training")}


def _symbolic(kind: str | None, kw: dict) -> str | None:
    """The first argument of a matched op that is not a constant in the graph (Dynamo with
    ``dynamic=True`` makes Python floats and ints graph inputs), else None."""
    for key in _SCALARS.get(kind, ()):
        found: list[fx.Node] = []
        fx.node.map_arg(kw.get(key), found.append)
        if found:
            return key
    return None


def _constant_args(node: fx.Node) -> str:
    what = _symbolic(*_kind(node))
    return "" if not what else (
        f"the {what} of {_op(node)} (node {node.name}) is not a constant in this graph "
        f"(torch.compile(dynamic=True) makes Python numbers graph inputs); not fused")


def _act_of(node: fx.Node) -> str | None:
    kind, kw = _kind(node)
    if kind is None or not kind.startswith("act:") or _symbolic(kind, kw):
        return None
    if kind == "act:hardtanh":
        ok = float(kw["min_val"]) == 0.0 and float(kw["max_val"]) == 6.0
        return "relu6" if ok else None
    return kind[4:]


def _passes(node: fx.Node) -> bool:
    """An op that leaves its input as it is (eval-mode dropout)."""
    kind, kw = _kind(node)
    return kind == "dropout" and not _symbolic(kind, kw) and (
        not kw["training"] or float(kw["p"]) == 0.0)


def is_dw_conv(node: fx.Node) -> bool:
    """Whether ``node`` is a depthwise 2-d convolution (groups = in = out channels)."""
    kind, kw = _kind(node)
    if kind != "conv2d" or not isinstance(kw["groups"], int):
        return False
    x, w = example_value(kw["input"]), example_value(kw["weight"])
    return (x is not None and w is not None and w.dim() == 4 and x.dim() == 4
            and kw["groups"] > 1 and kw["groups"] == x.shape[1] == w.shape[0]
            and w.shape[1] == 1)


def _link(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node], str]:
    """The op that reads ``node`` next (skipping pass-through ops, returned in between), or
    None and why not."""
    between: list[fx.Node] = []
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            ops = {_op(u) for u in users}
            if ops & _SE_READS and ops & {"mul", "mul_"}:
                return None, between, ("a squeeze-excite block (x * gate(mean(x))) reads it "
                                       "before the 1x1 conv: a different chain (depthwise, SE, "
                                       "pointwise), not fused")
            return None, between, (f"its output is read {len(users)} times "
                                   f"({', '.join(sorted(ops))})")
        user = users[0]
        if user.op != "call_function" or not user.args or user.args[0] is not cur:
            return None, between, f"{_op(user)} reads it in a way a fusion cannot reproduce"
        if _passes(user):
            between.append(user)
            cur = user
            continue
        return user, between, ""


def match_chain(dw: fx.Node) -> tuple[dict | None, str]:
    """The chain starting at depthwise conv ``dw``, read from the graph in either dialect
    (:func:`compress_ops.capture.canonical`): ``{"nodes": [every node of the chain, in
    order], "pad", "dw", "bn1", "pw", "bn2": node or None, "act1", "act2": activation name or
    None}``, or None and the reason."""
    chain = {"nodes": [], "pad": None, "dw": dw, "bn1": None, "act1": None, "pw": None,
             "bn2": None, "act2": None}
    src = dw.args[0]
    kind, kw = _kind(src) if isinstance(src, fx.Node) else (None, {})
    if kind == "pad" and len(src.users) == 1 and not _symbolic(kind, kw):
        pads = list(kw["pad"])
        if len(pads) == 4 and all(isinstance(p, int) for p in pads) and min(pads) >= 0 \
                and kw.get("mode", "constant") == "constant" \
                and float(kw.get("value") or 0.0) == 0.0:
            chain["pad"] = src  # (a crop, a non-zero or non-constant pad stays in front)
    chain["nodes"] = [n for n in (chain["pad"], dw) if n is not None]
    why = _constant_args(dw)
    if why:
        return None, why
    cur = dw
    for slot in ("bn1", "act1", "pw", "bn2", "act2"):
        nxt, between, why = _link(cur)
        kind = _kind(nxt)[0] if nxt is not None else None
        ok = nxt is not None and (
            (slot in ("bn1", "bn2") and kind == "batch_norm")
            or (slot in ("act1", "act2") and _act_of(nxt) is not None)
            or (slot == "pw" and kind == "conv2d"))
        if not ok:
            if slot == "pw":
                if nxt is not None:
                    why = f"{_op(nxt)} is applied to it before any 1x1 conv: {_FUSABLE}"
                return None, f"no 1x1 conv reads its output ({why})"
            continue
        why = _constant_args(nxt)
        if why:
            return None, why
        if kind == "batch_norm" and _kind(nxt)[1]["training"]:
            return None, ("BatchNorm runs in training mode (batch statistics): call model.eval() "
                          "before fusing")
        chain["nodes"] += between + [nxt]
        chain[slot] = _act_of(nxt) if slot.startswith("act") else nxt
        cur = nxt
    return chain, ""


def _modules_for(cap: Captured, model: nn.Module, chain: dict) -> tuple[list[str], str]:
    """The modules whose calls compute exactly the chain, in chain order (the first one
    receives the fused module, the others become ``nn.Identity``), or [] and why not."""
    nodes = chain["nodes"]
    pos = {n: i for i, n in enumerate(nodes)}
    owners: list[str] = []
    for n in nodes:
        owner = cap.owner(n)
        if not owner:
            return [], (f"{_op(n)} is called in the model's own "
                        f"forward: only whole modules can be replaced")
        owners.append(owner)
    # a module whose ancestor is also an owner is replaced with it
    top = [o for o in dict.fromkeys(owners)
           if not any(o.startswith(a + ".") for a in owners if a != o)]
    aliases = {}
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    for path in top:
        mod = model.get_submodule(path)
        inside = [n for alias in aliases[id(mod)] for n in cap.nodes_in(alias)]
        extra = [n for n in inside if n not in pos]
        calls = {key for n in inside for key, (p, _) in n.meta["nn_module_stack"].items()
                 if p in aliases[id(mod)]}
        if extra and len(calls) > 1:
            return [], (f"{path} ({type(mod).__name__}) is called {len(calls)} times in the "
                        f"forward (a shared module): replacing it would change every call")
        if extra:
            what = _op(extra[0])
            return [], (f"{path} ({type(mod).__name__}) also computes {what} (node "
                        f"{extra[0].name}), outside the chain: only whole modules can be "
                        f"replaced")
        idx = sorted(pos[n] for n in inside)
        if idx != list(range(idx[0], idx[-1] + 1)):
            return [], f"{path} ({type(mod).__name__}) computes a non-contiguous part of the chain"
        for t in list(mod.parameters()) + list(mod.buffers()):
            node = cap.placeholder_of(t)
            if node is not None and set(node.users) - set(pos):
                return [], (f"{path} ({type(mod).__name__}): its tensor {cap.state[node.name]} "
                            f"is also read outside the chain")
    top.sort(key=lambda p: min(pos[n] for n in cap.nodes_in(p)))  # the chain's first first
    return top, ""


def _temp_conv(tensor, node: fx.Node) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` computing what conv ``node`` does, on the tensors ``tensor(arg)``
    gives (the model's own, or meta stand-ins)."""
    kw = _kind(node)[1]
    w = tensor(kw["weight"])
    b = None if kw["bias"] is None else tensor(kw["bias"])
    if w is None or (kw["bias"] is not None and b is None):
        raise UnfusableError(f"the conv's {'weight' if w is None else 'bias'} is computed in "
                             f"the forward, not a stored tensor")
    groups = int(kw["groups"])
    pad = kw["padding"] if isinstance(kw["padding"], str) else tuple(kw["padding"])
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[-2:]), tuple(kw["stride"]),
                     pad, tuple(kw["dilation"]), groups, bias=False, device="meta")
    conv._parameters["weight"] = w
    conv._parameters["bias"] = b
    return conv


def _temp_bn(tensor, node: fx.Node | None) -> nn.BatchNorm2d | None:
    if node is None:
        return None
    kw = _kind(node)[1]
    got = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        got[key] = None if kw[key] is None else tensor(kw[key])
        if kw[key] is not None and got[key] is None:
            raise UnfusableError(f"BatchNorm's {key} is computed in the forward")
    if got["running_mean"] is None or got["running_var"] is None:
        raise UnfusableError("BatchNorm without running statistics cannot be folded")
    bn = nn.BatchNorm2d(got["running_mean"].shape[0], eps=float(kw["eps"]), device="meta")
    for key in ("weight", "bias"):
        bn._parameters[key] = got[key]
    for key in ("running_mean", "running_var"):
        bn._buffers[key] = got[key]
    return bn.eval()


def build_fused(chain: dict, tensor) -> FusedDWSepConv2d:
    """The fused module for a matched chain, on the tensors ``tensor(node)`` gives for the
    graph's weight arguments (meta stand-ins give a meta module: the checks and the geometry,
    no values); raises UnfusableError naming what it cannot do."""
    dw, pw = _temp_conv(tensor, chain["dw"]), _temp_conv(tensor, chain["pw"])
    bn1, bn2 = _temp_bn(tensor, chain["bn1"]), _temp_bn(tensor, chain["bn2"])
    pad = None if chain["pad"] is None else nn.ZeroPad2d(tuple(_kind(chain["pad"])[1]["pad"]))
    acts = [None if chain[a] is None else _ACT_MODULES[chain[a]]() for a in ("act1", "act2")]
    check_compute_dtype("FusedDWSepConv2d", dw.weight.dtype, UnfusableError)
    return FusedDWSepConv2d.from_modules(dw, pw, bn1, acts[0], bn2, acts[1], pad)


def _outputs(model: nn.Module, example_inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        flat, _ = tree_flatten(model(*example_inputs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _differ(new: list[torch.Tensor], ref: list[torch.Tensor]) -> str:
    """Why ``new`` does not equal ``ref`` within the rounding a BatchNorm fold and the fused
    op's own rounding cause, or ``""``."""
    if len(new) != len(ref):
        return f"{len(new)} output tensors instead of {len(ref)}"
    for a, b in zip(new, ref, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"an output of shape {tuple(a.shape)} {a.dtype}, not {tuple(b.shape)} {b.dtype}"
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return "a non-float output changed"
            continue
        tol = 1e-3 if b.dtype in (torch.float32, torch.float64) else 2e-2
        scale = b.detach().abs().double().max().item() if b.numel() else 0.0
        err = (a.detach().double() - b.detach().double()).abs().max().item() if b.numel() else 0.0
        if not err <= tol * max(scale, 1e-6):  # (NaN fails)
            return f"max abs error {err:.3g} against an output scale of {scale:.3g}"
    return ""


def fuse_exported(model: nn.Module, example_inputs: tuple, filter_fn=None,
                  fix_input_size: bool = False) -> tuple[list[str], dict[str, str]]:
    """Fuse every depthwise-separable chain ``torch.export`` finds in
    ``model(*example_inputs)``, in place; return the fused names and ``{name: reason}``.

    The chain is matched on what runs, never on a class name: ``[constant zero pad] ->
    depthwise conv2d -> [batch_norm] -> [relu / relu6 / hardswish / silu] -> 1x1 conv2d ->
    [batch_norm] -> [activation]``, eval-mode dropout allowed in between, each value read only
    by the next op, every weight a stored parameter. So a ``Conv2d`` subclass that pads in its
    ``forward``, a wrapper such as timm's ``BatchNormAct2d`` and a direct ``F.conv2d`` on a
    module's parameter are all seen. The chain is then mapped back to modules: the modules
    whose ``forward`` computed it (innermost, or the outer one when it holds several links)
    must compute nothing else and be read nowhere else. The first becomes the
    :class:`FusedDWSepConv2d`, the others ``nn.Identity``.

    A padding or stride that a module's own ``forward`` computes from the input's size (TF
    "same" padding done per call) is constant only for the traced size: such a chain is left
    unfused unless ``fix_input_size``. Then it is fused for that size and the fused module
    raises ``ValueError`` for any other (``FusedDWSepConv2d.input_size``). Finally the fused
    model runs on ``example_inputs`` against the original's outputs; if they differ beyond
    rounding, every swap is undone and the reason recorded.
    """
    fused: list[str] = []
    reasons: dict[str, str] = {}
    ref = _outputs(model, example_inputs)
    try:
        cap = capture_export(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - any capture failure: leave the model as it is
        msg = (str(exc).splitlines() or [""])[0][:200]
        why = f"torch.export could not capture the model ({type(exc).__name__}: {msg}); not fused"
        reasons["<root>"] = why
        for name, m in model.named_modules():
            if name and _is_depthwise(m):
                reasons[name] = why
        return fused, reasons
    swapped: list[tuple[list[str], nn.Module]] = []
    seen: set[int] = set()
    for node in list(cap.graph.nodes):
        if not is_dw_conv(node):
            continue
        w_name = cap.state.get(_kind(node)[1]["weight"].name, "")
        name = w_name.rpartition(".")[0] if w_name else cap.owner(node) or "<root>"
        chain, why = match_chain(node)
        mods: list[str] = []
        if chain is not None:
            mods, why = _modules_for(cap, model, chain)
        if not mods:
            reasons[name] = why
            continue
        objs = [model.get_submodule(p) for p in mods]
        hooked = [(p, hooks_reason(m)) for p, m in zip(mods, objs, strict=True) if hooks_reason(m)]
        if hooked:
            reasons[name] = f"{hooked[0][0]} {hooked[0][1]}"
            continue
        if any(id(m) in seen for m in objs):
            reasons[name] = f"{mods[0]} is part of another chain"
            continue
        dependent = [(p, size_dependent(m)) for p, m in zip(mods, objs, strict=True)]
        dependent = [(p, d) for p, d in dependent if d]
        if dependent and not fix_input_size:
            p, d = dependent[0]
            reasons[name] = (f"{p} ({type(model.get_submodule(p)).__name__}): {d}; "
                             f"DWSepFuseConfig(fix_input_size=True) fuses it for the traced "
                             f"size only")
            continue
        if filter_fn is not None and not filter_fn(model.get_submodule(w_name.rpartition(".")[0])
                                                   if w_name else objs[0], name):
            reasons[name] = "excluded by filter_fn"
            continue
        try:
            new = build_fused(chain, cap.tensor)
        except UnfusableError as exc:
            reasons[name] = str(exc)
            continue
        if dependent:
            src = chain["nodes"][0].args[0]
            new.input_size = tuple(int(s) for s in example_value(src).shape[-2:])
        for i, old in enumerate(objs):
            names = replace_everywhere(model, old, new if i == 0 else nn.Identity())
            swapped.append((names, old))
            seen.add(id(old))
        fused.append(mods[0])
        if dependent:
            reasons[mods[0]] = (f"fused for input size {new.input_size[0]}x{new.input_size[1]} "
                                f"only (fix_input_size=True: {dependent[0][1]})")
    why = _differ(_outputs(model, example_inputs), ref) if fused else ""
    if why:
        for names, old in reversed(swapped):
            for n in names:
                set_submodule(model, n, old)
        msg = (f"the fused model's output on example_inputs differs from the original ({why}): "
               f"every fusion was undone")
        reasons.update(dict.fromkeys(fused, msg))
        return [], reasons
    return fused, reasons
