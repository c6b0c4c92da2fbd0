"""The Triton backend against prefkernels.reference (and the op-level semantics of the native CPU
kernels). Without CUDA it runs on CPU tensors in the Triton interpreter (small shapes); with
CUDA the same tests run on the GPU, plus the ``gpu``-marked ones at realistic sizes."""
import os

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated: set it before importing triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import prefkernels  # noqa: E402
from prefkernels import backends, reference  # noqa: E402
from prefkernels import triton_bt  # noqa: E402

OPS = backends.triton_ops()  # registers fake kernels + autograd for the triton ops
INTERPRETED = type(triton_bt._pool_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
INTERPRETER_PROBLEM = backends.triton_interpreter_problem() if INTERPRETED else None
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="Triton needs CUDA, or TRITON_INTERPRET=1 set before import"),
              pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (rtol, atol) of an output by the dtype it is stored in; fp32 outputs differ from the reference
# only by summation order, low-precision grads by at most one rounding of the same fp32 value.
TOL = {F32: (2e-5, 2e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1e-2)}
POISON_FLOAT, POISON_INT = -12345.0, -777


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as garbage, so an unwritten element shows."""
    def poisoned(shape, like, dtype):
        value = POISON_FLOAT if dtype.is_floating_point else POISON_INT
        return torch.full(shape, value, device=like.device, dtype=dtype)
    monkeypatch.setattr(triton_bt, "_new", poisoned)


@pytest.fixture(params=["memset", "kernel"])
def grad_fill(request, monkeypatch):
    """Each way the backward gets grad_hidden's zeros (PREFKERNELS_GRAD_FILL): a zeroed buffer then
    the scatter, or _pool_backward_fill_kernel writing every row itself, here in programs of 4 rows
    and 16-column tiles and zeros in 64-element stores, so a program ends inside a sequence and
    inside a row, and the reduction programs run beside several fill programs."""
    monkeypatch.setenv("PREFKERNELS_GRAD_FILL", request.param)
    if request.param == "kernel":
        monkeypatch.setattr(triton_bt, "_FILL_BYTES", 1)
        monkeypatch.setattr(triton_bt, "_FILL_TILE", 64)
    return request.param


def close(actual, expected, what=""):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    rtol, atol = TOL[actual.dtype] if actual.is_floating_point() else (0, 0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------
# Inputs: deterministic random data (never zeros); leaves are what gradients are compared on.
# ------------------------------------------------------------------------------------------
def make_inputs(N=4, T=7, D=37, K=3, dtype=F32, wdtype=F32, pooling="mask_right", layout="contiguous",
                bias=True, pairs="default", margin=False, seed=0, device=None):
    """(leaves, hidden_of, kwargs): hidden_of(leaves) gives the (possibly strided) hidden view."""
    device = device or DEVICE
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    kwargs = {}
    if pooling == "cu_seqlens":
        cu = torch.zeros(N + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        total = int(cu[-1]) + 2  # trailing tokens that belong to no row
        if layout == "contiguous":
            base = torch.randn(total, D, generator=g)
            hidden_of = lambda lv: lv["hidden"]  # noqa: E731
        else:  # row stride D + 3
            base = torch.randn(total, D + 3, generator=g)
            hidden_of = lambda lv: lv["hidden"][:, :D]  # noqa: E731
        kwargs["cu_seqlens"] = cu
    else:
        if layout == "contiguous":
            base = torch.randn(N, T, D, generator=g)
            hidden_of = lambda lv: lv["hidden"]  # noqa: E731
        elif layout == "strided_t":
            base = torch.randn(N, 2 * T, D, generator=g)
            hidden_of = lambda lv: lv["hidden"][:, ::2]  # noqa: E731
        elif layout == "transposed":
            base = torch.randn(T, N, D, generator=g)
            hidden_of = lambda lv: lv["hidden"].transpose(0, 1)  # noqa: E731
        elif layout == "padded_d":
            base = torch.randn(N, T, D + 5, generator=g)
            hidden_of = lambda lv: lv["hidden"][..., :D]  # noqa: E731
        else:
            raise AssertionError(layout)
        pos = torch.arange(T)
        if pooling == "mask_right":
            kwargs["attention_mask"] = (pos < lengths[:, None]).bool()
        elif pooling == "mask_left":
            kwargs["attention_mask"] = (pos >= (T - lengths)[:, None]).long()
        elif pooling == "mask_holes":  # int32, zeros inside the sequence too
            mask = (torch.rand(N, T, generator=g) < 0.5).int()
            mask[torch.arange(N), lengths - 1] = 1
            kwargs["attention_mask"] = mask
        elif pooling == "last_index":
            kwargs["last_index"] = lengths - 1
        else:
            raise AssertionError(pooling)
    leaves = {"hidden": base.to(dtype),
              "weight": (torch.randn(K, D, generator=g) / D ** 0.5 * 2).to(wdtype),
              "bias": torch.randn(K, generator=g).to(wdtype) if bias else None}
    P = N // 2
    if pairs == "explicit":  # a row in several pairs, a row in none
        P = N + 1
        chosen = torch.randint(0, N, (P,), generator=g)
        rejected = torch.randint(0, N, (P,), generator=g)
        chosen[:3] = 1
        chosen[chosen == N - 1] = 0
        rejected[rejected == N - 1] = 2 % N
        kwargs.update(chosen_index=chosen, rejected_index=rejected)
    if margin:
        kwargs["margin"] = torch.rand(P, generator=g) * 2
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return ({k: move(v) for k, v in leaves.items()}, hidden_of,
            {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def run(backend, leaves, hidden_of, kwargs, grads=True, upstream_seed=1, fn=None):
    """Forward (+ backward with a non-uniform upstream gradient) through fused_bt_loss."""
    lv = {k: None if v is None else v.detach().clone().requires_grad_(grads) for k, v in leaves.items()}
    fn = fn or (lambda h, w, b, **kw: prefkernels.fused_bt_loss(h, w, b, backend=backend, **kw))
    loss, rewards = fn(hidden_of(lv), lv["weight"], lv["bias"], **kwargs)
    out = {"loss": loss.detach(), "rewards": rewards.detach()}
    if grads:
        g = torch.Generator().manual_seed(upstream_seed)
        upstream = (torch.rand(loss.shape, generator=g) + 0.5).to(loss.device)
        (loss * upstream).sum().backward()
        out.update({f"grad_{k}": v.grad for k, v in lv.items() if v is not None})
    return out


def compare(leaves, hidden_of, kwargs, what="", grads=True):
    got = run("triton", leaves, hidden_of, kwargs, grads)
    want = run("reference", leaves, hidden_of, kwargs, grads)
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], f"{what} {name}")
    return got


# ------------------------------------------------------------------------------------------
# Forward + all grads vs the reference.
# ------------------------------------------------------------------------------------------
DTYPE_PAIRS = [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F32), (F16, F16)]
POOLINGS = ["mask_right", "mask_left", "mask_holes", "last_index", "cu_seqlens"]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("dtype,wdtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_matches_reference(dtype, wdtype, pooling, K, grad_fill):
    inputs = make_inputs(K=K, dtype=dtype, wdtype=wdtype, pooling=pooling, seed=K)
    compare(*inputs, what=f"{dtype}/{wdtype} {pooling} K={K}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pairs", ["default", "explicit"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_pairs_and_loss_options(dtype, pairs, reduction, grad_fill):
    leaves, hidden_of, kwargs = make_inputs(N=6, K=3, dtype=dtype, pairs=pairs, margin=True, seed=3)
    kwargs.update(label_smoothing=0.15, center_coef=0.05, reduction=reduction)
    compare(leaves, hidden_of, kwargs, what=f"{pairs} {reduction}")


@pytest.mark.parametrize("layout,pooling", [("strided_t", "mask_right"), ("transposed", "mask_left"),
                                            ("padded_d", "last_index"), ("strided_rows", "cu_seqlens")])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_non_contiguous_hidden(layout, pooling, dtype, grad_fill):
    inputs = make_inputs(K=3, dtype=dtype, pooling=pooling, layout=layout, seed=5)
    hidden = inputs[1](inputs[0])
    assert not hidden.is_contiguous() and hidden.stride(-1) == 1
    compare(*inputs, what=layout)


@pytest.mark.parametrize("pooling", ["mask_right", "cu_seqlens"])
@pytest.mark.parametrize("K", [1, 3])
def test_two_rows_no_bias(K, pooling, grad_fill):
    compare(*make_inputs(N=2, T=5, K=K, bias=False, pooling=pooling, seed=7), what="N=2")


@pytest.mark.parametrize("pooling", ["mask_right", "last_index", "cu_seqlens"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_pool_score_matches_reference(dtype, K, pooling):
    leaves, hidden_of, kwargs = make_inputs(N=5, K=K, dtype=dtype, pooling=pooling, layout="contiguous", seed=9)

    def fn(backend):
        return lambda h, w, b, **kw: (prefkernels.pool_score(h, w, b, backend=backend, **kw),) * 2

    got = run("triton", leaves, hidden_of, kwargs, fn=fn("triton"))
    want = run("reference", leaves, hidden_of, kwargs, fn=fn("reference"))
    for name in want:
        close(got[name], want[name], name)


@pytest.mark.parametrize("pairs", ["default", "explicit"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("max_block_n", [2, 4, 32])
def test_small_tiles_and_row_blocks(monkeypatch, max_block_n, K, pairs, grad_fill):
    """Several D tiles (odd tail) and mask tiles; in the backward, several row blocks (2: three
    blocks whose partials the last program of each D tile sums, two at a time: a full chunk, then
    a partial one; 4: a partial last block) or one block (32) that writes grad_weight directly."""
    monkeypatch.setattr(triton_bt, "_MAX_BLOCK_D", 16)
    monkeypatch.setattr(triton_bt, "_MAX_BLOCK_T", 4)
    monkeypatch.setattr(triton_bt, "_MAX_BLOCK_N", max_block_n)
    monkeypatch.setattr(triton_bt, "_BWD_TILE", 16 * max_block_n)
    monkeypatch.setattr(triton_bt, "_SUM_ROW_BLOCKS", 2)
    for wdtype in (F32, BF16):
        inputs = make_inputs(N=6, T=7, K=K, dtype=BF16, wdtype=wdtype, pairs=pairs, seed=11)
        compare(*inputs, what=f"tiles block_n={max_block_n} {wdtype}")


# ------------------------------------------------------------------------------------------
# Determinism and numerics.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairs", ["default", "explicit"])
def test_backward_is_deterministic(monkeypatch, pairs, grad_fill):
    monkeypatch.setattr(triton_bt, "_MAX_BLOCK_N", 2)  # partial sums over several row blocks
    inputs = make_inputs(N=6, K=3, dtype=BF16, wdtype=BF16, pairs=pairs, seed=13)
    first = run("triton", *inputs)
    second = run("triton", *inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("fill_programs", ["one", "several"])
@pytest.mark.parametrize("row_blocks", ["one", "several"])
@pytest.mark.parametrize("pairs", ["default", "explicit"])
@pytest.mark.parametrize("dtype,wdtype", [(BF16, F32), (F16, F16), (F32, F32)], ids=lambda d: str(d)[6:])
def test_fill_kernel_grad_hidden_equals_memset_path_bit_for_bit(monkeypatch, dtype, wdtype, pairs, row_blocks,
                                                                 fill_programs):
    """pool_backward both ways (PREFKERNELS_GRAD_FILL memset, kernel) on the same inputs, with a
    skipped row (pooled_pos -1), one past the end (T) and one coefficient NaN on a skipped row,
    for each kind of loss gradient: grad_hidden has the same bits; the weight and bias gradients
    too with one row block under the interpreter, else they agree to rounding (the kernel sums all
    rows in one program, the memset path per-block partials)."""
    if row_blocks == "several":
        monkeypatch.setattr(triton_bt, "_MAX_BLOCK_N", 2)
    if fill_programs == "several":
        monkeypatch.setattr(triton_bt, "_FILL_BYTES", 1)
        monkeypatch.setattr(triton_bt, "_FILL_TILE", 64)
    g = torch.Generator().manual_seed(41)
    N, T, D, K = 6, 7, 37, 3
    hidden = torch.randn(N, T, D, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(K, D, generator=g) / 6).to(wdtype).to(DEVICE)
    pooled_pos = torch.randint(0, T, (N,), generator=g)
    pooled_pos[1], pooled_pos[4] = -1, T
    if pairs == "explicit":
        from prefkernels.reference import rows_csr
        chosen, rejected = torch.tensor([0, 2, 2, 5, 3, 1, 0]), torch.tensor([3, 5, 0, 2, 4, 2, 5])
        row_ptr, row_entry = (t.to(DEVICE) for t in rows_csr(chosen, rejected, N))
        grad_coef = torch.randn(2 * chosen.shape[0], K, generator=g)
    else:
        row_ptr = row_entry = None
        grad_coef = torch.randn(N, K, generator=g)
        grad_coef[1] = float("nan")
    pairs_n = grad_coef.shape[0] // 2
    for grad_loss, scale in [(None, 1.0), (torch.rand((), generator=g) + 0.5, 0.25),
                             (torch.rand(pairs_n, K, generator=g) + 0.5, 0.5)]:
        if grad_loss is not None and pairs == "default":
            grad_loss = grad_loss if grad_loss.dim() == 0 else None
        args = (grad_coef.to(DEVICE), None if grad_loss is None else grad_loss.to(DEVICE), scale, row_ptr, row_entry,
                hidden, weight, pooled_pos.to(DEVICE), True)
        got = {}
        for fill in ("memset", "kernel"):
            monkeypatch.setenv("PREFKERNELS_GRAD_FILL", fill)
            got[fill] = triton_bt.pool_backward(*args)
        (hidden_m, weight_m, bias_m), (hidden_k, weight_k, bias_k) = got["memset"], got["kernel"]
        assert torch.equal(hidden_k, hidden_m), f"grad_hidden with grad_loss {grad_loss}"
        assert hidden_k.abs().sum() > 0 and not hidden_k.isnan().any()
        if row_blocks == "one" and INTERPRETED:  # compiled, the two launches' warp counts may sum in other orders
            assert torch.equal(weight_k, weight_m) and torch.equal(bias_k, bias_m)
        else:
            close(weight_k, weight_m, "grad_weight")
            close(bias_k, bias_m, "grad_bias")


@pytest.mark.parametrize("fill", ["memset", "kernel"])
def test_unpooled_grad_rows_stay_zero_with_a_nan_weight(monkeypatch, fill):
    """A NaN in the head's weight reaches the pooled rows' gradients only: the fill kernel's
    unpooled rows are zeros, not 0 * NaN, as the memset path leaves them."""
    monkeypatch.setenv("PREFKERNELS_GRAD_FILL", fill)
    g = torch.Generator().manual_seed(45)
    hidden = torch.randn(4, 5, 37, generator=g).to(BF16).to(DEVICE)
    weight = torch.randn(2, 37, generator=g).to(DEVICE)
    weight[1, 6] = float("nan")
    pooled_pos = torch.tensor([4, 0, 2, 2], device=DEVICE)
    grad_hidden, _, _ = triton_bt.pool_backward(torch.rand(4, 2, generator=g).to(DEVICE) + 0.5, None, 1.0, None,
                                                None, hidden, weight, pooled_pos, True)
    pooled = torch.zeros(4, 5, dtype=torch.bool, device=DEVICE)
    pooled[torch.arange(4, device=DEVICE), pooled_pos] = True
    assert (grad_hidden[~pooled] == 0).all()
    assert grad_hidden[pooled][:, 6].isnan().all() and not grad_hidden[pooled][:, :6].isnan().any()


@pytest.mark.parametrize("N,K,T,fills", [(32, 4, 2048, True), (32, 4, 2047, False), (33, 4, 3972, True),
                                         (33, 4, 3971, False), (32, 5, 4096, True), (32, 5, 4095, False),
                                         (8, 1, 3, False), (32, 1, 43690, True), (32, 1, 43691, False)])
def test_grad_fill_auto_threshold(N, K, T, fills):
    """``auto`` takes the fill kernel from 12 MiB of grad_hidden per pass of 32 rows x 4 heads
    (bf16, D = 96: 6 KiB per row of 32 positions), as the CUDA backend's plan, up to 256 MiB
    (43690 positions of 32 rows); ``kernel`` takes it for any padded [N, T, D] hidden, ``memset``
    never, and packed or frozen hidden never."""
    hidden = torch.empty(N, T, 96, dtype=BF16, device="meta")
    assert bool(triton_bt._fill_rows(hidden, True, N, K, "auto")) == fills
    assert triton_bt._fill_rows(hidden, True, N, K, "kernel") == 256  # 64 KiB of 192-byte rows: 342, capped
    wide = torch.empty(N, T, 2048, dtype=BF16, device="meta")
    assert triton_bt._fill_rows(wide, True, N, K, "kernel") == 16  # 64 KiB of 4 KiB rows
    assert triton_bt._fill_rows(hidden, True, N, K, "memset") == 0
    assert triton_bt._fill_rows(hidden, False, N, K, "kernel") == 0
    assert triton_bt._fill_rows(hidden.view(N * T, 96), True, N, K, "kernel") == 0


def test_grad_fill_env_value_is_checked(monkeypatch):
    leaves, hidden_of, kwargs = make_inputs(N=4, K=1, seed=43)
    monkeypatch.setenv("PREFKERNELS_GRAD_FILL", "sometimes")
    loss, _ = prefkernels.fused_bt_loss(leaves["hidden"].requires_grad_(), leaves["weight"], leaves["bias"],
                                        backend="triton", **kwargs)
    with pytest.raises(RuntimeError, match="PREFKERNELS_GRAD_FILL: expected auto, kernel or memset, got 'sometimes'"):
        loss.backward()


@pytest.mark.parametrize("pairs", ["default", "odd", "explicit"])
def test_forward_and_backward_are_one_launch_each(monkeypatch, pairs, grad_fill):
    """The issue's launch structure: the forward is ONE kernel launch for every pairing (default,
    default with an odd row count, explicit); the backward is ONE launch, after its one zero fill
    (memset path: several row blocks and D tiles, tickets in the grad buffer's tail, last program
    sums) or with none (the fill kernel)."""
    monkeypatch.setattr(triton_bt, "_MAX_BLOCK_N", 2)
    monkeypatch.setattr(triton_bt, "_BWD_TILE", 32)
    zero_fills = []
    zeroed_grad_buffer = triton_bt._zeroed_grad_buffer
    monkeypatch.setattr(triton_bt, "_zeroed_grad_buffer", lambda *a: zero_fills.append(a) or zeroed_grad_buffer(*a))
    launches = []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def counted(*args, **kwargs):
                launches.append(self.name)
                return launch(*args, **kwargs)
            return counted

    for name in dir(triton_bt):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_bt, name, Counted(name, getattr(triton_bt, name)))
    N = 7 if pairs == "odd" else 6
    leaves, hidden_of, kwargs = make_inputs(N=N, T=5, D=37, K=2, pairs="explicit" if pairs == "explicit" else "default",
                                            seed=23)
    hidden = hidden_of(leaves).detach()
    loss, rewards, pair_grad, pooled_pos = triton_bt.bt_forward(
        hidden, leaves["weight"], leaves["bias"], kwargs["attention_mask"], None, None,
        kwargs.get("chosen_index"), kwargs.get("rejected_index"), None, 0.0, 0.0, 0)
    assert len(launches) == 1, launches
    launches.clear()
    coef = torch.rand(N, 2, device=DEVICE) + 0.5
    grad_hidden, grad_weight, grad_bias = triton_bt.pool_backward(coef, None, 1.0, None, None, hidden, leaves["weight"],
                                                                  pooled_pos, True)
    if grad_fill == "kernel":
        assert launches == ["_pool_backward_fill_kernel"] and zero_fills == []
    else:
        assert launches == ["_pool_backward_kernel"] and len(zero_fills) == 1
    valid = pooled_pos >= 0
    at = (torch.arange(N, device=DEVICE)[valid], pooled_pos[valid])
    close(grad_weight, coef[valid].t() @ hidden[at].float(), "grad_weight")
    close(grad_bias, coef[valid].sum(0), "grad_bias")
    assert grad_hidden.shape == hidden.shape and grad_hidden.is_contiguous()
    want_hidden = torch.zeros(hidden.shape, device=DEVICE)
    want_hidden[at] = coef[valid] @ leaves["weight"].float()
    close(grad_hidden, want_hidden, "grad_hidden")


def test_nan_in_pooled_hidden_propagates():
    leaves, hidden_of, kwargs = make_inputs(N=4, K=3, pooling="last_index", seed=15)
    pos = kwargs["last_index"]
    leaves["hidden"][0, pos[0], 3] = float("nan")
    out = run("triton", leaves, hidden_of, {**kwargs, "reduction": "none"}, grads=False)
    assert out["rewards"][0].isnan().all() and not out["rewards"][1:].isnan().any()
    assert out["loss"][0].isnan().all() and not out["loss"][1].isnan().any()
    assert prefkernels.fused_bt_loss(hidden_of(leaves), leaves["weight"], leaves["bias"], backend="triton",
                                     **kwargs)[0].isnan()


def test_nan_in_unpooled_position_is_ignored():
    leaves, hidden_of, kwargs = make_inputs(N=4, T=7, K=3, pooling="last_index", seed=17)
    kwargs["last_index"] = torch.full_like(kwargs["last_index"], 3)
    leaves["hidden"][:, 5] = float("nan")
    out = compare(leaves, hidden_of, kwargs, what="nan padding")
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["grad_weight"]).all()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_huge_reward_gaps_stay_finite(label_smoothing):
    leaves, hidden_of, kwargs = make_inputs(N=4, K=3, pooling="mask_right", seed=19)
    rewards = reference.pool_score(hidden_of(leaves), leaves["weight"], leaves["bias"], **kwargs)
    leaves["weight"] = leaves["weight"] * (1e4 / rewards.abs().min())
    kwargs.update(label_smoothing=label_smoothing, reduction="sum")
    out = compare(leaves, hidden_of, kwargs, what="gap 1e4")
    gaps = out["rewards"][:2] - out["rewards"][2:]
    assert gaps.abs().max() > 1e4
    for name, value in out.items():
        assert torch.isfinite(value).all(), name


# ------------------------------------------------------------------------------------------
# Op-level semantics (invalid rows/pairs, CSR, need_grad_hidden) vs a Python model of
# csrc/cpu/bt_cpu.cpp, and vs the native CPU ops themselves when prefkernels._C is built.
# ------------------------------------------------------------------------------------------
def model_pool_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens):
    positions = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    if attention_mask is not None:
        T = attention_mask.shape[1]
        pos = torch.where(attention_mask != 0, torch.arange(T, device=hidden.device), -1).amax(1)
    elif last_index is not None:
        pos = last_index.clone()
    else:
        pos = cu_seqlens[1:] - 1
    valid = (pos >= 0) & (pos < positions)
    pos = torch.where(valid, pos, -1)
    safe = pos.clamp(min=0)
    rows = hidden[safe] if hidden.dim() == 2 else hidden[torch.arange(hidden.shape[0], device=hidden.device), safe]
    rewards = rows.double() @ weight.double().t()
    if bias is not None:
        rewards = rewards + bias.double()
    rewards[~valid] = float("nan")
    return rewards.float(), pos


def model_bt_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens, chosen, rejected, margin,
                     label_smoothing, center_coef, reduction):
    rewards, pos = model_pool_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    N = rewards.shape[0]
    if chosen is None:
        chosen = torch.arange(N // 2, device=hidden.device)
        rejected = chosen + N // 2
    valid = ((chosen >= 0) & (chosen < N) & (rejected >= 0) & (rejected < N))[:, None]
    r = rewards.double()
    rc, rr = r[chosen.clamp(0, N - 1)], r[rejected.clamp(0, N - 1)]
    m = margin.double()[:, None] if margin is not None else 0.0
    gap, total = rc - rr - m, rc + rr
    eps, c = label_smoothing, center_coef
    loss = (1 - eps) * F.softplus(-gap) + eps * F.softplus(gap) + c * total * total
    d_gap = -(1 - eps) * torch.sigmoid(-gap) + eps * torch.sigmoid(gap)
    gc, gr = d_gap + 2 * c * total, -d_gap + 2 * c * total
    loss = torch.where(valid, loss, float("nan"))
    pair_grad = torch.stack([torch.where(valid, gc, 0.0), torch.where(valid, gr, 0.0)])
    loss = loss.float()
    loss = {0: loss, 1: loss.mean(), 2: loss.sum()}[reduction]
    return loss, rewards, pair_grad.float(), pos


def model_pool_backward(grad_coef, grad_loss, loss_scale, row_ptr, row_entry, hidden, weight, pooled_pos,
                        need_grad_hidden):
    N, K = pooled_pos.shape[0], weight.shape[0]
    if grad_loss is not None:  # entry e of the 2P pair entries: times grad_loss[e mod P] * loss_scale
        P = grad_coef.shape[0] // 2
        grad_coef = grad_coef.double() * (grad_loss.double().expand(P, K).repeat(2, 1) * loss_scale)
    if row_ptr is None:
        coef = grad_coef.double()
    else:
        coef = torch.zeros(N, K, dtype=torch.float64, device=grad_coef.device)
        for n in range(N):
            for j in range(int(row_ptr[n]), int(row_ptr[n + 1])):
                coef[n] += grad_coef[row_entry[j]].double()
    valid = (pooled_pos >= 0)[:, None]
    safe = pooled_pos.clamp(min=0)
    idx = (torch.arange(N, device=hidden.device), safe) if hidden.dim() == 3 else (safe,)
    rows = torch.where(valid, hidden[idx].double(), 0.0)
    coef = torch.where(valid, coef, 0.0)  # skipped rows: even a NaN coefficient contributes nothing
    valid = valid[:, 0]
    grad_weight = (coef.t() @ rows).to(weight.dtype)
    grad_bias = coef.sum(dim=0).float()  # the valid rows' coefficients
    if not need_grad_hidden:
        return hidden.new_empty((0,)), grad_weight, grad_bias
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    g = coef @ weight.double()
    vi = tuple(i[valid] for i in idx)
    grad_hidden[vi] = g[valid]
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


def op_cases():
    g = torch.Generator().manual_seed(21)
    N, T, D, K = 4, 6, 37, 3
    hidden = torch.randn(N, T, D, generator=g)
    weight = torch.randn(K, D, generator=g) / 6
    bias = torch.randn(K, generator=g)
    mask = torch.ones(N, T, dtype=torch.int64)
    mask[1] = 0                                           # row 1: no token -> invalid
    mask[2, 4:] = 0
    packed = torch.randn(9, D, generator=g).to(BF16)  # rows pool -1, 3, 5, 9: rows 0 and 3 invalid
    return {
        "empty_mask_row": (hidden, weight, bias, mask, None, None),
        "bool_mask": (hidden.to(F16), weight.to(F16), bias.to(F16), mask.bool(), None, None),
        "last_index_out_of_range": (hidden, weight, None, None, torch.tensor([-1, 6, 2, 5]), None),
        "cu_seqlens_out_of_range": (packed, weight, bias, None, None, torch.tensor([0, 0, 4, 6, 10])),
        "strided": (hidden[:, ::2], weight, bias, None, torch.tensor([2, 0, 1, 2]), None),
    }


def native_or_none():
    return backends.native_ops()


def check_op(name, op, args):
    """Run triton op ``op`` on DEVICE; compare with the Python model and the native CPU op."""
    model = MODELS[op]
    got = getattr(OPS, op)(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    refs = [("model", model(*args))]
    native = native_or_none()
    if native is not None:  # the native CPU kernels are THE semantic reference
        refs.append(("native", getattr(native, op)(*args)))
    for ref_name, want in refs:
        assert len(got) == len(want)
        for i, (x, y) in enumerate(zip(got, want)):
            assert x.device.type == DEVICE and x.dtype == y.dtype and x.shape == y.shape, (name, op, i)
            rtol, atol = TOL[x.dtype] if x.is_floating_point() else (0, 0)
            torch.testing.assert_close(x.cpu(), y, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"{name} {op}[{i}] vs {ref_name}: {m}")
    return got


MODELS = {"pool_forward": model_pool_forward, "bt_forward": model_bt_forward, "pool_backward": model_pool_backward}


@pytest.mark.parametrize("case", ["empty_mask_row", "bool_mask", "last_index_out_of_range",
                                  "cu_seqlens_out_of_range", "strided"])
def test_op_semantics_invalid_rows(case, grad_fill):
    cases = op_cases()
    hidden, weight, bias, mask, last_index, cu = cases[case]
    rewards, pos = check_op(case, "pool_forward", (hidden, weight, bias, mask, last_index, cu))
    invalid = pos.cpu() < 0
    assert invalid.any() or case in ("bool_mask", "strided")
    assert rewards.cpu()[invalid].isnan().all() and not rewards.cpu()[~invalid].isnan().any()
    # Default pairs, then explicit pairs with out-of-range indices (NaN loss, zero pair_grad).
    N = rewards.shape[0]
    margin = torch.linspace(0.1, 0.7, N // 2)
    for reduction in (0, 1, 2):
        check_op(case, "bt_forward", (hidden, weight, bias, mask, last_index, cu, None, None, margin, 0.1, 0.02,
                                      reduction))
    chosen, rejected = torch.tensor([0, 5, -1, 3, 3]), torch.tensor([2, 1, 0, 0, N])
    loss, _, pair_grad, _ = check_op(case, "bt_forward",
                                     (hidden, weight, bias, mask, last_index, cu, chosen, rejected, None, 0.0, 0.0, 0))
    bad = torch.tensor([False, True, True, False, True])
    assert loss.cpu()[bad].isnan().all() and (pair_grad.cpu()[:, bad] == 0).all()
    # Backward: rows with pooled_pos < 0 are skipped, CSR sums, need_grad_hidden False -> [0].
    g = torch.Generator().manual_seed(23)
    grad_coef = torch.randn(2 * chosen.shape[0], weight.shape[0], generator=g)
    from prefkernels.reference import rows_csr
    row_ptr, row_entry = rows_csr(chosen.clamp(0, N - 1), rejected.clamp(0, N - 1), N)
    dense = torch.randn(N, weight.shape[0], generator=g)
    dense[invalid] = float("nan")
    grad_coef[invalid[torch.cat([chosen, rejected]).clamp(0, N - 1)]] = float("nan")
    loss_grads = [(None, 1.0), (torch.rand(()) + 0.5, 0.25), (torch.rand(chosen.shape[0], weight.shape[0]) + 0.5, 0.5)]
    for need in (True, False):
        for coef, rp, re, (grad_loss, scale) in [(dense, None, None, loss_grads[0])] + [
                (grad_coef, row_ptr, row_entry, loss_grad) for loss_grad in loss_grads]:
            gh, gw, gb = check_op(case, "pool_backward", (coef, grad_loss, scale, rp, re, hidden, weight, pos.cpu(),
                                                          need))
            assert gw.dtype == weight.dtype and gw.shape == weight.shape
            assert gb.dtype == torch.float32 and gb.shape == (weight.shape[0],) and not gb.isnan().any()
            if not need:
                assert gh.shape == (0,) and gh.dtype == hidden.dtype
            else:
                assert gh.is_contiguous() and gh.shape == hidden.shape
                if hidden.dim() == 3:
                    assert (gh.cpu()[invalid] == 0).all()


def test_op_default_pairs_odd_rows():
    """Direct op call with default pairs and odd N: P = N // 2, the last row is scored only."""
    g = torch.Generator().manual_seed(29)
    hidden, weight = torch.randn(5, 6, 37, generator=g), torch.randn(2, 37, generator=g) / 6
    loss, rewards, _, pos = check_op("odd", "bt_forward", (hidden, weight, None, None, torch.tensor([5, 0, 3, 2, 4]),
                                                           None, None, None, None, 0.0, 0.0, 0))
    assert loss.shape == (2, 2) and rewards.shape == (5, 2) and pos.tolist() == [5, 0, 3, 2, 4]


# ------------------------------------------------------------------------------------------
# torch.library.opcheck and graph capture.
# ------------------------------------------------------------------------------------------
def test_opcheck(grad_fill):
    cases = op_cases()
    hidden, weight, bias, mask, _, _ = cases["strided"]
    hidden, weight, bias = (t.to(DEVICE) for t in (hidden, weight, bias))
    last_index = torch.tensor([2, 0, 1, 2], device=DEVICE)
    mask = torch.ones(4, hidden.shape[1], dtype=torch.bool, device=DEVICE)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    b = bias.detach().requires_grad_()
    chosen, rejected = torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([2, 3, 0], device=DEVICE)
    margin = torch.tensor([0.5, 0.0, 1.0], device=DEVICE)
    torch.library.opcheck(OPS.op("bt_forward"), (h, w, b, None, last_index, None, None, None, None, 0.1, 0.01, 1))
    torch.library.opcheck(OPS.op("bt_forward"), (h, w, None, mask, None, None, chosen, rejected, margin, 0.0, 0.0, 0))
    torch.library.opcheck(OPS.op("pool_forward"), (h, w, b, mask, None, None))
    pos = torch.tensor([2, 0, -1, 2], device=DEVICE)
    coef = torch.randn(4, 3, device=DEVICE)
    torch.library.opcheck(OPS.op("pool_backward"), (coef, None, 1.0, None, None, hidden, weight, pos, True))
    torch.library.opcheck(OPS.op("pool_backward"), (coef, torch.rand((), device=DEVICE), 0.5, None, None, hidden,
                                                    weight, pos, False))
    from prefkernels.reference import rows_csr
    row_ptr, row_entry = rows_csr(chosen, rejected, 4)
    torch.library.opcheck(OPS.op("pool_backward"), (torch.randn(6, 3, device=DEVICE), torch.rand(3, 3, device=DEVICE),
                                                    1.0, row_ptr, row_entry, hidden, weight, pos, True))


def test_schemas_are_the_native_ops():
    """The Triton ops take and return what csrc/ops.cpp's ops do, so they share one fake kernel and
    one autograd formula."""
    native = native_or_none()
    if native is None:
        pytest.skip("prefkernels._C is not built")
    for op in triton_bt.SCHEMAS:
        triton_schema = str(OPS.op(op)._schema)
        assert triton_schema.startswith(f"prefkernels::triton_{op}(")
        assert triton_schema.replace("::triton_", "::", 1) == str(native.op(op)._schema)


def test_dynamo_fullgraph_capture():
    """The custom ops are opaque to torch.compile: Dynamo captures the whole call in one graph."""
    leaves, hidden_of, kwargs = make_inputs(N=4, K=1, dtype=BF16, pooling="mask_right", seed=25)

    def fn(h, w, b, **kw):
        return prefkernels.fused_bt_loss(h, w, b, backend="triton", **kw)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    got = run("triton", leaves, hidden_of, kwargs, fn=compiled)
    want = run("triton", leaves, hidden_of, kwargs)
    for name in want:  # the same kernels; only the surrounding mean may be fused differently
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------
# Bad inputs raise the same errors as the other backends (validation is shared).
# ------------------------------------------------------------------------------------------
def _bad_inputs():
    leaves, hidden_of, kwargs = make_inputs(N=4, K=1, pooling="mask_right", seed=27)
    h, w, b = hidden_of(leaves), leaves["weight"], leaves["bias"]
    empty_row = kwargs["attention_mask"].clone()
    empty_row[2] = False
    dev = h.device
    return {
        "empty_mask_row": ((h, w, b), dict(attention_mask=empty_row)),
        "last_index_range": ((h, w, b), dict(last_index=torch.tensor([0, 1, 7, 2], device=dev))),
        "two_pooling_specs": ((h, w, b), dict(attention_mask=kwargs["attention_mask"],
                                              last_index=torch.tensor([0, 1, 2, 3], device=dev))),
        "weight_dtype": ((h.to(BF16), w.to(F16), None), kwargs),
        "bias_dtype": ((h, w, b.double()), kwargs),
        "hidden_dtype": ((h.double(), w, b), kwargs),
        "weight_shape": ((h, w[:, :5], b), kwargs),
        "chosen_range": ((h, w, b), dict(kwargs, chosen_index=torch.tensor([0, 4], device=dev),
                                         rejected_index=torch.tensor([1, 2], device=dev))),
        "only_chosen": ((h, w, b), dict(kwargs, chosen_index=torch.tensor([0, 1], device=dev))),
        "margin_shape": ((h, w, b), dict(kwargs, margin=torch.zeros(3, device=dev))),
        "label_smoothing": ((h, w, b), dict(kwargs, label_smoothing=0.7)),
        "reduction": ((h, w, b), dict(kwargs, reduction="avg")),
        "odd_rows": ((h[:3], w, b), dict(attention_mask=kwargs["attention_mask"][:3])),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_inputs_raise_like_reference(name):
    args, kwargs = _bad_inputs()[name]
    with pytest.raises((ValueError, TypeError)) as expected:
        prefkernels.fused_bt_loss(*args, backend="reference", **kwargs)
    with pytest.raises(expected.type) as got:
        prefkernels.fused_bt_loss(*args, backend="triton", **kwargs)
    assert str(got.value) == str(expected.value)
    if native_or_none() is not None and DEVICE == "cpu":
        with pytest.raises(expected.type) as native:
            prefkernels.fused_bt_loss(*args, backend="native", **kwargs)
        assert str(native.value) == str(expected.value)


# ------------------------------------------------------------------------------------------
# CUDA at realistic sizes (skipped without a GPU).
# ------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (not interpreted)")
BIG_TOL = {F32: (1e-4, 1e-4), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1e-2)}


def _compare_big(inputs, what, grads=True):
    got = run("triton", *inputs, grads=grads)
    want = run("reference", *inputs, grads=grads)
    for name in want:
        rtol, atol = BIG_TOL[want[name].dtype]
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what} {name}: {m}")
    return got


@gpu
@needs_cuda
@pytest.mark.parametrize("K,wdtype,pooling,pairs", [(1, F32, "mask_left", "default"),
                                                    (3, BF16, "mask_right", "explicit"),
                                                    (1, F32, "cu_seqlens", "default"),
                                                    (2, F32, "last_index", "explicit")])
def test_cuda_large_matches_reference(K, wdtype, pooling, pairs):
    inputs = make_inputs(N=16, T=512, D=4096, K=K, dtype=BF16, wdtype=wdtype, pooling=pooling, pairs=pairs,
                         margin=True, seed=31, device="cuda")
    _compare_big(inputs, f"cuda {pooling} {pairs} K={K}")


@gpu
@needs_cuda
def test_cuda_large_strided_and_many_rows():
    """hidden[:, ::2] and enough rows that the backward groups rows + sums partials."""
    inputs = make_inputs(N=1024, T=16, D=1031, K=3, dtype=BF16, pooling="mask_right", layout="strided_t",
                         seed=33, device="cuda")
    _compare_big(inputs, "cuda strided many rows")


@gpu
@needs_cuda
@pytest.mark.parametrize("N,T", [(16, 512), (1024, 32)])
def test_cuda_backward_deterministic(N, T):
    inputs = make_inputs(N=N, T=T, D=4096, K=1, dtype=BF16, pooling="mask_left", pairs="explicit",
                         seed=35, device="cuda")
    first = run("triton", *inputs)
    for _ in range(2):
        again = run("triton", *inputs)
        for name in first:
            assert torch.equal(first[name], again[name]), name


@gpu
@needs_cuda
def test_cuda_matches_native_cuda():
    if not backends.native_has_cuda():
        pytest.skip("prefkernels._C built without CUDA kernels")
    inputs = make_inputs(N=16, T=512, D=4096, K=3, dtype=BF16, pooling="mask_left", pairs="explicit",
                         margin=True, seed=37, device="cuda")
    got = run("triton", *inputs)
    want = run("native", *inputs)
    for name in want:
        rtol, atol = BIG_TOL[want[name].dtype]
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@gpu
@needs_cuda
def test_cuda_compile_fullgraph_equals_eager():
    inputs = make_inputs(N=16, T=512, D=4096, K=1, dtype=BF16, pooling="mask_left", margin=True, seed=39,
                         device="cuda")

    def fn(h, w, b, **kw):
        loss, rewards = prefkernels.fused_bt_loss(h, w, b, backend="triton", **kw)
        return loss * 2.0, rewards

    compiled = torch.compile(fn, fullgraph=True)
    got = run("triton", *inputs, fn=compiled)
    want = run("triton", *inputs, fn=fn)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
