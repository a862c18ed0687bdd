"""Calibration passes: running a model on a user's batches and collecting what one-shot
methods need from each layer's inputs (the Hessian ``H = 2 X^T X / n`` of GPTQ and SparseGPT).

Batches are run as :func:`run_batch` runs them (``model(**batch)`` for a mapping, ``model(x)``
for ``(x, y)`` tuples, else ``model(batch)``; or the user's ``forward(model, batch)``), in eval
mode, without gradients. :func:`input_hessians` calibrates every layer from the dense model's
inputs in one pass; :func:`sequential_build` (what ``compress_(..., calib=)`` runs) walks a
model's stack of blocks and calibrates each block on the outputs of the blocks before it,
already compressed, as GPTQ and SparseGPT do on large models.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compress_ops._linear import in_features

__all__ = ["eval_mode", "run_batch", "run_with_hooks", "input_hessians", "find_blocks",
           "sequential_build", "Blocks", "NO_BLOCKS", "main_output"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run calibration in eval mode (BatchNorm statistics untouched, dropout off); every
    module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def run_batch(model: nn.Module, batch, forward: Callable[[nn.Module, object], object] | None):
    """Run one calibration ``batch``: ``forward(model, batch)``, or by default ``model(**batch)``
    for a mapping (a Hugging Face ``BatchEncoding``, ``{"input_ids": ...}``), ``model(batch[0])``
    for a tuple / list (``(x, y)`` from a DataLoader), else ``model(batch)``."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def run_with_hooks(model: nn.Module, hooks: list, batches: Iterable,
                   forward: Callable[[nn.Module, object], object] | None = None) -> int:
    """Run every batch (:func:`run_batch`, eval mode), then remove ``hooks`` (the handles the
    caller registered to collect what it needs), also on an error; returns the batch count."""
    ran = 0
    try:
        with eval_mode(model):
            for batch in batches:
                run_batch(model, batch, forward)
                ran += 1
    finally:
        for h in hooks:
            h.remove()
    return ran


@torch.no_grad()
def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                   forward: Callable[[nn.Module, object], object] | None = None, *,
                   strict: bool = True,
                   absmax: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{name: H}`` with ``H = 2 X^T X / n`` (float32 ``[K, K]``, on the layer's device) over
    every row ``x`` (a token, a sample) each linear layer of ``layers`` (``nn.Linear`` or
    Hugging Face ``Conv1D``) reads on ``batches``. ``ValueError`` for a layer that never ran
    (``strict=False``: it is left out), for non-finite inputs (named), and for no batches.
    ``absmax``: a dict that also receives ``{name: max |x| per input channel}`` (float32
    ``[K]``, SmoothQuant's and the static activation scales' statistic)."""
    if not layers:  # (nothing to record: no pass)
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, k: int):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, k).float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"calibration: the inputs of {name} hold NaN or Inf; GPTQ's "
                                 f"Hessian needs finite activations")
            h = x.t() @ x
            sums[name] = sums[name] + h if name in sums else h
            if absmax is not None and x.shape[0]:
                top = x.abs().amax(0)
                absmax[name] = torch.maximum(absmax[name], top) if name in absmax else top
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    hooks = [m.register_forward_hook(hook(n, in_features(m))) for n, m in layers.items()]
    if run_with_hooks(model, hooks, batches, forward) == 0:
        raise ValueError("calibration needs at least one batch (calib= was empty)")
    missing = [n for n in layers if n not in sums]
    if missing and strict:
        raise ValueError(f"layers never ran on the calibration data: {missing}")
    return {n: 2.0 * s / counts[n] for n, s in sums.items()}


# --------------------------------------------------------------------------------------------
# The sequential pipeline: block by block, each block calibrated on the outputs of the
# already-compressed blocks before it
# --------------------------------------------------------------------------------------------


#: :func:`sequential_build`'s reason for a model without a stack of blocks.
NO_BLOCKS = "no nn.ModuleList / nn.Sequential of blocks holds two or more of its layers"


class _Stop(Exception):
    """Raised by a pre-hook to stop a forward pass once the first block's inputs are caught."""


@dataclass
class Blocks:
    """The chain :func:`sequential_build` walks: ``container`` (the qualified name of an
    ``nn.ModuleList`` / ``nn.Sequential``) and its children, run one after the other, each on
    the previous one's output."""

    container: str
    blocks: list[nn.Module]


def find_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> Blocks | None:
    """The ``nn.ModuleList`` or ``nn.Sequential`` of ``model`` whose children hold the most of
    ``layers`` (at least two children holding some): a transformer's stack of blocks
    (``model.layers``, ``encoder.layer``, ``transformer.h``), or a Sequential's layers. None
    when there is none. Whether the children really run as a chain is checked on data by
    :func:`sequential_build`."""
    wanted = {id(m) for m in layers.values()}
    best: tuple[int, int, str, list[nn.Module]] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        children = list(mod)
        held = [sum(id(m) in wanted for m in child.modules()) for child in children]
        if sum(h > 0 for h in held) < 2:
            continue
        key = (sum(held), len(children))
        if best is None or key > best[:2]:
            best = (*key, name, children)
    return None if best is None else Blocks(best[2], best[3])


def main_output(out: object) -> object:
    """The tensor a block hands on: its output, or the first element of a tuple / list /
    Hugging Face ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    if isinstance(out, Mapping) and out:
        return next(iter(out.values()))
    return None


def _hidden(args: tuple, kwargs: dict) -> object:
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _same(a: object, b: object) -> bool:
    """Equal arguments of two blocks' calls: tensors equal, containers element by element,
    other objects equal or identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype):
            return False
        if a is b or bool(torch.equal(a, b)):
            return True
        # (NaN where the other has NaN: the same tensor passed on; the NaN itself is
        # reported by the Hessian pass, not mistaken for a broken chain)
        return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (an object whose == is not a truth value)
        return False


def _stateful(obj: object) -> str | None:
    """The class name of a cache-like argument (a key/value cache that every call updates)."""
    if isinstance(obj, (tuple, list)):
        return next((s for s in map(_stateful, obj) if s), None)
    if isinstance(obj, Mapping):
        return next((s for s in map(_stateful, obj.values()) if s), None)
    name = type(obj).__name__
    return name if "Cache" in name and hasattr(obj, "update") else None


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """Hugging Face models build a key/value cache during a forward pass unless
    ``config.use_cache`` is off; the pipeline runs every block twice per batch, so it must be."""
    config = getattr(model, "config", None)
    had = getattr(config, "use_cache", None)
    if had:
        config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = had


class _Probe:
    """One dense forward pass on the first batch, recording the order in which blocks and
    layers run, each block's arguments and output."""

    def __init__(self, blocks: list[nn.Module], layers: dict[str, nn.Module]) -> None:
        self.calls: list[tuple[str, int]] = []
        self.args: dict[int, tuple[tuple, dict]] = {}
        self.outs: dict[int, object] = {}
        self.hooks = []
        for i, b in enumerate(blocks):
            self.hooks.append(b.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.hooks.append(b.register_forward_hook(self._post(i)))
        for name, m in layers.items():
            self.hooks.append(m.register_forward_hook(
                lambda mod, a, o, name=name: self.calls.append(("layer", name))))

    def _pre(self, i: int):
        def fn(mod, args, kwargs):
            self.calls.append(("block", i))
            self.args.setdefault(i, (args, kwargs))
        return fn

    def _post(self, i: int):
        def fn(mod, args, out):
            self.calls.append(("end", i))
            self.outs.setdefault(i, main_output(out))
        return fn

    def why_not_a_chain(self, n: int, inside: set[str]) -> str | None:
        """None when blocks 0..n-1 ran once each, in order, every one on the previous one's
        output with the first one's other arguments, and no layer outside them ran between
        two of them; else the reason."""
        order = [i for kind, i in self.calls if kind == "block"]
        if order != list(range(n)):
            return f"its blocks ran in the order {order[:12]}, not once each in order"
        first = self.calls.index(("block", 0))
        last = self.calls.index(("end", n - 1))
        between = [name for k, (kind, name) in enumerate(self.calls)
                   if kind == "layer" and name not in inside and first < k < last]
        if between:
            return f"{between[0]} runs between two blocks"
        args0, kwargs0 = self.args[0]
        for i in range(n):
            args, kwargs = self.args[i]
            hidden = _hidden(args, kwargs)
            if not isinstance(hidden, torch.Tensor):
                return f"block {i} takes no tensor first (or as hidden_states)"
            cache = _stateful((args, kwargs))
            if cache:
                return f"block {i} takes a {cache}, which every call updates"
            if i and not _same(hidden, self.outs[i - 1]):
                return f"block {i} does not take block {i - 1}'s output"
            if i and not (_same(args[1:], args0[1:]) and _same(kwargs, kwargs0)):
                return f"block {i} takes other arguments than block 0"
        return None

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _replaced(modules: dict[int, tuple[nn.Module, nn.Module]]) -> list:
    """Forward hooks that make each dense module return its compressed replacement's output
    (``{id: (dense, new)}``), so later blocks see the compressed model; returns the handles."""
    return [dense.register_forward_hook(lambda mod, args, out, new=new: new(*args))
            for dense, new in modules.values()]


def _progress(total: int, show: bool | None, what: str):
    """A progress bar over the blocks: tqdm where it is installed, else a line per block on
    stderr. ``show=None`` shows it when stderr is a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        count = [0]

        def step() -> None:
            count[0] += 1
            print(f"calibrating {what}: block {count[0]}/{total}", file=sys.stderr, flush=True)
        return step
    bar = tqdm(total=total, desc=f"calibrating {what}", unit="block")

    def tick() -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return tick


Build = Callable[[str, nn.Module, torch.Tensor], "nn.Module | Exception"]
#: ``prepare(container, layers, hessians, run)``: called before a group of layers is built
#: (``layers`` and ``hessians`` by name; ``run()`` runs ``container`` on a calibration batch and
#: returns its output tensor). It may change the container's weights if the function it
#: computes stays the same (AWQ's folds).
Prepare = Callable[[nn.Module, dict, dict, Callable[[], object]], None]


@torch.no_grad()
def sequential_build(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                     forward: Callable[[nn.Module, object], object] | None, build: Build, *,
                     sequential: bool = True, progress: bool | None = None,
                     on_fallback: Callable[[str], None] | None = None,
                     prepare: Prepare | None = None,
                     absmax: dict[str, torch.Tensor] | None = None,
                     plain: frozenset[str] = frozenset()
                     ) -> dict[str, nn.Module | Exception]:
    """Compress ``layers`` (``{name: linear}``) of ``model`` one block at a time:
    ``{name: build(name, layer, H)}``, where ``H`` is the layer's input Hessian (as
    :func:`input_hessians`) taken on the inputs it gets when every layer before it is
    already compressed. ``build`` returns the new module, or an exception instance to keep
    the layer dense (it then stays dense for the later blocks too). ``model`` is not changed.

    The blocks are :func:`find_blocks`' chain. ``batches`` (read once into a list) run
    through the model up to the first block, whose arguments are kept; then each block runs on
    them twice, once to collect its layers' Hessians and, after they are built, once with the
    compressed layers to produce the next block's inputs. Memory: one block's inputs for every
    batch, plus its layers' Hessians. Layers before the first block are calibrated first (on
    the dense model), those after the last one in a final pass through the whole model with
    every block compressed.

    One dense pass on the first batch checks that the blocks form a chain (each runs once, in
    order, on the previous one's output, with the first one's other arguments, and nothing
    compressible runs between them). A model without such a chain, or ``sequential=False``,
    is calibrated layer by layer from the dense model's inputs (one pass), and
    ``on_fallback(reason)`` is told why. Hugging Face models run with ``config.use_cache``
    off. ``progress``: a bar over the blocks (None: when stderr is a terminal).
    ``prepare`` (see :data:`Prepare`) runs before each group of layers (a block's, or those
    calibrated on the whole model) is built. ``absmax``: a dict that also receives each
    layer's input absmax per channel, from the same passes (see :func:`input_hessians`).
    ``plain``: names of ``layers`` whose config needs no data (a mixed Recipe's
    round-to-nearest layers): no Hessian is taken for them, ``build`` gets ``None``, and they
    are built in their block like the others, so later blocks see their compressed outputs.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch (calib= was empty)")
    chain = find_blocks(model, layers) if sequential else None
    why = None if sequential else "sequential=False"
    if sequential and chain is None:
        why = NO_BLOCKS
    with _no_kv_cache(model), eval_mode(model):
        if chain is not None:
            probe = _Probe(chain.blocks, layers)
            try:
                run_batch(model, batches[0], forward)
            finally:
                probe.remove()
            inside = {n for n, m in layers.items()
                      if any(m is x for b in chain.blocks for x in b.modules())}
            why = probe.why_not_a_chain(len(chain.blocks), inside)
            start = probe.calls.index(("block", 0)) if ("block", 0) in probe.calls else 0
            ahead = [name for kind, name in probe.calls[:start] if kind == "layer"]
        if why is not None:
            if on_fallback is not None:
                on_fallback(why)
            hessians = input_hessians(model, _data(layers, plain), batches, forward,
                                      absmax=absmax)
            if prepare is not None:
                prepare(model, layers, hessians, _runner(model, batches[0], forward))
            return {**{n: build(n, layers[n], h) for n, h in hessians.items()},
                    **{n: build(n, layers[n], None) for n in layers if n in plain}}
        return _walk(model, chain, layers, inside, ahead, batches, forward, build, progress,
                     prepare, absmax, plain)


def _data(layers: dict[str, nn.Module], plain: frozenset[str]) -> dict[str, nn.Module]:
    """The layers that need their input Hessian (not ``plain``)."""
    return {n: m for n, m in layers.items() if n not in plain}


def _runner(model: nn.Module, batch: object, forward) -> Callable[[], object]:
    return lambda: main_output(run_batch(model, batch, forward))


def _walk(model: nn.Module, chain: Blocks, layers: dict[str, nn.Module], inside: set[str],
          ahead: list[str], batches: list, forward, build: Build,
          progress: bool | None, prepare: Prepare | None,
          absmax: dict[str, torch.Tensor] | None,
          plain: frozenset[str] = frozenset()) -> dict[str, nn.Module | Exception]:
    """:func:`sequential_build` on a checked chain; ``ahead``: the layers that ran before
    the first block on the probe batch."""
    before = {n: layers[n] for n in dict.fromkeys(ahead)}
    after = {n: m for n, m in layers.items() if n not in inside and n not in before}
    built: dict[str, nn.Module | Exception] = {}
    live: dict[int, tuple[nn.Module, nn.Module]] = {}
    handles: list = []

    def adopt(group: dict[str, nn.Module], hessians: dict[str, torch.Tensor],
              container: nn.Module, run: Callable[[], object]) -> None:
        if prepare is not None:
            prepare(container, group, hessians, run)
        for n in [n for n in group if n in hessians or n in plain]:
            built[n] = new = build(n, group[n], hessians.get(n))
            if isinstance(new, nn.Module):
                live[id(group[n])] = (group[n], new)
                handles.extend(_replaced({id(group[n]): live[id(group[n])]}))

    try:
        if before:
            adopt(before, input_hessians(model, _data(before, plain), batches, forward,
                                         absmax=absmax), model,
                  _runner(model, batches[0], forward))
        inputs = _first_inputs(model, chain.blocks[0], batches, forward)
        tick = _progress(len(chain.blocks), progress, chain.container or "model")
        for i, block in enumerate(chain.blocks):
            mine = {n: m for n, m in layers.items() if n in inside
                    and any(m is x for x in block.modules())}
            if mine:
                adopt(mine, input_hessians(block, _data(mine, plain), inputs, _call_block,
                                           absmax=absmax),
                      block,
                      _runner(block, inputs[0], _call_block))
            if i + 1 < len(chain.blocks):
                inputs = [_with_hidden(a, k, main_output(block(*a, **k))) for a, k in inputs]
            tick()
        del inputs
        if after:
            adopt(after, input_hessians(model, _data(after, plain), batches, forward,
                                        absmax=absmax), model,
                  _runner(model, batches[0], forward))
    finally:
        for h in handles:
            h.remove()
    return built


def _call_block(block: nn.Module, item: tuple[tuple, dict]) -> object:
    args, kwargs = item
    return block(*args, **kwargs)


def _first_inputs(model: nn.Module, block: nn.Module, batches: list,
                  forward) -> list[tuple[tuple, dict]]:
    """The arguments the first block gets on every batch (the pass stops there)."""
    caught: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_batch(model, batch, forward)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught
