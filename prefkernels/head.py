"""``RewardHead``: the fp32 scalar (or K-head ensemble) reward head over the fused ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from prefkernels.checks import is_integer
from prefkernels.ops import fused_bt_loss, pool_score


class RewardHead(nn.Module):
    """K linear heads on the pooled last token, created in float32.

    ``weight`` [K, D] is initialized N(0, 1/sqrt(D+1)), ``bias`` [K] to zero. Like any module,
    ``.to(dtype)``/``.half()`` cast it; the ops take a head in float32 or in hidden's dtype.
    Calling the module (``forward``) is ``score``, so hooks and DistributedDataParallel see it.
    """

    def __init__(self, hidden_size: int, num_heads: int = 1, bias: bool = True):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        hidden_size, num_heads = int(hidden_size), int(num_heads)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.weight = nn.Parameter(torch.randn(num_heads, hidden_size) / math.sqrt(hidden_size + 1))
        self.bias = nn.Parameter(torch.zeros(num_heads)) if bias else None

    def score(self, hidden, *, attention_mask=None, last_index=None, cu_seqlens=None, backend=None):
        """Rewards [N, K] float32 (differentiable)."""
        return pool_score(hidden, self.weight, self.bias, attention_mask=attention_mask, last_index=last_index,
                          cu_seqlens=cu_seqlens, backend=backend)

    forward = score

    def loss(self, hidden, **kwargs):
        """(loss, rewards) of ``fused_bt_loss`` with this head; kwargs as ``fused_bt_loss``."""
        return fused_bt_loss(hidden, self.weight, self.bias, **kwargs)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, bias={self.bias is not None}"
