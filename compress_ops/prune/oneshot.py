"""One-shot unstructured pruning of a trained model's linear layers, without retraining:
SparseGPT, Wanda or magnitude (:mod:`compress_ops.sparsify`), from calibration data.

The layers stay dense ``nn.Linear`` / ``Conv1D`` modules with zeros in their weights: no
kernel here reads an unstructured mask, so this saves neither memory nor time at run time. It
is for accuracy studies (how much a model loses at a given sparsity, method against method)
and for composing with other methods.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_ops._linear import LINEAR_TYPES, from_oriented, linear_weight, oriented
from compress_ops._swap import index as module_index
from compress_ops._validate import check_choice, check_int, check_number
from compress_ops.calibrate import sequential_build
from compress_ops.nn.base import CompressedModule
from compress_ops.sparsify import (
    magnitude_unstructured,
    sparsegpt_unstructured,
    wanda_unstructured,
)

__all__ = ["METHODS", "prunable_layers", "pruning_step", "prune_one_shot_"]

#: The one-shot methods, and whether each reads calibration data (an input Hessian).
METHODS: dict[str, bool] = {"sparsegpt": True, "wanda": True, "magnitude": False}

#: ``(name, module, hessian or None) -> the module's new weight`` (shaped like its weight).
Step = Callable[[str, nn.Module, torch.Tensor | None], torch.Tensor]


def _check_sparsity(sparsity: object) -> float:
    return check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True,
                        hint="(the fraction of each layer's weights to zero)")


def pruning_step(sparsity: float, method: str = "sparsegpt", *, damp: float = 0.01,
                 block_size: int = 128) -> Step:
    """The per-layer step of :func:`prune_one_shot_`: a function ``(name, module, hessian) ->
    new weight`` that returns the pruned weight of one linear layer (``nn.Linear`` or
    ``Conv1D``), shaped like ``module.weight`` (write it with ``module.weight.copy_``), from
    the layer's input Hessian ``H = 2 X^T X / n`` (``None`` for ``"magnitude"``). The model
    is not touched. Errors from the method (non-finite weights, a Hessian not positive
    definite) are ``ValueError`` naming the layer. A calibration pipeline (per layer from the
    dense model's inputs, or block by block from the pruned model's) calls it per layer."""
    sparsity = _check_sparsity(sparsity)
    check_choice("method", method, tuple(METHODS))
    damp = check_number("damp", damp, low=0.0, high=1.0, high_open=True)
    check_int("block_size", block_size, min=1)

    def step(name: str, module: nn.Module, hessian: torch.Tensor | None) -> torch.Tensor:
        w = oriented(module, module.weight.detach())  # [out, in]
        if METHODS[method] and hessian is None:
            raise ValueError(f"{name}: method={method!r} needs the layer's input Hessian")
        try:
            if method == "magnitude":
                new = magnitude_unstructured(w, sparsity)
            elif method == "wanda":
                new = wanda_unstructured(w, hessian, sparsity)
            else:
                new = sparsegpt_unstructured(w, hessian, sparsity, block_size=block_size,
                                             damp=damp)
                # SparseGPT's block masks can lose to Wanda's at high sparsity when the
                # calibration rows are few: keep whichever changes the layer's output less
                alt = wanda_unstructured(w, hessian, sparsity)
                if output_error(w, alt, hessian) < output_error(w, new, hessian):
                    new = alt
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        return from_oriented(module, new)

    return step


def prunable_layers(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                    ) -> dict[str, nn.Module]:
    """``{first name: module}`` of the linear layers (``nn.Linear``, Hugging Face ``Conv1D``)
    :func:`prune_one_shot_` prunes: not compressed modules (``CompressedModule``), not a layer
    whose weight is tied to another module (an ``lm_head`` sharing the embedding), not one
    whose weight is under a parametrization (e.g. a :class:`~compress_ops.prune.Pruner`'s
    mask), and, with ``filter_fn(module, name)``, only those it accepts under every name. A
    module reachable under several names appears once."""
    idx = module_index(model)
    out: dict[str, nn.Module] = {}
    for mid, aliases in idx.names.items():
        module = idx.modules[mid]
        if not isinstance(module, LINEAR_TYPES) or isinstance(module, CompressedModule):
            continue
        if not isinstance(getattr(module, "weight", None), nn.Parameter) \
                or parametrize.is_parametrized(module, "weight"):
            continue
        if filter_fn is not None and not all(filter_fn(module, n) for n in aliases):
            continue
        if idx.tied(module, aliases):
            continue
        out[aliases[0]] = module
    return out


def output_error(w: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: how much replacing ``w [N, K]`` by ``new`` changes the
    layer's output on the inputs whose Hessian is ``hessian`` (float64)."""
    d = (w.detach().double() - new.detach().double())
    return float(((d @ hessian.detach().double().to(d.device)) * d).sum())


@torch.no_grad()
def prune_one_shot_(
    model: nn.Module,
    sparsity: float,
    *,
    method: str = "sparsegpt",
    calib: Iterable | None = None,
    forward: Callable[[nn.Module, object], object] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    sequential: bool = True,
    progress: bool | None = None,
) -> dict[str, float]:
    """Zero a ``sparsity`` fraction of the weights of every linear layer of ``model`` (each
    ``nn.Linear`` and Hugging Face ``Conv1D``), in place, in one shot; return ``{layer name:
    achieved sparsity}`` (the fraction of its weight that is zero afterwards).

    - ``method="sparsegpt"`` (:func:`compress_ops.sparsify.sparsegpt_unstructured`): the
      least-saliency weights over each ``[out, block_size]`` block of columns are removed and
      the kept weights updated to keep the layer's output on the calibration inputs (a layer
      with at most ``block_size`` inputs is one block: its mask is chosen once, from the
      original weights; smaller blocks let the mask adapt to the updates), or Wanda's mask
      where that changes the layer's output on the calibration inputs less
      (``tr(dW H dW^T)``, :func:`output_error`: SparseGPT's block masks can lose at high
      sparsity with few calibration rows), so it is never worse than ``"wanda"`` there;
      ``"wanda"``
      (:func:`~compress_ops.sparsify.wanda_unstructured`): per output row, the least
      ``|w| * ||x||``, no update; ``"magnitude"``
      (:func:`~compress_ops.sparsify.magnitude_unstructured`): per row, the least ``|w|``,
      reads no data. The exact counts are those functions' (with
      :func:`compress_ops.sparsify.pruned_count`, ``sparsity * size`` rounded half up: Wanda
      and magnitude prune ``pruned_count(sparsity, in_features)`` in each row, SparseGPT
      ``pruned_count(sparsity, out_features * b)`` in each block of ``b`` columns).
    - ``calib`` (an iterable of batches, run as ``forward(model, batch)``, by default as
      ``compress_`` runs them, in eval mode) gives each layer's input Hessian
      ``H = 2 X^T X / n``, block by block as ``compress_`` calibrates
      (:func:`compress_ops.calibrate.sequential_build`: each block of the model's stack on the
      outputs of the blocks before it, already pruned; ``sequential=False``, or a model
      without such a stack, takes every layer's from the dense model's inputs; ``progress``
      as ``compress_``'s); ``sparsegpt`` and ``wanda`` without it are a ``ValueError``.
      ``damp`` is SparseGPT's dampening (times the mean of ``diag H``).
    - Skipped (left as they are, not in the result): compressed modules, layers whose weight
      is tied to another module, parametrized weights, and layers ``filter_fn(module, name)``
      rejects. A module reachable under several names is pruned once (its Hessian covers every
      call).
    - The layers stay dense, with their ``Parameter`` objects (updated in place, so optimizer
      references and ``requires_grad`` survive). There is no unstructured-sparse kernel:
      this saves nothing at run time; it is for accuracy studies and for composing with other
      methods.
    - Every new weight is computed before any is written, so an error (non-finite
      activations, named; a layer that never ran on ``calib``; a Hessian not positive
      definite) leaves the model unchanged. ``UserWarning`` when no layer was pruned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    step = pruning_step(sparsity, method, damp=damp, block_size=block_size)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be a callable filter_fn(module, name) -> bool")
    if forward is not None and not callable(forward):
        raise TypeError("forward must be a callable forward(model, batch)")
    if calib is not None and (isinstance(calib, torch.Tensor) or not isinstance(calib, Iterable)):
        raise TypeError(f"calib must be an iterable of batches (e.g. [x] or a DataLoader), got "
                        f"{type(calib).__name__}")
    if METHODS[method] and calib is None:
        raise ValueError(f"method={method!r} reads calibration data (each layer's input "
                         f"Hessian): pass prune_one_shot_(model, sparsity, calib=batches"
                         f"[, forward=fn]), or use method='magnitude'")
    layers = prunable_layers(model, filter_fn)
    if not layers:
        warnings.warn("prune_one_shot_: the model has no linear layer to prune (none, or all "
                      "compressed, tied, parametrized or filtered out)", UserWarning,
                      stacklevel=2)
        return {}
    if METHODS[method]:
        def build(name: str, module: nn.Module, hessian: torch.Tensor) -> nn.Module:
            pruned = copy.deepcopy(module)  # (what the later blocks run on)
            pruned.weight.copy_(step(name, module, hessian))
            return pruned

        built = sequential_build(model, layers, calib, forward, build, sequential=sequential,
                                 progress=progress)
        new = {name: built[name].weight for name in layers}
    else:
        new = {name: step(name, module, None) for name, module in layers.items()}
    for name, module in layers.items():
        module.weight.copy_(new[name])
    return {name: float((linear_weight(module) == 0).sum()) / module.weight.numel()
            for name, module in layers.items()}
