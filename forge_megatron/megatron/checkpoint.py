"""FORGE's state in Megatron's checkpoints, as part of the optimizer's state (so --no-save-optim,
--no-load-optim and --finetune treat it as Megatron treats optimizer state).

torch_dist: every state tensor (and fp32 master) is a ShardedTensor sharded exactly like its
weight, so a checkpoint saved at one tensor-, pipeline- or data-parallel layout loads at another
(with data parallelism the owners' rows are gathered on save, and each rank keeps its own on load); each
weight's step count is a one-element ShardedTensor under the weight's global name (kept by the
ranks that hold the weight, whatever the pipeline stage); the controller's scalars (the norm stale
clipping uses next) are common state, the same on every rank.
torch: the same entries as plain tensors, each rank's own (its owned rows with data
parallelism), in each rank's own file (as Megatron's torch format saves everything: no resharding).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from forge_megatron.core.numerics import QBLOCK
from forge_megatron.megatron.controller import ForgeController

CHECKPOINT_PREFIX = "optimizer.forge"  # the sharded keys of FORGE's state tensors
SCALARS = "__controller__"  # the entry holding ForgeController.scalars()


def sharded_state_dict(controller: ForgeController, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
    """FORGE state for torch_dist: each tensor sharded like its weight (when loading, the tensors
    the load fills: with data parallelism the owners' rows are not gathered for it)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    # ShardedTensors, and ShardedTensorFactories (e.g. SwiGLU's fc1, split per TP rank on save)
    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_data = {id(t.data): t for t in nested_values(tensors)}
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    replica = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank())
    out = {SCALARS: controller.scalars()}
    for (name, weight), global_name, param in zip(controller.named, controller.global_names, controller.params):
        sharded_weight = by_data.get(id(weight))
        if sharded_weight is None:
            raise KeyError(f"covered weight {name} is not in the model's sharded state dict")
        entry = {state_name: _sharded_like(sharded_weight, tensor, f"{CHECKPOINT_PREFIX}.{state_name}", name)
                 for state_name, tensor in param.shard_tensors(gather=not is_loading).items()}
        step = torch.tensor([param.state.step], dtype=torch.int64, device=weight.device)
        entry["step"] = ShardedTensor.from_rank_offsets(f"{CHECKPOINT_PREFIX}.step.{global_name}", step,
                                                        replica_id=replica)
        out[global_name] = entry
    return out


def state_dict(controller: ForgeController) -> dict:
    """FORGE state for the torch format: this rank's tensors as they are."""
    out = {SCALARS: controller.scalars()}
    for global_name, param in zip(controller.global_names, controller.params):
        out[global_name] = {**param.state.named_tensors(), "step": param.state.step}
    return out


def load_state_dict(controller: ForgeController, loaded: dict) -> None:
    """Copy what was loaded (either format) into the states; every entry is checked first."""
    for name, param in zip(controller.global_names, controller.params):
        entry = loaded.get(name)
        if entry is None:
            raise KeyError(f"the checkpoint's FORGE state has no entry for covered weight {name}")
        for state_name, tensor in param.state.named_tensors().items():
            if tuple(param.own(entry[state_name]).shape) != tuple(tensor.shape):
                raise ValueError(f"FORGE state {name}.{state_name}: checkpoint has shape "
                                 f"{tuple(entry[state_name].shape)}, this run {tuple(tensor.shape)}")
    for name, param in zip(controller.global_names, controller.params):
        entry = loaded[name]
        for state_name, tensor in param.state.named_tensors().items():
            tensor.copy_(param.own(entry[state_name]))
        step = entry["step"]
        param.state.step = int(step.reshape(-1)[0]) if isinstance(step, torch.Tensor) else int(step)
    controller.load_scalars(loaded.get(SCALARS, {}))


def checkpoint_has_forge_state(args) -> bool:
    """Whether the checkpoint Megatron is about to load (--load, its latest iteration or
    --ckpt-step) holds FORGE state (torch_dist format)."""
    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import get_load_checkpoint_path_by_args

    path = get_load_checkpoint_path_by_args(args)
    if not os.path.isdir(path):
        return False
    return any(k.startswith(CHECKPOINT_PREFIX) for k in dist_checkpointing.load_tensors_metadata(path))


def _sharded_like(sharded_weight, tensor: torch.Tensor, prefix: str, name: str):
    """`tensor` sharded like its weight: states and master have the weight's shape; the int8
    states' block scales have one column per QBLOCK weight columns, so their last axis is the
    weight's divided by QBLOCK (which the shard boundaries must respect)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    if not isinstance(sharded_weight, ShardedTensor) or tuple(tensor.shape) == sharded_weight.local_shape:
        return make_sharded_optimizer_tensor(sharded_weight, tensor, prefix)  # factories split rows only
    offset, columns = sharded_weight.global_offset[-1], sharded_weight.global_shape[-1]
    if offset % QBLOCK or (sharded_weight.local_shape[-1] != columns and columns % QBLOCK):
        raise ValueError(f"{name}: int8 state scales cover {QBLOCK}-column blocks, but this shard starts at column "
                         f"{offset} of {columns}; checkpointing needs shard widths that are multiples of {QBLOCK}")
    scaled = dataclasses.replace(
        sharded_weight, key=f"{prefix}.{sharded_weight.key}", data=tensor, dtype=tensor.dtype,
        local_shape=tuple(tensor.shape), global_shape=(*sharded_weight.global_shape[:-1], -(-columns // QBLOCK)),
        global_offset=(*sharded_weight.global_offset[:-1], offset // QBLOCK))
    scaled.validate_metadata_integrity()
    return scaled
