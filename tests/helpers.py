"""Shared test helpers: rule cases, random inputs, the unfused reference step."""

from __future__ import annotations

import torch

from forge_megatron import ForgeState, get_rule, registered_rules

BACKENDS = ("torch", "triton")

# Non-default hyperparameters that exercise every coefficient of the built-in rules; any other
# registered rule is tested with its defaults (and whatever variants its author adds here).
VARIANTS = {
    "adamw": [dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)],
    "adam": [dict(lr=1e-2, weight_decay=0.05)],
    "sgd": [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)],
    "lion": [dict(lr=1e-3, weight_decay=0.1)],
    "rmsprop": [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)],
    "adagrad": [dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)],
}


def rule_cases() -> list[tuple[str, dict]]:
    return [(name, hp) for name in registered_rules() for hp in VARIANTS.get(name, [{}])]


def case_id(case) -> str:
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items() if k in ("momentum", "nesterov", "centered"))


def randn(gen, *shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def snapshot(weight: torch.Tensor, state: ForgeState):
    return weight.clone(), {k: v.clone() for k, v in state.tensors.items()}


def reference_step(weight, tensors, state: ForgeState, grad, step):
    """The rule's torch formula applied to whole tensors: the unfused optimizer step."""
    rule = state.rule
    zero = torch.zeros((), dtype=torch.float32, device=weight.device)
    coef = torch.tensor(rule.coefficients(state.hyperparameters, step), dtype=torch.float32, device=weight.device)
    states = tuple(tensors.get(n, zero) for n in rule.states)
    p, new = rule.torch_update(weight.float(), grad, states, tuple(coef))
    return p, {n: new[i] for i, n in enumerate(rule.states) if n in tensors}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = ""):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().cpu(), expected.detach().cpu().to(actual.dtype)
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not bool(same.all()):
        idx = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {a.numel()} elements differ; first at {idx}: "
            f"{a[tuple(idx)].item()!r} vs {e[tuple(idx)].item()!r}"
        )
