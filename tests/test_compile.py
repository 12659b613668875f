"""The kernel compiles for Hopper (sm_90a) on a CPU-only machine, for every rule and dtype, as a
launch compiles it (kernels.compile_for_target runs Triton's own binder on the arguments `launch`
passes for a Llama-sized weight, so pointers, divisible integers and unit strides are specialized
as at launch).

Triton compiles ahead of time without a GPU, and ships ptxas. This catches what the interpreter
cannot: illegal dot shapes, dtype errors in the epilogue, register spills of the default configs,
and it checks in the PTX that the epilogue uses correctly rounded division and square root and no
fused multiply-add (the bit-exactness with the torch rule, which multiplies and adds separately,
rests on it). The compile runs in a subprocess without TRITON_INTERPRET (the interpreter replaces
@triton.jit).
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "compile_report.py")


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_rule_compiles_for_sm90_in_every_regime(reports):
    from forge_megatron import registered_rules

    assert {r["rule"] for r in reports[:-1]} == set(registered_rules())
    assert all(r["cubin_bytes"] > 0 for r in reports[:-1])


def test_the_compile_is_specialized_as_a_launch_would_be(reports):
    """Contiguous inputs: the unit strides are constants, pointers and 16-divisible sizes carry
    their divisibility, so the GEMM loop gets its software pipeline (cp.async)."""
    for r in reports[:-1]:
        assert r["constants"] == ["stride_do", "stride_xi"], r
        assert {"x_ptr", "dy_ptr", "w_ptr", "T", "N_IN", "N_OUT", "stride_xt", "stride_dt"} <= set(r["divisible_by_16"])
        assert r["cp_async"], r


def test_the_epilogue_has_no_fused_multiply_add(reports):
    """Every FMA in the kernel is the GEMM's (the norms-only variant has as many); with contraction
    on, the same epilogue would have them, so the check sees what it guards against."""
    assert all(r["epilogue_fmas"] == 0 for r in reports[:-1]), [r for r in reports[:-1] if r["epilogue_fmas"]]
    assert reports[-1]["epilogue_fmas"] > 0


def test_default_configs_do_not_spill(reports):
    spilling = [r for r in reports[:-1] if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling


def test_bf16_uses_hopper_wgmma(reports):
    """bf16 with fp32 or bf16 states: the GEMM bounds the time, on wgmma. With 8-bit states the
    epilogue does, and 32-row tiles (mma.sync) ran faster than 64-row wgmma ones (plan.py)."""
    bf16 = [r for r in reports[:-1] if "bfloat16" in r["dtype"]]
    assert all(r["wgmma"] == (r["states"] != "int8") for r in bf16), bf16


def test_epilogue_uses_correctly_rounded_division_and_sqrt(reports):
    assert not any(r["div_full"] or r["sqrt_approx"] for r in reports[:-1]), json.dumps(reports, indent=1)
