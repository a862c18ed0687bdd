"""Mask patterns (a boolean keep-mask from scores: unstructured, N:M, whole rows), the N:M
input-channel permutation, the cubic sparsity schedule and the group-lasso regularizer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from compress_ops._linear import LINEAR_TYPES, oriented
from compress_ops._validate import check_number

__all__ = ["unstructured_masks", "nm_mask", "structured_mask", "cubic_sparsity", "GroupLasso",
           "is_nm", "nm_kept", "nm_permutation"]


def unstructured_masks(scores: dict[str, torch.Tensor], sparsity: float,
                       scope: str = "layer") -> dict[str, torch.Tensor]:
    """Keep-masks removing the ``sparsity`` fraction of lowest scores, in every layer
    (``scope="layer"``) or over all of them together (``"global"``: layers with low scores
    lose more). Exactly ``round(sparsity * count)`` weights are removed per scope (ties broken
    by position)."""
    check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "layer":
        return {n: _keep_top(s.flatten(), sparsity).reshape(s.shape) for n, s in scores.items()}
    flat = torch.cat([s.detach().float().flatten() for s in scores.values()])
    keep = _keep_top(flat, sparsity)
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = keep[i:i + s.numel()].reshape(s.shape)
        i += s.numel()
    return out


def _keep_top(flat: torch.Tensor, sparsity: float) -> torch.Tensor:
    drop = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if drop:
        keep[torch.topk(flat.float(), drop, largest=False, sorted=False).indices] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask along the input dimension (dim 1; for convs, over ``C_in`` at each kernel
    tap): the ``n`` highest scores of every group of ``m`` consecutive inputs. The input
    dimension must be a multiple of ``m``."""
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got n={n}, m={m}")
    s = scores.detach().float()
    if s.shape[1] % m:
        raise ValueError(f"input dimension {s.shape[1]} is not a multiple of m={m}")
    t = s.movedim(1, -1)
    groups = t.reshape(*t.shape[:-1], t.shape[-1] // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(t.shape).movedim(-1, 1)


def structured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of whole output rows (Linear) / channels (Conv2d): the ``sparsity`` fraction
    with the lowest L2 norm of their scores is removed (at least one row stays)."""
    check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    rows = scores.detach().float().reshape(scores.shape[0], -1).norm(dim=1)
    drop = min(int(round(sparsity * rows.numel())), rows.numel() - 1)
    keep = torch.ones(rows.numel(), dtype=torch.bool, device=scores.device)
    if drop:
        keep[torch.topk(rows, drop, largest=False, sorted=False).indices] = False
    return keep.reshape(-1, *([1] * (scores.dim() - 1))).expand(scores.shape)


def cubic_sparsity(step: int, start_step: int, end_step: int, final: float,
                   initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule: ``initial`` before ``start_step``, then
    ``final + (initial - final) * (1 - (step - start) / (end - start))^3``, ``final`` from
    ``end_step`` on. Prunes fast early (redundant weights) and slowly at the end."""
    check_number("final", final, low=0.0, high=1.0, high_open=True)
    check_number("initial", initial, low=0.0, high=1.0, high_open=True)
    if end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be after start_step ({start_step})")
    if step <= start_step:
        return float(initial)
    if step >= end_step:
        return float(final)
    frac = (step - start_step) / (end_step - start_step)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


class GroupLasso:
    """``lam * sum_g ||w_g||_2`` over groups of weights, added to the training loss so that whole
    groups shrink towards zero before they are pruned (Yuan & Lin, 2006; Wen et al., 2016).

    ``groups``: ``"channel"`` (each output row / channel), ``"input"`` (each input column /
    channel), or ``"n:m"`` such as ``"2:4"`` (in every group of ``m`` consecutive inputs, the
    ``m - n`` smallest weights, chosen again at every call: the ones an N:M mask would remove).
    ``layers`` defaults to every ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv2d`` of
    ``model`` (a ``Conv1D``'s ``[in, out]`` weight is read as ``[out, in]``).
    """

    def __init__(self, model: nn.Module, groups: str = "channel", lam: float = 1e-4,
                 layers: Iterable[str] | None = None) -> None:
        if groups not in ("channel", "input") and not is_nm(groups):
            raise ValueError(f"groups must be 'channel', 'input' or 'n:m' (e.g. '2:4'), got "
                             f"{groups!r}")
        self.groups, self.lam = groups, check_number("lam", lam, low=0.0)
        mods = dict(model.named_modules())
        names = list(layers) if layers is not None else [
            n for n, m in mods.items() if isinstance(m, (*LINEAR_TYPES, nn.Conv2d))]
        unknown = [n for n in names if n not in mods]
        if unknown:
            raise ValueError(f"unknown layers: {unknown}")
        self.layers = {n: mods[n] for n in names}

    def group_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """The L2 norm of every group of ``weight`` (differentiable)."""
        if self.groups == "channel":
            return weight.reshape(weight.shape[0], -1).norm(dim=1)
        if self.groups == "input":
            return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        n, m = (int(v) for v in self.groups.split(":"))
        t = weight.movedim(1, -1)
        if t.shape[-1] % m:
            raise ValueError(f"input dimension {t.shape[-1]} is not a multiple of m={m}")
        g = t.reshape(-1, m)
        drop = torch.topk(g.detach().abs(), m - n, dim=-1, largest=False).indices
        return torch.gather(g, 1, drop).norm(dim=1)

    def penalty(self) -> torch.Tensor:
        total = sum(self.group_norms(oriented(m, m.weight)).sum()
                    for m in self.layers.values())
        return self.lam * total

    __call__ = penalty


def is_nm(groups: str) -> bool:
    """Whether ``groups`` spells an N:M pattern such as ``"2:4"`` (``0 < n < m``)."""
    parts = groups.split(":") if isinstance(groups, str) else []
    return (len(parts) == 2 and all(p.isdigit() for p in parts)
            and 0 < int(parts[0]) < int(parts[1]))


def nm_kept(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The saliency an N:M mask keeps: the sum of the ``n`` best scores of every group of ``m``
    consecutive columns of ``scores [R, C]``, per group (``[C / m]``)."""
    s = scores.detach().double()
    groups = s.reshape(s.shape[0], -1, m)
    return torch.topk(groups, n, dim=-1).values.sum(-1).sum(0)


def nm_permutation(scores: torch.Tensor, n: int = 2, m: int = 4, *, max_iters: int = 200,
                   chunk: int = 64) -> torch.Tensor:
    """A permutation ``perm`` of the columns of ``scores [R, C]`` such that the N:M mask of
    ``scores[:, perm]`` keeps more saliency (NVIDIA ASP's idea: which inputs share a group of
    ``m`` decides what a 2:4 mask must drop; the permutation is then applied to the layer's
    input channels and folded into the layer that produces them).

    Greedy column swaps between groups: each round evaluates every swap exactly (the kept
    saliency of both groups after it) and applies the best disjoint improving swaps, until
    none improves or ``max_iters`` rounds. Never worse than the identity. Cost per round
    ``O(C^2 R)`` time and ``8 R C chunk`` bytes of scratch: a fraction of a second at
    C = R = 256, ~15 s per round at 1024 on two CPU cores; meant for small and medium layers
    (or a GPU), not as is for 4096-wide transformer layers.
    """
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got n={n}, m={m}")
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty [rows, inputs] matrix (for a conv, "
                         f"reduce the kernel taps first), got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    s = scores.detach().double()
    r, c = s.shape
    if c % m:
        raise ValueError(f"input dimension {c} is not a multiple of m={m}")
    perm = torch.arange(c, device=s.device)
    group = torch.arange(c, device=s.device) // m
    slot = torch.arange(c, device=s.device) % m
    for _ in range(max_iters):
        cur = s[:, perm]
        kept = nm_kept(cur, n, m)  # [G]
        grouped = cur.reshape(r, -1, m)  # [R, G, m]
        # Replacing the column at position x by a value v: the group keeps the best n - 1 of
        # its other m - 1 columns plus max(their n-th best, v).
        others = grouped[:, group].clone()  # [R, C, m]: x's group, x's own slot masked out
        others[:, torch.arange(c), slot] = float("-inf")
        top = torch.topk(others, n, dim=-1).values  # [R, C, n]
        base = top[..., :n - 1].sum(-1).sum(0) - kept[group]  # [C]
        nth = top[..., n - 1]  # [R, C]
        # gain[x, y]: the change of x's group's kept saliency when column y takes x's place
        gain = torch.empty(c, c, dtype=s.dtype, device=s.device)
        for lo in range(0, c, chunk):
            hi = min(lo + chunk, c)
            gain[lo:hi] = torch.maximum(nth[:, lo:hi, None], cur[:, None, :]).sum(0) \
                + base[lo:hi, None]
        delta = gain + gain.t()
        delta[group[:, None] == group[None, :]] = float("-inf")
        delta = torch.triu(delta, diagonal=1) + torch.tril(
            torch.full_like(delta, float("-inf")))
        best = delta.flatten().argsort(descending=True)
        tol = 1e-12 * float(kept.sum().abs().clamp(min=1.0))
        used: set[int] = set()
        swapped = False
        for idx in best.tolist():
            x, y = divmod(idx, c)
            if not delta[x, y] > tol:
                break
            gx, gy = int(group[x]), int(group[y])
            if gx in used or gy in used:
                continue
            used.update((gx, gy))
            perm[[x, y]] = perm[[y, x]]
            swapped = True
            if len(used) >= len(kept) - 1:
                break
        if not swapped:
            break
    return perm
