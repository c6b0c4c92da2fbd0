"""benchmarks/gpu_probe.py's CPU-side parts: the case runner (CUDA calls stubbed), the table of
ncu's CSV logs, and gpu_probe.sh's syntax, so a GPU session never loses its probe to the script."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_probe  # noqa: E402

from prefkernels import backends  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def ncu_row(kernel_id, kernel, metric, unit, value, section="SpeedOfLight"):
    return (f'"{kernel_id}","7","python3","host","{kernel}","1","7","(256, 1, 1)","(4104, 1, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}"')


def test_summary_tabulates_each_profiled_kernel_of_each_case(tmp_path):
    # names and units as ncu 2025.3 wrote them on the H200 (benchmarks/results/gpu-h200/ncu_*.csv)
    fill = "void prefkernels::<unnamed>::pool_backward_fill_kernel<__nv_bfloat16, float>(prefkernels::<unnamed>::BackwardParams)"
    memset = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, std::array<char *, 1>>(int, T2, T3)"
    (tmp_path / "ncu_native.csv").write_text("\n".join([
        "==PROF== Connected to process 7 (python3)", HEADER,
        ncu_row(0, fill, "Duration", "ns", "64,704"), ncu_row(0, fill, "DRAM Throughput", "%", "77.92"),
        ncu_row(0, fill, "Memory Throughput", "%", "81.15"),
        ncu_row(0, fill, "Memory Throughput", "byte/s", "3,747,940,652,818.99", "MemoryWorkloadAnalysis"),
        ncu_row(0, fill, "Registers Per Thread", "register/thread", "106", "LaunchStats"),
        ncu_row(1, "_bt_default_pairs_kernel", "Duration", "usecond", "5.06"),
        "==PROF== Disconnected from process 7"]))
    (tmp_path / "ncu_memset.csv").write_text("\n".join([HEADER, ncu_row(0, memset, "Duration", "ms", "0.0584")]))
    table = gpu_probe.summary([tmp_path / "ncu_native.csv", tmp_path / "ncu_memset.csv", tmp_path / "ncu_triton.csv"])
    lines = [line.split() for line in table.splitlines()]
    assert lines[0][:6] == ["case", "kernel", "us", "DRAM", "%", "mem"]
    assert lines[1] == ["native", "pool_backward_fill_kernel", "64.7", "77.92", "81.15", "3748", "106"]
    assert lines[2] == ["native", "_bt_default_pairs_kernel", "5.1"]
    assert lines[3] == ["memset", "vectorized_elementwise_kernel", "58.4"]
    assert lines[4] == ["triton", "(no", "kernel", "profiled)"]  # ncu wrote nothing for it


def test_summary_reads_the_h200_run():
    """The committed logs of the session-15 H200 run: every kernel named, durations in us."""
    logs = sorted((ROOT / "benchmarks" / "results" / "gpu-h200").glob("ncu_*.csv"))
    assert len(logs) == 7
    lines = [line.split() for line in gpu_probe.summary(logs).splitlines()[1:]]
    fills = [line for line in lines if line[1] == "pool_backward_fill_kernel"]
    assert len(lines) == 28 and len(fills) == 2 and all(line[1] and not line[1][0].isdigit() for line in lines)
    assert 60 < float(fills[0][2]) < 70 and 3000 < float(fills[0][5]) < 4500  # 64.7 us, 3748 GB/s


@pytest.fixture
def cuda_calls(monkeypatch):
    """torch.cuda's synchronize and profiler start/stop replaced by recorders (no CUDA here)."""
    calls = []

    class Cudart:
        def cudaProfilerStart(self):
            calls.append("start")

        def cudaProfilerStop(self):
            calls.append("stop")

    monkeypatch.setattr(torch.cuda, "cudart", Cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    return calls


def test_run_case_profiles_one_step_after_the_warm_up(monkeypatch, cuda_calls):
    import bench_gpu
    step = bench_gpu.memset_step
    monkeypatch.setattr(bench_gpu, "memset_step", lambda batch: (cuda_calls.append("step"), step(batch)))
    gpu_probe.run_case("memset", shape=(2, 8, 16, "fp32"), device="cpu", warmup=2)
    assert cuda_calls == ["step", "step", "sync", "start", "step", "sync", "stop"]


@pytest.mark.parametrize("name", list(gpu_probe.CASES))
def test_every_case_runs_its_method_on_cpu(cuda_calls, name):
    """Each case's method, pairing and grad fill resolve (on CPU: the native CPU kernel, and Triton
    under the interpreter where it runs)."""
    if gpu_probe.CASES[name][0] == "triton" and backends.triton_ops() is None:
        pytest.skip("no Triton backend on CPU tensors here")
    gpu_probe.run_case(name, shape=(2, 8, 16, "fp32"), device="cpu", warmup=1)
    assert cuda_calls[-3:] == ["start", "sync", "stop"]


def test_cases_and_script_syntax():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_probe.py"), "--cases"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == list(gpu_probe.CASES) and len(out) + 1 <= 8  # the device tool brings back 8 files
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_probe.sh")], check=True)
