"""Export a prefkernels checkpoint as a standard ``AutoModelForSequenceClassification``.

Supported: architectures whose HF classifier is a bias-free ``score`` Linear applied at the
last non-pad token (Llama, Qwen2, Mistral, GPT-2, Gemma, ...). HF finds that token from
``input_ids != pad_token_id``; prefkernels from the attention mask. The two agree when the pad
token differs from every real token of the text, so export refuses a tokenizer whose pad
token equals its EOS (which prefkernels appends to every text). Encoders that classify from a
pooled [CLS] (BERT family) are refused with a clear error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prefkernels import checkpoint
from prefkernels.model import RewardModel, load_tokenizer


class ExportError(ValueError):
    """The checkpoint cannot be expressed as a standard HF sequence classifier."""


def to_sequence_classification(model: RewardModel, tokenizer, allow_bias_drop: bool = False):
    """Build the HF ``*ForSequenceClassification`` with the backbone and head of ``model``."""
    from transformers import AutoModelForSequenceClassification

    config = model.backbone.config.__class__.from_dict(model.backbone.config.to_dict())
    config.num_labels = model.num_heads
    config.problem_type = "regression"
    if tokenizer.pad_token_id is None:
        raise ExportError("tokenizer: has no pad token; HF sequence classifiers need pad_token_id to find the last token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ExportError("tokenizer: pad token equals the EOS token, so HF would pool the token before the "
                          "appended EOS; train with a distinct pad token to export")
    config.pad_token_id = tokenizer.pad_token_id
    try:
        classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:
        raise ExportError(f"backbone: {type(model.backbone).__name__} has no AutoModelForSequenceClassification ({err})")
    score = getattr(classifier, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise ExportError(f"backbone: {type(classifier).__name__} does not classify with a bias-free `score` head at the "
                          "last non-pad token (e.g. BERT pools [CLS]); export supports Llama, Qwen2, Mistral, GPT-2, ...")
    bias = model.head.bias
    if bias is not None and bias.detach().abs().max() > 0 and not allow_bias_drop:
        raise ExportError(f"head: bias is {bias.detach().tolist()}, but HF score heads have no bias; pass "
                          "allow_bias_drop=True (--allow-bias-drop) to export anyway (scores shift by a constant, "
                          "rankings and pairwise losses are unchanged)")
    base = getattr(classifier, classifier.base_model_prefix)
    missing, unexpected = base.load_state_dict(model.backbone.state_dict(), strict=False)
    if missing or unexpected:
        raise ExportError(f"backbone: weights do not match {type(base).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        score.weight.copy_(model.head.weight.to(score.weight.dtype))
    return classifier


@torch.no_grad()
def max_score_difference(model: RewardModel, classifier, tokenizer, texts: list[str]) -> float:
    """Largest |prefkernels score - HF logit| (bias excluded) over ``texts``, right padded."""
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model.eval()
    classifier.eval()
    ours = model(batch["input_ids"], batch["attention_mask"]).float()
    if model.head.bias is not None:
        ours = ours - model.head.bias.float()
    theirs = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return float((ours - theirs).abs().max())


def export_hf(checkpoint_dir: str, out_dir: str, allow_bias_drop: bool = False, tolerance: float = 1e-4) -> float:
    """Write ``out_dir`` (atomically) and verify it by loading it back with transformers.

    Returns the largest score difference on probe texts; raises ExportError above ``tolerance``.
    """
    from transformers import AutoModelForSequenceClassification

    model = RewardModel.from_pretrained(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)
    classifier = to_sequence_classification(model, tokenizer, allow_bias_drop)
    with checkpoint.atomic_directory(out_dir) as tmp:
        classifier.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out_dir)
    probes = ["a short text", "a somewhat longer text that needs more tokens than the first one", "x"]
    diff = max_score_difference(model, reloaded, tokenizer, probes)
    if diff > tolerance:
        raise ExportError(f"export: reloaded HF model differs from the prefkernels model by {diff:.2e} > {tolerance}")
    return diff


EXPORT_EXAMPLES = """examples:
  prefkernels export runs/demo/best --hf exported/demo-rm
  python -c "from transformers import AutoModelForSequenceClassification as M; M.from_pretrained('exported/demo-rm')"
"""


def add_export_parser(subparsers) -> None:
    """``prefkernels export CHECKPOINT --hf OUT``."""
    import argparse

    p = subparsers.add_parser("export", help="export a checkpoint as an HF AutoModelForSequenceClassification",
                              description=__doc__, epilog=EXPORT_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="prefkernels checkpoint directory (e.g. runs/demo/best)")
    p.add_argument("--hf", required=True, metavar="DIR", help="output directory of the HF checkpoint")
    p.add_argument("--allow-bias-drop", action="store_true",
                   help="export even if the head bias is nonzero (HF score heads have no bias)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --hf directory")
    p.set_defaults(handler=run_export)


def run_export(args) -> int:
    """CLI handler: verify, write atomically, reload with transformers and compare scores."""
    out = Path(args.hf)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ExportError(f"--hf: {out} already exists and is not empty; pass --overwrite to replace it")
    diff = export_hf(args.checkpoint, str(out), allow_bias_drop=args.allow_bias_drop)
    print(f"exported {args.checkpoint} -> {out} (AutoModelForSequenceClassification); "
          f"max score difference after reload {diff:.2e}")
    return 0
