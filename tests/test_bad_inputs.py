"""Every bad input gets a ValueError/TypeError naming the argument, on every backend."""
import pytest
import torch

import prefkernels
from prefkernels import backends


def base(N=4, T=5, D=8, K=2):
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(N, T, D, generator=g), weight=torch.randn(K, D, generator=g),
                bias=torch.randn(K, generator=g), attention_mask=torch.ones(N, T, dtype=torch.long))


def call(backend, hidden, weight, bias=None, **kw):
    return prefkernels.fused_bt_loss(hidden, weight, bias, backend=backend, **kw)


def with_(**changes):
    args = base()
    args.update(changes)
    return {k: v for k, v in args.items() if v is not _DROP}


_DROP = object()
mask_with_empty_row = torch.ones(4, 5, dtype=torch.long)
mask_with_empty_row[2] = 0

BAD = {
    # name: (kwargs, exception, text that must appear in the message)
    "hidden_rank": (with_(hidden=torch.randn(4, 5)), ValueError, "hidden"),
    "hidden_dtype": (with_(hidden=torch.randn(4, 5, 8).double()), TypeError, "hidden"),
    "hidden_int": (with_(hidden=torch.ones(4, 5, 8, dtype=torch.long)), TypeError, "hidden"),
    "hidden_not_tensor": (with_(hidden=[[1.0]]), TypeError, "hidden"),
    "hidden_last_dim_strided": (with_(hidden=torch.randn(4, 5, 16)[..., ::2]), ValueError, "contiguous"),
    "empty_batch": (with_(hidden=torch.randn(0, 5, 8), attention_mask=torch.ones(0, 5, dtype=torch.long)), ValueError, "empty"),
    "empty_positions": (with_(hidden=torch.randn(4, 0, 8), attention_mask=torch.ones(4, 0, dtype=torch.long)), ValueError, "empty"),
    "dim_mismatch": (with_(weight=torch.randn(2, 9)), ValueError, "weight"),
    "weight_rank": (with_(weight=torch.randn(8)), ValueError, "weight"),
    "weight_dtype": (with_(weight=torch.randn(2, 8).half()), TypeError, "weight"),
    "bias_k_mismatch": (with_(bias=torch.randn(3)), ValueError, "bias"),
    "bias_dtype": (with_(bias=torch.randn(2).double()), TypeError, "bias"),
    "no_pooling": (with_(attention_mask=_DROP), ValueError, "exactly one"),
    "two_poolings": (with_(last_index=torch.tensor([1, 2, 3, 4])), ValueError, "exactly one"),
    "mask_shape": (with_(attention_mask=torch.ones(4, 6, dtype=torch.long)), ValueError, "attention_mask"),
    "mask_float": (with_(attention_mask=torch.ones(4, 5)), TypeError, "attention_mask"),
    "mask_empty_row": (with_(attention_mask=mask_with_empty_row), ValueError, "row 2"),
    "last_index_range": (with_(attention_mask=_DROP, last_index=torch.tensor([0, 1, 5, 2])), ValueError, "last_index"),
    "last_index_negative": (with_(attention_mask=_DROP, last_index=torch.tensor([0, -1, 2, 2])), ValueError, "last_index"),
    "last_index_dtype": (with_(attention_mask=_DROP, last_index=torch.tensor([0.0, 1, 2, 2])), TypeError, "last_index"),
    "last_index_shape": (with_(attention_mask=_DROP, last_index=torch.tensor([0, 1, 2])), ValueError, "last_index"),
    "cu_with_3d_hidden": (with_(attention_mask=_DROP, cu_seqlens=torch.tensor([0, 2, 4])), ValueError, "hidden"),
    "cu_not_monotonic": (with_(hidden=torch.randn(10, 8), attention_mask=_DROP, cu_seqlens=torch.tensor([0, 4, 3, 6, 10])), ValueError, "cu_seqlens"),
    "cu_out_of_range": (with_(hidden=torch.randn(10, 8), attention_mask=_DROP, cu_seqlens=torch.tensor([0, 4, 6, 8, 11])), ValueError, "cu_seqlens"),
    "cu_negative_start": (with_(hidden=torch.randn(10, 8), attention_mask=_DROP, cu_seqlens=torch.tensor([-1, 4, 6, 8, 10])), ValueError, "cu_seqlens"),
    "cu_too_short": (with_(hidden=torch.randn(10, 8), attention_mask=_DROP, cu_seqlens=torch.tensor([0])), ValueError, "cu_seqlens"),
    "odd_rows_default_pairs": (with_(hidden=torch.randn(3, 5, 8), attention_mask=torch.ones(3, 5, dtype=torch.long)), ValueError, "even"),
    "only_chosen": (with_(chosen_index=torch.tensor([0, 1])), ValueError, "chosen_index/rejected_index"),
    "only_rejected": (with_(rejected_index=torch.tensor([0, 1])), ValueError, "chosen_index/rejected_index"),
    "pair_lengths_differ": (with_(chosen_index=torch.tensor([0, 1]), rejected_index=torch.tensor([2])), ValueError, "same length"),
    "pair_index_range": (with_(chosen_index=torch.tensor([0, 4]), rejected_index=torch.tensor([2, 3])), ValueError, "chosen_index"),
    "pair_index_negative": (with_(chosen_index=torch.tensor([0, 1]), rejected_index=torch.tensor([2, -3])), ValueError, "rejected_index"),
    "pair_index_float": (with_(chosen_index=torch.tensor([0.0, 1.0]), rejected_index=torch.tensor([2, 3])), TypeError, "chosen_index"),
    "pair_index_empty": (with_(chosen_index=torch.tensor([], dtype=torch.long), rejected_index=torch.tensor([], dtype=torch.long)), ValueError, "chosen_index"),
    "margin_length": (with_(margin=torch.ones(3)), ValueError, "margin"),
    "margin_dtype": (with_(margin=torch.ones(2, dtype=torch.long)), TypeError, "margin"),
    "label_smoothing_high": (with_(label_smoothing=0.6), ValueError, "label_smoothing"),
    "label_smoothing_negative": (with_(label_smoothing=-0.1), ValueError, "label_smoothing"),
    "center_coef_negative": (with_(center_coef=-1.0), ValueError, "center_coef"),
    "center_coef_nan": (with_(center_coef=float("nan")), ValueError, "center_coef"),
    "label_smoothing_tensor": (with_(label_smoothing=torch.tensor(0.1)), TypeError, "label_smoothing: expected a float"),
    "center_coef_string": (with_(center_coef="0.1"), TypeError, "center_coef: expected a float"),
    "center_coef_bool": (with_(center_coef=True), TypeError, "center_coef: expected a float"),
    "center_coef_past_float32": (with_(center_coef=1e39), ValueError, "center_coef: expected a float in [0, 3.403e+38]"),
    "center_coef_huge_int": (with_(center_coef=10 ** 400), ValueError, "(finite in float32), got 1000000000"),
    "reduction": (with_(reduction="avg"), ValueError, "reduction"),
}


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(backend, name):
    kwargs, error, text = BAD[name]
    kwargs = dict(kwargs)
    with pytest.raises(error, match=None) as info:
        call(backend, **kwargs)
    assert text in str(info.value), f"{name}: message {str(info.value)!r} does not mention {text!r}"


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        call("cuda-graph", **base())


def test_unknown_backend_from_env(monkeypatch):
    monkeypatch.setenv("PREFKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="PREFKERNELS_BACKEND"):
        call(None, **base())


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("PREFKERNELS_BACKEND", "reference")
    assert backends.select(None, torch.device("cpu")) is None
    monkeypatch.setenv("PREFKERNELS_BACKEND", "native")
    assert backends.select(None, torch.device("cpu")).name == "native"
    assert backends.select("reference", torch.device("cpu")) is None  # the argument wins


@pytest.mark.skipif(not hasattr(torch.device("meta"), "type"), reason="meta device")
def test_tensors_on_different_devices():
    args = base()
    with pytest.raises(ValueError, match="weight: expected a tensor on"):
        call("native", args["hidden"], args["weight"].to("meta"), attention_mask=args["attention_mask"])
    with pytest.raises(ValueError, match="attention_mask: expected a tensor on"):
        call("native", args["hidden"], args["weight"], attention_mask=args["attention_mask"].to("meta"))


def test_shape_only_tensors_skip_the_value_checks():
    """meta and fake tensors hold no values to check: the ops give their shapes, as under torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = {name: value.to("meta") for name, value in base().items()}
    loss, rewards = call(None, **args, reduction="none")
    assert loss.shape == (2, 2) and rewards.shape == (4, 2) and loss.device.type == "meta"
    assert prefkernels.pool_score(args["hidden"], args["weight"], attention_mask=args["attention_mask"]).shape == (4, 2)
    with FakeTensorMode() as mode:
        fake = {name: mode.from_tensor(value) for name, value in base().items()}
        loss, rewards = call("native", **fake, reduction="none")
    assert loss.shape == (2, 2) and rewards.shape == (4, 2)


def test_an_empty_backend_variable_means_auto(monkeypatch):
    monkeypatch.setenv("PREFKERNELS_BACKEND", "")
    assert backends.requested(None) == "auto"


def test_pool_score_bad_inputs():
    args = base()
    with pytest.raises(ValueError, match="exactly one"):
        prefkernels.pool_score(args["hidden"], args["weight"])
    with pytest.raises(ValueError, match="weight"):
        prefkernels.pool_score(args["hidden"], torch.randn(1, 3), attention_mask=args["attention_mask"])


def test_unchecked_invalid_rows_give_nan_not_a_crash(monkeypatch):
    """With value checks off (as under torch.compile) the kernel never reads out of bounds."""
    monkeypatch.setenv("PREFKERNELS_CHECK_VALUES", "0")
    args = base()
    hidden = args["hidden"].requires_grad_()
    loss, rewards = call("native", hidden, args["weight"], last_index=torch.tensor([0, 99, 2, -5]))
    assert torch.isnan(rewards[1]).all() and torch.isnan(rewards[3]).all() and torch.isfinite(rewards[0]).all()
    loss.backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("pooling,text", [
    ({"attention_mask": mask_with_empty_row}, "row 2"),
    ({"last_index": torch.tensor([0, 1, 5, 2])}, "last_index: expected values in [0, 5)"),
    ({"last_index": torch.tensor([0, -1, 2, 2])}, "min -1")])
def test_pool_score_names_an_invalid_row(backend, pooling, text):
    """pool_score checks the pooled rows too (kernel backends on the kernel's pooled positions)."""
    args = base()
    with pytest.raises(ValueError) as info:
        prefkernels.pool_score(args["hidden"], args["weight"], args["bias"], backend=backend, **pooling)
    assert text in str(info.value)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_unchecked_empty_sequence_gives_nan_not_its_neighbour(monkeypatch, backend):
    """cu_seqlens with an empty sequence, value checks off: that row is invalid (NaN reward, no
    gradient), never the previous sequence's last token pooled twice."""
    if backends.select(backend, torch.device("cpu")).name != backend:
        pytest.skip(f"backend {backend!r} not available on cpu")
    monkeypatch.setenv("PREFKERNELS_CHECK_VALUES", "0")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, generator=g, requires_grad=True)
    weight = torch.randn(1, 4, generator=g)
    rewards = prefkernels.pool_score(hidden, weight, cu_seqlens=torch.tensor([0, 3, 3, 6]), backend=backend)
    assert torch.isnan(rewards[1]).all() and torch.isfinite(rewards[[0, 2]]).all()
    torch.testing.assert_close(rewards[[0, 2], 0], hidden[[2, 5]].detach() @ weight[0])
    rewards[[0, 2]].sum().backward()
    torch.testing.assert_close(hidden.grad[[2, 5]], weight.expand(2, 4))
    assert hidden.grad[[0, 1, 3, 4]].abs().sum() == 0


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
def test_margin_gets_no_gradient(backend):
    args = base()
    margin = torch.rand(2, requires_grad=True)
    loss, _ = call(backend, args["hidden"].requires_grad_(), args["weight"], attention_mask=args["attention_mask"],
                   margin=margin)
    loss.backward()
    assert margin.grad is None and args["hidden"].grad is not None


def test_numpy_loss_options_are_floats():
    """label_smoothing/center_coef of NumPy float32 (as a config read with NumPy gives) are floats."""
    import numpy as np
    args = base()
    want, _ = call("native", **args, label_smoothing=0.1, center_coef=0.25)
    got, _ = call("native", **args, label_smoothing=np.float32(0.1), center_coef=np.float32(0.25))
    torch.testing.assert_close(got, want)


def test_reward_head_names_a_bad_size_and_is_callable():
    for args, name in (((8, 2.5), "num_heads"), ((8.0,), "hidden_size"), (("8",), "hidden_size"),
                       ((True,), "hidden_size"), ((8, 0), "num_heads")):
        with pytest.raises(ValueError, match=f"{name}: expected an integer >= 1"):
            prefkernels.RewardHead(*args)
    head = prefkernels.RewardHead(8, num_heads=2)
    seen = []
    head.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    args = base(D=8)
    rewards = head(args["hidden"], attention_mask=args["attention_mask"])  # forward is score
    torch.testing.assert_close(rewards, head.score(args["hidden"], attention_mask=args["attention_mask"]))
    assert seen == [torch.Size([4, 2])]
