"""Compile the Triton backend's kernels for sm_80 and sm_90 without a GPU, as its launchers
would launch them at the GPU benchmark's shapes, and report what the compiler made of them.

The launchers run on meta tensors with every kernel replaced by a recorder, so each launch's
arguments are captured and nothing runs. Each captured launch is compiled by Triton's own
compiler and ptxas for the target, specialized as Triton's JIT specializes a launch: pointers at
16-byte aligned offsets and integers that are multiples of 16 marked divisible by 16, an integer
1 a constant. Reported per launch and target: registers, stack frame bytes (spills) and local
memory of the cubin (``cuobjdump``), and the 16-byte (v4) and narrower global loads and stores
in the PTX.

    python tests/triton_compile_check.py [--json]

Run it without TRITON_INTERPRET (the kernels must be JIT functions); tests/test_triton_compile.py
runs it in a subprocess and checks the report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from prefkernels import triton_bt

ARCHS = (80, 90)
POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                 torch.int32: "i32", torch.uint8: "u8"}
META = torch.device("meta")


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH (None: resource usage not reported)."""
    import triton.backends.nvidia as nvidia
    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def capture(call) -> list[tuple[str, object, tuple, dict]]:
    """The kernel launches ``call()`` makes: (kernel name, JITFunction, args, kwargs)."""
    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, self.kernel, args, kwargs))

    with ExitStack() as stack:
        for name in dir(triton_bt):
            if name.endswith("_kernel"):
                stack.enter_context(mock.patch.object(triton_bt, name, Recorder(name, getattr(triton_bt, name))))
        call()
    return launches


def specialize(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of one launch, as Triton's JIT would key it."""
    bound = dict(zip(kernel.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound[name]
        divisible = False
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
            divisible = value.storage_offset() * value.element_size() % 16 == 0
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(value).__name__}")
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def resources(cubin: bytes, tool: str | None) -> dict:
    """Registers, stack frame bytes (where spills go) and local memory of the compiled kernel."""
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {} if found is None else dict(zip(("regs", "stack", "local"), map(int, found.groups())))


def memory_ops(ptx: str) -> dict:
    """Global loads and stores in the PTX by width: v4 (16 bytes with .b32) and the rest."""
    ops = re.findall(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)", ptx)
    count = {"ld_v4": 0, "ld_other": 0, "st_v4": 0, "st_other": 0}
    for op, suffix in ops:
        count[f"{op}_{'v4' if '.v4.' in suffix + '.' else 'other'}"] += 1
    return count


def compile_launch(kernel, args, kwargs, arch: int, tool: str | None) -> dict:
    signature, constexprs, attrs, options = specialize(kernel, args, kwargs)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # reported, so one failing launch does not hide the others
        return {"error": f"{type(err).__name__}: {str(err)[-2000:]}"}
    return {**resources(compiled.asm["cubin"], tool), **memory_ops(compiled.asm["ptx"])}


def batch(pairs: int, positions: int, dim: int, dtype: torch.dtype, heads: int = 1, explicit: int = 0) -> dict:
    """Meta tensors of a bench_gpu batch: 2*pairs rows, int64 attention mask, fp32 head."""
    rows = 2 * pairs
    b = {"hidden": torch.empty(rows, positions, dim, dtype=dtype, device=META),
         "weight": torch.empty(heads, dim, device=META), "bias": torch.empty(heads, device=META),
         "mask": torch.empty(rows, positions, dtype=torch.int64, device=META), "chosen": None, "rejected": None,
         "row_ptr": None, "row_entry": None}
    if explicit:
        b.update(chosen=torch.empty(explicit, dtype=torch.int64, device=META),
                 rejected=torch.empty(explicit, dtype=torch.int64, device=META),
                 row_ptr=torch.empty(rows + 1, dtype=torch.int64, device=META),
                 row_entry=torch.empty(2 * explicit, dtype=torch.int64, device=META))
    return b


def fused_step(b: dict):
    """bt_forward with a mean, then pool_backward with the mean's gradient: bench_gpu's step."""
    loss, rewards, pair_grad, pooled_pos = triton_bt.bt_forward(
        b["hidden"], b["weight"], b["bias"], b["mask"], None, None, b["chosen"], b["rejected"], None, 0.0, 0.0, 1)
    triton_bt.pool_backward(pair_grad.reshape(-1, b["weight"].shape[0]), torch.empty((), device=META),
                            1.0 / pair_grad.shape[1], b["row_ptr"], b["row_entry"], b["hidden"], b["weight"],
                            pooled_pos, True)


def pool_step(b: dict):
    """pool_forward, then pool_backward with one gradient per row: pool_score's step."""
    rewards, pooled_pos = triton_bt.pool_forward(b["hidden"], b["weight"], b["bias"], b["mask"], None, None)
    triton_bt.pool_backward(torch.empty(rewards.shape, device=META), None, 1.0, None, None, b["hidden"], b["weight"],
                            pooled_pos, True)


def rows_batch(rows: int, positions: int, dim: int, dtype: torch.dtype) -> dict:
    """Meta tensors of ``rows`` rows (odd, or 1) for pool_step."""
    return {"hidden": torch.empty(rows, positions, dim, dtype=dtype, device=META),
            "weight": torch.empty(1, dim, device=META), "bias": torch.empty(1, device=META),
            "mask": torch.empty(rows, positions, dtype=torch.int64, device=META)}


# (label, step, batch, PREFKERNELS_GRAD_FILL): the bench_gpu shapes as shipped and on the memset
# path; K = 3 heads; many row blocks of an odd D (the tickets and partial sums); the fill kernel
# with 64 heads; sizes Triton's JIT makes constants (one row, one position) or int64 (a grad
# buffer of 2^31 elements, both backward kernels: ``auto`` takes the memset path past 256 MiB).
CASES = [
    ("16x2048x4096 bf16", fused_step, batch(16, 2048, 4096, torch.bfloat16), "auto"),
    ("8x4096x8192 bf16", fused_step, batch(8, 4096, 8192, torch.bfloat16), "auto"),
    ("64x512x2048 bf16", fused_step, batch(64, 512, 2048, torch.bfloat16), "auto"),
    ("4x8192x4096 fp32", fused_step, batch(4, 8192, 4096, torch.float32), "auto"),
    ("64x512x2048 bf16 ranked4", fused_step, batch(64, 512, 2048, torch.bfloat16, explicit=192), "auto"),
    ("64x512x2048 bf16 memset", fused_step, batch(64, 512, 2048, torch.bfloat16), "memset"),
    ("4x8192x4096 fp32 memset", fused_step, batch(4, 8192, 4096, torch.float32), "memset"),
    ("64x512x2048 bf16 ranked4 memset", fused_step, batch(64, 512, 2048, torch.bfloat16, explicit=192), "memset"),
    ("16x512x4096 bf16 K=3", fused_step, batch(16, 512, 4096, torch.bfloat16, heads=3, explicit=40), "auto"),
    ("512x16x1031 fp16 memset", fused_step, batch(512, 16, 1031, torch.float16, heads=3), "memset"),
    ("4x256x4096 bf16 K=64 kernel", fused_step, batch(4, 256, 4096, torch.bfloat16, heads=64), "kernel"),
    ("1 row 8192x4096 bf16 pool", pool_step, rows_batch(1, 8192, 4096, torch.bfloat16), "auto"),
    ("3 rows 1x4096 fp32 pool kernel", pool_step, rows_batch(3, 1, 4096, torch.float32), "kernel"),
    ("64x4096x4096 bf16 2^31 elements", fused_step, batch(64, 4096, 4096, torch.bfloat16), "kernel"),
    ("64x4096x4096 bf16 2^31 elements auto", fused_step, batch(64, 4096, 4096, torch.bfloat16), "auto"),
]


def report() -> list[dict]:
    tool = cuobjdump()
    rows = []
    for label, step, b, fill in CASES:
        with mock.patch.dict(os.environ, {"PREFKERNELS_GRAD_FILL": fill}):
            launches = capture(lambda: step(b))
        for name, kernel, args, kwargs in launches:
            for arch in ARCHS:
                rows.append({"case": label, "fill": fill, "kernel": name, "arch": arch,
                             **compile_launch(kernel, args, kwargs, arch, tool)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    if type(triton_bt._pool_kernel).__name__ != "JITFunction":
        sys.exit("triton_compile_check: run without TRITON_INTERPRET=1 (the kernels are not JIT functions)")
    rows = report()
    if args.json:
        print(json.dumps({"triton": triton.__version__, "launches": rows}))
        return
    print(f"Triton {triton.__version__}")
    for r in rows:
        detail = r.get("error") or " ".join(f"{k}={r[k]}" for k in ("regs", "stack", "local", "ld_v4", "ld_other",
                                                                    "st_v4", "st_other") if k in r)
        print(f"{r['case']:36} {r['kernel']:28} sm_{r['arch']}  {detail}")


if __name__ == "__main__":
    main()
