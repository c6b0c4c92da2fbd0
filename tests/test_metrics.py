"""Evaluation metrics: statistics against scipy, calibration, the metrics dict, scoring order, plots."""
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

from prefkernels import metrics
from prefkernels.data import load_preferences, synthetic
from prefkernels.losses import LossConfig
from prefkernels.model import RewardModel
from prefkernels.tiny import build_tiny_llama, build_tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, 300).astype(float)  # many ties
    y = x + rng.normal(0, 3, 300)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert metrics.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert metrics.rankdata(x) == pytest.approx(stats.rankdata(x))
    assert math.isnan(metrics.spearman(np.ones(5), y[:5]))


def test_calibration_ece_and_brier():
    perfect = metrics.calibration(np.full(1000, 0.999))
    assert perfect["ece"] == pytest.approx(0.001, abs=1e-9) and perfect["brier"] == pytest.approx(1e-6)
    # confidence 0.75 but the chosen side always wins: off by 0.25 in both orientations
    over = metrics.calibration(np.full(40, 0.75))
    assert over["ece"] == pytest.approx(0.25) and over["brier"] == pytest.approx(0.0625)
    assert sum(b["count"] for b in over["bins"]) == 80 and len(over["bins"]) == 10
    rng = np.random.default_rng(1)
    p = rng.uniform(0.5, 1.0, 5000)  # an honest model: the preferred side wins with probability p
    outcomes = rng.random(5000) < p
    honest = metrics.calibration(np.where(outcomes, p, 1 - p))
    assert honest["ece"] < 0.03


def fake_dataset(tokenizer, n, seed):
    rng = random.Random(seed)
    words = synthetic.vocabulary()
    records = [{"chosen": " ".join(rng.choice(words) for _ in range(rng.randint(2, 20))),
                "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(2, 20))),
                "chosen_rating": rng.uniform(0, 10), "rejected_rating": rng.uniform(0, 10),
                "tie": i % 10 == 0} for i in range(n)]
    return load_preferences(records, tokenizer, 64)


def test_preference_metrics_on_known_rewards():
    tokenizer = build_tiny_tokenizer()
    data = fake_dataset(tokenizer, 60, seed=2)
    rng = np.random.default_rng(3)
    rewards = {}
    for example in data:
        r = rng.normal(0, 1, (2, 3)).astype(np.float32)
        rewards[example.index] = r + (np.array([[1.0], [0.0]]) if example.index % 3 else 0.0)
    result = metrics.preference_metrics(data, rewards, LossConfig("davidson"))
    decided = [i for i in range(60) if i % 10]
    gaps = np.array([rewards[i].mean(1)[0] - rewards[i].mean(1)[1] for i in decided])
    assert result["pairs"] == 54 and result["ties"] == 6 and result["heads"] == 3
    assert result["accuracy"] == pytest.approx(np.mean(gaps > 0))
    assert result["reward_gap"]["mean"] == pytest.approx(gaps.mean(), rel=1e-5)
    assert sum(b["pairs"] for b in result["length"]["buckets"]) == 54
    all_rewards = np.concatenate([rewards[i] for i in range(60)])
    assert result["reward_mean"] == pytest.approx(all_rewards.mean(0), rel=1e-5)
    heads = np.stack([np.sign(rewards[i][0] - rewards[i][1]) for i in decided])
    assert result["ensemble"]["disagreement"] == pytest.approx(np.mean(np.abs(heads.sum(1)) < 3))
    ratings = np.array([r for i in range(60) for r in data[i].ratings])
    assert result["ratings"]["spearman"] == pytest.approx(metrics.spearman(all_rewards.mean(1), ratings))
    assert "tie_mean_abs_gap" in result and result["loss_name"] == "davidson"
    json.dumps(result, allow_nan=False)  # JSON-safe: NaN became null
    table = metrics.format_table(result)
    for label in ("accuracy", "ECE (10 bins)", "Brier score", "length bias", "ratings Spearman / Kendall",
                  "ensemble (3 heads) disagreement"):
        assert label in table


def test_score_maps_rewards_back_to_examples_in_best_first_order(tmp_path):
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = RewardModel(build_tiny_llama(tokenizer, hidden_size=32, layers=1, heads=2, seed=4), num_heads=2)
    data = fake_dataset(tokenizer, 23, seed=5)
    ranked = load_preferences([{"responses": ["the river is clear", "a", "the kind robot"]}], tokenizer, 32)
    scored = metrics.score(model, data, batch_size=4)
    assert sorted(scored) == list(range(23))
    for index in (0, 7, 22):
        rows = data[index].input_ids
        for side, row in enumerate(rows):
            ids = torch.tensor([row])
            expected = model(ids, torch.ones_like(ids))[0].detach().numpy()
            np.testing.assert_allclose(scored[index][side], expected, rtol=1e-4, atol=1e-5)
    ranking_rewards = metrics.score(model, ranked, max_tokens=64)[0]
    assert ranking_rewards.shape == (3, 2)
    ids = torch.tensor([ranked[0].input_ids[2]])
    np.testing.assert_allclose(ranking_rewards[2], model(ids, torch.ones_like(ids))[0].detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    assert model.training  # score restores the mode it found
    for options in ({}, {"max_tokens": 1}, {"max_tokens": 40}, {"indices": [22, 3, 7]}):
        packed = metrics.score(model, data, **options)  # rows packed under a token budget
        assert sorted(packed) == sorted(options.get("indices", range(23)))
        for index, rewards in packed.items():
            np.testing.assert_allclose(rewards, scored[index], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_tokens: expected an integer >= 1, got 0"):
        metrics.score(model, data, max_tokens=0)
    with pytest.raises(ValueError, match="batch_size and max_tokens: pass one of them"):
        metrics.score(model, data, batch_size=8, max_tokens=16)
    assert sorted(metrics.score(model, data, max_tokens=np.int64(64))) == list(range(23))


def test_plots_are_written(tmp_path):
    tokenizer = build_tiny_tokenizer()
    data = fake_dataset(tokenizer, 30, seed=6)
    rng = np.random.default_rng(7)
    result = metrics.preference_metrics(data, {e.index: rng.normal(0, 2, (2, 1)).astype(np.float32) for e in data})
    metrics.reliability_diagram(result, tmp_path / "reliability.png")
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"event": e, "step": s, "loss": 1 / s, "accuracy": 0.5 + s / 100}) + "\n"
                           for s in range(1, 20) for e in ("train", "eval") if e == "train" or s % 5 == 0))
    metrics.plot_training_curves(log, tmp_path / "curves.png")
    for name in ("reliability.png", "curves.png"):
        content = (tmp_path / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 5000


def test_rank_correlations_propagate_nan_and_rank_infinities_like_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = np.array([1.0, 2.0, np.inf, 4.0, -np.inf, 2.0, np.inf])
    y = np.array([3.0, 1.0, 2.0, 5.0, 0.0, 1.0, 4.0])
    assert metrics.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    x[1] = np.nan  # a NaN reward makes the correlation undefined (scipy's nan_policy="propagate")
    assert math.isnan(metrics.spearman(x, y)) and math.isnan(metrics.kendall_tau(x, y))
    assert np.isnan(metrics.rankdata(x)).all()


def test_calibration_of_huge_gaps_is_exact_and_silent():
    from prefkernels.data import PreferenceDataset, PreferenceExample
    data = PreferenceDataset([PreferenceExample(i, [[1, 2], [1]], [2, 1], None, False, [math.nan] * 2, False, "x")
                              for i in range(4)], None)
    rewards = {i: np.array([[1e4 * (-1) ** i], [0.0]], np.float32) for i in range(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics.preference_metrics(data, rewards)
    assert result["accuracy"] == 0.5 and result["brier"] == 0.5 and result["ece"] == 0.5
    assert result["loss"] == pytest.approx(5000.0)


def test_calibration_bins_exact_edges_and_nan():
    """Bin b holds [b/10, (b+1)/10) even one rounding step below an edge; a NaN p is in no bin
    and makes the ECE NaN, like the Brier score."""
    below = np.nextafter(0.9, 0.0)
    bins = metrics.calibration(np.array([below, 0.9, 1.0]))["bins"]
    # p: bin 8, then 0.9 and 1.0 in bin 9; 1 - p: just above 0.1 in bin 1, 1 - 0.9 (just below
    # 0.1 in floats) and 0.0 in bin 0
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 0, 1, 2]
    with_nan = metrics.calibration(np.array([np.nan, 0.95]))
    assert sum(b["count"] for b in with_nan["bins"]) == 2
    assert with_nan["bins"][0]["count"] == 1 and with_nan["bins"][0]["confidence"] == pytest.approx(0.05)
    assert math.isnan(with_nan["ece"]) and math.isnan(with_nan["brier"])


def test_ensemble_disagreement_counts_a_nan_head():
    """A pair agrees only when every head's gap has the same strict sign: a NaN gap has none."""
    tokenizer = build_tiny_tokenizer()
    rewards = {0: np.array([[1.0, np.nan], [0.0, 0.0]], np.float32), 1: np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)}
    records = [{"chosen": "a b", "rejected": "c d"}, {"chosen": "a c", "rejected": "b d"}]
    data = load_preferences(records, tokenizer, 64)
    assert metrics.preference_metrics(data, rewards)["ensemble"]["disagreement"] == pytest.approx(0.5)


def test_preference_metrics_checks_rewards_and_the_loss_of_ties():
    """Rewards are checked against the dataset (one row per response, one K) instead of silently
    misaligned; data with ties gets Davidson by default and refuses a loss without a tie model."""
    tokenizer = build_tiny_tokenizer()
    data = load_preferences([{"chosen": "a b", "rejected": "c d"}, {"chosen": "a c", "rejected": "b d", "tie": True}],
                            tokenizer, 64)
    good = {0: np.array([[1.0], [0.0]], np.float32), 1: torch.tensor([[0.5], [0.5]], requires_grad=True).bfloat16()}
    assert metrics.preference_metrics(data, good)["loss_name"] == "davidson"
    with pytest.raises(ValueError, match="loss: dataset has 1 tie pairs"):
        metrics.preference_metrics(data, good, LossConfig("bt"))
    for bad, message in (({0: np.array([[1.0], [0.0], [2.0]], np.float32)}, r"rewards\[0\]: expected shape \[2, K\]"),
                         ({0: np.array([1.0, 0.0])}, r"rewards\[0\]: expected shape"),
                         ({0: np.ones((2, 1)), 1: np.ones((2, 2))}, r"rewards\[1\]: expected shape \[2, 1\]"),
                         ({5: np.ones((2, 1))}, "rewards: key 5 is not an example index")):
        with pytest.raises(ValueError, match=message):
            metrics.preference_metrics(data, bad)


def test_rank_correlations_refuse_sequences_of_different_lengths():
    for correlation in (metrics.spearman, metrics.kendall_tau, metrics.pearson):
        with pytest.raises(ValueError, match="x, y: expected two 1-D sequences of one length"):
            correlation([1, 2, 3], [5])


@pytest.mark.parametrize("n", [2, 3, 5, 64, 1000, 4097])
def test_kendall_tau_matches_scipy_at_every_size(n):
    """The O(n log n) merge count (non-power-of-two sizes pad) equals scipy's tau-b, ties included."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n)
    tied = rng.integers(0, max(2, n // 5), n).astype(float)
    cases = [(tied, tied + rng.integers(-2, 3, n)), (rng.normal(size=n), rng.normal(size=n)), (tied, -tied)]
    for x, y in cases:
        x[rng.integers(0, n)] = np.inf
        assert metrics.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12, nan_ok=True)
