"""Per-weight FORGE optimizer state: the rule, its hyperparameters, the step count, the tensors."""

from __future__ import annotations

from typing import Any

import torch

from forge_megatron.rules import Rule, get_rule


class ForgeState:
    """What torch.optim keeps in `optimizer.state[p]` plus the param group, for one weight.

    State tensors are fp32, shaped like the weight, on its device; states the hyperparameters do
    not need (e.g. SGD's buffer without momentum) are not allocated.
    """

    def __init__(self, weight: torch.Tensor, rule: str | type[Rule] = "adamw", **hyperparameters: Any):
        self.rule = get_rule(rule)
        self.hyperparameters = self.rule.hyperparameters(**hyperparameters)
        self.step = 0
        self.shape = tuple(weight.shape)
        init = self.rule.state_init(self.hyperparameters)
        self.tensors = {
            name: torch.full(self.shape, float(init.get(name, 0.0)), dtype=torch.float32, device=weight.device)
            for name in self.rule.stored_states(self.hyperparameters)
        }

    def set_hyperparameters(self, **changes: Any) -> None:
        """Change hyperparameters between steps (e.g. lr and weight decay from a schedule)."""
        hp = self.rule.hyperparameters(**{**self.hyperparameters, **changes})
        if self.rule.stored_states(hp) != tuple(self.tensors):
            raise ValueError(
                f"changing {sorted(changes)} would change the state tensors of rule '{self.rule.name}' "
                f"from {tuple(self.tensors)} to {self.rule.stored_states(hp)}; create a new ForgeState instead"
            )
        self.hyperparameters = hp

    def kernel_states(self, placeholder: torch.Tensor) -> tuple[list[torch.Tensor], list[bool]]:
        """One tensor per declared state (`placeholder` where not stored) and the stored flags."""
        tensors = [self.tensors.get(name, placeholder) for name in self.rule.states]
        return tensors, [name in self.tensors for name in self.rule.states]

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.name, "step": self.step, "hyperparameters": dict(self.hyperparameters),
                **{f"state.{k}": v for k, v in self.tensors.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state_dict; everything is checked before anything is copied."""
        if sd["rule"] != self.rule.name:
            raise ValueError(f"checkpoint holds state of rule '{sd['rule']}', this weight uses '{self.rule.name}'")
        for name in self.tensors:
            src = sd.get(f"state.{name}")
            if src is None or tuple(src.shape) != self.shape:
                found = None if src is None else tuple(src.shape)
                raise ValueError(f"state '{name}': checkpoint has {found}, expected shape {self.shape}")
        self.set_hyperparameters(**sd["hyperparameters"])
        for name, tensor in self.tensors.items():
            tensor.copy_(sd[f"state.{name}"])
        self.step = int(sd["step"])
