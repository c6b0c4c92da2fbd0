"""Export a prefkernels checkpoint as a standard ``AutoModelForSequenceClassification``.

Supported: architectures whose HF classifier is a bias-free ``score`` Linear applied at the
last non-pad token (Llama, Qwen2, Mistral, GPT-2, Gemma, ...). HF finds that token from
``input_ids != pad_token_id``; prefkernels from the attention mask. The two agree when the pad
token differs from every real token of the text, so export refuses a tokenizer whose pad
token equals its EOS (which prefkernels appends to every text). Encoders that classify from a
pooled [CLS] (BERT family) are refused with a clear error.

The exported tokenizer tokenizes as training did, so plain transformers
(``tokenizer(texts, padding=True, truncation=True, return_tensors="pt")``, then ``model(**inputs)``)
gives prefkernels' scores: it appends the end token (EOS) to plain texts itself (its post-processor
is extended; a tokenizer that already ends texts with the end token, e.g. BERT's [SEP], is left as
it is), and it keeps the checkpoint's max length (``model_max_length``) with left truncation.
Conversations go through ``apply_chat_template`` (the template writes the ending, no EOS added).
A tokenizer that cannot be made to append EOS is exported with a warning and a note in the
exported README.md. Before the directory is renamed into place, it is loaded back with plain
transformers and probe texts (short, longer than max_length, a conversation) must give the same
token ids and scores as prefkernels' ``Scorer`` on the checkpoint.
"""
from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch

from prefkernels import __version__, checkpoint
from prefkernels.data import end_token_id, pad_rows
from prefkernels.model import UNBOUNDED_MODEL_MAX_LENGTH, RewardModel, default_max_length, load_tokenizer
from prefkernels.scorer import EXPORT_INFO_FORMAT, EXPORT_INFO_NAME, Scorer, read_export_info


class ExportError(ValueError):
    """The checkpoint cannot be expressed as a standard HF sequence classifier."""


class ExportWarning(UserWarning):
    """The export works, but plain transformers needs an extra step to score as prefkernels does."""


# Lowercase words, a long text, a single letter, and digits/punctuation/capitals/non-ASCII (where
# pre-tokenizers differ most, e.g. when AutoTokenizer swaps in the model type's own class).
PROBE_TEXTS = ["a short text", "a somewhat longer text that needs more tokens than the first one", "x",
               "Call 555-1234, OK? Naïve café: 12 dogs!"]
PROBE_CONVERSATION = [{"role": "user", "content": "what is a short text"},
                      {"role": "assistant", "content": "a short text is a text with few words"}]


def to_sequence_classification(model: RewardModel, tokenizer, allow_bias_drop: bool = False):
    """Build the HF ``*ForSequenceClassification`` with the backbone and head of ``model``."""
    from transformers import AutoModelForSequenceClassification

    config = model.backbone.config.__class__.from_dict(model.backbone.config.to_dict())
    config.num_labels = model.num_heads
    config.problem_type = "regression"
    if tokenizer.pad_token_id is None:
        raise ExportError("tokenizer: has no pad token; HF sequence classifiers need pad_token_id to find the last "
                          "token: add one distinct from EOS to the backbone's tokenizer (tokenizer.add_special_tokens"
                          "({'pad_token': '<pad>'}) and save it) and train with it")
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


# ----------------------------------------------------------------------------- the exported tokenizer


def _post_processor_with_end(state: dict | None, token: str, token_id: int) -> dict | None:
    """The ``tokenizers`` post-processor (JSON) that writes what ``state`` writes, then ``token``;
    None for post-processors this cannot extend (BertProcessing, RobertaProcessing, ...)."""
    def piece(token_type: int) -> dict:
        return {"SpecialToken": {"id": token, "type_id": token_type}}

    special = {"id": token, "ids": [token_id], "tokens": [token]}
    if state is None:
        return {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}, piece(0)],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, piece(1)],
                "special_tokens": {token: special}}
    kind = state.get("type")
    if kind == "TemplateProcessing":
        state = copy.deepcopy(state)
        for name in ("single", "pair"):
            last_type = next(iter(state[name][-1].values()))["type_id"] if state[name] else 0
            state[name].append(piece(last_type))
        if token in state["special_tokens"] and state["special_tokens"][token]["ids"] != [token_id]:
            return None
        state["special_tokens"][token] = special
        return state
    if kind == "Sequence":
        processors = list(state["processors"])
        templates = [i for i, p in enumerate(processors) if p.get("type") == "TemplateProcessing"]
        if templates:  # a TemplateProcessing after another one cannot run: extend the last one
            extended = _post_processor_with_end(processors[templates[-1]], token, token_id)
            if extended is None:
                return None
            processors[templates[-1]] = extended
        elif all(p.get("type") == "ByteLevel" for p in processors):
            processors.append(_post_processor_with_end(None, token, token_id))
        else:
            return None
        return {**state, "processors": processors}
    if kind == "ByteLevel":  # trims offsets only: keep it, then add the end token
        return {"type": "Sequence", "processors": [state, _post_processor_with_end(None, token, token_id)]}
    return None


def _append_end_with_post_processor(tokenizer, token_id: int) -> bool:
    """Make a fast tokenizer append ``token_id`` to texts encoded with special tokens."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    full = json.loads(backend.to_str())
    extended = _post_processor_with_end(full.get("post_processor"), tokenizer.convert_ids_to_tokens(token_id), token_id)
    if extended is None:
        return False
    full["post_processor"] = extended
    backend.post_processor = Tokenizer.from_str(json.dumps(full)).post_processor
    return True


def _append_end_with_add_eos_token(tokenizer, token_id: int) -> bool:
    """``add_eos_token=True``, for tokenizer classes that implement it (Llama/Gemma-style)."""
    if token_id != tokenizer.eos_token_id or not hasattr(type(tokenizer), "add_eos_token"):
        return False
    tokenizer.add_eos_token = True
    tokenizer.init_kwargs["add_eos_token"] = True
    return True


END_TOKEN_METHODS = {"post_processor": _append_end_with_post_processor, "add_eos_token": _append_end_with_add_eos_token}


def _set_length_limits(tokenizer, max_length: int | None) -> None:
    """Left truncation to the checkpoint's max length, saved with the tokenizer."""
    tokenizer.truncation_side = "left"
    tokenizer.init_kwargs["truncation_side"] = "left"
    if max_length is not None:
        tokenizer.model_max_length = max_length
        tokenizer.init_kwargs["model_max_length"] = max_length


def _long_probe(max_length: int | None) -> list[str]:
    """A text longer than ``max_length`` tokens (its start and end differ, so the side of the cut shows)."""
    return [] if max_length is None else [PROBE_TEXTS[1] + " and" * (max_length + 8)]


def _chat_probe(tokenizer, max_length: int | None) -> list[list[dict]]:
    """The probe conversation when the tokenizer has a chat template that renders it within
    ``max_length`` tokens (a cut conversation may differ by a template-written BOS, as documented)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        ids = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    except Exception:  # noqa: BLE001 - templates raise anything (e.g. roles they refuse); then skip the probe
        return []
    return [PROBE_CONVERSATION] if max_length is None or len(ids) <= max_length else []


def plain_transformers_ids(tokenizer, texts: list[str], conversations: list[list[dict]],
                           append_end: int | None = None) -> list[list[int]]:
    """Token ids as a plain-transformers user gets them: ``tokenizer(text, truncation=True)`` and
    ``apply_chat_template(messages, truncation=True)``. ``append_end``: an id appended to the texts
    that lack it (for a tokenizer that cannot do it), after truncating them one token shorter."""
    kwargs = {}
    if append_end is not None and tokenizer.model_max_length < UNBOUNDED_MODEL_MAX_LENGTH:
        kwargs["max_length"] = tokenizer.model_max_length - 1
    ids = [list(row) for row in tokenizer(texts, truncation=True, **kwargs)["input_ids"]] if texts else []
    if append_end is not None:
        ids = [row if row[-1] == append_end else row + [append_end] for row in ids]
    for messages in conversations:
        ids.append(list(tokenizer.apply_chat_template(messages, tokenize=True, truncation=True,
                                                      return_dict=True)["input_ids"]))
    return ids


def _first_mismatch(reference: Scorer, tokenizer, texts, conversations, append_end: int | None = None) -> str | None:
    """None when ``tokenizer`` (plain transformers) gives prefkernels' token ids for every probe."""
    rendered = [(text, True) for text in texts] + [reference.render(m) for m in conversations]
    expected, _ = reference.encode(rendered)
    got = plain_transformers_ids(tokenizer, texts, conversations, append_end)
    for item, want, have in zip(texts + conversations, expected, got):
        if want != have:
            shown = repr(item)[:60] + ("..." if len(repr(item)) > 60 else "")
            swapped = ("" if type(tokenizer) is type(reference.tokenizer) else
                       f"; AutoTokenizer loads it as {type(tokenizer).__name__} (the model type's own class), "
                       f"training used {type(reference.tokenizer).__name__}; a model trained with the "
                       "tokenizer AutoTokenizer loads beside its config, as `prefkernels train` does, exports")
            return (f"{shown}: prefkernels ids end {want[-6:]} ({len(want)} tokens), "
                    f"transformers ids end {have[-6:]} ({len(have)} tokens){swapped}")
    return None


def appends_end_itself(tokenizer, end_id: int | None) -> bool:
    """Whether ``tokenizer`` already ends every probe text with ``end_id`` (or there is no end token)."""
    return end_id is None or all(row[-1] == end_id for row in tokenizer(PROBE_TEXTS)["input_ids"])


def export_tokenizer(checkpoint_dir: str, reference: Scorer, max_length: int | None):
    """(tokenizer, end_appended_by, note): the checkpoint's tokenizer made to tokenize plain texts as
    training did, checked by saving and reloading it with ``AutoTokenizer``.

    ``end_appended_by`` is "tokenizer" when it appended the end token already, "export" when one of
    END_TOKEN_METHODS made it, None when none could; ``note`` then says why.
    """
    from transformers import AutoTokenizer

    texts = PROBE_TEXTS + _long_probe(max_length)
    tokenizer = load_tokenizer(checkpoint_dir)
    conversations = _chat_probe(tokenizer, max_length)
    end_id = end_token_id(tokenizer)
    needs_end = not appends_end_itself(tokenizer, end_id)
    methods = list(END_TOKEN_METHODS.items()) if needs_end else [("none", lambda tokenizer, token_id: True)]
    tried = []
    with tempfile.TemporaryDirectory(prefix="prefkernels-export-tokenizer-") as scratch:
        for i, (name, method) in enumerate(methods):
            candidate = load_tokenizer(checkpoint_dir)
            if not method(candidate, end_id):
                tried.append(f"{name}: not supported by {type(candidate).__name__}")
                continue
            _set_length_limits(candidate, max_length)
            candidate.save_pretrained(f"{scratch}/{i}")
            # beside the model's config.json, as in DIR: AutoTokenizer may pick its class by model type
            reference.model.backbone.config.save_pretrained(f"{scratch}/{i}")
            mismatch = _first_mismatch(reference, AutoTokenizer.from_pretrained(f"{scratch}/{i}"), texts, conversations)
            if mismatch is None:
                return candidate, "export" if needs_end else "tokenizer", None
            if not needs_end:
                raise ExportError(f"tokenizer: after saving and reloading it tokenizes differently from prefkernels: "
                                  f"{mismatch}")
            tried.append(f"{name}: after reloading, {mismatch}")
    _set_length_limits(tokenizer, max_length)
    token = tokenizer.convert_ids_to_tokens(end_id)
    return tokenizer, None, (f"the {type(tokenizer).__name__} tokenizer could not be made to append the end token "
                             f"{token!r} (id {end_id}) that prefkernels appended to plain texts in training ("
                             + "; ".join(tried) + ")")


# ----------------------------------------------------------------------------- checking and writing


@torch.no_grad()
def max_score_difference(reference: Scorer, classifier, tokenizer, texts: list[str],
                         conversations: list[list[dict]] = (), append_end: int | None = None) -> float:
    """Largest |prefkernels score - HF logit| (head bias excluded) over ``texts`` and ``conversations``.

    prefkernels: ``reference`` (a ``Scorer`` on the checkpoint). HF: ``classifier(**tokenizer(texts,
    padding=True, truncation=True, return_tensors="pt")).logits`` and ``apply_chat_template`` for
    conversations, i.e. plain transformers; ``append_end``: see ``plain_transformers_ids``.
    """
    conversations = list(conversations)
    classifier.eval()
    ours = reference.score_detailed(list(texts) + conversations).rewards
    if reference.model.head.bias is not None:
        ours = ours - reference.model.head.bias.detach().float().cpu()
    theirs = []
    if texts:
        if append_end is None:
            batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        else:
            ids = plain_transformers_ids(tokenizer, list(texts), [], append_end)
            input_ids, attention_mask = pad_rows(ids, tokenizer.pad_token_id)
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        theirs.append(classifier(**batch).logits.float())
    for messages in conversations:
        batch = tokenizer.apply_chat_template(messages, tokenize=True, truncation=True, return_dict=True,
                                              return_tensors="pt")
        theirs.append(classifier(**batch).logits.float())
    return float((ours - torch.cat(theirs)).abs().max())


def model_card(checkpoint_dir: str, model: RewardModel, tokenizer, info: dict, note: str | None) -> str:
    """README.md of the exported directory: how to score with plain transformers (``info``: the
    export record, see ``export_hf``; ``note``: why the tokenizer does not append EOS, if so)."""
    end_id, max_length, appends_end = info["end_token_id"], info["max_length"], info["tokenizer_appends_eos"]
    end = tokenizer.convert_ids_to_tokens(end_id) if end_id is not None else None
    index = "[:, 0]" if model.num_heads == 1 else ""
    lines = ["---", "library_name: transformers", "tags:", "- reward-model", "- prefkernels", "---", "",
             "# Reward model exported by prefkernels", "",
             f"A `{type(model.backbone).__name__}` backbone with {model.num_heads} reward head(s), exported from "
             f"`{checkpoint_dir}` by prefkernels {__version__} as an `AutoModelForSequenceClassification`. "
             "Scores are the logits (higher is better).", ""]
    if not appends_end:
        lines += [f"> **Warning:** {note}. Plain transformers scores a text differently from prefkernels unless "
                  f"`{end}` (id {end_id}) is appended to its token ids, as below; "
                  "`prefkernels.Scorer.from_pretrained` on this directory does it.", ""]
    lines += ["```python", "import torch",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForSequenceClassification.from_pretrained(PATH).eval()",
              'texts = ["first text to score", "second text"]']
    if appends_end:
        lines += ['inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")']
    else:
        lines += ["rows = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length - 1)",
                  f'ids = [row if row[-1] == {end_id} else row + [{end_id}] for row in rows["input_ids"]]',
                  'inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt")']
    lines += ["with torch.no_grad():", f"    scores = model(**inputs).logits{index}", "",
              "# a conversation: the chat template writes the special tokens (do not tokenize its text again)",
              'messages = [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
              "inputs = tokenizer.apply_chat_template(messages, truncation=True, return_dict=True,",
              '                                       return_tensors="pt")',
              "```", ""]
    if end is not None:
        lines.append(f"- Plain texts end with `{end}` as in training"
                     + (" (the tokenizer adds it)." if appends_end else f" (append id {end_id} yourself, see above)."))
    if max_length is not None:
        lines.append(f"- Trained with at most {max_length} tokens: the tokenizer's `model_max_length` is {max_length} "
                     "and its `truncation_side` is left, so `truncation=True` keeps the end of a long text (the "
                     "scored token), as prefkernels does.")
    if info["head_bias_dropped"] is not None:
        lines.append(f"- The head bias {info['head_bias_dropped']} was dropped (HF score heads have none): scores "
                     "are lower by that constant; rankings and pairwise losses are unchanged.")
    if info["reward_mean"] is not None and info["reward_std"] is not None:
        lines.append(f"- Reward statistics of these scores, measured after training: mean {info['reward_mean']}, std "
                     f"{info['reward_std']}; normalized score = (score - mean) / std "
                     "(`prefkernels.Scorer.from_pretrained(PATH, normalize=True)`).")
    return "\n".join(lines) + "\n"


def export_hf(checkpoint_dir: str, out_dir: str, allow_bias_drop: bool = False, tolerance: float = 1e-4) -> float:
    """Write ``out_dir`` (atomically; never the checkpoint or a directory holding it) and verify it by
    loading it back with plain transformers.

    Returns the largest score difference between prefkernels' ``Scorer`` on the checkpoint and
    the reloaded directory used the plain-transformers way, on probe texts (and a conversation
    when there is a chat template); raises ExportError above ``tolerance`` or when the reloaded
    tokenizer gives other token ids. Warns (``ExportWarning``) when the tokenizer cannot append
    EOS itself: the check then appends it, and the exported README.md says so.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source, target = checkpoint.locate(checkpoint_dir).resolve(), Path(out_dir).resolve()
    if target == source or target in source.parents:
        raise ExportError(f"--hf: {out_dir} is or contains the checkpoint being exported, which the export would "
                          "replace; choose another directory")
    model = RewardModel.from_pretrained(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)
    classifier = to_sequence_classification(model, tokenizer, allow_bias_drop)
    max_length = model.max_length or default_max_length(tokenizer, model.backbone.config)
    reference = Scorer(model, tokenizer, device="cpu", max_length=max_length)
    exported, end_appended_by, note = export_tokenizer(checkpoint_dir, reference, max_length)
    appends_end = end_appended_by is not None
    if note is not None:
        warnings.warn(f"{note}; plain transformers needs it appended by hand (see the exported README.md)",
                      ExportWarning, stacklevel=2)
    end_id = end_token_id(tokenizer)
    bias = model.head.bias.detach().float().cpu().tolist() if model.head.bias is not None else None
    bias_dropped = bias if bias is not None and any(b != 0 for b in bias) else None
    shift = bias_dropped or [0.0] * model.num_heads
    info = {"format": EXPORT_INFO_FORMAT, "library_version": __version__, "append_eos": True,
            "tokenizer_appends_eos": appends_end, "end_token_id": end_id, "max_length": max_length,
            # the export made it append (training's did not): a text ending with EOS gets a second one
            "eos_appended_by_export": end_appended_by == "export",
            "head_bias_dropped": bias_dropped,
            # statistics of the exported scores, which lack the dropped bias
            "reward_mean": None if model.reward_mean is None else [m - b for m, b in zip(model.reward_mean, shift)],
            "reward_std": model.reward_std}
    with checkpoint.atomic_directory(out_dir) as tmp:
        classifier.save_pretrained(tmp, safe_serialization=True)
        exported.save_pretrained(tmp)
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(checkpoint_dir, model, tokenizer, info, note))
        # The check reads the directory as a user will, before it is renamed into place.
        hf_tokenizer = AutoTokenizer.from_pretrained(tmp)
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp)
        texts, conversations = PROBE_TEXTS + _long_probe(max_length), _chat_probe(hf_tokenizer, max_length)
        append_end = None if appends_end else end_id
        mismatch = _first_mismatch(reference, hf_tokenizer, texts, conversations, append_end)
        if mismatch is not None:
            raise ExportError(f"export: the reloaded tokenizer does not tokenize as prefkernels does: {mismatch}")
        diff = max_score_difference(reference, reloaded, hf_tokenizer, PROBE_TEXTS, conversations, append_end)
        if not diff <= tolerance:
            raise ExportError(f"export: reloaded HF model differs from the prefkernels model by {diff:.2e} > "
                              f"{tolerance}")
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
    import sys

    out = Path(args.hf)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--hf: {out} is a file; expected the path of a directory to write")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ExportError(f"--hf: {out} already exists and is not empty; pass --overwrite to replace it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        diff = export_hf(args.checkpoint, str(out), allow_bias_drop=args.allow_bias_drop)
    for warning in caught:
        if issubclass(warning.category, ExportWarning):
            print(f"prefkernels export: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    info = read_export_info(out)
    ending = ("the tokenizer appends EOS to plain texts" if info["tokenizer_appends_eos"]
              else "EOS must be appended by hand (see README.md)")
    print(f"exported {args.checkpoint} -> {out} (AutoModelForSequenceClassification); {ending}, max_length "
          f"{info['max_length']} (left truncation); max score difference of plain transformers after reload {diff:.2e}")
    return 0
