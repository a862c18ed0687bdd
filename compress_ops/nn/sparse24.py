"""``Sparse24Linear``: an ``nn.Linear`` whose weight is 2:4 sparse and stored compressed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops.configs import UnsupportedWeight
from compress_ops.kernels.formats.sparse24 import (
    check_meta,
    empty_sparse24,
    is_2to4,
    pack_sparse24,
    prune_2to4,
    sparse24_bytes,
    unpack_sparse24,
)
from compress_ops.nn.base import (
    CompressedLinear,
    FormatRecord,
    check_compute_dtype,
    from_dense_values,
    init_bias,
)

__all__ = ["Sparse24Linear", "SPARSE24_DEFAULTS"]

#: ``Sparse24Linear.from_dense`` keyword values when no config is given (``Sparse24Config()``'s).
SPARSE24_DEFAULTS: dict[str, Any] = {"prune": True}


class Sparse24Linear(FormatRecord, CompressedLinear):
    """``y = x @ W^T + b`` with ``W`` 2:4 sparse along ``in_features``.

    Buffers: ``values [out, Kp/2]`` (the weight dtype) and ``meta [out, Kp/32]`` (int32), the
    format of :mod:`compress_ops.kernels.sparse24`; ``bias`` is an ``nn.Parameter`` as in
    ``nn.Linear``. A freshly constructed module holds an all-zero weight; load a state_dict or
    use :meth:`from_dense`.
    """

    kind = "sparse24"
    format_fields = ("in_features", "out_features")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        dtype = dtype or torch.get_default_dtype()
        check_compute_dtype("Sparse24Linear", dtype)
        self.in_features = in_features
        self.out_features = out_features
        values, meta = empty_sparse24(out_features, in_features, dtype=dtype, device=device)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        init_bias(self, bias, out_features, device, dtype)

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: object | None = None,
                   **values: Any) -> Sparse24Linear:
        """Compress ``linear``: magnitude-prune to 2:4 (``prune``, from a ``Sparse24Config`` or
        the keyword; default True), then pack.

        With ``prune=False`` the weight must already be 2:4, else
        :class:`~compress_ops.configs.UnsupportedWeight` (a ``ValueError``).
        """
        prune = from_dense_values(config, values, SPARSE24_DEFAULTS)["prune"]
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if prune:
            w = prune_2to4(w)
        elif not is_2to4(w):
            raise UnsupportedWeight(
                "weight is not 2:4 sparse (a group of 4 along in_features has more than 2 "
                "nonzeros) and Sparse24Config(prune=False) forbids pruning it"
            )
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype)
        values, meta = pack_sparse24(w)
        mod.values.copy_(values)
        mod.meta.copy_(meta)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_packed(cls, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None = None) -> Sparse24Linear:
        """A module over already packed ``values [N, Kp/2]`` and ``meta [N, Kp/32]`` (the format
        of :func:`~compress_ops.kernels.formats.sparse24.pack_sparse24`, e.g. from another
        checkpoint), held by reference. The metadata is validated
        (:func:`~compress_ops.kernels.formats.sparse24.check_meta`): a group with duplicate or
        decreasing positions would make the CPU and GPU paths disagree."""
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise TypeError("values must be a 2-D tensor [N, Kp/2]")
        n = values.shape[0]
        mod = cls(in_features, n, bias=bias is not None, device=values.device,
                  dtype=values.dtype)
        if tuple(meta.shape) != tuple(mod.meta.shape) or \
                tuple(values.shape) != tuple(mod.values.shape):
            raise ValueError(f"values {tuple(values.shape)} and meta {tuple(meta.shape)} do not "
                             f"pack a [{n}, {in_features}] weight: expected "
                             f"{tuple(mod.values.shape)} and {tuple(mod.meta.shape)}")
        check_meta(meta, in_features)
        mod.values, mod.meta = values, meta
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def _check_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        meta = state_dict.get(prefix + "meta")
        if isinstance(meta, torch.Tensor) and meta.device.type != "meta" \
                and tuple(meta.shape) == tuple(self.meta.shape):
            check_meta(meta, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in_features(x)
        return torch.ops.compress_ops.sparse24_linear(x, self.values, self.meta, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return unpack_sparse24(self.values, self.meta, self.in_features)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.values.dtype

    def stored_weight_bytes(self) -> int:
        return sparse24_bytes(self.out_features, self.in_features, self.values.dtype)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}")
