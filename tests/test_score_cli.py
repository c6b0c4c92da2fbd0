"""``prefkernels score`` CLI: one output row per input row in order with ids kept, every input
form, streaming in chunks, malformed lines (stop with the line number / --skip-invalid error rows),
atomic output, real data with pairwise accuracy."""
import gzip
import json
import random

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
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
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
}


@pytest.mark.parametrize("bad_line", list(BAD_LINES))
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


def test_skip_invalid_writes_error_rows_and_loses_none(reward_checkpoint, tmp_path, capsys):
    good = [{"id": i, "text": t} for i, t in enumerate(random_texts(6, random.Random(3)))]
    lines = [good[0], "not json", good[1], '{"id": 8, "chosen": "the cat"}', good[2], "", good[3],
             '{"id": 9, "text": 5}', good[4], good[5]]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output", str(output),
                           "--skip-invalid", "--chunk-rows", "3", "--quiet"]) == 0
    out = read_jsonl(output)
    assert len(out) == 9  # every non-blank line
    errors = [r for r in out if "error" in r]
    assert [(r.get("id"), r["line"]) for r in errors] == [(None, 2), (8, 4), (9, 8)]
    assert [r["id"] for r in out if "score" in r] == list(range(6))
    assert "3 invalid" in capsys.readouterr().out


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
    assert "--batch-tokens: expected >= 1" in err and "neither a prefkernels checkpoint" in err


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
