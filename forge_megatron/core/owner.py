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
from typing import Any, Callable

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
    scale: float | None = None  # each rank's gradient's factor before the sum (None: 1 / size, the mean)

    @classmethod
    def of(cls, rows: int, group, scale: float | None = None) -> "OwnerRows":
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if rows % size:
            raise ValueError(f"a weight of {rows} rows cannot be split into {size} equal data-parallel blocks")
        block = rows // size
        return cls(group=group, rank=rank, size=size, start=rank * block, stop=(rank + 1) * block, scale=scale)

    def reduce_scatter(self, gradient: torch.Tensor, async_op: bool = False):
        """This block's rows of the group's sum of every rank's `gradient` ([rows, cols]) scaled
        by `scale`, as Megatron's data-parallel reduction computes it: by default the mean (each
        rank's gradient scaled by 1/size, then summed); a per-token loss sums (scale 1); an expert's
        gradient is scaled by 1 / the whole data-parallel size and summed over its expert-data-
        parallel group. `gradient` is scaled in place. With async_op, (block, work): the block
        holds the result once work.wait() returns, and `gradient` must live until then."""
        scale = 1.0 / self.size if self.scale is None else self.scale
        if scale != 1.0:
            gradient.mul_(scale)
        block = torch.empty((self.stop - self.start, *gradient.shape[1:]), dtype=gradient.dtype,
                            device=gradient.device)
        work = _reduce_scatter(block, gradient, group=self.group, async_op=async_op)
        return (block, work) if async_op else block

    def all_gather(self, weight: torch.Tensor, async_op: bool = False):
        """Every rank's updated block into `weight` (in place); with async_op, the work and the
        source block, which must live until work.wait() returns."""
        rows = weight[self.start:self.stop].clone()
        work = _all_gather(weight, rows, group=self.group, async_op=async_op)
        return (work, rows) if async_op else None

    def gather(self, block: torch.Tensor) -> torch.Tensor:
        """Every rank's `block` (this rank's rows of a state tensor), stacked in row order."""
        whole = torch.empty((self.size * block.shape[0], *block.shape[1:]), dtype=block.dtype, device=block.device)
        _all_gather(whole, block.contiguous(), group=self.group)
        return whole


class Collectives:
    """The data-parallel collectives of a model's covered weights, issued in backward order.

    Synchronous by default. With `overlap` (Megatron's --overlap-grad-reduce), a weight's
    reduce-scatter runs while the next weight's gradient is computed: what follows it (the owner's
    sum, update and all-gather) runs when the next reduce-scatter is issued, or at `wait()`, so
    at most two weights' gradients are in flight; likewise one all-gather, waited when the next is
    issued. Everything has completed when `wait()` returns, which the training loop calls after
    backward, before the next forward. The collectives are issued in the same order on
    every rank, as the backward visits the weights in the same order."""

    def __init__(self, overlap: bool = False):
        self.overlap = overlap
        self._pending = None  # a reduce-scatter: (work, what follows it, the tensors it reads and writes)
        self._gather = None  # an all-gather: (work, its source block)

    def reduce_scatter(self, owner: OwnerRows, gradient: torch.Tensor, then: Callable[[torch.Tensor], None]) -> None:
        """`then(block)` with this rank's rows of the group's mean of `gradient`: at once, or with
        overlap after the previous weight's has run and before the next weight's is issued."""
        if not self.overlap:
            then(owner.reduce_scatter(gradient))
            return
        block, work = owner.reduce_scatter(gradient, async_op=True)
        self._finish_pending()
        self._pending = (work, then, block, gradient)

    def all_gather(self, owner: OwnerRows, weight: torch.Tensor) -> None:
        if not self.overlap:
            owner.all_gather(weight)
            return
        self._finish_gather()
        self._gather = owner.all_gather(weight, async_op=True)

    def wait(self) -> None:
        """Everything issued so far has completed (and what follows each reduce-scatter has run)."""
        self._finish_pending()
        self._finish_gather()

    def _finish_gather(self) -> None:
        if self._gather is not None:
            self._gather[0].wait()
            self._gather = None

    def _finish_pending(self) -> None:
        if self._pending is not None:
            work, then, block, _ = self._pending
            self._pending = None
            work.wait()
            then(block)
