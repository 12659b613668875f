"""FORGE's state in Megatron's checkpoints, as part of the optimizer's state (so --no-save-optim,
--no-load-optim and --finetune treat it as Megatron treats optimizer state).

torch_dist: every state tensor (and fp32 master) is a ShardedTensor sharded exactly like its
weight, so a checkpoint saved at one tensor-, pipeline- or data-parallel layout loads at another
(with data parallelism the owners' rows are gathered on save, and each rank keeps its own on load); each
weight's step count is a one-element ShardedTensor under the weight's global name (kept by the
ranks that hold the weight, whatever the pipeline stage); the controller's scalars (the norm stale
clipping uses next) are common state, the same on every rank.
A state Megatron's optimizer keeps too (an fp32 moment of the same name, the fp32 master) is saved
under Megatron's own key for that weight (`optimizer.state.exp_avg.<weight>`, the master as
Megatron's `fp32_param`, or `param` with the distributed optimizer), so a run switches between
FORGE and standard Megatron through a checkpoint with its optimizer state: a standard run reads
FORGE's moments as its own, and FORGE reads a standard checkpoint's (its step from Megatron's
optimizer). 8-bit and bf16 states (and 8-bit scales) are FORGE's own (`optimizer.forge.*`): a
switch then needs --no-load-optim, and says so.
torch: the same entries as plain tensors, each rank's own (its owned rows with data
parallelism), in each rank's own file (as Megatron's torch format saves everything: no resharding);
a switch in this format is refused.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from forge_megatron.core.numerics import QBLOCK
from forge_megatron.core.param import ForgeParam
from forge_megatron.megatron.controller import ForgeController
from forge_megatron.megatron.errors import ConfigurationError

CHECKPOINT_PREFIX = "optimizer.forge"  # the sharded keys of FORGE's own state tensors and step counts
MEGATRON_PREFIX = "optimizer.state"  # Megatron's per-parameter optimizer state keys
SCALARS = "__controller__"  # the entry holding ForgeController.scalars()
SWITCH_FIX = "add --no-load-optim to load the weights only"
# Megatron's Muon is a chain of two optimizers (Muon's matrices, then Adam's rest) whose parameter
# groups it matches in order on load; under --use-forge its optimizer lacks the covered matrices.
MUON_SWITCH = ("the checkpoint is a {saved} Muon run's, whose optimizer groups a {run} Muon run cannot match (Megatron "
               "chains Muon's and Adam's in order; a FORGE run's lack the covered matrices); ")


def megatron_master_name(args) -> str:
    """Megatron's name for a parameter's fp32 master in its checkpoints: `fp32_param` in its
    mixed-precision optimizer, `param` in its distributed optimizer."""
    return "param" if args.use_distributed_optimizer else "fp32_param"


def state_keys(param: ForgeParam, master_name: str) -> dict[str, str]:
    """The checkpoint key prefix of each of a weight's state tensors: Megatron's own where
    Megatron's optimizer keeps the same state (fp32), FORGE's otherwise."""
    rule_states = param.state.rule.states
    keys = {}
    for name, tensor in param.state.named_tensors().items():
        shared = tensor.dtype == torch.float32 and (name == "master" or name in rule_states)
        keys[name] = (f"{MEGATRON_PREFIX}.{master_name if name == 'master' else name}" if shared
                      else f"{CHECKPOINT_PREFIX}.{name}")
    return keys


def sharded_state_dict(controller: ForgeController, model_sharded_state_dict: dict, master_name: str,
                       is_loading: bool = False, from_standard: bool = False) -> dict:
    """FORGE state for torch_dist: each tensor sharded like its weight (when loading, the tensors
    the load fills: with data parallelism the owners' rows are not gathered for it). With
    `from_standard`, the tensors a standard Megatron checkpoint holds for the covered weights (the
    step comes from Megatron's optimizer, `adopt_megatron_step`)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    # ShardedTensors, and ShardedTensorFactories (e.g. SwiGLU's fc1, split per TP rank on save)
    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_data = {id(t.data): t for t in nested_values(tensors)}
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {} if from_standard else {SCALARS: controller.scalars()}
    for name, weight, global_name, param in controller.checkpoint_units():
        sharded_weight = by_data.get(id(weight))
        if sharded_weight is None:
            raise KeyError(f"covered weight {name} is not in the model's sharded state dict")
        keys = state_keys(param, master_name)
        if from_standard and any(not key.startswith(MEGATRON_PREFIX) for key in keys.values()):
            raise ConfigurationError(f"the checkpoint is standard Megatron's, whose optimizer state does not hold "
                                     f"FORGE's {param.config.state_dtype} states; {SWITCH_FIX}")
        entry = {state_name: _sharded_like(sharded_weight, tensor, keys[state_name], name)
                 for state_name, tensor in param.shard_tensors(gather=not is_loading).items()}
        if not from_standard:  # one count per weight: the tensor-parallel shards and data-parallel copies are replicas
            expert = not getattr(weight, "allreduce", True)  # Megatron's mark of an expert weight
            tp_rank = (parallel_state.get_expert_tensor_parallel_rank() if expert
                       else parallel_state.get_tensor_model_parallel_rank())
            step = torch.tensor([param.state.step], dtype=torch.int64, device=weight.device)
            entry["step"] = ShardedTensor.from_rank_offsets(f"{CHECKPOINT_PREFIX}.step.{global_name}", step,
                                                            replica_id=(tp_rank, sharded_weight.replica_id[-1]))
        out[global_name] = entry
    return out


def adopt_megatron_step(controller: ForgeController, optimizer) -> None:
    """After a standard checkpoint's optimizer state was loaded: every covered weight takes
    Megatron's optimizer's step count (its parameters all step together)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if "step" in state:
                step = int(state["step"])
                for param in controller.params:
                    param.state.step = step
                return
    raise ConfigurationError(f"the standard checkpoint's optimizer state holds no step count; {SWITCH_FIX}")


def standard_checkpoint_is_readable(args) -> None:
    """Refuse, in one line, a standard Megatron checkpoint whose optimizer state FORGE cannot read
    per weight (the distributed optimizer's default format keeps it per data-parallel bucket)."""
    if args.optimizer == "muon":
        raise ConfigurationError(MUON_SWITCH.format(saved="standard", run="FORGE's") + SWITCH_FIX)
    format_ = _optimizer_format(args)
    if format_ == "dp_reshardable":
        raise ConfigurationError("the standard checkpoint's distributed-optimizer state is saved per data-parallel "
                                 "bucket, not per weight; save it with --dist-ckpt-optim-fully-reshardable, or "
                                 f"{SWITCH_FIX}")


def forge_checkpoint_is_readable_by_megatron(args) -> None:
    """In a standard run, refuse (one line) a FORGE checkpoint whose covered weights' optimizer
    state Megatron cannot read: FORGE's own 8-bit or bf16 states, or a distributed optimizer's
    per-bucket format on either side."""
    from megatron.core import dist_checkpointing

    if args.optimizer == "muon":
        raise ConfigurationError(MUON_SWITCH.format(saved="FORGE", run="standard") + "resume it with --use-forge, or "
                                 + SWITCH_FIX)
    keys = dist_checkpointing.load_tensors_metadata(_checkpoint_path(args))
    forge_own = sorted({k.split(".")[2] for k in keys if k.startswith(CHECKPOINT_PREFIX + ".")} - {"step"})
    if forge_own:
        raise ConfigurationError(f"the checkpoint holds FORGE optimizer state ({', '.join(forge_own)}) that "
                                 "Megatron's optimizer does not keep; resume it with --use-forge, or " + SWITCH_FIX)
    if args.use_distributed_optimizer and not args.dist_ckpt_optim_fully_reshardable:
        raise ConfigurationError("a FORGE checkpoint holds the covered weights' optimizer state per weight, which "
                                 "the distributed optimizer reads only with --dist-ckpt-optim-fully-reshardable; add "
                                 f"it, or {SWITCH_FIX}")
    if _optimizer_format(args) == "dp_reshardable":
        raise ConfigurationError("the FORGE checkpoint's distributed-optimizer state is saved per data-parallel "
                                 f"bucket; resume it with --use-forge, or {SWITCH_FIX}")


def _optimizer_format(args) -> str | None:
    """The distributed optimizer's checkpoint format of the checkpoint to load (None: per weight)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(_checkpoint_path(args))
    optimizer = common.get("optimizer", {}) if isinstance(common, dict) else {}
    return optimizer.get("param_state_sharding_type") if isinstance(optimizer, dict) else None


def _checkpoint_path(args) -> str:
    from megatron.training.checkpointing import get_load_checkpoint_path_by_args

    return get_load_checkpoint_path_by_args(args)


def state_dict(controller: ForgeController) -> dict:
    """FORGE state for the torch format: this rank's tensors as they are."""
    out = {SCALARS: controller.scalars()}
    for _, _, global_name, param in controller.checkpoint_units():
        out[global_name] = {**param.state.named_tensors(), "step": param.state.step}
    return out


def load_state_dict(controller: ForgeController, loaded: dict) -> None:
    """Copy what was loaded (either format) into the states; every entry is checked first."""
    units = [(name, param) for _, _, name, param in controller.checkpoint_units()]
    for name, param in units:
        entry = loaded.get(name)
        if entry is None:
            raise KeyError(f"the checkpoint's FORGE state has no entry for covered weight {name}")
        for state_name, tensor in param.state.named_tensors().items():
            if tuple(param.own(entry[state_name]).shape) != tuple(tensor.shape):
                raise ValueError(f"FORGE state {name}.{state_name}: checkpoint has shape "
                                 f"{tuple(entry[state_name].shape)}, this run {tuple(tensor.shape)}")
    for name, param in units:
        entry = loaded[name]
        for state_name, tensor in param.state.named_tensors().items():
            tensor.copy_(param.own(entry[state_name]))
        step = entry.get("step")  # none in a standard checkpoint: adopt_megatron_step
        if step is not None:
            param.state.step = int(step.reshape(-1)[0]) if isinstance(step, torch.Tensor) else int(step)
    controller.load_scalars(loaded.get(SCALARS, {}))


def checkpoint_has_forge_state(args) -> bool:
    """Whether the checkpoint Megatron is about to load (--load, its latest iteration or
    --ckpt-step) holds FORGE state (torch_dist format: FORGE's step counts)."""
    from megatron.core import dist_checkpointing

    path = _checkpoint_path(args)
    if not os.path.isdir(path):
        return False
    return any(k.startswith(CHECKPOINT_PREFIX + ".step.") for k in dist_checkpointing.load_tensors_metadata(path))


def _sharded_like(sharded_weight, tensor: torch.Tensor, prefix: str, name: str):
    # (an fp32 state shares its weight's sharding exactly, under the given key prefix)
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
