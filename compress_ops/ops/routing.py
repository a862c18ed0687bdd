"""Device routing shared by every op: which path runs, the CPU crossovers, the derived-weight
cache and the lazy import of the Triton launchers.

* CUDA tensors run the Triton launcher of ``compress_ops.kernels.<family>`` (imported on first
  use: :func:`kernels`; the package imports without Triton).
* CPU tensors run the fastest correct CPU path that keeps memory compressed (decompress in row
  chunks of :data:`CPU_CHUNK_ELEMS` + ``F.linear``, or a native torch kernel where measured
  faster); ``COMPRESS_OPS_CPU_DENSE_CACHE=1`` trades memory for dense speed
  (:func:`cpu_dense_cache`); ``COMPRESS_OPS_CPU_BACKEND=triton`` routes them through the Triton
  kernel instead, which needs ``TRITON_INTERPRET=1`` (set by the tests without a GPU).

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

__all__ = ["cpu_backend", "use_triton", "kernels", "cpu_dense_cache", "derived",
           "chunked_linear", "CPU_CHUNK_ELEMS", "NATIVE_MAX_M", "DERIVED"]


def _cpu_table() -> tuple[int, dict[tuple[int, torch.dtype], float]]:
    table = load_tables("cpu")
    native = {}
    for key, max_m in table["native_max_m"].items():
        bits, dtype = key.split("/")
        native[(int(bits), getattr(torch, dtype))] = float("inf") if max_m is None else max_m
    return int(table["chunk_elems"]), native


#: Dense elements per row chunk when a CPU path decompresses a weight; and the largest M at
#: which torch's native weight-only CPU kernels beat dequantize + ``F.linear``, per
#: ``(bits, activation dtype)`` (``kernels/configs/cpu.json``).
CPU_CHUNK_ELEMS, NATIVE_MAX_M = _cpu_table()


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



# (kind, id(first tensor)) -> (weakref to it, stamp of every input, derived object)
DERIVED: dict[tuple[str, int], tuple[weakref.ref, tuple, object]] = {}


def tensor_stamp(t: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's current contents: storage, view, dtype and, where tracked,
    the version counter (``.data`` swaps change the pointer, in-place ops the version).
    Inference tensors have no version counter; they cannot be changed in place outside
    ``torch.inference_mode``."""
    if t is None:
        return None
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, version)


def derived(kind: str, tensors: tuple[torch.Tensor | None, ...], extra: tuple,
             build: Callable[[], object]) -> object:
    """``build()``, computed once per packed weight (``tensors[0]`` and its companions) and kept
    while ``tensors[0]`` lives.

    The entry is rebuilt when any of ``tensors`` (or ``extra``) change (see
    :func:`_tensor_stamp`) and dropped when ``tensors[0]`` is freed. Used only by the
    measured/opt-in routes below, each of which says what the entry costs in memory.
    """
    owner = tensors[0]
    key = (kind, id(owner))
    stamp = (tuple(tensor_stamp(t) for t in tensors), extra)
    entry = DERIVED.get(key)
    if entry is None or entry[0]() is not owner or entry[1] != stamp:
        with torch.no_grad():
            derived = build()
        if entry is None or entry[0]() is not owner:
            weakref.finalize(owner, DERIVED.pop, key, None)
        entry = (weakref.ref(owner), stamp, derived)
        DERIVED[key] = entry
    return entry[2]


def cpu_dense_cache() -> bool:
    """``COMPRESS_OPS_CPU_DENSE_CACHE=1``: keep an unpacked dense copy per weight on the CPU.

    Off by default: it costs the dense weight's bytes in memory (fp16: 1.78x a 2:4 weight,
    3.8x an int4 g128 weight), which is what compression is meant to save. On, the CPU path
    runs at dense ``F.linear`` speed instead of decompressing the weight on every call.
    """
    return os.environ.get("COMPRESS_OPS_CPU_DENSE_CACHE", "0") == "1"

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

