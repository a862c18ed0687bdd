"""``compress_ops::w8a8_linear``: 8-bit weights and 8-bit activations (int8, or FP8 e4m3), with
the activation quantized inside the op (per token and dynamic, or with a static per-tensor
scale), over the format of :mod:`compress_ops.kernels.formats.w8a8`, with fake impl and
autograd (a straight-through estimator for ``x``).

Routes (:func:`w8a8_route`):

* ``"triton"``: CUDA (int8 on every GPU; FP8 on sm_89 and newer, which have FP8 tensor cores)
  and the CPU under ``COMPRESS_OPS_CPU_BACKEND=triton``: the activation-quantization kernel,
  then the 8-bit tensor-core GEMM with the dequantizing epilogue
  (:mod:`compress_ops.kernels.w8a8`).
* ``"int-mm"``: int8 on the CPU: the activation quantized in torch, ``torch._int_mm`` (int8 x
  int8 -> int32, exact; an int32 matmul at K = 1, where torch 2.13's CPU ``_int_mm`` returns
  wrong sums), the same float32 epilogue. Bit-exact with the Triton path.
* ``"fp8-emulated"``: FP8 on the CPU, and on GPUs older than sm_89 (which have no FP8 tensor
  cores; ``report()`` names the route): the activation quantized to e4m3 by the same rule, the
  levels multiplied in float32 (every product is exact), the same epilogue. The sum's order is
  the matmul's, so it agrees with the FP8 kernel within float32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats import w8a8 as _w8
from compress_ops.ops import routing

__all__ = ["w8a8_linear", "w8a8_route", "FP8_MIN_CAPABILITY"]

#: FP8 (e4m3) tensor cores exist from this compute capability on (Ada, Hopper).
FP8_MIN_CAPABILITY = (8, 9)


def w8a8_route(x: torch.Tensor, qweight: torch.Tensor) -> str:
    """Which path :func:`w8a8_linear` takes for ``x`` and a stored weight (see the module
    docstring): ``"triton"``, ``"int-mm"`` or ``"fp8-emulated"``."""
    fp8 = qweight.dtype == torch.float8_e4m3fn
    if x.device.type == "cuda":
        if fp8 and torch.cuda.get_device_capability(x.device) < FP8_MIN_CAPABILITY:
            return "fp8-emulated"
        return "triton"
    if routing.use_triton(x):
        return "triton"
    return "fp8-emulated" if fp8 else "int-mm"


def _w8a8_torch(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                smooth: torch.Tensor | None) -> torch.Tensor:
    """The torch paths: ``"int-mm"`` and ``"fp8-emulated"``."""
    n = qweight.shape[0]
    lead = x.shape[:-1]
    q, s_x = _w8.quantize_activation(x, qweight.dtype, input_scale, smooth)
    if q.shape[0] == 0:
        return x.new_empty(*lead, n)
    if qweight.dtype == torch.int8 and q.shape[1] > 1:
        acc = torch._int_mm(q, qweight.t())  # exact int32
    elif qweight.dtype == torch.int8:  # torch 2.13's CPU _int_mm is wrong at K = 1
        acc = q.int() @ qweight.int().t()
    else:
        acc = q.float() @ qweight.float().t()  # e4m3 products are exact in float32
    return _w8.epilogue(acc, s_x, w_scales, bias, x.dtype).reshape(*lead, n)


@torch.library.custom_op("compress_ops::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``y[..., N] = Q(x * smooth)[..., K] @ qweight^T * s_x * w_scales + bias``:
    ``qweight [N, K]`` int8 or FP8 e4m3 (per-channel ``w_scales [N]``), ``x`` quantized per row
    inside the op (``input_scale`` None) or with the static per-tensor ``input_scale [1]``,
    its columns multiplied by ``smooth [K]`` first where given (SmoothQuant without a fold);
    the exact rules are :mod:`compress_ops.kernels.formats.w8a8`'s."""
    _w8.check_inputs(x, qweight, w_scales, bias, input_scale, smooth)
    if w8a8_route(x, qweight) == "triton":
        return routing.kernels("w8a8").w8a8_linear(x, qweight, w_scales, bias, input_scale,
                                                   smooth, checked=True)
    return _w8a8_torch(x, qweight, w_scales, bias, input_scale, smooth)


@w8a8_linear.register_fake
def _(x, qweight, w_scales, bias, input_scale, smooth=None):
    _w8.check_inputs(x, qweight, w_scales, bias, input_scale, smooth, values=False)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _w8a8_setup_context(ctx, inputs, output) -> None:
    x, qweight, w_scales, bias, input_scale, smooth = inputs
    # a static scale clips: the estimator passes the gradient only where x was inside its range
    keep_x = input_scale is not None and ctx.needs_input_grad[0]
    ctx.save_for_backward(x if keep_x else None, qweight, w_scales, input_scale, smooth)
    ctx.has_bias = bias is not None


def _w8a8_backward(ctx, grad):
    """Straight-through estimator: rounding ``x`` counts as the identity, so
    ``dL/dx = dL/dy @ W`` (``W`` the effective weight, dequantized, smoothing included),
    masked to the unclipped range under a static scale; ``dL/dbias``. The stored weight,
    scales and smoothing factors are buffers."""
    x, qweight, w_scales, input_scale, smooth = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _w8.dequantize_weight(qweight, w_scales, grad.dtype, smooth)
        if input_scale is not None:
            xs = x.float() if smooth is None else x.float() * smooth.float()
            limit = _w8.QMAX[qweight.dtype] * input_scale.float()
            grad_x = grad_x * (xs.abs() <= limit).to(grad_x.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None, None


w8a8_linear.register_autograd(_w8a8_backward, setup_context=_w8a8_setup_context)
