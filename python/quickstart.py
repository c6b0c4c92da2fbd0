"""Quickstart: fit a reward head with the fused op on synthetic hidden states.

Hidden states [N, T, D] come from a hidden rule (a direction in D that "good" responses
point along); pairs are (better, worse). A RewardHead trained with prefkernels.fused_bt_loss
recovers the rule. Prints held-out pairwise accuracy and fwd+bwd speed vs the eager baseline.

    python python/quickstart.py [--steps 200] [--dim 256]
"""
from __future__ import annotations

import argparse
import time

import torch

import prefkernels
from prefkernels import reference


def synthetic_pairs(pairs: int, positions: int, dim: int, direction: torch.Tensor, generator):
    """Padded hidden states [2P, T, D] (chosen rows first) and their attention mask [2P, T]."""
    hidden = torch.randn(2 * pairs, positions, dim, generator=generator)
    lengths = torch.randint(2, positions + 1, (2 * pairs,), generator=generator)
    mask = (torch.arange(positions) < lengths.unsqueeze(1)).long()
    quality = (hidden[torch.arange(2 * pairs), lengths - 1] @ direction).view(2, pairs)
    first, second = torch.arange(pairs), torch.arange(pairs, 2 * pairs)
    better_second = quality[1] > quality[0]  # put the better row of each pair first
    chosen = torch.where(better_second, second, first)
    rejected = torch.where(better_second, first, second)
    order = torch.cat([chosen, rejected])
    return hidden[order], mask[order]


def accuracy(head, hidden, mask) -> float:
    with torch.no_grad():
        rewards = head.score(hidden, attention_mask=mask)[:, 0]
    half = rewards.shape[0] // 2
    return (rewards[:half] > rewards[half:]).float().mean().item()


def time_step(fn, hidden, weight, bias, mask, repeats=20) -> float:
    samples = []
    for _ in range(repeats):
        hidden.grad = weight.grad = bias.grad = None
        start = time.perf_counter()
        loss, _ = fn(hidden, weight, bias, attention_mask=mask)
        loss.backward()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--train-pairs", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(1234)
    direction = torch.randn(args.dim, generator=g)
    train_hidden, train_mask = synthetic_pairs(args.train_pairs, args.positions, args.dim, direction, g)
    test_hidden, test_mask = synthetic_pairs(512, args.positions, args.dim, direction, g)

    torch.manual_seed(0)
    head = prefkernels.RewardHead(args.dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    print(f"held-out accuracy before training: {accuracy(head, test_hidden, test_mask):.3f}")
    for step in range(args.steps):
        idx = torch.randint(0, args.train_pairs, (args.pairs,), generator=g)
        rows = torch.cat([idx, idx + args.train_pairs])
        loss, _ = head.loss(train_hidden[rows], attention_mask=train_mask[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    acc = accuracy(head, test_hidden, test_mask)
    print(f"held-out accuracy after {args.steps} steps: {acc:.3f}")

    hidden = test_hidden[: 2 * args.pairs].clone().requires_grad_()
    mask = test_mask[: 2 * args.pairs]
    weight = head.weight.detach().clone().requires_grad_()
    bias = head.bias.detach().clone().requires_grad_()
    fused = time_step(prefkernels.fused_bt_loss, hidden, weight, bias, mask)
    eager = time_step(reference.eager, hidden, weight, bias, mask)
    print(f"fwd+bwd median: fused {fused * 1e3:.3f} ms, eager {eager * 1e3:.3f} ms ({eager / fused:.2f}x)")
    return acc


if __name__ == "__main__":
    main()
