"""Custom ops (``torch.ops.compress_ops.*``): one per kernel, with fake impls and autograd.

Importing this package registers every op. One module per family: :mod:`.sparse24`,
:mod:`.dequant` (``dequant_linear``, ``codebook_linear``), :mod:`.lowrank`, :mod:`.dwsep_conv`,
:mod:`.w8a8`, :mod:`.hashed` (``hashed_linear`` and its backward's ``hashed_linear_t``,
``hashed_grad_w``);
the device routing they share (CPU paths and crossovers, the derived-weight cache, the lazy
import of the Triton launchers) is :mod:`.routing`; the autocast kernels of every op are
:mod:`.autocast`.
"""

from compress_ops.ops import autocast  # noqa: F401  (registers every op's autocast kernels)
from compress_ops.ops.dequant import codebook_linear, dequant_cpu_route, dequant_linear
from compress_ops.ops.dwsep_conv import dwsep_conv2d
from compress_ops.ops.hashed import hashed_grad_w, hashed_linear, hashed_linear_t
from compress_ops.ops.lowrank import lowrank_linear, lowrank_route
from compress_ops.ops.routing import cpu_backend, cpu_dense_cache
from compress_ops.ops.sparse24 import sparse24_linear
from compress_ops.ops.w8a8 import w8a8_linear, w8a8_route

__all__ = ["sparse24_linear", "dequant_linear", "codebook_linear", "lowrank_linear",
           "dwsep_conv2d", "w8a8_linear", "hashed_linear", "hashed_linear_t", "hashed_grad_w",
           "cpu_backend", "cpu_dense_cache", "dequant_cpu_route", "lowrank_route",
           "w8a8_route"]
