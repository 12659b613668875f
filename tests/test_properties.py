"""Property-based, against independent float64 implementations of the rules (reference_rules.py):
for any shape, several steps, every rule and every precision regime, each fused step stores what
the float64 rule computes from the stored inputs of that step, within the storage format's
rounding; and the materialized gradient is dy^T x within the fp32 dot-product bound.

Tolerances, per stored value y with float64 reference r (u = 2^-24):
  fp32 (weights, master, states): 4 u (|r| + |y_before|) for the rounding of the result and of
    the old value's term, plus 8 x the rule's sensitivity to fp32 rounding: the largest change of
    r when every input is perturbed element-wise by up to 8 u relative (`_sensitivity`). That
    covers cancellation (e.g. Adam's g + wd p) and Lion's sign flips near zero, where any fp32
    implementation may differ from float64, without loosening the bound elsewhere;
  bf16 (stochastically or nearest-rounded): plus one bf16 spacing, 2^-7 |r|;
  int8 states: plus one step of the code table, (r_table - 1) |r| + floor x the block's absmax.

Examples: six per rule variant. Under the default hypothesis profile ("ci", tests/conftest.py) they
are derandomized, the same on every run; HYPOTHESIS_PROFILE=explore draws others from a seed printed
in pytest's header (FORGE_HYPOTHESIS_SEED=<seed> reruns them).
"""

import math

import pytest
import reference_rules
import torch
from helpers import BACKENDS, case_id, rule_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_megatron import ForgeState, fused_update
from forge_megatron.core import numerics

CASES = rule_cases()
REGIMES = [(torch.float32, "master", "fp32"), (torch.bfloat16, "master", "fp32"), (torch.bfloat16, "sr", "fp32"),
           (torch.bfloat16, "sr", "bf16"), (torch.bfloat16, "master", "int8"), (torch.bfloat16, "rne", "fp32")]
U = 2.0**-24


def _stored(state: ForgeState, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The step's inputs as float64: the weight (or master) and the dequantized states."""
    p = (state.master if state.master is not None else weight).double()
    tables = numerics.code_tables()
    states = {}
    for name in state.state_names():
        tensor = state.tensors[name]
        if state.state_dtype == "int8":
            pad = -tensor.shape[1] % numerics.QBLOCK
            table = tables[1 if name in state.rule.nonnegative_states else 0]
            values = numerics.dequantize_torch(torch.nn.functional.pad(tensor, (0, pad)), state.tensors[f"{name}.scale"],
                                               table)[:, :tensor.shape[1]]
            states[name] = values.double()
        else:
            states[name] = tensor.double()
    for name in state.rule.states:
        states.setdefault(name, torch.zeros_like(p))
    return p, states


def _format_bound(r: torch.Tensor, fmt: str, signed: bool) -> torch.Tensor:
    """The storage format's own rounding of r (0 for fp32)."""
    if fmt == "fp32":
        return torch.zeros_like(r)
    if fmt == "bf16":
        return 2.0**-7 * r.abs()
    blocks = torch.nn.functional.pad(r.abs(), (0, -r.shape[1] % numerics.QBLOCK))
    absmax = blocks.reshape(r.shape[0], -1, numerics.QBLOCK).amax(dim=2).repeat_interleave(numerics.QBLOCK, 1)
    return numerics.relative_error_bound(signed) * r.abs() + numerics.range_floor(signed) * absmax[:, :r.shape[1]]


def _sensitivity(rule, p0, g, s0, t, hp, gen) -> tuple[torch.Tensor, dict]:
    """Per output, the largest change of the float64 rule over 4 element-wise perturbations of its
    inputs by up to 8 u relative: how much fp32 rounding inside any implementation can move it."""
    r_p, r_s = reference_rules.RULES[rule](p0, g, s0, t, **hp)
    spread_p, spread_s = torch.zeros_like(r_p), {k: torch.zeros_like(v) for k, v in r_s.items()}

    def jitter(v):
        return v * (1 + 8 * U * (2 * torch.rand(v.shape, generator=gen, dtype=torch.float64) - 1))

    for _ in range(4):
        q_p, q_s = reference_rules.RULES[rule](jitter(p0), jitter(g), {k: jitter(v) for k, v in s0.items()}, t, **hp)
        spread_p = torch.maximum(spread_p, (q_p - r_p).abs())
        for k in spread_s:
            spread_s[k] = torch.maximum(spread_s[k], (q_s[k] - r_s[k]).abs())
    return (r_p, spread_p), {k: (r_s[k], spread_s[k]) for k in r_s}


@pytest.mark.parametrize("case", CASES, ids=case_id)  # every rule and variant, whatever hypothesis draws
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(1, 70), n_out=st.integers(1, 90), n_in=st.integers(1, 90),
    act_dtype=st.sampled_from([torch.float32, torch.bfloat16]), regime=st.sampled_from(REGIMES),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 0.5, 3.0]), steps=st.integers(2, 4),
)
def test_every_step_stores_the_float64_rule_within_the_formats_rounding(
        tokens, n_out, n_in, act_dtype, regime, case, backend, seed, scale, steps, device):
    gen = torch.Generator().manual_seed(seed)
    rule, hp = case
    weight_dtype, store, state_dtype = regime
    weight = torch.randn(n_out, n_in, generator=gen).to(device, weight_dtype)
    try:
        state = ForgeState(weight, rule, weight_store=store, state_dtype=state_dtype, seed=seed % 1000, **hp)
    except ValueError as err:  # Adagrad's nonzero initial accumulator cannot start as int8 codes
        assert "int8 states start at zero" in str(err)
        return
    full_hp = state.hyperparameters
    jitter_gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        x = torch.randn(tokens, n_in, generator=gen).to(device, act_dtype)
        dy = torch.randn(tokens, n_out, generator=gen).to(device, act_dtype)
        p0, s0 = _stored(state, weight)
        result = fused_update(x, dy, weight, state, grad_scale=scale, materialize=True, backend=backend)

        exact = scale * (dy.double().T @ x.double())
        gamma = (tokens + 1) * U / (1 - (tokens + 1) * U)  # a T-term dot, then one scaling
        bound = gamma * scale * (dy.double().abs().T @ x.double().abs())
        assert bool(((result.grad.double() - exact).abs() <= bound).all()), "gradient"
        assert int(result.nonfinite) == 0

        weight_ref, states_ref = _sensitivity(rule, p0, result.grad.double(), s0, t, full_hp, jitter_gen)
        p1, s1 = _stored(state, weight)
        weight_format = "fp32" if state.master is not None or weight_dtype == torch.float32 else "bf16"
        _check(p1, *weight_ref, p0, weight_format, True, f"step {t}: weight")
        if state.master is not None:
            assert torch.equal(weight, state.master.to(torch.bfloat16)), f"step {t}: weight is the rounded master"
        for name in state.state_names():
            _check(s1[name], *states_ref[name], s0[name], state_dtype, name not in state.rule.nonnegative_states,
                   f"step {t}: {name}")


def _check(stored, reference, spread, before, fmt, signed, what):
    tolerance = 4 * U * (reference.abs() + before.abs()) + 8 * spread + _format_bound(reference, fmt, signed) + 1e-38
    error = (stored - reference).abs()
    bad = error > tolerance
    if bool(bad.any()):
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {i}: stored "
                             f"{stored[tuple(i)].item()!r}, float64 {reference[tuple(i)].item()!r}, tolerance "
                             f"{tolerance[tuple(i)].item():.3g}")
    assert math.isfinite(float(stored.abs().max())) if stored.numel() else True
