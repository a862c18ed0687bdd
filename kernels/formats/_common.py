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
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({n},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"x on {x.device} but bias on {bias.device}")
