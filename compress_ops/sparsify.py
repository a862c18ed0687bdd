"""Choosing 2:4 sparse weights from calibration data: Wanda's saliency and SparseGPT's
Optimal-Brain-Surgeon pruning with updates (Frantar & Alistarh, 2023). Both take the layer's
input Hessian ``H = 2 X^T X / n`` (:func:`compress_ops.calibrate.input_hessians`) and return
the dense ``[N, K]`` weight with two of every four consecutive inputs of a row zeroed, ready
for :meth:`compress_ops.nn.Sparse24Linear.from_dense` with ``prune=False``.
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats.sparse24 import mask_2to4
from compress_ops.quantize import inverse_hessian_factor

__all__ = ["wanda_2to4", "sparsegpt_2to4"]


def _check(w: torch.Tensor, hessian: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a 2-D floating-point tensor, got {w!r:.60}")
    k = w.shape[1]
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else repr(hessian)
        raise ValueError(f"hessian must be a [{k}, {k}] tensor (the layer's input Hessian), "
                         f"got {got}")
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError("the weight or the Hessian holds NaN or Inf")


def wanda_2to4(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Keep the two of every four weights with the largest ``|w_ij| * ||x_j||`` (Wanda; the
    input norms are ``sqrt(n H_jj / 2)``, up to a constant that does not change the order)."""
    _check(w, hessian)
    norms = torch.diagonal(hessian).to(torch.float32).clamp_min(0).sqrt()
    score = w.detach().float().abs() * norms.to(w.device)[None, :]
    return w.detach() * mask_2to4(score)


def sparsegpt_2to4(w: torch.Tensor, hessian: torch.Tensor, *, block_size: int = 128,
                   damp: float = 0.01) -> torch.Tensor:
    """SparseGPT at 2:4: columns in order, blocks of ``block_size`` (a multiple of 4); at each
    group of four, the two weights of a row with the least Optimal-Brain-Surgeon saliency
    ``w^2 / [H^-1]_jj^2`` are pruned, and every removal's error is spread over the columns not
    yet visited through ``H^-1`` (its upper Cholesky factor), so the layer's output on the
    calibration inputs changes as little as it can. With a diagonal Hessian nothing spreads
    and the mask is magnitude pruning's. Dampening and dead inputs as
    :func:`compress_ops.quantize.gptq_affine`.
    """
    _check(w, hessian)
    if block_size < 4 or block_size % 4 or not 0.0 <= damp < 1.0:
        raise ValueError(f"block_size must be a multiple of 4 and damp in [0, 1), got "
                         f"{block_size}, {damp}")
    n, k = w.shape
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = w.detach().to(work).clone()
    hinv, dead = inverse_hessian_factor(hessian.detach().to(device=w.device, dtype=work),
                                        damp, "SparseGPT")
    wf[:, dead] = 0.0
    keep = torch.ones(n, k, dtype=torch.bool, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wf[:, i1:i2].clone()
        e1 = torch.zeros_like(w1)
        u1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        for i in range(i2 - i1):
            if i % 4 == 0:
                width = min(4, i2 - i1 - i)
                if width > 2:  # (a last group of 2 or fewer real inputs keeps them all)
                    sal = w1[:, i:i + width].square() / d1[i:i + width].square()[None, :]
                    drop = torch.topk(sal, width - 2, dim=1, largest=False).indices
                    keep[:, i1 + i:i1 + i + width].scatter_(1, drop, False)
            col = w1[:, i]
            q = torch.where(keep[:, i1 + i], col, torch.zeros_like(col))
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            e1[:, i] = err
        wf[:, i1:i2] = w1
        wf[:, i2:] -= e1 @ hinv[i1:i2, i2:]
    return (wf * keep).to(w.dtype)
