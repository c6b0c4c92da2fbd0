"""prefkernels: fused kernels, trainer and scorer for reward (preference) models.

Kernel-level API (imports only torch): ``fused_bt_loss``, ``pool_score``, ``RewardHead``.
Model-level API (imports transformers on first use): ``RewardModel``, ``Scorer``,
``RewardFunction``, ``best_of_n``.
"""
from prefkernels import backends, reference
from prefkernels.backends import BACKENDS
from prefkernels.head import RewardHead
from prefkernels.ops import fused_bt_loss, pool_score

__version__ = "0.1.0"

backends.preload()

_LAZY = {"RewardModel": "prefkernels.model", "Scorer": "prefkernels.scorer", "RewardFunction": "prefkernels.rl",
         "best_of_n": "prefkernels.rl"}

__all__ = ["BACKENDS", "RewardHead", "fused_bt_loss", "pool_score", "reference", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefkernels' has no attribute {name!r}")
