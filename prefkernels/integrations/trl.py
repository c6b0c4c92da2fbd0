"""``FusedRewardTrainer``: TRL's ``RewardTrainer`` with its loss computed by ``prefkernels.fused_bt_loss``.

Importing this module imports trl; ``prefkernels`` and ``prefkernels.integrations`` do not.
"""
from __future__ import annotations

import functools
import warnings

import torch
from accelerate.utils import is_peft_model
from trl import RewardTrainer

from prefkernels.checks import is_finite_nonnegative
from prefkernels.integrations.hf import (capture_head_input, has_score_head, is_fused, replaced_forward,
                                         why_no_score_head, with_loss_and_logits)
from prefkernels.ops import fused_bt_loss


def forward_with_fused_loss(classifier, forward, center_coef, *args, margin=None, return_dict=None, **kwargs):
    """``classifier``'s ``forward`` with TRL's loss computed inside it, by ``fused_bt_loss`` on the last
    hidden states at the model's own pooled positions. Returns the model's output type (whatever
    ``return_dict``) with ``loss`` and ``logits`` = the float32 rewards [N, 1] (detached). Computing the
    loss inside the forward lets DDP (find_unused_parameters) see every parameter the loss uses, the
    score head included."""
    with capture_head_input(classifier) as capture:
        outputs = forward(*args, return_dict=True, **kwargs)
    head = classifier.score
    loss, rewards = fused_bt_loss(capture.hidden, head.weight, head.bias,
                                  last_index=capture.pooled_positions(outputs.logits), margin=margin,
                                  center_coef=center_coef)
    return with_loss_and_logits(outputs, loss, rewards)


class FusedRewardTrainer(RewardTrainer):
    """Drop-in ``trl.RewardTrainer``: same constructor, batches, options and logged metrics.

    The model is still called as stock calls it (through DDP or other wrappers), but for the call its
    forward is ``forward_with_fused_loss``: the ``score`` head only records the backbone's last hidden
    states [N, T, D] and the positions the model pools (its own last-non-pad logic), and
    ``fused_bt_loss`` pools, applies the head in fp32 and computes the Bradley-Terry loss, with
    ``margin`` from the batch and ``center_rewards_coefficient`` from the config. No [N, T, 1] logits
    are formed. Rewards (logged, and returned as ``logits`` for evaluation) are float32.

    Models without a supported score head (see ``prefkernels.integrations.hf.has_score_head``; a
    PEFT-wrapped ``score`` is not an ``nn.Linear``), FSDP / DeepSpeed ZeRO-3 (sharded head weight) and
    batches not in TRL's concatenated chosen+rejected format use the stock loss, with a one-time
    warning. A model already fused with ``fuse_sequence_classification`` uses the stock loss silently:
    its head already runs on pooled rows only.
    """

    _warned_fallback = False

    def __init__(self, model=None, args=None, *rest, **kwargs):
        coefficient = getattr(args, "center_rewards_coefficient", None)  # checked before the trainer is built
        if coefficient is not None and not is_finite_nonnegative(coefficient):
            raise ValueError("center_rewards_coefficient: expected None or a finite float >= 0, got "
                             f"{coefficient}")
        super().__init__(model, args, *rest, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        classifier = self._fusable_classifier(model, inputs)
        if classifier is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        center_coef = float(self.args.center_rewards_coefficient or 0.0)
        fused_forward = functools.partial(forward_with_fused_loss, classifier, classifier.forward, center_coef)
        with replaced_forward(classifier, fused_forward):
            outputs = model(**{**inputs, "use_cache": False})
        self._record_metrics(mode, inputs, outputs.logits)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _fusable_classifier(self, model, inputs):
        """The classifier whose score head the fused loss takes over, or None for the stock loss."""
        classifier = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        if is_peft_model(classifier):
            classifier = classifier.get_base_model()
        if is_fused(classifier):
            return None
        reason = None
        if not has_score_head(classifier):
            reason = f"model: {why_no_score_head(classifier)}"
        elif isinstance(model, torch.nn.DataParallel):
            reason = ("nn.DataParallel (several GPUs without torchrun) replicates the model in each call, and "
                      "its replicas would share the fused forward; launch with torchrun (DDP) for the fused loss")
        elif getattr(self, "is_fsdp_enabled", False):
            reason = "FSDP shards the score head's weight"
        elif getattr(self, "is_deepspeed_enabled", False) and \
                getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            reason = "DeepSpeed ZeRO-3 partitions the score head's weight"
        elif "input_ids" not in inputs or "attention_mask" not in inputs:
            reason = f"batch keys {sorted(inputs)} are not TRL's concatenated chosen+rejected format"
        if reason is None:
            return classifier
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(f"FusedRewardTrainer: {reason}; using the stock RewardTrainer loss", RuntimeWarning,
                          stacklevel=3)
        return None

    def _record_metrics(self, mode, inputs, rewards):
        """The metrics ``RewardTrainer.compute_loss`` records, from the fused op's rewards [N, 1]."""
        if mode == "train":
            num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens_in_batch // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        rewards_chosen, rewards_rejected = torch.chunk(rewards.squeeze(-1), chunks=2)
        all_rewards = self.accelerator.gather(rewards)
        self._metrics[mode]["min_reward"].append(all_rewards.min().item())
        self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
        self._metrics[mode]["max_reward"].append(all_rewards.max().item())

        mean_accuracy = (rewards_chosen > rewards_rejected).float().mean()
        mean_accuracy = self.accelerator.gather_for_metrics(mean_accuracy).mean().item()
        self._metrics[mode]["accuracy"].append(mean_accuracy)

        mean_margin = (rewards_chosen - rewards_rejected).mean()
        mean_margin = self.accelerator.gather_for_metrics(mean_margin).mean()
        self._metrics[mode]["margin"].append(mean_margin.item())
