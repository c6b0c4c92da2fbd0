"""The generated default preference data set (demo and tests): deterministic given a seed.

Each record is an explicit-prompt pair ``{"prompt", "chosen", "rejected", "chosen_rating",
"rejected_rating"}``. A prompt asks about a topic; each response is a sentence of 6-16 words
drawn from helpful words, unhelpful words and filler. The hidden rule: a response's quality is
``(helpful - unhelpful) / words``, and the chosen response has the higher quality (by at least
``min_gap``). Lengths are drawn independently of quality, so a good reward model shows no length
bias. The ratings are the qualities. The held-out split uses its own seed stream.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ("garden", "river", "engine", "castle", "robot", "forest", "market", "planet", "bridge", "violin",
          "desert", "harbor", "library", "volcano", "glacier", "orchard")
HELPFUL = ("clear", "accurate", "helpful", "precise", "kind", "honest", "thorough", "useful", "careful",
           "friendly", "relevant", "concise")
UNHELPFUL = ("rude", "wrong", "vague", "useless", "careless", "misleading", "confusing", "sloppy", "hostile",
             "irrelevant", "lazy", "false")
FILLER = ("the", "a", "is", "it", "and", "with", "very", "quite", "also", "this", "that", "of", "for", "about",
          "really", "some", "many", "one", "was", "has")
PROMPTS = ("human : please tell me about the {topic} . assistant :",
           "human : what do you know about the {topic} ? assistant :",
           "human : describe the {topic} for me . assistant :")


def vocabulary() -> list[str]:
    """Every word the generator can emit (for a word-level tokenizer)."""
    words = [*TOPICS, *HELPFUL, *UNHELPFUL, *FILLER]
    for template in PROMPTS:
        words += template.format(topic="x").split()
    return list(dict.fromkeys(w for w in words if w != "x"))


def response(rng: random.Random, topic: str) -> tuple[str, float]:
    """One response sentence and its hidden quality in [-1, 1]."""
    length = rng.randint(6, 16)
    helpful_share, unhelpful_share = rng.uniform(0.0, 0.45), rng.uniform(0.0, 0.45)
    words, score = [], 0
    for _ in range(length):
        u = rng.random()
        if u < helpful_share:
            words.append(rng.choice(HELPFUL))
            score += 1
        elif u < helpful_share + unhelpful_share:
            words.append(rng.choice(UNHELPFUL))
            score -= 1
        else:
            words.append(rng.choice(FILLER))
    words.insert(rng.randint(0, length), topic)
    return " " + " ".join(words) + " .", score / length


def pair(rng: random.Random, min_gap: float) -> dict:
    """One record; the chosen response's quality exceeds the rejected one's by >= ``min_gap``."""
    topic = rng.choice(TOPICS)
    prompt = rng.choice(PROMPTS).format(topic=topic)
    while True:
        (text_a, quality_a), (text_b, quality_b) = response(rng, topic), response(rng, topic)
        if abs(quality_a - quality_b) >= min_gap:
            break
    if quality_a < quality_b:
        (text_a, quality_a), (text_b, quality_b) = (text_b, quality_b), (text_a, quality_a)
    return {"prompt": prompt, "chosen": text_a, "rejected": text_b,
            "chosen_rating": round(quality_a, 4), "rejected_rating": round(quality_b, 4)}


def generate(num_pairs: int, seed: int = 0, min_gap: float = 0.15) -> list[dict]:
    """``num_pairs`` records, a pure function of (num_pairs, seed, min_gap)."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs: expected >= 1, got {num_pairs}")
    rng = random.Random(f"prefkernels-synthetic-{seed}")
    return [pair(rng, min_gap) for _ in range(num_pairs)]


def splits(num_train: int = 4000, num_valid: int = 500, seed: int = 0) -> dict[str, list[dict]]:
    """{"train": [...], "valid": [...]}: the held-out split comes from a separate seed stream."""
    return {"train": generate(num_train, seed=2 * seed), "valid": generate(num_valid, seed=2 * seed + 1)}


def write_splits(directory, num_train: int = 4000, num_valid: int = 500, seed: int = 0) -> dict[str, Path]:
    """Write ``splits(...)`` as ``train.jsonl`` and ``valid.jsonl`` in ``directory``; returns their paths."""
    from prefkernels.checkpoint import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in splits(num_train, num_valid, seed).items():
        paths[name] = directory / f"{name}.jsonl"
        atomic_write_text(paths[name], "".join(json.dumps(record) + "\n" for record in records))
    return paths
