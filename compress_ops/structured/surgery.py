"""Module surgery: keep (remove, reorder) the channels of a :class:`ChannelGroup` by replacing
every module of the group with a sliced copy of itself (:func:`select_channels`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress_ops import _swap
from compress_ops._linear import is_conv1d
from compress_ops._swap import replace_everywhere
from compress_ops.structured.graph import ChannelGroup, widths_agree

__all__ = ["select_channels", "check_index", "resized_copy", "unit_rows"]


def check_index(index, width: int, what: str = "index") -> torch.Tensor:
    """``index`` as a CPU ``long`` tensor, checked to be 1-D distinct channel indices in
    ``[0, width)`` keeping at least one (``TypeError`` / ``ValueError`` naming ``what``)."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{what} must be a 1-D integer tensor of channel indices, got "
                        f"{type(index).__name__}")
    if index.dim() != 1 or index.dtype == torch.bool or index.is_floating_point() \
            or index.is_complex():
        raise TypeError(f"{what} must be a 1-D integer tensor of channel indices, got a "
                        f"{index.dtype} tensor of shape {tuple(index.shape)}")
    idx = index.detach().to("cpu", torch.long)
    if idx.numel() == 0:
        raise ValueError(f"{what} must keep at least one channel")
    if idx.min() < 0 or idx.max() >= width:
        raise ValueError(f"{what} values must be in [0, {width}), got min {int(idx.min())}, "
                         f"max {int(idx.max())}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"{what} has repeated channels")
    return idx


def resized_copy(m: nn.Module) -> nn.Module:
    """A copy of ``m`` of the same class (a subclass keeps its own ``forward``: a ``Conv2d``
    that pads first, timm's ``BatchNormAct2d`` with its activation child) sharing its children
    and attributes, with its own parameter and buffer dicts, for the slicing below to fill."""
    new = copy.copy(m)
    for slot in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if hasattr(m, slot):
            setattr(new, slot, type(getattr(m, slot))(getattr(m, slot)))
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    return new


def _param(new: nn.Module, name: str, old: nn.Module, value: torch.Tensor | None) -> None:
    if getattr(old, name, None) is None or value is None:
        return
    new._parameters[name] = nn.Parameter(value.detach().clone(),
                                         requires_grad=getattr(old, name).requires_grad)


def unit_rows(idx: torch.Tensor, rows: int = 1,
              chunks: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """The output rows of a producer that units ``idx`` occupy, ``[len(idx), rows]``: ``rows``
    consecutive rows per unit, or with ``chunks`` (a fused producer, ``(offset, rows per
    unit)`` each) each chunk's rows of the unit, in chunk order."""
    parts = [(off + idx[:, None] * r + torch.arange(r, device=idx.device))
             for off, r in (chunks or [(0, rows)])]
    return torch.cat(parts, 1)


def _slice_out(m: nn.Module, idx: torch.Tensor, depthwise: bool = False,
               rows: int = 1, chunks: list[tuple[int, int]] | None = None) -> nn.Module:
    i = idx.to(m.weight.device)
    # chunk by chunk (a fused producer): the kept units of the first chunk, then the next ...
    i = torch.cat([unit_rows(i, r).reshape(-1) + off for off, r in (chunks or [(0, rows)])])
    k = i.numel()
    new = resized_copy(m)
    if is_conv1d(m):  # (weight [in, out]: its outputs are columns)
        new.nf = k
        _param(new, "weight", m, m.weight[:, i])
        _param(new, "bias", m, None if m.bias is None else m.bias[i])
        return new
    if isinstance(m, nn.Linear):
        new.out_features = k
    elif depthwise:
        new.in_channels = new.out_channels = new.groups = k
    else:
        new.out_channels = k
    _param(new, "weight", m, m.weight[i])
    _param(new, "bias", m, None if m.bias is None else m.bias[i])
    return new


def _slice_in(m: nn.Module, idx: torch.Tensor, rep: int) -> nn.Module:
    i = idx.to(m.weight.device)
    new = resized_copy(m)
    if is_conv1d(m):  # (weight [in, out]: its inputs are rows)
        rows = (i[:, None] * rep + torch.arange(rep, device=i.device)).reshape(-1)
        new.nx = rows.numel()
        _param(new, "weight", m, m.weight[rows])
        return new
    if isinstance(m, nn.Linear):
        cols = (i[:, None] * rep + torch.arange(rep, device=i.device)).reshape(-1)
        new.in_features = cols.numel()
        _param(new, "weight", m, m.weight[:, cols])
    else:
        new.in_channels = idx.numel()
        _param(new, "weight", m, m.weight[:, i])
    return new


def _slice_norm(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    ref = m.weight if m.weight is not None else m.running_mean
    i = idx.to(ref.device) if ref is not None else idx
    new = resized_copy(m)
    new.num_features = idx.numel()
    for name in ("weight", "bias"):
        v = getattr(m, name)
        _param(new, name, m, None if v is None else v[i])
    for name in ("running_mean", "running_var"):
        if getattr(m, name) is not None:
            new._buffers[name] = getattr(m, name)[i].clone()
    if m.num_batches_tracked is not None:
        new._buffers["num_batches_tracked"] = m.num_batches_tracked.clone()
    return new


def _check_group(model: nn.Module, group: ChannelGroup) -> None:
    sp = {"producer": group.producers, "depthwise": group.depthwise, "norm": group.norms,
          "consumer": [(c, group.columns.get(c, 1)) for c in group.consumers],
          "rows": group.rows}
    try:
        ok = widths_agree(model, sp, group.width)
    except AttributeError as exc:
        raise ValueError(f"group does not match the model ({exc}); call channel_groups "
                         f"again") from exc
    for name, attrs in group.attrs.items():
        m = model.get_submodule(name)
        if any(getattr(m, a, None) != group.width * v for a, v in attrs.items()):
            ok = False
    if not ok:
        raise ValueError(f"group of {group.producers} (width {group.width}) does not match the "
                         f"model's layers any more; call channel_groups again")


def select_channels(model: nn.Module, group: ChannelGroup, index: torch.Tensor) -> None:
    """In place: keep channels ``index`` (in that order) of ``group``.

    ``index`` is a 1-D integer tensor: a sorted subset to remove channels, or a permutation to
    reorder them (which gives an exactly equivalent model, e.g. for 2:4 input-channel
    permutations). Producers keep weight rows / bias entries ``index``, norms their weight,
    bias and running statistics, depthwise convs their channels, consumers their input columns
    (``columns`` per channel) / input channels; a fused producer keeps the rows of the kept
    units in each of its chunks, and the group's ``attrs`` are rescaled. Every changed module
    is replaced by a copy of the same class (a subclass keeps its ``forward``: the analysis
    proved the op it runs is the layer's own call) with sliced tensors, its sizes
    (``out_features``, ``in_channels``, ``num_features``, ...) updated, the same children,
    dtype, device and ``training`` flag, its parameters keeping ``requires_grad``.
    ``group.width`` is updated.
    """
    idx = check_index(index, group.width)
    _check_group(model, group)
    names = list(dict.fromkeys(group.producers + group.depthwise + group.norms
                               + group.consumers))
    for name in names:
        old = model.get_submodule(name)
        new = old
        if name in group.producers:
            new = _slice_out(new, idx, rows=group.rows.get(name, 1),
                             chunks=group.chunks.get(name))
        if name in group.depthwise:
            new = _slice_out(new, idx, depthwise=True)
        if name in group.norms:
            new = _slice_norm(new, idx)
        if name in group.consumers:
            new = _slice_in(new, idx, group.columns.get(name, 1))
        new.train(old.training)
        replace_everywhere(model, old, new)
        _swap.record_resized(model, name)
    for name, attrs in group.attrs.items():  # (a fused attention's split size, head counts)
        m = model.get_submodule(name)
        for a, v in attrs.items():
            setattr(m, a, idx.numel() * v)
        if name:  # (a checkpoint then records the attention module's sizes too)
            _swap.record_resized(model, name)
    group.width = idx.numel()
    _swap.after_compress(model)  # (a Hugging Face model's save_pretrained records the sizes)
