"""The rule vocabulary for the tiled torch backend (see ops_triton.py for the contract).

Every operation is correctly rounded in fp32, like its Triton twin, so that a rule fed the same
fp32 values produces the same bits on both backends.
"""

import torch

__all__ = ["sqrt", "div", "where", "abs", "sign", "maximum", "minimum"]


def sqrt(x):
    # torch's CPU float32 sqrt is not always correctly rounded; the float64 sqrt of a float32,
    # rounded once to float32, is (53 >= 2 * 24 + 2 bits).
    return torch.sqrt(x.double()).float()


def div(a, b):
    return torch.div(a, b)


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
