"""benchmarks/bench_gpu.py runs on CPU with its CUDA-only parts (CUDA events, graphs, the CUDA
memory counters) replaced, so a GPU session never loses its run to an error in the script's
own Python: key names, tables, JSON, plots, the profiler table, a method whose capture fails,
a method that fails outright."""
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402
import common  # noqa: E402


@pytest.fixture
def on_cpu(monkeypatch):
    """bench_gpu with CPU stand-ins for what needs a CUDA device; the floor's capture fails."""
    def graphed(step, batch):
        if step is common.floor_step:
            raise RuntimeError("capture failed (test)")
        return step

    monkeypatch.setattr(bench_gpu, "cuda_timer", common.cpu_timer)
    monkeypatch.setattr(bench_gpu, "host_timer", common.cpu_timer)
    monkeypatch.setattr(bench_gpu, "graphed", graphed)
    monkeypatch.setattr(bench_gpu, "cuda_peak_extra_bytes", lambda step, batch: 3 * 2**20)
    monkeypatch.setattr(bench_gpu, "available_kernel_backends", lambda: ["native"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    methods = common.methods

    def broken(batch):
        raise RuntimeError("broken method (test)")

    monkeypatch.setattr(common, "methods", lambda kernels: {**methods(kernels), "broken": broken})


def test_bench_gpu_runs_and_reports_on_cpu(on_cpu, monkeypatch, tmp_path, capsys):
    # every op in the profile tables: which ones make a GPU run's top 20 by CPU time here is noise
    # (prefkernels::rows_csr fell out of it in one run)
    monkeypatch.setattr(bench_gpu, "profile_table", functools.partial(bench_gpu.profile_table, rows=1000))
    saved = []

    def save(rows):
        saved.append(len(rows))
        return common.write_results("bench_gpu", {"rows": rows}, tmp_path)

    shapes = [(2, 16, 32, "fp32"), (1, 8, 16, "bf16"), (2, 8, 16, "bf16", "ranked4")]
    rows, kernels = bench_gpu.run(shapes, repeats=2, warmup=1, bandwidth=3e12, on_row=save,
                                  profile_path=tmp_path / "bench_gpu_profile.txt", device="cpu")
    bench_gpu.report(rows, kernels, "cpu (test)", save)

    assert kernels == ["native", "native_memset"] and saved == [1, 2, 3, 3]
    torch_2_6 = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 7)
    for row in rows:
        assert row["broken error"] == "RuntimeError: broken method (test)" and "broken us" not in row
        timed = ["native", "native_memset", "eager", "compile(eager)", "hf_style", "memset"]
        if torch_2_6 and "compile(eager) error" in row:  # torch 2.6's Inductor fails on this graph on CPU
            timed.remove("compile(eager)")
        for method in timed:
            assert row[f"{method} us"] > 0 and row[f"{method}/floor"] > 0
            assert row[f"{method} us (graph)"] > 0 and f"{method}/floor (graph)" not in row  # no floor time
            assert row[f"{method} host us"] > 0 and row[f"{method} peak MB"] == 3
        assert row["floor graph error"].startswith("RuntimeError: capture failed")
        assert row["hf_style/native"] == pytest.approx(row["hf_style us"] / row["native us"])
        assert row["native_memset/memset"] == pytest.approx(row["native_memset us"] / row["memset us"])
    written = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    assert [r["shape"] for r in written] == ["P=2 T=16 D=32 fp32", "P=1 T=8 D=16 bf16", "N=4 P=6 T=8 D=16 bf16 ranked4"]
    assert [r["pairing"] for r in written] == ["default", "default", "ranked4"]
    assert (tmp_path / "bench_gpu_eager.png").stat().st_size > 0
    assert not (tmp_path / "bench_gpu_graph.png").exists()  # no floor time to divide by
    profile = (tmp_path / "bench_gpu_profile.txt").read_text()
    # per pairing, its smallest grad buffer (fixed costs weigh most there), in the order run
    default, ranked = profile.split("\nN=4 P=6 T=8 D=16 bf16 ranked4\n")
    assert default.startswith("P=1 T=8 D=16 bf16\n") and "P=2 T=16" not in profile
    for table in (default, ranked):
        for sort_by in ("self_cpu_time_total", "self_cuda_time_total"):
            assert f"== native (5 steps), by {sort_by}" in table
        assert "== native: cProfile of 20 steps" in table and "fused_bt_loss" in table
    assert "prefkernels::rows_csr" in ranked and "rows_csr" not in default  # the explicit pairs grouped by row
    out = capsys.readouterr().out
    assert "not captured in a CUDA graph" in out and "native/memset" in out and "wrote" in out
    assert "no prediction for cpu (test) in gpu_predictions.json" in out and "vs measured" not in out
    assert "broken failed, left out: RuntimeError: broken method (test)" in out


def test_against_predictions_sets_each_measured_time_beside_its_range():
    rows = [{"shape": "P=2 T=8 D=16 bf16", "native us (graph)": 80.0, "triton us (graph)": 70.0},
            {"shape": "P=4 T=8 D=16 bf16", "native us (graph)": 90.5}]
    predictions = {"graph us": {"P=2 T=8 D=16 bf16": {"native": [74, 83], "triton": [76, 85], "native_memset": [1, 2]},
                                "P=4 T=8 D=16 bf16": {"native": [85, 90]}, "P=9 T=8 D=16 bf16": {"native": [1, 2]}}}
    lines = bench_gpu.against_predictions(rows, predictions)
    assert [(line["method"], line["predicted"], line["measured"], line["verdict"]) for line in lines] == [
        ("native", "74-83", 80.0, "in range"), ("triton", "76-85", 70.0, "under"),
        ("native_memset", "1-2", None, "not measured"), ("native", "85-90", 90.5, "over"),
        ("native", "1-2", None, "not measured")]
    assert rows[0]["native predicted us (graph)"] == [74, 83] and rows[1]["native predicted us (graph)"] == [85, 90]


def test_predictions_are_chosen_by_the_card_in_the_device_name():
    shipped = {"predictions": [{"card": "H200", "graph us": {}}, {"card": "H100", "graph us": {}}]}
    assert bench_gpu.predictions_for("NVIDIA H100 80GB HBM3", shipped)["card"] == "H100"
    assert bench_gpu.predictions_for("NVIDIA H200", shipped)["card"] == "H200"
    assert bench_gpu.predictions_for("NVIDIA A100-SXM4-80GB", shipped) is None


def test_shipped_predictions_name_benchmarked_shapes_and_methods():
    """benchmarks/gpu_predictions.json holds one set per card, each naming shapes as bench_gpu
    labels SHAPES (a typo would only ever print "not measured") and methods it times, each with a
    range low < high, and saying when and how it was written."""
    shipped = json.loads(bench_gpu.PREDICTIONS.read_text())["predictions"]
    cards = [p["card"] for p in shipped]
    assert len(set(cards)) == len(cards) and {"H100", "H200"} <= set(cards)
    labels = set()
    for shape in bench_gpu.SHAPES:
        explicit = common.make_batch(shape[0], 2, 8, "fp32", "cpu", pairing=bench_gpu.shape_pairing(shape))["pairs"]
        labels.add(bench_gpu.shape_label(shape, len(explicit["chosen_index"]) if explicit else 0))
    timed = {*common.methods(["native", "triton"]), "native_memset", "triton_memset", "memset"}
    for card in shipped:
        assert card["written"]
        assert set(card["graph us"]) <= labels, set(card["graph us"]) - labels
        for shape, methods in card["graph us"].items():
            for method, (low, high) in methods.items():
                assert method in timed and 0 < low < high, (card["card"], shape, method)


def test_with_grad_fill_sets_the_variable_only_while_the_step_runs(monkeypatch):
    monkeypatch.delenv("PREFKERNELS_GRAD_FILL", raising=False)
    seen = []
    bench_gpu.with_grad_fill(lambda batch: seen.append(os.environ.get("PREFKERNELS_GRAD_FILL")), "memset")({})
    assert seen == ["memset"] and "PREFKERNELS_GRAD_FILL" not in os.environ
    monkeypatch.setenv("PREFKERNELS_GRAD_FILL", "kernel")
    monkeypatch.setenv("PREFKERNELS_UNRELATED", "kept")

    def failing_step(batch):
        seen.append(os.environ.get("PREFKERNELS_GRAD_FILL"))
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        bench_gpu.with_grad_fill(failing_step, "memset")({})
    assert seen == ["memset", "memset"] and os.environ["PREFKERNELS_GRAD_FILL"] == "kernel"
    assert os.environ["PREFKERNELS_UNRELATED"] == "kept"
