"""The Triton kernels compile for sm_80 and sm_90 on a machine without a GPU, as the launchers
launch them at the GPU benchmark's shapes: no errors, no spills, the launch the backward's
PREFKERNELS_GRAD_FILL asks for, and 16-byte global loads and stores where rows allow them
(tests/triton_compile_check.py does the compiling, in a subprocess without TRITON_INTERPRET)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def compile_problem() -> str | None:
    """Why Triton cannot compile for CUDA targets here, or None."""
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as err:
        return f"Triton {triton.__version__} has no CUDA backend ({err})"
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params or "attrs" not in params:
        return f"Triton {triton.__version__}'s ASTSource takes {list(params)[1:]}, not (signature, constexprs, attrs)"
    return None


COMPILE_PROBLEM = compile_problem()
pytestmark = pytest.mark.skipif(COMPILE_PROBLEM is not None, reason=str(COMPILE_PROBLEM))


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile_check.py"), "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])["launches"]


def test_every_launch_compiles_for_sm80_and_sm90(report):
    assert {r["arch"] for r in report} == {80, 90}
    failed = [(r["case"], r["kernel"], r["arch"], r["error"]) for r in report if "error" in r]
    assert not failed, failed


BENCHMARK_SHAPES = ("16x2048x4096 bf16", "8x4096x8192 bf16", "64x512x2048 bf16", "4x8192x4096 fp32")


def test_no_spills_at_the_benchmark_shapes_on_sm90(report):
    """No stack frame (where ptxas spills) at the benchmark shapes on sm_90, the benchmarks' GPUs;
    elsewhere at most 64 bytes of it (Triton 3.9: 8 bytes in the explicit-pair fill kernel on sm_80
    and in the 64-head forward on sm_90; Triton 3.6: 8-24 bytes in the 3-head explicit-pair
    forward); no local memory anywhere."""
    measured = [r for r in report if "regs" in r]
    if not measured:
        pytest.skip("no cuobjdump (Triton's bundled one or on PATH) to read the kernels' resource usage")
    assert len(measured) == len(report)
    at_benchmark_on_sm90 = [r for r in measured if r["arch"] == 90 and r["case"].startswith(BENCHMARK_SHAPES)]
    assert len(at_benchmark_on_sm90) >= 8
    spilled = [(r["case"], r["kernel"], r["arch"], r["stack"], r["local"]) for r in measured
               if r["local"] or r["stack"] > 64 or (r["stack"] and r in at_benchmark_on_sm90)]
    assert not spilled, spilled


def kernels_of(report, case):
    return [r["kernel"] for r in report if r["case"] == case and r["arch"] == 90]


@pytest.mark.parametrize("case,forward,backward", [
    ("64x512x2048 bf16", "_bt_default_pairs_kernel", "_pool_backward_fill_kernel"),
    ("4x8192x4096 fp32", "_bt_default_pairs_kernel", "_pool_backward_kernel"),
    ("64x512x2048 bf16 ranked4", "_pool_kernel", "_pool_backward_fill_kernel"),
    ("64x512x2048 bf16 memset", "_bt_default_pairs_kernel", "_pool_backward_kernel"),
    ("64x512x2048 bf16 ranked4 memset", "_pool_kernel", "_pool_backward_kernel"),
    ("512x16x1031 fp16 memset", "_bt_default_pairs_kernel", "_pool_backward_kernel"),
    ("1 row 8192x4096 bf16 pool", "_pool_kernel", "_pool_backward_fill_kernel"),
    ("64x4096x4096 bf16 2^31 elements", "_bt_default_pairs_kernel", "_pool_backward_fill_kernel"),
    ("64x4096x4096 bf16 2^31 elements auto", "_bt_default_pairs_kernel", "_pool_backward_kernel"),
])
def test_one_launch_each_way_and_the_fill_auto_picks(report, case, forward, backward):
    """Forward one launch, backward one launch: ``auto`` takes the fill kernel (no zero fill before
    it) up to 256 MiB of grad buffer, the scatter kernel after PyTorch's zero fill above (the 1 GiB
    fp32 shape, 4 GiB), as ``memset`` always does."""
    assert kernels_of(report, case) == [forward, backward]


def test_grad_buffer_and_hidden_rows_move_in_16_byte_vectors(report):
    """Where D is a multiple of 8 every kernel loads hidden (and the head) in 16-byte vectors and
    both backward kernels store grad_hidden in them: the fill kernel's zeros and pooled rows, the
    scatter's pooled rows. An odd D (1031) cannot, and does not."""
    for r in report:
        what = (r["case"], r["kernel"], r["arch"])
        if "K=64" in r["case"]:  # 64 heads: the reduction's tiles are 64 columns wide, 2 per thread
            continue
        if "1031" in r["case"]:
            assert r["ld_v4"] == 0 and r["st_v4"] == 0, what
            continue
        assert r["ld_v4"] > 0, what
        if "backward" in r["kernel"]:
            assert r["st_v4"] > 0, what


INT32_PRODUCT_CHECK = """
import json, re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "tests")
import triton_compile_check as tcc
from prefkernels import triton_bt
meta = torch.device("meta")
heads, dim, rows = 64, 64, 1024
weight = torch.empty(heads, dim, device=meta)
def index(n):
    return torch.empty(n, dtype=torch.int64, device=meta)
def explicit():  # 2^25 pairs x 64 heads = 2^31 floats before the rejected half of pair_grad
    hidden = torch.empty(rows, 16, dim, dtype=torch.bfloat16, device=meta)
    triton_bt.bt_forward(hidden, weight, None, None, index(rows), None, index(2**25), index(2**25), None, 0.0, 0.0, 0)
def default():  # 2^26 rows: 2^25 default pairs
    hidden = torch.empty(2**26, 1, dim, dtype=torch.bfloat16, device=meta)
    triton_bt.bt_forward(hidden, weight, None, None, index(2**26), None, None, None, None, 0.0, 0.0, 0)
found = {}
for call in (explicit, default):
    for name, kernel, args, kwargs in tcc.capture(call):
        sig, consts, attrs, opts = tcc.specialize(kernel, args, kwargs)
        ttir = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options=opts).asm["ttir"]
        found[f"{call.__name__} {name}"] = re.findall(r"arith.muli %(?:P, %K|K, %P) : i32", ttir)
print(json.dumps(found))
"""


def test_no_int32_product_of_pairs_and_heads_in_the_forward():
    """The rejected half of pair_grad starts P * K floats in. P and K are int32 kernel arguments
    below 2^31 each, so P * K in int32 wraps at 2^31 (2^25 pairs x 64 heads) and the stores land
    8 GiB before the buffer: the kernels index it from the int64 pair instead."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", INT32_PRODUCT_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert len(found) == 2 and not any(found.values()), found
