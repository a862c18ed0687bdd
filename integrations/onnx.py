"""ONNX export of compressed models (``compress_ops.integrations.onnx``): :func:`to_onnx`.

:func:`to_onnx` captures the model with :func:`compress_ops.integrations.export.export` (the
leading dimension of every input dynamic) and hands the program to
``torch.onnx.export(..., dynamo=True)`` with a ``custom_translation_table`` that maps each of our
ops (``torch.ops.compress_ops.<op>.default``) to an onnxscript function. The file runs in ONNX
Runtime; nothing of ``compress_ops`` is needed to run it.

What each layer becomes
-----------------------
* ``dequant_linear`` (``QuantLinear``), b in {2, 4, 8}, groups 32..256 or whole rows:
  ``com.microsoft::MatMulNBits`` (compressed).
* ``lowrank_linear`` (``LowRankLinear``): two ``MatMul`` (+ a ``MatMul`` of the base weight)
  (+ ``Add`` of the bias) (compressed).
* ``dwsep_conv2d`` (``FusedDWSepConv2d``): two ``Conv`` (depthwise, ``group = C``; 1x1) and
  the activations (``Relu``, ``Clip`` 0..6, ``HardSwish``, ``x * Sigmoid(x)``) (+ the residual
  ``Add``).
* ``w8a8_linear`` int8 (``W8A8Linear``): the activation quantized by the op's rule (per row:
  ``ReduceMax(Abs)``, the scale and its reciprocal; or the static scale; ``Round`` half to
  even, ``Clip`` to +-127), ``MatMulInteger`` on the int8 weight (exact int32), the float32
  epilogue in the op's order (compressed; bit-exact on finite inputs).
* ``dequant_linear`` with b in {1, 3}, ``codebook_linear`` (``CodebookLinear``),
  ``sparse24_linear`` (``Sparse24Linear``), FP8 ``w8a8_linear`` and ``hashed_linear``
  (``HashedLinear``: ONNX has no hash, and a stored index would outweigh the dense weight):
  ``MatMul`` on the
  **decompressed** float weight, computed from the stored tensors at export. No size gain: a
  ``UserWarning`` names these layers (and :attr:`OnnxExport.decompressed` lists them).

``LowRankConv2d`` (Tucker-2) is three aten convolutions already: plain ``Conv`` nodes.
FP8 ``W8A8Linear`` layers become a float ``MatMul`` on the dequantized weight without the FP8
rounding of the activation, so their outputs differ from eager by that rounding.

MatMulNBits facts (the sources)
-------------------------------
From the operator schema that ``onnxruntime`` 1.32.0 registers
(``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``, the text of
``docs/ContribOperators.md#com.microsoft.MatMulNBits`` in microsoft/onnxruntime):

* attributes ``K``, ``N`` (required), ``bits`` (2, 4 or 8), ``block_size`` (required, a power of
  two >= 16), ``accuracy_level`` (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations);
* inputs ``A`` (float/float16/bfloat16, ``[..., K]``), ``B`` uint8 ``[N, k_blocks, blob_size]``
  with ``k_blocks = ceil(K / block_size)`` and ``blob_size = block_size * bits / 8``, "bit-packed
  along the K dimension ... for 4 bits, the first 4 bits are stored in the lower 4 bits of a
  byte", ``scales`` ``(N, k_blocks)`` of A's type, optional ``zero_points`` (uint8 packed like B,
  ``(N, ceil(k_blocks * bits / 8))``, or unpacked of A's type, ``(N, k_blocks)``; default
  ``2**(bits - 1)``), deprecated ``g_idx``, optional ``bias [N]``;
* ``onnxruntime/quantization/matmul_nbits_quantizer.py`` (``pack_on_row_fast_248bit``) packs
  value ``j`` of each byte at bits ``[j b, j b + b)`` in K order, and writes ``scales`` and
  ``zero_points`` flattened to ``[N * k_blocks]``, which the CPU kernel also accepts (we write
  that form, which older runtimes read too).
* Measured with onnxruntime 1.32.0 (CPU): float zero points are accepted for 2 and 4 bits, and
  **refused for 8 bits** ("MatMulNBits on CPU does not support 8-bit weights with
  floating-point zero points; use uint8 zero points", ``matmul_nbits.cc``); K need not be a
  multiple of ``block_size`` (the last block's tail is ignored).

Our format against it (:mod:`compress_ops.kernels.formats.dequant`, format version 3)
-----------------------------------------------------------------------------------------
* **int8: byte for byte.** Field ``c % 4`` of a word holds column ``c`` (no interleave, no block
  permutation), so on a little-endian host the bytes of ``qweight.view(uint8)`` are ``q`` in K
  order: ``B`` is that view reshaped to ``[N, Kp / block, block]``, written without repacking
  (checked: the test compares the initializer's bytes with the buffer's).
* **int2 / int4: repacked.** Version 2 interleaves the fields of a word and version 3 permutes
  the 32 columns of every block (a tensor-core fragment order), so the words are not
  ``B``'s K-order bytes. The fields are read back in K order with
  :func:`~compress_ops.kernels.formats.dequant.unpack_bits` and packed low-first, ``8 / b`` per
  byte: the same bytes count (``N * Kp * b / 8``).
* ``Kp`` (K padded to the group) is exactly ``k_blocks * block_size``, so ``K`` is the layer's
  ``in_features`` and the padding fields are never read.
* Scales are written as stored (flattened). Symmetric grids store no zeros and our zero,
  ``2**(b - 1)``, is MatMulNBits' default: no ``zero_points`` input. Asymmetric 2- and 4-bit
  grids write their (possibly fractional) zero points as float zero points of A's type: exact.
  For 8 bits (float zero points refused on the CPU), the integer part ``round(z)`` (clamped to
  0..255) is written as uint8 zero points and the rest is exact too: ``(q - z) s = (q - zi) s -
  (z - zi) s``, the last term a per-(row, group) constant ``c``, added as
  ``ReduceSum`` of the activation over each group ``@ c^T`` (``N * groups`` more floats, no
  error beyond float32 rounding); integral zero points need no correction.
* Whole-row groups (``group_size = Kp``) use the largest power of two <= 256 that divides ``Kp``
  as ``block_size`` and repeat each row's scale (and zero point) over its blocks: exact, a few
  scale bytes more than ``report()``'s count.

Sizes: a MatMulNBits layer stores ``N * Kp * b / 8`` bytes of ``B`` plus its scales and zeros in
their dtype: exactly what :func:`compress_ops.report` counts (an asymmetric 8-bit layer with
fractional zero points: one byte more per group, the uint8 zero point next to the float
correction; whole-row groups: the repeated scales). The exporter adds each node's metadata (a
source stack trace, a few hundred bytes per node). The decompressed layers store the dense
float weight.

Limits
------
* Under torch 2.13 a translation function receives the op's tensor inputs as graph inputs
  (``SymbolicTensor``, ``const_value`` None): parameters and buffers become initializers only
  after the translation. So the stored tensors (weights, scales, ...) are read from the
  :class:`torch.export.ExportedProgram` by the name the exporter gives each graph input (the
  placeholder's name, via ``graph_signature.input_specs``); a weight computed in the graph
  rather than held by a module raises :class:`OnnxExportError` naming the op. The unused
  original inputs (int32 words, ...) are dropped by the exporter's optimizer.
* The activation's last dimension must be static (it is K).
* A ``w8a8_linear`` row holding a NaN/Inf does not turn the whole output row NaN as eager does.
* ``accuracy_level`` defaults to 0 (A is not quantized inside MatMulNBits: float math).
* fp32 and fp16 models run in ONNX Runtime's CPU provider; a bf16 model exports, but that
  provider has no bf16 ``MatMulNBits`` or ``MatMul`` kernel (1.32.0).
* ``MatMulNBits`` is a contrib op: ONNX Runtime runs it, other runtimes may not.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers every compress_ops:: op)
from compress_ops.integrations import export as _export
from compress_ops.kernels.formats import dequant as _dq
from compress_ops.kernels.formats import hashed as _hashed
from compress_ops.kernels.formats import sparse24 as _sp
from compress_ops.kernels.formats import w8a8 as _w8
from compress_ops.nn.base import CompressedModule

__all__ = ["OnnxExportError", "OnnxExport", "to_onnx", "matmul_nbits_b", "MATMUL_NBITS_BITS",
           "MAX_BLOCK"]

#: Affine widths that become ``com.microsoft::MatMulNBits``.
MATMUL_NBITS_BITS = (2, 4, 8)
#: The largest ``block_size`` written: our largest group (whole-row groups use a block that
#: divides the row, at most this, with their scale repeated).
MAX_BLOCK = 256
_MS_DOMAIN = "com.microsoft"


class OnnxExportError(RuntimeError):
    """A model or graph :func:`to_onnx` cannot write as ONNX (named in the message)."""


@dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote: ``path``, and for each compressed layer (by the module name
    of its weight) what it became in ONNX (``"MatMulNBits"``, ``"MatMul x2"``,
    ``"Conv x2"``, ``"MatMulInteger"``, or ``"MatMul (decompressed)"``). ``decompressed``: the
    layers written as dense float weights (no size gain)."""

    path: str
    layers: dict[str, str] = field(default_factory=dict)
    decompressed: list[str] = field(default_factory=list)


def _require_onnx() -> tuple[Any, Any, Any]:
    try:
        import onnx
        import onnxscript
        from onnxscript import ir
    except ImportError as e:  # pragma: no cover - exercised only without the packages
        raise ImportError(
            "to_onnx needs the packages onnx and onnxscript (torch.onnx.export(dynamo=True)); "
            "pip install onnx onnxscript onnxruntime") from e
    return onnx, onnxscript, ir


def _check_path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.lower().endswith(".onnx"):
        raise ValueError(f"path must name a .onnx file, got {text!r}")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder of {text!r} does not exist")
    return text


class _Constants:
    """The tensors behind the exported program's graph inputs (parameters, buffers, lifted
    constants), by input name; and the layer (module) each one belongs to."""

    def __init__(self, ep: torch.export.ExportedProgram, prefix: str = "") -> None:
        self.prefix = prefix  # what export() put before the user's module names
        self.tensors: dict[str, torch.Tensor] = {}
        self.targets: dict[str, str] = {}
        for spec in ep.graph_signature.input_specs:
            target = getattr(spec, "target", None)
            name = getattr(spec.arg, "name", None)
            if target is None or name is None:
                continue
            t = ep.state_dict.get(target)
            if t is None:
                t = ep.constants.get(target)
            if isinstance(t, torch.Tensor):
                self.tensors[name] = t.detach()
                self.targets[name] = target

    def get(self, value: Any, what: str, op: str) -> torch.Tensor:
        if value is None:
            raise OnnxExportError(f"{op}: {what} is missing")
        const = getattr(value, "const_value", None)
        if const is not None:
            return torch.from_numpy(const.numpy().copy())
        name = getattr(value, "name", None)
        if name not in self.tensors:
            raise OnnxExportError(
                f"{op}: its {what} ({name!r}) is not a parameter, buffer or constant of the "
                f"model; to_onnx writes compressed layers from their stored tensors only")
        return self.tensors[name]

    def layer(self, value: Any) -> str:
        target = self.targets.get(getattr(value, "name", None), "")
        if self.prefix and target.startswith(self.prefix):
            target = target[len(self.prefix):]
        return target.rpartition(".")[0] or "<root>"


# --- packing for MatMulNBits -------------------------------------------------------------

def _block_size(group_size: int, kp: int) -> int:
    """MatMulNBits' ``block_size`` for our group: the group (32..256), or for a whole-row group
    the largest power of two <= :data:`MAX_BLOCK` dividing ``Kp`` (``Kp`` is a multiple of 32)."""
    if group_size in _dq.GROUP_SIZES:
        return group_size
    block = MAX_BLOCK
    while kp % block:
        block //= 2
    return block


def matmul_nbits_b(qweight: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, bool]:
    """MatMulNBits' ``B`` (uint8 ``[N, Kp / block, block * bits / 8]``) of our packed
    ``qweight`` (format version 3), and whether its bytes are ``qweight``'s own (int8 on a
    little-endian host: no repacking) or repacked (2- and 4-bit fields)."""
    n, words = qweight.shape
    kp = _dq.packed_k(words, bits)
    if bits == 8 and torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0] == 1:
        raw = qweight.contiguous().view(torch.uint8)  # [N, Kp]: field c % 4 is column c
        return raw.reshape(n, kp // block, block), True
    q = _dq.unpack_bits(qweight, bits).to(torch.int64)  # [N, Kp], K order
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (q.reshape(n, kp // per, per) << shifts).sum(-1).to(torch.uint8)
    return packed.reshape(n, kp // block, block * bits // 8), False


def _in_features(x: Any, op: str) -> int:
    """K: the static last dimension of the op's activation."""
    dim = x.shape[-1] if x.shape is not None and len(x.shape) else None
    if not isinstance(dim, int):
        raise OnnxExportError(f"{op}: the activation's last dimension ({dim}) must be static")
    return dim


def _ints_exact(z: torch.Tensor) -> bool:
    zf = z.float()
    return bool(((zf == zf.round()) & (zf >= 0) & (zf <= 255)).all())


def _matmul_nbits_schema(onnx: Any) -> Any:
    """``onnx.defs.OpSchema`` of ``com.microsoft::MatMulNBits`` (version 1), as onnxruntime
    registers it: the onnx package has no contrib schemas, and the exporter's recorder builds a
    node from a schema."""
    schema, param = onnx.defs.OpSchema, onnx.defs.OpSchema.FormalParameter
    opt = schema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    attr_int = schema.AttrType.INT
    return schema(
        "MatMulNBits", _MS_DOMAIN, 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=opt),
                param("g_idx", "T4", param_option=opt), param("bias", "T1", param_option=opt)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", *floats], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[schema.Attribute("K", attr_int, "", required=True),
                    schema.Attribute("N", attr_int, "", required=True),
                    schema.Attribute("block_size", attr_int, "", required=True),
                    schema.Attribute("bits", attr_int, "", required=False),
                    schema.Attribute("accuracy_level", attr_int, "", required=False)])


# --- the translations ---------------------------------------------------------------------

class _Translator:
    def __init__(self, consts: _Constants, accuracy_level: int) -> None:
        onnx, onnxscript, ir = _require_onnx()
        from onnxscript import opset18

        self.onnx, self.ir, self.op = onnx, ir, opset18
        self.matmul_nbits = onnxscript.values.Op(onnxscript.values.Opset(_MS_DOMAIN, 1),
                                                 "MatMulNBits", _matmul_nbits_schema(onnx))
        self.consts = consts
        self.accuracy_level = accuracy_level
        self.record = OnnxExport(path="")

    # helpers
    def const(self, t: torch.Tensor) -> Any:
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return self.op.Constant(value=self.ir.tensor(t))
        return self.op.Constant(value=self.ir.tensor(t.numpy()))

    def ints(self, values: Sequence[int]) -> Any:
        return self.op.Constant(value=self.ir.tensor(torch.tensor(list(values),
                                                                  dtype=torch.int64).numpy()))

    def note(self, layer: str, what: str, decompressed: bool = False) -> None:
        self.record.layers[layer] = what
        if decompressed:
            self.record.decompressed.append(layer)

    def dense_matmul(self, x: Any, w: torch.Tensor, bias: Any, dtype: torch.dtype) -> Any:
        y = self.op.MatMul(x, self.const(w.to(dtype).t()))
        return y if bias is None else self.op.Add(y, bias)

    def x_dtype(self, x: Any) -> torch.dtype:
        table = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16,
                 "DOUBLE": torch.float64}
        dt = getattr(x, "dtype", None)
        return table.get(getattr(dt, "name", ""), torch.float32)

    # ops
    def dequant_linear(self, x, qweight, scales, zeros=None, bias=None, bits=4, group_size=128,
                       format_version=_dq.FORMAT_VERSION):
        op_name = "dequant_linear"
        qw = self.consts.get(qweight, "qweight", op_name)
        s = self.consts.get(scales, "scales", op_name)
        z = None if zeros is None else self.consts.get(zeros, "zeros", op_name)
        layer = self.consts.layer(qweight)
        if format_version != _dq.FORMAT_VERSION:
            qw = _dq.repack(qw, bits, format_version)
        n, words = qw.shape
        kp = _dq.packed_k(words, bits)
        k = _in_features(x, op_name)
        dtype = self.x_dtype(x)
        if bits not in MATMUL_NBITS_BITS:
            w = _dq.dequantize(qw, s, z, bits, group_size, k, dtype=torch.float32)
            self.note(layer, f"MatMul (decompressed: {bits}-bit fields)", True)
            return self.dense_matmul(x, w, bias, dtype)
        block = _block_size(group_size, kp)
        rep = group_size // block
        b, _ = matmul_nbits_b(qw, bits, block)
        s_b = s.repeat_interleave(rep, dim=1) if rep > 1 else s
        inputs = [x, self.const(b), self.const(s_b.to(dtype).reshape(-1))]
        correction = None
        if z is not None:
            z_b = z.repeat_interleave(rep, dim=1) if rep > 1 else z
            if bits == 8:  # the CPU kernel refuses float zero points at 8 bits
                zi = z_b.float().round().clamp(0, 255)
                inputs.append(self.const(zi.to(torch.uint8).reshape(-1)))
                if not _ints_exact(z_b):
                    # (q - z) s = (q - zi) s + c, c = (zi - z) s per (row, block)
                    correction = ((zi - z_b.float()) * s_b.float())  # [N, k_blocks]
            else:
                inputs.append(self.const(z_b.to(dtype).reshape(-1)))
        else:
            inputs.append(None)
        inputs += [None, bias]
        while inputs and inputs[-1] is None:
            inputs.pop()
        y = self.matmul_nbits(*inputs, K=k, N=n, bits=bits, block_size=block,
                                accuracy_level=self.accuracy_level)
        if correction is not None:
            y = self.op.Add(y, self.group_sums(x, k, kp, block, correction, dtype))
        self.note(layer, "MatMulNBits")
        return y

    def group_sums(self, x: Any, k: int, kp: int, block: int, c: torch.Tensor,
                   dtype: torch.dtype) -> Any:
        """``sum_g (sum of x over block g) * c[n, g]``: x padded to ``Kp``, reshaped to
        ``[..., Kp / block, block]``, summed, times ``c^T``."""
        op = self.op
        rank = len(x.shape)
        if kp != k:
            pads = [0] * (2 * rank)
            pads[2 * rank - 1] = kp - k
            x = op.Pad(x, self.ints(pads))
        lead = op.Shape(x, end=-1)
        xg = op.Reshape(x, op.Concat(lead, self.ints([kp // block, block]), axis=0))
        sums = op.ReduceSum(xg, self.ints([-1]), keepdims=0)
        return op.MatMul(sums, self.const(c.to(dtype).t()))

    def codebook_linear(self, x, indices, codebook, bias=None, bits=4,
                        format_version=_dq.FORMAT_VERSION):
        op_name = "codebook_linear"
        idx = self.consts.get(indices, "indices", op_name)
        table = self.consts.get(codebook, "codebook", op_name)
        if format_version != _dq.FORMAT_VERSION:
            idx = _dq.repack(idx, bits, format_version)
        k = _in_features(x, op_name)
        w = _dq.codebook_weight(idx, table, bits, k, dtype=torch.float32)
        self.note(self.consts.layer(indices), "MatMul (decompressed: codebook)", True)
        return self.dense_matmul(x, w, bias, self.x_dtype(x))

    def sparse24_linear(self, x, values, meta, bias=None):
        op_name = "sparse24_linear"
        v = self.consts.get(values, "values", op_name)
        m = self.consts.get(meta, "meta", op_name)
        w = _sp.unpack_sparse24(v, m, _in_features(x, op_name)).float()
        self.note(self.consts.layer(values), "MatMul (decompressed: 2:4)", True)
        return self.dense_matmul(x, w, bias, self.x_dtype(x))

    def hashed_linear(self, x, w, bias, out_features, in_features, seed, hash_version):
        op_name = "hashed_linear"
        if hash_version != _hashed.HASH_VERSION:
            raise OnnxExportError(f"{op_name}: hash version {hash_version} is not this build's "
                                  f"({_hashed.HASH_VERSION})")
        ww = self.consts.get(w, "w", op_name)
        dense = _hashed.hashed_weight(ww, out_features, in_features, seed).float()
        self.note(self.consts.layer(w), "MatMul (decompressed: hashed)", True)
        return self.dense_matmul(x, dense, bias, self.x_dtype(x))

    def lowrank_linear(self, x, u, v, weight=None, bias=None):
        op_name = "lowrank_linear"
        op = self.op
        uu = self.consts.get(u, "u", op_name)
        vv = self.consts.get(v, "v", op_name)
        dtype = self.x_dtype(x)
        y = op.MatMul(op.MatMul(x, self.const(vv.to(dtype).t())), self.const(uu.to(dtype).t()))
        if weight is not None:
            base = self.consts.get(weight, "base weight", op_name)
            y = op.Add(y, op.MatMul(x, self.const(base.to(dtype).t())))
        if bias is not None:
            y = op.Add(y, bias)
        self.note(self.consts.layer(u), "MatMul x2" + (" + base MatMul" if weight is not None
                                                       else ""))
        return y

    def activation(self, v: Any, act: str) -> Any:
        op = self.op
        if act == "none":
            return v
        if act == "relu":
            return op.Relu(v)
        if act == "relu6":
            return op.Clip(v, op.CastLike(self.const(torch.tensor(0.0)), v),
                           op.CastLike(self.const(torch.tensor(6.0)), v))
        if act == "hardswish":
            return op.HardSwish(v)
        if act == "silu":
            return op.Mul(v, op.Sigmoid(v))
        raise OnnxExportError(f"dwsep_conv2d: activation {act!r} has no ONNX translation")

    def dwsep_conv2d(self, x, dw_weight, dw_bias, pw_weight, pw_bias, residual=None, stride=1,
                     padding=(1, 1, 1, 1), act1="relu6", act2="none"):
        op_name = "dwsep_conv2d"
        op = self.op
        dtype = self.x_dtype(x)
        dw = self.consts.get(dw_weight, "dw_weight", op_name)
        pw = self.consts.get(pw_weight, "pw_weight", op_name)
        c, kk = dw.shape[0], dw.shape[1]
        left, right, top, bottom = (int(p) for p in padding)
        args = [x, self.const(dw.to(dtype).contiguous()[:, None])]
        if dw_bias is not None:
            args.append(dw_bias)
        t = op.Conv(*args, group=c, kernel_shape=[kk, kk], strides=[stride, stride],
                    pads=[top, left, bottom, right])
        t = self.activation(t, act1)
        args = [t, self.const(pw.to(dtype).contiguous()[:, :, None, None])]
        if pw_bias is not None:
            args.append(pw_bias)
        y = self.activation(op.Conv(*args, kernel_shape=[1, 1]), act2)
        if residual is not None:
            y = op.Add(y, residual)
        self.note(self.consts.layer(dw_weight), "Conv x2")
        return y

    def w8a8_linear(self, x, qweight, w_scales, bias=None, input_scale=None, smooth=None):
        op_name = "w8a8_linear"
        op = self.op
        onnx = self.onnx
        qw = self.consts.get(qweight, "qweight", op_name)
        ws = self.consts.get(w_scales, "w_scales", op_name)
        sm = None if smooth is None else self.consts.get(smooth, "smooth", op_name)
        dtype = self.x_dtype(x)
        layer = self.consts.layer(qweight)
        if qw.dtype != torch.int8:  # FP8: the dense weight, activation not rounded to e4m3
            w = _w8.dequantize_weight(qw, ws, torch.float32, sm)
            self.note(layer, "MatMul (decompressed: FP8 weights, float activations)", True)
            return self.dense_matmul(x, w, bias, dtype)
        f32 = onnx.TensorProto.FLOAT
        xf = op.Cast(x, to=f32) if dtype != torch.float32 else x
        if sm is not None:
            xf = op.Mul(xf, self.const(sm.float()))
        qmax = _w8.QMAX[torch.int8]
        if input_scale is None:
            amax = op.ReduceMax(op.Abs(xf), self.ints([-1]), keepdims=1)
            s_x = op.Div(amax, self.const(torch.tensor(qmax)))
            zero = self.const(torch.tensor(0.0))
            inv = op.Where(op.Greater(amax, zero),
                           op.Mul(op.Reciprocal(amax), self.const(torch.tensor(qmax))), zero)
        else:
            s0 = self.consts.get(input_scale, "input_scale", op_name).float().reshape(())
            s_x = self.const(s0)
            inv = self.const(s0.reciprocal().nan_to_num(posinf=0.0))  # float32, as the op
        q = op.Clip(op.Round(op.Mul(xf, inv)), self.const(torch.tensor(-qmax)),
                    self.const(torch.tensor(qmax)))
        acc = op.MatMulInteger(op.Cast(q, to=onnx.TensorProto.INT8), self.const(qw.t()))
        y = op.Mul(op.Mul(op.Cast(acc, to=f32), s_x), self.const(ws.float()))
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=f32) if dtype != torch.float32 else bias)
        if dtype != torch.float32:
            y = op.CastLike(y, x)
        self.note(layer, "MatMulInteger")
        return y

    def table(self) -> dict[Callable, Callable]:
        """``custom_translation_table``: each op's overload to a plain function (the exporter
        sets attributes on it, which a bound method refuses) with the method's signature."""
        ops = torch.ops.compress_ops
        return {getattr(ops, name).default: _function(getattr(self, name))
                for name in ("dequant_linear", "codebook_linear", "sparse24_linear",
                             "lowrank_linear", "dwsep_conv2d", "w8a8_linear",
                             "hashed_linear")}


def _function(method: Callable) -> Callable:
    def translate(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    translate.__signature__ = inspect.signature(method)
    translate.__name__ = method.__name__
    return translate


def to_onnx(model: nn.Module, args: Sequence[Any] | torch.Tensor, path: str | os.PathLike,
            *, kwargs: dict | None = None, dynamic_batch: bool = True,
            accuracy_level: int = 0) -> OnnxExport:
    """Write ``model`` (run on ``args``, a tensor or a tuple, and ``kwargs``) to the ONNX file
    ``path`` (``.onnx``), each compressed layer translated as the module docstring's table says
    (``com.microsoft::MatMulNBits`` for 2/4/8-bit affine weights). ``dynamic_batch``: the
    leading dimension of every tensor input is dynamic. ``accuracy_level``: MatMulNBits'
    attribute (0: exact float math). Returns an :class:`OnnxExport` (what each layer became).

    A ``UserWarning`` names the layers written as decompressed float weights (no size gain).
    ``TypeError`` if ``model`` is not an ``nn.Module`` or ``path`` not a path; ``ValueError``
    if ``path`` does not end in ``.onnx`` or ``accuracy_level`` is not 0..4;
    :class:`OnnxExportError` for a graph the translations cannot write."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_onnx needs an nn.Module, got {type(model).__name__}")
    text = _check_path(path)
    if not isinstance(args, (torch.Tensor, tuple, list)):
        raise TypeError(f"args must be a tensor or a tuple of inputs, got {type(args).__name__}")
    if accuracy_level not in range(5) or isinstance(accuracy_level, bool):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level!r}")
    _require_onnx()
    ep = _export.export(model, args, kwargs, dynamic_batch=dynamic_batch)
    # export() runs a compressed module given alone one level down, as ``module``
    prefix = "module." if isinstance(model, CompressedModule) else ""
    tr = _Translator(_Constants(ep, prefix), accuracy_level)
    program = torch.onnx.export(ep, dynamo=True, custom_translation_table=tr.table(),
                                optimize=True, verbose=False)
    program.save(text)
    tr.record.path = text
    if tr.record.decompressed:
        warnings.warn(
            f"to_onnx wrote {len(tr.record.decompressed)} compressed layer(s) as dense float "
            f"MatMul weights (no size gain in the file): "
            + ", ".join(f"{name} ({tr.record.layers[name]})" for name in tr.record.decompressed),
            UserWarning, stacklevel=2)
    return tr.record
