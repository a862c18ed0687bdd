"""Hugging Face transformers: ``compress_ops`` as a transformers quantization method
(``quant_method="compress_ops"``).

* ``save_pretrained`` of a compressed ``PreTrainedModel`` writes the packed tensors and, in
  ``config.json``'s ``quantization_config``, the manifest of :mod:`.serialization` (which
  module is which compressed class, with which arguments; ties; report notes; configs).
* ``from_pretrained(saved_dir)`` builds the compressed modules on the meta device before the
  weights load (the manifest), so every tensor loads where it was saved: no warnings, nothing
  re-initialised, outputs bit for bit.
* ``from_pretrained(dense_dir, quantization_config=CompressOpsConfig(recipe=...))``
  compresses with ``recipe`` (a config, a ``Recipe`` or a ``Plan``) while loading: each layer a
  per-layer config applies to is compressed as soon as its weight is read (a transformers
  conversion op), so its dense weight never becomes a parameter. Layers that need every weight
  first (a shared codebook) or are shared under several names compress after loading. The
  peak memory is only somewhat lower than loading dense and compressing after (transformers
  holds the checkpoint's tensors while it loads; ``perf/load_memory.py`` measures it). The
  output embeddings and ``modules_to_not_convert`` stay dense, as transformers' quantizers
  keep them; tied weights stay dense as ``compress_`` keeps them.
* Accelerate offload (a ``device_map`` with ``"disk"``, ``"meta"``, or ``"cpu"`` beside an
  accelerator) is refused: offload hooks swap a module's parameters, not the packed buffers.

Registration: ``import compress_ops`` calls :func:`install`, which registers the config and
the quantizer with transformers as soon as ``transformers.quantizers.auto`` is imported (or at
once if it is), without importing transformers itself. ``save_pretrained`` also writes a
0-element placeholder at the dense ``<layer>.weight`` of every compressed layer (listed in the
manifest's ``"placeholders"``): a checkpoint loaded while ``compress_ops`` is not imported gets
transformers' warning "Unknown quantization type, got compress_ops ... we will skip the
quantization", then its load report (the placeholders MISMATCH, ``torch.Size([0])``) and a
``RuntimeError`` (a size mismatch; ``ignore_mismatched_sizes=True`` would re-initialise those
layers), never a model with random layers: import ``compress_ops`` first. With it imported the
placeholders are skipped (not unexpected keys); checkpoints written before them load as before.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.machinery
import re
import sys
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from compress_ops import _swap
from compress_ops.api import Recipe, compress_, config_for
from compress_ops.configs import (
    AlreadyCompressedError,
    UnsupportedModule,
    UnsupportedWeight,
    transform_for,
)
from compress_ops.integrations import serialization as ser
from compress_ops.nn.base import CompressedModule
from compress_ops.structured.surgery import resized_copy

__all__ = ["QUANT_METHOD", "install", "register", "is_pretrained_model", "attach"]
# (also CompressOpsConfig and CompressOpsHfQuantizer, defined on first use: they need transformers)

QUANT_METHOD = "compress_ops"
#: The manifest's list of the placeholder keys ``save_pretrained`` writes (0-element tensors at
#: the dense weights of the compressed layers: a load without compress_ops fails on them).
PLACEHOLDERS = "placeholders"
_AUTO = "transformers.quantizers.auto"


def is_pretrained_model(model: object) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing it)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


@cache
def _classes() -> tuple[type, type]:
    """Define (once) the config and the quantizer; needs transformers."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class CompressOpsConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a compress_ops model.

        ``recipe``: a compress_ops config or ``Recipe`` (or its JSON) applied after the dense
        weights load (``from_pretrained(dense_dir, quantization_config=...)``);
        ``modules_to_not_convert``: regexes of module names kept dense besides the output
        embeddings; ``manifest``: what ``save_pretrained`` wrote (set by it, read by
        ``from_pretrained``)."""

        def __init__(self, recipe: object = None, manifest: dict | None = None,
                     modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.recipe = (ser.config_from_json(recipe) if isinstance(recipe, dict)
                           else recipe)
            if self.recipe is not None:
                ser.config_to_json(self.recipe)  # a TypeError now for a config it cannot write
                rules = (self.recipe.rules.values() if isinstance(self.recipe, Recipe)
                         else [self.recipe])
                calibrated = [c for c in rules if getattr(c, "needs_calibration", False)]
                if calibrated:
                    raise ValueError(
                        f"{calibrated[0]!r} needs calibration data, which from_pretrained does "
                        f"not have: load the dense model, then compress_(model, config, "
                        f"calib=batches); save_pretrained and from_pretrained then keep it")
            self.manifest = manifest
            self.modules_to_not_convert = list(modules_to_not_convert or [])

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "recipe": ser.config_to_json(self.recipe),
                    "modules_to_not_convert": self.modules_to_not_convert,
                    "manifest": self.manifest}

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    class CompressOpsHfQuantizer(HfQuantizer):
        """transformers' side of compress_ops (see :mod:`compress_ops.integrations.hf`)."""

        requires_calibration = False

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            self.load_dtype = dtype  # the model's dtype: compressed modules follow it on load
            return dtype

        def validate_environment(self, *args: Any, device_map: Any = None,
                                 **kwargs: Any) -> None:
            if isinstance(device_map, dict):
                places = {str(v) for v in device_map.values()}
                offloaded = places & {"disk", "meta"} or (
                    {"cpu"} & places and places - {"cpu"})
                if offloaded:
                    raise ValueError(
                        f"compress_ops: device_map offloads modules ({sorted(places)}); "
                        f"accelerate's offload hooks move a module's parameters, not the "
                        f"packed buffers of compressed layers, so offload is refused. Load "
                        f"the model on one device (device_map={{'': 'cuda:0'}} or 'cpu').")
            if self.pre_quantized and not self.quantization_config.manifest:
                raise ValueError("compress_ops: this checkpoint's quantization_config has no "
                                 "manifest (it was not written by save_pretrained of a "
                                 "compressed model)")

        def _process_model_before_weight_loading(self, model: nn.Module,
                                                 **kwargs: Any) -> nn.Module:
            cfg = self.quantization_config
            if self.pre_quantized:  # the compressed skeleton, on the meta device
                man = ser.checked_manifest(cfg.manifest, "config.json quantization_config")
                ser.apply_manifest(model, man)
                _ignore_placeholders(model, man)
            elif cfg.recipe is not None:
                self.keep = _kept(model, cfg.modules_to_not_convert)
                self.streamed = _streamable(model, cfg.recipe, self.keep)
            return model

        def param_needs_quantization(self, model: nn.Module, param_name: str,
                                     **kwargs: Any) -> bool:
            module, _, attr = param_name.rpartition(".")
            return (not self.pre_quantized and attr == "weight"
                    and module in getattr(self, "streamed", {}))

        def get_quantize_ops(self) -> object:
            return _compress_op_class()(self)

        def _process_model_after_weight_loading(self, model: nn.Module,
                                                **kwargs: Any) -> nn.Module:
            cfg = self.quantization_config
            if self.pre_quantized:
                man = ser.checked_manifest(cfg.manifest, "config.json quantization_config")
                _follow_dtype(model, getattr(self, "load_dtype", None))
                ser.finish_load(model, man)  # (re-ties the shared tensors .to() copied)
            elif cfg.recipe is not None:
                _compress_the_rest(model, cfg.recipe, self.keep)
            _link(model, self)
            return model

        def get_state_dict_and_metadata(self, model: nn.Module):
            man, _ = ser.manifest(model, tensors=False)
            state = model.state_dict()
            buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
            for key in man["aliases"]:  # a shared codebook: a copy per layer (tiny), re-tied
                if key in buffers:  # on load; tied parameters are transformers' business
                    state[key] = state[key].clone()
            man[PLACEHOLDERS] = _add_placeholders(state, man)
            self.quantization_config.manifest = man
            return state, {}

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            return True  # (quantization-aware training, low-rank factors, hashed buckets)

        @property
        def is_compileable(self) -> bool:
            return True

    return CompressOpsConfig, CompressOpsHfQuantizer


def _add_placeholders(state: dict[str, torch.Tensor], man: dict[str, Any]) -> list[str]:
    """Put a 0-element tensor in ``state`` under the dense ``<name>.weight`` of every
    compressed module (each name it has) that has no tensor of that name; return their keys.
    transformers without compress_ops registered skips the quantization and builds the dense
    model: a placeholder makes that load fail (a size mismatch: ``[0]`` where the dense layer
    has its weight's shape) instead of giving those layers random weights. With compress_ops
    registered they are dropped (:func:`_ignore_placeholders`)."""
    keys = []
    for entry in man["modules"]:
        for name in entry["names"]:
            key = f"{name}.weight"
            if key not in state:
                state[key] = torch.empty(0, dtype=getattr(torch, entry["dtype"]))
                keys.append(key)
    return keys


def _ignore_placeholders(model: nn.Module, man: dict[str, Any]) -> None:
    """Make transformers skip the manifest's placeholders (no tensor of the compressed model
    has their keys, so they would be unexpected keys) without loading them anywhere."""
    keys = man.get(PLACEHOLDERS) or []  # (none in a checkpoint written before them)
    if keys:
        model._keys_to_ignore_on_load_unexpected = {
            *(model._keys_to_ignore_on_load_unexpected or ()),
            *(f"^{re.escape(k)}$" for k in keys)}


def _streamable(model: nn.Module, recipe: object, keep: dict[str, str]) -> dict[str, object]:
    """``{module name: config}`` of the layers compressed as their weights load (one at a
    time: the peak memory is the compressed model plus one dense layer): every layer a
    per-layer config applies to on its own. Shared codebooks (a table fitted over many layers),
    layers shared under several names, tied or hooked ones, and the kept ones are left for
    after loading (``compress_`` then says why any stays dense)."""
    idx = _swap.index(model)
    out: dict[str, object] = {}
    for mid, names in idx.names.items():
        module = idx.modules[mid]
        if len(names) != 1 or not names[0] or names[0] in keep:
            continue
        matched, cfg = config_for(recipe, names[0])
        if not matched or cfg is None:
            continue
        if not isinstance(module, transform_for(cfg).handles) or getattr(cfg, "shared", False):
            continue  # (a shared table is fitted over every layer it covers: after loading)
        if _swap.dense_reason(idx, module, names, cfg, None) is None:
            out[names[0]] = cfg
    return out


def _follow_dtype(model: nn.Module, dtype: object) -> None:
    """Convert the compressed modules of a loaded checkpoint to the dtype transformers loaded
    the rest of the model in (``from_pretrained(..., dtype=...)``, or the config's), as
    ``model.to(dtype)`` converts them (each module's ``.to``: its floating tensors, FP8 levels
    kept by ``W8A8Linear._apply``). transformers casts a checkpoint tensor to the dtype of the
    module tensor it loads into, and the compressed modules are built in the dtype they were
    saved in; so without this a model saved in float32 and loaded in bfloat16 has bfloat16
    activations meeting float32 scales. A module that the model's ``keep_in_fp32`` plan covers
    gets the plan's dtype, as a dense one there would."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    plan = [(re.compile(p.replace("*", ".*")), d) for p, d in plan.items()]
    idx = _swap.index(model)
    for mid, names in idx.names.items():
        module = idx.modules[mid]
        if not isinstance(module, CompressedModule):
            continue
        keys = [f"{n}.{k}" for n in names
                for k, _ in (*module.named_parameters(), *module.named_buffers())]
        module.to(next((d for p, d in plan for k in keys if p.search(k)), dtype))


def _compress_the_rest(model: nn.Module, recipe: object, keep: dict[str, str]) -> None:
    """After loading: compress what was not streamed (shared codebooks, ...) and note why the
    kept layers stay dense; record the config and the notes."""
    rest = [n for n, m in model.named_modules() if n and n not in keep
            and isinstance(m, _handled(recipe)) and not isinstance(m, CompressedModule)
            and config_for(recipe, n)[1] is not None]
    streamed = any(isinstance(m, CompressedModule) for m in model.modules())
    try:
        if not rest:
            raise AlreadyCompressedError("every layer was compressed as it loaded")
        with warnings.catch_warnings():
            if streamed:  # (layers were compressed while loading: the rest may all stay
                # dense, each with its note, without this pass having "changed nothing")
                warnings.filterwarnings("ignore", r"compress_\(.*\) changed nothing",
                                        UserWarning)
            compress_(model, recipe, filter_fn=lambda m, name: name in rest)
    except AlreadyCompressedError:  # the rest stayed dense (notes recorded): streamed layers
        _swap.record_config(model, recipe)
    notes = _swap.notes(model)
    idx = _swap.index(model)
    for name, why in keep.items():
        if notes.get(name, "excluded by filter_fn") == "excluded by filter_fn":
            # a kept layer that compress_ would keep too (a tied output embedding) gets
            # compress_'s own reason, so the report equals compressing after loading
            module, (matched, cfg) = model.get_submodule(name), config_for(recipe, name)
            if matched and cfg is not None and isinstance(module, transform_for(cfg).handles):
                why = _swap.dense_reason(idx, module, idx.names[id(module)], cfg, None) or why
            notes[name] = why
    _swap.record_notes(model, notes)


def _handled(recipe: object) -> tuple[type, ...]:
    configs = recipe.rules.values() if isinstance(recipe, Recipe) else [recipe]
    return tuple(dict.fromkeys(t for c in configs if c is not None
                               for t in transform_for(c).handles))


@cache
def _compress_op_class() -> type:
    """The transformers conversion op that compresses one layer as its weight loads."""
    from transformers.core_model_loading import ConversionOps

    class CompressOnLoad(ConversionOps):
        def __init__(self, quantizer: object) -> None:
            self.quantizer = quantizer

        def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                    target_patterns: list[str] | None = None, model: nn.Module | None = None,
                    missing_keys: set | None = None, **kwargs: Any) -> dict[str, Any]:
            (key, value), = input_dict.items()
            value = value[0] if isinstance(value, list) else value
            name = key.rpartition(".")[0]
            old = model.get_submodule(name)
            cfg = self.quantizer.streamed[name]
            dense = resized_copy(old)  # the layer with its loaded weight, for the transform
            dense._parameters["weight"] = nn.Parameter(
                value.detach().to(old.weight.dtype), requires_grad=False)
            bias = getattr(old, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.device.type == "meta":
                dense._parameters["bias"] = nn.Parameter(
                    torch.zeros(bias.shape, dtype=bias.dtype, device=value.device),
                    requires_grad=False)
            try:
                new = transform_for(cfg).build(dense, cfg)
            except UnsupportedWeight:
                raise
            except UnsupportedModule:  # stays dense: compress_ after loading says why
                del self.quantizer.streamed[name]
                return {key: value}
            if isinstance(bias, nn.Parameter):
                new.bias = bias  # loaded before or after the weight, into the same Parameter
            new.train(old.training)
            _swap.keep_layout(old, new)  # (as compress_ swaps one in: carry_state)
            _swap.set_submodule(model, name, new)
            if missing_keys is not None:
                missing_keys.discard(key)
            return {f"{name}.{k}": v for k, v in new.state_dict().items() if k != "bias"}

    return CompressOnLoad


def _kept(model: nn.Module, patterns: list[str]) -> dict[str, str]:
    """``{module name: why}`` kept dense on load: the output embeddings (as transformers'
    quantizers keep them), and the matches of ``modules_to_not_convert``."""
    keep = {n: "in modules_to_not_convert" for n, _ in model.named_modules()
            if any(re.fullmatch(p, n) for p in patterns)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        for n, m in model.named_modules(remove_duplicate=False):
            if m is out:
                keep.setdefault(n, "output embeddings: kept dense, as transformers' "
                                   "quantizers keep them")
    return keep


def _link(model: nn.Module, quantizer: object) -> None:
    model.config.quantization_config = quantizer.quantization_config
    model.hf_quantizer = quantizer
    # False: transformers refuses .half() / .float() of a model it calls quantized, and its
    # Trainer one without adapters; compressed modules convert with .to() / .half() as any
    # module does (scales, factors, codebooks; FP8 weights stay FP8) and train their own
    # parameters. save_pretrained goes through hf_quantizer either way.
    model.is_quantized = False
    model.quantization_method = QUANT_METHOD


def __getattr__(name: str) -> type:
    if name in ("CompressOpsConfig", "CompressOpsHfQuantizer"):
        register()
        config, quantizer = _classes()
        return config if name == "CompressOpsConfig" else quantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register ``quant_method="compress_ops"`` with transformers (idempotent; imports
    transformers)."""
    from transformers.quantizers import auto

    config, quantizer = _classes()
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not config:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not quantizer:
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer


def attach(model: nn.Module) -> None:
    """Make ``save_pretrained`` of a ``PreTrainedModel`` compressed by ``compress_`` write
    the manifest: give it the compress_ops ``quantization_config`` and quantizer (no-op for
    other models, and for one that has them)."""
    if not is_pretrained_model(model) or isinstance(getattr(model, "hf_quantizer", None),
                                                    _classes()[1]):
        return
    register()
    config, quantizer = _classes()
    _own_config(model)
    _link(model, quantizer(config(), pre_quantized=True))


def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and every submodule holding the same object) a copy of its config
    before the quantization config is set on it: a config object the user built the model
    from, and builds other (dense) models from, must not become a compress_ops one."""
    old = model.config
    new = copy.deepcopy(old)
    for m in model.modules():
        if m.__dict__.get("config") is old:
            m.config = new


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``transformers.quantizers.auto`` is imported."""

    def find_spec(self, fullname: str, path: object, target: object = None):
        if fullname != _AUTO:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: object, _run: Callable = run) -> None:
            _run(module)
            try:
                register()
            except Exception as exc:  # a transformers this code does not know: say so
                warnings.warn(f"compress_ops could not register with transformers: {exc}",
                              RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called by ``import compress_ops``: register with transformers when (or if) its
    quantizers are imported, and attach the quantizer to Hugging Face models ``compress_``
    compresses. Never imports transformers itself."""
    if _attach_hook not in _swap.AFTER_COMPRESS:
        _swap.AFTER_COMPRESS.append(_attach_hook)
    if _AUTO in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _attach_hook(model: nn.Module) -> None:
    if is_pretrained_model(model):
        attach(model)
