"""How each covered weight of a Megatron model is orthogonalized under --optimizer muon
(core/muon.py MatrixLayout), the way Megatron's TensorParallelMuon treats the same parameter
(megatron/core/optimizer/emerging_optimizers.py):

* a fused QKV weight (`linear_qkv.weight`) is orthogonalized per part, q, k and v of every query
  group, with --muon-split-qkv (Megatron's default) and when its rows divide into them;
* --muon-tp-mode blockwise orthogonalizes each rank's shard as a matrix of its own; duplicated
  gathers the shards over the tensor-parallel group (the expert tensor-parallel group for routed
  experts) along the weight's partition axis for the iteration, transiently, and keeps this
  rank's part of the result.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.optimizer.emerging_optimizers import _get_qkv_split_shapes

from forge_megatron.core.muon import MatrixLayout


def lay_out_matrices(model_chunks, args) -> int:
    """Give every covered Muon weight its MatrixLayout; returns how many there are."""
    laid_out = 0
    for chunk in model_chunks:
        split = tuple(_get_qkv_split_shapes(chunk.config)) if args.muon_split_qkv else None
        for name, weight in chunk.named_parameters():
            forge = getattr(weight, "_forge_param", None)
            if forge is None or forge.state.rule.weight_step is None:
                continue
            qkv = split if "linear_qkv.weight" in name and weight.shape[0] % sum(split or (1,)) == 0 else None
            group, axis = None, None
            if args.muon_tp_mode == "duplicated":
                expert = "experts" in name and "shared" not in name
                group = (parallel_state.get_expert_tensor_parallel_group() if expert
                         else parallel_state.get_tensor_model_parallel_group())
                axis = getattr(weight, "partition_dim", -1)
                group, axis = (group, axis) if axis != -1 else (None, None)
            forge.state.matrix_layout = MatrixLayout(split_rows=qkv, group=group, axis=axis)
            laid_out += 1
    return laid_out
