"""``Scorer``: fast batch inference for reward models (prefkernels or HF sequence-classification checkpoints).

Inputs, in any mix (``Scorer.render``):

- a text ``str``: tokenized with the tokenizer's special tokens;
- a ``(prompt, response)`` pair of strings: scored as the text ``prompt + response`` (TRL's convention);
- a conversation, a list of ``{"role", "content"}`` dicts, or a ``(prompt_messages, response)`` pair
  with ``response`` a string (one assistant turn) or a list of messages: rendered with the tokenizer's
  chat template and tokenized without extra special tokens (the template writes them).

Token ids follow the prefkernels trainer (``prefkernels.data``): a plain text that does not end with
the end token (EOS, else SEP) gets one appended (``append_eos``; on for prefkernels checkpoints and
directories written by ``prefkernels export --hf``, whose tokenizer appends it itself where it can;
off for other HF checkpoints, which score the tokenizer's ids as HF does). A row longer than ``max_length``
keeps its leading special tokens (for a conversation, the BOS/CLS its template writes) and its end,
losing tokens right after them (left truncation, as training and HF's ``truncation_side="left"``
do); truncated texts are counted.

Throughput: texts are tokenized in one call, sorted by length (longest first) and cut into dynamic
batches whose padded size stays under a token budget; the backbone runs under ``torch.inference_mode``
(optionally bf16 autocast) and the fused ``pool_score`` applies the head to the pooled rows only.
Scores come back in input order, on the CPU, float32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prefkernels import checkpoint, checks
from prefkernels.data import (end_token_id, is_messages, pad_rows, pad_token_id, prefix_token_ids, render_messages,
                              require_unicode, suffix_token_ids)
from prefkernels.model import (RewardModel, check_max_length, default_max_length, eval_mode, load_tokenizer,
                               resolve_device)

CPU_TOKEN_BUDGET = 4096
ACCELERATOR_TOKEN_BUDGET = 32768
"""Default padded tokens per batch (rows x longest row): small on CPUs, where larger batches gain
nothing but padding, large on accelerators."""

LAST_TOKEN_POOLED_CLASSES = frozenset({
    "LlamaForSequenceClassification", "MistralForSequenceClassification", "MixtralForSequenceClassification",
    "Qwen2ForSequenceClassification", "Qwen2MoeForSequenceClassification", "Qwen3ForSequenceClassification",
    "Qwen3MoeForSequenceClassification", "GemmaForSequenceClassification", "Gemma2ForSequenceClassification",
    "Phi3ForSequenceClassification", "GPT2ForSequenceClassification", "GPTNeoXForSequenceClassification",
})
"""HF classes whose head is ``score`` (a Linear) applied at the last non-pad token: loadable by ``Scorer``."""


EXPORT_INFO_NAME = "prefkernels_export.json"
EXPORT_INFO_FORMAT = "prefkernels-hf-export"
"""Written by ``prefkernels export --hf`` next to the HF files: how the model was trained to tokenize
(``append_eos``, ``max_length``) and its reward statistics, so ``Scorer`` scores the export as the
checkpoint it came from."""


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
    return is_messages(value) and len(value) > 0


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def default_token_budget(device: torch.device) -> int:
    return CPU_TOKEN_BUDGET if device.type == "cpu" else ACCELERATOR_TOKEN_BUDGET


def special_tokens_around_text(tokenizer) -> tuple[int, int]:
    """(leading, trailing): how many special tokens the tokenizer puts before and after a text
    (BERT: 1 and 1 for CLS and SEP; Llama: 1 and 0 for BOS)."""
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    without = tokenizer("a b", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return start, len(with_special) - start - len(without)
    return 0, 0


class Scorer:
    """Scores texts, (prompt, response) pairs or conversations with a ``RewardModel``.

    ``score`` returns [N] float32 for a single head and [N, K] for a K-head ensemble;
    ``score_with_uncertainty`` returns the ensemble mean and std, both [N].
    ``truncated_count`` counts the texts cut to ``max_length`` since the scorer was made.
    """

    def __init__(self, model: RewardModel, tokenizer, *, device=None, max_length: int | None = None,
                 token_budget: int | None = None, normalize: bool = False, bf16: bool = False,
                 append_eos: bool = True, pad_pooling_token_id: int | None = None,
                 tokenizer_appends_end: bool = False):
        """``max_length``: longer rows are left-truncated to it (None: no limit). ``token_budget``:
        padded tokens per batch (default ``default_token_budget(device)``). ``append_eos``: end plain
        texts with the end token and build rows as the trainer does (False: the tokenizer's ids, as HF
        does). ``pad_pooling_token_id``: pool at the last
        token that is not this id (HF's rule for ``*ForSequenceClassification``) instead of the last
        attended token. ``tokenizer_appends_end``: the tokenizer appends the end token itself where
        training's did not (an export made it): a text that already ended with it keeps one, as in
        training."""
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"token_budget: expected >= 1, got {token_budget}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length: expected >= 1 or None, got {max_length}")
        if max_length is not None:
            check_max_length(max_length, model.backbone.config)
        if normalize and (model.reward_mean is None or model.reward_std is None):
            raise ValueError("normalize: the checkpoint stores no reward_mean/reward_std (they are set after "
                             "training); score without normalize")
        self.device = resolve_device(device)
        self.model = model.to(self.device)  # in eval mode while it scores, then back to its mode
        self.tokenizer = tokenizer
        self.special_tokens_around_text = special_tokens_around_text(tokenizer)
        self.prefix_token_ids, self.suffix_token_ids = prefix_token_ids(tokenizer), suffix_token_ids(tokenizer)
        self.end_token_id = end_token_id(tokenizer) if append_eos else None
        self.tokenizer_appends_end = tokenizer_appends_end
        self.max_length = max_length
        self.token_budget = token_budget or default_token_budget(self.device)
        self.normalize = normalize
        self.bf16 = bf16
        self.pad_pooling_token_id = pad_pooling_token_id
        self.pad_token_id = pad_pooling_token_id if pad_pooling_token_id is not None else pad_token_id(tokenizer)
        self.truncated_count = 0

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: torch.dtype | None = None, max_length: int | None = None,
                        token_budget: int | None = None, normalize: bool = False, bf16: bool = False,
                        tokenizer=None, append_eos: bool | None = None) -> "Scorer":
        """Load a prefkernels checkpoint or an HF ``*ForSequenceClassification`` checkpoint directory.

        ``dtype`` casts the backbone (the head stays float32); ``bf16`` runs it under bf16 autocast.
        ``max_length`` defaults to the checkpoint's (a prefkernels export records it), else the
        smaller of the tokenizer's and the model's position limit. ``tokenizer`` defaults to the one stored with the
        checkpoint. ``append_eos`` defaults to True for prefkernels checkpoints and their exports (as
        trained) and False for other HF ones (HF's own scoring).
        """
        device = resolve_device(device)  # before loading any weights
        path = checkpoint.locate(path)
        if not path.is_dir():
            raise FileNotFoundError(f"path: {path} is not a directory")
        if any((path / name).exists() for name in checkpoint.REQUIRED_FILES):
            model = RewardModel.from_pretrained(str(path))  # clear error when one of the files is missing
            pad_pooling_token_id, trained_with_eos, tokenizer_appends_end = None, True, False
            if tokenizer is None:
                tokenizer = load_tokenizer(str(path))  # names the missing tokenizer/ directory
            max_length = model.max_length if max_length is None else max_length
        elif (path / "config.json").is_file():
            info = read_export_info(path)
            model, pad_pooling_token_id = _load_hf_sequence_classifier(path, exported=bool(info))
            # only the export's own tokenizer appends the end token the export made it append
            tokenizer_appends_end = bool(info.get("eos_appended_by_export", False)) and tokenizer is None
            # A prefkernels export: as trained (its tokenizer appends EOS itself where it could, which
            # makes appending a no-op). Otherwise unknown: score the tokenizer's ids, as HF does.
            trained_with_eos = bool(info.get("append_eos", False))
            if info.get("reward_mean") is not None and info.get("reward_std") is not None:
                model.reward_mean, model.reward_std = info["reward_mean"], info["reward_std"]
            max_length = info.get("max_length") if max_length is None else max_length
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(path))
        else:
            raise FileNotFoundError(
                f"path: {path} is neither a prefkernels checkpoint ({', '.join(checkpoint.REQUIRED_FILES)}) "
                "nor a transformers checkpoint (config.json)")
        if dtype is not None:
            model.backbone.to(dtype)
        if max_length is None:
            max_length = default_max_length(tokenizer, model.backbone.config)
        return cls(model, tokenizer, device=device, max_length=max_length, token_budget=token_budget,
                   normalize=normalize, bf16=bf16, append_eos=trained_with_eos if append_eos is None else append_eos,
                   pad_pooling_token_id=pad_pooling_token_id, tokenizer_appends_end=tokenizer_appends_end)

    def render(self, item, where: str = "input") -> tuple[str, bool]:
        """(text, add_special_tokens) of one input; ``where`` names it in errors."""
        text, add_special_tokens = self._render(item, where)
        return require_unicode(text, where), add_special_tokens

    def _render(self, item, where: str) -> tuple[str, bool]:
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
        for index, message in enumerate(messages):
            if not isinstance(message["content"], str):
                raise TypeError(f"{where}: message {index}: expected a string 'content', got "
                                f"{type(message['content']).__name__}")
        return render_messages(self.tokenizer, messages, where)

    def encode(self, rendered: list[tuple[str, bool]]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per rendered text (see the module docstring) and whether each was truncated.

        Counts the truncated texts in ``truncated_count``. A text with no tokens besides the special
        tokens gets an empty list (as the trainer, which rejects such texts).
        """
        token_ids: list[list[int]] = [[] for _ in rendered]
        truncated = [False] * len(rendered)
        for add_special_tokens in (True, False):
            indices = [i for i, (_, flag) in enumerate(rendered) if flag == add_special_tokens]
            if not indices:
                continue
            encoded = self.tokenizer([rendered[i][0] for i in indices], add_special_tokens=add_special_tokens,
                                     verbose=False)["input_ids"]
            added_lead, added_trail = self.special_tokens_around_text if add_special_tokens else (0, 0)
            for i, ids in zip(indices, encoded):
                ids = list(ids)
                if (add_special_tokens and self.tokenizer_appends_end and len(ids) >= 2
                        and ids[-1] == ids[-2] == self.end_token_id):
                    ids.pop()  # the text ended with the end token already: training did not append another
                lead, trail = added_lead, added_trail
                # the tokens the tokenizer adds, then any BOS/CLS written into the text, lead the row (a cut
                # keeps them): in rows as training builds them, and in a conversation's, whose template writes
                # its BOS (else plain texts keep the tokenizer's rows, as HF)
                if self.end_token_id is not None or not add_special_tokens:
                    while lead < len(ids) and ids[lead] in self.prefix_token_ids:
                        lead += 1
                if self.end_token_id is not None:  # EOS/SEP ending a training row are no text
                    while trail < len(ids) - lead and ids[-1 - trail] in self.suffix_token_ids:
                        trail += 1
                if len(ids) <= lead + trail:
                    continue
                if add_special_tokens and self.end_token_id is not None and ids[-1] != self.end_token_id:
                    ids.append(self.end_token_id)
                excess = len(ids) - self.max_length if self.max_length else 0
                if excess > 0:
                    ids = ids[:lead] + ids[lead + excess:] if lead < self.max_length else ids[-self.max_length:]
                    truncated[i] = True
                token_ids[i] = ids
        self.truncated_count += sum(truncated)
        return token_ids, truncated

    def score_token_ids(self, token_ids: list[list[int]], progress: bool = False) -> torch.Tensor:
        """Rewards [N, K] float32 on the CPU, in input order, for non-empty token id lists."""
        from tqdm.auto import tqdm

        lengths = [len(ids) for ids in token_ids]
        if lengths and min(lengths) < 1:
            raise ValueError(f"token_ids[{lengths.index(min(lengths))}]: empty, expected at least one token")
        batches = plan_batches(lengths, self.token_budget)
        batch_rewards_on_device = []  # copied back once at the end: no device sync per batch
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        # every mask row has a token (checked above), so the op's value checks, a host sync per batch, are not needed
        with torch.inference_mode(), eval_mode(self.model), autocast, checks.values_checked_by_caller(), tqdm(
                total=len(token_ids), unit="text", disable=not progress, desc="scoring") as bar:
            for batch in batches:
                input_ids, attention_mask = pad_rows([token_ids[index] for index in batch], self.pad_token_id)
                width = input_ids.shape[1]
                if self.device.type == "cuda":  # from pageable memory a copy would wait for the device
                    input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
                input_ids = input_ids.to(self.device, non_blocking=True)
                attention_mask = attention_mask.to(self.device, non_blocking=True)
                hidden = self.model.hidden_states(input_ids, attention_mask)
                if self.pad_pooling_token_id is None:
                    batch_rewards = self.model.head.score(hidden, attention_mask=attention_mask)
                else:
                    positions = torch.arange(width, device=self.device)
                    last_index = ((input_ids != self.pad_pooling_token_id) * positions).argmax(dim=1)
                    batch_rewards = self.model.head.score(hidden, last_index=last_index)
                batch_rewards_on_device.append(batch_rewards.float())
                bar.update(len(batch))
        rewards = torch.empty(len(token_ids), self.num_heads, dtype=torch.float32)
        rewards[torch.tensor([i for batch in batches for i in batch])] = torch.cat(batch_rewards_on_device).cpu()
        return self.model.normalize(rewards) if self.normalize else rewards

    def score_detailed(self, inputs, progress: bool = False, name: str = "inputs") -> ScoreResult:
        """Rewards [N, K] float32 and truncated [N] bool, in input order. Errors call the list ``name``."""
        require_list(inputs, name, "a list of texts, (prompt, response) pairs or conversations")
        if len(inputs) == 0:
            raise ValueError(f"{name}: empty list, nothing to score")
        rendered = [self.render(item, where=f"{name}[{i}]") for i, item in enumerate(inputs)]
        token_ids, truncated = self.encode(rendered)
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ValueError(f"{name}[{empty[0]}]: no tokens besides special tokens after tokenization "
                             f"(empty or blank text?); {len(empty)} such inputs")
        return ScoreResult(self.score_token_ids(token_ids, progress=progress), torch.tensor(truncated))

    def score(self, inputs, progress: bool = False) -> torch.Tensor:
        """Scores in input order: [N] float32 with one head, [N, K] float32 with K heads."""
        rewards = self.score_detailed(inputs, progress=progress).rewards
        return rewards[:, 0] if self.num_heads == 1 else rewards

    def score_with_uncertainty(self, inputs, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [N], std [N]) over the K heads; std is the population std (0 for a single head)."""
        rewards = self.score_detailed(inputs, progress=progress).rewards
        return rewards.mean(dim=1), rewards.std(dim=1, correction=0)


def read_export_info(path) -> dict:
    """The ``prefkernels_export.json`` of a directory written by ``prefkernels export --hf`` ({} if none)."""
    file = Path(path) / EXPORT_INFO_NAME
    if not file.is_file():
        return {}
    info = json.loads(file.read_text())
    if not isinstance(info, dict) or info.get("format") != EXPORT_INFO_FORMAT:
        raise ValueError(f"path: {file} is not a prefkernels export record (expected a JSON object with "
                         f"format {EXPORT_INFO_FORMAT!r})")
    return info


def _class_labels(config) -> list[str]:
    """The named classes of a classifier config with several outputs ([] for a reward model: one
    output, regression outputs (a multi-objective reward model may name them), or outputs with
    HF's default names LABEL_i and no classification problem_type)."""
    labels = [str(label) for _, label in sorted((int(i), label) for i, label in (config.id2label or {}).items())]
    if config.num_labels == 1 or config.problem_type == "regression":
        return []
    named = any(label != f"LABEL_{i}" for i, label in enumerate(labels))
    classification = config.problem_type in ("single_label_classification", "multi_label_classification")
    return labels if named or classification else []


def require_list(value, name: str, expected: str) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is a list-like of items (a string, bytes or a
    dict has a length too, and would be read item by item)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")


def _load_hf_sequence_classifier(path: Path, exported: bool = False) -> tuple[RewardModel, int | None]:
    """A RewardModel holding an HF last-token-pooled classifier's backbone and ``score`` weights,
    and the pad token id HF pools by (None when the config has none). Its K outputs are K reward
    heads (a prefkernels export of an ensemble); a classifier of named classes is refused."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise checkpoint.DamagedCheckpointError(path / "config.json", err) from None
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(f"path: {path}/config.json lists architectures {architectures}, not a "
                         "*ForSequenceClassification model; train a reward head with prefkernels first")
    with checkpoint.loading(path):
        classifier_config = AutoConfig.from_pretrained(str(path))  # read once: checked, then given to the model
    labels = [] if exported else _class_labels(classifier_config)
    if labels:
        raise ValueError(f"path: {path} is a classifier of {len(labels)} classes ({', '.join(labels[:5])}), not a "
                         "reward model (one score per text, K reward heads, or named regression outputs)")
    with checkpoint.loading(path):
        classifier = AutoModelForSequenceClassification.from_pretrained(str(path), config=classifier_config)
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
