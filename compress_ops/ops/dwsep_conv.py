"""``compress_ops::dwsep_conv2d``: MobileNet's depthwise-separable unit (depthwise conv + bias ->
act -> 1x1 conv + bias -> act (+ residual)) as one op (layout:
:mod:`compress_ops.kernels.formats.dwsep_conv`), with fake impl (channels-last) and an explicit
backward for x, both weights, both biases and the residual.

Routes: CUDA runs the fused Triton kernel; the CPU runs two ATen convolutions, channels-last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import dwsep_conv as _dw
from compress_ops.ops import routing

__all__ = ["dwsep_conv2d"]


def _act_grad(v: torch.Tensor, act: str) -> torch.Tensor | None:
    """d act(v) / dv (``None`` for the identity)."""
    if act == "none":
        return None
    if act == "relu":
        return (v > 0).to(v.dtype)
    if act == "relu6":
        return ((v > 0) & (v < 6)).to(v.dtype)
    if act == "hardswish":  # torch's convention at the kinks: 0 up to -3, 1 from 3 on
        mid = (2 * v + 3) / 6
        return torch.where(v <= -3, torch.zeros_like(v), torch.where(v >= 3,
                                                                   torch.ones_like(v), mid))
    s = torch.sigmoid(v)  # silu
    return s * (1 + v * (1 - s))


def _dwsep_cpu(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1,
               act2) -> torch.Tensor:
    """Two ATen convolutions (channels-last); symmetric padding goes to the conv itself, so
    only asymmetric padding costs an ``F.pad`` copy."""
    left, right, top, bottom = padding
    ho, wo = _dw.output_size(x.shape[2], x.shape[3], dw_weight.shape[1], stride, padding)
    if ho == 0 or wo == 0:  # an empty result (ATen's convs refuse a kernel past the input)
        return x.new_empty(x.shape[0], pw_weight.shape[0], ho, wo).contiguous(
            memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    if left == right and top == bottom:
        t = F.conv2d(x, dw_weight[:, None], dw_bias, stride, (top, left), groups=x.shape[1])
    else:
        t = F.conv2d(F.pad(x, list(padding)), dw_weight[:, None], dw_bias, stride,
                     groups=x.shape[1])
    # the 1x1 conv as F.linear over channels (t is channels-last: a free NHWC view); ATen's
    # bf16 channels-last 1x1 conv on the CPU (oneDNN) leaks a NaN into neighbouring pixels
    pw = F.linear(_dw_act(t, act1).permute(0, 2, 3, 1), pw_weight, pw_bias).permute(0, 3, 1, 2)
    y = _dw_act(pw, act2)
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("compress_ops::dwsep_conv2d", mutates_args=())
def dwsep_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                 pw_weight: torch.Tensor, pw_bias: torch.Tensor | None,
                 residual: torch.Tensor | None, stride: int, padding: list[int], act1: str,
                 act2: str) -> torch.Tensor:
    """MobileNet's depthwise-separable unit in one op: depthwise ``k x k`` conv (``dw_weight
    [C, k, k]``, zero ``padding`` = (left, right, top, bottom)) + ``dw_bias`` -> ``act1`` ->
    1x1 conv (``pw_weight [Cout, C]``) + ``pw_bias`` -> ``act2`` (+ ``residual``). ``x``
    ``[B, C, H, W]`` in any memory format; the result is ``channels_last``."""
    _dw.check_inputs(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                     act1, act2)
    if routing.use_triton(x):
        return routing.kernels("dwsep_conv").dwsep_conv2d(
            x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1, act2,
            checked=True)
    return _dwsep_cpu(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                      act1, act2)


@dwsep_conv2d.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1, act2):
    _dw.check_inputs(x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding,
                     act1, act2)
    ho, wo = _dw.output_size(x.shape[2], x.shape[3], dw_weight.shape[1], stride, padding)
    return x.new_empty(x.shape[0], pw_weight.shape[0], ho, wo).contiguous(
        memory_format=torch.channels_last)


def _dwsep_setup_context(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, pw_weight, pw_bias, residual, stride, padding, act1, act2 = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight, pw_bias)
    ctx.meta = (stride, list(padding), act1, act2)


def _dwsep_backward(ctx, grad):
    x, dw_weight, dw_bias, pw_weight, pw_bias = ctx.saved_tensors
    stride, padding, act1, act2 = ctx.meta
    need = ctx.needs_input_grad
    if grad.shape[2] == 0 or grad.shape[3] == 0:  # an empty output: every gradient is zero
        return (*(torch.zeros_like(t) if need[i] and t is not None else None
                  for i, t in enumerate((x, dw_weight, dw_bias, pw_weight, pw_bias))),
                grad if need[5] else None, None, None, None, None)
    dt = grad.dtype
    c = x.shape[1]
    # recompute the two pre-activations (plain ATen ops: traceable by aot_autograd)
    xp = F.pad(x.to(dt), padding)
    t_pre = F.conv2d(xp, dw_weight.to(dt)[:, None], None if dw_bias is None else dw_bias.to(dt),
                     stride, groups=c)
    da1 = _act_grad(t_pre, act1)
    t = t_pre if act1 == "none" else _dw_act(t_pre, act1)
    g_y = grad
    if act2 != "none":
        y_pre = F.conv2d(t, pw_weight.to(dt)[:, :, None, None],
                         None if pw_bias is None else pw_bias.to(dt))
        g_y = grad * _act_grad(y_pre, act2)
    grad_x = grad_dw = grad_dwb = grad_pw = grad_pwb = grad_res = None
    if need[3]:
        grad_pw = torch.einsum("bohw,bchw->oc", g_y, t).to(pw_weight.dtype)
    if need[4] and pw_bias is not None:
        grad_pwb = g_y.sum((0, 2, 3)).to(pw_bias.dtype)
    if need[0] or need[1] or need[2]:
        g_t = F.conv2d(g_y, pw_weight.to(dt).t()[:, :, None, None])
        g_tpre = g_t if da1 is None else g_t * da1
        if need[0]:
            gxp = torch.nn.grad.conv2d_input(xp.shape, dw_weight.to(dt)[:, None], g_tpre, stride,
                                             groups=c)
            left, right, top, bottom = padding
            grad_x = gxp[:, :, top:gxp.shape[2] - bottom, left:gxp.shape[3] - right]
            grad_x = grad_x.to(x.dtype)
        if need[1]:
            grad_dw = torch.nn.grad.conv2d_weight(xp, (c, 1, *dw_weight.shape[1:]), g_tpre,
                                                  stride, groups=c)[:, 0].to(dw_weight.dtype)
        if need[2] and dw_bias is not None:
            grad_dwb = g_tpre.sum((0, 2, 3)).to(dw_bias.dtype)
    if need[5]:
        grad_res = grad
    return grad_x, grad_dw, grad_dwb, grad_pw, grad_pwb, grad_res, None, None, None, None


def _dw_act(v: torch.Tensor, act: str) -> torch.Tensor:
    return _dw.ACTIVATION_FNS[act](v)


dwsep_conv2d.register_autograd(_dwsep_backward, setup_context=_dwsep_setup_context)
