"""``FusedDWSepConv2d``: a depthwise conv, its BatchNorm and activation, the pointwise conv after
it, its BatchNorm and activation (and a residual add), as one module calling one op."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops.configs import UnfusableError
from compress_ops.kernels.formats.dwsep_conv import (
    ACTIVATIONS,
    KERNEL_SIZES,
    STRIDES,
    output_size,
)
from compress_ops.nn.base import CompressedModule, conv_padding

__all__ = ["FusedDWSepConv2d", "activation_name", "fold_bn"]


def activation_name(module: nn.Module | None) -> str:
    """The op's name of an activation module (``None`` / ``nn.Identity``: ``"none"``)."""
    if module is None or type(module) is nn.Identity:
        return "none"
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.ReLU6 or (type(module) is nn.Hardtanh and module.min_val == 0.0
                                    and module.max_val == 6.0):
        return "relu6"
    if type(module) is nn.Hardswish:
        return "hardswish"
    if type(module) is nn.SiLU:
        return "silu"
    raise UnfusableError(f"activation {type(module).__name__} is not one of {ACTIVATIONS}")


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None,
             bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold eval-mode BatchNorm into the conv before it, in float64: ``w * s``,
    ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel."""
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    if bn is None:
        return w, b
    if type(bn) is not nn.BatchNorm2d:
        raise UnfusableError(f"{type(bn).__name__} is not a plain nn.BatchNorm2d")
    if bn.running_mean is None or bn.running_var is None:
        raise UnfusableError("BatchNorm2d without running statistics cannot be folded")
    if bn.training:
        raise UnfusableError("BatchNorm2d is in training mode (it normalises with batch "
                             "statistics): call model.eval() before fusing")
    s = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    shift = -bn.running_mean.double() * s
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    return w, shift if b is None else b * s + shift


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero padding of a conv, as its forward applies it."""
    if conv.padding == "same" and conv.stride != (1, 1):
        raise UnfusableError("padding='same' with stride > 1")
    return conv_padding(conv.padding, conv.kernel_size, conv.dilation)


class FusedDWSepConv2d(CompressedModule):
    """``act2(pw(act1(dw(x) + b1)) + b2) (+ residual)``: MobileNet's depthwise-separable unit
    with BatchNorm folded in, as one op (``torch.ops.compress_ops.dwsep_conv2d``).

    Parameters: ``dw_weight [C, k, k]`` (stored tap-major, strides ``(1, k C, C)``, so the kernel
    reads a tap's channels as one vector; ``load_state_dict`` and ``.to()`` keep that layout; a
    contiguous one runs too, with one scalar load per channel and tap), ``dw_bias [C]``,
    ``pw_weight [Cout, C]``, ``pw_bias [Cout]``. ``padding`` is ``(left, right, top, bottom)``
    zero padding (an int pads every side). ``forward(x, residual=None)`` takes ``x``
    ``[B, C, H, W]`` in any memory format and returns the kernel's ``channels_last`` tensor,
    or a contiguous NCHW copy when ``x`` was NCHW-contiguous (what the convolutions it
    replaces returned; run the model channels-last to skip that copy); ``residual`` is added
    last. Use :meth:`from_modules` to fuse existing layers (eval-mode BatchNorm statistics).
    """

    kind = "dwsep-fused"
    saved_attrs = ("input_size", "note")

    @property
    def weight(self) -> torch.Tensor:
        """No single weight: the unit replaced two convs (``dw_weight``, ``pw_weight``), so
        ``.weight`` is absent (``hasattr(m, "weight")`` is False) rather than a guess."""
        raise AttributeError(f"{type(self).__name__} fuses two convs: read dw_weight and "
                             f"pw_weight")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | tuple[int, int, int, int] = 1,
                 act1: str = "relu6", act2: str = "none", dw_bias: bool = True,
                 pw_bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be >= 1")
        if kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be one of {KERNEL_SIZES}, got {kernel_size!r}")
        if stride not in STRIDES:
            raise ValueError(f"stride must be one of {STRIDES}, got {stride!r}")
        for name, act in (("act1", act1), ("act2", act2)):
            if act not in ACTIVATIONS:
                raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {act!r}")
        pad = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
        if len(pad) != 4 or min(pad) < 0 or max(pad) >= kernel_size:
            raise ValueError(f"padding must be an int or (left, right, top, bottom), each in "
                             f"[0, {kernel_size}), got {padding!r}")
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, pad
        self.act1, self.act2 = act1, act2
        # [C, k, k] stored tap-major (strides (1, k C, C)): the kernel reads one tap of a
        # channel block as contiguous, packed fp16 pairs (kernels/dwsep_conv.py)
        self.dw_weight = nn.Parameter(
            torch.empty(kernel_size, kernel_size, in_channels, **kw).permute(2, 0, 1))
        self.pw_weight = nn.Parameter(torch.empty(out_channels, in_channels, **kw))
        nn.init.kaiming_uniform_(self.dw_weight, a=5**0.5)
        nn.init.kaiming_uniform_(self.pw_weight, a=5**0.5)
        self.dw_bias = nn.Parameter(torch.zeros(in_channels, **kw)) if dw_bias else None
        self.pw_bias = nn.Parameter(torch.zeros(out_channels, **kw)) if pw_bias else None
        # (H, W) the unit was fused for, when the padding it replaces was computed per call
        # from the input's size (TF "same" padding); any other size then raises
        self.input_size: tuple[int, int] | None = None

    @classmethod
    def from_modules(cls, dw_conv: nn.Conv2d, pw_conv: nn.Conv2d,
                     bn1: nn.BatchNorm2d | None = None, act1: nn.Module | None = None,
                     bn2: nn.BatchNorm2d | None = None, act2: nn.Module | None = None,
                     pad: nn.Module | None = None) -> FusedDWSepConv2d:
        """Fuse ``[pad] -> dw_conv -> [bn1] -> [act1] -> pw_conv -> [bn2] -> [act2]``.

        BatchNorm is folded with its running statistics (what it computes in eval mode),
        exactly in float64. ``pad`` may be an ``nn.ZeroPad2d`` (or a zero ``ConstantPad2d``)
        applied before the depthwise conv. Raises
        :class:`~compress_ops.configs.UnfusableError` (a ``ValueError``) naming what the unit
        cannot reproduce: a Conv2d subclass (its forward may pad or do more than a plain conv),
        groups != channels, kernel sizes other than 3/5, dilation, non-zero padding modes, a
        pointwise conv that is not 1x1 / stride 1 / groups 1.
        """
        for name, conv in (("dw_conv", dw_conv), ("pw_conv", pw_conv)):
            if type(conv) is not nn.Conv2d:
                raise UnfusableError(f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d "
                                     f"(its forward may pad or do more than the conv)")
            if conv.padding_mode != "zeros":
                raise UnfusableError(f"{name} has padding_mode={conv.padding_mode!r}")
        c = dw_conv.in_channels
        if dw_conv.groups != c or dw_conv.out_channels != c:
            raise UnfusableError(f"dw_conv is not depthwise: groups={dw_conv.groups}, "
                                 f"in={c}, out={dw_conv.out_channels} (needs groups = in = out)")
        kh, kw = dw_conv.kernel_size
        if kh != kw or kh not in KERNEL_SIZES:
            raise UnfusableError(f"depthwise kernel {dw_conv.kernel_size} is not 3x3 or 5x5")
        if dw_conv.dilation != (1, 1):
            raise UnfusableError(f"depthwise dilation {dw_conv.dilation} is not supported")
        sh, sw = dw_conv.stride
        if sh != sw or sh not in STRIDES:
            raise UnfusableError(f"depthwise stride {dw_conv.stride} is not 1 or 2")
        if (pw_conv.kernel_size != (1, 1) or pw_conv.stride != (1, 1) or pw_conv.groups != 1
                or _pair(pw_conv.padding) != (0, 0) or pw_conv.in_channels != c):
            raise UnfusableError(f"pw_conv must be a 1x1, stride 1, groups 1, unpadded conv from "
                                 f"{c} channels, got {pw_conv}")
        left, right, top, bottom = _conv_padding(dw_conv)
        if pad is not None:
            if not isinstance(pad, nn.ConstantPad2d) or pad.value != 0.0:
                raise UnfusableError(f"{type(pad).__name__} is not a zero padding")
            pl, pr, pt, pb = pad.padding  # nn.ConstantPad2d stores (left, right, top, bottom)
            if min(pl, pr, pt, pb) < 0:
                raise UnfusableError(f"{type(pad).__name__}{tuple(pad.padding)} crops: a crop "
                                     f"before the conv is not a padding")
            left, right, top, bottom = left + pl, right + pr, top + pt, bottom + pb
        if max(left, right, top, bottom) >= kh or min(left, right, top, bottom) < 0:
            raise UnfusableError(f"padding {(left, right, top, bottom)} must be in [0, {kh})")
        a1, a2 = activation_name(act1), activation_name(act2)
        dw_w, dw_b = fold_bn(dw_conv.weight[:, 0], dw_conv.bias, bn1)
        pw_w, pw_b = fold_bn(pw_conv.weight[:, :, 0, 0], pw_conv.bias, bn2)
        ref = dw_conv.weight
        mod = cls(c, pw_conv.out_channels, kh, sh, (left, right, top, bottom), a1, a2,
                  dw_b is not None, pw_b is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            mod.dw_weight.copy_(dw_w)
            mod.pw_weight.copy_(pw_w)
            if dw_b is not None:
                mod.dw_bias.copy_(dw_b)
            if pw_b is not None:
                mod.pw_bias.copy_(pw_b)
        return mod

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"this FusedDWSepConv2d was fused for {self.input_size[0]}x{self.input_size[1]} "
                f"inputs only (the padding it replaced depends on the input size), got "
                f"{tuple(x.shape[-2:])}: fuse the model again with example inputs of that size")
        y = torch.ops.compress_ops.dwsep_conv2d(
            x, self.dw_weight, self.dw_bias, self.pw_weight, self.pw_bias, residual,
            self.stride, list(self.padding), self.act1, self.act2)
        if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            # an NCHW model gets NCHW back, as the convs it replaces gave it (code downstream
            # may .view() it): one copy; keep the model channels-last to avoid it
            y = y.contiguous()
        return y

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.pw_weight.dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "dw_weight"
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor) and w.dim() == 3 and w.stride()[0] != 1:
            # tap-major, also when the tensor is assigned (load_state_dict(assign=True))
            state_dict[key] = w.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def dense_weight_bytes(self) -> int:
        """Bytes of the two conv weights it replaces (BatchNorm folded: the same count)."""
        return self.stored_weight_bytes()

    def stored_weight_bytes(self) -> int:
        return (self.dw_weight.numel() + self.pw_weight.numel()) * self.dw_weight.element_size()

    def flops(self, h: int, w: int, batch: int = 1) -> int:
        """Multiply-adds x 2 for one ``[batch, C, h, w]`` input."""
        ho, wo = output_size(h, w, self.kernel_size, self.stride, self.padding)
        return 2 * batch * ho * wo * self.in_channels * (self.kernel_size**2 + self.out_channels)

    def init_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": list(self.padding), "act1": self.act1, "act2": self.act2,
                "dw_bias": self.dw_bias is not None, "pw_bias": self.pw_bias is not None}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, act1={self.act1}, "
                f"act2={self.act2}"
                + ("" if self.input_size is None else f", input_size={self.input_size}"))
