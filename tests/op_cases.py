"""Random inputs for the op tests and the compare-with-float64-reference helper."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import prefkernels
from prefkernels import reference

# Tolerances (rtol, atol) of an output stored in a dtype, vs the float64 reference.
# Values computed in fp32 from exact inputs; the output dtype's rounding dominates. atol is
# scaled by the largest expected magnitude (sums of cancelling terms, e.g. grad_bias).
TOLERANCE = {
    torch.float32: (1e-5, 5e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-4),
}


@dataclass(frozen=True)
class Case:
    """One op configuration. ``pooling``: mask_right, mask_left, mask_bool, last_index, cu_seqlens."""

    dtype: torch.dtype = torch.float32
    heads: int = 1
    rows: int = 6
    positions: int = 7
    dim: int = 37
    pooling: str = "mask_right"
    weight_fp32: bool = True
    bias: bool = True
    pairs: str = "default"          # default | explicit | shared (a row in several pairs)
    margin: bool = False
    label_smoothing: float = 0.0
    center_coef: float = 0.0
    reduction: str = "mean"
    layout: str = "contiguous"      # contiguous | strided_t | transposed

    def with_(self, **kw) -> "Case":
        return replace(self, **kw)

    def __str__(self):
        return "-".join(f"{k}={v}" for k, v in self.__dict__.items())


def make_inputs(case: Case, device="cpu", seed=0) -> dict:
    """Tensors and kwargs for ``fused_bt_loss`` (random, never zeros). Strided and transposed
    layouts are made on ``device`` (moving a strided tensor would make it contiguous)."""
    g = torch.Generator().manual_seed(seed)
    N, T, D, K = case.rows, case.positions, case.dim, case.heads
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    if case.pooling == "cu_seqlens":
        cu = torch.zeros(N + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        hidden = torch.randn(int(cu[-1]), D, generator=g)
        pool = {"cu_seqlens": cu}
    else:
        if case.layout == "strided_t":
            hidden = torch.randn(N, 2 * T, D, generator=g).to(device, case.dtype)[:, ::2]
        elif case.layout == "transposed":
            hidden = torch.randn(T, N, D, generator=g).to(device, case.dtype).transpose(0, 1)
        else:
            hidden = torch.randn(N, T, D, generator=g)
        pos = torch.arange(T)
        if case.pooling == "mask_left":
            mask = (pos >= (T - lengths).unsqueeze(1)).long()
        else:
            mask = (pos < lengths.unsqueeze(1)).long()
        if case.pooling == "mask_bool":
            pool = {"attention_mask": mask.bool()}
        elif case.pooling == "last_index":
            pool = {"last_index": lengths - 1}
        else:
            pool = {"attention_mask": mask}
    hidden = hidden.to(case.dtype)  # a no-op for the layouts made on the device in their dtype
    wdtype = torch.float32 if case.weight_fp32 else case.dtype
    weight = (torch.randn(K, D, generator=g) / D ** 0.5).to(wdtype)
    bias = torch.randn(K, generator=g).to(wdtype) if case.bias else None
    kwargs = dict(pool)
    P = N // 2
    if case.pairs == "explicit":
        perm = torch.randperm(N, generator=g)
        kwargs.update(chosen_index=perm[:P], rejected_index=perm[P:2 * P])
    elif case.pairs == "shared":
        P = N + 1
        kwargs.update(chosen_index=torch.randint(0, N, (P,), generator=g),
                      rejected_index=torch.randint(0, N, (P,), generator=g))
        kwargs["chosen_index"][:2] = 0
    if case.margin:
        kwargs["margin"] = torch.rand(P, generator=g) * 2
    kwargs.update(label_smoothing=case.label_smoothing, center_coef=case.center_coef, reduction=case.reduction)
    out = {"hidden": hidden, "weight": weight, "bias": bias, "kwargs": kwargs}
    return to_device(out, device)


def to_device(inputs: dict, device) -> dict:
    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v
    return {"hidden": move(inputs["hidden"]), "weight": move(inputs["weight"]),
            "bias": move(inputs["bias"]), "kwargs": {k: move(v) for k, v in inputs["kwargs"].items()}}


def poison_allocator(device, sizes=(1 << 10, 1 << 16, 1 << 20, 1 << 24)) -> None:
    """Fill and free blocks so freshly allocated outputs start as NaN, not zeros."""
    blocks = [torch.full((n,), float("nan"), device=device) for n in sizes]
    del blocks


def run_op(fn, inputs: dict, upstream_seed=1):
    """Forward + backward through ``fn`` (fused_bt_loss-like); returns outputs and grads."""
    hidden = inputs["hidden"].detach().clone().requires_grad_()
    weight = inputs["weight"].detach().clone().requires_grad_()
    bias = inputs["bias"].detach().clone().requires_grad_() if inputs["bias"] is not None else None
    loss, rewards = fn(hidden, weight, bias, **inputs["kwargs"])
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(loss.shape, generator=g).to(loss.device) + 0.5
    (loss * upstream).sum().backward()
    return {"loss": loss.detach(), "rewards": rewards.detach(), "grad_hidden": hidden.grad,
            "grad_weight": weight.grad, "grad_bias": None if bias is None else bias.grad}


def reference_float64(inputs: dict):
    """The reference on float64 copies of the inputs: the ground truth for every backend."""
    def up(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    up_inputs = {"hidden": up(inputs["hidden"]), "weight": up(inputs["weight"]), "bias": up(inputs["bias"]),
                 "kwargs": {k: up(v) for k, v in inputs["kwargs"].items()}}
    return run_op(reference.fused_bt_loss, up_inputs)


def assert_matches(result: dict, expected: dict, inputs: dict, what=""):
    """Compare each output with the float64 reference at the tolerance of its dtype."""
    for name, value in result.items():
        want = expected[name]
        if want is None:
            assert value is None, f"{what}{name}: expected None"
            continue
        assert value is not None, f"{what}{name}: missing"
        assert value.shape == want.shape, f"{what}{name}: shape {tuple(value.shape)} != {tuple(want.shape)}"
        if name == "grad_hidden":
            dtype = inputs["hidden"].dtype
        elif name in ("grad_weight", "grad_bias"):
            dtype = inputs["weight"].dtype
        else:
            dtype = torch.float32
        assert value.dtype == dtype, f"{what}{name}: dtype {value.dtype} != {dtype}"
        rtol, atol = TOLERANCE[dtype]
        scale = max(1.0, float(want.abs().nan_to_num().max())) if want.numel() else 1.0
        torch.testing.assert_close(value.double().cpu(), want.cpu(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}{name}: {m}")


def public(backend):
    def fn(hidden, weight, bias, **kwargs):
        return prefkernels.fused_bt_loss(hidden, weight, bias, backend=backend, **kwargs)
    return fn


def opcheck_ops(ops, args):
    """torch.library.opcheck of the three ops of ``ops`` (an OpSet) on ``args``, bt_forward's tensor
    arguments (hidden, weight, bias requiring grad, then attention_mask, last_index, cu_seqlens,
    chosen_index, rejected_index, margin): bt_forward with each reduction, pool_forward, and
    pool_backward with per-row coefficients and with bt_forward's pair entries times a loss
    gradient of one value and of one value per pair; and rows_csr where ``ops`` defines it."""
    from prefkernels.checks import REDUCTION_CODES
    for reduction in REDUCTION_CODES.values():
        torch.library.opcheck(ops.bt_forward, (*args, 0.1, 0.01, reduction))
    torch.library.opcheck(ops.pool_forward, args[:6])
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    hidden, weight = detached[:2]
    rewards, pooled_pos = ops.pool_forward(*detached[:6])
    torch.library.opcheck(ops.pool_backward, (torch.randn_like(rewards), None, 1.0, None, None, hidden, weight,
                                              pooled_pos, True))
    loss, _, pair_grad, _ = ops.bt_forward(*detached, 0.1, 0.01, REDUCTION_CODES["none"])
    csr = ops.rows_csr(*detached[6:8], rewards.shape[0])
    if ops.defines("rows_csr") and detached[6] is not None:
        torch.library.opcheck(ops.op("rows_csr"), (*detached[6:8], rewards.shape[0]))
    entries = pair_grad.reshape(-1, pair_grad.shape[-1])
    for grad_loss, scale in ((torch.randn((), device=loss.device), 1.0 / loss.numel()), (torch.randn_like(loss), 1.0)):
        torch.library.opcheck(ops.pool_backward, (entries, grad_loss, scale, *csr, hidden, weight, pooled_pos, True))
