"""Choosing sparse weights from calibration data: Wanda's saliency and SparseGPT's
Optimal-Brain-Surgeon pruning with updates (Frantar & Alistarh, 2023). Both take the layer's
input Hessian ``H = 2 X^T X / n`` (:func:`compress_ops.calibrate.input_hessians`).

- At 2:4 (:func:`wanda_2to4`, :func:`sparsegpt_2to4`) they return the dense ``[N, K]`` weight
  with two of every four consecutive inputs of a row zeroed, ready for
  :meth:`compress_ops.nn.Sparse24Linear.from_dense` with ``prune=False``.
- Unstructured (:func:`sparsegpt_unstructured`, :func:`wanda_unstructured`, and the
  :func:`magnitude_unstructured` baseline) they return the dense weight with a ``sparsity``
  fraction of it zeroed. No kernel reads an unstructured mask: the weight stays dense.
"""

from __future__ import annotations

import math

import torch

from compress_ops._validate import check_choice, check_int, check_number
from compress_ops.kernels.formats.sparse24 import mask_2to4
from compress_ops.quantize import check_hessian, inverse_hessian_factor

__all__ = ["wanda_2to4", "sparsegpt_2to4", "sparsegpt_unstructured", "wanda_unstructured",
           "magnitude_unstructured", "pruned_count"]


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a 2-D floating-point tensor, got {w!r:.60}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight w holds NaN or Inf")


def _check(w: torch.Tensor, hessian: torch.Tensor) -> None:
    _check_weight(w)
    check_hessian(hessian, w.shape[1])


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (fp32, fp16, bf16) is worked in float32."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _check_sparsity(sparsity: object) -> float:
    return check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True,
                        hint="(the fraction of weights to zero)")


def pruned_count(sparsity: float, size: int) -> int:
    """How many of ``size`` weights a ``sparsity`` fraction prunes: ``sparsity * size`` rounded
    half up (``0.5 * 9 -> 5``), the count every unstructured method here removes from each
    group it compares within."""
    return min(size, math.floor(sparsity * size + 0.5))


def _drop_lowest(score: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """The keep-mask of ``score [N, K]`` without its ``pruned_count`` lowest entries: per row
    (``pruned_count(sparsity, K)`` in each) or over the whole tensor at once (ties broken by
    ``torch.topk``)."""
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)  # (contiguous)
    if per_row:
        drop = pruned_count(sparsity, score.shape[1])
        if drop:
            keep.scatter_(1, torch.topk(score, drop, dim=1, largest=False).indices, False)
    else:
        drop = pruned_count(sparsity, score.numel())
        if drop:
            flat = torch.topk(score.flatten(), drop, largest=False).indices
            keep.view(-1)[flat] = False
    return keep


def _zero_outside(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``w`` where ``keep``, exactly ``0.0`` (never ``-0.0``) elsewhere."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


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
    ``w^2 / U_jj^2`` (``U`` the upper Cholesky factor of the dampened ``H^-1``) are
    pruned, and every removal's error is spread over the columns not yet visited through
    ``U``, so the layer's output on the
    calibration inputs changes as little as it can. With a diagonal Hessian nothing spreads
    and the mask is magnitude pruning's. Dampening and dead inputs as
    :func:`compress_ops.quantize.gptq_affine`.
    """
    _check(w, hessian)
    if block_size < 4 or block_size % 4 or not 0.0 <= damp < 1.0:
        raise ValueError(f"block_size must be a multiple of 4 and damp in [0, 1), got "
                         f"{block_size}, {damp}")
    def groups_of_four(w1: torch.Tensor, d1: torch.Tensor, i: int) -> torch.Tensor | None:
        width = min(4, w1.shape[1] - i)
        if i % 4 or width <= 2:  # (a last group of 2 or fewer real inputs keeps them all)
            return None
        sal = w1[:, i:i + width].square() / d1[i:i + width].square()[None, :]
        keep = torch.ones(sal.shape, dtype=torch.bool, device=sal.device)
        return keep.scatter_(1, torch.topk(sal, width - 2, dim=1, largest=False).indices, False)

    return _obs_prune(w, hessian, damp, block_size, groups_of_four)


def _obs_prune(w: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int,
               choose) -> torch.Tensor:
    """SparseGPT's pass over ``w [N, K]``: columns in order, in blocks of ``block_size``;
    before column ``i`` of a block is visited, ``choose(w1, d1, i)`` (the block's updated
    weights, the diagonal of its part of ``U``, the upper Cholesky factor of the dampened
    ``H^-1``) may return the keep-mask of the columns from ``i`` on (``[N, width]``); each
    pruned weight's error is then spread over the columns not yet visited through ``U``, with
    lazy batch updates of the later blocks. Returns the pruned weight in ``w``'s dtype."""
    n, k = w.shape
    work = _work_dtype(w)
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
            chosen = choose(w1, d1, i)
            if chosen is not None:
                keep[:, i1 + i:i1 + i + chosen.shape[1]] = chosen
            col = w1[:, i]
            q = torch.where(keep[:, i1 + i], col, torch.zeros_like(col))
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            e1[:, i] = err
        wf[:, i1:i2] = w1
        wf[:, i2:] -= e1 @ hinv[i1:i2, i2:]
    return _zero_outside(wf, keep).to(w.dtype)


def magnitude_unstructured(w: torch.Tensor, sparsity: float, *, per: str = "row"
                           ) -> torch.Tensor:
    """Magnitude pruning: zero the ``sparsity`` fraction of ``w [N, K]`` with the least
    ``|w|``, compared within each output row (``per="row"``: exactly
    ``N * pruned_count(sparsity, K)`` pruned) or over the whole layer (``per="layer"``:
    exactly ``pruned_count(sparsity, N * K)``). The baseline the calibrated methods are
    measured against; it reads no data. Returns a new tensor of ``w``'s dtype, ``w`` itself
    is never modified; kept weights are ``w``'s own values."""
    _check_weight(w)
    sparsity = _check_sparsity(sparsity)
    check_choice("per", per, ("row", "layer"))
    w = w.detach()
    keep = _drop_lowest(w.to(_work_dtype(w)).abs(), sparsity, per_row=per == "row")
    return _zero_outside(w, keep)


def wanda_unstructured(w: torch.Tensor, hessian: torch.Tensor, sparsity: float
                       ) -> torch.Tensor:
    """Wanda (Sun et al., 2023): in each output row of ``w [N, K]``, zero the ``sparsity``
    fraction with the least ``|w_ij| * sqrt(H_jj)`` (``||x_j||`` up to a constant: the same
    order), exactly ``N * pruned_count(sparsity, K)`` weights. Comparing within a row is
    Wanda's choice (every output then loses the same share). No update of the kept weights:
    they keep ``w``'s values. With equal ``H_jj`` the mask is :func:`magnitude_unstructured`'s;
    inputs that never fire (``H_jj == 0``) are pruned first. Returns a new tensor of ``w``'s
    dtype; ``w`` is never modified."""
    _check(w, hessian)
    sparsity = _check_sparsity(sparsity)
    w = w.detach()
    work = _work_dtype(w)
    norms = torch.diagonal(hessian.detach()).to(device=w.device, dtype=work).clamp_min(0).sqrt()
    keep = _drop_lowest(w.to(work).abs() * norms[None, :], sparsity, per_row=True)
    return _zero_outside(w, keep)


def sparsegpt_unstructured(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, *,
                           block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023) for unstructured sparsity: zero a ``sparsity``
    fraction of ``w [N, K]`` and update the kept weights so the layer's output on the
    calibration inputs (``tr((W - W') H (W - W')^T)``) changes as little as it can.

    - Columns are processed in order, in blocks of ``block_size``. At the start of each block
      its mask is chosen by the Optimal-Brain-Surgeon saliency ``w^2 / [U]_jj^2`` (``U`` the
      upper Cholesky factor of the dampened ``H^-1``, on the weights as the earlier blocks'
      updates left them: the *adaptive mask selection*). As in the reference implementation
      (IST-DASLab/sparsegpt ``fasterprune``), the lowest-saliency weights are taken over the
      whole ``[N, block]`` tile jointly, not per row, so rows may end with different
      sparsities.
    - **Count.** Each block of width ``b`` loses exactly ``pruned_count(sparsity, N * b)``
      weights (ties broken by ``torch.topk``; the reference's ``<=`` threshold prunes one more
      and all ties). Over the layer that is ``sum_blocks pruned_count(sparsity, N * b)``:
      ``round(sparsity * N * K)`` up to one weight per block.
    - Then column by column the pruned weights are zeroed and each removal's error is spread
      over the block's columns not yet visited through ``U``; the rest of the layer gets one
      lazy update per block.
    - With a diagonal Hessian nothing spreads (the kept weights keep ``w``'s values exactly)
      and the saliency is ``w_ij^2 (H_jj + damp * mean(diag H))``: for ``H = c I`` that is
      magnitude pruning within each ``[N, block_size]`` tile, and with ``block_size >= K``
      :func:`magnitude_unstructured` with ``per="layer"``.
    - Dampening and dead inputs as :func:`sparsegpt_2to4` (:func:`compress_ops.quantize.
      inverse_hessian_factor`): the weights of inputs that never fire (``H_jj == 0``) carry no
      output and are zeroed; as the lowest-saliency weights of their tile they are pruned
      first, and where a tile has more of them than its count they add zeros beyond it. A kept
      weight is otherwise zero only where the update made it exactly zero (or it underflows
      casting back to fp16).

    Works in float32 (float64 for float64 weights) and returns a new tensor of ``w``'s dtype
    with zeros exactly where pruned; ``w`` is never modified. ``ValueError`` for a Hessian of
    the wrong shape, non-finite values (naming the weight or the Hessian), or a Hessian not
    positive definite after dampening (raise ``damp``).
    """
    _check(w, hessian)
    sparsity = _check_sparsity(sparsity)
    check_int("block_size", block_size, min=1)
    damp = check_number("damp", damp, low=0.0, high=1.0, high_open=True)
    def whole_block(w1: torch.Tensor, d1: torch.Tensor, i: int) -> torch.Tensor | None:
        # the mask of a block is chosen once, at its first column, over the whole tile
        return None if i else _drop_lowest(w1.square() / d1.square()[None, :], sparsity,
                                           per_row=False)

    return _obs_prune(w, hessian, damp, block_size, whole_block)
