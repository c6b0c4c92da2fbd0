"""Pure-PyTorch definition of the prefkernels ops, and the two ways people compute them today.

``fused_bt_loss`` and ``pool_score`` here define the contract every backend is tested
against (same signatures as the public functions, without ``backend``). ``eager`` and
``hf_style`` are the baselines the benchmarks compare with.

Shapes: hidden [N, T, D] (or [total, D] packed with ``cu_seqlens``), weight [K, D],
bias [K], rewards [N, K] float32, loss float32 (scalar, or [P, K] for reduction="none").
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def pooled_positions(hidden, attention_mask=None, last_index=None, cu_seqlens=None):
    """Index [N] int64 of the pooled token: a position in T (padded) or a row of the packed batch."""
    if attention_mask is not None:
        T = attention_mask.shape[1]
        positions = torch.arange(T, device=attention_mask.device)
        return torch.where(attention_mask != 0, positions, -1).amax(dim=1)
    if last_index is not None:
        return last_index.long()
    return cu_seqlens[1:].long() - 1


def gather_pooled(hidden, attention_mask=None, last_index=None, cu_seqlens=None):
    """Pooled hidden rows [N, D] in hidden's dtype (differentiable)."""
    pos = pooled_positions(hidden, attention_mask, last_index, cu_seqlens)
    if hidden.dim() == 2:
        return hidden[pos]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def valid_rows(hidden, pos, cu_seqlens=None):
    """Bool [N]: rows whose pooled position ``pos`` is a real token (as the kernels decide): in range,
    and for ``cu_seqlens`` a non-empty sequence. Only inputs that the value checks reject fail it."""
    positions = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    valid = (pos >= 0) & (pos < positions)
    if cu_seqlens is not None:
        valid = valid & (cu_seqlens[1:] > cu_seqlens[:-1])
    return valid


def _autocast_off(device):
    """Autocast disabled on ``device``: under it the head's matmul would run in bfloat16/float16.
    (A fixed list of device types: ``torch.amp.is_autocast_available`` breaks torch<2.7's dynamo.)"""
    if device.type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def head(pooled, weight, bias=None):
    """Rewards [N, K] = pooled @ weight.T + bias in float32 (float64 for float64 inputs, for gradcheck),
    also under autocast."""
    dtype = torch.promote_types(torch.promote_types(pooled.dtype, weight.dtype), torch.float32)
    with _autocast_off(pooled.device):
        rewards = pooled.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        rewards = rewards + bias.to(dtype)
    return rewards


def default_pairs(n_rows, device):
    """TRL's concatenation: rows [0, N/2) chosen, [N/2, N) rejected."""
    half = n_rows // 2
    chosen = torch.arange(half, device=device)
    return chosen, chosen + half


def pair_loss(rewards, chosen_index, rejected_index, margin=None, label_smoothing=0.0,
              center_coef=0.0, reduction="mean"):
    """Bradley-Terry loss over pairs from rewards [N, K] float32."""
    r_chosen = rewards[chosen_index]
    r_rejected = rewards[rejected_index]
    gap = r_chosen - r_rejected
    if margin is not None:
        gap = gap - margin.to(gap.dtype).unsqueeze(1)
    loss = (1.0 - label_smoothing) * F.softplus(-gap)
    # Terms of weight 0 are left out, not multiplied by 0: for an infinite reward that would be
    # 0 * inf = NaN where the loss is 0 (TRL's -logsigmoid(gap) at gap = +inf).
    if label_smoothing:
        loss = loss + label_smoothing * F.softplus(gap)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return reduce_loss(loss, reduction)


def reduce_loss(loss, reduction):
    """loss [P, K] reduced: "mean" over P*K, "sum", or "none" (unchanged)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def pool_score(hidden, weight, bias=None, *, attention_mask=None, last_index=None, cu_seqlens=None):
    """Rewards [N, K] float32 of the pooled rows (differentiable w.r.t. hidden, weight, bias).

    A row without a valid pooled position (possible only with the value checks off) gets NaN
    rewards and no gradient, as on the kernel backends, never another token by negative indexing."""
    pos = pooled_positions(hidden, attention_mask, last_index, cu_seqlens)
    valid = valid_rows(hidden, pos, cu_seqlens)
    pos = torch.where(valid, pos, 0)
    rewards = head(gather_pooled(hidden, last_index=pos), weight, bias)
    return torch.where(valid.unsqueeze(1), rewards, float("nan"))


def fused_bt_loss(hidden, weight, bias=None, *, attention_mask=None, last_index=None,
                  cu_seqlens=None, chosen_index=None, rejected_index=None, margin=None,
                  label_smoothing=0.0, center_coef=0.0, reduction="mean"):
    """(loss, rewards): Bradley-Terry loss of the pooled rewards; rewards are detached."""
    rewards = pool_score(hidden, weight, bias, attention_mask=attention_mask,
                         last_index=last_index, cu_seqlens=cu_seqlens)
    if chosen_index is None:
        chosen_index, rejected_index = default_pairs(rewards.shape[0], rewards.device)
        loss = pair_loss(rewards, chosen_index, rejected_index, margin, label_smoothing, center_coef, reduction)
        return loss, rewards.detach()
    # A pair index out of range (possible only with the value checks off) gives that pair a NaN
    # loss and no gradient, as on the kernel backends, never an IndexError or another row.
    rows = rewards.shape[0]
    valid = (chosen_index >= 0) & (chosen_index < rows) & (rejected_index >= 0) & (rejected_index < rows)
    loss = pair_loss(rewards, chosen_index.clamp(0, rows - 1), rejected_index.clamp(0, rows - 1), margin,
                     label_smoothing, center_coef, reduction="none")
    loss = torch.where(valid.unsqueeze(1), loss, float("nan"))
    return reduce_loss(loss, reduction), rewards.detach()


def rows_csr(chosen_index, rejected_index, rows):
    """The kernels' rows_csr op (csrc/ops.cpp) by a stable sort: the 2P pair entries (entry e < P:
    row chosen_index[e], else rejected_index[e - P]; both [P] int64) grouped by row, each row's in
    ascending order. Returns (row_ptr [rows + 1], row_entry [2P]) int64: row n's entries are
    row_entry[row_ptr[n]:row_ptr[n + 1]]; entries of rows outside [0, rows) lie outside them all."""
    sorted_rows, row_entry = torch.sort(torch.cat([chosen_index, rejected_index]), stable=True)
    boundaries = torch.arange(rows + 1, device=sorted_rows.device, dtype=sorted_rows.dtype)
    return torch.searchsorted(sorted_rows, boundaries), row_entry


def _pairs_or_default(chosen_index, rejected_index, rows, device):
    if chosen_index is None:
        return default_pairs(rows, device)
    return chosen_index, rejected_index


def eager(hidden, weight, bias=None, *, attention_mask=None, chosen_index=None, rejected_index=None, margin=None,
          reduction="mean"):
    """Baseline: gather the last non-pad token, then the head, then the loss (default pairs, or
    chosen_index/rejected_index [P]): the way people compute it today, without ``pool_score``'s
    invalid-row masking (the benchmarks' baseline)."""
    rewards = head(gather_pooled(hidden, attention_mask=attention_mask), weight, bias)
    chosen, rejected = _pairs_or_default(chosen_index, rejected_index, rewards.shape[0], rewards.device)
    return pair_loss(rewards, chosen, rejected, margin, reduction=reduction), rewards.detach()


def hf_style(hidden, weight, bias=None, *, attention_mask=None, chosen_index=None, rejected_index=None, margin=None,
             reduction="mean"):
    """Baseline as ``*ForSequenceClassification`` does it: head over every token, then gather.

    The head output [N, T, K] is in hidden's dtype, as an ``nn.Linear`` score head would give.
    """
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    pos = pooled_positions(hidden, attention_mask=attention_mask)
    rewards = logits[torch.arange(hidden.shape[0], device=hidden.device), pos].float()
    chosen, rejected = _pairs_or_default(chosen_index, rejected_index, rewards.shape[0], rewards.device)
    loss = pair_loss(rewards, chosen, rejected, margin, reduction=reduction)
    return loss, rewards.detach()
