"""ForgeOptimizer: a torch optimizer's habits for a model whose linear weights FORGE trains inside
backward, together with a torch optimizer (the "rest") for its other parameters.

One iteration (one optimizer step) of k micro-batches (`micro_batches`):
  backward      The first covered layer's backward of the iteration begins it: FORGE's param group
                (lr, weight decay, ... as a scheduler left them) goes to every covered weight's
                state and the step's coefficient table is written once. Each covered weight sums
                its first k - 1 gradients in its accumulation buffer and, at the k-th, runs the
                fused update (clip mode 'stale') or stores the sum ('two-pass'); with data
                parallelism the sum is reduce-scattered to the owners of its rows (core/owner.py).
                After the last covered backward the covered weights' gradient norm goes into the
                grad of the model's GradNormCarrier (layers.py).
  clip          The loop's own clip_grad_norm_(model.parameters(), max_norm) (the Trainer's
                max_grad_norm) then sees the global norm and scales the carrier with the rest.
  step()        Non-finite covered gradients skip the step (the non-finite policy); otherwise
                'two-pass' applies each held gradient with the loop's clip coefficient, and the
                rest's optimizer steps. 'stale' keeps that coefficient for the next iteration's
                updates (exact whenever the clip does not act on two consecutive steps).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from forge_megatron.core.owner import Collectives
from forge_megatron.core.param import ForgeConfig, ForgeParam
from forge_megatron.core.table import StepTable
from forge_megatron.core.update import step_tiles
from forge_megatron.torch.layers import GradNormCarrier

logger = logging.getLogger(__name__)

CLIP_MODES = ("stale", "two-pass")
NamedParameters = list[tuple[str, nn.Parameter]]


class ForgeOptimizer(torch.optim.Optimizer):
    """param_groups[0] is FORGE's (the covered weights, with the rule's hyperparameters: lr,
    weight_decay, betas, ...); the rest optimizer's groups follow, the same dicts, so that
    torch.optim.lr_scheduler schedulers drive both. Built by `forge_megatron.torch.cover`."""

    def __init__(self, names: list[str], weights: list[nn.Parameter], params: list[ForgeParam],
                 carrier: GradNormCarrier, config: ForgeConfig, rest: torch.optim.Optimizer | None,
                 micro_batches: int = 1, clip_mode: str = "stale", max_nonfinite_steps: int = 3, process_group=None):
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip_mode!r}; choose one of {CLIP_MODES}")
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be a positive integer, got {max_nonfinite_steps!r}")
        self.names, self.weights, self.params = names, weights, params
        self.carrier, self.config, self.rest, self.clip_mode = carrier, config, rest, clip_mode
        self.micro_batches = micro_batches
        self.max_nonfinite_steps = max_nonfinite_steps
        self.group = process_group  # data parallelism: each rank owns a block of every covered weight's rows
        self.collectives = Collectives()
        if process_group is not None:
            for name, weight, param in zip(names, weights, params):
                try:
                    param.own_rows(weight, process_group, collectives=self.collectives)
                except ValueError as error:
                    raise ValueError(f"covered weight {name}: {error}; exclude it from cover()") from None
        for i, param in enumerate(params):
            param.state.weight_id = i  # keys stochastic rounding: the same on every rank
        super().__init__([{"params": list(zip(names, weights))}], dict(params[0].state.hyperparameters))
        self.forge_group = self.param_groups[0]
        if rest is not None:
            self.param_groups.extend(rest.param_groups)
        self.coefficient = 1.0  # 'stale': the clip coefficient of the covered weights' next update
        self.nonfinite_streak = 0
        self.table: StepTable | None = None
        self._table_key = None
        self._open = False  # an iteration has begun (a covered backward ran since the last step)
        self._finished = 0  # covered weights done with the iteration's backward passes
        self._totals: torch.Tensor | None = None  # [sum of squares, non-finite count] over all ranks
        self._ready = True

    @property
    def micro_batches(self) -> int:
        """Backward passes per step (gradient accumulation); the last one updates."""
        return self._micro_batches

    @micro_batches.setter
    def micro_batches(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"micro_batches must be a positive integer, got {k!r}")
        self._micro_batches = k

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_ready", False):
            raise ValueError("FORGE's optimizer takes no new parameter groups: give the parameters to the rest "
                             "optimizer (cover(..., rest=...))")
        super().add_param_group(param_group)

    # -- backward -------------------------------------------------------------------------------

    def covered_backward(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> None:
        """A covered layer's part of a backward pass (its autograd function calls this)."""
        if not self._open:
            self._begin()
        param = weight._forge_param
        param.step(x, dy, weight)
        if param.backwards == param.micro_batches:
            self._finished += 1
            if self._finished == len(self.params):
                self._end_backward()

    def _begin(self) -> None:
        table = self._step_table()
        changes = {k: self.forge_group[k] for k in self.defaults}
        for param in self.params:
            param.state.set_hyperparameters(**changes)
        two_pass = self.clip_mode == "two-pass"
        table.write(1.0 if two_pass else self.coefficient)
        for param in self.params:
            param.begin_iteration(self.micro_batches, hold=two_pass)
            param.apply = not two_pass
        self._open, self._finished, self._totals = True, 0, None

    def _end_backward(self) -> None:
        """After the iteration's last covered backward: its by-products, summed over the
        data-parallel owners of the rows, and the norm for the loop's clip."""
        self.collectives.wait()
        totals = self.table.totals()
        if self.group is not None:
            dist.all_reduce(totals, group=self.group)
        self._totals = totals
        self.carrier.hold(totals[0].sqrt())

    def _step_table(self) -> StepTable:
        """The covered weights' per-step memory (core/table.py), built for their device and dtypes."""
        key = (self.weights[0].device, tuple(w.dtype for w in self.weights))
        if self.table is None or key != self._table_key:
            tiles = [step_tiles(p.rows(w), p.state, p.config.backend, p.config.tile_config)
                     for w, p in zip(self.weights, self.params)]
            self.table = StepTable([p.state for p in self.params], tiles, self.weights[0].device)
            for param, slots in zip(self.params, self.table.slots):
                param.bind(slots)
            self._table_key = key
        return self.table

    # -- step -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("FORGE updates the covered weights inside backward and cannot re-run a closure's "
                             "forward and backward; call loss.backward() and then step()")
        if not self._open:  # no covered backward since the last step: the rest steps as torch would
            if self.rest is not None:
                self.rest.step()
            return
        try:
            self._step()
        finally:
            for param in self.params:
                param.free_buffer()
            self._open, self._totals = False, None
            self.carrier.clear()

    def _step(self) -> None:
        counts = {p.backwards for p in self.params}
        if len(counts) > 1:
            name, count = min(((n, p.backwards) for n, p in zip(self.names, self.params)), key=lambda c: c[1])
            raise RuntimeError(f"FORGE: covered weight {name} ran {count} backward passes in this step, others "
                               f"{max(counts)}: every covered layer must take part in every forward and backward "
                               "(exclude the others from cover())")
        if counts != {self.micro_batches}:
            raise RuntimeError(
                f"FORGE: step() after {counts.pop()} of {self.micro_batches} micro-batches: set cover(..., "
                "micro_batches=) (or optimizer.micro_batches) to the loop's gradient accumulation steps (a Trainer "
                "epoch whose number of batches is not a multiple of gradient_accumulation_steps ends with a shorter "
                "step)")
        sumsq, nonfinite = (float(v) for v in self._totals)
        coefficient = self.carrier.coefficient()
        if nonfinite or not math.isfinite(sumsq) or not math.isfinite(coefficient):
            return self._skip(nonfinite)
        self.nonfinite_streak = 0
        if self.clip_mode == "two-pass":
            self.table.set_scale(coefficient)
            for weight, param in zip(self.weights, self.params):
                param.apply_accumulated(weight)
            self.collectives.wait()
        else:
            self.coefficient = coefficient
        if self.rest is not None:
            self.rest.step()

    def _skip(self, nonfinite: int) -> None:
        """The non-finite policy: the step is skipped (the rest's, and 'two-pass' covered updates);
        after `max_nonfinite_steps` in a row training stops."""
        self.nonfinite_streak += 1
        what = ("no weight was updated" if self.clip_mode == "two-pass" else "the covered tiles holding them were "
                "left unchanged in backward, the others updated; the rest's step was skipped")
        logger.warning("FORGE: %d non-finite gradient values in covered weights, or a non-finite gradient norm; %s "
                       "(%d in a row)", nonfinite, what, self.nonfinite_streak)
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"FORGE: {self.nonfinite_streak} consecutive steps with non-finite gradients in covered weights or a "
                "non-finite gradient norm; training stopped. Lower the learning rate or clip, or restart from the last "
                "checkpoint; cover(..., max_nonfinite_steps=) sets how many are tolerated")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.carrier.clear()

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self, gather: bool = False) -> dict[str, Any]:
        """FORGE's state (each covered weight's state tensors and step; with data parallelism this
        rank's rows, or with gather=True, a collective, every rank's rows), FORGE's param group,
        and the rest optimizer's state_dict: tensors, numbers and strings only (torch.load with
        weights_only=True reads it)."""
        weights = {}
        for name, param in zip(self.names, self.params):
            tensors = param.shard_tensors() if gather else param.state.named_tensors()
            weights[name] = {"step": param.state.step, **tensors}
        owner = self.params[0].owner
        rows = None if owner is None or gather else [owner.rank, owner.size]
        forge = {"rule": self.config.rule, "coefficient": self.coefficient, "nonfinite_streak": self.nonfinite_streak,
                 "rows": rows, "weights": weights}
        group = {k: v for k, v in self.forge_group.items() if k not in ("params", "param_names")}
        return {"forge": forge, "forge_group": group, "rest": None if self.rest is None else self.rest.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state_dict (from any data-parallel size if gathered, else from this rank's
        own); everything is checked before anything is copied."""
        forge = state_dict.get("forge") if isinstance(state_dict, dict) else None
        if forge is None:
            raise ValueError("this is not a FORGE optimizer's state_dict (no 'forge' entry)")
        if forge["rule"] != self.config.rule:
            raise ValueError(f"the state_dict holds rule {forge['rule']!r}'s state; this optimizer runs "
                             f"{self.config.rule!r}")
        owner = self.params[0].owner
        here = None if owner is None else [owner.rank, owner.size]
        if forge["rows"] is not None and list(forge["rows"]) != here:
            raise ValueError(f"the state_dict holds data-parallel rank {forge['rows'][0]} of {forge['rows'][1]}'s rows "
                             f"of FORGE's state, this is {'no data parallelism' if here is None else here}: save with "
                             "forge_megatron.torch.save_checkpoint (or state_dict(gather=True)) to load elsewhere")
        if (state_dict["rest"] is None) != (self.rest is None):
            raise ValueError("the state_dict and this optimizer differ in having a rest optimizer")
        for name, param in zip(self.names, self.params):
            entry = forge["weights"].get(name)
            if entry is None:
                raise ValueError(f"the state_dict has no FORGE state for covered weight {name}")
            for key, tensor in param.state.named_tensors().items():
                found = entry.get(key)
                if found is None or tuple(param.own(found).shape) != tuple(tensor.shape):
                    raise ValueError(f"FORGE state {name}.{key}: the state_dict has "
                                     f"{None if found is None else tuple(found.shape)}, this run {tuple(tensor.shape)}")
        for name, param in zip(self.names, self.params):
            entry = forge["weights"][name]
            for key, tensor in param.state.named_tensors().items():
                tensor.copy_(param.own(entry[key]))
            param.state.step = int(entry["step"])
        self.coefficient = float(forge["coefficient"])
        self.nonfinite_streak = int(forge["nonfinite_streak"])
        self.forge_group.update(state_dict["forge_group"])
        if self.rest is not None:
            self.rest.load_state_dict(state_dict["rest"])
            self.param_groups[1:] = self.rest.param_groups  # load_state_dict made new group dicts
