"""The per-step device memory of a set of covered weights (a model's), so that each weight's step
is one kernel launch and nothing else:

* a coefficient table [weights, COEF_HEAD + MAX_COEFS] (fp32): per weight its gradient scale,
  its step and its rule's coefficients for the coming step, computed on the host in float64
  (rules.py) and copied to the device in one copy per step (`write`); the gradient scale of every
  weight can be set on the device in one op (`set_scale`, two-pass clipping's coefficient);
* a by-product buffer [tiles of all weights, 2] (fp32): per tile, the sum of squares of the raw
  gradient and the non-finite count, written by the kernels (every tile writes its slot) and
  reduced once per step for all weights (`totals`).

Each weight's `StepSlots` are views into these. Without slots, `fused_update` makes its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge_megatron.core.plan import COEF_HEAD, MAX_STEP
from forge_megatron.core.rules import MAX_COEFS
from forge_megatron.core.state import ForgeState

WIDTH = COEF_HEAD + MAX_COEFS


@dataclass
class StepSlots:
    """Where one weight's step reads its scalars (`coefs`: [COEF_HEAD + n] fp32) and writes its
    by-products (`stats`: [tiles, 2] fp32)."""

    coefs: torch.Tensor
    stats: torch.Tensor


def coefficient_row(state: ForgeState, grad_scale: float, step: int) -> list[float]:
    """[grad scale, step, the rule's coefficients at `step`] (float64 values; stored as fp32)."""
    if step >= MAX_STEP:
        raise ValueError(f"step {step}: steps are stored exactly in fp32 up to {MAX_STEP}")
    return [float(grad_scale), float(step), *state.rule.coefficients(state.hyperparameters, step)]


class StepTable:
    """The table of `states`, whose steps run `tiles[i]` tiles each (update.step_tiles)."""

    def __init__(self, states: list[ForgeState], tiles: list[int], device: torch.device):
        self.states = states
        self.coefs = torch.zeros(len(states), WIDTH, dtype=torch.float32, device=device)
        self.stats = torch.zeros(sum(tiles), 2, dtype=torch.float32, device=device)
        starts = [sum(tiles[:i]) for i in range(len(tiles))]
        self.slots = [StepSlots(self.coefs[i], self.stats[start:start + n])
                      for i, (start, n) in enumerate(zip(starts, tiles))]

    def write(self, grad_scale: float) -> None:
        """Every weight's row for its next step (one host-to-device copy)."""
        rows = [coefficient_row(s, grad_scale, s.step + 1) for s in self.states]
        host = torch.tensor([r + [0.0] * (WIDTH - len(r)) for r in rows], dtype=torch.float32)
        self.coefs.copy_(host, non_blocking=True)  # pageable source: safe to drop once the call returns

    def set_scale(self, grad_scale: float | torch.Tensor) -> None:
        """Every weight's gradient scale, on the device (one op)."""
        self.coefs[:, 0].fill_(grad_scale)

    def totals(self) -> torch.Tensor:
        """[sum of squares, non-finite count] of the last pass over all weights (float64, one
        reduction)."""
        return self.stats.sum(0, dtype=torch.float64)
