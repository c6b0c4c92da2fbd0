"""Hardware counters (Nsight Compute) of one fwd+bwd step per case, for what bench_gpu's times
leave open: why the fill kernels write more slowly than PyTorch's int32 fill, where the native
memset-path kernel's time goes, what the explicit pairs add. All cases at (64 pairs, T=512,
D=2048, bf16), the 256 MiB grad buffer of the shape that misses 1.3x the memset.

    python benchmarks/gpu_probe.py CASE        run CASE's step under ncu (benchmarks/gpu_probe.sh)
    python benchmarks/gpu_probe.py --cases     the case names, one per line
    python benchmarks/gpu_probe.py --summary NCU_CSV...   one table of every profiled kernel

A case warms up (Triton compiles, the allocator settles), then runs one step between
cudaProfilerStart and cudaProfilerStop, so ncu (--profile-from-start off) profiles that step's
kernels only. The summary reads ncu's ``--csv`` details pages (one row per metric).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = (64, 512, 2048, "bf16")
# case -> (method of common.methods or "memset", pairing, PREFKERNELS_GRAD_FILL or None)
CASES = {
    "memset": ("memset", "default", None),
    "native": ("native", "default", "auto"),
    "native_memset": ("native", "default", "memset"),
    "triton": ("triton", "default", "auto"),
    "triton_memset": ("triton", "default", "memset"),
    "native_ranked4": ("native", "ranked4", "auto"),
    "triton_ranked4": ("triton", "ranked4", "auto"),
}
# (column, ncu metric name, its unit): what the summary shows of each kernel, in this order. The
# unit tells apart the metrics two sections share a name for ("Memory Throughput": % and byte/s).
COLUMNS = [("us", "Duration", "time"), ("DRAM %", "DRAM Throughput", "%"), ("mem %", "Memory Throughput", "%"),
           ("mem GB/s", "Memory Throughput", "byte/s"), ("occupancy %", "Achieved Occupancy", "%"),
           ("regs", "Registers Per Thread", "register/thread"), ("grid", "Grid Size", ""), ("block", "Block Size", ""),
           ("cycles/issue", "Warp Cycles Per Issued Instruction", "cycle"), ("no eligible %", "No Eligible", "%")]
TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def run_case(name: str, shape: tuple = SHAPE, device: str = "cuda", warmup: int = 3) -> None:
    import torch

    import bench_gpu
    import common

    method, pairing, fill = CASES[name]
    batch = common.make_batch(*shape, device, pairing=pairing)
    step = bench_gpu.memset_step if method == "memset" else common.methods([method])[method]
    if fill is not None:
        step = bench_gpu.with_grad_fill(step, fill)
    for _ in range(warmup):
        common.reset(batch)
        step(batch)
    common.reset(batch)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step(batch)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def kernels_of(path: Path) -> list[dict]:
    """The kernels of one ncu ``--csv`` details log, in launch order: {"case", "kernel", "metrics":
    {(metric name, unit): value}}. Lines that are not CSV (ncu's ==PROF== messages) are skipped."""
    lines = [line for line in path.read_text().splitlines() if line.startswith('"')]
    kernels = defaultdict(dict)
    for row in csv.DictReader(lines):
        kernel = kernels[row["ID"]]
        kernel.setdefault("case", path.stem.removeprefix("ncu_"))
        kernel.setdefault("kernel", row["Kernel Name"])
        kernel.setdefault("metrics", {})[(row["Metric Name"], row.get("Metric Unit", ""))] = row["Metric Value"]
    return [kernels[key] for key in sorted(kernels, key=int)]


def number(value: str) -> float:
    return float(value.replace(",", ""))


def cell(kernel: dict, metric: str, unit: str) -> str:
    """``metric`` in ``unit`` as the summary shows it: a duration (any time unit) in us, a byte
    rate in GB/s, anything else as ncu wrote it; "" where the log lacks it."""
    if unit == "time":
        found = [(number(v), TO_US[u]) for (name, u), v in kernel["metrics"].items() if name == metric and u in TO_US]
        return f"{found[0][0] * found[0][1]:.1f}" if found else ""
    value = kernel["metrics"].get((metric, unit))
    if value is None:
        return ""
    return f"{number(value) / 1e9:.0f}" if unit == "byte/s" else value


def summary(paths: list[Path]) -> str:
    """One line per profiled kernel of every case: its short name and COLUMNS."""
    header = ["case", "kernel"] + [column for column, _, _ in COLUMNS]
    rows = []
    for path in paths:
        kernels = kernels_of(path) if path.is_file() else []
        rows += [[k["case"], short_name(k["kernel"])] + [cell(k, metric, unit) for _, metric, unit in COLUMNS]
                 for k in kernels]
        if not kernels:  # ncu failed or profiled nothing: its log says why
            rows.append([path.stem.removeprefix("ncu_"), "(no kernel profiled)"] + [""] * len(COLUMNS))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header] + rows)


def short_name(kernel: str) -> str:
    """A kernel's name without namespaces, template arguments and parameters, at most 40 chars
    (ncu writes an anonymous namespace as ``<unnamed>``, c++filt as ``(anonymous namespace)``)."""
    name = kernel.removeprefix("void ").replace("(anonymous namespace)::", "").replace("<unnamed>::", "")
    return name.split("(")[0].split("<")[0].split("::")[-1][:40]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", choices=list(CASES))
    parser.add_argument("--cases", action="store_true", help="print the case names")
    parser.add_argument("--summary", nargs="+", type=Path, metavar="NCU_CSV", help="tabulate ncu --csv logs")
    args = parser.parse_args(argv)
    if args.cases:
        print("\n".join(CASES))
    elif args.summary:
        print(summary(args.summary))
    elif args.case:
        run_case(args.case)
    else:
        parser.error("give a CASE, --cases or --summary")


if __name__ == "__main__":
    main()
