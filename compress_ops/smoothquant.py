"""SmoothQuant's per-channel factors (Xiao et al., 2023) for ``W8A8Config(smoothing=...)``.

A W8A8 layer quantizes its input ``x`` with one step per row (dynamic) or per tensor (static).
A few input channels with large activations set that step for all the others. SmoothQuant
divides ``x`` by per-channel factors ``s`` and multiplies the weight's columns by them
(``x W^T = (x / s) (W diag(s))^T``), moving part of the range into the weight:

    s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)

(:func:`smooth_factors`; ``max|X_j|`` from calibration data, ``max|W_:j|`` over the layers that
read ``x``). The division is folded into the layer that produces ``x`` where that is exact
(:mod:`compress_ops.awq`'s fold search), else carried in the op.

``smoothing="auto"`` searches ``alpha`` for each group of layers reading one input
(:func:`search_alpha`), over :data:`ALPHAS` and no smoothing at all (``s = 1``), minimizing a
predicted output error per token computed from calibration statistics alone (no activations
kept):

    E(s) = tr(dW H' dW^T) / 2 + A(s)

with ``W' = W diag(s)``, ``dW = Q(W') - W'`` its 8-bit quantization error (the format's own
per-row rule, :func:`~compress_ops.kernels.formats.w8a8.quantize_weight`), ``H' = diag(1/s) H
diag(1/s)`` the smoothed input's Hessian (``H = 2 X^T X / n``), and ``A`` the activation's
rounding error through ``W'``:

* int8: uniform rounding with the calibrated per-tensor step ``d = max_j(max|X_j| / s_j) / 127``
  (the static scale), ``A = ||W'||_F^2 d^2 / 12``. With dynamic per-row scales each row's step
  is at most ``d`` (the calibration statistics do not hold per-row maxima), so the search
  optimizes an upper bound there;
* FP8 e4m3: rounding relative to each value (3 mantissa bits), ``A = 2^-8 / 12 * sum_j
  ||W'_:j||^2 H'_jj / 2``, which ``s`` does not change: the search then minimizes the
  weight's error alone (FP8's floating grid needs little smoothing).

Candidates are compared on the same statistics, and ``s = 1`` is one of them, so on the
calibration data's statistics the searched factors never predict a larger error than no
smoothing.
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats.w8a8 import QDTYPES, QMAX, quantize_weight

__all__ = ["ALPHAS", "smooth_factors", "predicted_error", "search_alpha"]

#: The migration strengths ``smoothing="auto"`` tries (besides no smoothing).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_FP8_REL_VAR = 2.0 ** -8 / 12  # e4m3: relative step 2^-3, uniform rounding within it


def smooth_factors(x_max: torch.Tensor, weights: list[torch.Tensor],
                   alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel (float64 ``[K]``, clamped
    to ``[1e-5, 1e5]``); ``weights``: the layers reading the input (``[N_i, K]`` each)."""
    x = x_max.double().clamp_min(1e-5)
    w_max = torch.stack([w.detach().abs().amax(0).double().to(x.device)
                         for w in weights]).amax(0).clamp_min(1e-5)
    return (x.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(1e-5, 1e5)


def predicted_error(s: torch.Tensor, x_max: torch.Tensor, weights: list[torch.Tensor],
                    hessian: torch.Tensor, qdtype: str) -> float:
    """The output error per token :math:`E(s)` of the module docstring, summed over the layers
    in ``weights`` that read one input with Hessian ``hessian`` (``[K, K]``) and per-channel
    maxima ``x_max`` (``[K]``), for 8-bit type ``qdtype`` (``"int8"`` or ``"fp8"``)."""
    qd = QDTYPES[qdtype]
    dev = hessian.device
    s = s.double().to(dev)
    h = hessian.double() / s[:, None] / s[None, :]
    step = float((x_max.double().to(dev) / s).amax()) / QMAX[qd]
    total = 0.0
    for w in weights:
        ws = w.detach().double().to(dev) * s[None, :]
        q, scale = quantize_weight(ws.float(), qd, torch.float32)
        dw = q.double() * scale.double()[:, None] - ws
        total += float(((dw @ h) * dw).sum()) / 2
        if qd == torch.int8:
            total += float(ws.pow(2).sum()) * step * step / 12
        else:
            total += _FP8_REL_VAR * float((ws.pow(2).sum(0) * h.diagonal()).sum()) / 2
    return total


def search_alpha(x_max: torch.Tensor, weights: list[torch.Tensor], hessian: torch.Tensor,
                 qdtype: str) -> tuple[float | None, torch.Tensor]:
    """``(alpha, s)`` of least :func:`predicted_error` over :data:`ALPHAS` and no smoothing
    (``alpha`` None, ``s`` all ones); ties keep the earlier candidate (no smoothing first)."""
    k = x_max.numel()
    best = (None, torch.ones(k, dtype=torch.float64, device=x_max.device))
    best_err = predicted_error(best[1], x_max, weights, hessian, qdtype)
    for alpha in ALPHAS:
        s = smooth_factors(x_max, weights, alpha)
        err = predicted_error(s, x_max, weights, hessian, qdtype)
        if err < best_err:
            best, best_err = (alpha, s), err
    return best
