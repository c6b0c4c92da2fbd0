"""torchrun with 2 CPU processes (DDP over gloo) equals one process accumulating 2 micro-batches."""
import json
import os
import subprocess
import sys

import pytest

from prefkernels.data import synthetic
from prefkernels.tiny import write_tiny_backbone
from prefkernels.trainer import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_process_ddp_matches_single_process_accumulation(tmp_path):
    backbone = write_tiny_backbone(tmp_path / "backbone", hidden_size=32, layers=2, heads=2, seed=0)
    files = synthetic.write_splits(tmp_path, 320, 60, seed=4)  # 320 / 8 = 40 batches: 20 steps of 2
    common = ["--backbone", str(backbone), "--train", str(files["train"]), "--valid", str(files["valid"]),
              "--max-length", "48", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "10", "--log-every", "5",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "prefkernels", "train", *common, "--output", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
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
