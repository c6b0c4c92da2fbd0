"""benchmarks/bench_op.py at a tiny shape: a method that fails on a shape is recorded and left out,
and the ratios of the methods that ran are still computed."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_op  # noqa: E402
import common  # noqa: E402


def failing(monkeypatch, name: str) -> None:
    """common.methods with ``name`` replaced by a step that raises."""
    methods = common.methods

    def with_failure(kernels):
        steps = methods(kernels)

        def broken(batch):
            raise RuntimeError(f"{name} fails here (test)")

        steps[name] = broken
        return steps

    monkeypatch.setattr(common, "methods", with_failure)


@pytest.mark.parametrize("name", ["compile(eager)", "hf_style", "native", "eager", "floor"])
def test_a_failing_method_is_left_out_and_the_others_are_timed(monkeypatch, capsys, name):
    failing(monkeypatch, name)
    (row,) = bench_op.run([(2, 8, 16, "fp32")], repeats=1, warmup=0)
    assert row[f"{name} error"] == f"RuntimeError: {name} fails here (test)"
    assert f"{name} failed, left out" in capsys.readouterr().out
    assert f"{name} ms" not in row and f"{name}/floor" not in row
    ran = [m for m in ("native", "eager", "hf_style", "floor") if m != name]
    assert all(row[f"{m} ms"] > 0 for m in ran)
    if name != "floor":
        assert all(row[f"{m}/floor"] > 0 for m in ran) and row["floor/floor"] == 1.0
    else:
        assert not any(key.endswith("/floor") or key.endswith("/floor alone") for key in row)
    assert ("hf_style/native" in row) == (name not in ("hf_style", "native"))


def test_fixed_cost_records_a_failing_method(monkeypatch, tmp_path, capsys):
    failing(monkeypatch, "compile(eager)")
    bench_op.main(["--fixed-cost-only", "--repeats", "1", "--out", str(tmp_path)])
    fixed = json.loads((tmp_path / "bench_op_cpu_fixed.json").read_text())["fixed_cost"]
    assert fixed["compile(eager) error"] == "RuntimeError: compile(eager) fails here (test)"
    assert "compile(eager) us" not in fixed and fixed["native us"] > 0
    assert "compile(eager) failed, left out" in capsys.readouterr().out
