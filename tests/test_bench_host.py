"""benchmarks/bench_host.py runs and reports each available kernel backend (in a subprocess: it
sets TRITON_INTERPRET and PREFKERNELS_CHECK_VALUES for its own process)."""
import json
import subprocess
import sys
from pathlib import Path

from prefkernels import backends

ROOT = Path(__file__).resolve().parents[1]


def test_bench_host_reports_each_backend(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--steps", "20", "--rounds", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "bench_host_cpu.json").read_text())["rows"]
    expected = {"native"} if backends.native_ops() is not None else set()
    if backends.TRITON_INSTALLED and backends.triton_interpreter_problem() is None:
        expected.add("triton")
    assert {key[:-3] for key in row if key.endswith(" us")} == expected
    assert all(0 < row[f"{name} us"] < 1e5 for name in expected)
    assert "wrote" in done.stdout
