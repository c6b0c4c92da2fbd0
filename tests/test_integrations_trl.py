"""FusedRewardTrainer: same loss, gradients and logged metrics as TRL's stock RewardTrainer."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,  # noqa: E402
                          GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification)
from trl import RewardConfig, RewardTrainer  # noqa: E402

import prefkernels.integrations.trl as fused_trl  # noqa: E402
from prefkernels.integrations import FusedRewardTrainer, fuse_sequence_classification  # noqa: E402

N_WORDS = 60
VOCAB = N_WORDS + 2  # "<pad>" = 0, "<eos>" = 1, then w0 .. w59
DECODER_LAYOUT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama": lambda: LlamaForSequenceClassification(LlamaConfig(**DECODER_LAYOUT, num_labels=1)),
    "qwen2": lambda: Qwen2ForSequenceClassification(Qwen2Config(**DECODER_LAYOUT, num_labels=1)),
    "gpt2": lambda: GPT2ForSequenceClassification(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1, bos_token_id=1,
        eos_token_id=1)),
    "bert": lambda: BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_labels=1)),
}
METRICS = ("loss", "grad_norm", "num_tokens", "min_reward", "mean_reward", "max_reward", "accuracy", "margin")


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path, monkeypatch):
    """Trainer creates its output_dir; keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


def make_tokenizer(with_pad=True):
    """Word-level tokenizer over "w0".."w59"; without a pad token TRL pads with EOS (pad == eos)."""
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(N_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    if with_pad:
        tokenizer.pad_token = "<pad>"
    return tokenizer


def make_model(arch):
    torch.manual_seed(0)
    return MODELS[arch]()


def token_dataset(n_pairs=16, with_margin=False, seed=0):
    """Pre-tokenized pairs of random length (tokens never pad or eos); optional random margins."""
    g = torch.Generator().manual_seed(seed)

    def sequence():
        length = int(torch.randint(2, 14, (1,), generator=g))
        return torch.randint(2, VOCAB, (length,), generator=g).tolist()

    chosen, rejected = [sequence() for _ in range(n_pairs)], [sequence() for _ in range(n_pairs)]
    # both spellings: TRL renamed chosen_input_ids to chosen_ids (PR #5179); older versions read the former
    columns = {"chosen_ids": chosen, "rejected_ids": rejected, "chosen_input_ids": chosen,
               "rejected_input_ids": rejected}
    if with_margin:
        columns["margin"] = (torch.rand(n_pairs, generator=g) * 2).tolist()
    return Dataset.from_dict(columns)


def text_dataset(n_pairs=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def text():
        length = int(torch.randint(2, 10, (1,), generator=g))
        return " ".join(f"w{i}" for i in torch.randint(0, N_WORDS, (length,), generator=g).tolist())

    return Dataset.from_dict({"chosen": [text() for _ in range(n_pairs)], "rejected": [text() for _ in range(n_pairs)]})


def make_trainer(trainer_class, model, dataset, tokenizer=None, eval_dataset=None, **config):
    args = RewardConfig(output_dir="unused", report_to=[], save_strategy="no", use_cpu=True, seed=0,
                        per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1,
                        dataloader_num_workers=0, **{"bf16": False, **config})
    return trainer_class(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer or make_tokenizer())


def loss_grads_metrics(trainer, batch, wrapped_model=None):
    """One train-mode compute_loss + backward: (loss, parameter grads, recorded metrics)."""
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(wrapped_model or trainer.model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same_step(stock, fused, atol=1e-6):
    (stock_loss, stock_grads, stock_metrics), (fused_loss, fused_grads, fused_metrics) = stock, fused
    torch.testing.assert_close(fused_loss, stock_loss, atol=atol, rtol=1e-5)
    assert fused_grads.keys() == stock_grads.keys()
    assert any(name.startswith(("score.", "classifier.")) for name in fused_grads), "the head must get gradients"
    for name in stock_grads:
        torch.testing.assert_close(fused_grads[name], stock_grads[name], atol=atol, rtol=1e-4, msg=name)
    assert fused_metrics.keys() == stock_metrics.keys()
    for key in stock_metrics:
        assert fused_metrics[key] == pytest.approx(stock_metrics[key], abs=atol * 10), key


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the FusedRewardTrainer's calls of fused_bt_loss."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return fused_bt_loss(*args, **kwargs)

    fused_bt_loss = fused_trl.fused_bt_loss
    monkeypatch.setattr(fused_trl, "fused_bt_loss", counting)
    return calls


@pytest.mark.parametrize("arch,with_margin,center", [
    ("llama", False, None), ("llama", True, None), ("llama", False, 0.05), ("llama", True, 0.05),
    ("qwen2", True, 0.05), ("gpt2", True, 0.05)])
def test_loss_grads_and_metrics_match_stock(arch, with_margin, center, fused_calls):
    dataset = token_dataset(with_margin=with_margin)
    model = make_model(arch)
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset, center_rewards_coefficient=center)
    fused = make_trainer(FusedRewardTrainer, model, dataset, center_rewards_coefficient=center)
    batch = stock.data_collator([dataset[i] for i in range(8)])
    assert ("margin" in batch) == with_margin
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"

    assert_same_step(loss_grads_metrics(stock, batch), loss_grads_metrics(fused, batch))
    assert len(fused_calls) == 1 and fused_calls[0]["center_coef"] == (center or 0.0)
    assert (fused_calls[0]["margin"] is not None) == with_margin


def test_left_padded_batch_matches_stock(fused_calls):
    """Pooling comes from the model's own last-non-pad logic, so left padding works as in stock."""
    dataset = token_dataset()
    model = make_model("llama")
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset)
    fused = make_trainer(FusedRewardTrainer, model, dataset)
    right = stock.data_collator([dataset[i] for i in range(8)])
    lengths = right["attention_mask"].sum(1)
    shift = right["attention_mask"].shape[1] - lengths
    left = {key: torch.stack([row.roll(int(s)) for row, s in zip(right[key], shift)]) for key in right}
    assert (left["attention_mask"][:, -1] == 1).all() and (left["attention_mask"][:, 0] == 0).any()

    stock_step = loss_grads_metrics(stock, left)
    assert_same_step(stock_step, loss_grads_metrics(fused, left))
    torch.testing.assert_close(stock_step[0], loss_grads_metrics(stock, right)[0], atol=1e-5, rtol=1e-5)
    assert len(fused_calls) == 1


def test_text_dataset_with_pad_equal_to_eos_matches_stock(fused_calls):
    """No pad token: TRL pads with EOS and appends EOS to every text, so the model pools the last
    token before the EOS; the fused loss must pool the same one."""
    dataset = text_dataset()
    model = make_model("llama")
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset, tokenizer=make_tokenizer(with_pad=False))
    fused = make_trainer(FusedRewardTrainer, model, dataset, tokenizer=make_tokenizer(with_pad=False))
    assert fused.model.config.pad_token_id == fused.processing_class.eos_token_id == 1
    batch = stock.data_collator([stock.train_dataset[i] for i in range(8)])
    assert (batch["input_ids"][batch["attention_mask"].bool()] == 1).sum() >= 8, "every text ends in EOS"

    assert_same_step(loss_grads_metrics(stock, batch), loss_grads_metrics(fused, batch))
    assert len(fused_calls) == 1


@pytest.mark.parametrize("bf16", [False, True])
def test_training_run_logs_match_stock(bf16, fused_calls):
    """Same seed, 4 steps with evaluation: the logged train and eval metrics match stock. With bf16
    (CPU autocast) stock rounds its rewards to bf16 while the fused head stays fp32, hence the
    looser tolerance."""
    dataset, eval_dataset = token_dataset(n_pairs=16, with_margin=True), token_dataset(n_pairs=8, seed=1)
    model = make_model("llama")
    histories = []
    for trainer_class, trainer_model in ((RewardTrainer, copy.deepcopy(model)), (FusedRewardTrainer, model)):
        trainer = make_trainer(trainer_class, trainer_model, dataset, eval_dataset=eval_dataset, max_steps=4,
                               eval_strategy="steps", eval_steps=2, center_rewards_coefficient=0.01, bf16=bf16,
                               learning_rate=1e-3)
        trainer.train()
        histories.append(trainer.state.log_history)
    stock_history, fused_history = histories
    tolerance = 3e-2 if bf16 else 1e-4
    train_logs = [(s, f) for s, f in zip(stock_history, fused_history) if "loss" in s]
    eval_logs = [(s, f) for s, f in zip(stock_history, fused_history) if "eval_loss" in s]
    assert len(train_logs) == 4 and len(eval_logs) == 2
    assert len(fused_calls) == 4 + 2 * 2  # 4 train steps, 2 evaluations of 2 batches
    for stock_log, fused_log in train_logs:
        assert stock_log.keys() == fused_log.keys()
        for key in METRICS:
            assert fused_log[key] == pytest.approx(stock_log[key], abs=tolerance, rel=tolerance), key
    for stock_log, fused_log in eval_logs:
        assert stock_log.keys() == fused_log.keys()
        for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward", "eval_min_reward"):
            assert fused_log[key] == pytest.approx(stock_log[key], abs=tolerance, rel=tolerance), key
    assert fused_history[-1]["train_loss"] == pytest.approx(stock_history[-1]["train_loss"], abs=tolerance)


@pytest.mark.parametrize("find_unused_parameters", [True, False])
def test_ddp_wrapped_model_matches_stock(find_unused_parameters, tmp_path, fused_calls):
    """Through DDP (Trainer's default find_unused_parameters=True traverses the forward's outputs) the
    loss must be computed inside the forward, or the score head is marked ready twice."""
    dataset = token_dataset(with_margin=True)
    model = make_model("llama")
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset, center_rewards_coefficient=0.05)
    fused = make_trainer(FusedRewardTrainer, model, dataset, center_rewards_coefficient=0.05)
    batch = stock.data_collator([dataset[i] for i in range(8)])
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        steps = []
        for trainer in (stock, fused):
            ddp_model = DistributedDataParallel(trainer.model, find_unused_parameters=find_unused_parameters)
            for _ in range(2):  # the reducer fails on the second step if it lost track of a parameter
                step = loss_grads_metrics(trainer, batch, wrapped_model=ddp_model)
            steps.append(step)
    finally:
        torch.distributed.destroy_process_group()
    assert_same_step(*steps)
    assert len(fused_calls) == 2


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="transformers compiles its models only on torch >= 2.7 (it calls torch.compiler.is_exporting)")
def test_torch_compile_uses_the_fused_loss(fused_calls):
    """With torch_compile=True the trainer holds a compiled wrapper; the fused loss must still be used
    (not the stock fallback for an "unsupported" OptimizedModule), with the stock logs."""
    dataset = token_dataset(n_pairs=8, with_margin=True)
    model = make_model("llama")
    histories = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for trainer_class, trainer_model, compile_options in (
                (RewardTrainer, copy.deepcopy(model), {}),
                (FusedRewardTrainer, model, {"torch_compile": True, "torch_compile_backend": "eager"})):
            trainer = make_trainer(trainer_class, trainer_model, dataset, max_steps=2, learning_rate=1e-3,
                                   **compile_options)
            trainer.train()
            histories.append([log for log in trainer.state.log_history if "loss" in log])
    assert len(fused_calls) == 2
    for stock_log, fused_log in zip(*histories):
        for key in METRICS:
            assert fused_log[key] == pytest.approx(stock_log[key], abs=1e-4, rel=1e-4), key


@pytest.mark.parametrize("coefficient", [-0.01, float("nan")])
def test_invalid_center_rewards_coefficient_is_named(coefficient):
    with pytest.raises(ValueError, match="center_rewards_coefficient: expected None or a finite float >= 0"):
        make_trainer(FusedRewardTrainer, make_model("llama"), token_dataset(), center_rewards_coefficient=coefficient)


def test_predict_returns_stock_rewards():
    dataset = token_dataset(n_pairs=8)
    model = make_model("qwen2")
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset)
    fused = make_trainer(FusedRewardTrainer, model, dataset)
    stock_prediction, fused_prediction = stock.predict(dataset), fused.predict(dataset)
    assert fused_prediction.predictions.shape == stock_prediction.predictions.shape == (16, 1)
    torch.testing.assert_close(torch.as_tensor(fused_prediction.predictions),
                               torch.as_tensor(stock_prediction.predictions), atol=1e-6, rtol=1e-5)
    assert fused_prediction.metrics["test_loss"] == pytest.approx(stock_prediction.metrics["test_loss"], abs=1e-6)


@pytest.mark.parametrize("arch, data_parallel, reason", [
    ("bert", False, "BertForSequenceClassification pools its [CLS] vector itself"),
    # HF Trainer on several GPUs without torchrun: replicas made per call would share a fused forward
    ("llama", True, "nn.DataParallel"),
])
def test_unsupported_setups_fall_back_to_stock_with_one_warning(fused_calls, arch, data_parallel, reason):
    dataset = token_dataset(with_margin=True)
    model = make_model(arch)
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset)
    fused = make_trainer(FusedRewardTrainer, model, dataset)
    wrapped = torch.nn.DataParallel(fused.model) if data_parallel else None
    batch = stock.data_collator([dataset[i] for i in range(8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_step = loss_grads_metrics(fused, batch, wrapped_model=wrapped)
        loss_grads_metrics(fused, batch, wrapped_model=wrapped)
    fallback = [w for w in caught if "FusedRewardTrainer" in str(w.message)]
    assert len(fallback) == 1 and reason in str(fallback[0].message)
    assert fused_calls == []
    assert_same_step(loss_grads_metrics(stock, batch), fused_step)


def test_model_fused_by_hf_integration_uses_stock_loss_without_warning(fused_calls):
    dataset = token_dataset()
    model = make_model("llama")
    stock = make_trainer(RewardTrainer, copy.deepcopy(model), dataset)
    fused = make_trainer(FusedRewardTrainer, fuse_sequence_classification(model), dataset)
    batch = stock.data_collator([dataset[i] for i in range(8)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fused_step = loss_grads_metrics(fused, batch)
    assert fused_calls == []
    assert_same_step(loss_grads_metrics(stock, batch), fused_step)


def test_importing_prefkernels_does_not_import_trl():
    code = ("import sys, prefkernels, prefkernels.integrations, prefkernels.integrations.hf; "
            "assert 'trl' not in sys.modules, 'trl imported'; "
            "from prefkernels.integrations import FusedRewardTrainer; assert 'trl' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
