"""The CUDA code run without a GPU: csrc/cuda (kernels, glue, op schemas) compiled as plain C++
against tests/cuda_emu/cuda_emu.h, which runs each launch's threads as fibers on the CPU. The
emulated ops (``torch.ops.prefkernels_emu.*`` on CPU tensors) then meet the checks the GPU tests
make of the real ones: the op table against the float64 reference through the public op, the
edge layouts and invalid rows against the native CPU op, the direct op calls and opcheck.

Uninitialized memory is NaN here (PyTorch's deterministic fill of ``empty``), so an element a
kernel should write and does not shows. Both ways of clearing the backward's grad buffer run
(``PREFKERNELS_GRAD_FILL``: the fill kernel, or a memset before the launch).

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
from test_gpu import EDGE_OP_CASES, check_edge_ops, op_args
from test_op_edge_cases import DIRECT_CALL_CHECKS, check_rows_csr
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


@pytest.fixture(autouse=True)
def uninitialized_memory_is_nan():
    """``empty`` (the glue's at::empty included) fills floats with NaN and bytes with 0xff."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


@pytest.fixture(params=["kernel", "memset"])
def grad_fill(request, monkeypatch):
    """The backward's grad buffer written whole by the fill kernel (where the layout allows it),
    or cleared by a memset before the launch."""
    monkeypatch.setenv("PREFKERNELS_GRAD_FILL", request.param)
    return request.param


def device_work(fn):
    """([kernel launches, memsets] that ``fn()`` ran on the emulated device, its result)."""
    before = torch.ops.prefkernels_emu.device_work()
    out = fn()
    return [after - was for after, was in zip(torch.ops.prefkernels_emu.device_work(), before)], out


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
def test_emulated_cuda_several_row_blocks_and_tiles(public_runs_emulated, grad_fill, case):
    """Grids of several row blocks and D tiles: the backward's tickets and last-block sums, and
    (8300 rows) the cap of 256 row blocks, where each warp takes its rows in several passes."""
    inputs = make_inputs(case)
    assert_matches(run_op(public_runs_emulated, inputs), reference_float64(inputs), inputs, what=f"{case}: ")


@pytest.mark.parametrize("case", EDGE_OP_CASES)
def test_emulated_cuda_edge_layouts_and_invalid_rows_match_native_cpu(emulated_ops, grad_fill, case):
    check_edge_ops(emulated_ops, backends.native_ops(), case, "cpu")


@pytest.fixture
def threads_in_reverse(emulated_ops):
    torch.ops.prefkernels_emu.run_threads_in_reverse(True)
    yield
    torch.ops.prefkernels_emu.run_threads_in_reverse(False)


@pytest.mark.parametrize("case", EDGE_OP_CASES)
def test_emulated_cuda_threads_last_to_first_match_native_cpu(emulated_ops, threads_in_reverse, grad_fill, case):
    """Between two barriers the emulation runs a block's threads first to last; here last to first,
    so a missing barrier shows whichever of its writer and reader the hardware runs first."""
    check_edge_ops(emulated_ops, backends.native_ops(), case, "cpu")


@pytest.mark.parametrize("check", DIRECT_CALL_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_emulated_cuda_direct_op_calls(emulated_ops, check):
    check(emulated_ops, "cpu")


@pytest.mark.parametrize("order", ["first_to_last", "last_to_first"])
def test_emulated_cuda_rows_csr(emulated_ops, order):
    """The CUDA rows_csr against the reference (check_rows_csr), its block's threads run in either
    order between barriers; ONE launch, no memset."""
    torch.ops.prefkernels_emu.run_threads_in_reverse(order == "last_to_first")
    try:
        check_rows_csr(emulated_ops.op("rows_csr"), "cpu")
    finally:
        torch.ops.prefkernels_emu.run_threads_in_reverse(False)
    index = torch.tensor([3, 0, 2, 2])
    work, _ = device_work(lambda: emulated_ops.rows_csr(index, index.flip(0), 4))
    assert work == [1, 0]


@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_emulated_cuda_forward_and_backward_are_one_launch_each(emulated_ops, grad_fill, pairs):
    """The launch structure of the GPU test, counted by the emulator: bt_forward is ONE kernel
    launch for default and explicit pairs (no memset); pool_backward is ONE launch, which writes
    the whole grad buffer itself (fill kernel: no memset), or ONE memset (the grad buffer and the
    tickets) plus that launch, also over several row blocks and D tiles."""
    args, _ = op_args(Case(dtype=torch.bfloat16, heads=2, rows=96, positions=9, dim=640, pairs=pairs, margin=True),
                      device="cpu")
    work, (_, _, pair_grad, pooled_pos) = device_work(lambda: emulated_ops.bt_forward(*args))
    assert work == [1, 0]
    csr = emulated_ops.rows_csr(*args[6:8], args[0].shape[0])
    entries = pair_grad.reshape(-1, 2)
    work, _ = device_work(lambda: emulated_ops.pool_backward(entries, torch.tensor(0.5), 0.25, *csr, args[0], args[1],
                                                             pooled_pos, True))
    assert work == ([1, 0] if grad_fill == "kernel" else [1, 1])


@pytest.mark.parametrize("dtype,weight_f32", [(torch.bfloat16, False), (torch.float16, True), (torch.float32, True)],
                         ids=["bf16", "fp16_fp32_head", "fp32"])
@pytest.mark.parametrize("pairs", ["default", "shared"])
@pytest.mark.parametrize("rows", [24, 40])
def test_emulated_cuda_fill_kernel_equals_memset_path(emulated_ops, monkeypatch, dtype, weight_f32, pairs, rows):
    """The fill kernel writes each pooled row's gradient with the scatter's arithmetic in the
    scatter's order and zeros everywhere else: grad_hidden has the memset path's bits, over 3
    heads, invalid pooled positions (-1 and T), the loss's gradient as one value or one per pair;
    and a frozen hidden (no grad buffer). grad_weight and grad_bias are bitwise equal with one row
    block (24 rows); with 40 the memset path sums 2 row blocks' partials, the fill kernel one
    block's rows, in another order (each deterministic)."""
    case = Case(dtype=dtype, heads=3, rows=rows, positions=7, dim=128, pairs=pairs, margin=True, weight_fp32=weight_f32)
    args, _ = op_args(case, device="cpu")
    hidden, weight = args[0], args[1]
    _, _, pair_grad, pooled_pos = emulated_ops.bt_forward(*args)
    pooled_pos = pooled_pos.clone()
    pooled_pos[[3, 17]] = torch.tensor([-1, case.positions])
    entries = pair_grad.reshape(-1, case.heads)
    csr = emulated_ops.rows_csr(*args[6:8], hidden.shape[0])
    g = torch.Generator().manual_seed(5)
    for grad_loss, scale in ((torch.rand((), generator=g) + 0.5, 0.25),
                             (torch.rand(entries.shape[0] // 2, case.heads, generator=g) + 0.5, 1.0)):
        for need_grad_hidden in (True, False):
            results = {}
            for mode in ("kernel", "memset"):
                monkeypatch.setenv("PREFKERNELS_GRAD_FILL", mode)
                results[mode] = device_work(lambda: emulated_ops.pool_backward(
                    entries, grad_loss, scale, *csr, hidden, weight, pooled_pos, need_grad_hidden))
            (fill_work, fill), (memset_work, memset) = results["kernel"], results["memset"]
            what = f"{case} grad_loss {list(grad_loss.shape)} need_grad_hidden={need_grad_hidden}"
            assert not any(t.isnan().any() for t in memset), f"{what}: an element left unwritten"
            for got, want, name in zip(fill, memset, ("grad_hidden", "grad_weight", "grad_bias")):
                assert got.dtype == want.dtype, f"{what}: {name}"
                if name == "grad_hidden" or rows <= 32:
                    assert torch.equal(got, want), f"{what}: {name}"
                else:
                    rtol, atol = (1e-5, 1e-6) if got.dtype == torch.float32 else (8e-3, 1e-3)  # a 2-byte dtype's ulp
                    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {name}: {m}")
            memsets = 1 if rows > 32 else 0  # without a grad buffer, only the tickets of 2 row blocks
            if need_grad_hidden:
                assert fill_work == [1, 0] and memset_work == [1, 1], what
                assert fill[0][[3, 17]].eq(0).all() and fill[0][0].ne(0).any(), what
            else:
                assert fill_work == memset_work == [1, memsets], what


@pytest.mark.parametrize("positions,fills", [(1536, True), (1535, False)])
def test_emulated_cuda_auto_fill_takes_the_kernel_for_large_grad_buffers(emulated_ops, monkeypatch, positions, fills):
    """PREFKERNELS_GRAD_FILL unset (auto): the fill kernel from 12 MiB of grad buffer per pass of
    its one-row-block reduction (2 rows, 1 head: one pass), a memset below."""
    monkeypatch.delenv("PREFKERNELS_GRAD_FILL", raising=False)
    args, _ = op_args(Case(dtype=torch.bfloat16, heads=1, rows=2, positions=positions, dim=2048, pooling="last_index"),
                      device="cpu")
    _, _, pair_grad, pooled_pos = emulated_ops.bt_forward(*args)
    work, (grad_hidden, _, _) = device_work(lambda: emulated_ops.pool_backward(
        pair_grad.reshape(-1, 1), torch.tensor(1.0), 1.0, None, None, args[0], args[1], pooled_pos, True))
    assert work == ([1, 0] if fills else [1, 1])
    assert grad_hidden.ne(0).sum() == 2 * 2048 and not grad_hidden.isnan().any()


@pytest.mark.parametrize("positions,fp32,fills", [(3072, False, True), (3073, False, False), (1536, True, True),
                                                  (1537, True, False)])
def test_emulated_cuda_auto_fill_stops_at_768_mib(emulated_ops, positions, fp32, fills):
    """``auto``'s upper bound, from the plan alone (no buffer): the fill kernel up to 768 MiB of
    grad buffer (32 rows of 4096 columns: 3072 bf16 or 1536 fp32 positions), the memset path from
    one position more; ``kernel`` takes the fill kernel at any size, 8 rows per 64 KiB block."""
    plan = torch.ops.prefkernels_emu.fill_rows_of_plan
    auto, kernel = 0, 1
    assert (plan(32, positions, 4096, 1, fp32, auto) > 0) == fills
    assert plan(32, positions, 4096, 1, fp32, kernel) == 8
    assert plan(2, 1536, 2048, 1, False, auto) == 16 and plan(2, 1535, 2048, 1, False, auto) == 0  # 12 MiB a pass


def test_emulated_cuda_bad_grad_fill_is_refused_by_name(emulated_ops, monkeypatch):
    args, _ = op_args(Case(heads=1), device="cpu")
    _, _, pair_grad, pooled_pos = emulated_ops.bt_forward(*args)
    monkeypatch.setenv("PREFKERNELS_GRAD_FILL", "zeros")
    with pytest.raises(RuntimeError, match="PREFKERNELS_GRAD_FILL: expected auto, kernel or memset, got 'zeros'"):
        emulated_ops.pool_backward(pair_grad.reshape(-1, 1), None, 1.0, None, None, args[0], args[1], pooled_pos, True)


def test_emulated_cuda_opcheck(emulated_ops):
    inputs = make_inputs(Case(heads=2, pairs="shared", margin=True))
    kw = inputs["kwargs"]
    opcheck_ops(emulated_ops, (inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_(),
                               inputs["bias"].requires_grad_(), kw["attention_mask"], None, None, kw["chosen_index"],
                               kw["rejected_index"], kw["margin"]))
