"""The one entry point: validate, pick a backend, run the fused wgrad + optimizer step."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from numbers import Real

import torch

from forge_megatron.core import tiled
from forge_megatron.core.numerics import QBLOCK, code_tables
from forge_megatron.core.plan import (
    STATE_BF16,
    STATE_FP32,
    STATE_INT8,
    WEIGHT_FP32,
    WEIGHT_MASTER,
    WEIGHT_NONE,
    WEIGHT_RNE,
    WEIGHT_SR,
    StepPlan,
    TileConfig,
    default_config,
    interpreting,
    num_tiles,
)
from forge_megatron.core.state import WEIGHT_DTYPES, ForgeState, GroupedForgeState
from forge_megatron.core.table import StepSlots, StepTable

BACKENDS = ("triton", "torch")
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class UpdateResult:
    """By-products of one fused step, left on the device (reading them synchronizes). `stats` is
    the step's slot: the weight's next step overwrites it (clone it to keep it)."""

    stats: torch.Tensor  # fp32 [tiles, 2]: per tile, sum of squares of the raw gradient and non-finite count
    grad: torch.Tensor | None = None  # the scaled gradient, only with materialize=True (debug)

    @property
    def sumsq(self) -> torch.Tensor:
        """0-dim fp32: sum of squares of the raw gradient dy^T x, before grad_scale."""
        return self.stats[:, 0].sum()

    @property
    def nonfinite(self) -> torch.Tensor:
        """0-dim int64: number of non-finite gradient values; their tiles were skipped."""
        return self.stats[:, 1].sum().long()


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """`backend`, else $FORGE_BACKEND, else triton on CUDA and torch elsewhere."""
    choice = backend or os.environ.get("FORGE_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if choice not in BACKENDS:
        raise ValueError(f"unknown FORGE backend {choice!r}; choose one of {BACKENDS}")
    if choice == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the triton backend needs a CUDA device (tensors are on {device}); use backend='torch', "
            "or set TRITON_INTERPRET=1 before importing forge_megatron to run the kernel interpreted (slow)"
        )
    return choice


@dataclass(frozen=True)
class Accumulation:
    """One micro-batch of a step whose gradient is summed over `count` micro-batches: `buffer`
    ([out, in], fp32 or bf16, contiguous, on the weight's device) holds the sum of the earlier
    ones; `index` counts from 0. Micro-batches before the last add their gradient into the buffer
    and update nothing; the last adds it to the buffer's sum and runs the rule on the total (or,
    with apply=False, stores the total for `apply_accumulated`). `micro` keys a bf16 buffer's
    stochastic rounding when it is not `index` (a buffer that holds one micro-batch at a time)."""

    buffer: torch.Tensor
    index: int
    count: int
    micro: int | None = None

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def default_tile_config(backend: str, device: torch.device, dtype: torch.dtype, state_dtype: str) -> TileConfig:
    """The tiles a step runs with when none are given: per backend, device and dtypes, never per shape."""
    return default_config(device, dtype, state_dtype) if backend == "triton" else tiled.DEFAULT_CONFIG


def fused_update(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor,
    state: ForgeState,
    *,
    grad_scale: float | torch.Tensor = 1.0,
    materialize: bool = False,
    apply: bool = True,
    backend: str | None = None,
    config: TileConfig | None = None,
    slots: StepSlots | None = None,
    accumulate: Accumulation | None = None,
) -> UpdateResult:
    """Apply `state`'s rule to `weight` with the gradient dW = dy^T x, without storing dW.

    x is [..., in] and dy [..., out] with the same leading dims (e.g. [s, b, h]); weight is
    [out, in]. The gradient is multiplied by `grad_scale` (a number or a 0-dim tensor, e.g. a
    clip coefficient) before the rule. Increments state.step. With apply=False nothing is
    written and the step is not counted: only the by-products (the norms-only pass of two-pass
    clipping). Everything is checked before anything is written: on error, weight and state are
    unchanged. A rule that is not element-wise (Muon) updates only its states in the pass (and
    its workspace states, e.g. Muon's Nesterov direction, allocated for the step), then the whole
    weight right after it (the rule's `weight_step`, which frees the workspace).

    `slots` (table.StepSlots, from a StepTable the caller has written for this step) hold the
    gradient scale, step and coefficients on the device and receive the by-products: the step is
    then one kernel launch (`grad_scale` must be left at its default). Without them the state's
    own one-weight StepTable is written here, on the device (no copy from the host unless the lr,
    weight decay or step changed other than by one step; no sync).

    `accumulate` (an Accumulation) makes this one micro-batch of a step summed over several;
    state.step counts only the step's last, updating micro-batch.
    """
    return _fused_step(x, dy, None, weight, state, grad_scale, materialize, apply, backend, config, slots, accumulate)


def fused_update_grouped(
    x: torch.Tensor,
    dy: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    state: GroupedForgeState,
    *,
    grad_scale: float | torch.Tensor = 1.0,
    materialize: bool = False,
    apply: bool = True,
    backend: str | None = None,
    config: TileConfig | None = None,
    slots: StepSlots | None = None,
    accumulate: Accumulation | None = None,
) -> UpdateResult:
    """`fused_update` for E experts' weights of one kind stacked [E, out, in], in one kernel launch.

    x [T, in] and dy [T, out] hold the tokens grouped by expert: expert e's are rows
    offsets[e]:offsets[e + 1] (`offsets` an int32 or int64 tensor [E + 1] from 0 to T; on the host
    its values are checked without a sync and it is copied to the device; on the weight's device
    they are checked with one read of its E + 1 values). Expert e's gradient is
    dy[rows_e]^T x[rows_e]: zero for an expert without tokens, whose rule still runs (moments
    decay, weight decay applies, as torch.optim's step on a zero gradient). `state` is the
    experts' GroupedForgeState: every expert takes the step its own ForgeState (its id
    `state.weight_ids[e]`, `state.placement`) would take from `fused_update` on its tokens alone,
    the same bits, random ones included; `state.step` counts the experts' common step.

    The by-products are per tile of every expert, expert-major: slots' (or the result's) stats
    rows e * tiles : (e + 1) * tiles are expert e's (`stats.view(E, tiles, 2)`), each expert's in
    the dense kernel's tile order; their sum is the grouped weight's. The experts share one
    StepTable row (`slots`: one gradient scale, step and set of coefficients; its stats sized by
    `step_tiles(weight, state)`, E times an expert's). `accumulate` (an Accumulation whose buffer
    is stacked [E, out, in]) and the other arguments are `fused_update`'s; `apply_accumulated`
    takes a stacked weight, its GroupedForgeState and such a buffer.
    """
    return _fused_step(x, dy, offsets, weight, state, grad_scale, materialize, apply, backend, config, slots,
                       accumulate)


def _fused_step(x, dy, offsets, weight, state, grad_scale, materialize, apply, backend, config, slots,
                accumulate) -> UpdateResult:
    """fused_update's (offsets None) and fused_update_grouped's step: check everything, then launch."""
    if materialize and not apply:
        raise ValueError("materialize=True needs apply=True (the norms-only pass writes nothing but the norms)")
    grouped = offsets is not None
    x2, dy2 = _check_inputs(x, dy, weight, state, grad_scale, grouped)
    if grouped:
        offsets = _check_offsets(offsets, weight, x2.shape[0])
    if accumulate is not None:
        _check_accumulation(accumulate, weight)
        if materialize and not accumulate.last:
            raise ValueError("materialize=True on a micro-batch that only accumulates: there is no update to show")
    which = resolve_backend(weight.device, backend)
    config = config or default_tile_config(which, weight.device, x2.dtype, state.state_dtype)
    if state.state_dtype == "int8" and config.block_n % (2 * QBLOCK):
        raise ValueError(f"int8 states need tiles whose width is a multiple of {2 * QBLOCK} (each epilogue "
                         f"half-tile holds whole {QBLOCK}-element blocks); got block_n={config.block_n}")
    n_tiles = num_tiles(weight.shape, config)
    step = state.step + 1
    if slots is None:
        slots = _own_slots(state, grad_scale, n_tiles, weight.device)
    elif not (isinstance(grad_scale, Real) and grad_scale == 1.0):
        raise ValueError("with slots, the gradient scale is the table's (StepTable.write / set_scale); "
                         "leave grad_scale at 1.0")
    elif slots.stats.shape != (n_tiles, 2) or slots.coefs.device != weight.device:
        raise ValueError(f"slots hold by-products for {slots.stats.shape[0]} tiles on {slots.coefs.device}; this "
                         f"step runs {n_tiles} tiles on {weight.device} (build the StepTable with update.step_tiles)")
    # The materialized gradient is poisoned, so anything a backend fails to write shows up.
    grad = torch.full(weight.shape, float("nan"), dtype=torch.float32, device=weight.device) if materialize else None
    if apply and (accumulate is None or accumulate.last):
        state.open_workspace(weight.device)
    plan = _plan(state, weight, which, slots, grad, apply)
    if accumulate is not None:
        last = accumulate.last
        plan.buffer, plan.micro = accumulate.buffer, accumulate.index if accumulate.micro is None else accumulate.micro
        plan.read_buffer, plan.write_buffer = accumulate.index > 0, not (last and apply)
        plan.stats_on, plan.apply = last, apply and last
    if which == "triton":
        from forge_megatron.core import kernels  # compiles on first use; the CPU path never loads it

        if grouped:
            kernels.launch_grouped(x2, dy2, offsets, weight, plan, config)
        else:
            kernels.launch(x2, dy2, weight, plan, config)
    elif grouped:
        tiled.run_grouped(x2, dy2, offsets, weight, plan, config)
    else:
        tiled.run(x2, dy2, weight, plan, config)
    if plan.apply:
        state.step = step
        _whole_weight_step(weight, state, slots)
    return UpdateResult(stats=slots.stats, grad=grad)


def _whole_weight_step(weight: torch.Tensor, state: ForgeState, slots: StepSlots) -> None:
    """A rule that is not element-wise (Muon) updates the weight from the states its pass just
    wrote, once the weight's whole pass is done (its workspace freed there)."""
    if state.rule.weight_step is not None:
        state.rule.weight_step(weight, state, slots.stats)


def apply_accumulated(weight: torch.Tensor, state: ForgeState, buffer: torch.Tensor, *,
                      grad_scale: float | torch.Tensor = 1.0, materialize: bool = False, apply: bool = True,
                      backend: str | None = None, config: TileConfig | None = None,
                      slots: StepSlots | None = None) -> UpdateResult:
    """Apply `state`'s rule to `weight` with the gradient in `buffer` (fp32 or bf16, [out, in]):
    the fused kernel's tile finish (scale, by-products, non-finite skip, rule) without its GEMM.
    For a step whose gradient was accumulated with apply=False (two-pass clipping over several
    micro-batches), or reduce-scattered to a data-parallel owner. Increments state.step; checks
    everything before writing anything. With apply=False only the by-products are written (a
    held gradient's norm, before its update) and the step is not counted. A GroupedForgeState's
    stacked weight [E, out, in] takes a buffer stacked the same way (one launch for all experts)."""
    if materialize and not apply:
        raise ValueError("materialize=True needs apply=True (the norms-only pass writes nothing but the norms)")
    grouped = isinstance(state, GroupedForgeState)
    x = torch.empty(0, weight.shape[-1], dtype=torch.float32, device=weight.device)
    dy = torch.empty(0, weight.shape[-2], dtype=torch.float32, device=weight.device)
    _check_inputs(x, dy, weight, state, grad_scale, grouped)
    _check_accumulation(Accumulation(buffer, 0, 1), weight)
    which = resolve_backend(weight.device, backend)
    config = config or default_tile_config(which, weight.device, weight.dtype, state.state_dtype)
    n_tiles = num_tiles(weight.shape, config)
    step = state.step + 1
    slots = slots if slots is not None else _own_slots(state, grad_scale, n_tiles, weight.device)
    grad = torch.full(weight.shape, float("nan"), dtype=torch.float32, device=weight.device) if materialize else None
    if apply:
        state.open_workspace(weight.device)
    plan = _plan(state, weight, which, slots, grad, apply)
    plan.buffer = buffer
    if which == "triton":
        from forge_megatron.core import kernels

        if grouped:  # the experts' ids stand in for the token offsets, which are not read
            kernels.launch_grouped(x, dy, plan.weight_id, weight, plan, config, from_buffer=True)
        else:
            kernels.apply_buffer(weight, plan, config)
    elif grouped:
        tiled.run_grouped(x, dy, None, weight, plan, config, from_buffer=True)
    else:
        tiled.apply_buffer(weight, plan, config)
    if apply:
        state.step = step
        _whole_weight_step(weight, state, slots)
    return UpdateResult(stats=slots.stats, grad=grad)


def _check_accumulation(accumulate: Accumulation, weight: torch.Tensor) -> None:
    buffer = accumulate.buffer
    if not isinstance(buffer, torch.Tensor) or buffer.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError("the accumulation buffer must be an fp32 or bf16 tensor")
    if buffer.shape != weight.shape or buffer.device != weight.device or not buffer.is_contiguous():
        raise ValueError(f"the accumulation buffer must be a contiguous {tuple(weight.shape)} tensor on "
                         f"{weight.device}; got {tuple(buffer.shape)} on {buffer.device}")
    if not 0 <= accumulate.index < accumulate.count:
        raise ValueError(f"micro-batch {accumulate.index} of {accumulate.count}: the index counts from 0")


def step_tiles(weight: torch.Tensor, state: ForgeState, backend: str | None = None,
               config: TileConfig | None = None) -> int:
    """How many tiles a step of `weight` runs (its activations in the weight's dtype), for sizing
    a StepTable."""
    which = resolve_backend(weight.device, backend)
    return num_tiles(weight.shape, config or default_tile_config(which, weight.device, weight.dtype,
                                                                 state.state_dtype))


def _own_slots(state: ForgeState, grad_scale, n_tiles: int, device) -> StepSlots:
    """A standalone step's slots: the state's own one-weight StepTable, kept and written on the
    device (made again when the device or the tile count changes)."""
    table = state.own_table
    if table is None or table.coefs.device != device or table.slots[0].stats.shape[0] != n_tiles:
        table = state.own_table = StepTable([state], [n_tiles], device)
        table.slots[0].stats.fill_(float("nan"))  # poisoned: a tile that never writes its by-products shows up
    table.write(grad_scale)
    return table.slots[0]


def _plan(state: ForgeState, weight, backend: str, slots: StepSlots, grad, apply: bool) -> StepPlan:
    """The StepPlan both backends execute: regime constants, state tensors, slots, tables."""
    states, scales, stored, signed = state.kernel_states(placeholder=weight)
    if not state.rule.updates_weight:
        weight_store = WEIGHT_NONE
    elif weight.dtype == torch.float32:
        weight_store = WEIGHT_FP32
    else:
        weight_store = {"master": WEIGHT_MASTER, "sr": WEIGHT_SR, "rne": WEIGHT_RNE}[state.weight_store]
    return StepPlan(
        update_fn=state.rule.triton_update if backend == "triton" else state.rule.torch_update,
        weight_store=weight_store, master=state.master, states=states, scales=scales, stored=tuple(stored),
        signed=tuple(signed), state_format={"fp32": STATE_FP32, "bf16": STATE_BF16, "int8": STATE_INT8}[
            state.state_dtype],
        coefs=slots.coefs, num_coefs=state.rule.num_coefficients, seed=state.seed,
        weight_id=state.ids_on(weight.device) if isinstance(state, GroupedForgeState) else state.weight_id,
        tables=_tables(weight.device), placement=state.placement, grad_out=grad, stats=slots.stats, apply=apply)


@functools.cache
def _tables(device: torch.device) -> torch.Tensor:
    return code_tables().to(device)


def _check_inputs(x, dy, weight, state, grad_scale, grouped: bool = False):
    for name, t in (("x", x), ("dy", dy), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if grouped:
        if weight.dim() != 3:
            raise ValueError(f"a grouped step's weight must be E experts' weights stacked [E, out, in], got shape "
                             f"{tuple(weight.shape)}")
        if x.dim() != 2 or dy.dim() != 2:
            raise ValueError(f"a grouped step's x and dy must be [tokens, in] and [tokens, out], the tokens grouped by "
                             f"expert; got {tuple(x.shape)} and {tuple(dy.shape)}")
    elif weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape[-2:]
    if x.dim() < 2 or dy.dim() < 2:
        raise ValueError(f"x and dy must be [..., features] with at least 2 dims, got {tuple(x.shape)} and {tuple(dy.shape)}")
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} must have the same leading (token) dims")
    if x.shape[-1] != n_in or dy.shape[-1] != n_out:
        raise ValueError(
            f"shape mismatch: weight is [out={n_out}, in={n_in}], so x must be [..., {n_in}] and dy [..., {n_out}]; "
            f"got x {tuple(x.shape)} and dy {tuple(dy.shape)}"
        )
    if x.dtype not in ACTIVATION_DTYPES or dy.dtype != x.dtype:
        raise TypeError(f"x and dy must share one dtype among {_names(ACTIVATION_DTYPES)}; got {x.dtype} and {dy.dtype}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight dtype {weight.dtype} is not supported; supported: {_names(WEIGHT_DTYPES)}")
    if not (x.device == dy.device == weight.device):
        raise ValueError(f"x, dy and weight must be on one device; got {x.device}, {dy.device}, {weight.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (the kernel writes it in place); pass weight.contiguous() "
                         "and keep using that tensor as the parameter")
    if not isinstance(state, ForgeState):
        raise TypeError(f"state must be a ForgeState, got {type(state).__name__}")
    if grouped and not isinstance(state, GroupedForgeState):
        raise TypeError("a grouped step needs the experts' GroupedForgeState (their states stacked), got a ForgeState")
    if isinstance(state, GroupedForgeState) and not grouped:
        raise TypeError("a GroupedForgeState (E experts' stacked states) steps with fused_update_grouped")
    if state.shape != tuple(weight.shape):
        raise ValueError(f"state was built for a weight of shape {state.shape}, this weight is {tuple(weight.shape)}")
    for name, t in state.named_tensors().items():
        if t.device != weight.device or not t.is_contiguous():
            raise ValueError(f"state '{name}' must be a contiguous tensor on {weight.device}")
    wants_master = weight.dtype != torch.float32 and state.weight_store == "master"
    if wants_master != (state.master is not None):
        raise ValueError(f"state holds {'no' if state.master is None else 'a'} master copy but the weight is "
                         f"{weight.dtype} with weight_store={state.weight_store!r}; call state.adopt(weight) after "
                         "converting the weight's dtype")
    place = state.placement
    if place.global_rows(n_out) * place.global_cols >= 2**32 or place.col_offset + n_in > place.global_cols:
        raise ValueError(f"state.placement {place} does not describe a [{n_out}, {n_in}] shard of a weight with "
                         "fewer than 2**32 elements")
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or grad_scale.device != weight.device:
            raise ValueError(f"grad_scale tensor must have one element on {weight.device}")
    elif not (isinstance(grad_scale, Real) and not isinstance(grad_scale, bool)):
        raise TypeError(f"grad_scale must be a number or a 0-dim tensor, got {grad_scale!r}")
    x2, dy2 = x.reshape(-1, n_in), dy.reshape(-1, n_out)  # views where the strides allow
    if max(_max_offset(x2), _max_offset(dy2), weight.numel()) >= 2**31:
        raise ValueError("tensors with 2**31 or more elements are not supported (the kernel uses 32-bit offsets); "
                         "split the tokens into smaller micro-batches")
    return x2, dy2


def _check_offsets(offsets, weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """The experts' token offsets, checked (one read of E + 1 values), on the weight's device."""
    experts = weight.shape[0]
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be an int32 or int64 tensor [E + 1] of token offsets, got "
                        f"{getattr(offsets, 'dtype', type(offsets).__name__)}")
    if offsets.shape != (experts + 1,):
        raise ValueError(f"offsets must be [E + 1] = [{experts + 1}] for {experts} experts (expert e's tokens are rows "
                         f"offsets[e]:offsets[e + 1] of x and dy); got shape {tuple(offsets.shape)}")
    if offsets.device not in (torch.device("cpu"), weight.device):
        raise ValueError(f"offsets must be on the host or on {weight.device}, got {offsets.device}")
    values = offsets.tolist()
    if values[0] != 0:
        raise ValueError(f"offsets[0] must be 0 (expert 0's tokens start the batch), got {values[0]}")
    for e in range(experts):
        if values[e + 1] < values[e]:
            raise ValueError(f"offsets must not decrease: offsets[{e + 1}] = {values[e + 1]} < offsets[{e}] = "
                             f"{values[e]} (expert {e} would have a negative number of tokens)")
    if values[-1] != tokens:
        raise ValueError(f"offsets[{experts}] = {values[-1]}, but x and dy hold {tokens} tokens: the experts' token "
                         "ranges must cover them exactly")
    return offsets.to(weight.device, non_blocking=True)


def _max_offset(t: torch.Tensor) -> int:
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
