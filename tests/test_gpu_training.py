"""GPU checks of what sits around the op (pytest -m gpu, run by benchmarks/gpu_check.sh): the
trainer on CUDA (native CUDA op, fused AdamW, bf16 autocast, resume of the fused optimizer's
state), the Scorer's pinned-memory batches and the score CLI, and the RL reward function."""
import json
import math
import random

import pytest
import torch

from _rl_fixtures import random_texts, save_reward_checkpoint
from _train_fixtures import Killed, quiet, train_config, write_assets
from prefkernels import backends, score_cli
from prefkernels.rl import RewardFunction
from prefkernels.scorer import Scorer
from prefkernels.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"))


def cuda_config(assets, output, **overrides):
    return train_config(assets, output, **{"device": "cuda", **overrides})


def test_training_on_cuda_uses_the_native_op_and_fused_adamw_and_learns(assets, tmp_path, monkeypatch):
    chosen_backends = []
    select = backends.select

    def recording_select(backend, device):
        ops = select(backend, device)
        chosen_backends.append(None if ops is None else ops.name)
        return ops

    monkeypatch.setattr(backends, "select", recording_select)
    trainer = Trainer(cuda_config(assets, tmp_path / "run", epochs=2), log=quiet)  # precision auto: bf16 autocast
    result = trainer.run()
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    assert all(p.is_cuda for p in trainer.model.parameters())
    assert chosen_backends and set(chosen_backends) == {"native"}
    assert result.metrics["accuracy"] >= 0.8 and math.isfinite(result.metrics["loss"])
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]


def optimizer_state(optimizer) -> dict:
    """{(param index, name): tensor on the CPU} of an optimizer's per-parameter state."""
    return {(index, name): value.detach().cpu().clone()
            for index, state in optimizer.state_dict()["state"].items() for name, value in state.items()}


def test_a_killed_cuda_run_resumes_with_the_fused_optimizer_state_it_saved(assets, tmp_path, monkeypatch):
    options = dict(max_steps=6, save_every=3, eval_every=3, precision="fp32")
    out, saved_states = tmp_path / "run", []
    original = Trainer._save_checkpoint

    def save_then_kill(self):
        original(self)
        if self.state["step"] == 3:
            saved_states.append(optimizer_state(self.optimizer))
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", save_then_kill)
        with pytest.raises(Killed):
            Trainer(cuda_config(assets, out, **options), log=quiet).run()
    resumed = Trainer(cuda_config(assets, out, resume=True, **options), log=quiet)
    assert resumed.state["step"] == 3
    for state in resumed.optimizer.state.values():  # fused AdamW needs its step counts on the device
        assert state["step"].is_cuda and state["exp_avg"].is_cuda
    restored = optimizer_state(resumed.optimizer)
    assert restored.keys() == saved_states[0].keys()
    assert all(torch.equal(restored[key], saved_states[0][key]) for key in restored)
    result = resumed.run()
    unbroken = Trainer(cuda_config(assets, tmp_path / "unbroken", **options), log=quiet).run()
    assert result.steps == unbroken.steps == 6
    # the same run up to the order of some CUDA reductions in the backbone (not bitwise)
    assert result.metrics["loss"] == pytest.approx(unbroken.metrics["loss"], rel=1e-3)
    assert abs(result.metrics["accuracy"] - unbroken.metrics["accuracy"]) <= 0.02


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    return save_reward_checkpoint(tmp_path_factory.mktemp("rm") / "ckpt", num_heads=2, max_length=48)


def test_cuda_scorer_equals_the_cpu_scorer_in_input_order(reward_checkpoint):
    texts = random_texts(61, random.Random(0), max_words=30)
    expected = Scorer.from_pretrained(reward_checkpoint, device="cpu").score_detailed(texts).rewards
    scorer = Scorer.from_pretrained(reward_checkpoint, device="cuda", token_budget=96)  # many batches
    assert scorer.device.type == "cuda"
    got = scorer.score_detailed(texts).rewards
    assert got.device.type == "cpu" and got.shape == (61, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    in_bf16 = Scorer.from_pretrained(reward_checkpoint, device="cuda", bf16=True).score_detailed(texts).rewards
    assert torch.isfinite(in_bf16).all()
    torch.testing.assert_close(in_bf16, expected, rtol=0.05, atol=0.1)


def test_cuda_score_cli_writes_one_row_per_input_row(reward_checkpoint, tmp_path):
    texts = random_texts(40, random.Random(1), max_words=30)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    assert score_cli.main(["--model", str(reward_checkpoint), "--input", str(source), "--output", str(output),
                           "--device", "cuda", "--chunk-rows", "9", "--batch-tokens", "120", "--quiet"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == list(range(40))
    expected = Scorer.from_pretrained(reward_checkpoint, device="cpu").score_detailed(texts).rewards
    got = torch.tensor([row["score_heads"] for row in rows])  # 2 heads: their mean is "score"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cuda_reward_function_gives_one_float_per_completion(reward_checkpoint):
    reward = RewardFunction(Scorer.from_pretrained(reward_checkpoint, device="cuda"))
    rng = random.Random(2)
    prompts, completions = random_texts(12, rng), random_texts(12, rng)
    values = reward(prompts, completions)
    expected = Scorer.from_pretrained(reward_checkpoint, device="cpu").score_detailed(
        list(zip(prompts, completions))).rewards.mean(dim=1)
    assert len(values) == 12 and all(isinstance(v, float) for v in values)
    torch.testing.assert_close(torch.tensor(values), expected, rtol=1e-4, atol=1e-4)
