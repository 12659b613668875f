"""Muon's whole-matrix step: after a weight's fused pass has updated its momentum (rules.Muon, in
the epilogue), orthogonalize the momentum (or, with Nesterov, the direction the pass wrote into the
step's workspace) with Newton-Schulz and update the weight, before the next layer's backward.

The orthogonalization is Megatron's (megatron/core/optimizer/emerging_optimizers.py,
TensorParallelMuon), run with the same emerging_optimizers functions: Newton-Schulz with its
coefficient sets and step count under its fp32 matmul precision ("medium": bf16 iterations), the
update scaled by `get_muon_scale_factor` of the weight's shape times the extra scale factor, a
fused QKV weight orthogonalized per part (q, k, v of every query group), and under tensor
parallelism either each rank's shard on its own (blockwise: the shard's shape) or the whole weight
(duplicated: the shards all-gathered for the iteration, transiently, the whole shape). Then, as its
OrthogonalizedOptimizer: decoupled weight decay p <- p - lr wd p and p <- p - lr update, on the fp32
weight or master, or on the bf16 weight's fp32 value rounded back stochastically (store "sr", keyed
like the kernel's weight stream) or to nearest.

Memory: the direction workspace (Nesterov), the iteration's temporaries (Newton-Schulz's X, X X^T
and its polynomial), the gathered matrix (duplicated) and the update, one weight's at a time; they
are freed before the next layer's backward. Nothing here reads a device value on the host: a weight
with a non-finite gradient value keeps its weight (its update is masked on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import torch
from emerging_optimizers.orthogonalized_optimizers.muon import MuonScaleT, get_muon_scale_factor
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, newton_schulz_tp
from emerging_optimizers.utils import fp32_matmul_precision

from forge_megatron.core import numerics

# The values of Muon's string hyperparameters (rules.Muon.check): emerging_optimizers' own, less
# "custom" coefficients (Megatron passes none), and the precisions Megatron's flag offers.
CHOICES = {
    "coefficient_type": tuple(c for c in get_args(NSCoeffT) if c != "custom"),
    "scale_mode": get_args(MuonScaleT),
    "fp32_matmul_prec": ("highest", "high", "medium", "low"),
}


@dataclass(frozen=True)
class MatrixLayout:
    """How a covered weight's matrix is orthogonalized.

    `split_rows`: a fused QKV weight's rows per query group ([q, k, v], Megatron's
    --muon-split-qkv): each part is orthogonalized on its own. `group` and `axis`: the
    tensor-parallel group the weight is sharded over and its sharded axis, to orthogonalize the
    whole weight (Megatron's --muon-tp-mode duplicated); without them the local shard is
    orthogonalized as a matrix of its own (blockwise, or no tensor parallelism)."""

    split_rows: tuple[int, ...] | None = None
    group: Any = None
    axis: int | None = None


def orthogonalize(x: torch.Tensor, hp: dict, layout: MatrixLayout) -> torch.Tensor:
    """Muon's scaled update of the fp32 matrix `x` (momentum or direction), as Megatron's
    TensorParallelMuon.orthogonalize computes it."""
    with fp32_matmul_precision(hp["fp32_matmul_prec"]):
        split = layout.split_rows
        if split is None or x.shape[0] % sum(split):
            return _scaled(x, hp, layout)
        groups, cols = x.shape[0] // sum(split), x.shape[1]
        parts = torch.split(x.view(groups, sum(split), cols), list(split), dim=1)
        parts = [_scaled(part.reshape(-1, cols), hp, layout).view(groups, -1, cols) for part in parts]
        return torch.cat(parts, dim=1).view(x.shape)


def _scaled(x: torch.Tensor, hp: dict, layout: MatrixLayout) -> torch.Tensor:
    shape = list(x.shape)
    if layout.axis is not None:
        shape[layout.axis] *= torch.distributed.get_world_size(layout.group)
    orthogonal = newton_schulz_tp(x, steps=int(hp["num_ns_steps"]), coefficient_type=hp["coefficient_type"],
                                  tp_group=layout.group, partition_dim=layout.axis, tp_mode="duplicated")
    return orthogonal * get_muon_scale_factor(shape[0], shape[1], mode=hp["scale_mode"]) * hp["extra_scale_factor"]


UPDATE_ROWS = 64  # the weight is updated this many rows at a time: its temporaries stay a block's


def orthogonalized_update(weight: torch.Tensor, state, stats: torch.Tensor) -> None:
    """The weight's Muon update from its state (a ForgeState whose momentum its pass just updated,
    with the Nesterov direction in its workspace; `state.matrix_layout` says how its matrix is
    orthogonalized), unless `stats` (the pass's by-products) count a non-finite gradient value (in
    this shard, or with a gathered orthogonalization in any of the group's; the momentum of the
    tiles without one has advanced, as every rule's does: docs/megatron.md).
    After the orthogonalization, the decay, the update and the rounding run UPDATE_ROWS rows at
    a time (element-wise: the same bits as the whole matrix at once)."""
    hp, layout = state.hyperparameters, state.matrix_layout or MatrixLayout()
    direction = state.take_workspace("direction") if hp["nesterov"] else state.tensors["momentum_buffer"].float()
    update = orthogonalize(direction, hp, layout)
    del direction
    nonfinite = stats[:, 1].sum()
    if layout.group is not None:  # the shards' update was computed together: all or none of them apply it
        torch.distributed.all_reduce(nonfinite, group=layout.group)
    finite = nonfinite == 0
    for start in range(0, weight.shape[0], UPDATE_ROWS):
        _update_rows(weight, state, update, finite, start, min(start + UPDATE_ROWS, weight.shape[0]))


def _update_rows(weight: torch.Tensor, state, update: torch.Tensor, finite: torch.Tensor, start: int,
                 stop: int) -> None:
    """Rows [start, stop): decoupled weight decay p <- p - lr wd p, then p <- p - lr update, as
    emerging_optimizers' OrthogonalizedOptimizer orders them, on the fp32 weight or master (the
    bf16 weight then its round-to-nearest copy), or on the bf16 weight's fp32 value rounded back
    stochastically (store "sr", keyed like the kernel's weight stream) or to nearest."""
    hp, rows = state.hyperparameters, slice(start, stop)
    lr, weight_decay = hp["lr"], hp["weight_decay"]
    if state.master is not None or weight.dtype == torch.float32:
        p = state.master[rows] if state.master is not None else weight[rows]
    else:
        p = weight[rows].float()
    if weight_decay != 0:
        p.add_(torch.where(finite, p, 0.0), alpha=-weight_decay * lr)
    p.add_(torch.where(finite, update[rows], 0.0), alpha=-lr)
    if weight.dtype == torch.float32:
        return
    if state.weight_store == "sr" and state.master is None:
        index = numerics.global_index_torch(torch.arange(start, stop, device=weight.device),
                                            torch.arange(weight.shape[1], device=weight.device), state.placement)
        keys = numerics.stream_keys_int(state.seed, state.weight_id, state.step, 0)
        p = numerics.stochastic_round_to_bf16_torch(p, numerics.random_bits_torch(index, *keys))
    weight[rows].copy_(p)  # bf16: to nearest even (the master's copy, or store "rne"), or the rounded value
