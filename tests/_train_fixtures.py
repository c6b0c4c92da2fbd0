"""Offline fixtures for the trainer tests (CPU and GPU): a tiny random-init Llama backbone with its
tokenizer and the built-in synthetic preference data, and the run configuration the tests share."""
from __future__ import annotations

from pathlib import Path

from prefkernels.data import synthetic
from prefkernels.tiny import write_tiny_backbone
from prefkernels.trainer import TrainConfig


def write_assets(root: Path) -> dict:
    """{"backbone": path, "train": [path], "valid": [path]}: 600 training and 200 validation pairs."""
    backbone = write_tiny_backbone(root / "backbone", hidden_size=32, layers=2, heads=2, seed=0)
    files = synthetic.write_splits(root, 600, 200, seed=1)
    return {"backbone": str(backbone), "train": [str(files["train"])], "valid": [str(files["valid"])]}


def train_config(assets: dict, output, **overrides) -> TrainConfig:
    """A quick run of ``assets`` into ``output``; ``overrides`` replace any option."""
    options = dict(backbone=assets["backbone"], train=assets["train"], valid=assets["valid"], output_dir=str(output),
                   max_length=48, batch_size=16, lr=3e-3, warmup_ratio=0.1, progress=False, log_every=5)
    options.update(overrides)
    return TrainConfig(**options)


def quiet(message):
    """A ``log`` for train(): print nothing."""


class Killed(BaseException):
    """A kill, as far as the process can tell: nothing after it runs (no ``except Exception`` catches it)."""
