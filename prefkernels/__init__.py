"""prefkernels: fused kernels, trainer and scorer for reward (preference) models."""
from prefkernels import reference
from prefkernels.backends import BACKENDS
from prefkernels.head import RewardHead
from prefkernels.ops import fused_bt_loss, pool_score

__version__ = "0.1.0"

__all__ = ["BACKENDS", "RewardHead", "fused_bt_loss", "pool_score", "reference", "__version__"]
