"""Every kernel backend against the float64 reference: forward and all gradients over a table of
dtypes x heads x options, plus gradcheck, opcheck, torch.compile and numerics."""
import inspect
import os
import subprocess
import sys
import zlib

import pytest
import torch

import prefkernels
from prefkernels import backends, reference
from op_cases import (Case, assert_matches, make_inputs, opcheck_ops, poison_allocator, public, reference_float64,
                      run_op)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# One option varied at a time from the base case; crossed with dtype and K below.
VARIANTS = {
    "base": {},
    "mask_left": {"pooling": "mask_left"},
    "mask_bool": {"pooling": "mask_bool"},
    "last_index": {"pooling": "last_index"},
    "cu_seqlens": {"pooling": "cu_seqlens"},
    "explicit_pairs": {"pairs": "explicit"},
    "shared_rows": {"pairs": "shared"},
    "margin": {"margin": True},
    "label_smoothing": {"label_smoothing": 0.2},
    "centering": {"center_coef": 0.05},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "strided_t": {"layout": "strided_t"},
    "transposed": {"layout": "transposed"},
    "weight_like_hidden": {"weight_fp32": False},
    "no_bias": {"bias": False},
    "two_rows": {"rows": 2},
    "wide_dim": {"dim": 4099, "positions": 3},
    "everything": {"pooling": "mask_left", "pairs": "shared", "margin": True, "label_smoothing": 0.1,
                   "center_coef": 0.01, "reduction": "none", "layout": "strided_t", "weight_fp32": False},
}

# Triton runs in the (slow) interpreter on CPU: it gets the same table with smaller D.
KERNEL_BACKENDS = ["native", "triton"]


def require_backend(name, device):
    ops = backends.select(name, torch.device(device))
    if ops is None or ops.name != name:
        pytest.skip(f"backend {name!r} not available on {device}: {backends.why_unavailable(name, torch.device(device))}")


def shrink_for(backend, case):
    if backend == "triton" and case.dim > 256:
        return case.with_(dim=131)
    return case


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backend_matches_float64_reference(backend, variant, dtype, heads):
    require_backend(backend, "cpu")
    case = shrink_for(backend, Case(dtype=dtype, heads=heads).with_(**VARIANTS[variant]))
    inputs = make_inputs(case, seed=zlib.crc32(variant.encode()) % 1000)
    expected = reference_float64(inputs)
    poison_allocator("cpu")
    result = run_op(public(backend), inputs)
    assert_matches(result, expected, inputs, what=f"{backend} {case}: ")


@pytest.mark.parametrize("variant", ["base", "cu_seqlens", "shared_rows", "everything"])
def test_reference_backend_matches_float64(variant):
    case = Case(dtype=torch.bfloat16, heads=3).with_(**VARIANTS[variant])
    inputs = make_inputs(case)
    assert_matches(run_op(public("reference"), inputs), reference_float64(inputs), inputs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("pooling", ["mask_right", "mask_left", "last_index", "cu_seqlens"])
def test_pool_score_matches_reference(backend, pooling):
    require_backend(backend, "cpu")
    inputs = make_inputs(Case(heads=3, pooling=pooling, layout="strided_t" if pooling != "cu_seqlens" else "contiguous"))
    pool = {k: v for k, v in inputs["kwargs"].items() if k in ("attention_mask", "last_index", "cu_seqlens")}
    results = {}
    for name in (backend, "reference64"):
        h = inputs["hidden"].detach().clone()
        w, b = inputs["weight"].detach().clone(), inputs["bias"].detach().clone()
        if name == "reference64":
            h, w, b = h.double(), w.double(), b.double()
        for t in (h, w, b):
            t.requires_grad_()
        if name == "reference64":
            rewards = reference.pool_score(h, w, b, **pool)
        else:
            rewards = prefkernels.pool_score(h, w, b, backend=backend, **pool)
        upstream = torch.linspace(-1, 2, rewards.numel(), dtype=rewards.dtype).view_as(rewards)
        (rewards * upstream).sum().backward()
        results[name] = (rewards.detach(), h.grad, w.grad, b.grad)
    for got, want in zip(results[backend], results["reference64"]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_gradcheck_reference_float64():
    case = Case(heads=2, pairs="shared", margin=True, label_smoothing=0.1, center_coef=0.05, reduction="none")
    inputs = make_inputs(case)
    hidden = inputs["hidden"].double().requires_grad_()
    weight = inputs["weight"].double().requires_grad_()
    bias = inputs["bias"].double().requires_grad_()
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inputs["kwargs"].items()}
    assert torch.autograd.gradcheck(lambda h, w, b: reference.fused_bt_loss(h, w, b, **kwargs)[0],
                                    (hidden, weight, bias))
    pool = {"attention_mask": kwargs["attention_mask"]}
    assert torch.autograd.gradcheck(lambda h, w, b: reference.pool_score(h, w, b, **pool), (hidden, weight, bias))


@pytest.mark.parametrize("baseline", ["eager", "hf_style"])
@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_benchmark_baselines_match_the_reference(baseline, pairs):
    """The benchmarks' baselines compute the same loss and gradients as the reference, with default
    and explicit pairs (a row in several pairs), so every method times the same computation."""
    inputs = make_inputs(Case(heads=2, rows=8, pairs=pairs, pooling="mask_left"), seed=9)
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k in ("attention_mask", "chosen_index", "rejected_index")}
    results = [run_op(lambda h, w, b, fn=fn, **kw: fn(h, w, b, **kw), {**inputs, "kwargs": kwargs})
               for fn in (getattr(reference, baseline), reference.fused_bt_loss)]
    for name, got in results[0].items():
        torch.testing.assert_close(got, results[1][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_rewards_carry_no_gradient_but_pool_score_does():
    inputs = make_inputs(Case())
    hidden = inputs["hidden"].requires_grad_()
    loss, rewards = prefkernels.fused_bt_loss(hidden, inputs["weight"], inputs["bias"], **inputs["kwargs"])
    assert loss.requires_grad and not rewards.requires_grad
    scored = prefkernels.pool_score(hidden, inputs["weight"], attention_mask=inputs["kwargs"]["attention_mask"])
    assert scored.requires_grad
    torch.testing.assert_close(scored[:, 0] + inputs["bias"][0], rewards[:, 0])


def test_grad_hidden_is_zero_except_pooled_rows():
    inputs = make_inputs(Case(rows=4, positions=9, pooling="mask_left"))
    result = run_op(public("native"), inputs)
    nonzero_rows = result["grad_hidden"].abs().sum(-1) != 0
    assert nonzero_rows.sum(1).tolist() == [1, 1, 1, 1]
    assert nonzero_rows[:, -1].all()  # left padding: the last position is pooled


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_large_reward_gaps_stay_finite(backend):
    inputs = make_inputs(Case(heads=2, label_smoothing=0.1, reduction="none"))
    with torch.no_grad():
        inputs["bias"].copy_(torch.tensor([0.0, 0.0]))
        inputs["hidden"][:3] *= 1e4 / inputs["hidden"][:3].abs().max()
        inputs["hidden"][3:] *= -1e4 / inputs["hidden"][3:].abs().max()
        inputs["weight"].copy_(torch.ones_like(inputs["weight"]))
    result = run_op(public(backend), inputs)
    rewards = result["rewards"]
    assert (rewards[:3] - rewards[3:]).abs().max() > 1e3
    for name in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
        assert torch.isfinite(result[name]).all(), name


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nan_in_pooled_row_propagates_and_padding_nan_does_not(backend):
    inputs = make_inputs(Case(rows=4, positions=6, pooling="mask_right"))
    mask = inputs["kwargs"]["attention_mask"]
    hidden = inputs["hidden"]
    padded = mask == 0
    if padded.any():
        hidden[padded] = float("nan")
        loss, _ = prefkernels.fused_bt_loss(hidden, inputs["weight"], inputs["bias"], backend=backend, **inputs["kwargs"])
        assert torch.isfinite(loss)
    hidden[0, 5] = float("nan")  # row 0 has full length: its pooled token is position 5
    loss, rewards = prefkernels.fused_bt_loss(hidden, inputs["weight"], inputs["bias"], backend=backend, **inputs["kwargs"])
    assert torch.isnan(loss) and torch.isnan(rewards[0]).all()


def test_native_backward_is_deterministic():
    inputs = make_inputs(Case(heads=3, rows=64, positions=16, dim=512, pairs="shared"))
    first, second = run_op(public("native"), inputs), run_op(public("native"), inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _op_args(case):
    inputs = make_inputs(case)
    kw = inputs["kwargs"]
    mask = kw.get("attention_mask")
    return (inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["bias"].requires_grad_(),
            mask, kw.get("last_index"), None if kw.get("cu_seqlens") is None else kw["cu_seqlens"].long(),
            kw.get("chosen_index"), kw.get("rejected_index"), kw.get("margin"))


@pytest.mark.parametrize("case", [Case(heads=2), Case(pairs="shared", margin=True, pooling="cu_seqlens"),
                                  Case(dtype=torch.bfloat16, weight_fp32=False, pooling="last_index")], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_ops(backend, case):
    require_backend(backend, "cpu")
    opcheck_ops(backends.select(backend, torch.device("cpu")), _op_args(shrink_for(backend, case)))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction):
    inputs = make_inputs(Case(heads=2, pairs="explicit", margin=True, center_coef=0.01, reduction=reduction))

    def step(hidden, weight, bias, kwargs):
        loss, rewards = prefkernels.fused_bt_loss(hidden, weight, bias, backend="native", **kwargs)
        scored = prefkernels.pool_score(hidden, weight, bias, backend="native",
                                        attention_mask=kwargs["attention_mask"])
        return loss.sum() + scored.square().mean(), rewards

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if reduction == "mean" else "aot_eager")
    grads = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        hidden = inputs["hidden"].clone().requires_grad_()
        weight = inputs["weight"].clone().requires_grad_()
        out, rewards = fn(hidden, weight, inputs["bias"], inputs["kwargs"])
        out.backward()
        grads[name] = (out.detach(), rewards, hidden.grad, weight.grad)
    for got, want in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


COMPILED_FALLBACK_FIRST = r"""
import os, torch, prefkernels
f = torch.compile(lambda h, w, m: prefkernels.fused_bt_loss(h, w, attention_mask=m, backend="triton")[0],
                  fullgraph=True)
h, w, m = torch.randn(4, 5, 8), torch.randn(1, 8), torch.ones(4, 5, dtype=torch.long)
torch.testing.assert_close(f(h, w, m), prefkernels.fused_bt_loss(h, w, attention_mask=m, backend="native")[0])
print("ok")
"""


def test_compiled_first_call_that_falls_back_to_another_backend():
    """backend='triton' on CPU tensors (no interpreter) falls back to native: also when the first
    call is traced by torch.compile(fullgraph=True), where the fallback's warning and Triton's
    loading must stay out of the trace."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILED_FALLBACK_FIRST], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]


COMPILED_FIRST = r"""
import torch, prefkernels
head = prefkernels.RewardHead(8, num_heads=2)
loss_fn = torch.compile(lambda h, idx, coef: prefkernels.fused_bt_loss(h, head.weight, head.bias, last_index=idx,
                                                                        center_coef=coef)[0],
                        fullgraph=True, dynamic=True, backend="aot_eager")
h = torch.randn(4, 3, 8, requires_grad=True)
for coef in (0.1, 0.2):
    loss = loss_fn(h, torch.tensor([2, 0, 1, 2]), coef)
    want, _ = prefkernels.fused_bt_loss(h, head.weight, head.bias, last_index=torch.tensor([2, 0, 1, 2]),
                                        center_coef=coef, backend="reference")
    torch.testing.assert_close(loss, want)
loss.backward()
assert h.grad is not None and torch.isfinite(h.grad).all()
print("ok")
"""


def test_compiled_first_call_with_symbolic_options():
    """torch.compile(fullgraph=True) of the very first call in a process (the backends load at
    import, not inside the traced call), with dynamic shapes and a float option that changes."""
    result = subprocess.run([sys.executable, "-c", COMPILED_FIRST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.parametrize("huge_pages", ["0", "1"])
def test_native_grad_buffer_is_zero_outside_pooled_rows_with_either_allocator(monkeypatch, huge_pages):
    """The CPU grad buffer comes from calloc, or from PyTorch's allocator with THP_MEM_ALLOC_ENABLE=1."""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", huge_pages)
    inputs = make_inputs(Case(rows=8, positions=512, dim=2048, pooling="mask_left"))  # 32 MiB: an mmap block
    poison_allocator("cpu", sizes=(1 << 23,))
    result = run_op(public("native"), inputs)
    assert_matches(result, reference_float64(inputs), inputs)
    grad = result["grad_hidden"]
    assert grad[:, :-1].abs().max() == 0 and (grad[:, -1].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.2.0", "2.4.1", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False)])
def test_broken_triton_interpreter_degrades_to_native_with_the_reason(monkeypatch, triton_version, numpy_version,
                                                                      broken):
    triton = pytest.importorskip("triton")
    import numpy
    if backends.native_ops() is None:
        pytest.skip("prefkernels._C is not built")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setattr(backends, "_warned", set())
    problem = backends.triton_interpreter_problem()
    assert (problem is not None) == broken
    if not broken:
        assert backends.select("triton", torch.device("cpu")).name == "triton"
        return
    assert "numpy<2.4" in problem and triton_version in problem
    with pytest.warns(RuntimeWarning, match=r"backend 'triton' is unavailable for cpu tensors .*numpy<2\.4.*using 'native'"):
        ops = backends.select("triton", torch.device("cpu"))
    assert ops.name == "native"


def test_a_fallback_warning_names_the_callers_line(monkeypatch):
    """However deep in the package the fallback is found (here RewardHead.loss -> fused_bt_loss ->
    select), the warning points at the line of the caller's code."""
    if backends.native_ops() is None:
        pytest.skip("prefkernels._C is not built")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "_warned", set())
    head, hidden = prefkernels.RewardHead(8), torch.randn(4, 3, 8)
    with pytest.warns(RuntimeWarning, match="backend 'triton' is unavailable") as caught:
        head.loss(hidden, last_index=torch.tensor([2, 1, 0, 2]), backend="triton")
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, inspect.currentframe().f_lineno - 1)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autograd_kernel_skips_the_per_call_schema_walk(backend, monkeypatch):
    """The ops' Autograd kernel (prefkernels.autograd.register_autograd) never calls torch's
    fill_defaults, 24 us per bt_forward call: a step, with and without grad, runs with it
    broken, and the gradients reach every input that requires one, and no other."""
    require_backend(backend, "cpu")
    from torch._library import utils

    def fill_defaults(*args, **kwargs):
        raise AssertionError("fill_defaults called")
    monkeypatch.setattr(utils, "fill_defaults", fill_defaults)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    weight, bias = torch.randn(2, 5, generator=g, requires_grad=True), torch.randn(2, generator=g)
    last_index = torch.tensor([2, 1, 0, 2])
    loss, rewards = prefkernels.fused_bt_loss(hidden, weight, bias, last_index=last_index, backend=backend)
    (loss + prefkernels.pool_score(hidden, weight, last_index=last_index, backend=backend).sum()).backward()
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0 and bias.grad is None
    with torch.no_grad():
        again, _ = prefkernels.fused_bt_loss(hidden, weight, bias, last_index=last_index, backend=backend)
    assert torch.equal(again, loss.detach()) and not again.requires_grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["fused_bt_loss", "pool_score"])
def test_backward_fills_no_gradient_of_the_outputs_without_one(backend, op):
    """The outputs that get no gradient (rewards, pair coefficients and pooled positions of
    bt_forward; pooled positions of pool_forward) are not handed to the backward as zero-filled
    tensors: on a GPU each was a fill kernel of its own in every training step (3 of a step's 7
    launches in the H200 profile). The backward dispatches pool_backward and no fill."""
    from torch.utils._python_dispatch import TorchDispatchMode
    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    weight = torch.randn(2, 5, generator=g, requires_grad=True)
    kwargs = {"last_index": torch.tensor([2, 1, 0, 2]), "backend": backend}
    if op == "fused_bt_loss":
        out = prefkernels.fused_bt_loss(hidden, weight, **kwargs)[0]
    else:
        out = prefkernels.pool_score(hidden, weight, **kwargs).sum()

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Log() as log:
        out.backward()
    assert any("pool_backward" in name for name in log.ops), log.ops
    fills = [name for name in log.ops if name.split(".")[-1] in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros")]
    assert fills == [], log.ops
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises_on_kernel_backends_and_works_on_reference(backend):
    """A gradient penalty needs the backward's own graph: the kernel backends refuse it clearly
    (never gradients silently detached from it); the reference computes it."""
    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(3)
    hidden, last_index = torch.randn(4, 3, 5, generator=g), torch.tensor([2, 1, 0, 2])
    weight = torch.randn(2, 5, generator=g, requires_grad=True)
    loss, _ = prefkernels.fused_bt_loss(hidden, weight, last_index=last_index, backend=backend)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(loss, weight, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        rewards = prefkernels.pool_score(hidden, weight, last_index=last_index, backend=backend)
        torch.autograd.grad(rewards.square().sum(), weight, create_graph=True)
    loss, _ = prefkernels.fused_bt_loss(hidden, weight, last_index=last_index, backend="reference")
    (grad_weight,) = torch.autograd.grad(loss, weight, create_graph=True)
    grad_weight.square().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("transform", ["jvp", "forward_ad", "grad", "vmap"])
def test_function_transforms_raise_on_kernel_backends_and_work_on_reference(backend, transform):
    """Forward-mode AD and torch.func have no rule on the kernel backends (their autograd.Function gives
    neither): a clear error, never a silently zero tangent; the reference computes them."""
    import torch.autograd.forward_ad as fwAD

    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(4)
    hidden, last_index = torch.randn(4, 3, 5, generator=g), torch.tensor([2, 1, 0, 2])
    weight, tangent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)

    def apply(chosen):
        def loss(w):
            return prefkernels.fused_bt_loss(hidden, w, last_index=last_index, backend=chosen)[0]
        if transform == "jvp":
            return torch.func.jvp(loss, (weight,), (tangent,))[1]
        if transform == "grad":
            return torch.func.grad(loss)(weight)
        if transform == "vmap":
            return torch.func.vmap(lambda h: prefkernels.pool_score(h, weight, last_index=last_index,
                                                                     backend=chosen))(torch.stack([hidden, -hidden]))
        with fwAD.dual_level():
            return fwAD.unpack_dual(loss(fwAD.make_dual(weight, tangent))).tangent

    expected = apply("reference")
    assert expected is not None and expected.abs().sum() > 0
    with pytest.raises(RuntimeError, match=rf"backend {backend!r}.*(forward-mode AD|torch\.func).*backend='reference'"):
        apply(backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_head_only_training_keeps_only_the_pooled_rows(backend):
    """When hidden needs no gradient (a frozen backbone), the backward keeps only the N pooled
    rows, not hidden: an inference-mode hidden works, as does changing hidden after the forward."""
    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        frozen = torch.randn(4, 6, 8, generator=g)
    plain = torch.randn(4, 6, 8, generator=g)
    weight, bias = torch.randn(2, 8, generator=g), torch.randn(2, generator=g)
    last_index = torch.tensor([5, 1, 0, 3])
    for hidden in (frozen, plain):
        grads = {}
        for name in ("reference", backend):
            w, b = (t.clone().requires_grad_() for t in (weight, bias))
            loss, _ = prefkernels.fused_bt_loss(hidden, w, b, last_index=last_index, backend=name)
            scores = prefkernels.pool_score(hidden, w, b, last_index=last_index, backend=name)
            if hidden is plain and name == backend:
                hidden.mul_(2)  # in place after the forward: the saved rows are a copy
            (loss + scores.square().sum()).backward()
            grads[name] = (w.grad, b.grad)
            if hidden is plain and name == backend:
                hidden.div_(2)
        for got, want in zip(grads[backend], grads["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_head_only_training_under_torch_compile(backend):
    """The pooled-rows path of a frozen hidden traces with fullgraph=True and matches the reference."""
    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(6)
    hidden, last_index = torch.randn(4, 6, 8, generator=g), torch.tensor([5, 1, 0, 3])
    weight = torch.randn(2, 8, generator=g)

    def step(name):
        def loss(h, w):
            pooled = prefkernels.pool_score(h, w, last_index=last_index, backend=name)
            return prefkernels.fused_bt_loss(h, w, last_index=last_index, backend=name)[0] + pooled.square().sum()
        return loss

    w = weight.clone().requires_grad_()
    torch.compile(step(backend), fullgraph=True)(hidden, w).backward()
    want = weight.clone().requires_grad_()
    step("reference")(hidden, want).backward()
    torch.testing.assert_close(w.grad, want.grad, rtol=1e-5, atol=1e-5)
