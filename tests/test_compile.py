"""The kernel compiles for Hopper (sm_90a) on a CPU-only machine, for every rule and dtype.

Triton compiles ahead of time without a GPU, and ships ptxas. This catches what the interpreter
cannot: illegal dot shapes, dtype errors in the epilogue, register spills of the default configs,
and it checks in the PTX that the epilogue uses correctly rounded division and square root.
The compile runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit).
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, torch
from forge_megatron.core import kernels, plan, rules
REGIMES = [  # (activation dtype, weight store, state format): every precision regime
    (torch.float32, plan.WEIGHT_FP32, "fp32"), (torch.bfloat16, plan.WEIGHT_MASTER, "fp32"),
    (torch.bfloat16, plan.WEIGHT_SR, "fp32"), (torch.bfloat16, plan.WEIGHT_SR, "bf16"),
    (torch.bfloat16, plan.WEIGHT_SR, "int8"), (torch.bfloat16, plan.WEIGHT_MASTER, "int8"),
]
FORMATS = {"fp32": plan.STATE_FP32, "bf16": plan.STATE_BF16, "int8": plan.STATE_INT8}
out = []
for name in rules.registered_rules():
    rule = rules.get_rule(name)
    for dtype, store, states in REGIMES:
        config = plan.default_config(torch.device("cuda"), dtype, states)
        compiled, report = kernels.compile_for_target(rule, dtype, config, arch=90, weight_store=store,
                                                      state_format=FORMATS[states])
        ptx = compiled.asm["ptx"]
        out.append(dict(rule=name, dtype=str(dtype), store=store, states=states, config=repr(config), **report,
                        wgmma="wgmma.mma_async" in ptx, div_full="div.full.f32" in ptx,
                        sqrt_approx="sqrt.approx" in ptx, cubin_bytes=len(compiled.asm["cubin"])))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_rule_compiles_for_sm90_in_every_regime(reports):
    from forge_megatron import registered_rules

    assert {r["rule"] for r in reports} == set(registered_rules())
    assert all(r["cubin_bytes"] > 0 for r in reports)


def test_default_configs_do_not_spill(reports):
    spilling = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling


def test_bf16_uses_hopper_wgmma(reports):
    assert all(r["wgmma"] for r in reports if "bfloat16" in r["dtype"])


def test_epilogue_uses_correctly_rounded_division_and_sqrt(reports):
    assert not any(r["div_full"] or r["sqrt_approx"] for r in reports), json.dumps(reports, indent=1)
