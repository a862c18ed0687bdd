"""compressed-tensors / vLLM interop: read and write ``pack-quantized`` checkpoints without the
``compressed-tensors`` library.

:func:`from_compressed_tensors` loads a compressed-tensors ``pack-quantized`` checkpoint (the
layout llm-compressor writes and vLLM serves: W4A16, W8A16, WnA16) into the dense model it was
made from, each quantized ``nn.Linear`` becoming a :class:`~compress_ops.nn.QuantLinear` holding
the same weight bit for bit. :func:`to_compressed_tensors` writes a compressed model in that
layout (``model.safetensors`` + ``config.json``) and returns a :class:`CompressedTensorsReport`.

The format (facts, with the files they were read from)
------------------------------------------------------
Read from ``vllm-project/compressed-tensors`` (formerly ``neuralmagic/compressed-tensors``)
and ``vllm-project/vllm``:

* ``src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py``
  (``pack_to_int32`` / ``unpack_from_int32``, ``compress_weight`` / ``compress_module``):

  - A quantized value is a *signed* integer ``q_s`` in ``[-2**(b-1), 2**(b-1) - 1]`` (int8
    in memory). Packing adds the offset ``2**(b-1)`` (unsigned ``q_u = q_s + 2**(b-1)``) and
    puts ``32 // b`` values (the pack factor ``pf``) in each int32 word, little-endian: value
    ``i`` of word ``j`` is element ``j * pf + i`` of the packed dimension, at bits
    ``[i b, (i + 1) b)``. Unpacking masks each field and subtracts ``2**(b-1)``.
  - ``pf = 32 // b`` for every ``1 <= b <= 8``: 3-bit fields are 10 per word (bits 30 and 31
    unused), 5/6/7-bit fields 6/5/4 per word. When the packed dimension is not a multiple of
    ``pf`` it is padded with *raw zero fields* (after the offset, i.e. ``q_s = -2**(b-1)``),
    which unpacking drops using ``weight_shape``.
  - ``<prefix>.weight_packed``: int32 ``[N, ceil(K / pf)]``, packed along K (dim 1).
    ``<prefix>.weight_shape``: the dense ``[N, K]`` (int64 as written by ``compress_weight``:
    ``torch.tensor(weight.shape)``; older ``compression_param_info`` declared int32).
  - Zero points: written only for asymmetric ``group`` / ``channel`` strategies, packed with
    the same offset and pack factor **along dim 0** (the output channels):
    ``<prefix>.weight_zero_point`` int32 ``[ceil(N / pf), n_groups]``. (vLLM's
    ``compressed_tensors_wNa16.py`` declares it the same way: ``output_size // pack_factor``
    rows, ``packed_dim=0``.) Older checkpoints may hold it unpacked as int8 ``[N, n_groups]``
    (signed); a tensor-strategy zero point is not packed (int8 ``[1]``). Symmetric schemes
    store no zero point (or an all-zero one).
  - ``PackedQuantizationCompressor.match_scheme`` (newest version) picks pack-quantized for
    int weights of 4 or 8 bits; the packers themselves accept 1..8 bits.

* ``src/compressed_tensors/quantization/lifecycle/forward.py`` (``_dequantize``,
  ``_process_quantization``): ``W = (q_s - zp) * scale``, computed in the scale's dtype
  (``x_q.to(scale.dtype)``, minus ``zero_point.to(scale.dtype)``, times ``scale``). Group
  strategy: column ``c`` uses group ``c // group_size``, ``ceil(K / group_size)`` groups
  (column order; an activation-ordered ``g_idx`` permutes columns into groups instead).
  Quantization is ``clamp(round(w / scale + zp), q_min, q_max)``.

* ``src/compressed_tensors/quantization/lifecycle/initialize.py`` (``initialize_qparams``):
  ``weight_scale`` shape per strategy: ``tensor`` ``[1]``, ``channel`` ``[N, 1]``, ``group``
  ``[N, ceil(K / group_size)]`` (``strategy_cdiv`` in ``quantization/utils/helpers.py`` only
  warns when K is not a multiple of the group size); dtype: the weight's (fp16 / bf16 / fp32 /
  fp64, else fp16). ``weight_zero_point`` is created with ``zp_dtype`` (int8 for int weights).

* ``src/compressed_tensors/quantization/quant_args.py`` (``QuantizationArgs``): ``num_bits``
  (default 8), ``type`` ``"int"`` / ``"float"``, ``symmetric``, ``group_size``, ``strategy``
  (``tensor``, ``channel``, ``group``, ``block``, ``token``, ``tensor_group``, ``attn_head``;
  inferred from ``group_size`` when absent: None -> tensor, > 0 -> group, -1 -> channel),
  ``block_structure``, ``dynamic``, ``actorder`` (``group``/``dynamic``: columns reordered,
  ``weight_g_idx`` saved; ``weight``/``static``: calibration order only, same format; ``True``
  means ``group``), ``observer``... The model forbids unknown keys (``extra="forbid"``).

* ``src/compressed_tensors/utils/match.py`` (``match_name``, ``is_match``): a target or ignore
  entry matches a module by exact name, by ``re:``-prefixed regex (``re.match`` on the name) or
  by a class name in the module's MRO (e.g. ``"Linear"``); ``match_targets`` ranks exact names,
  then regexes, then class names.

* The checkpoint's ``config.json`` holds ``quantization_config`` (``compression_config`` in
  early versions): ``quant_method: "compressed-tensors"``, ``format`` (``pack-quantized`` here;
  newer versions also allow a per-group ``format`` with a top-level ``mixed-precision``),
  ``config_groups`` ``{name: {"targets", "weights", "input_activations",
  "output_activations"}}``, ``ignore``, ``sparsity_config``, ``kv_cache_scheme``,
  ``quantization_status``.

Our side and the mapping
------------------------
:class:`QuantLinear` stores unsigned offset-binary fields ``q_u`` (the same ``q_s + 2**(b-1)``
for ``b >= 2``) in our own packed layout (:mod:`compress_ops.kernels.formats.dequant`: format
version 3 permutes the columns of every 32-column block for 2- and 4-bit fields, and 3-bit
fields are bit planes), so words are never copied: they are unpacked and packed again, which is
exact. ``W = (q_u - z) * s`` with ``z = 2**(b-1)`` when symmetric, which is
``q_s * s``; an integer zero point ``zp`` is ``z = zp + 2**(b-1)``. The weights dequantize bit
for bit alike in the model's dtype when it equals the checkpoint's scale dtype (an integer
``q_u - z`` of at most 9 bits times the scale is exact in float32, rounded once to the dtype,
as compressed-tensors rounds once in the scale's dtype). A wider model dtype holds the scales
exactly (its weights are then the unrounded products); one that cannot hold them is refused.

* Loading: ``group`` with a group size ``g`` of 32/64/128/256 maps one to one; a larger multiple
  of 32 (512, 1024, ...) maps to our largest group size dividing it with each scale repeated; a
  group covering the whole row (``g >= K``), ``channel`` and ``tensor`` (one scale repeated per
  row) map to whole-row groups. K not a multiple of 32 (or of the group) is padded to our packed
  width with zero weights. Widths 5, 6 and 7 bits are widened to 8-bit fields (exact, more
  memory); 1, 2, 3, 4 and 8 bits keep their width. Refused (:class:`CompressedTensorsError`,
  naming the layer and the reason): activation-ordered groups (``actorder: group`` or a
  non-trivial ``weight_g_idx``), other group sizes (not a multiple of 32 and smaller than K),
  ``num_bits`` outside 1..8, float (fp8 / fp4 / nvfp4) weights (not supported by this loader),
  quantized activations (W8A8 schemes), ``block`` / ``token`` / ``tensor_group`` strategies,
  dynamic weights, formats other than ``pack-quantized``, sparsity or transform configs, and
  missing or mis-shaped tensors. Dense tensors (embeddings, norms, biases, unquantized layers)
  load into the model's own parameters; every key must find its place and every model tensor
  its key (tied weights excepted).
* Writing: symmetric ``QuantLinear`` layers of 2, 3, 4 and 8 bits exactly (3 bits as 10 fields a
  word; vLLM's WNA16 kernels read 4 and 8 bits only); whole-row groups as ``channel``; symmetric
  binary (1-bit, ``±s/2``) exactly as 2-bit ``q_s`` in ``{-1, +1}`` with scale ``s/2``.
  Asymmetric layers whose zero points are integers are exact; fractional zero points (ours may
  be) need ``round_zero_points=True``, which rounds them (clamped to ``[0, 2**b - 1]``) and
  reports each layer's SQNR in dB (the signal ``W``, the noise ``W - W_rounded``) in the report
  and a warning; without it the layer is a :class:`CompressedTensorsError`. 2:4
  (``Sparse24Linear``), codebook, low-rank, W8A8 and asymmetric 1-bit layers are written dense
  (``dense_weight()``) and listed in the report and in ``ignore`` together with the plain
  linears (so vLLM, which looks every linear up in the targets, keeps them unquantized). Every
  quantized layer is targeted by its exact name. The report's ``notes`` flag what a consumer may
  not read: 2- and 3-bit fields, and a K that is not a multiple of the group size (allowed by
  the layout, but compressed-tensors' own decompression raises for it and vLLM expects a
  multiple). Tied tensors are stored once (under the first name).
* 2:4 sparsity: compressed-tensors dropped its 2:4 (``sparse-24-bitmask``) format and vLLM
  removed its 2:4 support in 2026, so our 2:4 layers stay in our own format: save them with
  ``co.save`` (this writer stores them dense).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress_ops import _swap
from compress_ops._linear import is_conv1d, plain_linear
from compress_ops.kernels.formats.dequant import (
    AFFINE_BITS,
    GROUP_SIZES,
    WORD_COLS,
    pack_bits,
    padded_k,
    symmetric_zero,
    unpack_bits,
)
from compress_ops.nn import QuantLinear
from compress_ops.nn.base import CompressedLinear, CompressedModule

__all__ = ["QUANT_METHOD", "FORMAT", "CompressedTensorsError", "CompressedTensorsReport",
           "from_compressed_tensors", "to_compressed_tensors", "ct_pack", "ct_unpack"]

#: ``quantization_config["quant_method"]`` of a compressed-tensors checkpoint.
QUANT_METHOD = "compressed-tensors"
#: The one compressed-tensors format this module reads and writes.
FORMAT = "pack-quantized"
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CONFIG = "config.json"
_INDEX = "model.safetensors.index.json"
_WEIGHTS = "model.safetensors"
_LAYER_KEYS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
               "weight_g_idx")


class CompressedTensorsError(ValueError):
    """A compressed-tensors checkpoint (or a model to write as one) this module cannot convert
    exactly; the message names the layer or key and the reason."""


@dataclass
class CompressedTensorsReport:
    """What :func:`to_compressed_tensors` wrote: ``quantized`` ``{layer: scheme}``, ``dense``
    ``{layer: why it was written dense}``, ``sqnr_db`` ``{layer: SQNR of rounding its zero
    points}`` (only layers whose zero points were rounded; ``inf`` when rounding changed
    nothing), ``notes`` ``{layer: what a consumer may not read}`` (3-bit fields, a K that is
    not a multiple of the group size), ``files`` the files written."""

    quantized: dict[str, str] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    sqnr_db: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


# -- the packed fields --------------------------------------------------------------------------


def ct_pack(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned ``bits``-bit fields ``values`` (2-D) packed compressed-tensors' way: ``32 //
    bits`` fields a word along ``dim``, little-endian, padded with zero fields; int32."""
    pf = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    words = -(-cols // pf)
    v = torch.nn.functional.pad(v, (0, words * pf - cols))
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    packed = (v.reshape(rows, words, pf) << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def ct_unpack(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """The unsigned fields (int64) of compressed-tensors words ``packed`` along ``dim``, the
    first ``size`` of that dimension."""
    pf = 32 // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    fields = ((w.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(w.shape[0], -1)[:, :size]
    return (fields.t() if dim == 0 else fields).contiguous()


# -- reading ------------------------------------------------------------------------------------


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / _CONFIG
    if not path.is_file():
        raise CompressedTensorsError(f"{directory}: no {_CONFIG} (a compressed-tensors "
                                     "checkpoint keeps its quantization_config there)")
    cfg = json.loads(path.read_text())
    qc = cfg.get("quantization_config", cfg.get("compression_config"))
    if not isinstance(qc, dict):
        raise CompressedTensorsError(f"{path}: no quantization_config: not a compressed-tensors "
                                     "checkpoint")
    method = qc.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise CompressedTensorsError(f"{path}: quant_method {method!r}, expected "
                                     f"{QUANT_METHOD!r}")
    return qc


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CompressedTensorsError(f"{index} names shards that are missing: {missing}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CompressedTensorsError(f"{directory}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key in tensors:
                    raise CompressedTensorsError(f"tensor {key!r} is in two shards ({f})")
                tensors[key] = fh.get_tensor(key)
    return tensors


def _match(name: str, module: nn.Module, target: str) -> int | None:
    """Rank of ``target`` matching the module (0 exact name, 1 regex, 2 class name), None."""
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    if target == name:
        return 0
    if any(cls.__name__ == target for cls in type(module).__mro__):
        return 2
    return None


def _scheme_for(name: str, module: nn.Module, qc: dict[str, Any]) -> tuple[str, dict]:
    best = None
    for gname, group in (qc.get("config_groups") or {}).items():
        for target in group.get("targets", []):
            rank = _match(name, module, target)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, gname, group)
    if best is None:
        raise CompressedTensorsError(f"{name}: the checkpoint holds {name}.weight_packed but no "
                                     "config group targets this layer")
    return best[1], best[2]


def _check_scheme(name: str, gname: str, group: dict, qc: dict) -> dict[str, Any]:
    """The weights' QuantizationArgs of config group ``gname``, checked (named refusals;
    ``name``: a prefix for the messages)."""
    where = f"{name}config group {gname!r}"
    args = group.get("weights")
    if not isinstance(args, dict):
        raise CompressedTensorsError(f"{where}: the group has no weights quantization args")
    kind = str(args.get("type", "int")).lower()
    bits = args.get("num_bits", 8)
    if kind != "int":
        raise CompressedTensorsError(f"{where}: {kind} weights ({bits}-bit float, e.g. fp8 / "
                                     "fp4) are not supported by this loader (int weights only)")
    if group.get("input_activations") or group.get("output_activations"):
        raise CompressedTensorsError(f"{where}: quantized activations (W8A8-style schemes) are "
                                     "not supported by this loader (weight-only schemes only)")
    fmt = group.get("format") or qc.get("format")
    if fmt != FORMAT:
        raise CompressedTensorsError(f"{where}: format {fmt!r} is not supported; this loader "
                                     f"reads {FORMAT!r} only")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise CompressedTensorsError(f"{where}: num_bits={bits!r} is not supported (int weights "
                                     "of 1 to 8 bits)")
    if args.get("dynamic"):
        raise CompressedTensorsError(f"{where}: dynamic weight quantization is not supported")
    actorder = args.get("actorder")
    if actorder is True or str(actorder).lower() in ("group", "dynamic"):
        raise CompressedTensorsError(f"{where}: activation-ordered groups (actorder="
                                     f"{actorder!r}, weight_g_idx) are not supported: our "
                                     "groups are contiguous columns")
    gs = args.get("group_size")
    strategy = args.get("strategy")
    if strategy is None:
        strategy = "tensor" if gs is None else "group" if gs > 0 else "channel"
    strategy = str(strategy).lower()
    if strategy not in ("tensor", "channel", "group"):
        raise CompressedTensorsError(f"{where}: strategy {strategy!r} is not supported (tensor, "
                                     "channel and group are)")
    if strategy == "group" and (not isinstance(gs, int) or gs <= 0):
        raise CompressedTensorsError(f"{where}: strategy 'group' needs a positive group_size, "
                                     f"got {gs!r}")
    return {"bits": bits, "strategy": strategy, "group_size": gs,
            "symmetric": bool(args.get("symmetric", True))}


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise CompressedTensorsError(f"missing tensor {key!r}")
    return tensors.pop(key)


def _zero_points(name: str, zp: torch.Tensor, bits: int, strategy: str, n: int,
                 groups: int) -> torch.Tensor:
    """Signed zero points ``[N, groups]`` (int64) of a stored ``weight_zero_point``."""
    pf = 32 // bits
    if strategy == "tensor":  # not packed
        if zp.numel() != 1 or zp.is_floating_point():
            raise CompressedTensorsError(f"{name}.weight_zero_point: {zp.dtype} "
                                         f"{tuple(zp.shape)}, expected one integer (tensor "
                                         "strategy)")
        return zp.reshape(1, 1).to(torch.int64).expand(n, groups)
    if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n // pf), groups):
        return ct_unpack(zp, bits, n, dim=0) - 2 ** (bits - 1)
    if not zp.is_floating_point() and tuple(zp.shape) == (n, groups):
        return zp.to(torch.int64)  # unpacked (older checkpoints): signed values
    raise CompressedTensorsError(
        f"{name}.weight_zero_point: {zp.dtype} {tuple(zp.shape)}, expected int32 "
        f"[ceil(N / {pf}), {groups}] = [{-(-n // pf)}, {groups}] (packed along the output "
        f"channels) or int8 [{n}, {groups}]")


def _quant_linear(name: str, linear: nn.Module, scheme: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> QuantLinear:
    """The QuantLinear holding layer ``name``'s compressed-tensors weight exactly (for a
    Hugging Face ``Conv1D``, one answering ``.weight`` in its ``[in, out]`` layout)."""
    if is_conv1d(linear, exact=True):
        mod = _quant_linear(name, plain_linear(linear), scheme, tensors)
        _swap.keep_layout(linear, mod)
        return mod
    if not isinstance(linear, nn.Linear):
        raise CompressedTensorsError(f"{name}: the checkpoint quantizes it but the model's "
                                     f"module is a {type(linear).__name__}, not an nn.Linear")
    bits, strategy, gs = scheme["bits"], scheme["strategy"], scheme["group_size"]
    packed = _take(tensors, f"{name}.weight_packed")
    scale = _take(tensors, f"{name}.weight_scale")
    shape = _take(tensors, f"{name}.weight_shape")
    zp = tensors.pop(f"{name}.weight_zero_point", None)
    g_idx = tensors.pop(f"{name}.weight_g_idx", None)
    n, k = (int(v) for v in shape.reshape(-1).tolist())
    if (n, k) != (linear.out_features, linear.in_features):
        raise CompressedTensorsError(f"{name}.weight_shape is [{n}, {k}] but the model's layer "
                                     f"is [{linear.out_features}, {linear.in_features}]")
    pf = 32 // bits
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, -(-k // pf)):
        raise CompressedTensorsError(f"{name}.weight_packed: {packed.dtype} "
                                     f"{tuple(packed.shape)}, expected int32 [{n}, "
                                     f"{-(-k // pf)}] ({bits}-bit fields, {pf} a word)")
    whole_row = strategy != "group" or gs >= k
    groups = 1 if strategy != "group" else -(-k // gs)
    if g_idx is not None and strategy == "group":
        trivial = torch.arange(k) // gs
        if g_idx.numel() != k or not (bool((g_idx.reshape(-1).cpu() == trivial).all())
                                      or bool((g_idx == -1).all())):
            raise CompressedTensorsError(f"{name}.weight_g_idx: activation-ordered groups are "
                                         "not supported: our groups are contiguous columns")
    if not whole_row and gs % WORD_COLS:
        raise CompressedTensorsError(
            f"{name}: group_size {gs} is not supported: our groups are "
            f"{', '.join(map(str, GROUP_SIZES))} columns (or a multiple of 32, repeated) or "
            f"a whole row; a group of {gs} < K={k} columns has no exact equivalent")
    if not scale.is_floating_point():
        raise CompressedTensorsError(f"{name}.weight_scale: {scale.dtype}, expected a float")
    if strategy == "tensor":
        if scale.numel() != 1:
            raise CompressedTensorsError(f"{name}.weight_scale: shape {tuple(scale.shape)}, "
                                         "expected [1] (tensor strategy)")
        scale = scale.reshape(1, 1).expand(n, 1)
    else:
        want = (n, groups)
        if tuple(scale.shape) != want and not (groups == 1 and tuple(scale.shape) == (n,)):
            raise CompressedTensorsError(f"{name}.weight_scale: shape {tuple(scale.shape)}, "
                                         f"expected {list(want)} ({strategy} strategy)")
        scale = scale.reshape(n, groups)
    dtype = linear.weight.dtype
    if dtype not in _ACT_DTYPES:
        raise CompressedTensorsError(f"{name}: the model's layer is {dtype}; QuantLinear "
                                     "computes in float16, bfloat16 or float32")
    scale_t = scale.to(dtype)
    if not torch.equal(scale_t.to(scale.dtype), scale):
        raise CompressedTensorsError(f"{name}.weight_scale is {scale.dtype} and does not fit the "
                                     f"model's {dtype} exactly: build the model in "
                                     f"{scale.dtype} (or wider)")
    if scheme["symmetric"]:
        if zp is not None and bool(_zero_points(name, zp, bits, strategy, n, groups).any()):
            raise CompressedTensorsError(f"{name}: the scheme is symmetric but "
                                         "weight_zero_point holds non-zero values")
        zp_s = None
    else:
        if zp is None:
            raise CompressedTensorsError(f"missing tensor {name + '.weight_zero_point'!r} "
                                         "(asymmetric scheme)")
        zp_s = _zero_points(name, zp, bits, strategy, n, groups)
    q_s = ct_unpack(packed, bits, k) - 2 ** (bits - 1)

    ours_bits = min(b for b in AFFINE_BITS if b >= bits)  # 5, 6, 7 bits widen to 8
    off = 2 ** (ours_bits - 1)
    if whole_row:
        ours_gs, rep = None, 1
    else:
        ours_gs = max(g for g in GROUP_SIZES if gs % g == 0)
        rep = gs // ours_gs
    mod = QuantLinear(k, n, bias=linear.bias is not None, bits=ours_bits, group_size=ours_gs,
                      symmetric=zp_s is None and symmetric_zero(ours_bits) == off,
                      device="cpu", dtype=dtype)
    eff = mod.group_size
    kp = padded_k(k, eff)
    ours_groups = kp // eff
    # the compressed-tensors group of each of ours (a larger group: its scale repeated)
    cols = torch.zeros(1, dtype=torch.int64) if whole_row else torch.arange(ours_groups) // rep
    mod.scales.copy_(scale_t[:, cols])
    q_u = torch.empty(n, kp, dtype=torch.int64)
    q_u[:, :k] = q_s + off
    if zp_s is None:
        q_u[:, k:] = off
        z = None if mod.symmetric else torch.full((n, ours_groups), float(off))
    else:
        zg = zp_s[:, cols] + off  # our zero points, integers in [0, 2**b')
        pad_groups = torch.arange(k, kp) // eff
        q_u[:, k:] = zg[:, pad_groups]  # padding columns hold a zero weight
        z = zg.to(torch.float64)
    if z is not None:
        mod.zeros.copy_(z.to(dtype))
    mod.qweight.copy_(pack_bits(q_u, ours_bits))
    mod.to(linear.weight.device)
    return mod


def _dense_keys(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The model's state_dict minus the buffers of the QuantLinears just built."""
    sd = model.state_dict(keep_vars=True)
    return {k: v for k, v in sd.items()
            if not (k.rpartition(".")[0] in quantized
                    and k.rpartition(".")[2] in ("qweight", "scales", "zeros", "_extra_state"))}


def from_compressed_tensors(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load the compressed-tensors ``pack-quantized`` checkpoint in ``directory`` (its
    ``config.json`` and ``*.safetensors``, sharded with ``model.safetensors.index.json`` or
    not) into ``model``, the dense model it was made from (modules named as in the checkpoint,
    e.g. a transformers model built from the same config): every layer holding
    ``<name>.weight_packed`` becomes a :class:`QuantLinear` (in the layer's dtype) with exactly
    the checkpoint's weight, and every other tensor loads into the model. Returns ``model``.

    :class:`CompressedTensorsError` names what cannot be converted exactly (see the module
    docstring): activation order, unsupported group sizes or widths, float weights, quantized
    activations, another format, missing, unexpected or mis-shaped tensors.
    """
    directory = Path(directory)
    qc = _read_config(directory)
    schemes = {g: _check_scheme("", g, group, qc)  # every group first: named refusals
               for g, group in (qc.get("config_groups") or {}).items()}
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise CompressedTensorsError(f"{directory}: sparsity format {sparsity.get('format')!r} "
                                     "is not supported (compressed-tensors dropped 2:4; our "
                                     "2:4 layers load with co.load)")
    if qc.get("transform_config"):
        raise CompressedTensorsError(f"{directory}: transform_config (rotations) is not "
                                     "supported")
    tensors = _read_tensors(directory)
    modules = dict(model.named_modules(remove_duplicate=False))
    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    built: dict[str, QuantLinear] = {}
    for name in names:
        if name not in modules:
            raise CompressedTensorsError(f"{name}: the checkpoint quantizes a layer the model "
                                         "does not have")
        gname, _ = _scheme_for(name, modules[name], qc)
        built[name] = _quant_linear(name, modules[name], schemes[gname], tensors)
    for key in tensors:
        if key.rpartition(".")[2] in _LAYER_KEYS:
            raise CompressedTensorsError(f"tensor {key!r} belongs to no weight_packed layer")
    for name, mod in built.items():
        parent, _, child = name.rpartition(".")
        old = modules[name]
        setattr(model.get_submodule(parent) if parent else model, child, mod)
        for alias, m in modules.items():  # a layer registered under several names
            if m is old and alias != name and alias not in built:
                p, _, c = alias.rpartition(".")
                setattr(model.get_submodule(p) if p else model, c, mod)
    targets = _dense_keys(model, set(built))
    unexpected = sorted(set(tensors) - set(targets))
    if unexpected:
        raise CompressedTensorsError(f"the checkpoint holds tensors the model has no place for: "
                                     f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    loaded_ids = {id(targets[k]) for k in tensors}
    missing = sorted(k for k, v in targets.items() if k not in tensors
                     and id(v) not in loaded_ids)  # a tied weight loads once
    if missing:
        raise CompressedTensorsError(f"missing tensors: {missing[:8]}"
                                     f"{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for key, value in tensors.items():
            dest = targets[key]
            if dest.shape != value.shape:
                raise CompressedTensorsError(f"tensor {key!r}: shape {tuple(value.shape)}, the "
                                             f"model's is {tuple(dest.shape)}")
            dest.copy_(value)
    return model


# -- writing ------------------------------------------------------------------------------------


def _sqnr_db(w: torch.Tensor, w2: torch.Tensor) -> float:
    noise = float(((w - w2) ** 2).sum())
    signal = float((w**2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _write_quant(name: str, mod: QuantLinear, round_zero_points: bool, out: dict[str, Any],
                 report: CompressedTensorsReport) -> tuple | None:
    """The tensors of ``mod`` in compressed-tensors' layout (added to ``out``) and its scheme
    key ``(bits, strategy, group_size, symmetric)``; None when it must be written dense."""
    bits, n, k = mod.bits, mod.out_features, mod.in_features
    kp = padded_k(k, mod.group_size)
    whole_row = mod.group_size == kp
    groups = 1 if whole_row else -(-k // mod.group_size)
    q = unpack_bits(mod.qweight, bits, k).to(torch.int64)  # unsigned, offset 2**(b-1)
    scales = mod.scales[:, :groups]
    zeros = mod.zeros
    if bits == 1:
        if zeros is not None:
            report.dense[name] = "asymmetric 1-bit fields have no exact compressed-tensors form"
            return None
        bits, q, scales = 2, 2 * q - 1 + 2, scales / 2  # ±s/2: q_s in {-1, +1}, scale s/2
        if not torch.equal(scales * 2, mod.scales[:, :groups]):
            report.dense[name] = "binary scales / 2 underflow in the scale dtype"
            return None
    zp_u = None
    if zeros is not None:
        z = zeros[:, :groups].to(torch.float64)
        zr = z.round().clamp(0, 2**bits - 1)
        if not torch.equal(zr, z):
            if not round_zero_points:
                raise CompressedTensorsError(
                    f"{name}: asymmetric layer with fractional zero points (compressed-tensors "
                    "stores integer zero points); pass round_zero_points=True to round them "
                    "(its SQNR is reported)")
            w = mod.dense_weight().to(torch.float64)
            idx = torch.arange(k) // (kp if whole_row else mod.group_size)
            w2 = (q.to(torch.float64) - zr[:, idx]) * scales.to(torch.float64)[:, idx]
            db = _sqnr_db(w, w2)
            report.sqnr_db[name] = db
            warnings.warn(f"to_compressed_tensors: {name}: zero points rounded to integers, "
                          f"SQNR {db:.1f} dB", stacklevel=3)
        zp_u = zr.to(torch.int64)
    out[f"{name}.weight_packed"] = ct_pack(q, bits)
    out[f"{name}.weight_scale"] = scales.clone().contiguous()
    out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    if zp_u is not None:
        out[f"{name}.weight_zero_point"] = ct_pack(zp_u, bits, dim=0)
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.detach().clone()
    strategy = "channel" if whole_row else "group"
    gs = None if whole_row else mod.group_size
    notes = []
    if bits not in (4, 8):
        notes.append(f"{bits}-bit fields: vLLM's WNA16 kernels read 4 and 8 bits")
    if gs is not None and k % gs:
        notes.append(f"K={k} is not a multiple of group_size {gs} (the last group is partial): "
                     "compressed-tensors' own decompression and vLLM expect a multiple")
    if notes:
        report.notes[name] = "; ".join(notes)
    sym = zp_u is None
    report.quantized[name] = (f"int{bits} {strategy}{'' if gs is None else f' {gs}'} "
                              f"{'symmetric' if sym else 'asymmetric'}")
    return (bits, strategy, gs, sym)


def _dense_reason(mod: CompressedModule) -> str:
    kind = type(mod).__name__
    if kind == "Sparse24Linear":
        return ("2:4 sparse: compressed-tensors dropped 2:4 and vLLM removed 2:4 support; "
                "written dense (keep it compressed with co.save)")
    if kind == "W8A8Linear":
        return "W8A8 (quantized activations): written as its dense weight"
    return f"{kind}: no compressed-tensors equivalent; written as its dense weight"


def _weights_args(bits: int, strategy: str, gs: int | None, sym: bool) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": gs,
            "strategy": strategy, "block_structure": None, "dynamic": False, "actorder": None}


def to_compressed_tensors(model: nn.Module, directory: str | Path, *,
                          round_zero_points: bool = False) -> CompressedTensorsReport:
    """Write ``model`` as a compressed-tensors ``pack-quantized`` checkpoint in ``directory``:
    ``model.safetensors`` and ``config.json`` (the model's Hugging Face ``.config`` fields when
    it has one, else only the ``quantization_config``). :class:`QuantLinear` layers are written
    quantized (symmetric ones exactly; asymmetric ones exactly when their zero points are
    integers, else only with ``round_zero_points=True``, which rounds them and reports the SQNR);
    other compressed linears (2:4, codebook, low rank, W8A8) and every plain linear are written
    dense and listed in ``ignore``. Returns the :class:`CompressedTensorsReport`.
    """
    directory = Path(directory)
    report = CompressedTensorsReport()
    out: dict[str, torch.Tensor] = {}
    schemes: dict[tuple, list[str]] = {}
    ignore: list[str] = []
    skip_prefixes: list[str] = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        if isinstance(mod, CompressedModule):
            skip_prefixes.append(name + ".")
            key = _write_quant(name, mod, round_zero_points, out, report) \
                if isinstance(mod, QuantLinear) else None
            if key is not None:
                schemes.setdefault(key, []).append(name)
                continue
            if not isinstance(mod, CompressedLinear):
                raise CompressedTensorsError(f"{name}: {type(mod).__name__} replaces modules of "
                                             "the dense model; it has no compressed-tensors form "
                                             "(save it with co.save)")
            report.dense.setdefault(name, _dense_reason(mod))
            ignore.append(name)
            with torch.no_grad():
                # (.weight: the replaced layer's layout, a Conv1D's [in, out])
                out[f"{name}.weight"] = mod.weight.detach().clone().contiguous()
                if mod.bias is not None:
                    out[f"{name}.bias"] = mod.bias.detach().clone()
        elif isinstance(mod, nn.Linear) and not any(name.startswith(p) for p in skip_prefixes):
            ignore.append(name)
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in skip_prefixes) or key in out:
            continue
        if not isinstance(t, torch.Tensor):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in seen:
            continue  # a tied weight is stored once
        if ident is not None:
            seen.add(ident)
        out[key] = t.detach().contiguous()
    groups = {f"group_{i}": {"targets": sorted(names),
                             "weights": _weights_args(*key),
                             "input_activations": None, "output_activations": None}
              for i, (key, names) in enumerate(sorted(schemes.items(), key=lambda kv: kv[1]))}
    qc = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
          "config_groups": groups, "ignore": sorted(set(ignore)), "kv_cache_scheme": None,
          "sparsity_config": {}}
    hf = getattr(model, "config", None)
    cfg = hf.to_dict() if hasattr(hf, "to_dict") else {}
    cfg["quantization_config"] = qc
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / _WEIGHTS
    save_file({k: v.cpu() for k, v in out.items()}, str(weights), metadata={"format": "pt"})
    (directory / _CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    report.files = [str(weights), str(directory / _CONFIG)]
    return report
