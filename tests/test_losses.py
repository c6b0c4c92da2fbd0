"""Losses: BT through the fused op, Davidson and Rao-Kupper ties, Plackett-Luce rankings."""
import math

import pytest
import torch

from prefkernels import reference
from prefkernels.data import PreferenceCollator, load_preferences
from prefkernels.losses import (LossConfig, check_data, comparison_loss, compute_loss, davidson_nll,
                                plackett_luce_nll, rao_kupper_nll)
from prefkernels.model import RewardModel
from prefkernels.tiny import build_tiny_llama, build_tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("nll, strength", [(davidson_nll, 0.7), (rao_kupper_nll, 1.8)])
def test_tie_models_are_probability_distributions(nll, strength):
    gap = torch.randn(50, 3, dtype=torch.float64) * 3
    win = torch.exp(-nll(gap, None, strength))
    lose = torch.exp(-nll(-gap, None, strength))
    tie = torch.exp(-nll(gap, torch.ones(50, dtype=torch.bool), strength))
    torch.testing.assert_close(win + lose + tie, torch.ones_like(gap))
    assert (tie > 0).all() and ((win > lose) == (gap > 0)).all()
    symmetric = torch.exp(-nll(-gap, torch.ones(50, dtype=torch.bool), strength))
    torch.testing.assert_close(tie, symmetric)


def test_tie_models_match_their_definitions():
    pi_i, pi_j = torch.rand(20, 1, dtype=torch.float64) + 0.1, torch.rand(20, 1, dtype=torch.float64) + 0.1
    gap = torch.log(pi_i) - torch.log(pi_j)
    nu, theta = 0.9, 1.6
    z = pi_i + pi_j + nu * torch.sqrt(pi_i * pi_j)
    ties = torch.arange(20) % 2 == 0
    davidson = torch.where(ties.unsqueeze(1), nu * torch.sqrt(pi_i * pi_j) / z, pi_i / z)
    torch.testing.assert_close(torch.exp(-davidson_nll(gap, ties, nu)), davidson)
    rk_tie = (theta ** 2 - 1) * pi_i * pi_j / ((pi_i + theta * pi_j) * (pi_j + theta * pi_i))
    rao_kupper = torch.where(ties.unsqueeze(1), rk_tie, pi_i / (pi_i + theta * pi_j))
    torch.testing.assert_close(torch.exp(-rao_kupper_nll(gap, ties, theta)), rao_kupper)


def test_plackett_luce_matches_brute_force_and_equals_bt_on_pairs():
    torch.manual_seed(0)
    sizes = [4, 2, 3]
    rewards = torch.randn(sum(sizes), 2, dtype=torch.float64, requires_grad=True)
    ranking = torch.full((3, 4), -1)
    order = torch.randperm(sum(sizes))
    offset = 0
    for g, n in enumerate(sizes):
        ranking[g, :n] = order[offset:offset + n]
        offset += n
    got = plackett_luce_nll(rewards, ranking)
    for g, n in enumerate(sizes):
        r = rewards[ranking[g, :n]]
        expected = sum(torch.logsumexp(r[i:], dim=0) - r[i] for i in range(n))
        torch.testing.assert_close(got[g], expected)
    got.sum().backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad.abs().sum() > 0
    pairs = torch.tensor([[0, 1], [2, 3]])
    bt = torch.nn.functional.softplus(-(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]))
    torch.testing.assert_close(plackett_luce_nll(rewards, pairs), bt)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return tokenizer, RewardModel(build_tiny_llama(tokenizer, hidden_size=32, layers=1, heads=2, seed=1), num_heads=2)


def make_batch(tokenizer, records):
    data = load_preferences(records, tokenizer, 32)
    return PreferenceCollator(tokenizer.pad_token_id)(list(data))


def test_bt_goes_through_the_fused_op_with_margin_smoothing_and_centering(tiny):
    tokenizer, model = tiny
    records = [{"chosen": "the river is clear and kind", "rejected": "the river is vague", "margin": 0.5},
               {"chosen": "a robot", "rejected": "a rude robot with many wrong words", "margin": 1.5},
               {"chosen": "the castle is useful", "rejected": "it", "margin": 0.0}]
    batch = make_batch(tokenizer, records)
    config = LossConfig("bt", label_smoothing=0.1, center_coef=0.01)
    loss, rewards = compute_loss(model, batch, config)
    expected_rewards = model(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(rewards, expected_rewards.detach())
    expected = reference.pair_loss(expected_rewards, *batch.pairs(), batch.margin, 0.1, 0.01)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    model.zero_grad()
    no_margin = make_batch(tokenizer, [{k: v for k, v in r.items() if k != "margin"} for r in records])
    assert not torch.isclose(compute_loss(model, no_margin, config)[0], loss)


@pytest.mark.parametrize("name", ["davidson", "rao-kupper", "plackett-luce"])
def test_other_losses_score_with_pool_score(tiny, name):
    tokenizer, model = tiny
    records = [{"chosen": "the river is clear", "rejected": "the river is vague", "tie": True},
               {"chosen": "a kind robot", "rejected": "a rude robot"}]
    if name == "plackett-luce":
        records = [{"responses": ["clear kind", "the river", "rude wrong vague"]}, {"responses": ["a", "b"]}]
    batch = make_batch(tokenizer, records)
    config = LossConfig(name)
    loss, rewards = compute_loss(model, batch, config)
    chosen, rejected = batch.pairs()
    expected = comparison_loss(model(batch.input_ids, batch.attention_mask), config, ranking=batch.ranking,
                               chosen_index=chosen, rejected_index=rejected, tie=batch.tie)
    torch.testing.assert_close(loss, expected.mean())
    assert rewards.shape == (batch.input_ids.shape[0], 2) and not rewards.requires_grad
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_loss_config_and_data_checks_name_the_problem():
    with pytest.raises(ValueError, match="loss: expected one of"):
        LossConfig("hinge")
    with pytest.raises(ValueError, match="label_smoothing: only the bt loss"):
        LossConfig("davidson", label_smoothing=0.1)
    with pytest.raises(ValueError, match="tie_strength: rao-kupper needs a finite value > 1"):
        LossConfig("rao-kupper", tie_strength=0.5)
    with pytest.raises(ValueError, match="center_coef: supported by the pairwise losses"):
        LossConfig("plackett-luce", center_coef=0.1)
    with pytest.raises(TypeError, match="label_smoothing: expected a float, got str"):
        LossConfig("bt", label_smoothing="0.1")
    with pytest.raises(TypeError, match="tie_strength: expected a float, got str"):
        LossConfig("davidson", tie_strength="1")
    with pytest.raises(ValueError, match="train has 3 tie pairs"):
        check_data(LossConfig("bt"), num_ties=3, has_margin=False, name="train")
    assert check_data(LossConfig("davidson"), num_ties=3, has_margin=True, name="train")[0].startswith("train: the")
    assert LossConfig("davidson").strength == 1.0 and math.isclose(LossConfig("rao-kupper").strength, 2.0)
    # both defaults put P(tie | equal rewards) at 1/3
    zero, tie = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.bool)
    assert math.isclose(float(torch.exp(-davidson_nll(zero, tie, LossConfig("davidson").strength))), 1 / 3)
    assert math.isclose(float(torch.exp(-rao_kupper_nll(zero, tie, LossConfig("rao-kupper").strength))), 1 / 3)


def test_plackett_luce_padding_is_isolated_and_pairs_keep_bt_precision():
    # padded slots gather row 0: a NaN there must not reach another ranking's loss
    rewards = torch.tensor([[float("nan")], [0.0], [1.0], [2.0], [0.5]])
    got = plackett_luce_nll(rewards, torch.tensor([[0, 1, -1], [2, 3, 4], [3, 2, -1]]))
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1:]).all()
    torch.testing.assert_close(got[2], torch.nn.functional.softplus(-(rewards[3] - rewards[2])))
    # on pairs it is BT to float32 precision, also far from 0
    rewards = torch.tensor([[1000.0 + 10.0], [1000.0], [30.0], [0.0], [1.0], [float("-inf")]])
    pairs = torch.tensor([[0, 1], [2, 3]])
    bt = torch.nn.functional.softplus(-(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).double()).float()
    torch.testing.assert_close(plackett_luce_nll(rewards, pairs), bt, rtol=1e-5, atol=0)
    # a worst response at -inf is certainly last: its ranking costs 0, not NaN, and so does its
    # gradient (BT's on the pair: 0)
    assert plackett_luce_nll(rewards, torch.tensor([[2, 3, 5]])).item() == pytest.approx(math.log1p(math.exp(-30)), rel=1e-5)
    leaf = torch.tensor([[0.0], [float("-inf")]], requires_grad=True)
    plackett_luce_nll(leaf, torch.tensor([[0, 1]])).sum().backward()
    assert torch.equal(leaf.grad, torch.zeros(2, 1))


def test_davidson_keeps_precision_for_large_gaps():
    gap = torch.tensor([[5.0], [20.0], [30.0], [-30.0], [60.0]])
    ties = torch.tensor([False, False, False, True, True])
    for tie in (None, ties):
        got = davidson_nll(gap, tie, 0.8)
        torch.testing.assert_close(got, davidson_nll(gap.double(), tie, 0.8).float(), rtol=1e-5, atol=0)
    assert float(davidson_nll(gap, None, 0.8)[2]) > 0  # -log P(win) of a 30 gap is 3e-7, not 0


def test_rao_kupper_accepts_any_finite_theta():
    zero, tie = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.bool)
    for theta in (1 + 1e-12, 1e200, 1e308):
        LossConfig("rao-kupper", tie_strength=theta)
        p_tie = torch.exp(-rao_kupper_nll(zero, tie, theta))  # (theta - 1) / (theta + 1) at equal rewards
        assert math.isclose(float(p_tie), (theta - 1) / (theta + 1), rel_tol=1e-9)
