"""Benchmark of the 2:4 sparse linear op against dense and torch's semi-structured sparsity.

Cases (CUDA): M in {1, 16, 128, 2048}, (N, K) in {(4096, 4096), (8192, 8192), (11008, 4096)},
fp16 and bf16. Providers:

* ``ours`` -- ``torch.ops.compress_ops.sparse24_linear`` (the Triton kernel; the row's note
  names the config ``select_config`` picked),
* ``cublas-dense`` -- ``F.linear`` with the dense pruned weight (the speedup baseline),
* ``torch-semi-structured`` -- ``F.linear(x, to_sparse_semi_structured(W))`` with torch's
  default backend (cuSPARSELt where available), and ``torch-semi-structured-cutlass`` with
  ``_FORCE_CUTLASS``. torch pads ``x`` rows to its minimum internally (inside the timing); where
  that fails ``x`` is padded to a multiple of 64 rows outside the timing, and the note says so.
  A provider that cannot run gets a row with ``null`` timings and the reason in ``note``.

On the CPU (no GPU) a reduced set runs the CPU paths, labelled as such: ``ours`` with backend
``cpu-reference`` (the op's CPU path, unpack + ``F.linear``; ``cpu-interpreter`` if
``COMPRESS_OPS_CPU_BACKEND=triton``) against ``dense`` (backend ``cpu-dense``, ``F.linear``):
M in {1, 16, 128}, (N, K) in {(2048, 2048), (4096, 4096)}, fp32 and bf16.

Roofline per call: dense-equivalent FLOPs ``2 M N K``; minimum bytes = stored weight +
``M K e`` + ``M N e`` (``e`` = element size), with the stored weight ``sparse24_bytes`` for ours,
``N K e`` for dense and ``N K e / 2 + N K / 8`` (values + 2-bit indices) for semi-structured.

    python -m compress_ops.perf.bench_sparse24 [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from compress_ops.perf import family
from compress_ops.perf.family import Case, logged, time_provider
from compress_ops.perf.machine import Env
from compress_ops.perf.schema import Peaks, Row, make_row
from compress_ops.perf.timing import Timer

KERNEL = "sparse24_linear"
#: Providers whose time is the "dense" of ``speedup_vs_dense``.
BASELINES = ("cublas-dense", "dense")


def case_grid(device: torch.device, quick: bool = False) -> list[Case]:
    """The cases this device runs (see the module docstring)."""
    if device.type == "cuda":
        if quick:
            ms, nks, dts = (1, 128), ((4096, 4096),), (torch.float16,)
        else:
            ms = (1, 16, 128, 2048)
            nks = ((4096, 4096), (8192, 8192), (11008, 4096))
            dts = (torch.float16, torch.bfloat16)
    elif quick:
        ms, nks, dts = (1, 16), ((256, 512),), (torch.float32, torch.bfloat16)
    else:
        ms, nks, dts = (1, 16, 128), ((2048, 2048), (4096, 4096)), (torch.float32, torch.bfloat16)
    return family.grid(ms, nks, dts)


def dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    """Dtypes the run uses (their matmul peaks are measured)."""
    return family.dtypes_of(case_grid(device, quick))


def _import_op() -> tuple[Callable | None, str | None]:
    try:
        import compress_ops  # noqa: F401  (registers torch.ops.compress_ops)

        return torch.ops.compress_ops.sparse24_linear, None
    except Exception as e:  # noqa: BLE001 - report any failure in the rows
        return None, f"compress_ops op unavailable: {type(e).__name__}: {e}"


def _semi_structured(w: torch.Tensor, force_cutlass: bool) -> tuple[object, str]:
    """``to_sparse_semi_structured(w)`` with the given backend; returns (tensor, class name)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
    try:
        ws = to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old
    return ws, type(ws).__name__


def run(device: torch.device, env: Env, peaks: Peaks, *, quick: bool = False,
        log: Callable[[str], None] = print) -> Iterator[Row]:
    """Time every provider on every case; yields rows as they are measured."""
    from compress_ops.kernels.formats.sparse24 import pack_sparse24, prune_2to4, sparse24_bytes
    from compress_ops.kernels.sparse24 import HALF_DTYPES, select_config

    op, op_err = _import_op()
    cuda = device.type == "cuda"
    if cuda:
        ours_backend, dense_name, dense_backend = "cuda", "cublas-dense", "cuda"
    else:
        interp = os.environ.get("COMPRESS_OPS_CPU_BACKEND") == "triton"
        ours_backend = "cpu-interpreter" if interp else "cpu-reference"
        dense_name, dense_backend = "dense", "cpu-dense"

    time_it = Timer.for_run(device, quick)
    cases = case_grid(device, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    for (n, k, dtype), ms in family.by_weight(cases).items():
        e = family.element_size(dtype)
        w = torch.randn(n, k, device=device, dtype=torch.float32, generator=gen) * k**-0.5
        wp = prune_2to4(w.to(dtype))
        values, meta = pack_sparse24(wp)
        del w
        semi: list[tuple[str, object | None, str]] = []  # (provider, tensor, note)
        if cuda:
            semi = _make_semi(wp)
        ours_bytes = sparse24_bytes(n, k, dtype)
        semi_bytes = n * k * e // 2 + n * k // 8

        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).to(dtype)
            shape = {"M": m, "N": n, "K": k}
            flops = 2.0 * m * n * k
            act = m * k * e + m * n * e
            common = dict(kernel=KERNEL, shape=shape, dtype=dtype, flops=flops, env=env,
                          peaks=peaks)
            ref = F.linear(x, wp)

            # dense baseline
            t = time_it(lambda x=x, w=wp: F.linear(x, w))
            yield logged(log, make_row(
                provider=dense_name, median_us=t.median_us, min_bytes=n * k * e + act,
                backend=dense_backend, samples=t.samples, p20_us=t.p20_us, p80_us=t.p80_us,
                **common))

            # ours
            if op is None:
                yield logged(log, make_row(
                    provider="ours", median_us=None, min_bytes=ours_bytes + act,
                    backend=ours_backend, note=op_err, **common))
            else:
                note = None
                if ours_backend != "cpu-reference":  # the Triton kernel runs: name its config
                    try:
                        cfg = select_config(m, n, k, device, dtype in HALF_DTYPES)
                        note = f"config={cfg.name}"
                    except Exception as ex:  # noqa: BLE001
                        note = f"select_config failed: {type(ex).__name__}: {ex}"
                yield logged(log, time_provider(
                    lambda x=x, v=values, mt=meta: op(x, v, mt, None), x, ref, time_it,
                    provider="ours",
                    min_bytes=ours_bytes + act, backend=ours_backend, note=note, **common))

            if op is not None and not cuda and ours_backend == "cpu-reference":
                # the opt-in CPU route that keeps a dense copy per weight (memory for speed)
                with family.env_var("COMPRESS_OPS_CPU_DENSE_CACHE", "1"):
                    yield logged(log, time_provider(
                        lambda x=x, v=values, mt=meta: op(x, v, mt, None), x, ref, time_it,
                        provider="ours-dense-cache", min_bytes=n * k * e + act,
                        backend="cpu-dense-cache",
                        note="COMPRESS_OPS_CPU_DENSE_CACHE=1: holds a dense copy", **common))

            for provider, ws, snote in semi:
                if ws is None:
                    yield logged(log, make_row(
                        provider=provider, median_us=None, min_bytes=semi_bytes + act,
                        backend="cuda", note=snote, **common))
                    continue
                yield logged(log, _time_semi(provider, ws, snote, x, ref, time_it,
                                             min_bytes=semi_bytes + act, **common))
            del x, ref
        del wp, values, meta, semi
        if cuda:
            torch.cuda.empty_cache()

    if cuda and op is not None and not quick:
        # Last (a time limit cuts only these rows): the autotuned kernel on the fp16 cases, so a
        # GPU run also says which config wins per M bucket (the data for tuned defaults).
        yield from _autotuned(op, device, cases, time_it, env, peaks, log)


def _autotuned(op: Callable, device: torch.device, cases: list[Case], time_it: Timer,
               env: Env, peaks: Peaks, log: Callable[[str], None]) -> Iterator[Row]:
    from compress_ops.kernels import sparse24 as sp
    from compress_ops.kernels.formats import sparse24 as spf

    gen = torch.Generator(device=device).manual_seed(1)
    for c in (c for c in cases if c.dtype == torch.float16):
        e = family.element_size(c.dtype)
        w = torch.randn(c.n, c.k, device=device, generator=gen).to(c.dtype) * c.k**-0.5
        wp = spf.prune_2to4(w)
        values, meta = spf.pack_sparse24(wp)
        x = torch.randn(c.m, c.k, device=device, generator=gen).to(c.dtype)
        ref = F.linear(x, wp)
        common = dict(kernel=KERNEL, shape={"M": c.m, "N": c.n, "K": c.k}, dtype=c.dtype,
                      flops=2.0 * c.m * c.n * c.k, env=env, peaks=peaks)
        with family.env_var("COMPRESS_OPS_AUTOTUNE", "1"):
            try:
                # tunes once for this (M bucket, N, K, dtype); the op then reuses the choice
                note = f"autotuned config={sp.autotuned_config(x, values, meta, None).name}"
            except Exception as ex:  # noqa: BLE001
                note = f"autotune failed: {type(ex).__name__}: {ex}"[:300]
            yield logged(log, time_provider(
                lambda x=x, v=values, mt=meta: op(x, v, mt, None), x, ref, time_it,
                provider="ours-autotuned",
                min_bytes=spf.sparse24_bytes(c.n, c.k, c.dtype) + c.m * (c.k + c.n) * e,
                backend="cuda", note=note, **common))
        del w, wp, values, meta, x, ref


def _make_semi(wp: torch.Tensor) -> list[tuple[str, object | None, str]]:
    """Semi-structured copies of the pruned weight: torch's default backend, then CUTLASS."""
    out: list[tuple[str, object | None, str]] = []
    default_cls = None
    for provider, force in (("torch-semi-structured", False),
                            ("torch-semi-structured-cutlass", True)):
        try:
            ws, cls = _semi_structured(wp, force)
        except Exception as ex:  # noqa: BLE001 - record why it is unavailable
            out.append((provider, None, f"unavailable: {type(ex).__name__}: {ex}"[:300]))
            continue
        if force and cls == default_cls:
            continue  # the default already is CUTLASS: nothing new to time
        default_cls = default_cls or cls
        out.append((provider, ws, f"class={cls}"))
    return out


def _time_semi(provider: str, ws: object, note: str, x: torch.Tensor, ref: torch.Tensor,
               time_it: Timer, **common) -> Row:
    """Time ``F.linear(x, ws)``; pad x's rows (outside the timing) if torch refuses M."""
    try:
        F.linear(x, ws)
        xin = x
    except Exception as ex:  # noqa: BLE001
        m = x.shape[0]
        mp = -(-m // 64) * 64
        xin = torch.cat([x, x.new_zeros(mp - m, x.shape[1])]) if mp != m else x
        note += f"; unpadded M={m} failed ({type(ex).__name__}), x padded to {mp} rows"
    return time_provider(lambda: F.linear(xin, ws), x, ref, time_it, provider=provider,
                         backend="cuda", note=note, **common)


def main(argv: list[str] | None = None) -> int:
    """Run only this family through :mod:`compress_ops.perf.bench` (same options)."""
    return family.run_alone("sparse24", argv)


if __name__ == "__main__":
    raise SystemExit(main())
