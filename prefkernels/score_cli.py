"""``prefkernels score``: score a JSONL file with a reward model, streaming.

Each input line is a JSON object with one of:

- ``text``: a text;
- ``prompt`` + ``response``: strings (concatenated) or message lists (chat template);
- ``messages``: a conversation (chat template);
- ``chosen`` + ``rejected`` (optional ``prompt``): both are scored and the file's pairwise accuracy
  (chosen_score > rejected_score) is printed at the end.

One output row per input row, in input order, keeping the id fields (``id`` and keys ending in ``_id``)::

    {"id": ..., "score": s, "truncated": false}
    {"id": ..., "chosen_score": c, "rejected_score": r, "truncated": false}

With a K-head ensemble the score is the head mean, with ``*_std`` (population std over heads) and
``*_heads`` (the K scores) next to it. The file is read in chunks of ``--chunk-rows`` rows, each
scored in length-sorted batches and appended in input order to the partial file
``.<output name>.partial`` (plain JSONL, flushed after each chunk). At the end it is moved into place
as ``--output`` (gzip-compressed when that ends in .gz) by an atomic rename: a failed run never
leaves a half-written output. A stopped run keeps its partial file; ``--resume`` counts its complete
rows (dropping a torn last line), skips as many input rows and goes on. The input (path, size,
modification time), model and scoring options are recorded beside it in ``.<output name>.partial.json``,
and a resume with others is refused. Without ``--resume`` a non-empty partial file makes the run
refuse to start. The partial file is locked while a run writes it, so a second run on the same
output refuses to start. Blank input lines are skipped (JSONL), so they get no output row.

A malformed line (invalid UTF-8 or JSON, a missing or mistyped field) stops the run with its line
number, or with ``--skip-invalid`` becomes ``{"line": n, "error": ...}`` (plus its ids when
parseable) and is counted.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefkernels import checkpoint
from prefkernels.data import GZIP_ERRORS
from prefkernels.scorer import ACCELERATOR_TOKEN_BUDGET, CPU_TOKEN_BUDGET, Scorer, is_conversation

DEFAULT_CHUNK_ROWS = 2048
MAX_ERRORS_SHOWN = 5


class InvalidRow(ValueError):
    """A line that cannot be scored; ``ids`` holds its id fields when it parsed as an object."""

    def __init__(self, message: str, ids: dict | None = None):
        super().__init__(message)
        self.ids = ids or {}


@dataclass
class ParsedRow:
    """One valid input row: its id fields, its inputs (1 item, or chosen and rejected) and the
    input field each item came from."""

    ids: dict
    items: list
    fields: list[str]

    @property
    def is_pair(self) -> bool:
        return self.fields == ["chosen", "rejected"]

    def output_prefix(self, index: int) -> str:
        """Key prefix of item ``index``'s scores: "" (``score``), or "chosen_"/"rejected_"."""
        return f"{self.fields[index]}_" if self.is_pair else ""


@dataclass
class RunSummary:
    """Counts over the output rows, so that a resumed run recounts the rows it keeps."""

    rows: int = 0
    invalid: int = 0
    truncated_rows: int = 0
    pairs: int = 0
    pairs_correct: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_SHOWN invalid lines

    @property
    def accuracy(self) -> float | None:
        return self.pairs_correct / self.pairs if self.pairs else None

    def add(self, record: dict) -> None:
        """Count one output row."""
        self.rows += 1
        if "error" in record:
            self.invalid += 1
            if len(self.errors) < MAX_ERRORS_SHOWN:
                self.errors.append(f"line {record['line']}: {record['error']}")
            return
        self.truncated_rows += record["truncated"]
        if "chosen_score" in record:
            self.pairs += 1
            self.pairs_correct += record["chosen_score"] > record["rejected_score"]


def id_fields(row: dict) -> dict:
    """The row's ``id`` and ``*_id`` fields, in their order."""
    return {key: value for key, value in row.items() if key == "id" or key.endswith("_id")}


def parse_line(line: bytes) -> ParsedRow:
    """One JSONL line -> ParsedRow; raises InvalidRow naming what is wrong."""
    try:  # a byte-order mark (the file's first line) is skipped, as the training data loader does
        row = json.loads(line.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidRow(f"invalid UTF-8: {err.reason} at byte {err.start + 1}") from None
    except json.JSONDecodeError as err:
        raise InvalidRow(f"invalid JSON: {err.msg} (column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer over Python's digit limit, too deep nesting
        raise InvalidRow(f"invalid JSON: {err}") from None
    if not isinstance(row, dict):
        raise InvalidRow(f"expected a JSON object, got {type(row).__name__}")
    ids = id_fields(row)
    if "chosen" in row or "rejected" in row:
        if not ("chosen" in row and "rejected" in row):
            raise InvalidRow("a pair row needs both 'chosen' and 'rejected'", ids)
        prompt = row.get("prompt")
        items = [row["chosen"], row["rejected"]] if prompt is None else [(prompt, row["chosen"]),
                                                                         (prompt, row["rejected"])]
        return ParsedRow(ids, items, ["chosen", "rejected"])
    if "messages" in row:
        if not is_conversation(row["messages"]):
            raise InvalidRow("'messages': expected a list of {'role', 'content'} objects", ids)
        return ParsedRow(ids, [row["messages"]], ["messages"])
    if "prompt" in row or "response" in row:
        if not ("prompt" in row and "response" in row):
            raise InvalidRow("a prompt row needs both 'prompt' and 'response'", ids)
        return ParsedRow(ids, [(row["prompt"], row["response"])], ["prompt/response"])
    if "text" in row:
        if not isinstance(row["text"], str):
            raise InvalidRow(f"'text': expected a string, got {type(row['text']).__name__}", ids)
        return ParsedRow(ids, [row["text"]], ["text"])
    raise InvalidRow(f"expected a 'text', 'prompt'+'response', 'messages' or 'chosen'+'rejected' field, "
                     f"got keys {sorted(row)}", ids)


def _open_bytes(path: Path):
    """The input file for reading lines as bytes (each decoded by ``parse_line``), gunzipped if .gz."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _count_lines(path: Path) -> int:
    with _open_bytes(path) as f:
        return sum(1 for _ in f)


def _encode(record: dict) -> bytes:
    """One output line. A lone surrogate (from a "\\udXXX" escape in the input) is written back as
    that escape, keeping the line valid UTF-8 and JSON."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


class PartialRunError(ValueError):
    """The partial file of an earlier run cannot be continued (locked, damaged, or another run's)."""


def _lock(partial_path: Path):
    """Open (create) the partial file for appending, locked while this run writes it."""
    sink = checkpoint.lock_file(partial_path, "ab")
    if sink is None:
        raise PartialRunError(f"{partial_path} is locked: another prefkernels score is writing this output now; "
                              "wait for it or choose another --output")
    return sink


def run_info(args: argparse.Namespace, input_path: Path) -> dict:
    """What a resumed run must share with the run that wrote the partial file."""
    stat = input_path.stat()
    return {"input": str(input_path.resolve()), "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
            "model": str(Path(args.model).resolve()),
            **{name: getattr(args, name) for name in ("normalize", "max_length", "append_eos", "bf16")}}


def _check_same_run(info_path: Path, info: dict) -> None:
    if not info_path.is_file():
        return  # a partial file from before run info was recorded: nothing to compare
    try:
        recorded = json.loads(info_path.read_text())
        if not isinstance(recorded, dict):
            raise ValueError(f"expected a JSON object, got {type(recorded).__name__}")
    except (ValueError, UnicodeDecodeError) as err:
        raise PartialRunError(f"{info_path}: unreadable ({err}); delete it and the partial file to start over")
    changed = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in info.items() if recorded.get(key) != value]
    if changed:
        raise PartialRunError(f"--resume: the partial run was made with other inputs or options ({'; '.join(changed)}); "
                              "resume with the same ones, or delete the partial file to start over")


def _resume_partial(path: Path, summary: RunSummary) -> int:
    """Count the complete (newline-terminated) rows of a partial file into ``summary``, cut a torn
    last line (a run killed mid-write) and return the number of complete rows."""
    end = 0
    with open(path, "r+b") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                summary.add(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise PartialRunError(f"{path}: line {number} is not a row this command wrote ({type(err).__name__}: "
                                      f"{err}); delete the partial file to start over") from None
            end += len(line)
        f.truncate(end)
    return summary.rows


def _skip_rows(numbered, count: int) -> tuple[int, int]:
    """Consume up to ``count`` (line number, line) rows; return how many there were and the last line number."""
    skipped = number = 0
    for skipped, (number, _) in enumerate(itertools.islice(numbered, count), start=1):
        pass
    return skipped, number


def _finish(partial_path: Path, info_path: Path, output_path: Path) -> None:
    """Move the complete partial file into place by an atomic rename, gzip-compressed (through a
    temporary file) if ``output_path`` ends in .gz, and delete its run info. The info goes just
    before the partial file frees the path for another run (whose info it must not delete); until
    then a stopped run can still be resumed with its options checked."""
    if output_path.suffix != ".gz":
        info_path.unlink(missing_ok=True)
        os.replace(partial_path, output_path)
        return
    tmp_path = output_path.with_name(f".{output_path.name}.tmp")
    try:
        with open(partial_path, "rb") as rows, open(tmp_path, "wb") as raw, \
                gzip.GzipFile(output_path.name, "wb", fileobj=raw) as sink:
            shutil.copyfileobj(rows, sink)
        os.replace(tmp_path, output_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    info_path.unlink(missing_ok=True)
    partial_path.unlink()


def _score_fields(prefix: str, rewards) -> dict:
    """Output fields for one item's rewards [K]."""
    if rewards.numel() == 1:
        return {f"{prefix}score": float(rewards[0])}
    return {f"{prefix}score": float(rewards.mean()), f"{prefix}score_std": float(rewards.std(correction=0)),
            f"{prefix}score_heads": [float(r) for r in rewards]}


def score_chunk(scorer: Scorer, lines: list[tuple[int, bytes]], skip_invalid: bool) -> list[dict]:
    """Output rows for (line number, line) pairs, in order. Raises InvalidRow (message with the
    line number) on the first bad line unless ``skip_invalid``."""
    parsed: list[ParsedRow | InvalidRow] = []
    rendered: list = []
    spans: list[range] = []  # spans[row_index]: the row's indices into rendered (empty if it failed to parse/render)
    first_unparsed = None  # without skip_invalid: the first line that failed to parse, raised after the
    # rows before it are checked for texts without tokens (so the first bad line is the one reported)
    for number, line in lines:
        try:
            row = parse_line(line)
            try:
                row_rendered = [scorer.render(item, where=f"'{name}'") for item, name in zip(row.items, row.fields)]
            except (TypeError, ValueError) as err:
                raise InvalidRow(str(err), row.ids) from None
        except InvalidRow as err:
            row, row_rendered = err, []
        if isinstance(row, InvalidRow) and not skip_invalid:
            first_unparsed = InvalidRow(f"line {number}: {row}")
            break
        parsed.append(row)
        spans.append(range(len(rendered), len(rendered) + len(row_rendered)))
        rendered.extend(row_rendered)
    token_ids, truncated = scorer.encode(rendered)
    for row_index, span in enumerate(spans):
        row = parsed[row_index]
        if not isinstance(row, InvalidRow) and not all(token_ids[i] for i in span):
            error = InvalidRow("no tokens besides special tokens after tokenization (empty or blank text?)", row.ids)
            if not skip_invalid:
                raise InvalidRow(f"line {lines[row_index][0]}: {error}")
            parsed[row_index] = error
    if first_unparsed is not None:
        raise first_unparsed
    kept = [token_ids[i] for row, span in zip(parsed, spans) if not isinstance(row, InvalidRow) for i in span]
    # The valid rows' rewards in row order, consumed as the loop below writes those rows.
    rewards = iter(scorer.score_token_ids(kept) if kept else ())

    out = []
    for (number, _), row, span in zip(lines, parsed, spans):
        if isinstance(row, InvalidRow):
            out.append({**row.ids, "line": number, "error": str(row)})
            continue
        record = dict(row.ids)
        for position in range(len(span)):
            record.update(_score_fields(row.output_prefix(position), next(rewards)))
        record["truncated"] = any(truncated[i] for i in span)
        out.append(record)
    return out


def run_score(args: argparse.Namespace) -> int:
    """Handler of ``prefkernels score``; returns the exit status."""
    from tqdm.auto import tqdm

    input_path, output_path = Path(args.input), Path(args.output)
    partial_path = output_path.with_name(f".{output_path.name}.partial")
    if not input_path.is_file():
        problem = "is a directory, expected a JSONL file" if input_path.is_dir() else "does not exist"
        print(f"error: --input: {input_path} {problem}", file=sys.stderr)
        return 2
    if output_path.is_dir():
        print(f"error: --output: {output_path} is a directory; expected the path of the output file "
              "(.jsonl or .jsonl.gz)", file=sys.stderr)
        return 2
    if output_path.resolve() == input_path.resolve():
        print(f"error: --output: {output_path} is the --input file, which the output would replace; "
              "choose another path", file=sys.stderr)
        return 2
    for option, value in (("--chunk-rows", args.chunk_rows), ("--batch-tokens", args.batch_tokens)):
        if value is not None and value < 1:
            print(f"error: {option}: expected >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: --output: cannot create its folder {output_path.parent} ({err.strerror}: {err.filename})",
              file=sys.stderr)
        return 2
    info_path = partial_path.with_name(partial_path.name + ".json")
    summary = RunSummary()
    try:
        sink = _lock(partial_path)
    except PartialRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with sink:
        try:
            return _score_locked(args, input_path, output_path, partial_path, info_path, sink, summary, tqdm)
        finally:  # an empty partial file that is still this run's (not moved into place by _finish)
            if not os.fstat(sink.fileno()).st_size and checkpoint.is_file_at(partial_path, sink):
                partial_path.unlink()
                info_path.unlink(missing_ok=True)


def _score_locked(args, input_path, output_path, partial_path, info_path, sink, summary, tqdm) -> int:
    """run_score once the partial file is created and locked (``sink``, open for appending)."""
    earlier_rows = os.fstat(sink.fileno()).st_size > 0
    if earlier_rows and not args.resume:
        print(f"error: {partial_path} holds the rows of an unfinished run: pass --resume to continue it, "
              "or delete it to start over", file=sys.stderr)
        return 2
    info = run_info(args, input_path)
    try:
        if earlier_rows:
            _check_same_run(info_path, info)
        done = _resume_partial(partial_path, summary) if earlier_rows else 0
    except PartialRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not done:
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    try:  # the errors name their argument, as Scorer.from_pretrained's (path, normalize) or as the options
        scorer = Scorer.from_pretrained(args.model, device=args.device, max_length=args.max_length,
                                        token_budget=args.batch_tokens, normalize=args.normalize, bf16=args.bf16,
                                        append_eos=args.append_eos)
    except (FileNotFoundError, ValueError) as err:
        message = re.sub(r"^path: ", "--model: ", re.sub(r"^normalize: ", "--normalize: ", str(err)))
        print(f"error: {message}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        with _open_bytes(input_path) as source, \
                tqdm(total=None if args.quiet else _count_lines(input_path), unit="line", desc="score", disable=args.quiet) as bar:
            numbered = ((number, line) for number, line in enumerate(source, start=1) if line.strip())
            skipped, last_number = _skip_rows(numbered, done)
            if skipped < done:
                print(f"error: --resume: {partial_path} holds {done} rows but {input_path} has only {skipped}: "
                      "not the same input?", file=sys.stderr)
                return 2
            if done:
                print(f"resuming after the {done} rows in {partial_path}")
            bar.update(last_number)
            while chunk := list(itertools.islice(numbered, args.chunk_rows)):
                records = score_chunk(scorer, chunk, args.skip_invalid)
                sink.write(b"".join(_encode(record) for record in records))
                sink.flush()
                for record in records:
                    summary.add(record)
                bar.update(chunk[-1][0] - bar.n)
        _finish(partial_path, info_path, output_path)
    except InvalidRow as err:
        kept = f"; the {summary.rows} rows before it are kept in {partial_path} for --resume" if summary.rows else ""
        print(f"error: {input_path}: {err} (use --skip-invalid to write it as an error row and go on){kept}",
              file=sys.stderr)
        return 1
    except GZIP_ERRORS as err:
        kept = f"; the {summary.rows} rows read before it are kept in {partial_path}" if summary.rows else ""
        print(f"error: --input: {input_path} cannot be read as gzip (truncated, or not gzip: {err}){kept}",
              file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"scored {summary.rows} rows in {seconds:.1f} s -> {output_path} ({summary.invalid} invalid, "
          f"{summary.truncated_rows} rows with a text truncated to {scorer.max_length} tokens)")
    for error in summary.errors:
        print(f"  skipped {error}")
    if summary.accuracy is not None:
        print(f"pairwise accuracy: {summary.accuracy:.4f} ({summary.pairs_correct}/{summary.pairs} pairs "
              "with chosen_score > rejected_score)")
    return 0


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``score`` subcommand to an ``argparse`` subparsers object; its handler is
    ``args.handler`` (``run_score``, returns the exit status)."""
    parser = subparsers.add_parser("score", help="score a JSONL file with a reward model",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="prefkernels or HF *ForSequenceClassification checkpoint")
    parser.add_argument("--input", required=True, help="input .jsonl (or .jsonl.gz)")
    parser.add_argument("--output", required=True, help="output .jsonl (or .jsonl.gz), one row per input row")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="write malformed lines as {'line', 'error'} rows instead of stopping")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run from its partial file .<output name>.partial "
                             "(same input, model and options)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help=f"padded tokens per batch (default {CPU_TOKEN_BUDGET} on CPU, "
                             f"{ACCELERATOR_TOKEN_BUDGET} on GPU)")
    parser.add_argument("--bf16", action="store_true", help="run the backbone under bf16 autocast")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="end plain texts with the EOS token (default: as the checkpoint was trained for "
                             "prefkernels checkpoints and exports, off for other HF ones; TRL's RewardTrainer "
                             "appends EOS to plain texts, so pass it for a model trained that way)")
    parser.add_argument("--normalize", action="store_true",
                        help="normalize scores with the checkpoint's stored reward mean/std")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate texts to their last N tokens (default: the checkpoint's)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help="rows read, sorted and scored at a time (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m prefkernels.score_cli --model ... --input ... --output ...``: ``prefkernels score ...``,
    with its error handling."""
    from prefkernels import cli

    return cli.main(["score", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
