"""What every format checks alike: the activation ``x[..., K]`` and the bias against a packed
weight, the optional tensors next to a reference, and the named refusal of an empty weight
dimension (:func:`check_nonempty`)."""

from __future__ import annotations

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_nonempty(where: str, *dims: tuple[str, int]) -> None:
    """``ValueError`` naming the first empty dimension of ``dims`` (``(name, size)`` pairs):
    ``"{where}: {name} must be >= 1, got {size}"``. A weight dimension (N, K, a rank, channels,
    row groups) is never empty; an empty batch (M = 0) is not checked here: it works."""
    for name, size in dims:
        if size < 1:
            raise ValueError(f"{where}: {name} must be >= 1, got {size}")


def check_activation(x: torch.Tensor, n: int, kp: int, k_unit: int, weight: torch.Tensor,
                     weight_name: str, bias: torch.Tensor | None, *, where: str,
                     empty_k: bool = False) -> None:
    """Named ``TypeError``/``ValueError`` for ``x[..., K]`` (``K >= 1`` unless ``empty_k``: an
    unpacked weight, where K = 0 is an empty product as in ``F.linear``; any batch, M = 0
    included) and ``bias[N]`` against a packed weight of ``N`` rows and padded width ``kp``
    (``K`` in ``(kp - k_unit, kp]``), whose floating tensor ``weight`` (named ``weight_name``)
    fixes the dtype and device. ``where`` (the op) prefixes the empty-K message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if not empty_k:
        check_nonempty(where, ("K (x.shape[-1])", x.shape[-1]))
    if weight.dtype != x.dtype:
        raise TypeError(f"{weight_name} dtype {weight.dtype} must match x dtype {x.dtype}")
    k = x.shape[-1]
    if not kp - k_unit < k <= kp:
        raise ValueError(f"x last dim (K={k}) does not match the packed weight: it holds "
                         f"Kp={kp} columns, so K must be in ({kp - k_unit}, {kp}]")
    if weight.device != x.device:
        raise ValueError(f"x on {x.device} but the packed weight on {weight.device}")
    if bias is not None:
        check_companion(bias, "bias", (n,), x, "x")


def check_companion(t: object, name: str, shape: tuple[int, ...] | None, ref: torch.Tensor,
                    ref_name: str) -> None:
    """Named errors unless the optional input ``t`` (given, not None) is a tensor of ``shape``
    (None: any) with the dtype and device of ``ref``: a bias, zero points, a base weight, a
    residual next to the tensor that fixes them."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} must be {tuple(shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{ref_name} on {ref.device} but {name} on {t.device}")
