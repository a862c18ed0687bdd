"""A calibration tried and not adopted: fit the H200's measured times of the small fields-GEMM
tile to ``fixed + steps x (step_us + us_per_instr x loop instructions per thread)``, where
``steps = ceil(grid / SMs) x K steps per CTA``, on the shipped configs (the quick check's
M = 1 / 16 rows and gpu_diag's K and N scaling), then check it on gpu_diag's forced configs.

    env -u TRITON_INTERPRET PYTHONPATH=$PWD/.triton-3.6.0 \\
        python perf/experiments/2026-11-30-per-step-fit.py   # from the checkout (Triton 3.6)

Its output is kept next to it (``.txt``): the fit and the static model's instruction counts
come from Triton 3.6, the GPU image's version, which ran the measurements.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from compress_ops.kernels import dequant as dq
from compress_ops.kernels import launches, tuning
from compress_ops.kernels.formats import dequant as fd
from compress_ops.kernels.tuning import KernelConfig
from compress_ops.perf import static_perf as sp

RESULTS = Path(__file__).resolve().parents[1] / "results"
NAMES = {"int8 per row": "int8 row sym"}  # the quick check's case names -> the model's
SHIPPED_16 = dict(path="gemm", block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=12)


def _load(name: str) -> list[dict]:
    return json.loads((RESULTS / name).read_text())["rows"]


def _steps_and_body(case: sp.Case, m: int, n: int, k: int, cfg=None) -> tuple[int, int, int]:
    """(K steps per SM, loop instructions per thread per step, launches) of a recorded call."""
    with tuning.simulate_gpu(sp.MODEL["gpu"], sp.MODEL["sms"]), \
            launches.capture(run=False) as got:
        if cfg is None:
            case.call(m, n, k, torch.float16)
        else:
            q, s, z = fd.empty_affine(n, k, case.bits, case.group_size,
                                      case.config.endswith("sym"), dtype=torch.float16)
            dq.dequant_matmul(torch.empty(m, k, dtype=torch.float16), q, s, z, None,
                              case.bits, case.group_size or k, config=cfg)
    (la,) = [g for g in got if not isinstance(g.kernel, str)]
    row = sp.model_launch(la, case, m, n, k, torch.float16)
    a, b = sp.loops(sp.parse_sass(sp.compile_launch(la).sass))[0]
    return math.ceil(row.grid / sp.MODEL["sms"]) * row.trips, b - a + 1, len(got)


def main() -> None:
    cases = {c.config: c for c in sp.CASES}
    measured: dict[tuple, list[float]] = {}
    for r in _load("2026-11-30-quick-nvidia-h200.json"):
        if r["provider"] == "ours" and r["M"] in (1, 16) and r.get("graph_us"):
            measured.setdefault((NAMES.get(r["case"], r["case"]), r["M"], 8192, 8192),
                                []).append(r["graph_us"])
    diag = _load("2026-11-30-diag-nvidia-h200.json")
    for r in diag:
        if "us" in r and (r["kind"] == "scale" or (r["kind"] == "sweep" and r["M"] == 1
                                                   and r.get("config") == "shipped")):
            measured.setdefault((r["case"], r["M"], r["N"], r["K"]), []).append(r["us"])
    fit = []
    for (case, m, n, k), us in sorted(measured.items()):
        steps, body, _ = _steps_and_body(cases[case], m, n, k)
        fit.append(((case, m, n, k), float(np.mean(us)), steps, body))
    x = np.array([[1.0, s, s * b] for _, _, s, b in fit])
    y = np.array([t for _, t, _, _ in fit])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    fixed, step, per_instr = coef
    print(f"fit: fixed_us={fixed:.2f} step_us={step:.4f} us_per_instr={per_instr:.6f}")
    for (key, t, _, _), p in zip(fit, x @ coef, strict=True):
        print(f"  in sample  {key!s:42} measured {t:6.1f} fitted {p:6.1f} "
              f"({(p - t) / t * 100:+.1f}%)")
    for r in diag + _load("2026-11-30-diag2-nvidia-h200.json"):
        forced = r.get("forced", "")
        if (r["kind"] not in ("sweep", "sweep2") or not forced or forced.startswith("gemv")
                or r["M"] > 16 or "us" not in r or r["case"] not in cases):
            continue
        cfg = KernelConfig(**{**SHIPPED_16, **json.loads(forced.replace("'", '"'))})
        steps, body, n_launch = _steps_and_body(cases[r["case"]], r["M"], 8192, 8192, cfg)
        p = coef[0] + steps * (coef[1] + coef[2] * body)
        print(f"  forced     {r['case']:16} M={r['M']:<3} {forced:38} launches={n_launch} "
              f"measured {r['us']:6.1f} fitted {p:6.1f} ({(p - r['us']) / r['us'] * 100:+.1f}%)")


if __name__ == "__main__":
    main()
