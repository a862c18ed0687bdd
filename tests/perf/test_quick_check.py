"""The quick GPU check (``perf/quick_check.py``, ``gpu_check.sh --quick``) on the CPU: its case
list, the validation that refuses a wrong row before timing it, the results file rewritten per
row, the join with the static model's rows, and one end-to-end run under the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress_ops.perf import quick_check as qc
from compress_ops.perf.timing import Timing

from ..kernels.tolerances import tol as kernel_tol

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Cases and tolerances
# --------------------------------------------------------------------------------------------


def test_headline_cases_are_the_static_models_configs() -> None:
    assert qc.CASE_NAMES == ("int4 g128 asym", "int8 row sym", "int2 g128 asym",
                             "binary g128 sym", "codebook 4-bit")
    by = {c.name: c for c in qc.CASES}
    assert (by["int4 g128 asym"].bits, by["int4 g128 asym"].group_size,
            by["int4 g128 asym"].symmetric) == (4, 128, False)
    assert (by["int8 row sym"].bits, by["int8 row sym"].group_size,
            by["int8 row sym"].symmetric) == (8, None, True)
    assert (by["int2 g128 asym"].bits, by["int2 g128 asym"].group_size) == (2, 128)
    assert by["codebook 4-bit"].kind == "codebook" and by["codebook 4-bit"].bits == 4
    assert by["int4 g128 asym"].native == "tinygemm"
    assert by["int8 row sym"].native == "int8pack"
    assert qc.headline_shapes(False) == ((1, 16, 2048), 8192, 8192, "fp16")
    # 2:4 joins the headline (issue 15), against torch's semi-structured (cuSPARSELt) GEMM
    assert [c.name for c in qc.CASES][-4:-2] == ["2:4", "rank 128"]
    assert by["2:4"].family == "sparse24" and by["2:4"].native == "semi"
    # low rank (issue 15) against the two cuBLAS GEMMs it fuses
    assert by["rank 128"].family == "lowrank" and by["rank 128"].rank == 128
    assert by["rank 128"].native == "two-gemm"
    assert {c.family for c in qc.CASES if c.name in qc.CASE_NAMES} == {"dequant"}
    # W8A8 (8-bit weights and activations) last, against torch's 8-bit GEMMs and the int8
    # weight-only row
    assert [c.name for c in qc.CASES][-2:] == ["w8a8 int8", "w8a8 fp8"]
    assert qc.W8A8_VARIANTS == ("int8", "fp8")
    for name, native in (("w8a8 int8", "int-mm"), ("w8a8 fp8", "scaled-mm")):
        assert by[name].family == "w8a8" and by[name].native == native
        assert by[name].versus == "int8 row sym" and by[name].versus in by
    assert {c.versus for c in qc.CASES if c.family != "w8a8"} == {None}
    ms, n, k, _ = qc.headline_shapes(True)
    assert ms == (1, 16) and n == k == 256
    # the fused conv's pairs (issue 15) carry the static model's names
    from compress_ops.perf import static_perf as sp

    names = {p.config for p in sp.DWSEP_PAIRS}
    assert {qc.conv_config(*t) for t in qc.CONV_PAIRS} <= names
    assert len(qc.CONV_PAIRS) == 2


@pytest.mark.parametrize("small", [True, False])
def test_smoke_covers_every_family_dtype_and_a_ragged_shape(small: bool) -> None:
    cases = qc.smoke_cases(small)
    assert len({c.name for c in cases}) == len(cases)
    variants = {(c.family, c.variant) for c in cases}
    assert {v for f, v in variants if f == "dequant"} == set(qc.CASE_NAMES)
    assert {f for f, _ in variants} == {"dequant", "sparse24", "lowrank", "dwsep_conv", "w8a8",
                                        "hashed"}
    assert {v for f, v in variants if f == "w8a8"} == set(qc.W8A8_VARIANTS)
    for fam, var in variants:
        for dt in ("fp16", "bf16"):
            mine = [c for c in cases if (c.family, c.variant, c.dtype) == (fam, var, dt)]
            assert len(mine) >= 2 and sum(c.ragged for c in mine) == 1, (fam, var, dt)
    for c in cases:
        if c.ragged and c.family != "dwsep_conv":
            m, n, k = c.shape
            assert n % 16 and k % 16, c  # neither N nor K a multiple of 16


def test_tolerances_are_the_kernel_tests() -> None:
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for k in (72, 8192):
            assert qc.tol(dt, k) == kernel_tol(dt, k)


def test_w8a8_static_rows_join_the_headline() -> None:
    """The static model files hold W8A8 rows under the cases' names at the headline shapes
    (the join on STATIC_KEYS finds them)."""
    ms, n, k, dt = qc.headline_shapes(False)
    files = sorted((REPO / "perf" / "results").glob("static-triton*.json"))
    assert files
    for f in files:
        rows, _, _ = qc.load_static(f)
        keys = {(r["config"], int(r["M"]), int(r["N"]), int(r["K"]), qc.short_dtype(r["dtype"]))
                for r in rows}
        for c in qc.CASES:
            if c.family == "w8a8":
                assert {(c.name, m, n, k, dt) for m in ms} <= keys, (f.name, c.name)
                assert {(c.versus, m, n, k, dt) for m in ms} <= keys, (f.name, c.versus)


@pytest.mark.parametrize("qdtype", ["int8", "fp8"])
def test_w8a8_reference_is_the_exact_one_not_dense(qdtype: str) -> None:
    """``w8a8_ref`` is the op's exact reference (compress_ops.reference, which the script does
    not import); dense ``F.linear`` misses it by the activation's quantization error, far
    outside ``w8a8_tol``, which is rounding-level."""
    from compress_ops.nn import W8A8Linear
    from compress_ops.reference import w8a8_linear_ref

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(200, 48, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 200, generator=g) * 200**-0.5)
        lin.bias.copy_(torch.randn(48, generator=g) * 0.1)
    mod = W8A8Linear.from_dense(lin, dtype=qdtype)
    x = torch.randn(7, 200, generator=g).half()
    ref = qc.w8a8_ref(x, mod)
    assert ref.dtype == torch.float16
    assert torch.equal(ref, w8a8_linear_ref(x, mod.qweight, mod.w_scales, mod.bias, None))
    cpu = torch.device("cpu")
    t = qc.w8a8_tol(torch.float16, 200, qdtype, cpu)
    assert 2.0**-11 <= t < 2.0**-11 + 1e-5
    assert qc.w8a8_tol(torch.bfloat16, 200, "int8", torch.device("cuda")) == 2.0**-8
    assert qc.w8a8_tol(torch.float16, 8192, "fp8", torch.device("cuda")) == (
        2.0**-11 + qc.FP8_GPU_ACC)
    assert qc.FP8_GPU_ACC <= 2e-3  # well below the activation's quantization error
    dense = torch.nn.functional.linear(x, mod.dense_weight(), mod.bias)
    ok, err, _ = qc.check_output(dense, ref, t)
    assert not ok and err > 5 * t
    ok, err, _ = qc.check_output(mod(x), ref, t)
    assert ok, err


def test_short_dtype_names() -> None:
    assert qc.short_dtype(torch.float16) == "fp16"
    assert qc.short_dtype("float16") == "fp16"
    assert qc.short_dtype("fp16") == "fp16"
    assert qc.short_dtype("torch.bfloat16") == "bf16"


# --------------------------------------------------------------------------------------------
# Validation before timing
# --------------------------------------------------------------------------------------------


def _never(fn) -> Timing:
    raise AssertionError("a wrong row must not be timed")


def _ref(m: int = 4, n: int = 32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("how", ["scaled", "nan", "shape"])
def test_wrong_row_is_refused_and_not_timed(how: str) -> None:
    ref = _ref()
    y = {"scaled": (ref * 1.05).half(),
         "nan": ref.half().index_put_((torch.tensor([0]), torch.tensor([0])),
                                      torch.tensor(float("nan"), dtype=torch.half)),
         "shape": ref[:, :-1].half()}[how]
    r = qc.measure_provider(lambda: y, ref, 2e-3, time_it=_never, capture=_never)
    if how == "shape":
        assert r["status"].startswith("error: ValueError")
    else:
        assert r["status"] == "wrong" and r["rel_err"] > 2e-3 or how == "nan"
    assert r["eager_us"] is None and r["graph_us"] is None


def test_raising_provider_is_recorded_with_its_reason() -> None:
    def boom() -> torch.Tensor:
        raise NotImplementedError("no CUDA kernel for this op")

    r = qc.measure_provider(boom, _ref(), 2e-3, time_it=_never, capture=None,
                            error_status="unavailable")
    assert r["status"] == "unavailable: NotImplementedError: no CUDA kernel for this op"
    assert r["eager_us"] is None


def test_correct_row_is_timed_eagerly_and_as_a_graph() -> None:
    ref = _ref()
    y = ref.half()
    calls: list[object] = []

    def time_it(fn) -> Timing:
        calls.append(fn)
        return Timing(median_us=10.0 + len(calls), samples=50)

    def capture(fn):
        return (lambda: None), fn()

    r = qc.measure_provider(lambda: y, ref, 2e-3, time_it=time_it, capture=capture)
    assert r["status"] == "ok" and r["graph_status"] == "ok"
    assert (r["eager_us"], r["graph_us"], r["eager_samples"]) == (11.0, 12.0, 50)
    assert r["rel_err"] < 2e-3 and r["max_rel_err"] is not None


def test_wrong_graph_output_is_not_timed() -> None:
    ref = _ref()
    calls: list[object] = []

    def time_it(fn) -> Timing:
        calls.append(fn)
        return Timing(median_us=5.0, samples=50)

    r = qc.measure_provider(lambda: ref.half(), ref, 2e-3, time_it=time_it,
                            capture=lambda fn: ((lambda: None), torch.zeros_like(ref)))
    assert r["status"] == "ok" and r["eager_us"] == 5.0
    assert r["graph_status"].startswith("wrong") and r["graph_us"] is None
    assert len(calls) == 1  # the eager timing only


def test_graph_capture_failure_keeps_the_eager_time() -> None:
    def capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    r = qc.measure_provider(lambda: _ref().half(), _ref(), 2e-3,
                            time_it=lambda fn: Timing(3.0, 50), capture=capture)
    assert r["status"] == "ok" and r["eager_us"] == 3.0
    assert r["graph_status"].startswith("error: RuntimeError")


# --------------------------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------------------------


def _row(case: str, m: int, provider: str, eager: float | None, graph: float | None = None,
         status: str = "ok") -> dict:
    return {"case": case, "M": m, "N": 8192, "K": 8192, "dtype": "fp16", "provider": provider,
            "status": status, "eager_us": eager, "graph_us": graph}


def test_writer_rewrites_the_file_after_every_row(tmp_path: Path) -> None:
    path = tmp_path / "results" / "q.json"
    res = qc.QuickResults(path, {"device": "test"})
    res.save()
    assert json.loads(path.read_text())["rows"] == []
    rows = [_row("int4 g128 asym", 1, "ours", 20.0, 10.0),
            _row("int4 g128 asym", 1, "dense", 60.0, 50.0),
            _row("int4 g128 asym", 1, "tinygemm", None, status="unavailable: x")]
    for i, r in enumerate(rows, 1):
        res.add("rows", r)
        obj = json.loads(path.read_text())
        assert obj["schema"] == qc.SCHEMA and len(obj["rows"]) == i
    obj = json.loads(path.read_text())
    assert set(obj) == {"schema", "meta", "smoke", "rows", "predicted_vs_measured"}
    ours = obj["rows"][0]
    assert ours["speedup_eager"] == pytest.approx(3.0) and ours["speedup_graph"] == 5.0
    assert obj["rows"][2]["speedup_eager"] is None
    assert not list(path.parent.glob("*.tmp"))


def test_resume_keeps_the_other_steps_sections(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    res = qc.QuickResults(path, {"torch": "1"})
    res.add("smoke", {"name": "a", "status": "ok"})
    res.set_step("smoke", status="done", seconds=1.0)
    again = qc.QuickResults(path, {"argv": ["--steps", "headline"]}, resume=True)
    again.reset("rows")
    again.add("rows", _row("int8 row sym", 16, "ours", 5.0))
    obj = json.loads(path.read_text())
    assert obj["smoke"] == [{"name": "a", "status": "ok"}]
    assert len(obj["rows"]) == 1 and obj["meta"]["torch"] == "1"
    assert obj["meta"]["steps"]["smoke"]["status"] == "done"
    fresh = qc.QuickResults(path, {})
    fresh.save()
    assert json.loads(path.read_text())["smoke"] == []


def test_quick_path_goes_under_out_when_set(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    monkeypatch.setenv("OUT", str(tmp_path))
    p = qc.quick_path("NVIDIA H200", date=datetime.date(2026, 12, 1))
    assert p == tmp_path / "results" / "2026-12-01-quick-nvidia-h200.json"
    monkeypatch.delenv("OUT")
    p = qc.quick_path("NVIDIA H200", out_dir=tmp_path / "x", date=datetime.date(2026, 12, 1))
    assert p == tmp_path / "x" / "2026-12-01-quick-nvidia-h200.json"


# --------------------------------------------------------------------------------------------
# The static model: its file, the join
# --------------------------------------------------------------------------------------------


def _static(config: str, m: int, pred: float, dense: float, dtype: str = "fp16", **kw) -> dict:
    return {"family": "dequant", "kernel": "dequant_linear", "config": config, "M": m,
            "N": 8192, "K": 8192, "dtype": dtype, "bits": 4, "group_size": 128,
            "triton": "3.6.0", "instr_per_weight": 2.0, "bytes_in_flight_per_sm": 1 << 15,
            "ctas_per_sm": 2, "launches": 1, "predicted_us": pred, "predicted_dense_us": dense,
            "predicted_speedup": dense / pred, **kw}


def test_join_measured_with_static_rows() -> None:
    measured = [_row("int4 g128 asym", 1, "ours", 20.0, 16.0),
                _row("int4 g128 asym", 1, "dense", 60.0, 48.0),
                _row("int4 g128 asym", 1, "tinygemm", 25.0, 20.0),
                _row("int8 row sym", 1, "ours", 40.0, None),
                _row("int8 row sym", 1, "dense", 60.0, None),
                _row("codebook 4-bit", 2048, "ours", None, status="wrong"),
                _row("codebook 4-bit", 2048, "dense", 900.0)]
    static = [_static("int4 g128 asym", 1, 18.0, 54.0),
              _static("int8 row sym", 1, 30.0, 54.0, dtype="float16"),  # alias of fp16
              _static("int8 row sym", 16, 30.0, 54.0),                  # not measured
              _static("int2 g128 asym", 1, 10.0, 54.0, dtype="bf16")]   # other dtype
    pvm = qc.join_predictions(measured, static, static_file="static-triton3.6.0.json")
    assert [(p["config"], p["M"]) for p in pvm] == [
        ("int4 g128 asym", 1), ("int8 row sym", 1), ("codebook 4-bit", 2048)]
    a, b, c = pvm
    assert a["predicted_us"] == 18.0 and a["static_file"] == "static-triton3.6.0.json"
    assert a["pred_over_eager"] == pytest.approx(0.9)
    assert a["pred_over_graph"] == pytest.approx(18.0 / 16.0)
    assert a["predicted_speedup"] == pytest.approx(3.0)
    assert a["measured_speedup_eager"] == pytest.approx(3.0)
    assert a["measured_speedup_graph"] == pytest.approx(3.0)
    assert b["predicted_us"] == 30.0 and b["measured_graph_us"] is None
    assert b["pred_over_graph"] is None and b["measured_speedup_eager"] == pytest.approx(1.5)
    assert c["predicted_us"] is None and c["status"] == "wrong"
    assert c["measured_eager_us"] is None and c["measured_speedup_eager"] is None
    lines = qc.predictions_table(pvm)
    assert len(lines) == 4 and "int4 g128 asym" in lines[1]


def test_w8a8_rows_are_compared_with_the_int8_weight_only_row(tmp_path: Path) -> None:
    """W8A8's ours row: the dense speedup, and the int8 weight-only ours row's time over its
    own (``vs_*``), measured and predicted; other rows get no ``versus``."""
    res = qc.QuickResults(tmp_path / "q.json", {})
    for r in (_row("int8 row sym", 1, "ours", 30.0, 20.0), _row("int8 row sym", 1, "dense", 60.0),
              _row("w8a8 int8", 1, "ours", 15.0, 10.0), _row("w8a8 int8", 1, "dense", 60.0, 40.0),
              _row("w8a8 int8", 1, "int-mm", None, status="skipped: x"),
              _row("w8a8 fp8", 16, "ours", 12.0), _row("w8a8 fp8", 16, "dense", 48.0)):
        res.add("rows", r)
    rows = json.loads(res.path.read_text())["rows"]
    wo, w8, w8nat, fp8 = rows[0], rows[2], rows[4], rows[5]
    assert "versus" not in wo and "vs_eager" not in w8nat
    assert w8["versus"] == "int8 row sym" and w8["speedup_eager"] == pytest.approx(4.0)
    assert w8["vs_eager"] == pytest.approx(2.0) and w8["vs_graph"] == pytest.approx(2.0)
    assert fp8["versus"] == "int8 row sym" and fp8["vs_eager"] is None  # no int8 row at 16
    static = [_static("int8 row sym", 1, 30.0, 54.0), _static("w8a8 int8", 1, 15.0, 54.0)]
    pvm = qc.join_predictions(rows, static, static_file="s.json")
    by = {(p["config"], p["M"]): p for p in pvm}
    p = by[("w8a8 int8", 1)]
    assert p["versus"] == "int8 row sym" and p["predicted_vs"] == pytest.approx(2.0)
    assert p["measured_vs_eager"] == pytest.approx(2.0)
    assert p["measured_vs_graph"] == pytest.approx(2.0)
    assert by[("w8a8 fp8", 16)]["predicted_vs"] is None and "versus" not in by[("int8 row sym", 1)]
    lines = qc.predictions_table(pvm)
    assert len(lines) == 1 + len(pvm) + 2 and "x int8 row sym" in lines[3]
    table = qc.headline_table(rows)
    assert any("x int8 row sym" in line and "2.00" in line for line in table)


def test_w8a8_native_int_mm_is_not_called_at_small_m_on_cuda() -> None:
    """cuBLASLt's int8 GEMM takes M > 16: at M <= 16 on CUDA the row is skipped (nothing runs:
    CPU tensors suffice here); on the CPU it runs, bit-exact against the int32 product."""
    from compress_ops.nn import W8A8Linear

    lin = torch.nn.Linear(64, 32, bias=False, dtype=torch.float16)
    mod = W8A8Linear.from_dense(lin, dtype="int8")
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).half()
    case = {c.name: c for c in qc.CASES}["w8a8 int8"]
    r = qc._measure_w8a8_native(case, mod, x, qc.w8a8_ref(x, mod), torch.device("cuda"),
                                _never, None)
    assert r == {"status": "skipped: torch._int_mm needs M > 16 on CUDA"}
    r = qc._measure_w8a8_native(case, mod, x, qc.w8a8_ref(x, mod), torch.device("cpu"),
                                lambda fn: Timing(1.0, 3), None)
    assert r["status"] == "ok" and r["rel_err"] == 0.0 and r["tol"] == 0.0
    assert "torch._int_mm" in r["note"]


def test_pick_static_prefers_the_exact_version_else_the_nearest(tmp_path: Path) -> None:
    path, note = qc.pick_static("3.6.0", tmp_path)
    assert path is None and "no static model file" in note
    for v in ("3.3.1", "3.5.0", "3.9.0"):
        (tmp_path / f"static-triton{v}.json").write_text('{"meta": {}, "rows": []}')
    path, note = qc.pick_static("3.6.0", tmp_path)
    assert path.name == "static-triton3.5.0.json" and "nearest" in note and "3.5.0" in note
    (tmp_path / "static-triton3.6.0.json").write_text('{"meta": {}, "rows": []}')
    path, note = qc.pick_static("3.6.0", tmp_path)
    assert path.name == "static-triton3.6.0.json" and "nearest" not in note


def test_load_static_drops_rows_without_a_join_key(tmp_path: Path) -> None:
    p = tmp_path / "static-triton3.6.0.json"
    p.write_text(json.dumps({"meta": {"triton": "3.6.0"},
                             "rows": [_static("int4 g128 asym", 1, 18.0, 54.0),
                                      {"config": "int8 row sym", "M": 16}]}))
    rows, meta, problems = qc.load_static(p)
    assert len(rows) == 1 and meta["triton"] == "3.6.0"
    assert len(problems) == 1 and "missing" in problems[0]
    p.write_text("[1, 2]")
    assert qc.load_static(p)[0] == [] and qc.load_static(p)[2]


# --------------------------------------------------------------------------------------------
# The smoke pool hands back the cases of a poisoned worker
# --------------------------------------------------------------------------------------------


def fake_worker(case: qc.SmokeCase, device: str) -> dict:
    """Pool task for the test below: the int8 case is handed back once (a marker file says
    whether it already was), the others pass without running a kernel."""
    marker = Path(os.environ["QC_TEST_MARKER"])
    if case.variant == "int8 row sym" and not marker.exists():
        marker.write_text("x")
        return {"name": case.name, "status": "retry", "note": "poisoned"}
    if case.variant == "int2 g128 asym":
        return {"name": case.name, "status": "retry", "note": "always"}
    return {"name": case.name, "status": "ok", "pid": os.getpid()}


@pytest.mark.slow
def test_smoke_pool_reruns_handed_back_cases(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QC_TEST_MARKER", str(tmp_path / "marker"))
    cases = [c for c in qc.smoke_cases(True) if c.dtype == "fp16" and c.shape == (16, 64, 128)
             and c.family == "dequant"]
    got: list[dict] = []
    qc.run_smoke(cases, torch.device("cpu"), 2, got.append, rounds=2, worker=fake_worker)
    by = {r["name"]: r for r in got}
    assert len(got) == len(cases) == len(by)
    for c in cases:
        r = by[c.name]
        if c.variant == "int2 g128 asym":  # handed back every round: recorded as not run
            assert r["status"] == "FAIL" and "not run" in r["note"]
        else:
            assert r["status"] == "ok"


# --------------------------------------------------------------------------------------------
# End to end: the CPU rehearsal of the module, and the shell script
# --------------------------------------------------------------------------------------------


def test_quick_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """``--device cpu --small`` under the interpreter (~15 s): every step, every record."""
    ms, n, k, _ = qc.headline_shapes(True)
    (tmp_path / "static-triton3.6.0.json").write_text(json.dumps(
        {"meta": {}, "rows": [{**_static(c, 1, p, 9.0), "N": n, "K": k} for c, p in (
            ("int4 g128 asym", 5.0), ("int8 row sym", 6.0), ("w8a8 int8", 3.0))]}))
    out = tmp_path / "q.json"
    # M = 16 takes the large-M route here (dequantize + F.linear), as M = 2048 does on a GPU
    env = {**os.environ, "TRITON_INTERPRET": "1", "COMPRESS_OPS_DENSE_MIN_M": "16"}
    env.pop("COMPRESS_OPS_CPU_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "compress_ops.perf.quick_check", "--device", "cpu", "--small",
         "--out", str(out), "--static-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    obj = json.loads(out.read_text())
    assert obj["schema"] == qc.SCHEMA
    meta = obj["meta"]
    for key in ("date", "git_sha", "torch", "triton", "gpu", "sms", "steps"):
        assert key in meta, key
    assert meta["cpu_backend"] == "triton"  # the kernels ran under the interpreter
    assert {s: v["status"] for s, v in meta["steps"].items()} == {
        "smoke": "done", "headline": "done", "table": "done"}
    assert len(obj["smoke"]) == len(qc.smoke_cases(True))
    assert all(r["status"] == "ok" for r in obj["smoke"]), [
        r for r in obj["smoke"] if r["status"] != "ok"]
    conv = [r for r in obj["rows"] if r["case"].startswith("dw3 ")]
    rows = [r for r in obj["rows"] if not r["case"].startswith("dw3 ")]
    assert [(r["M"], r["case"], r["provider"]) for r in rows][:3] == [
        (1, "int4 g128 asym", "ours"), (1, "int4 g128 asym", "dense"),
        (1, "int4 g128 asym", "tinygemm")]
    assert {r["M"] for r in rows} == set(ms)
    # the fused conv's pairs after the linear rows: ours and the cuDNN pair ("dense"), named
    # as the static model names them, M = B Ho Wo, N = Cout, K = C
    assert obj["rows"][-len(conv):] == conv
    assert [(r["case"], r["provider"], r["M"], r["N"], r["K"]) for r in conv] == [
        (qc.conv_config(h, c, co, s), p, 2 * (-(-h // s)) ** 2, co, c)
        for h, c, co, s in qc.CONV_PAIRS_SMALL for p in ("ours", "dense")]
    assert all(r["status"] == "ok" and r["eager_us"] > 0 for r in conv), conv
    # M = 1 also times the GEMV (the alternative to the shipped 16-row tile), every case
    assert {r["case"] for r in rows if r["provider"] == qc.GEMV_ALT} == {
        c.name for c in qc.CASES if c.family not in ("lowrank", "w8a8")}
    assert {r["M"] for r in rows if r["provider"] == qc.GEMV_ALT} == {1}
    # the large-M route's rows also time the fused GEMM (its alternative), every low-bit case
    assert {(r["case"], r["M"]) for r in rows if r["provider"] == qc.FUSED_ALT} == {
        (name, 16) for name in qc.CASE_NAMES}
    assert {r["note"] for r in rows if r["provider"] == "ours" and r["M"] == 16
            and r["case"] in qc.CASE_NAMES} == {"route=dequantize+F.linear"}
    # 2:4: the 16-row tile at every M (fp16), the semi-structured GEMM skipped on the CPU
    assert {r["note"] for r in rows if r["provider"] == "ours" and r["case"] == "2:4"} == {
        "config=gemm_m16n64k256w4s4"}
    assert {r["status"] for r in rows if r["provider"] == "semi"} == {
        "skipped: semi is CUDA-only here (CPU rehearsal)"}
    # low rank: the fused kernel up to fused_max_m (64), timed beside the two GEMMs
    assert {r["note"] for r in rows if r["provider"] == "ours" and r["case"] == "rank 128"} == {
        "fused"}
    assert {r["M"] for r in rows if r["provider"] == "two-gemm"} == set(ms)
    # W8A8: ours against its exact reference (bit-exact under the interpreter), dense against
    # dense, torch's 8-bit GEMMs on the pre-quantized x (the CPU runs _int_mm at any M), and
    # the int8 weight-only row of the same M
    w8 = {(r["case"], r["M"], r["provider"]): r for r in rows if r["case"].startswith("w8a8")}
    assert set(w8) == {(c, m, p) for m in ms for c, p in (
        ("w8a8 int8", "ours"), ("w8a8 int8", "dense"), ("w8a8 int8", "int-mm"),
        ("w8a8 fp8", "ours"), ("w8a8 fp8", "dense"), ("w8a8 fp8", "scaled-mm"))}
    for (_, _, p), r in w8.items():
        if p == "ours":
            assert r["status"] == "ok" and r["rel_err"] <= r["tol"] <= 2.0**-11 + 1e-4, r
            assert r["versus"] == "int8 row sym" and r["vs_eager"] > 0, r
            assert r["note"].startswith("config=gemm_"), r
        elif p == "dense":
            assert r["tol"] == qc.tol(torch.float16, k) and r["rel_err"] <= r["tol"], r
        elif p == "int-mm":
            assert r["status"] == "ok" and r["rel_err"] == 0.0, r
        else:  # torch._scaled_mm on the CPU: where this torch has it
            assert r["status"] == "ok" or r["status"].startswith("unavailable"), r
    for r in rows:
        if r["provider"] in ("ours", "dense", "int8pack", "two-gemm", "int-mm", *qc.ALTS):
            assert r["status"] == "ok" and r["eager_us"] > 0, r
            assert r["graph_status"].startswith("skipped")
        elif r["provider"] in ("tinygemm", "semi"):
            assert r["status"].startswith("skipped")
    pvm = obj["predicted_vs_measured"]
    assert len(pvm) == len(ms) * len(qc.CASES) + len(qc.CONV_PAIRS_SMALL)
    hit = [p for p in pvm if p["predicted_us"] is not None]
    assert [(p["config"], p["M"]) for p in hit] == [
        ("int4 g128 asym", 1), ("int8 row sym", 1), ("w8a8 int8", 1)]
    assert hit[2]["predicted_vs"] == pytest.approx(2.0) and hit[2]["measured_vs_eager"] > 0
    assert "nearest" in meta["static"]["note"] or meta["triton"] == "3.6.0"
    assert "predicted vs measured" in proc.stdout and "headline" in proc.stdout
    assert "x int8 row sym" in proc.stdout


def test_gpu_check_script_parses_and_rejects_unknown_arguments() -> None:
    script = REPO / "perf" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "--fast"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert helped.returncode == 0 and "--quick" in helped.stdout
