"""Shared test helpers: rule cases, random inputs, the unfused reference step."""

from __future__ import annotations

import torch

from forge_megatron import ForgeState, registered_rules
from forge_megatron.core import numerics
from forge_megatron.core.rules import get_rule

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
    """Every element-wise rule's cases: a whole-matrix rule (Muon: its weight step follows the pass,
    `Rule.weight_step`) has no element-wise reference step, and tests/test_muon.py tests it."""
    return [(name, hp) for name in registered_rules() if get_rule(name).weight_step is None
            for hp in VARIANTS.get(name, [{}])]


def case_id(case) -> str:
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items() if k in ("momentum", "nesterov", "centered"))


def randn(gen, *shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def shard_invariance_inputs(gen, *shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Inputs for tests that a weight element's bits do not depend on where it sits in a tile or
    a shard. On a GPU: general random values (the MMA's summation order is fixed per element).
    On CPU the GEMMs are a BLAS's (numpy's under the Triton interpreter, torch's for the twin),
    whose summation order may depend on an element's position inside the kernel's blocks on some
    machines, so the values are small dyadic integers (multiples of 1/8 in [-1/2, 1/2]): every
    product and partial sum is exact in fp32 and bf16, whatever the order."""
    if torch.device(device).type == "cuda":
        return randn(gen, *shape, dtype=dtype, device=device)
    return (torch.randint(-4, 5, shape, generator=gen).float() / 8).to(dtype=dtype, device=device)


def snapshot(weight: torch.Tensor, state: ForgeState):
    return weight.clone(), {k: v.clone() for k, v in state.named_tensors().items()}


def reference_step(weight, tensors, state: ForgeState, grad, step):
    """The unfused optimizer step on whole tensors, in the state's precision regime: read the
    weight (or master) and states, apply the rule's torch formula to `grad`, write back with the
    regime's rounding (numerics.py's torch functions). Returns (weight, {name: tensor}) as stored."""
    rule, device = state.rule, weight.device
    n_out, n_in = weight.shape
    rows = torch.arange(n_out, device=device)
    index = numerics.global_index_torch(rows, torch.arange(n_in, device=device), state.placement)
    keys = [numerics.stream_keys_int(state.seed, state.weight_id, step, stream) for stream in range(1 + len(rule.states))]
    tables = numerics.code_tables().to(device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    pad = -n_in % numerics.QBLOCK

    def padded(t):
        return torch.nn.functional.pad(t, (0, pad))

    states = []
    for name in rule.states:
        if name not in tensors:
            states.append(zero)
        elif state.state_dtype == "int8":
            table = tables[1 if name in rule.nonnegative_states else 0]
            states.append(numerics.dequantize_torch(padded(tensors[name]), tensors[f"{name}.scale"], table)[:, :n_in])
        else:
            states.append(tensors[name].float())
    coef = torch.tensor(rule.coefficients(state.hyperparameters, step), dtype=torch.float32, device=device)
    p = tensors["master"] if "master" in tensors else weight.float()
    p, new = rule.torch_update(p, grad, tuple(states), tuple(coef))
    out = {}
    if weight.dtype == torch.float32:
        w = p
    elif state.weight_store == "master":
        out["master"], w = p, p.to(torch.bfloat16)
    elif state.weight_store == "sr":
        w = numerics.stochastic_round_to_bf16_torch(p, numerics.random_bits_torch(index, *keys[0]))
    else:
        w = p.to(torch.bfloat16)
    for k, name in enumerate(rule.states):
        if name not in tensors:
            continue
        if state.state_dtype == "fp32":
            out[name] = new[k]
        elif state.state_dtype == "bf16":
            out[name] = numerics.stochastic_round_to_bf16_torch(new[k], numerics.random_bits_torch(index, *keys[1 + k]))
        else:
            padded_index = numerics.global_index_torch(rows, torch.arange(n_in + pad, device=device), state.placement)
            bits = numerics.random_bits_torch(padded_index, *keys[1 + k])
            codes, scales = numerics.quantize_torch(padded(new[k]), tables[1 if name in rule.nonnegative_states else 0],
                                                    bits)
            out[name], out[f"{name}.scale"] = codes[:, :n_in], scales
    return w, out


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
