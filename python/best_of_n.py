"""Best-of-N sampling with a prefkernels reward model (offline, CPU, about 30 s).

A tiny random-init policy samples N completions per prompt; ``prefkernels.rl.best_of_n`` keeps the
one the reward model scores highest. With no ``--reward-model`` the script first trains a small
demo reward model on a known rule (more "good" and fewer "bad" words is better) with the fused
Bradley-Terry loss, so the effect of the selection is visible: the kept completions use "good"
far more often than a plain sample.

    python python/best_of_n.py --n 8 --prompts 16
    python python/best_of_n.py --reward-model path/to/checkpoint   # any prefkernels / HF classifier

``reinforce_loop.py`` reuses the demo builders defined here.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from prefkernels.model import RewardModel
from prefkernels.rl import best_of_n
from prefkernels.scorer import Scorer

WORDS = ("good bad the a cat dog sat ran on under mat big small red blue happy sad yes no why how what "
         "is are was it this that and or not very Human Assistant : ?").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PROMPTS = ["Human : what is it ? Assistant :", "Human : how was the cat ? Assistant :",
           "Human : why is the dog sad ? Assistant :", "Human : is this red or blue ? Assistant :"]


def build_tokenizer():
    """A word-level fast tokenizer over WORDS, built in code (no download): <s> first, pad id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=64)


def tiny_llama_config(tokenizer, hidden_size: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def rule_reward(text: str) -> int:
    """The demo preference: count of "good" minus count of "bad"."""
    words = text.split()
    return words.count("good") - words.count("bad")


def random_text(rng: random.Random) -> str:
    """A prompt followed by 4-10 words, "good"/"bad" each drawn 15% of the time."""
    words = [rng.choice(["good", "bad"]) if rng.random() < 0.3 else rng.choice(WORDS[2:])
             for _ in range(rng.randint(4, 10))]
    return rng.choice(PROMPTS) + " " + " ".join(words)


def train_demo_reward_model(tokenizer, directory: Path, steps: int, seed: int = 0) -> Path:
    """Train a tiny RewardModel on pairs ranked by ``rule_reward``; save it to ``directory``."""
    from transformers import LlamaModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = RewardModel(LlamaModel(tiny_llama_config(tokenizer)), max_length=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch_of_pairs(size):
        chosen, rejected = [], []
        while len(chosen) < size:
            a, b = random_text(rng), random_text(rng)
            if rule_reward(a) != rule_reward(b):
                chosen.append(max(a, b, key=rule_reward))
                rejected.append(min(a, b, key=rule_reward))
        # As the prefkernels trainer (and the Scorer) encode a plain text: special tokens, then EOS.
        ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in chosen + rejected]
        return tokenizer.pad({"input_ids": ids}, return_tensors="pt")  # rows [0, P) chosen, [P, 2P) rejected

    for _ in range(steps):
        batch = batch_of_pairs(64)
        loss, _ = model.loss(batch["input_ids"], batch["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        batch = batch_of_pairs(256)
        rewards = model(batch["input_ids"], batch["attention_mask"])[:, 0]
        accuracy = (rewards[:256] > rewards[256:]).float().mean().item()
    print(f"demo reward model: {steps} steps, held-out pairwise accuracy {accuracy:.3f}")
    model.save_pretrained(str(directory), tokenizer=tokenizer)
    return directory


def build_policy(tokenizer, seed: int = 0):
    """A tiny random-init causal LM over the demo vocabulary."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=32, layers=1))


def generate(policy, tokenizer, prompt: str, n: int, length: int) -> tuple[torch.Tensor, int, list[str]]:
    """n samples of exactly ``length`` words for one prompt (special tokens never sampled):
    (token ids [n, prompt + length], prompt length, completion texts)."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].repeat(n, 1)
    with torch.no_grad():
        output = policy.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                 max_new_tokens=length, min_new_tokens=length, pad_token_id=0,
                                 suppress_tokens=list(range(len(SPECIAL))))
    prompt_length = input_ids.shape[1]
    texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    return output, prompt_length, [" " + text for text in texts]


def sample_completions(policy, tokenizer, prompt: str, n: int, length: int) -> list[str]:
    """n sampled completion texts of exactly ``length`` words for one prompt."""
    return generate(policy, tokenizer, prompt, n, length)[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="candidates per prompt")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=8, help="words per completion")
    parser.add_argument("--rm-steps", type=int, default=300, help="training steps of the demo reward model")
    parser.add_argument("--reward-model", default=None, help="an existing checkpoint instead of the demo model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.reward_model or train_demo_reward_model(tokenizer, Path(tmp) / "rm", args.rm_steps, args.seed)
        scorer = Scorer.from_pretrained(path)
    policy = build_policy(tokenizer, args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    candidates = [sample_completions(policy, tokenizer, prompt, args.n, args.length) for prompt in prompts]
    best, scores = best_of_n(scorer, prompts, candidates)

    chosen = [cands[i] for cands, i in zip(candidates, best.tolist())]
    first = [cands[0] for cands in candidates]
    rows = [("one sample", scores[:, 0].mean().item(), sum(map(rule_reward, first)) / len(first)),
            (f"best of {args.n}", scores.gather(1, best.unsqueeze(1)).mean().item(),
             sum(map(rule_reward, chosen)) / len(chosen))]
    print(f"{'selection':<12} {'mean reward':>12} {'good - bad':>11}")
    for name, reward, rule in rows:
        print(f"{name:<12} {reward:>12.3f} {rule:>11.3f}")
    print(f"example: {prompts[0]}{chosen[0]}")


if __name__ == "__main__":
    main()
