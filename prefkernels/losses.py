"""Reward-model losses over a ``PreferenceBatch``.

- ``bt``: Bradley-Terry with optional per-pair margin, label smoothing and reward centering,
  through the fused op (``RewardModel.loss`` -> ``fused_bt_loss``).
- ``davidson`` / ``rao-kupper``: tie-aware pairwise models on ``pool_score`` rewards; pairs
  flagged as ties are scored with P(tie), the others with P(chosen wins).
- ``plackett-luce``: listwise loss for rankings (responses best first); on pairs it equals BT.

Rewards are [N, K] float32 (K heads); per-comparison losses are [C, K] and the training loss is
their mean over comparisons and heads (each head of an ensemble is trained on the same data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefkernels import reference
from prefkernels.checks import is_finite_nonnegative, is_real

LOSSES = ("bt", "davidson", "rao-kupper", "plackett-luce")
TIE_LOSSES = ("davidson", "rao-kupper")
DEFAULT_TIE_STRENGTH = {"davidson": 1.0, "rao-kupper": 2.0}  # both give P(tie | equal rewards) = 1/3


@dataclass
class LossConfig:
    """Which loss and its options. ``tie_strength`` is Davidson's nu > 0 or Rao-Kupper's theta > 1
    (default: the value giving P(tie) = 1/3 at equal rewards); ``backend`` picks the kernel backend."""

    name: str = "bt"
    label_smoothing: float = 0.0
    center_coef: float = 0.0
    tie_strength: float | None = None
    backend: str | None = None

    def __post_init__(self):
        numbers_given = {"label_smoothing": self.label_smoothing, "center_coef": self.center_coef}
        if self.tie_strength is not None:
            numbers_given["tie_strength"] = self.tie_strength
        for name, value in numbers_given.items():
            if not is_real(value):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        if self.name not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.name!r}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing: expected a float in [0, 0.5], got {self.label_smoothing!r}")
        if self.label_smoothing and self.name != "bt":
            raise ValueError(f"label_smoothing: only the bt loss supports it, got loss={self.name!r}")
        if not is_finite_nonnegative(self.center_coef):
            raise ValueError(f"center_coef: expected a finite float >= 0, got {self.center_coef!r}")
        if self.center_coef and self.name == "plackett-luce":
            raise ValueError("center_coef: supported by the pairwise losses (bt, davidson, rao-kupper), "
                             "not plackett-luce")
        if self.tie_strength is not None and self.name not in TIE_LOSSES:
            raise ValueError(f"tie_strength: only the tie-aware losses {TIE_LOSSES} use it, got loss={self.name!r}")
        if self.name in TIE_LOSSES:
            strength = self.strength
            lowest = 1.0 if self.name == "rao-kupper" else 0.0
            if not (math.isfinite(strength) and strength > lowest):
                raise ValueError(f"tie_strength: {self.name} needs a finite value > {lowest:g}, got {strength!r}")

    @property
    def strength(self) -> float:
        return self.tie_strength if self.tie_strength is not None else DEFAULT_TIE_STRENGTH[self.name]


def check_data(config: LossConfig, num_ties: int, has_margin: bool, name: str = "data") -> list[str]:
    """Raise ``ValueError`` when the loss cannot use the data (ties); return notes on ignored columns."""
    if num_ties and config.name not in TIE_LOSSES:
        raise ValueError(f"loss: {name} has {num_ties} tie pairs, which loss={config.name!r} cannot model; "
                         f"use one of {TIE_LOSSES}")
    if has_margin and config.name != "bt":
        return [f"{name}: the 'margin' column is used by the bt loss only; loss={config.name!r} ignores it"]
    return []


def davidson_nll(gap: torch.Tensor, tie: torch.Tensor | None, nu: float) -> torch.Tensor:
    """-log P under Davidson (1970): P(win) = e^{d/2} / Z, P(tie) = nu / Z, Z = e^{d/2} + e^{-d/2} + nu.

    gap [P, K] float32 = r_chosen - r_rejected; tie [P] bool or None. Returns [P, K].
    """
    log_nu = math.log(nu)
    # -log P = log(1 + ...) as softplus(logsumexp(...)): full relative precision when P is near 1
    # (d/2 - log Z would cancel to 0 in float32 for gaps beyond ~25)
    win = -F.softplus(torch.logsumexp(torch.stack([-gap, log_nu - gap / 2]), dim=0))
    if tie is None:
        return -win
    tied = -F.softplus(torch.logsumexp(torch.stack([gap / 2 - log_nu, -gap / 2 - log_nu]), dim=0))
    return -torch.where(tie.unsqueeze(1), tied, win)


def rao_kupper_nll(gap: torch.Tensor, tie: torch.Tensor | None, theta: float) -> torch.Tensor:
    """-log P under Rao-Kupper (1967) with theta > 1, eta = log theta: P(win) = sigmoid(d - eta),
    P(tie) = (theta^2 - 1) sigmoid(d - eta) sigmoid(-d - eta). gap [P, K]; tie [P] bool or None."""
    eta = math.log(theta)
    win = -F.softplus(eta - gap)
    if tie is None:
        return -win
    log_theta2_minus_1 = 2 * eta + math.log(-math.expm1(-2 * eta))  # log(theta^2 - 1) without overflow
    tied = log_theta2_minus_1 + win - F.softplus(eta + gap)
    return -torch.where(tie.unsqueeze(1), tied, win)


def plackett_luce_nll(rewards: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """-log P of each ranking under Plackett-Luce: sum_i [logsumexp(r_i..r_n) - r_i].

    rewards [N, K] float32; ranking [G, L] int64 row indices best first, -1 padding. Returns [G, K].
    """
    valid = ranking >= 0
    scores = rewards[ranking.clamp_min(0)]  # [G, L, K]; padding gathers row 0, masked out below
    width = ranking.shape[1]
    later = torch.ones(width, width, dtype=torch.bool, device=rewards.device).triu(1)  # [i, j]: j > i
    include = later.unsqueeze(0) & valid.unsqueeze(1) & valid.unsqueeze(2)  # [G, i, j]: both real, j > i
    # term i = softplus(logsumexp_{j > i} (r_j - r_i)) = log(1 + sum_{j > i} e^{r_j - r_i}): from
    # differences, so softplus(-d) (BT) on pairs, at any reward offset; positions without a term
    # (the last, padding) get a finite dummy row, so padding's NaN/inf never reaches the loss or
    # a gradient; so does a term whose later responses all sit at -inf (it is softplus(-inf) = 0,
    # but logsumexp of an all -inf row has a NaN gradient)
    table = (scores.unsqueeze(1) - scores.unsqueeze(2)).masked_fill(~include.unsqueeze(-1), float("-inf"))
    # [G, L, K]: no later response can win, which includes every position without a term (the
    # last response, padding: nothing included)
    certain = torch.isneginf(table).all(dim=2)
    terms = F.softplus(torch.logsumexp(table.masked_fill(certain.unsqueeze(2), 0.0), dim=2))
    return torch.where(certain, 0.0, terms).sum(dim=1)


def comparison_loss(rewards: torch.Tensor, config: LossConfig, *, ranking: torch.Tensor,
                    chosen_index: torch.Tensor, rejected_index: torch.Tensor, margin: torch.Tensor | None = None,
                    tie: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per comparison from rewards [N, K]: [P, K] for the pairwise losses (pairs given by
    chosen_index/rejected_index [P], margin [P], tie [P] bool), [G, K] for Plackett-Luce (ranking [G, L])."""
    if config.name == "plackett-luce":
        return plackett_luce_nll(rewards, ranking)
    if config.name == "bt":
        return reference.pair_loss(rewards, chosen_index, rejected_index, margin, config.label_smoothing,
                                   config.center_coef, reduction="none")
    r_chosen, r_rejected = rewards[chosen_index], rewards[rejected_index]
    nll = (davidson_nll if config.name == "davidson" else rao_kupper_nll)(r_chosen - r_rejected, tie, config.strength)
    if config.center_coef:
        nll = nll + config.center_coef * (r_chosen + r_rejected) ** 2
    return nll


def compute_loss(model, batch, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scalar, rewards [N, K] float32 detached) of ``model`` (a ``RewardModel``) on a
    ``PreferenceBatch``. ``bt`` runs the fused kernel (pooling + head + loss in one op); the
    others score with ``pool_score`` and average ``comparison_loss``."""
    if config.name == "bt":
        return model.loss(batch.input_ids, batch.attention_mask, chosen_index=batch.chosen_index,
                          rejected_index=batch.rejected_index, margin=batch.margin,
                          label_smoothing=config.label_smoothing, center_coef=config.center_coef,
                          backend=config.backend)
    rewards = model(batch.input_ids, batch.attention_mask, backend=config.backend)
    chosen, rejected = batch.pairs()
    loss = comparison_loss(rewards, config, ranking=batch.ranking, chosen_index=chosen, rejected_index=rejected,
                           margin=batch.margin, tie=batch.tie)
    return loss.mean(), rewards.detach()
