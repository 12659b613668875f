"""The autograd function of a covered linear layer: forward as the layer's own; backward the input
gradient with the weight of the forward pass, then the weight's FORGE step (fused wgrad + update,
or accumulation), and the bias gradient as usual. No weight gradient is returned.

nn.Linear's weight is [out, in] (y = x W^T + b). Hugging Face's Conv1D (GPT-2) keeps it [in, out]
(y = x W + b): its gradient x^T dy is the fused step's dy^T x with the roles of x and dy swapped,
so the kernel updates it in its own layout.

Under autocast the layer computes as torch's autocast computes F.linear (input, weight and bias cast
to the autocast dtype) and saves the cast input; the fused step takes it with the gradient of the
output in that dtype, and keeps the weight in its own (an fp32 weight stays fp32, no master).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ForgeLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, layer, trigger):
        compute = weight
        if torch.is_autocast_enabled(input.device.type):
            dtype = torch.get_autocast_dtype(input.device.type)
            input, compute = input.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(input, weight)
        ctx.layer = layer
        with torch.autocast(input.device.type, enabled=False):
            if not layer.transposed:
                return F.linear(input, compute, bias)
            out = torch.addmm(bias, input.reshape(-1, input.shape[-1]), compute)  # as Conv1D computes it
            return out.view(*input.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_input = None
        if ctx.needs_input_grad[0]:  # before the step: the weight of the forward pass
            compute = weight.to(grad_output.dtype)
            grad_input = grad_output.matmul(compute.t() if layer.transposed else compute)
        with torch.no_grad():
            if layer.transposed:
                layer.forge_step(grad_output, input, weight)
            else:
                layer.forge_step(input, grad_output, weight)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, None, None


def forge_linear(input, weight, bias, layer):
    """The layer's output, with `layer.forge_step` run in backward. The weight does not require
    grad (DDP and torch optimizers leave it alone); a zero-size tensor that does is passed along so
    that autograd runs this backward even when nothing else here needs a gradient."""
    trigger = torch.empty(0, device=input.device, requires_grad=True)
    return ForgeLinearFunction.apply(input, weight, bias, layer, trigger)
