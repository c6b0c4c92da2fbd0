"""REINFORCE in plain PyTorch with a prefkernels reward model as the reward (offline, CPU, under a minute).

The demo reward model of ``best_of_n.py`` (trained here in seconds on a known rule: more "good" and
fewer "bad" words is better) scores each sampled completion through ``prefkernels.RewardFunction``,
the same callable TRL's GRPOTrainer takes. A tiny random-init policy is updated with the
policy-gradient loss -(reward - batch mean) / batch std * log p(completion); the printed mean
reward rises, and so does the rule it encodes.

    python python/reinforce_loop.py --steps 40
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from best_of_n import PROMPTS, SPECIAL, build_policy, build_tokenizer, generate, rule_reward, train_demo_reward_model
from prefkernels.rl import RewardFunction
from prefkernels.scorer import Scorer


def completion_log_probs(policy, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Sum of log p(token) over each completion [B], special tokens excluded from the support (as sampled)."""
    logits = policy(sequences).logits[:, prompt_length - 1:-1].float()
    logits[..., :len(SPECIAL)] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1).sum(dim=1)


def main(argv: list[str] | None = None) -> list[float]:
    """Run the loop; returns the mean reward of each step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--length", type=int, default=8, help="words per completion")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rm-steps", type=int, default=100, help="training steps of the demo reward model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        scorer = Scorer.from_pretrained(train_demo_reward_model(tokenizer, Path(tmp) / "rm", args.rm_steps, args.seed))
    reward_function = RewardFunction(scorer)
    policy = build_policy(tokenizer, args.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)

    history = []
    print(f"{'step':>4} {'mean reward':>12} {'good - bad':>11}")
    for step in range(args.steps):
        prompt = PROMPTS[step % len(PROMPTS)]
        sequences, prompt_length, completions = generate(policy, tokenizer, prompt, args.batch, args.length)
        rewards = torch.tensor(reward_function([prompt] * args.batch, completions))
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        loss = -(advantages * completion_log_probs(policy, sequences, prompt_length)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(rewards.mean().item())
        print(f"{step:>4} {history[-1]:>12.3f} {sum(map(rule_reward, completions)) / args.batch:>11.3f}")
    window = max(1, args.steps // 5)
    print(f"mean reward: first {window} steps {sum(history[:window]) / window:.3f}, "
          f"last {window} steps {sum(history[-window:]) / window:.3f}")
    return history


if __name__ == "__main__":
    main()
