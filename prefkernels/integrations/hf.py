"""Score head at the pooled position only, for Hugging Face ``*ForSequenceClassification`` models.

Decoder classifiers (Llama, Qwen2, Mistral, GPT-2, ...) run their ``score`` Linear over every
token, [N, T, K] logits, and then gather one position per row (the last non-pad token, found from
``input_ids`` and ``pad_token_id`` by the installed transformers' own code). Fusion keeps that code
and changes only what the head computes: during the forward ``score`` records its input and returns
token positions instead of logits, so the model's own gather yields each row's pooled position; the
head then runs on those N rows, in the model's dtype, giving the same logits. Pooling is therefore
exactly the installed version's, for right or left padding and when pad == eos. (``FusedRewardTrainer``
uses the same capture and hands the hidden states and positions to ``prefkernels.fused_bt_loss``.)

BERT-family classifiers (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) are natively pooled: their
classifier already runs on the [CLS] (position 0) vector only, so fusion leaves them unchanged.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from prefkernels.reference import gather_pooled

UNFUSED_FORWARD = "_prefkernels_unfused_forward"  # the forward fusion wraps (bound method)
INSTANCE_FORWARD = "_prefkernels_instance_forward"  # the instance's own ``forward`` before fusion, or None

SCORE_HEAD_CLASSES = frozenset({
    "LlamaForSequenceClassification",
    "Qwen2ForSequenceClassification",
    "MistralForSequenceClassification",
    "GPT2ForSequenceClassification",
})
NATIVELY_POOLED_CLASSES = frozenset({
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "DistilBertForSequenceClassification",
})


def _generic_classifier_class():
    """transformers' shared decoder classifier (recent 4.x and 5.x), or None in versions without it."""
    try:
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:
        return None
    return GenericForSequenceClassification


def has_score_head(model) -> bool:
    """True for a decoder classifier that applies a ``score`` Linear per token and then gathers one
    position per row: the verified classes, and any class that inherits transformers'
    ``GenericForSequenceClassification.forward`` unchanged."""
    if not isinstance(getattr(model, "score", None), nn.Linear):
        return False
    if type(model).__name__ in SCORE_HEAD_CLASSES:
        return True
    generic = _generic_classifier_class()
    return generic is not None and isinstance(model, generic) and type(model).forward is generic.forward


def why_no_score_head(model) -> str:
    """Why ``has_score_head(model)`` is False, for messages."""
    score = getattr(model, "score", None)
    if score is not None and not isinstance(score, nn.Linear):
        return (f"the score head of {type(model).__name__} is a {type(score).__name__}, not an nn.Linear (PEFT "
                "wraps it with task_type='SEQ_CLS' or modules_to_save; fuse before PEFT wraps the model)")
    if is_natively_pooled(model):
        return f"{type(model).__name__} pools its [CLS] vector itself, so its head runs on the pooled rows only"
    return (f"{type(model).__name__} is not supported; expected one of {sorted(SCORE_HEAD_CLASSES)} or a "
            "subclass of transformers' GenericForSequenceClassification")


def is_natively_pooled(model) -> bool:
    """True for classifiers whose head already runs on the [CLS] vector only (BERT family)."""
    return type(model).__name__ in NATIVELY_POOLED_CLASSES


def is_fused(model) -> bool:
    """True once ``fuse_sequence_classification`` patched ``model`` (and ``unfuse`` did not undo it)."""
    return UNFUSED_FORWARD in model.__dict__


class HeadInputCapture:
    """Stands in for a score head's forward: keeps its input ``hidden`` [N, T, D] and returns each
    token's position [N, T, 1] (int64), so the model's gather returns the pooled positions."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.hidden = None

    def __call__(self, hidden):
        if self.hidden is not None or hidden.dim() != 3:
            raise RuntimeError(f"{self.model_name}: expected its score head to run once on [N, T, D] hidden "
                               "states; this model's forward does not follow that pattern and cannot be fused")
        self.hidden = hidden
        n_rows, n_tokens = hidden.shape[:2]
        return torch.arange(n_tokens, device=hidden.device).expand(n_rows, n_tokens).unsqueeze(-1)

    def pooled_positions(self, gathered) -> torch.Tensor:
        """Positions [N] int64 from what the model gathered out of the positions we returned."""
        if self.hidden is None or gathered.dtype != torch.int64 or gathered.numel() != self.hidden.shape[0]:
            raise RuntimeError(f"{self.model_name}: expected its forward to gather one position per row from "
                               "the score head output; this model cannot be fused")
        return gathered.reshape(-1)


@contextmanager
def replaced_forward(module, forward):
    """Within the block, ``module.forward`` is ``forward`` (module hooks still run); restored after.

    Restored through ``module.__dict__``: under ``torch.compile``, ``del module.forward`` after the
    assignment fails (dynamo replays the deletion without the assignment)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            module.__dict__.pop("forward")
        else:
            module.forward = previous


@contextmanager
def capture_head_input(model):
    """Within the block, ``model.score`` returns token positions and records its input (see
    ``HeadInputCapture``); yields the capture."""
    capture = HeadInputCapture(type(model).__name__)
    with replaced_forward(model.score, capture):
        yield capture


def with_loss_and_logits(outputs, loss, logits):
    """A copy of a model output (``ModelOutput``) with ``loss`` and ``logits`` replaced."""
    rest = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
    return type(outputs)(loss=loss, logits=logits, **rest)


# Classifiers whose stock forward computes its loss inline and ignores ``model.loss_function``.
INLINE_LOSS_CLASSES = frozenset({"GPT2ForSequenceClassification"})


def fused_forward(model, *args, labels=None, return_dict=None, **kwargs):
    """``forward`` of a fused decoder classifier ``model``: same outputs, head on the pooled rows only."""
    unfused = model.__dict__[UNFUSED_FORWARD]
    if args:  # by name, so that ``labels`` or ``return_dict`` given by position are found too
        kwargs = {**inspect.signature(unfused).bind_partial(*args).arguments, **kwargs}
        labels, return_dict = kwargs.pop("labels", labels), kwargs.pop("return_dict", return_dict)
    with capture_head_input(model) as capture:
        outputs = unfused(return_dict=True, **kwargs)
    logits = model.score(gather_pooled(capture.hidden, last_index=capture.pooled_positions(outputs.logits)))
    loss = None
    if labels is not None:
        # The loss stock computes: the model's loss_function (ForSequenceClassificationLoss unless one was
        # set on the model), or transformers' standard one for classes that compute it inline. The [N, T, K]
        # logits are never formed, so it gets the pooled logits as ``logits`` too.
        if type(model).__name__ in INLINE_LOSS_CLASSES:
            from transformers.loss.loss_utils import ForSequenceClassificationLoss as loss_function
        else:
            loss_function = model.loss_function
        loss = loss_function(logits=logits, labels=labels, pooled_logits=logits, config=model.config)
    outputs = with_loss_and_logits(outputs, loss, logits)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return outputs if return_dict else outputs.to_tuple()


class FusedForward:
    """``model.forward`` once fused: ``fused_forward`` for the model.

    A callable object rather than a bound method, so a fused model still pickles (``torch.save`` of
    the whole model), and ``inspect.signature`` sees the unfused forward's parameters (HF Trainer
    keeps only the dataset columns that forward accepts; accelerate's mixed-precision wrapper
    passes the signature on). accelerate's ``unwrap_model(keep_fp32_wrapper=False)`` binds it to
    the model like a function: a leading model argument is then dropped (the call works; inspect
    then misses ``input_ids``: ``unfuse`` and fuse a model unwrapped that way before training it again)."""

    def __init__(self, model):
        self.model = model

    @property
    def __signature__(self):
        return inspect.signature(self.model.__dict__[UNFUSED_FORWARD])

    def __call__(self, *args, **kwargs):
        if args and args[0] is self.model:
            args = args[1:]
        return fused_forward(self.model, *args, **kwargs)


def fuse_sequence_classification(model):
    """Make ``model`` compute its score head only at the pooled position; returns ``model``.

    Same ``logits`` (and ``loss`` when ``labels`` are given) as before, gradients included.
    Fusion patches this instance's ``forward`` only (parameters and state dict are unchanged);
    ``unfuse`` restores it. Natively pooled classifiers (BERT family) are returned unchanged.
    Raises TypeError for any other model.
    """
    if is_fused(model) or is_natively_pooled(model):
        return model
    if not has_score_head(model):
        raise TypeError(f"model: {why_no_score_head(model)}")
    model.__dict__[UNFUSED_FORWARD] = model.forward
    model.__dict__[INSTANCE_FORWARD] = model.__dict__.get("forward")
    model.forward = FusedForward(model)
    return model


def unfuse(model):
    """Undo ``fuse_sequence_classification``; returns ``model`` (a no-op if it is not fused).

    Raises RuntimeError when ``model.forward`` was replaced after fusion (e.g. by accelerate's
    mixed-precision ``prepare``): restoring the stock forward would silently drop that wrapper."""
    if not is_fused(model):
        return model
    forward = model.__dict__.get("forward")
    if not isinstance(getattr(forward, "__func__", forward), FusedForward):  # itself, or bound by unwrap_model
        raise RuntimeError(f"model: its forward was replaced after fusion ({model.forward!r}); unfuse before "
                           "wrapping it (e.g. before accelerate's prepare)")
    previous = model.__dict__.pop(INSTANCE_FORWARD)
    del model.__dict__[UNFUSED_FORWARD]
    if previous is None:
        del model.forward
    else:
        model.forward = previous
    return model
