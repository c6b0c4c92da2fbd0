"""Smoke tests of the RL examples in python/, run as scripts with small settings."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    # One thread: the example models are tiny, and OpenMP hand-offs dominate on a busy 2-core machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "python" / name), *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_best_of_n_selects_better_completions():
    out = run_example("best_of_n.py", "--rm-steps", "60", "--prompts", "8", "--n", "8")
    accuracy = float(re.search(r"held-out pairwise accuracy ([\d.]+)", out).group(1))
    one = re.search(r"one sample\s+(-?[\d.]+)\s+(-?[\d.]+)", out)
    best = re.search(r"best of 8\s+(-?[\d.]+)\s+(-?[\d.]+)", out)
    assert accuracy > 0.9, out
    assert float(best.group(1)) > float(one.group(1)), out  # the selected completions score higher...
    assert float(best.group(2)) > float(one.group(2)), out  # ...and follow the rule the reward model learned


def test_reinforce_loop_raises_the_mean_reward():
    out = run_example("reinforce_loop.py", "--rm-steps", "60", "--steps", "20")
    match = re.search(r"first 4 steps (-?[\d.]+), last 4 steps (-?[\d.]+)", out)
    first, last = float(match.group(1)), float(match.group(2))
    assert last > first + 2.0, out
    rule = [float(line.split()[2]) for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(rule) == 20 and sum(rule[-4:]) > sum(rule[:4]), out
