"""Static GPU audit: compile every kernel config for sm_80 and sm_90 with no GPU and check the SASS.

For each entry of every kernel family's ``audit_specs()`` this compiles the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, reads registers and
shared memory (``cuobjdump -res-usage``) and the SASS (``cuobjdump -sass``, the binary that ships
in Triton's wheel), and checks:

* no local-memory spills (``LDL`` / ``STL`` instructions),
* shared memory within the chip's per-block limit (sm_80: 163 KiB, sm_90: 227 KiB),
* tensor-core instructions in every kernel that calls ``tl.dot`` on 16-bit inputs:
  ``HGMMA`` on sm_90 when BLOCK_M >= 64, ``HMMA`` otherwise (and always on sm_80); on 8-bit
  inputs (w8a8) what the spec names per architecture (``expect_mma`` as ``{arch: kind}``):
  int8 ``IMMA`` on sm_80 and ``IGMMA`` on sm_90 (64+ rows), FP8 ``QGMMA`` on sm_90 (a spec's
  ``archs`` lists the architectures it is compiled for: FP8 has no sm_80 tensor cores).

Prints one row per (kernel, config, arch) and exits non-zero on any violation.

    python -m compress_ops.perf.audit [--json out.json] [--family sparse24] [--arch 90]
                                      [--defaults-only]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compress_ops._text import format_table as _format_table

FAMILIES = ["sparse24", "dequant", "lowrank", "dwsep_conv", "w8a8", "hashed"]
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass
class AuditRow:
    kernel: str
    config: str
    arch: int
    registers: int
    shared_bytes: int
    spill_loads: int
    spill_stores: int
    mma: str
    expect_mma: str
    ok: bool
    problems: str


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_CUOBJDUMP), flag, f.name], check=True,
                              capture_output=True, text=True).stdout


MMA_KINDS = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA")


def _mma_kind(sass: str) -> str:
    """The tensor-core instructions in ``sass``: wgmma (``HGMMA`` 16-bit, ``IGMMA`` int8,
    ``QGMMA`` FP8) and mma.sync (``HMMA`` 16-bit and FP8 on sm_89, ``IMMA`` int8)."""
    kinds = [k for k in MMA_KINDS if re.search(rf"\b{k}\b", sass)]
    return "+".join(kinds) if kinds else "-"


def expected_mma(spec: dict, arch: int) -> str:
    """The tensor-core instruction ``spec`` must compile to on ``sm_<arch>``: its
    ``expect_mma`` for that arch when given per arch (``{80: "IMMA", 90: "IGMMA"}``), else
    its kind on sm_90 and ``HMMA`` on sm_80; ``-``: none expected."""
    expect = spec.get("expect_mma", "-")
    if isinstance(expect, dict):
        return expect.get(arch, "-")
    if expect != "-" and arch == 80:
        return "HMMA"
    return expect


def compile_spec(spec: dict, arch: int) -> AuditRow:
    """Compile one spec for ``sm_<arch>`` and audit its SASS."""
    fn = spec["fn"]
    if "attrs" in spec:  # Triton's own specialization of a recorded call (kernels.launches)
        attrs = spec["attrs"]
    else:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a in spec.get("aligned", [])}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
               **spec.get("options", {})}
    expect = expected_mma(spec, arch)
    problems: list[str] = []
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # a config that does not compile is a violation, not a crash
        msg = str(exc).strip().splitlines()
        return AuditRow(spec["kernel"], spec["config"], arch, 0, 0, 0, 0, "-", expect, False,
                        f"compile failed: {msg[-1] if msg else type(exc).__name__}")
    cubin = compiled.asm["cubin"]
    sass = cuobjdump(cubin, "-sass")
    res = cuobjdump(cubin, "-res-usage")
    regs = int(m.group(1)) if (m := re.search(r"REG:(\d+)", res)) else -1
    shared = int(compiled.metadata.shared)
    ldl = len(re.findall(r"\bLDL(\.\w+)*\b", sass))
    stl = len(re.findall(r"\bSTL(\.\w+)*\b", sass))
    mma = _mma_kind(sass)
    if ldl or stl:
        problems.append(f"spills: {ldl} LDL / {stl} STL")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"shared {shared} B > {SHARED_LIMIT[arch]} B")
    if expect != "-" and expect not in mma.split("+"):
        problems.append(f"expected {expect}, SASS has {mma}")
    return AuditRow(spec["kernel"], spec["config"], arch, regs, shared, ldl, stl, mma, expect,
                    not problems, "; ".join(problems))


def collect_specs(families: list[str], defaults_only: bool = False) -> list[dict]:
    specs = []
    for fam in families:
        mod = importlib.import_module(f"compress_ops.kernels.{fam}")
        specs.extend(mod.audit_specs(defaults_only=defaults_only))
    return specs


def format_table(rows: list[AuditRow]) -> str:
    head = ["kernel", "config", "arch", "regs", "shared B", "LDL", "STL", "MMA", "ok"]
    body = [[r.kernel, r.config, f"sm_{r.arch}", str(r.registers), str(r.shared_bytes),
             str(r.spill_loads), str(r.spill_stores), r.mma,
             "ok" if r.ok else "FAIL: " + r.problems] for r in rows]
    return _format_table(head, body)


_SPECS: list[dict] = []


def _compile_indexed(job: tuple[int, int]) -> AuditRow:
    return compile_spec(_SPECS[job[0]], job[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", help="kernel family (default: all)")
    p.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default: both)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--defaults-only", action="store_true",
                   help="only the shipped default configs (not the autotune space)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel compiles (default: all cores)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the audit compiles real GPU code", file=sys.stderr)
        return 2
    if not _CUOBJDUMP.exists():
        print(f"cuobjdump not found at {_CUOBJDUMP}", file=sys.stderr)
        return 2
    _SPECS[:] = collect_specs(args.family or FAMILIES, args.defaults_only)
    jobs = [(i, arch) for i in range(len(_SPECS)) for arch in (args.arch or [80, 90])
            if arch in _SPECS[i].get("archs", (80, 90))]
    print(f"auditing {len(jobs)} compiles ({len(_SPECS)} specs) with triton {triton.__version__} "
          f"on {args.jobs} processes",
          flush=True)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
        rows = list(pool.map(_compile_indexed, jobs))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
