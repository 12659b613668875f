"""Property-based: for any shape, dtype and rule, the fused step is the unfused rule on the
materialized gradient, and that gradient is dy^T x within the fp32 dot-product bound."""

import torch
from helpers import BACKENDS, assert_bits_equal, reference_step, rule_cases, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_megatron import ForgeState, fused_update

CASES = rule_cases()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(1, 80), n_out=st.integers(1, 100), n_in=st.integers(1, 100),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    case=st.sampled_from(CASES), backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_fused_step_is_the_rule_on_the_materialized_gradient(tokens, n_out, n_in, dtype, case, backend, seed, scale,
                                                             device):
    gen = torch.Generator().manual_seed(seed)
    rule, hp = case
    weight = torch.randn(n_out, n_in, generator=gen).to(device)
    x = torch.randn(tokens, n_in, generator=gen).to(device, dtype)
    dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    state = ForgeState(weight, rule, **hp)
    w0, s0 = snapshot(weight, state)
    result = fused_update(x, dy, weight, state, grad_scale=scale, materialize=True, backend=backend)

    exact = scale * (dy.double().T @ x.double())
    gamma = (tokens + 1) * 2.0**-24 / (1 - (tokens + 1) * 2.0**-24)  # T-term dot, then one scaling
    bound = gamma * scale * (dy.double().abs().T @ x.double().abs())
    assert bool(((result.grad.double() - exact).abs() <= bound).all())
    assert int(result.nonfinite) == 0

    expected_w, expected_s = reference_step(w0, s0, state, result.grad, 1)
    assert_bits_equal(weight, expected_w, "weight")
    for name, tensor in state.tensors.items():
        assert_bits_equal(tensor, expected_s[name], name)
