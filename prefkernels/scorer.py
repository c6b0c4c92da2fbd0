"""``Scorer``: fast batch inference for reward models (prefkernels or HF sequence-classification checkpoints).

Inputs, in any mix (``Scorer.render``):

- a text ``str``: tokenized as is, with the tokenizer's special tokens;
- a ``(prompt, response)`` pair of strings: scored as the text ``prompt + response`` (TRL's convention);
- a conversation, a list of ``{"role", "content"}`` dicts, or a ``(prompt_messages, response)`` pair
  with ``response`` a string (one assistant turn) or a list of messages: rendered with the tokenizer's
  chat template and tokenized without extra special tokens (the template writes them).

Throughput: texts are tokenized in one call, sorted by length (longest first) and cut into dynamic
batches whose padded size stays under a token budget; the backbone runs under ``torch.inference_mode``
(optionally bf16 autocast) and the fused ``pool_score`` applies the head to the pooled rows only.
Texts longer than ``max_length`` keep their end (left truncation, as training does) and are counted.
Scores come back in input order, on the CPU, float32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prefkernels import checkpoint
from prefkernels.model import RewardModel, load_tokenizer

DEFAULT_TOKEN_BUDGET = 16384
"""Padded tokens per batch (rows x longest row) when none is given."""

LAST_TOKEN_POOLED_CLASSES = frozenset({
    "LlamaForSequenceClassification", "MistralForSequenceClassification", "MixtralForSequenceClassification",
    "Qwen2ForSequenceClassification", "Qwen2MoeForSequenceClassification", "Qwen3ForSequenceClassification",
    "Qwen3MoeForSequenceClassification", "GemmaForSequenceClassification", "Gemma2ForSequenceClassification",
    "Phi3ForSequenceClassification", "GPT2ForSequenceClassification", "GPTNeoXForSequenceClassification",
})
"""HF classes whose head is ``score`` (a Linear) applied at the last non-pad token: loadable by ``Scorer``."""

_UNBOUNDED_MODEL_MAX_LENGTH = 1_000_000  # tokenizers without a limit report ~1e30


@dataclass
class ScoreResult:
    """Rewards [N, K] float32 (CPU, input order) and truncated [N] bool (the text was cut to max_length)."""

    rewards: torch.Tensor
    truncated: torch.Tensor


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, longest rows first.

    Each batch holds rows of similar length whose padded size (rows x longest row) is at most
    ``token_budget``; a row longer than the budget gets a batch of its own. Every index appears once.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget: expected >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        # Rows arrive longest first, so a batch's first row sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def is_conversation(value) -> bool:
    """True for a non-empty list of {"role", "content"} dicts."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def _default_max_length(tokenizer, config) -> int | None:
    """The tokenizer's model_max_length when set, else the backbone's position limit, else None."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _UNBOUNDED_MODEL_MAX_LENGTH:
        return int(limit)
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


class Scorer:
    """Scores texts, (prompt, response) pairs or conversations with a ``RewardModel``.

    ``score`` returns [N] float32 for a single head and [N, K] for a K-head ensemble;
    ``score_with_uncertainty`` returns the ensemble mean and std, both [N].
    ``truncated_count`` counts the texts cut to ``max_length`` since the scorer was made.
    """

    def __init__(self, model: RewardModel, tokenizer, *, device=None, max_length: int | None = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, normalize: bool = False, bf16: bool = False,
                 pad_pooling_token_id: int | None = None):
        """``pad_pooling_token_id``: pool at the last token that is not this id (HF's rule for
        ``*ForSequenceClassification``) instead of the last attended token."""
        if token_budget < 1:
            raise ValueError(f"token_budget: expected >= 1, got {token_budget}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length: expected >= 1 or None, got {max_length}")
        if normalize and (model.reward_mean is None or model.reward_std is None):
            raise ValueError("normalize: the checkpoint stores no reward_mean/reward_std (they are set after "
                             "training); score without normalize")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"
        self.max_length = max_length
        self.token_budget = token_budget
        self.normalize = normalize
        self.bf16 = bf16
        self.pad_pooling_token_id = pad_pooling_token_id
        self.pad_token_id = next((t for t in (pad_pooling_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
                                  if t is not None), 0)
        self.truncated_count = 0

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None, max_length: int | None = None,
                        token_budget: int = DEFAULT_TOKEN_BUDGET, normalize: bool = False, bf16: bool = False,
                        tokenizer=None) -> "Scorer":
        """Load a prefkernels checkpoint or an HF ``*ForSequenceClassification`` checkpoint directory.

        ``dtype`` casts the backbone (the head stays float32); ``bf16`` runs it under bf16 autocast.
        ``max_length`` defaults to the checkpoint's, then the tokenizer's, then the model's position limit.
        ``tokenizer`` defaults to the one stored with the checkpoint.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"path: {path} is not a directory")
        prefkernels_files = (checkpoint.CONFIG_NAME, checkpoint.HEAD_NAME, checkpoint.BACKBONE_DIR)
        if any((path / name).exists() for name in prefkernels_files):
            model = RewardModel.from_pretrained(str(path))  # clear error when one of the files is missing
            pad_pooling_token_id = None
            if tokenizer is None:
                if not (path / checkpoint.TOKENIZER_DIR).is_dir():
                    raise FileNotFoundError(f"path: {path} has no {checkpoint.TOKENIZER_DIR}/ directory; "
                                            "pass tokenizer=")
                tokenizer = load_tokenizer(str(path))
            max_length = max_length or model.max_length
        elif (path / "config.json").is_file():
            model, pad_pooling_token_id = _load_hf_sequence_classifier(path)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(path))
        else:
            raise FileNotFoundError(
                f"path: {path} is neither a prefkernels checkpoint ({', '.join(prefkernels_files)}) "
                "nor a transformers checkpoint (config.json)")
        if dtype is not None:
            model.backbone.to(dtype)
        max_length = max_length or _default_max_length(tokenizer, model.backbone.config)
        return cls(model, tokenizer, device=device, max_length=max_length, token_budget=token_budget,
                   normalize=normalize, bf16=bf16, pad_pooling_token_id=pad_pooling_token_id)

    def render(self, item, where: str = "input") -> tuple[str, bool]:
        """(text, add_special_tokens) of one input; ``where`` names it in errors."""
        if isinstance(item, str):
            return item, True
        if is_conversation(item):
            return self._apply_chat_template(item, where), False
        if isinstance(item, (tuple, list)) and len(item) == 2:
            prompt, response = item
            if isinstance(prompt, str) and isinstance(response, str):
                return prompt + response, True
            if is_conversation(prompt):
                response = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
                if is_conversation(response):
                    return self._apply_chat_template(prompt + response, where), False
        raise TypeError(f"{where}: expected a text (str), a (prompt, response) pair or a conversation "
                        f"(list of {{'role', 'content'}} dicts), got {_describe(item)}")

    def _apply_chat_template(self, messages: list[dict], where: str) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: a conversation needs a chat template and this tokenizer has none; "
                             "pass plain texts or (prompt, response) strings")
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def encode(self, rendered: list[tuple[str, bool]]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per rendered text (left-truncated to ``max_length``) and whether each was truncated.

        Counts the truncated texts in ``truncated_count``. An empty id list is returned as is.
        """
        token_ids: list[list[int]] = [[] for _ in rendered]
        truncated = [False] * len(rendered)
        for add_special_tokens in (True, False):
            indices = [i for i, (_, flag) in enumerate(rendered) if flag == add_special_tokens]
            if not indices:
                continue
            texts = [rendered[i][0] for i in indices]
            encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
            too_long = [j for j, ids in enumerate(encoded) if self.max_length and len(ids) > self.max_length]
            if too_long:
                cut = self.tokenizer([texts[j] for j in too_long], add_special_tokens=add_special_tokens,
                                     truncation=True, max_length=self.max_length)["input_ids"]
                for j, ids in zip(too_long, cut):
                    encoded[j] = ids
                    truncated[indices[j]] = True
            for i, ids in zip(indices, encoded):
                token_ids[i] = ids
        self.truncated_count += sum(truncated)
        return token_ids, truncated

    def score_token_ids(self, token_ids: list[list[int]], progress: bool = False) -> torch.Tensor:
        """Rewards [N, K] float32 on the CPU, in input order, for non-empty token id lists."""
        from tqdm.auto import tqdm

        rewards = torch.empty(len(token_ids), self.num_heads, dtype=torch.float32)
        lengths = [len(ids) for ids in token_ids]
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), autocast, tqdm(total=len(token_ids), unit="text", disable=not progress,
                                                    desc="scoring") as bar:
            for batch in plan_batches(lengths, self.token_budget):
                width = lengths[batch[0]]
                input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    input_ids[row, :lengths[index]] = torch.tensor(token_ids[index])
                    attention_mask[row, :lengths[index]] = 1
                input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
                hidden = self.model.hidden_states(input_ids, attention_mask)
                if self.pad_pooling_token_id is None:
                    batch_rewards = self.model.head.score(hidden, attention_mask=attention_mask)
                else:
                    positions = torch.arange(width, device=self.device)
                    last_index = ((input_ids != self.pad_pooling_token_id) * positions).argmax(dim=1)
                    batch_rewards = self.model.head.score(hidden, last_index=last_index)
                rewards[torch.tensor(batch)] = batch_rewards.float().cpu()
                bar.update(len(batch))
        return self.model.normalize(rewards) if self.normalize else rewards

    def score_detailed(self, inputs, progress: bool = False) -> ScoreResult:
        """Rewards [N, K] float32 and truncated [N] bool, in input order."""
        if isinstance(inputs, (str, dict)) or not hasattr(inputs, "__len__"):
            raise TypeError("inputs: expected a list of texts, (prompt, response) pairs or conversations, "
                            f"got {_describe(inputs)}")
        if len(inputs) == 0:
            raise ValueError("inputs: empty list, nothing to score")
        rendered = [self.render(item, where=f"inputs[{i}]") for i, item in enumerate(inputs)]
        token_ids, truncated = self.encode(rendered)
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ValueError(f"inputs[{empty[0]}]: no tokens after tokenization ({len(empty)} such inputs)")
        return ScoreResult(self.score_token_ids(token_ids, progress=progress), torch.tensor(truncated))

    def score(self, inputs, progress: bool = False) -> torch.Tensor:
        """Scores in input order: [N] float32 with one head, [N, K] float32 with K heads."""
        rewards = self.score_detailed(inputs, progress=progress).rewards
        return rewards[:, 0] if self.num_heads == 1 else rewards

    def score_with_uncertainty(self, inputs, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [N], std [N]) over the K heads; std is the population std (0 for a single head)."""
        rewards = self.score_detailed(inputs, progress=progress).rewards
        return rewards.mean(dim=1), rewards.std(dim=1, correction=0)


def _load_hf_sequence_classifier(path: Path) -> tuple[RewardModel, int | None]:
    """A RewardModel holding an HF last-token-pooled classifier's backbone and ``score`` weights,
    and the pad token id HF pools by (None when the config has none)."""
    from transformers import AutoModelForSequenceClassification

    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(f"path: {path}/config.json lists architectures {architectures}, not a "
                         "*ForSequenceClassification model; train a reward head with prefkernels first")
    classifier = AutoModelForSequenceClassification.from_pretrained(str(path))
    score = getattr(classifier, "score", None)
    name = type(classifier).__name__
    if name not in LAST_TOKEN_POOLED_CLASSES or not isinstance(score, nn.Linear):
        raise ValueError(f"path: {path} holds a {name}, whose head is not last-token pooled; supported: "
                         f"{', '.join(sorted(LAST_TOKEN_POOLED_CLASSES))}")
    backbone = classifier.base_model
    model = RewardModel(backbone, num_heads=score.out_features)
    with torch.no_grad():
        model.head.weight.copy_(score.weight.float())
        model.head.bias.copy_(score.bias.float() if score.bias is not None else torch.zeros(score.out_features))
    config = backbone.config.get_text_config() if hasattr(backbone.config, "get_text_config") else backbone.config
    return model, config.pad_token_id
