"""Drop-in integrations: fused score heads for Hugging Face classifiers, fused loss for TRL.

``FusedRewardTrainer`` is imported on first use, so importing this package never imports trl.
"""
from prefkernels.integrations.hf import fuse_sequence_classification, unfuse

__all__ = ["FusedRewardTrainer", "fuse_sequence_classification", "unfuse"]


def __getattr__(name):
    if name == "FusedRewardTrainer":
        from prefkernels.integrations.trl import FusedRewardTrainer
        return FusedRewardTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
