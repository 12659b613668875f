"""Progressive clipping: a clip coefficient for each weight's update in backward, from this step's
global grad norm as far as backward has computed it.

Backward visits the weights one after another, and the kernel of each writes its tiles' sums of
squares into the step table (table.py) as it updates. So when a weight's update starts, the table
holds this step's sums for the weights already updated and the previous step's for the rest (this
weight included). The estimate of this step's squared norm is their sum plus the previous step's
share of the parameters FORGE does not cover (its global norm squared less the weights' sums). Each weight's coefficient is
Megatron's, min(1, clip / (norm + 1e-6)), of that estimate: the later a weight updates, the more
of this step's norm its coefficient sees.

It costs two one-element device operations per weight (no pass, no host sync) and is kept on the
device, so the coefficient of a weight is final before its kernel reads it.

When norms jump: a weight updated after the jump sees it (a 10x gradient in an earlier-updated
layer shrinks every later coefficient at once); the weight whose own gradient jumps is updated
with the estimate that still holds its previous sum (as stale clipping would). A non-finite sum
(the iteration is then skipped for the other parameters, see the controller) is left out of the
estimate, and a non-finite estimate falls back to the stale coefficient, so one bad tile does not
turn every later weight's coefficient into NaN.
"""

from __future__ import annotations

import torch

from forge_megatron.core.table import StepSlots, StepTable


class RunningClip:
    def __init__(self, table: StepTable, clip: float, previous_norm: float | None, fallback: float,
                 previous: torch.Tensor | None = None):
        """`table`: the step table, whose by-products still hold the previous pass's sums (or
        `previous`, each weight's, from a checkpoint); `previous_norm`: the previous step's global
        norm, whose excess over the weights' sums is the other parameters' share (None at the
        first step); `fallback`: the coefficient used while the estimate is not finite (the stale one)."""
        self.table, self.clip, self.fallback = table, clip, fallback
        self._index = {id(slots): i for i, slots in enumerate(table.slots)}
        previous = table.weight_sumsqs() if previous is None else previous
        self.previous = torch.nan_to_num(previous, nan=0.0, posinf=0.0)  # float64 [weights]
        self.estimate = self.previous.sum()
        if previous_norm is not None:  # (squared in float64 on the device: an overflow is inf, then the fallback)
            self.estimate = torch.maximum(self.estimate, torch.tensor(previous_norm, dtype=torch.float64,
                                                                      device=self.estimate.device).square())
        self.coefficients = torch.ones_like(self.previous)  # each weight's, once it has updated
        self.sumsqs = self.previous.clone()  # each weight's this step, once it has updated

    def before(self, slots: StepSlots) -> None:
        """Set the gradient scale `slots`' kernel will read: the coefficient of the estimate now."""
        i = self._index[id(slots)]
        norm = self.estimate.sqrt()
        coefficient = torch.clamp(self.clip / (norm + 1.0e-6), max=1.0)
        coefficient = torch.where(torch.isfinite(norm), coefficient, self.fallback)
        self.coefficients[i] = coefficient
        slots.coefs[0] = coefficient * self.table.multipliers[i]

    def after(self, slots: StepSlots) -> None:
        """The weight of `slots` has updated: its sum of squares of this step replaces its previous one."""
        i = self._index[id(slots)]
        now = self.table.weight_sumsq(i)
        self.estimate = torch.where(torch.isfinite(now), self.estimate + now - self.previous[i], self.estimate)
        self.sumsqs[i] = now

    def effective_coefficient(self) -> float:
        """The covered weights' clipped gradient norm over their raw norm, sqrt(sum c_i^2 s_i / sum s_i):
        the one coefficient that would have shrunk the covered gradient as much (host sync)."""
        sumsqs = torch.nan_to_num(self.sumsqs, nan=0.0, posinf=0.0)
        total = float(sumsqs.sum())
        if total == 0.0:
            return float(self.coefficients.mean())
        return float(((self.coefficients.square() * sumsqs).sum() / total).sqrt())
