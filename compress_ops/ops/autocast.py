"""Autocast for every op: under ``torch.autocast(device, dtype)`` an op runs in the autocast
``dtype``, as ``F.linear`` / ``F.conv2d`` do.

Each op gets a kernel for the ``AutocastCPU`` and ``AutocastCUDA`` dispatch keys that casts its
floating-point tensor arguments (the activation, and the stored scales, zeros, codebooks,
factors, 2:4 values, fused conv weights and biases, W8A8 scales, hashed buckets) to the
context's dtype, then calls the op again below autocast. Packed integer tensors (``qweight``,
``indices``, 2:4 ``meta``) and stored FP8 levels are left as they are. The cast of the stored
tensors happens on every call (one elementwise copy of each, a few bytes per weight: scales and
zeros are
``N * K / group`` values, factors ``r (N + K)``); a model that always runs in one dtype is
cheaper converted once with ``.to(dtype)``. ``torch.library.register_autocast`` fixes one
dtype per device; these kernels read the context's instead (fp16 and bf16 alike).
"""

from __future__ import annotations

import torch

import compress_ops.ops.dequant  # noqa: F401  (the ops must exist before their kernels)
import compress_ops.ops.dwsep_conv  # noqa: F401
import compress_ops.ops.hashed  # noqa: F401
import compress_ops.ops.lowrank  # noqa: F401
import compress_ops.ops.sparse24  # noqa: F401
import compress_ops.ops.w8a8  # noqa: F401

__all__ = ["OPS"]

OPS = ("sparse24_linear", "dequant_linear", "codebook_linear", "lowrank_linear", "dwsep_conv2d",
       "w8a8_linear", "hashed_linear")
#: Floating-point types that hold stored levels, not values to compute in: never cast.
STORED_FLOATS = (torch.float8_e4m3fn,)
_LIB = torch.library.Library("compress_ops", "IMPL")
_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA)


def _kernel(name: str, device_type: str):
    op = getattr(torch.ops.compress_ops, name).default

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype \
                    and a.dtype not in STORED_FLOATS and a.device.type == device_type:
                return a.to(dtype)
            return a

        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST):
            return op(*(cast(a) for a in args))

    return kernel


for _name in OPS:
    for _device in ("cpu", "cuda"):
        _LIB.impl(_name, _kernel(_name, _device), "Autocast" + _device.upper(),
                  with_keyset=True)
