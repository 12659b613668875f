"""Independent float64 implementations of the built-in rules, written from torch.optim's
documented algorithms (Lion from Chen et al. 2023, Algorithm 2), not from forge_megatron's rules:
one step at step number `t` from `p` and the state dict, returning (p, state)."""

from __future__ import annotations

import torch


def adamw(p, g, s, t, lr, betas, eps, weight_decay):
    b1, b2 = betas
    p = p * (1 - lr * weight_decay)
    m = b1 * s["exp_avg"] + (1 - b1) * g
    v = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), {"exp_avg": m, "exp_avg_sq": v}


def adam(p, g, s, t, lr, betas, eps, weight_decay):
    return adamw(p, g + weight_decay * p, s, t, lr, betas, eps, 0.0)


def sgd(p, g, s, t, lr, momentum, dampening, weight_decay, nesterov):
    g = g + weight_decay * p
    if momentum == 0:
        return p - lr * g, {}
    buf = g.clone() if t == 1 else momentum * s["momentum_buffer"] + (1 - dampening) * g
    direction = g + momentum * buf if nesterov else buf
    return p - lr * direction, {"momentum_buffer": buf}


def lion(p, g, s, t, lr, betas, weight_decay):
    b1, b2 = betas
    update = torch.sign(b1 * s["exp_avg"] + (1 - b1) * g)
    return p * (1 - lr * weight_decay) - lr * update, {"exp_avg": b2 * s["exp_avg"] + (1 - b2) * g}


def rmsprop(p, g, s, t, lr, alpha, eps, weight_decay, momentum, centered):
    g = g + weight_decay * p
    out = {"square_avg": alpha * s["square_avg"] + (1 - alpha) * g * g}
    if centered:
        out["grad_avg"] = alpha * s["grad_avg"] + (1 - alpha) * g
        avg = (out["square_avg"] - out["grad_avg"] ** 2).sqrt() + eps
    else:
        avg = out["square_avg"].sqrt() + eps
    if momentum > 0:
        out["momentum_buffer"] = momentum * s["momentum_buffer"] + g / avg
        return p - lr * out["momentum_buffer"], out
    return p - lr * g / avg, out


def adagrad(p, g, s, t, lr, lr_decay, weight_decay, initial_accumulator_value, eps):
    clr = lr / (1 + (t - 1) * lr_decay)
    g = g + weight_decay * p
    total = s["sum"] + g * g
    return p - clr * g / (total.sqrt() + eps), {"sum": total}


RULES = {"adamw": adamw, "adam": adam, "sgd": sgd, "lion": lion, "rmsprop": rmsprop, "adagrad": adagrad}
