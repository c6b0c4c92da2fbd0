"""Fake (meta) kernels and autograd for a backend's ops, registered once per OpSet.

The forward ops return the per-pair gradient coefficients, so backward never recomputes
the forward: it hands them, with the loss's incoming gradient, to the backend's single
``pool_backward`` (grad buffer + one pass that scales the coefficients, scatters the pooled rows
and reduces the weight and bias gradients); explicit pairs' entries are first grouped by row
(``OpSet.rows_csr``). ``bt_forward`` takes the loss's reduction, so a mean loss's gradient
reaches the kernel as one value: no kernel expands or multiplies it first.

That backward is not itself differentiable: a backward with ``create_graph=True`` (double
backward, e.g. a gradient penalty) raises instead of silently returning gradients without a
graph; the reference backend supports it.
"""
from __future__ import annotations

import torch

from prefkernels.backends import OpSet
from prefkernels.checks import REDUCTION_CODES, num_rows

_F32, _I64 = torch.float32, torch.int64


def _pool_forward_fake(hidden, weight, bias, attention_mask, last_index, cu_seqlens):
    n = num_rows(hidden, cu_seqlens)
    return hidden.new_empty((n, weight.shape[0]), dtype=_F32), hidden.new_empty((n,), dtype=_I64)


def _bt_forward_fake(hidden, weight, bias, attention_mask, last_index, cu_seqlens, chosen_index,
                     rejected_index, margin, label_smoothing, center_coef, reduction):
    rewards, pooled_pos = _pool_forward_fake(hidden, weight, bias, attention_mask, last_index, cu_seqlens)
    pairs = chosen_index.shape[0] if chosen_index is not None else rewards.shape[0] // 2
    heads = weight.shape[0]
    loss = hidden.new_empty((pairs, heads) if reduction == REDUCTION_CODES["none"] else (), dtype=_F32)
    pair_grad = hidden.new_empty((2, pairs, heads), dtype=_F32)
    return loss, rewards, pair_grad, pooled_pos


def _rows_csr_fake(chosen_index, rejected_index, rows):
    return chosen_index.new_empty((rows + 1,)), chosen_index.new_empty((2 * chosen_index.shape[0],))


def _pool_backward_fake(grad_coef, grad_loss, loss_scale, row_ptr, row_entry, hidden, weight, pooled_pos,
                        need_grad_hidden):
    grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty((0,))
    return grad_hidden, torch.empty_like(weight), hidden.new_empty((weight.shape[0],), dtype=_F32)


_libraries: dict[str, torch.library.Library] = {}  # per namespace, kept alive: they hold the kernels


def register_autograd(ops: OpSet, op: str, backward, setup_context) -> None:
    """What ``torch.library.register_autograd(qualname, backward, setup_context=...)`` registers,
    without its per-call cost. Both put a Python kernel on the op's Autograd key that runs the op
    below autograd inside an ``autograd.Function`` when an input requires grad. torch's kernel
    also rebuilds the op's argument list from its schema on every call (``fill_defaults``, to
    restore arguments left at their defaults; these schemas have none): about 24 us per
    bt_forward call on a 2-core CI machine, a sixth of an eager step's Python."""
    overload = ops.op(op)
    below_autograd = torch._C._after_autograd_keyset

    def run_below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & below_autograd, *args)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):  # the op's arguments, then the dispatch keyset
            output = run_below_autograd(args[-1], args[:-1])
            setup_context(ctx, args[:-1], output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return (*backward(ctx, *grads), None)

    def autograd_kernel(keyset, *args):  # the schemas hold no tensor lists
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Function.apply(*args, keyset)
        return run_below_autograd(keyset, args)

    if ops.namespace not in _libraries:
        _libraries[ops.namespace] = torch.library.Library(ops.namespace, "IMPL")
    _libraries[ops.namespace].impl(ops.prefix + op, autograd_kernel, "Autograd", with_keyset=True)


def register(ops: OpSet) -> None:
    """Register fake kernels and autograd for ``ops``; prefkernels.backends calls it once per OpSet."""
    qualname = ops.qualname
    torch.library.register_fake(qualname("bt_forward"))(_bt_forward_fake)
    torch.library.register_fake(qualname("pool_forward"))(_pool_forward_fake)
    torch.library.register_fake(qualname("pool_backward"))(_pool_backward_fake)
    if ops.defines("rows_csr"):
        torch.library.register_fake(qualname("rows_csr"))(_rows_csr_fake)

    def backward_into_inputs(ctx, hidden, weight, pooled_pos, coef, row_ptr, row_entry, grad_loss=None,
                             loss_scale=1.0):
        """Gradients of hidden, weight, bias from ``coef`` [M, K]: one row per pooled row, or one per
        pair entry with their CSR by row in row_ptr/row_entry; each times ``grad_loss * loss_scale``
        when grad_loss is given ([], or [P, K] with M = 2P). Rows without a valid pooled position
        add nothing to any of them (the kernels skip them)."""
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # backward(create_graph=True)
            raise RuntimeError(f"prefkernels: the {ops.name!r} backend has no double backward (create_graph=True, "
                               "e.g. a gradient penalty); use backend='reference' for it")
        if not (need_hidden or need_weight or need_bias):
            return None, None, None
        grad_hidden, grad_weight, grad_bias = ops.pool_backward(coef, grad_loss, loss_scale, row_ptr, row_entry, hidden,
                                                                weight, pooled_pos, bool(need_hidden))
        return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
                grad_bias.to(ctx.bias_dtype) if need_bias else None)

    def save_head_info(ctx, bias, pooled_pos):
        ctx.set_materialize_grads(False)  # no zero-filled gradients of the outputs without one
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.rows = pooled_pos.shape[0]

    def kept_for_backward(ctx, hidden, pooled_pos):
        """(hidden, pooled_pos) as the backward reads them. Without a gradient for hidden (a frozen
        backbone) only its N pooled rows are kept, as [N, 1, D] with positions 0 (-1 stays -1):
        hidden may then be freed, changed in place or an inference tensor."""
        if ctx.needs_input_grad[0] or hidden.numel() == 0:
            return hidden, pooled_pos
        valid = pooled_pos >= 0
        at = pooled_pos.clamp(min=0)
        rows = hidden[at] if hidden.dim() == 2 else hidden[torch.arange(ctx.rows, device=hidden.device), at]
        return rows.unsqueeze(1), torch.where(valid, 0, -1)

    def pool_setup(ctx, inputs, output):
        hidden, weight, bias = inputs[:3]
        rewards, pooled_pos = output
        save_head_info(ctx, bias, pooled_pos)
        ctx.save_for_backward(*kept_for_backward(ctx, hidden, pooled_pos), weight)
        ctx.mark_non_differentiable(pooled_pos)

    def pool_backward(ctx, grad_rewards, _grad_pos):
        hidden, pooled_pos, weight = ctx.saved_tensors
        grads = backward_into_inputs(ctx, hidden, weight, pooled_pos, grad_rewards.float().contiguous(), None, None)
        return (*grads, None, None, None)

    def bt_setup(ctx, inputs, output):
        hidden, weight, bias = inputs[:3]
        chosen_index, rejected_index, reduction = inputs[6], inputs[7], inputs[11]
        loss, rewards, pair_grad, pooled_pos = output
        save_head_info(ctx, bias, pooled_pos)
        ctx.mean = reduction == REDUCTION_CODES["mean"]
        ctx.save_for_backward(*kept_for_backward(ctx, hidden, pooled_pos), weight, pair_grad, chosen_index,
                              rejected_index)
        ctx.mark_non_differentiable(rewards, pair_grad, pooled_pos)

    def bt_backward(ctx, grad_loss, _grad_rewards, _grad_pair, _grad_pos):
        hidden, pooled_pos, weight, pair_grad, chosen_index, rejected_index = ctx.saved_tensors
        pairs, heads = pair_grad.shape[1], pair_grad.shape[2]
        loss_scale = 1.0 / max(pairs * heads, 1) if ctx.mean else 1.0
        row_ptr, row_entry = ops.rows_csr(chosen_index, rejected_index, ctx.rows)
        grads = backward_into_inputs(ctx, hidden, weight, pooled_pos, pair_grad.reshape(-1, heads), row_ptr, row_entry,
                                     grad_loss.float().contiguous(), loss_scale)
        return (*grads, None, None, None, None, None, None, None, None, None)

    register_autograd(ops, "pool_forward", pool_backward, pool_setup)
    register_autograd(ops, "bt_forward", bt_backward, bt_setup)
