"""fuse_sequence_classification / unfuse: same logits, loss and gradients as the stock HF classifiers."""
import copy
import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                          MistralForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification,
                          RobertaConfig, RobertaForSequenceClassification)

from prefkernels.integrations import fuse_sequence_classification, unfuse
from prefkernels.integrations.hf import _generic_classifier_class, has_score_head, is_fused

VOCAB, PAD, EOS = 64, 0, 2
DECODER_LAYOUT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
DECODERS = {
    "llama": lambda **kw: LlamaForSequenceClassification(LlamaConfig(**DECODER_LAYOUT, **kw)),
    "qwen2": lambda **kw: Qwen2ForSequenceClassification(Qwen2Config(**DECODER_LAYOUT, **kw)),
    "mistral": lambda **kw: MistralForSequenceClassification(MistralConfig(**DECODER_LAYOUT, **kw)),
    "gpt2": lambda **kw: GPT2ForSequenceClassification(GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **kw)),
}


def make_decoder(arch, num_labels, pad_token_id):
    torch.manual_seed(0)
    return DECODERS[arch](num_labels=num_labels, pad_token_id=pad_token_id, bos_token_id=EOS, eos_token_id=EOS)


def make_batch(padding, n_rows=6, n_tokens=11, seed=1):
    """input_ids [N, T] of random tokens (never PAD or EOS) with random lengths, and the attention mask.

    ``padding``: "right", "left", or "pad_eq_eos" (right padding with pad == eos, every row ending in
    one EOS, one row also holding an EOS mid-sequence).
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n_rows, n_tokens), generator=g)
    lengths = torch.randint(2, n_tokens + 1, (n_rows,), generator=g)
    lengths[0] = n_tokens
    positions = torch.arange(n_tokens)
    if padding == "left":
        attention_mask = (positions >= n_tokens - lengths[:, None]).long()
    else:
        attention_mask = (positions < lengths[:, None]).long()
    pad_id = EOS if padding == "pad_eq_eos" else PAD
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    if padding == "pad_eq_eos":
        input_ids[torch.arange(n_rows), lengths - 1] = EOS
        input_ids[0, 1] = EOS
    return input_ids, attention_mask, pad_id


def random_labels(num_labels, n_rows, seed=2):
    g = torch.Generator().manual_seed(seed)
    if num_labels == 1:
        return torch.randn(n_rows, generator=g)
    return torch.randint(0, num_labels, (n_rows,), generator=g)


def head_input_dims(module):
    """Input dims of every call of ``module`` that computed a head output (floating point); the
    fused head's capture call, which returns int64 positions, is not counted."""
    dims = []
    module.register_forward_hook(lambda mod, args, out: dims.append(args[0].dim()) if out.is_floating_point() else None)
    return dims


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,padding,num_labels", [
    *[(arch, padding, 1) for arch in sorted(DECODERS) for padding in ("right", "left", "pad_eq_eos")],
    *[(arch, "left", 3) for arch in sorted(DECODERS)]])
def test_fused_decoder_matches_stock(arch, padding, num_labels):
    input_ids, attention_mask, pad_id = make_batch(padding)
    stock = make_decoder(arch, num_labels, pad_id)
    fused = fuse_sequence_classification(copy.deepcopy(stock))
    assert is_fused(fused) and not is_fused(stock)
    fused_head_dims = head_input_dims(fused.score)
    labels = random_labels(num_labels, input_ids.shape[0])
    seed_grad = torch.randn(input_ids.shape[0], num_labels, generator=torch.Generator().manual_seed(3))

    results = []
    for model in (stock, fused):
        model.train()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        (out.loss + (out.logits * seed_grad).sum()).backward()
        results.append((out.logits.detach(), out.loss.detach(), grads_of(model)))

    (stock_logits, stock_loss, stock_grads), (fused_logits, fused_loss, fused_grads) = results
    assert fused_head_dims == [2], "the fused score head must run on pooled rows [N, D] only"
    assert fused_logits.shape == (input_ids.shape[0], num_labels)
    torch.testing.assert_close(fused_logits, stock_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_loss, stock_loss, atol=1e-6, rtol=1e-5)
    assert stock_grads.keys() == fused_grads.keys() and "score.weight" in fused_grads
    for name in stock_grads:
        torch.testing.assert_close(fused_grads[name], stock_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.49"),
                    reason="before transformers 4.49 (PR #35911) decoders pooled the token before the first pad")
def test_pad_eq_eos_pools_last_non_eos_token():
    """With pad == eos, transformers >= 4.49 pools the last token that is not EOS; fusion keeps that choice."""
    input_ids, attention_mask, pad_id = make_batch("pad_eq_eos")
    model = fuse_sequence_classification(make_decoder("llama", 1, pad_id)).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last_non_eos = torch.stack([(row != EOS).nonzero().max() for row in input_ids])
        expected = model.score(hidden[torch.arange(len(input_ids)), last_non_eos])
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (last_non_eos < attention_mask.sum(1) - 1).all()
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_labels", [False, True])
def test_return_dict_false_gives_stock_tuple(with_labels):
    input_ids, attention_mask, pad_id = make_batch("right")
    stock = make_decoder("qwen2", 3, pad_id).eval()
    fused = fuse_sequence_classification(copy.deepcopy(stock))
    labels = random_labels(3, input_ids.shape[0]) if with_labels else None
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    with torch.no_grad():
        expected = stock(**inputs, return_dict=False)
        got = fused(**inputs, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected) == (2 if with_labels else 1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_arguments_given_by_position_reach_the_fused_forward(arch, num_labels):
    """HF forwards take every argument by position too: labels given that way still give the loss."""
    input_ids, attention_mask, pad_id = make_batch("right")
    stock = make_decoder(arch, num_labels, pad_id).eval()
    fused = fuse_sequence_classification(copy.deepcopy(stock))
    labels = random_labels(num_labels, input_ids.shape[0])
    names = list(inspect.signature(stock.forward).parameters)
    positional = [dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).get(name)
                  for name in names[:names.index("labels") + 1]]
    with torch.no_grad():
        expected, got = stock(*positional, use_cache=False), fused(*positional, use_cache=False)
    assert got.loss is not None
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=1e-5)

def test_unfuse_restores_full_sequence_head():
    input_ids, attention_mask, pad_id = make_batch("left")
    model = make_decoder("mistral", 1, pad_id).eval()
    dims = head_input_dims(model.score)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        fuse_sequence_classification(fuse_sequence_classification(model))  # idempotent
        fused = model(input_ids=input_ids, attention_mask=attention_mask).logits
        unfuse(model)
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert dims == [3, 2, 3]
    assert not is_fused(model) and "forward" not in model.__dict__
    assert {k for k in model.__dict__ if k.startswith("_prefkernels")} == set()
    torch.testing.assert_close(fused, before, atol=1e-6, rtol=1e-5)
    assert torch.equal(after, before)


def test_fusion_keeps_state_dict_and_survives_deepcopy():
    input_ids, attention_mask, pad_id = make_batch("right")
    model = make_decoder("gpt2", 1, pad_id).eval()
    keys = list(model.state_dict())
    fuse_sequence_classification(model)
    clone = copy.deepcopy(model)
    dims = head_input_dims(clone.score)
    with torch.no_grad():
        clone.score.weight.mul_(2.0)
        torch.testing.assert_close(clone(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   2.0 * model(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   atol=1e-6, rtol=1e-5)
    assert list(model.state_dict()) == keys
    assert is_fused(clone) and dims == [2], "a deep copy must stay fused and use its own head"


ENCODER_LAYOUT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_labels=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
BERT_FAMILY = {
    "bert": (lambda: BertForSequenceClassification(BertConfig(**ENCODER_LAYOUT)), "classifier"),
    "roberta": (lambda: RobertaForSequenceClassification(RobertaConfig(**ENCODER_LAYOUT, pad_token_id=1)),
                "classifier.dense"),
    "distilbert": (lambda: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=2, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0)), "pre_classifier"),
}


@pytest.mark.parametrize("arch", sorted(BERT_FAMILY))
def test_bert_family_is_natively_pooled(arch):
    """Their first head layer already sees only the [CLS] vector [N, D]; fusion leaves them as is."""
    build, head_path = BERT_FAMILY[arch]
    torch.manual_seed(0)
    model = build().eval()
    input_ids, attention_mask, _ = make_batch("right")
    dims = head_input_dims(model.get_submodule(head_path))
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert fuse_sequence_classification(model) is model
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not is_fused(model) and "forward" not in model.__dict__
    assert dims == [2, 2]
    assert torch.equal(after, before) and before.abs().sum() > 0


def test_unsupported_models_raise_naming_the_class():
    torch.manual_seed(0)
    causal_lm = LlamaForCausalLM(LlamaConfig(**DECODER_LAYOUT))
    with pytest.raises(TypeError, match="model: LlamaForCausalLM is not supported"):
        fuse_sequence_classification(causal_lm)
    with pytest.raises(TypeError, match="model: Linear is not supported"):
        fuse_sequence_classification(torch.nn.Linear(4, 1))


def test_subclass_with_own_forward_is_rejected():
    class OwnForward(LlamaForSequenceClassification):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = OwnForward(LlamaConfig(**DECODER_LAYOUT, num_labels=1, pad_token_id=PAD))
    assert not has_score_head(model)
    with pytest.raises(TypeError, match="OwnForward is not supported"):
        fuse_sequence_classification(model)


@pytest.mark.skipif(_generic_classifier_class() is None, reason="needs transformers' GenericForSequenceClassification")
def test_generic_subclass_without_own_forward_is_supported():
    class CustomLlamaClassifier(LlamaForSequenceClassification):
        pass

    torch.manual_seed(0)
    model = CustomLlamaClassifier(LlamaConfig(**DECODER_LAYOUT, num_labels=1, pad_token_id=PAD)).eval()
    input_ids, attention_mask, _ = make_batch("left")
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        after = fuse_sequence_classification(model)(input_ids=input_ids, attention_mask=attention_mask).logits
    assert is_fused(model)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_fused_model_pickles_and_keeps_its_forward_signature(tmp_path):
    """torch.save of the whole fused model loads back fused, with the same logits; the fused
    forward shows the stock forward's parameters to inspect (HF Trainer filters columns by them)."""
    import inspect

    model = fuse_sequence_classification(make_decoder("llama", 1, PAD).eval())
    stock = inspect.signature(type(model).forward.__get__(model))
    assert list(inspect.signature(model.forward).parameters) == list(stock.parameters)
    input_ids, attention_mask, _ = make_batch("right")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert is_fused(loaded) and loaded.forward.model is loaded
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, attention_mask=attention_mask).logits,
                                   model(input_ids, attention_mask=attention_mask).logits)


def test_fused_model_trains_in_hf_trainer_with_default_column_filter(tmp_path):
    """HF Trainer with remove_unused_columns=True (its default) keeps input_ids/attention_mask for a
    fused model and reaches the stock model's training loss."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from test_integrations_trl import make_tokenizer

    tokenizer = make_tokenizer()
    data = Dataset.from_dict({"text": ["w1 w2 w3", "w4 w5", "w6", "w7 w8"], "label": [0, 1, 0, 1]})
    data = data.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(LlamaConfig(**{**DECODER_LAYOUT, "vocab_size": 62}, num_labels=2,
                                                           pad_token_id=0))
        if fused:
            fuse_sequence_classification(model)
        args = TrainingArguments(str(tmp_path / str(fused)), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                                 report_to=[], save_strategy="no", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
        losses[fused] = trainer.train().training_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="transformers compiles its models only on torch >= 2.7 (it calls torch.compiler.is_exporting)")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_fused_model_matches_stock(arch):
    """torch.compile of a fused model: same logits and score-head gradient as the stock model."""
    input_ids, attention_mask, pad_id = make_batch("left")
    stock = make_decoder(arch, 1, pad_id).eval()
    fused = fuse_sequence_classification(copy.deepcopy(stock))
    compiled = torch.compile(fused, backend="eager")
    results = []
    for model in (stock, compiled):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits.sum().backward()
        results.append((logits.detach(), stock.score.weight.grad if model is stock else fused.score.weight.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    assert "forward" not in fused.score.__dict__


def test_fused_loss_uses_the_models_loss_function():
    """A loss_function set on the model (e.g. class weights) is what the stock forward applies to the
    pooled logits; the fused forward must apply it too."""
    def weighted_cross_entropy(logits, labels, pooled_logits, config, **kwargs):
        return torch.nn.functional.cross_entropy(pooled_logits, labels, weight=torch.tensor([1.0, 2.0, 5.0]))

    input_ids, attention_mask, pad_id = make_batch("right")
    stock = make_decoder("llama", 3, pad_id)
    stock.loss_function = weighted_cross_entropy
    fused = fuse_sequence_classification(copy.deepcopy(stock))
    labels = random_labels(3, input_ids.shape[0])
    expected = stock(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    got = fused(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_score_head_wrapped_by_peft_is_named_as_the_reason():
    model = make_decoder("llama", 1, PAD)
    model.score = torch.nn.Sequential(model.score)  # as PEFT's ModulesToSaveWrapper: no longer an nn.Linear
    with pytest.raises(TypeError, match="score head of LlamaForSequenceClassification is a Sequential, not an nn.Linear"):
        fuse_sequence_classification(model)


def test_gpt2_loss_ignores_a_custom_loss_function_as_stock_does():
    """Stock GPT-2 computes its loss inline and never calls ``model.loss_function``; so does fused."""
    input_ids, attention_mask, pad = make_batch("right")
    labels = random_labels(3, input_ids.shape[0])
    losses = []
    for fuse in (False, True):
        model = make_decoder("gpt2", 3, pad)
        model.loss_function = lambda logits, labels, **kwargs: torch.nn.functional.cross_entropy(
            logits, labels, weight=torch.tensor([1.0, 3.0, 0.5]))
        if fuse:
            fuse_sequence_classification(model)
        losses.append(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
    torch.testing.assert_close(losses[1], losses[0])


def test_accelerate_mixed_precision_wraps_and_unwraps_a_fused_model():
    """accelerate's prepare wraps the forward under autocast, and unwrap_model(keep_fp32_wrapper=False)
    binds the innermost callable to the model: both call the fused forward as stock, and the prepared
    model shows HF Trainer's column filter the forward's inputs."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    input_ids, attention_mask, pad = make_batch("right")
    results = []
    for fuse in (False, True):
        model = make_decoder("llama", 1, pad)
        if fuse:
            fuse_sequence_classification(model)
        AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton other tests set up
        try:
            prepared = accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        assert "input_ids" in inspect.signature(prepared.forward).parameters  # HF Trainer's column filter
        with torch.no_grad():
            wrapped = prepared(input_ids=input_ids, attention_mask=attention_mask).logits
            if fuse:
                with pytest.raises(RuntimeError, match="forward was replaced after fusion"):
                    unfuse(prepared)
            unwrapped = accelerate.utils.extract_model_from_parallel(prepared, keep_fp32_wrapper=False)
            results.append((wrapped, unwrapped(input_ids=input_ids, attention_mask=attention_mask).logits))
        if fuse:
            assert not is_fused(unfuse(unwrapped))
    for fused, stock in zip(results[1], results[0]):
        torch.testing.assert_close(fused, stock, rtol=2e-2, atol=2e-2)
