"""python/quickstart.py runs and learns the hidden rule."""
import re
import subprocess
import sys
from conftest import REPO_ROOT


def test_quickstart_learns_the_rule():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "python" / "quickstart.py"), "--steps", "150",
                          "--train-pairs", "1024"], capture_output=True, text=True, timeout=300, check=True).stdout
    before = float(re.search(r"before training: ([0-9.]+)", out).group(1))
    after = float(re.search(r"after \d+ steps: ([0-9.]+)", out).group(1))
    assert after >= 0.85 and after > before + 0.2, out
    assert re.search(r"fused [0-9.]+ ms, eager [0-9.]+ ms", out), out
