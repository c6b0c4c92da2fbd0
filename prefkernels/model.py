"""``RewardModel``: a transformers ``AutoModel`` backbone + the fused ``RewardHead``.

The backbone's own LM or classification head is never computed: scores come from the last
hidden state, pooled at the last non-pad token (attention mask) by the fused kernels.
"""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from prefkernels import __version__, checkpoint
from prefkernels.head import RewardHead


class RewardModel(nn.Module):
    """Backbone [N, T] tokens -> last hidden state [N, T, D] -> rewards [N, K] float32."""

    def __init__(self, backbone: nn.Module, num_heads: int = 1, max_length: int | None = None):
        super().__init__()
        self.backbone = backbone
        self._positions_from_mask = counts_positions_from_mask(backbone)
        pooler = getattr(backbone, "pooler", None)  # BERT's [CLS] pooler: rewards never use it, and
        if isinstance(pooler, nn.Module):           # DDP needs every trained parameter used
            pooler.requires_grad_(False)
        self.head = RewardHead(backbone.config.hidden_size, num_heads)
        self.max_length = max_length
        self.reward_mean: list[float] | None = None
        self.reward_std: list[float] | None = None

    @property
    def num_heads(self) -> int:
        return self.head.num_heads

    @classmethod
    def from_backbone(cls, name_or_path: str, num_heads: int = 1, max_length: int | None = None, **kwargs):
        """Load a local transformers backbone (no head) with ``AutoModel.from_pretrained``."""
        from transformers import AutoModel

        if not Path(name_or_path).exists():
            raise FileNotFoundError(f"backbone: {name_or_path} does not exist (prefkernels loads local paths only)")
        return cls(AutoModel.from_pretrained(name_or_path, **kwargs), num_heads=num_heads, max_length=max_length)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state [N, T, D] of the backbone. Positions count the real tokens (the mask's
        cumulative sum) where ``counts_positions_from_mask`` says so, so a text gets the same positions
        padded on the left or on the right; for right padding they equal the backbone's defaults."""
        kwargs = {}
        if self._positions_from_mask:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, backend: str | None = None):
        """Rewards [N, K] float32 at each row's last non-pad token."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.head.score(hidden, attention_mask=attention_mask, backend=backend)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **loss_kwargs):
        """(loss, rewards) of the fused Bradley-Terry op; kwargs as ``prefkernels.fused_bt_loss``."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.head.loss(hidden, attention_mask=attention_mask, **loss_kwargs)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """(rewards - mean) / std with the statistics stored after training (identity before)."""
        if self.reward_mean is None or self.reward_std is None:
            return rewards
        mean = torch.tensor(self.reward_mean, device=rewards.device)
        std = torch.tensor(self.reward_std, device=rewards.device).clamp_min(1e-6)
        return (rewards - mean) / std

    def save_pretrained(self, path: str, tokenizer=None, extra: dict | None = None,
                        training_state: dict | None = None) -> None:
        """Write the checkpoint directory atomically (see ``prefkernels.checkpoint``)."""
        from safetensors.torch import save_file

        config = {
            "format": checkpoint.FORMAT,
            "library_version": __version__,
            "pooling": "last_token",
            "num_heads": self.num_heads,
            "hidden_size": self.head.hidden_size,
            "max_length": self.max_length,
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
            "backbone_model_type": getattr(self.backbone.config, "model_type", None),
            **(extra or {}),
        }
        with checkpoint.atomic_directory(path) as tmp:
            self.backbone.save_pretrained(tmp / checkpoint.BACKBONE_DIR, safe_serialization=True)
            head = {"weight": self.head.weight.detach().float().cpu().contiguous()}
            if self.head.bias is not None:
                head["bias"] = self.head.bias.detach().float().cpu().contiguous()
            save_file(head, str(tmp / checkpoint.HEAD_NAME))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / checkpoint.TOKENIZER_DIR)
            if training_state is not None:
                torch.save(training_state, tmp / checkpoint.TRAINING_STATE_NAME)
            (tmp / checkpoint.CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str, **backbone_kwargs) -> "RewardModel":
        """Load a checkpoint written by ``save_pretrained`` (see ``checkpoint.locate``)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = checkpoint.locate(path)
        config = checkpoint.read_config(path)
        with checkpoint.loading(path / checkpoint.BACKBONE_DIR):  # a missing file keeps transformers' own error
            backbone = AutoModel.from_pretrained(path / checkpoint.BACKBONE_DIR, **backbone_kwargs)
        model = cls(backbone, num_heads=config["num_heads"], max_length=config.get("max_length"))
        try:
            head = load_file(str(path / checkpoint.HEAD_NAME))
        except Exception as err:
            raise checkpoint.DamagedCheckpointError(path / checkpoint.HEAD_NAME, err) from None
        if head["weight"].shape != model.head.weight.shape:
            raise ValueError(f"checkpoint: head weight has shape {list(head['weight'].shape)}, "
                             f"expected {list(model.head.weight.shape)}")
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
            if model.head.bias is not None and "bias" in head:
                model.head.bias.copy_(head["bias"])
        model.reward_mean, model.reward_std = config.get("reward_mean"), config.get("reward_std")
        model.config = config
        return model


def counts_positions_from_mask(backbone: nn.Module) -> bool:
    """Whether ``RewardModel`` passes 0-based positions counted from the attention mask: backbones
    whose forward takes ``position_ids`` (absolute-position ones such as BERT and GPT-2 would
    otherwise score a left-padded text differently), except those whose embeddings derive positions
    from the input ids themselves (the RoBERTa family, offset by padding_idx + 1, already alike
    on either side)."""
    if getattr(getattr(backbone, "embeddings", None), "padding_idx", None) is not None:
        return False
    return "position_ids" in inspect.signature(backbone.forward).parameters


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block, then back to the mode it had: scoring in the middle of
    training leaves dropout as it was. A model already in eval mode throughout is left untouched
    (switching walks every module twice: ~1 ms a call for a 24-layer model, in an RL reward loop)."""
    if not any(module.training for module in model.modules()):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def resolve_device(name=None, cuda_index: int = 0) -> torch.device:
    """The torch device ``name`` (default: ``cuda:cuda_index`` when CUDA is available, else cpu);
    ``ValueError`` naming it when it is no device or is not available on this machine."""
    if name is None:
        return torch.device("cuda", cuda_index) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {name!r} is not a torch device ({err})") from None
    is_available = getattr(getattr(torch, device.type, None), "is_available", None)
    if is_available is not None and not is_available():
        raise ValueError(f"device: {device} is not available on this machine (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if device.type == "meta":
        raise ValueError("device: meta holds shapes, not values; expected a device that computes (cpu, cuda, ...)")
    try:  # a type without is_available (xla, ...) that this torch cannot use
        torch.empty(0, device=device)
    except (RuntimeError, ImportError) as err:  # ImportError: a type whose torch module is absent (hpu)
        raise ValueError(f"device: {device} is not usable here ({str(err).split('. ')[0]})") from None
    return device


def position_limit(config) -> int | None:
    """The most positions a backbone with this config embeds (``max_position_embeddings`` or
    ``n_positions``), None when it states none."""
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


UNBOUNDED_MODEL_MAX_LENGTH = 1_000_000  # tokenizers without a limit report ~1e30


def default_max_length(tokenizer, config) -> int | None:
    """The smaller of the tokenizer's model_max_length (when set: a positive int below
    ``UNBOUNDED_MODEL_MAX_LENGTH``) and the backbone's position limit (when stated), else None."""
    limits = [position_limit(config)]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < UNBOUNDED_MODEL_MAX_LENGTH:
        limits.append(tokenizer_limit)
    return min((limit for limit in limits if limit is not None), default=None)


def check_max_length(max_length: int, config) -> None:
    """``ValueError`` when ``max_length`` tokens exceed the positions of a backbone with ``config``."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length: {max_length} exceeds the backbone's {limit} positions")


# What AutoTokenizer reads a tokenizer from (one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.*", "*.model", "merges.txt", "*.tiktoken")


def load_tokenizer(path: str):
    """The tokenizer stored in a checkpoint (``tokenizer/``) or at a backbone path."""
    from transformers import AutoTokenizer

    path = checkpoint.locate(path)
    if (path / checkpoint.TOKENIZER_DIR).is_dir():
        return AutoTokenizer.from_pretrained(path / checkpoint.TOKENIZER_DIR)
    if checkpoint.is_checkpoint(path):
        raise FileNotFoundError(f"tokenizer: checkpoint {path} has no {checkpoint.TOKENIZER_DIR}/ directory "
                                "(it was saved without a tokenizer); save one there with tokenizer.save_pretrained")
    if path.is_dir() and not any(next(path.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save "
                                "the model's tokenizer there with tokenizer.save_pretrained")
    return AutoTokenizer.from_pretrained(path)
