"""Public ops: ``fused_bt_loss`` and ``pool_score``.

Each validates its inputs (clear errors naming the argument), picks a backend in one place
(``prefkernels.backends.select``) and runs it. Shapes and dtypes:

- hidden: [N, T, D] padded, or [total, D] packed with ``cu_seqlens``; float32/bfloat16/float16.
- weight: [K, D] float32 or hidden's dtype; bias: [K] in weight's dtype, or None.
- rewards: [N, K] float32. loss: float32 scalar, or [P, K] with ``reduction="none"``.
"""
from __future__ import annotations

from prefkernels import backends, checks, reference


def fused_bt_loss(hidden, weight, bias=None, *, attention_mask=None, last_index=None, cu_seqlens=None,
                  chosen_index=None, rejected_index=None, margin=None, label_smoothing=0.0, center_coef=0.0,
                  reduction="mean", backend=None):
    """Last-token pooling + K-head reward + pairwise Bradley-Terry loss, fused.

    Returns ``(loss, rewards)``. ``loss`` is differentiable w.r.t. hidden, weight and bias;
    ``rewards`` [N, K] is returned for logging and carries no gradient (use ``pool_score``
    for differentiable rewards). Pairs default to TRL's concatenation (rows [0, N/2) chosen,
    [N/2, N) rejected); pass ``chosen_index``/``rejected_index`` [P] for any other pairing.
    """
    inputs = checks.check_pooling(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    inputs = checks.check_pairs(inputs, chosen_index, rejected_index, margin, label_smoothing, center_coef,
                                reduction)
    ops = backends.select(backend, hidden.device)
    if ops is None:
        checks.check_values(inputs)
        return reference.fused_bt_loss(
            inputs.hidden, inputs.weight, inputs.bias, attention_mask=inputs.attention_mask,
            last_index=inputs.last_index, cu_seqlens=inputs.cu_seqlens, chosen_index=inputs.chosen_index,
            rejected_index=inputs.rejected_index, margin=inputs.margin, label_smoothing=float(label_smoothing),
            center_coef=float(center_coef), reduction=reduction)
    checks.refuse_function_transforms(ops.name, inputs)
    loss, rewards, _, pooled_pos = ops.bt_forward(
        inputs.hidden, inputs.weight, inputs.bias, inputs.attention_mask, inputs.last_index, inputs.cu_seqlens,
        inputs.chosen_index, inputs.rejected_index, inputs.margin, float(label_smoothing), float(center_coef),
        checks.REDUCTION_CODES[reduction])
    checks.check_values(inputs, pooled_pos)
    return loss, rewards


def pool_score(hidden, weight, bias=None, *, attention_mask=None, last_index=None, cu_seqlens=None,
               backend=None):
    """Rewards [N, K] float32 of the pooled (last) token of each row; differentiable."""
    inputs = checks.check_pooling(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    ops = backends.select(backend, hidden.device)
    if ops is None:
        checks.check_values(inputs)
        return reference.pool_score(inputs.hidden, inputs.weight, inputs.bias, attention_mask=inputs.attention_mask,
                                    last_index=inputs.last_index, cu_seqlens=inputs.cu_seqlens)
    checks.refuse_function_transforms(ops.name, inputs)
    rewards, pooled_pos = ops.pool_forward(inputs.hidden, inputs.weight, inputs.bias, inputs.attention_mask,
                                           inputs.last_index, inputs.cu_seqlens)
    checks.check_values(inputs, pooled_pos)
    return rewards
