"""ForgeColumnParallelLinear / ForgeRowParallelLinear: megatron-core's tensor-parallel linears
whose weight is trained by FORGE inside backward.

Every constructor option of the parent keeps working (bias, gather_output, skip_bias_add,
input_is_parallel, sequence_parallel, init_method, stride, tp_group); only the autograd function
changes (`_forward_impl`, the parent's substitution point). Column weights are [out/tp, in] and
Row weights [out, in/tp]: each rank's weight gradient is complete locally, so the fused step runs
on the local shard with no reduction of weight gradients.

The covered weight has requires_grad=False: Megatron's DDP gives it no grad buffer and its
optimizer no state (both select parameters by requires_grad). Its FORGE state is kept by the
layer, in fp32, on the weight's device, whatever dtype conversion the module goes through.
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from forge_megatron.core.param import ForgeConfig, ForgeParam
from forge_megatron.core.plan import ShardPlacement
from forge_megatron.megatron.autograd import forge_linear


class _ForgeLinear:
    """What both FORGE linears add to their megatron-core parent."""

    forge: ForgeParam

    @staticmethod
    def _refuse_unsupported(kind: str, config, kwargs) -> None:
        if kwargs.get("skip_weight_param_allocation"):
            raise ValueError(
                f"{kind}: skip_weight_param_allocation means the weight is passed at forward time (a "
                "shared or tied weight); FORGE must own its weight: use the standard layer here"
            )
        if getattr(config, "defer_embedding_wgrad_compute", False):
            raise ValueError(f"{kind}: --defer-embedding-wgrad-compute postpones the weight gradient to a main_grad "
                             "buffer that FORGE removes; drop the flag")
        if config.gradient_accumulation_fusion:
            raise ValueError(
                f"{kind}: gradient_accumulation_fusion accumulates weight gradients into main_grad "
                "buffers, which FORGE removes; set config.gradient_accumulation_fusion=False "
                "(--no-gradient-accumulation-fusion)"
            )

    def _cover(self, forge: ForgeConfig | None, partition_dim: int) -> None:
        stride = getattr(self.weight, "partition_stride", 1)
        if stride not in (1, 2) or (stride == 2 and partition_dim != 0):
            raise ValueError(f"{type(self).__name__}: a weight partitioned with stride {stride} along dim "
                             f"{partition_dim} is not supported by FORGE (only SwiGLU's fc1, stride 2 along rows)")
        self.forge = ForgeParam(self.weight, forge or ForgeConfig())
        self.weight.requires_grad_(False)
        self.forge.state.placement = _placement(self.weight.shape, partition_dim, stride,
                                                self.tp_group.rank() if self.tp_group is not None else 0,
                                                self.tp_group.size() if self.tp_group is not None else 1)

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, **unused):
        if weight is not self.weight:
            raise ValueError(f"{type(self).__name__} got a weight at forward time (a shared or tied weight); "
                             "FORGE must own its weight: use the standard layer for this one")
        if allreduce_dgrad or sequence_parallel:
            tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        return forge_linear(input, weight, bias, self.forge, allreduce_dgrad, sequence_parallel, tp_group)

    def _apply(self, fn, recurse=True):
        """Module conversions (.cuda(), .bfloat16() by Float16Module) move the FORGE state with the
        weight but keep it fp32; a weight turned bf16 gets its fp32 master from its pre-cast value."""
        previous = self.weight.data
        super()._apply(fn, recurse)
        self.forge.adopt(self.weight.data, previous=previous)
        return self


def _placement(shape, partition_dim: int, stride: int, rank: int, size: int) -> ShardPlacement:
    """Where this rank's shard sits in the unsharded weight (keys stochastic rounding per element,
    so that every tensor-parallel layout draws the same bits). A row stride of 2 is Megatron's
    SwiGLU fc1 (MLP builds it with stride=2): the shard is [gate_k; up_k], its two halves rows
    k * h and ffn + k * h of the unsharded [gate; up]."""
    out_local, in_local = shape
    if partition_dim == 1:
        return ShardPlacement(col_offset=rank * in_local, global_cols=in_local * size)
    if stride == 1:
        return ShardPlacement(row_offset=rank * out_local, global_cols=in_local)
    half = out_local // 2
    return ShardPlacement(row_offset=rank * half, row_split=half, row_jump=(size - 1) * half, global_cols=in_local)


class ForgeColumnParallelLinear(_ForgeLinear, ColumnParallelLinear):
    """ColumnParallelLinear (weight [out/tp, in]) trained by FORGE."""

    def __init__(self, input_size, output_size, *, config, init_method, forge: ForgeConfig | None = None, **kwargs):
        self._refuse_unsupported(type(self).__name__, config, kwargs)
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        self._cover(forge, partition_dim=0)


class ForgeRowParallelLinear(_ForgeLinear, RowParallelLinear):
    """RowParallelLinear (weight [out, in/tp]) trained by FORGE."""

    def __init__(self, input_size, output_size, *, config, init_method, forge: ForgeConfig | None = None, **kwargs):
        self._refuse_unsupported(type(self).__name__, config, kwargs)
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        self._cover(forge, partition_dim=1)
