"""Offline fixtures for the scorer, CLI and RL tests: a word-level tokenizer built in code, tiny
random-init Llama/GPT-2 models from configs, and checkpoints saved to a temporary directory."""
from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the a cat dog sat ran on under mat log big small red blue happy sad good bad yes no "
         "why how what is are was it this that and or not very much Human Assistant : ? . ,").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                 "{% endfor %}{{ eos_token }}")


def build_tokenizer(chat_template: bool = True):
    """A fast word-level tokenizer over WORDS that prepends <s>; pad <pad> (id 0), bos <s> (1),
    eos </s> (2), max length 64."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", model_max_length=64)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def trainer_ids(tokenizer, text: str) -> list[int]:
    """Ids of a plain text as the prefkernels trainer feeds them: special tokens, then EOS appended."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def random_texts(n: int, rng: random.Random, min_words: int = 1, max_words: int = 20) -> list[str]:
    """n texts of WORDS with random lengths."""
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def gpt2_config(vocab_size: int, **overrides):
    from transformers import GPT2Config

    values = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return GPT2Config(**values)


def save_reward_checkpoint(path: Path, num_heads: int = 1, max_length: int | None = 48, seed: int = 0,
                           reward_mean=None, reward_std=None, tokenizer=None) -> Path:
    """A prefkernels checkpoint with a tiny random Llama backbone and a random K-head head."""
    from transformers import LlamaModel

    from prefkernels.model import RewardModel

    torch.manual_seed(seed)
    tokenizer = tokenizer or build_tokenizer()
    model = RewardModel(LlamaModel(llama_config(len(tokenizer))), num_heads=num_heads, max_length=max_length)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    model.reward_mean, model.reward_std = reward_mean, reward_std
    model.save_pretrained(str(path), tokenizer=tokenizer)
    return path


def save_hf_classifier(path: Path, arch: str = "llama", num_labels: int = 1, seed: int = 0, **config_overrides):
    """An HF LlamaForSequenceClassification / GPT2ForSequenceClassification checkpoint with the tokenizer."""
    from transformers import GPT2ForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    if arch == "llama":
        model = LlamaForSequenceClassification(llama_config(len(tokenizer), num_labels=num_labels,
                                                            **config_overrides))
    else:
        model = GPT2ForSequenceClassification(gpt2_config(len(tokenizer), num_labels=num_labels,
                                                          **config_overrides))
    with torch.no_grad():
        model.score.weight.normal_()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
