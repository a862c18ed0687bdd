"""Module surgery: keep (remove, reorder) the channels of a :class:`ChannelGroup` by replacing
every module of the group with a new, sliced ``nn.Linear`` / ``nn.Conv2d`` / BatchNorm
(:func:`select_channels`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from compress_ops._swap import replace_everywhere
from compress_ops.structured.graph import ChannelGroup, widths_agree

__all__ = ["select_channels", "check_index"]


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


def _param(new: nn.Module, name: str, old: nn.Module, value: torch.Tensor | None) -> None:
    p = getattr(new, name)
    if p is None or value is None:
        return
    with torch.no_grad():
        p.copy_(value)
    p.requires_grad_(getattr(old, name).requires_grad)


def _new_conv(m: nn.Conv2d, cin: int, cout: int, groups: int) -> nn.Conv2d:
    return skip_init(nn.Conv2d, cin, cout, m.kernel_size, stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=groups, bias=m.bias is not None,
                     padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)


def _slice_out(m: nn.Module, idx: torch.Tensor, depthwise: bool = False) -> nn.Module:
    i = idx.to(m.weight.device)
    k = idx.numel()
    if isinstance(m, nn.Linear):
        new = skip_init(nn.Linear, m.in_features, k, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
    elif depthwise:
        new = _new_conv(m, k, k, k)
    else:
        new = _new_conv(m, m.in_channels, k, 1)
    _param(new, "weight", m, m.weight[i])
    _param(new, "bias", m, None if m.bias is None else m.bias[i])
    return new


def _slice_in(m: nn.Module, idx: torch.Tensor, rep: int) -> nn.Module:
    i = idx.to(m.weight.device)
    if isinstance(m, nn.Linear):
        cols = (i[:, None] * rep + torch.arange(rep, device=i.device)).reshape(-1)
        new = skip_init(nn.Linear, cols.numel(), m.out_features, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
        _param(new, "weight", m, m.weight[:, cols])
    else:
        new = _new_conv(m, idx.numel(), m.out_channels, 1)
        _param(new, "weight", m, m.weight[:, i])
    _param(new, "bias", m, m.bias)
    return new


def _slice_norm(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    ref = m.weight if m.weight is not None else m.running_mean
    i = idx.to(ref.device) if ref is not None else idx
    new = skip_init(type(m), idx.numel(), eps=m.eps, momentum=m.momentum, affine=m.affine,
                    track_running_stats=m.track_running_stats,
                    device=None if ref is None else ref.device,
                    dtype=None if ref is None else ref.dtype)
    for name in ("weight", "bias"):
        v = getattr(m, name)
        _param(new, name, m, None if v is None else v[i])
    with torch.no_grad():
        for name in ("running_mean", "running_var"):
            if getattr(m, name) is not None:
                getattr(new, name).copy_(getattr(m, name)[i])
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new


def _check_group(model: nn.Module, group: ChannelGroup) -> None:
    sp = {"producer": group.producers, "depthwise": group.depthwise, "norm": group.norms,
          "consumer": [(c, group.columns.get(c, 1)) for c in group.consumers]}
    try:
        ok = widths_agree(model, sp, group.width)
    except AttributeError as exc:
        raise ValueError(f"group does not match the model ({exc}); call channel_groups "
                         f"again") from exc
    if not ok:
        raise ValueError(f"group of {group.producers} (width {group.width}) does not match the "
                         f"model's layers any more; call channel_groups again")


def select_channels(model: nn.Module, group: ChannelGroup, index: torch.Tensor) -> None:
    """In place: keep channels ``index`` (in that order) of ``group``.

    ``index`` is a 1-D integer tensor: a sorted subset to remove channels, or a permutation to
    reorder them (which gives an exactly equivalent model, e.g. for 2:4 input-channel
    permutations). Producers keep weight rows / bias entries ``index``, norms their weight,
    bias and running statistics, depthwise convs their channels, consumers their input columns
    (``columns`` per channel) / input channels. Every changed module is replaced by a new
    ``nn.Linear`` / ``nn.Conv2d`` / BatchNorm of the same dtype, device, hyper-parameters and
    ``training`` flag, its parameters keeping ``requires_grad``. ``group.width`` is updated.
    """
    idx = check_index(index, group.width)
    _check_group(model, group)
    names = list(dict.fromkeys(group.producers + group.depthwise + group.norms
                               + group.consumers))
    for name in names:
        old = model.get_submodule(name)
        new = old
        if name in group.producers:
            new = _slice_out(new, idx)
        if name in group.depthwise:
            new = _slice_out(new, idx, depthwise=True)
        if name in group.norms:
            new = _slice_norm(new, idx)
        if name in group.consumers:
            new = _slice_in(new, idx, group.columns.get(name, 1))
        new.train(old.training)
        replace_everywhere(model, old, new)
    group.width = idx.numel()
