"""The per-step device memory of a set of covered weights (a model's, or one standalone weight's),
so that each weight's step is one kernel launch and nothing else, and so that a step can be
captured in a CUDA graph: everything that changes from step to step lives in device tensors that
are updated on the device.

* a schedule [weights, 3] (float64): per weight its lr, weight decay and the step its row is for.
  `advance` moves every step on by one on the device; `write` brings the host's values (a
  schedule's new lr, a step set out of sequence) over in one copy, and only when they changed;
* a coefficient table [weights, WIDTH] (fp32), the kernel's rows: per weight its gradient scale
  (the clip coefficient, set on the device by `set_scale`), its step and its rule's coefficients,
  derived on the device from the schedule in float64 (rules.py: `coefficients` runs on float64
  tensors there), once per rule and set of fixed hyperparameters for all its weights;
* a by-product buffer [tiles of all weights, 2] (fp32): per tile, the sum of squares of the raw
  gradient and the non-finite count, written by the kernels (every tile writes its slot) and
  reduced once per step for all weights (`totals`);
* per weight a fixed gradient multiplier (`set_multipliers`, 1 by default): its gradient scale is
  the step's scale times it, and its sum of squares counts times its square (a data-parallel
  reduction's factor that no reduction applies, e.g. an expert's 1 / data-parallel size when its
  expert-data-parallel group is one rank).

Rows are 64 bytes and every weight's by-products start 16-byte aligned, so each weight's slots
reach the kernel with the same pointer alignment (Triton compiles one variant per alignment).
Each weight's `StepSlots` are views into these. Without slots, `fused_update` uses a one-weight
table of the state's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge_megatron.core.plan import COEF_HEAD, MAX_STEP
from forge_megatron.core.rules import MAX_COEFS, SCHEDULED
from forge_megatron.core.state import ForgeState

WIDTH = 16  # COEF_HEAD + MAX_COEFS (14) fp32 values, padded to a 64-byte row
STATS_ALIGN = 2  # tiles (of two fp32 values): a weight's by-products start on a 16-byte boundary
LR, WEIGHT_DECAY, STEP = range(3)  # the schedule's columns
assert COEF_HEAD + MAX_COEFS <= WIDTH


@dataclass
class StepSlots:
    """Where one weight's step reads its scalars (`coefs`: [WIDTH] fp32) and writes its
    by-products (`stats`: [tiles, 2] fp32)."""

    coefs: torch.Tensor
    stats: torch.Tensor


@dataclass
class _Group:
    """Weights that share a rule and its fixed (not scheduled) hyperparameters: their rows are
    derived together."""

    rule: type
    fixed: dict
    rows: slice | torch.Tensor  # their rows in the table
    constants: torch.Tensor  # float64 [coefficients]: the values that depend on no scheduled input


class StepTable:
    """The table of `states`, whose steps run `tiles[i]` tiles each (update.step_tiles)."""

    def __init__(self, states: list[ForgeState], tiles: list[int], device: torch.device):
        self.states = states
        self.coefs = torch.zeros(len(states), WIDTH, dtype=torch.float32, device=device)
        starts, total = [], 0
        for n in tiles:
            starts.append(total)
            total += -(-n // STATS_ALIGN) * STATS_ALIGN
        self.stats = torch.zeros(total, 2, dtype=torch.float32, device=device)  # padding rows stay zero
        self.slots = [StepSlots(self.coefs[i], self.stats[start:start + n])
                      for i, (start, n) in enumerate(zip(starts, tiles))]
        self.schedule = torch.zeros(len(states), 3, dtype=torch.float64, device=device)
        self.multipliers = torch.ones(len(states), dtype=torch.float32, device=device)
        self._tiles = [(start, n) for start, n in zip(starts, tiles)]
        self._tile_weights: torch.Tensor | None = None  # float64 [stats rows]: each tile's multiplier squared
        self._owner: torch.Tensor | None = None  # long [stats rows]: each row's weight (weight_sumsqs)
        self._host: list[tuple[float, float, int]] | None = None  # the schedule as the host last set it
        self._fixed: list[tuple] | None = None
        self._groups: list[_Group] = []

    def write(self, grad_scale: float | torch.Tensor) -> None:
        """Every weight's row for its next step (state.step + 1) with the states' lr and weight
        decay, and the gradient scale. When only the steps moved on by one since the last write,
        nothing leaves the host (`advance`); otherwise the schedule is copied over in one
        host-to-device copy (non-blocking: no sync)."""
        wanted = []
        for s in self.states:
            step = s.step + 1
            if step >= MAX_STEP:
                raise ValueError(f"step {step}: steps are stored exactly in fp32 up to {MAX_STEP}")
            wanted.append((float(s.hyperparameters.get("lr", 0.0)), float(s.hyperparameters.get("weight_decay", 0.0)),
                           step))
        self._regroup()
        if wanted != self._host:
            if self._host is not None and all(w == (h[LR], h[WEIGHT_DECAY], h[STEP] + 1)
                                              for w, h in zip(wanted, self._host)):
                self.advance()
            else:
                host = torch.tensor(wanted, dtype=torch.float64)
                self.schedule.copy_(host, non_blocking=True)  # pageable source: safe to drop once the call returns
                self._host = wanted
                self._derive()
        self.set_scale(grad_scale)

    def advance(self) -> None:
        """Every weight's next row, on the device only (capturable in a CUDA graph): the steps
        move on by one and the coefficients are derived again from the schedule's lr and weight
        decay. (The fp32 step limit, MAX_STEP, is checked by `write`, not here.)"""
        self.schedule[:, STEP] += 1
        self._derive()
        if self._host is not None:
            self._host = [(lr, wd, step + 1) for lr, wd, step in self._host]

    def set_scale(self, grad_scale: float | torch.Tensor) -> None:
        """Every weight's gradient scale (times its multiplier), on the device (one op; a
        one-element device tensor is copied there, without a sync)."""
        self.coefs[:, 0].fill_(grad_scale.reshape(()) if isinstance(grad_scale, torch.Tensor) else grad_scale)
        if self._tile_weights is not None:
            self.coefs[:, 0].mul_(self.multipliers)

    def set_multipliers(self, multipliers: list[float]) -> None:
        """Each weight's fixed gradient multiplier (see the module docstring)."""
        self.multipliers.copy_(torch.tensor(multipliers, dtype=torch.float32))
        if all(m == 1.0 for m in multipliers):
            self._tile_weights = None
            return
        weights = torch.zeros(self.stats.shape[0], dtype=torch.float64)
        for m, (start, n) in zip(multipliers, self._tiles):
            weights[start:start + n] = float(m) ** 2
        self._tile_weights = weights.to(self.stats.device)

    def totals(self) -> torch.Tensor:
        """[sum of squares, non-finite count] of the last pass over all weights (float64, one
        reduction; the sums of squares of the multiplied gradients)."""
        if self._tile_weights is None:
            return self.stats.sum(0, dtype=torch.float64)
        stats = self.stats.double()
        return torch.stack([(stats[:, 0] * self._tile_weights).sum(), stats[:, 1].sum()])

    def weight_sumsqs(self) -> torch.Tensor:
        """Each weight's sum of squares in the by-products, as `totals` counts it (float64 [weights],
        one segment sum)."""
        if self._owner is None:  # each stats row's weight (a weight's padding rows are zeros)
            starts = [start for start, _ in self._tiles] + [self.stats.shape[0]]
            rows = torch.tensor([b - a for a, b in zip(starts, starts[1:])])
            self._owner = torch.repeat_interleave(torch.arange(len(self.states)), rows).to(self.stats.device)
        sums = torch.zeros(len(self.states), dtype=torch.float64, device=self.stats.device)
        sums.index_add_(0, self._owner, self.stats[:, 0].double())
        return sums * self.multipliers.double().square()

    def weight_sumsq(self, i: int) -> torch.Tensor:
        """Weight i's sum of squares in the by-products, as `totals` counts it (float64, 0-dim)."""
        start, n = self._tiles[i]
        return self.stats[start:start + n, 0].sum(dtype=torch.float64) * self.multipliers[i].double().square()

    def _regroup(self) -> None:
        """Group the weights by rule and fixed hyperparameters (again, if those changed)."""
        fixed = [(s.rule.name, repr([(k, v) for k, v in s.hyperparameters.items() if k not in SCHEDULED]))
                 for s in self.states]
        if fixed == self._fixed:
            return
        members: dict[tuple, list[int]] = {}
        for i, key in enumerate(fixed):
            members.setdefault(key, []).append(i)
        device = self.coefs.device
        self._groups = []
        for rows in members.values():
            state = self.states[rows[0]]
            hp = {k: v for k, v in state.hyperparameters.items() if k not in SCHEDULED}
            values = state.rule.coefficients({**hp, **_scheduled_inputs(state.rule, self.schedule[:1])},
                                             self.schedule[:1, STEP])
            constants = torch.tensor([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values],
                                     dtype=torch.float64, device=device)
            contiguous = rows == list(range(rows[0], rows[-1] + 1))
            index = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
            self._groups.append(_Group(state.rule, hp, index, constants))
        self._fixed = fixed
        self._host = None  # the rows must be derived again

    def _derive(self) -> None:
        """The kernel's rows from the schedule, on the device: per group, its rule's coefficients
        evaluated on float64 tensors and rounded once to fp32."""
        self.coefs[:, 1] = self.schedule[:, STEP]
        for group in self._groups:
            schedule = self.schedule[group.rows]
            values = group.rule.coefficients({**group.fixed, **_scheduled_inputs(group.rule, schedule)},
                                             schedule[:, STEP])
            n = schedule.shape[0]
            columns = [v.expand(n) if isinstance(v, torch.Tensor) else group.constants[j].expand(n)
                       for j, v in enumerate(values)]
            self.coefs[group.rows, COEF_HEAD:COEF_HEAD + len(columns)] = torch.stack(columns, dim=1).float()


def _scheduled_inputs(rule, schedule: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scheduled hyperparameters `rule` has, as the schedule's float64 columns."""
    columns = {"lr": schedule[:, LR], "weight_decay": schedule[:, WEIGHT_DECAY]}
    return {k: columns[k] for k in SCHEDULED if k in rule.defaults}
