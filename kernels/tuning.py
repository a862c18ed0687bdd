"""Launch configs shared by every linear-kernel family: the config record, M bucketing, tuned
default tables (``configs/<family>.json``, one table per GPU name plus ``default``), split-K
sizing and the optional autotuner. Triton-free at import (the autotuner imports its timer), so
the CPU routes can read the tables on machines without Triton."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
MIN_BLOCK_K = 32  # every family's packed K unit (one 2:4 metadata word, one b-bit word group)
SPLIT_K_MAX_M = 64  # select_config adds split-K only up to here (the audited epilogues)
# the activation dtypes by the short names the audit, the static model and results files use
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                  "fp32": torch.float32}


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one path. ``block_k`` counts dense columns for both paths."""

    path: str  # "gemv" (no tensor cores, small M) or "gemm" (tl.dot tiles)
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1

    def __post_init__(self) -> None:
        if self.path not in ("gemv", "gemm"):
            raise ValueError(f"path must be 'gemv' or 'gemm', got {self.path!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps", "group_m", "split_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block_k < MIN_BLOCK_K:
            raise ValueError(f"block_k must be >= {MIN_BLOCK_K}, got {self.block_k}")
        if self.path == "gemm" and self.block_m < 16:
            raise ValueError("gemm path needs block_m >= 16 (tl.dot)")

    @property
    def name(self) -> str:
        s = (f"{self.path}_m{self.block_m}n{self.block_n}k{self.block_k}"
             f"w{self.num_warps}s{self.num_stages}")
        return s + (f"sk{self.split_k}" if self.split_k > 1 else "")

    def with_split_k(self, split_k: int) -> KernelConfig:
        return KernelConfig(**{**self.__dict__, "split_k": split_k})


def m_bucket(m: int) -> int:
    """Next power of two of M (>= 1): the key for configs and autotuning."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


@functools.cache
def load_tables(family: str) -> dict:
    """``configs/<family>.json``: ``{gpu name or "default": table}``."""
    return json.loads((CONFIG_DIR / f"{family}.json").read_text())


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a launch configures itself for: its name (the config table's key) and its
    multiprocessor count (split-K sizing)."""

    name: str
    sms: int


_SIMULATED: GpuTarget | None = None


@contextlib.contextmanager
def simulate_gpu(name: str = "NVIDIA H200", sms: int = 132) -> Iterator[GpuTarget]:
    """Launchers called with CPU tensors inside this block configure themselves as on this
    GPU: the static performance model (``perf/static_perf.py``) reads the exact launch a real
    call gets on a machine without one (with :func:`compress_ops.kernels.launches.capture`)."""
    global _SIMULATED
    prev, _SIMULATED = _SIMULATED, GpuTarget(name, sms)
    try:
        yield _SIMULATED
    finally:
        _SIMULATED = prev


@functools.lru_cache(maxsize=64)
def _cuda_target(device: torch.device) -> GpuTarget:
    props = torch.cuda.get_device_properties(device)
    return GpuTarget(props.name, props.multi_processor_count)


def gpu_target(device: torch.device) -> GpuTarget | None:
    """The GPU a launch on ``device`` configures for; ``None`` for the Triton interpreter."""
    if device.type == "cuda":
        return _cuda_target(device)
    return _SIMULATED


def device_name(device: torch.device) -> str:
    target = gpu_target(device)
    return target.name if target is not None else "interpreter"


def device_table(family: str, device: torch.device) -> dict:
    """The GPU's own table if shipped, else ``default``."""
    tables = load_tables(family)
    return tables.get(device_name(device), tables["default"])


def table_config(table: dict, m: int) -> KernelConfig:
    """The table's config for M: the GEMV entry of M's bucket up to ``gemv_max_m``, else the
    GEMM entry of the smallest bucket >= M's (the largest one past the end)."""
    bucket = m_bucket(m)
    if m <= table["gemv_max_m"]:
        gemv = table["gemv"]
        keys = sorted(int(b) for b in gemv)
        key = next((b for b in keys if b >= bucket), keys[-1])
        return KernelConfig(path="gemv", **gemv[str(key)])
    keys = sorted(int(b) for b in table["gemm"])
    key = next((b for b in keys if b >= bucket), keys[-1])
    return KernelConfig(path="gemm", **table["gemm"][str(key)])


def auto_split_k(cfg: KernelConfig, m: int, n: int, kp: int, device: torch.device,
                 min_k_tiles: int = 4) -> KernelConfig:
    """Raise split-K when the M x N tile grid would leave more than a tenth of the GPU's
    multiprocessors idle (skinny problems, CUDA only, ``m <= SPLIT_K_MAX_M``); each split keeps
    at least ``min_k_tiles`` K tiles. A grid that fills 90% of the SMs is not split: split-K
    costs two more launches (the fp32 workspace fill and the cast) for at most a tenth more
    SMs. A config that already sets split-K is kept."""
    target = gpu_target(device)
    if cfg.split_k != 1 or target is None or m > SPLIT_K_MAX_M:
        return cfg
    sms = target.sms
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    k_tiles = -(-kp // cfg.block_k)
    split = 1
    while tiles * split * 10 < sms * 9 and split * 2 <= min(16, k_tiles // min_k_tiles):
        split *= 2
    return cfg.with_split_k(split) if split > 1 else cfg


_TUNED: dict[Hashable, KernelConfig] = {}


def autotune(key: Hashable, configs: list[KernelConfig],
             launch: Callable[[KernelConfig], object]) -> KernelConfig:
    """Time ``launch(cfg)`` for every candidate once per ``key``; keep the fastest."""
    if key not in _TUNED:
        from triton.testing import do_bench  # only when autotuning: this module is Triton-free

        timings = []
        for cfg in configs:
            try:
                ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
            except Exception:  # a config that does not fit this GPU (shared memory) is skipped
                continue
            timings.append((ms, cfg))
        if not timings:
            raise RuntimeError(f"autotune: no candidate config ran for {key}")
        _TUNED[key] = min(timings, key=lambda t: t[0])[1]
    return _TUNED[key]
