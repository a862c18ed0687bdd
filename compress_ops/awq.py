"""Activation-aware weight scaling (AWQ; Lin et al., 2024) for ``QuantConfig(method="awq")``.

Input channels that carry large activations matter more to a layer's output. AWQ multiplies
the weight's input columns by per-channel scales ``s`` before round-to-nearest (those columns
get finer levels relative to their size) and divides the layer's input by ``s``. That division
must cost nothing at run time, so it is *folded* into whatever produces the input:

- a normalization's weight and bias (``LayerNorm``, ``RMSNorm``: any module with a 1-D
  ``weight`` whose output the layer reads as it is), divided by ``s``;
- or the rows (and bias) of an earlier linear whose output reaches the layer through
  channel-wise operations only (attention's value projection before its output projection, an
  MLP's up projection before its down projection), divided by ``s``; for a fused q/k/v
  projection (GPT-2's ``c_attn``, split into equal chunks) the rows of the chunk that reaches
  the layer, the value one.

A fold is kept only if it is exact: the container's output (a block, or the whole model) on a
calibration batch is recomputed with random test scales folded in and must not change (to a
relative ``1e-5`` in float32). The search for the producer is therefore empirical but never
silently wrong: a norm whose output also feeds a residual (BERT's post-norm blocks), a linear
followed by a nonlinearity, or a grouped-query value projection fails the check. A layer with
no exact fold is quantized without scales (plain round-to-nearest, AWQ at ``s = 1``) and
listed in the warning; the ops carry no per-channel input scaling.

The scales: ``s = a^alpha`` with ``a_j`` the RMS of input channel ``j`` on the calibration data
(``sqrt(H_jj / 2)`` of the input Hessian ``H = 2 X^T X / n``), normalized so that
``max(s) * min(s) = 1``; ``alpha`` is searched on a grid in ``[0, 1]`` to minimize the output
error of the quantized layers, ``sum tr(dW H dW^T)`` with ``dW = W - Q(W diag(s)) diag(s)^-1``,
the same objective GPTQ minimizes (computed from ``H``, without keeping activations).
``alpha = 0`` is round-to-nearest, so AWQ's error on the calibration data is never larger.
Layers reading one input (``q``, ``k``, ``v`` after one norm) share one ``s``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress_ops._linear import LINEAR_TYPES, in_features, linear_weight
from compress_ops.kernels.formats.dequant import dequantize
from compress_ops.quantize import quantize_affine

__all__ = ["awq_scales", "Fold", "find_folds", "apply_fold", "EXACT_RTOL"]

#: A fold is exact when the container's output changes by less than this relative norm.
EXACT_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3,
              torch.bfloat16: 1.6e-2}


@torch.no_grad()
def awq_scales(weights: list[torch.Tensor], hessian: torch.Tensor, bits: int,
               group_size: int | None, *, symmetric: bool = False, search_steps: int = 20,
               grid: int = 20) -> tuple[torch.Tensor, float]:
    """``(s, alpha)``: the per-input-channel scales (float32 ``[K]``) that minimize the summed
    output error ``tr(dW H dW^T)`` of round-to-nearest ``weights`` (each ``[N_i, K]``, reading
    the same input, whose Hessian is ``hessian [K, K]``) over ``alpha`` in ``grid + 1``
    equal steps of ``[0, 1]``. The grid is ranked with min/max rounding; the best three and
    ``alpha = 0`` (``s = 1``: plain round-to-nearest, so never beaten by the result) are
    compared with the range search of the stored grids (``search_steps``)."""
    k = hessian.shape[0]
    if not weights or any(w.dim() != 2 or w.shape[1] != k for w in weights):
        raise ValueError(f"weights must be [N, {k}] tensors reading the Hessian's input")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    h = hessian.detach().to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("the Hessian holds NaN or Inf")
    a = torch.diagonal(h).clamp_min(0).div(2).sqrt()
    if float(a.max()) == 0:
        return torch.ones(k, dtype=torch.float32, device=hessian.device), 0.0
    a = a.clamp_min(float(a.max()) * 1e-4)  # dead channels: bounded scales

    def scales(alpha: float) -> torch.Tensor:
        s = a.pow(alpha)
        return s / (s.max() * s.min()).sqrt()

    def error(s: torch.Tensor, steps: int) -> float:
        err = 0.0
        for w in weights:
            w64 = w.detach().to(torch.float64)
            q = quantize_affine((w64 * s[None, :]).to(w.dtype), bits, group_size,
                                symmetric=symmetric, search_steps=steps)
            w_hat = dequantize(q.qweight, q.scales, q.zeros, bits, q.group_size, k,
                               dtype=torch.float64 if w.dtype == torch.float64 else None)
            dw = w64 - w_hat.to(torch.float64) / s[None, :]
            err += float(((dw @ h) * dw).sum())
        return err

    # rank the grid with min/max rounding (cheap), then decide among the best three and
    # alpha = 0 with the stored grids' range search: never worse than round-to-nearest
    alphas = [i / grid for i in range(grid + 1)]
    ranked = sorted(alphas, key=lambda al: error(scales(al), 0)) if search_steps else alphas
    finals = list(dict.fromkeys([0.0, *ranked[:3]]))
    best = min(((error(scales(al), search_steps), al) for al in finals), key=lambda t: t[0])
    best = (best[0], best[1], scales(best[1]))
    return best[2].to(torch.float32), best[1]


@dataclass
class Fold:
    """Where the scales of ``consumers`` (layer names reading one input) fold: into
    ``producer`` (a norm or a linear of the container, by name); ``offset``: for a linear
    producer, the first of the ``K`` output rows the fold scales (a fused q/k/v projection
    whose value chunk the consumer reads; 0 for the whole output)."""

    producer: str
    consumers: list[str]
    offset: int = 0


def _norm_like(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, LINEAR_TYPES)
            and (b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape)))


def _out_size(m: nn.Module) -> int:
    return linear_weight(m).shape[0]


def apply_fold(container: nn.Module, fold: Fold, s: torch.Tensor) -> None:
    """Fold ``s`` in place: the producer's output channels (a norm's weight and bias, a
    linear's rows and bias) divided by ``s``, every consumer's input columns multiplied by
    ``s``. The container computes the same function (up to rounding). A linear is an
    ``nn.Linear`` or a Hugging Face ``Conv1D`` (its ``[in, out]`` weight: columns and rows
    swap)."""
    prod = container.get_submodule(fold.producer)
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(prod, name, None)
            if t is None:
                continue
            if name == "weight" and isinstance(prod, LINEAR_TYPES):
                t = linear_weight(prod)  # [out, in] (a view: the copy reaches the module)
            t = t[fold.offset:fold.offset + s.numel()]  # (a view: the rows of the fold)
            shape = (-1,) + (1,) * (t.dim() - 1)
            t.copy_((t.to(torch.float64) / s.to(t.device, torch.float64).reshape(shape))
                    .to(t.dtype))
        for c in fold.consumers:
            w = linear_weight(container.get_submodule(c))
            w.copy_((w.to(torch.float64) * s.to(w.device, torch.float64)[None, :]).to(w.dtype))


def _relative(a: object, b: object) -> float:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return float("inf")
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    den = float(b64.norm())
    return float((a64 - b64).norm()) / den if den > 0 else float((a64 - b64).norm())


@torch.no_grad()
def find_folds(container: nn.Module, consumers: dict[str, nn.Module],
               run: Callable[[], object], dtype: torch.dtype
               ) -> tuple[list[Fold], dict[str, str]]:
    """The exact folds for ``consumers`` (``{name relative to container: linear}``, an
    ``nn.Linear`` or a Hugging Face ``Conv1D``):
    ``(folds, {consumer: why no fold})``. ``run()`` runs the container on a calibration batch
    and returns its output tensor.

    One run records which norm's output tensor each consumer reads as it is (candidates
    ``norm -> consumers``) and the order the container's linears run in; a consumer with no
    such norm tries the linears that ran before it with as many outputs as it has inputs,
    latest first. Each candidate is tested by folding random scales in and checking the
    container's output (:data:`EXACT_RTOL`), then undone.
    """
    names = {id(m): n for n, m in container.named_modules() if n}
    outputs: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # (alive during the run, so ids are not reused)
    reads: dict[str, int] = {}
    ran: list[str] = []

    def after(mod, args, out):
        n = names.get(id(mod))
        if n is None or not isinstance(out, torch.Tensor):
            return
        if isinstance(mod, LINEAR_TYPES):
            ran.append(n)
        if _norm_like(mod) or isinstance(mod, LINEAR_TYPES):
            outputs.setdefault(id(out), n)
            keep.append(out)

    def before(mod, args):
        n = names.get(id(mod))
        if n in consumers and args and isinstance(args[0], torch.Tensor):
            reads.setdefault(n, id(args[0]))
            keep.append(args[0])

    hooks = [m.register_forward_hook(after) for m in container.modules()]
    hooks += [m.register_forward_pre_hook(before) for m in consumers.values()]
    try:
        reference = run()
    finally:
        for h in hooks:
            h.remove()
    by_norm: dict[str, list[str]] = {}
    for c, tid in reads.items():
        p = outputs.get(tid)
        if p is not None and _norm_like(container.get_submodule(p)):
            by_norm.setdefault(p, []).append(c)

    gen = torch.Generator().manual_seed(0)
    rtol = EXACT_RTOL.get(dtype, 1e-5)

    def exact(fold: Fold, k: int) -> bool:
        s = torch.exp(0.5 * torch.randn(k, generator=gen, dtype=torch.float64))
        saved = {n: p.detach().clone() for n, p in _touched(container, fold)}
        apply_fold(container, fold, s)
        try:
            return _relative(run(), reference) <= rtol
        finally:
            for n, p in _touched(container, fold):
                p.data.copy_(saved[n])

    folds: list[Fold] = []
    why: dict[str, str] = {}
    done: set[str] = set()
    for p, cs in by_norm.items():
        fold = Fold(p, cs)
        if exact(fold, in_features(consumers[cs[0]])):
            folds.append(fold)
            done.update(cs)
        else:
            for c in cs:
                why[c] = f"{p}'s output is read by more than the layers after it"
    for c in consumers:
        if c in done or c not in reads:
            if c not in reads:
                why[c] = "it did not run on the calibration batch"
            continue
        k = in_features(consumers[c])
        mine = ran.index(c) if c in ran else len(ran)
        tried = [p for p in reversed(ran[:mine]) if p not in consumers or p != c]
        # a linear with k outputs, or one whose outputs are whole chunks of k (a fused q/k/v
        # projection split into equal chunks: the chunk the consumer reads, the value one)
        tried = [Fold(p, [c], off) for p in dict.fromkeys(tried)
                 for off in range(0, _out_size(container.get_submodule(p)), k)
                 if _out_size(container.get_submodule(p)) % k == 0]
        fold = next((f for f in tried if exact(f, k)), None)
        if fold is None:
            why.setdefault(c, "no norm or earlier linear feeds it through channel-wise "
                              "operations only")
        else:
            why.pop(c, None)
            folds.append(fold)
            done.add(c)
    return folds, {c: w for c, w in why.items() if c not in done}


def _touched(container: nn.Module, fold: Fold):
    prod = container.get_submodule(fold.producer)
    for name in ("weight", "bias"):
        t = getattr(prod, name, None)
        if t is not None:
            yield f"{fold.producer}.{name}", t
    for c in fold.consumers:
        yield f"{c}.weight", container.get_submodule(c).weight
