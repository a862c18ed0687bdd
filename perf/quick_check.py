"""The quick GPU check: a kernel smoke test, the headline rows against cuBLAS and torch's own
weight-only kernels (eager and in a CUDA graph), and the static model's predictions next to what
was measured. Everything goes into one JSON file that is rewritten after every case and row.

    python -m compress_ops.perf.quick_check [--device cuda|cpu] [--small]
        [--steps smoke,headline,table] [--out PATH | --out-dir DIR] [--resume] [--workers N]
        [--static-dir DIR] [--print-path]
    bash perf/gpu_check.sh --quick                  # install, machine, the three steps (< 6 min)
    GPU_CHECK_DRY=1 bash perf/gpu_check.sh --quick  # CPU rehearsal: interpreter, tiny shapes

Steps (``--steps``; ``gpu_check.sh --quick`` runs each in its own process under its own time
limit, and passes ``--resume`` to every step after the first so that they all fill the same file):

``smoke``
    Every family against its float64 reference, in fp16 and bf16, with a few shapes each (one
    ragged): the affine formats int4 g128 asym / int8 per-row sym / int2 g128 asym / binary
    g128 sym, the 4-bit codebook, 2:4 sparse, low rank, the fused dw+pw conv and W8A8 (int8
    and FP8 e4m3, 8-bit weights and activations). Weights come from the modules'
    ``from_dense`` (``FusedDWSepConv2d``'s own init for the conv); the reference is
    ``F.linear(x.double(), m.dense_weight().double(), bias)`` (low rank: the factors' exact
    product; the conv: :func:`compress_ops.reference.dwsep_conv2d_ref` in float64). A case
    passes when ``||y - ref|| / ||ref||`` is within the tolerance of ``tests/kernels`` (the same
    numbers: :func:`tol`; twice that for low rank and the conv, as there). W8A8 is checked
    against its exact reference instead (:func:`w8a8_ref`: the activation quantized by the
    format's rule, the levels' product exact in float64, the format's epilogue; dense differs
    by the activation's quantization error, ~1e-2) within :func:`w8a8_tol` (the output's
    rounding; FP8: plus its float32 sums' order). One line per case;
    a failure is recorded and the next case still runs. On CUDA the cases are spread over
    ``--workers`` processes (Triton compiles each kernel specialization serially within one
    process); a worker whose CUDA context an error has poisoned hands its remaining cases back,
    and they rerun in a fresh pool.

``headline``
    M in {1, 16, 2048}, N = K = 8192, fp16 (``--small``: M in {1, 16}, N = K = 256), for the
    cases of :data:`CASES`. For each (M, case), in this order: ours (the module), the dense
    baseline (``F.linear`` on the module's ``dense_weight()``: cuBLAS), torch's own kernel where
    there is one (``torch.ops.aten._weight_int4pack_mm``, tinygemm, which takes bf16 activations
    only; ``torch._weight_int8pack_mm``; for 2:4, ``torch.sparse.to_sparse_semi_structured``:
    cuSPARSELt or CUTLASS; for low rank, rank 128 with random factors, the two cuBLAS GEMMs
    ``F.linear(F.linear(x, V), U)``, checked against the factors' exact product with twice the
    tolerance as in ``tests/kernels``; for W8A8 int8, ``torch._int_mm``, cuBLASLt's int8 GEMM,
    at M > 16 (its limit on CUDA), and for FP8 ``torch._scaled_mm`` with row and column scales,
    both on the activation quantized beforehand, outside the timing). W8A8's ``ours`` is
    checked against its exact reference (as in the smoke step) and also compared with the int8
    weight-only row of the same M (``vs_eager`` / ``vs_graph``: the question at M <= 16 is
    whether quantizing x pays). Then the fused dw + pw conv on two MobileNetV2 pairs
    (:data:`CONV_PAIRS`, batch 32), ours against the cuDNN pair (the ``dense`` provider
    there). Each provider is first checked against
    ``F.linear(x.double(), dense_weight().double())``; a wrong one is recorded as ``wrong`` and
    not timed; a torch-private call that cannot run is recorded as ``unavailable: <reason>``.
    Then it is timed eagerly (:func:`compress_ops.perf.timing.time_fn`: ``do_bench``, L2 flushed,
    median of >= 50 samples, a short rep) and, on CUDA, as the replay of a CUDA graph that
    captured one call (checked against the reference first, then timed the same way). No
    autotuning (``COMPRESS_OPS_AUTOTUNE`` is removed from the environment). Both are
    ``do_bench`` medians with L2 flushed before each sample: the flush gives the host time to
    queue the next call, so host launch overhead shows in the eager time only where it is longer
    than the flush; the graph time has none.

``table``
    Joins the measured rows with the static performance model's rows
    (``perf/results/static-triton<triton version>.json``, or the file of the nearest Triton
    version, named in the output) on (config, M, N, K, dtype) and prints predicted vs measured
    time and speedup; then a compact table of everything measured.

The file: ``{"schema": "quick-1", "meta": {...}, "smoke": [...], "rows": [...],
"predicted_vs_measured": [...]}``, named ``<YYYY-MM-DD>-quick-<device slug>.json``, in
``$OUT/results/`` when ``OUT`` is set, else in the results folder of
:func:`compress_ops.perf.schema.default_results_dir` (``--out`` / ``--out-dir`` override).
``meta.steps`` says which steps ran, how long, and whether one was cut short
(``"running"`` left in the file means its process was killed).

On the CPU (``--device cpu``) the Triton kernels run under the interpreter when
``TRITON_INTERPRET=1`` was set before Python started (``COMPRESS_OPS_CPU_BACKEND=triton`` is
then set here), else the ops' CPU routes run; its timings rehearse the code, they measure nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_ops.kernels.tuning import DTYPES
from compress_ops.perf import machine, schema
from compress_ops.perf.timing import Timing, time_fn, timing_of

SCHEMA = "quick-1"
STEPS: tuple[str, ...] = ("smoke", "headline", "table")
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "torch.float16": "fp16",
                  "bfloat16": "bf16", "torch.bfloat16": "bf16",
                  "float32": "fp32", "float": "fp32", "torch.float32": "fp32"}
#: eager ``do_bench`` settings of the headline (``time_fn`` raises rep until >= 50 samples)
REP_MS, WARMUP_MS = 10, 5
#: CPU rehearsal samples per measurement (interpreted kernels: the numbers mean nothing)
CPU_SAMPLES = 3


def short_dtype(dtype: torch.dtype | str) -> str:
    """``torch.float16`` / ``"float16"`` / ``"fp16"`` -> ``"fp16"`` (the static model's names)."""
    s = str(dtype)
    s = _DTYPE_ALIASES.get(s, s)
    return _DTYPE_ALIASES.get(s.removeprefix("torch."), s)


# ---------------------------------------------------------------------------------------------
# Tolerances (the numbers of tests/kernels/tolerances.py, which is not part of the package)
# ---------------------------------------------------------------------------------------------


def tol(dtype: torch.dtype, k: int) -> float:
    """Relative (to ``||ref||``) tolerance from dtype and reduction length: the kernel tests'."""
    return {torch.float32: 1e-5 * math.sqrt(k), torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}[dtype]


#: half an ulp of each output dtype, relative (the rounding of the result to it)
OUT_ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
#: FP8 W8A8 on a GPU: sm_90's FP8 tensor cores add their products in less than fp32 precision
#: (~14 bits) and the kernel promotes the partial sums into fp32 every K tile
#: (``kernels/w8a8.py``): some 1e-4 relative in norm (a few 2**-14 per tile's partial sum);
#: allowed 2**-9 (~2e-3, the fp16 kernel tests' tolerance), well below the activation
#: quantization's error that skipping the exact rule would show (int8 ~1e-2, FP8 ~3e-2)
FP8_GPU_ACC = 2.0**-9


def w8a8_tol(dtype: torch.dtype, k: int, qdtype: str, device: torch.device) -> float:
    """Relative (to ``||ref||``) tolerance of W8A8 against its exact reference
    (:func:`w8a8_ref`, rounded to ``dtype`` as the kernel's output is): the output's rounding
    (half an ulp: a tie resolved the other way, or one epilogue rounding apart, flips an
    output by one ulp; int8 follows the same rules bit for bit, so it is near 0 in practice),
    plus for FP8 its float32 sums in another order (``sqrt(K)`` fp32 roundings; on CUDA
    :data:`FP8_GPU_ACC`)."""
    t = OUT_ROUNDING[dtype]
    if qdtype == "fp8":
        t += FP8_GPU_ACC if device.type == "cuda" else math.sqrt(k) * 2.0**-24
    return t


def w8a8_ref(x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """The exact reference of a ``W8A8Linear`` on a 2-D ``x``: its activation quantized by the
    format's rule (:func:`~compress_ops.kernels.formats.w8a8.quantize_activation`), the product
    of the levels summed in float64 (exact), then the format's float32 epilogue rounded to
    ``x.dtype``. Not dense ``F.linear``: that differs by the activation's quantization error."""
    from compress_ops.kernels.formats.w8a8 import epilogue, quantize_activation

    q, s_x = quantize_activation(x, mod.qweight.dtype, mod.input_scale, mod.smooth)
    acc = q.double() @ mod.qweight.double().t()
    return epilogue(acc, s_x, mod.w_scales, mod.bias, x.dtype)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` in float64 (what :func:`tol` bounds)."""
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` in float64 (printed next to the norm error)."""
    d = (y.double() - ref.double()).abs().max()
    return (d / ref.double().abs().max().clamp_min(1e-30)).item()


def check_output(y: torch.Tensor, ref: torch.Tensor, tolerance: float
                 ) -> tuple[bool, float, float]:
    """``(within tolerance and finite, norm rel err, max rel err)`` of ``y`` against ``ref``."""
    if tuple(y.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(y.shape)} != reference {tuple(ref.shape)}")
    err, mre = rel_err(y, ref), max_rel_err(y, ref)
    finite = bool(torch.isfinite(y).all())
    return (finite and err <= tolerance), err, mre


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadlineCase:
    """One format of the headline: its name (the static model's ``config``), how the module
    is built, and torch's own kernel for it (``None``: there is none)."""

    name: str
    kind: str  # "affine" (QuantLinear) | "codebook" (CodebookLinear) | "sparse24" | "lowrank"
    # | "w8a8" (W8A8Linear: 8-bit weights and activations) | "hashed" (HashedLinear)
    bits: int
    group_size: int | None
    symmetric: bool | None
    native: str | None  # "tinygemm" | "int8pack" | "semi" (cuSPARSELt / CUTLASS) |
    # "two-gemm" (x V^T, then U: the two cuBLAS GEMMs low rank replaces) | "int-mm"
    # (torch._int_mm) | "scaled-mm" (torch._scaled_mm) | None
    #: the case whose ``ours`` row (same M) this one is also compared with (``vs_*`` fields)
    versus: str | None = None

    @property
    def family(self) -> str:
        return self.kind if self.kind in ("sparse24", "lowrank", "w8a8", "hashed") else "dequant"

    @property
    def rank(self) -> int:
        return int(self.name.split()[-1])


CASES: tuple[HeadlineCase, ...] = (
    HeadlineCase("int4 g128 asym", "affine", 4, 128, False, "tinygemm"),
    HeadlineCase("int8 row sym", "affine", 8, None, True, "int8pack"),
    HeadlineCase("int2 g128 asym", "affine", 2, 128, False, None),
    # binary weights (QuantConfig(bits=1): 1-bit fields on the symmetric grid, g128)
    HeadlineCase("binary g128 sym", "affine", 1, 128, True, None),
    HeadlineCase("codebook 4-bit", "codebook", 4, None, None, None),
    # hashed weights (HashedNets, 1/16 of the weights: B fp16 buckets, no index)
    HeadlineCase("hashed 1/16", "hashed", 16, None, None, None),
    HeadlineCase("2:4", "sparse24", 9, None, None, "semi"),  # bits: per dense element, fp16
    HeadlineCase("rank 128", "lowrank", 16, None, None, "two-gemm"),  # random factors
    # 8-bit weights and activations (dynamic per-row activation scales), against the int8
    # weight-only row as well as dense: the question at M <= 16 is whether quantizing x pays
    HeadlineCase("w8a8 int8", "w8a8", 8, None, True, "int-mm", versus="int8 row sym"),
    HeadlineCase("w8a8 fp8", "w8a8", 8, None, True, "scaled-mm", versus="int8 row sym"),
)
# the low-bit weight-only formats (the smoke step's dequant variants)
CASE_NAMES: tuple[str, ...] = tuple(c.name for c in CASES if c.family == "dequant")
_CASE_BY_NAME = {c.name: c for c in CASES}
#: the stored types of W8A8 (the smoke step's w8a8 variants; the cases ``"w8a8 <type>"``)
W8A8_VARIANTS: tuple[str, ...] = ("int8", "fp8")


# MobileNetV2's dw + project pairs the headline times (H = W of the input, C, Cout, stride;
# k = 3, batch 32, fp16, channels-last, ReLU6 after the depthwise): the static model's rows of
# the same names (``perf/static_perf.DWSEP_PAIRS``); ``--small``: tiny shapes
CONV_PAIRS = ((56, 144, 24, 1), (14, 576, 96, 1))
CONV_PAIRS_SMALL = ((6, 32, 16, 2),)


def conv_config(h: int, c: int, cout: int, stride: int, k: int = 3) -> str:
    """The static model's name of a pair (``static_perf.DWSepPair.config``)."""
    return f"dw{k} {h}^2x{c}->{cout} s{stride}"


def headline_shapes(small: bool) -> tuple[tuple[int, ...], int, int, str]:
    """``(Ms, N, K, dtype)`` of the headline rows."""
    return ((1, 16), 256, 256, "fp16") if small else ((1, 16, 2048), 8192, 8192, "fp16")


def build_linear_module(family: str, variant: str, linear: nn.Linear) -> nn.Module:
    """The compressed module of ``linear`` through its ``from_dense``."""
    from compress_ops.nn import (
        CodebookLinear,
        HashedLinear,
        LowRankLinear,
        QuantLinear,
        Sparse24Linear,
        W8A8Linear,
    )

    if family == "dequant":
        c = _CASE_BY_NAME[variant]
        if c.kind == "codebook":
            return CodebookLinear.from_dense(linear, bits=c.bits)
        return QuantLinear.from_dense(linear, bits=c.bits, group_size=c.group_size,
                                      symmetric=c.symmetric)
    if family == "sparse24":
        return Sparse24Linear.from_dense(linear)
    if family == "lowrank":
        return LowRankLinear.from_dense(linear, rank=int(variant.split()[-1]))
    if family == "hashed":  # variant "1/8": buckets = means of the weight's members
        return HashedLinear.from_dense(linear, compression=1 / int(variant.split("/")[-1]))
    if family == "w8a8":  # variant "int8" / "fp8" (smoke) or "w8a8 int8" (the case's name)
        return W8A8Linear.from_dense(linear, dtype=variant.split()[-1])
    raise ValueError(f"unknown linear family {family!r}")


@dataclass(frozen=True)
class SmokeCase:
    """One smoke case. ``shape`` is ``(M, N, K)`` for the linears, ``(B, C, H, W, Cout, k,
    stride)`` for the conv."""

    family: str
    variant: str
    dtype: str
    shape: tuple[int, ...]
    ragged: bool = False

    @property
    def name(self) -> str:
        return f"{self.family} {self.variant} {self.dtype} {'x'.join(map(str, self.shape))}"

    def shape_text(self) -> str:
        if self.family == "dwsep_conv":
            b, c, h, w, co, k, s = self.shape
            return f"B={b} C={c} HW={h}x{w} Cout={co} k={k} s={s}"
        m, n, k = self.shape
        return f"M={m:<4} N={n:<5} K={k:<5}"


def smoke_cases(small: bool = False) -> list[SmokeCase]:
    """Every family x fp16/bf16 x a few shapes (the last one ragged), families interleaved so
    that parallel workers compile different kernels."""
    if small:
        linear = [((1, 64, 128), False), ((16, 64, 128), False), ((5, 40, 72), True)]
        conv = [((1, 8, 6, 6, 16, 3, 1), False), ((1, 5, 5, 7, 6, 5, 2), True)]
        rank = 16
    else:
        linear = [((1, 512, 1024), False), ((64, 512, 1024), False), ((33, 300, 1000), True)]
        conv = [((2, 32, 14, 14, 64, 3, 1), False), ((2, 48, 15, 15, 96, 5, 2), False),
                ((1, 19, 11, 13, 23, 5, 2), True)]
        rank = 64
    variants = [("dequant", name) for name in CASE_NAMES]
    variants += [("sparse24", "2:4"), ("lowrank", f"rank {rank}"), ("dwsep_conv", "relu6")]
    variants += [("w8a8", v) for v in W8A8_VARIANTS]
    variants += [("hashed", "1/8")]
    out = []
    for dt in ("fp16", "bf16"):
        for i in range(max(len(linear), len(conv))):
            for fam, var in variants:
                shapes = conv if fam == "dwsep_conv" else linear
                if i < len(shapes):
                    out.append(SmokeCase(fam, var, dt, shapes[i][0], shapes[i][1]))
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seed(case: SmokeCase) -> int:
    return sum(map(ord, case.name)) * 7919 % (2**31)


def _smoke_eval(case: SmokeCase, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(output, reference, tolerance)`` of one case: the float64 reference with the kernel
    tests' tolerance (:func:`tol`; x2 for low rank and the conv), or for W8A8 its exact
    reference (:func:`w8a8_ref`) with :func:`w8a8_tol`."""
    import compress_ops  # noqa: F401  (registers the ops)
    from compress_ops.reference import dwsep_conv2d_ref

    dt, g = DTYPES[case.dtype], _gen(_seed(case))
    if case.family == "dwsep_conv":
        from compress_ops.nn import FusedDWSepConv2d

        b, c, h, w, co, k, s = case.shape
        mod = FusedDWSepConv2d(c, co, k, s, k // 2, "relu6", "none", dtype=dt)
        with torch.no_grad():
            mod.dw_bias.copy_(torch.randn(c, generator=g))
            mod.pw_bias.copy_(torch.randn(co, generator=g))
        mod = mod.to(device)
        x = torch.randn(b, c, h, w, generator=g).to(dt).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            y = mod(x)
            ref = dwsep_conv2d_ref(x, mod.dw_weight, mod.dw_bias, mod.pw_weight, mod.pw_bias,
                                   None, mod.stride, list(mod.padding), mod.act1, mod.act2,
                                   dtype=torch.float64)
        return y, ref, 2.0 * tol(dt, c * k * k)
    m, n, k = case.shape
    lin = nn.Linear(k, n, bias=True, dtype=dt, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    mod = build_linear_module(case.family, case.variant, lin)
    x = torch.randn(m, k, generator=g).to(dt).to(device)
    with torch.no_grad():
        y = mod(x)
        if case.family == "w8a8":  # the quantized activation's exact product, not dense
            return y, w8a8_ref(x, mod), w8a8_tol(dt, k, case.variant, device)
        if case.family == "lowrank":  # the factors' exact product (dense_weight rounds it)
            w = mod.u.double() @ mod.v.double()
        else:
            w = mod.dense_weight().double()
        ref = F.linear(x.double(), w, mod.bias.double())
    return y, ref, tol(dt, k) * (2.0 if case.family == "lowrank" else 1.0)


def _error_text(ex: BaseException) -> str:
    return f"error: {type(ex).__name__}: {ex}".replace("\n", " ")[:400]


def _cuda_context_ok(device: torch.device) -> bool:
    """False when an earlier error left this process's CUDA context unusable."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return float(torch.ones(1, device=device).sum().item()) == 1.0
    except Exception:  # noqa: BLE001 - any failure means the context is gone
        return False


def run_smoke_case(case: SmokeCase, device: torch.device) -> dict[str, Any]:
    """One smoke case as a result record; never raises."""
    t0 = time.perf_counter()
    res: dict[str, Any] = {**asdict(case), "shape": list(case.shape), "name": case.name,
                           "device": device.type, "status": "FAIL", "rel_err": None,
                           "max_rel_err": None, "tol": None, "note": None}
    try:
        y, ref, res["tol"] = _smoke_eval(case, device)
        ok, res["rel_err"], res["max_rel_err"] = check_output(y, ref, res["tol"])
        res["status"] = "ok" if ok else "FAIL"
        if not ok:
            res["note"] = "outside tolerance" if math.isfinite(res["rel_err"]) else "non-finite"
        if y.dtype != DTYPES[case.dtype]:
            res["status"], res["note"] = "FAIL", f"output dtype {y.dtype}"
    except Exception as ex:  # noqa: BLE001 - a failing case must not stop the others
        res["note"] = _error_text(ex)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


_POISONED: str | None = None  # (smoke worker) the case after which this CUDA context died


def smoke_worker(case: SmokeCase, device_str: str) -> dict[str, Any]:
    """Pool task: run one case, or hand it back (``status: "retry"``) when an earlier case left
    this worker's CUDA context poisoned."""
    global _POISONED
    device = torch.device(device_str)
    if _POISONED is not None:
        return {"name": case.name, "status": "retry", "note": f"after {_POISONED}"}
    res = run_smoke_case(case, device)
    res["worker"] = os.getpid()
    if res["status"] != "ok" and not _cuda_context_ok(device):
        _POISONED = case.name
        res["note"] = f"{res['note']}; this error left the worker's CUDA context unusable"
    return res


def smoke_line(r: dict[str, Any]) -> str:
    """One printed line per smoke case."""
    case = SmokeCase(r["family"], r["variant"], r["dtype"], tuple(r["shape"]), r["ragged"])
    errs = ""
    if r.get("rel_err") is not None:
        errs = (f"rel {r['rel_err']:.1e} / tol {r['tol']:.1e}  max rel {r['max_rel_err']:.1e}")
    tag = "ragged" if r["ragged"] else ""
    return (f"  {r['status']:<4} {r['family']:<10} {r['variant']:<15} {r['dtype']:<4} "
            f"{case.shape_text():<34} {tag:<6} {errs:<48} {r.get('seconds', 0):6.1f} s"
            f"{'  ' + r['note'] if r.get('note') else ''}")


def run_smoke(cases: list[SmokeCase], device: torch.device, workers: int,
              record: Callable[[dict[str, Any]], None], *, rounds: int = 3,
              worker: Callable[[SmokeCase, str], dict[str, Any]] | None = None) -> None:
    """Run every case, ``record``-ing each result as it arrives: in this process
    (``workers <= 1``) or spread over a pool of spawned processes running ``worker``
    (:func:`smoke_worker`; a module-level function). A case handed back (``status: "retry"``)
    or lost with a dead worker runs again in a fresh pool, at most ``rounds`` times in all."""
    worker = worker or smoke_worker
    if workers <= 1 or len(cases) <= 1:
        for c in cases:
            record(run_smoke_case(c, device))
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    pending = list(cases)
    last_note: dict[str, str] = {}
    for _ in range(rounds):
        if not pending:
            return
        retry: list[SmokeCase] = []
        pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(pending)),
                                      mp_context=mp.get_context("spawn"))
        try:
            futs = {pool.submit(worker, c, str(device)): c for c in pending}
            for fut in cf.as_completed(futs):
                c = futs[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool as ex:
                    last_note[c.name] = f"worker process died ({ex})"
                    retry.append(c)
                    continue
                except Exception as ex:  # noqa: BLE001
                    res = run_smoke_case_error(c, device, _error_text(ex))
                if res.get("status") == "retry":
                    last_note[c.name] = f"handed back by a poisoned worker ({res.get('note')})"
                    retry.append(c)
                    continue
                record(res)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        pending = retry
    for c in pending:
        record(run_smoke_case_error(c, device, f"not run: {last_note.get(c.name, '?')}, "
                                               f"{rounds} times"))


def run_smoke_case_error(case: SmokeCase, device: torch.device, note: str) -> dict[str, Any]:
    """The FAIL record of a case that could not run at all."""
    return {**asdict(case), "shape": list(case.shape), "name": case.name, "device": device.type,
            "status": "FAIL", "rel_err": None, "max_rel_err": None, "tol": None, "note": note,
            "seconds": 0.0}


# ---------------------------------------------------------------------------------------------
# Headline: validate, then time eagerly and as a CUDA-graph replay
# ---------------------------------------------------------------------------------------------


def time_cpu_rehearsal(fn: Callable[[], object], samples: int = CPU_SAMPLES) -> Timing:
    """CPU rehearsal timer: one warm-up, the median of ``samples`` ``perf_counter`` runs (the
    kernels are interpreted there: the number exercises the code, it measures nothing)."""
    fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return timing_of(times, 1e6)


def cuda_graph_of(fn: Callable[[], torch.Tensor], warmup: int = 3
                  ) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture one call of ``fn`` in a CUDA graph (after ``warmup`` calls on a side stream):
    ``(replay, the graph's output tensor)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return g.replay, out


def measure_provider(fn: Callable[[], torch.Tensor], ref: torch.Tensor, tolerance: float, *,
                     time_it: Callable[[Callable[[], object]], Timing],
                     capture: Callable[[Callable[[], torch.Tensor]],
                                       tuple[Callable[[], None], torch.Tensor]] | None,
                     graph_skip: str = "skipped", error_status: str = "error"
                     ) -> dict[str, Any]:
    """Check ``fn()`` against ``ref``; only a correct provider is timed (eagerly, then the
    replay of its CUDA graph when ``capture`` is given, the graph's output checked first).

    ``status``: ``ok``, ``wrong`` (outside ``tolerance`` or non-finite: not timed), or
    ``error_status: <reason>`` when the call raised (``unavailable`` for torch-private kernels).
    """
    out: dict[str, Any] = {"status": None, "rel_err": None, "max_rel_err": None,
                           "tol": tolerance, "eager_us": None, "eager_samples": None,
                           "graph_us": None, "graph_samples": None, "graph_status": None,
                           "eager_p20_us": None, "eager_p80_us": None, "graph_p20_us": None,
                           "graph_p80_us": None}
    try:
        ok, out["rel_err"], out["max_rel_err"] = check_output(fn(), ref, tolerance)
    except Exception as ex:  # noqa: BLE001 - recorded, never fatal
        out["status"] = f"{error_status}: {_error_text(ex).removeprefix('error: ')}"
        return out
    if not ok:
        out["status"] = "wrong"
        out["graph_status"] = "not run (wrong)"
        return out
    try:
        t = time_it(fn)
        out["eager_us"], out["eager_samples"] = t.median_us, t.samples
        out["eager_p20_us"], out["eager_p80_us"] = t.p20_us, t.p80_us
    except Exception as ex:  # noqa: BLE001
        out["status"] = f"error: timing: {_error_text(ex).removeprefix('error: ')}"
        return out
    out["status"] = "ok"
    if capture is None:
        out["graph_status"] = graph_skip
        return out
    try:
        replay, y = capture(fn)
        g_ok, g_err, _ = check_output(y, ref, tolerance)
        if not g_ok:
            out["graph_status"] = f"wrong (rel err {g_err:.2e})"
            return out
        t = time_it(replay)
        out["graph_us"], out["graph_samples"] = t.median_us, t.samples
        out["graph_p20_us"], out["graph_p80_us"] = t.p20_us, t.p80_us
        out["graph_status"] = "ok"
    except Exception as ex:  # noqa: BLE001
        out["graph_status"] = _error_text(ex)
    return out


def fill_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_eager`` / ``speedup_graph`` = dense time / row time, against the dense row of
    the same (case, M, N, K, dtype) (measured right next to it). The ``ours`` row of a case
    with a ``versus`` case (W8A8: the int8 weight-only row) also gets ``versus`` and
    ``vs_eager`` / ``vs_graph`` = that case's ``ours`` time at the same (M, N, K, dtype) /
    this row's (> 1: this one is faster)."""
    dense = {_key(r): r for r in rows if r.get("provider") == "dense"}
    ours = {_key(r): r for r in rows if r.get("provider") == "ours"}
    for r in rows:
        d = dense.get(_key(r))
        for mode in ("eager", "graph"):
            t, td = r.get(f"{mode}_us"), (d or {}).get(f"{mode}_us")
            r[f"speedup_{mode}"] = (td / t) if (t and td) else None
        c = _CASE_BY_NAME.get(r.get("case"))
        if c is None or c.versus is None or r.get("provider") != "ours":
            continue
        v = ours.get((c.versus, *_key(r)[1:])) or {}
        r["versus"] = c.versus
        for mode in ("eager", "graph"):
            t, tv = r.get(f"{mode}_us"), v.get(f"{mode}_us")
            r[f"vs_{mode}"] = (tv / t) if (t and tv) else None


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("case") or r.get("config"), int(r["M"]), int(r["N"]), int(r["K"]),
            short_dtype(r["dtype"]))


def _native_fn(case: HeadlineCase, mod: nn.Module, x: torch.Tensor
               ) -> tuple[Callable[[], torch.Tensor], torch.dtype, str]:
    """torch's own kernel for ``case`` on ``mod``'s weight: ``(call, the dtype its tolerance is
    taken from, note)``. Raises when torch cannot build or run it here."""
    from compress_ops.kernels.formats.dequant import unpack_bits
    from compress_ops.ops.dequant import native_int8_weight

    if case.native == "int8pack":
        w8 = native_int8_weight(mod.qweight)
        s = mod.scales[:, 0].contiguous()
        return (lambda: torch._weight_int8pack_mm(x, w8, s)), x.dtype, "torch._weight_int8pack_mm"
    if case.native == "two-gemm":
        u, v = mod.u.detach(), mod.v.detach()
        return ((lambda: F.linear(F.linear(x, v), u)), x.dtype,
                "F.linear(F.linear(x, V), U): two cuBLAS GEMMs")
    if case.native == "semi":
        ws = torch.sparse.to_sparse_semi_structured(mod.dense_weight().contiguous())
        return ((lambda: F.linear(x, ws)), x.dtype,
                "torch.sparse.to_sparse_semi_structured + F.linear (cuSPARSELt / CUTLASS)")
    if case.native == "tinygemm":
        # CUDA layout: uint8 [N, K/2], the even k in the high nibble; scales-and-zeros
        # [K/group, N, 2] bf16 in tinygemm's form W = (q - 8) * s + zero', zero' = (8 - z) * s.
        q = unpack_bits(mod.qweight, 4)
        q8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(q8, 8)
        s = mod.scales.float()
        z = mod.zeros.float() if mod.zeros is not None else torch.full_like(s, 8.0)
        sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous()
        sz = sz.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)  # tinygemm takes bf16 activations only
        gs = mod.group_size
        return ((lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, gs, sz)),
                torch.bfloat16, "torch.ops.aten._weight_int4pack_mm, bf16 activations")
    raise ValueError(f"no native kernel for {case.name}")


def _shipped(mod: nn.Module, m: int, device: torch.device, dtype: torch.dtype
             ) -> tuple[Any, bool]:
    """``(config, dense)``: the fused kernels' shipped config for a call of ``m`` rows on
    ``mod``, and whether the call takes the large-M route instead (dequantize once + cuBLAS,
    ``kernels/dequant.dense_route``)."""
    from compress_ops.kernels import dequant as dq
    from compress_ops.kernels.formats.dequant import packed_k

    codebook = hasattr(mod, "codebook")
    q = mod.indices if codebook else mod.qweight
    mode = (dq.MODE_CODEBOOK if codebook
            else dq.MODE_ASYM if getattr(mod, "zeros", None) is not None else dq.MODE_SYM)
    cfg = dq.call_config(m, q.shape[0], packed_k(q.shape[1], mod.bits), device, mod.bits,
                         mode, dtype)
    return cfg, dq.dense_route(m, mod.bits, dtype, device)


def _kernel_note(case: HeadlineCase, mod: nn.Module, m: int, device: torch.device,
                 dtype: torch.dtype) -> str | None:
    """The shipped config our op launches for this shape (``None`` when unknown)."""
    try:
        if case.family == "lowrank":
            from compress_ops.kernels import lowrank as kl

            fused = kl.fused_route(m, case.rank, False, device)
            return "fused" if fused else "route=two GEMMs (cuBLAS)"
        if case.family == "w8a8":
            from compress_ops.kernels import w8a8 as kw
            from compress_ops.ops.w8a8 import w8a8_route

            x = torch.empty(1, mod.in_features, device=device, dtype=dtype)
            route = w8a8_route(x, mod.qweight)
            if route != "triton":
                return f"route={route}"
            cfg = kw.gemm_tile(kw.select_config(m, mod.out_features, mod.in_features, device),
                               mod.in_features)
            return (f"config={cfg.name}" + (" (quantizes x itself)"
                                            if kw.fused_call(m, cfg, device)
                                            else " after _act_quant_kernel"))
        if case.family == "hashed":
            from compress_ops.kernels import hashed as kh

            cfg = kh.select_config(m, mod.out_features, mod.in_features, device, dtype)
            return f"config={getattr(cfg, 'name', cfg)}"
        if case.family == "sparse24":
            from compress_ops.kernels import sparse24 as ks

            cfg = ks.select_config(m, mod.values.shape[0], 2 * mod.values.shape[1], device,
                                   dtype in ks.HALF_DTYPES)
            return f"config={cfg.name}"
        cfg, dense = _shipped(mod, m, device, dtype)
        return "route=dequantize+F.linear" if dense else f"config={cfg.name}"
    except Exception:  # noqa: BLE001 - a note only
        return None


def headline_line(r: dict[str, Any]) -> str:
    """One printed line per headline row."""
    def t(v: float | None, n: int | None) -> str:
        return f"{v:9.1f} us ({n})" if v is not None else f"{'-':>9}"

    head = f"  M={r['M']:<5} {r['case']:<15} {r['provider']:<9}"
    errs = f"rel {r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}  {errs}{'  ' + r['note'] if r.get('note') else ''}"
    graph = t(r.get("graph_us"), r.get("graph_samples"))
    if r.get("graph_us") is None and r.get("graph_status") not in (None, "ok"):
        graph = str(r["graph_status"])[:80]
    return (f"{head} ok    eager {t(r.get('eager_us'), r.get('eager_samples'))}  graph {graph}"
            f"  {errs}{'  ' + r['note'] if r.get('note') else ''}")


def run_headline(device: torch.device, small: bool, record: Callable[[dict[str, Any]], None],
                 *, time_it: Callable[[Callable[[], object]], Timing] | None = None,
                 log: Callable[[str], None] = print) -> None:
    """Build the modules once, then for each M and case: ours, dense, torch's kernel."""
    import compress_ops  # noqa: F401  (registers the ops)

    ms, n, k, dts = headline_shapes(small)
    dt = DTYPES[dts]
    cuda = device.type == "cuda"
    if time_it is None:
        def time_it(fn: Callable[[], object]) -> Timing:
            if not cuda:
                return time_cpu_rehearsal(fn)
            return time_fn(fn, device, rep_ms=REP_MS, warmup_ms=WARMUP_MS)
    capture = cuda_graph_of if cuda else None
    g = torch.Generator(device=device).manual_seed(0)
    mods: dict[str, nn.Module | str] = {}
    dense_w: dict[str, torch.Tensor] = {}
    lin = nn.Linear(k, n, bias=False, dtype=dt, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, device=device, generator=g) * k**-0.5)
    for c in CASES:
        t0 = time.perf_counter()
        try:
            if c.kind == "lowrank":  # random factors: an SVD of the 8192^2 weight takes long
                mods[c.name] = _random_lowrank(k, n, c.rank, dt, device, g)
            else:
                mods[c.name] = build_linear_module(c.family, c.name, lin)
            with torch.no_grad():
                dense_w[c.name] = (_factor_product(mods[c.name]) if c.kind == "lowrank"
                                   else mods[c.name].dense_weight().contiguous())
            log(f"  built {c.name} ({time.perf_counter() - t0:.1f} s)")
        except Exception as ex:  # noqa: BLE001
            mods[c.name] = _error_text(ex)
            log(f"  build of {c.name} FAILED: {mods[c.name]}")
    del lin
    for m in ms:
        x = torch.randn(m, k, device=device, generator=g).to(dt)
        for c in CASES:
            base = {"case": c.name, "M": m, "N": n, "K": k, "dtype": dts}
            mod = mods[c.name]
            if isinstance(mod, str):
                for p in ("ours", "dense"):
                    record({**base, "provider": p, "status": f"error: build: {mod}"})
                continue
            w = dense_w[c.name]  # low rank: the factors' exact product, rounded once
            # (low rank: twice the tolerance, as in tests/kernels: x V^T is rounded first)
            tl_ = tol(dt, k) * (2.0 if c.kind == "lowrank" else 1.0)
            with torch.no_grad():
                ref = (F.linear(x.double(), mod.u.double() @ mod.v.double())
                       if c.kind == "lowrank" else F.linear(x.double(), w.double()))
                # W8A8: ours against its exact reference (the quantized activation's product),
                # the dense baseline against dense
                ref_ours, tl_ours = ((w8a8_ref(x, mod), w8a8_tol(dt, k, mod.qdtype, device))
                                     if c.kind == "w8a8" else (ref, tl_))
            with torch.no_grad():
                r = measure_provider(lambda mod=mod, x=x: mod(x), ref_ours, tl_ours,
                                     time_it=time_it, capture=capture,
                                     graph_skip="skipped (cpu)")
            record({**base, "provider": "ours", **r, "note": _kernel_note(c, mod, m, device, dt)})
            r = measure_provider(lambda w=w, x=x: F.linear(x, w), ref, tl_, time_it=time_it,
                                 capture=capture, graph_skip="skipped (cpu)")
            record({**base, "provider": "dense", **r,
                     "note": "F.linear (cuBLAS)" if cuda else "F.linear"})
            if c.kind == "w8a8":
                with torch.no_grad():
                    record({**base, "provider": c.native,
                            **_measure_w8a8_native(c, mod, x, ref_ours, device, time_it,
                                                   capture)})
            elif c.native is not None:
                record({**base, "provider": c.native,
                        **_measure_native(c, mod, x, ref, k, device, time_it, capture, tl_)})
            alt = _alt_fn(c, mod, x)  # the route not shipped at this M: settle it on the GPU
            if alt is not None:
                provider, fn, note = alt
                r = measure_provider(fn, ref, tol(dt, k), time_it=time_it, capture=capture,
                                     graph_skip="skipped (cpu)")
                record({**base, "provider": provider, **r, "note": note})
            del ref, ref_ours
            if cuda and not _cuda_context_ok(device):
                raise RuntimeError(f"the CUDA context is lost after M={m} {c.name} (see its "
                                   f"rows): the remaining rows were not run")
        del x
        if cuda:
            torch.cuda.empty_cache()
    run_headline_conv(device, small, record, time_it=time_it, capture=capture, log=log)


def run_headline_conv(device: torch.device, small: bool,
                      record: Callable[[dict[str, Any]], None], *,
                      time_it: Callable[[Callable[[], object]], Timing],
                      capture: Callable[[Callable[[], torch.Tensor]],
                                        tuple[Callable[[], None], torch.Tensor]] | None,
                      log: Callable[[str], None] = print) -> None:
    """The fused dw + pw conv on MobileNetV2 pairs (:data:`CONV_PAIRS`, batch 32, fp16,
    channels-last; ``--small``: tiny shapes, batch 2): ours (the op) and the cuDNN pair
    (``F.conv2d`` depthwise + bias + ReLU6, then the 1x1 ``F.conv2d`` + bias, recorded as the
    ``dense`` provider: the baseline), each checked against the float64 reference with twice
    the kernel tests' tolerance. ``M, N, K`` = ``B Ho Wo, Cout, C`` (the static model's
    row)."""
    from compress_ops.kernels.formats.dwsep_conv import output_size
    from compress_ops.reference import dwsep_conv2d_ref

    dts = headline_shapes(small)[3]
    dt = DTYPES[dts]
    batch = 2 if small else 32
    g = torch.Generator(device=device).manual_seed(1)
    op = torch.ops.compress_ops.dwsep_conv2d
    for h, c, cout, stride in CONV_PAIRS_SMALL if small else CONV_PAIRS:
        ho, wo = output_size(h, h, 3, stride, (1, 1, 1, 1))
        base = {"case": conv_config(h, c, cout, stride), "M": batch * ho * wo, "N": cout,
                "K": c, "dtype": dts}
        try:
            x = torch.randn(batch, c, h, h, device=device, generator=g).to(dt).contiguous(
                memory_format=torch.channels_last)
            # tap-major, as FusedDWSepConv2d stores it (the kernel's vector loads)
            dw = (torch.randn(3, 3, c, device=device, generator=g) / 3).to(dt).permute(2, 0, 1)
            dwb = torch.randn(c, device=device, generator=g).to(dt)
            pw = (torch.randn(cout, c, device=device, generator=g) * c**-0.5).to(dt)
            pwb = torch.randn(cout, device=device, generator=g).to(dt)
            ref = dwsep_conv2d_ref(x, dw, dwb, pw, pwb, None, stride, [1, 1, 1, 1], "relu6",
                                   "none", dtype=torch.float64)
        except Exception as ex:  # noqa: BLE001
            for p in ("ours", "dense"):
                record({**base, "provider": p, "status": f"error: build: {_error_text(ex)}"})
            continue
        tl_ = 2.0 * tol(dt, c * 9)
        dw4, pw4 = dw.unsqueeze(1), pw[:, :, None, None]

        def ours(x=x, dw=dw, dwb=dwb, pw=pw, pwb=pwb, stride=stride) -> torch.Tensor:
            return op(x, dw, dwb, pw, pwb, None, stride, [1, 1, 1, 1], "relu6", "none")

        def cudnn(x=x, dw4=dw4, dwb=dwb, pw4=pw4, pwb=pwb, stride=stride, c=c) -> torch.Tensor:
            t = F.relu6(F.conv2d(x, dw4, dwb, stride, 1, groups=c))
            return F.conv2d(t, pw4, pwb)

        with torch.no_grad():
            r = measure_provider(ours, ref, tl_, time_it=time_it, capture=capture,
                                 graph_skip="skipped (cpu)")
            record({**base, "provider": "ours", **r, "note": "fused dw+pw (one launch)"})
            r = measure_provider(cudnn, ref, tl_, time_it=time_it, capture=capture,
                                 graph_skip="skipped (cpu)")
            record({**base, "provider": "dense", **r,
                    "note": "cuDNN pair: conv2d dw + ReLU6, conv2d 1x1" if device.type == "cuda"
                    else "two ATen convolutions"})
        log(f"  conv pair {base['case']} done")
        del x, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _random_lowrank(k: int, n: int, rank: int, dtype: torch.dtype, device: torch.device,
                    g: torch.Generator) -> nn.Module:
    """A ``LowRankLinear`` with random factors (no bias) whose product has dense-like scale."""
    from compress_ops.nn import LowRankLinear

    mod = LowRankLinear(k, n, rank, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        mod.u.copy_(torch.randn(n, rank, device=device, generator=g) * rank**-0.5)
        mod.v.copy_(torch.randn(rank, k, device=device, generator=g) * k**-0.5)
    return mod


def _factor_product(mod: nn.Module) -> torch.Tensor:
    """``U V`` in float64, rounded once to the factors' dtype (the dense baseline's weight)."""
    return (mod.u.double() @ mod.v.double()).to(mod.u.dtype).contiguous()


GEMV_ALT = "ours-gemv"  # M = 1 through the fields GEMV instead of the 16-row tile
FUSED_ALT = "ours-fused"  # the large-M route's M through the fused GEMM instead
ALTS = (GEMV_ALT, FUSED_ALT)


def _alt_fn(case: HeadlineCase, mod: nn.Module, x: torch.Tensor
            ) -> tuple[str, Callable[[], torch.Tensor], str] | None:
    """``(provider, call, note)`` of the route a call at this M does not take, where the
    choice rests on a prediction: the GEMV at M = 1 (:func:`_gemv_alt_fn`); the fused GEMM
    with its shipped tile where the large-M route (dequantize once + cuBLAS,
    ``kernels/dequant.dense_route``) is taken. None elsewhere."""
    m = x.shape[0]
    if case.family in ("lowrank", "w8a8"):  # lowrank: the two-gemm provider; w8a8: one route
        return None
    if case.family == "hashed":  # fp16 M = 1 ships the 16-row tile (gemv_max_m_half = 0)
        return (GEMV_ALT, *_hashed_gemv_alt_fn(mod, x)) if m == 1 else None
    if case.family == "sparse24":  # fp16 M = 1 ships the 16-row tile (gemv_max_m_half = 0)
        return (GEMV_ALT, *_sparse24_gemv_alt_fn(mod, x)) if m == 1 else None
    if m == 1:
        return (GEMV_ALT, *_gemv_alt_fn(case, mod, x))
    cfg, dense = _shipped(mod, m, x.device, x.dtype)
    if not dense:
        return None
    return FUSED_ALT, kernel_fn(mod, x, cfg), f"config={cfg.name} (forced)"


def _hashed_gemv_alt_fn(mod: nn.Module, x: torch.Tensor
                        ) -> tuple[Callable[[], torch.Tensor], str]:
    """The hashed GEMV forced (the fp32 path's config) where the 16-row tile ships."""
    from compress_ops.kernels import hashed as kh

    cfg = kh.select_config(1, mod.out_features, mod.in_features, x.device, torch.float32)
    return (lambda: kh.hashed_matmul(x, mod.w, None, mod.out_features, mod.in_features,
                                     mod.seed, config=cfg),
            f"config={cfg.name} (forced)")


def _gemv_alt_fn(case: HeadlineCase, mod: nn.Module, x: torch.Tensor
                 ) -> tuple[Callable[[], torch.Tensor], str]:
    """At M = 1, our fields GEMV (the ``gemv`` table's ``1`` entry) instead of the 16-row
    tensor-core tile that fp16 M = 1 ships (``gemv_max_m_half = 0`` in
    ``kernels/configs/dequant.json``) on the same packed weight: the static model predicts
    the tile above the GEMV (int4: 3.11x against 2.74x under Triton 3.9, 2.49x against 2.29x
    under 3.6; int8 level), so one GPU run confirms or reverses that choice."""
    from compress_ops.kernels.tuning import KernelConfig, load_tables

    cfg = KernelConfig("gemv", **load_tables("dequant")["default"]["gemv"]["1"])
    return kernel_fn(mod, x, cfg), f"config={cfg.name} (forced)"


def _sparse24_gemv_alt_fn(mod: nn.Module, x: torch.Tensor
                          ) -> tuple[Callable[[], torch.Tensor], str]:
    """At M = 1, the 2:4 GEMV (the ``gemv`` table's ``1`` entry) instead of the 16-row tile
    that fp16 ships (``kernels/configs/sparse24.json``): the static model predicts the tile
    faster (1.53x against 0.86x dense under Triton 3.9), one GPU run settles it."""
    from compress_ops.kernels import sparse24 as ks
    from compress_ops.kernels.tuning import KernelConfig, load_tables

    cfg = KernelConfig("gemv", **load_tables("sparse24")["default"]["gemv"]["1"])
    return (lambda: ks.sparse24_matmul(x, mod.values, mod.meta, config=cfg),
            f"config={cfg.name} (forced)")


def kernel_fn(mod: nn.Module, x: torch.Tensor, cfg: Any, checked: bool = False
              ) -> Callable[[], torch.Tensor]:
    """A call of the low-bit kernel entry on ``mod``'s packed weight with ``cfg`` forced
    (``checked``: the inputs are not validated again)."""
    from compress_ops.kernels import dequant as dq

    if hasattr(mod, "codebook"):
        return lambda: dq.codebook_matmul(x, mod.indices, mod.codebook, None, mod.bits,
                                          config=cfg, checked=checked)
    return lambda: dq.dequant_matmul(x, mod.qweight, mod.scales, mod.zeros, None, mod.bits,
                                     mod.group_size, config=cfg, checked=checked)


def _measure_native(c: HeadlineCase, mod: nn.Module, x: torch.Tensor, ref: torch.Tensor,
                    k: int, device: torch.device, time_it, capture,
                    tolerance: float | None = None) -> dict[str, Any]:
    if c.native in ("tinygemm", "semi") and device.type != "cuda":
        return {"status": f"skipped: {c.native} is CUDA-only here (CPU rehearsal)"}
    try:
        fn, tol_dtype, note = _native_fn(c, mod, x)
    except Exception as ex:  # noqa: BLE001 - torch-private: record, never crash
        return {"status": f"unavailable: {_error_text(ex).removeprefix('error: ')}"}
    tolerance = tol(tol_dtype, k) if tolerance is None else tolerance
    r = measure_provider(fn, ref, tolerance, time_it=time_it, capture=capture,
                         graph_skip="skipped (cpu)", error_status="unavailable")
    return {**r, "note": note}


def _measure_w8a8_native(c: HeadlineCase, mod: nn.Module, x: torch.Tensor, ref: torch.Tensor,
                         device: torch.device, time_it, capture) -> dict[str, Any]:
    """torch's own 8-bit GEMM on the activation quantized beforehand (by the format's rule,
    outside the timing) and ``mod``'s stored levels: ``int-mm``, ``torch._int_mm`` (int8 x int8
    -> int32, no scaling; checked bit for bit against the exact int32 product; CUDA: M > 16
    only, cuBLASLt's limit); ``scaled-mm``, ``torch._scaled_mm`` with the row scales of x and
    the column scales of the weight (FP8, the scaling and the output dtype in the GEMM; checked
    against the exact reference with :func:`w8a8_tol`; bf16 output where x's dtype is
    refused). A call torch cannot make here is ``unavailable: <reason>``."""
    from compress_ops.kernels.formats.w8a8 import quantize_activation

    m, k = x.shape
    if c.native == "int-mm" and device.type == "cuda" and m <= 16:
        return {"status": "skipped: torch._int_mm needs M > 16 on CUDA"}
    try:
        q, s_x = quantize_activation(x, mod.qweight.dtype, mod.input_scale, mod.smooth)
        wt = mod.qweight.t()  # [K, N] column-major: the layout cuBLASLt's 8-bit GEMMs take
        if c.native == "int-mm":
            fn = lambda: torch._int_mm(q, wt)  # noqa: E731
            ref, tolerance = q.double() @ mod.qweight.double().t(), 0.0  # exact: bit for bit
            note = "torch._int_mm on the pre-quantized x: int32 out, no scaling"
        elif c.native == "scaled-mm":
            sa, sb = s_x[:, None].float().contiguous(), mod.w_scales[None, :].float().contiguous()
            fn, errors = None, []
            for out_dtype in dict.fromkeys((x.dtype, torch.bfloat16)):
                def call(out_dtype=out_dtype) -> torch.Tensor:
                    return torch._scaled_mm(q, wt, sa, sb, out_dtype=out_dtype)
                try:
                    call()
                    fn = call
                    break
                except Exception as ex:  # noqa: BLE001 - the next output dtype, else recorded
                    errors.append(f"{short_dtype(out_dtype)} out: "
                                  f"{_error_text(ex).removeprefix('error: ')}")
            if fn is None:
                return {"status": f"unavailable: {'; '.join(errors)}"[:400]}
            tolerance = w8a8_tol(out_dtype, k, mod.qdtype, device)
            note = (f"torch._scaled_mm on the pre-quantized x, row x column scales, "
                    f"{short_dtype(out_dtype)} out")
        else:
            raise ValueError(f"no native kernel for {c.name}")
    except Exception as ex:  # noqa: BLE001 - torch-private: record, never crash
        return {"status": f"unavailable: {_error_text(ex).removeprefix('error: ')}"}
    r = measure_provider(fn, ref, tolerance, time_it=time_it, capture=capture,
                         graph_skip="skipped (cpu)", error_status="unavailable")
    return {**r, "note": note}


# ---------------------------------------------------------------------------------------------
# Static model: pick its file, join, print
# ---------------------------------------------------------------------------------------------

STATIC_RE = re.compile(r"^static-triton(?P<ver>.+)\.json$")
STATIC_KEYS = ("config", "M", "N", "K", "dtype")


def version_tuple(v: str) -> tuple[int, ...]:
    """``"3.6.0"`` -> ``(3, 6, 0)`` (the leading numbers, at most three)."""
    nums = re.findall(r"\d+", v)[:3]
    return tuple(int(x) for x in nums) + (0,) * (3 - len(nums))


def pick_static(triton_version: str, static_dir: Path) -> tuple[Path | None, str]:
    """The static file of ``triton_version`` in ``static_dir``, else the nearest version's:
    ``(path or None, a sentence saying which and why)``."""
    exact = static_dir / f"static-triton{triton_version}.json"
    if exact.is_file():
        return exact, f"static model of this Triton ({triton_version}): {exact.name}"
    found = []
    for p in sorted(static_dir.glob("static-triton*.json")) if static_dir.is_dir() else []:
        m = STATIC_RE.match(p.name)
        if m:
            found.append((version_tuple(m["ver"]), m["ver"], p))
    if not found:
        return None, (f"no static model file (static-triton*.json) in {static_dir}: "
                      f"no predictions to compare")
    want = version_tuple(triton_version)

    def distance(item: tuple) -> tuple:
        v = item[0]
        return (abs(v[0] - want[0]), abs(v[1] - want[1]), abs(v[2] - want[2]), v < want)

    v, ver, p = min(found, key=distance)
    return p, (f"no static-triton{triton_version}.json; using the nearest version's, "
               f"{p.name} (Triton {ver})")


def load_static(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """``(rows, meta, problems)`` of a static model file; rows missing a join key are dropped
    (and named in ``problems``)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as ex:
        return [], {}, [f"cannot read {path}: {ex}"]
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        return [], {}, [f"{path}: expected {{'meta': ..., 'rows': [...]}}"]
    rows, problems = [], []
    for i, r in enumerate(obj["rows"]):
        missing = [k for k in STATIC_KEYS if not isinstance(r, dict) or r.get(k) is None]
        if missing:
            problems.append(f"static row {i}: missing {missing}")
        else:
            rows.append(r)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return rows, meta, problems


def join_predictions(measured: Iterable[dict[str, Any]], static_rows: Iterable[dict[str, Any]],
                     *, static_file: str | None = None) -> list[dict[str, Any]]:
    """One record per measured ``ours`` row: its static prediction on (config, M, N, K, dtype),
    the measured times (eager and graph), ``predicted / measured``, and the predicted speedup
    against the measured one (ours vs the dense row measured next to it). A measured row without
    a static row keeps ``predicted_us: null``."""
    measured = list(measured)
    static: dict[tuple, dict[str, Any]] = {}
    for s in static_rows:
        try:
            static.setdefault((s["config"], int(s["M"]), int(s["N"]), int(s["K"]),
                               short_dtype(s["dtype"])), s)
        except (KeyError, TypeError, ValueError):
            continue
    dense = {_key(r): r for r in measured if r.get("provider") == "dense"}
    ours = {_key(r): r for r in measured if r.get("provider") == "ours"}
    out = []
    for r in measured:
        if r.get("provider") != "ours":
            continue
        key = _key(r)
        s, d = static.get(key, {}), dense.get(key, {})
        case = _CASE_BY_NAME.get(key[0])
        pred = s.get("predicted_us")
        rec: dict[str, Any] = {
            "config": key[0], "M": key[1], "N": key[2], "K": key[3], "dtype": key[4],
            "status": r.get("status"),
            "kernel": s.get("kernel"), "static_file": static_file if s else None,
            "static_triton": s.get("triton"),
            "predicted_us": pred, "predicted_dense_us": s.get("predicted_dense_us"),
            "predicted_speedup": s.get("predicted_speedup"),
            "measured_eager_us": r.get("eager_us"), "measured_graph_us": r.get("graph_us"),
            "measured_dense_eager_us": d.get("eager_us"),
            "measured_dense_graph_us": d.get("graph_us"),
        }
        for mode in ("eager", "graph"):
            t, td = rec[f"measured_{mode}_us"], rec[f"measured_dense_{mode}_us"]
            rec[f"pred_over_{mode}"] = (pred / t) if (pred and t) else None
            rec[f"measured_speedup_{mode}"] = (td / t) if (t and td) else None
        if rec["predicted_speedup"] is None and pred and rec["predicted_dense_us"]:
            rec["predicted_speedup"] = rec["predicted_dense_us"] / pred
        if case is not None and case.versus is not None:
            # against the versus case (W8A8: int8 weight-only), predicted and measured
            vkey = (case.versus, *key[1:])
            sv, rv = static.get(vkey, {}), ours.get(vkey, {})
            pv = sv.get("predicted_us")
            rec["versus"] = case.versus
            rec["predicted_vs"] = (pv / pred) if (pv and pred) else None
            for mode in ("eager", "graph"):
                t, tv = rec[f"measured_{mode}_us"], rv.get(f"{mode}_us")
                rec[f"measured_vs_{mode}"] = (tv / t) if (t and tv) else None
        out.append(rec)
    return out


def _f(v: float | None, fmt: str = "8.1f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(int(fmt.split(".")[0]))


def predictions_table(pvm: list[dict[str, Any]]) -> list[str]:
    """The predicted-vs-measured table, one line per measured row (and under a row with a
    ``versus`` case, its time / this one's: predicted, measured eager and graph)."""
    lines = [f"  {'config':<15} {'M':>5} {'pred us':>8} {'eager us':>8} {'graph us':>8} "
             f"{'pred/eag':>8} {'pred/gr':>8} {'pred x':>7} {'meas x e':>8} {'meas x g':>8}"]
    for p in pvm:
        lines.append(
            f"  {p['config']:<15} {p['M']:>5} {_f(p['predicted_us'])} "
            f"{_f(p['measured_eager_us'])} {_f(p['measured_graph_us'])} "
            f"{_f(p['pred_over_eager'], '8.2f')} {_f(p['pred_over_graph'], '8.2f')} "
            f"{_f(p['predicted_speedup'], '7.2f')} {_f(p['measured_speedup_eager'], '8.2f')} "
            f"{_f(p['measured_speedup_graph'], '8.2f')}")
        if p.get("versus"):
            lines.append(
                f"  {'  x ' + p['versus']:<21} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} "
                f"{_f(p.get('predicted_vs'), '7.2f')} {_f(p.get('measured_vs_eager'), '8.2f')} "
                f"{_f(p.get('measured_vs_graph'), '8.2f')}")
    return lines


def headline_table(rows: list[dict[str, Any]]) -> list[str]:
    """Compact table: one line per (case, M) with every provider's eager / graph time."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["case"], r["M"]), {})[r["provider"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'':>17}"
        if r.get("eager_us") is None:  # skipped / unavailable / wrong / error
            return f"{str(r.get('status')).split(':')[0][:17]:>17}"
        g = _f(r.get("graph_us"), "7.1f")
        return f"{r['eager_us']:8.1f} /{g}"

    lines = [f"  {'case':<15} {'M':>5} {'ours e / g us':>17} {'dense e / g us':>17} "
             f"{'torch native e / g us':>28} {'x dense e / g':>14}"]
    for (case, m), p in by.items():
        nat = next((p[k] for k in p if k not in ("ours", "dense", *ALTS)), None)
        ours = p.get("ours") or {}
        sp = (f"{_f(ours.get('speedup_eager'), '6.2f')} /{_f(ours.get('speedup_graph'), '6.2f')}"
              if ours.get("speedup_eager") else "")
        nat_txt = f"{nat['provider']:<9} {cell(nat)}" if nat else f"{'':<9} {cell(None)}"
        lines.append(f"  {case:<15} {m:>5} {cell(p.get('ours'))} {cell(p.get('dense'))} "
                     f"{nat_txt:>28} {sp:>14}")
        if ours.get("versus"):  # ours against the versus case's ours (> 1: this one faster)
            vs = f"{_f(ours.get('vs_eager'), '6.2f')} /{_f(ours.get('vs_graph'), '6.2f')}"
            lines.append(f"  {'  x ' + ours['versus']:<21} {'':>17} {'':>17} {'':>28} "
                         f"{vs:>14}")
        for alt in (a for a in ALTS if a in p):  # the route not shipped, under "ours"
            tc = p[alt]
            sp = (f"{_f(tc.get('speedup_eager'), '6.2f')} /{_f(tc.get('speedup_graph'), '6.2f')}"
                  if tc.get("speedup_eager") else "")
            lines.append(f"  {'  ' + alt:<15} {m:>5} {cell(tc)} {'':>17} {'':>28} {sp:>14}")
    return lines


# ---------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------


def quick_path(device_label: str, *, out_dir: Path | None = None,
               date: _dt.date | None = None) -> Path:
    """``<dir>/<YYYY-MM-DD>-quick-<device slug>.json``: ``dir`` is ``out_dir``, else
    ``$OUT/results`` when ``OUT`` is set, else the default results folder."""
    if out_dir is None:
        out_dir = (Path(os.environ["OUT"]) / "results" if os.environ.get("OUT")
                   else schema.default_results_dir())
    date = date or _dt.date.today()
    return Path(out_dir) / f"{date.isoformat()}-quick-{machine.device_slug(device_label)}.json"


class QuickResults:
    """The one JSON file of a quick check, rewritten (atomically) on every :meth:`add`."""

    SECTIONS = ("smoke", "rows", "predicted_vs_measured")

    def __init__(self, path: Path, meta: dict[str, Any], *, resume: bool = False) -> None:
        self.path = Path(path)
        self.obj: dict[str, Any] = {"schema": SCHEMA, "meta": {}, "smoke": [], "rows": [],
                                    "predicted_vs_measured": []}
        if resume and self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("schema") == SCHEMA:
                for k in self.SECTIONS:
                    if isinstance(old.get(k), list):
                        self.obj[k] = old[k]
                if isinstance(old.get("meta"), dict):
                    self.obj["meta"] = old["meta"]
        self.obj["meta"] = {**self.obj["meta"], **meta,
                            "steps": dict(self.obj["meta"].get("steps") or {})}

    @property
    def meta(self) -> dict[str, Any]:
        return self.obj["meta"]

    def section(self, name: str) -> list[dict[str, Any]]:
        return self.obj[name]

    def reset(self, name: str) -> None:
        """Empty one section (a step that runs again replaces its rows)."""
        self.obj[name] = []
        self.save()

    def add(self, name: str, record: dict[str, Any]) -> None:
        """Append one record to a section and rewrite the file."""
        self.obj[name].append(record)
        if name == "rows":
            fill_speedups(self.obj["rows"])
        self.save()

    def set_step(self, step: str, **fields: Any) -> None:
        self.meta["steps"][step] = {**self.meta["steps"].get(step, {}), **fields}
        self.save()

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.obj, indent=1, default=_json_default) + "\n")
        tmp.replace(self.path)
        return self.path


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(obj: Any) -> Any:
    """NaN / Inf floats -> None (JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def gpu_info(device: torch.device) -> dict[str, Any]:
    """Name, SMs, memory and clocks of the GPU (what torch and ``nvidia-smi`` say)."""
    if device.type != "cuda":
        return {"gpu": None, "sms": None, "clocks": None}
    p = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {"gpu": p.name, "sms": p.multi_processor_count,
                            "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    for attr in ("L2_cache_size", "clock_rate", "memory_clock_rate", "memory_bus_width"):
        v = getattr(p, attr, None)
        if v is not None:
            info[attr] = v
    fields = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader",
                              f"--id={device.index or 0}"], capture_output=True, text=True,
                             timeout=15, check=True).stdout.strip().splitlines()[0]
        info["clocks"] = dict(zip(fields.split(","), (v.strip() for v in out.split(",")),
                                  strict=False))
    except (OSError, subprocess.SubprocessError, IndexError) as ex:
        info["clocks"] = f"unavailable: {type(ex).__name__}"
    return info


def make_meta(device: torch.device, small: bool, argv: list[str]) -> dict[str, Any]:
    env = machine.make_env(device)
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": env.git_sha, "torch": env.torch, "triton": env.triton,
            "device": env.device, "backend": machine.backend_name(device),
            **gpu_info(device), "small": small,
            "cpu_backend": (os.environ.get("COMPRESS_OPS_CPU_BACKEND", "reference")
                            if device.type == "cpu" else None),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "autotune": False, "python": platform.python_version(),
            "host": machine.cpu_model(), "load_avg": machine.load_avg(), "argv": argv,
            "timing": ("eager: compress_ops.perf.timing.time_fn (CUDA: triton do_bench, L2 "
                       f"flushed before each sample, median, >= 50 samples, rep {REP_MS} ms); "
                       "graph: the replay of a CUDA graph holding one call, timed the same way"
                       if device.type == "cuda" else
                       f"CPU rehearsal: perf_counter median of {CPU_SAMPLES} runs "
                       "(interpreted kernels: not a measurement)"),
            "tolerance": ("||y - ref|| / ||ref|| against float64; fp16 2e-3, bf16 1.6e-2, "
                          "fp32 1e-5 sqrt(K) (tests/kernels/tolerances.py); x2 for low rank "
                          "and the conv; W8A8 against its exact reference (quantized x, exact "
                          "product, the format's epilogue): half an output ulp (fp16 2^-11, "
                          f"bf16 2^-8), FP8 plus {FP8_GPU_ACC:g} on CUDA (sqrt(K) 2^-24 "
                          "elsewhere); torch._int_mm bit-exact")}


# ---------------------------------------------------------------------------------------------
# Steps and the command line
# ---------------------------------------------------------------------------------------------


def step_smoke(res: QuickResults, device: torch.device, small: bool, workers: int) -> int:
    cases = smoke_cases(small)
    print(f"smoke: {len(cases)} cases on {device} ({workers} worker"
          f"{'s' if workers != 1 else ''}); rel = ||y - ref|| / ||ref|| vs float64")
    res.reset("smoke")
    order = {c.name: i for i, c in enumerate(cases)}

    def record(r: dict[str, Any]) -> None:
        print(smoke_line(r), flush=True)
        res.section("smoke").append(_finite(r))
        res.section("smoke").sort(key=lambda x: order.get(x.get("name"), 1 << 30))
        res.save()

    run_smoke(cases, device, workers, record)
    res.save()
    fails = [r for r in res.section("smoke") if r["status"] != "ok"]
    print(f"smoke: {len(res.section('smoke')) - len(fails)} ok, {len(fails)} FAIL")
    return 1 if fails else 0


def step_headline(res: QuickResults, device: torch.device, small: bool) -> int:
    ms, n, k, dts = headline_shapes(small)
    print(f"headline: M in {ms}, N = K = {n}, {dts}; per (M, case): ours, dense, torch native; "
          f"eager{' and CUDA graph' if device.type == 'cuda' else ''}")
    res.reset("rows")

    def record(r: dict[str, Any]) -> None:
        res.add("rows", _finite(r))
        print(headline_line(res.section("rows")[-1]), flush=True)

    run_headline(device, small, record)
    bad = [r for r in res.section("rows") if r["provider"] in ("ours", "dense")
           and r["status"] != "ok"]
    return 1 if bad else 0


def step_table(res: QuickResults, static_dir: Path) -> int:
    rows = res.section("rows")
    triton_v = str(res.meta.get("triton") or machine.triton_version())
    path, note = pick_static(triton_v, static_dir)
    print(f"table: {note}")
    static_info: dict[str, Any] = {"file": path.name if path else None, "note": note}
    pvm: list[dict[str, Any]] = []
    if path is not None:
        srows, smeta, problems = load_static(path)
        static_info.update(rows=len(srows), triton=smeta.get("triton"), problems=problems[:20])
        for p in problems[:5]:
            print(f"  {p}")
        pvm = join_predictions(rows, srows, static_file=path.name)
        matched = sum(1 for p in pvm if p["predicted_us"] is not None)
        static_info["matched"] = matched
        print(f"  {matched} of {len(pvm)} measured rows have a prediction "
              f"({len(srows)} static rows)")
    res.meta["static"] = static_info
    res.reset("predicted_vs_measured")
    for p in pvm:
        res.add("predicted_vs_measured", _finite(p))
    if pvm:
        print("predicted vs measured (us; x = speedup vs dense; e = eager, g = CUDA graph):")
        print("\n".join(predictions_table(pvm)))
    return 0


def step_summary(res: QuickResults, step: str) -> str:
    """One line on what a step left in the file (the shell script's summary quotes it)."""
    if step == "smoke":
        smoke = res.section("smoke")
        fails = sum(1 for r in smoke if r.get("status") != "ok")
        return f"{len(smoke)} cases: {len(smoke) - fails} ok, {fails} FAIL"
    if step == "headline":
        counts: dict[str, int] = {}
        for r in res.section("rows"):
            st = str(r.get("status")).split(":")[0]
            counts[st] = counts.get(st, 0) + 1
        graphs = sum(1 for r in res.section("rows") if r.get("graph_us") is not None)
        return (f"{len(res.section('rows'))} rows ("
                + ", ".join(f"{n} {k}" for k, n in counts.items()) + f"), {graphs} graph-timed")
    pvm = res.section("predicted_vs_measured")
    matched = sum(1 for p in pvm if p.get("predicted_us") is not None)
    static = (res.meta.get("static") or {}).get("file") or "no static file"
    return f"{matched} of {len(pvm)} rows with a prediction ({static})"


def print_summary(res: QuickResults) -> None:
    """The compact text table of everything in the file."""
    m = res.meta
    print(f"\nquick check: {m.get('device')} sha={m.get('git_sha')} torch={m.get('torch')} "
          f"triton={m.get('triton')} SMs={m.get('sms')} -> {res.path}")
    smoke = res.section("smoke")
    fails = [r for r in smoke if r.get("status") != "ok"]
    print(f"smoke: {len(smoke)} cases, {len(smoke) - len(fails)} ok, {len(fails)} FAIL")
    for r in fails:
        print(smoke_line(r))
    rows = res.section("rows")
    if rows:
        print("headline (us, eager / CUDA graph; x dense = dense time / ours):")
        print("\n".join(headline_table(rows)))
    for step, st in (m.get("steps") or {}).items():
        print(f"  step {step}: {st.get('status')} ({st.get('seconds', '?')} s)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quick_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true",
                   help="tiny shapes (CPU rehearsal: M in {1, 16}, N = K = 256)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--out", type=Path, default=None, help="the results JSON")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="folder of <date>-quick-<device>.json (default: $OUT/results, else "
                        "perf/results of a checkout)")
    p.add_argument("--resume", action="store_true",
                   help="keep the other steps' sections of an existing file")
    p.add_argument("--workers", type=int, default=None,
                   help="smoke processes (default: 8 on CUDA, at most the CPUs; 1 on the CPU)")
    p.add_argument("--static-dir", type=Path, default=machine.PERF_DIR / "results",
                   help="where static-triton*.json files are (default: perf/results)")
    p.add_argument("--print-path", action="store_true",
                   help="print the results path and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the steps; 0 when every case and every ours/dense row passed, 1 otherwise, 2 on
    bad arguments, 130 when interrupted (the file keeps what was measured)."""
    args = _parse(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"quick_check: unknown steps {unknown}; known: {list(STEPS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("quick_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    path = args.out or quick_path(machine.device_name(device), out_dir=args.out_dir)
    if args.print_path:
        print(path)
        return 0
    os.environ.pop("COMPRESS_OPS_AUTOTUNE", None)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        os.environ.setdefault("COMPRESS_OPS_CPU_BACKEND", "triton")
    workers = args.workers if args.workers is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    # the table step alone (its own short time limit) reads the file; it measures nothing
    table_only = args.resume and set(steps) <= {"table"} and path.is_file()
    meta = {"argv_table": argv_list} if table_only else make_meta(device, args.small, argv_list)
    res = QuickResults(path, meta, resume=args.resume)
    res.save()
    print(f"quick_check: device={res.meta['device']} torch={res.meta['torch']} "
          f"triton={res.meta['triton']} sha={res.meta['git_sha']} -> {path}", flush=True)
    rc = 0
    for step in steps:
        t0 = time.perf_counter()
        res.set_step(step, status="running", started=_dt.datetime.now(_dt.timezone.utc)
                     .isoformat(timespec="seconds"))
        try:
            if step == "smoke":
                step_rc = step_smoke(res, device, args.small, workers)
            elif step == "headline":
                step_rc = step_headline(res, device, args.small)
            else:
                step_rc = step_table(res, args.static_dir)
            status = "done" if step_rc == 0 else "done with failures"
        except KeyboardInterrupt:
            summary = step_summary(res, step)
            res.set_step(step, status="interrupted", seconds=round(time.perf_counter() - t0, 1),
                         summary=summary)
            print(f"== {step}: interrupted after {time.perf_counter() - t0:.1f} s; {summary} "
                  f"(kept in {path})", flush=True)
            return 130
        except Exception as ex:  # noqa: BLE001 - record the crash, then go on
            traceback.print_exc()
            step_rc, status = 1, f"crashed: {_error_text(ex)}"
        summary = step_summary(res, step)
        res.set_step(step, status=status, seconds=round(time.perf_counter() - t0, 1),
                     summary=summary)
        print(f"== {step}: {status} in {time.perf_counter() - t0:.1f} s; {summary}", flush=True)
        rc = rc or step_rc
    if "table" in steps:
        print_summary(res)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
