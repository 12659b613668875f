"""A FORGE-covered weight as a layer and the training loop see it.

`ForgeConfig` says how to cover a weight (rule, hyperparameters, weight store, backend); a
`ForgeParam` is one covered weight: its optimizer state, the step's inputs the training loop sets
(the gradient scale, or a StepTable's slots) and the by-products it reads (grad-norm and overflow
partials).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from forge_megatron.core.owner import Collectives, OwnerRows
from forge_megatron.core.plan import TileConfig
from forge_megatron.core.running_clip import RunningClip
from forge_megatron.core.state import ForgeState, GroupedForgeState
from forge_megatron.core.table import WIDTH, StepSlots
from forge_megatron.core.update import (
    Accumulation,
    UpdateResult,
    apply_accumulated,
    fused_update,
    fused_update_grouped,
    step_tiles,
)

ACCUMULATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ForgeConfig:
    """How FORGE covers a layer's weight (shared by every layer built from one spec)."""

    rule: str = "adamw"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    weight_store: str = "master"
    state_dtype: str = "fp32"
    seed: int = 0  # keys stochastic rounding, with the weight's id and the step
    backend: str | None = None
    tile_config: TileConfig | None = None
    accumulation_dtype: str = "fp32"  # the gradient accumulation buffer's, over several micro-batches (or bf16)


class ForgeParam:
    """One covered weight: its FORGE state plus what the training loop exchanges with it.

    Standalone (a layer used on its own), each backward is one step with `grad_scale`. Bound to a
    StepTable (`bind`, done by a training loop's controller for all of a model's weights), a step
    reads its scale and coefficients from the table and writes its by-products there, and
    `begin_iteration(k)` says how many micro-batches the iteration has: the first k - 1 backward
    passes add their gradient into an accumulation buffer (allocated at first need, in
    `config.accumulation_dtype`), the k-th runs the rule on the sum. At most one update is applied
    per iteration: another backward is an error, never a second step. With apply=False (two-pass
    clipping) the k-th writes the total and its by-products, for `apply_accumulated`; at k = 1 only
    with `hold` (a loop that cannot replay the micro-batch), else it writes the by-products alone.
    """

    def __init__(self, weight: torch.Tensor, config: ForgeConfig):
        if getattr(weight, "_forge_param", None) is not None:
            raise ValueError(
                "this weight is already covered by another FORGE layer: weights shared between layers "
                "(tied weights) would be updated twice per step; cover only one of them, or neither"
            )
        if config.accumulation_dtype not in ACCUMULATION_DTYPES:
            raise ValueError(f"unknown accumulation dtype {config.accumulation_dtype!r}; choose one of "
                             f"{tuple(ACCUMULATION_DTYPES)}")
        self.config = config
        # Deferred: allocated at first use (at the latest the first iteration), or, data-parallel,
        # only this rank's rows of it (`own_rows`), so the whole shard's state never exists there.
        self.state = self._new_state(weight, config)
        self.grad_scale: float | torch.Tensor = 1.0  # standalone only
        self.apply = True  # False: a norms-only pass (two-pass clipping); nothing is written
        self.hold = False  # with apply=False, keep even one micro-batch's gradient for `apply_accumulated`
        self.materialize = False  # debug: keep the last weight gradient in `self.grad` (exactness tests)
        self.grad: torch.Tensor | None = None
        self.result: UpdateResult | None = None  # the last step's by-products
        self.slots: StepSlots | None = None
        self.running_clip: RunningClip | None = None  # progressive clipping: sets the scale of an update in backward
        self.buffer: torch.Tensor | None = None  # the accumulation buffer (several micro-batches, or data-parallel)
        self.micro_batches = 1  # in this iteration (bound only)
        self.empty_backwards = 0  # backward passes without a token in this iteration (bound only)
        self.backwards = 0  # backward passes run in this iteration (bound only)
        self.updates = 0  # updates applied in this iteration (bound only)
        self.owner: OwnerRows | None = None  # data-parallel: the rows this rank owns (`own_rows`)
        self._gradient_state: ForgeState | None = None  # data-parallel: keys the gradient pass
        self._gradient_slots: StepSlots | None = None  # data-parallel: the gradient pass's, on the device
        self.owner_sums = False  # data-parallel: micro-batches summed in the owner's rows (`own_rows`)
        self.collectives: Collectives | None = None  # data-parallel: where its collectives are issued (`own_rows`)
        self.grad_dtype = config.accumulation_dtype  # data-parallel: the reduce-scattered gradient's (`own_rows`)
        weight._forge_param = self

    @staticmethod
    def _new_state(weight: torch.Tensor, config: ForgeConfig) -> ForgeState:
        return ForgeState(weight, config.rule, weight_store=config.weight_store, state_dtype=config.state_dtype,
                          seed=config.seed, defer=True, **config.hyperparameters)

    def own_rows(self, weight: torch.Tensor, group, owner_sums: bool = False, grad_dtype: str | None = None,
                 collectives: Collectives | None = None, scale: float | None = None) -> None:
        """Train with the data-parallel `group`: this rank keeps the optimizer state (and master)
        of its block of rows only, and each step's gradient is reduce-scattered to the blocks'
        owners, who update them, and all-gathered back (core/owner.py). `owner_sums`: over several
        micro-batches, reduce-scatter each one's gradient and sum the owner's rows in fp32 (1/D of
        the buffer, one reduce-scatter per micro-batch) instead of summing a whole local buffer.
        `grad_dtype` (fp32 or bf16, stochastically rounded; by default the accumulation dtype):
        the local gradient's, as it is reduce-scattered; a local sum over several micro-batches is
        the accumulation buffer itself, which must then have that dtype. `collectives`: the
        model's (shared by its weights, to overlap one weight's reduce-scatter with the next
        weight's gradient); by default this weight's own, synchronous. `scale`: each rank's gradient's
        factor before the owners sum it (OwnerRows.reduce_scatter; by default the mean's 1/size)."""
        if self.state.rule.weight_step is not None:
            raise ValueError(f"rule '{self.state.rule.name}' updates each whole weight after its pass, while "
                             "data-parallel owners hold blocks of its rows: train it without data parallelism")
        grad_dtype = grad_dtype or self.config.accumulation_dtype
        if grad_dtype not in ACCUMULATION_DTYPES:
            raise ValueError(f"unknown data-parallel gradient dtype {grad_dtype!r}; choose one of "
                             f"{tuple(ACCUMULATION_DTYPES)}")
        owner = OwnerRows.of(weight.shape[0], group, scale=scale)
        # The gradient pass computes the whole shard's gradient without a rule: a state with no
        # tensors but the weight's ids and placement, which key the bf16 buffer's rounding.
        gradient_state = ForgeState(weight, "sgd", weight_store="sr", seed=self.state.seed,
                                    weight_id=self.state.weight_id, momentum=0.0)
        gradient_state.placement = self.state.placement
        self.state, self.owner, self._gradient_state = self.state.rows(owner.start, owner.stop), owner, gradient_state
        self.owner_sums, self.grad_dtype = owner_sums, grad_dtype
        self.collectives = collectives or Collectives()

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of `weight` this rank updates (all of them without data parallelism)."""
        return weight if self.owner is None else weight[self.owner.start:self.owner.stop]

    def shard_tensors(self, gather: bool = True) -> dict[str, torch.Tensor]:
        """The state tensors of the whole (tensor-parallel) shard, by checkpoint name: this rank's,
        or with data parallelism every owner's rows gathered (so that a checkpoint loads at any
        data-parallel size); with gather=False, uninitialized tensors of those shapes for a load
        to fill (`own` then takes this rank's rows)."""
        tensors = self.state.named_tensors()
        if self.owner is None:
            return tensors
        if not gather:
            return {name: t.new_empty((self.owner.size * t.shape[0], *t.shape[1:])) for name, t in tensors.items()}
        return {name: self.owner.gather(t) for name, t in tensors.items()}

    def own(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-shard state tensor (`shard_tensors`); a tensor of this rank's
        block only is returned as it is."""
        if self.owner is None or tensor.shape[0] != self.owner.size * (self.owner.stop - self.owner.start):
            return tensor
        return tensor[self.owner.start:self.owner.stop]

    def adopt(self, weight: torch.Tensor, previous: torch.Tensor | None = None) -> None:
        """The state follows a module conversion of the weight (ForgeState.adopt), on its rows."""
        self.state.adopt(self.rows(weight), previous=None if previous is None else self.rows(previous))
        if self._gradient_state is not None:
            self._gradient_state.adopt(weight)

    def bind(self, slots: StepSlots) -> None:
        self.slots = slots

    def begin_iteration(self, micro_batches: int = 1, hold: bool = False) -> None:
        """A new iteration of `micro_batches` backward passes; `hold`: its gradient is summed in the
        buffer even at one micro-batch (applied later with `apply_accumulated`)."""
        if (self.owner is not None and not self.owner_sums and micro_batches > 1
                and self.grad_dtype != self.config.accumulation_dtype):
            raise ValueError(f"a data-parallel step summed in a local buffer reduce-scatters that buffer: the "
                             f"accumulation dtype ({self.config.accumulation_dtype}) must be the data-parallel "
                             f"gradient dtype ({self.grad_dtype}), or sum in the owner's rows")
        self.state.materialize()  # a deferred state's tensors exist before the iteration's first forward
        self.micro_batches, self.backwards, self.updates, self.hold = micro_batches, 0, 0, hold
        self.empty_backwards = 0
        if self.owner is not None:
            self.buffer = None  # an owner's rows held for an update that was skipped

    def step(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> None:
        """This weight's part of one backward pass: accumulate, or the fused wgrad + optimizer step."""
        bound = self.slots is not None
        if bound and (self.backwards >= self.micro_batches or (self.apply and self.updates)):
            raise RuntimeError(f"FORGE: a covered weight's backward ran {self.backwards + 1} times in an iteration of "
                               f"{self.micro_batches} micro-batches (a second update would be applied); each "
                               "iteration must run one backward per micro-batch")
        self.empty_backwards += self._empty_experts(x)
        if self.owner is not None:
            return self._data_parallel_step(x, dy, weight)
        accumulate = None
        if bound and (self.micro_batches > 1 or (self.hold and not self.apply)):
            accumulate = Accumulation(self._buffer(weight), self.backwards, self.micro_batches)
        last = accumulate is None or accumulate.last
        clip = self.running_clip if bound and self.apply and last else None
        if clip is not None:
            clip.before(self.slots)
        result = self._fused_update(x, dy, weight, grad_scale=self.grad_scale if not bound else 1.0,
                                    materialize=self.materialize and self.apply and last, apply=self.apply,
                                    backend=self.config.backend, config=self.config.tile_config, slots=self.slots,
                                    accumulate=accumulate)
        if clip is not None:
            clip.after(self.slots)
        self.backwards += 1
        if last:
            self.grad, self.result = result.grad, result
            self.updates += self.apply

    def _empty_experts(self, x: torch.Tensor) -> int:
        """1 for a backward without tokens (an expert nothing was routed to: a zero gradient)."""
        return int(x.numel() == 0)

    def _fused_update(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, **options) -> UpdateResult:
        return fused_update(x, dy, weight, self.state, **options)

    def _data_parallel_step(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> None:
        """This micro-batch's gradient of the whole shard, from a gradient-only kernel pass, summed
        over the step's micro-batches either in a whole local buffer that is reduce-scattered after
        the last (`owner_sums` False) or, reduce-scattered at once, in the owner's rows (fp32); after
        the last, the rule on this rank's rows and the all-gather (`_receive`, when the
        reduce-scatter has arrived: at once, or with overlapping collectives later). With
        apply=False (two-pass clipping) the owner's rows are held, their by-products written, until
        `apply_accumulated`. Nothing else outlives the step."""
        if self.slots is None:
            raise RuntimeError("FORGE: a data-parallel weight steps only within a training loop's iteration "
                               "(bound to a StepTable)")
        slots = self._gradient_pass_slots(weight)
        # The bf16 buffer's rounding is keyed by the step and the micro-batch, a stream of its own
        # on each data-parallel rank.
        micro = self.owner.rank * self.micro_batches + self.backwards
        if self.owner_sums:  # one micro-batch's gradient at a time
            window = torch.empty(weight.shape, dtype=ACCUMULATION_DTYPES[self.grad_dtype], device=weight.device)
            accumulate = Accumulation(window, 0, 1, micro=micro)
        else:
            accumulate = Accumulation(self._buffer(weight), self.backwards, self.micro_batches, micro=micro)
        fused_update(x, dy, weight, self._gradient_state, apply=False, backend=self.config.backend,
                     config=self.config.tile_config, slots=slots, accumulate=accumulate)
        self.backwards += 1
        last = self.backwards == self.micro_batches
        if self.owner_sums or last:
            if not self.owner_sums:
                self.buffer = None  # the local sum becomes the owner's rows
            self.collectives.reduce_scatter(self.owner, accumulate.buffer,
                                            lambda block: self._receive(block, weight, last))

    def _gradient_pass_slots(self, weight: torch.Tensor) -> StepSlots:
        """The gradient pass's scalars (scale 1, this step) and by-products, kept on the weight's
        device and written there: no host-to-device copy in the backward pass."""
        if self._gradient_slots is None or self._gradient_slots.coefs.device != weight.device:
            tiles = step_tiles(weight, self._gradient_state, self.config.backend, self.config.tile_config)
            coefs = torch.zeros(WIDTH, dtype=torch.float32, device=weight.device)
            coefs[0] = 1.0
            self._gradient_slots = StepSlots(coefs, torch.zeros(tiles, 2, dtype=torch.float32, device=weight.device))
        self._gradient_slots.coefs[1].fill_(float(self.state.step + 1))
        return self._gradient_slots

    def _receive(self, block: torch.Tensor, weight: torch.Tensor, last: bool) -> None:
        """This rank's rows of a reduce-scattered gradient: summed with the step's earlier
        micro-batches' (owner_sums), and after the last the update (or, held, its by-products)."""
        if self.owner_sums and self.buffer is not None:
            self.buffer.add_(block)
        else:
            self.buffer = block.float() if self.owner_sums and self.micro_batches > 1 else block
        if not last:
            return
        if self.apply:
            return self.apply_accumulated(weight)
        self.result = apply_accumulated(self.rows(weight), self.state, self.buffer, apply=False,
                                        backend=self.config.backend, config=self.config.tile_config, slots=self.slots)

    def apply_accumulated(self, weight: torch.Tensor) -> None:
        """The update from the gradient held in the buffer: a norms-only pass's sum over several
        micro-batches (two-pass clipping), or the owner's rows of the step's reduced gradient, which
        are then freed and all-gathered (complete once `collectives.wait()` returns)."""
        if self.updates:
            raise RuntimeError("FORGE: this iteration's update was already applied")
        self.result = apply_accumulated(self.rows(weight), self.state, self.buffer, materialize=self.materialize,
                                        backend=self.config.backend, config=self.config.tile_config, slots=self.slots)
        self.grad = self.result.grad
        self.updates += 1
        if self.owner is not None:
            self.buffer = None
            self.collectives.all_gather(self.owner, weight)

    def free_buffer(self) -> None:
        self.buffer = None

    def _buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """The local sum's buffer (the local gradient's, with data parallelism at one micro-batch)."""
        dtype = ACCUMULATION_DTYPES[self.grad_dtype if self.owner is not None else self.config.accumulation_dtype]
        if (self.buffer is None or self.buffer.shape != weight.shape or self.buffer.device != weight.device
                or self.buffer.dtype != dtype):
            self.buffer = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        return self.buffer


class GroupedForgeParam(ForgeParam):
    """E experts' weights of one kind stacked [E, out, in] (a grouped experts module's, e.g. every
    local expert's linear_fc1) as one covered weight: one GroupedForgeState, and per backward one
    fused step for all experts (update.fused_update_grouped, one kernel launch), on the tokens
    grouped by expert: expert e's are rows offsets[e]:offsets[e + 1] of x and dy. Each expert takes
    the step its own ForgeParam takes on the per-expert path (the same ids: `state.weight_ids`).
    Accumulation over micro-batches and held gradients (two-pass clipping) work as for one weight,
    with a stacked buffer; data-parallel owner rows do not (`own_rows` refuses)."""

    def __init__(self, weight: torch.Tensor, config: ForgeConfig):
        self._offsets: torch.Tensor | None = None
        super().__init__(weight, config)

    @staticmethod
    def _new_state(weight: torch.Tensor, config: ForgeConfig) -> GroupedForgeState:
        return GroupedForgeState(weight, config.rule, weight_store=config.weight_store,
                                 state_dtype=config.state_dtype, seed=config.seed, **config.hyperparameters)

    @property
    def experts(self) -> int:
        return self.state.experts

    def own_rows(self, weight: torch.Tensor, group, *args, **kwargs) -> None:
        raise ValueError("a grouped experts weight cannot be split into data-parallel owner rows (each rank would own "
                         "rows of every expert); use an expert-data-parallel size of 1, or drop --moe-grouped-gemm "
                         "(the per-expert path shards each expert's rows)")

    def step(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> None:
        """All experts' part of one backward pass; `offsets` [E + 1] their token ranges (host or device)."""
        self._offsets = offsets
        try:
            super().step(x, dy, weight)
        finally:
            self._offsets = None

    def _empty_experts(self, x: torch.Tensor) -> int:
        counts = self._offsets[1:] - self._offsets[:-1]
        return int((counts == 0).sum())

    def _fused_update(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, **options) -> UpdateResult:
        return fused_update_grouped(x, dy, self._offsets, weight, self.state, **options)

    def expert(self, e: int) -> "ExpertPart":
        return ExpertPart(self, e)


class ExpertPart:
    """Expert e's part of a GroupedForgeParam as a checkpoint sees one per-expert ForgeParam: its
    config, and a state whose tensors are views of the stacked ones (loading writes through)."""

    def __init__(self, grouped: GroupedForgeParam, e: int):
        self.grouped, self.e, self.config, self.owner = grouped, e, grouped.config, None
        self.state = _ExpertStateView(grouped.state, e)

    def shard_tensors(self, gather: bool = True) -> dict[str, torch.Tensor]:
        return self.state.named_tensors()

    def own(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class _ExpertStateView:
    """Expert e's view of a GroupedForgeState: rule, hyperparameters, step (the experts' common
    one) and its slice of every stacked tensor."""

    def __init__(self, state: GroupedForgeState, e: int):
        self._state, self._e = state, e

    rule = property(lambda self: self._state.rule)
    hyperparameters = property(lambda self: self._state.hyperparameters)
    state_dtype = property(lambda self: self._state.state_dtype)

    @property
    def step(self) -> int:
        return self._state.step

    @step.setter
    def step(self, value: int) -> None:
        self._state.step = value

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t[self._e] for name, t in self._state.named_tensors().items()}
