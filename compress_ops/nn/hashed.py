"""``HashedLinear``: a linear layer whose weight is hashed into a few shared buckets
(HashedNets, Chen et al. 2015)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops._validate import check_choice, check_int, check_number
from compress_ops.kernels.formats.hashed import (
    HASH_VERSION,
    MAX_BUCKETS,
    bucket_means,
    buckets_for,
    check_seed,
    hashed_bytes,
    hashed_weight,
)
from compress_ops.nn.base import (
    CompressedLinear,
    FormatRecord,
    check_compute_dtype,
    from_dense_values,
    init_bias,
)

__all__ = ["HashedLinear", "HASHED_DEFAULTS"]

#: ``from_dense``'s defaults (the fields of :class:`~compress_ops.configs.HashedConfig`).
HASHED_DEFAULTS: dict[str, Any] = {"compression": 0.125, "buckets": None, "seed": 0,
                                   "init": "dense"}
INITS = ("dense", "random")


class HashedLinear(FormatRecord, CompressedLinear):
    """``y = x @ W^T + b`` with the virtual weight ``W[n, k] = sign(n, k) * w[bucket(n, k)]``:
    ``B`` trainable buckets ``w`` shared by all ``out_features * in_features`` positions through
    a fixed hash of the position and ``seed``
    (:mod:`compress_ops.kernels.formats.hashed`). No index is stored: the layer holds ``B``
    parameters (``B * itemsize`` bytes) and a seed, whatever its shape.

    ``HashedLinear(in_features, out_features, buckets=B)`` or ``compression=c`` (``B = round(c
    * out * in)``) builds a layer to train from scratch: the buckets are drawn from
    ``U(-1/sqrt(in), 1/sqrt(in))``, so the virtual weight starts with ``nn.Linear``'s
    distribution. :meth:`from_dense` starts from a trained layer instead, each bucket the mean
    of its members (the least-squares fit), for fine-tuning. Gradients reach ``w`` (a
    scatter-add of the dense gradient by bucket), the input and the bias. ``forward`` is one
    op, ``torch.ops.compress_ops.hashed_linear``. The seed, the true sizes and the hash version
    are the module's format record (``_extra_state``): a state_dict of another seed or hash is
    refused by name.
    """

    kind = "hashed"
    format_fields = ("in_features", "out_features", "seed", "hash_version")

    def __init__(self, in_features: int, out_features: int, buckets: int | None = None, *,
                 compression: float | None = None, seed: int = 0, bias: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_features", in_features, min=1)
        check_int("out_features", out_features, min=1)
        if (buckets is None) == (compression is None):
            raise ValueError("give exactly one of buckets and compression")
        if compression is not None:
            check_number("compression", compression, low=0.0, high=1.0, low_open=True)
            buckets = buckets_for(out_features, in_features, compression)
        check_int("buckets", buckets, min=1)
        if buckets > MAX_BUCKETS:
            raise ValueError(f"buckets must be at most {MAX_BUCKETS}, got {buckets}")
        dtype = dtype or torch.get_default_dtype()
        check_compute_dtype("HashedLinear", dtype)
        self.in_features, self.out_features = in_features, out_features
        self.seed = check_seed(seed)
        self.hash_version = HASH_VERSION
        bound = 1 / math.sqrt(in_features)
        self.w = nn.Parameter(torch.empty(buckets, device=device, dtype=dtype)
                              .uniform_(-bound, bound))
        init_bias(self, bias, out_features, device, dtype)
        if bias:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @property
    def buckets(self) -> int:
        return self.w.numel()

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: object | None = None,
                   **values: Any) -> HashedLinear:
        """A hashed layer of ``linear``'s shape (``compression`` or ``buckets``, ``seed``, from a
        :class:`~compress_ops.configs.HashedConfig` or the keywords of
        :data:`HASHED_DEFAULTS`). ``init="dense"`` sets each bucket to the mean of its members'
        weights (sign-corrected: the least-squares fit of ``linear.weight``); ``init="random"``
        keeps the fresh initialisation (training from scratch in ``linear``'s place). The bias
        is copied either way."""
        v = from_dense_values(config, values, HASHED_DEFAULTS)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        check_choice("init", v["init"], INITS)
        w = linear.weight.detach()
        n, k = w.shape
        if v["buckets"] is not None:
            size = {"buckets": v["buckets"]}
        else:
            size = {"compression": v["compression"]}
        mod = cls(k, n, **size, seed=v["seed"], bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if v["init"] == "dense":
                mod.w.copy_(bucket_means(w, mod.buckets, mod.seed))
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in_features(x)
        return torch.ops.compress_ops.hashed_linear(x, self.w, self.bias, self.out_features,
                                                    self.in_features, self.seed,
                                                    self.hash_version)

    def dense_weight(self) -> torch.Tensor:
        return hashed_weight(self.w, self.out_features, self.in_features, self.seed)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.w.dtype

    def stored_weight_bytes(self) -> int:
        return hashed_bytes(self.buckets, self.w.dtype)

    def report_note(self) -> str:
        own = f"{self.buckets} buckets, seed {self.seed}"
        return "; ".join(n for n in (self.note, own) if n)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "buckets": self.buckets, "seed": self.seed, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"buckets={self.buckets}, seed={self.seed}, bias={self.bias is not None}, "
                f"dtype={self.w.dtype}")
