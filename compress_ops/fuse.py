"""Finding depthwise -> pointwise chains in a model and fusing them (``DWSepFuseConfig``).

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

from torch import fx, nn

from compress_ops._swap import hooks_reason, replace_everywhere
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


def fuse_dwsep(model: nn.Module, filter_fn=None) -> tuple[list[str], dict[str, str]]:
    """Fuse every depthwise-separable chain of ``model`` in place.

    Returns the names of the fused modules and ``{name: reason}`` for depthwise convs left
    unfused and for modules that ``torch.fx`` could not trace. An untraceable module is left
    as it is, with everything inside it: its ``forward`` may call its children in ways no trace
    shows (a slice of a Sequential, an intermediate output read twice); pass its traceable
    submodules to ``compress_`` directly to fuse them. ``filter_fn(dw_conv, name)`` returning
    False keeps a chain unfused.
    """
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
                                   f"pad or do more than a plain conv; not fused")
