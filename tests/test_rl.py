"""RL helpers: best_of_n selection, RewardFunction (plain and conversational, clear errors), and
RewardFunction driving a real trl.GRPOTrainer run."""
import random

import pytest
import torch

from _rl_fixtures import build_tokenizer, llama_config, random_texts, save_reward_checkpoint
from prefkernels.rl import RewardFunction, best_of_n
from prefkernels.scorer import Scorer


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return Scorer.from_pretrained(save_reward_checkpoint(tmp_path_factory.mktemp("rm") / "ckpt"))


@pytest.fixture(scope="module")
def ensemble_scorer(tmp_path_factory):
    return Scorer.from_pretrained(save_reward_checkpoint(tmp_path_factory.mktemp("rm3") / "ckpt", num_heads=3))


def test_best_of_n_picks_the_highest_scoring_candidate(scorer):
    rng = random.Random(0)
    prompts = random_texts(5, rng, max_words=6)
    candidates = [[" " + c for c in random_texts(n, rng)] for n in (4, 1, 6, 3, 6)]
    best, scores = best_of_n(scorer, prompts, candidates)
    assert best.shape == (5,) and scores.shape == (5, 6)
    for p, (prompt, cands) in enumerate(zip(prompts, candidates)):
        expected = scorer.score([(prompt, c) for c in cands])
        torch.testing.assert_close(scores[p, :len(cands)], expected, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(scores[p, len(cands):]).all()
        assert best[p] == int(expected.argmax())


def test_best_of_n_with_an_ensemble_uses_the_head_mean(ensemble_scorer):
    rng = random.Random(1)
    prompts, candidates = random_texts(3, rng), [random_texts(4, rng) for _ in range(3)]
    best, scores = best_of_n(ensemble_scorer, prompts, candidates)
    means = ensemble_scorer.score([(p, c) for p, cs in zip(prompts, candidates) for c in cs]).mean(dim=1)
    torch.testing.assert_close(scores, means.view(3, 4))
    assert best.tolist() == means.view(3, 4).argmax(dim=1).tolist()


def test_best_of_n_never_picks_a_nan_score(scorer, monkeypatch):
    """argmax ranks NaN above every number: best_of_n must not return a NaN-scored candidate."""
    from prefkernels.scorer import ScoreResult

    flat = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("nan"), float("nan")])
    monkeypatch.setattr(scorer, "score_detailed", lambda items, name=None: ScoreResult(
        flat[:len(items)].unsqueeze(1), torch.zeros(len(items), dtype=torch.bool)))
    best, scores = best_of_n(scorer, ["a", "b"], [["w", "x", "y", "z"], ["u", "v"]])
    assert best.tolist() == [2, 0] and scores[0, 1].isnan()  # all NaN: the first candidate


def test_best_of_n_rejects_bad_shapes(scorer):
    with pytest.raises(ValueError, match="candidates_per_prompt: expected one list per prompt"):
        best_of_n(scorer, ["a", "b"], [["x"]])
    with pytest.raises(ValueError, match=r"candidates_per_prompt\[1\]: expected a non-empty list"):
        best_of_n(scorer, ["a", "b"], [["x"], []])


def test_reward_function_plain_and_conversational(scorer):
    reward = RewardFunction(scorer, name="rm")
    assert reward.__name__ == "rm" and reward.__qualname__ == "rm"
    rng = random.Random(2)
    prompts, completions = random_texts(6, rng), [" " + c for c in random_texts(6, rng)]
    rewards = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 6, trainer_state=None)
    assert isinstance(rewards, list) and all(isinstance(r, float) for r in rewards)
    torch.testing.assert_close(torch.tensor(rewards), scorer.score([p + c for p, c in zip(prompts, completions)]))

    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    chat_rewards = reward(chat_prompts, chat_completions)
    expected = scorer.score([p + c for p, c in zip(chat_prompts, chat_completions)])
    torch.testing.assert_close(torch.tensor(chat_rewards), expected)
    with pytest.raises(ValueError, match=r"completions: expected one per prompt \(6\), got 5"):
        reward(prompts, completions[:5])


def test_reward_function_drives_grpo_trainer(scorer, tmp_path):
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    returned = []

    class RecordingReward(RewardFunction):
        def __call__(self, prompts, completions, **kwargs):
            rewards = super().__call__(prompts, completions, **kwargs)
            returned.append(rewards)
            return rewards

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    policy = LlamaForCausalLM(llama_config(len(tokenizer)))
    dataset = Dataset.from_dict({"prompt": random_texts(8, random.Random(3), 2, 5)})
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=3, learning_rate=1e-3, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=RecordingReward(scorer, name="prefkernels_rm"), args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    logged = [h["rewards/prefkernels_rm/mean"] for h in trainer.state.log_history if "rewards/prefkernels_rm/mean" in h]
    assert len(returned) == 3 and all(len(r) == 4 for r in returned)
    assert logged == pytest.approx([sum(r) / len(r) for r in returned], abs=1e-5)


def test_reward_function_of_no_completions_is_empty(scorer):
    assert RewardFunction(scorer)([], []) == []


@pytest.mark.parametrize("prompts,completions,name", [("ab", ["x", "y"], "prompts"), (["a", "b"], "xy", "completions")])
def test_reward_function_rejects_a_string_for_a_list(scorer, prompts, completions, name):
    """A string has a length too: without the check, each character would be scored as a prompt or completion."""
    with pytest.raises(TypeError, match=f"{name}: expected a list"):
        RewardFunction(scorer)(prompts, completions)


def test_best_of_n_rejects_a_string_of_prompts_or_candidates(scorer):
    with pytest.raises(TypeError, match="prompts: expected a list"):
        best_of_n(scorer, "ab", [["x"], ["y"]])
    with pytest.raises(TypeError, match=r"candidates_per_prompt\[1\]: expected a non-empty list"):
        best_of_n(scorer, ["a", "b"], [["x"], "yz"])


def test_reward_function_errors_name_the_callers_lists(scorer):
    """A bad item is named by its place in the caller's prompts/completions, not an internal list."""
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match=r"^\(prompts, completions\)\[1\]: expected a text"):
        RewardFunction(scorer)(["a", "b"], [" x", messages])
