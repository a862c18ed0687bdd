"""The prepared GPU diagnostic (``perf/gpu_diag.py``), rehearsed on the CPU under the
interpreter: its figures mean nothing here, what it runs and records does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from compress_ops.perf import gpu_diag


def test_part3_times_both_routes_and_dense_at_every_m(tmp_path) -> None:
    """``--part 3 --small``: each case at each M through the large-M route and through the fused
    GEMM (the launches recorded prove which ran), both within tolerance of float64 F.linear
    on the dense weight, and dense F.linear per M; then int8's 256-column K steps."""
    out = tmp_path / "d.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "COMPRESS_OPS_CPU_BACKEND": "triton",
           "COMPRESS_OPS_DENSE_MIN_M": "4096"}
    proc = subprocess.run(
        [sys.executable, "-m", "compress_ops.perf.gpu_diag", "--out", str(out), "--small",
         "--part", "3"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    ms = {r["M"] for r in rows if r["kind"] == "route"}
    assert ms == {16, 64}
    fused = {"int4 g128 asym": "_fields_matmul_kernel", "int8 row sym": "_fields_matmul_kernel",
             "codebook 4-bit": "_fields_matmul_kernel"}
    assert set(fused) == set(gpu_diag.ROUTE_CASES)
    seen = set()
    ksteps = [r for r in rows if r["kind"] == "ksteps"]
    assert [(r["M"], r["forced"]) for r in ksteps] == [
        (m, f"{{'block_k': 256, 'num_stages': {st}}}") for m in (1, 16) for st in (4, 6)]
    assert all(r["rel_err"] < 2e-3 and r["launched"] == ["_fields_matmul_kernel"]
               for r in ksteps), ksteps
    for r in rows:
        if r["kind"] == "ksteps":
            continue
        assert "status" not in r, r
        if r["route"] == "dense":
            seen.add(("dense", r["M"]))
            continue
        seen.add((r["case"], r["M"], r["route"]))
        want = (["_dequant_weight_kernel", "F.linear"] if r["route"] == "dense-route"
                else [fused[r["case"]]])
        assert r["launched"] == want, r
        assert r["rel_err"] < 2e-3, r
    assert seen == ({("dense", m) for m in ms} | {(c, m, rt) for c in fused for m in ms
                                                  for rt in ("dense-route", "fused")})
