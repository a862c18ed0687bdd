"""Benchmark of the low-rank linear ``y = (x @ V^T) @ U^T (+ x @ W0^T)`` against dense and unfused.

Kernel name ``lowrank_linear``; the shape carries ``R`` (the rank) and ``base`` (1 when a dense
base weight is added, the LoRA shape). Factors are random (``U [N, R]``, ``V [R, K]``); every
provider is checked against the float64-free ``F.linear`` composition before it is timed.

CUDA (fp16; N = K = 4096; R in {32, 128}; M in {1, 16, 64, 256, 2048}):

* ``cublas-dense`` -- ``F.linear`` with a full-rank fp16 weight (the ``speedup_vs_dense``
  baseline: what the factorized layer replaces),
* ``cublas-unfused`` -- ``F.linear(F.linear(x, V), U)``: two cuBLAS GEMMs, the issue's target
  baseline (fused must be >= 1.0x of it at every M, >= 1.3x at M <= 64),
* ``ours`` -- the op as shipped (the note says the route: the fused kernel up to the table's
  crossover M, else the unfused GEMMs),
* ``ours-fused`` / ``ours-recompute`` / ``ours-loop-n`` -- the kernel forced: planned grid,
  one N tile per program (recompute ``x @ V^T`` per tile), all of N in one program,
* with a base weight (R = 32): ``cublas-base-unfused`` (``F.linear(x, W0) + F.linear(F.linear(x,
  V), U)``) and ``ours-base-fused``.

CPU (N = K = 4096, R in {32, 128}, M in {1, 64}, fp32 and bf16): ``dense``, ``ours`` (the op:
the two GEMMs are the CPU path).

Roofline per call: ``2 M R (N + K)`` FLOPs (``+ 2 M N K`` with a base); minimum bytes
``R (N + K) e + M K e + M N e`` (``+ N K e``).

    python -m compress_ops.perf.bench_lowrank [--quick] [--device cpu|cuda] [--out PATH]
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

KERNEL = "lowrank_linear"
BASELINES = ("cublas-dense", "dense")


def case_grid(device: torch.device, quick: bool = False) -> list[Case]:
    """The cases (``r`` set: the rank)."""
    if device.type == "cuda":
        ms = (1, 64) if quick else (1, 16, 64, 256, 2048)
        nk, rs, dts = (4096, 4096), (32, 128), (torch.float16,)
    elif quick:
        ms, nk, rs, dts = (1, 16), (256, 384), (16,), (torch.float32, torch.bfloat16)
    else:
        ms, nk, rs, dts = (1, 64), (4096, 4096), (32, 128), (torch.float32, torch.bfloat16)
    return family.grid(ms, (nk,), dts, rs)


def dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    return family.dtypes_of(case_grid(device, quick))


def run(device: torch.device, env: Env, peaks: Peaks, *, quick: bool = False,
        log: Callable[[str], None] = print) -> Iterator[Row]:
    """Time every provider on every case; yields rows as they are measured."""
    import compress_ops  # noqa: F401  (registers the ops)

    cuda = device.type == "cuda"
    time_it = Timer.for_run(device, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    for c in case_grid(device, quick):
        m, n, k, r, dtype = c.m, c.n, c.k, c.r, c.dtype
        x = torch.randn(m, k, device=device, generator=gen).to(dtype)
        u = (torch.randn(n, r, device=device, generator=gen) * r**-0.5).to(dtype)
        v = (torch.randn(r, k, device=device, generator=gen) * k**-0.5).to(dtype)
        w = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
        for base in (False, True):
            if base and (not cuda or r != 32):
                continue
            yield from _case(x, u, v, w, base, device, env, peaks, time_it, log)
        if cuda:
            torch.cuda.empty_cache()


def _case(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, base: bool,
          device: torch.device, env: Env, peaks: Peaks, time_it: Timer,
          log: Callable[[str], None]) -> Iterator[Row]:
    """Every provider of one (M, N, K, R, dtype, base) case."""
    from compress_ops import ops as ops_mod
    from compress_ops.kernels import lowrank as lr
    from compress_ops.kernels.formats import lowrank as lrf

    cuda = device.type == "cuda"
    op = torch.ops.compress_ops.lowrank_linear
    (m, k), (n, r), dtype = x.shape, u.shape, x.dtype
    e = family.element_size(dtype)
    act = m * k * e + m * n * e
    common = dict(kernel=KERNEL, shape={"M": m, "N": n, "K": k, "R": r, "base": int(base)},
                  dtype=dtype, env=env, peaks=peaks,
                  flops=2.0 * m * r * (n + k) + (2.0 * m * n * k if base else 0.0))
    ref = F.linear(F.linear(x, v), u) + (F.linear(x, w) if base else 0)
    min_bytes = r * (n + k) * e + act + (n * k * e if base else 0)

    def row(fn, provider, backend, note=""):
        return logged(log, time_provider(
            fn, x, ref, time_it, provider=provider, min_bytes=min_bytes, backend=backend,
            note=note, **common))

    t = time_it(lambda: F.linear(x, w))
    yield logged(log, make_row(
        provider="cublas-dense" if cuda else "dense", median_us=t.median_us,
        min_bytes=n * k * e + act, backend="cuda" if cuda else "cpu-dense", samples=t.samples,
        p20_us=t.p20_us, p80_us=t.p80_us,
        note="full-rank weight" + (" (the base alone)" if base else ""), **common))
    if base:
        yield row(lambda: F.linear(x, w) + F.linear(F.linear(x, v), u), "cublas-base-unfused",
                  "cuda", "three GEMMs + add")
        cfg = lr.select_config(m, lrf.padded_rank(r), device)
        yield row(lambda: lr.lowrank_matmul(x, u, v, w), "ours-base-fused", "cuda",
                  f"config={cfg.name}")
        return
    if cuda:
        yield row(lambda: F.linear(F.linear(x, v), u), "cublas-unfused", "cuda", "two GEMMs")
    route = ops_mod.lowrank_route(x, u, None)
    yield row(lambda: op(x, u, v, None, None), "ours", "cuda" if cuda else "cpu",
              f"route={route}")
    if cuda:
        tile = lr.select_config(m, lrf.padded_rank(r), device)
        n_tiles = -(-n // tile.block_n)
        for provider, per in (("ours-fused", 0), ("ours-recompute", 1),
                              ("ours-loop-n", n_tiles)):
            cfg = tile.replace(n_per_program=per)
            p, s = lr.plan_grid(cfg, m, n, k, r, False, device)
            yield row(lambda cfg=cfg: lr.lowrank_matmul(x, u, v, config=cfg), provider,
                      "cuda", f"config={cfg.name} planned=({p},{s})")


def main(argv: list[str] | None = None) -> int:
    """Run only this family through :mod:`compress_ops.perf.bench` (same options)."""
    return family.run_alone("lowrank", argv)


if __name__ == "__main__":
    raise SystemExit(main())
