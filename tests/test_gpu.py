"""GPU checks (pytest -m gpu, run by benchmarks/gpu_check.sh): native CUDA and Triton against
the float64 reference on the op table, realistic shapes, opcheck, torch.compile, determinism."""
import pytest
import torch

import prefkernels
from prefkernels import backends
from op_cases import Case, assert_matches, make_inputs, poison_allocator, public, reference_float64, run_op
from test_ops import VARIANTS

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["native", "triton"]


def require(backend):
    ops = backends.select(backend, torch.device("cuda"))
    if ops is None or ops.name != backend:
        pytest.skip(f"backend {backend!r} not available on cuda")
    return ops


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,heads", [(torch.bfloat16, 3), (torch.float32, 1), (torch.float16, 2)], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_float64_reference(backend, variant, dtype, heads):
    require(backend)
    case = Case(dtype=dtype, heads=heads).with_(**VARIANTS[variant])
    inputs = make_inputs(case, device="cuda", seed=hash(variant) % 1000)
    expected = reference_float64(inputs)
    poison_allocator("cuda")
    assert_matches(run_op(public(backend), inputs), expected, inputs, what=f"{backend} {case}: ")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(32, 512, 4096, torch.bfloat16, "mask_left"), (8, 1024, 2048, torch.float32, "mask_right"),
                                   (16, 300, 4099, torch.float16, "last_index"), (24, 128, 1000, torch.bfloat16, "cu_seqlens")],
                         ids=str)
def test_cuda_realistic_shapes(backend, shape):
    require(backend)
    rows, positions, dim, dtype, pooling = shape
    case = Case(dtype=dtype, heads=2, rows=rows, positions=positions, dim=dim, pooling=pooling, margin=True,
                center_coef=0.01, layout="strided_t" if pooling == "mask_right" else "contiguous")
    inputs = make_inputs(case, device="cuda")
    expected = reference_float64(inputs)
    poison_allocator("cuda", sizes=(1 << 20, 1 << 26))
    assert_matches(run_op(public(backend), inputs), expected, inputs, what=f"{backend} {shape}: ")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("pairs", ["default", "shared"])
def test_cuda_backward_is_bitwise_deterministic(backend, pairs):
    require(backend)
    case = Case(dtype=torch.bfloat16, heads=3, rows=64, positions=256, dim=2048, pairs=pairs)
    inputs = make_inputs(case, device="cuda")
    first, second = run_op(public(backend), inputs), run_op(public(backend), inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_opcheck(backend):
    ops = require(backend)
    inputs = make_inputs(Case(heads=2, pairs="shared", margin=True), device="cuda")
    kw = inputs["kwargs"]
    args = (inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["bias"].requires_grad_(),
            kw["attention_mask"], None, None, kw["chosen_index"], kw["rejected_index"], kw["margin"])
    torch.library.opcheck(ops.bt_forward, (*args, 0.1, 0.01))
    torch.library.opcheck(ops.pool_forward, args[:6])
    rewards, pooled_pos = ops.pool_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]])
    torch.library.opcheck(ops.pool_backward, (torch.randn_like(rewards), None, None, args[0].detach(),
                                              args[1].detach(), pooled_pos, True))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_torch_compile_fullgraph(backend):
    require(backend)
    inputs = make_inputs(Case(dtype=torch.bfloat16, heads=2, rows=8, positions=64, dim=256), device="cuda")

    def step(hidden, weight, bias, mask):
        loss, rewards = prefkernels.fused_bt_loss(hidden, weight, bias, attention_mask=mask, backend=backend)
        return loss, rewards

    compiled = torch.compile(step, fullgraph=True)
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        hidden = inputs["hidden"].clone().requires_grad_()
        weight = inputs["weight"].clone().requires_grad_()
        loss, rewards = fn(hidden, weight, inputs["bias"], inputs["kwargs"]["attention_mask"])
        loss.backward()
        results[name] = (loss.detach(), rewards, hidden.grad, weight.grad)
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want)


def test_auto_picks_native_cuda_then_triton():
    ops = backends.select("auto", torch.device("cuda"))
    expected = "native" if backends.native_has_cuda() else ("triton" if backends.triton_ops() else None)
    assert (ops.name if ops else None) == expected
