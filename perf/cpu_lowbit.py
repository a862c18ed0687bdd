"""The low-bit configs on the CPU at small M, against dense ``F.linear``, in one interleaved run.

Every default low-bit config (``QuantConfig()``: int4 g128 asymmetric; ``QuantConfig(bits=8,
group_size=None)`` asymmetric and symmetric; ``QuantConfig(bits=8)``: int8 g128;
``QuantConfig(bits=2)``; ``QuantConfig(bits=3)``; ``CodebookConfig(bits=4)``) compresses the same
Gaussian ``nn.Linear`` (N = K = 4096 by default), in fp32 and in bf16. Each module's forward
(the op as shipped: the route ``dequant_cpu_route`` picks) and dense ``F.linear`` are then timed
with cold caches (64 MiB read before every call, as a model's next layer finds them)
round-robin: one call of every (dtype, M, provider) per round, in a fresh random order every
round, until each has ``--reps`` clean samples, so a burst of load on the machine hits every
provider alike; every round first waits for a quiet second, and a call during which other
processes were charged more than one CPU tick (``/proc/stat``) is dropped. The median and the
10th/90th percentiles of the kept samples are reported. fp32 rows also run under
``COMPRESS_OPS_CPU_FP32_VIA_BF16=1`` (``... via-bf16`` providers: the opt-in that rounds x to
bf16).

Every provider is first checked against float64 ``F.linear`` on its module's
``dense_weight()`` (the op's reference); the norm-relative error is in the note
(``err=``), next to dense ``F.linear``'s own error in that dtype (``dense_err=``).

``--crossover`` instead times each affine format's native route against the route taken without
it (``kernels/configs/cpu.json``, ``native_max_m``) at M in {1, 2, 4, 8, 16, 64} (fp32 and
fp16: M = 1, 2; their native kernels take ~10x longer per row added).

Writes a results file (schema 1, ``compress_ops.perf.schema``; rows of kernel
``dequant_linear``) and prints a markdown table.

    python -m compress_ops.perf.cpu_lowbit [--n 4096] [--k 4096] [--ms 1,16] [--reps 30]
        [--dtypes float32,bfloat16] [--crossover] [--out PATH]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = "dequant_linear"
VIA_BF16 = "COMPRESS_OPS_CPU_FP32_VIA_BF16"


def configs() -> dict[str, object]:
    """Provider name -> config: every default low-bit config this benchmark covers."""
    import compress_ops as co

    return {
        "QuantConfig() [int4 g128 asym]": co.QuantConfig(),
        "QuantConfig(bits=8, group_size=None) [int8 row asym]":
            co.QuantConfig(bits=8, group_size=None),
        "QuantConfig(bits=8, group_size=None, symmetric=True) [int8 row sym]":
            co.QuantConfig(bits=8, group_size=None, symmetric=True),
        "QuantConfig(bits=8) [int8 g128 asym]": co.QuantConfig(bits=8),
        "QuantConfig(bits=2) [int2 g128 asym]": co.QuantConfig(bits=2),
        "QuantConfig(bits=3) [int3 g128 asym]": co.QuantConfig(bits=3),
        "CodebookConfig(bits=4)": co.CodebookConfig(bits=4),
    }


@dataclass
class Provider:
    """One timed call: a (dtype, M) case and what runs it."""

    name: str
    dtype: torch.dtype
    m: int
    fn: Callable[[], torch.Tensor]
    route: str
    stored_bytes: int
    err: float
    dense_err: float
    max_rel_err: float
    times: list[float]


def _route(module: nn.Module, x: torch.Tensor) -> str:
    from compress_ops.ops import dequant_cpu_route

    if hasattr(module, "qweight"):
        return dequant_cpu_route(x, module.qweight, module.zeros, module.bits, module.group_size)
    if hasattr(module, "indices"):
        return "codebook-gather"
    return "dense"


def _norm_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def build(n: int, k: int, dtypes: list[torch.dtype], ms: list[int], *, via_bf16: bool = True,
          names: list[str] | None = None, log: Callable[[str], None] = print
          ) -> list[Provider]:
    """Compress one Gaussian layer per dtype with every config; one provider per (dtype, M,
    config), plus dense and the fp32 via-bf16 opt-in."""
    from compress_ops.perf.family import env_var, rel_err

    cfgs = configs()
    if names:
        cfgs = {name: c for name, c in cfgs.items() if any(s in name for s in names)}
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    providers: list[Provider] = []
    for dtype in dtypes:
        dense = nn.Linear(k, n, bias=False).to(dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
        modules: dict[str, nn.Module] = {"dense": dense}
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            import compress_ops as co

            cls = co.nn.CodebookLinear if isinstance(cfg, co.CodebookConfig) else co.nn.QuantLinear
            modules[name] = cls.from_dense(dense, cfg)
            log(f"built {name} {dtype} in {time.perf_counter() - t0:.1f} s")
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(dtype)
            for name, mod in modules.items():
                variants = [(name, "0")]
                if via_bf16 and dtype == torch.float32 and name != "dense" and hasattr(
                        mod, "qweight"):
                    variants.append((f"{name} via-bf16", "1"))
                for pname, env in variants:
                    with env_var(VIA_BF16, env), torch.inference_mode():
                        route = _route(mod, x)
                        if env == "1" and not route.endswith("via-bf16"):
                            continue  # the opt-in does not change this one's route
                        y = mod(x)
                        wd = mod.weight if name == "dense" else mod.dense_weight()
                        ref = F.linear(x.double(), wd.double())
                        dense_y = F.linear(x, wd)

                    def fn(mod=mod, x=x, env=env) -> torch.Tensor:
                        with env_var(VIA_BF16, env), torch.inference_mode():
                            return mod(x)

                    stored = (n * k * dtype.itemsize if name == "dense"
                              else mod.stored_weight_bytes())
                    providers.append(Provider(
                        pname, dtype, m, fn, route, stored, _norm_rel(y, ref),
                        _norm_rel(dense_y, ref), rel_err(y, ref), []))
    return providers


def _ticks() -> tuple[int, int] | None:
    """(busy CPU ticks of the whole machine, steal included; ticks of this process), or None
    where ``/proc`` has neither."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], int(st[11]) + int(st[12])


@dataclass
class RoundStats:
    """How many round-robin rounds ran, and how many calls were kept and dropped."""

    rounds: int = 0
    kept: int = 0
    dropped: int = 0


def wait_quiet(window: float = 1.0, max_wait: float = 120.0) -> bool:
    """Wait (at most ``max_wait`` seconds) until the machine ran nothing else for ``window``
    seconds (at most one CPU tick charged to other processes); False if it never did."""
    deadline = time.monotonic() + max_wait
    while True:
        t0 = _ticks()
        time.sleep(window)
        t1 = _ticks()
        if t0 is None or t1 is None or (t1[0] - t0[0]) - (t1[1] - t0[1]) <= 1:
            return True
        if time.monotonic() > deadline:
            return False


#: Bytes read before every timed call to evict the CPU caches (2x the 32 MiB L3 of the machine
#: measured): each call reads its weight from memory, as layer after layer of a model does, and
#: not from a cache the previous call of the same weight left warm. Read, not written: dirty
#: lines would cost the next call their write-back.
FLUSH_BYTES = 64 << 20


def time_round_robin(providers: list[Provider], reps: int, *, max_rounds: int | None = None,
                     quiet: bool = True, flush: bool = True,
                     log: Callable[[str], None] = print) -> RoundStats:
    """Two warm-up calls each, then rounds of one call of every provider in a fresh random
    order, until every provider has ``reps`` clean samples (at most ``max_rounds`` rounds,
    default ``5 * reps``). The order matters: a call right after one that freed large buffers
    pays page faults for its own (measured +2 ms on a 7 ms call).

    A call is clean when other processes were charged at most one CPU tick while it ran
    (``/proc/stat`` minus this process; the two counts disagree by a tick now and then on an
    idle machine): on a shared machine the calls a burst of other work lands in are dropped,
    not averaged in. With ``quiet``, every round also waits for a second
    in which nothing else ran (:func:`wait_quiet`). Without ``/proc`` every call counts. With
    ``flush``, :data:`FLUSH_BYTES` are read before every call (not timed)."""
    scratch = torch.ones(FLUSH_BYTES // 4) if flush else None
    for p in providers:
        p.fn()
        p.fn()
    stats = RoundStats()
    max_rounds = max_rounds or 5 * reps
    order = list(providers)
    shuffle = random.Random(0).shuffle
    while (min(len(p.times) for p in providers) < reps and stats.rounds < max_rounds):
        if quiet and not wait_quiet():
            log("the machine was not quiet for 2 minutes: timing anyway")
        shuffle(order)  # what ran just before a call (allocator, caches) varies alike for all
        for p in order:
            if len(p.times) >= 2 * reps:  # enough: keep the round-robin, skip the timing
                continue
            if scratch is not None:
                scratch.sum()
            t0 = _ticks()
            start = time.perf_counter()
            p.fn()
            elapsed = time.perf_counter() - start
            t1 = _ticks()
            # the two counts are sampled apart: +-1 tick between them is accounting, not load
            if t0 is None or t1 is None or (t1[0] - t0[0]) - (t1[1] - t0[1]) <= 1:
                p.times.append(elapsed)
                stats.kept += 1
            else:
                stats.dropped += 1
        stats.rounds += 1
        if stats.rounds % 10 == 0:
            log(f"round {stats.rounds}: {stats.kept} calls kept, {stats.dropped} dropped; "
                f"fewest clean samples {min(len(p.times) for p in providers)}")
    short = [p.name for p in providers if len(p.times) < reps]
    if short:
        log(f"{len(short)} providers have fewer than {reps} clean samples: the machine was busy")
        if any(not p.times for p in providers):
            raise RuntimeError("a provider has no clean sample: other processes kept the "
                               "CPU busy")
    return stats


def _pct(ts: list[float], q: float) -> float:
    s = sorted(ts)
    return s[min(len(s) - 1, int(q * len(s)))]


def rows(providers: list[Provider], n: int, k: int) -> list:
    """Schema-1 rows (``compress_ops.perf.schema``), speedups against dense filled in."""
    from compress_ops.perf.machine import make_env
    from compress_ops.perf.schema import Peaks, fill_speedups, make_row

    env = make_env(torch.device("cpu"))
    peaks = Peaks(method="not measured (perf/cpu_lowbit.py times against dense F.linear)")
    out = []
    for p in providers:
        med = statistics.median(p.times) * 1e6
        e = p.dtype.itemsize
        note = (f"route={p.route}; p10={_pct(p.times, 0.1) * 1e3:.3f} ms, "
                f"p90={_pct(p.times, 0.9) * 1e3:.3f} ms; err={p.err:.2e} "
                f"(norm-relative vs float64 F.linear on dense_weight()), "
                f"dense_err={p.dense_err:.2e}")
        out.append(make_row(
            kernel=KERNEL, provider=p.name, shape={"M": p.m, "N": n, "K": k}, dtype=p.dtype,
            median_us=med, flops=2.0 * p.m * n * k,
            min_bytes=p.stored_bytes + p.m * k * e + p.m * n * e, env=env, peaks=peaks,
            backend="cpu-dense" if p.name == "dense" else "cpu", samples=len(p.times),
            note=note, max_rel_err=p.max_rel_err))
    fill_speedups(out, [p.name for p in providers if p.name.startswith("dense")])
    return out


def markdown(providers: list[Provider]) -> str:
    """One line per provider, one column per (dtype, M): median ms (x dense time), route."""
    cases = sorted({(p.dtype, p.m) for p in providers}, key=lambda c: (c[1], str(c[0])))
    names = list(dict.fromkeys(p.name for p in providers))
    by = {(p.name, p.dtype, p.m): p for p in providers}
    head = " | ".join(f"{str(d).removeprefix('torch.')}, M = {m}" for d, m in cases)
    lines = [f"| config | {head} |", "|---" * (len(cases) + 1) + "|"]
    for name in names:
        cells = []
        for d, m in cases:
            p = by.get((name, d, m))
            if p is None:
                cells.append("")
                continue
            med = statistics.median(p.times) * 1e3
            dense = statistics.median(by[("dense", d, m)].times) * 1e3
            spread = f"{_pct(p.times, 0.1) * 1e3:.2f}-{_pct(p.times, 0.9) * 1e3:.2f}"
            cell = f"{med:.2f} ({med / dense:.2f}x; {spread})"
            if name != "dense":
                cell += f" {p.route}, err {p.err:.1e}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Crossovers of the native routes
# --------------------------------------------------------------------------------------------

#: (label, bits, group_size, symmetric, dtype) of the crossovers measured
CROSSOVER_CASES = [
    ("int8 row asym", 8, None, False, torch.bfloat16),
    ("int8 row asym", 8, None, False, torch.float32),
    ("int8 row asym", 8, None, False, torch.float16),
    ("int4 g128 asym", 4, 128, False, torch.bfloat16),
    ("int4 g128 asym", 4, 128, False, torch.float32),
    ("int4 g128 asym", 4, 128, False, torch.float16),
    ("int2 g128 asym", 2, 128, False, torch.bfloat16),
    ("int3 g128 asym", 3, 128, False, torch.bfloat16),
]


def crossover(n: int, k: int, ms: list[int], dtypes: list[torch.dtype] | None = None,
              log: Callable[[str], None] = print) -> list[Provider]:
    """Per format and dtype, the native route against the route taken without it, at every M
    (round-robin over all of them)."""
    import compress_ops as co
    from compress_ops.ops import routing

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    providers = []
    for label, bits, group, sym, dtype in CROSSOVER_CASES:
        if dtypes and dtype not in dtypes:
            continue
        lin = nn.Linear(k, n, bias=False).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        mod = co.nn.QuantLinear.from_dense(lin, co.QuantConfig(bits, group, sym, search_steps=0))
        log(f"built {label} {dtype}")
        for m in (ms if dtype == torch.bfloat16 else [v for v in ms if v <= 2]):
            x = torch.randn(m, k, generator=gen).to(dtype)

            def dense_fn(lin=lin, x=x) -> torch.Tensor:
                with torch.inference_mode():
                    return F.linear(x, lin.weight)

            providers.append(Provider(f"dense [{label}]", dtype, m, dense_fn, "dense",
                                      n * k * dtype.itemsize, 0.0, 0.0, 0.0, []))
            for native in (True, False):
                table = {(bits, dtype): float("inf")} if native else {}

                def fn(mod=mod, x=x, table=table) -> torch.Tensor:
                    old = routing.NATIVE_MAX_M
                    routing.NATIVE_MAX_M = table
                    try:
                        with torch.inference_mode():
                            return mod(x)
                    finally:
                        routing.NATIVE_MAX_M = old

                old = routing.NATIVE_MAX_M
                routing.NATIVE_MAX_M = table
                try:
                    route = _route(mod, x)
                finally:
                    routing.NATIVE_MAX_M = old
                with torch.inference_mode():
                    y = fn()
                    ref = F.linear(x.double(), mod.dense_weight().double())
                providers.append(Provider(f"{label} {route}", dtype, m, fn, route,
                                          mod.stored_weight_bytes(), _norm_rel(y, ref), 0.0,
                                          0.0, []))
    return providers


def crossover_markdown(providers: list[Provider]) -> str:
    """One line per (format, dtype, route), one column per M: median ms."""
    ms = sorted({p.m for p in providers})
    keys = list(dict.fromkeys((p.name, p.dtype) for p in providers))
    by = {(p.name, p.dtype, p.m): p for p in providers}
    lines = ["| format, route | dtype | " + " | ".join(f"M = {m}" for m in ms) + " |",
             "|---|---|" + "---|" * len(ms)]
    for name, dtype in keys:
        cells = [f"{statistics.median(by[(name, dtype, m)].times) * 1e3:.2f}"
                 if (name, dtype, m) in by else "" for m in ms]
        lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from compress_ops.perf.machine import device_name, load_avg, make_env
    from compress_ops.perf.schema import Peaks, make_meta, results_path, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--ms", default=None, help="comma-separated M (default 1,16; crossover: "
                                               "1,2,4,8,16,64)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated (default float32,bfloat16; crossover: all three)")
    ap.add_argument("--reps", type=int, default=30,
                    help="clean samples per provider to collect (default 30)")
    ap.add_argument("--max-rounds", type=int, default=None,
                    help="stop after this many rounds (default 5 x reps)")
    ap.add_argument("--no-flush", action="store_true",
                    help="do not evict the caches before every call")
    ap.add_argument("--no-wait", action="store_true",
                    help="do not wait for a quiet second before every round")
    ap.add_argument("--only", default="", help="comma-separated substrings of config names")
    ap.add_argument("--no-via-bf16", action="store_true", help="skip the fp32 opt-in rows")
    ap.add_argument("--crossover", action="store_true",
                    help="time the native routes against the others at several M")
    ap.add_argument("--out", type=str, default=None, help="results file (default: "
                    "perf/results/<date>-<cpu>-lowbit[-crossover].json); '-' for none")
    args = ap.parse_args(argv)
    t_start = time.time()
    dev = torch.device("cpu")
    print(f"load average before: {load_avg()}")
    if args.crossover:
        ms = [int(v) for v in (args.ms or "1,2,4,8,16,64").split(",")]
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else None
        providers = crossover(args.n, args.k, ms, dtypes)
    else:
        ms = [int(v) for v in (args.ms or "1,16").split(",")]
        dtypes = [getattr(torch, d) for d in (args.dtypes or "float32,bfloat16").split(",")]
        providers = build(args.n, args.k, dtypes, ms, via_bf16=not args.no_via_bf16,
                          names=[s for s in args.only.split(",") if s])
    stats = time_round_robin(providers, args.reps, max_rounds=args.max_rounds,
                             quiet=not args.no_wait, flush=not args.no_flush)
    print(f"rounds: {stats.rounds}; calls kept: {stats.kept}, dropped: {stats.dropped}")
    table = crossover_markdown(providers) if args.crossover else markdown(providers)
    print(table)
    if args.out != "-":
        suffix = "lowbit-crossover" if args.crossover else "lowbit"
        path = args.out or results_path(f"{device_name(dev)} {suffix}")
        meta = make_meta(dev, make_env(dev), Peaks(method="not measured"),
                         argv=["python", "-m", "compress_ops.perf.cpu_lowbit",
                               *(sys.argv[1:] if argv is None else argv)],
                         duration_s=round(time.time() - t_start, 1),
                         complete=min(len(p.times) for p in providers) >= args.reps,
                         errors=[f"round-robin rounds: {stats.rounds}; calls kept "
                                 f"{stats.kept}, dropped {stats.dropped} (other processes were "
                                 "charged more than one CPU tick while they ran)"])
        print(f"wrote {write_results(path, meta, rows(providers, args.n, args.k))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
