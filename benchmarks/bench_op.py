"""CPU benchmark of the fused op: fwd+bwd of native vs eager, hf_style, torch.compile(eager)
and the floor (torch.zeros_like(hidden), the grad buffer any backward must create).

Methods run interleaved in one process, medians over repeats, grads reset before every
backward. Two more views of the same steps: each method timed alone in a loop (the heap stays
warm for it, as in a training loop, instead of being left by the other methods), and the fixed
cost of a step at a tiny shape (Python, autograd, dispatch: what dominates small batches).
Prints the tables, writes benchmarks/results/bench_op_cpu.json and a PNG.

    python benchmarks/bench_op.py [--repeats 21] [--quick] [--fixed-cost-only]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = [(8, 512, 768, "fp32"), (8, 1024, 2048, "fp32"), (8, 1024, 2048, "bf16"),
          (64, 128, 768, "fp32"), (32, 256, 4096, "bf16")]
QUICK_SHAPES = [(4, 128, 256, "fp32"), (4, 128, 256, "bf16")]
FIXED_COST_SHAPE = (1, 8, 16, "fp32")
ALONE_METHODS = ("floor", "native", "eager", "compile(eager)")


def run(shapes, repeats: int, warmup: int) -> list[dict]:
    all_steps = common.methods(["native"])
    for name in ("native", "eager", "floor"):
        all_steps[f"{name}+read"] = common.then_read_grad(all_steps[name])
    rows = []
    for pairs, positions, dim, dtype in shapes:
        batch = common.make_batch(pairs, positions, dim, dtype, "cpu")
        row = {"shape": f"P={pairs} T={positions} D={dim} {dtype}", "pairs": pairs, "T": positions, "D": dim,
               "dtype": dtype, "grad_buffer_MB": batch["hidden"].numel() * batch["hidden"].element_size() / 2**20}
        steps = common.working_steps(all_steps, batch, row)  # e.g. torch 2.6's Inductor fails on compile(eager)
        times = common.time_interleaved(steps, batch, repeats, warmup, common.cpu_timer)
        for name, seconds in times.items():
            row[f"{name} ms"] = seconds * 1e3
        add_ratio(row, times, "floor", {name: f"{name}/floor" for name in times})
        add_ratio(row, times, "native", {"hf_style": "hf_style/native"})
        add_ratio(row, times, "floor+read", {"native+read": "(native+read)/(floor+read)",
                                             "eager+read": "(eager+read)/(floor+read)"})
        for name, step in steps.items():
            row[f"{name} peak MB"] = common.cpu_peak_extra_bytes(step, batch) / 2**20
        alone = {name: common.time_alone(steps[name], batch, repeats, warmup, common.cpu_timer)
                 for name in ALONE_METHODS if name in steps}
        for name, seconds in alone.items():
            row[f"{name} alone ms"] = seconds * 1e3
        add_ratio(row, alone, "floor", {name: f"{name}/floor alone" for name in alone if name != "floor"})
        rows.append(row)
        print(f"done {row['shape']}", flush=True)
    return rows


def add_ratio(row: dict, times: dict, base: str, names: dict) -> None:
    """row[names[m]] = times[m] / times[base] for each method m that ran, when ``base`` ran too (a
    method that failed on the shape is left out, not divided by)."""
    if base in times:
        row.update({column: times[name] / times[base] for name, column in names.items() if name in times})


def fixed_cost(repeats: int) -> dict:
    """Microseconds per fwd+bwd step of each method at a tiny shape, where nothing but the fixed
    per-step cost (Python, autograd, dispatch, small allocations) remains: interleaved (caches
    cold for each method) and each method alone in a loop (warm)."""
    batch = common.make_batch(*FIXED_COST_SHAPE, "cpu")
    row = {"shape": "P={} T={} D={} {}".format(*FIXED_COST_SHAPE)}
    steps = common.working_steps(common.methods(["native"]), batch, row)
    times = common.time_interleaved(steps, batch, repeats, 20, common.cpu_timer)
    alone = {name: common.time_alone(step, batch, repeats, 20, common.cpu_timer) for name, step in steps.items()}
    return {**row, **{f"{name} us": seconds * 1e6 for name, seconds in times.items()},
            **{f"{name} alone us": seconds * 1e6 for name, seconds in alone.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats (the committed results: 21)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--fixed-cost-only", action="store_true",
                        help="only the tiny-shape fixed cost, written to bench_op_cpu_fixed.json")
    args = parser.parse_args(argv)
    if args.fixed_cost_only:
        fixed = fixed_cost(max(200, 20 * args.repeats))
        common.print_table([fixed], list(fixed))
        path = common.write_results("bench_op_cpu_fixed", {"environment": common.environment("cpu"),
                                                           "fixed_cost": fixed}, args.out)
        print(f"wrote {path}")
        return
    rows = run(QUICK_SHAPES if args.quick else SHAPES, args.repeats, args.warmup)
    columns = ["shape", "floor ms", "native ms", "eager ms", "compile(eager) ms", "hf_style ms",
               "native/floor", "eager/floor", "compile(eager)/floor", "hf_style/floor", "hf_style/native",
               "grad_buffer_MB", "floor peak MB", "native peak MB", "eager peak MB", "hf_style peak MB"]
    common.print_table(rows, columns)
    print("\nwith a consumer that reads the grad buffer after each step (hidden.grad.sum()):")
    common.print_table(rows, ["shape", "floor+read ms", "native+read ms", "eager+read ms",
                              "(native+read)/(floor+read)", "(eager+read)/(floor+read)"])
    print("\neach method alone in a loop (warm heap):")
    common.print_table(rows, ["shape"] + [f"{m} alone ms" for m in ALONE_METHODS]
                       + [f"{m}/floor alone" for m in ALONE_METHODS[1:]])
    fixed = fixed_cost(max(200, 20 * args.repeats))
    print("\nfixed cost per fwd+bwd step (tiny shape):")
    common.print_table([fixed], list(fixed))
    name = "bench_op_cpu_quick" if args.quick else "bench_op_cpu"
    path = common.write_results(name, {"environment": common.environment("cpu"), "repeats": args.repeats,
                                       "rows": rows, "fixed_cost": fixed}, args.out)
    common.plot_ratios(rows, ["native", "eager", "compile(eager)", "hf_style"],
                       f"fused BT op, CPU ({torch.get_num_threads()} threads)", path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
