"""The autograd function of a FORGE linear layer: forward GEMM; backward dgrad, collectives and
the fused weight-gradient + optimizer step, in Megatron's order.

Backward, on each tensor-parallel rank's local shard (Megatron's
LinearWithGradAccumulationAndAsyncCommunication, with its wgrad GEMM replaced):
  1. under sequence parallelism, re-gather the saved input shard (async);
  2. dgrad = dy @ W with the weight of the forward pass (nothing has updated it yet);
  3. start the dgrad all-reduce (or reduce-scatter under sequence parallelism), async;
  4. fused wgrad + optimizer step on the local weight shard while the collective is in flight;
  5. bias gradient as usual; wait; return no gradient for the weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from forge_megatron.core.param import ForgeParam


class ForgeLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, forge: ForgeParam, allreduce_dgrad, sequence_parallel, tp_group, trigger):
        ctx.save_for_backward(input, weight)
        ctx.forge = forge
        ctx.use_bias = bias is not None
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        total_input = _gather(input, tp_group, async_op=False)[0] if sequence_parallel else input
        output = torch.matmul(total_input, weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        group = ctx.tp_group
        if ctx.sequence_parallel:
            total_input, gather = _gather(input, group, async_op=True)
        else:
            total_input, gather = input, None
        grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        if gather is not None:
            gather.wait()

        handle = None
        if grad_input is not None and ctx.sequence_parallel:
            sub_grad_input = torch.empty_like(input)
            handle = dist.reduce_scatter_tensor(sub_grad_input, grad_input.contiguous(), group=group, async_op=True)
            grad_input = sub_grad_input
        elif grad_input is not None and ctx.allreduce_dgrad:
            handle = dist.all_reduce(grad_input, group=group, async_op=True)

        with torch.no_grad():
            ctx.forge.step(total_input, grad_output, weight)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.use_bias else None

        if handle is not None:
            handle.wait()
        return grad_input, None, grad_bias, None, None, None, None, None


def forge_linear(input, weight, bias, forge: ForgeParam, allreduce_dgrad: bool, sequence_parallel: bool, tp_group):
    """y = x W^T + b with W updated by FORGE in backward.

    The weight does not require grad (so DDP and Megatron's optimizer leave it alone); a
    zero-size tensor that does is passed along so that autograd runs this backward even when
    nothing else here needs a gradient (e.g. the first layer after a frozen embedding).
    """
    trigger = torch.empty(0, device=input.device, requires_grad=True)
    return ForgeLinearFunction.apply(input, weight, bias, forge, allreduce_dgrad, sequence_parallel, tp_group, trigger)


def _gather(input, group, async_op):
    """All-gather a sequence-parallel shard [s/tp, ...] into [s, ...] along dim 0."""
    shape = (input.shape[0] * dist.get_world_size(group),) + tuple(input.shape[1:])
    total = torch.empty(shape, dtype=input.dtype, device=input.device)
    handle = dist.all_gather_into_tensor(total, input.contiguous(), group=group, async_op=async_op)
    return total, handle
