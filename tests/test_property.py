"""Hypothesis: >= 500 random configurations of the native op against the float64 reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefkernels import backends
from op_cases import Case, assert_matches, make_inputs, public, reference_float64, run_op

cases = st.builds(
    Case,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    heads=st.integers(1, 4),
    rows=st.integers(1, 6).map(lambda half: 2 * half),
    positions=st.integers(1, 12),
    dim=st.integers(1, 70),
    pooling=st.sampled_from(["mask_right", "mask_left", "mask_bool", "last_index", "cu_seqlens"]),
    weight_fp32=st.booleans(),
    bias=st.booleans(),
    pairs=st.sampled_from(["default", "explicit", "shared"]),
    margin=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5]),
    center_coef=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    layout=st.sampled_from(["contiguous", "strided_t", "transposed"]),
)


@pytest.mark.skipif(backends.native_ops() is None, reason="prefkernels._C not built")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, seed=st.integers(0, 2**16))
def test_native_matches_reference_on_random_cases(case, seed):
    inputs = make_inputs(case, seed=seed)
    assert_matches(run_op(public("native"), inputs), reference_float64(inputs), inputs, what=f"{case}: ")
