"""prefkernels export --hf: a standard AutoModelForSequenceClassification with equal scores."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from prefkernels import cli, tiny
from prefkernels.export import ExportError, export_hf, max_score_difference
from prefkernels.model import RewardModel

TEXTS = ["the helpful answer is here", "no", "a longer reply with several more words in it than the others"]


def checkpoint(tmp_path, tokenizer=None, bias=0.0, backbone=None):
    tokenizer = tokenizer or tiny.build_tiny_tokenizer(words=" ".join(TEXTS).split())
    torch.manual_seed(0)
    backbone = backbone or tiny.build_tiny_llama(tokenizer, hidden_size=32, layers=2, heads=4)
    model = RewardModel(backbone, num_heads=2)
    with torch.no_grad():
        model.head.bias.fill_(bias)
    path = tmp_path / "ckpt"
    model.save_pretrained(str(path), tokenizer=tokenizer)
    return path, model, tokenizer


def test_export_matches_prefkernels_scores(tmp_path):
    path, model, tokenizer = checkpoint(tmp_path)
    diff = export_hf(str(path), str(tmp_path / "hf"))
    assert diff < 1e-4
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 2 and type(hf).__name__ == "LlamaForSequenceClassification"
    assert max_score_difference(model, hf, tokenizer, TEXTS) < 1e-4
    tokenizer.padding_side = "left"
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        left = hf(**batch).logits
        ours = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(left, ours, rtol=1e-4, atol=1e-4)


def test_export_refuses_nonzero_bias_unless_allowed(tmp_path):
    path, _, _ = checkpoint(tmp_path, bias=0.5)
    with pytest.raises(ExportError, match="bias"):
        export_hf(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert export_hf(str(path), str(tmp_path / "hf"), allow_bias_drop=True) < 1e-4


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
    assert "max score difference" in capsys.readouterr().out
    assert cli.main(["export", str(path), "--hf", str(tmp_path / "hf")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing"), "--hf", str(tmp_path / "hf2")]) == 1
    assert "not a directory" in capsys.readouterr().err
