"""Rules: the registry and its guards, and each rule against torch.optim (Lion: its paper)."""

import math

import pytest
import torch
from helpers import BACKENDS, VARIANTS, assert_bits_equal, randn, reference_step, snapshot

from forge_megatron import (
    ForgeState,
    Rule,
    fused_update,
    get_rule,
    ops,
    register_rule,
    registered_rules,
)
from forge_megatron.core import ops_torch, ops_triton, rules


def test_both_vocabularies_export_the_same_names():
    assert ops_torch.__all__ == ops_triton.__all__
    for name in ops_torch.__all__:
        assert callable(getattr(ops_torch, name)) and hasattr(ops_triton, name)


def test_builtin_rules_are_registered():
    assert {"adamw", "adam", "sgd", "lion", "rmsprop", "adagrad"} <= set(registered_rules())


@pytest.fixture
def scratch_registry(monkeypatch):
    """Rules registered by a test disappear after it."""
    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))


def test_a_user_rule_is_one_class_and_runs_on_both_backends(scratch_registry, gen, device):
    @register_rule
    class SignSGD(Rule):
        name = "signsgd_test"
        defaults = {"lr": 1e-2}

        @classmethod
        def coefficients(cls, hp, step):
            return (-hp["lr"],)

        @staticmethod
        def update(p, g, state, coef):
            (neg_lr,) = coef
            return p + neg_lr * ops.sign(g), state

    assert "signsgd_test" in registered_rules()
    for backend in BACKENDS:
        weight = randn(gen, 9, 20, device=device)
        state = ForgeState(weight, "signsgd_test", lr=0.5)
        w0, s0 = snapshot(weight, state)
        result = fused_update(randn(gen, 4, 20, device=device), randn(gen, 4, 9, device=device), weight, state,
                              materialize=True, backend=backend)
        expected, _ = reference_step(w0, s0, state, result.grad, 1)
        assert_bits_equal(weight, expected, backend)
        assert_bits_equal(weight, w0 - 0.5 * torch.sign(result.grad), backend)


def _rule_class(update, name="bad_rule", states=()):
    return type("Bad", (Rule,), {"name": name, "states": states, "defaults": {"lr": 1.0},
                                 "coefficients": classmethod(lambda cls, hp, step: (hp["lr"],)),
                                 "update": staticmethod(update)})


def _divides(p, g, state, coef):
    (lr,) = coef
    return p - lr * g / 2.0, state


def _calls_math(p, g, state, coef):
    (lr,) = coef
    return p - lr * math.sqrt(2.0) * g, state


def _powers(p, g, state, coef):
    (lr,) = coef
    return p - lr * g ** 2, state


def _three_args(p, g, state):
    return p, state


@pytest.mark.parametrize("update, message", [
    (_divides, r"operator / is not allowed.*ops\.div"),
    (_powers, r"operator \*\* is not allowed.*ops\.sqrt"),
    (_calls_math, r"calls math\.sqrt; only ops\.<name> calls"),
    (_three_args, r"exactly \(p, g, state, coef\)"),
])
def test_register_rejects_updates_the_backends_would_disagree_on(update, message, scratch_registry):
    with pytest.raises(ValueError, match=message):
        register_rule(_rule_class(update))


def test_register_rejects_malformed_rules(scratch_registry):
    with pytest.raises(ValueError, match="at most 3"):
        register_rule(_rule_class(_divides, states=("a", "b", "c", "d")))
    with pytest.raises(ValueError, match="already registered"):
        register_rule(_rule_class(rules.AdamW.update, name="adamw"))
    with pytest.raises(TypeError, match="subclass"):
        register_rule(object)


def test_unknown_rule_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown rule 'adamx'; registered rules: adagrad, adam, adamw"):
        get_rule("adamx")


@pytest.mark.parametrize("rule, hp, message", [
    ("adamw", {"lr": -1.0}, "lr must be >= 0"),
    ("adamw", {"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0, 1\)"),
    ("adam", {"betas": (-0.1, 0.9)}, r"betas\[0\] must be in \[0, 1\)"),
    ("adamw", {"eps": -1e-8}, "eps must be >= 0"),
    ("lion", {"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ("sgd", {"nesterov": True}, "nesterov needs momentum > 0 and dampening = 0"),
    ("sgd", {"momentum": -0.5}, "momentum must be >= 0"),
    ("rmsprop", {"alpha": 1.0}, r"alpha must be in \[0, 1\)"),
    ("adagrad", {"lr_decay": -1.0}, "lr_decay must be >= 0"),
    ("adamw", {"beta1": 0.9}, r"unknown hyperparameter\(s\) \['beta1'\] for rule 'adamw'; known: lr, betas"),
])
def test_invalid_hyperparameters_are_named(rule, hp, message):
    with pytest.raises(ValueError, match=message):
        ForgeState(torch.zeros(2, 2), rule, **hp)


@pytest.mark.parametrize("hp, message", [
    ({"lr": "0.1"}, "lr must be a real number"),
    ({"lr": float("nan")}, "lr must be a real number"),
    ({"betas": 0.9}, "betas must be a tuple of 2 numbers"),
])
def test_invalid_hyperparameter_types_are_named(hp, message):
    with pytest.raises(TypeError, match=message):
        ForgeState(torch.zeros(2, 2), "adamw", **hp)


def test_changing_hyperparameters_that_change_the_states_is_refused():
    state = ForgeState(torch.zeros(2, 2), "sgd", lr=0.1)
    state.set_hyperparameters(lr=0.05)
    assert state.hyperparameters["lr"] == 0.05
    with pytest.raises(ValueError, match="would change the state tensors"):
        state.set_hyperparameters(momentum=0.9)


def test_state_dict_round_trip(gen):
    weight = randn(gen, 5, 7)
    state = ForgeState(weight, "adamw", lr=0.01)
    fused_update(randn(gen, 3, 7), randn(gen, 3, 5), weight, state)
    other = ForgeState(weight, "adamw")
    other.load_state_dict(state.state_dict())
    assert other.step == 1 and other.hyperparameters == state.hyperparameters
    for name in state.tensors:
        assert_bits_equal(other.tensors[name], state.tensors[name], name)
    with pytest.raises(ValueError, match="rule 'adamw', this weight uses 'lion'"):
        ForgeState(weight, "lion").load_state_dict(state.state_dict())


# ---------------------------------------------------------------------------------------------
# Against the real thing: 10 steps with a fresh float64-computed gradient each step.
# ---------------------------------------------------------------------------------------------

TORCH_OPTIM = [
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
]
# The formulas' other branches (plain SGD; RMSprop's momentum and centering apart), on one backend:
# both run the one rule function (test_fused_update: the backends store the same bits).
TORCH_OPTIM_BRANCHES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, weight_decay=0.01)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.5, weight_decay=0.1)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, centered=True)),
]


@pytest.mark.parametrize("backend, rule, optim_cls, hp",
                         [(b, *case) for b in BACKENDS for case in TORCH_OPTIM]
                         + [("torch", *case) for case in TORCH_OPTIM_BRANCHES],
                         ids=lambda v: getattr(v, "__name__", None))
def test_ten_steps_match_torch_optim(rule, optim_cls, hp, backend, gen, device):
    """x is a permutation matrix, so FORGE's fp32 GEMM is exact and both optimizers see the same
    gradient, the float64 one (dy^T permuted): the test measures the rules' formulas alone. They
    round differently from torch.optim (lerp vs. two products, FMA in addcmul), about 1 ulp per
    operation, ~1e-7 relative per step; 1e-6 after 10 steps leaves a margin."""
    n_out, n_in = 40, 70
    weight = randn(gen, n_out, n_in, device=device)
    reference = torch.nn.Parameter(weight.clone())
    optimizer = optim_cls([reference], **hp, foreach=False)
    state = ForgeState(weight, rule, **hp)
    for _ in range(10):
        x = torch.eye(n_in, device=device)[torch.randperm(n_in, generator=gen)]
        dy = randn(gen, n_in, n_out, device=device)
        fused_update(x, dy, weight, state, backend=backend)
        reference.grad = (dy.double().T @ x.double()).float()
        optimizer.step()
    rel = (weight - reference.detach()).norm() / reference.detach().norm()
    print(f"relative difference after 10 steps: {float(rel):.2e}")
    assert float(rel) <= 1e-6


@pytest.mark.parametrize("backend, lr, wd", [("torch", 1e-3, 0.1), ("triton", 1e-3, 0.1), ("torch", 0.1, 0.5)])
def test_ten_steps_match_the_lion_paper_in_float64(lr, wd, backend, gen, device):
    """Lion, Algorithm 2 of Chen et al. (2023), computed in float64 from the same exact gradient
    (x is a permutation matrix, as in test_ten_steps_match_torch_optim). An element whose sign
    argument comes within 1e-6 of zero may flip between fp32 and float64 (a 2 lr jump): such
    elements (rare: fp32 rounds the argument by ~1e-8) are left out of the comparison. torch.optim
    has no Lion. With lr * wd large (0.05) the order of decay and sign step shows: decaying after
    the step moves each weight by lr^2 wd = 5e-3 more per step (one backend: the rule function is
    the same on both)."""
    b1, b2 = 0.9, 0.99
    n_out, n_in = 40, 70
    weight = randn(gen, n_out, n_in, device=device)
    p, m = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    ambiguous = torch.zeros_like(weight, dtype=torch.bool)
    state = ForgeState(weight, "lion", lr=lr, weight_decay=wd, betas=(b1, b2))
    for _ in range(10):
        x = torch.eye(n_in, device=device)[torch.randperm(n_in, generator=gen)]
        dy = randn(gen, n_in, n_out, device=device)
        fused_update(x, dy, weight, state, backend=backend)
        g = dy.double().T @ x.double()
        argument = b1 * m + (1 - b1) * g
        ambiguous |= argument.abs() < 1e-6
        update = torch.sign(argument)
        p = p - lr * (update + wd * p)
        m = b2 * m + (1 - b2) * g
    rel = (weight.double() - p)[~ambiguous].norm() / p.norm()
    print(f"relative difference after 10 steps: {float(rel):.2e} ({int(ambiguous.sum())} ambiguous signs)")
    assert float(rel) <= 1e-6


def _keeps(p, g, state, coef):
    return p, state


def _branches_on_the_step(cls, hp, step):
    return (hp["lr"] if step == 1 else 2 * hp["lr"],)


def _sqrt_of_the_lr(cls, hp, step):
    return (math.sqrt(hp["lr"]),)


@pytest.mark.parametrize("coefficients", [_branches_on_the_step, _sqrt_of_the_lr])
def test_register_rejects_coefficients_the_device_cannot_derive(coefficients, scratch_registry):
    """The table derives coefficients on the device from float64 tensors of lr, weight decay and
    the step: a branch on the step or math.sqrt of the lr would need their values on the host."""
    rule = _rule_class(_keeps)
    rule.coefficients = classmethod(coefficients)
    with pytest.raises(ValueError, match=r"must also run with lr and step as float64 tensors.*coefficient_sqrt"):
        register_rule(rule)


@pytest.mark.parametrize("rule", registered_rules())
def test_the_device_derives_the_hosts_coefficients(rule, device):
    """A StepTable derives every step's row on the device from its lr, weight decay and step,
    advancing the step there: the same fp32 values as the rule's coefficients on the host, over
    30 steps and an lr and weight decay that change (copied) and hold (advanced on the device)."""
    from forge_megatron.core.table import StepTable

    hp = dict(VARIANTS.get(rule, [{}])[-1])
    state = ForgeState(torch.zeros(4, 4, device=device), rule, **hp)
    table = StepTable([state], [1], device)
    for step in range(1, 31):
        if step % 10 == 0:
            state.set_hyperparameters(**{k: state.hyperparameters[k] * 0.5 for k in rules.SCHEDULED
                                         if k in state.hyperparameters})
        table.write(0.25)
        host = [0.25, float(step), *state.rule.coefficients(state.hyperparameters, step)]
        expected = torch.tensor(host, dtype=torch.float64).float()
        assert_bits_equal(table.coefs[0, :len(host)], expected, f"step {step}")
        state.step = step
