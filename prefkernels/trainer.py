"""Reward-model training: ``train(TrainConfig) -> TrainResult``.

AdamW (weight decay on matrices only), warmup then linear/cosine/constant schedule, gradient
clipping and accumulation, bf16 autocast where supported, optional gradient checkpointing,
dropout off by default (as TRL), seeds, evaluation with early stopping on validation accuracy
or loss, and the best checkpoint kept. Runs unchanged under ``torchrun --nproc_per_node=N``:
DistributedDataParallel (gloo on CPU, NCCL on GPU), each process takes every N-th
length-grouped batch, training metrics are summed across processes and evaluation gathers
rewards from all of them; only rank 0 writes.

Output directory::

    run.json          the configuration (marks the directory as a run)
    metrics.jsonl     one JSON event per line: start, train (every log_every steps), eval, final
    checkpoint/       latest state for --resume: model and tokenizer, optimizer, scheduler, RNG, data
                      position and each process's training metrics since the last log
    best/             the best model (by validation metric) with tokenizer and reward mean/std
    eval.json         validation metrics of best/ (from the evaluation that selected it); reliability.png; curves.png
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefkernels import __version__, backends, checkpoint, checks, metrics
from prefkernels.checks import is_integer, is_real
from prefkernels.data import (LengthGroupedBatchSampler, PreferenceCollator, PreferenceDataset, load_preferences,
                              pad_token_id)
from prefkernels.losses import LOSSES, LossConfig, check_data, compute_loss
from prefkernels.model import RewardModel, check_max_length, default_max_length, load_tokenizer, resolve_device

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
EARLY_STOPPING_METRICS = ("accuracy", "loss")
RUN_FILE, METRICS_FILE, EVAL_FILE = "run.json", "metrics.jsonl", "eval.json"
CHECKPOINT_DIR, BEST_DIR = "checkpoint", "best"
CURVES_FILE, RELIABILITY_FILE = "curves.png", "reliability.png"
LOCK_FILE = ".lock"  # held by the process writing the run
OVERWRITTEN = ".overwritten"  # suffix of a replaced run's artifacts while --overwrite deletes them
RUN_MARKERS = (RUN_FILE, METRICS_FILE, CHECKPOINT_DIR, BEST_DIR)
RUN_ARTIFACTS = (*RUN_MARKERS, EVAL_FILE, CURVES_FILE, RELIABILITY_FILE)
# Fields that may change when resuming; any other difference from run.json is refused.
RESUMABLE_CHANGES = ("patience", "progress", "resume", "overwrite", "device", "backend", "output_dir", "resolved")
PATH_SETTINGS = ("backbone", "train", "valid")  # the same when typed alike or resolved alike
MAX_DEFAULT_LENGTH = 1024
REWARD_STATS_EXAMPLES = 1024  # without validation data, reward mean/std come from this many training examples


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (holds another run, nothing to resume...)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI flags mirror these fields (``--batch-size`` for
    ``batch_size``). ``train``/``valid``: JSONL paths, a ``datasets.Dataset`` or a list of dicts.
    ``max_tokens``, when set, batches by a padded-token budget instead of ``batch_size`` pairs.
    ``eval_every``/``save_every`` count optimizer steps (0: at each epoch end / each evaluation).
    """

    backbone: str
    train: object
    output_dir: str
    valid: object = None
    valid_fraction: float = 0.0
    num_heads: int = 1
    max_length: int | None = None
    loss: str = "bt"
    label_smoothing: float = 0.0
    center_coef: float = 0.0
    tie_strength: float | None = None
    use_margin: bool = True
    truncate_responses: bool = False
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 2e-5
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    dropout: bool = False
    seed: int = 0
    eval_every: int = 0
    early_stopping_metric: str = "accuracy"
    patience: int | None = None
    save_every: int = 0
    log_every: int = 10
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    device: str | None = None
    backend: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        def need(ok, name, expected):
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        def integer(name, lowest, optional=False):  # NumPy integers too, not bool
            value = getattr(self, name)
            whole = is_integer(value)
            need((optional and value is None) or (whole and value >= lowest), name, f"an integer >= {lowest}")
            if whole:
                setattr(self, name, int(value))  # plain int for run.json

        def real(name, optional=False):  # checked before any comparison (a str would raise a bare TypeError)
            value = getattr(self, name)
            if optional and value is None:
                return
            need(is_real(value), name, "a number")
            setattr(self, name, float(value))  # plain float for run.json

        for name in ("valid_fraction", "label_smoothing", "center_coef", "lr", "weight_decay", "warmup_ratio",
                     "max_grad_norm"):
            real(name)
        real("tie_strength", optional=True)
        real("head_lr", optional=True)
        need(isinstance(self.backbone, (str, os.PathLike)) and str(self.backbone), "backbone", "a local path")
        need(isinstance(self.output_dir, (str, os.PathLike)) and str(self.output_dir), "output_dir", "a path")
        need(self.train is not None, "train", "training data")
        need(0.0 <= self.valid_fraction < 1.0, "valid_fraction", "a float in [0, 1)")
        need(not (self.valid is not None and self.valid_fraction), "valid_fraction",
             "0 when validation data is given")
        integer("num_heads", 1)
        integer("max_length", 2, optional=True)
        need(self.loss in LOSSES, "loss", f"one of {LOSSES}")
        integer("epochs", 1)
        integer("max_steps", 1, optional=True)
        integer("batch_size", 1)
        integer("max_tokens", 2, optional=True)
        integer("eval_batch_size", 1, optional=True)
        integer("grad_accum", 1)
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite float > 0")
        need(self.head_lr is None or (self.head_lr > 0 and math.isfinite(self.head_lr)), "head_lr",
             "a finite float > 0")
        need(self.weight_decay >= 0, "weight_decay", "a float >= 0")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "a float in [0, 1)")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.max_grad_norm >= 0, "max_grad_norm", "a float >= 0 (0: no clipping)")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        integer("eval_every", 0)
        need(self.early_stopping_metric in EARLY_STOPPING_METRICS, "early_stopping_metric",
             f"one of {EARLY_STOPPING_METRICS}")
        integer("patience", 1, optional=True)
        need(self.patience is None or self.valid is not None or self.valid_fraction, "patience",
             "validation data (valid or valid_fraction) for early stopping")
        integer("save_every", 0)
        integer("log_every", 1)
        need(not (self.overwrite and self.resume), "overwrite", "not both overwrite and resume")
        backends.requested(self.backend)
        self.loss_config()

    def loss_config(self) -> LossConfig:
        return LossConfig(self.loss, self.label_smoothing, self.center_coef, self.tie_strength, self.backend)

    def to_json(self) -> dict:
        """JSON-able fields; data given as objects is described, not stored. ``resolved`` adds the
        absolute form of the local paths, so a resume matches a path by what was typed (a moved
        project) or by where it points (another working directory)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("train", "valid"):
            out[name] = _describe_data(out[name])
        out["backbone"], out["output_dir"] = str(self.backbone), str(self.output_dir)
        out["resolved"] = {name: _resolved(out[name]) for name in PATH_SETTINGS}
        return out


def _resolved(value):
    """``value`` (a path, a list of paths, or a description) with local paths made absolute."""
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    if isinstance(value, str) and os.path.exists(value):
        return str(Path(value).absolute())
    return value


def _describe_data(data):
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else str(data)
    if isinstance(data, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in data):
        return [str(d) for d in data]
    if isinstance(data, (list, tuple)):
        return f"<{len(data)} records>"
    fingerprint = getattr(data, "_fingerprint", None)
    return f"<{type(data).__name__} of {len(data) if hasattr(data, '__len__') else '?'} rows {fingerprint or ''}>"


@dataclass
class TrainResult:
    """Where things went and how training ended. ``metrics``: validation metrics of the best
    model (``preference_metrics``, from the evaluation that selected it), None without validation data."""

    output_dir: Path
    best_dir: Path
    metrics: dict | None
    steps: int
    best_step: int | None
    stopped_early: bool


# ----------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    """This process's place in a torchrun job (world_size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str | None = None) -> "Distributed":
        """Join the torchrun process group when WORLD_SIZE > 1: NCCL when the run trains on CUDA (``device``
        None or cuda, and CUDA available), gloo otherwise (a ``--device cpu`` run on a GPU host too)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            on_cuda = torch.cuda.is_available() and (device is None or str(device).partition(":")[0] == "cuda")
            if on_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if on_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- helpers


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def disable_dropout(module: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (nn.Dropout modules and attention_dropout attributes)."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0
        if isinstance(getattr(sub, "attention_dropout", None), float):
            sub.attention_dropout = 0.0


class WarmupSchedule:
    """LR multiplier: linear warmup over ``warmup`` steps, then linear/cosine decay to 0 (or constant)."""

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for ``bf16`` (and for ``auto`` on a CUDA device that supports it), else None."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision: bf16 is not supported on {torch.cuda.get_device_name(device)}")
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def holds_run(path: Path) -> list[str]:
    """Names of the run files/directories present in ``path``."""
    return [name for name in RUN_MARKERS if (path / name).exists()]


def check_output_dir(config: TrainConfig, resumable: bool = True) -> Path:
    """Refuse a directory that holds another run unless overwrite or resume; resume needs a checkpoint.
    ``resumable=False``: the caller (the demo) has no resume, so the refusal offers only overwrite."""
    path = Path(config.output_dir)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"output_dir: {path} exists and is not a directory")
    found = holds_run(path) if path.is_dir() else []
    has_checkpoint = checkpoint.is_checkpoint(checkpoint.locate(path / CHECKPOINT_DIR))
    if config.resume:
        present = {path / CHECKPOINT_DIR: has_checkpoint, path / RUN_FILE: (path / RUN_FILE).is_file()}
        missing = [str(p) for p, ok in present.items() if not ok]
        if missing:
            raise RunDirectoryError(f"resume: {path} has no checkpoint to resume from ({' and '.join(missing)} "
                                    "missing: the run was stopped before its first checkpoint, or is not a run)")
    elif found and not config.overwrite:
        resume_too = resumable and has_checkpoint and (path / RUN_FILE).is_file()
        raise RunDirectoryError(f"output_dir: {path} holds another run ({', '.join(found)}); pass --overwrite "
                                "to replace it" + (" or --resume to continue it" if resume_too else ""))
    return path


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


class _LossModule(torch.nn.Module):
    """The unit DistributedDataParallel wraps: batch -> (loss, rewards)."""

    def __init__(self, model: RewardModel, loss_config: LossConfig):
        super().__init__()
        self.model, self.loss_config = model, loss_config

    def forward(self, batch):
        return compute_loss(self.model, batch, self.loss_config)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """One run. ``Trainer(config).run()`` trains, evaluates and writes the output directory."""

    def __init__(self, config: TrainConfig, log=None):
        config.validate()
        self.config = config
        self.loss_config = config.loss_config()
        self._log = log
        self._lock = None  # rank 0's lock on the output directory, from its first write on
        self.dist = Distributed.from_env(config.device)
        try:
            self._setup()
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        self.dist.close()
        if self._lock is not None:
            self._lock.close()

    # --- setup: validate everything before writing anything

    def log(self, message: str) -> None:
        if self.dist.is_main:
            (self._log or _tqdm_print)(message)

    def _setup(self) -> None:
        config = self.config
        self.output_dir = check_output_dir(config)
        self.device = resolve_device(config.device, self.dist.local_rank)
        self.autocast_dtype = autocast_dtype(config.precision, self.device)
        saved = self._read_resume_state() if config.resume else None
        set_seed(config.seed)
        self.tokenizer, self.model = self._load_model()
        self.max_length = self.model.max_length
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.train_data, self.valid_data = self._load_data()
        self.train_data_record = self._training_data_record()  # constant for the run: saved with each checkpoint
        if saved is not None:
            self._check_same_training_data(saved)
        for note in check_data(self.loss_config, self.train_data.num_ties, self.train_data.has_margin, "train"):
            self.log(note)
        if self.valid_data is not None:
            check_data(self.loss_config, self.valid_data.num_ties, False, "valid")
            if config.early_stopping_metric == "accuracy" and self.valid_data.num_ties == len(self.valid_data):
                raise ValueError("early_stopping_metric: every valid comparison is a tie, so validation accuracy "
                                 "is undefined; use early stopping on the loss (--early-stopping-metric loss)")
        self.sampler = LengthGroupedBatchSampler(
            self.train_data.row_lengths, batch_size=None if config.max_tokens else config.batch_size,
            max_tokens=config.max_tokens, seed=config.seed, num_replicas=self.dist.world_size, rank=self.dist.rank)
        self.total_steps = self._planned_steps()
        self.model.to(self.device)
        self.loss_module = _LossModule(self.model, self.loss_config)
        self.train_module = self.loss_module
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.train_module = DistributedDataParallel(self.loss_module, device_ids=None)
        self.optimizer = self._optimizer()
        warmup = math.ceil(config.warmup_ratio * self.total_steps)  # as transformers' get_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupSchedule(self.total_steps, warmup, config.schedule))
        # best_metrics: the full validation result of the best model (plain JSON-able values), kept so
        # that finishing, also after --resume, needs no second evaluation
        # stop_log_bytes: the log's size before the partial window an early stop logged off a log step
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_value": None, "best_step": None,
                      "best_metrics": None, "evals_since_best": 0, "stopped_early": False, "done": False,
                      "stop_log_bytes": None}
        self.train_sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss*n, n, correct, pairs
        set_seed(config.seed + self.dist.rank)
        self._prepare_output_dir(saved)
        if saved is not None:
            self._restore(saved)

    def _read_resume_state(self) -> dict:
        try:
            run = json.loads((self.output_dir / RUN_FILE).read_text())
            run["config"].items()
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise RunDirectoryError(f"resume: {self.output_dir / RUN_FILE} cannot be read ({type(err).__name__}: "
                                    f"{err}); it was damaged, so the run cannot be resumed") from None
        current = self.config.to_json()
        resolved_before = run["config"].get("resolved", {})  # absent in run.json of older versions
        changed = [k for k, v in run["config"].items()
                   if k not in RESUMABLE_CHANGES and v != current.get(k)
                   and not (k in PATH_SETTINGS and k in resolved_before and resolved_before[k] == current["resolved"][k])]
        if changed:
            details = "; ".join(f"{k}: was {run['config'][k]!r}, now {current.get(k)!r}" for k in changed)
            raise RunDirectoryError(f"resume: the configuration differs from the run in {self.output_dir} ({details})")
        state_path = checkpoint.locate(self.output_dir / CHECKPOINT_DIR) / checkpoint.TRAINING_STATE_NAME
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch's "PytorchStreamReader failed ..." for a file cut short
            raise checkpoint.DamagedCheckpointError(state_path, err) from None
        if state["world_size"] != self.dist.world_size:
            raise RunDirectoryError(f"resume: the checkpoint was written by {state['world_size']} processes, this "
                                    f"run has {self.dist.world_size}; resume with the same number")
        metrics = self.output_dir / METRICS_FILE
        size = metrics.stat().st_size if metrics.is_file() else None
        keep = self._log_bytes_to_keep(state)
        if size is None or size < keep:
            found = "missing" if size is None else f"{size} bytes, shorter than the {keep}"
            raise RunDirectoryError(f"resume: {metrics}: {found} the checkpoint recorded; the log of the run "
                                    "was removed or cut since, so the run cannot continue it")
        return state

    def _training_data_record(self) -> dict:
        """Size of the training data, recorded in the checkpoint: resume compares data files by path,
        this catches a file changed in place."""
        return {"examples": len(self.train_data), "row_tokens": sum(map(sum, self.train_data.row_lengths))}

    def _check_same_training_data(self, saved: dict) -> None:
        recorded, current = saved.get("training_data"), self.train_data_record
        if recorded is not None and recorded != current:  # absent in checkpoints of older versions
            raise RunDirectoryError(
                f"resume: the training data changed since the checkpoint ({recorded['examples']} examples of "
                f"{recorded['row_tokens']} tokens, now {current['examples']} examples of {current['row_tokens']}); "
                "resume with the data it was trained on, or start a new run")

    def _load_model(self):
        config = self.config
        backbone = Path(config.backbone)
        saved = checkpoint.locate(self.output_dir / CHECKPOINT_DIR)
        # resume: the tokenizer the run trained with, kept in checkpoint/ (older checkpoints: the backbone's)
        source = saved if config.resume and (saved / checkpoint.TOKENIZER_DIR).is_dir() else backbone
        if not source.is_dir():
            problem = "is a file" if source.exists() else "does not exist"
            raise FileNotFoundError(f"backbone: {backbone} {problem}; expected a local transformers model directory")
        try:
            tokenizer = load_tokenizer(str(source))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{'resume' if source == saved else 'backbone'}: cannot load a tokenizer from {source} "
                             f"({err})") from None
        try:  # float32 weights whatever dtype the backbone was saved in: bf16 is autocast only
            if config.resume:
                model = RewardModel.from_pretrained(str(self.output_dir / CHECKPOINT_DIR), dtype=torch.float32)
            else:
                model = RewardModel.from_backbone(str(backbone), num_heads=config.num_heads, dtype=torch.float32)
        except checkpoint.DamagedCheckpointError:
            raise
        except (OSError, ValueError, KeyError) as err:
            if config.resume:
                raise ValueError(f"resume: cannot load the model of {self.output_dir / CHECKPOINT_DIR} ({err})") from None
            raise ValueError(f"backbone: cannot load a transformers model from {backbone} ({err})") from None
        model.max_length = self._max_length(model, tokenizer)
        if not config.dropout:
            disable_dropout(model)
        if model.head.bias is not None and not config.center_coef:
            # Pairwise losses see only reward differences: the bias's true gradient is zero, and
            # training it would only let Adam amplify rounding noise (and block a clean HF export).
            model.head.bias.requires_grad_(False)
        if config.gradient_checkpointing:
            if not getattr(model.backbone, "supports_gradient_checkpointing", False):
                raise ValueError(f"gradient_checkpointing: {type(model.backbone).__name__} does not support it")
            enable = getattr(model.backbone, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model.backbone.config, "use_cache"):
                model.backbone.config.use_cache = False
        return tokenizer, model

    def _max_length(self, model: RewardModel, tokenizer) -> int:
        if self.config.max_length is not None:
            check_max_length(self.config.max_length, model.backbone.config)
            return self.config.max_length
        return min(MAX_DEFAULT_LENGTH, default_max_length(tokenizer, model.backbone.config) or MAX_DEFAULT_LENGTH)

    def _load_data(self) -> tuple[PreferenceDataset, PreferenceDataset | None]:
        config, show = self.config, self.config.progress and self.dist.is_main
        options = {"use_margin": config.use_margin, "truncate_responses": config.truncate_responses, "progress": show}
        train = load_preferences(config.train, self.tokenizer, self.max_length, name="train", **options)
        valid = None
        if config.valid is not None:
            valid = load_preferences(config.valid, self.tokenizer, self.max_length, name="valid", **options)
        elif config.valid_fraction:
            train, valid = train.split(config.valid_fraction, config.seed)
        return train, valid

    def _planned_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        world = self.dist.world_size
        return sum(math.ceil(math.ceil(len(self.sampler.epoch_batches(e)) / world) / self.config.grad_accum)
                   for e in range(self.config.epochs))

    def _optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in backbone if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": config.lr},
            {"params": [p for p in backbone if p.ndim < 2], "weight_decay": 0.0, "lr": config.lr},
            {"params": [self.model.head.weight], "weight_decay": config.weight_decay,
             "lr": config.head_lr or config.lr},
        ]
        if self.model.head.bias is not None and self.model.head.bias.requires_grad:
            groups.append({"params": [self.model.head.bias], "weight_decay": 0.0, "lr": config.head_lr or config.lr})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=self._fused_adamw)

    @property
    def _fused_adamw(self) -> bool | None:
        """AdamW's fused kernel where torch has one (CPU and CUDA): one pass over all parameters
        instead of one small op per tensor, e.g. 81 -> 11 ms per step for a 22M-parameter BERT on CPU."""
        return True if self.device.type in ("cpu", "cuda") else None

    def _prepare_output_dir(self, saved: dict | None) -> None:
        """The first write of the run (rank 0); every input has been validated by now. When rank 0
        cannot write (another run holds the directory, a file-system error), every rank stops with
        its message instead of waiting for it at a barrier."""
        self.dist.barrier()  # every process has read the checkpoint, maybe from its .old-* sibling (resume)
        failure, grouped = None, None
        if self.dist.is_main:
            try:
                grouped = self._start_output_dir(saved)
            except (ValueError, OSError) as err:
                failure = err
        reported = self.dist.gather(None if failure is None else f"{type(failure).__name__}: {failure}")[0]
        if failure is not None:
            raise failure
        if reported is not None:
            raise RunDirectoryError(f"rank 0 stopped the run: {reported}")
        self.log(str(self.train_data.report))
        if self.valid_data is not None:
            self.log(str(self.valid_data.report))
        if self.dist.is_main:
            self.log(f"batches: padding is {100 * grouped:.1f}% of tokens with length grouping "
                     f"({100 * self.sampler.padding_fraction(0, grouped=False):.1f}% with random batches); "
                     f"{self.total_steps} optimizer steps on {self.dist.world_size} process(es), device {self.device}")

    def _start_output_dir(self, saved: dict | None) -> float:
        """Rank 0: lock the output directory, put back what a killed run left, and start (or, resuming,
        cut back) its log; returns the padding fraction of the length-grouped batches."""
        grouped = self.sampler.padding_fraction(0)
        path = self.output_dir
        path.mkdir(parents=True, exist_ok=True)
        self._lock_output_dir(path)
        for name in (CHECKPOINT_DIR, BEST_DIR):  # put back what a kill mid-save moved aside
            checkpoint.recover(path / name)
        # a kill inside atomic_write_text (run.json, eval.json) or inside an --overwrite
        for stale in [*path.glob(".*.tmp-*"), *path.glob(f".*{OVERWRITTEN}-*")]:
            _remove(stale)
        if saved is not None:
            with open(path / METRICS_FILE, "r+b") as f:
                f.truncate(self._log_bytes_to_keep(saved))
            return grouped
        if self.config.overwrite:  # renamed aside first: a kill never leaves a half-deleted checkpoint
            token = uuid.uuid4().hex[:8]
            doomed = [path / name for name in RUN_ARTIFACTS if (path / name).exists()]
            for target in doomed:
                os.replace(target, path / f".{target.name}{OVERWRITTEN}-{token}")
            for target in doomed:
                _remove(path / f".{target.name}{OVERWRITTEN}-{token}")
        run = {"library_version": __version__, "world_size": self.dist.world_size, "config": self.config.to_json()}
        checkpoint.atomic_write_text(path / RUN_FILE, json.dumps(run, indent=2))
        (path / METRICS_FILE).write_text("")
        self._event({"event": "start", "train": dataclasses.asdict(self.train_data.report),
                     "valid": dataclasses.asdict(self.valid_data.report) if self.valid_data else None,
                     "padding_fraction": grouped, "total_steps": self.total_steps,
                     "world_size": self.dist.world_size})
        return grouped

    def _lock_output_dir(self, path: Path) -> None:
        """Hold an exclusive lock on ``path/.lock`` for the rest of the run (released by the OS however
        the process ends), then re-check what a run started at the same moment may have written."""
        self._lock = checkpoint.lock_file(path / LOCK_FILE, "a")
        if self._lock is None:
            raise RunDirectoryError(f"output_dir: another prefkernels train is writing {path} now; wait for it "
                                    "or choose another --output")
        check_output_dir(self.config)

    def _restore(self, saved: dict) -> None:
        # the saving run's AdamW choice may differ: set ours before loading, which places the step counts by it
        for group in saved["optimizer"]["param_groups"]:
            group["fused"] = self._fused_adamw
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = dict(saved["state"])
        sums = saved["train_sums"]
        if isinstance(sums, torch.Tensor):  # saved by prefkernels before 2026-11-26: rank 0's sums only
            sums = [sums] + [torch.zeros_like(sums)] * (self.dist.world_size - 1)
        self.train_sums = sums[self.dist.rank].to(self.device)
        set_rng_state(saved["rng"][self.dist.rank])
        self.log(f"resumed from {self.output_dir / CHECKPOINT_DIR} at step {self.state['step']} "
                 f"(epoch {self.state['epoch']}, batch {self.state['batch_in_epoch']})")
        patience, state = self.config.patience, self.state
        exhausted = self._patience_used_up(state)
        if state["stopped_early"] and not exhausted:
            # stopped early, resumed with a patience that would not have stopped it: train on, as an
            # unbroken run with this patience would have (the log was cut back before the stop's
            # partial window, see _log_bytes_to_keep)
            state["stopped_early"] = False
            state["done"] = self._final_step()
            state["stop_log_bytes"] = None
            self.log(f"the run had stopped early after {state['evals_since_best']} evaluations without a "
                     f"better {self.config.early_stopping_metric}; patience is now {patience}: training on")
        elif exhausted and not state["done"]:  # resumed with a patience this run has already used up
            state["stopped_early"] = state["done"] = True
            self.log(f"{state['evals_since_best']} evaluations without a better {self.config.early_stopping_metric} "
                     f"already exceed patience {patience}: stopping early")

    def _patience_used_up(self, state: dict) -> bool:
        return bool(self.config.patience) and state["evals_since_best"] >= self.config.patience

    def _log_bytes_to_keep(self, saved: dict) -> int:
        """How much of the log a resume from the checkpoint ``saved`` keeps: what the checkpoint
        recorded; or, when a run that stopped early off a log step trains on (more patience), the
        log before that stop's partial window, whose steps the next log step reports whole, as an
        unbroken run's. (A resume killed before its first checkpoint leaves the log at least that
        long, so it resumes again the same way.)"""
        state, stop_log = saved["state"], saved["state"].get("stop_log_bytes")
        if stop_log is not None and state["stopped_early"] and not self._patience_used_up(state):
            return stop_log
        return saved["metrics_bytes"]

    # --- training

    def run(self) -> TrainResult:
        """Train (from the checkpoint when resuming), then finalize best/ and the reports."""
        try:
            if not self.state["done"]:
                self._fit()
            return self._finish()
        finally:
            self._close()

    def _fit(self) -> None:
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        collate = PreferenceCollator(self.pad_token_id)
        bar = tqdm(total=self.total_steps, initial=state["step"], desc="train", dynamic_ncols=True,
                   disable=not (config.progress and self.dist.is_main))
        self.started = time.perf_counter()
        self.model.train()
        try:
            while not state["done"]:
                self.sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
                micro_batches = len(self.sampler)
                if state["batch_in_epoch"] >= micro_batches:  # a checkpoint from other training data
                    raise RunDirectoryError(f"resume: the checkpoint is at batch {state['batch_in_epoch']} of epoch "
                                            f"{state['epoch']}, the training data gives {micro_batches} batches "
                                            "per epoch: it changed since the checkpoint")
                # batches are built here, not by a DataLoader, whose iterators draw from the global RNG
                for index, indices in enumerate(self.sampler, start=state["batch_in_epoch"]):
                    batch = collate([self.train_data[i] for i in indices])
                    window_start = index - index % config.grad_accum
                    window = min(config.grad_accum, micro_batches - window_start)
                    last_in_window = index == window_start + window - 1
                    self._micro_step(batch.to(self.device, non_blocking=True), window, last_in_window)
                    if last_in_window:
                        grad_norm = self._optimizer_step()
                        end_of_epoch = index == micro_batches - 1
                        state["batch_in_epoch"] = index + 1
                        if end_of_epoch:
                            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
                        self._after_step(grad_norm, end_of_epoch, bar)
                        if state["done"] or end_of_epoch:
                            break
        finally:
            bar.close()

    def _micro_step(self, batch, window: int, last_in_window: bool) -> None:
        sync = contextlib.nullcontext()
        if self.dist.world_size > 1 and not last_in_window:
            sync = self.train_module.no_sync()
        autocast = metrics.autocast_context(self.device, self.autocast_dtype)
        with sync:
            # the batch's mask rows all hold a token (pad_rows), so the op's value checks, a device
            # sync per micro-step, are not needed
            with autocast, checks.values_checked_by_caller():
                loss, rewards = self.train_module(batch)
            (loss / window).backward()
        with torch.no_grad():
            mean_reward = rewards.float().mean(dim=1)
            chosen, rejected = batch.pairs()
            gap = mean_reward[chosen] - mean_reward[rejected]
            decided = torch.ones_like(gap, dtype=torch.bool) if batch.tie is None else ~batch.tie
            # Masked rather than indexed, and no host-to-device copy: nothing here waits for the device.
            correct = ((gap > 0).double() + 0.5 * (gap == 0).double()).masked_fill(~decided, 0.0).sum()
            comparisons = batch.num_comparisons
            self.train_sums += torch.stack([loss.detach().double() * comparisons,
                                            torch.full((), float(comparisons), device=self.device, dtype=torch.float64),
                                            correct, decided.sum().double()])

    def _optimizer_step(self) -> torch.Tensor:
        """One optimizer step; returns the pre-clipping gradient norm (a 0-dim tensor, read only when logged)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (logged, as HF logs it)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        return grad_norm

    def _after_step(self, grad_norm: torch.Tensor, end_of_epoch: bool, bar) -> None:
        config, state = self.config, self.state
        step = state["step"]
        final = self._final_step()
        bar.update(1)
        logged = step % config.log_every == 0 or final
        if logged:
            self._log_train(grad_norm, bar)
        evaluated = False
        if self.valid_data is not None and (
                (config.eval_every and step % config.eval_every == 0)
                or (not config.eval_every and end_of_epoch) or final):
            self._evaluate_and_keep_best(bar)
            evaluated = True
        if state["stopped_early"] and not logged:  # the last partial window, as a run that ends on schedule
            if self.dist.is_main:  # a resume with more patience takes it back and logs the whole window later
                state["stop_log_bytes"] = (self.output_dir / METRICS_FILE).stat().st_size
            self._log_train(grad_norm, bar, window_ends=False)
        state["done"] = final or state["stopped_early"]
        if (config.save_every and step % config.save_every == 0) or state["done"] or (
                not config.save_every and (evaluated or end_of_epoch)):
            self._save_checkpoint()

    def _final_step(self) -> bool:
        """The current step ends training (the step budget, or the last epoch without max_steps)."""
        config, state = self.config, self.state
        return state["step"] >= self.total_steps or (not config.max_steps and state["epoch"] >= config.epochs)

    def _log_train(self, grad_norm: torch.Tensor, bar, window_ends: bool = True) -> None:
        """Log the train window's metrics. ``window_ends=False`` (a run stopping early off a log
        step) leaves its sums in place: a resume with more patience trains on and logs the whole
        window at its log step, as an unbroken run does."""
        sums = self.dist.sum(self.train_sums.clone()).tolist()
        if window_ends:
            self.train_sums.zero_()
        if sums[1] == 0:
            return
        loss = sums[0] / sums[1]
        self._require_finite("loss", loss)
        self._require_finite("grad_norm", float(grad_norm))  # the step just taken: NaN weights from here on
        event = {"event": "train", "step": self.state["step"], "epoch": self.state["epoch"], "loss": loss,
                 "accuracy": sums[2] / sums[3] if sums[3] else None, "lr": self.step_lr,
                 "grad_norm": float(grad_norm), "comparisons": int(sums[1]),
                 "elapsed_s": round(time.perf_counter() - self.started, 3)}
        self._event(event)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{event['accuracy'] or 0:.3f}", refresh=False)

    def _require_finite(self, name: str, value: float) -> None:
        """``FloatingPointError`` when a training quantity diverged, with what to change."""
        if math.isfinite(value):
            return
        advice = "lower lr or use precision fp32" if self.autocast_dtype is not None else "lower lr"
        if not self.config.max_grad_norm:
            advice += " or clip gradients (max_grad_norm)"
        raise FloatingPointError(f"{name}: not finite ({value}) at step {self.state['step']}; {advice}")

    def evaluate(self, dataset: PreferenceDataset) -> tuple[dict, dict]:
        """(metrics, rewards by example) of the current model on ``dataset``, sharded across processes."""
        local = metrics.score(self.model, dataset, indices=range(self.dist.rank, len(dataset), self.dist.world_size),
                              batch_size=self.config.eval_batch_size,
                              max_tokens=None if self.config.eval_batch_size else self.config.max_tokens,
                              device=self.device, autocast_dtype=self.autocast_dtype, pad_token_id=self.pad_token_id,
                              backend=self.config.backend)
        rewards = {k: v for part in self.dist.gather(local) for k, v in part.items()}
        return metrics.preference_metrics(dataset, rewards, self.loss_config), rewards

    def _evaluate_and_keep_best(self, bar) -> None:
        config, state = self.config, self.state
        result, _ = self.evaluate(self.valid_data)
        self._require_finite("validation loss", result["loss"])  # NaN rewards: the weights diverged
        value = result[config.early_stopping_metric]
        self._event({"event": "eval", "step": state["step"], "epoch": state["epoch"],
                     **metrics.scalar_metrics(result)})
        better = value is not None and (state["best_value"] is None or (
            value > state["best_value"] if config.early_stopping_metric == "accuracy" else value < state["best_value"]))
        if better:
            state["best_value"], state["best_step"], state["evals_since_best"] = value, state["step"], 0
            state["best_metrics"] = metrics.json_safe(result)
            self._save_best(result, "valid")
        else:
            state["evals_since_best"] += 1
            if config.patience and state["evals_since_best"] >= config.patience:
                state["stopped_early"] = True
        message = (f"step {state['step']}: validation accuracy {metrics.format_value(result['accuracy'])}, "
                   f"loss {metrics.format_value(result['loss'])}{' (best)' if better else ''}")
        if state["stopped_early"]:
            message += f"; stopping early: no better {config.early_stopping_metric} in {config.patience} evaluations"
        self.log(message)

    def _save_checkpoint(self) -> None:
        # RNG states and training sums (since the last log) differ by process: keep each one's
        rng, sums = zip(*self.dist.gather((rng_state(), self.train_sums.cpu())))
        if self.dist.is_main:
            training_state = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": list(rng),
                "state": dict(self.state), "train_sums": list(sums),
                "metrics_bytes": (self.output_dir / METRICS_FILE).stat().st_size,
                "world_size": self.dist.world_size, "training_data": self.train_data_record}
            extra = {"step": self.state["step"], "training": {"loss": self._loss_record(), **self._data_record()}}
            self.model.save_pretrained(str(self.output_dir / CHECKPOINT_DIR), self.tokenizer, extra=extra,
                                       training_state=training_state)
        self.dist.barrier()

    def _save_best(self, result: dict, split: str) -> None:
        """Write best/ from the current model with reward mean/std of ``result`` (measured on ``split``)."""
        if self.dist.is_main:  # the stats go into best/'s config only, not onto the training model
            extra = {**self._extra(), "reward_stats_split": split,
                     "reward_mean": result["reward_mean"], "reward_std": result["reward_std"]}
            self.model.save_pretrained(str(self.output_dir / BEST_DIR), self.tokenizer, extra=extra)
        self.dist.barrier()

    def _extra(self) -> dict:
        """best/'s ``training`` fields, as of the save: ``step`` is the step of the saved weights
        (equal to ``best_step`` with validation data, the last step without)."""
        return {"training": {"loss": self._loss_record(), "step": self.state["step"], "best_step": self.state["best_step"],
                             "early_stopping_metric": self.config.early_stopping_metric,
                             "best_value": self.state["best_value"], **self._data_record()}}

    def _data_record(self) -> dict:
        """How training read its data, which ``eval`` of a checkpoint follows unless told otherwise."""
        return {"truncate_responses": self.config.truncate_responses, "use_margin": self.config.use_margin}

    def _loss_record(self) -> dict:
        """The loss as checkpoints record it (``LossConfig`` fields but the backend), so ``eval``
        measures the loss the model was trained with."""
        loss = dataclasses.asdict(self.loss_config)
        loss.pop("backend")
        return loss

    def _event(self, event: dict) -> None:
        if self.dist.is_main:
            with open(self.output_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics.json_safe(event)) + "\n")

    # --- finish

    def _train_sample(self) -> tuple[PreferenceDataset, str]:
        """(data, split name) for reward mean/std without validation data: the training data, or a
        seeded sample of REWARD_STATS_EXAMPLES of it (a pass over all of it could add ~40% to the run)."""
        total = len(self.train_data)
        if total <= REWARD_STATS_EXAMPLES:
            return self.train_data, "train"
        chosen = np.random.default_rng(self.config.seed).choice(total, REWARD_STATS_EXAMPLES, replace=False)
        sample = self.train_data.subset(sorted(chosen.tolist()), "train sample")
        return sample, f"train ({REWARD_STATS_EXAMPLES} of {total} examples, seed {self.config.seed})"

    def _finish(self) -> TrainResult:
        """Write the reports of best/. With validation data, best/ (reward mean/std included) and its
        metrics were kept when it was evaluated; without, measure reward mean/std on the training data."""
        best_dir = self.output_dir / BEST_DIR
        result = self.state.get("best_metrics")
        if self.valid_data is None or result is None:
            # No earlier evaluation to reuse: no validation data, no evaluation that gave a best model, or
            # a checkpoint written before best_metrics was kept. Measure now (collective) and write best/.
            if self.valid_data is not None and checkpoint.is_checkpoint(best_dir):
                best = RewardModel.from_pretrained(str(best_dir))
                self.model.load_state_dict(best.state_dict())
            stats_data, split = (self.valid_data, "valid") if self.valid_data is not None else self._train_sample()
            result, _ = self.evaluate(stats_data)
            self._save_best(result, split)
        if self.dist.is_main:
            if self.valid_data is not None:
                checkpoint.atomic_write_text(self.output_dir / EVAL_FILE, json.dumps(result, indent=2))
                metrics.reliability_diagram(result, self.output_dir / RELIABILITY_FILE)
                self._event({"event": "final", "step": self.state["step"], "best_step": self.state["best_step"],
                             **metrics.scalar_metrics(result)})
            metrics.plot_training_curves(self.output_dir / METRICS_FILE, self.output_dir / CURVES_FILE)
            if self.valid_data is not None:
                self.log(metrics.format_table(result, title=f"validation metrics of {best_dir}"))
        self.dist.barrier()
        return TrainResult(self.output_dir, best_dir, result if self.valid_data is not None else None,
                           self.state["step"], self.state["best_step"], self.state["stopped_early"])


def _tqdm_print(message: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(message)


def train(config: TrainConfig, log=None) -> TrainResult:
    """Run ``config`` to the end; ``log(message)`` replaces printing (rank 0 only)."""
    return Trainer(config, log=log).run()
