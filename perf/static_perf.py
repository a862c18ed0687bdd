"""Static performance model: predict each shipped kernel's time on an H200 from its SASS, no GPU.

For every case (family, format, M) at the headline shapes (fp16, N = K = 8192) this

1. calls the op's real launcher with CPU tensors of that shape inside
   :func:`~compress_ops.kernels.tuning.simulate_gpu` (the H200's name and 132 SMs) and
   :func:`~compress_ops.kernels.launches.capture` (``run=False``): the launcher picks its config,
   grid, arguments and extra torch kernels exactly as a real call on that GPU would, and the
   model records them instead of launching;
2. compiles each recorded Triton launch for sm_90 with the **specialization Triton computes for
   those arguments** (Triton's own binder, ``create_function_from_signature`` + ``_pack_args``:
   the divisibility-16 attributes of pointers and ints, the ints equal to 1), so the SASS read
   here is the SASS the call runs; nothing is listed by hand;
3. reads the SASS (``cuobjdump`` from Triton's wheel): the main loop (the first backward
   branch: the K loop), its instruction mix, registers, shared memory;
4. counts **instructions per weight**: what one thread executes for the weights it handles,
   ``(straight-line code + main-loop body x trips) / weights per thread``. The prologue,
   epilogue, reductions and any other loop (run once) are in the straight-line part, so work
   moved out of the loop still counts; ``instr_per_weight_per_call`` multiplies it by the
   times a call dequantizes each weight (``weight_passes``: its row tiles, ``ceil(M /
   BLOCK_M)``; 1 for the large-M route's dequantizing kernel, whose GEMM is cuBLAS's, modelled
   as dense's own roofline);
5. predicts the time of the call: per launch, the largest of
   * memory: unique HBM bytes / ``min(4.8 TB/s, weight bytes in flight x active SMs / latency)``
     (Little's law: a kernel with too few loads in flight cannot reach the peak),
   * issue: warp instructions per SM / (schedulers x 1.98 GHz), with as many schedulers as
     resident warps up to 4 (a warp stays on one SM sub-partition: a CTA of 2 warps alone
     on an SM issues from 2 of its 4 schedulers),
   * tensor cores: the padded tile FLOPs / the HGMMA peak (HMMA: half of it; 8-bit operands,
     IGMMA / QGMMA and IMMA / FP8 HMMA: ``mma8_factor`` times those),
   plus a fixed cost per launch; the same roofline for dense cuBLAS (one launch, its bytes at
   4.8 TB/s, its FLOPs at the HGMMA peak) gives the predicted speedup.

W8A8 (``W8A8Case``: 8-bit weights and activations, int8 and FP8) is one call of two launches,
the activation quantization (its own memory / issue roofline, :func:`model_act_quant`) and
the 8-bit GEMM; its rows also carry ``predicted_speedup_vs_int8_weight_only``, against the
low-bit family's ``int8 row sym`` call at the same M.

The constants are leads, not truths (``MODEL``, written into the JSON's meta). Calibrate them
whenever a GPU is lent (``perf/gpu_check.sh --quick`` prints predicted against measured).

Budgets per family live in ``kernels/configs/budgets.json``; ``--check`` exits non-zero when a
shipped config breaks one (CI runs it under the installed Triton and the GPU image's 3.6).

    python -m compress_ops.perf.static_perf [--check] [--json PATH] [--markdown]   # make perf-model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL = {
    "gpu": "NVIDIA H200",
    "arch": 90,
    "sms": 132,
    "clock_hz": 1.98e9,
    "schedulers_per_sm": 4,
    "hbm_bytes_per_s": 4.8e12,
    "hbm_latency_s": 0.8e-6,  # 29 KB in flight per SM saturates 4.8 TB/s
    "hgmma_flops_per_s": 790e12,  # fp16/bf16 dense, measured on this workplace's H200s
    "hmma_fraction": 0.5,  # mma.sync against wgmma (a lead)
    # int8 / FP8 tensor cores against fp16's (the datasheet's dense ratio on sm_90; a lead)
    "mma8_factor": 2.0,
    "launch_us": 1.0,  # per kernel: start, ramp and drain (a lead; CUDA-graph scale)
    # a grid-wide handoff inside one launch (low rank's two phases): a release fence, a
    # counter atomic, the poll that sees it and an L2 read, about four L2 round trips (a lead)
    "grid_sync_us": 0.5,
    "regs_per_sm": 65536,
    "smem_per_sm": 233472,  # 228 KiB
    "smem_per_cta_reserved": 1024,
    "max_warps_per_sm": 64,
    "max_ctas_per_sm": 32,
}
HEADLINE = {"N": 8192, "K": 8192, "M": (1, 16, 64, 2048), "dtype": "fp16"}
BUDGETS = Path(__file__).resolve().parent.parent / "kernels" / "configs" / "budgets.json"
COUNTED = ("LDG", "LDGSTS", "LDS", "LDSM", "STS", "STSM", "BAR", "SHFL", "I2F", "PRMT", "LOP3",
           "FFMA", "HFMA2", "HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "ATOM", "RED")
WGMMA = ("HGMMA", "IGMMA", "QGMMA")  # warpgroup MMAs (sm_90); the rest of MMAS: mma.sync
MMAS = WGMMA + ("HMMA", "IMMA")


# ---------------------------------------------------------------------------------------------
# Cases: what the model calls (the headline shapes of each family's shipped formats)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    config: str  # a format, e.g. "int4 g128 asym"
    bits: int
    group_size: int | None  # None: one group per row (affine) / not affine (codebook)

    def call(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        """Call the launcher once on CPU tensors of this shape (inside ``capture``)."""
        from compress_ops.kernels import dequant as kd
        from compress_ops.kernels.formats import dequant as fd

        x = torch.randn(m, k, dtype=dtype)
        if self.config.startswith("codebook"):
            q, _, _ = fd.empty_affine(n, k, self.bits, None, True, dtype=dtype)
            cb = torch.randn(1, 2**self.bits, dtype=dtype)
            kd.codebook_matmul(x, q, cb, None, self.bits)
            return
        sym = "sym" in self.config.split()
        q, s, z = fd.empty_affine(n, k, self.bits, self.group_size, sym, dtype=dtype)
        gs = fd.effective_group_size(k, self.group_size)
        kd.dequant_matmul(x, q, s, z, None, self.bits, gs)

    def weight_bytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        from compress_ops.kernels.formats import dequant as fd

        if self.config.startswith("codebook"):
            return fd.codebook_bytes(n, k, self.bits, 1, dtype)
        return fd.affine_bytes(n, k, self.bits, self.group_size, dtype,
                               symmetric="sym" in self.config.split())


    def tile_bytes(self, bn: int, bk: int, dtype: torch.dtype) -> float:
        """HBM bytes of a ``[bn, bk]`` tile of the weight (dense columns)."""
        return bn * bk * self.bits / 8

    def x_bytes(self, m: int, k: int, dtype: torch.dtype) -> int:
        """HBM bytes of the activation a GEMM launch reads."""
        return m * k * dtype.itemsize

    mma_bits = 16  # the tensor cores' operand width
    # rows report decompress_instr_per_weight (operand_slice): where the slice's roots are the
    # weight's alone (2:4: the register A operand or the staged decompressed tile; W8A8 at
    # M <= 16 stages its quantized x, the dequantize pass stores a dense weight)
    reports_decompression = False

    def launch_model(self, launch, m: int, n: int, k: int, dtype: torch.dtype):
        """A launch this case models itself (a :class:`KernelRow`), or None: the weight-streaming
        model (:func:`model_launch`)."""
        return None

    def main_loop(self, instrs: list, lps: list[tuple[int, int]]) -> int:
        """Index in ``lps`` (the top-level loops) of the K loop :func:`model_launch` reads:
        the first loop."""
        return 0

    def other_loop_trips(self, launch, trips: int) -> int:
        """How many times the top-level loops other than the main one run (1: once, as
        straight-line code)."""
        return 1

    def modelled(self, m: int) -> bool:
        """Whether the model has a row for this M (every M but low rank's past its fused
        route)."""
        return True


@dataclass(frozen=True)
class Sparse24Case(Case):
    """A 2:4 weight in the activation dtype: half the values, 2-bit positions (``bits`` is
    the bits per dense element: ``e * 8 / 2 + 1``)."""

    reports_decompression = True

    def call(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        from compress_ops.kernels import sparse24 as ks

        x = torch.randn(m, k, dtype=dtype)
        values = torch.empty(n, k // 2, dtype=dtype)
        meta = torch.zeros(n, k // 32, dtype=torch.int32)
        ks.sparse24_matmul(x, values, meta, None)

    def weight_bytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        return n * k * dtype.itemsize // 2 + n * k // 8

    def tile_bytes(self, bn: int, bk: int, dtype: torch.dtype) -> float:
        return bn * bk * (dtype.itemsize / 2 + 1 / 8)


@dataclass(frozen=True)
class LowRankCase(Case):
    """Rank-``rank`` factors ``U [N, r]``, ``V [r, K]`` in the activation dtype (``bits``: 16,
    the stored element). Modelled where the op runs the fused kernel (M up to the table's
    ``fused_max_m``); its baseline is the two cuBLAS GEMMs the kernel replaces."""

    rank: int = 128

    def call(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        from compress_ops.kernels import lowrank as kl

        x = torch.randn(m, k, dtype=dtype)
        u = torch.empty(n, self.rank, dtype=dtype)
        v = torch.empty(self.rank, k, dtype=dtype)
        kl.lowrank_matmul(x, u, v, None, None)

    def weight_bytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        return self.rank * (n + k) * dtype.itemsize

    def modelled(self, m: int) -> bool:
        from compress_ops.kernels.tuning import device_table

        return m <= device_table("lowrank", torch.device("cpu"))["fused_max_m"]


@dataclass(frozen=True)
class W8A8Case(Case):
    """W8A8: ``qweight [N, K]`` of one byte per weight (int8 or FP8 e4m3: ``qdtype``) and a
    scale per row; the call quantizes x (one launch, :func:`model_act_quant`) and runs the
    8-bit GEMM on the quantized rows (one byte per element, plus an fp32 scale per row)."""

    qdtype: str = "int8"
    mma_bits = 8

    def call(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        from compress_ops.kernels import w8a8 as kw
        from compress_ops.kernels.formats.w8a8 import QDTYPES

        x = torch.randn(m, k, dtype=dtype)
        qweight = torch.empty(n, k, dtype=QDTYPES[self.qdtype])
        w_scales = torch.ones(n, dtype=dtype)
        kw.w8a8_linear(x, qweight, w_scales, None, None)

    def weight_bytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        from compress_ops.kernels.formats.w8a8 import w8a8_bytes

        return w8a8_bytes(n, k, dtype)

    def x_bytes(self, m: int, k: int, dtype: torch.dtype) -> int:
        return m * k + 4 * m

    def launch_model(self, launch, m: int, n: int, k: int, dtype: torch.dtype):
        if launch.kernel.__name__ == "_act_quant_kernel":
            return model_act_quant(launch, m, k, dtype)
        return None

    def main_loop(self, instrs: list, lps: list[tuple[int, int]]) -> int:
        """The loop with the tensor-core instructions (the fused GEMM's first loop is its
        pass over x for the row maxima)."""
        return next((i for i, (a, b) in enumerate(lps)
                     if any(mix(instrs[a:b + 1])[kind] for kind in MMAS)), 0)

    def other_loop_trips(self, launch, trips: int) -> int:
        """The fused GEMM's pass over x walks the same K tiles as its main loop."""
        return trips if launch.kwargs.get("QUANT_X") else 1


@dataclass(frozen=True)
class HashedCase(Case):
    """Hashed weights (HashedNets): ``B = compression N K`` buckets in the activation dtype
    (``bits``: 16, the stored element) and no index; every weight is generated in registers
    (a 32-bit hash, a gather from ``w``, a sign flip), once per row tile. The gathers hit
    L1/L2 (``w`` is ``compression`` of the dense bytes), so HBM carries ``B e`` bytes and the
    kernel is issue-bound: ``tile_bytes`` counts the gathered values a tile keeps in flight."""

    compression: float = 1 / 16

    def buckets(self, n: int, k: int) -> int:
        return max(1, round(self.compression * n * k))

    def call(self, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        from compress_ops.kernels import hashed as kh

        x = torch.randn(m, k, dtype=dtype)
        w = torch.empty(self.buckets(n, k), dtype=dtype)
        kh.hashed_matmul(x, w, None, n, k, 12345, checked=True)

    def weight_bytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        return self.buckets(n, k) * dtype.itemsize

    def tile_bytes(self, bn: int, bk: int, dtype: torch.dtype) -> float:
        return bn * bk * dtype.itemsize


#: the weight-only baseline of the W8A8 rows (predicted_speedup_vs_int8_weight_only)
INT8_WEIGHT_ONLY = Case("dequant", "int8 row sym", 8, None)

CASES = [
    Case("dequant", "int4 g128 asym", 4, 128),
    Case("dequant", "int8 row sym", 8, None),
    Case("dequant", "int2 g128 asym", 2, 128),
    # binary (QuantConfig(bits=1): 1-bit fields, the symmetric grid +-s/2, scales per group of
    # 128) and ternary (TernaryConfig(): the symmetric 2-bit grid, one scale per row)
    Case("dequant", "binary g128 sym", 1, 128),
    Case("dequant", "ternary row sym", 2, None),
    Case("dequant", "codebook 4-bit", 4, None),
    Sparse24Case("sparse24", "2:4", 9, None),
    LowRankCase("lowrank", "rank 64", 16, None, rank=64),
    LowRankCase("lowrank", "rank 128", 16, None, rank=128),
    W8A8Case("w8a8", "w8a8 int8", 8, None, qdtype="int8"),
    W8A8Case("w8a8", "w8a8 fp8", 8, None, qdtype="fp8"),
    # hashed weights (HashedNets): issue-bound, every weight generated in registers
    HashedCase("hashed", "hashed 1/16", 16, None, compression=1 / 16),
]


@dataclass(frozen=True)
class DWSepPair:
    """A depthwise k x k + pointwise pair of MobileNetV2 (``H`` the input's side, ``C`` its
    channels, ``Cout`` the pointwise outputs), batch 32, fp16, channels-last, ReLU6 after the
    depthwise, no residual: the fused op against the cuDNN pair it replaces."""

    h: int
    c: int
    cout: int
    stride: int
    k: int = 3
    batch: int = 32

    @property
    def config(self) -> str:
        return f"dw{self.k} {self.h}^2x{self.c}->{self.cout} s{self.stride}"

    @property
    def out(self) -> int:
        return (self.h + 2 * (self.k // 2) - self.k) // self.stride + 1

    def call(self, dtype: torch.dtype) -> None:
        from compress_ops.kernels import dwsep_conv as kc

        x = torch.empty(self.batch, self.c, self.h, self.h, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        # the module's tap-major layout (FusedDWSepConv2d): [C, k, k] with strides (1, k C, C)
        dw = torch.empty(self.k, self.k, self.c, dtype=dtype).permute(2, 0, 1)
        pw = torch.empty(self.cout, self.c, dtype=dtype)
        bias_dw, bias_pw = torch.empty(self.c, dtype=dtype), torch.empty(self.cout, dtype=dtype)
        p = self.k // 2
        kc.dwsep_conv2d(x, dw, bias_dw, pw, bias_pw, None, self.stride, (p, p, p, p),
                        "relu6", "none", checked=True)


# MobileNetV2's depthwise + project pairs at 224 x 224 (perf/bench_dwsep_conv.MBV2_PAIRS)
DWSEP_PAIRS = [DWSepPair(*t) for t in (
    (112, 32, 16, 1), (112, 96, 24, 2), (56, 144, 24, 1), (56, 144, 32, 2), (28, 192, 64, 2),
    (14, 384, 64, 1), (14, 576, 96, 1), (14, 576, 160, 2), (7, 960, 320, 1))]


def capture_launches(case: Case, m: int, n: int, k: int, dtype: torch.dtype) -> list:
    """The launches a real call on the modelled GPU makes, recorded without running them."""
    from compress_ops.kernels import launches, tuning

    with tuning.simulate_gpu(MODEL["gpu"], MODEL["sms"]), launches.capture(run=False) as got:
        case.call(m, n, k, dtype)
    return list(got)


# ---------------------------------------------------------------------------------------------
# Compiling a recorded launch with the specialization a real call gets
# ---------------------------------------------------------------------------------------------


def divisibility(kernel, attrs: dict) -> dict[str, int]:
    """``{argument: 16}`` for the arguments the specialization marks divisible by 16."""
    names = [p.name for p in kernel.params]
    out = {}
    for path, vals in attrs.items():
        for key, val in vals:
            if key == "tt.divisibility":
                out[names[path[0]]] = int(val)
    return out


@dataclass
class Compiled:
    sass: str
    registers: int
    shared: int
    num_warps: int
    num_stages: int


_COMPILED: dict = {}


def compile_launch(launch, arch: int = 90) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from compress_ops.kernels.launches import specialization
    from compress_ops.perf.audit import cuobjdump

    kernel = launch.kernel
    signature, constexprs, attrs, options = specialization(kernel, launch.args, launch.kwargs,
                                                            arch)
    key = (kernel.__name__, arch, repr(sorted(signature.items())),
           repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           options.num_warps, options.num_stages, launch.kwargs.get("enable_fp_fusion"))
    if key not in _COMPILED:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        opts = {"num_warps": options.num_warps, "num_stages": options.num_stages}
        if "enable_fp_fusion" in launch.kwargs:  # a launch that sets it (w8a8: no FMA)
            opts["enable_fp_fusion"] = launch.kwargs["enable_fp_fusion"]
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        cubin = compiled.asm["cubin"]
        res = cuobjdump(cubin, "-res-usage")
        regs = int(m.group(1)) if (m := re.search(r"REG:(\d+)", res)) else -1
        _COMPILED[key] = Compiled(cuobjdump(cubin, "-sass"), regs, int(compiled.metadata.shared),
                                  options.num_warps, options.num_stages)
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------------
# Reading SASS
# ---------------------------------------------------------------------------------------------

_LINE = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass
class Instr:
    pc: int
    op: str  # the full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    operands: str
    guard: str = ""  # the predicate guard (``@P0``, ``@!P1``), if any

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(sass: str) -> list[Instr]:
    """The instructions of the (single) kernel in a ``cuobjdump -sass`` listing, in order,
    without the trailing ``BRA`` to self and ``NOP`` padding."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4),
                             (m.group(2) or "").strip()))
    while out and (out[-1].base == "NOP" or (out[-1].base == "BRA" and
                                             f"{out[-1].pc:#x}" in out[-1].operands)):
        out.pop()
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indices of every loop (a backward branch), outermost and
    earliest first."""
    index = {ins.pc: i for i, ins in enumerate(instrs)}
    found = []
    for i, ins in enumerate(instrs):
        if ins.base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", ins.operands)
            if m and (t := int(m.group(1), 16)) <= ins.pc and t in index:
                found.append((index[t], i))
    found.sort(key=lambda lo: (lo[0], -lo[1]))
    top = []
    for lo in found:
        if not any(a <= lo[0] and lo[1] <= b for a, b in top):
            top.append(lo)
    return top


# opcodes that write no register (their first operand is a source or an address)
_NO_DEST = frozenset((
    "STS", "STG", "ST", "STL", "STSM", "RED", "REDG", "REDUX", "BAR", "BRA", "EXIT", "DEPBAR",
    "WARPGROUP", "FENCE", "MEMBAR", "LDGSTS", "LDGDEPBAR", "NOP", "SYNCS", "UTMALDG",
    "UTMASTG", "UTMAPF", "UBLKCP", "ERRBAR", "CCTL", "WARPSYNC", "BSSY", "BSYNC", "YIELD",
    "CALL", "RET", "ARRIVES", "ELECT"))
_REG = re.compile(r"\b(U?R|U?P)(\d+|Z|T)\b(\.64|\.128)?")


def _regs(text: str, width: int = 1) -> list[str]:
    """Register names in an operand text (``R4.64`` is ``R4, R5``; ``width`` widens each
    general register, as a vector load's destination); zero and true registers omitted."""
    out = []
    for kind, num, vec in _REG.findall(text):
        if num in ("Z", "T"):
            continue
        n = {".64": 2, ".128": 4}.get(vec, width if kind in ("R", "UR") else 1)
        out += [f"{kind}{int(num) + j}" for j in range(n)]
    return out


def _defs_uses(ins: Instr) -> tuple[list[str], list[str]]:
    """Registers an instruction writes and reads (the guard predicate is read)."""
    ops = [o.strip() for o in ins.operands.split(",")]
    if ins.base == "HGMMA" or ins.base in WGMMA:  # 'x64x16.F32 Racc, [Ra,] gdesc[..], Racc'
        return [], []  # its operands are roots of the slice, not defs (see operand_slice)
    uses = _regs(ins.guard)
    if ins.base in _NO_DEST or not ops or not ops[0]:
        return [], uses + _regs(ins.operands)
    width = _width(ins.op) // 4 if ins.base in ("LDS", "LDG", "LDSM", "LD", "LDL") else 1
    if ".WIDE" in ins.op:
        width = 2
    defs = _regs(ops[0], max(width, 1))
    rest = ops[1:]
    while rest and re.fullmatch(r"U?P\d+", rest[0]):  # carry / second predicate outputs
        defs += _regs(rest.pop(0))
    for o in rest:
        uses += _regs(o)
    return defs, uses


def operand_slice(body: list[Instr]) -> list[int] | None:
    """Indices (into a loop ``body``) of the instructions that build the weight operand of its
    tensor-core MMAs: the backward register slice, through the loop's back edge, of each
    warpgroup MMA's register A operand and of every shared-memory store (a tile that stages
    a decompressed weight for a shared-memory operand), down to the loads of the packed bytes
    and the values defined before the loop. ``None`` where the loop has no such root (the
    weight's shared-memory operand copied as loaded, or no warpgroup MMA). The stores are
    counted (staging is the decompression's cost there); the MMAs are not."""
    roots: list[tuple[int, list[str]]] = []
    for i, ins in enumerate(body):
        if ins.base in WGMMA:
            ops = [o.strip() for o in ins.operands.split(",")]
            # 'x64x16.F32 Racc, Ra, gdesc[UR], Racc': a register A operand is ops[1]
            if len(ops) > 2 and re.fullmatch(r"R\d+", ops[1]):
                roots.append((i, _regs(ops[1], 4)))
        elif ins.base in ("STS", "STSM"):  # 'STS.128 [addr], Rdata': the data is 1-4 registers
            addr, _, data = ins.operands.rpartition(",")
            roots.append((i, _regs(addr) + _regs(data, max(_width(ins.op) // 4, 1))))
    if not roots:
        return None
    du = [_defs_uses(ins) for ins in body]
    seen = {i for i, _ in roots if body[i].base != "HGMMA" and body[i].base not in WGMMA}
    work = list(roots)
    n = len(body)
    while work:
        i, regs = work.pop()
        for r in regs:
            # the reaching definitions: the nearest earlier one in the body, else the last one
            # (the previous trip); a guarded definition lets the one before it reach as well
            for step in range(1, n + 1):
                j = (i - step) % n
                if r in du[j][0]:
                    if j not in seen:
                        seen.add(j)
                        work.append((j, du[j][1]))
                    if not body[j].guard:
                        break
    return sorted(seen)


def _width(op: str) -> int:
    """Bytes per thread of a load or store opcode."""
    for w, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if w in op:
            return b
    return 4


def mix(instrs: list[Instr]) -> dict[str, int]:
    """Counts of the tracked opcodes (``I2F`` counts ``I2F``/``I2FP``; ``LDG`` vector widths are
    counted separately as ``LDG.<bytes>B``)."""
    out = dict.fromkeys(COUNTED, 0)
    for ins in instrs:
        b = ins.base
        if b == "I2FP":
            b = "I2F"
        if b in out:
            out[b] += 1
        if b == "LDG":
            key = f"LDG.{_width(ins.op)}B"
            out[key] = out.get(key, 0) + 1
    out["total"] = len(instrs)
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def ctas_per_sm(regs: int, shared: int, warps: int) -> int:
    """Resident CTAs per SM: the register, shared-memory, warp and CTA limits."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = MODEL["regs_per_sm"] // (per_warp * warps)
    by_smem = MODEL["smem_per_sm"] // (shared + MODEL["smem_per_cta_reserved"])
    by_warps = MODEL["max_warps_per_sm"] // warps
    return max(0, min(by_regs, by_smem, by_warps, MODEL["max_ctas_per_sm"]))


@dataclass
class KernelRow:
    """The model of one Triton launch."""

    kernel: str
    grid: int
    block: dict
    registers: int
    shared: int
    ctas_per_sm: int
    trips: int
    weights_per_thread: float
    instr_per_weight: float
    loop_instr_per_weight: float
    loop: dict
    bytes_in_flight_per_sm: float
    pipelined: bool
    time_us: dict = field(default_factory=dict)
    weight_passes: int = 1  # how many times a call dequantizes each weight (row tiles)
    # the loop's weight-operand instructions (operand_slice) per weight; None: no such slice
    decompress_instr_per_weight: float | None = None


def _arg(launch, name: str, default=None):
    params = [p.name for p in launch.kernel.params]
    if name in launch.kwargs:
        return launch.kwargs[name]
    if name not in params:
        return default
    return launch.args[params.index(name)]


def issue_seconds(instr_per_thread: float, num_warps: int, grid: int, resident: int) -> float:
    """Issue time of one launch: each SM's warp instructions (its CTAs run in
    ``ceil(grid / SMs)`` turns) over the schedulers its resident warps occupy. A warp stays on
    one of the SM's 4 sub-partitions, so fewer resident warps than schedulers leave some idle
    (a CTA of 2 warps alone on an SM issues from 2)."""
    schedulers = min(MODEL["schedulers_per_sm"], resident * num_warps)
    turns = math.ceil(grid / MODEL["sms"])
    return turns * instr_per_thread * num_warps / (schedulers * MODEL["clock_hz"])


def model_launch(launch, case: Case, m: int, n: int, k: int, dtype: torch.dtype) -> KernelRow:
    c = compile_launch(launch)
    instrs = parse_sass(c.sass)
    lps = loops(instrs)
    threads = 32 * c.num_warps
    grid = math.prod(launch.grid)
    bn = _arg(launch, "BLOCK_N")
    # dense columns per K step (the 2:4 GEMV counts its stored values, BLOCK_KH: two kept of
    # every four columns)
    bk = _arg(launch, "BLOCK_K") or 2 * _arg(launch, "BLOCK_KH")
    bm = _arg(launch, "BLOCK_M", 1)  # a kernel without BLOCK_M: one x row per program
    split = _arg(launch, "SPLIT_K", 1)
    # padded dense K (2:4: twice its stored values; an unpacked weight: K)
    kp = _arg(launch, "KP") or (2 * _arg(launch, "KP_HALF") if _arg(launch, "KP_HALF")
                                else _arg(launch, "K"))
    k_tiles = math.ceil(kp / bk)
    trips = math.ceil(k_tiles / split)
    if _arg(launch, "TILES"):  # a program takes at most TILES of the K tiles
        trips = min(trips, _arg(launch, "TILES"))
    others = 0  # instructions of the other top-level loops
    if lps:
        main = case.main_loop(instrs, lps)
        a, b = lps[main]
        body = instrs[a:b + 1]
        others = sum(hi - lo + 1 for j, (lo, hi) in enumerate(lps) if j != main)
    else:  # one K block per program: the whole kernel
        body, trips = [], 1
    weights_per_thread = min(bn, n) * trips * bk / threads
    straight = len(instrs) - len(body)
    total = (straight + len(body) * trips
             + others * (case.other_loop_trips(launch, trips) - 1))
    body_mix = mix(body)
    per_iter_weights = min(bn, n) * bk / threads if body else weights_per_thread
    loop_ipw = len(body) / per_iter_weights if body else total / weights_per_thread
    operand = operand_slice(body) if body and case.reports_decompression else None
    decompress_ipw = None if operand is None else len(operand) / per_iter_weights
    cps = ctas_per_sm(c.registers, c.shared, c.num_warps)
    resident = max(1, min(cps, math.ceil(grid / MODEL["sms"])))
    pipelined = body_mix["LDGSTS"] > 0
    tile_weight_bytes = case.tile_bytes(min(bn, n), bk, dtype)
    stages = max(1, c.num_stages - 1) if pipelined else 1
    in_flight = resident * tile_weight_bytes * stages
    # time
    active_sms = min(MODEL["sms"], grid)
    bw = min(MODEL["hbm_bytes_per_s"], in_flight * active_sms / MODEL["hbm_latency_s"])
    e = dtype.itemsize
    y_bytes = m * n * (4 if split > 1 else e)
    dense_weight = "w_ptr" in [p.name for p in launch.kernel.params]
    if dense_weight:
        # writes a dense weight, reads no x: the stores need no loads in flight, so the
        # reads are bound by Little's law and all the bytes by the peak
        reads = case.weight_bytes(n, k, dtype)
        t_mem = max(reads / bw, (reads + n * k * e) / MODEL["hbm_bytes_per_s"])
    else:
        hbm = case.weight_bytes(n, k, dtype) + case.x_bytes(m, k, dtype) + y_bytes
        t_mem = hbm / bw
    waves_ctas = math.ceil(grid / MODEL["sms"])
    t_issue = issue_seconds(total, c.num_warps, grid, resident)
    mma = next((kind for kind in MMAS if body_mix[kind]), "")
    t_tc = 0.0
    if mma:
        peak = mma_peak(mma, case.mma_bits)
        flops_per_cta = 2 * max(bm, 16) * bn * bk * trips
        t_tc = waves_ctas * flops_per_cta / (peak / MODEL["sms"])
    times = {"memory": t_mem * 1e6, "issue": t_issue * 1e6, "tensor": t_tc * 1e6}
    return KernelRow(
        kernel=launch.kernel.__name__, grid=grid,
        block={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
               "num_warps": c.num_warps, "num_stages": c.num_stages},
        registers=c.registers, shared=c.shared, ctas_per_sm=cps, trips=trips,
        weights_per_thread=weights_per_thread, instr_per_weight=total / weights_per_thread,
        loop_instr_per_weight=loop_ipw, loop=body_mix, bytes_in_flight_per_sm=in_flight,
        pipelined=pipelined, time_us=times,
        weight_passes=1 if dense_weight else math.ceil(m / bm),
        decompress_instr_per_weight=decompress_ipw)


def mma_peak(kind: str, bits: int = 16) -> float:
    """Tensor-core FLOP/s of an MMA kind: the HGMMA peak for warpgroup MMAs, ``hmma_fraction``
    of it for mma.sync; 8-bit operands ``mma8_factor`` times either."""
    peak = MODEL["hgmma_flops_per_s"] * (1.0 if kind in WGMMA else MODEL["hmma_fraction"])
    return peak * (MODEL["mma8_factor"] if bits == 8 else 1.0)


def model_act_quant(launch, m: int, k: int, dtype: torch.dtype) -> KernelRow:
    """W8A8's activation quantization (one program per row): memory, ``M K e`` bytes read and
    ``M K + 4 M`` written, over Little's law with each resident program's row loads in flight
    (its whole row in one pass, else one ``BLOCK_K`` block; the second pass's reads come from
    L2 and are not counted); issue, the SASS with its loops times their trips (both passes'
    loops ``cdiv(K, BLOCK_K)`` times). ``instr_per_weight`` here is per activation element."""
    c = compile_launch(launch)
    instrs = parse_sass(c.sass)
    grid = math.prod(launch.grid)
    bk = _arg(launch, "BLOCK_K")
    one_pass = _arg(launch, "ONE_PASS")
    trips = 1 if one_pass else math.ceil(k / bk)
    total = nested_count(instrs, [trips])
    threads = 32 * c.num_warps
    cps = ctas_per_sm(c.registers, c.shared, c.num_warps)
    resident = max(1, min(cps, math.ceil(grid / MODEL["sms"])))
    e = dtype.itemsize
    in_flight = resident * bk * e
    bw = min(MODEL["hbm_bytes_per_s"], in_flight * min(grid, MODEL["sms"])
             / MODEL["hbm_latency_s"])
    t_mem = (m * k * e + m * k + 4 * m) / bw
    t_issue = issue_seconds(total, c.num_warps, grid, resident)
    lps = loops(instrs)
    body = instrs[lps[0][0]:lps[0][1] + 1] if lps else []
    per_thread = k / threads
    return KernelRow(
        kernel=launch.kernel.__name__, grid=grid,
        block={"BLOCK_K": bk, "ONE_PASS": one_pass, "num_warps": c.num_warps},
        registers=c.registers, shared=c.shared, ctas_per_sm=cps, trips=trips,
        weights_per_thread=per_thread, instr_per_weight=total / per_thread,
        loop_instr_per_weight=len(body) * threads / bk if body else total / per_thread,
        loop=mix(body), bytes_in_flight_per_sm=in_flight, pipelined=False,
        time_us={"memory": t_mem * 1e6, "issue": t_issue * 1e6, "tensor": 0.0})


def dense_us(m: int, n: int, k: int, dtype: torch.dtype) -> float:
    e = dtype.itemsize
    t = max((n * k + m * k + m * n) * e / MODEL["hbm_bytes_per_s"],
            2 * m * n * k / MODEL["hgmma_flops_per_s"])
    return t * 1e6 + MODEL["launch_us"]


def semi_structured_route_us(m: int, n: int = HEADLINE["N"], k: int = HEADLINE["K"],
                             dtype: torch.dtype = torch.float16,
                             sparse_speedup: float = 2.0) -> float:
    """torch's 2:4 route (cuSPARSELt / CUTLASS) as the op would run it past
    ``semi_structured_min_m`` (compress_ops/ops/sparse24.py), on rooflines, a lower bound: the
    packed weight unpacked to dense (read ``values`` and ``meta``, write ``W``), converted by
    ``to_sparse_semi_structured`` (read ``W``, write its halves and metadata), then the sparse
    GEMM at ``sparse_speedup`` times the dense tensor-core peak (2 in theory; not measured
    here), three launches at least. No GPU has timed it: a prediction, and the route stays off
    until a measured crossover ships (``semi_structured_min_m``)."""
    e, bw = dtype.itemsize, MODEL["hbm_bytes_per_s"]
    packed = n * k // 2 * e + n * k // 8  # values + 2-bit positions
    unpack = (packed + n * k * e) / bw
    convert = (n * k * e + packed) / bw
    gemm = max((packed + m * k * e + m * n * e) / bw,
               2 * m * n * k / (MODEL["hgmma_flops_per_s"] * sparse_speedup))
    return (unpack + convert + gemm) * 1e6 + 3 * MODEL["launch_us"]


def semi_structured_crossover(kernel_vs_dense: float, sparse_speedup: float = 2.0,
                              n: int = HEADLINE["N"], k: int = HEADLINE["K"],
                              dtype: torch.dtype = torch.float16) -> int | None:
    """The smallest M (a multiple of 64, up to 65536) from which :func:`semi_structured_route_us`
    beats the Triton 2:4 kernel, taken as tensor-bound at ``kernel_vs_dense`` times dense's
    speed (the M = 2048 row's predicted speedup); ``None`` if it never does."""
    for m in range(64, 65537, 64):
        if semi_structured_route_us(m, n, k, dtype, sparse_speedup) < \
                dense_us(m, n, k, dtype) / kernel_vs_dense:
            return m
    return None


def two_gemms_us(m: int, n: int, k: int, r: int, dtype: torch.dtype) -> float:
    """The two cuBLAS GEMMs low rank replaces, ``t = x V^T`` then ``y = t U^T``: each on dense's
    roofline with its own launch (``t`` makes a round trip through memory)."""
    e = dtype.itemsize
    first = max((r * k + m * k + m * r) * e / MODEL["hbm_bytes_per_s"],
                2 * m * r * k / MODEL["hgmma_flops_per_s"])
    second = max((n * r + m * r + m * n) * e / MODEL["hbm_bytes_per_s"],
                 2 * m * n * r / MODEL["hgmma_flops_per_s"])
    return (first + second) * 1e6 + 2 * MODEL["launch_us"]


def _phase_split(instrs: list[Instr]) -> int:
    """Index where the two-phase kernel's phase-2 code starts: after the ``EXIT`` that ends
    phase 1 (its arrival, the one ``REDG`` that is not a float add, then ``EXIT``)."""
    arrival = next((i for i, ins in enumerate(instrs)
                    if ins.base == "REDG" and ".F32" not in ins.op and ".F16" not in ins.op),
                   None)
    if arrival is None:
        raise ValueError("no phase-1 arrival (REDG) in the two-phase kernel's SASS")
    return next(i for i in range(arrival, len(instrs)) if instrs[i].base == "EXIT") + 1


def _phase_instructions(instrs: list[Instr], mma_trips: int, other_trips: int) -> tuple:
    """Instructions one program of a phase executes: straight-line code once, a loop with
    tensor-core instructions ``mma_trips`` times, any other loop ``other_trips`` times (an
    upper bound for a nested loop's outer overhead), and the mix of the MMA loop's body."""
    total, body_mix = len(instrs), {}
    for a, b in loops(instrs):
        body = instrs[a:b + 1]
        mx = mix(body)
        trips = mma_trips if (mx["HMMA"] or mx["HGMMA"]) else other_trips
        total += len(body) * (trips - 1)
        if mx["HMMA"] or mx["HGMMA"]:
            body_mix = mx
    return total, body_mix


def model_lowrank(case: LowRankCase, m: int, n: int, k: int, dtype_name: str) -> dict:
    """The two-phase kernel's row: one launch of ``n_splits + n_groups`` programs.

    Time = launch + max(memory, issue) + grid handoff + the issue of phase 2's code after its
    wait + the later ``U`` tiles of a phase-2 program (each an HBM round trip after the
    handoff):

    * memory: the unique HBM bytes (``U``, ``V``, ``x``, ``y``) over Little's law with every
      program's loads in flight at once (phase 1: ``min(stages - 1, tiles per split)`` V tiles
      and its x tile; phase 2: its first ``U`` tile, loaded before it waits), as both phases
      stream together;
    * the handoff (``grid_sync_us``, a lead): the last phase-1 program's release, its counter
      atomic, the poll that sees it and the read of ``t`` from L2;
    * issue per phase from its own SASS (phase 1 up to its ``EXIT``, phase 2 after), loops
      times their trips; programs of both phases share the SMs (one wave when the grid fits);
      phase 2's code after its poll loop runs after the handoff, alone on its SM's warps.

    L2 traffic: the factors, ``x`` once, the workspace (each phase-1 program adds its fp32
    ``[M, r]`` tile, each phase-2 program reads it, the last zeroes it) and ``y``;
    ``l2_over_factors`` is (factors + workspace) / factors, the traffic fusing adds. The
    atomics' own throughput is not modelled (``workspace_bytes`` says how much there is).
    ``instr_per_weight`` counts both phases' instructions per factor element,
    ``loop_instr_per_weight`` phase 1's per element of ``V`` it reads.
    """
    import triton

    from compress_ops.kernels.tuning import DTYPES

    dtype = DTYPES[dtype_name]
    e = dtype.itemsize
    launches = capture_launches(case, m, n, k, dtype)
    if len(launches) != 1 or launches[0].kernel.__name__ != "_lowrank_two_phase_kernel":
        raise ValueError(f"low rank M={m}: expected one two-phase launch, got "
                         f"{[getattr(la.kernel, '__name__', la.kernel) for la in launches]}")
    la = launches[0]
    c = compile_launch(la)
    instrs = parse_sass(c.sass)
    cut = _phase_split(instrs)
    bm, bn, bk = (_arg(la, x) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    r = case.rank
    splits, tps, groups, per = (_arg(la, x) for x in ("n_splits", "tiles_per_split",
                                                       "n_groups", "n_per_program"))
    m_tiles = math.ceil(m / bm)
    grid = splits + groups
    i1, mix1 = _phase_instructions(instrs[:cut], tps * m_tiles, m_tiles)
    i2, _ = _phase_instructions(instrs[cut:], per * m_tiles, m_tiles)
    # what phase 2 executes after its wait (the first loop of its code: the poll)
    spin = loops(instrs[cut:])[0][1] + 1
    tail, _ = _phase_instructions(instrs[cut + spin:], per * m_tiles, m_tiles)
    cps = ctas_per_sm(c.registers, c.shared, c.num_warps)
    resident = max(1, min(cps, math.ceil(grid / MODEL["sms"])))
    # phase-1 and phase-2 programs share the SMs: the SM's issue time is its programs' sum
    per_sm = (splits * i1 + groups * i2) / min(grid, MODEL["sms"] * resident) * resident
    schedulers = min(MODEL["schedulers_per_sm"], resident * c.num_warps)
    t_issue = per_sm * c.num_warps / (schedulers * MODEL["clock_hz"])
    # loads in flight when both phases stream (Little's law)
    v_tiles = min(max(1, c.num_stages - 1), tps)
    flight = (splits * (v_tiles * bk * r * e + min(m, bm) * bk * e) + groups * bn * r * e)
    bw = min(MODEL["hbm_bytes_per_s"], flight / MODEL["hbm_latency_s"])
    factors = case.weight_bytes(n, k, dtype)
    hbm = factors + m * k * e + m * n * e
    t_mem = hbm / bw
    t_phase2 = (tail * c.num_warps / (min(MODEL["schedulers_per_sm"], c.num_warps)
                                    * MODEL["clock_hz"])
                + (per - 1) * MODEL["hbm_latency_s"])
    t_tc = 2 * max(m, 16) * r * (k + n) / (MODEL["hgmma_flops_per_s"] * MODEL["hmma_fraction"])
    predicted = (MODEL["launch_us"] + 1e6 * (max(t_mem, t_issue, t_tc) + t_phase2)
                 + MODEL["grid_sync_us"])
    t_bytes = m * triton.next_power_of_2(max(r, 16)) * 4
    workspace = (splits + groups * per + 1) * t_bytes if m > bm else (splits + groups + 1) * t_bytes
    baseline = two_gemms_us(m, n, k, r, dtype)
    dense = dense_us(m, n, k, dtype)
    times = {"memory": t_mem * 1e6, "issue": t_issue * 1e6, "tensor": t_tc * 1e6}
    return {
        "family": case.family, "kernel": la.kernel.__name__, "config": case.config, "M": m,
        "N": n, "K": k, "dtype": dtype_name, "bits": case.bits, "group_size": None,
        "rank": r, "triton": triton.__version__,
        "instr_per_weight": round((splits * i1 + groups * i2) * 32 * c.num_warps
                                  / (r * (n + k)), 3),
        # phase 1's instructions per element of V it reads (its K loop, prologue and adds)
        "loop_instr_per_weight": round(i1 * 32 * c.num_warps / (tps * bk * r), 3),
        "weight_passes": m_tiles, "instr_per_weight_per_call": None,
        "bytes_in_flight_per_sm": round(flight / min(grid, MODEL["sms"])),
        "ctas_per_sm": cps, "launches": 1, "launch_kinds": [la.kernel.__name__],
        "plan": {"n_splits": splits, "tiles_per_split": tps, "n_groups": groups,
                 "n_per_program": per},
        "phase_instr": {"phase1": i1, "phase2": i2, "phase2_after_wait": tail},
        "l2_bytes": factors + m * k * e + workspace + m * n * e,
        "workspace_bytes": workspace,
        "l2_over_factors": round((factors + workspace) / factors, 3),
        "predicted_us": round(predicted, 2), "predicted_dense_us": round(dense, 2),
        "predicted_speedup": round(dense / predicted, 3),
        "baseline": "two cuBLAS GEMMs", "predicted_baseline_us": round(baseline, 2),
        "predicted_speedup_vs_baseline": round(baseline / predicted, 3),
        "registers": c.registers, "shared_bytes": c.shared, "grid": grid,
        "block": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": c.num_warps,
                  "num_stages": c.num_stages},
        "bound": max(times, key=times.get),
        "time_us": {kk: round(v, 2) for kk, v in times.items()},
        "loop_mix": {kk: v for kk, v in mix1.items() if v},
    }


def all_loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """Every loop (a backward branch), nested ones included, outermost and earliest first."""
    index = {ins.pc: i for i, ins in enumerate(instrs)}
    found = []
    for i, ins in enumerate(instrs):
        if ins.base == "BRA":
            mt = re.search(r"0x([0-9a-f]+)", ins.operands)
            if mt and (t := int(mt.group(1), 16)) <= ins.pc and t in index:
                found.append((index[t], i))
    return sorted(found, key=lambda lo: (lo[0], -lo[1]))


def nested_count(instrs: list[Instr], trips: list[int]) -> float:
    """Instructions one thread executes when the loops at nesting depth ``d`` (0: outermost)
    run ``trips[d]`` times each (deeper loops than listed: once): every instruction times the
    product of the trips of the loops that hold it."""
    lps = all_loops(instrs)
    total = 0.0
    for i in range(len(instrs)):
        depth_of = [lo for lo in lps if lo[0] <= i <= lo[1]]
        mult = 1
        for d in range(len(depth_of)):
            mult *= trips[d] if d < len(trips) else 1
        total += mult
    return total


def cudnn_pair_us(pair: DWSepPair, dtype: torch.dtype) -> float:
    """The cuDNN pair on its rooflines, one launch each, its epilogues (bias, ReLU6) fused:
    the depthwise conv reads x and writes ``[B, Ho, Wo, C]`` (memory-bound), the 1x1 conv reads
    it back and writes y (a GEMM on HGMMA's peak or the bytes)."""
    e = dtype.itemsize
    b, ho = pair.batch, pair.out
    bw = MODEL["hbm_bytes_per_s"]
    dw = (b * pair.h * pair.h * pair.c + b * ho * ho * pair.c) * e / bw
    p = b * ho * ho
    pw = max((p * pair.c + pair.c * pair.cout + p * pair.cout) * e / bw,
             2 * p * pair.c * pair.cout / MODEL["hgmma_flops_per_s"])
    return (dw + pw) * 1e6 + 2 * MODEL["launch_us"]


def model_dwsep(pair: DWSepPair, dtype_name: str = HEADLINE["dtype"]) -> dict:
    """The fused depthwise + pointwise launch of one MobileNetV2 pair.

    One-pass kernel (``_dwsep_conv_kernel``): instructions per program from its SASS with the
    loops' trips (the channel loop ``cdiv(C, BLOCK_C)`` times, the tap loop inside it ``k^2``
    times); memory: x read once per output-channel tile (the grid walks every pixel tile of
    one Cout tile before the next, and x is larger than L2 at the large layers), y written
    once, over Little's law with the ``[BLOCK_P, BLOCK_C]`` tap loads in flight per resident
    program (one with a runtime tap loop; all ``k^2`` when the taps are unrolled, times
    ``num_stages - 1`` when they are asynchronous copies); tensor cores: the padded 1x1 tiles.
    ``instr_per_weight`` here is per depthwise multiply-add the launch executes (output pixel
    x channel x tap, recomputation included), ``loop_instr_per_weight`` the tap loop's (or,
    unrolled, the channel loop's) instructions per element and tap.

    Both kernels also pay L2 bandwidth (``l2_bytes_per_s``, a lead): every byte their programs
    load or store crosses L2 (x per output-channel tile, the pointwise weight's tile once per
    program, the depthwise weights once per channel chunk and program, y; the two-phase
    workspace's write and its reads).

    Two-phase kernel (``_dwsep_two_phase_kernel``): the depthwise part once (``dw_recompute``
    1). Issue per phase from its own SASS (phase 1 up to its arrival's ``EXIT``, phase 2 after,
    its K loop ``cdiv(C, BLOCK_C)`` times), each phase's programs in turns over the SMs; the
    workspace ``d`` written to L2 (and counted at HBM: its dirty lines are written back) and
    read once per output-channel tile; phase 1's taps in flight; then, as low rank's two
    phases, the handoff (``grid_sync_us``) and the last pointwise program's code after its
    wait are added to the bound. ``loop_instr_per_weight`` is phase 1's instructions (all of
    them: ticket, pixels, taps, store, arrival) per element and tap."""
    import triton

    from compress_ops.kernels.launches import capture
    from compress_ops.kernels.tuning import DTYPES, simulate_gpu

    # L2 bandwidth (a lead, an upper bound as the model's times are lower bounds): A100's
    # documented 5120 bytes per clock at the H200's 1.98 GHz (chips and cheese measured 5.5 TB/s
    # on the power-limited 114-SM H100 PCIe)
    l2_bytes_per_s = 10e12
    dtype = DTYPES[dtype_name]
    e = dtype.itemsize
    with simulate_gpu(MODEL["gpu"], MODEL["sms"]), capture(run=False) as got:
        pair.call(dtype)
    launches = list(got)
    la = launches[0]
    c = compile_launch(la)
    instrs = parse_sass(c.sass)
    bp, bc, bco = (_arg(la, x) for x in ("BLOCK_P", "BLOCK_C", "BLOCK_CO"))
    b, ho, k2 = pair.batch, pair.out, pair.k * pair.k
    p = b * ho * ho
    c_tiles, co_tiles = math.ceil(pair.c / bc), math.ceil(pair.cout / bco)
    p_tiles = math.ceil(p / bp)
    grid = math.prod(la.grid)
    threads = 32 * c.num_warps
    cps = ctas_per_sm(c.registers, c.shared, c.num_warps)
    resident = max(1, min(cps, math.ceil(grid / MODEL["sms"])))
    x_bytes = b * pair.h * pair.h * pair.c * e
    y_bytes = p * pair.cout * e
    dww_bytes = pair.c * k2 * e
    w_bytes = (pair.c * k2 + pair.c * pair.cout + pair.c + pair.cout) * e
    mma = "HGMMA" if "HGMMA" in c.sass else "HMMA"
    peak = MODEL["hgmma_flops_per_s"] * (1.0 if mma == "HGMMA" else MODEL["hmma_fraction"])
    t_tc = 2 * p_tiles * bp * c_tiles * bc * co_tiles * bco / peak
    # the pointwise weight's [C, BLOCK_CO] tile once per (pixel tile, Cout tile)
    pw_l2 = p_tiles * co_tiles * pair.c * bco * e
    two_phase = la.kernel.__name__ == "_dwsep_two_phase_kernel"
    extra = {}
    if two_phase:
        # phase 1 (depthwise chunks) up to its arrival's EXIT, phase 2 (pointwise tiles) after
        cut = _phase_split(instrs)
        n1, n2 = p_tiles * c_tiles, p_tiles * co_tiles
        i1, _ = _phase_instructions(instrs[:cut], 1, pair.k)  # a 5 x 5's runtime row loop
        i2, _ = _phase_instructions(instrs[cut:], c_tiles, 1)  # the K loop; the poll once
        spin = loops(instrs[cut:])[0][1] + 1
        tail, _ = _phase_instructions(instrs[cut + spin:], c_tiles, 1)
        # every SM runs its share of both phases' programs, in turns per phase
        per_sm = (math.ceil(n1 / MODEL["sms"]) * i1 + math.ceil(n2 / MODEL["sms"]) * i2)
        schedulers = min(MODEL["schedulers_per_sm"], resident * c.num_warps)
        t_issue = per_sm * c.num_warps / (schedulers * MODEL["clock_hz"])
        total = (n1 * i1 + n2 * i2) / grid
        lps = loops(instrs[:cut])
        if lps:  # a runtime row loop: its body per element and tap
            tap = instrs[lps[0][0]:lps[0][1] + 1]
            tap_ipw = len(tap) * threads / (bp * bc * pair.k)
            taps_in_flight = 1
        else:  # phase 1 straight-line: all of it (ticket, pixels, taps, store, arrival)
            tap = instrs[:cut]
            tap_ipw = i1 * threads / (bp * bc * k2)
            taps_in_flight = k2
        in_flight = resident * bp * bc * e * taps_in_flight
        d_bytes = p_tiles * bp * c_tiles * bc * e
        hbm = x_bytes + y_bytes + w_bytes + d_bytes  # d's dirty lines are written back
        l2 = (x_bytes + d_bytes * (1 + co_tiles) + pw_l2 + n1 * bc * k2 * e + y_bytes)
        # as low rank's two phases: the handoff (the last depthwise chunk's release, the poll
        # that sees it) and the last pointwise program's code after its wait, alone on its SM
        fill = tail * c.num_warps / (min(MODEL["schedulers_per_sm"], c.num_warps)
                                     * MODEL["clock_hz"]) + MODEL["grid_sync_us"] * 1e-6
        macs = p * pair.c * k2
        recompute = 1
        extra = {"phase_instr": {"phase1": i1, "phase2": i2, "phase2_after_wait": tail},
                 "plan": {"n_tiles": p_tiles, "n_c": c_tiles, "n_co": co_tiles},
                 "workspace_bytes": d_bytes}
    else:
        total = nested_count(instrs, [c_tiles, k2])
        lps = all_loops(instrs)
        inner = [lo for lo in lps if any(o[0] < lo[0] and lo[1] <= o[1] for o in lps)]
        if inner:  # a runtime tap loop: its body per element and tap; one tap's load in flight
            tap = instrs[inner[0][0]:inner[0][1] + 1]
            tap_ipw = len(tap) * threads / (bp * bc)
            taps_in_flight = 1
        else:  # taps unrolled in the channel loop: its body per element and tap; all k^2
            # taps' loads in flight, times the stages when they are asynchronous copies
            tap = instrs[lps[0][0]:lps[0][1] + 1] if lps else instrs
            tap_ipw = len(tap) * threads / (bp * bc * k2)
            taps_in_flight = k2 * (max(1, c.num_stages - 1) if mix(tap)["LDGSTS"] else 1)
        t_issue = issue_seconds(total, c.num_warps, grid, resident)
        in_flight = resident * bp * bc * e * taps_in_flight
        hbm = x_bytes * co_tiles + y_bytes + w_bytes
        l2 = x_bytes * co_tiles + pw_l2 + grid * dww_bytes + y_bytes
        fill = 0.0
        macs = p * pair.c * k2 * co_tiles  # depthwise multiply-adds the launch executes
        recompute = co_tiles
    bw = min(MODEL["hbm_bytes_per_s"], in_flight * min(grid, MODEL["sms"])
             / MODEL["hbm_latency_s"])
    t_mem = hbm / bw
    t_l2 = l2 / l2_bytes_per_s
    times = {"memory": t_mem * 1e6, "l2": t_l2 * 1e6, "issue": t_issue * 1e6,
             "tensor": t_tc * 1e6}
    predicted = max(times.values()) + fill * 1e6 + MODEL["launch_us"] * len(launches)
    baseline = cudnn_pair_us(pair, dtype)
    return {
        "family": "dwsep_conv", "kernel": la.kernel.__name__, "config": pair.config,
        "M": p, "N": pair.cout, "K": pair.c, "dtype": dtype_name, "bits": 16,
        "group_size": None, "triton": triton.__version__,
        "instr_per_weight": round(total * threads * grid / macs, 3),
        "loop_instr_per_weight": round(tap_ipw, 3),
        "weight_passes": recompute, "instr_per_weight_per_call": None,
        "bytes_in_flight_per_sm": round(in_flight), "ctas_per_sm": cps,
        "launches": len(launches),
        "launch_kinds": [getattr(x.kernel, "__name__", x.kernel) for x in launches],
        "dw_recompute": recompute,
        "predicted_us": round(predicted, 2),
        "predicted_dense_us": round(baseline, 2),
        "predicted_speedup": round(baseline / predicted, 3),
        "baseline": "cuDNN pair", "predicted_baseline_us": round(baseline, 2),
        "predicted_speedup_vs_baseline": round(baseline / predicted, 3),
        "registers": c.registers, "shared_bytes": c.shared, "grid": grid,
        "block": {"BLOCK_P": bp, "BLOCK_C": bc, "BLOCK_CO": bco, "num_warps": c.num_warps,
                  "num_stages": c.num_stages},
        "bound": max(times, key=times.get),
        "time_us": {kk: round(v, 2) for kk, v in times.items()},
        "l2_bytes": l2,
        "loop_mix": {kk: v for kk, v in mix(tap).items() if v},
        **extra,
    }


def dwsep_sum_row(rows: list[dict]) -> dict:
    """All of MobileNetV2's pairs summed: the issue's figure of merit."""
    pred = sum(r["predicted_us"] for r in rows)
    base = sum(r["predicted_baseline_us"] for r in rows)
    return {
        "family": "dwsep_conv", "kernel": rows[0]["kernel"], "config": "mbv2 pairs (sum)",
        # not a shape: M = 0 keeps the per-pair rules off this row
        "M": 0, "N": 0, "K": 0, "dtype": rows[0]["dtype"], "bits": 16,
        "group_size": None, "triton": rows[0]["triton"],
        "instr_per_weight": round(sum(r["instr_per_weight"] for r in rows) / len(rows), 3),
        "loop_instr_per_weight": round(max(r["loop_instr_per_weight"] for r in rows), 3),
        "weight_passes": max(r["weight_passes"] for r in rows),
        "instr_per_weight_per_call": None,
        "bytes_in_flight_per_sm": min(r["bytes_in_flight_per_sm"] for r in rows),
        "ctas_per_sm": min(r["ctas_per_sm"] for r in rows),
        "launches": sum(r["launches"] for r in rows), "launch_kinds": [],
        "predicted_us": round(pred, 2), "predicted_dense_us": round(base, 2),
        "predicted_speedup": round(base / pred, 3), "baseline": "cuDNN pairs",
        "predicted_baseline_us": round(base, 2),
        "predicted_speedup_vs_baseline": round(base / pred, 3),
        "dw_recompute": max(r["dw_recompute"] for r in rows),
        "registers": max(r["registers"] for r in rows), "shared_bytes": 0,
        "grid": min(r["grid"] for r in rows),
        "block": {}, "bound": "-", "time_us": {}, "loop_mix": {},
    }


def model_case(case: Case, m: int, n: int = HEADLINE["N"], k: int = HEADLINE["K"],
               dtype_name: str = HEADLINE["dtype"]) -> dict:
    import triton

    from compress_ops.kernels.tuning import DTYPES

    if isinstance(case, LowRankCase):
        return model_lowrank(case, m, n, k, dtype_name)
    dtype = DTYPES[dtype_name]
    launches = capture_launches(case, m, n, k, dtype)
    kernels, extra_us = [], 0.0
    for la in launches:
        if la.kernel == "F.linear":  # cuBLAS on a dequantized weight: dense's own roofline
            extra_us += dense_us(m, n, k, dtype)
        elif isinstance(la.kernel, str):  # a torch kernel: fp32 workspace fill or cast
            nbytes = m * n * (4 if la.kernel == "torch.zeros" else 4 + dtype.itemsize)
            extra_us += nbytes / MODEL["hbm_bytes_per_s"] * 1e6 + MODEL["launch_us"]
        else:
            kernels.append(case.launch_model(la, m, n, k, dtype)
                           or model_launch(la, case, m, n, k, dtype))
    predicted = extra_us + sum(max(r.time_us.values()) + MODEL["launch_us"] for r in kernels)
    dense = dense_us(m, n, k, dtype)
    main = max(kernels, key=lambda r: max(r.time_us.values()))
    extra = {}
    if isinstance(case, W8A8Case):
        wo = model_case(INT8_WEIGHT_ONLY, m, n, k, dtype_name)["predicted_us"]
        extra = {"predicted_int8_weight_only_us": wo,
                 "predicted_speedup_vs_int8_weight_only": round(wo / predicted, 3),
                 "launch_us": {r.kernel: round(max(r.time_us.values()) + MODEL["launch_us"], 2)
                               for r in kernels}}
    return {
        "family": case.family, "kernel": "+".join(r.kernel for r in kernels),
        "config": case.config, "M": m, "N": n, "K": k, "dtype": dtype_name, "bits": case.bits,
        "group_size": case.group_size, "triton": triton.__version__,
        "instr_per_weight": round(main.instr_per_weight, 3),
        "loop_instr_per_weight": round(main.loop_instr_per_weight, 3),
        **({} if main.decompress_instr_per_weight is None else
           {"decompress_instr_per_weight": round(main.decompress_instr_per_weight, 3)}),
        "weight_passes": main.weight_passes,
        "instr_per_weight_per_call": round(main.instr_per_weight * main.weight_passes, 3),
        "bytes_in_flight_per_sm": round(main.bytes_in_flight_per_sm),
        "ctas_per_sm": main.ctas_per_sm, "launches": len(launches),
        "launch_kinds": [la.kernel if isinstance(la.kernel, str) else la.kernel.__name__
                         for la in launches],
        "predicted_us": round(predicted, 2), "predicted_dense_us": round(dense, 2),
        "predicted_speedup": round(dense / predicted, 3),
        "baseline": "dense cuBLAS", "predicted_baseline_us": round(dense, 2),
        "predicted_speedup_vs_baseline": round(dense / predicted, 3),
        "registers": main.registers, "shared_bytes": main.shared, "grid": main.grid,
        "block": main.block, "bound": max(main.time_us, key=main.time_us.get),
        "time_us": {kk: round(v, 2) for kk, v in main.time_us.items()},
        "loop_mix": {kk: v for kk, v in main.loop.items() if v},
        **extra,
    }


def run(cases: list[Case] = CASES, ms: tuple = HEADLINE["M"], dwsep: bool = True) -> dict:
    import triton

    rows = [model_case(c, m) for c in cases for m in ms if c.modelled(m)]
    if dwsep:
        conv = [model_dwsep(pr) for pr in DWSEP_PAIRS]
        rows += conv + [dwsep_sum_row(conv)]
    meta = {"model": MODEL, "headline": {**HEADLINE, "M": list(ms)}, "triton": triton.__version__,
            "torch": torch.__version__, "arch": f"sm_{MODEL['arch']}",
            "note": "predictions from SASS, not measurements"}
    return {"meta": meta, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


def load_budgets(path: Path = BUDGETS) -> dict:
    return json.loads(path.read_text())


def _matches(rule: dict, row: dict) -> bool:
    if rule.get("family", row["family"]) != row["family"]:
        return False
    if "config" in rule and rule["config"] != row["config"]:
        return False
    lo, hi = rule.get("M", [0, 1 << 30])
    return lo <= row["M"] <= hi


def check_budgets(rows: list[dict], budgets: dict, key: str = "limits") -> list[str]:
    """One message per (row, bound) a row breaks among the rules' ``key`` bounds (``limits``:
    enforced; ``targets``: the goals still open). ``max_<field>`` bounds that row field from
    above, ``min_<field>`` from below."""
    problems = []
    for rule in budgets["rules"]:
        for row in rows:
            if not _matches(rule, row):
                continue
            for name, bound in rule.get(key, {}).items():
                fld = name[4:]
                val = row[fld]
                bad = val > bound if name.startswith("max_") else val < bound
                if bad:
                    problems.append(f"{row['config']} M={row['M']} ({row['kernel']}, Triton "
                                    f"{row['triton']}): {fld} = {val} breaks {name} = {bound} "
                                    f"[{rule['name']}]")
    return problems


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def table(rows: list[dict], markdown: bool = False) -> str:
    from compress_ops._text import format_table, markdown_table

    head = ["config", "M", "kernel", "instr/w", "loop i/w", "KB in flight/SM", "CTAs/SM",
            "regs", "launches", "bound", "pred us", "baseline us", "pred speedup"]
    body = [[r["config"], str(r["M"]), r["kernel"].replace("_dequant_", "").replace("_kernel", ""),
             f"{r['instr_per_weight']:.2f}", f"{r['loop_instr_per_weight']:.2f}",
             f"{r['bytes_in_flight_per_sm'] / 1024:.1f}", str(r["ctas_per_sm"]),
             str(r["registers"]), str(r["launches"]), r["bound"], f"{r['predicted_us']:.1f}",
             f"{r['predicted_baseline_us']:.1f}"
             + (" (2 GEMMs)" if r.get("baseline", "").startswith("two") else ""),
             f"{r['predicted_speedup_vs_baseline']:.2f}x"] for r in rows]
    return (markdown_table if markdown else format_table)(head, body)


def default_json_path() -> Path:
    import triton

    return Path(__file__).resolve().parent / "results" / f"static-triton{triton.__version__}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write here (default: perf/results/static-triton<v>.json)")
    p.add_argument("--no-json", action="store_true", help="write no JSON")
    p.add_argument("--check", action="store_true", help="exit 1 when a budget is broken")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("-M", type=int, action="append", help="M values (default: the headline)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the model compiles real GPU code", file=sys.stderr)
        return 2
    ms = tuple(args.M) if args.M else HEADLINE["M"]
    out = run(ms=ms)
    print(table(out["rows"], args.markdown))
    for r in out["rows"]:
        if "predicted_speedup_vs_int8_weight_only" in r:
            print(f"{r['config']} M={r['M']}: {r['predicted_speedup']:.2f}x dense fp16, "
                  f"{r['predicted_speedup_vs_int8_weight_only']:.2f}x int8 weight-only "
                  f"({r['predicted_us']:.1f} us against {r['predicted_int8_weight_only_us']:.1f}; "
                  f"per launch {r['launch_us']})")
    if not args.no_json:
        path = Path(args.json) if args.json else default_json_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {path}")
    if args.check:
        budgets = load_budgets()
        gaps = check_budgets(out["rows"], budgets, "targets")
        for msg in gaps:
            print("target not met yet:", msg)
        problems = check_budgets(out["rows"], budgets)
        for msg in problems:
            print("BUDGET:", msg)
        print(f"{len(problems)} budget violations ({len(gaps)} open targets)")
        s24 = [r for r in out["rows"] if r["family"] == "sparse24" and r["M"] == 2048]
        if s24:  # the cuSPARSELt route: predicted on rooflines, off until measured
            ratio, dense = s24[0]["predicted_speedup"], dense_us(2048, s24[0]["N"], s24[0]["K"],
                                                               torch.float16)
            # 2.0: the sparse tensor cores' factor; 1.2: what NVIDIA reported for cuSPARSELt on
            # an H100 at M = N = K = 8192 (1.20-1.22x dense, NVIDIA/CUDALibrarySamples#203)
            for sp in (2.0, 1.5, 1.2):
                route = semi_structured_route_us(2048, sparse_speedup=sp)
                print(f"2:4 cuSPARSELt route (roofline, sparse GEMM {sp}x dense peak): M=2048 "
                      f"{route:.0f} us = {dense / route:.2f}x dense (kernel {ratio:.2f}x); "
                      f"crossover M = {semi_structured_crossover(ratio, sp)}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
