"""Drop-in compressed modules."""

from compress_ops.nn.base import CompressedLinear
from compress_ops.nn.dwsep import FusedDWSepConv2d
from compress_ops.nn.lowrank import LowRankConv2d, LowRankLinear
from compress_ops.nn.quant import CodebookLinear, QuantLinear
from compress_ops.nn.sparse24 import Sparse24Linear

__all__ = ["CompressedLinear", "CodebookLinear", "FusedDWSepConv2d", "LowRankConv2d",
           "LowRankLinear", "QuantLinear", "Sparse24Linear"]
