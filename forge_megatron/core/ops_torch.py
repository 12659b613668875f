"""The rule vocabulary for the tiled torch backend (see ops_triton.py for the contract).

Every operation is correctly rounded in fp32, like its Triton twin, so that a rule fed the same
fp32 values produces the same bits on both backends.
"""

import torch

__all__ = ["sqrt", "div", "fma", "where", "abs", "sign", "maximum", "minimum"]


def sqrt(x):
    # torch's CPU float32 sqrt is not always correctly rounded; the float64 sqrt of a float32,
    # rounded once to float32, is (53 >= 2 * 24 + 2 bits).
    return torch.sqrt(x.double()).float()


def div(a, b):
    return torch.div(a, b)


def fma(a, b, c):
    # a * b + c rounded once, as torch's CPU lerp computes it (a fused multiply-add): the product
    # is exact in float64 and the float64 sum is made round-to-odd (its rounding error, found with
    # TwoSum, moves an inexact even result one ulp toward the exact value), so that rounding it to
    # float32 then rounds the exact value (53 >= 24 + 2 bits).
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    bits = s.view(torch.int64)
    odd = torch.where((err > 0) == (s > 0), bits + 1, bits - 1)
    fix = ((bits & 1) == 0) & (err != 0) & torch.isfinite(s)
    return torch.where(fix, odd, bits).view(torch.float64).float()


def where(cond, a, b):
    return torch.where(cond, a, b)


def abs(x):
    return torch.abs(x)


def sign(x):
    # Spelled like the Triton twin, so NaN and -0.0 map alike (torch.sign keeps NaN and -0.0).
    return torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, 0.0))


def maximum(a, b):
    return torch.maximum(a, b)


def minimum(a, b):
    return torch.minimum(a, b)
