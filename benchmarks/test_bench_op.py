"""pytest-benchmark suite of the CPU op benchmark (same shapes and methods as bench_op.py):

    pytest benchmarks/test_bench_op.py --benchmark-group-by=param:shape
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_op import SHAPES  # noqa: E402

STEPS = common.methods(["native"])


@pytest.mark.parametrize("method", list(STEPS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}-T{}-D{}-{}".format(*s))
def test_fwd_bwd(benchmark, shape, method):
    batch = common.make_batch(*shape, device="cpu")
    step = STEPS[method]
    def fresh():
        common.reset(batch)
        return (batch,), {}

    benchmark.pedantic(step, setup=fresh, rounds=10, warmup_rounds=2)
