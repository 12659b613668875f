"""Data-parallel ownership of a covered weight's rows: one rank of the data-parallel group holds
each block of rows' optimizer state and applies its update.

Every data-parallel rank computes its own gradient of the whole (tensor-parallel) weight shard.
The ranks reduce-scatter it, so that each receives the sum over ranks of its block of rows only,
apply the rule to that block, and all-gather the updated blocks, so that every rank holds the same
weight for the next forward. Megatron's distributed optimizer does the same for the parameters it
owns (it reduce-scatters gradient buckets and all-gathers parameters); here the unit is a block of
one weight's rows, which keeps the update element-wise on contiguous rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.14 names the tensor collectives *_single; older versions *_into_tensor / *_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class OwnerRows:
    """This rank's block of a weight's rows in a data-parallel group of `size` ranks: rows
    [start, stop) of the local weight, the same number on every rank."""

    group: Any  # a torch.distributed ProcessGroup
    rank: int
    size: int
    start: int
    stop: int

    @classmethod
    def of(cls, rows: int, group) -> "OwnerRows":
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if rows % size:
            raise ValueError(f"a weight of {rows} rows cannot be split into {size} equal data-parallel blocks")
        block = rows // size
        return cls(group=group, rank=rank, size=size, start=rank * block, stop=(rank + 1) * block)

    def reduce_scatter(self, gradient: torch.Tensor) -> torch.Tensor:
        """The mean over the group of this block's rows of `gradient` (each rank's [rows, cols]),
        as Megatron's data-parallel reduction computes it: each rank's gradient scaled by 1/size,
        then summed. `gradient` is scaled in place."""
        gradient.mul_(1.0 / self.size)
        block = torch.empty((self.stop - self.start, *gradient.shape[1:]), dtype=gradient.dtype,
                            device=gradient.device)
        _reduce_scatter(block, gradient, group=self.group)
        return block

    def all_gather(self, weight: torch.Tensor) -> None:
        """Every rank's updated block into `weight` (in place)."""
        _all_gather(weight, weight[self.start:self.stop].clone(), group=self.group)

    def gather(self, block: torch.Tensor) -> torch.Tensor:
        """Every rank's `block` (this rank's rows of a state tensor), stacked in row order."""
        whole = torch.empty((self.size * block.shape[0], *block.shape[1:]), dtype=block.dtype, device=block.device)
        _all_gather(whole, block.contiguous(), group=self.group)
        return whole
