"""Pruning criteria, mask patterns and schedules (plain PyTorch; CPU or GPU).

Criteria (a saliency per weight: larger means keep):

* :func:`magnitude_scores` -- ``|w|``;
* :func:`wanda_scores` -- Wanda (Sun et al., 2023): ``|w| * ||x_j||_2``, the input feature's
  activation norm over calibration tokens (:func:`activation_norms`);
* :func:`obd_scores` -- Optimal Brain Damage (LeCun et al., 1990) with the diagonal empirical
  Fisher as the Hessian: ``F_jj w^2 / 2``, ``F`` = mean squared gradient over calibration
  batches (:func:`fisher_diagonal`).

Patterns (a boolean keep-mask from scores):

* :func:`unstructured_masks` -- the lowest ``sparsity`` fraction, per layer or over all layers
  at once (global);
* :func:`nm_mask` -- N:M along the input dimension (2:4: two kept in every group of four);
* :func:`structured_mask` -- whole output rows / channels, ranked by their L2 saliency.

Schedule: :func:`cubic_sparsity` (Zhu & Gupta, 2017). Regularizer: :class:`GroupLasso`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_ops._swap import replace_everywhere
from compress_ops.nn.sparse24 import Sparse24Linear

__all__ = ["Pruner", "magnitude_scores", "wanda_scores", "obd_scores", "activation_norms",
           "fisher_diagonal", "unstructured_masks", "nm_mask", "nm_kept", "nm_permutation",
           "structured_mask", "cubic_sparsity", "GroupLasso"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run calibration in eval mode (BatchNorm statistics untouched, dropout off); every
    module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|w|``."""
    return weight.detach().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|w[n, j]| * ||x_j||``: ``input_norms [in_features]`` (or ``[C_in]`` for a conv,
    broadcast over its kernel) from :func:`activation_norms`."""
    w = weight.detach()
    if input_norms.shape != (w.shape[1],):
        raise ValueError(f"input_norms shape {tuple(input_norms.shape)} must be "
                         f"({w.shape[1]},): one norm per input feature")
    return w.abs() * input_norms.to(w.dtype).reshape(1, -1, *([1] * (w.dim() - 2)))


def obd_scores(weight: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``F_jj w_j^2 / 2``: the loss increase of removing ``w_j`` under a diagonal quadratic
    model (Optimal Brain Damage), ``fisher`` from :func:`fisher_diagonal` (same shape)."""
    if fisher.shape != weight.shape:
        raise ValueError(f"fisher shape {tuple(fisher.shape)} must equal the weight's "
                         f"{tuple(weight.shape)}")
    return 0.5 * fisher.to(weight.dtype) * weight.detach().pow(2)


@torch.no_grad()
def activation_norms(model: nn.Module, batches: Iterable, layers: dict[str, nn.Module],
                     forward: Callable[[nn.Module, object], object] | None = None
                     ) -> dict[str, torch.Tensor]:
    """``{name: ||x_j||_2}`` per input feature of each ``nn.Linear`` / ``nn.Conv2d`` in
    ``layers``, over every token / pixel of the calibration ``batches`` (``forward(model,
    batch)`` runs one; default ``model(batch[0])`` for tuples, else ``model(batch)``)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod, args, out):
            x = args[0].detach().float()
            x = x.movedim(1, -1) if isinstance(mod, nn.Conv2d) else x
            s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(model):
            for batch in batches:
                _run(model, batch, forward)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"layers never ran on the calibration data: {missing}")
    return {n: s.sqrt() for n, s in sums.items()}


def _run(model: nn.Module, batch, forward):
    if forward is not None:
        return forward(model, batch)
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def fisher_diagonal(model: nn.Module, batches: Iterable, loss_fn: Callable,
                    params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``E[g^2]`` of each parameter in ``params`` over the
    calibration ``batches`` of ``(inputs, targets)``: one backward per batch of
    ``loss_fn(model(inputs), targets)``, in eval mode; every gradient of the model is left as
    it was."""
    everything = list(dict.fromkeys([*model.parameters(), *params.values()]))
    saved = [p.grad for p in everything]
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    try:
        with eval_mode(model):
            for x, y in batches:
                for p in everything:
                    p.grad = None
                loss_fn(model(x), y).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += p.grad.detach().float().pow(2)
                count += 1
    finally:
        for p, g in zip(everything, saved, strict=True):
            p.grad = g
    if count == 0:
        raise ValueError("fisher_diagonal needs at least one calibration batch")
    return {n: a / count for n, a in acc.items()}


def unstructured_masks(scores: dict[str, torch.Tensor], sparsity: float,
                       scope: str = "layer") -> dict[str, torch.Tensor]:
    """Keep-masks removing the ``sparsity`` fraction of lowest scores, in every layer
    (``scope="layer"``) or over all of them together (``"global"``: layers with low scores
    lose more). Exactly ``round(sparsity * count)`` weights are removed per scope (ties broken
    by position)."""
    _check_sparsity(sparsity)
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
    _check_sparsity(sparsity)
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
    _check_sparsity(final)
    _check_sparsity(initial)
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
    ``layers`` defaults to every ``nn.Linear`` and ``nn.Conv2d`` of ``model``.
    """

    def __init__(self, model: nn.Module, groups: str = "channel", lam: float = 1e-4,
                 layers: Iterable[str] | None = None) -> None:
        if groups not in ("channel", "input") and not _is_nm(groups):
            raise ValueError(f"groups must be 'channel', 'input' or 'n:m' (e.g. '2:4'), got "
                             f"{groups!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        self.groups, self.lam = groups, float(lam)
        mods = dict(model.named_modules())
        names = list(layers) if layers is not None else [
            n for n, m in mods.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
        unknown = [n for n in names if n not in mods]
        if unknown:
            raise ValueError(f"unknown layers: {unknown}")
        self.weights = {n: mods[n].weight for n in names}

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
        total = sum(self.group_norms(w).sum() for w in self.weights.values())
        return self.lam * total

    __call__ = penalty


def _is_nm(groups: str) -> bool:
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


_PATTERNS = ("unstructured", "channel")
_CRITERIA = ("magnitude", "wanda", "obd")


class Pruner:
    """Masks applied during training: dense weights seen through a keep-mask (a
    ``torch.nn.utils.parametrize`` parametrization, ``weight = original * keep``), so masked
    weights are exactly zero in every forward and get no gradient, under any optimizer
    (momentum and weight decay move only the hidden original, which :meth:`step` re-zeroes);
    then :meth:`finalize` into the compressed model. The masks are buffers of the model: they
    follow ``.to()``. Build the optimizer after the ``Pruner`` if ``permute=True`` (the
    permuted layers are new modules); otherwise before or after.

    ``pattern``:

    * ``"unstructured"`` -- the ``sparsity`` fraction of lowest scores per layer
      (``scope="layer"``) or over all layers (``"global"``). Finalized layers stay dense
      ``nn.Linear`` / ``nn.Conv2d`` with zeros (no kernel here is faster on unstructured zeros).
    * ``"n:m"`` such as ``"2:4"`` -- the ``n`` best of every ``m`` consecutive inputs (fixed 50%
      for 2:4: leave ``sparsity`` at ``None``). 2:4 ``nn.Linear`` layers finalize to
      :class:`~compress_ops.nn.Sparse24Linear`; other layers stay masked-dense.
    * ``"channel"`` -- whole output channels of the coupled groups that
      :func:`compress_ops.structured.channel_groups` proves removable from a ``torch.fx`` trace
      on ``example_inputs`` (residual producers share one mask); the masks zero the producers'
      rows and biases and the following BatchNorms' affine parameters. Finalize removes the
      dead channels with :func:`compress_ops.structured.prune_channels` (``zero_only``), which
      folds a dead channel's constant (e.g. ``sigmoid(0)``) into the next layer's bias where
      that is exact and keeps the channel where it is not (listed in ``skipped``): a
      physically smaller dense model with the masked model's outputs (in eval mode).

    ``criterion``: ``"magnitude"``, ``"wanda"`` (activation norms measured once on ``calib``
    batches), ``"obd"`` (diagonal Fisher measured once on ``calib`` batches of ``(inputs,
    targets)`` with ``loss_fn``), or a callable ``(name, module) -> scores`` shaped like the
    weight. Scores are recomputed from the current weights at every mask update.

    ``schedule=(start, end)``: gradual pruning, Zhu & Gupta's :func:`cubic_sparsity` from
    ``initial_sparsity`` at ``start`` to ``sparsity`` at ``end``, masks updated every
    ``update_every`` calls of :meth:`step` (call it once per optimizer step, e.g. as
    ``distill.fit(..., on_step=pruner.step)``). Without a schedule the masks are set once, now.
    Pruned weights are zero, so they score lowest at the next update: masks only grow.
    ``layers``: qualified names of ``nn.Linear`` / ``nn.Conv2d`` layers (default: all of them;
    for ``"channel"``, those whose channels can be removed; a listed layer coupled with others
    through a residual add must be listed with them).

    ``permute=True`` (N:M only; needs ``example_inputs``): before masking, permute each N:M
    layer's input channels to keep more saliency (:func:`nm_permutation`, as NVIDIA's ASP
    does) and fold the permutation into the layers that produce those channels, so the model
    still computes exactly the same function. ``permuted`` lists the kept saliency before and
    after per layer; layers it could not permute are in ``skipped``.
    """

    def __init__(self, model: nn.Module, sparsity: float | None = 0.5, *,
                 pattern: str = "unstructured", criterion: str | Callable = "magnitude",
                 scope: str = "layer", layers: Iterable[str] | None = None,
                 schedule: tuple[int, int] | None = None, initial_sparsity: float = 0.0,
                 update_every: int = 1, calib: Iterable | None = None,
                 loss_fn: Callable | None = None,
                 forward: Callable[[nn.Module, object], object] | None = None,
                 example_inputs: tuple | None = None, permute: bool = False) -> None:
        if pattern not in _PATTERNS and not _is_nm(pattern):
            raise ValueError(f"pattern must be 'unstructured', 'channel' or 'n:m' (e.g. '2:4'), "
                             f"got {pattern!r}")
        self.nm = tuple(int(v) for v in pattern.split(":")) if _is_nm(pattern) else None
        if self.nm is not None:
            if sparsity is not None or schedule is not None:
                raise ValueError(f"an {pattern} mask has a fixed sparsity: pass sparsity=None "
                                 f"and no schedule")
        else:
            _check_sparsity(sparsity)
            _check_sparsity(initial_sparsity)
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global" and pattern != "unstructured":
            raise ValueError("scope='global' applies to the unstructured pattern only")
        if not callable(criterion) and criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {_CRITERIA} or a callable, "
                             f"got {criterion!r}")
        if criterion in ("wanda", "obd") and calib is None:
            raise ValueError(f"criterion {criterion!r} needs calibration batches (calib=)")
        if criterion == "obd" and loss_fn is None:
            raise ValueError("criterion 'obd' needs loss_fn(outputs, targets)")
        if schedule is not None:
            start, end = schedule
            if end <= start:
                raise ValueError(f"schedule end ({end}) must be after start ({start})")
        if isinstance(update_every, bool) or not isinstance(update_every, int) \
                or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        if pattern == "channel" and example_inputs is None:
            raise ValueError("pattern='channel' needs example_inputs to trace the model")
        if permute and (self.nm is None or example_inputs is None):
            raise ValueError("permute=True needs an N:M pattern and example_inputs (the "
                             "permutation is folded into the layers producing the inputs)")
        self.model, self.pattern, self.criterion, self.scope = model, pattern, criterion, scope
        self.final, self.initial = sparsity, initial_sparsity
        self.schedule, self.update_every, self.step_count = schedule, update_every, 0
        self.example_inputs = example_inputs
        mods = dict(model.named_modules())
        types = (nn.Linear, nn.Conv2d)
        names = list(layers) if layers is not None else [
            n for n, m in mods.items() if isinstance(m, types)]
        unknown = [n for n in names if n not in mods or not isinstance(mods[n], types)]
        if unknown:
            raise ValueError(f"not {' / '.join(t.__name__ for t in types)} layers of the "
                             f"model: {unknown}")
        self.skipped: dict[str, str] = {}
        if self.nm is not None:  # N:M needs whole groups of m inputs
            short = [n for n in names if mods[n].weight.shape[1] % self.nm[1]]
            if layers is not None and short:
                raise ValueError(f"layers {short} have an input dimension that is not a "
                                 f"multiple of m={self.nm[1]}")
            for n in short:
                self.skipped[n] = (f"{mods[n].weight.shape[1]} inputs are not groups of "
                                   f"{self.nm[1]}; left dense")
            names = [n for n in names if n not in short]
        self.layers = {n: mods[n] for n in names}
        self.groups: list = []
        if pattern == "channel":
            from compress_ops.structured import channel_groups

            groups, unprovable = channel_groups(model, example_inputs)
            self.skipped.update(unprovable)
            if layers is not None:
                wanted = set(names)
                for n in names:
                    if n in unprovable:
                        raise ValueError(f"layer {n!r}: {unprovable[n]}")
                    found = [g for g in groups if n in g.producers]
                    if not found:
                        owner = [g.producers for g in groups if n in g.depthwise]
                        raise ValueError(
                            f"layer {n!r} does not produce removable channels" + (
                                f": a depthwise conv, its channels follow {owner[0]}; list "
                                f"those" if owner else ""))
                    (g,) = found
                    if not set(g.producers) <= wanted:
                        raise ValueError(f"layer {n!r} is coupled with {g.producers} (their "
                                         f"outputs meet in an add): list all of them")
                groups = [g for g in groups if set(g.producers) <= wanted]
            self.groups = groups
            self.layers = {n: mods[n] for g in self.groups for n in g.producers}
        if calib is not None and iter(calib) is calib:
            calib = list(calib)  # a one-shot iterator: calibration may run twice (permute)
        self._calibrate(calib, loss_fn, forward)
        # layer -> (N:M-kept saliency before, after) the input-channel permutation
        self.permuted: dict[str, tuple[float, float]] = {}
        if permute and self._permute():
            self._calibrate(calib, loss_fn, forward)  # statistics of the permuted inputs
        # (module, parameter name) -> the parametrization holding its keep-mask
        self._masks: dict[tuple[str, str], _Mask] = {}
        self._state = "active"
        self.update(self.target_sparsity())

    def _calibrate(self, calib, loss_fn, forward) -> None:
        self._norms = (activation_norms(self.model, calib, self.layers, forward)
                       if self.criterion == "wanda" else None)
        self._fisher = (fisher_diagonal(self.model, calib, loss_fn,
                                        {n: m.weight for n, m in self.layers.items()})
                        if self.criterion == "obd" else None)

    @torch.no_grad()
    def _permute(self) -> bool:
        """Permute the input channels of the N:M layers to keep more saliency; the same
        permutation reorders the output channels of the layers that produce them (and any
        BatchNorm between, and every other reader), so the model computes the same function.
        Layers whose inputs no provable channel group produces are listed in ``skipped``."""
        from compress_ops.structured import channel_groups, select_channels

        groups, _ = channel_groups(self.model, self.example_inputs)
        scores = self.scores()
        done: set[str] = set()
        for g in groups:
            targets = [c for c in g.consumers if c in self.layers]
            if not targets:
                continue
            if any(scores[t].dim() != 2 for t in targets):
                for t in targets:
                    self.skipped[t] = "input-channel permutation is implemented for linear " \
                                      "consumers only; not permuted"
                done.update(targets)
                continue
            if any(scores[t].shape[1] != g.width for t in targets):
                for t in targets:  # e.g. a Linear after a flatten: channels are not columns
                    self.skipped[t] = "input columns are not the producer's channels 1:1; " \
                                      "not permuted"
                done.update(targets)
                continue
            done.update(targets)
            if g.width % self.nm[1]:
                for t in targets:
                    self.skipped[t] = f"{g.width} channels are not groups of {self.nm[1]}"
                continue
            joint = torch.cat([scores[t] for t in targets])
            perm = nm_permutation(joint, *self.nm)
            before = {t: float(nm_kept(scores[t], *self.nm).sum()) for t in targets}
            select_channels(self.model, g, perm)
            for t in targets:
                self.permuted[t] = (before[t],
                                    float(nm_kept(scores[t][:, perm], *self.nm).sum()))
        for n in self.layers:
            if n not in done:
                self.skipped.setdefault(n, "no provable producer of its inputs to fold a "
                                           "permutation into; not permuted")
        self.layers = {n: self.model.get_submodule(n) for n in self.layers}
        return bool(self.permuted)

    # -- masks ----------------------------------------------------------------------------

    def target_sparsity(self) -> float | None:
        """The sparsity the schedule asks for now (``None`` for N:M)."""
        if self.nm is not None:
            return None
        if self.schedule is None:
            return float(self.final)
        return cubic_sparsity(self.step_count, *self.schedule, self.final, self.initial)

    def scores(self) -> dict[str, torch.Tensor]:
        """The criterion's saliency of every weight of every layer, from the current weights."""
        out = {}
        for n, m in self.layers.items():
            if callable(self.criterion):
                s = self.criterion(n, m)
                if s.shape != m.weight.shape:
                    raise ValueError(f"criterion gave scores of shape {tuple(s.shape)} for "
                                     f"{n}, expected {tuple(m.weight.shape)}")
            elif self.criterion == "wanda":
                s = wanda_scores(m.weight, self._norms[n])
            elif self.criterion == "obd":
                s = obd_scores(m.weight, self._fisher[n])
            else:
                s = magnitude_scores(m.weight)
            out[n] = s.detach()
        return out

    @torch.no_grad()
    def update(self, sparsity: float | None) -> None:
        """Recompute the masks for ``sparsity`` from the current scores and apply them."""
        scores = self.scores()
        masks: dict[tuple[str, str], torch.Tensor] = {}
        if self.nm is not None:
            for n, s in scores.items():
                masks[(n, "weight")] = nm_mask(s, *self.nm)
        elif self.pattern == "unstructured":
            for n, keep in unstructured_masks(scores, sparsity, self.scope).items():
                masks[(n, "weight")] = keep
        else:
            mods = dict(self.model.named_modules())
            for g in self.groups:
                sal = sum(scores[p].float().reshape(scores[p].shape[0], -1).norm(dim=1)
                          for p in g.producers)
                keep = structured_mask(sal[:, None], sparsity)[:, 0]
                for p in g.producers:
                    w = mods[p].weight
                    masks[(p, "weight")] = keep.reshape(-1, *([1] * (w.dim() - 1))).expand(
                        w.shape).clone()
                    if mods[p].bias is not None:
                        masks[(p, "bias")] = keep.clone()
                for b in g.norms:
                    if mods[b].weight is not None:
                        masks[(b, "weight")] = keep.clone()
                        masks[(b, "bias")] = keep.clone()
        for key, keep in masks.items():
            if key in self._masks:
                self._masks[key].keep.copy_(keep)
            else:
                module = self.model.get_submodule(key[0])
                mask = _Mask(keep.to(getattr(module, key[1]).device))
                parametrize.register_parametrization(module, key[1], mask)
                self._masks[key] = mask
        self.apply()

    @property
    def masks(self) -> dict[tuple[str, str], torch.Tensor]:
        """``{(layer, parameter name): keep-mask}`` (boolean, shaped like the parameter)."""
        return {key: m.keep for key, m in self._masks.items()}

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the hidden original of every masked weight (what momentum may have moved)."""
        for (name, pname), mask in self._masks.items():
            module = self.model.get_submodule(name)
            module.parametrizations[pname].original.mul_(mask.keep)

    def _check_active(self) -> None:
        if self._state != "active":
            raise RuntimeError(f"this Pruner was {self._state}; build a new one")

    def step(self, *_: object) -> None:
        """Advance the schedule by one optimizer step (arguments ignored, so it can be
        ``fit``'s ``on_step``); updates the masks when due, and re-applies them."""
        self._check_active()
        self.step_count += 1
        end = self.schedule[1] if self.schedule is not None else 0
        if self.step_count <= end and (self.step_count % self.update_every == 0
                                       or self.step_count == end):  # the target, always
            self.update(self.target_sparsity())
        else:
            self.apply()

    def sparsity(self) -> float:
        """The fraction of masked weights over the pruned layers' weights."""
        kept = total = 0
        for (n, p), keep in self.masks.items():
            if p == "weight" and n in self.layers:
                kept += int(keep.sum())
                total += keep.numel()
        return 1.0 - kept / total if total else 0.0

    def remove(self) -> None:
        """Remove the masks' parametrizations: the layers become plain modules again, their
        weights keeping the zeros."""
        self._check_active()
        self.apply()
        for name, pname in self._masks:
            parametrize.remove_parametrizations(self.model.get_submodule(name), pname,
                                                leave_parametrized=True)
        self._state = "removed"

    # -- finalize -------------------------------------------------------------------------

    def finalize(self) -> nn.Module:
        """Remove the masks and convert the masked layers; returns the model (a new module
        when the model itself was a pruned ``nn.Linear``).

        2:4 ``nn.Linear`` layers become :class:`~compress_ops.nn.Sparse24Linear` (the masked
        weights, packed as they are); the channel pattern removes the dead channels
        (:func:`compress_ops.structured.prune_channels` with ``zero_only=True``; its report is
        kept as ``structured``, and masked channels it had to keep are listed in ``skipped``);
        unstructured layers stay dense with their zeros. The finalized model computes what
        the masked model computed (channel pattern: in eval mode, BatchNorm statistics frozen).
        """
        self.remove()
        self._state = "finalized"
        if self.nm == (2, 4):
            for m in dict.fromkeys(self.layers.values()):
                if type(m) is nn.Linear:  # once per module, swapped in at every name
                    new = Sparse24Linear.from_dense(m, prune=False)
                    if m is self.model:
                        self.model = new
                    else:
                        replace_everywhere(self.model, m, new)
        elif self.pattern == "channel":
            from compress_ops.structured import prune_channels

            masked = {tuple(g.producers): int((~self._row_keep(g)).sum()) for g in self.groups}
            self.structured = prune_channels(self.model, self.example_inputs, zero_only=True)
            removed = {p: before - after for p, before, after in self.structured.groups}
            for producers, count in masked.items():
                if removed.get(producers, 0) < count:
                    self.skipped[", ".join(producers)] = (
                        f"{count - removed.get(producers, 0)} of {count} masked channels kept: "
                        f"their constant value cannot be folded exactly into the next layers")
        return self.model

    def _row_keep(self, group) -> torch.Tensor:
        keep = self._masks[(group.producers[0], "weight")].keep
        return keep.reshape(keep.shape[0], -1)[:, 0]


class _Mask(nn.Module):
    """The parametrization ``weight = original * keep`` (``keep`` a boolean buffer)."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep.bool())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.keep
