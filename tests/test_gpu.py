"""GPU checks (pytest -m gpu, run by benchmarks/gpu_check.sh): native CUDA and Triton against
the float64 reference on the op table, realistic shapes, opcheck, torch.compile, determinism."""
import zlib

import pytest
import torch

import prefkernels
from prefkernels import backends, checks, reference
from op_cases import Case, assert_matches, make_inputs, opcheck_ops, poison_allocator, public, reference_float64, run_op
from test_op_edge_cases import DIRECT_CALL_CHECKS, check_extension_shares_the_process_libstdcxx, check_rows_csr
from test_ops import VARIANTS

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["native", "triton"]
# Backends with each way the backward gets its zeroed grad buffer (PREFKERNELS_GRAD_FILL): the
# fill kernel writes it whole in the one launch, or a memset (Triton: a zero fill) clears it first.
FILL_VARIANTS = ["native-kernel", "native-memset", "triton-kernel", "triton-memset"]


def require(backend):
    ops = backends.select(backend, torch.device("cuda"))
    if ops is None or ops.name != backend:
        pytest.skip(f"backend {backend!r} not available on cuda")
    return ops


def require_variant(variant, monkeypatch):
    """The ops of a FILL_VARIANTS entry, with its PREFKERNELS_GRAD_FILL set for the test."""
    backend, _, fill = variant.partition("-")
    if fill:
        monkeypatch.setenv("PREFKERNELS_GRAD_FILL", fill)
    return require(backend)


def test_extension_built_here_shares_the_process_libstdcxx():
    """First, before any op call that formats an error message: the H200 image's g++ 13 linked
    libstdc++ statically into every torch extension, and those messages segfaulted."""
    check_extension_shares_the_process_libstdcxx()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,heads", [(torch.bfloat16, 3), (torch.float32, 1), (torch.float16, 2)], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_float64_reference(backend, variant, dtype, heads):
    require(backend)
    case = Case(dtype=dtype, heads=heads).with_(**VARIANTS[variant])
    inputs = make_inputs(case, device="cuda", seed=zlib.crc32(variant.encode()) % 1000)
    expected = reference_float64(inputs)
    poison_allocator("cuda")
    assert_matches(run_op(public(backend), inputs), expected, inputs, what=f"{backend} {case}: ")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(32, 512, 4096, torch.bfloat16, "mask_left"), (8, 1024, 2048, torch.float32, "mask_right"),
                                   (16, 300, 4099, torch.float16, "last_index"), (24, 128, 1000, torch.bfloat16, "cu_seqlens")],
                         ids=str)
def test_cuda_realistic_shapes(backend, shape):
    require(backend)
    rows, positions, dim, dtype, pooling = shape
    case = Case(dtype=dtype, heads=2, rows=rows, positions=positions, dim=dim, pooling=pooling, margin=True,
                center_coef=0.01, layout="strided_t" if pooling == "mask_right" else "contiguous")
    inputs = make_inputs(case, device="cuda")
    expected = reference_float64(inputs)
    poison_allocator("cuda", sizes=(1 << 20, 1 << 26))
    assert_matches(run_op(public(backend), inputs), expected, inputs, what=f"{backend} {shape}: ")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_cuda_backward_is_bitwise_deterministic(backend, pairs):
    require(backend)
    case = Case(dtype=torch.bfloat16, heads=3, rows=64, positions=256, dim=2048, pairs=pairs)
    inputs = make_inputs(case, device="cuda")
    first, second = run_op(public(backend), inputs), run_op(public(backend), inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_opcheck(backend):
    ops = require(backend)
    inputs = make_inputs(Case(heads=2, pairs="shared", margin=True), device="cuda")
    kw = inputs["kwargs"]
    opcheck_ops(ops, (inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_(),
                      inputs["bias"].requires_grad_(), kw["attention_mask"], None, None, kw["chosen_index"],
                      kw["rejected_index"], kw["margin"]))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_torch_compile_fullgraph(backend):
    require(backend)
    inputs = make_inputs(Case(dtype=torch.bfloat16, heads=2, rows=8, positions=64, dim=256), device="cuda")

    def step(hidden, weight, bias, mask):
        loss, rewards = prefkernels.fused_bt_loss(hidden, weight, bias, attention_mask=mask, backend=backend)
        return loss, rewards

    compiled = torch.compile(step, fullgraph=True)
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        hidden = inputs["hidden"].clone().requires_grad_()
        weight = inputs["weight"].clone().requires_grad_()
        loss, rewards = fn(hidden, weight, inputs["bias"], inputs["kwargs"]["attention_mask"])
        loss.backward()
        results[name] = (loss.detach(), rewards, hidden.grad, weight.grad)
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want)


def device_activities(fn):
    """Names of the device-side activities (kernels, memsets, copies) that ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def op_args(case, device="cuda", reduction="none"):
    """(forward args of bt_forward, heads) for ``case``."""
    inputs = make_inputs(case, device=device)
    kw = inputs["kwargs"]
    return (inputs["hidden"], inputs["weight"], inputs["bias"], kw.get("attention_mask"), kw.get("last_index"),
            kw.get("cu_seqlens"), kw.get("chosen_index"), kw.get("rejected_index"), kw.get("margin"), 0.1, 0.01,
            checks.REDUCTION_CODES[reduction]), case.heads


@pytest.mark.parametrize("variant", FILL_VARIANTS)
@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_cuda_forward_and_backward_are_one_launch_each(variant, pairs, monkeypatch):
    """The issue's launch structure, counted by the profiler: bt_forward is ONE kernel for default
    and explicit pairs (plus the mean's reduction kernel with reduction="mean"); pool_backward is
    ONE kernel (the fill kernel, which writes the whole grad buffer) or the grad buffer's clear plus
    ONE kernel, with many row blocks and several D tiles (the last block of each tile sums the
    partials), whether or not it scales the pair entries by the loss's gradient."""
    ops = require_variant(variant, monkeypatch)
    case = Case(dtype=torch.bfloat16, heads=2, rows=96, positions=64, dim=2560, pairs=pairs, margin=True)
    args, heads = op_args(case)
    _, _, pair_grad, pooled_pos = ops.bt_forward(*args)  # warm-up (Triton compiles here)
    coef = torch.rand(args[0].shape[0], heads, device="cuda") + 0.5
    forward = device_activities(lambda: ops.bt_forward(*args))
    assert len(forward) == 1, forward
    mean_args = op_args(case, reduction="mean")[0]
    ops.bt_forward(*mean_args)
    assert len(device_activities(lambda: ops.bt_forward(*mean_args))) == 2
    entries = pair_grad.reshape(-1, heads)
    csr = ops.rows_csr(*args[6:8], args[0].shape[0])
    grad_loss = torch.rand((), device="cuda")  # made here: the profiler would count its kernel
    for call in (lambda: ops.pool_backward(coef, None, 1.0, None, None, args[0], args[1], pooled_pos, True),
                 lambda: ops.pool_backward(entries, grad_loss, 0.5, *csr, args[0], args[1], pooled_pos, True)):
        call()  # warm-up
        backward = device_activities(call)
        kernels = [name for name in backward if "pool_backward" in name]
        fill_kernel = variant.endswith("-kernel")
        assert len(kernels) == 1 and len(backward) == (1 if fill_kernel else 2), backward
        assert ("pool_backward_fill_kernel" in kernels[0]) == fill_kernel, kernels


def test_cuda_rows_csr():
    """The CUDA rows_csr against the reference (check_rows_csr), then on 400k entries of 4096 rows:
    ONE kernel, equal to the reference and to its own replay in a CUDA graph (no host sync). Both
    backends' OpSet.rows_csr take it up to CUDA_CSR_MAX_ENTRIES entries, the reference past it."""
    require("native")
    check_rows_csr(torch.ops.prefkernels.rows_csr, "cuda")
    g = torch.Generator().manual_seed(12)
    chosen, rejected = (torch.randint(0, 4096, (200_000,), generator=g).cuda() for _ in range(2))
    want_ptr, want_entry = reference.rows_csr(chosen, rejected, 4096)
    kernels = device_activities(lambda: torch.ops.prefkernels.rows_csr(chosen, rejected, 4096))
    assert len(kernels) == 1 and "rows_csr_kernel" in kernels[0], kernels
    graph = torch.cuda.CUDAGraph()
    torch.ops.prefkernels.rows_csr(chosen, rejected, 4096)  # warm-up outside the capture
    with torch.cuda.graph(graph):
        row_ptr, row_entry = torch.ops.prefkernels.rows_csr(chosen, rejected, 4096)
    for t in (row_ptr, row_entry):
        t.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(row_ptr, want_ptr) and torch.equal(row_entry, want_entry)
    for entries, kernel in ((backends.CUDA_CSR_MAX_ENTRIES, True), (backends.CUDA_CSR_MAX_ENTRIES + 2, False)):
        pairs = (chosen[:entries // 2], rejected[:entries // 2])
        for ops in filter(None, (backends.native_ops(), backends.triton_ops())):  # Triton takes native's
            kernels = device_activities(lambda: ops.rows_csr(*pairs, 4096))
            assert any("rows_csr_kernel" in name for name in kernels) == kernel, (entries, kernels)


@pytest.mark.parametrize("variant", FILL_VARIANTS)
def test_cuda_graph_replays_are_bitwise_eager(variant, monkeypatch):
    """bt_forward + pool_backward captured in a CUDA graph and replayed 3 times: each replay equals
    the eager call bit for bit (the backward's tile tickets are cleared by the captured memset, so a
    replay never starts from the last one's counts; the fill kernel rewrites the whole grad buffer)."""
    ops = require_variant(variant, monkeypatch)
    args, heads = op_args(Case(dtype=torch.bfloat16, heads=3, rows=128, positions=64, dim=2048))

    def step():
        loss, rewards, pair_grad, pooled_pos = ops.bt_forward(*args)
        grads = ops.pool_backward(pair_grad.reshape(-1, heads), torch.ones_like(loss), 0.5, None, None, args[0],
                                  args[1], pooled_pos, True)
        return (loss, rewards, *grads)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for replay in range(3):
        for t in captured:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (got, want) in enumerate(zip(captured, eager)):
            assert torch.equal(got, want), f"replay {replay}, output {i}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("check", DIRECT_CALL_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_cuda_direct_op_calls(backend, check):
    check(require(backend), "cuda")


def test_auto_picks_native_cuda_then_triton():
    ops = backends.select("auto", torch.device("cuda"))
    expected = "native" if backends.native_has_cuda() else ("triton" if backends.triton_ops() else None)
    assert (ops.name if ops else None) == expected


# ---------------------------------------------------------------------------------------------
# Op level against the native CPU ops (the semantic reference): the vector/scalar path choice
# (data pointer 2 bytes off 16, row strides off the vector width, storage offsets), invalid rows
# (empty cu_seqlens sequences, empty mask rows, last_index out of range: NaN rewards,
# pooled_pos -1, no gradient), mask dtypes with multi-step scans (T > 1024), K = 64, many rows
# (65 row blocks of 32 rows, a partial last block), the CSR of explicit pairs
# (a row in several pairs, a row in none, out-of-range pairs), and the grad buffer, memset-cleared
# or written whole by the fill kernel (poisoned allocator; every element outside the pooled rows
# must be exactly 0).
# ---------------------------------------------------------------------------------------------
def edge_op_case(name, device="cpu"):
    """(hidden, weight, bias, attention_mask, last_index, cu_seqlens) on ``device``, the same values
    on every device. Views are taken on the device (``.to`` would copy a view contiguous)."""
    g = torch.Generator().manual_seed(41)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def on(t):
        return t.to(device)

    bf16, f16 = torch.bfloat16, torch.float16
    if name == "packed_empty_unaligned":  # 2 bytes off 16; rows 1, 4 empty, row 5 past total
        D = 64
        hidden = randn(14, D + 8, dtype=bf16)[1:, 1:1 + D]
        cu = on(torch.tensor([1, 4, 4, 9, 13, 13, 14]))
        return hidden, randn(3, D, dtype=bf16) / 8, randn(3, dtype=bf16), None, None, cu
    if name == "packed_empty_offset_vec":  # storage offset, 16-byte aligned: vector path
        D = 64
        hidden = randn(15, D + 8, dtype=f16)[2:, 8:8 + D]
        cu = on(torch.tensor([0, 5, 5, 6, 13]))
        return hidden, randn(2, D) / 8, randn(2), None, None, cu
    if name == "padded_unaligned_int32_mask":  # 2 bytes off 16, stride_t 257; row 2 has no 1
        N, T, D = 4, 1500, 256
        hidden = randn(N, T, D + 1, dtype=f16)[..., 1:]
        lengths = torch.tensor([T, 3, 0, 1025])
        mask = on((torch.arange(T) < lengths[:, None]).int())
        return hidden, randn(2, D) / 16, randn(2), mask, None, None
    if name == "padded_vec_bool_left_k64":  # vector path, stride_n (T+3)*D; row 2 has no 1
        N, T, D, K = 4, 2100, 512, 64
        hidden = randn(N, T + 3, D, dtype=bf16)[:, :T]
        lengths = torch.tensor([T, 1, 0, 700])
        mask = on(torch.arange(T) >= (T - lengths)[:, None])
        return hidden, randn(K, D, dtype=bf16) / 16, randn(K, dtype=bf16), mask, None, None
    if name == "fp32_odd_stride_last_index":  # D % 4 == 0 but stride_t 37: scalar path
        N, T, D = 6, 9, 36
        hidden = randn(N, T, D + 1)[..., :D]
        return hidden, randn(5, D) / 6, randn(5), None, on(torch.tensor([8, -1, 0, 9, 4, 8])), None
    if name == "fp32_many_rows_int64_mask":  # 2050 rows: 65 row blocks of 32 rows, 2 in the last one
        N, T, D = 2050, 5, 128
        lengths = torch.randint(0, T + 1, (N,), generator=g)
        mask = on((torch.arange(T) < lengths[:, None]).long())
        return randn(N, T, D), randn(3, D) / 11, randn(3), mask, None, None
    raise AssertionError(name)


EDGE_OP_CASES = ["packed_empty_unaligned", "packed_empty_offset_vec", "padded_unaligned_int32_mask",
                 "padded_vec_bool_left_k64", "fp32_odd_stride_last_index", "fp32_many_rows_int64_mask"]
EDGE_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _same(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    got = got.cpu()
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{what}: {got.tolist()[:16]} != {want.tolist()[:16]}"
        return
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at different places"
    if what.endswith("grad_hidden"):
        assert torch.equal(got == 0, want == 0), f"{what}: zeros at different places (buffer not cleared, skipped row written)"
    rtol, atol = EDGE_TOL[want.dtype]
    scale = max(1.0, float(want.abs().nan_to_num().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_edge_ops(ops, native_cpu, case, device):
    """``ops`` on ``device`` against the native CPU ops, for pool_forward, bt_forward (default and
    explicit pairs) and pool_backward (dense and CSR coefficients, with and without grad_hidden)."""
    args = edge_op_case(case)
    dev_args = edge_op_case(case, device)
    assert dev_args[0].stride() == args[0].stride() and dev_args[0].storage_offset() == args[0].storage_offset()
    want_rewards, want_pos = native_cpu.pool_forward(*args)
    got = ops.pool_forward(*dev_args)
    _same(got[0], want_rewards, f"{case} pool_forward rewards")
    _same(got[1], want_pos, f"{case} pool_forward pooled_pos")
    invalid = want_pos < 0
    assert invalid.any() or case == "packed_empty_offset_vec", case
    N, K = want_rewards.shape
    g = torch.Generator().manual_seed(43)
    margin = torch.rand(N // 2, generator=g)
    forwards = [(None, None, margin, 0.1, 0.02)]
    # Rows in several pairs (as chosen and as rejected, row 2 against itself), rows 3 .. N-1 in
    # none, two out-of-range pairs (NaN loss, zero pair_grad, no CSR entry).
    chosen = torch.tensor([0, 1, 1, 2, 0, -1, 0])
    rejected = torch.tensor([1, 0, 2, 2, N, 0, 2])
    forwards.append((chosen, rejected, None, 0.0, 0.0))
    for c, r, m, ls, cc in forwards:
        for reduction in checks.REDUCTION_CODES.values():
            extra = (c, r, m, ls, cc, reduction)
            want = native_cpu.bt_forward(*args, *extra)
            got = ops.bt_forward(*dev_args, *_to(extra, device))
            for i, name in enumerate(("loss", "rewards", "pair_grad", "pooled_pos")):
                _same(got[i], want[i], f"{case} bt_forward {'explicit' if c is not None else 'default'} "
                                       f"reduction={reduction} {name}")
    dense = torch.randn(N, K, generator=g)
    dense[invalid] = float("nan")  # skipped rows contribute nothing, even a NaN coefficient
    entries = torch.cat([chosen, rejected]).clamp(0, N - 1)
    row_ptr, row_entry = reference.rows_csr(chosen, rejected, N)  # out-of-range entries belong to no row
    csr_coef = torch.randn(entries.shape[0], K, generator=g)
    csr_coef[invalid[entries]] = float("nan")
    # The coefficients as given, and (entries as pairs' chosen then rejected) times a loss gradient
    # of one value or one per pair.
    scalings = [(None, 1.0), (torch.randn((), generator=g), 0.25)]
    pair_scaling = (torch.randn(chosen.shape[0], K, generator=g), 0.5)
    for need in (True, False):
        for coef, rp, re in ((dense, None, None), (csr_coef, row_ptr, row_entry)):
            for grad_loss, scale in scalings + ([pair_scaling] if rp is not None else []):
                want = native_cpu.pool_backward(coef, grad_loss, scale, rp, re, args[0], args[1], want_pos, need)
                poison_allocator(device, sizes=(1 << 10, 1 << 16, 1 << 20, 1 << 23))
                got = ops.pool_backward(*_to((coef, grad_loss, scale, rp, re), device), dev_args[0], dev_args[1],
                                        want_pos.to(device), need)
                what = (f"{case} pool_backward need={need} csr={rp is not None} "
                        f"grad_loss={None if grad_loss is None else list(grad_loss.shape)}")
                _same(got[0], want[0], f"{what} grad_hidden")
                _same(got[1], want[1], f"{what} grad_weight")
                _same(got[2], want[2], f"{what} grad_bias")


@pytest.mark.parametrize("variant", FILL_VARIANTS)
@pytest.mark.parametrize("case", EDGE_OP_CASES)
def test_cuda_edge_layouts_and_invalid_rows_match_native_cpu(variant, case, monkeypatch):
    ops = require_variant(variant, monkeypatch)
    check_edge_ops(ops, backends.native_ops(), case, "cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_cuda_fill_kernel_matches_memset_path(backend, pairs, monkeypatch):
    """The fill kernel (one launch, no memset) against the memset path on a benchmark-sized shape
    under a poisoned allocator: grad_hidden bit for bit (the scatter's arithmetic, zeros elsewhere),
    grad_weight and grad_bias to rounding (4 row blocks' partials against one block's rows)."""
    ops = require(backend)
    args, heads = op_args(Case(dtype=torch.bfloat16, heads=1, rows=128, positions=512, dim=2048, pairs=pairs),
                          reduction="mean")
    _, _, pair_grad, pooled_pos = ops.bt_forward(*args)
    csr = ops.rows_csr(*args[6:8], args[0].shape[0])
    results = {}
    for fill in ("kernel", "memset"):
        monkeypatch.setenv("PREFKERNELS_GRAD_FILL", fill)
        poison_allocator("cuda", sizes=(1 << 20, 1 << 27))
        results[fill] = ops.pool_backward(pair_grad.reshape(-1, heads), torch.tensor(0.7, device="cuda"),
                                          1 / pair_grad[0].numel(), *csr, args[0], args[1], pooled_pos, True)
    (grad_hidden, grad_weight, grad_bias), want = results["kernel"], results["memset"]
    assert not grad_hidden.isnan().any() and torch.equal(grad_hidden, want[0])
    valid = pooled_pos >= 0
    pooled = torch.zeros(grad_hidden.shape[:2], dtype=torch.bool, device="cuda")
    pooled[valid.nonzero()[:, 0], pooled_pos[valid]] = True
    assert grad_hidden[~pooled].eq(0).all() and grad_hidden[pooled].ne(0).any()
    torch.testing.assert_close(grad_weight, want[1], rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(grad_bias, want[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_unchecked_empty_sequence_matches_reference(backend, monkeypatch):
    """Public op with the value checks off: empty cu_seqlens sequences (rows 1, 4) and a sequence
    past the packed rows (row 5) are invalid rows: NaN rewards, no gradient (bias included), as
    the reference decides. Invalid rows are paired with invalid rows only, so every other
    gradient stays finite."""
    require(backend)
    monkeypatch.setenv("PREFKERNELS_CHECK_VALUES", "0")
    check_unchecked_empty_sequence(backend, "cuda")


def check_unchecked_empty_sequence(backend, device):
    pairs = dict(chosen_index=torch.tensor([0, 1, 2, 5]), rejected_index=torch.tensor([3, 4, 3, 1]))
    results = {}
    for name, where, dtype in (("kernel", device, None), ("reference", "cpu", torch.float64)):
        hidden, weight, bias, _, _, cu = edge_op_case("packed_empty_unaligned", where)
        leaves = [(t.to(dtype) if dtype else t).detach().requires_grad_() for t in (hidden, weight, bias)]
        fn = public(backend) if name == "kernel" else reference.fused_bt_loss  # float64: the reference itself
        loss, rewards = fn(*leaves, cu_seqlens=cu, reduction="none", **{k: v.to(where) for k, v in pairs.items()})
        loss.nan_to_num().sum().backward()
        results[name] = [loss.detach(), rewards] + [t.grad for t in leaves]
    assert results["reference"][1][[1, 4, 5]].isnan().all() and results["reference"][1][[0, 2, 3]].isfinite().all()
    for i, (got, want) in enumerate(zip(*results.values())):
        assert torch.equal(got.isnan().cpu(), want.isnan()), i
        if i >= 2:
            assert want.isfinite().all(), i
        rtol, atol = EDGE_TOL[torch.bfloat16]
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)
