"""The CUDA code run without a GPU: csrc/cuda (kernels, glue, op schemas) compiled as plain C++
against tests/cuda_emu/cuda_emu.h, which runs each launch's threads as fibers on the CPU. The
emulated ops (``torch.ops.prefkernels_emu.*`` on CPU tensors) then meet the checks the GPU tests
make of the real ones: the op table against the float64 reference through the public op, the
edge layouts and invalid rows against the native CPU op, the direct op calls and opcheck.

What it cannot check: speed, and anything that depends on real concurrency (races, the memory
model's ordering, a missing fence); those still need ``benchmarks/gpu_check.sh`` on a GPU.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from prefkernels import autograd, backends
from op_cases import Case, assert_matches, make_inputs, opcheck_ops, public, reference_float64, run_op
from test_cuda_compile import cuda_include_dir, find_nvcc
from test_gpu import EDGE_OP_CASES, check_edge_ops
from test_op_edge_cases import DIRECT_CALL_CHECKS
from test_ops import DTYPES, VARIANTS

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """The OpSet of the emulated CUDA ops, with the fake kernels and autograd of every backend."""
    nvcc = find_nvcc()
    include = cuda_include_dir(nvcc) if nvcc else None
    if include is None:
        print("CUDA headers not found (next to nvcc, /usr/local/cuda): skipping the emulated CUDA tests")
        pytest.skip("CUDA headers not found (next to nvcc, /usr/local/cuda)")
    if backends.native_ops() is None:
        pytest.skip("prefkernels._C not built: the native CPU op is the emulation's reference")
    from torch.utils.cpp_extension import is_ninja_available, load
    if not is_ninja_available():
        pytest.skip("ninja not found (pip install ninja; the test extras include it): it builds the emulation")
    load(name="prefkernels_cuda_emu", sources=[str(EMU_DIR / "emu_ops.cpp")],
         extra_include_paths=[str(EMU_DIR / "include"), str(EMU_DIR), str(include)], extra_cflags=["-O1"],
         build_directory=str(tmp_path_factory.mktemp("cuda_emu_build")))
    ops = backends.OpSet("cuda_emu", "", namespace="prefkernels_emu")
    autograd.register(ops)
    return ops


@pytest.fixture
def public_runs_emulated(emulated_ops, monkeypatch):
    """prefkernels.fused_bt_loss / pool_score with backend="native" run the emulated CUDA ops."""
    monkeypatch.setattr(backends, "select", lambda backend, device: emulated_ops)
    return public("native")


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_emulated_cuda_matches_float64_reference(public_runs_emulated, variant, dtype, heads):
    case = Case(dtype=dtype, heads=heads).with_(**VARIANTS[variant])
    inputs = make_inputs(case, seed=zlib.crc32(variant.encode()) % 1000)
    assert_matches(run_op(public_runs_emulated, inputs), reference_float64(inputs), inputs, what=f"{case}: ")


@pytest.mark.parametrize("case", [Case(dtype=torch.bfloat16, heads=2, rows=64, positions=40, dim=512, pairs="shared",
                                       margin=True, pooling="mask_left"),
                                  Case(heads=1, rows=300, positions=9, dim=96, pooling="cu_seqlens", reduction="sum"),
                                  Case(heads=2, rows=8300, positions=3, dim=16, pooling="last_index")],
                         ids=["bf16_vector_shared_rows", "fp32_300_rows_packed", "fp32_8300_rows_256_row_blocks"])
def test_emulated_cuda_several_row_blocks_and_tiles(public_runs_emulated, case):
    """Grids of several row blocks and D tiles: the backward's tickets and last-block sums, and
    (8300 rows) the cap of 256 row blocks, where each warp takes its rows in several passes."""
    inputs = make_inputs(case)
    assert_matches(run_op(public_runs_emulated, inputs), reference_float64(inputs), inputs, what=f"{case}: ")


@pytest.mark.parametrize("case", EDGE_OP_CASES)
def test_emulated_cuda_edge_layouts_and_invalid_rows_match_native_cpu(emulated_ops, case):
    check_edge_ops(emulated_ops, backends.native_ops(), case, "cpu")


@pytest.fixture
def threads_in_reverse(emulated_ops):
    torch.ops.prefkernels_emu.run_threads_in_reverse(True)
    yield
    torch.ops.prefkernels_emu.run_threads_in_reverse(False)


@pytest.mark.parametrize("case", EDGE_OP_CASES)
def test_emulated_cuda_threads_last_to_first_match_native_cpu(emulated_ops, threads_in_reverse, case):
    """Between two barriers the emulation runs a block's threads first to last; here last to first,
    so a missing barrier shows whichever of its writer and reader the hardware runs first."""
    check_edge_ops(emulated_ops, backends.native_ops(), case, "cpu")


@pytest.mark.parametrize("check", DIRECT_CALL_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_emulated_cuda_direct_op_calls(emulated_ops, check):
    check(emulated_ops, "cpu")


@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_emulated_cuda_forward_and_backward_are_one_launch_each(emulated_ops, pairs):
    """The launch structure of the GPU test, counted by the emulator: bt_forward is ONE kernel
    launch for default and explicit pairs (no memset); pool_backward is ONE memset (the grad
    buffer and the tickets) plus ONE launch, also over several row blocks and D tiles."""
    from prefkernels.autograd import rows_csr
    inputs = make_inputs(Case(dtype=torch.bfloat16, heads=2, rows=96, positions=9, dim=640, pairs=pairs, margin=True))
    kw = inputs["kwargs"]
    args = (inputs["hidden"], inputs["weight"], inputs["bias"], kw["attention_mask"], None, None,
            kw.get("chosen_index"), kw.get("rejected_index"), kw.get("margin"), 0.1, 0.01, 0)

    def device_work(fn):
        before = torch.ops.prefkernels_emu.device_work()
        out = fn()
        return [after - was for after, was in zip(torch.ops.prefkernels_emu.device_work(), before)], out

    work, (_, _, pair_grad, pooled_pos) = device_work(lambda: emulated_ops.bt_forward(*args))
    assert work == [1, 0]
    csr = rows_csr(*args[6:8], args[0].shape[0])
    entries = pair_grad.reshape(-1, 2)
    work, _ = device_work(lambda: emulated_ops.pool_backward(entries, torch.tensor(0.5), 0.25, *csr, args[0], args[1],
                                                             pooled_pos, True))
    assert work == [1, 1]


def test_emulated_cuda_opcheck(emulated_ops):
    inputs = make_inputs(Case(heads=2, pairs="shared", margin=True))
    kw = inputs["kwargs"]
    opcheck_ops(emulated_ops, (inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_(),
                               inputs["bias"].requires_grad_(), kw["attention_mask"], None, None, kw["chosen_index"],
                               kw["rejected_index"], kw["margin"]))
