"""What every linear format checks alike: the activation ``x[..., K]`` and the bias against a
packed weight."""

from __future__ import annotations

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_activation(x: torch.Tensor, n: int, kp: int, k_unit: int, weight: torch.Tensor,
                     weight_name: str, bias: torch.Tensor | None) -> None:
    """Named ``TypeError``/``ValueError`` for ``x[..., K]`` and ``bias[N]`` against a packed
    weight of ``N`` rows and padded width ``kp`` (``K`` in ``(kp - k_unit, kp]``), whose
    floating tensor ``weight`` (named ``weight_name``) fixes the dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
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
