"""The rule vocabulary for the Triton epilogue.

Rules (rules.py) are written once against a module named `ops` and compiled twice: here, where
`ops` is this module, and in ops_torch.py. Both modules export the same names with the same
fp32 semantics: correctly rounded sqrt and division (`tl.sqrt_rn`, `tl.div_rn`; Triton's plain
`/` on fp32 is the approximate `div.full.f32` on NVIDIA GPUs), so the fused step and the torch
reference agree bit for bit. Rules use `+ - *` directly; the kernel is compiled with FMA
contraction off, so each of those is one correctly rounded operation too.
"""

import triton
import triton.language as tl

__all__ = ["sqrt", "div", "where", "abs", "sign", "maximum", "minimum"]


@triton.jit
def sqrt(x):
    return tl.sqrt_rn(x)


@triton.jit
def div(a, b):
    return tl.div_rn(a, b)


@triton.jit
def where(cond, a, b):
    return tl.where(cond, a, b)


@triton.jit
def abs(x):
    return tl.abs(x)


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def minimum(a, b):
    return tl.minimum(a, b)
