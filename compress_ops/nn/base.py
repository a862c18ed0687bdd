"""What every compressed module has in common."""

from __future__ import annotations

import torch
from torch import nn


class CompressedLinear(nn.Module):
    """Base of drop-in ``nn.Linear`` replacements.

    Subclasses hold their compressed weight as plain tensor buffers, call exactly one op in
    ``forward`` and implement :meth:`dense_weight` (the effective ``[out, in]`` weight, so
    ``F.linear(x, m.dense_weight(), m.bias)`` is the module's reference) and
    :meth:`stored_weight_bytes`.
    """

    kind: str = "compressed"
    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def stored_weight_bytes(self) -> int:
        """Bytes of the compressed weight as stored (every buffer but the bias)."""
        raise NotImplementedError

    def dense_weight_bytes(self) -> int:
        """Bytes the dense weight would take in the module's compute dtype."""
        return self.out_features * self.in_features * self.weight_dtype.itemsize

    @property
    def weight_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _check_in_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: x last dim is {x.shape[-1]}, expected "
                f"in_features={self.in_features}"
            )


def conv_padding(padding: str | tuple[int, int], kernel_size: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` amounts of a Conv2d's ``padding`` as its forward applies
    them (``'same'``: the extra pixel of an even total goes right / bottom, as nn.Conv2d)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel_size), strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    return (padding[1], padding[1], padding[0], padding[0])
