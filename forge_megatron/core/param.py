"""A FORGE-covered weight as a layer and the training loop see it.

`ForgeConfig` says how to cover a weight (rule, hyperparameters, weight store, backend); a
`ForgeParam` is one covered weight: its optimizer state, the per-step input the training loop
sets (the gradient scale) and the per-step outputs it reads (grad-norm and overflow partials).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from forge_megatron.core.plan import TileConfig
from forge_megatron.core.state import ForgeState
from forge_megatron.core.update import fused_update


@dataclass(frozen=True)
class ForgeConfig:
    """How FORGE covers a layer's weight (shared by every layer built from one spec)."""

    rule: str = "adamw"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    weight_store: str = "master"
    state_dtype: str = "fp32"
    seed: int = 0  # keys stochastic rounding, with the layer index and the step
    backend: str | None = None
    tile_config: TileConfig | None = None


class ForgeParam:
    """One covered weight: its FORGE state plus what the training loop exchanges with it."""

    def __init__(self, weight: torch.Tensor, config: ForgeConfig):
        if getattr(weight, "_forge_param", None) is not None:
            raise ValueError(
                "this weight is already covered by another FORGE layer: weights shared between layers "
                "(tied weights) would be updated twice per step; cover only one of them, or neither"
            )
        self.config = config
        self.state = ForgeState(weight, config.rule, weight_store=config.weight_store, state_dtype=config.state_dtype,
                                seed=config.seed, **config.hyperparameters)
        self.grad_scale: float | torch.Tensor = 1.0
        self.apply = True  # False: a norms-only backward (two-pass clipping); nothing is written
        self.materialize = False  # debug: keep the last weight gradient in `self.grad` (exactness tests)
        self.grad: torch.Tensor | None = None
        weight._forge_param = self
        self.reset_stats()

    def reset_stats(self) -> None:
        self.sumsq: torch.Tensor | float = 0.0
        self.nonfinite: torch.Tensor | int = 0
        self.updates = 0

    def step(self, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> None:
        """The fused wgrad + optimizer step for this weight; accumulates the by-products."""
        result = fused_update(x, dy, weight, self.state, grad_scale=self.grad_scale,
                              materialize=self.materialize and self.apply, apply=self.apply,
                              backend=self.config.backend, config=self.config.tile_config)
        self.grad = result.grad
        self.sumsq = self.sumsq + result.sumsq
        self.nonfinite = self.nonfinite + result.nonfinite
        self.updates += 1
