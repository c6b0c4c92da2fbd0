"""Reward models in RL loops: best-of-N selection and a TRL-compatible reward function.

A prompt and a completion are scored together: strings as the text ``prompt + completion``,
message lists as the conversation ``prompt + completion`` (rendered with the chat template),
a message-list prompt with a string completion as one extra assistant turn. With a K-head
ensemble the reward is the head mean.
"""
from __future__ import annotations

import torch

from prefkernels.scorer import Scorer, require_list


def best_of_n(scorer: Scorer, prompts: list, candidates_per_prompt: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the highest-reward candidate for each prompt.

    ``candidates_per_prompt[p]`` holds prompt p's candidates (any number >= 1). Returns
    ``(best_index [P] int64, scores [P, N_max] float32)`` where ``N_max`` is the largest candidate
    count and a prompt with fewer candidates has -inf in the unused columns. All candidates are
    scored in one ``scorer.score`` call. A NaN score (kept in ``scores``) is never picked over a
    number; ties go to the first candidate.
    """
    require_list(prompts, "prompts", "a list with one prompt per sample")
    require_list(candidates_per_prompt, "candidates_per_prompt", "a list with one list of candidates per prompt")
    if len(prompts) != len(candidates_per_prompt):
        raise ValueError(f"candidates_per_prompt: expected one list per prompt ({len(prompts)}), "
                         f"got {len(candidates_per_prompt)}")
    if len(prompts) == 0:
        raise ValueError("prompts: empty list, nothing to select")
    for index, candidates in enumerate(candidates_per_prompt):
        require_list(candidates, f"candidates_per_prompt[{index}]", "a non-empty list of candidates")
        if len(candidates) == 0:
            raise ValueError(f"candidates_per_prompt[{index}]: expected a non-empty list of candidates, got []")
    pairs = [(prompt, candidate) for prompt, candidates in zip(prompts, candidates_per_prompt)
             for candidate in candidates]
    flat_scores = scorer.score_detailed(pairs, name="(prompt, candidate) pairs, prompt by prompt").rewards.mean(dim=1)
    scores = torch.full((len(prompts), max(len(c) for c in candidates_per_prompt)), float("-inf"))
    offset = 0
    for row, candidates in enumerate(candidates_per_prompt):
        scores[row, :len(candidates)] = flat_scores[offset:offset + len(candidates)]
        offset += len(candidates)
    return torch.where(scores.isnan(), float("-inf"), scores).argmax(dim=1), scores


class RewardFunction:
    """A reward model as a TRL ``reward_funcs`` callable: ``(prompts, completions, **kwargs) -> list[float]``.

    Works with ``GRPOTrainer`` (plain and conversational data) and in any loop. Extra keyword
    arguments (``completion_ids``, dataset columns, trainer state) are ignored; no completions give an
    empty list. ``__name__`` (TRL's logging name, ``rewards/<name>/mean``) is ``name``.
    """

    def __init__(self, scorer: Scorer, name: str = "reward_model"):
        self.scorer = scorer
        self.__name__ = self.__qualname__ = name

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        require_list(prompts, "prompts", "a list with one prompt per sample")
        require_list(completions, "completions", "a list with one completion per prompt")
        if len(prompts) != len(completions):
            raise ValueError(f"completions: expected one per prompt ({len(prompts)}), got {len(completions)}")
        if len(prompts) == 0:
            return []
        pairs = list(zip(prompts, completions))
        return self.scorer.score_detailed(pairs, name="(prompts, completions)").rewards.mean(dim=1).tolist()

    def __repr__(self) -> str:
        return f"RewardFunction(name={self.__name__!r}, num_heads={self.scorer.num_heads})"
