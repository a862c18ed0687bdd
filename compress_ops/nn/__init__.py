"""Drop-in compressed modules, one file per family: :mod:`.sparse24`, :mod:`.dequant`
(``QuantLinear``, ``CodebookLinear``), :mod:`.lowrank`, :mod:`.dwsep_conv`, :mod:`.w8a8`
(``W8A8Linear``), :mod:`.hashed` (``HashedLinear``), :mod:`.shared_conv`
(``SharedFilterConv2d``); their common base is :mod:`.base`."""

from compress_ops.nn.base import CompressedLinear, CompressedModule
from compress_ops.nn.dequant import CodebookLinear, QuantLinear
from compress_ops.nn.dwsep_conv import FusedDWSepConv2d
from compress_ops.nn.hashed import HashedLinear
from compress_ops.nn.lowrank import LowRankConv2d, LowRankLinear
from compress_ops.nn.shared_conv import SharedFilterConv2d
from compress_ops.nn.sparse24 import Sparse24Linear
from compress_ops.nn.w8a8 import W8A8Linear

__all__ = ["CompressedLinear", "CompressedModule", "CodebookLinear", "FusedDWSepConv2d",
           "HashedLinear", "LowRankConv2d", "LowRankLinear", "QuantLinear", "SharedFilterConv2d",
           "Sparse24Linear", "W8A8Linear"]
