"""torchrun with 2 CPU processes (DDP over gloo): equal to one process accumulating 2 micro-batches,
a killed then resumed run logs the same metrics as an unbroken one, and an output directory that
another run holds stops both processes with its message."""
import json
import os
import subprocess
import sys

import pytest

from prefkernels import checkpoint
from prefkernels.data import synthetic
from prefkernels.tiny import write_tiny_backbone
from prefkernels.trainer import TrainConfig, train
from test_resume import events_without_timing


pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# Both processes stop right after the step-3 checkpoint, as if killed there.
STOP_AFTER_STEP_3 = (
    "import os, sys\n"
    "from prefkernels import trainer\n"
    "save = trainer.Trainer._save_checkpoint\n"
    "def save_then_stop(self):\n"
    "    save(self)\n"
    "    if self.state['step'] == 3:\n"
    "        os._exit(0)\n"
    "trainer.Trainer._save_checkpoint = save_then_stop\n"
    "from prefkernels.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_two_process_ddp_matches_single_process_accumulation(tmp_path):
    backbone = write_tiny_backbone(tmp_path / "backbone", hidden_size=32, layers=2, heads=2, seed=0)
    files = synthetic.write_splits(tmp_path, 320, 60, seed=4)  # 320 / 8 = 40 batches: 20 steps of 2
    common = ["--backbone", str(backbone), "--train", str(files["train"]), "--valid", str(files["valid"]),
              "--max-length", "48", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "10", "--log-every", "5",
              "--no-progress"]
    ddp = subprocess.run([*TORCHRUN, "-m", "prefkernels", "train", *common, "--output", str(tmp_path / "ddp")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert ddp.stdout.count("best model:") == 1 and "20 optimizer steps on 2 process(es)" in ddp.stdout

    single = train(TrainConfig(backbone=str(backbone), train=[str(files["train"])], valid=[str(files["valid"])],
                               output_dir=str(tmp_path / "single"), max_length=48, batch_size=8, grad_accum=2, lr=3e-3,
                               eval_every=10, log_every=5, progress=False), log=lambda message: None)
    assert single.steps == 20

    ddp_events = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_events = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in ddp_events] == [e["event"] for e in single_events]  # rank 1 wrote nothing
    assert [e["event"] for e in ddp_events].count("start") == 1 and ddp_events[0]["world_size"] == 2
    for a, b in zip(ddp_events[1:], single_events[1:]):
        assert a["step"] == b["step"]
        for key in ("loss", "accuracy", "ece", "brier", "comparisons", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["event"], a["step"], key)
    train_events = [e for e in ddp_events if e["event"] == "train"]
    assert all(e["comparisons"] == 5 * 2 * 8 for e in train_events)  # summed over both processes
    assert json.loads((tmp_path / "ddp" / "eval.json").read_text())["comparisons"] == 60  # gathered from both


def test_two_process_resume_logs_the_same_metrics_as_an_unbroken_run(tmp_path):
    backbone = write_tiny_backbone(tmp_path / "backbone", hidden_size=32, layers=2, heads=2, seed=0)
    files = synthetic.write_splits(tmp_path, 160, 40, seed=5)
    common = ["--backbone", str(backbone), "--train", str(files["train"]), "--valid", str(files["valid"]),
              "--max-length", "48", "--batch-size", "8", "--lr", "3e-3", "--max-steps", "8", "--eval-every", "4",
              "--save-every", "3", "--log-every", "4", "--no-progress"]
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"

    def torchrun(*args):
        done = subprocess.run([*TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        return done

    torchrun("-m", "prefkernels", "train", *common, "--output", str(unbroken))
    script = tmp_path / "stop_after_step_3.py"
    script.write_text(STOP_AFTER_STEP_3)
    # the exit status is not checked: one process may see the other's exit before its own
    subprocess.run([*TORCHRUN, str(script), "train", *common, "--output", str(resumed)], env=ENV,
                   capture_output=True, timeout=300)
    assert json.loads((resumed / "checkpoint" / "prefkernels.json").read_text())["step"] == 3
    assert not (resumed / "eval.json").exists()
    again = torchrun("-m", "prefkernels", "train", *common, "--output", str(resumed), "--resume")
    assert f"resumed from {resumed / 'checkpoint'} at step 3" in again.stdout

    events = events_without_timing(resumed / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "train"] == [4, 8]
    assert events == events_without_timing(unbroken / "metrics.jsonl")


def test_two_process_run_on_a_locked_output_dir_stops_every_rank_with_the_reason(tmp_path):
    """Rank 0 cannot lock the directory: rank 1 must not wait for it at a barrier (a gloo
    connection traceback once the other process is gone) but stop with rank 0's message."""
    backbone = write_tiny_backbone(tmp_path / "backbone", hidden_size=32, layers=2, heads=2, seed=0)
    files = synthetic.write_splits(tmp_path, 32, 8, seed=6)
    output = tmp_path / "run"
    output.mkdir()
    holder = checkpoint.lock_file(output / ".lock", "a")  # another train writing it now
    assert holder is not None
    try:
        done = subprocess.run([*TORCHRUN, "-m", "prefkernels", "train", "--backbone", str(backbone), "--train",
                               str(files["train"]), "--max-length", "48", "--batch-size", "8", "--max-steps", "2",
                               "--no-progress", "--output", str(output)], env=ENV, capture_output=True, text=True,
                              timeout=300)
    finally:
        holder.close()
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert text.count("another prefkernels train is writing") == 2, text[-4000:]  # rank 0, and rank 1 told by it
    assert "rank 0 stopped the run" in text
    assert "barrier" not in text.lower() and "gloo" not in text.lower(), text[-4000:]
    assert sorted(p.name for p in output.iterdir()) == [".lock"]  # nothing written


@pytest.mark.parametrize("device, backend", [(None, "nccl"), ("cuda", "nccl"), ("cuda:1", "nccl"), ("cpu", "gloo")])
def test_process_group_backend_follows_the_training_device_on_a_gpu_host(monkeypatch, device, backend):
    """Under torchrun on a machine with CUDA, NCCL for a CUDA run but gloo for a --device cpu one,
    whose collectives run on CPU tensors (NCCL refuses them)."""
    import torch
    import torch.distributed as dist

    from prefkernels.trainer import Distributed

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name: chosen.append(("backend", name)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    joined = Distributed.from_env(device)
    assert (joined.rank, joined.world_size, joined.local_rank, joined.owns_group) == (1, 2, 1, True)
    assert chosen == ([("set_device", 1)] if backend == "nccl" else []) + [("backend", backend)]
