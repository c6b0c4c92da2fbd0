"""Host cost of one eager fwd+bwd step through each kernel backend's ops, on CPU: Python,
dispatch, autograd and allocations, with the kernels' own work taken out.

``triton``: the Triton ops with every Triton kernel replaced by a no-op, so the launchers, the
op registration and the autograd kernel run, and neither the interpreter nor a GPU does
(Triton's own launch path, the JIT's argument binding and the driver call, is not included).
``native``: the native CPU op at a tiny shape (16 rows, T=8, D=64), its kernels' work a few us.
Value checks off (``PREFKERNELS_CHECK_VALUES=0``, as in a captured training step). Each backend
alone in a loop, the best of ``--rounds`` means of ``--steps`` steps; rounds alternate between
the backends. Prints a table, writes benchmarks/results/bench_host_cpu.json (or under --out).

    python benchmarks/bench_host.py [--steps 1000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

os.environ["TRITON_INTERPRET"] = "1"  # the Triton ops then take CPU tensors (their kernels are replaced)
os.environ["PREFKERNELS_CHECK_VALUES"] = "0"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import prefkernels  # noqa: E402
from prefkernels import backends  # noqa: E402


def no_triton_kernels(stack: ExitStack) -> None:
    """Replace every Triton kernel of prefkernels.triton_bt by a launch that does nothing."""
    from prefkernels import triton_bt

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in dir(triton_bt):
        if name.endswith("_kernel"):
            stack.enter_context(mock.patch.object(triton_bt, name, NoLaunch()))


def step_of(backend: str):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 8, 64, generator=g).requires_grad_()
    weight = torch.randn(1, 64, generator=g).requires_grad_()
    bias = torch.zeros(1).requires_grad_()
    mask = torch.ones(16, 8, dtype=torch.long)

    def step():
        loss, _ = prefkernels.fused_bt_loss(hidden, weight, bias, attention_mask=mask, backend=backend)
        loss.backward()
        hidden.grad = weight.grad = bias.grad = None
    return step


def measure(steps: dict, count: int, rounds: int) -> dict:
    best = {name: float("inf") for name in steps}
    for step in steps.values():
        for _ in range(count // 4):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(count):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / count)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [name for name in ("native", "triton")
             if (ops := backends.select(name, torch.device("cpu"))) is not None and ops.name == name]
    with ExitStack() as stack:
        no_triton_kernels(stack)
        best = measure({name: step_of(name) for name in names}, args.steps, args.rounds)
    row = {"shape": "16 rows, T=8, D=64, fp32", **{f"{name} us": seconds * 1e6 for name, seconds in best.items()}}
    common.print_table([row], list(row))
    path = common.write_results("bench_host_cpu", {"environment": common.environment("cpu"),
                                                   "prefkernels_file": prefkernels.__file__, "rows": [row]}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
