"""Why the low-bit kernels miss the static model on a GPU: one prepared diagnostic run.

The first GPU run (perf/results/2026-11-30-quick-nvidia-h200.json, or its log) measured every
low-bit case at M = 1 and 16 at about 35-45 us as a CUDA-graph replay whatever its width
(int2 16 MiB, int4 32 MiB, int8 64 MiB of weights at N = K = 8192), where the static model
predicted 7-15 us, and eager calls 100-300 us above the graph replay. This script measures
what separates the candidate causes, each row written to the JSON as soon as it is measured:

- ``sweep``: forced configs (stages, BLOCK_N, warps, split-K) at M = 1 / 16 / 2048: does the
  time follow the bytes in flight, the grid, or neither;
- ``scale``: the shipped config over K and N: a fixed cost, or a cost per K step;
- ``copy``: a device-to-device copy and dense ``F.linear``, the bandwidth actually reachable;
- ``host``: the Python cost of one eager call (no sync, 200 calls), through the module, the op
  and the kernel entry point, and the top of a cProfile of the module call;
- ``route`` (``--part 3``): the large-M route (dequantize once + cuBLAS,
  ``kernels/dequant.dense_route``) against the fused GEMM and dense ``F.linear`` over M, for
  int4, int8 and the 4-bit codebook: where ``dense_min_m`` should be; then ``ksteps``: int8's
  16-row tile with 256-column K steps (half the steps of the shipped 128).

    python -m compress_ops.perf.gpu_diag --out FILE [--part 1|2|3] [--budget-s 240]

On the CPU (``TRITON_INTERPRET=1``) ``--small`` rehearses it on tiny shapes; its numbers mean
nothing there. Every GPU figure it prints is a measurement, not a prediction.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_ops.kernels import launches
from compress_ops.perf.quick_check import build_linear_module, cuda_graph_of, kernel_fn
from compress_ops.perf.timing import time_fn


def _cfg(**kw: Any):
    from compress_ops.kernels.tuning import KernelConfig

    base = dict(path="gemm", block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=12)
    return KernelConfig(**{**base, **kw})


def _time(fn, device: torch.device) -> dict[str, Any]:
    """Graph-replay median (L2 flushed by do_bench) or, on the CPU, one timed call."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return {"us": (time.perf_counter() - t0) * 1e6, "mode": "cpu-once"}
    replay, _ = cuda_graph_of(fn)
    t = time_fn(replay, device, rep_ms=20, warmup_ms=5)
    return {"us": t.median_us, "samples": t.samples, "mode": "graph"}


def _kernel_fn(mod: nn.Module, x: torch.Tensor, cfg):
    return kernel_fn(mod, x, cfg, checked=True)


class Diag:
    def __init__(self, out: Path, device: torch.device, small: bool, budget_s: float):
        self.out, self.device, self.small, self.budget_s = out, device, small, budget_s
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "small": small}
        try:
            import triton
            self.meta["triton"] = triton.__version__
        except ImportError:
            pass
        self.mods: dict[tuple, nn.Module] = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.out.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))

    def record(self, row: dict[str, Any]) -> None:
        row["t_s"] = round(time.perf_counter() - self.t0, 1)
        self.rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
        self.save()

    def module(self, case: str, n: int, k: int) -> nn.Module:
        key = (case, n, k)
        if key not in self.mods:
            self.mods.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=self.device).manual_seed(0)
            lin = nn.Linear(k, n, bias=False, dtype=torch.float16, device=self.device)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, device=self.device, generator=g) * k**-0.5)
            if case == "int4 g128 sym":
                from compress_ops.nn import QuantLinear

                self.mods[key] = QuantLinear.from_dense(lin, bits=4, group_size=128,
                                                        symmetric=True)
            else:
                self.mods[key] = build_linear_module("dequant", case, lin)
        return self.mods[key]

    def measure(self, kind: str, case: str, m: int, n: int, k: int, cfg=None, **extra) -> None:
        if self.left() < 0:
            self.record({"kind": kind, "case": case, "M": m, "status": "skipped (budget)"})
            return
        row: dict[str, Any] = {"kind": kind, "case": case, "M": m, "N": n, "K": k, **extra}
        try:
            mod = self.module(case, n, k)
            x = torch.randn(m, k, device=self.device, dtype=torch.float16)
            fn = _kernel_fn(mod, x, cfg) if cfg is not None else (lambda: mod(x))
            with torch.no_grad():
                with launches.capture() as got:  # what the call launched (its route)
                    y = fn()
                row["launched"] = [la.kernel if isinstance(la.kernel, str) else
                                   la.kernel.__name__ for la in got]
                ref = F.linear(x.float(), mod.dense_weight().float())
                err = ((y.float() - ref).norm() / ref.norm()).item()
                row["config"] = cfg.name if cfg is not None else "shipped"
                row["rel_err"] = err
                row.update(_time(fn, self.device))
            wbytes = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
            if "us" in row:
                row["GBps"] = round(wbytes / row["us"] / 1e3, 1)
        except Exception as ex:  # noqa: BLE001
            row["status"] = f"error: {type(ex).__name__}: {str(ex)[:200]}"
        self.record(row)


def run(d: Diag) -> None:
    n = k = 256 if d.small else 8192
    big_m = 64 if d.small else 2048
    dev = d.device
    # 0. the reachable bandwidth: a copy and dense F.linear
    if dev.type == "cuda":
        a = torch.empty(1 << 28, dtype=torch.uint8, device=dev)  # 256 MiB
        b = torch.empty_like(a)
        t = time_fn(lambda: b.copy_(a), dev, rep_ms=50, warmup_ms=10)
        d.record({"kind": "copy", "bytes": 2 * a.numel(), "us": t.median_us,
                  "GBps": round(2 * a.numel() / t.median_us / 1e3, 1)})
        del a, b
        for m in (1, 16):
            w = torch.randn(n, k, device=dev, dtype=torch.float16)
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            r = _time(lambda w=w, x=x: F.linear(x, w), dev)
            d.record({"kind": "dense", "M": m, "N": n, "K": k, **r,
                      "GBps": round(w.numel() * 2 / r["us"] / 1e3, 1)})
            del w
    # 1. the shipped config, then forced configs, M = 1 (int4, int8, int2)
    for case in ("int4 g128 asym", "int8 row sym", "int2 g128 asym"):
        d.measure("sweep", case, 1, n, k)
        for kw in ({"num_stages": 2}, {"num_stages": 4}, {"num_stages": 8}, {},
                   {"block_n": 32}, {"block_n": 128}, {"num_warps": 8},
                   {"split_k": 2}, {"split_k": 4}, {"block_n": 32, "split_k": 2}):
            if case != "int4 g128 asym" and "num_stages" in kw:
                continue
            d.measure("sweep", case, 1, n, k, _cfg(**kw), forced=str(kw))
    # the fields GEMV at M = 1
    d.measure("sweep", "int4 g128 asym", 1, n, k,
              _cfg(path="gemv", block_m=1, block_n=32, block_k=1024, num_stages=1),
              forced="gemv")
    d.measure("sweep", "int4 g128 asym", 1, n, k,
              _cfg(path="gemv", block_m=1, block_n=32, block_k=1024, num_stages=1, split_k=4),
              forced="gemv sk4")
    # 2. how the shipped config scales with K and N (a fixed cost or a cost per K step)
    for nn_, kk in ((n, k // 4), (n, k // 2), (n, 2 * k), (2 * n, k), (4 * n, k)):
        d.measure("scale", "int4 g128 asym", 1, nn_, kk)
    # 3. M = 16
    for kw in ({}, {"block_n": 32}, {"split_k": 2}, {"num_stages": 4}):
        d.measure("sweep", "int4 g128 asym", 16, n, k, _cfg(**kw), forced=str(kw))
    # 4. M = 2048
    d.measure("sweep", "int4 g128 asym", big_m, n, k)
    d.measure("sweep", "int8 row sym", big_m, n, k)
    for case in ("int4 g128 asym", "int8 row sym"):
        for kw in ({"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
                   {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8,
                    "num_stages": 3},
                   {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3},
                   {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4},
                   {"block_m": 128, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4}):
            d.measure("sweep", case, big_m, n, k, _cfg(**kw), forced=str(kw))
    if dev.type == "cuda":
        w = torch.randn(n, k, device=dev, dtype=torch.float16)
        x = torch.randn(big_m, k, device=dev, dtype=torch.float16)
        d.record({"kind": "dense", "M": big_m, "N": n, "K": k,
                  **_time(lambda: F.linear(x, w), dev)})
        del w, x
    host(d, n, k)


def host(d: Diag, n: int, k: int) -> None:
    """Python cost per eager call: 200 calls without a sync, through three entry points."""
    from compress_ops.kernels import dequant as dq

    mod = d.module("int4 g128 asym", n, k)
    for m in (1, 16):
        x = torch.randn(m, k, device=d.device, dtype=torch.float16)
        cfg = dq.call_config(m, n, k, d.device, 4, dq.MODE_ASYM, x.dtype)
        entries = {
            "module": lambda x=x: mod(x),
            "op": lambda x=x: torch.ops.compress_ops.dequant_linear(
                x, mod.qweight, mod.scales, mod.zeros, None, 4, mod.group_size,
                mod.format_version),
            "kernel_checked": _kernel_fn(mod, x, cfg),
        }
        with torch.no_grad():
            for name, fn in entries.items():
                calls = 200 if d.device.type == "cuda" else 3
                fn()
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                t_host = (time.perf_counter() - t0) / calls * 1e6
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                t_all = (time.perf_counter() - t0) / calls * 1e6
                d.record({"kind": "host", "M": m, "entry": name, "host_us": t_host,
                          "with_sync_us": t_all})
            if m == 16:
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(50 if d.device.type == "cuda" else 2):
                    mod(x)
                pr.disable()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
                d.meta["cprofile_module_m16_tottime"] = s.getvalue()[-6000:]
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
                d.meta["cprofile_module_m16_cumulative"] = s.getvalue()[-6000:]
                d.save()
                print(d.meta["cprofile_module_m16_tottime"], flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU rehearsal)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--part", type=int, default=1, choices=(1, 2, 3),
                   help="1: sweeps, scaling and host cost; 2: plain Triton probes of the loop; "
                        "3: the large-M route against the fused GEMM over M")
    a = p.parse_args(argv)
    import compress_ops  # noqa: F401  (registers the ops)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = Diag(a.out, device, a.small, a.budget_s)
    {1: run, 2: probe, 3: routes}[a.part](d)
    d.meta["elapsed_s"] = round(time.perf_counter() - d.t0, 1)
    d.save()
    print(f"gpu_diag: {len(d.rows)} rows in {d.meta['elapsed_s']} s -> {a.out}")
    return 0



# --- part 2: is it the loop shape or our dequantization? ---------------------------------------

def _probe_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def stream_words(q_ptr, out_ptr, N, KW, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        """Read the packed words of BLOCK_N rows, BLOCK_KW words per step; xor them per row."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_KW)
        acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)
        for k in range(0, KW, BLOCK_KW):
            acc ^= tl.load(q_ptr + rn[:, None] * KW + (k + rk)[None, :])
        tl.store(out_ptr + rn, tl.sum(acc, 1))

    @triton.jit
    def dense_dot(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """y = x w^T for fp16 w [N, K] with x's rows padded to BLOCK_M: Triton's dense tile."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M,
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + (k + rk)[None, :])
            acc = tl.dot(x, tl.trans(w), acc)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16), mask=rm[:, None] < M)

    return stream_words, dense_dot


def probe(d: Diag) -> None:
    n = k = 256 if d.small else 8192
    dev = d.device
    stream_words, dense_dot = _probe_kernels()
    q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev)
    out = torch.empty(n, dtype=torch.int32, device=dev)
    for bn, bkw, warps, stages in ((64, 16, 4, 4), (64, 16, 4, 12), (64, 32, 4, 8),
                                   (32, 16, 4, 8), (64, 16, 8, 8), (64, 64, 4, 4),
                                   (128, 16, 4, 8)):
        if d.left() < 0:
            break
        def fn(q=q, bn=bn, bkw=bkw, warps=warps, stages=stages):
            return stream_words[(n // bn,)](q, out, n, k // 8, BLOCK_N=bn, BLOCK_KW=bkw,
                                            num_warps=warps, num_stages=stages)

        try:
            r = _time(fn, dev)
            d.record({"kind": "probe", "what": "stream int4 words", "N": n, "K": k,
                      "BLOCK_N": bn, "BLOCK_KW": bkw, "warps": warps, "stages": stages, **r,
                      "GBps": round(q.numel() * 4 / r["us"] / 1e3, 1)})
        except Exception as ex:  # noqa: BLE001
            d.record({"kind": "probe", "what": "stream", "status": f"error: {ex!s:.200}"})
    del q
    w = torch.randn(n, k, device=dev, dtype=torch.float16)
    for m in (1, 16):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        y = torch.empty(m, n, device=dev, dtype=torch.float16)
        for bn, bk, warps, stages in ((64, 128, 4, 4), (64, 128, 4, 8), (64, 64, 4, 8),
                                      (32, 128, 4, 6)):
            if d.left() < 0:
                break
            def fn(x=x, w=w, y=y, m=m, bn=bn, bk=bk, warps=warps, stages=stages):
                return dense_dot[(n // bn,)](x, w, y, m, n, k, BLOCK_M=16, BLOCK_N=bn,
                                             BLOCK_K=bk, num_warps=warps, num_stages=stages)

            try:
                r = _time(fn, dev)
                err = ((y.float() - F.linear(x.float(), w.float())).norm()
                       / F.linear(x.float(), w.float()).norm()).item()
                d.record({"kind": "probe", "what": "triton dense tile", "M": m, "N": n, "K": k,
                          "BLOCK_N": bn, "BLOCK_K": bk, "warps": warps, "stages": stages,
                          "rel_err": err, **r, "GBps": round(w.numel() * 2 / r["us"] / 1e3, 1)})
            except Exception as ex:  # noqa: BLE001
                d.record({"kind": "probe", "what": "dense", "status": f"error: {ex!s:.200}"})
    del w
    # our kernel: BLOCK_K 64 (per-step cost or per-byte cost), 2 warps, symmetric int4
    for kw in ({"block_k": 64}, {"block_k": 64, "num_stages": 16}, {"num_warps": 2},
               {"block_n": 32, "num_warps": 2}, {"block_n": 32, "num_stages": 6}):
        d.measure("sweep2", "int4 g128 asym", 1, n, k, _cfg(**kw), forced=str(kw))
    d.measure("sweep2", "int4 g128 sym", 1, n, k)
    d.measure("sweep2", "int8 row sym", 1, n, k, _cfg(block_k=64), forced="{'block_k': 64}")


# --- part 3: where the large-M route starts to pay ----------------------------------------------

ROUTE_CASES = ("int4 g128 asym", "int8 row sym", "codebook 4-bit")


def routes(d: Diag) -> None:
    """Each case at each M three ways, interleaved: the large-M route forced
    (``COMPRESS_OPS_DENSE_MIN_M=1``), the fused GEMM forced (``never``), and dense
    ``F.linear`` on the module's dense weight."""
    n = k = 256 if d.small else 8192
    ms = (16, 64) if d.small else (128, 256, 512, 1024, 2048)
    old = os.environ.get("COMPRESS_OPS_DENSE_MIN_M")
    try:
        for m in ms:
            for case in ROUTE_CASES:
                for route, env in (("dense-route", "1"), ("fused", "never")):
                    os.environ["COMPRESS_OPS_DENSE_MIN_M"] = env
                    d.measure("route", case, m, n, k, route=route)
            if d.left() < 0:
                break
            w = d.module(ROUTE_CASES[0], n, k).dense_weight().to(torch.float16)
            x = torch.randn(m, k, device=d.device, dtype=torch.float16)
            d.record({"kind": "route", "route": "dense", "M": m, "N": n, "K": k,
                      **_time(lambda w=w, x=x: F.linear(x, w), d.device)})
            del w, x
    finally:
        os.environ.pop("COMPRESS_OPS_DENSE_MIN_M", None)
        if old is not None:
            os.environ["COMPRESS_OPS_DENSE_MIN_M"] = old
    # fewer, larger K steps at small M: BLOCK_K 64 -> 128 took int4 from 47.4 to 35.6 us but
    # int8 only from 39.5 to 38.2 (part 1); int8 (one scale group per row) can take 256
    for m in (1, 16):
        for kw in ({"block_k": 256, "num_stages": 4}, {"block_k": 256, "num_stages": 6}):
            d.measure("ksteps", "int8 row sym", m, n, k, _cfg(**kw), forced=str(kw))


if __name__ == "__main__":
    raise SystemExit(main())
