"""Triton backend: last-token pooling + K-head reward + Bradley-Terry loss, fused.

Read top-down: scalar math and per-row helpers (``@triton.jit`` functions), kernels, Python
launchers, then the three ops ``prefkernels::triton_{bt_forward,pool_forward,pool_backward}``
with the schemas of csrc/ops.cpp and the semantics of csrc/cpu/bt_cpu.cpp (the reference).

- Forward, default pairs: ONE launch, one program per pair: it pools the chosen row p and the
  rejected row p + P, computes the K rewards of both and the pair's loss and gradient
  coefficients. Explicit pairs: one program per row (rewards, pooled_pos), then one small
  per-pair kernel. ``pool_forward``: one program per row.
- Backward: a zero-filled grad buffer (cleared as 4-byte words, ``_zeros_at_word_speed``), then
  ONE launch over (row block of up to 32 rows, D tile), each program one [rows, D tile] tile: it
  scatters the pooled rows' gradient and writes its row block's partial weight and bias
  gradients (fp32) to a scratch [row_blocks, K*D + K] buffer, then a fixed-order second-stage
  sum of the partials into grad_weight (weight's dtype) and grad_bias. With a single row block
  (N <= 32) the kernel writes both directly and there is no second launch. No float atomics
  anywhere: two runs are bitwise equal. The CSR sums of explicit pairs run in row_entry order,
  as the CPU op.
- Hidden is addressed as ``n * stride_n + pos * stride_t + d`` with int64 offsets; packed
  [total, D] hidden (``cu_seqlens``) pools row ``cu[n+1] - 1`` with ``stride_n = 0``.

The ops are registered with ``torch.library.custom_op`` rather than ``triton_op``/``wrap_triton``
because custom_op behaves the same on torch 2.6 through 2.13, keeps each op opaque to
torch.compile (Inductor never re-traces our Python launchers and their block-size heuristics),
runs unchanged on CPU tensors under TRITON_INTERPRET=1, and lets the backend share the fake and
autograd registrations of ``prefkernels.autograd`` with the native ops.

Fake kernels and autograd are registered by ``prefkernels.backends.triton_ops()``, not here.
"""
import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from prefkernels.backends import OpSet

POOL_MASK, POOL_LAST_INDEX, POOL_CU_SEQLENS = 0, 1, 2  # PoolMode of csrc/bt_math.h


# ---------------------------------------------------------------------------------------------
# Scalar math (csrc/bt_math.h): stable softplus/sigmoid that propagate NaN, per-pair BT loss.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x without libdevice: log(u) * x / (u - 1) with u = 1 + x.
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def _softplus(x):
    return tl.where(x > 0.0, x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _bt_pair(r_chosen, r_rejected, margin, label_smoothing, center_coef):
    """(loss, d loss/d r_chosen, d loss/d r_rejected), as bt_pair_loss in csrc/bt_math.h."""
    gap = r_chosen - r_rejected - margin
    total = r_chosen + r_rejected
    # zero-weight terms are left out (0 * inf would be NaN for an infinite reward)
    loss = ((1.0 - label_smoothing) * _softplus(-gap)
            + tl.where(label_smoothing > 0.0, label_smoothing * _softplus(gap), 0.0)
            + tl.where(center_coef > 0.0, center_coef * total * total, 0.0))
    d_gap = -(1.0 - label_smoothing) * _sigmoid(-gap) + label_smoothing * _sigmoid(gap)
    d_center = tl.where(center_coef > 0.0, 2.0 * center_coef * total, 0.0)
    return loss, d_gap + d_center, -d_gap + d_center


# ---------------------------------------------------------------------------------------------
# Per-row helpers: the pooled position and the K rewards of one row.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pooled_position(n, mask_ptr, index_ptr, positions, POOL_MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """(pos int64, valid) of row n: pos = -1 when the spec gives no position in [0, positions)."""
    if POOL_MODE == 0:
        # Last nonzero of the mask row: max over the positions where mask != 0, in BLOCK_T tiles.
        offs_t = tl.arange(0, BLOCK_T)
        best = tl.full([BLOCK_T], -1, tl.int32)
        row = mask_ptr + n * positions
        for t0 in range(0, positions, BLOCK_T):
            t = t0 + offs_t
            m = tl.load(row + t, mask=t < positions, other=0)
            best = tl.maximum(best, tl.where(m != 0, t, -1))
        pos = tl.max(best, axis=0).to(tl.int64)
    elif POOL_MODE == 1:
        pos = tl.load(index_ptr + n).to(tl.int64)
    else:  # the last row of sequence n; none when the sequence is empty
        end = tl.load(index_ptr + n + 1).to(tl.int64)
        pos = tl.where(end > tl.load(index_ptr + n).to(tl.int64), end - 1, -1)
    valid = (pos >= 0) & (pos < positions)
    pos = tl.where(valid, pos, -1)
    return pos, valid


@triton.jit
def _row_rewards(n, pos, valid, hidden_ptr, weight_ptr, bias_ptr, stride_n, stride_t, D, K,
                 HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """rewards[k] = <hidden[n, pos, :], weight[k, :]> + bias[k] in fp32 ([BLOCK_K]); NaN if invalid."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < K
    row = hidden_ptr + n * stride_n + tl.maximum(pos, 0) * stride_t
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    # Masks are built by comparing a block with a scalar bound (an invalid row reads nothing):
    # combining a block mask with a scalar bool breaks the Triton interpreter.
    d_limit = tl.where(valid, D, 0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        h = tl.load(row + d, mask=d < d_limit, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs_k[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    return tl.where(valid, acc, float("nan"))


# ---------------------------------------------------------------------------------------------
# Forward kernels.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bt_default_pairs_kernel(
    hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, margin_ptr,
    loss_ptr, rewards_ptr, pair_grad_ptr, pooled_pos_ptr,
    P, positions, D, K, stride_n, stride_t, label_smoothing, center_coef,
    POOL_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MARGIN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per pair p: rows p (chosen) and p + P (rejected), rewards, loss, pair_grad."""
    p = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    c = p
    r = p + P
    pos_c, valid_c = _pooled_position(c, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
    pos_r, valid_r = _pooled_position(r, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
    r_c = _row_rewards(c, pos_c, valid_c, hidden_ptr, weight_ptr, bias_ptr, stride_n, stride_t, D, K,
                       HAS_BIAS, BLOCK_K, BLOCK_D)
    r_r = _row_rewards(r, pos_r, valid_r, hidden_ptr, weight_ptr, bias_ptr, stride_n, stride_t, D, K,
                       HAS_BIAS, BLOCK_K, BLOCK_D)
    tl.store(rewards_ptr + c * K + offs_k, r_c, mask=k_mask)
    tl.store(rewards_ptr + r * K + offs_k, r_r, mask=k_mask)
    tl.store(pooled_pos_ptr + c, pos_c)
    tl.store(pooled_pos_ptr + r, pos_r)
    if HAS_MARGIN:
        margin = tl.load(margin_ptr + p)
    else:
        margin = 0.0
    loss, g_c, g_r = _bt_pair(r_c, r_r, margin, label_smoothing, center_coef)
    out = p * K + offs_k
    tl.store(loss_ptr + out, loss, mask=k_mask)
    tl.store(pair_grad_ptr + out, g_c, mask=k_mask)
    tl.store(pair_grad_ptr + P * K + out, g_r, mask=k_mask)


@triton.jit
def _pool_rows_kernel(
    hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, rewards_ptr, pooled_pos_ptr,
    positions, D, K, stride_n, stride_t,
    POOL_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row n: rewards[n, :] and pooled_pos[n]."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    pos, valid = _pooled_position(n, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
    rewards = _row_rewards(n, pos, valid, hidden_ptr, weight_ptr, bias_ptr, stride_n, stride_t, D, K,
                           HAS_BIAS, BLOCK_K, BLOCK_D)
    tl.store(rewards_ptr + n * K + offs_k, rewards, mask=offs_k < K)
    tl.store(pooled_pos_ptr + n, pos)


@triton.jit
def _bt_pairs_kernel(
    rewards_ptr, chosen_ptr, rejected_ptr, margin_ptr, loss_ptr, pair_grad_ptr,
    P, N, K, label_smoothing, center_coef,
    DEFAULT_PAIRS: tl.constexpr, HAS_MARGIN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_P pairs per program from rewards [N, K]: loss, pair_grad; NaN/0 for bad indices."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    p_mask = offs_p < P
    k_mask = offs_k < K
    if DEFAULT_PAIRS:
        c = offs_p
        r = offs_p + P
    else:
        c = tl.load(chosen_ptr + offs_p, mask=p_mask, other=0)
        r = tl.load(rejected_ptr + offs_p, mask=p_mask, other=0)
    valid = (c >= 0) & (c < N) & (r >= 0) & (r < N)
    if HAS_MARGIN:
        margin = tl.load(margin_ptr + offs_p, mask=p_mask, other=0.0)
    else:
        margin = tl.zeros([BLOCK_P], dtype=tl.float32)
    load_mask = (p_mask & valid)[:, None] & k_mask[None, :]
    r_c = tl.load(rewards_ptr + c[:, None] * K + offs_k[None, :], mask=load_mask, other=0.0)
    r_r = tl.load(rewards_ptr + r[:, None] * K + offs_k[None, :], mask=load_mask, other=0.0)
    loss, g_c, g_r = _bt_pair(r_c, r_r, margin[:, None], label_smoothing, center_coef)
    ok = valid[:, None]
    loss = tl.where(ok, loss, float("nan"))
    g_c = tl.where(ok, g_c, 0.0)
    g_r = tl.where(ok, g_r, 0.0)
    out = offs_p[:, None] * K + offs_k[None, :]
    store_mask = p_mask[:, None] & k_mask[None, :]
    tl.store(loss_ptr + out, loss, mask=store_mask)
    tl.store(pair_grad_ptr + out, g_c, mask=store_mask)
    tl.store(pair_grad_ptr + P * K + out, g_r, mask=store_mask)


# ---------------------------------------------------------------------------------------------
# Backward kernels.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pool_backward_kernel(
    grad_coef_ptr, row_ptr_ptr, row_entry_ptr, hidden_ptr, weight_ptr, pooled_pos_ptr,
    grad_hidden_ptr, partial_ptr, bias_partial_ptr,
    N, D, K, positions, coef_rows, entries, stride_n, stride_t, grad_stride_n, partial_stride,
    HAS_CSR: tl.constexpr, NEED_GRAD_HIDDEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, j): rows [b*BLOCK_N, (b+1)*BLOCK_N) x D tile j, as one [BLOCK_N, BLOCK_D] tile.

    coef[n, :] = grad_coef[n, :], or the sum of the row's CSR entries in order (as the CPU op);
    grad_hidden[n, pos_n, d] = sum_k coef[n, k] * weight[k, d] for rows with pos_n in [0, positions);
    partial[b, k, d] = sum over the block's such rows of coef[n, k] * hidden[n, pos_n, d], and
    (programs of tile 0) bias_partial[b, k] = sum over them of coef[n, k]; row block b of either
    starts at b * partial_stride. With a single row block ``partial_ptr`` is grad_weight itself
    (cast to its dtype) and ``bias_partial_ptr`` grad_bias. CSR segment bounds and entries outside
    [0, entries) / [0, coef_rows) are skipped, as by the CPU and CUDA ops.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_n = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    k_mask = offs_k < K
    d_mask = offs_d < D
    pos = tl.load(pooled_pos_ptr + offs_n, mask=n_mask, other=-1)
    valid = (pos >= 0) & (pos < positions)
    safe_pos = tl.where(valid, pos, 0)
    if HAS_CSR:
        start = tl.maximum(tl.load(row_ptr_ptr + offs_n, mask=n_mask, other=0), 0)
        end = tl.minimum(tl.load(row_ptr_ptr + offs_n + 1, mask=n_mask, other=0), entries)
        coef = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for j in range(0, tl.max(end - start, axis=0)):
            # [BLOCK_N, BLOCK_K] throughout (the entry index repeated over k): a [BLOCK_N] load here
            # crashes Triton 3.6's layout pass for some BLOCK_N/num_warps.
            in_segment = (start + j < end)[:, None] & k_mask[None, :]
            entry = tl.load(row_entry_ptr + (start + j)[:, None] + 0 * offs_k[None, :], mask=in_segment, other=-1)
            in_range = in_segment & (entry >= 0) & (entry < coef_rows)
            coef += tl.load(grad_coef_ptr + entry * K + offs_k[None, :], mask=in_range, other=0.0)
    else:
        coef = tl.load(grad_coef_ptr + offs_n[:, None] * K + offs_k[None, :],
                       mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    coef = tl.where(valid[:, None], coef, 0.0)  # a skipped row adds nothing, even with a NaN coef
    if pid_d == 0:
        tl.store(bias_partial_ptr + pid_b * partial_stride + offs_k, tl.sum(coef, axis=0), mask=k_mask)
    row_mask = valid[:, None] & d_mask[None, :]
    h = tl.load(hidden_ptr + (offs_n * stride_n + safe_pos * stride_t)[:, None] + offs_d[None, :],
                mask=row_mask, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k in range(0, K):
        coef_k = tl.sum(tl.where(offs_k[None, :] == k, coef, 0.0), axis=1)
        grad_w = tl.sum(coef_k[:, None] * h, axis=0)
        tl.store(partial_ptr + pid_b * partial_stride + k * D + offs_d, grad_w.to(partial_ptr.dtype.element_ty),
                 mask=d_mask)
        if NEED_GRAD_HIDDEN:
            w = tl.load(weight_ptr + k * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            g += coef_k[:, None] * w[None, :]
    if NEED_GRAD_HIDDEN:
        tl.store(grad_hidden_ptr + (offs_n * grad_stride_n + safe_pos * D)[:, None] + offs_d[None, :],
                 g.to(grad_hidden_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _sum_partials_kernel(partial_ptr, weight_out_ptr, bias_out_ptr, num_blocks, numel_weight, numel,
                         BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    """s[i] = sum over b of partial[b, i] ([BLOCK_B, BLOCK] tiles, fixed order) for i < numel; the
    first numel_weight go to weight_out (in its dtype), the rest to bias_out (float32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        tile = tl.load(partial_ptr + b.to(tl.int64)[:, None] * numel + offs[None, :],
                       mask=(b < num_blocks)[:, None] & m[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(weight_out_ptr + offs, acc.to(weight_out_ptr.dtype.element_ty), mask=m & (offs < numel_weight))
    tl.store(bias_out_ptr + (offs - numel_weight), acc, mask=m & (offs >= numel_weight))


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------
_MAX_BLOCK_D = 4096        # forward: a 4096-wide row in one tile (8 warps, 16 elements per thread)
_MAX_TILE = 8192           # forward: BLOCK_K * BLOCK_D register tile budget
_MAX_BLOCK_T = 4096        # forward: mask positions per tile
_MAX_BLOCK_N = 32          # backward: rows per program (one [BLOCK_N, BLOCK_D] tile); tuned on H200
_BWD_TILE = 4096           # backward: BLOCK_N * BLOCK_D
_MAX_BLOCK_B = 64          # second stage: partial rows summed per tile
_SUM_TILE = 4096           # second stage: BLOCK_B * BLOCK


def _new(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Uninitialized output/scratch buffer on ``like``'s device (tests patch it to poison outputs)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _zeros_at_word_speed(like: Tensor) -> Tensor:
    """A contiguous zero tensor shaped like ``like``, cleared as 4-byte words when its size allows:
    zero bits are 0.0 in every float type, and PyTorch's fill runs slower on 2-byte types."""
    out = _new(like.shape, like, like.dtype)
    flat = out.view(-1)
    (flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 else flat).zero_()
    return out


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_kd(K: int, D: int) -> Tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D, max(16, _MAX_TILE // block_k))
    return block_k, block_d


def _warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4


def _layout(hidden: Tensor, cu_seqlens: Optional[Tensor]):
    """(rows, positions, D, stride_n, stride_t) as HiddenLayout in csrc/op_args.h."""
    if hidden.stride(-1) != 1:
        raise RuntimeError("hidden: last dimension must be contiguous")
    if hidden.dim() == 2:
        if cu_seqlens is None:
            raise RuntimeError("hidden: a 2-D (packed) hidden needs cu_seqlens")
        return cu_seqlens.shape[0] - 1, hidden.shape[0], hidden.shape[1], 0, hidden.stride(0)
    if hidden.dim() != 3:
        raise RuntimeError("hidden: expected [N, T, D] or packed [total, D]")
    return hidden.shape[0], hidden.shape[1], hidden.shape[2], hidden.stride(0), hidden.stride(1)


def _check_weight(weight: Tensor, D: int, hidden_dtype: torch.dtype) -> int:
    """K, after the head checks of check_head in csrc/op_args.h."""
    if weight.dim() != 2 or weight.shape[1] != D or not weight.is_contiguous():
        raise RuntimeError("weight: expected contiguous [K, D]")
    if weight.dtype not in (torch.float32, hidden_dtype):
        raise RuntimeError("weight: expected float32 or hidden's dtype")
    return weight.shape[0]


def _pool_args(hidden, weight, bias, attention_mask, last_index, cu_seqlens):
    """Kernel arguments shared by the forward kernels (pointers, mode, sizes, block sizes)."""
    rows, positions, D, stride_n, stride_t = _layout(hidden, cu_seqlens)
    given = [t for t in (attention_mask, last_index, cu_seqlens) if t is not None]
    if len(given) != 1:
        raise RuntimeError("pass exactly one of attention_mask, last_index, cu_seqlens")
    K = _check_weight(weight, D, hidden.dtype)
    if bias is not None and (bias.shape != (K,) or not bias.is_contiguous() or bias.dtype != weight.dtype):
        raise RuntimeError("bias: expected contiguous [K] in weight's dtype")
    mask_ptr = index_ptr = hidden  # placeholders, never read for the other modes
    if attention_mask is not None:
        if attention_mask.shape != (rows, positions) or not attention_mask.is_contiguous():
            raise RuntimeError("attention_mask: expected contiguous [N, T]")
        if attention_mask.dtype not in (torch.bool, torch.int32, torch.int64):
            raise RuntimeError("attention_mask: expected bool, int32 or int64")
        mode = POOL_MASK
        mask_ptr = attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask
    else:
        idx = last_index if last_index is not None else cu_seqlens
        if idx.dtype != torch.int64 or not idx.is_contiguous() or idx.dim() != 1:
            raise RuntimeError("pooling index: expected contiguous int64")
        if idx.shape[0] != rows + (1 if cu_seqlens is not None else 0):
            raise RuntimeError("pooling index: wrong length")
        mode = POOL_LAST_INDEX if last_index is not None else POOL_CU_SEQLENS
        index_ptr = idx
    block_k, block_d = _block_kd(K, D)
    block_t = min(triton.next_power_of_2(positions), _MAX_BLOCK_T) if mode == POOL_MASK else 1
    return dict(rows=rows, positions=positions, D=D, K=K, stride_n=stride_n, stride_t=stride_t, mode=mode,
                mask_ptr=mask_ptr, index_ptr=index_ptr, bias_ptr=bias if bias is not None else weight,
                has_bias=bias is not None, block_t=block_t, block_k=block_k, block_d=block_d)


def _launch_pool_rows(hidden, weight, a, rewards, pooled_pos):
    if a["rows"] == 0:
        return
    _pool_rows_kernel[(a["rows"],)](
        hidden, weight, a["bias_ptr"], a["mask_ptr"], a["index_ptr"], rewards, pooled_pos,
        a["positions"], a["D"], a["K"], a["stride_n"], a["stride_t"],
        POOL_MODE=a["mode"], HAS_BIAS=a["has_bias"],
        BLOCK_T=a["block_t"], BLOCK_K=a["block_k"], BLOCK_D=a["block_d"],
        num_warps=_warps(max(a["block_k"] * a["block_d"], a["block_t"])),
    )


def bt_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens, chosen_index, rejected_index,
               margin, label_smoothing, center_coef):
    a = _pool_args(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    rows, K = a["rows"], a["K"]
    if (chosen_index is None) != (rejected_index is None):
        raise RuntimeError("pass both chosen_index and rejected_index or neither")
    explicit = chosen_index is not None
    if explicit:
        if (chosen_index.dtype != torch.int64 or rejected_index.dtype != torch.int64 or chosen_index.dim() != 1
                or chosen_index.shape != rejected_index.shape or not chosen_index.is_contiguous()
                or not rejected_index.is_contiguous()):
            raise RuntimeError("chosen_index/rejected_index: expected contiguous int64 [P]")
        P = chosen_index.shape[0]
    else:
        P = rows // 2
    if margin is not None and (margin.dtype != torch.float32 or not margin.is_contiguous() or margin.numel() != P):
        raise RuntimeError("margin: expected contiguous float32 [P]")
    loss = _new((P, K), hidden, torch.float32)
    rewards = _new((rows, K), hidden, torch.float32)
    pair_grad = _new((2, P, K), hidden, torch.float32)
    pooled_pos = _new((rows,), hidden, torch.int64)
    margin_ptr = margin if margin is not None else rewards
    with _device(hidden):
        if not explicit and rows % 2 == 0:
            if P > 0:
                _bt_default_pairs_kernel[(P,)](
                    hidden, weight, a["bias_ptr"], a["mask_ptr"], a["index_ptr"], margin_ptr,
                    loss, rewards, pair_grad, pooled_pos,
                    P, a["positions"], a["D"], K, a["stride_n"], a["stride_t"],
                    float(label_smoothing), float(center_coef),
                    POOL_MODE=a["mode"], HAS_BIAS=a["has_bias"], HAS_MARGIN=margin is not None,
                    BLOCK_T=a["block_t"], BLOCK_K=a["block_k"], BLOCK_D=a["block_d"],
                    num_warps=_warps(max(a["block_k"] * a["block_d"], a["block_t"])),
                )
            return loss, rewards, pair_grad, pooled_pos
        _launch_pool_rows(hidden, weight, a, rewards, pooled_pos)
        if P > 0:
            block_k = a["block_k"]
            block_p = max(1, min(triton.next_power_of_2(P), 1024 // block_k))
            _bt_pairs_kernel[(triton.cdiv(P, block_p),)](
                rewards, chosen_index if explicit else rewards, rejected_index if explicit else rewards,
                margin_ptr, loss, pair_grad,
                P, rows, K, float(label_smoothing), float(center_coef),
                DEFAULT_PAIRS=not explicit, HAS_MARGIN=margin is not None,
                BLOCK_P=block_p, BLOCK_K=block_k, num_warps=4,
            )
    return loss, rewards, pair_grad, pooled_pos


def pool_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens):
    a = _pool_args(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    rewards = _new((a["rows"], a["K"]), hidden, torch.float32)
    pooled_pos = _new((a["rows"],), hidden, torch.int64)
    with _device(hidden):
        _launch_pool_rows(hidden, weight, a, rewards, pooled_pos)
    return rewards, pooled_pos


def pool_backward(grad_coef, row_ptr, row_entry, hidden, weight, pooled_pos, need_grad_hidden):
    if hidden.stride(-1) != 1:
        raise RuntimeError("hidden: last dimension must be contiguous")
    if hidden.dim() not in (2, 3):
        raise RuntimeError("hidden: expected [N, T, D] or packed [total, D]")
    D = hidden.shape[-1]
    rows = pooled_pos.shape[0]
    positions = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    stride_n = hidden.stride(0) if hidden.dim() == 3 else 0
    stride_t = hidden.stride(1) if hidden.dim() == 3 else hidden.stride(0)
    K = _check_weight(weight, D, hidden.dtype)
    if (grad_coef.dtype != torch.float32 or not grad_coef.is_contiguous() or grad_coef.dim() != 2
            or grad_coef.shape[1] != K):
        raise RuntimeError("grad_coef: expected contiguous float32 [M, K]")
    if (row_ptr is None) != (row_entry is None):
        raise RuntimeError("row_ptr and row_entry go together")
    if row_ptr is None and grad_coef.shape[0] != rows:
        raise RuntimeError("grad_coef: expected [N, K] without row_ptr")
    if row_ptr is not None:
        if (row_ptr.dtype != torch.int64 or row_entry.dtype != torch.int64 or not row_ptr.is_contiguous()
                or not row_entry.is_contiguous() or row_ptr.shape != (rows + 1,)):
            raise RuntimeError("row_ptr/row_entry: expected contiguous int64 [N+1] and [M]")
    if pooled_pos.dtype != torch.int64 or not pooled_pos.is_contiguous():
        raise RuntimeError("pooled_pos: expected int64")

    grad_hidden = _zeros_at_word_speed(hidden) if need_grad_hidden else hidden.new_empty((0,))
    grad_weight = _new(weight.shape, weight, weight.dtype)  # weight is contiguous
    grad_bias = _new((K,), hidden, torch.float32)
    if K == 0:
        return grad_hidden, grad_weight, grad_bias
    if rows == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_hidden, grad_weight, grad_bias
    block_n = min(triton.next_power_of_2(rows), _MAX_BLOCK_N)
    block_k = triton.next_power_of_2(K)
    block_d = min(triton.next_power_of_2(max(D, 1)), max(16, _BWD_TILE // block_n))
    row_blocks, d_tiles = triton.cdiv(rows, block_n), max(1, triton.cdiv(D, block_d))
    # One row block: the kernel writes grad_weight and grad_bias directly; else fp32 partials, row
    # block b's [K*D weight | K bias] at b * (K*D + K), then one fixed-order sum into both.
    numel_weight = K * D
    if row_blocks == 1:
        partial, bias_partial = grad_weight, grad_bias
    else:
        partial = _new((row_blocks, numel_weight + K), hidden, torch.float32)
        bias_partial = partial.view(-1)[numel_weight:]
    with _device(hidden):
        _pool_backward_kernel[(row_blocks, d_tiles)](
            grad_coef, row_ptr if row_ptr is not None else grad_coef,
            row_entry if row_entry is not None else grad_coef,
            hidden, weight, pooled_pos, grad_hidden if need_grad_hidden else grad_coef, partial, bias_partial,
            rows, D, K, positions, grad_coef.shape[0], row_entry.shape[0] if row_entry is not None else 0,
            stride_n, stride_t, positions * D if hidden.dim() == 3 else 0, numel_weight + K,
            HAS_CSR=row_ptr is not None, NEED_GRAD_HIDDEN=bool(need_grad_hidden),
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_warps(block_n * block_d),
        )
        if row_blocks > 1:
            numel = numel_weight + K
            block_b = min(triton.next_power_of_2(row_blocks), _MAX_BLOCK_B)
            block = min(triton.next_power_of_2(numel), max(16, _SUM_TILE // block_b))
            _sum_partials_kernel[(triton.cdiv(numel, block),)](partial, grad_weight, grad_bias, row_blocks,
                                                              numel_weight, numel, BLOCK_B=block_b, BLOCK=block,
                                                              num_warps=4)
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Ops (schemas of csrc/ops.cpp); fake kernels + autograd come from prefkernels.autograd.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("prefkernels::triton_bt_forward", mutates_args=())
def triton_bt_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], attention_mask: Optional[Tensor],
                      last_index: Optional[Tensor], cu_seqlens: Optional[Tensor], chosen_index: Optional[Tensor],
                      rejected_index: Optional[Tensor], margin: Optional[Tensor], label_smoothing: float,
                      center_coef: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [P, K] f32, rewards [N, K] f32, pair_grad [2, P, K] f32, pooled_pos [N] i64)."""
    return bt_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens, chosen_index, rejected_index,
                      margin, label_smoothing, center_coef)


@torch.library.custom_op("prefkernels::triton_pool_forward", mutates_args=())
def triton_pool_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], attention_mask: Optional[Tensor],
                        last_index: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(rewards [N, K] f32, pooled_pos [N] i64)."""
    return pool_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens)


@torch.library.custom_op("prefkernels::triton_pool_backward", mutates_args=())
def triton_pool_backward(grad_coef: Tensor, row_ptr: Optional[Tensor], row_entry: Optional[Tensor],
                         hidden: Tensor, weight: Tensor, pooled_pos: Tensor,
                         need_grad_hidden: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden contiguous like hidden, or [0] when not needed; grad_weight like weight;
    grad_bias [K] float32)."""
    return pool_backward(grad_coef, row_ptr, row_entry, hidden, weight, pooled_pos, need_grad_hidden)


OPS = OpSet("triton", "triton_")
