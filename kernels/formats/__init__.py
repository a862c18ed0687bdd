"""The packed formats of every family, in plain torch (no Triton): layouts, packing and
unpacking, dequantization, byte counts and the named checks of packed inputs.

``import compress_ops`` and every CPU path need only this subpackage, so the package imports
and runs on machines without Triton. One module per family, named as the family is everywhere
else: :mod:`.sparse24`, :mod:`.dequant` (affine low-bit and codebook), :mod:`.lowrank`,
:mod:`.dwsep_conv`.
"""

from compress_ops.kernels.formats._common import ACT_DTYPES

__all__ = ["ACT_DTYPES"]
