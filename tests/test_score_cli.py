"""``prefkernels score`` CLI: one output row per input row in order with ids kept, every input
form, streaming in chunks, malformed lines (stop with the line number / --skip-invalid error rows),
atomic and gzip output, resume from the partial file, real data with pairwise accuracy."""
import gzip
import json
import os
import random
import shutil
import re

import pytest
import torch

from _rl_fixtures import random_texts, save_reward_checkpoint
from prefkernels import score_cli
from prefkernels.scorer import Scorer


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    return save_reward_checkpoint(tmp_path_factory.mktemp("rm") / "ckpt", max_length=40,
                                  reward_mean=[1.5], reward_std=[3.0])


def write_jsonl(path, rows):
    """Rows are dicts, str lines or raw bytes lines; gzipped if the name ends in .gz."""
    data = b"".join((row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode())
                    + b"\n" for row in rows)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def mixed_rows(n, seed=0):
    """n rows cycling through the four input forms, with id fields."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, c = random_texts(3, rng, max_words=rng.choice([5, 60]))
        form = i % 4
        if form == 0:
            rows.append({"id": i, "text": a, "extra": "dropped"})
        elif form == 1:
            rows.append({"prompt_id": f"p{i}", "prompt": a, "response": " " + b})
        elif form == 2:
            rows.append({"id": i, "messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]})
        else:
            rows.append({"id": i, "pair_id": i * 10, "prompt": a, "chosen": " " + b, "rejected": " " + c})
    return rows


def expected_items(row):
    if "text" in row:
        return [row["text"]]
    if "messages" in row:
        return [row["messages"]]
    if "chosen" in row:
        return [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])]
    return [(row["prompt"], row["response"])]


def test_every_form_scored_in_input_order_with_ids(reward_checkpoint, tmp_path, capsys):
    rows = mixed_rows(30)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output", str(output),
                           "--chunk-rows", "7", "--batch-tokens", "100", "--quiet"]) == 0
    out = read_jsonl(output)
    assert len(out) == len(rows)
    scorer = Scorer.from_pretrained(reward_checkpoint)
    correct = 0
    for row, result in zip(rows, out):
        assert {k: v for k, v in result.items() if k == "id" or k.endswith("_id")} == \
            {k: v for k, v in row.items() if k == "id" or k.endswith("_id")}
        assert "extra" not in result
        expected = scorer.score_detailed(expected_items(row))
        if "chosen" in row:
            got = [result["chosen_score"], result["rejected_score"]]
            correct += got[0] > got[1]
        else:
            got = [result["score"]]
        torch.testing.assert_close(torch.tensor(got), expected.rewards[:, 0], atol=1e-5, rtol=1e-5)
        assert result["truncated"] == bool(expected.truncated.any())
    assert any(r["truncated"] for r in out) and not all(r["truncated"] for r in out)
    printed = capsys.readouterr().out
    assert f"pairwise accuracy: {correct / 7:.4f} ({correct}/7 pairs" in printed
    assert "scored 30 rows" in printed


def test_reads_in_chunks(reward_checkpoint, tmp_path, monkeypatch):
    calls = []
    original = Scorer.score_token_ids

    def spy(self, token_ids, progress=False):
        calls.append(len(token_ids))
        return original(self, token_ids, progress)

    monkeypatch.setattr(Scorer, "score_token_ids", spy)
    rows = [{"id": i, "chosen": t, "rejected": t + " no"} for i, t in enumerate(random_texts(25, random.Random(1)))]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "out.jsonl"), "--chunk-rows", "4", "--quiet"]) == 0
    assert calls == [8] * 6 + [2]  # 4 rows x (chosen, rejected) per chunk
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(25))


BAD_LINES = {
    "not json": "invalid JSON",
    '[1, 2]': "expected a JSON object",
    '{"id": 7, "body": "x"}': "expected a 'text'",
    '{"id": 8, "chosen": "the cat"}': "needs both 'chosen' and 'rejected'",
    '{"id": 9, "text": 5}': "'text': expected a string",
    '{"id": 10, "messages": "hello"}': "'messages': expected a list",
    '{"id": 11, "prompt": "the", "response": 3}': "'prompt/response': expected a text",
    '{"id": ' + "9" * 4301 + ', "text": "x"}': "invalid JSON: Exceeds the limit (4300 digits)",
    "[" * 100_000: "invalid JSON: maximum recursion depth",
    b'{"text": "caf\xe9"}': "invalid UTF-8: invalid continuation byte at byte 14",
    '{"id": 12, "text": "the \\ud83d cat"}': "'text': invalid Unicode: lone surrogate '\\ud83d' at character 4",
    '{"id": 13, "messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": null}]}':
        "message 1: expected a string 'content', got NoneType",
}


@pytest.mark.parametrize("bad_line", list(BAD_LINES), ids=lambda line: str(line[:24]))
def test_malformed_line_stops_with_its_number_and_leaves_no_output(reward_checkpoint, tmp_path, capsys, bad_line):
    rows = [{"id": i, "text": t} for i, t in enumerate(random_texts(5, random.Random(2)))]
    source = write_jsonl(tmp_path / "in.jsonl", rows[:3] + [bad_line] + rows[3:])
    output = tmp_path / "out.jsonl"
    output.write_text("previous results\n")
    status = score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output", str(output),
                             "--quiet"])
    assert status != 0
    err = capsys.readouterr().err
    assert "line 4:" in err and BAD_LINES[bad_line] in err
    assert output.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_a_byte_order_mark_is_skipped(reward_checkpoint, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "text": "the cat"}\n')
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_the_first_bad_line_is_the_one_reported(reward_checkpoint, tmp_path, capsys):
    """A text without tokens (found after tokenizing) before a line that does not parse: the
    error names the earlier line, so fixing lines in the order reported ends in a clean run."""
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "the cat"}, {"id": 2, "text": ""},
                                                 {"id": 3, "txt": "typo"}])
    status = score_cli.main(["--model", str(reward_checkpoint), "--input", str(source),
                             "--output", str(tmp_path / "out.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert status != 0 and "line 2:" in err and "no tokens" in err and "line 3" not in err


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_skip_invalid_writes_error_rows_and_loses_none(reward_checkpoint, tmp_path, capsys, suffix):
    good = [{"id": i, "text": t} for i, t in enumerate(random_texts(6, random.Random(3)))]
    lines = [good[0], "not json", good[1], '{"id": 8, "chosen": "the cat"}', good[2], "", good[3],
             '{"id": 9, "text": 5}', good[4], good[5], '{"id": ' + "9" * 4301 + ', "text": "x"}',
             b'{"id": 12, "text": "caf\xe9"}', '{"id": "\\ud800", "text": 5}', '{"id": "\\udc00", "text": "the cat"}']
    source = write_jsonl(tmp_path / f"in{suffix}", lines)
    output = tmp_path / "out.jsonl"
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output", str(output),
                           "--skip-invalid", "--chunk-rows", "3", "--quiet"]) == 0
    out = read_jsonl(output)
    assert len(out) == 13  # every non-blank line
    errors = [r for r in out if "error" in r]
    assert [(r.get("id"), r["line"]) for r in errors] == [(None, 2), (8, 4), (9, 8), (None, 11), (None, 12),
                                                          ("\ud800", 13)]
    assert "invalid UTF-8" in errors[4]["error"]
    assert [r["id"] for r in out if "score" in r] == list(range(6)) + ["\udc00"]  # lone surrogates written back
    assert "6 invalid" in capsys.readouterr().out


def test_gz_output_is_gzip(reward_checkpoint, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(6))
    base = ["--model", str(reward_checkpoint), "--input", str(source), "--quiet", "--output"]
    assert score_cli.main(base + [str(tmp_path / "out.jsonl")]) == 0
    assert score_cli.main(base + [str(tmp_path / "out.jsonl.gz")]) == 0
    with gzip.open(tmp_path / "out.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == read_jsonl(tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.gz"]


def test_resume_after_interruption_equals_an_unbroken_run(reward_checkpoint, tmp_path, capsys, monkeypatch):
    lines = mixed_rows(14, seed=6)
    lines[5], lines[9] = "not json", '{"id": 9, "text": 5}'
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    base = ["--model", str(reward_checkpoint), "--input", str(source), "--skip-invalid", "--chunk-rows", "4", "--quiet"]
    assert score_cli.main(base + ["--output", str(tmp_path / "unbroken.jsonl.gz")]) == 0
    unbroken_summary = capsys.readouterr().out.splitlines()

    original, calls = score_cli.score_chunk, []

    def killed_at_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(*args)

    monkeypatch.setattr(score_cli, "score_chunk", killed_at_third_chunk)
    output = tmp_path / "out.jsonl.gz"
    with pytest.raises(RuntimeError, match="killed"):
        score_cli.main(base + ["--output", str(output)])
    monkeypatch.undo()
    partial = tmp_path / ".out.jsonl.gz.partial"
    assert not output.exists() and len(read_jsonl(partial)) == 8  # two chunks, plain JSONL
    with partial.open("a") as f:
        f.write('{"id": 8, "sco')  # a row torn by the kill

    assert score_cli.main(base + ["--output", str(output)]) == 2  # no --resume: refuses, keeps the rows
    assert "pass --resume to continue it, or delete it" in capsys.readouterr().err
    short = write_jsonl(tmp_path / "short.jsonl", lines[:5])
    assert score_cli.main(base + ["--output", str(output), "--resume", "--input", str(short)]) == 2
    assert re.search(r"--resume: the partial run was made with other inputs or options \(input '.*in\.jsonl' -> "
                     r"'.*short\.jsonl'; input_bytes", capsys.readouterr().err)
    assert score_cli.main(base + ["--output", str(output), "--resume", "--normalize"]) == 2
    assert "(normalize False -> True)" in capsys.readouterr().err
    info = tmp_path / ".out.jsonl.gz.partial.json"
    recorded = info.read_text()
    info.unlink()  # a partial file without run info (an older version's): only the row count is checked
    assert score_cli.main(base + ["--output", str(output), "--resume", "--input", str(short)]) == 2
    assert "holds 8 rows but" in capsys.readouterr().err
    info.write_text(recorded)

    assert score_cli.main(base + ["--output", str(output), "--resume"]) == 0
    with gzip.open(output, "rt") as resumed, gzip.open(tmp_path / "unbroken.jsonl.gz", "rt") as unbroken:
        assert [json.loads(line) for line in resumed] == [json.loads(line) for line in unbroken]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"resuming after the 8 rows in {partial}"
    scored = re.compile(r"in [0-9.]+ s -> \S+")  # the counters, recounted over the kept rows, are equal
    assert [scored.sub("", line) for line in printed[1:]] == [scored.sub("", line) for line in unbroken_summary]
    assert "2 invalid" in printed[1] and "pairwise accuracy" in printed[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl.gz", "short.jsonl",
                                                          "unbroken.jsonl.gz"]


@pytest.mark.parametrize("append_eos", [True, False])
def test_append_eos_option_reaches_the_scorer(reward_checkpoint, tmp_path, append_eos):
    """--append-eos / --no-append-eos score plain texts as Scorer(append_eos=...) does (e.g. an HF
    model trained with TRL's RewardTrainer, which appends EOS, needs --append-eos)."""
    texts = random_texts(4, random.Random(7))
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    flag = "--append-eos" if append_eos else "--no-append-eos"
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--quiet",
                           "--output", str(tmp_path / "out.jsonl"), flag]) == 0
    got = torch.tensor([row["score"] for row in read_jsonl(tmp_path / "out.jsonl")])
    want = Scorer.from_pretrained(reward_checkpoint, append_eos=append_eos).score(texts)
    other = Scorer.from_pretrained(reward_checkpoint, append_eos=not append_eos).score(texts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, other, rtol=1e-5, atol=1e-5)


def test_normalize_and_bad_options(reward_checkpoint, tmp_path, capsys):
    rows = [{"id": i, "text": t} for i, t in enumerate(random_texts(5, random.Random(4)))]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    base = ["--model", str(reward_checkpoint), "--input", str(source), "--quiet"]
    assert score_cli.main(base + ["--output", str(tmp_path / "raw.jsonl")]) == 0
    assert score_cli.main(base + ["--output", str(tmp_path / "norm.jsonl"), "--normalize"]) == 0
    raw = torch.tensor([r["score"] for r in read_jsonl(tmp_path / "raw.jsonl")])
    norm = torch.tensor([r["score"] for r in read_jsonl(tmp_path / "norm.jsonl")])
    torch.testing.assert_close(norm, (raw - 1.5) / 3.0)
    assert score_cli.main(base + ["--output", str(tmp_path / "x.jsonl"), "--batch-tokens", "0"]) == 2
    not_a_model = ["--model", str(tmp_path), "--input", str(source), "--output", str(tmp_path / "y.jsonl")]
    assert score_cli.main(not_a_model) == 2
    err = capsys.readouterr().err
    assert "--batch-tokens: expected >= 1" in err and f"--model: {tmp_path} is neither a prefkernels checkpoint" in err
    tokenizer_gone = tmp_path / "no-tokenizer"
    shutil.copytree(reward_checkpoint, tokenizer_gone, ignore=shutil.ignore_patterns("tokenizer"))
    assert score_cli.main(["--model", str(tokenizer_gone), "--input", str(source), "--output",
                           str(tmp_path / "z.jsonl")]) == 2
    assert f"error: tokenizer: checkpoint {tokenizer_gone} has no tokenizer/ directory" in capsys.readouterr().err


def test_output_that_would_replace_the_input_or_a_directory_is_refused_up_front(reward_checkpoint, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "text": "the cat sat"}])
    before = source.read_bytes()
    (tmp_path / "out").mkdir()
    base = ["--model", str(reward_checkpoint), "--input", str(source), "--quiet"]
    assert score_cli.main(base + ["--output", str(tmp_path / "out")]) == 2
    assert score_cli.main(base + ["--output", str(tmp_path / "." / "in.jsonl")]) == 2
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(tmp_path / "out"),
                           "--output", str(tmp_path / "x.jsonl")]) == 2
    assert score_cli.main(base + ["--output", str(source / "out.jsonl")]) == 2  # its folder would be a file
    err = capsys.readouterr().err
    assert f"--output: cannot create its folder {source} (File exists: {source})" in err
    assert f"--output: {tmp_path / 'out'} is a directory" in err and "in.jsonl is the --input file" in err
    assert f"--input: {tmp_path / 'out'} is a directory, expected a JSONL file" in err
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"] and not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("option, message", [
    (["--max-length", "4096"], "max_length: 4096 exceeds the backbone's 128 positions"),
    (["--max-length", "0"], "max_length: expected >= 1 or None, got 0"),
    (["--device", "gpu0"], "device: 'gpu0' is not a torch device"),
])
def test_bad_max_length_or_device_is_one_clear_line(reward_checkpoint, tmp_path, capsys, option, message):
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "text": "the cat sat"}])
    code = score_cli.main(["--model", str(reward_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "out.jsonl"), "--quiet", *option])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_broken_gzip_input_is_one_clear_line(reward_checkpoint, tmp_path, capsys, quiet):
    rows = [{"id": i, "text": t} for i, t in enumerate(random_texts(400, random.Random(5), min_words=10))]
    whole = gzip.compress(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    write_jsonl(tmp_path / "plain.jsonl", rows[:3]).rename(tmp_path / "plain.jsonl.gz")
    for name in ("cut.jsonl.gz", "plain.jsonl.gz"):
        code = score_cli.main(["--model", str(reward_checkpoint), "--input", str(tmp_path / name),
                               "--output", str(tmp_path / "out.jsonl"), *quiet])
        err = capsys.readouterr().err
        assert code == 1 and f"--input: {tmp_path / name} cannot be read as gzip (truncated, or not gzip" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_ensemble_rows_carry_mean_std_and_heads(tmp_path):
    checkpoint = save_reward_checkpoint(tmp_path / "rm3", num_heads=3)
    rows = [{"id": i, "text": t} for i, t in enumerate(random_texts(4, random.Random(5)))]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    assert score_cli.main(["--model", str(checkpoint), "--input", str(source), "--output",
                           str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    heads = Scorer.from_pretrained(checkpoint).score([r["text"] for r in rows])
    for result, expected in zip(read_jsonl(tmp_path / "out.jsonl"), heads):
        torch.testing.assert_close(torch.tensor(result["score_heads"]), expected, atol=1e-5, rtol=1e-5)
        assert result["score"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert result["score_std"] == pytest.approx(float(expected.std(correction=0)), abs=1e-5)


def test_real_preference_pairs_gz(reward_checkpoint, tmp_path, capsys, hh_harmless):
    with gzip.open(hh_harmless / "valid.jsonl.gz", "rt") as f:
        pairs = [json.loads(next(f)) for _ in range(12)]
    source = tmp_path / "in.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.writelines(json.dumps({"pair_id": i, **p}) + "\n" for i, p in enumerate(pairs))
    output = tmp_path / "out.jsonl"
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output", str(output),
                           "--quiet"]) == 0
    out = read_jsonl(output)
    assert [r["pair_id"] for r in out] == list(range(12))
    assert sum(r["truncated"] for r in out) >= 1  # real dialogues exceed the 40-token limit
    scorer = Scorer.from_pretrained(reward_checkpoint)
    expected = scorer.score([p["chosen"] for p in pairs])
    torch.testing.assert_close(torch.tensor([r["chosen_score"] for r in out]), expected, atol=1e-5, rtol=1e-5)
    correct = sum(r["chosen_score"] > r["rejected_score"] for r in out)
    assert f"pairwise accuracy: {correct / 12:.4f} ({correct}/12 pairs" in capsys.readouterr().out


def test_a_second_run_on_the_same_output_refuses_while_the_first_writes(reward_checkpoint, tmp_path, capsys):
    """The partial file is locked by the run writing it (here: this test holds the lock)."""
    import fcntl

    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(4))
    partial = tmp_path / ".out.jsonl.partial"
    with open(partial, "ab") as running:
        running.write(b'{"id": 0, "score": 1.0, "truncated": false}\n')
        running.flush()
        fcntl.flock(running, fcntl.LOCK_EX)
        for extra in ([], ["--resume"]):
            assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output",
                                   str(tmp_path / "out.jsonl"), "--quiet", *extra]) == 2
            assert "is locked: another prefkernels score is writing this output now" in capsys.readouterr().err
    assert partial.read_bytes() == b'{"id": 0, "score": 1.0, "truncated": false}\n'  # untouched
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("line", ['{"id": 5, "score": 1.0}', "[1, 2]", "garbage"])
def test_a_damaged_partial_file_is_one_clear_line(reward_checkpoint, tmp_path, capsys, line):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(4))
    partial = tmp_path / ".out.jsonl.partial"
    partial.write_text('{"id": 0, "score": 1.0, "truncated": false}\n' + line + "\n")
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output",
                           str(tmp_path / "out.jsonl"), "--quiet", "--resume"]) == 2
    assert re.fullmatch(rf"error: {re.escape(str(partial))}: line 2 is not a row this command wrote \(\w+: .*\); "
                        r"delete the partial file to start over\n", capsys.readouterr().err)


def test_resume_may_add_skip_invalid_after_a_stop_at_an_invalid_line(reward_checkpoint, tmp_path, capsys):
    """The stop message suggests --skip-invalid and keeps the rows for --resume: both together work."""
    lines = mixed_rows(6, seed=3)
    lines[4] = '{"id": 4}'
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    base = ["--model", str(reward_checkpoint), "--input", str(source), "--output", str(tmp_path / "out.jsonl"),
            "--chunk-rows", "2", "--quiet"]
    assert score_cli.main(base) == 1
    assert "use --skip-invalid" in capsys.readouterr().err
    assert score_cli.main(base + ["--resume", "--skip-invalid"]) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 6 and "error" in rows[4] and "score" in rows[5]


def test_lock_file_follows_a_file_its_holder_renamed(tmp_path):
    from prefkernels.checkpoint import lock_file

    path = tmp_path / ".out.partial"
    holder = lock_file(path, "ab")
    assert holder is not None and lock_file(path, "ab") is None  # held
    path.rename(tmp_path / "out")  # as a finishing run moves its partial file into place, still locked
    newcomer = lock_file(path, "ab")  # locks the new file at the path, not the renamed one
    assert newcomer is not None and os.fstat(newcomer.fileno()).st_ino == path.stat().st_ino
    holder.close()
    newcomer.close()


def test_a_run_killed_while_compressing_its_output_resumes_with_its_options_checked(reward_checkpoint, tmp_path,
                                                                                     capsys, monkeypatch):
    """Killed while gzip writes the output (every row already scored): the partial file and its run
    info are both kept, so a --resume with other options is refused and one with the same options
    writes the output an unbroken run writes."""
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(6, seed=8))
    base = ["--model", str(reward_checkpoint), "--input", str(source), "--quiet"]
    assert score_cli.main(base + ["--output", str(tmp_path / "unbroken.jsonl.gz")]) == 0

    def killed(rows, sink):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_cli.shutil, "copyfileobj", killed)
    output = tmp_path / "out.jsonl.gz"
    assert score_cli.main(base + ["--output", str(output)]) == 130  # "prefkernels score: interrupted"
    monkeypatch.undo()
    assert not output.exists() and len(read_jsonl(tmp_path / ".out.jsonl.gz.partial")) == 6
    assert (tmp_path / ".out.jsonl.gz.partial.json").is_file()
    capsys.readouterr()
    assert score_cli.main(base + ["--output", str(output), "--resume", "--normalize"]) == 2
    assert "(normalize False -> True)" in capsys.readouterr().err
    assert score_cli.main(base + ["--output", str(output), "--resume"]) == 0
    with gzip.open(output, "rt") as resumed, gzip.open(tmp_path / "unbroken.jsonl.gz", "rt") as unbroken:
        assert resumed.read() == unbroken.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl.gz", "unbroken.jsonl.gz"]


@pytest.mark.parametrize("rows", ["some", "none"])
def test_a_finishing_run_leaves_the_files_of_a_run_that_starts_right_after(reward_checkpoint, tmp_path, monkeypatch,
                                                                         rows):
    """Once A has moved its partial file into place, B may lock a new one at the path: A's cleanup
    must not touch B's partial file or run info."""
    from prefkernels.checkpoint import lock_file

    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(3) if rows == "some" else ["", "  "])
    partial, info = tmp_path / ".out.jsonl.partial", tmp_path / ".out.jsonl.partial.json"
    original, started = score_cli._finish, []

    def finish_then_b_starts(partial_path, info_path, output_path):
        original(partial_path, info_path, output_path)
        started.append(lock_file(partial, "ab"))  # B: locks the fresh file at the path
        info.write_text("{}")

    monkeypatch.setattr(score_cli, "_finish", finish_then_b_starts)
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output",
                           str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    assert started[0] is not None and partial.exists() and info.exists()  # B's, untouched
    started[0].close()


@pytest.mark.parametrize("recorded", ["[1, 2]", "{not json"])
def test_an_unreadable_run_info_file_is_one_clear_line(reward_checkpoint, tmp_path, capsys, recorded):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(4))
    (tmp_path / ".out.jsonl.partial").write_text('{"id": 0, "score": 1.0, "truncated": false}\n')
    (tmp_path / ".out.jsonl.partial.json").write_text(recorded)
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output",
                           str(tmp_path / "out.jsonl"), "--quiet", "--resume"]) == 2
    assert re.fullmatch(r"error: \S+\.out\.jsonl\.partial\.json: unreadable \(.+\); delete it and the partial file "
                        r"to start over\n", capsys.readouterr().err)
