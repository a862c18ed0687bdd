"""``SharedFilterConv2d``: a conv whose output channels are built from a small bank of shared
filters (weight sharing within a layer).

Format (every tensor in the ``state_dict``; the shapes fix how they are read):

- ``bank [F, C_in, kh, kw]`` (the weight dtype, trainable): the ``F`` shared filters;
- ``scale [C_out]`` (the weight dtype, trainable): one coefficient per output channel;
- ``assign [C_out]`` (fixed, the smallest integer dtype that holds ``F - 1``: uint8 up to 256
  filters, int16 up to 32768, else int32): the bank filter each output channel uses;
- ``bias [C_out]`` (optional, trainable).

Output channel ``o`` is the conv of ``x`` with ``scale[o] * bank[assign[o]]`` (+ ``bias[o]``),
so the effective dense weight is ``bank[assign] * scale[:, None, None, None]``. ``forward``
runs one conv with the ``F``-filter bank (``F`` outputs: ``F / C_out`` of the dense conv's
multiply-adds) and then gathers and scales the channels (``index_select`` + ``addcmul``): the
dense conv computed with :meth:`SharedFilterConv2d.dense_weight`, up to float rounding.

Stored weight bytes: ``bank`` + ``scale`` + ``assign`` as stored (the bias excluded, as every
compressed module reports it). Parameters: ``F * C_in * kh * kw + C_out`` (+ ``C_out`` bias).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from compress_ops._validate import check_choice, check_int, check_number
from compress_ops.configs import UnsupportedWeight
from compress_ops.nn.base import CompressedModule, conv_padding, from_dense_values, init_bias

__all__ = ["SharedFilterConv2d", "SHARED_FILTER_DEFAULTS", "assign_dtype", "shared_filter_count",
           "cluster_filters"]

#: the plain values ``from_dense`` takes (and ``SharedFilterConfig``'s defaults)
SHARED_FILTER_DEFAULTS: dict[str, Any] = {"filters": None, "fraction": None, "iters": 20}


def assign_dtype(filters: int) -> torch.dtype:
    """The smallest integer dtype ``assign`` is stored in for a bank of ``filters``."""
    if filters <= 256:
        return torch.uint8
    if filters <= 2**15:
        return torch.int16
    return torch.int32


def shared_filter_count(out_channels: int, filters: int | None = None,
                        fraction: float | None = None) -> int:
    """The bank size ``F``: ``filters``, or ``max(1, round(fraction * out_channels))``;
    exactly one of them must be given."""
    if (filters is None) == (fraction is None):
        raise ValueError("give exactly one of filters and fraction")
    if filters is not None:
        return check_int("filters", filters, min=1)
    check_number("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    return max(1, round(fraction * out_channels))


def _power_steps(gram: torch.Tensor, coef: torch.Tensor, assign: torch.Tensor, steps: int
                 ) -> torch.Tensor:
    """``steps`` power-iteration steps of every cluster's ``sum_o w_o w_o^T`` from its current
    center (each step raises ``sum_o <w_o, c>^2``), on center coefficients ``coef [F, C_out]``
    (``c_a = coef[a] @ w``). After the first step a center is a combination of its own rows, so
    the steps run on one coefficient per row against the Gram matrix masked to clusters. A
    cluster whose new center is zero (empty, or all its rows zero) keeps its center."""
    n, filters = assign.numel(), coef.shape[0]
    rows = torch.arange(n)
    masked = gram * (assign[:, None] == assign[None, :])
    v = (coef @ gram)[assign, rows]  # the first step: c'_a = sum_{o in a} <c_a, w_o> w_o
    for _ in range(steps):
        p = v @ masked  # <c'_{a(o)}, w_o>
        sq = torch.zeros(filters, dtype=v.dtype).index_add_(0, assign, v * p)  # ||c'_a||^2
        norm = sq.clamp_min(0).sqrt()[assign]
        v_unit = torch.where(norm > 0, v / norm.clamp_min(1e-300), torch.zeros_like(v))
        if _ == steps - 1:
            break
        v = torch.where(norm > 0, p / norm.clamp_min(1e-300), torch.zeros_like(p))
    new = torch.zeros_like(coef)
    new[assign, rows] = v_unit
    return torch.where((sq > 0)[:, None], new, coef)


def _reseed_empty(gram: torch.Tensor, coef: torch.Tensor, assign: torch.Tensor) -> None:
    """In place: each empty cluster takes the worst-fitted row not alone in its cluster."""
    filters, norms2 = coef.shape[0], gram.diagonal()
    for a in torch.nonzero(torch.bincount(assign, minlength=filters) == 0).flatten().tolist():
        resid = norms2 - (coef @ gram).abs().max(0).values ** 2
        resid[torch.bincount(assign, minlength=filters)[assign] == 1] = -1.0
        worst = int(resid.argmax())
        coef[a] = 0
        coef[a, worst] = 1 / norms2[worst].sqrt().clamp_min(1e-300)
        assign[worst] = a


def cluster_filters(w: torch.Tensor, filters: int, iters: int = 20, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-means of the rows of ``w [C_out, K]`` up to sign and scale: ``(centers [F, K]``
    (unit norm, or zero for zero rows), ``assign [C_out]`` int64, ``scale [C_out])`` lowering
    ``sum_o ||w_o - scale_o * centers[assign_o]||^2`` (float64 throughout).

    For a fixed assignment the best center of a cluster is the top eigenvector of
    ``sum_o w_o w_o^T`` over its rows (approached by power iteration from the current center)
    and ``scale_o = <w_o, center>`` (the least-squares coefficient); for fixed centers the best
    assignment takes the largest ``|<w_o, center>|``. The two steps alternate (neither raises
    the error) from a k-means++ seeding on the residual energy (seeded ``torch.Generator``:
    deterministic) until the assignment stops changing or after ``iters`` rounds. A cluster
    left empty is reseeded with the worst-fitted row. Centers lie in the span of the rows, so
    the iterations run on coefficients against the ``[C_out, C_out]`` Gram matrix: the cost
    does not grow with ``K``.
    """
    check_int("filters", filters, min=1)
    check_int("iters", iters, min=1)
    w = w.detach().to("cpu", torch.float64).reshape(w.shape[0], -1)
    n = w.shape[0]
    if filters > n:
        raise ValueError(f"filters must be <= the number of rows {n}, got {filters}")
    g = torch.Generator().manual_seed(seed)
    gram = w @ w.T
    norms2 = gram.diagonal().clone()
    inv = 1 / norms2.sqrt().clamp_min(1e-300)
    # k-means++ on the residual energy ||w_o||^2 - max_a <w_o, c_a>^2
    coef = torch.zeros(filters, n, dtype=torch.float64)
    best = torch.zeros(n, dtype=torch.float64)
    for a in range(filters):
        resid = (norms2 - best).clamp_min(0)
        pick = int(torch.multinomial(resid, 1, generator=g)) if resid.sum() > 0 else a % n
        coef[a, pick] = inv[pick] if norms2[pick] > 0 else 0.0
        best = torch.maximum(best, (gram[pick] * coef[a, pick]) ** 2)
    assign = (coef @ gram).abs().argmax(0)
    for _ in range(iters):
        _reseed_empty(gram, coef, assign)
        coef = _power_steps(gram, coef, assign, 4)
        new = (coef @ gram).abs().argmax(0)
        if torch.equal(new, assign):
            break
        assign = new
    _reseed_empty(gram, coef, assign)
    coef = _power_steps(gram, coef, assign, 50)
    scale = (coef @ gram)[assign, torch.arange(n)]
    return coef @ w, assign, scale


class SharedFilterConv2d(CompressedModule):
    """A ``nn.Conv2d`` (groups 1) whose ``C_out`` filters are ``scale[o] * bank[assign[o]]``
    for a bank of ``F < C_out`` shared filters (see the module docstring for the format).

    Parameters ``bank [F, C_in, kh, kw]``, ``scale [C_out]`` and ``bias`` are trainable; the
    ``assign`` buffer is fixed. ``forward`` is one conv with the bank, then a channel gather
    and scale: exactly ``F.conv2d(x, m.dense_weight(), m.bias, ...)`` up to float rounding,
    with the original stride, padding (``'same'``/``'valid'`` included), dilation and padding
    mode. Plain ATen calls, so it also runs in float64.

    A fresh module trains from scratch: a seeded, balanced random ``assign`` (each bank filter
    serves ``C_out // F`` or one more channels), a Kaiming-uniform bank (as ``nn.Conv2d``) and
    ``scale`` of seeded random signs (channels sharing a filter start as ``+f`` and ``-f``, not
    as copies); :meth:`from_dense` clusters an existing conv's filters instead.
    """

    kind = "shared_filter"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 filters: int, stride: int | tuple[int, int] = 1,
                 padding: str | int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, seed: int = 0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_channels", in_channels, min=1)
        check_int("out_channels", out_channels, min=1)
        check_int("filters", filters, min=1)
        if filters > out_channels:
            raise ValueError(f"filters must be <= out_channels={out_channels}, got {filters}")
        check_int("seed", seed)
        check_choice("padding_mode", padding_mode, ("zeros", "reflect", "replicate", "circular"))
        if isinstance(padding, str):
            check_choice("padding", padding, ("same", "valid"), hint="or ints")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as nn.Conv2d)")
        self.padding_mode = padding_mode
        self.groups = 1  # (nn.Conv2d's attribute, for code that reads it: .weight is dense)
        self._pad = list(conv_padding(self.padding, self.kernel_size, self.dilation))
        kw = {"device": device, "dtype": dtype}
        self.bank = nn.Parameter(torch.empty(filters, in_channels, *self.kernel_size, **kw))
        nn.init.kaiming_uniform_(self.bank, a=5**0.5)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(out_channels, generator=g)
        assign = torch.empty(out_channels, dtype=torch.int64)
        assign[perm] = torch.arange(out_channels) % filters
        signs = torch.randint(0, 2, (out_channels,), generator=g) * 2 - 1
        self.scale = nn.Parameter(signs.to(**kw))
        self.register_buffer("assign", assign.to(device=device, dtype=assign_dtype(filters)))
        init_bias(self, bias, out_channels, device, dtype)

    @property
    def filters(self) -> int:
        """``F``, the number of shared filters."""
        return self.bank.shape[0]

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, config: object | None = None, **values: Any
                   ) -> SharedFilterConv2d:
        """Cluster the filters of ``conv`` (a plain ``nn.Conv2d``, groups 1) into a bank of
        ``filters`` shared filters (or ``fraction`` of ``C_out``, rounded, at least 1), from a
        ``SharedFilterConfig`` or the keyword values ``filters`` / ``fraction`` / ``iters``:
        k-means up to sign and scale (:func:`cluster_filters`, deterministic), each channel's
        ``scale`` its least-squares coefficient. The bank filters are scaled so that each
        cluster's scales have mean square 1. ``note`` records the relative weight error
        ``||W - W_hat||_F / ||W||_F`` (also :meth:`relative_error`)."""
        v = from_dense_values(config, values, SHARED_FILTER_DEFAULTS)
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"expected a plain nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"shared filters need groups=1, got groups={conv.groups}")
        c_out = conv.out_channels
        f = shared_filter_count(c_out, v["filters"], v["fraction"])
        if f > c_out:
            raise ValueError(f"filters must be <= out_channels={c_out}, got {f}")
        w = conv.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise UnsupportedWeight("SharedFilterConv2d: the conv weight has non-finite values")
        centers, assign, scale = cluster_filters(w, f, v["iters"])
        # per cluster, move the magnitude into the bank so that the scales are ~ +-1
        ms = torch.zeros(f, dtype=torch.float64).index_add_(0, assign, scale * scale)
        count = torch.bincount(assign, minlength=f).to(torch.float64)
        m = (ms / count.clamp_min(1)).sqrt()
        m = torch.where(m > 0, m, torch.ones_like(m))
        mod = cls(conv.in_channels, c_out, conv.kernel_size, f, conv.stride, conv.padding,
                  conv.dilation, conv.bias is not None, conv.padding_mode, device=w.device,
                  dtype=w.dtype)
        with torch.no_grad():
            mod.bank.copy_((centers * m[:, None]).reshape(mod.bank.shape))
            mod.scale.copy_(scale / m[assign])
            mod.assign.copy_(assign)
            if conv.bias is not None:
                mod.bias.copy_(conv.bias.detach())
        err = mod.relative_error(w)
        mod.note = f"weight error {err:.3g} (relative, Frobenius)"
        return mod

    def relative_error(self, weight: torch.Tensor) -> float:
        """``||weight - dense_weight()||_F / ||weight||_F`` (float64)."""
        w = weight.detach().double()
        return float((w - self.dense_weight().detach().double()).norm()
                     / w.norm().clamp_min(1e-300))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SharedFilterConv2d: x must be [N, C, H, W] or [C, H, W] with "
                             f"C = in_channels={self.in_channels}, got {tuple(x.shape)}")
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            y = F.conv2d(x, self.bank, None, self.stride, 0, self.dilation)
        else:
            y = F.conv2d(x, self.bank, None, self.stride, self.padding, self.dilation)
        y = y.index_select(-3, self.assign.to(torch.int64))
        # in the conv's dtype (under autocast the conv's output dtype, as nn.Conv2d returns)
        scale = self.scale.to(y.dtype)[:, None, None]
        if self.bias is None:
            return y * scale
        return torch.addcmul(self.bias.to(y.dtype)[:, None, None], y, scale)

    def dense_weight(self) -> torch.Tensor:
        """The effective ``[C_out, C_in, kh, kw]`` kernel, ``bank[assign] * scale``."""
        return (self.bank.index_select(0, self.assign.to(torch.int64))
                * self.scale[:, None, None, None])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        a = state_dict.get(prefix + "assign")
        if isinstance(a, torch.Tensor) and a.device.type != "meta" and a.numel():
            if a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool:
                raise ValueError(f"SharedFilterConv2d: assign must hold integers, got {a.dtype}")
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.filters:
                raise ValueError(f"SharedFilterConv2d: assign values must be in [0, "
                                 f"{self.filters}) (filters={self.filters}), got [{lo}, {hi}]")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.bank.dtype

    def dense_params(self) -> int:
        """Parameters of the dense weight it replaces (``C_out * C_in * kh * kw``)."""
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw

    def stored_params(self) -> int:
        """Trainable weight parameters: ``bank`` + ``scale`` (the bias excluded)."""
        return self.bank.numel() + self.scale.numel()

    def dense_weight_bytes(self) -> int:
        return self.dense_params() * self.bank.element_size()

    def stored_weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bank, self.scale, self.assign))

    def report_note(self) -> str:
        head = (f"{self.filters} shared filters for {self.out_channels} channels, "
                f"{self.stored_params():,} weight params (dense {self.dense_params():,})")
        return "; ".join(n for n in (head, self.note) if n)

    def init_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "filters": self.filters,
                "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None,
                "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"filters={self.filters}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, "
                f"padding_mode={self.padding_mode}")
