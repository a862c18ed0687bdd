"""Device routing shared by every op: which path runs, the CPU crossovers, the derived-weight
cache and the lazy import of the Triton launchers.

* CUDA tensors run the Triton launcher of ``compress_ops.kernels.<family>`` (imported on first
  use: :func:`kernels`; the package imports without Triton).
* CPU tensors run the fastest correct CPU path that keeps memory compressed (decompress in row
  chunks of :data:`CPU_CHUNK_ELEMS` + ``F.linear``, or a native torch kernel where measured
  faster); ``COMPRESS_OPS_CPU_DENSE_CACHE=1`` trades memory for dense speed
  (:func:`cpu_dense_cache`); ``COMPRESS_OPS_CPU_BACKEND=triton`` routes them through the Triton
  kernel instead, which needs ``TRITON_INTERPRET=1`` (set by the tests without a GPU).
* ``COMPRESS_OPS_CPU_FP32_VIA_BF16=1`` (opt-in, :func:`cpu_fp32_via_bf16`) lets fp32
  activations take the native bf16 weight-only kernels on a bf16 copy of ``x``: several times
  faster, but outside the fp32 tolerance (see the function).

The CPU crossovers are data, not code: ``kernels/configs/cpu.json`` (read at import into
:data:`CPU_CHUNK_ELEMS` and :data:`NATIVE_MAX_M`), next to the GPU tables of every family.
"""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from compress_ops.kernels.tuning import load_tables

__all__ = ["cpu_backend", "use_triton", "kernels", "cpu_dense_cache", "cpu_fp32_via_bf16",
           "derived", "chunked_linear", "CPU_CHUNK_ELEMS", "INT8_CHUNK_BYTES", "NATIVE_MAX_M",
           "DERIVED"]


def _cpu_table() -> tuple[int, int, dict[tuple[int, torch.dtype], float]]:
    table = load_tables("cpu")
    native = {}
    for key, max_m in table["native_max_m"].items():
        bits, dtype = key.split("/")
        native[(int(bits), getattr(torch, dtype))] = float("inf") if max_m is None else max_m
    return int(table["chunk_elems"]), int(table["int8_chunk_bytes"]), native


#: Dense elements per row chunk when a CPU path decompresses a weight; int8 bytes per row chunk
#: of the native int8 route (converted to two's complement one chunk at a time); and the
#: largest M at which torch's native weight-only CPU kernels beat the other CPU paths, per
#: ``(bits, activation dtype)`` (``kernels/configs/cpu.json``).
CPU_CHUNK_ELEMS, INT8_CHUNK_BYTES, NATIVE_MAX_M = _cpu_table()


def kernels(family: str) -> ModuleType:
    """``compress_ops.kernels.<family>``, the Triton launchers, imported on first use."""
    return importlib.import_module(f"compress_ops.kernels.{family}")


def cpu_backend() -> str:
    """``"reference"`` (default) or ``"triton"``, from ``COMPRESS_OPS_CPU_BACKEND``."""
    backend = os.environ.get("COMPRESS_OPS_CPU_BACKEND", "reference")
    if backend not in ("reference", "triton"):
        raise ValueError(
            f"COMPRESS_OPS_CPU_BACKEND must be 'reference' or 'triton', got {backend!r}"
        )
    return backend


def use_triton(x: torch.Tensor) -> bool:
    if x.device.type == "cuda":
        return True
    if x.device.type == "cpu" and cpu_backend() == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "COMPRESS_OPS_CPU_BACKEND=triton runs the Triton kernel on CPU tensors, which "
                "needs TRITON_INTERPRET=1 set before triton is first imported"
            )
        return True
    return False



# (kind, id(first tensor)) -> (weakref to it, extra, snapshot of every input, derived object)
DERIVED: dict[tuple[str, int], tuple[weakref.ref, tuple, tuple, object]] = {}

_BITS_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as integers: ``torch.equal`` on them is bitwise (NaN == NaN,
    -0.0 != 0.0), which float equality is not. Read as int64 words where the bytes allow it
    (1.6x faster to compare than int32: 0.56 against 0.89 ms for 8 MiB on 2 cores)."""
    t = t.contiguous().reshape(-1)
    size = t.element_size()
    if size < 8 and (t.numel() * size) % 8 == 0 and (t.storage_offset() * size) % 8 == 0:
        return t.view(torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t = t.view(_BITS_OF[size])
    return t


def _unchanged(snapshot: tuple, tensors: tuple) -> bool:
    for old, new in zip(snapshot, tensors, strict=True):
        if old is None or new is None:
            if old is not new:
                return False
        elif (old.shape != new.shape or old.dtype != new.dtype or old.device != new.device
              or not torch.equal(_bits(old), _bits(new))):
            return False
    return True


def derived(kind: str, tensors: tuple[torch.Tensor | None, ...], extra: tuple,
            build: Callable[[], object]) -> object:
    """``build()``, computed once per packed weight (``tensors[0]`` and its companions) and
    served while their contents stay bitwise the same.

    Every call compares ``tensors`` with a snapshot taken when the entry was built (a full read
    of the packed bytes: ``torch.equal`` on their bits), so no edit can make it serve a stale
    result: in-place ops, ``copy_``, ``set_``, optimizer steps and ``load_state_dict`` bump the
    version counter, but edits through ``.data`` do not, so the counter alone is not enough.
    The snapshot costs one more copy of the packed tensors in memory, on top of the derived
    object. The entry is dropped when ``tensors[0]`` is freed. CPU only: the comparison returns
    a Python bool, which on a GPU would be a device sync per call.
    """
    owner = tensors[0]
    key = (kind, id(owner))
    entry = DERIVED.get(key)
    if (entry is not None and entry[0]() is owner and entry[1] == extra
            and _unchanged(entry[2], tensors)):
        return entry[3]
    with torch.no_grad():
        value = build()
        snapshot = tuple(None if t is None else t.detach().clone() for t in tensors)
    if entry is None or entry[0]() is not owner:
        weakref.finalize(owner, DERIVED.pop, key, None)
    DERIVED[key] = (weakref.ref(owner), extra, snapshot, value)
    return value


def cpu_dense_cache() -> bool:
    """``COMPRESS_OPS_CPU_DENSE_CACHE=1``: keep an unpacked dense copy per weight on the CPU.

    Off by default: it costs the dense weight's bytes in memory (fp16: 1.78x a 2:4 weight,
    3.8x an int4 g128 weight), which is what compression is meant to save. On, the CPU path
    runs at dense ``F.linear`` speed instead of decompressing the weight on every call.
    """
    return os.environ.get("COMPRESS_OPS_CPU_DENSE_CACHE", "0") == "1"


def cpu_fp32_via_bf16() -> bool:
    """``COMPRESS_OPS_CPU_FP32_VIA_BF16=1``: fp32 activations on the CPU take the native bf16
    weight-only kernels (int8 rows and int2/3/4 affine weights) on a bf16 copy of ``x``, and the
    result is cast back to fp32 (int2/3/4: with bf16 scales; int8: scaled in fp32).

    Off by default: it rounds ``x`` and the kernel's output (int2/3/4: also the scales) to bf16,
    so it is about as accurate as running the layer in bf16: its norm-relative error against
    float64 ``F.linear`` on the module's ``dense_weight()`` is within the op's bf16 tolerance
    (1.6e-2) and within 2x that of bf16 ``F.linear`` on the bf16-rounded ``x`` and weight
    (measured 1.6e-3..3.1e-3 on Gaussian layers, 4096 x 4096, zero-mean ``x``; about 1e-2 for
    asymmetric int2 g128 with activations of mean 2: measured 9.5e-3 and 1.0e-2), while the
    op's fp32 tolerance is ``1e-5 * sqrt(K)`` (6.4e-4 at K = 4096). At M = 1 there it runs at
    0.33-0.48x the time of dense fp32 ``F.linear``
    (``perf/results/2026-11-30-cpu-amd-epyc-lowbit-m1.json``). Up to the bf16 crossovers of
    :data:`NATIVE_MAX_M`; codebook weights are not affected.
    """
    return os.environ.get("COMPRESS_OPS_CPU_FP32_VIA_BF16", "0") == "1"


def chunked_linear(x: torch.Tensor, n: int, k_packed: int,
                    rows: Callable[[int, int], torch.Tensor],
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W[r0:r1] = rows(r0, r1)`` built (decompressed) one
    cache-sized row chunk at a time: the dense weight never exists whole."""
    step = max(64, CPU_CHUNK_ELEMS // k_packed)
    if n <= 2 * step:
        return F.linear(x, rows(0, n), bias)
    return torch.cat([F.linear(x, rows(r, min(r + step, n)),
                               None if bias is None else bias[r:r + step])
                      for r in range(0, n, step)], dim=-1)

