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

from forge_megatron.core.numerics import code_tables, num_blocks
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
    draw unsharded. With `defer` nothing is allocated until the tensors are first used
    (`materialize`), and `rows` then allocates only its block (a data-parallel owner's).
    """

    _ids = itertools.count(2**20)  # ids the model's own (0, 1, ...) never reach

    def __init__(self, weight: torch.Tensor, rule: str | type[Rule] = "adamw", *, weight_store: str = "master",
                 state_dtype: str = "fp32", seed: int = 0, weight_id: int | None = None, defer: bool = False,
                 **hyperparameters: Any):
        self._configure(rule, weight_store, state_dtype, seed, hyperparameters)
        self.weight_id = next(ForgeState._ids) if weight_id is None else int(weight_id)
        self.matrix_layout = None  # how a whole-matrix rule sees this shard (core/muon.py MatrixLayout; None: alone)
        self._allocate(weight, defer)

    def _configure(self, rule, weight_store: str, state_dtype: str, seed: int, hyperparameters: dict) -> None:
        if weight_store not in WEIGHT_STORES:
            raise ValueError(f"unknown weight_store {weight_store!r}; choose one of {WEIGHT_STORES}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"unknown state_dtype {state_dtype!r}; choose one of {tuple(STATE_DTYPES)}")
        self.rule = get_rule(rule)
        if self.rule.weight_step is not None and state_dtype == "int8":
            raise ValueError(f"rule '{self.rule.name}' updates the whole matrix from its states after the pass: keep "
                             "them in fp32 or bf16 (state_dtype / --forge-state-dtype), not int8")
        self.hyperparameters = self.rule.hyperparameters(**hyperparameters)
        self.weight_store = weight_store
        self.state_dtype = state_dtype
        self.seed = int(seed)

    def _allocate(self, weight: torch.Tensor, defer: bool) -> None:
        """The state tensors, shaped like the weight ([out, in], or [E, out, in] for stacked experts:
        the int8 scales then [E, out, blocks]), and the master (`adopt`); or, with `defer`, nothing yet."""
        self.step = 0
        self.shape = tuple(weight.shape)
        self.placement = ShardPlacement.whole(self.shape[-2:])
        init = self.rule.state_init(self.hyperparameters)
        # (name, initial value) of each kept state: the tensors are made from these constants.
        self._initial: list[tuple[str, float]] = []
        for name in self._kept(self.hyperparameters):
            value = float(init.get(name, 0.0))
            if self.state_dtype == "int8" and value != 0.0:
                raise ValueError(f"int8 states start at zero; rule '{self.rule.name}' initializes '{name}' to "
                                 f"{value}: use state_dtype='bf16' or 'fp32'")
            self._initial.append((name, value))
        self._tensors: dict[str, torch.Tensor] = {}
        self._master: torch.Tensor | None = None
        self._deferred: torch.Tensor | None = None  # the weight a deferred state is made from (`defer`)
        self.workspace: dict[str, torch.Tensor] = {}  # the rule's workspace states, during a step only
        self.own_table = None  # a standalone step's device slots (update.py), made at its first step
        if defer:
            # Nothing allocated yet: the tensors, and the master copied from this tensor of the
            # weight (a module conversion that replaces the parameter's data then goes through
            # `adopt`, as for a state made at once), are made at their first use, or only a block
            # of their rows (`rows`): a data-parallel owner never holds the whole weight's state,
            # not even while the model is being set up.
            self._check_weight(weight)
            self._deferred = weight.detach()
            return
        self._tensors = self._initial_tensors(weight, 0, self.shape[0])
        self.adopt(weight)

    def _initial_tensors(self, weight: torch.Tensor, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The state tensors of rows [start, stop) at their initial values, on the weight's device."""
        shape = (stop - start, *self.shape[1:])
        tensors = {}
        for name, value in self._initial:
            tensors.update(self._filled(name, value, shape, weight.device))
        return tensors

    def _filled(self, name: str, value: float, shape: tuple[int, ...], device) -> dict[str, torch.Tensor]:
        """A state tensor of `shape` at `value` in this state's dtype (int8: its code of zero and the
        block scales)."""
        if self.state_dtype != "int8":
            return {name: torch.full(shape, value, dtype=STATE_DTYPES[self.state_dtype], device=device)}
        return {name: torch.full(shape, code_of_zero(self.rule, name), dtype=torch.uint8, device=device),
                f"{name}.scale": torch.ones(*shape[:-1], num_blocks(shape[-1]), dtype=torch.float32, device=device)}

    def _kept(self, hp) -> tuple[str, ...]:
        """The stored states that persist between steps (the rule's workspace states do not)."""
        return tuple(n for n in self.rule.stored_states(hp) if n not in self.rule.workspace_states)

    def open_workspace(self, device) -> None:
        """Allocate the rule's workspace states (zero) for a step that applies the rule: the pass
        writes them, and they stay until the step's consumer takes them (`take_workspace`)."""
        for name in self.rule.stored_states(self.hyperparameters):
            if name in self.rule.workspace_states and name not in self.workspace:
                self.workspace.update(self._filled(name, 0.0, self.shape, device))

    def take_workspace(self, name: str) -> torch.Tensor:
        """A workspace state's values in fp32, the workspace's own tensor freed."""
        return self.workspace.pop(name).float()

    def _initial_master(self, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) of the master a new state takes from `weight` (None if it has none)."""
        if weight.dtype == torch.float32 or self.weight_store != "master":
            return None
        return weight[start:stop].detach().to(device=weight.device, dtype=torch.float32, copy=True)

    def materialize(self) -> None:
        """Allocate a deferred state's tensors and master (from its weight as it is now); nothing
        if they are already allocated."""
        weight, self._deferred = self._deferred, None
        if weight is not None:
            self._tensors = self._initial_tensors(weight, 0, self.shape[0])
            self._master = self._initial_master(weight, 0, self.shape[0])

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The state tensors by name (a deferred state's are allocated at this first use)."""
        self.materialize()
        return self._tensors

    @tensors.setter
    def tensors(self, value: dict[str, torch.Tensor]) -> None:
        self.materialize()
        self._tensors = value

    @property
    def master(self) -> torch.Tensor | None:
        """The fp32 master (bf16 weights, master store; allocated at first use if deferred)."""
        self.materialize()
        return self._master

    @master.setter
    def master(self, value: torch.Tensor | None) -> None:
        self.materialize()
        self._master = value

    def adopt(self, weight: torch.Tensor, previous: torch.Tensor | None = None) -> None:
        """Follow the weight's device and dtype after a module conversion (.cuda(), .bfloat16()).

        States keep their dtype. A weight that became bf16 under the master store gets an fp32
        master, copied from `previous` (its value before the conversion) when given, so no
        precision is lost; a weight that became fp32 takes the master's value, which is dropped.
        """
        self._check_weight(weight)
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

    def _check_weight(self, weight: torch.Tensor) -> None:
        if weight.dtype == torch.float16:
            raise TypeError(
                "fp16 weights are not supported: FORGE applies the update inside backward, before a loss scaler "
                "could unscale the gradient or skip the step; train in bf16 (--bf16) or fp32"
            )
        if weight.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"FORGE weights must be float32 or bfloat16, got {weight.dtype}")
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"state was built for a weight of shape {self.shape}, this weight is {tuple(weight.shape)}")

    def rows(self, start: int, stop: int) -> "ForgeState":
        """The state of rows [start, stop) only (copies: the rest can be freed), its placement and
        ids those of the rows in the whole weight, so that its updates are the whole state's there
        (a data-parallel owner block). Of a deferred state, only the rows are allocated (the
        values the whole state would have had there)."""
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are not rows of a state of shape {self.shape}")
        block = copy.copy(self)
        block.shape = (stop - start, self.shape[1])
        block.placement = self.placement.rows(start, stop)
        block._deferred = None
        if self._deferred is not None:
            block._tensors = self._initial_tensors(self._deferred, start, stop)
            block._master = self._initial_master(self._deferred, start, stop)
        else:
            block._tensors = {name: t[start:stop].clone() for name, t in self._tensors.items()}
            block._master = None if self._master is None else self._master[start:stop].clone()
        block.workspace = {}
        block.hyperparameters = dict(self.hyperparameters)
        block.own_table = None
        return block

    def set_hyperparameters(self, **changes: Any) -> None:
        """Change hyperparameters between steps (e.g. lr and weight decay from a schedule)."""
        hp = self.rule.hyperparameters(**{**self.hyperparameters, **changes})
        if self._kept(hp) != self.state_names():
            raise ValueError(
                f"changing {sorted(changes)} would change the state tensors of rule '{self.rule.name}' "
                f"from {self.state_names()} to {self._kept(hp)}; create a new ForgeState instead"
            )
        self.hyperparameters = hp

    def state_names(self) -> tuple[str, ...]:
        if self._deferred is not None:
            return tuple(name for name, _ in self._initial)
        return tuple(n for n in self._tensors if not n.endswith(".scale"))

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


class GroupedForgeState(ForgeState):
    """The state of E experts' weights of one kind stacked as one tensor [E, out, in] (a grouped
    experts module's weight, stepped by update.fused_update_grouped): the states, their int8
    scales and the master stacked the same way; one rule, one set of hyperparameters and one step
    count for all (the experts step together: one without tokens takes the step of a zero
    gradient). Expert e keys its random streams with its own id, `weight_ids[e]`: the id its own
    ForgeState has on the per-expert path, so that switching between the grouped and the
    per-expert step keeps every expert's random bits (E fresh ids unless given). `placement` is
    every expert's: where its [out, in] shard sits in its unsharded weight."""

    def __init__(self, weight: torch.Tensor, rule: str | type[Rule] = "adamw", *, weight_store: str = "master",
                 state_dtype: str = "fp32", seed: int = 0, weight_ids=None, **hyperparameters: Any):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] < 1:
            raise ValueError(f"a grouped state is for E >= 1 experts' weights stacked [E, out, in]; got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if "weight_id" in hyperparameters:
            raise TypeError("a grouped state keys each expert's random streams by its own id: pass weight_ids, "
                            "one per expert, not weight_id")
        self._configure(rule, weight_store, state_dtype, seed, hyperparameters)
        if self.rule.weight_step is not None:
            raise ValueError(f"rule '{self.rule.name}' updates each expert's whole matrix after its pass, which the "
                             "grouped experts' step does not run: drop --moe-grouped-gemm (each expert is then "
                             "covered on its own)")
        self._allocate(weight, defer=False)
        self.weight_ids = [next(ForgeState._ids) for _ in range(weight.shape[0])] if weight_ids is None else weight_ids

    @property
    def experts(self) -> int:
        return self.shape[0]

    @property
    def weight_ids(self) -> tuple[int, ...]:
        return self._weight_ids

    @weight_ids.setter
    def weight_ids(self, ids) -> None:
        ids = tuple(ids)
        if len(ids) != self.shape[0]:
            raise ValueError(f"weight_ids has {len(ids)} ids for {self.shape[0]} experts: give one per expert")
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids):
            raise TypeError(f"weight_ids must be non-negative ints (random-stream ids), got {ids}")
        self._weight_ids = ids
        self._ids_on_device = None

    @property
    def weight_id(self):
        raise AttributeError("a grouped state has one random-stream id per expert: weight_ids")

    @weight_id.setter
    def weight_id(self, value):
        raise AttributeError("a grouped state has one random-stream id per expert: set weight_ids, one per expert")

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """The experts' ids as an int64 [E] tensor on `device`, for the kernel (kept between steps)."""
        if self._ids_on_device is None or self._ids_on_device.device != device:
            self._ids_on_device = torch.tensor(self._weight_ids, dtype=torch.int64).to(device)
        return self._ids_on_device

    def rows(self, start: int, stop: int) -> "ForgeState":
        raise ValueError("data-parallel owner rows of a grouped weight are not supported; give each expert its own "
                         "ForgeState (the per-expert path) to shard its rows")


def code_of_zero(rule: type[Rule], state: str) -> int:
    """The int8 code whose table value is 0 (signed tables put it in the middle)."""
    table = code_tables()[0 if state not in rule.nonnegative_states else 1]
    return int((table == 0).nonzero()[0])
