"""Benchmark of the low-bit linears (int8 / int4 / int2 affine, 4-bit codebook) against dense.

One kernel name, ``dequant_linear``: the providers are the formats. Every weight is quantized
from the same Gaussian ``W`` (``compress_ops.quantize``), and every provider is checked against
``F.linear`` with its own dequantized weight before it is timed.

CUDA (fp16; M in {1, 4, 16, 128, 2048}; (N, K) in {(8192, 8192), (4096, 4096)}):

* ``cublas-dense`` -- ``F.linear`` with the fp16 weight (the speedup baseline),
* ``ours-int8`` (symmetric, one scale per row), ``ours-int4-g128`` (asymmetric),
  ``ours-int2-g128`` (asymmetric), ``ours-codebook4`` (one 16-entry table per layer) --
  the ops, i.e. the Triton kernels with the shipped configs (the note names the config),
* ``ours-int4-g128-autotuned`` (full runs) -- ``COMPRESS_OPS_AUTOTUNE=1``.

CPU (the issue's comparison; N = K = 4096, M in {1, 64}, fp32 and bf16):

* ``dense`` -- ``F.linear`` in the activation dtype (fp32 or bf16 weight),
* ``ours-int8`` / ``ours-int4-g128`` -- the ops as shipped (the note names the CPU route),
* ``torch-int8pack`` / ``torch-int4pack`` -- torch's native weight-only kernels called
  directly on pre-converted weights (``torch._weight_int8pack_mm``,
  ``torch._weight_int4pack_mm_for_cpu``),
* ``ours-int8-dequant`` / ``ours-int4-dequant`` -- the op with its native routes off (int4: the
  row-chunked dequantize + ``F.linear`` route; int8 rows: converted to the activation dtype in
  chunks, route ``int8-convert``; the note names it),
* ``ours-int4-dense-cache`` -- ``COMPRESS_OPS_CPU_DENSE_CACHE=1`` (holds a dense copy).

The CPU route rule (``compress_ops.ops.dequant_cpu_route``) must be within 10% of the best
compressed option of each case; these rows, and the crossovers of
``python -m compress_ops.perf.cpu_lowbit --crossover`` (every low-bit format, also asymmetric
int8 rows, int2 and int3), are the measurement behind it.

Roofline per call: ``2 M N K`` FLOPs; minimum bytes = stored weight (``affine_bytes`` /
``codebook_bytes``; ``N K e`` dense) + ``M K e + M N e``.

    python -m compress_ops.perf.bench_dequant [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import dequant as dqf
from compress_ops.perf import family
from compress_ops.perf.family import Case, logged, time_provider
from compress_ops.perf.machine import Env
from compress_ops.perf.schema import Peaks, Row, make_row
from compress_ops.perf.timing import Timer

KERNEL = "dequant_linear"
BASELINES = ("cublas-dense", "dense")

# provider -> (bits, group_size, symmetric); codebook providers: (bits, None, None)
FORMATS: dict[str, tuple[int, int | None, bool | None]] = {
    "ours-int8": (8, None, True),
    "ours-int4-g128": (4, 128, False),
    "ours-int2-g128": (2, 128, False),
    "ours-codebook4": (4, None, None),
}
CPU_FORMATS = ("ours-int8", "ours-int4-g128")


def case_grid(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        if quick:
            ms, nks, dts = (1, 128), ((4096, 4096),), (torch.float16,)
        else:
            ms, nks, dts = (1, 4, 16, 128, 2048), ((8192, 8192), (4096, 4096)), (torch.float16,)
    elif quick:
        ms, nks, dts = (1, 16), ((256, 512),), (torch.float32, torch.bfloat16)
    else:
        ms, nks, dts = (1, 64), ((4096, 4096),), (torch.float32, torch.bfloat16)
    return family.grid(ms, nks, dts)


def dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    return family.dtypes_of(case_grid(device, quick))


def _formats(w: torch.Tensor, names: tuple[str, ...]) -> dict[str, dict]:
    """Packed weights of ``w`` per provider: op args, stored bytes, the dense weight."""
    from compress_ops.quantize import encode_codebook, fit_codebook, quantize_affine

    n, k = w.shape
    out = {}
    for name in names:
        bits, group, sym = FORMATS[name]
        if sym is None:
            cb = fit_codebook([w], bits, iters=10)
            enc = encode_codebook(w, cb, bits)
            args = (enc.indices, enc.codebook, bits)
            out[name] = dict(op="codebook", args=args,
                             bytes=dqf.codebook_bytes(n, k, bits, 1, w.dtype),
                             dense=dqf.codebook_weight(enc.indices, enc.codebook, bits, k))
        else:
            a = quantize_affine(w, bits, group, symmetric=sym, search_steps=10)
            args = (a.qweight, a.scales, a.zeros, a.bits, a.group_size)
            out[name] = dict(op="dequant", args=args,
                             bytes=dqf.affine_bytes(n, k, bits, group, w.dtype, sym),
                             dense=dqf.dequantize(a.qweight, a.scales, a.zeros, bits,
                                                 a.group_size, k))
    return out


def _kp(fmt: dict) -> int:
    """Packed row width of a format's weight."""
    packed, bits = fmt["args"][0], fmt["args"][2 if fmt["op"] == "codebook" else 3]
    return dqf.packed_k(packed.shape[1], bits)


def _call(fmt: dict, x: torch.Tensor) -> torch.Tensor:
    if fmt["op"] == "codebook":
        idx, cb, bits = fmt["args"]
        return torch.ops.compress_ops.codebook_linear(x, idx, cb, None, bits)
    qw, s, z, bits, gs = fmt["args"]
    return torch.ops.compress_ops.dequant_linear(x, qw, s, z, None, bits, gs)


def run(device: torch.device, env: Env, peaks: Peaks, *, quick: bool = False,
        log: Callable[[str], None] = print) -> Iterator[Row]:
    """Time every provider on every case; yields rows as they are measured."""
    import compress_ops  # noqa: F401  (registers the ops)
    from compress_ops import ops as ops_mod
    from compress_ops.kernels import dequant as dq

    cuda = device.type == "cuda"
    time_it = Timer.for_run(device, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    for (n, k, dtype), ms in family.by_weight(case_grid(device, quick)).items():
        e = family.element_size(dtype)
        w = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
        fmts = _formats(w, tuple(FORMATS) if cuda else CPU_FORMATS)
        native = {} if cuda else _native_weights(fmts)
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen).to(dtype)
            act = m * k * e + m * n * e
            common = dict(kernel=KERNEL, shape={"M": m, "N": n, "K": k}, dtype=dtype,
                          flops=2.0 * m * n * k, env=env, peaks=peaks)
            t = time_it(lambda x=x, w=w: F.linear(x, w))
            yield logged(log, make_row(
                provider="cublas-dense" if cuda else "dense", median_us=t.median_us,
                min_bytes=n * k * e + act, backend="cuda" if cuda else "cpu-dense",
                samples=t.samples, p20_us=t.p20_us, p80_us=t.p80_us, **common))
            for name, fmt in fmts.items():
                ref = F.linear(x, fmt["dense"])
                if cuda:
                    cfg = dq.select_config(m, n, _kp(fmt), device)
                    note, backend = f"config={cfg.name}", "cuda"
                else:
                    qw, _, z, bits, gs = fmt["args"]
                    note, backend = f"route={ops_mod.dequant_cpu_route(x, qw, z, bits, gs)}", "cpu"
                yield logged(log, time_provider(
                    lambda x=x, f=fmt: _call(f, x), x, ref, time_it, provider=name,
                    min_bytes=fmt["bytes"] + act, backend=backend, note=note, **common))
                if not cuda:
                    yield from _cpu_alternatives(name, fmt, native, x, ref, time_it, act,
                                                 common, log)
            if cuda and not quick:
                fmt = fmts["ours-int4-g128"]
                with family.env_var("COMPRESS_OPS_AUTOTUNE", "1"):
                    qw, s, z, bits, gs = fmt["args"]
                    tuned = dq.autotuned_config(dq.MODE_ASYM, x, qw, s, z, None, bits, gs)
                    note = f"autotuned config={tuned.name}"
                    yield logged(log, time_provider(
                        lambda x=x, f=fmt: _call(f, x), x, F.linear(x, fmt["dense"]), time_it,
                        provider="ours-int4-g128-autotuned", min_bytes=fmt["bytes"] + act,
                        backend="cuda", note=note, **common))
            del x
        del w, fmts, native
        if cuda:
            torch.cuda.empty_cache()


def _native_weights(fmts: dict[str, dict]) -> dict[str, tuple]:
    """torch's native CPU weight formats, converted once (outside the timings)."""
    from compress_ops.ops import dequant as ops_dq

    out: dict[str, tuple] = {}
    if "ours-int8" in fmts:
        qw, s, _, _, _ = fmts["ours-int8"]["args"]
        out["ours-int8"] = (ops_dq.native_int8_weight(qw), s[:, 0].contiguous())
    if "ours-int4-g128" in fmts:
        qw, s, z, _, gs = fmts["ours-int4-g128"]["args"]
        out["ours-int4-g128"] = (*ops_dq.native_int4_weight(qw, s, z, s.dtype), gs)
    return out


def _cpu_alternatives(name: str, fmt: dict, native: dict, x: torch.Tensor, ref: torch.Tensor,
                      time_it: Timer, act: int, common: dict, log) -> Iterator[Row]:
    """The other CPU options for the same weight: torch's native kernel, the forced dequant
    route, the dense cache (int4 only)."""
    from compress_ops.ops import routing

    bits = fmt["args"][3]
    if name in native:
        if bits == 8:
            w8, s = native[name]
            fn = lambda x=x: torch._weight_int8pack_mm(x, w8, s)  # noqa: E731
            provider = "torch-int8pack"
        else:
            packed, sz, gs = native[name]
            fn = lambda x=x: torch._weight_int4pack_mm_for_cpu(x, packed, gs, sz)  # noqa: E731
            provider = "torch-int4pack"
        yield logged(log, time_provider(
            fn, x, ref, time_it, provider=provider, min_bytes=fmt["bytes"] + act, backend="cpu",
            note="pre-converted weight (+1x the packed bytes)", **common))
    from compress_ops.ops import dequant_cpu_route

    old = routing.NATIVE_MAX_M
    routing.NATIVE_MAX_M = {}
    try:
        qw, _, z, _, gs = fmt["args"]
        note = f"route={dequant_cpu_route(x, qw, z, bits, gs)} (native routes off)"
        yield logged(log, time_provider(
            lambda x=x: _call(fmt, x), x, ref, time_it, provider=f"{name}-dequant",
            min_bytes=fmt["bytes"] + act, backend="cpu", note=note, **common))
    finally:
        routing.NATIVE_MAX_M = old
    if bits == 4:
        with family.env_var("COMPRESS_OPS_CPU_DENSE_CACHE", "1"):
            yield logged(log, time_provider(
                lambda x=x: _call(fmt, x), x, ref, time_it, provider=f"{name}-dense-cache",
                min_bytes=x.shape[1] * ref.shape[1] * x.element_size() + act,
                backend="cpu-dense-cache", note="holds a dense copy", **common))


def main(argv: list[str] | None = None) -> int:
    """Run only this family through :mod:`compress_ops.perf.bench` (same options)."""
    return family.run_alone("dequant", argv)


if __name__ == "__main__":
    raise SystemExit(main())
