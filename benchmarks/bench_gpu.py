"""GPU benchmark of the fused op: fwd+bwd of native CUDA, Triton, eager, hf_style,
torch.compile(eager) and the floor (torch.zeros_like(hidden): the grad buffer's memset).

Two timings per method, methods interleaved, medians over repeats, grads reset before every
backward (``.grad = None``):
- ``eager``: CUDA events around one Python call of the step: what a plain training loop sees,
  host overhead (Python, autograd, launches) included.
- ``graph``: the same step captured once in a CUDA graph and replayed: device time only, what
  CUDA graphs / torch.compile(mode="reduce-overhead") give. Value checks are off there (a host
  sync cannot be captured).
The floor is ``torch.zeros_like(hidden)``; ``memset`` zeroes the same bytes as float32 words
(about a memset's cost whatever the dtype). ``native`` and ``triton`` run as shipped
(PREFKERNELS_GRAD_FILL auto: up to 768 MiB of grad buffer for native, 256 MiB for Triton, the
backward writes the whole grad buffer in its one kernel, no memset); ``native_memset`` and
``triton_memset`` are the same ops with the grad buffer cleared by a memset (Triton: a zero fill)
before the kernel, the A/B of that choice (their eager timing includes setting the variable, a few
us of Python; on the shapes past auto's bound they time what ``native``/``triton`` do).
Also the host time of the eager step (the Python call alone, device synchronized after the
timer) and, for the smallest grad buffer of each pairing, torch.profiler tables per method (host time,
kernels).
Prints a table (us, effective GB/s of the grad buffer, ratios, peak extra memory), then each
prediction for this card in benchmarks/gpu_predictions.json (written before the run) beside what was measured,
and writes JSON + PNG + bench_gpu_profile.txt under $OUT when set, else benchmarks/results/.

    python benchmarks/bench_gpu.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from prefkernels import backends  # noqa: E402

# (pairs, T, D, dtype[, pairing]): 2 * pairs rows; the last shape's 128 rows are 32 rankings of 4
# expanded to 192 explicit pairs (a row in 3 pairs), the explicit-pair path of the kernels.
SHAPES = [(16, 2048, 4096, "bf16"), (8, 4096, 8192, "bf16"), (64, 512, 2048, "bf16"), (4, 8192, 4096, "fp32"),
          (64, 512, 2048, "bf16", "ranked4")]


GRAD_FILL = "PREFKERNELS_GRAD_FILL"
PREDICTIONS = Path(__file__).resolve().parent / "gpu_predictions.json"


def predicted_floor_us(nbytes: int, write_bandwidth: float) -> float:
    return nbytes / write_bandwidth * 1e6


def cuda_timer(step, batch) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step(batch)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def host_timer(step, batch) -> float:
    """Seconds the Python call of ``step`` takes on the host (launches enqueued, not waited for)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds


def python_profile(step, batch, rows: int = 25, repeats: int = 20) -> str:
    """cProfile of ``repeats`` eager steps, by own time: which Python functions the host time goes to."""
    import cProfile
    import io
    import pstats
    profiler = cProfile.Profile()
    for _ in range(repeats):
        common.reset(batch)
        profiler.enable()
        step(batch)
        profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def profile_table(steps: dict, batch: dict, kernels: list[str], rows: int = 20) -> str:
    """Two torch.profiler tables per method over a few eager steps: by self CPU time (where the
    host time goes) and by self CUDA time (each kernel and memset the step launches); for the
    kernel backends also a cProfile of their Python."""
    from torch.profiler import ProfilerActivity, profile
    tables = []
    for name in kernels:
        if name in steps:
            tables.append(f"== {name}: cProfile of 20 steps\n{python_profile(steps[name], batch)}")
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                common.reset(batch)
                step(batch)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        for sort_by in ("self_cpu_time_total", "self_cuda_time_total"):
            tables.append(f"== {name} (5 steps), by {sort_by}\n{averages.table(sort_by=sort_by, row_limit=rows)}")
    return "\n".join(tables)


def graphed(step, batch):
    """Capture ``step`` in a CUDA graph (after warm-up on a side stream); return its replay."""
    # value checks off (no host sync in a capture); the caller's setting is back afterwards: the
    # eager timings of the next shape use it
    with mock.patch.dict(os.environ, {"PREFKERNELS_CHECK_VALUES": "0"}):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                common.reset(batch)
                step(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        common.reset(batch)
        with torch.cuda.graph(graph):
            step(batch)
        torch.cuda.synchronize()
    return lambda _batch: graph.replay()


def cuda_peak_extra_bytes(step, batch) -> int:
    common.reset(batch)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def available_kernel_backends() -> list[str]:
    names = []
    if backends.native_has_cuda():
        names.append("native")
    if backends.triton_ops() is not None:
        names.append("triton")
    return names


def memset_step(batch):
    """The grad buffer's bytes zeroed as float32 words: PyTorch's fastest fill, so about what a
    memset of those bytes costs whatever the dtype (``zeros_like`` of bf16/fp16 fills slower)."""
    hidden = batch["hidden"]
    batch["floor"] = torch.zeros(hidden.numel() * hidden.element_size() // 4, device=hidden.device)


def with_grad_fill(step, fill: str):
    """``step`` with PREFKERNELS_GRAD_FILL=fill while it runs (read by the backward on each call).
    Only that variable is set and restored: ``mock.patch.dict(os.environ)``, used before, rewrites
    every variable on exit (clear, then update), and the ``_memset`` methods' eager steps took
    0.4-0.7 ms more host time than the same ops under ``auto`` in the H200 run of session 11."""
    def run(batch):
        before = os.environ.get(GRAD_FILL)
        os.environ[GRAD_FILL] = fill
        try:
            step(batch)
        finally:
            if before is None:
                del os.environ[GRAD_FILL]
            else:
                os.environ[GRAD_FILL] = before
    return run


def shape_pairing(shape: tuple) -> str:
    """A SHAPES entry's pairing: its fifth field, else "default"."""
    return shape[4] if len(shape) > 4 else "default"


def shape_label(shape: tuple, explicit_pairs: int = 0) -> str:
    """A SHAPES entry's name in the tables and JSON; a ranking pairing's name also gives its rows
    and ``explicit_pairs``, the pairs its rankings expand to."""
    pairs, positions, dim, dtype = shape[:4]
    if shape_pairing(shape) == "default":
        return f"P={pairs} T={positions} D={dim} {dtype}"
    return f"N={2 * pairs} P={explicit_pairs} T={positions} D={dim} {dtype} {shape_pairing(shape)}"


def add_ratios(row: dict, times: dict, kernels: list[str], nbytes: int, suffix: str) -> None:
    for name, seconds in times.items():
        if seconds is None:
            continue
        row[f"{name} us{suffix}"] = seconds * 1e6
        row[f"{name} GB/s{suffix}"] = nbytes / seconds / 1e9
        if times.get("floor"):  # None when its capture failed
            row[f"{name}/floor{suffix}"] = seconds / times["floor"]
        if times.get("memset"):
            row[f"{name}/memset{suffix}"] = seconds / times["memset"]
    for name in kernels:
        for baseline in ("hf_style", "eager", "compile(eager)"):
            if times.get(name) and times.get(baseline):
                row[f"{baseline}/{name}{suffix}"] = times[baseline] / times[name]


def run(shapes, repeats: int, warmup: int, bandwidth: float, on_row, profile_path: Path | None = None,
        device: str = "cuda") -> tuple[list[dict], list[str]]:
    kernels = available_kernel_backends()
    all_steps = {**common.methods(kernels), "memset": memset_step}
    for name in list(kernels):
        all_steps[f"{name}_memset"] = with_grad_fill(all_steps[name], "memset")
        kernels.append(f"{name}_memset")
    rows = []
    # profiled: per pairing, the first shape of its smallest grad buffer (fixed costs weigh most there)
    profiled_shapes = {}
    for shape in sorted(shapes, key=lambda s: s[0] * 2 * s[1] * s[2] * common.DTYPES[s[3]].itemsize):
        profiled_shapes.setdefault(shape_pairing(shape), shape)
    profiles = []
    for shape in shapes:
        pairs, positions, dim, dtype = shape[:4]
        pairing = shape_pairing(shape)
        batch = common.make_batch(pairs, positions, dim, dtype, device, pairing=pairing)
        nbytes = batch["hidden"].numel() * batch["hidden"].element_size()
        label = shape_label(shape, len(batch["pairs"]["chosen_index"]) if pairing != "default" else 0)
        row = {"shape": label, "pairs": pairs, "T": positions, "D": dim, "dtype": dtype, "pairing": pairing,
               "grad_buffer_MB": nbytes / 2**20, "predicted floor us": predicted_floor_us(nbytes, bandwidth)}
        steps = common.working_steps(all_steps, batch, row)
        add_ratios(row, common.time_interleaved(steps, batch, repeats, warmup, cuda_timer), kernels, nbytes, "")
        for name, seconds in common.time_interleaved(steps, batch, repeats, 1, host_timer).items():
            row[f"{name} host us"] = seconds * 1e6
        if profile_path is not None and shape is profiled_shapes[pairing]:
            profiles.append(f"{row['shape']}\n{profile_table(steps, batch, kernels)}\n")
            profile_path.write_text("\n".join(profiles))
        for name, step in steps.items():
            row[f"{name} peak MB"] = cuda_peak_extra_bytes(step, batch) / 2**20
        replays = {}
        for name, step in steps.items():
            try:
                replays[name] = graphed(step, batch)
            except Exception as err:  # report, keep measuring the others
                row[f"{name} graph error"] = f"{type(err).__name__}: {err}"[:300]
                print(f"{row['shape']}: {name} not captured in a CUDA graph: {row[f'{name} graph error']}", flush=True)
        graph_times = common.time_interleaved(replays, batch, repeats, 2, cuda_timer)
        add_ratios(row, {name: graph_times.get(name) for name in all_steps}, kernels, nbytes, " (graph)")
        rows.append(row)
        on_row(rows)
        del batch, replays
        torch.cuda.empty_cache()
        print(f"done {row['shape']}", flush=True)
    return rows, kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=3.0e12,
                        help="write bandwidth (bytes/s) used for the predicted floor")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    env = common.environment("cuda")

    def save(rows):
        return common.write_results("bench_gpu", {"environment": env, "repeats": args.repeats, "rows": rows}, args.out)

    profile_path = common.results_dir(args.out) / "bench_gpu_profile.txt"
    rows, kernels = run(SHAPES, args.repeats, args.warmup, args.bandwidth, save, profile_path)
    report(rows, kernels, env["device"], save)


def predictions_for(device: str, shipped: dict) -> dict | None:
    """The prediction set of ``shipped["predictions"]`` whose card (e.g. "H100") is in the device
    name, or None: each card's times were predicted for it alone."""
    return next((p for p in shipped["predictions"] if p["card"].lower() in device.lower()), None)


def against_predictions(rows: list[dict], predictions: dict) -> list[dict]:
    """One line per predicted (shape, method) of ``predictions["graph us"]``: the range, the
    measured graph time and whether it fell in, under or over the range (also stored in the row as
    ``{method} predicted us (graph)``, so the JSON keeps both)."""
    by_shape = {row["shape"]: row for row in rows}
    lines = []
    for shape, methods in predictions["graph us"].items():
        for method, (low, high) in methods.items():
            row = by_shape.get(shape, {})
            measured = row.get(f"{method} us (graph)")
            if shape in by_shape:
                row[f"{method} predicted us (graph)"] = [low, high]
            verdict = ("not measured" if measured is None else "under" if measured < low
                       else "over" if measured > high else "in range")
            lines.append({"shape": shape, "method": method, "predicted": f"{low}-{high}", "measured": measured,
                          "verdict": verdict})
    return lines


def report(rows: list[dict], kernels: list[str], device: str, save) -> None:
    """Print the tables, write the JSON (``save``) and the two PNGs beside it."""
    methods = kernels + ["eager", "compile(eager)", "hf_style"]
    print("\n== host time of the eager step (Python call only; the value checks' sync included)")
    common.print_table(rows, ["shape"] + [f"{m} host us" for m in methods + ["floor"]])
    for suffix in ("", " (graph)"):
        print(f"\n== fwd+bwd, {'CUDA graph replay (device time)' if suffix else 'eager Python step (host overhead included)'}")
        columns = (["shape", "predicted floor us", f"floor us{suffix}", f"memset us{suffix}"]
                   + [f"{m} us{suffix}" for m in methods] + [f"{m}/floor{suffix}" for m in methods]
                   + [f"{k}/memset{suffix}" for k in kernels] + [f"hf_style/{k}{suffix}" for k in kernels])
        common.print_table(rows, columns)
    print("\npeak extra MB:")
    common.print_table(rows, ["shape", "grad_buffer_MB"] + [f"{m} peak MB" for m in methods + ["floor"]])
    predictions = predictions_for(device, json.loads(PREDICTIONS.read_text()))
    if predictions is None:
        print(f"\n== no prediction for {device} in {PREDICTIONS.name}")
    else:
        print(f"\n== predicted before the run ({PREDICTIONS.name}, {predictions['card']}) vs measured, "
              "CUDA graph replay (us)")
        common.print_table(against_predictions(rows, predictions), ["shape", "method", "predicted", "measured", "verdict"])
    path = save(rows)
    for suffix, tag in (("", "eager"), (" (graph)", "graph")):
        common.plot_ratios(rows, [m for m in methods if f"{m}/floor{suffix}" in rows[0]],
                           f"fused BT op fwd+bwd ({tag}), {device}", path.with_name(f"bench_gpu_{tag}.png"),
                           suffix=suffix)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
