"""Benchmark of W8A8 (8-bit weights and activations) ``y = Q(x) @ Q(W)^T`` against dense and
int8 weight-only.

Kernel name ``w8a8_linear``; the provider names the 8-bit type (``ours``: int8, ``ours-fp8``:
FP8 e4m3). Weights are random, quantized per output channel; the activations are quantized per
row inside the op. Each provider is checked against its own exact result before it is timed:
the W8A8 rows against the format's rule in float64 (:mod:`compress_ops.kernels.formats.w8a8`),
the weight-only row against ``F.linear`` on its dequantized weight.

CUDA (fp16; N = K = 8192, the static model's shape; M in {1, 16, 64, 2048}):

* ``cublas-dense`` -- ``F.linear`` with the fp16 weight (the ``speedup_vs_dense`` baseline),
* ``int8-weight-only`` -- ``compress_ops::dequant_linear`` on int8 per-row symmetric weights:
  the issue's small-M baseline (W8A8 must not be slower at M <= 16),
* ``cublas-int8-gemm`` -- ``torch._int_mm`` on activations quantized beforehand (no
  quantization, no epilogue: the int8 GEMM's own speed, M > 16 only),
* ``ours`` -- the op, int8; ``ours-fp8`` -- the op, FP8 (sm_89+; elsewhere the emulated route,
  named in the note).

CPU (N = K = 1024, M in {1, 64}, fp32 and bf16): ``dense``, ``ours`` (``torch._int_mm``),
``ours-fp8`` (emulated in float32).

Roofline per call: ``2 M N K`` FLOPs on 8-bit tensor cores; minimum bytes
``N K + M K e + M N e`` (+ ``N e`` scales).

    python -m compress_ops.perf.bench_w8a8 [--quick] [--device cpu|cuda] [--out PATH]
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

KERNEL = "w8a8_linear"
BASELINES = ("cublas-dense", "dense")


def case_grid(device: torch.device, quick: bool = False) -> list[Case]:
    """The cases."""
    if device.type == "cuda":
        ms = (1, 2048) if quick else (1, 16, 64, 2048)
        nk, dts = (8192, 8192), (torch.float16,)
    elif quick:
        ms, nk, dts = (1, 16), (256, 384), (torch.float32, torch.bfloat16)
    else:
        ms, nk, dts = (1, 64), (1024, 1024), (torch.float32, torch.bfloat16)
    return family.grid(ms, (nk,), dts)


def dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    return family.dtypes_of(case_grid(device, quick))


def run(device: torch.device, env: Env, peaks: Peaks, *, quick: bool = False,
        log: Callable[[str], None] = print) -> Iterator[Row]:
    """Time every provider on every case; yields rows as they are measured."""
    import compress_ops  # noqa: F401  (registers the ops)

    time_it = Timer.for_run(device, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    for c in case_grid(device, quick):
        x = torch.randn(c.m, c.k, device=device, generator=gen).to(c.dtype)
        w = (torch.randn(c.n, c.k, device=device, generator=gen) * c.k**-0.5).to(c.dtype)
        yield from _case(x, w, device, env, peaks, time_it, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _exact(x: torch.Tensor, qw: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The format's result, the sum in float64 (exact for int8)."""
    from compress_ops.kernels.formats import w8a8 as fmt

    q, s_x = fmt.quantize_activation(x, qw.dtype)
    acc = q.double() @ qw.double().t()
    return fmt.epilogue(acc, s_x, ws, None, x.dtype)


def _case(x: torch.Tensor, w: torch.Tensor, device: torch.device, env: Env, peaks: Peaks,
          time_it: Timer, log: Callable[[str], None]) -> Iterator[Row]:
    """Every provider of one (M, N, K, dtype) case."""
    from compress_ops.kernels.formats import w8a8 as fmt
    from compress_ops.ops.w8a8 import w8a8_route
    from compress_ops.quantize import quantize_affine

    cuda = device.type == "cuda"
    op = torch.ops.compress_ops.w8a8_linear
    (m, k), n, dtype = x.shape, w.shape[0], x.dtype
    e = family.element_size(dtype)
    act = m * k * e + m * n * e
    min_bytes = n * k + n * e + act

    common = dict(kernel=KERNEL, shape={"M": m, "N": n, "K": k}, dtype=dtype, env=env,
                  peaks=peaks, flops=2.0 * m * n * k)

    t = time_it(lambda: F.linear(x, w))
    yield logged(log, make_row(
        provider="cublas-dense" if cuda else "dense", median_us=t.median_us,
        min_bytes=n * k * e + act, backend="cuda" if cuda else "cpu-dense", samples=t.samples,
        p20_us=t.p20_us, p80_us=t.p80_us,
        note="fp weight", **common))
    if cuda:
        qa = quantize_affine(w, 8, None, symmetric=True, search_steps=0)
        wo = torch.ops.compress_ops.dequant_linear
        args = (qa.qweight, qa.scales, None, None, 8, qa.group_size)
        w_deq = (qa.qweight.view(torch.uint8).float() - 128) * qa.scales.float()
        yield logged(log, time_provider(
            lambda: wo(x, *args), x, F.linear(x.float(), w_deq).to(dtype), time_it,
            provider="int8-weight-only", min_bytes=n * k + n * e + act, backend="cuda",
            note="dequant_linear, int8 per row", **common))
    for qdtype, provider in ((torch.int8, "ours"), (torch.float8_e4m3fn, "ours-fp8")):
        qw, ws = fmt.quantize_weight(w, qdtype)
        ref = _exact(x, qw, ws)
        if cuda and qdtype == torch.int8 and m > 16:
            q, _ = fmt.quantize_activation(x, qdtype)
            yield logged(log, time_provider(
                lambda q=q, qw=qw: torch._int_mm(q, qw.t()), x,
                torch._int_mm(q, qw.t()).double(), time_it, provider="cublas-int8-gemm",
                min_bytes=n * k + m * k + 4 * m * n, backend="cuda",
                note="torch._int_mm on pre-quantized x (GEMM only)", **common))
        yield logged(log, time_provider(
            lambda qw=qw, ws=ws: op(x, qw, ws, None, None), x, ref, time_it,
            provider=provider, min_bytes=min_bytes, backend="cuda" if cuda else "cpu",
            note=f"route={w8a8_route(x, qw)}", **common))


def main(argv: list[str] | None = None) -> int:
    """Run only this family through :mod:`compress_ops.perf.bench` (same options)."""
    return family.run_alone("w8a8", argv)


if __name__ == "__main__":
    raise SystemExit(main())
