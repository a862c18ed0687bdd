"""``W8A8Linear``: 8-bit weights and 8-bit activations (int8, or FP8 e4m3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import compress_ops.ops  # noqa: F401  (registers torch.ops.compress_ops.*)
from compress_ops._validate import check_choice
from compress_ops.kernels.formats.w8a8 import (
    QDTYPES,
    dequantize_weight,
    qdtype_name,
    quantize_weight,
    w8a8_bytes,
)
from compress_ops.nn.base import (
    CompressedLinear,
    FormatRecord,
    check_compute_dtype,
    from_dense_values,
    init_bias,
)
from compress_ops.ops.w8a8 import FP8_MIN_CAPABILITY

__all__ = ["W8A8Linear", "W8A8_DEFAULTS", "ACT_SCALES"]

#: ``W8A8Linear.from_dense`` keyword values when no config is given (``W8A8Config()``'s).
W8A8_DEFAULTS: dict[str, Any] = {"dtype": "int8", "act_scale": "dynamic"}
#: How the activation's scale is found: per token at run time, or one calibrated value.
ACT_SCALES = ("dynamic", "static")
_CODES = tuple(QDTYPES)  # the format record stores the index of the weight type


class W8A8Linear(FormatRecord, CompressedLinear):
    """``y = Q(x) @ Q(W)^T + b`` with 8-bit weights *and* activations: the tensor cores run at
    twice the fp16 rate (int8 or FP8 e4m3), which helps where a layer is compute-bound (large
    batches, prefill); a weight-only layer helps where it is memory-bound.

    Buffers (format of :mod:`compress_ops.kernels.formats.w8a8`): ``qweight [out, in]`` int8 or
    float8_e4m3fn, ``w_scales [out]`` in the compute dtype (symmetric per output channel),
    with ``act_scale="static"`` ``input_scale [1]`` (one calibrated scale for the whole input;
    ``"dynamic"``: each row of ``x`` gets its own absmax scale at run time), and with
    ``smoothed=True`` ``smooth [in]``: SmoothQuant's ``1 / s`` per input channel, applied to
    ``x`` inside the op's quantization step (where no exact fold into an earlier layer exists;
    ``qweight`` then holds the columns of ``W`` times ``s``). ``.to(dtype)`` /
    ``.half()`` convert the scales and the bias, never the stored FP8 levels.
    """

    kind = "w8a8"
    format_fields = ("in_features", "out_features", "dtype_code", "static_scale", "smoothed")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 qdtype: str = "int8", act_scale: str = "dynamic", smoothed: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, "
                             f"{out_features}")
        check_choice("qdtype", qdtype, tuple(QDTYPES))
        check_choice("act_scale", act_scale, ACT_SCALES)
        dtype = dtype or torch.get_default_dtype()
        check_compute_dtype("W8A8Linear", dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.qdtype = qdtype
        self.act_scale = act_scale
        self.register_buffer("qweight", torch.zeros(out_features, in_features, device=device,
                                                    dtype=torch.int8).to(QDTYPES[qdtype]))
        self.register_buffer("w_scales", torch.zeros(out_features, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(1, device=device, dtype=dtype)
                             if act_scale == "static" else None)
        self.smoothed = bool(smoothed)
        self.register_buffer("smooth", torch.ones(in_features, device=device, dtype=dtype)
                             if smoothed else None)
        init_bias(self, bias, out_features, device, dtype)

    # the format record: the weight type and whether a static scale is held
    @property
    def dtype_code(self) -> int:
        return _CODES.index(self.qdtype)

    @property
    def static_scale(self) -> int:
        return int(self.act_scale == "static")

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: object | None = None, *,
                   input_scale: float | torch.Tensor | None = None,
                   smooth_scales: torch.Tensor | None = None,
                   **values: Any) -> W8A8Linear:
        """Quantize ``linear``'s weight per output channel (symmetric) with the values of a
        ``W8A8Config`` or the keywords ``dtype`` (``"int8"`` / ``"fp8"``) and ``act_scale``
        (``"dynamic"`` / ``"static"``; defaults :data:`W8A8_DEFAULTS`). ``"static"`` needs
        ``input_scale``: the activation scale, ``max |x| / QMAX`` over calibration data of the
        smoothed input (``compress_(model, W8A8Config(act_scale="static"), calib=batches)``
        measures it). ``smooth_scales [in]`` (positive): SmoothQuant's ``s``, carried in the op
        (``x / s``, ``W`` times ``s``)."""
        v = from_dense_values(config, values, W8A8_DEFAULTS)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        check_choice("act_scale", v["act_scale"], ACT_SCALES)
        static = v["act_scale"] == "static"
        if static != (input_scale is not None):
            raise ValueError("act_scale='static' needs input_scale (calibrate it: "
                             "compress_(..., calib=batches)); 'dynamic' takes none"
                             if static else "input_scale is only for act_scale='static'")
        w = linear.weight.detach()
        check_compute_dtype("W8A8Linear", w.dtype)
        smooth = None
        if smooth_scales is not None:
            s64 = torch.as_tensor(smooth_scales).detach().to(w.device, torch.float64)
            if s64.shape != (linear.in_features,) or not bool((s64 > 0).all()
                                                              & torch.isfinite(s64).all()):
                raise ValueError(f"smooth_scales must be {linear.in_features} finite values "
                                 f"> 0, got shape {tuple(s64.shape)}")
            smooth = (1.0 / s64).to(w.dtype)  # stored as the op reads it; W takes its inverse
            w = (w.to(torch.float64) / smooth.to(torch.float64)[None, :]).to(w.dtype)
        q, s = quantize_weight(w, QDTYPES[v["dtype"]], w.dtype)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  qdtype=v["dtype"], act_scale=v["act_scale"], smoothed=smooth is not None,
                  device=w.device, dtype=w.dtype)
        mod.qweight.copy_(q)
        mod.w_scales.copy_(s)
        if smooth is not None:
            mod.smooth.copy_(smooth)
        if static:
            mod.set_input_scale(input_scale)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def set_input_scale(self, scale: float | torch.Tensor) -> None:
        """Set the static activation scale (finite and > 0; ``ValueError`` otherwise)."""
        if self.input_scale is None:
            raise ValueError("this W8A8Linear quantizes activations dynamically "
                             "(act_scale='dynamic'); it holds no input_scale")
        value = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
        if value.numel() != 1 or not (bool(torch.isfinite(value).all()) and float(value) > 0):
            raise ValueError(f"input_scale must be one finite value > 0, got {scale!r}")
        self.input_scale.fill_(float(value))

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() convert every floating buffer; FP8 levels are stored values,
        # not numbers to compute in: keep their type, follow only a change of device
        before = self.qweight
        out = super()._apply(fn, recurse)
        if self.qweight.dtype != before.dtype:
            self.qweight = before.to(self.qweight.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in_features(x)
        return torch.ops.compress_ops.w8a8_linear(x, self.qweight, self.w_scales, self.bias,
                                                  self.input_scale, self.smooth)

    def dense_weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.w_scales, smooth=self.smooth)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.w_scales.dtype

    def stored_weight_bytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.input_scale, self.smooth)
                    if t is not None)
        return w8a8_bytes(self.out_features, self.in_features, self.w_scales.dtype) + extra

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "qdtype": self.qdtype,
                "act_scale": self.act_scale, "smoothed": self.smoothed}

    def report_note(self) -> str:
        """What ``report()`` says of the layer: the formats, and the route on this device."""
        what = f"W8A8 {self.qdtype}, {self.act_scale} activation scale"
        if self.note:
            what += f"; {self.note}"
        dev = self.qweight.device
        if self.qdtype == "fp8":
            if dev.type == "cpu":
                what += "; FP8 emulated in float32 on the CPU"
            elif dev.type == "cuda" and \
                    torch.cuda.get_device_capability(dev) < FP8_MIN_CAPABILITY:
                what += "; FP8 emulated (this GPU has no FP8 tensor cores)"
        return what

    def _check_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        q = state_dict.get(prefix + "qweight")
        if isinstance(q, torch.Tensor) and q.dtype != self.qweight.dtype:
            raise ValueError(f"W8A8Linear: the state_dict holds {qdtype_name(q.dtype)} levels "
                             f"({q.dtype}), this module {self.qdtype}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, qdtype={self.qdtype}, "
                f"act_scale={self.act_scale}, smoothed={self.smoothed}, "
                f"dtype={self.w_scales.dtype}")
