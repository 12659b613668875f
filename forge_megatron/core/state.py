"""Per-weight FORGE optimizer state: rule, hyperparameters, step count, state tensors, master.

Weight stores (how a weight's new fp32 value, computed in registers, is written back):
  fp32 weights        -> stored as is;
  bf16, store=master  -> the rule runs on an fp32 master held here; the weight is its
                         round-to-nearest bf16 copy;
  bf16, store=sr      -> no master: the fp32 result is stochastically rounded to bf16;
  bf16, store=rne     -> no master, rounded to nearest: small updates are lost (the failure mode
                         stochastic rounding fixes; kept for studies).
State dtypes: fp32; bf16 (written with stochastic rounding, so small updates are not lost);
int8 (one code per element plus one fp32 scale per QBLOCK elements of a row, see numerics.py).
Memory per parameter is `bytes_per_parameter()`; docs/numerics.md has the table.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch

from forge_megatron.core.numerics import QBLOCK, code_tables, dequantize_torch, num_blocks
from forge_megatron.core.plan import ShardPlacement
from forge_megatron.core.rules import Rule, get_rule

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
WEIGHT_STORES = ("master", "sr", "rne")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}


class ForgeState:
    """What torch.optim keeps in `optimizer.state[p]` plus the param group, for one weight.

    State tensors are shaped like the weight (int8 states add a `<name>.scale` tensor of one
    scale per QBLOCK columns), on its device; states the hyperparameters do not need (e.g. SGD's
    buffer without momentum) are not allocated. `seed`, `weight_id` and `placement` key the random
    bits of stochastic rounding. `weight_id` is unique by construction (a process-wide counter)
    unless given: training sets it to the weight's position in the model, the same on every rank
    and at every parallel layout. `placement` (plan.ShardPlacement) says where this shard's
    elements sit in the unsharded weight, so a tensor-parallel shard draws the bits its elements
    draw unsharded.
    """

    _ids = itertools.count(2**20)  # ids the model's own (0, 1, ...) never reach

    def __init__(self, weight: torch.Tensor, rule: str | type[Rule] = "adamw", *, weight_store: str = "master",
                 state_dtype: str = "fp32", seed: int = 0, weight_id: int | None = None, **hyperparameters: Any):
        if weight_store not in WEIGHT_STORES:
            raise ValueError(f"unknown weight_store {weight_store!r}; choose one of {WEIGHT_STORES}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"unknown state_dtype {state_dtype!r}; choose one of {tuple(STATE_DTYPES)}")
        self.rule = get_rule(rule)
        self.hyperparameters = self.rule.hyperparameters(**hyperparameters)
        self.weight_store = weight_store
        self.state_dtype = state_dtype
        self.seed = int(seed)
        self.weight_id = next(ForgeState._ids) if weight_id is None else int(weight_id)
        self.step = 0
        self.shape = tuple(weight.shape)
        self.placement = ShardPlacement.whole(self.shape)
        init = self.rule.state_init(self.hyperparameters)
        self.tensors: dict[str, torch.Tensor] = {}
        for name in self._kept(self.hyperparameters):
            self.tensors.update(self._allocate(name, float(init.get(name, 0.0)), weight.device))
        self.workspace: dict[str, torch.Tensor] = {}  # the rule's workspace states, during a step only
        self.master: torch.Tensor | None = None
        self.own_table = None  # a standalone step's device slots (update.py), made at its first step
        self.adopt(weight)

    def _kept(self, hp) -> tuple[str, ...]:
        """The stored states that persist between steps (the rule's workspace states do not)."""
        return tuple(n for n in self.rule.stored_states(hp) if n not in self.rule.workspace_states)

    def _allocate(self, name: str, value: float, device) -> dict[str, torch.Tensor]:
        """A state tensor at `value` (and its int8 block scales) in this state's dtype."""
        if self.state_dtype != "int8":
            return {name: torch.full(self.shape, value, dtype=STATE_DTYPES[self.state_dtype], device=device)}
        if value != 0.0:
            raise ValueError(f"int8 states start at zero; rule '{self.rule.name}' initializes '{name}' to {value}: "
                             "use state_dtype='bf16' or 'fp32'")
        return {name: torch.full(self.shape, code_of_zero(self.rule, name), dtype=torch.uint8, device=device),
                f"{name}.scale": torch.ones(self.shape[0], num_blocks(self.shape[1]), dtype=torch.float32,
                                            device=device)}

    def open_workspace(self, device) -> None:
        """Allocate the rule's stored workspace states for a step that applies the rule (kept until
        taken, so a standalone step's consumer can read them after the pass)."""
        for name in self.rule.stored_states(self.hyperparameters):
            if name in self.rule.workspace_states and name not in self.workspace:
                self.workspace.update(self._allocate(name, 0.0, device))

    def take_workspace(self, name: str) -> torch.Tensor:
        """A workspace state's values in fp32, freeing the workspace's own tensors."""
        value = self.values(name)
        self.workspace.pop(name)
        self.workspace.pop(f"{name}.scale", None)
        return value

    def values(self, name: str) -> torch.Tensor:
        """A state's (or workspace state's) values in fp32 (int8 codes dequantized)."""
        tensors = {**self.tensors, **self.workspace}
        tensor = tensors[name]
        if self.state_dtype != "int8":
            return tensor.float()
        table = code_tables()[0 if name not in self.rule.nonnegative_states else 1].to(tensor.device)
        pad = -self.shape[1] % QBLOCK
        codes = torch.nn.functional.pad(tensor, (0, pad)) if pad else tensor
        return dequantize_torch(codes, tensors[f"{name}.scale"], table)[:, :self.shape[1]]

    def adopt(self, weight: torch.Tensor, previous: torch.Tensor | None = None) -> None:
        """Follow the weight's device and dtype after a module conversion (.cuda(), .bfloat16()).

        States keep their dtype. A weight that became bf16 under the master store gets an fp32
        master, copied from `previous` (its value before the conversion) when given, so no
        precision is lost; a weight that became fp32 takes the master's value, which is dropped.
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
        if weight.dtype == torch.float32 or self.weight_store != "master":
            if self.master is not None:
                with torch.no_grad():
                    weight.copy_(self.master.to(weight.device))
            self.master = None
        elif self.master is None:
            source = previous if previous is not None and previous.dtype == torch.float32 else weight
            self.master = source.detach().to(device=weight.device, dtype=torch.float32, copy=True)
        else:
            self.master = self.master.to(weight.device)

    def rows(self, start: int, stop: int) -> "ForgeState":
        """The state of rows [start, stop) only (copies: the rest can be freed), its placement and
        ids those of the rows in the whole weight, so that its updates are the whole state's there
        (a data-parallel owner block)."""
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are not rows of a state of shape {self.shape}")
        block = copy.copy(self)
        block.shape = (stop - start, self.shape[1])
        block.placement = self.placement.rows(start, stop)
        block.tensors = {name: t[start:stop].clone() for name, t in self.tensors.items()}
        block.workspace = {}
        block.master = None if self.master is None else self.master[start:stop].clone()
        block.hyperparameters = dict(self.hyperparameters)
        block.own_table = None
        return block

    def set_hyperparameters(self, **changes: Any) -> None:
        """Change hyperparameters between steps (e.g. lr and weight decay from a schedule)."""
        hp = self.rule.hyperparameters(**{**self.hyperparameters, **changes})
        if self.rule.stored_states(hp) != self.rule.stored_states(self.hyperparameters):
            raise ValueError(
                f"changing {sorted(changes)} would change the state tensors of rule '{self.rule.name}' "
                f"from {self.rule.stored_states(self.hyperparameters)} to {self.rule.stored_states(hp)}; create a "
                "new ForgeState instead"
            )
        self.hyperparameters = hp

    def state_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.tensors if not n.endswith(".scale"))

    def kernel_states(self, placeholder: torch.Tensor):
        """Per declared state: the tensor (`placeholder` where not stored), its int8 scales
        (`placeholder` otherwise), whether it is stored, and whether it is signed."""
        names, held = self.rule.states, {**self.tensors, **self.workspace}
        tensors = [held.get(n, placeholder) for n in names]
        scales = [held.get(f"{n}.scale", placeholder) for n in names]
        stored = [n in held for n in names]
        signed = [n not in self.rule.nonnegative_states for n in names]
        return tensors, scales, stored, signed

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this state owns, by checkpoint name (states, scales, `master` if any)."""
        out = dict(self.tensors)
        if self.master is not None:
            out["master"] = self.master
        return out

    def bytes_per_parameter(self, weight: torch.Tensor) -> float:
        """Bytes per weight element actually allocated: the weight, the master and the states."""
        total = weight.element_size() * weight.numel()
        total += sum(t.element_size() * t.numel() for t in self.named_tensors().values())
        return total / weight.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.name, "step": self.step, "hyperparameters": dict(self.hyperparameters),
                **{f"state.{k}": v for k, v in self.named_tensors().items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state_dict; everything is checked before anything is copied."""
        if sd["rule"] != self.rule.name:
            raise ValueError(f"checkpoint holds state of rule '{sd['rule']}', this weight uses '{self.rule.name}'")
        for name, tensor in self.named_tensors().items():
            src = sd.get(f"state.{name}")
            if src is None or src.shape != tensor.shape:
                found = None if src is None else tuple(src.shape)
                raise ValueError(f"state '{name}': checkpoint has {found}, expected shape {tuple(tensor.shape)}")
        self.set_hyperparameters(**sd["hyperparameters"])
        for name, tensor in self.named_tensors().items():
            tensor.copy_(sd[f"state.{name}"])
        self.step = int(sd["step"])


def code_of_zero(rule: type[Rule], state: str) -> int:
    """The int8 code whose table value is 0 (signed tables put it in the middle)."""
    table = code_tables()[0 if state not in rule.nonnegative_states else 1]
    return int((table == 0).nonzero()[0])
