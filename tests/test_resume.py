"""--resume after SIGKILL reaches the same metrics and weights as an unbroken run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from prefkernels import checkpoint
from prefkernels.data import synthetic
from prefkernels.tiny import write_tiny_backbone

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The run that gets killed sleeps after each optimizer step so the kill lands mid-run; sleeping
# changes no numbers.
SLOW_TRAIN = (
    "import sys, time\n"
    "from prefkernels import trainer\n"
    "step = trainer.Trainer._optimizer_step\n"
    "def slow_step(self):\n"
    "    time.sleep(0.15)\n"
    "    return step(self)\n"
    "trainer.Trainer._optimizer_step = slow_step\n"
    "from prefkernels.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def train_args(root, output, *extra):
    return ["train", "--backbone", str(root / "backbone"), "--train", str(root / "train.jsonl"),
            "--valid", str(root / "valid.jsonl"), "--output", str(output), "--max-length", "48",
            "--batch-size", "16", "--epochs", "2", "--lr", "3e-3", "--dropout", "--eval-every", "10",
            "--save-every", "4", "--log-every", "5", "--seed", "3", "--no-progress", *extra]


def events_without_timing(path):
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for event in events:
        event.pop("elapsed_s", None)
    return events


def checkpoint_step(output):
    try:
        return json.loads((output / "checkpoint" / checkpoint.CONFIG_NAME).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_resume_matches_an_unbroken_run(tmp_path):
    write_tiny_backbone(tmp_path / "backbone", hidden_size=32, layers=2, heads=2, attention_dropout=0.1, seed=0)
    synthetic.write_splits(tmp_path, 400, 100, seed=2)
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"

    killed = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *train_args(tmp_path, resumed)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while checkpoint_step(resumed) < 8 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read().decode()[-3000:]
    killed.stderr.close()
    steps_at_kill = checkpoint_step(resumed)
    assert 8 <= steps_at_kill < 50 and not (resumed / "eval.json").exists()  # killed mid-run

    straight = subprocess.run([sys.executable, "-m", "prefkernels", *train_args(tmp_path, unbroken)], env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "prefkernels", *train_args(tmp_path, resumed, "--resume")],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoint'} at step {steps_at_kill}" in again.stdout

    assert events_without_timing(resumed / "metrics.jsonl") == events_without_timing(unbroken / "metrics.jsonl")
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((unbroken / "eval.json").read_text())
    for name in (checkpoint.HEAD_NAME, f"{checkpoint.BACKBONE_DIR}/model.safetensors"):
        a, b = load_file(str(unbroken / "best" / name)), load_file(str(resumed / "best" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.read_config(resumed / "best")["reward_mean"] == pytest.approx(
        checkpoint.read_config(unbroken / "best")["reward_mean"], abs=0)
