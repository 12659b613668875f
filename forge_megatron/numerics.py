"""Rounding shared by both backends, spelled so the interpreter, the GPU and torch agree.

Torch's fp32 -> bf16 conversion rounds to nearest even on every device. A GPU's Triton cast does
too, but the Triton interpreter truncates (and flushes subnormals); the kernel therefore rounds
with integer operations and builds the bf16 bits directly, so every device gives torch's bits.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest, ties to even (inf stays inf; overflow goes to inf)."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
