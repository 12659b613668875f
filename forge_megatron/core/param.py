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

from forge_megatron.core.plan import TileConfig
from forge_megatron.core.state import ForgeState
from forge_megatron.core.table import StepSlots
from forge_megatron.core.update import UpdateResult, fused_update


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


class ForgeParam:
    """One covered weight: its FORGE state plus what the training loop exchanges with it.

    Standalone (a layer used on its own), each backward is one step with `grad_scale`. Bound to a
    StepTable (`bind`, done by a training loop's controller for all of a model's weights), a step
    reads its scale and coefficients from the table and writes its by-products there, and at most
    one update is applied per iteration (`begin_iteration`): a second one is an error, never a
    second step.
    """

    def __init__(self, weight: torch.Tensor, config: ForgeConfig):
        if getattr(weight, "_forge_param", None) is not None:
            raise ValueError(
                "this weight is already covered by another FORGE layer: weights shared between layers "
                "(tied weights) would be updated twice per step; cover only one of them, or neither"
            )
        self.config = config
        self.state = ForgeState(weight, config.rule, weight_store=config.weight_store, state_dtype=config.state_dtype,
                                seed=config.seed, **config.hyperparameters)
        self.grad_scale: float | torch.Tensor = 1.0  # standalone only
        self.apply = True  # False: a norms-only backward (two-pass clipping); nothing is written
        self.materialize = False  # debug: keep the last weight gradient in `self.grad` (exactness tests)
        self.grad: torch.Tensor | None = None
        self.result: UpdateResult | None = None  # the last step's by-products
        self.slots: StepSlots | None = None
        self.updates = 0  # updates applied in this iteration (bound only)
        weight._forge_param = self

    def bind(self, slots: StepSlots) -> None:
        self.slots = slots

    def begin_iteration(self) -> None:
        self.updates = 0

    def step(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> None:
        """The fused wgrad + optimizer step for this weight."""
        if self.apply and self.slots is not None and self.updates:
            raise RuntimeError("FORGE: a covered weight's backward ran twice in one iteration (a second update "
                               "would be applied); each iteration must run one backward per micro-batch")
        result = fused_update(x, dy, weight, self.state, grad_scale=self.grad_scale if self.slots is None else 1.0,
                              materialize=self.materialize and self.apply, apply=self.apply,
                              backend=self.config.backend, config=self.config.tile_config, slots=self.slots)
        self.grad, self.result = result.grad, result
        if self.apply:
            self.updates += 1
