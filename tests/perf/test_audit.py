"""compress_ops.perf.audit: the static GPU audit finds tensor cores, spills, missing MMA (no GPU).

The audit compiles real sm_90 code, which the Triton interpreter this test session runs under
cannot do, so each check runs in a fresh interpreter-free subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from compress_ops.kernels import sparse24 as sp


def _audit(config: str, expect_mma: str | None = None, family: str = "sparse24") -> dict:
    code = f"""
import json
from compress_ops.perf import audit
from dataclasses import asdict
from compress_ops.kernels import {family} as fam
spec = next(s for s in fam.audit_specs() if s["config"] == {config!r})
if {expect_mma!r} is not None:
    spec = dict(spec, expect_mma={expect_mma!r})
print(json.dumps(asdict(audit.compile_spec(spec, 90))))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_audit_sees_hgmma_and_no_spills_in_a_shipped_gemm_config():
    row = _audit("gemm_m64n128k64w8s3/swap/fp16/k16")  # (the weight as the register operand)
    assert row["ok"], row["problems"]
    assert "HGMMA" in row["mma"] and row["spill_loads"] == row["spill_stores"] == 0
    assert 0 < row["registers"] <= 255 and 0 < row["shared_bytes"] <= 227 * 1024


def test_audit_passes_the_shipped_large_m_dequant_and_codebook_tiles():
    for variant in ("asym4", "cb3"):
        row = _audit(f"gemm_m128n128k32w8s3/{variant}/fp16", family="dequant")
        assert row["ok"], row["problems"]
        assert "HGMMA" in row["mma"] and row["spill_loads"] == row["spill_stores"] == 0


def test_audit_flags_a_kernel_without_the_expected_mma():
    row = _audit("gemv_m1n16k256w4s1/fp16/k16", expect_mma="HGMMA")
    assert not row["ok"] and "expected HGMMA" in row["problems"]


def test_audit_covers_every_default_config_and_both_k_specializations():
    names = {s["config"] for s in sp.audit_specs()}
    for table in sp._load_defaults().values():
        for path in ("gemv", "gemm"):
            for c in table[path].values():
                cfg = sp.KernelConfig(path, **c)
                swap = sp.swap_ab(cfg, torch.float16, torch.device("cpu"))  # the default table
                name = f"{cfg.name}/swap" if swap else cfg.name
                for dt in ("fp16", "bf16"):
                    assert f"{name}/{dt}/k16" in names and f"{name}/{dt}/kany" in names


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter sessions only")
def test_audit_refuses_to_run_under_the_interpreter():
    out = subprocess.run([sys.executable, "-m", "compress_ops.perf.audit"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr
