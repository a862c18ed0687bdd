"""``QuantLinear`` (int8/int4/int2/binary weights), ``CodebookLinear`` (k-means weight sharing)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops._validate import check_choice
from compress_ops.kernels.formats.dequant import (
    AFFINE_BITS,
    BITS,
    FORMAT_VERSION,
    OLDER_VERSIONS,
    affine_bytes,
    codebook_bytes,
    codebook_weight,
    dequantize,
    effective_group_size,
    empty_affine,
    packed_words,
    padded_k,
    repack,
)
from compress_ops.nn.base import (
    CompressedLinear,
    FormatRecord,
    check_compute_dtype,
    from_dense_values,
    init_bias,
)
from compress_ops.quantize import (
    AffineWeight,
    encode_codebook,
    fit_codebook,
    quantize_absmean,
    quantize_affine,
)

__all__ = ["QuantLinear", "CodebookLinear", "QUANT_DEFAULTS", "CODEBOOK_DEFAULTS",
           "BINARY_NOTE", "TERNARY_NOTE"]

#: What ``report()`` says of binary and ternary layers (1-bit fields, and 2-bit fields holding
#: three levels).
BINARY_NOTE = "binary: sign(w) x mean|w| per group, in 1-bit fields"
TERNARY_NOTE = "ternary: {-1, 0, +1} x mean|w| per group (absmean), in 2-bit fields"

#: ``QuantLinear.from_dense`` keyword values when no config is given (``QuantConfig()``'s).
QUANT_DEFAULTS: dict[str, Any] = {"bits": 4, "group_size": 128, "symmetric": False,
                                  "search_steps": 20}
#: ``CodebookLinear.from_dense`` keyword values when no config is given (``CodebookConfig()``'s).
CODEBOOK_DEFAULTS: dict[str, Any] = {"bits": 4, "row_groups": 1, "iters": 1000,
                                     "method": "optimal"}


def _check_sizes(in_features: int, out_features: int, bits: int,
                 allowed: tuple[int, ...] = BITS) -> None:
    if in_features < 1 or out_features < 1:
        raise ValueError(
            f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
    check_choice("bits", bits, allowed)


class PackedFieldsRecord(FormatRecord):
    """The format record of a module holding packed fields (``packed_buffer``): its last field,
    ``format_version``, is the packed-field layout the buffer was written in
    (:data:`~compress_ops.kernels.formats.dequant.FORMAT_VERSION`). A state_dict of an older
    layout (versions 1 and 2) loads by repacking the fields (a version-1 record has no version
    field); a newer or unknown version is refused by name, like any other differing record
    field."""

    packed_buffer = "qweight"
    format_version = FORMAT_VERSION

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "_extra_state"
        rec = state_dict.get(key)
        n = len(self.format_fields)
        if isinstance(rec, torch.Tensor) and rec.device.type != "meta" and rec.dim() == 1:
            rec = rec.cpu().to(torch.int64)
            if rec.numel() == n - 1:  # version 1: the record had no format_version
                rec = torch.cat([rec, rec.new_ones(1)])
            old = int(rec[-1]) if rec.numel() == n else FORMAT_VERSION
            if old in OLDER_VERSIONS:
                mine = self.get_extra_state()
                self._check_format(torch.cat([rec[:-1], mine[-1:]]))  # the other fields first
                packed = prefix + self.packed_buffer
                if packed in state_dict:
                    state_dict[packed] = repack(state_dict[packed], self.bits, old)
                rec = mine
            state_dict[key] = rec
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class QuantLinear(PackedFieldsRecord, CompressedLinear):
    """``y = x @ W^T + b`` with ``W = (q - z) * s``: b-bit weights, one scale (and zero point)
    per ``group_size`` input features of a row.

    Buffers (format of :mod:`compress_ops.kernels.formats.dequant`): ``qweight [out, Kp*bits/32]``
    int32, ``scales [out, Kp/group]`` and, for asymmetric grids, ``zeros`` (both in the compute
    dtype). ``group_size`` is the stored (effective) group size; ``None`` at construction means
    one group per row. A freshly constructed module holds an all-zero weight; load a state_dict
    or use :meth:`from_dense`.
    """

    kind = "quant"
    format_fields = ("in_features", "out_features", "bits", "group_size", "format_version")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_sizes(in_features, out_features, bits, AFFINE_BITS)
        dtype = dtype or torch.get_default_dtype()
        check_compute_dtype("QuantLinear", dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = effective_group_size(in_features, group_size)
        self.symmetric = symmetric
        qweight, scales, zeros = empty_affine(out_features, in_features, bits, self.group_size,
                                              symmetric, dtype=dtype, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        init_bias(self, bias, out_features, device, dtype)

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: object | None = None,
                   **values: Any) -> QuantLinear:
        """Quantize ``linear`` (round-to-nearest, per-group range search) with the values of a
        ``QuantConfig`` or the keywords ``bits``, ``group_size``, ``symmetric``,
        ``search_steps`` (defaults :data:`QUANT_DEFAULTS`). ``bits=1``: binary weights,
        ``sign(w)`` times the group's mean ``|w|``, in 1-bit fields (``bits=1``, zero points 1/2,
        scales twice the mean: :func:`~compress_ops.quantize.quantize_absmean`)."""
        v = from_dense_values(config, values, QUANT_DEFAULTS)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if v["bits"] == 1:  # binary: sign(w) * mean |w|, in 1-bit fields
            mod = cls.from_affine(linear, quantize_absmean(w, "binary", v["group_size"]))
            mod.note = BINARY_NOTE
            return mod
        qw = quantize_affine(w, v["bits"], v["group_size"], symmetric=v["symmetric"],
                             search_steps=v["search_steps"])
        return cls.from_affine(linear, qw)

    @classmethod
    def from_affine(cls, linear: nn.Linear, qw: AffineWeight) -> QuantLinear:
        """The module holding the packed weight ``qw`` (from :func:`~compress_ops.quantize.
        quantize_affine` or :func:`~compress_ops.quantize.gptq_affine` of ``linear.weight``)
        and ``linear``'s bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  bits=qw.bits, group_size=qw.group_size, symmetric=qw.zeros is None,
                  device=w.device, dtype=qw.scales.dtype)
        mod.qweight.copy_(qw.qweight)
        mod.scales.copy_(qw.scales)
        if qw.zeros is not None:
            mod.zeros.copy_(qw.zeros)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in_features(x)
        return torch.ops.compress_ops.dequant_linear(x, self.qweight, self.scales, self.zeros,
                                                     self.bias, self.bits, self.group_size,
                                                     self.format_version)

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                          self.in_features)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def stored_weight_bytes(self) -> int:
        return affine_bytes(self.out_features, self.in_features, self.bits, self.group_size,
                            self.scales.dtype, self.symmetric)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, dtype={self.scales.dtype}")


class CodebookLinear(PackedFieldsRecord, CompressedLinear):
    """``y = x @ W^T + b`` with ``W[n, k] = codebook[n // (out / R), q[n, k]]``: every weight is
    one of ``2**bits`` shared values (k-means), per group of rows (``R = row_groups``).

    Buffers: ``indices [out, Kp*bits/32]`` int32 (packed like :class:`QuantLinear`'s fields)
    and ``codebook [R, 2**bits]`` in the compute dtype. Several modules may hold the same
    ``codebook`` tensor (``CodebookConfig(shared=True)`` under a ``Recipe``): it is stored once
    in memory, once in ``torch.save`` files, and counted once by ``report``.
    """

    kind = "codebook"
    format_fields = ("in_features", "out_features", "bits", "format_version")
    packed_buffer = "indices"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 bits: int = 4, row_groups: int = 1,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_sizes(in_features, out_features, bits)
        if row_groups < 1 or out_features % row_groups:
            raise ValueError(f"row_groups={row_groups} must divide out_features={out_features}")
        dtype = dtype or torch.get_default_dtype()
        check_compute_dtype("CodebookLinear", dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        words = packed_words(padded_k(in_features, None), bits)
        self.register_buffer("indices", torch.zeros(out_features, words, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("codebook", torch.zeros(row_groups, 2**bits, device=device,
                                                     dtype=dtype))
        init_bias(self, bias, out_features, device, dtype)

    @property
    def row_groups(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: object | None = None, *,
                   codebook: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                   **values: Any) -> CodebookLinear:
        """Fit a k-means codebook to ``linear``'s weight (or use the given shared ``codebook``
        ``[1, 2**bits]``, which the module then holds by reference) and encode the weight; with
        the values of a ``CodebookConfig`` or the keywords ``bits``, ``row_groups``, ``iters``,
        ``method`` (defaults :data:`CODEBOOK_DEFAULTS`). ``importance`` (broadcast to the
        weight, >= 0; e.g. the input Hessian diagonal ``[1, in_features]``) weighs each
        weight's squared error in the fit (:func:`~compress_ops.quantize.fit_codebook`)."""
        v = from_dense_values(config, values, CODEBOOK_DEFAULTS)
        bits = v["bits"]
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if codebook is None:
            codebook = fit_codebook([w], bits, v["row_groups"], v["iters"], method=v["method"],
                                    importance=importance)
        elif importance is not None:
            raise ValueError("importance weighs the fit of a codebook; a given (shared) "
                             "codebook is not fit here")
        elif codebook.shape != (1, 2**bits) or codebook.dtype != w.dtype:
            raise ValueError(f"a shared codebook must be [1, {2**bits}] {w.dtype}, got "
                             f"{tuple(codebook.shape)} {codebook.dtype}")
        enc = encode_codebook(w, codebook, bits)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  bits=bits, row_groups=codebook.shape[0], device=w.device, dtype=w.dtype)
        mod.indices.copy_(enc.indices)
        mod.codebook = codebook  # by reference: shared tables stay one tensor
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in_features(x)
        return torch.ops.compress_ops.codebook_linear(x, self.indices, self.codebook, self.bias,
                                                      self.bits, self.format_version)

    def dense_weight(self) -> torch.Tensor:
        return codebook_weight(self.indices, self.codebook, self.bits, self.in_features)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def stored_weight_bytes(self) -> int:
        return codebook_bytes(self.out_features, self.in_features, self.bits, self.row_groups,
                              self.codebook.dtype)

    def index_bytes(self) -> int:
        """Bytes of the packed indices alone (a shared codebook is counted once elsewhere)."""
        return codebook_bytes(self.out_features, self.in_features, self.bits, 0,
                              self.codebook.dtype)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits,
                "row_groups": self.row_groups}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, "
                f"row_groups={self.row_groups}, dtype={self.codebook.dtype}")
