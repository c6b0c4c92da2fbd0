"""Tiny local models and tokenizers, built in code: no downloads, for the demo and for tests.

``build_tiny_tokenizer`` makes a word-level ``PreTrainedTokenizerFast`` (pad/unk/bos/eos and
a chat template); ``build_tiny_llama`` a randomly initialized Llama-style decoder backbone
(``LlamaModel``, no LM head) sized to it; ``write_tiny_backbone`` saves both to a directory
that ``RewardModel.from_backbone`` and ``prefkernels train --backbone`` accept.
"""
from __future__ import annotations

from pathlib import Path

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} \n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
BASIC_WORDS = (
    "human assistant user system : . , ? ! ' \" - the a an is are was it i you he she we they this that "
    "what how why please tell me about and or not no yes to of in on for with"
).split()


def build_tiny_tokenizer(words=None, model_max_length: int = 512):
    """Word-level ``PreTrainedTokenizerFast`` over ``words`` (default: the synthetic data's words).

    Specials: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (prepended to every text), ``</s>`` 3 (EOS);
    unknown words map to ``<unk>``; right padding; a plain ``role : content`` chat template.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if words is None:
        from prefkernels.data import synthetic
        words = synthetic.vocabulary()
    vocab = {token: i for i, token in enumerate((PAD, UNK, BOS, EOS))}
    for word in [*BASIC_WORDS, *words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        padding_side="right", model_max_length=model_max_length)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     intermediate_size: int | None = None, max_positions: int = 512, seed: int = 0,
                     attention_dropout: float = 0.0):
    """Random-init Llama-style decoder backbone (``LlamaModel``) for ``tokenizer``'s vocabulary.

    Initialization uses its own generator seeded with ``seed``; the global RNG is untouched.
    """
    from transformers import LlamaConfig, LlamaModel

    if hidden_size % heads:
        raise ValueError(f"hidden_size: expected a multiple of heads={heads}, got {hidden_size}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        attention_dropout=attention_dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaModel(config)


def write_tiny_backbone(path, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                        words=None, attention_dropout: float = 0.0) -> Path:
    """Save a tiny tokenizer + Llama backbone to ``path`` (a local ``--backbone`` directory)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer(words)
    backbone = build_tiny_llama(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads,
                                attention_dropout=attention_dropout, seed=seed)
    backbone.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
