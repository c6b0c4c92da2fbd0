"""Edge cases of the public ops on every backend: autocast, and invalid rows with the value checks off."""
import shutil
import subprocess

import pytest
import torch

import prefkernels
from prefkernels import backends, reference

BACKENDS = ["native", "triton", "reference"]


def available(name):
    ops = backends.select(name, torch.device("cpu"))
    return name == "reference" or (ops is not None and ops.name == name)


def cpu_kernel_ops(backend):
    """The OpSet of kernel backend ``backend`` on CPU tensors; skips the test when it is not available."""
    ops = backends.select(backend, torch.device("cpu"))
    if ops is None or ops.name != backend:
        pytest.skip(f"backend {backend!r} not available on cpu")
    return ops


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_math_stays_float32_under_autocast(backend):
    """Under bf16 autocast (as the trainer runs) the head is still computed in fp32 on every backend."""
    if not available(backend):
        pytest.skip(f"backend {backend!r} not available on cpu")
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(4, 5, 64, generator=g), torch.randn(2, 64, generator=g), torch.randn(2, generator=g)
    last_index = torch.tensor([4, 2, 0, 3])
    results = []
    for autocast in (False, True):
        h, w, b = leaves(hidden, weight, bias)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, rewards = prefkernels.fused_bt_loss(h, w, b, last_index=last_index, backend=backend)
            scored = prefkernels.pool_score(h, w, b, last_index=last_index, backend=backend)
        (loss + scored.square().mean()).backward()
        results.append((loss, rewards, scored, h.grad, w.grad, b.grad))
    for plain, autocast in zip(*results):
        assert autocast.dtype == plain.dtype
        torch.testing.assert_close(autocast, plain, rtol=1e-5, atol=1e-6)


INVALID_POOLING = {
    # pooling kwargs, hidden shape, invalid rows
    "empty_mask_row": (dict(attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])), (4, 3, 6), [1, 3]),
    "last_index_out_of_range": (dict(last_index=torch.tensor([2, -1, 0, 3])), (4, 3, 6), [1, 3]),
    "empty_sequence": (dict(cu_seqlens=torch.tensor([0, 3, 3, 5, 5])), (7, 6), [1, 3]),
}


def unchecked_step(backend, hidden, weight, bias, pooling):
    """pool_score + fused_bt_loss (reduction none, NaN entries dropped) with gradients."""
    h, w, b = leaves(hidden, weight, bias)
    rewards = prefkernels.pool_score(h, w, b, backend=backend, **pooling)
    # Pairs (0, 2) valid, (1, 3) both rows invalid: NaN loss there, dropped before the backward.
    loss, _ = prefkernels.fused_bt_loss(h, w, b, backend=backend, reduction="none", **pooling)
    upstream = torch.linspace(0.5, 2.0, rewards.numel()).view_as(rewards)
    total = (rewards.nan_to_num() * upstream).sum() + loss.nan_to_num().sum()
    total.backward()
    return rewards.detach(), loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("case", list(INVALID_POOLING))
def test_unchecked_invalid_rows_agree_across_backends(monkeypatch, case):
    """Value checks off (PREFKERNELS_CHECK_VALUES=0, torch.compile): a row without a valid pooled
    position gets NaN rewards and adds no gradient on every backend; the reference does not pool
    another token through negative indexing, and no backend's bias gradient counts that row."""
    monkeypatch.setenv("PREFKERNELS_CHECK_VALUES", "0")
    pooling, shape, invalid = INVALID_POOLING[case]
    g = torch.Generator().manual_seed(1)
    hidden, weight, bias = torch.randn(*shape, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
    results = {backend: unchecked_step(backend, hidden, weight, bias, pooling) for backend in BACKENDS
               if available(backend)}
    rows = torch.zeros(4, dtype=torch.bool)
    rows[invalid] = True
    for backend, (rewards, loss, grad_hidden, grad_weight, grad_bias) in results.items():
        assert rewards[rows].isnan().all() and rewards[~rows].isfinite().all(), backend
        assert loss[1].isnan().all() and loss[0].isfinite().all(), backend
        for name, grad in (("hidden", grad_hidden), ("weight", grad_weight), ("bias", grad_bias)):
            assert grad.isfinite().all(), f"{backend}: grad_{name} {grad}"
    want = results["reference"]
    for backend, got in results.items():
        for name, x, y in zip(("rewards", "loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m: f"{backend} {name} vs reference: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_invalid_rows_add_no_bias_gradient(backend):
    """Under torch.compile the value checks are skipped, so the backward itself must leave rows
    without a valid pooled position out of the bias gradient, whatever gradient reaches their
    (NaN) rewards; eager with the checks on raises before any backward."""
    if not available(backend):
        pytest.skip(f"backend {backend!r} not available on cpu")
    torch._dynamo.reset()
    pooling, shape, invalid = INVALID_POOLING["empty_mask_row"]
    g = torch.Generator().manual_seed(2)
    h, w, b = leaves(torch.randn(*shape, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, generator=g))
    score = torch.compile(lambda h, w, b: prefkernels.pool_score(h, w, b, backend=backend, **pooling), fullgraph=True)
    score(h, w, b).backward(torch.ones(shape[0], 2))
    valid_rows = shape[0] - len(invalid)
    torch.testing.assert_close(b.grad, torch.full((2,), float(valid_rows)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing,center_coef", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.05)])
def test_infinite_gap_loss_is_its_limit(backend, label_smoothing, center_coef):
    """An infinite reward gap gives the loss's limit, never NaN: a term of weight 0 is left out
    rather than computed as 0 * inf. gap = +inf (margin -inf): loss 0 when unsmoothed, as TRL's
    -logsigmoid; smoothed, +inf. gap = -inf (margin +inf): +inf. Gradients stay finite."""
    if not available(backend):
        pytest.skip(f"backend {backend!r} not available on cpu")
    g = torch.Generator().manual_seed(3)
    h, w, b = leaves(torch.randn(6, 4, 8, generator=g), torch.randn(1, 8, generator=g), torch.randn(1, generator=g))
    margin = torch.tensor([-float("inf"), float("inf"), 0.5])
    loss, rewards = prefkernels.fused_bt_loss(h, w, b, last_index=torch.tensor([3, 1, 2, 0, 3, 2]), margin=margin,
                                              label_smoothing=label_smoothing, center_coef=center_coef,
                                              reduction="none", backend=backend)
    assert not loss.isnan().any(), loss
    center = center_coef * (rewards[0, 0] + rewards[3, 0]) ** 2
    torch.testing.assert_close(loss[0, 0].detach(), torch.tensor(float("inf")) if label_smoothing else center)
    assert loss[1, 0] == float("inf") and loss[2, 0].isfinite()
    loss[[0, 2]].sum().backward()
    for name, grad in (("hidden", h.grad), ("weight", w.grad), ("bias", b.grad)):
        assert grad.isfinite().all(), f"grad_{name} {grad}"


def test_unchecked_out_of_range_pairs_agree_across_backends(monkeypatch):
    """Value checks off: a pair index out of range gives that pair a NaN loss and no gradient on
    every backend (the reference neither raises an IndexError nor reads another row)."""
    monkeypatch.setenv("PREFKERNELS_CHECK_VALUES", "0")
    g = torch.Generator().manual_seed(4)
    hidden, weight, bias = torch.randn(4, 3, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
    pairs = dict(chosen_index=torch.tensor([0, 5, 2, -1]), rejected_index=torch.tensor([1, 3, 3, 0]))
    results = {}
    for backend in BACKENDS:
        if not available(backend):
            continue
        h, w, b = leaves(hidden, weight, bias)
        loss, _ = prefkernels.fused_bt_loss(h, w, b, last_index=torch.tensor([2, 1, 0, 2]), reduction="none",
                                            backend=backend, **pairs)
        assert loss[[1, 3]].isnan().all() and loss[[0, 2]].isfinite().all(), backend
        loss.nan_to_num().sum().backward()
        results[backend] = (loss.detach(), h.grad, w.grad, b.grad)
    for backend, got in results.items():
        for name, x, y in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, results["reference"]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m: f"{backend} {name} vs reference: {m}")


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("csr", [False, True])
def test_direct_pool_backward_skips_out_of_range_positions_and_entries(backend, csr):
    """A direct call of the ``pool_backward`` op with pooled positions outside [0, T), or a CSR
    whose segment bounds or entries are out of range, touches no memory out of bounds (as the
    CUDA op): those positions, bounds and entries add nothing."""
    ops = cpu_kernel_ops(backend)
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(4, 5, 8, generator=g), torch.randn(2, 8, generator=g)
    pooled_pos = torch.tensor([2, 5, -1, 4])  # row 1: T (out of range), row 2: invalid
    if csr:
        grad_coef = torch.randn(6, 2, generator=g)
        row_ptr = torch.tensor([-3, 2, 3, 4, 100])  # clipped to [0, 6): segments [0,2) [2,3) [3,4) [4,6)
        row_entry = torch.tensor([0, 7, 1, 3, -2, 5])  # entries 7 (row 0) and -2 (row 3) are out of range
        coef = torch.stack([grad_coef[0], grad_coef[1], grad_coef[3], grad_coef[5]])
    else:
        grad_coef = row_ptr = row_entry = None
        coef = grad_coef = torch.randn(4, 2, generator=g)
    grad_hidden, grad_weight, grad_bias = ops.pool_backward(grad_coef, None, 1.0, row_ptr, row_entry, hidden, weight,
                                                            pooled_pos, True)
    want_hidden = torch.zeros_like(hidden)
    want_weight = torch.zeros_like(weight)
    for n, pos in ((0, 2), (3, 4)):  # the rows with a position in range
        want_hidden[n, pos] = coef[n] @ weight
        want_weight += coef[n].unsqueeze(1) * hidden[n, pos]
    torch.testing.assert_close(grad_hidden, want_hidden)
    torch.testing.assert_close(grad_weight, want_weight)
    torch.testing.assert_close(grad_bias, coef[0] + coef[3])


def check_direct_bt_forward_with_no_explicit_pairs(ops, device):
    """A direct ``bt_forward`` call with empty (P = 0) chosen/rejected index tensors: every row is
    still pooled (rewards and positions as ``pool_forward``'s) and the pair outputs are empty; an
    empty index tensor is explicit pairs, not the default pairing (which would write N/2 pairs)."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(6, 5, 16, generator=g).to(device)
    weight, bias = torch.randn(2, 16, generator=g).to(device), torch.randn(2, generator=g).to(device)
    last_index = torch.tensor([4, 0, 2, 3, 1, 4], device=device)
    none = torch.empty(0, dtype=torch.long, device=device)
    loss, rewards, pair_grad, pooled_pos = ops.bt_forward(hidden, weight, bias, None, last_index, None, none, none,
                                                          None, 0.0, 0.0, 0)
    want_rewards, want_pos = ops.pool_forward(hidden, weight, bias, None, last_index, None)
    assert loss.shape == (0, 2) and pair_grad.shape == (2, 0, 2)
    assert torch.equal(pooled_pos, want_pos)
    torch.testing.assert_close(rewards, want_rewards, rtol=1e-6, atol=1e-6)  # another kernel specialization


def check_pool_backward_scales_entries_by_the_loss_gradient(ops, device):
    """``pool_backward`` with the loss's gradient (``grad_loss`` [] with a ``loss_scale``, or [P, K])
    equals ``pool_backward`` of the coefficients multiplied beforehand, grad_coef[e] * grad_loss[e mod
    P] * loss_scale over the 2P pair entries: dense (default pairs, entry e = row e) and by CSR."""
    g = torch.Generator().manual_seed(7)
    N, K = 6, 2
    hidden, weight = torch.randn(N, 5, 8, generator=g).to(device), torch.randn(K, 8, generator=g).to(device)
    pooled_pos = torch.tensor([2, 4, 0, 3, 1, 4], device=device)
    explicit = (torch.tensor([0, 1, 2, 0], device=device), torch.tensor([3, 4, 5, 5], device=device))
    for pairs in (None, explicit):
        P = N // 2 if pairs is None else pairs[0].shape[0]
        row_ptr, row_entry = ops.rows_csr(*(pairs or (None, None)), N)
        grad_coef = torch.randn(2 * P, K, generator=g).to(device)
        for grad_loss, scale in ((torch.randn((), generator=g), 1.0 / (P * K)), (torch.randn(P, K, generator=g), 1.0),
                                 (torch.randn(P, K, generator=g), 0.5)):
            grad_loss = grad_loss.to(device)
            per_entry = grad_loss.expand(P, K).repeat(2, 1)
            want = ops.pool_backward(grad_coef * (per_entry * scale), None, 1.0, row_ptr, row_entry, hidden, weight,
                                     pooled_pos, True)
            got = ops.pool_backward(grad_coef, grad_loss, scale, row_ptr, row_entry, hidden, weight, pooled_pos, True)
            what = f"csr={pairs is not None} grad_loss {list(grad_loss.shape)} scale {scale}"
            for name, x, y in zip(("grad_hidden", "grad_weight", "grad_bias"), got, want):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")


def check_direct_calls_refuse_a_bad_reduction_or_grad_loss(ops, device):
    """A direct op call with a reduction code other than 0, 1, 2, or a grad_loss that is not float32
    [] or [P, K] against grad_coef [2P, K], raises an error naming the argument."""
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(4, 3, 8, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)
    last_index = torch.tensor([2, 1, 0, 2], device=device)
    with pytest.raises(RuntimeError, match="reduction: expected 0 \\(none\\), 1 \\(mean\\) or 2 \\(sum\\), got 3"):
        ops.bt_forward(hidden, weight, None, None, last_index, None, None, None, None, 0.0, 0.0, 3)
    _, _, pair_grad, pooled_pos = ops.bt_forward(hidden, weight, None, None, last_index, None, None, None, None,
                                                 0.0, 0.0, 0)
    entries = pair_grad.reshape(-1, 2)
    for bad in (torch.ones(3, 2), torch.ones(2, 2, dtype=torch.float64), torch.ones(1), torch.ones(2, 3)):
        with pytest.raises(RuntimeError, match="grad_loss: expected a contiguous float32 \\[\\] or \\[P, K\\]"):
            ops.pool_backward(entries, bad.to(device), 1.0, None, None, hidden, weight, pooled_pos, True)


def check_rows_csr(rows_csr, device):
    """A rows_csr op (native CPU, emulated CUDA, CUDA) equals the reference's stable sort: row_ptr,
    and every row's entries in ascending order; the whole of row_entry is a permutation of the 2P
    entries (those of rows outside [0, rows) outside every segment). Over empty and one-row cases,
    rows in many pairs (long segments, several 32-entry chunks and a partial one), indices far out
    of range, 9000 rows (the CUDA kernel's counters in global memory, not shared); and clear errors
    for bad arguments."""
    g = torch.Generator().manual_seed(11)
    for rows, pairs in ((0, 0), (0, 3), (1, 1), (4, 0), (5, 150), (37, 200), (300, 451), (9000, 700)):
        chosen = torch.randint(-2, rows + 3, (pairs,), generator=g)
        rejected = torch.randint(-2, rows + 3, (pairs,), generator=g)
        if pairs > 2:
            chosen[1], rejected[2] = -2 ** 62, 2 ** 62
        what = f"rows={rows} pairs={pairs}"
        want_ptr, want_entry = reference.rows_csr(chosen, rejected, rows)
        row_ptr, row_entry = rows_csr(chosen.to(device), rejected.to(device), rows)
        assert row_ptr.dtype == row_entry.dtype == torch.int64 and row_entry.shape == (2 * pairs,), what
        assert torch.equal(row_ptr.cpu(), want_ptr), what
        inside = slice(int(want_ptr[0]), int(want_ptr[-1]))
        assert torch.equal(row_entry.cpu()[inside], want_entry[inside]), what
        assert torch.equal(row_entry.cpu().sort().values, torch.arange(2 * pairs)), what
    index = torch.arange(3, device=device)
    bad_calls = [
        ((index.int(), index, 4), "chosen_index: expected contiguous int64 \\[P\\], got Int"),
        ((index.view(3, 1), index, 4), "chosen_index: expected contiguous int64 \\[P\\]"),
        ((torch.arange(6, device=device)[::2], index, 4), "chosen_index: expected contiguous int64"),
        ((index, index[:2], 4), "rejected_index: expected contiguous int64 \\[P\\] with P = 3 \\(chosen_index\\)"),
        ((index, index, -1), "rows: expected >= 0, got -1"),
    ]
    for args, message in bad_calls:
        with pytest.raises(RuntimeError, match=message):
            rows_csr(*args)


def test_native_rows_csr():
    if backends.native_ops() is None:
        pytest.skip("prefkernels._C is not built")
    check_rows_csr(torch.ops.prefkernels.rows_csr, "cpu")


DIRECT_CALL_CHECKS = [check_direct_bt_forward_with_no_explicit_pairs,
                      check_pool_backward_scales_entries_by_the_loss_gradient,
                      check_direct_calls_refuse_a_bad_reduction_or_grad_loss]


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("check", DIRECT_CALL_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_direct_op_calls(backend, check):
    """Direct calls of the raw ops (each check on CPU tensors; tests/test_gpu.py runs them on CUDA)."""
    check(cpu_kernel_ops(backend), "cpu")


def check_extension_shares_the_process_libstdcxx():
    """prefkernels._C defines no libstdc++ internals of its own (setup.py links the shared
    libstdc++ first): a private, uninitialized copy formats integers wrong or segfaults, as every
    error message that names a value does (e.g. "reduction: ... got 3")."""
    if backends.native_ops() is None:
        pytest.skip("prefkernels._C is not built")
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    from prefkernels import _C
    symbols = subprocess.run(["nm", "-D", "-C", "--defined-only", _C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "std::locale::classic()" not in symbols and "std::ios_base::Init::Init()" not in symbols, (
        f"{_C.__file__} carries its own libstdc++ (linked statically): rebuild with setup.py's link_args()")


def test_extension_shares_the_process_libstdcxx():
    check_extension_shares_the_process_libstdcxx()
