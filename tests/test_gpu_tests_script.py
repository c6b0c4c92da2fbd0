"""benchmarks/gpu_tests.sh, the GPU test phase of gpu_check.sh, on CPU: a test that kills the
process is named, and the tests after it still run."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CRASHING_TESTS = '''
import os
import signal

import pytest


def test_before():
    pass


@pytest.mark.parametrize("case", ["a b", "c"])
def test_crashes(case):
    if case == "a b":
        os.kill(os.getpid(), signal.SIGSEGV)


def test_after_fails():
    assert 1 == 2


def test_after_passes():
    pass
'''


def run_script(tmp_path, files):
    log = tmp_path / "gpu_tests.log"
    env = {**os.environ, "GPU_TEST_FILES": " ".join(str(f) for f in files), "GPU_TESTS_MARK": "",
           "GPU_TESTS_TIMEOUT": "120", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_tests.sh"), str(log)], env=env,
                          capture_output=True, text=True, timeout=300)
    return done, log.read_text()


def test_a_crashing_test_is_named_and_the_rest_still_run(tmp_path):
    tests = tmp_path / "test_crashing.py"
    tests.write_text(CRASHING_TESTS)
    done, log = run_script(tmp_path, [tests])
    assert done.returncode == 1, (done.stdout, log)  # the failing test after the crash decides
    crash_lines = [line for line in log.splitlines() if line.startswith("gpu tests: run")]
    assert len(crash_lines) == 1 and crash_lines[0].startswith("gpu tests: run 1 died (exit 139) in ")
    assert crash_lines[0].endswith("test_crashing.py::test_crashes[a b]; going on after it"), log
    assert "1 failed, 2 passed" in log, log  # the second run: test_crashes[c], test_after_*; not test_before again


def test_a_crash_alone_still_fails_the_phase(tmp_path):
    tests = tmp_path / "test_only_crash.py"
    tests.write_text(CRASHING_TESTS.split("def test_after_fails")[0])
    done, log = run_script(tmp_path, [tests])
    assert done.returncode == 139, log
    assert "2 passed" not in log and "1 passed" in log, log
