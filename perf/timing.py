"""Timing: the median time of a callable on the CPU or a CUDA device (with its 20th and 80th
percentiles), and the machine's peaks.

On CUDA ``triton.testing.do_bench`` (L2 flushed before every run, CUDA-event timed, the median
of all samples, at least :data:`MIN_SAMPLES`); on the CPU a ``time.perf_counter`` loop, median
of at least :data:`MIN_SAMPLES` runs (fewer, down to :data:`MIN_SAMPLES_SLOW`, for very slow
cases; the count is recorded in ``samples``). The 20th / 80th percentiles of the same samples
(:func:`quantile`, linear interpolation as ``torch.quantile``; what ``do_bench(quantiles=[0.5,
0.2, 0.8])`` reports) go into ``p20_us`` / ``p80_us``. :class:`Timer` is :func:`time_fn` with
a family run's settings, what every ``bench_<family>`` module times its providers with.

The peaks (``meta.peaks``, :class:`~compress_ops.perf.schema.Peaks`) are measured once per run
with the same timers: a large device-to-device copy for memory bandwidth and a large matmul of
each dtype for FLOP/s.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from compress_ops.perf.schema import Peaks, dtype_name

MIN_SAMPLES = 50
MIN_SAMPLES_SLOW = 10


@dataclass
class Timing:
    """Median time of a callable, how many samples it came from, and the 20th / 80th percentiles
    of those samples (``None`` when the samples are not known, e.g. an old Triton's median)."""

    median_us: float
    samples: int
    p20_us: float | None = None
    p80_us: float | None = None


def quantile(values: list[float], q: float) -> float:
    """The ``q``-quantile of ``values``, linear interpolation between the closest ranks (the
    default of ``torch.quantile`` and ``numpy.quantile``; ``do_bench(quantiles=...)`` uses it)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timing_of(times_s: list[float], scale: float) -> Timing:
    """:class:`Timing` of raw samples (``times_s * scale`` in us): median, count, p20, p80."""
    return Timing(median_us=statistics.median(times_s) * scale, samples=len(times_s),
                  p20_us=quantile(times_s, 0.2) * scale, p80_us=quantile(times_s, 0.8) * scale)


def time_fn(fn: Callable[[], Any], device: torch.device, *, max_seconds: float = 3.0,
            rep_ms: int = 100, warmup_ms: int = 25) -> Timing:
    """Median time of ``fn()`` on ``device``.

    CUDA: ``triton.testing.do_bench`` with ``return_mode="all"`` (L2 flushed before each run);
    ``rep_ms`` is raised until at least :data:`MIN_SAMPLES` samples are taken.
    CPU: ``time.perf_counter`` around each call, :data:`MIN_SAMPLES` runs, or as many as fit in
    ``max_seconds`` when a run is slow (never fewer than :data:`MIN_SAMPLES_SLOW`).
    """
    if device.type == "cuda":
        return _time_cuda(fn, rep_ms=rep_ms, warmup_ms=warmup_ms)
    return _time_cpu(fn, max_seconds=max_seconds)


def _time_cuda(fn: Callable[[], Any], *, rep_ms: int, warmup_ms: int) -> Timing:
    from triton.testing import do_bench

    rep = rep_ms
    times: list[float] = []
    for _ in range(4):
        try:
            out = do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="all")
        except (AssertionError, TypeError, ValueError):  # an old Triton without "all"
            med = do_bench(fn, warmup=warmup_ms, rep=max(rep, 500), return_mode="median")
            return Timing(median_us=float(med) * 1e3, samples=-1)
        times = [float(t) for t in (out.tolist() if hasattr(out, "tolist") else out)]
        if len(times) >= MIN_SAMPLES:
            break
        # do_bench sizes the sample count from a 5-run estimate: scale rep up to reach 50+.
        per = max(statistics.median(times), 1e-3)
        rep = int(max(rep * 2, per * MIN_SAMPLES * 1.5 + 1))
    return timing_of(times, 1e3)


def _time_cpu(fn: Callable[[], Any], *, max_seconds: float) -> Timing:
    t0 = time.perf_counter()
    fn()  # warm-up (first-call allocations, lazy init)
    first = time.perf_counter() - t0
    if first * 4 < max_seconds:
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        n = len(times)
        if n >= MIN_SAMPLES:
            break
        if n >= MIN_SAMPLES_SLOW and time.perf_counter() - t_start > max_seconds:
            break
    return timing_of(times, 1e6)


@dataclass(frozen=True)
class Timer:
    """:func:`time_fn` on one device with one CPU time budget per measurement: what a family
    benchmark calls as ``time_it(fn)``."""

    device: torch.device
    max_seconds: float = 3.0

    @classmethod
    def for_run(cls, device: torch.device, quick: bool) -> Timer:
        """The budget of a run: 0.3 s per measurement for ``--quick``, else 3 s (on the CPU a
        slow case then settles for fewer than :data:`MIN_SAMPLES` runs)."""
        return cls(device, 0.3 if quick else 3.0)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        return time_fn(fn, self.device, max_seconds=self.max_seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_bandwidth(device: torch.device, *, nbytes: int | None = None) -> float:
    """Measured memory bandwidth in GB/s: a large device-to-device copy, bytes = 2 * size.

    1 GiB on CUDA (far beyond L2), 256 MiB on the CPU (beyond the last-level cache). On the CPU
    a copy also pays write-allocate traffic that the 2 * size count does not see, so there the
    result is the larger of the copy and a read-only pass (a sum, bytes = size): memory-bound
    CPU kernels mostly read.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, max_seconds=2.0)
    gbps = 2 * src.numel() * 4 / (t.median_us * 1e-6) / 1e9
    if device.type == "cpu":
        t_read = time_fn(lambda: src.sum(), device, max_seconds=2.0)
        gbps = max(gbps, src.numel() * 4 / (t_read.median_us * 1e-6) / 1e9)
    return gbps


def measure_peak_flops(device: torch.device, dtype: torch.dtype, *, size: int | None = None
                       ) -> float:
    """Measured matmul TFLOP/s of ``dtype``: a square ``size``-cubed matmul (8192 on CUDA)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    out = torch.empty(size, size, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=out), device, max_seconds=3.0)
    return 2 * size**3 / (t.median_us * 1e-6) / 1e12


def measure_peaks(device: torch.device, dtypes: Iterable[torch.dtype], *, quick: bool = False
                  ) -> Peaks:
    """Bandwidth and per-dtype matmul peaks, measured once per run (smaller when ``quick``)."""
    if quick:
        nbytes = 64 << 20
        size = 2048 if device.type == "cuda" else 512
    else:
        nbytes, size = None, None
    hbm = measure_peak_bandwidth(device, nbytes=nbytes)
    flops = {dtype_name(d): measure_peak_flops(device, d, size=size) for d in dtypes}
    nb = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    sz = size or (8192 if device.type == "cuda" else 1024)
    how = "copy" if device.type == "cuda" else "max(copy, read-only sum)"
    method = (f"{how} of {nb >> 20} MiB (copy bytes = 2 x size); square matmul {sz}^3; "
              f"{'do_bench median' if device.type == 'cuda' else 'perf_counter median'}")
    _sync(device)
    return Peaks(hbm_gbps=hbm, flops_tflops=flops, method=method)
