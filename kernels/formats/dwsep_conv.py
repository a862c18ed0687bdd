"""Fused depthwise-separable convolution: the layout, activations, sizes and input checks
(Triton-free).

Layout
------
Activations are channels-last (NHWC in memory): the op takes a logical ``[B, C, H, W]`` tensor,
converts it once to ``torch.channels_last`` (free when it already is) and returns a
``channels_last`` ``[B, Cout, Ho, Wo]`` tensor. Weights in PyTorch's own shapes: depthwise
``dw_weight [C, kh, kw]`` (a ``Conv2d(C, C, k, groups=C)`` weight without its unit dim),
pointwise ``pw_weight [Cout, C]`` (any strides; the module keeps ``dw_weight`` tap-major,
strides ``(1, k C, C)``, for the kernel's vector loads); biases ``[C]`` / ``[Cout]`` with
BatchNorm folded in by the module. ``k`` in {3, 5}, stride 1 or 2, dilation 1, zero padding
``(left, right, top, bottom)`` (asymmetric 'same' padding of TensorFlow ports included): 
``Ho = (H + top + bottom - k) // stride + 1``, likewise ``Wo``.

Empty dimensions: an empty batch works and gives the empty result: ``B = 0``, or ``Ho = 0`` /
``Wo = 0`` (the padded input short of the kernel by less than one stride; an input with
``H = 0`` under the usual 'same' padding). A negative output size, and an input with ``H = 0``
or ``W = 0`` that the padding alone would turn into output rows or columns, are refused; so are
``C = 0`` and ``Cout = 0`` (an empty weight), naming the dimension.

Activations (``act1`` after the depthwise conv, ``act2`` after the pointwise one):
:data:`ACTIVATIONS`, computed as :data:`ACTIVATION_FNS`. The kernel is
:mod:`compress_ops.kernels.dwsep_conv`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from compress_ops._validate import check_choice, is_int
from compress_ops.kernels.formats._common import ACT_DTYPES, check_companion, check_nonempty

__all__ = ["ACTIVATIONS", "ACTIVATION_FNS", "KERNEL_SIZES", "STRIDES", "output_size",
           "dwsep_bytes", "check_inputs"]

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")
ACTIVATION_FNS = {"none": lambda v: v, "relu": F.relu, "relu6": F.relu6,
                  "hardswish": F.hardswish, "silu": F.silu}
KERNEL_SIZES = (3, 5)
STRIDES = (1, 2)
_OP = "dwsep_conv2d"  # names the op in the empty-dimension errors


def output_size(h: int, w: int, k: int, stride: int,
                padding: Sequence[int]) -> tuple[int, int]:
    """``(Ho, Wo)`` for zero padding ``(left, right, top, bottom)``."""
    left, right, top, bottom = padding
    return (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1


def dwsep_bytes(b: int, h: int, w: int, c: int, cout: int, k: int, stride: int,
                padding: Sequence[int], e: int, fused: bool = True) -> int:
    """Minimum activation bytes moved (weights excluded): see the module docstring."""
    ho, wo = output_size(h, w, k, stride, padding)
    io = b * h * w * c + b * ho * wo * cout
    return e * (io if fused else io + 2 * b * ho * wo * c)


def _tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_inputs(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                 pw_weight: torch.Tensor, pw_bias: torch.Tensor | None,
                 residual: torch.Tensor | None, stride: int, padding: Sequence[int],
                 act1: str, act2: str) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of the fused dw+pw conv."""
    _tensor(x, "x")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    _tensor(dw_weight, "dw_weight")
    _tensor(pw_weight, "pw_weight")
    b, c, h, w = x.shape
    check_nonempty(_OP, ("C (x.shape[1])", c))
    if dw_weight.dim() != 3 or dw_weight.shape[1] != dw_weight.shape[2]:
        raise ValueError(f"dw_weight must be [C, k, k] (a depthwise kernel, groups = channels), "
                         f"got shape {tuple(dw_weight.shape)}")
    if dw_weight.shape[0] != c:
        raise ValueError(f"dw_weight has {dw_weight.shape[0]} channels but x has C={c}: the "
                         f"depthwise conv needs groups = in = out channels")
    k = dw_weight.shape[1]
    if k not in KERNEL_SIZES:
        raise ValueError(f"kernel size {k} is not supported; expected one of {KERNEL_SIZES}")
    check_choice("stride", stride, STRIDES)
    if len(padding) != 4 or any(not is_int(p) or p < 0 for p in padding):
        raise ValueError(f"padding must be 4 ints >= 0 (left, right, top, bottom), got "
                         f"{padding!r}")
    if max(padding) >= k:
        raise ValueError(f"padding {tuple(padding)} must be smaller than the kernel size {k}")
    if pw_weight.dim() != 2 or pw_weight.shape[1] != c:
        raise ValueError(f"pw_weight must be [Cout, C={c}], got shape {tuple(pw_weight.shape)}")
    cout = pw_weight.shape[0]
    check_nonempty(_OP, ("Cout (pw_weight.shape[0])", cout))
    for name, act in (("act1", act1), ("act2", act2)):
        if act not in ACTIVATIONS:
            raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {act!r}")
    ho, wo = output_size(h, w, k, stride, padding)
    if ho < 0 or wo < 0:
        raise ValueError(f"input {h}x{w} is smaller than the padded kernel: output {ho}x{wo} "
                         "(an output of 0 rows or columns is an empty result, a negative one "
                         "an error)")
    if (h == 0 and ho > 0) or (w == 0 and wo > 0):
        raise ValueError(f"x has H={h}, W={w}: an empty input would give an output of "
                         f"{ho}x{wo} from the padding {tuple(padding)} alone")
    for name, t, shape in (("dw_weight", dw_weight, None), ("pw_weight", pw_weight, None),
                           ("dw_bias", dw_bias, (c,)), ("pw_bias", pw_bias, (cout,)),
                           ("residual", residual, (b, cout, ho, wo))):
        if t is not None:
            check_companion(t, name, shape, x, "x")
