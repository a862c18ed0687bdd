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

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_flatten

from compress_ops._swap import hooks_reason, replace_everywhere, set_submodule
from compress_ops.capture import Captured, size_dependent
from compress_ops.capture import export as capture_export
from compress_ops.capture import trace as capture_trace
from compress_ops.configs import UnfusableError
from compress_ops.nn.base import check_compute_dtype
from compress_ops.nn.dwsep_conv import FusedDWSepConv2d, activation_name

__all__ = ["fuse_dwsep"]


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
    fused: list[str] = []
    reasons: dict[str, str] = {}
    _search(model, model, "", filter_fn, fused, reasons)
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

_aten = torch.ops.aten
_CONVS = {_aten.conv2d.default, _aten.conv2d.padding}
_PADS = {_aten.pad.default, _aten.constant_pad_nd.default}
_ACTS = {_aten.relu.default: "relu", _aten.relu_.default: "relu",
         _aten.hardswish.default: "hardswish", _aten.hardswish_.default: "hardswish",
         _aten.silu.default: "silu", _aten.silu_.default: "silu",
         _aten.relu6.default: "relu6"}
_HARDTANH = {_aten.hardtanh.default, _aten.hardtanh_.default}
_SE_READS = {_aten.mean.dim, _aten.adaptive_avg_pool2d.default}
_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


def _op(node: fx.Node) -> str:
    """An ATen op's short name (``relu`` for ``aten.relu.default``)."""
    t = node.target
    return getattr(t, "_opname", None) or getattr(t, "__name__", str(t))


def _kw(node: fx.Node) -> dict:
    """``node``'s arguments by schema name, defaults filled in."""
    pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                              normalize_to_only_use_kwargs=True)
    return dict(pair.kwargs) if pair is not None else {}


def _val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _act_of(node: fx.Node) -> str | None:
    if node.target in _ACTS:
        return _ACTS[node.target]
    if node.target in _HARDTANH:
        kw = _kw(node)
        if float(kw.get("min_val", -1.0)) == 0.0 and float(kw.get("max_val", 1.0)) == 6.0:
            return "relu6"
    return None


def _passes(node: fx.Node) -> bool:
    """An op that leaves its input as it is (eval-mode dropout)."""
    if node.target in (_aten.dropout.default, _aten.feature_dropout.default):
        return not _kw(node).get("train", True) or float(_kw(node).get("p", 1.0)) == 0.0
    return False


def _is_dw_conv(cap: Captured, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CONVS:
        return False
    kw, x = _kw(node), _val(node.args[0])
    w = _val(kw.get("weight"))
    return (x is not None and w is not None and w.dim() == 4 and x.dim() == 4 and kw["groups"] > 1
            and kw["groups"] == x.shape[1] == w.shape[0] and w.shape[1] == 1)


def _link(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node], str]:
    """The op that reads ``node`` next (skipping pass-through ops, returned in between), or
    None and why not."""
    between: list[fx.Node] = []
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            ops = {_op(u) for u in users}
            if any(u.target in _SE_READS for u in users) and any(
                    u.target in (_aten.mul.Tensor, _aten.mul_.Tensor) for u in users):
                return None, between, ("a squeeze-excite block (x * gate(mean(x))) reads it "
                                       "before the 1x1 conv: a different chain (depthwise, SE, "
                                       "pointwise), not fused")
            return None, between, (f"its output is read {len(users)} times "
                                   f"({', '.join(sorted(ops))})")
        user = users[0]
        if user.op != "call_function" or not user.args or user.args[0] is not cur:
            what = _op(user)
            return None, between, f"{what} reads it in a way a fusion cannot reproduce"
        if _passes(user):
            between.append(user)
            cur = user
            continue
        return user, between, ""


def _param(cap: Captured, arg) -> tuple[torch.Tensor | None, str]:
    """The model tensor a conv/BN argument reads (None when the argument is None), or a reason."""
    if arg is None:
        return None, ""
    t = cap.tensor(arg)
    if t is None:
        return None, f"its argument {arg.name} is computed in the forward, not a stored tensor"
    return t, ""


def _match(cap: Captured, dw: fx.Node) -> tuple[dict | None, str]:
    """``{"nodes": [...], "pad", "dw", "bn1", "act1", "pw", "bn2", "act2"}`` (nodes or
    activation names, None when absent) for the chain starting at depthwise conv ``dw``, or
    None and the reason."""
    chain = {"nodes": [], "pad": None, "dw": dw, "bn1": None, "act1": None, "pw": None,
             "bn2": None, "act2": None}
    src = dw.args[0]
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target in _PADS \
            and len(src.users) == 1:
        kw = _kw(src)
        pads = list(kw.get("pad", []))
        if len(pads) == 4 and min(pads) >= 0 and kw.get("mode", "constant") == "constant" \
                and float(kw.get("value") or 0.0) == 0.0:
            chain["pad"] = src  # (a crop, a non-zero or non-constant pad stays in front)
    chain["nodes"] = [n for n in (chain["pad"], dw) if n is not None]
    cur = dw
    for slot in ("bn1", "act1", "pw", "bn2", "act2"):
        nxt, between, why = _link(cur)
        ok = nxt is not None and (
            (slot in ("bn1", "bn2") and nxt.target is _aten.batch_norm.default)
            or (slot in ("act1", "act2") and _act_of(nxt) is not None)
            or (slot == "pw" and nxt.target in _CONVS))
        if not ok:
            if slot == "pw":
                if nxt is not None:
                    what = _op(nxt)
                    why = (f"{what} is applied to it before any 1x1 conv: only BatchNorm and "
                           f"a ReLU, ReLU6, Hardswish or SiLU can sit in between")
                return None, f"no 1x1 conv reads its output ({why})"
            continue
        if slot in ("bn1", "bn2") and _kw(nxt)["training"]:
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


def _temp_conv(cap: Captured, node: fx.Node) -> tuple[nn.Conv2d | None, str]:
    """A plain ``nn.Conv2d`` (sharing the model's tensors) computing what conv ``node`` does."""
    kw = _kw(node)
    w, why = _param(cap, kw["weight"])
    b, why_b = _param(cap, kw.get("bias"))
    if w is None or why_b:
        return None, f"the {'weight' if w is None else 'bias'} is computed in the forward"
    groups = int(kw["groups"])
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[-2:]),
                     tuple(kw["stride"]), kw["padding"] if isinstance(kw["padding"], str)
                     else tuple(kw["padding"]), tuple(kw["dilation"]), groups, bias=False,
                     device="meta")
    conv._parameters["weight"] = w
    conv._parameters["bias"] = b
    return conv, ""


def _temp_bn(cap: Captured, node: fx.Node | None) -> tuple[nn.BatchNorm2d | None, str]:
    if node is None:
        return None, ""
    kw = _kw(node)
    if kw["training"]:
        return None, ("BatchNorm runs in training mode (batch statistics): call model.eval() "
                      "before fusing")
    tensors = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        tensors[key], why = _param(cap, kw[key])
        if why:
            return None, f"BatchNorm's {key} is computed in the forward"
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        return None, "BatchNorm without running statistics cannot be folded"
    bn = nn.BatchNorm2d(tensors["running_mean"].shape[0], eps=float(kw["eps"]), device="meta")
    for key in ("weight", "bias"):
        bn._parameters[key] = tensors[key]
    for key in ("running_mean", "running_var"):
        bn._buffers[key] = tensors[key]
    return bn.eval(), ""


def _build(cap: Captured, chain: dict) -> FusedDWSepConv2d:
    """The fused module for a matched chain; raises UnfusableError naming what it cannot do."""
    dw, why = _temp_conv(cap, chain["dw"])
    pw, why_pw = _temp_conv(cap, chain["pw"])
    if dw is None or pw is None:
        raise UnfusableError(why or why_pw)
    bn1, why = _temp_bn(cap, chain["bn1"])
    bn2, why2 = _temp_bn(cap, chain["bn2"])
    if why or why2:
        raise UnfusableError(why or why2)
    pad = None if chain["pad"] is None else nn.ZeroPad2d(tuple(_kw(chain["pad"])["pad"]))
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
        if not _is_dw_conv(cap, node):
            continue
        w_name = cap.state.get(_kw(node)["weight"].name, "")
        name = w_name.rpartition(".")[0] if w_name else cap.owner(node) or "<root>"
        chain, why = _match(cap, node)
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
            new = _build(cap, chain)
        except UnfusableError as exc:
            reasons[name] = str(exc)
            continue
        if dependent:
            src = chain["nodes"][0].args[0]
            new.input_size = tuple(int(s) for s in _val(src).shape[-2:])
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
