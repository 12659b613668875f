"""What one fused step executes, independent of the backend that runs it: the StepPlan (regime
constants, state tensors, coefficients, keys, by-product slots), the TileConfig, and the tile
configs per device.

Both backends read this module; neither imports the other, so the CPU twin (tiled.py) never
loads the Triton kernel module.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

# Weight stores and state formats (kernel constants: kernels.py turns them into constexprs).
WEIGHT_FP32, WEIGHT_MASTER, WEIGHT_SR, WEIGHT_RNE = 0, 1, 2, 3
WEIGHT_NONE = 4  # the rule updates its states only; the weight is neither read nor written (rules.Muon)
STATE_FP32, STATE_BF16, STATE_INT8 = 0, 1, 2


ROW_SPLIT_NONE = 2**31 - 1  # a row split past every row: no jump
COEF_HEAD = 2  # a coefficient row starts with the gradient scale and the step
MAX_STEP = 2**24  # steps are stored in the fp32 coefficient row, exactly below this


@dataclass(frozen=True)
class ShardPlacement:
    """Where a weight shard's elements sit in the unsharded weight, so that they draw the random
    bits they draw unsharded: local row r is global row r + row_offset, plus row_jump when
    r >= row_split (a SwiGLU fc1 shard is [gate_k; up_k]: two row ranges of the unsharded
    [gate; up]); local column c is global column c + col_offset, of global_cols."""

    row_offset: int = 0
    col_offset: int = 0
    global_cols: int = 0
    row_split: int = ROW_SPLIT_NONE
    row_jump: int = 0

    @classmethod
    def whole(cls, shape) -> "ShardPlacement":
        return cls(global_cols=shape[1])

    def rows(self, start: int, stop: int) -> "ShardPlacement":
        """The placement of local rows [start, stop) of this shard (a data-parallel owner block)."""
        split = self.row_split - start
        if split <= 0:  # the block lies past the jump
            return dataclasses.replace(self, row_offset=self.row_offset + start + self.row_jump,
                                       row_split=ROW_SPLIT_NONE, row_jump=0)
        if split >= stop - start:  # the block lies before it
            return dataclasses.replace(self, row_offset=self.row_offset + start, row_split=ROW_SPLIT_NONE, row_jump=0)
        return dataclasses.replace(self, row_offset=self.row_offset + start, row_split=split)

    def global_rows(self, local_rows: int) -> int:
        """Rows of the unsharded weight spanned (for the 2^32-element check)."""
        return self.row_offset + local_rows + (self.row_jump if self.row_split < local_rows else 0)


@dataclass
class StepPlan:
    """Everything one fused step reads and writes besides x, dy and the weight (built by
    update.py from a ForgeState, the same for both backends)."""

    update_fn: object  # the rule's update, compiled for the backend that runs the step
    weight_store: int  # WEIGHT_*
    master: torch.Tensor | None
    states: list[torch.Tensor]  # one per declared state (a placeholder where not stored)
    scales: list[torch.Tensor]  # int8 block scales per state (placeholders otherwise)
    stored: tuple[bool, ...]
    signed: tuple[bool, ...]
    state_format: int  # STATE_*
    coefs: torch.Tensor  # fp32 [COEF_HEAD + n or more]: grad scale, step (exact below 2^24), the rule's coefficients
    num_coefs: int  # n
    seed: int  # with weight_id and the step, keys the random streams (numerics.stream_keys)
    weight_id: int | torch.Tensor  # a grouped step's: int64 [E], each expert's id, on the weight's device
    tables: torch.Tensor  # fp32 [2, 256] int8 code tables (signed, unsigned)
    placement: ShardPlacement
    grad_out: torch.Tensor | None  # materialized gradient (debug), or None
    stats: torch.Tensor  # fp32 [tiles, 2]: per tile, sum of squares of the raw gradient and non-finite count
    apply: bool = True  # run the rule (False: a norms-only pass, or a micro-batch that only accumulates)
    stats_on: bool = True  # write the by-products (False: a micro-batch that only accumulates)
    buffer: torch.Tensor | None = None  # the gradient accumulation buffer [out, in], fp32 or bf16
    read_buffer: bool = False  # add the buffer's sum of the earlier micro-batches
    write_buffer: bool = False  # store the sum so far into the buffer
    micro: int = 0  # the micro-batch's index (keys a bf16 buffer's stochastic rounding)

    def expert(self, e: int, ids: list[int], tiles: int) -> "StepPlan":
        """Expert e's plan in a grouped step (every tensor stacked [E, ...]; `ids` the experts' ids on
        the host, `tiles` an expert's tile count): the plan of its own weight on the per-expert path."""

        def part(t):  # placeholders (the stacked weight where nothing is stored) take the expert's view too
            return None if t is None else t[e]

        return dataclasses.replace(
            self, master=part(self.master), states=[part(t) for t in self.states],
            scales=[part(t) for t in self.scales], weight_id=ids[e], grad_out=part(self.grad_out),
            stats=self.stats[e * tiles:(e + 1) * tiles], buffer=part(self.buffer))


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options; `block_t` fixes the summation order over tokens."""

    block_m: int
    block_n: int
    block_t: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_t"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v}")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_tiles(shape, config: TileConfig) -> int:
    """Tiles of a weight [out, in], or of E experts' weights stacked [E, out, in] (E times an expert's)."""
    experts = shape[0] if len(shape) == 3 else 1
    return experts * -(-shape[-2] // config.block_m) * -(-shape[-1] // config.block_n)


def default_config(device: torch.device, dtype: torch.dtype, state_dtype: str = "fp32") -> TileConfig:
    """The Triton kernel's tile config for a device, activation dtype and state dtype; never
    depends on the weight's shape, so every shard of a weight sums in the same order. All share
    block_t per activation dtype (on Hopper the 8-bit-state tiles are too short for wgmma: their
    dot is mma.sync, another order within a block_t step).

    The GPU configs compile for sm_90a without register spills for every built-in rule and
    regime (tests/test_compile.py checks it with ptxas on a CPU machine).
    """
    if interpreting():
        # The interpreter costs ~4 ms per program per T-step: few, large tiles.
        return TileConfig(block_m=64, block_n=64, block_t=64, group_m=1)
    if dtype == torch.float32:
        # IEEE fp32 dot runs on FMA units; 32-token steps keep the operand tiles small.
        return TileConfig(block_m=128, block_n=64, block_t=32, group_m=8, num_warps=8, num_stages=3)
    if state_dtype == "int8":
        # Dequantize/requantize (table lookups, binary search, random bits) bound the time, not the
        # GEMM: 32-row tiles (mma.sync, no wgmma) ran 0.75-0.83x the time of 64-row wgmma tiles at
        # every point of the H100 sweep (bench/results/device_h100_2026-12-05/kernel.json).
        return TileConfig(block_m=32, block_n=64, block_t=64, group_m=8, num_warps=4, num_stages=3)
    # bf16: two warpgroups of m64n64k16 wgmma on Hopper (mma.sync elsewhere); a 4-stage pipeline
    # ran 0.79-0.85x the 3-stage time at 16k tokens, 0.95-0.98x at 512 (the same H100 sweep).
    return TileConfig(block_m=128, block_n=64, block_t=64, group_m=8, num_warps=8, num_stages=4)


def tile_space_key(dtype: torch.dtype, state_dtype: str = "fp32") -> str:
    """The TILE_SPACE entry of an activation dtype and state dtype (default_config's cases)."""
    if dtype == torch.float32:
        return "fp32"
    return "bf16-int8" if state_dtype == "int8" else "bf16"


# A few tile configs per regime for a GPU run to time against each other at Llama shapes
# (scripts/bench_kernel.py --sweep): block sizes, warps and pipeline stages around the default
# (first). Each compiles for sm_90a without register spills for AdamW in its regimes under the
# device's Triton and the venv's (bench/results/compile_sm90_space_triton*.json; the test reads
# them). A config with another block_t sums the tokens in another order: it is a speed choice to
# make once, for every shape (the bits of a run then follow it).
TILE_SPACE: dict[str, tuple[TileConfig, ...]] = {
    "bf16": (
        TileConfig(128, 64, 64, group_m=8, num_warps=8, num_stages=4),
        TileConfig(128, 64, 64, group_m=8, num_warps=8, num_stages=3),
        TileConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=3),
        TileConfig(64, 128, 64, group_m=8, num_warps=8, num_stages=3),
        TileConfig(128, 64, 32, group_m=8, num_warps=8, num_stages=4),
        TileConfig(128, 64, 128, group_m=8, num_warps=8, num_stages=2),
    ),
    "bf16-int8": (
        TileConfig(32, 64, 64, group_m=8, num_warps=4, num_stages=3),
        TileConfig(64, 64, 64, group_m=8, num_warps=8, num_stages=3),
        TileConfig(64, 64, 64, group_m=8, num_warps=8, num_stages=4),
        TileConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=3),
        TileConfig(64, 64, 128, group_m=8, num_warps=8, num_stages=2),
    ),
}
