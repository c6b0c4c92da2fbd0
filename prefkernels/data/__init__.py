"""Preference data: read, validate, tokenize once, and batch with little padding.

Sources are JSONL files (plain or gzip), Hugging Face ``datasets`` objects, or lists of dicts,
in TRL's preference formats:

- implicit prompt: ``chosen``, ``rejected`` (full texts sharing the prompt as a prefix);
- explicit prompt: ``prompt``, ``chosen``, ``rejected`` (text = prompt + response);
- conversational: the same columns holding lists of ``{"role", "content"}`` messages, rendered
  with the tokenizer's chat template;
- rankings: ``responses`` (ordered best first, >= 2) and an optional ``prompt``.

Optional columns: ``margin`` (per pair), ratings (``chosen_rating``/``rejected_rating``,
``score_chosen``/``score_rejected``, or ``ratings`` aligned with ``responses``), ties
(``label: 0.5`` or ``tie: true``).

Each text is tokenized once; EOS is appended to non-conversational texts that lack it; a row
longer than ``max_length`` loses tokens from the LEFT of its prompt (special prefix tokens such
as BOS/CLS and the whole response are kept) and the example is counted as truncated. A row whose
response alone leaves no room for a prompt token is an error, unless ``truncate_responses``
allows cutting the response from the left too (its end, the scored token, is always kept). A batch
puts every example's first (chosen) row, then every second (rejected) row, so pairs follow
TRL's concatenation and ``fused_bt_loss``'s default pairing.
"""
from __future__ import annotations

import dataclasses
import difflib
import gzip
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefkernels.checks import is_integer, is_real

PAIR_RATING_COLUMNS = (("chosen_rating", "rejected_rating"), ("score_chosen", "score_rejected"),
                       ("chosen_score", "rejected_score"))
RANKING_RATING_COLUMNS = ("ratings", "scores")
TOKENIZE_CHUNK = 512
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # a .gz file cut short, or not gzip at all


class DataError(ValueError):
    """Bad preference data; the message names the file (and line) or data set row."""


@dataclass
class PreferenceExample:
    """One tokenized comparison. ``input_ids`` holds one row per response, best first: a pair is
    [chosen, rejected]; a ranking has >= 2 rows. ``response_lengths`` counts each row's tokens
    after the prompt; ``ratings`` is NaN where absent."""

    index: int
    input_ids: list[list[int]]
    response_lengths: list[int]
    margin: float | None
    tie: bool
    ratings: list[float]
    truncated: bool
    source: str
    response_truncated: bool = False

    @property
    def row_lengths(self) -> list[int]:
        return [len(row) for row in self.input_ids]


@dataclass
class DataReport:
    """What loading did: counts, truncation and lengths (tokens per row)."""

    name: str
    formats: list[str]
    examples: int
    rankings: int
    ties: int
    truncated: int
    responses_truncated: int
    identical: int
    max_length: int
    mean_tokens: float
    max_tokens: int

    def __str__(self) -> str:
        kind = f"{self.examples} comparisons" if self.rankings else f"{self.examples} pairs"
        parts = [f"{self.name}: {kind} ({', '.join(self.formats)})",
                 f"{self.truncated} truncated to max_length={self.max_length}"
                 + (f" ({self.responses_truncated} with the response cut)" if self.responses_truncated else ""),
                 f"{self.mean_tokens:.0f} tokens/row on average (max {self.max_tokens})"]
        if self.rankings:
            parts.append(f"{self.rankings} rankings")
        if self.ties:
            parts.append(f"{self.ties} ties")
        if self.identical:
            parts.append(f"{self.identical} with identical responses")
        return ", ".join(parts)


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized comparisons; item ``i`` is a ``PreferenceExample``."""

    def __init__(self, examples: list[PreferenceExample], report: DataReport):
        self.examples, self.report = examples, report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PreferenceExample:
        return self.examples[i]

    @property
    def row_lengths(self) -> list[list[int]]:
        return [example.row_lengths for example in self.examples]

    @property
    def has_margin(self) -> bool:
        return bool(self.examples) and self.examples[0].margin is not None

    @property
    def num_ties(self) -> int:
        return sum(example.tie for example in self.examples)

    def split(self, fraction: float, seed: int) -> tuple["PreferenceDataset", "PreferenceDataset"]:
        """(rest, held-out) with ``round(fraction * len)`` examples held out, chosen by ``seed``."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"valid_fraction: expected a float in (0, 1), got {fraction!r}")
        held = round(fraction * len(self))
        if held < 1 or held >= len(self):
            raise ValueError(f"valid_fraction: {fraction} of {len(self)} examples leaves an empty split")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(sorted(order[held:]), "train"), self.subset(sorted(order[:held]), "valid")

    def subset(self, indices, name: str) -> "PreferenceDataset":
        """The examples at ``indices`` (renumbered 0..), reported as split ``name``."""
        examples = [dataclasses.replace(self.examples[i], index=new) for new, i in enumerate(indices)]
        return PreferenceDataset(examples, _report(name, self.report.formats, examples, self.report.max_length))


# ----------------------------------------------------------------------------- reading


def read_records(source, name: str | None = None) -> Iterator[tuple[str, object]]:
    """(location, record) for each record of a JSONL path, a ``datasets`` object or a list of dicts.

    Locations read ``file:line`` or ``name row i``. Raises ``DataError`` for invalid JSON
    (with file and line), empty files and ``DatasetDict`` objects.
    """
    if isinstance(source, (str, os.PathLike)):
        yield from _read_jsonl(Path(source))
        return
    if type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"{name or 'data'}: got a DatasetDict with splits {list(source.keys())}; pass one split, "
                        "e.g. dataset['train']")
    if not isinstance(source, Iterable) or isinstance(source, (dict, bytes)):
        raise DataError(f"{name or 'data'}: expected a JSONL path, a datasets.Dataset or a list of dicts, "
                        f"got {type(source).__name__}")
    label = name or getattr(getattr(source, "info", None), "dataset_name", None) or "data"
    count = 0
    for count, record in enumerate(source, start=1):
        yield f"{label} row {count - 1}", record
    if count == 0:
        raise DataError(f"{label}: no records (empty data set)")


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file (.jsonl or .jsonl.gz)")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    count = 0
    # utf-8-sig: a leading byte-order mark is skipped (as datasets.load_dataset("json") does)
    with (gzip.open(path, "rt", encoding="utf-8-sig") if gzipped else open(path, encoding="utf-8-sig")) as f:
        try:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno})") from None
                count += 1
                yield f"{path}:{line_number}", record
        except (UnicodeDecodeError, *GZIP_ERRORS) as err:
            raise DataError(f"{path}: cannot be read as UTF-8 JSONL ({err})") from None
    if count == 0:
        raise DataError(f"{path}: no records (empty file)")


def _sources(sources, name: str) -> list:
    """A single source, or a list of sources; a list of dicts is one source. ``name`` (e.g.
    "train") names the argument in the error for an empty list."""
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, (list, tuple)):
        return [sources]
    if any(isinstance(item, dict) for item in sources):  # records (a bad one is named by its row)
        return [sources]
    if not sources:
        raise DataError(f"{name}: expected a path, a dataset, records or a list of these, got an empty list")
    return list(sources)


# ----------------------------------------------------------------------------- validation


def _missing_column(location: str, column: str, record: dict, hint: str = "") -> DataError:
    found = ", ".join(repr(k) for k in record) or "none"
    close = difflib.get_close_matches(column, [str(k) for k in record], n=1, cutoff=0.6)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"{location}: missing column {column!r}{suggestion}; columns found: {found}{hint}")


def is_messages(value) -> bool:
    """True for a list of {"role", "content"} dicts (a conversation; may be empty)."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_text(location: str, column: str, value, conversational: bool):
    if value is None:
        raise DataError(f"{location}: column {column!r} is null")
    if conversational:
        if not is_messages(value) or not value:
            raise DataError(f"{location}: column {column!r}: expected a non-empty list of "
                            f"{{'role', 'content'}} messages (conversational format), got {type(value).__name__}")
        for index, message in enumerate(value):
            if not isinstance(message["content"], str):
                raise DataError(f"{location}: column {column!r} message {index}: expected a string 'content', got "
                                f"{type(message['content']).__name__}")
            require_unicode(message["content"], f"{location}: column {column!r} message {index}", DataError)
    elif not isinstance(value, str):
        raise DataError(f"{location}: column {column!r}: expected a string, got {type(value).__name__}")
    else:
        require_unicode(value, f"{location}: column {column!r}", DataError)


def render_messages(tokenizer, messages: list[dict], where: str, error: type[ValueError] = ValueError, **kwargs) -> str:
    """The text of ``messages`` by ``tokenizer``'s chat template (kwargs: apply_chat_template's), or
    ``error`` naming ``where`` when the template refuses them."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - templates raise anything (jinja's TemplateError, raise_exception, ...)
        raise error(f"{where}: the chat template refused the conversation ({type(err).__name__}: {err})") from None


def require_unicode(text: str, where: str, error: type[ValueError] = ValueError) -> str:
    """``text``, or ``error`` naming ``where`` when it holds a lone surrogate (e.g. from a JSON escape
    "\\ud83d" cut from its pair): not valid Unicode, so no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(f"{where}: invalid Unicode: lone surrogate {text[err.start]!r} at character {err.start}") from None
    return text


def _number(location: str, column: str, value) -> float:
    try:  # float() first: an integer beyond float range (1e400 written out) overflows
        number = float(value) if is_real(value) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise DataError(f"{location}: column {column!r}: expected a finite number, got {value!r:.80}")
    return number


@dataclass
class _Parsed:
    """A validated record before tokenization."""

    location: str
    prompt: object
    responses: list
    conversational: bool
    margin: float | None
    tie: bool
    ratings: list[float]
    fmt: str
    columns: list[str]


def parse_record(location: str, record, use_margin: bool = True) -> _Parsed:
    """Validate one record in any supported format; raises ``DataError`` naming the column."""
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object with preference columns, got {type(record).__name__}")
    ranking = record.get("responses") is not None  # a null column (a pair in a datasets table) is absent
    if ranking:
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{location}: column 'responses': expected a list of >= 2 responses ordered best "
                            f"first, got {responses!r:.80}")
        columns = [f"responses[{i}]" for i in range(len(responses))]
    else:
        for column in ("chosen", "rejected"):
            if column not in record:
                hint = "" if ("chosen" in record or "rejected" in record) else \
                    " (expected chosen/rejected, optionally prompt, or a 'responses' ranking)"
                raise _missing_column(location, column, record, hint)
        responses, columns = [record["chosen"], record["rejected"]], ["chosen", "rejected"]
    conversational = is_messages(responses[0])
    for column, value in zip(columns, responses):
        _check_text(location, column, value, conversational)
    prompt = record.get("prompt")
    if prompt is not None:
        _check_text(location, "prompt", prompt, conversational)
    margin = None
    if use_margin and record.get("margin") is not None:
        if len(responses) > 2:
            raise DataError(f"{location}: column 'margin' is supported for pairs, not rankings")
        margin = _number(location, "margin", record["margin"])
    tie = _tie(location, record)
    if tie and len(responses) > 2:
        raise DataError(f"{location}: ties are supported for pairs, not rankings")
    ratings = [math.nan] * len(responses)
    if len(responses) == 2:
        for chosen_column, rejected_column in PAIR_RATING_COLUMNS:
            if record.get(chosen_column) is not None or record.get(rejected_column) is not None:
                for column, other in ((chosen_column, rejected_column), (rejected_column, chosen_column)):
                    if column not in record:
                        raise _missing_column(location, column, record, f" (needed with {other!r})")
                ratings = [_number(location, c, record[c]) for c in (chosen_column, rejected_column)]
                break
    for column in RANKING_RATING_COLUMNS:
        if ranking and record.get(column) is not None:
            values = record[column]
            if not isinstance(values, list) or len(values) != len(responses):
                raise DataError(f"{location}: column {column!r}: expected {len(responses)} numbers, one per "
                                f"response, got {values!r:.80}")
            ratings = [_number(location, column, v) for v in values]
    fmt = ("ranking" if ranking else "explicit prompt" if prompt is not None else "implicit prompt")
    if conversational:
        fmt = "conversational " + fmt
    return _Parsed(location, prompt, list(responses), conversational, margin, tie, ratings, fmt, columns)


def _tie(location: str, record: dict) -> bool:
    """Whether the record is a tie (``tie: true`` or ``label: 0.5``); null values count as absent."""
    tie = False
    if record.get("tie") is not None:
        if not isinstance(record["tie"], (bool, np.bool_)):
            raise DataError(f"{location}: column 'tie': expected true or false, got {record['tie']!r}")
        tie = bool(record["tie"])
    if record.get("label") is not None:
        label = record["label"]
        if label is True or (not isinstance(label, bool) and label == 1):
            return tie
        if not isinstance(label, bool) and label == 0.5:
            return True
        raise DataError(f"{location}: column 'label': expected 1 (chosen preferred) or 0.5 (tie), got {label!r}")
    return tie


# ----------------------------------------------------------------------------- rendering and tokenization


def render(parsed: _Parsed, tokenizer) -> tuple[list[str], int]:
    """(texts, prompt_chars): each response's full text and the length of the shared prompt."""
    if parsed.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{parsed.location}: conversational records need a tokenizer with a chat template; "
                            f"{type(tokenizer).__name__} has none")
        conversations = [(parsed.prompt or []) + response for response in parsed.responses]
        shared = len(parsed.prompt) if parsed.prompt else _shared_messages(conversations)
        texts = [render_messages(tokenizer, conversation, parsed.location, DataError) for conversation in conversations]
        # The prompt ends where its own rendering (with the assistant header) stops matching: texts that
        # merely start alike ("the river is ...") must not move response words into the prompt
        prompt = render_messages(tokenizer, conversations[0][:shared], parsed.location, DataError,
                                 add_generation_prompt=True) if shared else ""
        return texts, len(os.path.commonprefix([*texts, prompt]))
    if parsed.prompt is not None:
        return [parsed.prompt + response for response in parsed.responses], len(parsed.prompt)
    shared = len(os.path.commonprefix(parsed.responses))
    if 0 < shared < min(map(len, parsed.responses)) and parsed.responses[0][shared - 1] == " ":
        shared -= 1  # the space before the first difference starts the responses, as TRL's extract_prompt has it
    return list(parsed.responses), shared


def _shared_messages(conversations: list[list]) -> int:
    """How many leading messages every conversation shares, leaving each at least one (the implicit
    prompt, as TRL's ``extract_prompt`` finds it)."""
    def content(message):  # a datasets table gives every message each key of the column, None when unset
        return {key: value for key, value in message.items() if value is not None}

    shared = 0
    while all(len(c) > shared + 1 and content(c[shared]) == content(conversations[0][shared]) for c in conversations):
        shared += 1
    return shared


@dataclass
class _Encoded:
    """A tokenized text: ids plus the number of leading/trailing special tokens and prompt tokens."""

    ids: list[int]
    lead: int
    trail: int
    prompt_tokens: int


def prefix_token_ids(tokenizer) -> set[int]:
    """BOS/CLS: special tokens that a left-truncated row keeps at its start whether the tokenizer
    added them (offsets (0, 0)) or a chat template wrote them into the text. Other special tokens
    lead a row only when the tokenizer added them (a template's own markup is text)."""
    return {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}


def suffix_token_ids(tokenizer) -> set[int]:
    """EOS/SEP: end tokens that count as the row's trailer, not as response tokens, whether the
    tokenizer added them, training appended them, or the text already ended with one."""
    return {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}


def _encode(tokenizer, texts: list[str], prompt_chars: list[int], add_special_tokens: bool,
            progress=None) -> list[_Encoded]:
    special = set(tokenizer.all_special_ids)
    prefix, suffix = prefix_token_ids(tokenizer), suffix_token_ids(tokenizer)

    def added(ids, offsets, index):  # a special token the tokenizer added: offsets (0, 0); unknown without offsets
        return offsets is not None and ids[index] in special and tuple(offsets[index]) == (0, 0)

    out = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        if progress is not None:
            progress.update(min(TOKENIZE_CHUNK, len(texts) - start))
        chunk = texts[start:start + TOKENIZE_CHUNK]
        chunk_prompt = prompt_chars[start:start + TOKENIZE_CHUNK]
        if tokenizer.is_fast:
            enc = tokenizer(chunk, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
            offsets_list = enc["offset_mapping"]
        else:
            enc = tokenizer(chunk, add_special_tokens=add_special_tokens, verbose=False)
            offsets_list = [None] * len(chunk)
        for text, n_prompt_chars, ids, offsets in zip(chunk, chunk_prompt, enc["input_ids"], offsets_list):
            ids = list(ids)
            lead = 0
            while lead < len(ids) and (ids[lead] in prefix or added(ids, offsets, lead)):
                lead += 1
            trail = 0
            while trail < len(ids) - lead and (ids[-1 - trail] in suffix or added(ids, offsets, len(ids) - 1 - trail)):
                trail += 1
            if offsets is not None:
                # a prompt token lies wholly in the prompt: one that straddles the boundary (a byte-level
                # ' Yes' starting on the prompt's trailing space) holds response text, as TRL counts it
                prompt_tokens = sum(1 for _, e in offsets[lead:len(ids) - trail] if e <= n_prompt_chars)
            elif n_prompt_chars:
                prompt_tokens = len(tokenizer(text[:n_prompt_chars], add_special_tokens=False,
                                              verbose=False)["input_ids"])
            else:
                prompt_tokens = 0
            out.append(_Encoded(ids, lead, trail, min(prompt_tokens, len(ids) - lead - trail)))
    return out


def end_token_id(tokenizer) -> int | None:
    """The id appended to texts that lack it: EOS, else SEP (BERT-style), else None."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return tokenizer.sep_token_id


def pad_token_id(tokenizer) -> int:
    """The id padding is filled with: PAD, else EOS, else 0 (the mask marks padding anyway)."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows: (input_ids [N, T] int64, attention_mask [N, T] int64). Every row
    must hold a token, so every mask row has its pooled (last) token: callers rely on it to skip
    the op's value checks (``checks.values_checked_by_caller``)."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    if len(lengths) and lengths.min() < 1:
        raise ValueError(f"rows[{int(lengths.argmin())}]: empty, expected at least one token")
    width = int(lengths.max())
    # filled in NumPy: 4-10x faster than a torch slice assignment per row
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
    attention_mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def load_preferences(sources, tokenizer, max_length: int, *, use_margin: bool = True, name: str = "data",
                     truncate_responses: bool = False, progress: bool = False) -> PreferenceDataset:
    """Read, validate and tokenize preference data (see the module docstring for formats).

    ``sources``: a path, a ``datasets.Dataset``, a list of dicts, or a list of these.
    Returns a ``PreferenceDataset``; ``.report`` tells how many examples were truncated.
    Raises ``DataError`` (file and line, or row) for any bad record.
    """
    if not is_integer(max_length) or max_length < 2:
        raise ValueError(f"max_length: expected an integer >= 2, got {max_length!r}")
    max_length = int(max_length)
    parsed: list[_Parsed] = []
    for source in _sources(sources, name):
        for location, record in read_records(source, name=name):
            parsed.append(parse_record(location, record, use_margin=use_margin))
    with_margin = sum(p.margin is not None for p in parsed)
    if 0 < with_margin < len(parsed):
        first = next(p.location for p in parsed if p.margin is None)
        raise DataError(f"{name}: column 'margin' is present in {with_margin} of {len(parsed)} records (first "
                        f"without: {first}); expected in all or none (or disable margins)")
    rendered = [render(p, tokenizer) for p in parsed]
    flat_texts: dict[bool, list] = {True: [], False: []}
    for parsed_record, (texts, prompt_chars) in zip(parsed, rendered):
        for text in texts:
            flat_texts[not parsed_record.conversational].append((text, prompt_chars))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(map(len, flat_texts.values())), desc=f"tokenizing {name}", unit="text", leave=False)
    encoded = {flag: iter(_encode(tokenizer, [t for t, _ in items], [c for _, c in items], flag, bar))
               for flag, items in flat_texts.items()}
    if bar is not None:
        bar.close()
    end_id = end_token_id(tokenizer)
    examples, too_long = [], []
    for index, (record, (texts, _)) in enumerate(zip(parsed, rendered)):
        rows, response_lengths, truncated, response_cut = [], [], False, False
        for column, _ in enumerate(texts):
            enc = next(encoded[not record.conversational])
            fitted = _fit_row(enc, record, column, end_id, max_length, truncate_responses)
            if isinstance(fitted, str):
                too_long.append(fitted)
                continue
            row, response_length, row_truncated, row_response_cut = fitted
            rows.append(row)
            response_lengths.append(response_length)
            truncated |= row_truncated
            response_cut |= row_response_cut
        if len(rows) == len(texts):
            examples.append(PreferenceExample(index, rows, response_lengths, record.margin, record.tie,
                                              record.ratings, truncated, record.location, response_cut))
    if too_long:
        keeps, remedy = (("its special tokens and at least one response token (prompt and response are cut "
                          "from the left)", "")
                         if truncate_responses else
                         ("its whole response, its special tokens and at least one prompt token (only the "
                          "prompt is cut, from the left)", ", or allow cutting such responses from the left "
                          "(--truncate-responses, truncate_responses=True)"))
        raise DataError(f"{name}: max_length={max_length} is too small for {len(too_long)} of "
                        f"{sum(len(t) for t, _ in rendered)} texts: a row keeps {keeps}. First: {too_long[0]}. "
                        f"Raise max_length (where the backbone has more positions){remedy}.")
    formats = sorted({p.fmt for p in parsed})
    return PreferenceDataset(examples, _report(name, formats, examples, max_length))


def _fit_row(enc: _Encoded, record: _Parsed, column: int, end_id: int | None, max_length: int,
             truncate_responses: bool):
    """(row ids, response length, truncated, response cut), or a message when the row cannot fit."""
    ids, lead, trail = enc.ids, enc.lead, enc.trail
    name = record.columns[column]
    text_tokens = len(ids) - lead - trail
    prompt_tokens = enc.prompt_tokens
    response_length = text_tokens - prompt_tokens
    if text_tokens <= 0 or (record.prompt is not None and response_length <= 0):
        raise DataError(f"{record.location}: column {name!r} tokenizes to nothing (empty or blank text?)")
    if not record.conversational and end_id is not None and ids[-1] != end_id:
        ids = ids + [end_id]
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, response_length, False, False
    if excess > max(prompt_tokens - 1, 0) and not truncate_responses:
        need = len(ids) - max(prompt_tokens - 1, 0)
        return (f"{record.location} column {name!r}: {len(ids)} tokens ({prompt_tokens} prompt), "
                f"needs max_length >= {need}")
    if excess >= text_tokens:
        return (f"{record.location} column {name!r}: max_length={max_length} leaves no response token beside "
                f"{len(ids) - text_tokens} special tokens")
    response_cut = excess > prompt_tokens
    return ids[:lead] + ids[lead + excess:], response_length - max(0, excess - prompt_tokens), True, response_cut


def _report(name: str, formats: list[str], examples: list[PreferenceExample], max_length: int) -> DataReport:
    lengths = [n for example in examples for n in example.row_lengths]
    return DataReport(
        name=name, formats=formats, examples=len(examples),
        rankings=sum(len(e.input_ids) > 2 for e in examples), ties=sum(e.tie for e in examples),
        truncated=sum(e.truncated for e in examples),
        responses_truncated=sum(e.response_truncated for e in examples),
        identical=sum(len({tuple(r) for r in e.input_ids}) < len(e.input_ids) for e in examples),
        max_length=max_length, mean_tokens=float(np.mean(lengths)) if lengths else 0.0,
        max_tokens=max(lengths, default=0))


# ----------------------------------------------------------------------------- batching


@dataclass
class PreferenceBatch:
    """A padded batch of comparisons.

    input_ids, attention_mask: [N, T] int64 (right padding). For pairs (the TRL layout) rows
    [0, G) are chosen and [G, N) rejected and ``chosen_index``/``rejected_index`` are None;
    otherwise they list every ordered pair [P] within each ranking. ``ranking`` [G, L] holds
    each comparison's row indices best first (-1 padding). ``margin`` [P] float32 and ``tie``
    [P] bool are set when the data has them; ``example_index`` [G] indexes the dataset.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ranking: torch.Tensor
    example_index: torch.Tensor
    chosen_index: torch.Tensor | None = None
    rejected_index: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    tie: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        return PreferenceBatch(**{f.name: None if (v := getattr(self, f.name)) is None
                                  else v.to(device, non_blocking=non_blocking)
                                  for f in dataclasses.fields(self)})

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit (chosen_index, rejected_index) [P] int64."""
        if self.chosen_index is not None:
            return self.chosen_index, self.rejected_index
        half = self.input_ids.shape[0] // 2
        chosen = torch.arange(half, device=self.input_ids.device)
        return chosen, chosen + half

    @property
    def num_comparisons(self) -> int:
        return self.ranking.shape[0]


def ranking_layout(num_responses: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows concatenated comparison by comparison: (ranking [G, L], chosen_index [P], rejected_index [P])
    with every ordered pair (i better than j) within each comparison."""
    width = max(num_responses)
    ranking = torch.full((len(num_responses), width), -1, dtype=torch.long)
    chosen, rejected, offset = [], [], 0
    for g, n in enumerate(num_responses):
        ranking[g, :n] = torch.arange(offset, offset + n)
        for i in range(n):
            for j in range(i + 1, n):
                chosen.append(offset + i)
                rejected.append(offset + j)
        offset += n
    return ranking, torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def pair_owners(num_responses: Sequence[int]) -> torch.Tensor:
    """Comparison index [P] int64 of each ordered pair, in ``ranking_layout``'s order (a comparison
    of n responses holds n(n-1)/2 pairs)."""
    pairs = torch.tensor([n * (n - 1) // 2 for n in num_responses], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(num_responses)), pairs)


class PreferenceCollator:
    """Pads a list of ``PreferenceExample`` into a ``PreferenceBatch`` (TRL layout for pairs)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[PreferenceExample]) -> PreferenceBatch:
        counts = [len(e.input_ids) for e in examples]
        if all(n == 2 for n in counts):
            rows = [e.input_ids[0] for e in examples] + [e.input_ids[1] for e in examples]
            group = len(examples)
            ranking = torch.stack([torch.arange(group), torch.arange(group) + group], dim=1)
            chosen = rejected = None
        else:
            rows = [row for e in examples for row in e.input_ids]
            ranking, chosen, rejected = ranking_layout(counts)
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id)
        margin = tie = None
        if chosen is None and examples[0].margin is not None:
            margin = torch.tensor([e.margin for e in examples], dtype=torch.float32)
        if any(e.tie for e in examples):  # one flag per ordered pair (rankings are never ties)
            tie = torch.tensor([e.tie for e in examples], dtype=torch.bool)[pair_owners(counts)]
        return PreferenceBatch(input_ids, attention_mask, ranking, torch.tensor([e.index for e in examples]),
                               chosen, rejected, margin, tie)


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of example indices grouped by length, sharded across processes.

    Each epoch (seeded by ``seed`` and the epoch): shuffle, cut into mega-batches of ~50
    batches, sort each by length, split into batches of ``batch_size`` examples or of at most
    ``max_tokens`` padded tokens (rows x longest row), then shuffle the batches. The global
    list is the same on every process; process ``rank`` takes every ``num_replicas``-th batch
    (the list is padded by repeating batches so every process runs the same number of steps).
    ``shuffle=False`` sorts the whole data set by length (evaluation). ``start_batch`` skips
    batches of the current epoch (resume).
    """

    MEGA_BATCH_MULTIPLIER = 50

    def __init__(self, row_lengths: Sequence[Sequence[int]], *, batch_size: int | None = None,
                 max_tokens: int | None = None, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0):
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("batch_size/max_tokens: pass exactly one (batch by pairs or by a token budget)")
        if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if not is_integer(num_replicas) or num_replicas < 1:
            raise ValueError(f"num_replicas: expected an integer >= 1, got {num_replicas!r}")
        if not is_integer(rank) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank: expected an integer in [0, {num_replicas}), got {rank!r}")
        if not row_lengths:
            raise ValueError("row_lengths: no examples to batch")
        self.row_lengths = [list(r) for r in row_lengths]
        self.cost = [len(r) * max(r) for r in self.row_lengths]
        if max_tokens is not None and max_tokens < max(self.cost):
            worst = self.row_lengths[int(np.argmax(self.cost))]
            raise ValueError(f"max_tokens: {max_tokens} is smaller than the largest example ({len(worst)} rows x "
                             f"{max(worst)} tokens = {len(worst) * max(worst)})")
        self.batch_size, self.max_tokens, self.shuffle, self.seed = batch_size, max_tokens, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_batch = 0, 0
        self._cache: dict[tuple[int, bool], list[list[int]]] = {}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _examples_per_batch(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return max(1, int(self.max_tokens // max(1.0, float(np.mean(self.cost)))))

    def _split(self, order: Sequence[int]) -> list[list[int]]:
        batches, current, current_rows, current_width = [], [], 0, 0
        for i in order:
            rows, width = len(self.row_lengths[i]), max(self.row_lengths[i])
            full = (len(current) == self.batch_size if self.batch_size is not None else
                    (current_rows + rows) * max(current_width, width) > self.max_tokens)
            if current and full:
                batches.append(current)
                current, current_rows, current_width = [], 0, 0
            current.append(int(i))
            current_rows, current_width = current_rows + rows, max(current_width, width)
        if current:
            batches.append(current)
        return batches

    def epoch_batches(self, epoch: int | None = None, grouped: bool = True) -> list[list[int]]:
        """The global batch list of ``epoch`` (default: the current one), before sharding."""
        epoch = self.epoch if epoch is None else epoch
        if (epoch, grouped) not in self._cache:
            if len(self._cache) >= 4:
                self._cache.clear()
            self._cache[epoch, grouped] = self._make_batches(epoch, grouped)
        return self._cache[epoch, grouped]

    def _make_batches(self, epoch: int, grouped: bool) -> list[list[int]]:
        longest = [max(r) for r in self.row_lengths]
        if not self.shuffle:
            order = sorted(range(len(longest)), key=lambda i: -longest[i]) if grouped else range(len(longest))
            return self._split(order)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(longest))
        if not grouped:
            return self._split(order)
        mega = self._examples_per_batch() * self.MEGA_BATCH_MULTIPLIER
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -longest[i])
            batches.extend(self._split(chunk))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _sharded(self) -> list[list[int]]:
        batches = self.epoch_batches()
        padding = -len(batches) % self.num_replicas
        # cycled: with fewer batches than processes, the padding repeats some more than once
        batches = batches + [batches[i % len(batches)] for i in range(padding)]
        return batches[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._sharded()[self.start_batch:]

    def __len__(self) -> int:
        """Batches this process runs in the current epoch, including skipped ones."""
        return math.ceil(len(self.epoch_batches()) / self.num_replicas)

    def padding_fraction(self, epoch: int | None = None, grouped: bool = True) -> float:
        """Share of padded tokens over the epoch's batches (``grouped=False``: random batches)."""
        real = padded = 0
        for batch in self.epoch_batches(epoch, grouped):
            lengths = [n for i in batch for n in self.row_lengths[i]]
            real += sum(lengths)
            padded += len(lengths) * max(lengths)
        return 1.0 - real / padded
