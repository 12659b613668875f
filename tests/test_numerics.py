"""Rounding helpers agree with torch on every device, the interpreter included."""

import torch
import triton
import triton.language as tl
from helpers import assert_bits_equal

from forge_megatron.core.numerics import round_to_bf16


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, round_to_bf16(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_round_to_bf16_is_torchs_round_to_nearest_even(gen, device):
    one_ulp = 2.0**-7  # bf16 spacing at 1.0
    edge = torch.tensor([
        1.0 + one_ulp / 2,            # tie, rounds down to even 1.0
        1.0 + 3 * one_ulp / 2,        # tie, rounds up to even
        -(1.0 + one_ulp / 2), 1.0 + one_ulp / 2 + 2.0**-20,
        float("inf"), float("-inf"), 3.4028234663852886e38,   # fp32 max rounds up to inf
        1e-40, -1e-40, 0.0, -0.0, 2.0**-126, 1.5 * 2.0**-133,  # subnormals and zeros
    ], dtype=torch.float32)
    x = torch.cat([edge, torch.randn(4000, generator=gen) * torch.logspace(-30, 30, 4000)]).to(device)
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    assert_bits_equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16), "bf16 bits")
