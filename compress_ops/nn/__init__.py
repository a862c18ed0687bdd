"""Drop-in compressed modules."""

from compress_ops.nn.base import CompressedLinear
from compress_ops.nn.sparse24 import Sparse24Linear

__all__ = ["CompressedLinear", "Sparse24Linear"]
