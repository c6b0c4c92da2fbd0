"""Torch-free facts the benchmark scripts share: where results and the real data live, and the
CPU's model name (safe to import before a script sets its thread environment)."""
from __future__ import annotations

import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
HH_HARMLESS = REPO_ROOT.parent / "shared" / "data" / "hh-harmless"


def cpu_name() -> str:
    """The 'model name' of /proc/cpuinfo, else the platform's processor or machine name."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
