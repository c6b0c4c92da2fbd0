"""Input validation for the public ops: every bad input becomes a ValueError/TypeError that
names the argument and what was expected.

Shape, dtype and device checks are free (metadata only) and always run. Value checks (index
ranges, empty mask rows, monotonic cu_seqlens) need one device-to-host sync; they run in eager
mode and are skipped while ``torch.compile`` traces or when env ``PREFKERNELS_CHECK_VALUES=0``
(a hot GPU loop that wants no sync). The kernels never read out of bounds: an invalid pooled
row or pair yields NaN rewards/loss and a zero gradient, and a row without a valid pooled
position gets ``pooled_pos = -1``. So kernel backends are checked after the op, on that small
output, instead of scanning the mask: the inputs are re-read only to word an error.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.int32, torch.int64)
INDEX_DTYPES = (torch.int32, torch.int64)
# The public op's reductions, with their code in bt_forward's `reduction` argument (csrc/op_args.h).
REDUCTION_CODES = {"mean": 1, "sum": 2, "none": 0}
REDUCTIONS = tuple(REDUCTION_CODES)
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class OpInputs:
    """Normalized op inputs: indices int64, margin float32, small tensors contiguous."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    attention_mask: torch.Tensor | None
    last_index: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    chosen_index: torch.Tensor | None = None
    rejected_index: torch.Tensor | None = None
    margin: torch.Tensor | None = None


def is_real(value) -> bool:
    """A Python or NumPy number, not a bool (nor a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_nonnegative(value) -> bool:
    """``0 <= value < inf`` (False for NaN). Plain comparisons rather than math.isfinite: under
    torch.compile with dynamic shapes a float argument is symbolic, and comparisons are what it
    can guard on."""
    return 0.0 <= value < math.inf


def refuse_function_transforms(backend: str, inputs: OpInputs) -> None:
    """The kernel backends' autograd (an autograd.Function) has neither a forward-mode rule nor
    torch.func support: refuse dual or functorch-wrapped inputs rather than drop their tangents."""
    if torch.compiler.is_compiling():
        return
    tensors = [t for t in vars(inputs).values() if isinstance(t, torch.Tensor)]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        what = "torch.func transforms (grad, vmap, jvp, jacrev, ...)"
    elif forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        what = "forward-mode AD (dual tensors)"
    else:
        return
    raise RuntimeError(f"prefkernels: the backend {backend!r} does not support {what}; use backend='reference' "
                       "for them")


_checked_by_caller = contextvars.ContextVar("prefkernels_values_checked_by_caller", default=False)


@contextlib.contextmanager
def values_checked_by_caller():
    """Skip the value checks (and their host sync) inside the block: for a caller that builds the
    pooling inputs itself so that they are valid, e.g. masks from ``pad_rows`` of non-empty rows."""
    token = _checked_by_caller.set(True)
    try:
        yield
    finally:
        _checked_by_caller.reset(token)


def value_checks_enabled() -> bool:
    """False while torch.compile traces, with env PREFKERNELS_CHECK_VALUES=0, inside
    ``values_checked_by_caller``, or inside a torch.func transform (whose wrapped tensors cannot be
    read on the host: torch 2.6 fails there)."""
    return (not torch.compiler.is_compiling() and os.environ.get("PREFKERNELS_CHECK_VALUES", "1") != "0"
            and not _checked_by_caller.get() and torch._C._functorch.peek_interpreter_stack() is None)


def holds_values(tensor: torch.Tensor) -> bool:
    """False for tensors that carry shapes only (meta, fake): their values cannot be checked."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type != "meta" and not is_fake(tensor)


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _require_device(name, value, device):
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of hidden), got {value.device}")


def _require_shape(name, value, shape, meaning):
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)} ({meaning}), got {list(value.shape)}")


def _require_index_dtype(name, value):
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {value.dtype}")


def check_pooling(hidden, weight, bias, attention_mask, last_index, cu_seqlens) -> OpInputs:
    """Validate hidden, the head and the pooling spec; return normalized inputs."""
    _require_tensor("hidden", hidden)
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden: expected float32, bfloat16 or float16, got {hidden.dtype}")
    device = hidden.device
    specs = [name for name, v in (("attention_mask", attention_mask), ("last_index", last_index),
                                  ("cu_seqlens", cu_seqlens)) if v is not None]
    if len(specs) != 1:
        raise ValueError("pooling: pass exactly one of attention_mask, last_index or cu_seqlens, "
                         f"got {specs or 'none'}")
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden: with cu_seqlens expected a packed [total, D] tensor, got shape {list(hidden.shape)}")
    elif hidden.dim() != 3:
        raise ValueError(f"hidden: expected a padded [N, T, D] tensor with {specs[0]}, got shape {list(hidden.shape)}")
    if hidden.shape[-1] == 0 or hidden.shape[0] == 0 or (hidden.dim() == 3 and hidden.shape[1] == 0):
        raise ValueError(f"hidden: empty batch, got shape {list(hidden.shape)}")
    if hidden.stride(-1) != 1:
        raise ValueError(f"hidden: last dimension must be contiguous (stride 1), got strides {list(hidden.stride())}")
    D = hidden.shape[-1]

    _require_tensor("weight", weight)
    _require_device("weight", weight, device)
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != D:
        raise ValueError(f"weight: expected shape [K, {D}] with K >= 1 (D of hidden is {D}), got {list(weight.shape)}")
    if weight.dtype not in (torch.float32, hidden.dtype):
        raise TypeError(f"weight: expected float32 or hidden's dtype {hidden.dtype}, got {weight.dtype}")
    K = weight.shape[0]
    if bias is not None:
        _require_tensor("bias", bias)
        _require_device("bias", bias, device)
        _require_shape("bias", bias, [K], "one per head of weight")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected weight's dtype {weight.dtype}, got {bias.dtype}")

    if attention_mask is not None:
        _require_tensor("attention_mask", attention_mask)
        _require_device("attention_mask", attention_mask, device)
        _require_shape("attention_mask", attention_mask, hidden.shape[:2], "[N, T] of hidden")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask: expected a bool or integer tensor, got {attention_mask.dtype}")
        if attention_mask.dtype not in MASK_DTYPES:
            attention_mask = attention_mask != 0
        attention_mask = attention_mask.contiguous()
    if last_index is not None:
        _require_tensor("last_index", last_index)
        _require_device("last_index", last_index, device)
        _require_index_dtype("last_index", last_index)
        _require_shape("last_index", last_index, hidden.shape[:1], "one position per row of hidden")
        last_index = last_index.long().contiguous()
    if cu_seqlens is not None:
        _require_tensor("cu_seqlens", cu_seqlens)
        _require_device("cu_seqlens", cu_seqlens, device)
        _require_index_dtype("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {list(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.long().contiguous()
    return OpInputs(hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
                    attention_mask, last_index, cu_seqlens)


def num_rows(hidden, cu_seqlens) -> int:
    """N, the number of pooled rows."""
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1
    return hidden.shape[0]


def check_pairs(inputs: OpInputs, chosen_index, rejected_index, margin, label_smoothing,
                center_coef, reduction) -> OpInputs:
    """Validate the pair spec and loss options; fill them into ``inputs``."""
    device = inputs.hidden.device
    N = num_rows(inputs.hidden, inputs.cu_seqlens)
    if (chosen_index is None) != (rejected_index is None):
        raise ValueError("chosen_index/rejected_index: pass both or neither, got only "
                         + ("chosen_index" if chosen_index is not None else "rejected_index"))
    if chosen_index is None:
        if N % 2 or N < 2:
            raise ValueError(f"hidden: default pairing (rows [0, N/2) chosen, [N/2, N) rejected) needs an even N >= 2, got N={N}")
        P = N // 2
    else:
        for name, idx in (("chosen_index", chosen_index), ("rejected_index", rejected_index)):
            _require_tensor(name, idx)
            _require_device(name, idx, device)
            _require_index_dtype(name, idx)
            if idx.dim() != 1 or idx.shape[0] == 0:
                raise ValueError(f"{name}: expected a non-empty 1-D [P] tensor, got shape {list(idx.shape)}")
        if chosen_index.shape != rejected_index.shape:
            raise ValueError(f"chosen_index/rejected_index: expected the same length P, got "
                             f"{chosen_index.shape[0]} and {rejected_index.shape[0]}")
        P = chosen_index.shape[0]
        chosen_index = chosen_index.long().contiguous()
        rejected_index = rejected_index.long().contiguous()
    if margin is not None:
        _require_tensor("margin", margin)
        _require_device("margin", margin, device)
        if not margin.dtype.is_floating_point:
            raise TypeError(f"margin: expected a floating-point tensor, got {margin.dtype}")
        _require_shape("margin", margin, [P], "one margin per pair")
        margin = margin.detach().float().contiguous()  # a constant of the loss: no gradient on any backend
    for name, value in (("label_smoothing", label_smoothing), ("center_coef", center_coef)):
        if not is_real(value):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not 0.0 <= label_smoothing <= 0.5:  # NaN fails it too
        raise ValueError(f"label_smoothing: expected a float in [0, 0.5], got {label_smoothing!r}")
    if not is_finite_nonnegative(center_coef) or not center_coef <= FLOAT32_MAX:  # the kernels' fp32
        raise ValueError(f"center_coef: expected a float in [0, {FLOAT32_MAX:.4g}] (finite in float32), got "
                         f"{center_coef!r:.40}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    inputs.chosen_index, inputs.rejected_index, inputs.margin = chosen_index, rejected_index, margin
    return inputs


def check_values(inputs: OpInputs, pooled_pos: torch.Tensor | None = None) -> None:
    """Data-dependent checks with a single host sync; skipped under torch.compile.

    ``pooled_pos`` [N] int64: a kernel's pooled position per row (-1: none valid). Given, the
    attention_mask / last_index checks read its minimum instead of the inputs (one reduction
    over N rather than over N*T); the inputs are examined only to word the error."""
    hidden = inputs.hidden
    if not value_checks_enabled() or not holds_values(hidden):
        return
    N = num_rows(hidden, inputs.cu_seqlens)
    names: list[str] = []
    values: list[torch.Tensor] = []  # 0-dim tensors, fetched together

    def need(name, *tensors):
        names.extend(f"{name}:{i}" for i in range(len(tensors)))
        values.extend(tensors)

    if pooled_pos is not None and (inputs.attention_mask is not None or inputs.last_index is not None):
        need("pooled_pos", pooled_pos.min())
    elif inputs.attention_mask is not None:
        need("mask_rows_set", inputs.attention_mask.any(dim=1).all())
    elif inputs.last_index is not None:
        need("last_index", *torch.aminmax(inputs.last_index))
    if inputs.cu_seqlens is not None:
        cu = inputs.cu_seqlens
        need("cu_seqlens", cu[0], cu[-1], (cu[1:] - cu[:-1]).min())
    for name in ("chosen_index", "rejected_index"):
        idx = getattr(inputs, name)
        if idx is not None:
            need(name, *torch.aminmax(idx))
    if not values:
        return
    fetched = [values[0].item()] if len(values) == 1 else torch.stack([v.long() for v in values]).tolist()
    got = dict(zip(names, fetched))
    if got.get("pooled_pos:0", 0) < 0:
        check_values(inputs)  # a row has no valid pooled position: find and name it
    if "mask_rows_set:0" in got and not got["mask_rows_set:0"]:
        row = int((~inputs.attention_mask.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"attention_mask: every row needs at least one 1 (the pooled token), row {row} has none")
    T = hidden.shape[1] if hidden.dim() == 3 else None
    if "last_index:0" in got and (got["last_index:0"] < 0 or got["last_index:1"] >= T):
        raise ValueError(f"last_index: expected values in [0, {T}) (T of hidden), got "
                         f"min {got['last_index:0']}, max {got['last_index:1']}")
    if "cu_seqlens:0" in got:
        if got["cu_seqlens:2"] < 1:
            raise ValueError("cu_seqlens: expected strictly increasing offsets (every sequence non-empty), got "
                             f"{inputs.cu_seqlens.tolist()[:16]}")
        if got["cu_seqlens:0"] < 0 or got["cu_seqlens:1"] > hidden.shape[0]:
            raise ValueError(f"cu_seqlens: expected offsets in [0, {hidden.shape[0]}] (rows of packed hidden), got "
                             f"first {got['cu_seqlens:0']}, last {got['cu_seqlens:1']}")
    for name in ("chosen_index", "rejected_index"):
        if f"{name}:0" in got and (got[f"{name}:0"] < 0 or got[f"{name}:1"] >= N):
            raise ValueError(f"{name}: expected row indices in [0, {N}), got min {got[f'{name}:0']}, "
                             f"max {got[f'{name}:1']}")
