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
from forge_megatron import kernels, rules
out = []
for name in rules.registered_rules():
    rule = rules.get_rule(name)
    for dtype in (torch.bfloat16, torch.float32):
        config = kernels.default_config(torch.device("cuda"), dtype)
        compiled, report = kernels.compile_for_target(rule, dtype, config, arch=90)
        ptx = compiled.asm["ptx"]
        out.append(dict(rule=name, dtype=str(dtype), config=repr(config), **report,
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


def test_every_rule_compiles_for_sm90_in_both_dtypes(reports):
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
