"""Per-weight FORGE optimizer state: rule, hyperparameters, step count, state tensors, master."""

from __future__ import annotations

from typing import Any

import torch

from forge_megatron.rules import Rule, get_rule

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
WEIGHT_STORES = ("master",)


class ForgeState:
    """What torch.optim keeps in `optimizer.state[p]` plus the param group, for one weight.

    State tensors are fp32, shaped like the weight, on its device; states the hyperparameters do
    not need (e.g. SGD's buffer without momentum) are not allocated. A bf16 weight is updated
    through an fp32 master copy held here (`weight_store="master"`): the rule runs on the master
    and the weight receives its round-to-nearest bf16 value. An fp32 weight needs no master.
    """

    def __init__(self, weight: torch.Tensor, rule: str | type[Rule] = "adamw", *, weight_store: str = "master",
                 **hyperparameters: Any):
        if weight_store not in WEIGHT_STORES:
            raise ValueError(f"unknown weight_store {weight_store!r}; choose one of {WEIGHT_STORES}")
        self.rule = get_rule(rule)
        self.hyperparameters = self.rule.hyperparameters(**hyperparameters)
        self.weight_store = weight_store
        self.step = 0
        self.shape = tuple(weight.shape)
        init = self.rule.state_init(self.hyperparameters)
        self.tensors = {
            name: torch.full(self.shape, float(init.get(name, 0.0)), dtype=torch.float32, device=weight.device)
            for name in self.rule.stored_states(self.hyperparameters)
        }
        self.master: torch.Tensor | None = None
        self.adopt(weight)

    def adopt(self, weight: torch.Tensor, previous: torch.Tensor | None = None) -> None:
        """Follow the weight's device and dtype after a module conversion (.cuda(), .bfloat16()).

        State stays fp32. A weight that became bf16 gets an fp32 master, copied from `previous`
        (its value before the conversion) when given, so no precision is lost; a weight that
        became fp32 takes the master's value and the master is dropped.
        """
        if weight.dtype == torch.float16:
            raise TypeError(
                "fp16 weights are not supported: FORGE applies the update inside backward, before a loss scaler "
                "could unscale the gradient or skip the step; train in bf16 (--bf16) or fp32"
            )
        if weight.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"FORGE weights must be float32 or bfloat16, got {weight.dtype}")
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"state was built for a weight of shape {self.shape}, this weight is {tuple(weight.shape)}")
        for name, tensor in self.tensors.items():
            self.tensors[name] = tensor.to(weight.device)
        if weight.dtype == torch.float32:
            if self.master is not None:
                with torch.no_grad():
                    weight.copy_(self.master.to(weight.device))
            self.master = None
        elif self.master is None:
            source = previous if previous is not None and previous.dtype == torch.float32 else weight
            self.master = source.detach().to(device=weight.device, dtype=torch.float32, copy=True)
        else:
            self.master = self.master.to(weight.device)

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

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this state owns, by checkpoint name (states, and `master` if any)."""
        out = dict(self.tensors)
        if self.master is not None:
            out["master"] = self.master
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.name, "step": self.step, "hyperparameters": dict(self.hyperparameters),
                **{f"state.{k}": v for k, v in self.named_tensors().items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state_dict; everything is checked before anything is copied."""
        if sd["rule"] != self.rule.name:
            raise ValueError(f"checkpoint holds state of rule '{sd['rule']}', this weight uses '{self.rule.name}'")
        for name in self.named_tensors():
            src = sd.get(f"state.{name}")
            if src is None or tuple(src.shape) != self.shape:
                found = None if src is None else tuple(src.shape)
                raise ValueError(f"state '{name}': checkpoint has {found}, expected shape {self.shape}")
        self.set_hyperparameters(**sd["hyperparameters"])
        for name, tensor in self.named_tensors().items():
            tensor.copy_(sd[f"state.{name}"])
        self.step = int(sd["step"])
