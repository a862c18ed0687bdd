"""What the ``bench_<family>`` modules share: the case of a linear family and its grid, the
reference check + timing of one provider, the progress log, and running one family alone.

A family module provides ``KERNEL``, ``BASELINES`` (dense providers), ``dtypes(device, quick)``
and ``run(device, env, peaks, quick=, log=) -> Iterator[Row]``; it times every provider with a
:class:`compress_ops.perf.timing.Timer` (``Timer.for_run(device, quick)``) and builds its rows
with :func:`compress_ops.perf.schema.make_row`, or :func:`time_provider` for a provider whose
output is first checked against the dense result.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from compress_ops.perf.schema import Row, make_row
from compress_ops.perf.timing import Timing


@dataclass(frozen=True)
class Case:
    """One point of a linear family: ``M`` activation rows times an ``N x K`` weight in
    ``dtype``; ``r`` is the rank of a low-rank case (``None`` for the others)."""

    m: int
    n: int
    k: int
    dtype: torch.dtype
    r: int | None = None


def grid(ms: Iterable[int], nks: Iterable[tuple[int, int]], dts: Iterable[torch.dtype],
         rs: Iterable[int | None] = (None,)) -> list[Case]:
    """Every combination, ordered by dtype, then (N, K), then R, then M (M varies fastest)."""
    ms, nks, rs = tuple(ms), tuple(nks), tuple(rs)
    return [Case(m, n, k, dt, r) for dt in dts for (n, k) in nks for r in rs for m in ms]


def dtypes_of(cases: Iterable[Case]) -> list[torch.dtype]:
    """The dtypes of ``cases``, each once (their matmul peaks are measured)."""
    return sorted({c.dtype for c in cases}, key=str)


def by_weight(cases: Iterable[Case]) -> dict[tuple[int, int, torch.dtype], list[int]]:
    """The Ms of each (N, K, dtype) in first-seen order: one weight is built per group."""
    groups: dict[tuple[int, int, torch.dtype], list[int]] = {}
    for c in cases:
        groups.setdefault((c.n, c.k, c.dtype), []).append(c.m)
    return groups


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` in fp32."""
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the ``with`` block, then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def time_provider(fn: Callable[[], torch.Tensor], x: torch.Tensor, ref: torch.Tensor,
                  time_it: Callable[[Callable[[], object]], Timing], *, provider: str,
                  backend: str, note: str | None, min_bytes: float, dtype: torch.dtype,
                  **common) -> Row:
    """Check one call against the dense result, then time it; errors become a null row."""
    try:
        y = fn()[: x.shape[0]]
        err = rel_err(y, ref)
        if not err <= TOL[dtype]:
            note = f"{note}; MISMATCH vs dense: rel err {err:.3g}" if note else "MISMATCH"
        t = time_it(fn)
    except Exception as ex:  # noqa: BLE001 - a failing provider must not stop the run
        msg = f"error: {type(ex).__name__}: {ex}"[:300]
        return make_row(provider=provider, median_us=None, min_bytes=min_bytes,
                        backend=backend, dtype=dtype,
                        note=f"{note}; {msg}" if note else msg, **common)
    return make_row(provider=provider, median_us=t.median_us, min_bytes=min_bytes,
                    backend=backend, dtype=dtype, samples=t.samples, note=note,
                    max_rel_err=err, p20_us=t.p20_us, p80_us=t.p80_us, **common)


def logged(log: Callable[[str], None], row: Row) -> Row:
    """Log one line for ``row`` (M, N, K of its shape, time, GB/s, note) and return it."""
    s = row.shape
    t = f"{row.median_us:10.1f} us" if row.median_us is not None else "         - us"
    gb = f"{row.gbps:8.1f} GB/s" if row.gbps is not None else ""
    log(f"  {row.kernel} {row.provider:<30} M={s['M']:<5} N={s['N']:<6} K={s['K']:<6} "
        f"{row.dtype:<9} {t} {gb}  {row.note or ''}")
    return row


def run_alone(family: str, argv: list[str] | None = None) -> int:
    """Run only ``family`` through :func:`compress_ops.perf.bench.main` (same options): the
    ``main`` of every ``bench_<family>`` module."""
    from compress_ops.perf import bench

    return bench.main(["--families", family, *(sys.argv[1:] if argv is None else argv)])
