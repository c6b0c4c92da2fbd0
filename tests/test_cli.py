"""The command line: demo (offline, accuracy and time targets), eval, help, and bad input."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from prefkernels.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo, run once: (output directory, captured stdout, seconds)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    stdout = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--output", str(out), "--no-progress"])
    assert code == 0
    return out, stdout.getvalue(), time.perf_counter() - started


def test_demo_reaches_the_accuracy_target_offline_and_fast(demo):
    out, stdout, seconds = demo
    accuracy = float(re.search(r"held-out accuracy (\d\.\d+)", stdout).group(1))
    assert accuracy >= 0.90 and seconds < 180
    assert stdout.strip().splitlines()[-1].startswith(f"demo: outputs in {out}")
    for name in ("curves.png", "reliability.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    for name in ("data/train.jsonl", "data/valid.jsonl", "backbone/config.json", "best/prefkernels.json",
                 "metrics.jsonl", "eval.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "eval.json").read_text())["accuracy"] == pytest.approx(accuracy, abs=1e-4)


def test_eval_prints_a_table_and_writes_json(demo, tmp_path, capsys):
    out, _, _ = demo
    args = ["eval", "--model", str(out / "best"), "--data", str(out / "data" / "valid.jsonl"), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "eval"), "--batch-size", "7"]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "ECE (10 bins)" in table and "ratings Spearman / Kendall" in table
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["accuracy"] >= 0.9 and written["pairs"] == 500
    assert (tmp_path / "eval" / "reliability.png").read_bytes().startswith(PNG_MAGIC)
    assert main([*args, "--json", "--max-tokens", "2000"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(written["accuracy"]) and printed["loss"] == pytest.approx(
        written["loss"], rel=1e-4)


def test_help_shows_examples(capsys):
    for command in ("train", "eval", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--backbone", "x"])
    assert exit_info.value.code == 2 and "--train" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "prefkernels", "--help"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("train", "eval", "demo"))


def write(path, text):
    path.write_text(text)
    return str(path)


GOOD = '{"prompt": "human : tell me about the river . assistant :", "chosen": " it is clear", "rejected": " vague"}\n'


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "choosen": "a", "rejected": "b"}\n', r"train.jsonl:1: missing column 'chosen' \(did you mean "
                                                          r"'choosen'\?\)"),
    (GOOD + '{"chosen": "a", "rejected": "b"\n', r"train.jsonl:2: invalid JSON"),
    ("", r"train.jsonl: no records \(empty file\)"),
    (GOOD + '{"chosen": " ", "rejected": "b"}\n', r"train.jsonl:2: column 'chosen' tokenizes to nothing"),
    ('{"prompt": "' + "human : tell me about the river . " * 4 + '", "chosen": "' + " clear" * 20 + '", "rejected": '
     '" vague"}\n', r"max_length=16 is too small for 1 of 2 texts"),
])
def test_bad_training_input_fails_cleanly_and_writes_nothing(demo, tmp_path, capsys, content, message):
    out, _, _ = demo
    data = write(tmp_path / "train.jsonl", content)
    code = main(["train", "--backbone", str(out / "backbone"), "--train", data, "--output", str(tmp_path / "run"),
                 "--max-length", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and re.search(message, err), err
    assert err.startswith("prefkernels train: error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_names_the_model_it_kept(demo, tmp_path, capsys):
    """The last line says which model best/ holds: the best evaluation's step, or the final step
    when there is no validation data to choose by."""
    out, _, _ = demo
    data = write(tmp_path / "train.jsonl", GOOD * 8)
    base = ["train", "--backbone", str(out / "backbone"), "--train", data, "--max-steps", "2", "--batch-size", "4",
            "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"final model (no validation data): {tmp_path / 'plain' / 'best'} (step 2)")
    assert main([*base, "--valid", data, "--output", str(tmp_path / "validated")]) == 0
    assert re.match(rf"best model: {re.escape(str(tmp_path / 'validated' / 'best'))} \(step [12]\)",
                    capsys.readouterr().out.splitlines()[-1])


def test_a_diverging_run_ends_with_one_error_line(demo, tmp_path, capsys):
    out, _, _ = demo
    data = write(tmp_path / "train.jsonl", GOOD * 8)
    code = main(["train", "--backbone", str(out / "backbone"), "--train", data, "--batch-size", "4", "--lr", "1e12",
                 "--max-grad-norm", "0", "--warmup-ratio", "0", "--precision", "fp32", "--log-every", "1",
                 "--output", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"prefkernels train: error: loss: not finite \((nan|-?inf)\) at step \d+; lower lr or clip "
                        r"gradients \(max_grad_norm\)\n", err), err


def test_a_run_diverging_at_its_last_step_keeps_no_model(demo, tmp_path, capsys):
    """The last step's update (NaN gradient norm, finite loss) is caught before its evaluation
    could save the NaN model as the best one."""
    out, _, _ = demo
    data = str(out / "data" / "valid.jsonl")
    code = main(["train", "--backbone", str(out / "backbone"), "--train", data, "--valid", data, "--max-steps", "2",
                 "--lr", "1e30", "--output", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert re.search(r"prefkernels train: error: (grad_norm|loss|validation loss): not finite", err), err
    assert not (tmp_path / "run" / "best").exists()


def test_train_refuses_a_device_it_cannot_compute_on_and_writes_nothing(demo, tmp_path, capsys):
    out, _, _ = demo
    code = main(["train", "--backbone", str(out / "backbone"), "--train", str(out / "data" / "valid.jsonl"),
                 "--device", "meta", "--output", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "prefkernels train: error: device: meta holds shapes, not values" in err, err
    assert not (tmp_path / "run").exists()


def test_eval_truncates_responses_as_the_checkpoint_was_trained(demo, tmp_path, capsys):
    """A model trained with --truncate-responses is evaluated on the same data without repeating
    the flag (best/ records it); --no-truncate-responses restores the refusal."""
    out, _, _ = demo
    long_pair = '{"prompt": "human : hi . assistant :", "chosen": "' + " clear" * 30 + '", "rejected": " vague"}\n'
    data = write(tmp_path / "train.jsonl", GOOD * 6 + long_pair * 2)
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(out / "backbone"), "--train", data, "--valid", data, "--max-length", "16",
                 "--truncate-responses", "--max-steps", "1", "--output", str(run), "--no-progress"]) == 0
    eval_args = ["eval", "--model", str(run / "best"), "--data", data, "--no-progress", "--json"]
    capsys.readouterr()
    assert main(eval_args) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 8
    assert main([*eval_args, "--no-truncate-responses"]) == 1
    assert "--truncate-responses" in capsys.readouterr().err


def test_a_backbone_that_is_a_file_or_has_no_tokenizer_is_one_line(demo, tmp_path, capsys):
    out, _, _ = demo
    data = write(tmp_path / "train.jsonl", GOOD)
    config = out / "backbone" / "config.json"
    assert main(["train", "--backbone", str(config), "--train", data, "--output", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"backbone: {config} is a file; expected a local transformers model directory" in err, err
    weights_only = tmp_path / "weights-only"
    shutil.copytree(out / "backbone", weights_only, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert main(["train", "--backbone", str(weights_only), "--train", data, "--output", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tokenizer: {weights_only} has no tokenizer files" in err, err
    assert not (tmp_path / "run").exists()


def test_export_to_a_file_is_refused(demo, tmp_path, capsys):
    out, _, _ = demo
    target = write(tmp_path / "notes.txt", "kept\n")
    assert main(["export", str(out / "best"), "--hf", target, "--overwrite"]) == 1
    assert f"--hf: {target} is a file; expected the path of a directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "kept\n"


def test_missing_backbone_and_occupied_output_are_refused(demo, tmp_path, capsys):
    out, _, _ = demo
    data = write(tmp_path / "train.jsonl", GOOD)
    assert main(["train", "--backbone", str(tmp_path / "no-model"), "--train", data,
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "backbone: " in capsys.readouterr().err and not (tmp_path / "run").exists()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main(["train", "--backbone", str(out / "backbone"), "--train", data, "--output", str(out),
                 "--no-progress"]) == 1
    assert "holds another run" in capsys.readouterr().err
    assert main(["demo", "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" not in err  # the demo has no --resume
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--data", data]) == 1
    assert "checkpoint: " in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--max-length", "4096"], "max_length: 4096 exceeds the backbone's 128 positions"),
    (["--max-length", "0"], "max_length: expected an integer >= 2, got 0"),
    (["--device", "gpu0"], "device: 'gpu0' is not a torch device"),
    (["--device", "meta"], "device: meta holds shapes, not values"),
    (["--device", "xla"], "device: xla is not usable here (Could not run"),
    (["--backend", "fastest"], "backend: expected one of"),
])
def test_eval_refuses_bad_options_before_reading_data(tmp_path, capsys, option, message):
    from _rl_fixtures import save_reward_checkpoint

    model = save_reward_checkpoint(tmp_path / "ckpt", max_length=48)
    missing_data = str(tmp_path / "not-written-yet.jsonl")  # read after the options are checked, or the error names it
    assert main(["eval", "--model", str(model), "--data", missing_data, "--no-progress", *option]) == 1
    err = capsys.readouterr().err
    assert f"prefkernels eval: error: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--train-pairs", "--valid-pairs", "--threads"])
def test_demo_refuses_a_count_below_one_and_writes_nothing(tmp_path, capsys, option):
    assert main(["demo", "--output", str(tmp_path / "demo"), option, "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"prefkernels demo: error: {option[2:].replace('-', '_')}: expected >= 1, got 0" in err
    assert not (tmp_path / "demo").exists()


def test_demo_replaces_only_folders_a_demo_wrote(demo, tmp_path, capsys):
    """--overwrite replaces a demo run (also one written before the demo marked its folders), never
    a data/ or backbone/ folder that some other tool or person put in --output."""
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "labels.csv").write_text("kept\n")
    small = ["--train-pairs", "64", "--valid-pairs", "32", "--epochs", "1", "--no-progress"]
    for extra in ([], ["--overwrite"]):
        assert main(["demo", "--output", str(mine), *small, *extra]) == 1
        assert f"output: {mine / 'data'} exists and is not from a demo run" in capsys.readouterr().err
    assert sorted(p.name for p in mine.rglob("*")) == ["data", "labels.csv"]
    out, _, _ = demo
    earlier = tmp_path / "earlier"
    shutil.copytree(out, earlier)
    (earlier / ".prefkernels-demo").unlink()
    run = json.loads((earlier / "run.json").read_text())
    run["config"]["backbone"] = str(earlier / "backbone")
    (earlier / "run.json").write_text(json.dumps(run))
    trained = tmp_path / "trained"  # a train run in --output, on a backbone elsewhere
    shutil.copytree(earlier, trained, ignore=shutil.ignore_patterns("data", "backbone"))
    run["config"]["backbone"] = str(out / "backbone")
    (trained / "run.json").write_text(json.dumps(run))
    before = sorted(p.name for p in trained.iterdir())
    assert main(["demo", "--output", str(trained), "--overwrite", *small]) == 1
    assert f"output: {trained / 'run.json'} exists and is not from a demo run" in capsys.readouterr().err
    assert sorted(p.name for p in trained.iterdir()) == before
    assert main(["demo", "--output", str(earlier), "--overwrite", *small]) == 0
    assert len((earlier / "data" / "train.jsonl").read_text().splitlines()) == 64
    assert (earlier / ".prefkernels-demo").is_file()
