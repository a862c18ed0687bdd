"""``LowRankLinear`` (SVD factors, one fused op) and ``LowRankConv2d`` (Tucker-2)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops._validate import check_choice, check_int
from compress_ops.factorize import svd_factors, tucker2
from compress_ops.kernels.formats.lowrank import lowrank_bytes
from compress_ops.nn.base import (
    CompressedLinear,
    CompressedModule,
    check_compute_dtype,
    conv_padding,
    init_bias,
)

__all__ = ["LowRankLinear", "LowRankConv2d"]


def _rank_args(config: object | None, rank: int | None, energy: float | None,
               method: str | None) -> tuple[int | None, float | None, str]:
    if config is not None:
        if rank is not None or energy is not None or method is not None:
            raise ValueError("give a config or rank/energy/method, not both")
        return config.rank, config.energy, config.method
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of config, rank and energy")
    return rank, energy, method or "auto"


class LowRankLinear(CompressedLinear):
    """``y = x @ (u @ v)^T (+ x @ base_weight^T) + b``: a rank-``r`` factorized ``nn.Linear``.

    Parameters (trainable: fine-tuning the factors is a normal use): ``u [out, r]``,
    ``v [r, in]``, optional ``base_weight [out, in]`` (a dense base, ``base=True``: the shape of
    a LoRA adapter on a frozen layer) and ``bias``. ``weight`` is the decompressed copy every
    compressed module has (``u @ v (+ base_weight)``); a state_dict saved when the base was
    called ``weight`` still loads. ``forward`` is one op,
    ``torch.ops.compress_ops.lowrank_linear``. A fresh module holds a zero product (``u = 0``,
    ``v`` Kaiming-uniform, as LoRA initialises), so it trains from the start; use
    :meth:`from_dense` to factorize an existing layer.
    """

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 base: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        check_int("rank", rank, min=1)
        dtype = dtype or torch.get_default_dtype()
        check_compute_dtype("LowRankLinear", dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.u = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.v = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.v, a=5**0.5)
        if base:
            self.base_weight = nn.Parameter(torch.zeros(out_features, in_features,
                                                        device=device, dtype=dtype))
        else:
            self.register_parameter("base_weight", None)
        init_bias(self, bias, out_features, device, dtype)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: object | None = None, *,
                   rank: int | None = None, energy: float | None = None,
                   method: str | None = None) -> LowRankLinear:
        """Truncated SVD of ``linear.weight`` (``sqrt(sigma)`` in both factors), at ``rank`` or
        the smallest rank keeping ``energy`` of ``||W||_F**2``, by the SVD ``method``
        (``"auto"`` by default; see :func:`~compress_ops.factorize.svd_factors`); from a
        ``LowRankConfig`` or the keyword arguments. It factorizes at any rank; ``compress_``
        keeps layers dense where ``r (in + out) >= in * out`` (no saving)."""
        r, e, method = _rank_args(config, rank, energy, method)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        f = svd_factors(w, rank=r, energy=e, method=method)
        mod = cls(linear.in_features, linear.out_features, f.rank,
                  bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.u.copy_(f.u)
            mod.v.copy_(f.v)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in_features(x)
        return torch.ops.compress_ops.lowrank_linear(x, self.u, self.v, self.base_weight,
                                                     self.bias)

    def dense_weight(self) -> torch.Tensor:
        w = self.u @ self.v
        return w + self.base_weight if self.base_weight is not None else w

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        old = prefix + "weight"  # the base's name before every compressed module had .weight
        if old in state_dict and prefix + "base_weight" not in state_dict:
            state_dict[prefix + "base_weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.u.dtype

    def stored_weight_bytes(self) -> int:
        n = lowrank_bytes(self.out_features, self.in_features, self.rank, self.u.dtype)
        if self.base_weight is not None:
            n += self.base_weight.numel() * self.base_weight.element_size()
        return n

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None,
                "base": self.base_weight is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, "
                f"base={self.base_weight is not None}, dtype={self.u.dtype}")


class LowRankConv2d(CompressedModule):
    """A Tucker-2 factorized ``nn.Conv2d``: 1x1 reduce (``C_in -> r_in``), ``kh x kw`` core
    conv (``r_in -> r_out``, the original stride, padding, padding mode and dilation), 1x1
    restore (``r_out -> C_out``, + bias).

    One module, no ``Sequential``: ``forward`` calls ``F.conv2d`` three times and is exact for
    its factors, i.e. equals the original conv computed with :meth:`dense_weight` (a 1x1 conv
    commutes with every padding mode, so the padding moves to the core). Parameters
    ``reduce_weight [r_in, C_in, 1, 1]``, ``core [r_out, r_in, kh, kw]``,
    ``restore_weight [C_out, r_out, 1, 1]``, ``bias``. Groups must be 1.
    """

    kind = "tucker2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 ranks: tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: str | int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be >= 1")
        if len(ranks) != 2:
            raise ValueError(f"ranks must be (r_out, r_in), got {ranks!r}")
        r_out, r_in = ranks
        check_int("r_out", r_out, min=1)
        check_int("r_in", r_in, min=1)
        check_choice("padding_mode", padding_mode, ("zeros", "reflect", "replicate", "circular"))
        dtype = dtype or torch.get_default_dtype()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self.groups = 1  # (nn.Conv2d's attribute, for code that reads it: .weight is dense)
        self._pad = list(conv_padding(self.padding, self.kernel_size, self.dilation))
        kw = {"device": device, "dtype": dtype}
        self.reduce_weight = nn.Parameter(torch.empty(r_in, in_channels, 1, 1, **kw))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **kw))
        self.restore_weight = nn.Parameter(torch.empty(out_channels, r_out, 1, 1, **kw))
        for p in (self.reduce_weight, self.core, self.restore_weight):
            nn.init.kaiming_uniform_(p, a=5**0.5)
        init_bias(self, bias, out_channels, device, dtype)

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.shape[0], self.core.shape[1]

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, config: object | None = None, *,
                   ranks: tuple[int, int] | None = None,
                   energy: float | None = None) -> LowRankConv2d:
        """Tucker-2 (HOSVD + 2 HOOI sweeps) of ``conv.weight`` at ``ranks = (r_out, r_in)`` or
        per-mode ``energy``; a ``LowRankConfig(rank=r)`` uses ``(r, r)`` (clamped to the
        channels)."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"expected a plain nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"Tucker-2 needs groups=1, got groups={conv.groups}")
        if config is not None:
            if ranks is not None or energy is not None:
                raise ValueError("give a config or ranks/energy, not both")
            ranks = None if config.rank is None else (config.rank, config.rank)
            energy = config.energy
        w = conv.weight.detach()
        f = tucker2(w, ranks=ranks, energy=energy)
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, f.ranks, conv.stride,
                  conv.padding, conv.dilation, conv.bias is not None, conv.padding_mode,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.reduce_weight.copy_(f.in_factor.t()[:, :, None, None])
            mod.core.copy_(f.core)
            mod.restore_weight.copy_(f.out_factor[:, :, None, None])
            if conv.bias is not None:
                mod.bias.copy_(conv.bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(x, self.reduce_weight)
        if self.padding_mode != "zeros":
            t = F.conv2d(F.pad(t, self._pad, mode=self.padding_mode), self.core, None,
                         self.stride, 0, self.dilation)
        else:
            t = F.conv2d(t, self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(t, self.restore_weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The composed ``[C_out, C_in, kh, kw]`` kernel."""
        return torch.einsum("oa,abhw,bi->oihw", self.restore_weight[:, :, 0, 0], self.core,
                            self.reduce_weight[:, :, 0, 0])

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.core.dtype

    def dense_weight_bytes(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw * self.core.element_size()

    def stored_weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size()
                   for p in (self.reduce_weight, self.core, self.restore_weight))

    def init_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "ranks": list(self.ranks),
                "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None,
                "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"ranks={self.ranks}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, "
                f"padding_mode={self.padding_mode}")
