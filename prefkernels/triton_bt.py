"""Triton backend: last-token pooling + K-head reward + Bradley-Terry loss, fused.

Read top-down: scalar math and per-row helpers (``@triton.jit`` functions), kernels, Python
launchers, then the three ops ``prefkernels::triton_{bt_forward,pool_forward,pool_backward}``
with the schemas of csrc/ops.cpp and the semantics of csrc/cpu/bt_cpu.cpp (the reference).

- Forward: ONE launch. Default pairs (even N): one program per pair; it pools the chosen row p
  and the rejected row p + P, computes the K rewards of both and the pair's loss and gradient
  coefficients. Explicit pairs (or an odd N): one program per row (rewards, pooled_pos), then one
  per pair, which pools its two rows again rather than wait for theirs. A mean or sum of the
  loss is taken after it (``reduction``). ``pool_forward``: one program per row.
- Backward, ONE launch, two ways (``grad_fill``, env PREFKERNELS_GRAD_FILL, as native CUDA):
  - fill kernel (padded [N, T, D] hidden with a large grad buffer): no zero fill before it.
    Its first programs each reduce one D tile's weight and bias gradients over all N rows;
    the others write the grad buffer whole, FILL_ROWS rows each: zeros, then the pooled rows'
    gradients over them.
  - memset path: ONE zero-filled allocation (the grad buffer, then the tiles' int32 tickets;
    cleared as 4-byte words), then a launch over (row block of up to 32 rows, D tile), each
    program one [rows, D tile] tile: it scatters the pooled rows' gradient and writes its row
    block's partial weight and bias gradients (fp32) to scratch; the last program of each D
    tile to finish sums every row block's partials, 8 row blocks at a time in row-block order,
    into grad_weight (weight's dtype) and grad_bias. With a single row block (N <= 32) the
    program writes both directly.
  No float atomics anywhere: two runs are bitwise equal. The CSR sums of explicit pairs run in
  row_entry order, as the CPU op. Each pair entry's coefficient is multiplied by the loss's
  gradient in the kernel (``grad_loss``, one value or one per pair), so nothing scales them
  beforehand.
- Hidden is addressed as ``n * stride_n + pos * stride_t + d`` with int64 offsets; packed
  [total, D] hidden (``cu_seqlens``) pools row ``cu[n+1] - 1`` with ``stride_n = 0``.

The ops are defined with ``torch.library.Library`` (csrc/ops.cpp's schemas, the launchers as
their CUDA and CPU kernels) rather than ``triton_op``/``wrap_triton``: it behaves the same on
torch 2.6 through 2.13, keeps each op opaque to torch.compile (Inductor never re-traces our
Python launchers and their block-size heuristics), runs unchanged on CPU tensors under
TRITON_INTERPRET=1, and lets the backend share the fake and autograd registrations of
``prefkernels.autograd`` with the native ops. Nor ``custom_op``: the dispatcher calls these
launchers directly, without custom_op's Python wrapper around each call.

Fake kernels and autograd are registered by ``prefkernels.backends.triton_ops()``, not here.
"""
import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from prefkernels.backends import OpSet
from prefkernels.checks import REDUCTION_CODES

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
def _valid_position(pos, positions):
    """(pos, valid): pos if it is a position in [0, positions), else -1 (an invalid row)."""
    valid = (pos >= 0) & (pos < positions)
    return tl.where(valid, pos, -1), valid


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
    return _valid_position(pos, positions)


@triton.jit
def _pooled_positions(n_a, n_b, mask_ptr, index_ptr, positions, POOL_MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """_pooled_position of rows n_a and n_b, (pos_a, valid_a, pos_b, valid_b); with a mask the two
    rows are scanned together, one [2, BLOCK_T] tile per step, so their loads are in flight at once."""
    if POOL_MODE == 0:
        which = tl.arange(0, 2)
        rows = tl.where(which == 0, n_a, n_b)
        offs_t = tl.arange(0, BLOCK_T)
        best = tl.full([2, BLOCK_T], -1, tl.int32)
        for t0 in range(0, positions, BLOCK_T):
            t = t0 + offs_t
            m = tl.load(mask_ptr + rows[:, None] * positions + t[None, :], mask=(t < positions)[None, :], other=0)
            best = tl.maximum(best, tl.where(m != 0, t[None, :], -1))
        last = tl.max(best, axis=1)
        pos_a, valid_a = _valid_position(tl.max(tl.where(which == 0, last, -1), axis=0).to(tl.int64), positions)
        pos_b, valid_b = _valid_position(tl.max(tl.where(which == 1, last, -1), axis=0).to(tl.int64), positions)
    else:
        pos_a, valid_a = _pooled_position(n_a, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
        pos_b, valid_b = _pooled_position(n_b, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
    return pos_a, valid_a, pos_b, valid_b


@triton.jit
def _rows_rewards(n_a, pos_a, valid_a, n_b, pos_b, valid_b, hidden_ptr, weight_ptr, bias_ptr, stride_n, stride_t, D,
                  K, PAIR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rewards_a, rewards_b): rewards[k] = <hidden[n, pos, :], weight[k, :]> + bias[k] in fp32
    ([BLOCK_K]) of row a and, with PAIR, row b (else rewards_b is rewards_a); NaN for an invalid
    row. A pair's two hidden tiles are loaded together with the weight tile; each row's arithmetic
    is a single row's, so a row's rewards have the same bits either way."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < K
    row_a = hidden_ptr + n_a * stride_n + tl.maximum(pos_a, 0) * stride_t
    row_b = hidden_ptr + n_b * stride_n + tl.maximum(pos_b, 0) * stride_t
    acc_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_K], dtype=tl.float32)
    # Masks are built by comparing a block with a scalar bound (an invalid row reads nothing):
    # combining a block mask with a scalar bool breaks the Triton interpreter.
    d_limit_a = tl.where(valid_a, D, 0)
    d_limit_b = tl.where(valid_b, D, 0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        h_a = tl.load(row_a + d, mask=d < d_limit_a, other=0.0).to(tl.float32)
        if PAIR:
            h_b = tl.load(row_b + d, mask=d < d_limit_b, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs_k[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc_a += tl.sum(w * h_a[None, :], axis=1)
        if PAIR:
            acc_b += tl.sum(w * h_b[None, :], axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc_a += bias
        acc_b += bias
    rewards_a = tl.where(valid_a, acc_a, float("nan"))
    if PAIR:
        rewards_b = tl.where(valid_b, acc_b, float("nan"))
    else:
        rewards_b = rewards_a
    return rewards_a, rewards_b


@triton.jit
def _pool_row(n, hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, positions, D, K, stride_n, stride_t,
              POOL_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(pooled position int64, -1 for an invalid row; rewards [BLOCK_K] fp32) of row n."""
    pos, valid = _pooled_position(n, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
    rewards, _ = _rows_rewards(n, pos, valid, n, pos, valid, hidden_ptr, weight_ptr, bias_ptr, stride_n, stride_t, D,
                               K, False, HAS_BIAS, BLOCK_K, BLOCK_D)
    return pos, rewards


@triton.jit
def _pool_pair(c, r, hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, positions, D, K, stride_n, stride_t,
               POOL_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """_pool_row of rows c and r, (pos_c, rewards_c, pos_r, rewards_r), with their mask scans
    (_pooled_positions) and their hidden loads (_rows_rewards) together."""
    pos_c, valid_c, pos_r, valid_r = _pooled_positions(c, r, mask_ptr, index_ptr, positions, POOL_MODE, BLOCK_T)
    rewards_c, rewards_r = _rows_rewards(c, pos_c, valid_c, r, pos_r, valid_r, hidden_ptr, weight_ptr, bias_ptr,
                                         stride_n, stride_t, D, K, True, HAS_BIAS, BLOCK_K, BLOCK_D)
    return pos_c, rewards_c, pos_r, rewards_r


@triton.jit
def _store_pair(q, r_c, r_r, margin_ptr, loss_ptr, pair_grad_ptr, P, K, label_smoothing, center_coef,
                HAS_MARGIN: tl.constexpr, BLOCK_K: tl.constexpr):
    """loss[q, :] and pair_grad[:, q, :] of pair q from its chosen and rejected rewards [BLOCK_K]."""
    if HAS_MARGIN:
        margin = tl.load(margin_ptr + q)
    else:
        margin = 0.0
    loss, g_c, g_r = _bt_pair(r_c, r_r, margin, label_smoothing, center_coef)
    _write_pair(q, loss, g_c, g_r, loss_ptr, pair_grad_ptr, P, K, BLOCK_K)


@triton.jit
def _write_pair(q, loss, g_c, g_r, loss_ptr, pair_grad_ptr, P, K, BLOCK_K: tl.constexpr):
    """loss[q, :] = loss, pair_grad[0, q, :] = g_c and pair_grad[1, q, :] = g_r ([BLOCK_K] each)."""
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    tl.store(loss_ptr + q * K + offs_k, loss, mask=k_mask)
    tl.store(pair_grad_ptr + q * K + offs_k, g_c, mask=k_mask)
    tl.store(pair_grad_ptr + (q + P) * K + offs_k, g_r, mask=k_mask)  # q int64: no int32 P * K


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
    pos_c, r_c, pos_r, r_r = _pool_pair(c, r, hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, positions, D, K,
                                        stride_n, stride_t, POOL_MODE, HAS_BIAS, BLOCK_T, BLOCK_K, BLOCK_D)
    tl.store(rewards_ptr + c * K + offs_k, r_c, mask=k_mask)
    tl.store(rewards_ptr + r * K + offs_k, r_r, mask=k_mask)
    tl.store(pooled_pos_ptr + c, pos_c)
    tl.store(pooled_pos_ptr + r, pos_r)
    _store_pair(p, r_c, r_r, margin_ptr, loss_ptr, pair_grad_ptr, P, K, label_smoothing, center_coef, HAS_MARGIN,
                BLOCK_K)


@triton.jit
def _pool_kernel(
    hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, rewards_ptr, pooled_pos_ptr,
    chosen_ptr, rejected_ptr, margin_ptr, loss_ptr, pair_grad_ptr,
    N, P, positions, D, K, stride_n, stride_t, label_smoothing, center_coef,
    PAIR_MODE: tl.constexpr, POOL_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MARGIN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs n < N: rewards[n, :] and pooled_pos[n] of row n. With pairs (PAIR_MODE 1: default
    (q, q + P); 2: chosen/rejected [P]) programs N + q also compute pair q: they pool its two rows
    again (_pool_pair: each row's arithmetic as in the row programs) rather than wait for them, so the
    whole forward is one launch. A pair with an index outside [0, N) gets NaN loss and zero
    pair_grad."""
    pid = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if pid < N:
        pos, rewards = _pool_row(pid, hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, positions, D, K,
                                 stride_n, stride_t, POOL_MODE, HAS_BIAS, BLOCK_T, BLOCK_K, BLOCK_D)
        tl.store(rewards_ptr + pid * K + offs_k, rewards, mask=k_mask)
        tl.store(pooled_pos_ptr + pid, pos)
    elif PAIR_MODE != 0:
        q = pid - N
        if PAIR_MODE == 1:
            c = q
            r = q + P
        else:
            c = tl.load(chosen_ptr + q)
            r = tl.load(rejected_ptr + q)
        if (c >= 0) & (c < N) & (r >= 0) & (r < N):
            _, r_c, _, r_r = _pool_pair(c, r, hidden_ptr, weight_ptr, bias_ptr, mask_ptr, index_ptr, positions, D, K,
                                        stride_n, stride_t, POOL_MODE, HAS_BIAS, BLOCK_T, BLOCK_K, BLOCK_D)
            _store_pair(q, r_c, r_r, margin_ptr, loss_ptr, pair_grad_ptr, P, K, label_smoothing, center_coef,
                        HAS_MARGIN, BLOCK_K)
        else:
            zeros = tl.zeros([BLOCK_K], tl.float32)
            _write_pair(q, tl.full([BLOCK_K], float("nan"), tl.float32), zeros, zeros, loss_ptr, pair_grad_ptr,
                        P, K, BLOCK_K)


# ---------------------------------------------------------------------------------------------
# Backward kernels.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _entry_coef(grad_coef_ptr, grad_loss_ptr, entry, offs_k, mask, K, loss_pairs, loss_scale,
                LOSS_GRAD: tl.constexpr):
    """grad_coef[entry, k] ([BLOCK_N, BLOCK_K], 0 where masked) times the loss's gradient of the
    entry's pair (csrc/bt_layout.h entry_coef). LOSS_GRAD 0: none; 1: one value grad_loss[0];
    2: grad_loss [P, K], entry e in pair e mod P (e < 2P)."""
    c = tl.load(grad_coef_ptr + entry * K + offs_k[None, :], mask=mask, other=0.0)
    if LOSS_GRAD == 1:
        c = c * (tl.load(grad_loss_ptr) * loss_scale)
    elif LOSS_GRAD == 2:
        pair = tl.where(entry < loss_pairs, entry, entry - loss_pairs)
        c = c * (tl.load(grad_loss_ptr + pair * K + offs_k[None, :], mask=mask, other=0.0) * loss_scale)
    return c


@triton.jit
def _row_coefs(grad_coef_ptr, grad_loss_ptr, row_ptr_ptr, row_entry_ptr, offs_n, n_mask, valid, offs_k, k_mask, K,
               coef_rows, entries, loss_pairs, loss_scale,
               HAS_CSR: tl.constexpr, LOSS_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """coef [ROWS, BLOCK_K] fp32 of rows offs_n ([ROWS], read where n_mask): _entry_coef(n), or the
    sum of _entry_coef over the row's CSR entries in row_entry order (as the CPU op), skipping
    segment bounds and entries outside [0, entries) / [0, coef_rows); 0 where not ``valid``, so a
    skipped row adds nothing, even with a NaN coefficient."""
    if HAS_CSR:
        start = tl.maximum(tl.load(row_ptr_ptr + offs_n, mask=n_mask, other=0), 0)
        end = tl.minimum(tl.load(row_ptr_ptr + offs_n + 1, mask=n_mask, other=0), entries)
        coef = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for j in range(0, tl.max(end - start, axis=0)):
            # [ROWS, BLOCK_K] throughout (the entry index repeated over k): a [ROWS] load here
            # crashes Triton 3.6's layout pass for some ROWS/num_warps.
            in_segment = (start + j < end)[:, None] & k_mask[None, :]
            entry = tl.load(row_entry_ptr + (start + j)[:, None] + 0 * offs_k[None, :], mask=in_segment, other=-1)
            in_range = in_segment & (entry >= 0) & (entry < coef_rows)
            coef += _entry_coef(grad_coef_ptr, grad_loss_ptr, entry, offs_k, in_range, K, loss_pairs, loss_scale,
                                LOSS_GRAD)
    else:
        coef = _entry_coef(grad_coef_ptr, grad_loss_ptr, offs_n[:, None], offs_k, n_mask[:, None] & k_mask[None, :],
                           K, loss_pairs, loss_scale, LOSS_GRAD)
    return tl.where(valid[:, None], coef, 0.0)


@triton.jit
def _head_coef(coef, offs_k, k):
    """Column k of coef [ROWS, BLOCK_K], as [ROWS]."""
    return tl.sum(tl.where(offs_k[None, :] == k, coef, 0.0), axis=1)


@triton.jit
def _pooled_row_grads(coef, offs_k, weight_ptr, offs_d, d_mask, K, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_hidden of pooled rows, [ROWS, BLOCK_D] fp32: sum over heads k = 0, 1, ... of
    coef[:, k] * weight[k, offs_d]. Both backward kernels call it, so their grad_hidden has the
    same bits."""
    g = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for k in range(0, K):
        w = tl.load(weight_ptr + k * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        g += _head_coef(coef, offs_k, k)[:, None] * w[None, :]
    return g


@triton.jit
def _pool_backward_kernel(
    grad_coef_ptr, grad_loss_ptr, row_ptr_ptr, row_entry_ptr, hidden_ptr, weight_ptr, pooled_pos_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, partial_ptr, bias_partial_ptr, tile_done_ptr,
    N, D, K, positions, coef_rows, entries, loss_pairs, loss_scale, stride_n, stride_t, grad_stride_n, row_blocks,
    HAS_CSR: tl.constexpr, LOSS_GRAD: tl.constexpr, NEED_GRAD_HIDDEN: tl.constexpr, ONE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SUM_ROWS: tl.constexpr,
):
    """Program (b, j): rows [b*BLOCK_N, (b+1)*BLOCK_N) x D tile j, as one [BLOCK_N, BLOCK_D] tile,
    after a zero fill of grad_hidden (the memset path).

    coef = _row_coefs of the rows (0 unless pos_n is in [0, positions));
    grad_hidden[n, pos_n, :] = _pooled_row_grads(coef) (NEED_GRAD_HIDDEN; the other rows stay 0).
    Weight and bias gradients: with one row block the program writes them directly; else it writes
    its row block's fp32 partials, partial[b, k, d] = sum over the block's rows of coef[n, k] *
    hidden[n, pos_n, d] and (tile 0) bias_partial[b, k] = sum of coef[n, k], and the last program
    of tile j to finish (a ticket from the zeroed int32 tile_done[j]) sums the partials of all row
    blocks, SUM_ROWS row blocks loaded at once and reduced as a tile, chunks in order, into
    grad_weight's tile (and grad_bias): one launch, no float atomics, a fixed order.
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
    row_mask = valid[:, None] & d_mask[None, :]
    # the hidden rows are loaded first, so they are in flight while the coefficients' CSR walk runs
    # (and held in hidden's dtype until then)
    h = tl.load(hidden_ptr + (offs_n * stride_n + safe_pos * stride_t)[:, None] + offs_d[None, :],
                mask=row_mask, other=0.0)
    coef = _row_coefs(grad_coef_ptr, grad_loss_ptr, row_ptr_ptr, row_entry_ptr, offs_n, n_mask, valid, offs_k, k_mask,
                      K, coef_rows, entries, loss_pairs, loss_scale, HAS_CSR, LOSS_GRAD, BLOCK_N, BLOCK_K)
    h = h.to(tl.float32)
    if pid_d == 0:
        bias_sum = tl.sum(coef, axis=0)
        if ONE_BLOCK:
            tl.store(grad_bias_ptr + offs_k, bias_sum, mask=k_mask)
        else:
            tl.store(bias_partial_ptr + pid_b * K + offs_k, bias_sum, mask=k_mask)
    for k in range(0, K):
        grad_w = tl.sum(_head_coef(coef, offs_k, k)[:, None] * h, axis=0)
        if ONE_BLOCK:
            tl.store(grad_weight_ptr + k * D + offs_d, grad_w.to(grad_weight_ptr.dtype.element_ty), mask=d_mask)
        else:
            tl.store(partial_ptr + (pid_b * K + k) * D + offs_d, grad_w, mask=d_mask)
    if NEED_GRAD_HIDDEN:
        g = _pooled_row_grads(coef, offs_k, weight_ptr, offs_d, d_mask, K, D, BLOCK_N, BLOCK_D)
        tl.store(grad_hidden_ptr + (offs_n * grad_stride_n + safe_pos * D)[:, None] + offs_d[None, :],
                 g.to(grad_hidden_ptr.dtype.element_ty), mask=row_mask)
    if not ONE_BLOCK:
        tl.debug_barrier()  # every thread's partial stores precede the ticket (released with it)
        ticket = tl.atomic_add(tile_done_ptr + pid_d, 1, sem="acq_rel")
        if ticket == row_blocks - 1:  # the other row blocks of this tile are done: sum them all
            # SUM_ROWS row blocks per step, loaded together and summed as one tile; the pointers
            # step SUM_ROWS row blocks (SUM_ROWS*K*D) at a time, so no offset is an int32 product
            # of up to row_blocks*K*D
            offs_r = tl.arange(0, SUM_ROWS)
            for k in range(0, K):
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                chunk = partial_ptr + k * D
                for b0 in range(0, row_blocks, SUM_ROWS):
                    rows = (b0 + offs_r < row_blocks)[:, None] & d_mask[None, :]
                    acc += tl.sum(tl.load(chunk + (offs_r * (K * D))[:, None] + offs_d[None, :], mask=rows, other=0.0,
                                          cache_modifier=".cg"), axis=0)
                    chunk += SUM_ROWS * K * D
                tl.store(grad_weight_ptr + k * D + offs_d, acc.to(grad_weight_ptr.dtype.element_ty), mask=d_mask)
            if pid_d == 0:
                bias_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
                chunk = bias_partial_ptr
                for b0 in range(0, row_blocks, SUM_ROWS):
                    rows = (b0 + offs_r < row_blocks)[:, None] & k_mask[None, :]
                    bias_acc += tl.sum(tl.load(chunk + (offs_r * K)[:, None] + offs_k[None, :], mask=rows, other=0.0,
                                               cache_modifier=".cg"), axis=0)
                    chunk += SUM_ROWS * K
                tl.store(grad_bias_ptr + offs_k, bias_acc, mask=k_mask)


@triton.jit
def _pool_backward_fill_kernel(
    grad_coef_ptr, grad_loss_ptr, row_ptr_ptr, row_entry_ptr, hidden_ptr, weight_ptr, pooled_pos_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    N, D, K, positions, coef_rows, entries, loss_pairs, loss_scale, stride_n, stride_t, d_tiles, grad_rows,
    grad_numel, HAS_CSR: tl.constexpr, LOSS_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    FILL_ROWS: tl.constexpr, FILL_D: tl.constexpr, FILL_TILE: tl.constexpr,
):
    """The backward without a zero fill before it: grad_hidden (contiguous [N, positions, D],
    uninitialized) is written whole by this launch.

    Programs 0 .. d_tiles-1, the reduction: D tile j's weight gradient (and, tile 0, the bias
    gradient) over all N rows, BLOCK_N rows at a time, summed in row-block order into registers
    and stored once: no partials, no tickets.
    Programs d_tiles ..: FILL_ROWS rows each of grad_hidden viewed as [grad_rows = N * positions,
    D] (grad_numel elements; both passed in, so Triton types them int64 when they need it): zeros
    in flat FILL_TILE-element chunks (not waiting for the pooled_pos load), then, over them, row
    (n, t) gets _pooled_row_grads of row n where t is n's pooled position (the memset path's
    arithmetic, so the same bits).
    """
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if pid < d_tiles:
        offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc_w = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            n_mask = offs_n < N
            pos = tl.load(pooled_pos_ptr + offs_n, mask=n_mask, other=-1)
            valid = (pos >= 0) & (pos < positions)
            coef = _row_coefs(grad_coef_ptr, grad_loss_ptr, row_ptr_ptr, row_entry_ptr, offs_n, n_mask, valid, offs_k,
                              k_mask, K, coef_rows, entries, loss_pairs, loss_scale, HAS_CSR, LOSS_GRAD, BLOCK_N,
                              BLOCK_K)
            acc_b += tl.sum(coef, axis=0)
            row_at = offs_n * stride_n + tl.where(valid, pos, 0) * stride_t
            h = tl.load(hidden_ptr + row_at[:, None] + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                        other=0.0).to(tl.float32)
            for k in range(0, K):
                grad_w = tl.sum(_head_coef(coef, offs_k, k)[:, None] * h, axis=0)
                acc_w += tl.where(offs_k[:, None] == k, grad_w[None, :], 0.0)
        tl.store(grad_weight_ptr + offs_k[:, None] * D + offs_d[None, :], acc_w.to(grad_weight_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & d_mask[None, :])
        if pid == 0:
            tl.store(grad_bias_ptr + offs_k, acc_b, mask=k_mask)
    else:
        r = (pid - d_tiles).to(tl.int64) * FILL_ROWS + tl.arange(0, FILL_ROWS)
        r_mask = r < grad_rows
        n = r // positions
        pooled = r_mask & (tl.load(pooled_pos_ptr + n, mask=r_mask, other=-1) == r - n * positions)
        first = (pid - d_tiles).to(tl.int64) * FILL_ROWS * D
        end = tl.minimum(first + FILL_ROWS * D, grad_numel)
        zeros = tl.zeros([FILL_TILE], dtype=grad_hidden_ptr.dtype.element_ty)
        for at in range(0, FILL_ROWS * D, FILL_TILE):
            offs = first + at + tl.arange(0, FILL_TILE)
            tl.store(grad_hidden_ptr + offs, zeros, mask=offs < end)
        if tl.max(pooled.to(tl.int32), axis=0) > 0:
            tl.debug_barrier()  # every thread's zeros before the gradient over them (other threads may own them)
            coef = _row_coefs(grad_coef_ptr, grad_loss_ptr, row_ptr_ptr, row_entry_ptr, n, pooled, pooled, offs_k,
                              k_mask, K, coef_rows, entries, loss_pairs, loss_scale, HAS_CSR, LOSS_GRAD, FILL_ROWS,
                              BLOCK_K)
            for d0 in range(0, D, FILL_D):
                offs_d = d0 + tl.arange(0, FILL_D)
                d_mask = offs_d < D
                g = _pooled_row_grads(coef, offs_k, weight_ptr, offs_d, d_mask, K, D, FILL_ROWS, FILL_D)
                tl.store(grad_hidden_ptr + r[:, None] * D + offs_d[None, :], g.to(grad_hidden_ptr.dtype.element_ty),
                         mask=pooled[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------
_MAX_BLOCK_D = 4096        # forward: a 4096-wide row in one tile (8 warps, 16 elements per thread)
_MAX_TILE = 8192           # forward: BLOCK_K * BLOCK_D register tile budget
_MAX_BLOCK_T = 4096        # forward: mask positions per tile
_MAX_BLOCK_N = 32          # backward: rows per program (one [BLOCK_N, BLOCK_D] tile); tuned on H200
_BWD_TILE = 4096           # backward: BLOCK_N * BLOCK_D
_SUM_ROW_BLOCKS = 8        # backward: row blocks' partials the last program loads and sums at once
_FILL_BYTES = 64 * 1024    # backward fill kernel: grad_hidden bytes per fill program (8 rows at least)
_FILL_TILE = 4096          # backward fill kernel: elements per store
_FILL_BYTES_PER_PASS = 12 << 20  # grad fill auto: the kernel from this many grad bytes per reduction pass
_FILL_MAX_BYTES = 256 << 20  # grad fill auto: the kernel up to this many grad bytes (see _fill_rows)
_PASS_ROWS, _PASS_HEADS = 32, 4  # ... a pass being 32 rows x 4 heads, as in csrc/cuda/bt_kernels.cu


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch sizes. Not triton.cdiv/next_power_of_2: since Triton 3.3 those are
    constexpr functions whose Python call costs a few us each, a dozen times per step."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _new(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Uninitialized output/scratch buffer on ``like``'s device (tests patch it to poison outputs)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _zeroed_grad_buffer(hidden: Tensor, need_grad_hidden: bool, counters: int):
    """(grad_hidden, counters) from ONE zero-filled allocation, cleared as 4-byte words (zero bits
    are 0.0 in every float type, and PyTorch's fill runs slower on 2-byte types): a contiguous
    grad_hidden shaped like ``hidden`` ([0] when not needed), padded to 16 bytes, then
    ``counters`` int32 (None when 0), so the backward's tile tickets cost no launch of their own."""
    grad_bytes = hidden.numel() * hidden.element_size() if need_grad_hidden else 0
    grad_words = _cdiv(grad_bytes, 16) * 4
    words = _new((grad_words + counters,), hidden, torch.int32)
    words.zero_()
    grad_hidden = (words.view(torch.uint8)[:grad_bytes].view(hidden.dtype).view(hidden.shape) if need_grad_hidden
                   else hidden.new_empty((0,)))
    return grad_hidden, (words[grad_words:] if counters else None)


def grad_fill() -> str:
    """How the backward gets grad_hidden's zeros: env PREFKERNELS_GRAD_FILL = ``auto`` (unset: the
    default), ``kernel`` or ``memset``, read on every call as the CUDA glue reads it, so a benchmark
    can compare the two ways."""
    mode = os.environ.get("PREFKERNELS_GRAD_FILL") or "auto"
    if mode not in ("auto", "kernel", "memset"):
        raise RuntimeError(f"PREFKERNELS_GRAD_FILL: expected auto, kernel or memset, got '{mode}'")
    return mode


def _fill_rows(hidden: Tensor, need_grad_hidden: bool, rows: int, K: int, fill: str) -> int:
    """grad_hidden rows per program of _pool_backward_fill_kernel, or 0 for the memset path (a
    zeroed buffer, then _pool_backward_kernel). The fill kernel takes padded [N, T, D] hidden
    (packed hidden keeps the memset); under ``auto`` only where grad_hidden holds at least
    _FILL_BYTES_PER_PASS per pass of its one-program-per-tile reduction over all N rows (the lower
    bound of plan_pool_backward in csrc/cuda/bt_kernels.cu) and at most _FILL_MAX_BYTES: on an
    H200 the kernel writes about 4.1 TB/s against PyTorch's zero fill's 4.6, 25 ps a byte more,
    while it saves the memset path's backward kernel and a launch, about 8 us, so the two cross
    near 300 MiB (measured: even at 256 MiB, the kernel 5 us behind at 512 MiB, 13-14 at 1 GiB)."""
    if fill == "memset" or not need_grad_hidden or hidden.dim() != 3 or hidden.numel() == 0 or K == 0:
        return 0
    passes = _cdiv(rows, _PASS_ROWS) * _cdiv(K, _PASS_HEADS)
    grad_bytes = hidden.numel() * hidden.element_size()
    if fill == "auto" and not passes * _FILL_BYTES_PER_PASS <= grad_bytes <= _FILL_MAX_BYTES:
        return 0
    row_bytes = hidden.shape[2] * hidden.element_size()
    return min(_next_power_of_2(max(8, _cdiv(_FILL_BYTES, row_bytes))), _FILL_TILE // 16)


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_kd(K: int, D: int) -> Tuple[int, int]:
    block_k = _next_power_of_2(K)
    block_d = min(_next_power_of_2(D), _MAX_BLOCK_D, max(16, _MAX_TILE // block_k))
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
    block_t = min(_next_power_of_2(positions), _MAX_BLOCK_T) if mode == POOL_MASK else 1
    return dict(rows=rows, positions=positions, D=D, K=K, stride_n=stride_n, stride_t=stride_t, mode=mode,
                mask_ptr=mask_ptr, index_ptr=index_ptr, bias_ptr=bias if bias is not None else weight,
                has_bias=bias is not None, block_t=block_t, block_k=block_k, block_d=block_d)


def _launch_pool(hidden, weight, a, rewards, pooled_pos, pair_mode=0, pairs=0, chosen=None, rejected=None,
                 margin=None, loss=None, pair_grad=None, label_smoothing=0.0, center_coef=0.0):
    """One _pool_kernel launch: the N rows, then (pair_mode 1 or 2) the P pairs. Without a pair
    the pair tensors (empty, maybe null pointers) are not passed: ``rewards`` stands in for them."""
    pair_mode = pair_mode if pairs > 0 else 0
    programs = a["rows"] + (pairs if pair_mode else 0)
    if programs == 0:
        return

    def pair_arg(t):
        return t if pair_mode and t is not None else rewards

    _pool_kernel[(programs,)](
        hidden, weight, a["bias_ptr"], a["mask_ptr"], a["index_ptr"], rewards, pooled_pos,
        pair_arg(chosen), pair_arg(rejected), pair_arg(margin), pair_arg(loss), pair_arg(pair_grad),
        a["rows"], pairs, a["positions"], a["D"], a["K"], a["stride_n"], a["stride_t"],
        float(label_smoothing), float(center_coef),
        PAIR_MODE=pair_mode, POOL_MODE=a["mode"], HAS_BIAS=a["has_bias"], HAS_MARGIN=bool(pair_mode) and margin is not None,
        BLOCK_T=a["block_t"], BLOCK_K=a["block_k"], BLOCK_D=a["block_d"],
        num_warps=_warps(max(a["block_k"] * a["block_d"], a["block_t"])),
    )


def _reduced(loss: Tensor, reduction: int) -> Tensor:
    """loss [P, K] as bt_forward's ``reduction`` asks: itself, its mean or its sum."""
    if reduction == REDUCTION_CODES["mean"]:
        return loss.mean()
    if reduction == REDUCTION_CODES["sum"]:
        return loss.sum()
    return loss


def bt_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens, chosen_index, rejected_index,
               margin, label_smoothing, center_coef, reduction):
    if reduction not in REDUCTION_CODES.values():
        raise RuntimeError(f"reduction: expected 0 (none), 1 (mean) or 2 (sum), got {reduction}")
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
    with _device(hidden):
        if not explicit and rows % 2 == 0:  # one program per pair pools both of its rows
            if P > 0:
                _bt_default_pairs_kernel[(P,)](
                    hidden, weight, a["bias_ptr"], a["mask_ptr"], a["index_ptr"],
                    margin if margin is not None else rewards, loss, rewards, pair_grad, pooled_pos,
                    P, a["positions"], a["D"], K, a["stride_n"], a["stride_t"],
                    float(label_smoothing), float(center_coef),
                    POOL_MODE=a["mode"], HAS_BIAS=a["has_bias"], HAS_MARGIN=margin is not None,
                    BLOCK_T=a["block_t"], BLOCK_K=a["block_k"], BLOCK_D=a["block_d"],
                    num_warps=_warps(max(a["block_k"] * a["block_d"], a["block_t"])),
                )
        else:  # explicit pairs, or an odd N: programs for the rows, then for the pairs
            _launch_pool(hidden, weight, a, rewards, pooled_pos, pair_mode=2 if explicit else 1, pairs=P,
                         chosen=chosen_index, rejected=rejected_index, margin=margin, loss=loss,
                         pair_grad=pair_grad, label_smoothing=label_smoothing, center_coef=center_coef)
    return _reduced(loss, reduction), rewards, pair_grad, pooled_pos


def pool_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens):
    a = _pool_args(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    rewards = _new((a["rows"], a["K"]), hidden, torch.float32)
    pooled_pos = _new((a["rows"],), hidden, torch.int64)
    with _device(hidden):
        _launch_pool(hidden, weight, a, rewards, pooled_pos)
    return rewards, pooled_pos


def _loss_grad_mode(grad_loss: Optional[Tensor], grad_coef: Tensor) -> Tuple[int, int]:
    """(LOSS_GRAD of _entry_coef, P) for pool_backward's grad_loss, checked against grad_coef [M, K]."""
    if grad_loss is None:
        return 0, 0
    per_pair = (grad_loss.dim() == 2 and 2 * grad_loss.shape[0] == grad_coef.shape[0]
                and grad_loss.shape[1] == grad_coef.shape[1])
    if grad_loss.dtype != torch.float32 or not grad_loss.is_contiguous() or not (grad_loss.dim() == 0 or per_pair):
        raise RuntimeError("grad_loss: expected a contiguous float32 [] or [P, K] with grad_coef [2P, K], got "
                           f"{grad_loss.dtype} {list(grad_loss.shape)} with grad_coef {list(grad_coef.shape)}")
    return (2, grad_loss.shape[0]) if per_pair else (1, 0)


def pool_backward(grad_coef, grad_loss, loss_scale, row_ptr, row_entry, hidden, weight, pooled_pos,
                  need_grad_hidden):
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
    loss_grad, loss_pairs = _loss_grad_mode(grad_loss, grad_coef)

    fill_rows = _fill_rows(hidden, need_grad_hidden, rows, K, grad_fill())

    grad_weight = _new(weight.shape, weight, weight.dtype)  # weight is contiguous
    grad_bias = _new((K,), hidden, torch.float32)
    block_n = min(_next_power_of_2(max(rows, 1)), _MAX_BLOCK_N)
    block_k = _next_power_of_2(max(K, 1))
    block_d = min(_next_power_of_2(max(D, 1)), max(16, _BWD_TILE // block_n))
    coef_args = (grad_coef, grad_loss if grad_loss is not None else grad_coef,
                 row_ptr if row_ptr is not None else grad_coef, row_entry if row_entry is not None else grad_coef)
    sizes = (rows, D, K, positions, grad_coef.shape[0], row_entry.shape[0] if row_entry is not None else 0,
             loss_pairs, float(loss_scale), stride_n, stride_t)
    if fill_rows:
        grad_hidden = _new(hidden.shape, hidden, hidden.dtype)  # contiguous; the launch writes all of it
        # the reduction's [BLOCK_K, BLOCK_D] accumulator within the tile budget too (many heads)
        reduce_d = min(block_d, max(16, _BWD_TILE // block_k))
        reduce_tiles = _cdiv(D, reduce_d)
        fill_d = min(_next_power_of_2(D), max(16, _FILL_TILE // fill_rows))
        with _device(hidden):
            _pool_backward_fill_kernel[(reduce_tiles + _cdiv(rows * positions, fill_rows),)](
                *coef_args, hidden, weight, pooled_pos, grad_hidden, grad_weight, grad_bias, *sizes, reduce_tiles,
                rows * positions, hidden.numel(),
                HAS_CSR=row_ptr is not None, LOSS_GRAD=loss_grad, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=reduce_d,
                FILL_ROWS=fill_rows, FILL_D=fill_d, FILL_TILE=_FILL_TILE,
                num_warps=_warps(max(block_n * reduce_d, fill_rows * fill_d)),
            )
        return grad_hidden, grad_weight, grad_bias
    row_blocks, d_tiles = _cdiv(rows, block_n), max(1, _cdiv(D, block_d))
    grad_hidden, tile_done = _zeroed_grad_buffer(hidden, need_grad_hidden, d_tiles if row_blocks > 1 else 0)
    if K == 0:
        return grad_hidden, grad_weight, grad_bias
    if rows == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_hidden, grad_weight, grad_bias
    # Several row blocks: fp32 partials, [row_blocks, K, D] weight then [row_blocks, K] bias
    # (one block writes grad_weight and grad_bias directly; the pointers are then placeholders).
    partial = bias_partial = grad_weight
    if row_blocks > 1:
        scratch = _new((row_blocks * K * (D + 1),), hidden, torch.float32)
        partial, bias_partial = scratch[:row_blocks * K * D], scratch[row_blocks * K * D:]
    with _device(hidden):
        _pool_backward_kernel[(row_blocks, d_tiles)](
            *coef_args, hidden, weight, pooled_pos, grad_hidden if need_grad_hidden else grad_coef, grad_weight,
            grad_bias, partial, bias_partial, tile_done if tile_done is not None else grad_coef,
            *sizes, positions * D if hidden.dim() == 3 else 0, row_blocks,
            HAS_CSR=row_ptr is not None, LOSS_GRAD=loss_grad, NEED_GRAD_HIDDEN=bool(need_grad_hidden),
            ONE_BLOCK=row_blocks == 1, SUM_ROWS=_SUM_ROW_BLOCKS,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_warps(block_n * block_d),
        )
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Ops: csrc/ops.cpp's schemas as prefkernels::triton_*; fake kernels + autograd come from
# prefkernels.autograd.
# ---------------------------------------------------------------------------------------------
SCHEMAS = {
    # (loss f32 [P, K] (reduction 0) or [] (1: mean, 2: sum), rewards [N, K] f32, pair_grad
    #  [2, P, K] f32, pooled_pos [N] i64)
    "bt_forward": "(Tensor hidden, Tensor weight, Tensor? bias, Tensor? attention_mask, Tensor? last_index, "
                  "Tensor? cu_seqlens, Tensor? chosen_index, Tensor? rejected_index, Tensor? margin, "
                  "float label_smoothing, float center_coef, int reduction) -> (Tensor, Tensor, Tensor, Tensor)",
    # (rewards [N, K] f32, pooled_pos [N] i64)
    "pool_forward": "(Tensor hidden, Tensor weight, Tensor? bias, Tensor? attention_mask, Tensor? last_index, "
                    "Tensor? cu_seqlens) -> (Tensor, Tensor)",
    # (grad_hidden contiguous like hidden, or [0] when not needed; grad_weight like weight;
    #  grad_bias [K] f32)
    "pool_backward": "(Tensor grad_coef, Tensor? grad_loss, float loss_scale, Tensor? row_ptr, Tensor? row_entry, "
                     "Tensor hidden, Tensor weight, Tensor pooled_pos, bool need_grad_hidden) "
                     "-> (Tensor, Tensor, Tensor)",
}


def _define_ops() -> torch.library.Library:
    """prefkernels::triton_{op} for each of SCHEMAS, its launcher the kernel for CUDA tensors and
    for CPU tensors (under TRITON_INTERPRET=1)."""
    library = torch.library.Library("prefkernels", "FRAGMENT")
    for op, launcher in (("bt_forward", bt_forward), ("pool_forward", pool_forward), ("pool_backward", pool_backward)):
        library.define(f"triton_{op}{SCHEMAS[op]}")
        for dispatch_key in ("CUDA", "CPU"):
            library.impl(f"triton_{op}", launcher, dispatch_key)
    return library


_LIBRARY = _define_ops()  # kept alive: it holds the registrations

OPS = OpSet("triton", "triton_")
