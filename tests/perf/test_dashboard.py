"""The dashboard's headline table (static predictions + quick-check measurements + benchmark
files), its per-device sections and pictures, on small synthetic results folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from compress_ops.perf import dashboard, machine, schema

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")

GPU = "NVIDIA Test"


def _static(triton: str, preds: dict[tuple[str, str, int], float]) -> dict:
    rows = []
    for (family, config, m), sp in preds.items():
        rows.append({"family": family, "config": config, "M": m, "N": 0 if m == 0 else 8192,
                     "K": 0 if m == 0 else 8192, "dtype": "fp16", "triton": triton,
                     "predicted_us": 10.0, "predicted_dense_us": 10.0 * sp,
                     "predicted_speedup": sp})
    return {"meta": {"model": {"gpu": GPU}, "triton": triton, "arch": "sm_90"}, "rows": rows}


def _quick_row(case: str, m: int, provider: str, graph: float | None, eager: float = 0.5,
               status: str = "ok") -> dict:
    return {"case": case, "M": m, "N": 8192, "K": 8192, "dtype": "fp16", "provider": provider,
            "status": status, "eager_us": 1.0, "graph_us": 1.0, "graph_status": "ok",
            "speedup_eager": eager, "speedup_graph": graph}


def _quick(rows: list[dict], triton: str = "3.6.0", pvm: list[dict] | None = None) -> dict:
    return {"schema": "quick-1", "smoke": [],
            "meta": {"device": GPU, "triton": triton, "git_sha": "abc1234", "date": "2026"},
            "rows": rows, "predicted_vs_measured": pvm or []}


def _bench(device: str, sha: str = "abcdef0123") -> dict:
    """A CPU benchmark file: dequant (int4 at two shapes and two dtypes, plus routes that stay
    out of the headline) and 2:4."""
    env = machine.Env(device=device, torch="2.x", triton="3.x", git_sha=sha)
    peaks = schema.Peaks(hbm_gbps=100.0, flops_tflops={"float32": 1.0})
    rows = []
    # speedup = dense time / ours time: dense 10 us at every case; ours time encodes the case
    for (n, k) in ((256, 512), (512, 1024)):
        for dt in (torch.float32, torch.bfloat16):
            for m in (1, 16, 128):
                common = dict(kernel="dequant_linear", shape={"M": m, "N": n, "K": k},
                              dtype=dt, flops=2.0 * m * n * k, env=env, peaks=peaks,
                              min_bytes=1e5, samples=50)
                rows.append(schema.make_row(provider="dense", median_us=10.0,
                                            backend="cpu-dense", **common))
                us = 10.0 / (m / 100 + (2.0 if n == 512 else 1.0)
                             + (0.5 if dt == torch.bfloat16 else 0.0))
                rows.append(schema.make_row(provider="ours-int4-g128", median_us=us,
                                            backend="cpu", **common))
                rows.append(schema.make_row(provider="ours-int4-g128-dequant", median_us=1.0,
                                            backend="cpu", **common))
                rows.append(schema.make_row(provider="torch-int4pack", median_us=1.0,
                                            backend="cpu", **common))
    for m in (1, 2048):
        common = dict(kernel="sparse24_linear", shape={"M": m, "N": 256, "K": 256},
                      dtype=torch.float32, flops=1.0, env=env, peaks=peaks, min_bytes=1e5,
                      samples=50)
        rows.append(schema.make_row(provider="dense", median_us=10.0, backend="cpu-dense",
                                    **common))
        rows.append(schema.make_row(provider="ours", median_us=40.0, backend="cpu-reference",
                                    **common))
    schema.fill_speedups(rows, ["dense"])
    meta = {"device": device, "backend": "cpu", "torch": "2.x", "triton": "3.x",
            "git_sha": sha, "date": "2026-01-01T00:00:00+00:00", "peaks": peaks.to_dict()}
    return json.loads(json.dumps(schema.results_object(meta, rows)))


def _write(d: Path, name: str, obj: dict) -> None:
    (d / name).write_text(json.dumps(obj))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    _write(res, "static-triton3.6.0.json", _static("3.6.0", {
        ("dequant", "int4 g128 asym", 1): 3.0, ("dequant", "int4 g128 asym", 16): 2.5,
        ("dequant", "int4 g128 asym", 2048): 0.9,
        ("sparse24", "2:4", 1): 1.5, ("sparse24", "2:4", 16): 1.4,  # no M = 2048
        ("dwsep_conv", "dw3 56^2x144->24 s1", 100352): 2.0,
        ("dwsep_conv", "mbv2 pairs (sum)", 0): 1.52}))
    _write(res, "static-triton3.9.0.json", _static("3.9.0", {
        ("dequant", "int4 g128 asym", 1): 3.1}))
    _write(res, "2026-01-01-quick-nvidia-test.json", _quick(
        [_quick_row("int4 g128 asym", 1, "ours", 1.4),
         _quick_row("int4 g128 asym", 1, "dense", 1.0, 1.0),
         _quick_row("int4 g128 asym", 1, "tinygemm", 1.9),
         _quick_row("int4 g128 asym", 16, "ours", 1.2),
         _quick_row("int4 g128 asym", 2048, "ours", None, status="wrong"),
         _quick_row("rank 128", 1, "ours", 5.0)],  # measured, never predicted
        pvm=[{"config": "int4 g128 asym", "M": 1, "N": 8192, "K": 8192, "dtype": "fp16",
              "static_file": "static-triton3.6.0.json", "predicted_speedup": 3.5}]))
    # an experiment: same device, a tag in the name; stays out of the headline
    _write(res, "2026-01-02-quick-sz_words-nvidia-test.json", _quick(
        [_quick_row("int4 g128 asym", 1, "ours", 0.1)]))
    _write(res, "2026-01-01-cpu-test-a.json", _bench("cpu: Test A"))
    _write(res, "2026-01-01-cpu-test-b.json", _bench("cpu: Test B", sha="fedcba9876+dirty"))
    # an accuracy run (perf/one_shot_bert.py) and gpu_diag rows: listed, not rendered
    _write(res, "2026-01-01-cpu-one-shot-x.json", {"meta": {"model": "m"}, "rows": [
        {"section": "dense", "label": "dense", "cosine": 1.0}]})
    _write(res, "2026-01-01-diag-nvidia-test.json", {"meta": {}, "rows": [{"kind": "copy"}]})
    return res


def _by(rows: list[dashboard.HeadlineRow]) -> dict[tuple[str, str], dashboard.HeadlineRow]:
    return {(r.device, r.config): r for r in rows}


def test_headline_rows_join_predicted_and_measured(results: Path) -> None:
    loaded = dashboard.load_dir(results)
    assert loaded.problems == []
    assert [n for n, _ in loaded.skipped] == ["2026-01-01-cpu-one-shot-x.json",
                                              "2026-01-01-diag-nvidia-test.json"]
    assert [tag for *_, tag in loaded.quick] == [None, "sz_words"]
    rows = dashboard.headline_rows(loaded)
    assert [r.device for r in rows][0] == GPU  # GPUs first
    by = _by(rows)

    # both: graph-replay speedup of ours next to the prediction of the measurement's Triton
    int4 = by[(GPU, "int4 g128 asym")]
    assert int4.family == "dequant" and int4.shape == "N=K=8192 fp16"
    assert int4.text_cells() == ["1.40 (pred 3.00)", "1.20 (pred 2.50)", "0.90 predicted"]
    assert "quick check, CUDA-graph replay" in int4.measured_by
    assert int4.predicted_by == "static-triton3.6.0.json"
    # predicted only, M = 2048 absent
    assert by[(GPU, "2:4")].text_cells() == ["1.50 predicted", "1.40 predicted", "—"]
    # measured only
    assert by[(GPU, "rank 128")].text_cells() == ["5.00", "—", "—"]
    assert by[(GPU, "rank 128")].family == "lowrank"
    # the conv: one line for the whole network, in "other"
    conv = [r for r in rows if r.family == "dwsep_conv" and r.device == GPU]
    assert [r.config for r in conv] == ["mbv2 pairs (sum)"]
    assert [(lbl, c.text()) for lbl, c in conv[0].other] == [
        ("sum of the pairs", "1.52 predicted")]

    # benchmark files: the ours providers, at the largest N x K, bf16 before fp32
    for dev in ("cpu: Test A", "cpu: Test B"):
        r = by[(dev, "int4 g128")]
        assert r.shape == "N=512 K=1024 bfloat16" and r.family == "dequant"
        assert r.text_cells() == [f"{1 / 100 + 2.5:.2f}", f"{16 / 100 + 2.5:.2f}", "—"]
        assert by[(dev, "2:4")].text_cells() == ["0.25", "—", "0.25"]
    assert not any("dequant" in r.config or "int4pack" in r.config for r in rows)
    assert [r.family for r in rows if r.device == GPU] == [
        "dequant", "sparse24", "lowrank", "dwsep_conv"]

    text = dashboard.headline_text(rows)
    assert text.splitlines()[0].split()[:4] == ["device", "family", "config", "shape"]
    assert "1.40 (pred 3.00)" in text and "1.50 predicted" in text


def test_headline_uses_the_static_file_of_the_measurements_triton(results: Path) -> None:
    quick = results / "2026-01-01-quick-nvidia-test.json"
    obj = json.loads(quick.read_text())
    obj["meta"]["triton"] = "3.9.0"
    quick.write_text(json.dumps(obj))
    loaded = dashboard.load_dir(results)
    int4 = _by(dashboard.headline_rows(loaded))[(GPU, "int4 g128 asym")]
    assert int4.predicted_by == "static-triton3.9.0.json"
    assert int4.text_cells() == ["1.40 (pred 3.10)", "1.20", "—"]
    # both Tritons side by side in the device's table
    pvm = dashboard.predicted_vs_measured(loaded, GPU)
    first = next(d for d in pvm if d["config"] == "int4 g128 asym" and d["M"] == 1)
    assert first["predicted"] == {"3.6.0": 3.0, "3.9.0": 3.1}
    assert first["measured_graph"] == 1.4 and first["measured_eager"] == 0.5
    assert first["others"] == {"tinygemm": 1.9}


@needs_mpl
def test_page_has_the_headline_then_one_section_per_device(results: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "out"
    assert dashboard.main(["--results-dir", str(results), "--out-dir", str(out),
                           "--strict"]) == 0
    assert "1.40 (pred 3.00)" in capsys.readouterr().out  # the headline, printed
    page = (out / "dashboard.html").read_text()
    assert page.count("<section class='device'") == 3
    for dev, slug in ((GPU, "nvidia-test"), ("cpu: Test A", "cpu-test-a"),
                      ("cpu: Test B", "cpu-test-b")):
        assert f"<h2>{dev}</h2>" in page
        assert f"<img src='dashboard-{slug}.png'" in page
        assert (out / f"dashboard-{slug}.png").stat().st_size > 5_000
    assert (out / "dashboard.png").stat().st_size > 10_000
    head = page.index("Headline: speedup vs dense")
    assert head < page.index("<section class='device'") < page.index("Problems (0)")
    assert "1.40&times; <span class='pred'>(pred 3.00&times;)</span>" in page
    assert "<span class='predonly'>1.50&times; predicted</span>" in page
    assert "CUDA-graph replay" in page
    # the GPU's section: both Tritons' predictions, the experiment, the stale prediction
    gpu = page.split("<h2>NVIDIA Test</h2>")[1].split("</section>")[0]
    assert "predicted, Triton 3.6.0" in gpu and "predicted, Triton 3.9.0" in gpu
    assert "Experiment <b>sz_words</b>" in gpu
    assert "predicted 3.5 then, 3 in today&#x27;s static-triton3.6.0.json" in gpu
    assert "accuracy run" in page and "diagnostic rows" in page


@needs_mpl
def test_legends_are_outside_the_axes(results: Path) -> None:
    import matplotlib.pyplot as plt

    loaded = dashboard.load_dir(results)
    for dev in dashboard.devices(loaded):
        panels = dashboard.device_panels(loaded, dev)
        assert panels
        fig = dashboard.device_figure(dev, panels)
        fig.canvas.draw()
        axes = [ax for ax in fig.axes if ax.get_legend() is not None]
        assert len(axes) == len(panels)
        for ax in axes:
            leg = ax.get_legend().get_window_extent()
            box = ax.get_window_extent()
            assert leg.x0 >= box.x1, (dev, ax.get_title())
            assert not leg.overlaps(box)
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert not any(dev in lbl for lbl in labels)  # the device is the heading
        plt.close(fig)
    gpu = dashboard.device_panels(loaded, GPU)
    # low-bit, low rank (measured), then the families only predicted in one plot
    assert [p.kind for p in gpu] == ["model", "model", "model"]
    assert gpu[0].title.startswith("low-bit: measured") and gpu[1].title.startswith("low rank")
    assert "predicted only" in gpu[2].title and gpu[2].title.startswith("2:4")
    cpu = dashboard.device_panels(loaded, "cpu: Test B")
    labels = [s.label for p in cpu for s in p.series]
    assert "ours-int4-g128 [cpu] @fedcba9+dirty N=512 K=1024" in labels


def test_problems_of_static_and_quick_files_are_reported(results: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    obj = json.loads((results / "static-triton3.9.0.json").read_text())
    del obj["rows"][0]["predicted_speedup"]
    _write(results, "static-triton3.9.0.json", obj)
    (results / "2026-01-03-quick-nvidia-test.json").write_text("{not json")
    loaded = dashboard.load_dir(results)
    assert ("static-triton3.9.0.json", "row 0 (int4 g128 asym M=1): no predicted_speedup") \
        in loaded.problems
    assert any(f == "2026-01-03-quick-nvidia-test.json" and "cannot read" in p
               for f, p in loaded.problems)
    page = tmp_path / "page.html"
    dashboard.render_html(loaded, page, None)  # no pictures: fast, and no matplotlib needed
    assert "Problems (2)" in page.read_text() and "<img" not in page.read_text()
    monkeypatch.setattr(dashboard, "render_png", lambda loaded, path: {})  # tables only
    assert dashboard.main(["--results-dir", str(results), "--out-dir", str(tmp_path),
                           "--strict"]) == 1
    assert dashboard.main(["--results-dir", str(results), "--out-dir", str(tmp_path)]) == 0


def test_e2e_rows_keep_their_table_and_stay_out_of_the_headline(tmp_path: Path) -> None:
    obj = _bench("cpu: Test A")
    e2e = dict(obj["rows"][0], kernel="e2e_llama_decode", provider="int4-g128",
               e2e={"model": "llama", "size": "tiny", "config": "int4-g128", "mode": "eager",
                    "status": "ok", "rate": 12.5, "rate_unit": "tokens/s"})
    obj["rows"].append(e2e)
    _write(tmp_path, "2026-01-01-cpu-test-e2e.json", obj)
    loaded = dashboard.load_dir(tmp_path)
    dashboard.render_html(loaded, tmp_path / "page.html", None)
    page = (tmp_path / "page.html").read_text()
    assert "End to end (models)" in page and "12.5 tokens/s" in page
    headline = page.split("Headline: speedup vs dense")[1].split("<h2>")[0]
    assert "e2e_llama" not in headline and "int4 g128" in headline
    assert all("e2e_llama" not in p.title for p in dashboard.device_panels(loaded, "cpu: Test A"))
