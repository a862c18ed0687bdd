"""``compress_ops::lowrank_linear``: ``(x @ v^T) @ u^T (+ x @ weight^T) + bias`` for factors of
any rank (:mod:`compress_ops.kernels.formats.lowrank`), with fake impl and autograd for every
input.

Routes (:func:`lowrank_route`): the fused one-launch Triton kernel on CUDA up to the crossover M
of ``kernels/configs/lowrank.json`` (ranks up to ``MAX_RANK``), else two (three with a base)
GEMMs, which is also the CPU path: the factors are already the compressed form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import lowrank as _lr
from compress_ops.ops import routing

__all__ = ["lowrank_linear", "lowrank_route"]


def lowrank_route(x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor | None) -> str:
    """Which path :func:`lowrank_linear` takes: ``"fused"`` (the one-launch Triton kernel: CUDA
    up to the crossover M of ``kernels/configs/lowrank.json`` and ranks up to
    ``kernels.lowrank.MAX_RANK``, or the CPU under ``COMPRESS_OPS_CPU_BACKEND=triton``) or
    ``"unfused"`` (``F.linear(F.linear(x, v), u, bias)`` (+ ``F.linear(x, weight)``): cuBLAS on
    CUDA past the crossover, and the CPU path, where the factors already are the compressed
    form and two GEMMs are the fastest correct option)."""
    m = x.numel() // max(x.shape[-1], 1)
    r = u.shape[1]
    if x.device.type == "cuda":
        fused = routing.kernels("lowrank").fused_route(m, r, weight is not None, x.device)
        return "fused" if fused else "unfused"
    if r <= _lr.MAX_RANK and routing.use_triton(x):
        return "fused"
    return "unfused"


def _lowrank_unfused(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(F.linear(x, v), u, bias)
    if weight is not None:
        y = y + F.linear(x, weight)
    return y


@torch.library.custom_op("compress_ops::lowrank_linear", mutates_args=())
def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[..., N] = (x[..., K] @ v^T) @ u^T (+ x @ weight^T) (+ bias)``: ``u [N, r]``,
    ``v [r, K]`` (any rank r >= 1), ``weight [N, K]`` an optional dense base (LoRA-style)."""
    _lr.check_inputs(x, u, v, weight, bias)
    if lowrank_route(x, u, weight) == "fused":
        return routing.kernels("lowrank").lowrank_matmul(x, u, v, weight, bias, checked=True)
    return _lowrank_unfused(x, u, v, weight, bias)


@lowrank_linear.register_fake
def _(x, u, v, weight, bias):
    _lr.check_inputs(x, u, v, weight, bias)
    return x.new_empty(*x.shape[:-1], u.shape[0])


def _lowrank_setup_context(ctx, inputs, output) -> None:
    x, u, v, weight, bias = inputs
    # x is needed only for the factor (and base weight) gradients
    needs_x = any(ctx.needs_input_grad[1:4])
    ctx.save_for_backward(x if needs_x else None, u, v, weight)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad):
    x, u, v, weight = ctx.saved_tensors
    need_x, need_u, need_v, need_w, need_b = ctx.needs_input_grad
    grad_x = grad_u = grad_v = grad_w = grad_b = None
    n, k = u.shape[0], v.shape[1]
    m = math.prod(grad.shape[:-1])
    g2 = grad.reshape(m, n)
    if need_x or need_v:
        gu = g2 @ u.to(grad.dtype)  # dL/dt, [M, r]
    if need_x:
        grad_x = gu @ v.to(grad.dtype)
        if weight is not None:
            grad_x = grad_x + g2 @ weight.to(grad.dtype)
        grad_x = grad_x.reshape(*grad.shape[:-1], k)
    if need_u or need_v or need_w:
        x2 = x.reshape(m, k).to(grad.dtype)
    if need_u:
        grad_u = (g2.t() @ (x2 @ v.to(grad.dtype).t())).to(u.dtype)
    if need_v:
        grad_v = (gu.t() @ x2).to(v.dtype)
    if need_w:
        grad_w = (g2.t() @ x2).to(weight.dtype)
    if ctx.has_bias and need_b:
        grad_b = g2.sum(0)
    return grad_x, grad_u, grad_v, grad_w, grad_b


lowrank_linear.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)
