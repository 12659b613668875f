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

__all__ = ["sqrt", "div", "fma", "where", "abs", "sign", "maximum", "minimum"]


@triton.jit
def sqrt(x):
    return tl.sqrt_rn(x)


@triton.jit
def div(a, b):
    return tl.div_rn(a, b)


@triton.jit
def fma(a, b, c):
    # a * b + c rounded once, spelled as ops_torch.fma (round-to-odd in float64, then to float32),
    # not tl.fma: the interpreter's tl.fma rounds the product and the sum apart.
    p = a.to(tl.float64) * b.to(tl.float64)
    c64 = c.to(tl.float64)
    s = p + c64
    t = s - p
    err = (p - (s - t)) + (c64 - t)
    bits = s.to(tl.int64, bitcast=True)
    odd = tl.where((err > 0) == (s > 0), bits + 1, bits - 1)
    fix = ((bits & 1) == 0) & (err != 0) & (tl.abs(s) < float("inf"))
    return tl.where(fix, odd, bits).to(tl.float64, bitcast=True).to(tl.float32)


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
