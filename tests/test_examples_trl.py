"""python/trl_drop_in.py with small settings: TRL's RewardTrainer with the fused loss, in process so
that the fused op's calls can be counted."""
import importlib.util
import math
import warnings
from pathlib import Path

import pytest

pytest.importorskip("trl")
import prefkernels.integrations.trl as fused_trl  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "python" / "trl_drop_in.py"


@pytest.fixture
def example(monkeypatch, tmp_path, one_thread):
    """(the example's main, the list of fused_bt_loss calls it makes); run from tmp_path."""
    spec = importlib.util.spec_from_file_location("trl_drop_in", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    fused_bt_loss = fused_trl.fused_bt_loss

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return fused_bt_loss(*args, **kwargs)

    monkeypatch.setattr(fused_trl, "fused_bt_loss", counting)
    monkeypatch.chdir(tmp_path)
    return module.main, calls


def test_fused_trainer_learns_generated_pairs_in_step_with_stock(example):
    main, calls = example
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = main(["--synthetic", "--compare", "--steps", "30", "--train-pairs", "400", "--valid-pairs", "100"])
    assert not [w for w in caught if "FusedRewardTrainer" in str(w.message)]  # no fallback to the stock loss
    assert "generated pairs" in result["data"]
    # 30 training steps and 13 eval batches of 8 pairs (100 pairs), each one call on 16 rows
    assert len(calls) == 30 + 13 and all(shape[0] == 16 for shape in calls[:30]), calls
    fused, stock = result["fused"], result["stock"]
    assert fused["pairs"] == stock["pairs"] == 400
    assert fused["eval"]["eval_accuracy"] > 0.85 and fused["eval"]["eval_loss"] < 0.5, fused["eval"]
    assert len(fused["losses"]) == len(stock["losses"]) == 10
    assert fused["losses"][0] == pytest.approx(stock["losses"][0], abs=2e-6)
    assert max(abs(a - b) for a, b in zip(fused["losses"], stock["losses"])) < 2e-2


def test_fused_trainer_trains_on_hh_harmless(example, hh_harmless):
    main, calls = example
    result = main(["--data-dir", str(hh_harmless), "--steps", "10", "--train-pairs", "200", "--valid-pairs", "50"])
    assert result["data"] == f"hh-harmless from {hh_harmless} (implicit prompt)"
    assert "stock" not in result
    run = result["fused"]
    assert 100 < run["pairs"] <= 200  # TRL drops the pairs over --max-length tokens
    assert len(calls) >= 10 and len(run["losses"]) == 10
    assert all(0.2 < loss < 2.0 for loss in run["losses"]), run["losses"]
    assert math.isfinite(run["eval"]["eval_loss"]) and 0.0 <= run["eval"]["eval_accuracy"] <= 1.0
