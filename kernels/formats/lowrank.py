"""Low-rank factors: the stored form, byte counts and input checks (Triton-free).

A rank-``r`` linear stores ``u [N, r]`` and ``v [r, K]`` (``W ~ u @ v``), optionally a dense base
``weight [N, K]`` (a LoRA-shaped adapter on a frozen layer), all in the activation dtype: no
packing. N, K and r are at least 1 (the checks refuse an empty weight by name). The fused kernel
pads the rank to ``BLOCK_R`` (:func:`padded_rank`) on chip only. The kernel is
:mod:`compress_ops.kernels.lowrank`; the factorizations are :mod:`compress_ops.factorize`.
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats._common import (
    check_activation,
    check_companion,
    check_nonempty,
)

__all__ = ["MAX_RANK", "padded_rank", "lowrank_bytes", "check_inputs"]

MAX_RANK = 256  # the fused kernel's largest padded rank (a [BLOCK_M, 256] fp32 tile in registers)
_OP = "lowrank_linear"  # names the op in the empty-dimension errors


def padded_rank(r: int) -> int:
    """``BLOCK_R``: r rounded up to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (r - 1).bit_length())


def lowrank_bytes(n: int, k: int, r: int, dtype: torch.dtype) -> int:
    """Stored bytes of the factors ``U[N, r]`` and ``V[r, K]``: ``r (N + K)`` elements."""
    return r * (n + k) * dtype.itemsize


def _check_factor(t: object, name: str, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {shape_doc}, got shape {tuple(t.shape)}")


def check_inputs(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                 weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of a low-rank linear (the op
    accepts any rank r >= 1; the fused kernel's limit is :data:`MAX_RANK`). Rank 0 is refused
    naming it; N = 0 or K = 0 works (an empty result, or the bias), as ``F.linear`` does."""
    _check_factor(u, "u", "[N, r]")
    _check_factor(v, "v", "[r, K]")
    n, r = u.shape
    check_nonempty(_OP, ("r (u.shape[1])", r))
    if v.shape[0] != r:
        raise ValueError(f"u [N, r] and v [r, K] must share a rank r >= 1, got u "
                         f"{tuple(u.shape)} and v {tuple(v.shape)}")
    k = v.shape[1]
    if v.dtype != u.dtype:
        raise TypeError(f"v dtype {v.dtype} must match u dtype {u.dtype}")
    if v.device != u.device:
        raise ValueError(f"u on {u.device} but v on {v.device}")
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        if x.shape[-1] != k:
            raise ValueError(f"x last dim (K={x.shape[-1]}) must equal v.shape[1] (K={k})")
    if isinstance(x, torch.Tensor) and x.device != u.device:
        raise ValueError(f"x on {x.device} but u and v on {u.device}")
    check_activation(x, n, k, 1, u, "u", bias, where=_OP, empty_k=True)
    if weight is not None:
        check_companion(weight, "weight", (n, k), x, "x")
