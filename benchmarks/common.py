"""Shared pieces of the op benchmarks: inputs, the methods compared, interleaved timing,
peak memory, and the table/JSON/PNG outputs."""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import prefkernels
from prefkernels import reference
from machine import RESULTS_DIR

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


PAIRINGS = ("default", "ranked4")


def ranked_pairs(rows: int, group: int = 4) -> dict:
    """chosen_index/rejected_index [P] int64: every ordered pair (better, worse) within consecutive
    groups of ``group`` rows, best first, as rankings expanded to pairs (P = 1.5 * rows for 4)."""
    chosen, rejected = [], []
    for start in range(0, rows - group + 1, group):
        for i in range(group):
            for j in range(i + 1, group):
                chosen.append(start + i)
                rejected.append(start + j)
    return {"chosen_index": torch.tensor(chosen), "rejected_index": torch.tensor(rejected)}


def make_batch(pairs: int, positions: int, dim: int, dtype: str, device: str, seed: int = 0,
               pairing: str = "default") -> dict:
    """A padded batch of 2*pairs rows, right padding, random lengths. ``pairing`` "default": rows
    [0, pairs) chosen, the rest rejected; "ranked4": explicit pairs, every pair within groups of 4."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing: expected one of {PAIRINGS}, got {pairing!r}")
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, positions, dim, generator=g).to(device=device, dtype=DTYPES[dtype])
    lengths = torch.randint(positions // 2, positions + 1, (rows,), generator=g)
    mask = (torch.arange(positions) < lengths.unsqueeze(1)).long().to(device)
    weight = (torch.randn(1, dim, generator=g) / dim ** 0.5).to(device)
    bias = torch.zeros(1, device=device)
    explicit = {} if pairing == "default" else {k: v.to(device) for k, v in ranked_pairs(rows).items()}
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
            "bias": bias.requires_grad_(), "attention_mask": mask, "pairs": explicit}


def reset(batch):
    """Before every timed step, outside the timer: drop the grads (never accumulate) and the
    floor's buffer, so each method pays for its own allocation and never for freeing another's."""
    for name in ("hidden", "weight", "bias"):
        batch[name].grad = None
    batch.pop("floor", None)
    batch.pop("read", None)


def fwd_bwd(loss_fn):
    """A step: loss, backward (grads are None: see ``reset``)."""
    def step(batch):
        loss, _ = loss_fn(batch["hidden"], batch["weight"], batch["bias"], attention_mask=batch["attention_mask"],
                          **batch["pairs"])
        loss.backward()
    return step


def floor_step(batch):
    """The unavoidable cost: the zeroed grad buffer the backward must create."""
    batch["floor"] = torch.zeros_like(batch["hidden"])


def then_read_grad(step):
    """``step`` followed by a consumer that reads the whole grad buffer (as the backbone's
    last layer does in a training step): shows where deferred costs (page faults) land."""
    def consumed(batch):
        step(batch)
        grad = batch["hidden"].grad
        batch["read"] = (grad if grad is not None else batch["floor"]).sum()
    return consumed


def methods(kernel_backends: list[str]) -> dict:
    """Name -> step. Kernel backends first, then the baselines and the floor. ``torch.compile``
    specializes on each shape (dynamic=False: the strongest baseline; compiled during warm-up)."""
    out = {}
    for backend in kernel_backends:
        out[backend] = fwd_bwd(lambda h, w, b, backend=backend, **kw: prefkernels.fused_bt_loss(h, w, b, backend=backend, **kw))
    out["eager"] = fwd_bwd(reference.eager)
    out["hf_style"] = fwd_bwd(reference.hf_style)
    out["compile(eager)"] = fwd_bwd(torch.compile(reference.eager, dynamic=False))
    out["floor"] = floor_step
    return out


def working_steps(steps: dict, batch: dict, row: dict | None = None) -> dict:
    """The steps that run on ``batch``, after one call of each: a failing method (e.g. torch.compile
    of a baseline hitting a compiler bug) is left out rather than ending the benchmark, and, given
    a result ``row``, recorded there as ``"<name> error"`` and printed."""
    working = {}
    for name, step in steps.items():
        reset(batch)
        try:
            step(batch)
            working[name] = step
        except Exception as err:  # any failure of one method: the others are still worth timing
            if row is not None:
                row[f"{name} error"] = f"{type(err).__name__}: {err}"[:300]
                print(f"{row['shape']}: {name} failed, left out: {row[f'{name} error']}", flush=True)
    return working


def time_interleaved(steps: dict, batch: dict, repeats: int, warmup: int, timer) -> dict:
    """Median seconds per step, methods interleaved within each repeat (noise hits all alike).
    The order is shuffled every repeat (seeded by the repeat), so no method keeps the same
    predecessor (on CPU the heap state a step leaves changes the next step's allocation cost)."""
    if not steps:
        return {}
    for step in steps.values():
        for _ in range(warmup):
            reset(batch)
            step(batch)
    names = list(steps)
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        for name in random.Random(repeat).sample(names, len(names)):
            reset(batch)
            samples[name].append(timer(steps[name], batch))
    return {name: statistics.median(values) for name, values in samples.items()}


def time_alone(step, batch: dict, repeats: int, warmup: int, timer) -> float:
    """Median seconds per step of ``step`` run alone in a loop (the heap stays warm for it)."""
    return time_interleaved({"alone": step}, batch, repeats, warmup, timer)["alone"]


def cpu_timer(step, batch) -> float:
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def cpu_peak_extra_bytes(step, batch) -> int:
    """Peak resident memory added by one step (Linux VmHWM, reset through clear_refs)."""
    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)
    reset(batch)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return -1
    before = status("VmRSS:")
    step(batch)
    return status("VmHWM:") - before


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "prefkernels": prefkernels.__version__,
           "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["device"] = platform.processor() or "cpu"
        env["cpus"] = os.cpu_count()
    return env


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).rjust(widths[c]) for c in columns))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def results_dir(out_dir: Path | None = None) -> Path:
    """Where results go: ``out_dir``, else $OUT, else benchmarks/results (created)."""
    out_dir = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = results_dir(out_dir)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def plot_ratios(rows: list[dict], methods_shown: list[str], title: str, path: Path, suffix: str = "") -> None:
    """Grouped bars: time / floor per method and shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not methods_shown:  # e.g. no floor time (its CUDA graph capture failed): nothing to plot
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(methods_shown)
    for i, method in enumerate(methods_shown):
        values = [r.get(f"{method}/floor{suffix}", 0.0) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["shape"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("fwd+bwd time / floor (zeros_like)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
