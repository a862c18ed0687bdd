"""``Sparse24Linear``: an ``nn.Linear`` whose weight is 2:4 sparse and stored compressed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops.kernels.sparse24 import (
    K_ALIGN,
    is_2to4,
    pack_sparse24,
    prune_2to4,
    sparse24_bytes,
    unpack_sparse24,
)
from compress_ops.nn.base import CompressedLinear

if TYPE_CHECKING:
    from compress_ops.api import Sparse24Config

# Metadata of a group holding positions (0, 1): nibble 0b0100, repeated over the 8 groups.
_EMPTY_META_WORD = 0x44444444


class Sparse24Linear(CompressedLinear):
    """``y = x @ W^T + b`` with ``W`` 2:4 sparse along ``in_features``.

    Buffers: ``values [out, Kp/2]`` (the weight dtype) and ``meta [out, Kp/32]`` (int32), the
    format of :mod:`compress_ops.kernels.sparse24`; ``bias`` is an ``nn.Parameter`` as in
    ``nn.Linear``. A freshly constructed module holds an all-zero weight; load a state_dict or
    use :meth:`from_dense`.
    """

    kind = "sparse24"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        dtype = dtype or torch.get_default_dtype()
        self.in_features = in_features
        self.out_features = out_features
        kp = -(-in_features // K_ALIGN) * K_ALIGN
        self.register_buffer("values", torch.zeros(out_features, kp // 2, device=device,
                                                   dtype=dtype))
        self.register_buffer("meta", torch.full((out_features, kp // K_ALIGN), _EMPTY_META_WORD,
                                                device=device, dtype=torch.int32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear,
                   config: Sparse24Config | None = None) -> Sparse24Linear:
        """Compress ``linear``: magnitude-prune to 2:4 (``config.prune``), then pack.

        With ``prune=False`` the weight must already be 2:4, else ``ValueError``.
        """
        from compress_ops.api import Sparse24Config

        config = config or Sparse24Config()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if config.prune:
            w = prune_2to4(w)
        elif not is_2to4(w):
            raise ValueError(
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}")
