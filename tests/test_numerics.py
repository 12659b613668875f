"""Rounding helpers agree with torch on every device, the interpreter included, and keep
non-finite values non-finite."""

import math

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_bits_equal

from forge_megatron.core import numerics
from forge_megatron.core.kernels import QB  # QBLOCK as a constexpr: a compiled kernel reads no other global
from forge_megatron.core.numerics import QBLOCK, quantize, round_to_bf16, stochastic_round_to_bf16


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


@triton.jit
def _nonfinite_kernel(x_ptr, bits_ptr, table_ptr, rne_ptr, sr_ptr, code_ptr, scale_ptr, N: tl.constexpr):
    """One row of N values through every rounding of the kernel's epilogue."""
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    bits = tl.load(bits_ptr + offs).to(tl.uint32)
    tl.store(rne_ptr + offs, round_to_bf16(x))
    tl.store(sr_ptr + offs, stochastic_round_to_bf16(x, bits))
    codes, scale = quantize(tl.reshape(x, (1, N)), tl.reshape(bits, (1, N)), table_ptr, QB)
    tl.store(code_ptr + offs, tl.reshape(codes, (N,)))
    tl.store(scale_ptr + tl.arange(0, N // QB), tl.reshape(scale, (N // QB,)))


NONFINITE = {"gpu canonical nan": 0x7FFFFFFF, "cpu nan": 0xFFC00000, "quiet nan": 0x7FC00000,
             "negative nan, full payload": 0xFFFFFFFF, "inf": 0x7F800000, "-inf": 0xFF800000}


@pytest.mark.parametrize("pattern", list(NONFINITE.values()), ids=list(NONFINITE))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_non_finite_values_stay_non_finite_through_both_backends_rounding_and_quantization(pattern, signed, gen,
                                                                                            device):
    """A GPU's canonical NaN 0x7FFFFFFF once rounded to bf16 -0.0 (the rounding bias carried into
    the sign bit) and quantized to a finite code (`tl.max` skips NaN); the CPU's NaN 0xFFC00000
    hid it. Now, on both backends: NaN rounds to NaN, +-inf to +-inf (round to nearest and
    stochastic, with random bits up to 0xFFFF), and a quantization block holding a NaN or an
    infinity reads back as NaN throughout (its scale is NaN), the same codes and scales on both;
    the other block is untouched by it."""
    n = 2 * QBLOCK
    x = torch.randn(n, generator=gen).abs() + 0.5
    if signed:
        x[::3] = -x[::3]
    x.view(torch.int32)[5] = pattern - (1 << 32 if pattern >= 1 << 31 else 0)
    x = x.to(device)
    bits = numerics.random_bits_torch(torch.arange(n, device=device), *numerics.stream_keys_int(3, 1, 7, 0))
    bits[5] = 0xFFFF  # the largest rounding increment
    table = numerics.code_tables().to(device)[0 if signed else 1]
    rne = torch.full((n,), 1.0, dtype=torch.bfloat16, device=device)
    sr, codes, scales = rne.clone(), torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(2, device=device)
    _nonfinite_kernel[(1,)](x, bits, table, rne, sr, codes, scales, N=n)
    twin_sr = numerics.stochastic_round_to_bf16_torch(x, bits)
    twin_codes, twin_scales = numerics.quantize_torch(x.reshape(1, n), table, bits.reshape(1, n))
    value = x[5].item()
    for name, rounded in (("kernel rne", rne), ("kernel sr", sr), ("torch rne", x.to(torch.bfloat16)),
                          ("torch sr", twin_sr)):
        got = rounded[5].item()
        assert (math.isnan(got) if math.isnan(value) else got == value), f"{name}: {value} -> {got}"
    assert_bits_equal(sr.view(torch.int16), twin_sr.view(torch.int16), "stochastic rounding")
    assert_bits_equal(codes, twin_codes.reshape(n), "codes")
    assert_bits_equal(scales, twin_scales.reshape(2), "scales")
    for name, decoded in (("kernel", numerics.dequantize_torch(codes.reshape(1, n), scales.reshape(1, 2), table)),
                          ("torch", numerics.dequantize_torch(twin_codes, twin_scales, table))):
        assert bool(decoded[0, :QBLOCK].isnan().all()), f"{name}: the block holding {value} is not NaN"
        assert bool(decoded[0, QBLOCK:].isfinite().all()), f"{name}: the other block is not finite"
