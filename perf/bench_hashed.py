"""Benchmark of the hashed linear (HashedNets) ``y = x @ W^T``, ``W[n, k] = sign(n, k)
w[bucket(n, k)]``, against dense and against building the virtual weight first.

Kernel name ``hashed_linear``; the shape carries ``B`` (the buckets: ``N K / 8`` and
``N K / 64``). Buckets are random; every provider is checked against ``F.linear`` on the virtual
weight before it is timed.

* ``cublas-dense`` / ``dense`` -- ``F.linear`` with a dense weight of the same shape (the
  ``speedup_vs_dense`` baseline: what the hashed layer stands in for),
* ``materialize`` -- the virtual weight built from ``w`` (the hash in int64 torch ops, the
  gather, the sign) then ``F.linear``: what a hashed layer costs without a kernel,
* ``ours`` -- the op as shipped (CUDA: the Triton kernel, the hash in registers; CPU: the
  virtual weight in row chunks, then ``F.linear``).

CUDA: fp16, N = K = 4096, M in {1, 16, 64, 256, 2048}. CPU: N = K = 1024, M in {1, 64}, fp32.

Roofline per call: ``2 M N K`` FLOPs; minimum bytes ``B e + M K e + M N e`` (the weight is
never read: it is computed).

    python -m compress_ops.perf.bench_hashed [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from compress_ops.perf import family
from compress_ops.perf.family import Case, logged, time_provider
from compress_ops.perf.machine import Env
from compress_ops.perf.schema import Peaks, Row, make_row
from compress_ops.perf.timing import Timer

KERNEL = "hashed_linear"
BASELINES = ("cublas-dense", "dense")
#: Buckets per weight of the benchmarked layers.
COMPRESSIONS = (1 / 8, 1 / 64)


def case_grid(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        ms = (1, 64) if quick else (1, 16, 64, 256, 2048)
        return family.grid(ms, ((4096, 4096),), (torch.float16,))
    if quick:
        return family.grid((1, 16), ((128, 192),), (torch.float32,))
    return family.grid((1, 64), ((1024, 1024),), (torch.float32,))


def dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    return family.dtypes_of(case_grid(device, quick))


def run(device: torch.device, env: Env, peaks: Peaks, *, quick: bool = False,
        log: Callable[[str], None] = print) -> Iterator[Row]:
    """Time every provider on every case; yields rows as they are measured."""
    import compress_ops  # noqa: F401  (registers the ops)
    from compress_ops.kernels.formats import hashed as hf

    cuda = device.type == "cuda"
    time_it = Timer.for_run(device, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    op = torch.ops.compress_ops.hashed_linear
    for c in case_grid(device, quick):
        m, n, k, dtype = c.m, c.n, c.k, c.dtype
        e = family.element_size(dtype)
        x = torch.randn(m, k, device=device, generator=gen).to(dtype)
        dense = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
        act = m * k * e + m * n * e
        t = time_it(lambda dense=dense, x=x: F.linear(x, dense))
        base = dict(kernel=KERNEL, dtype=dtype, env=env, peaks=peaks, flops=2.0 * m * n * k)
        for comp in COMPRESSIONS:
            b = hf.buckets_for(n, k, comp)
            # the dense row once per B (the baseline a row is compared with has its shape)
            yield logged(log, make_row(
                provider="cublas-dense" if cuda else "dense", median_us=t.median_us,
                min_bytes=n * k * e + act, backend="cuda" if cuda else "cpu-dense",
                samples=t.samples, p20_us=t.p20_us, p80_us=t.p80_us,
                note="dense weight (timed once per M)", shape={"M": m, "N": n, "K": k, "B": b},
                **base))
            w = (torch.randn(b, device=device, generator=gen) * k**-0.5).to(dtype)
            ref = F.linear(x, hf.hashed_weight(w, n, k, 7))
            common = dict(shape={"M": m, "N": n, "K": k, "B": b}, min_bytes=b * e + act, **base)
            yield logged(log, time_provider(
                lambda w=w, x=x, n=n, k=k: F.linear(x, hf.hashed_weight(w, n, k, 7)), x, ref,
                time_it,
                provider="materialize", backend="cuda" if cuda else "cpu",
                note=f"virtual weight built per call, 1/{round(1 / comp)}", **common))
            yield logged(log, time_provider(
                lambda w=w, x=x, n=n, k=k: op(x, w, None, n, k, 7, hf.HASH_VERSION), x, ref,
                time_it,
                provider="ours", backend="cuda" if cuda else "cpu",
                note=f"1/{round(1 / comp)} of the weights", **common))
        if cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Run only this family through :mod:`compress_ops.perf.bench` (same options)."""
    return family.run_alone("hashed", argv)


if __name__ == "__main__":
    raise SystemExit(main())
