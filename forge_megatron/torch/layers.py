"""What covering does to a module: a covered linear layer, and the parameter that carries the
covered weights' gradient norm into the training loop's clip_grad_norm_.

A covered layer is the same module object, its class swapped for a subclass that adds FORGE
(as torch.nn.utils.parametrize does): attributes, hooks, state_dict keys and references to it
stay as they were; its weight stops requiring grad and is updated by FORGE in backward.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import nn

from forge_megatron.core.param import ForgeParam
from forge_megatron.torch.autograd import forge_linear


def conv1d_type() -> type | None:
    """Hugging Face's Conv1D class if transformers is loaded (a model that has one loaded it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


class CoveredLayer:
    """Added to a linear module's class: forward through FORGE's autograd function; the FORGE
    state follows the weight through module conversions (.to(), .cuda(), .bfloat16()) in fp32,
    a weight turned bf16 getting its fp32 master from its value before the cast."""

    forge: ForgeParam  # the weight's FORGE state
    transposed: bool  # the weight is [in, out] (Conv1D)
    forge_step = None  # (x, dy, weight): this weight's part of a backward pass (ForgeOptimizer's)

    def forward(self, input):
        if self.forge_step is None:
            raise RuntimeError("this covered layer has no FORGE optimizer: build it with forge_megatron.torch.cover")
        return forge_linear(input, self.weight, self.bias, self)

    def _apply(self, fn, recurse=True):
        previous = self.weight.data
        super()._apply(fn, recurse)
        self.forge.adopt(self.weight.data, previous=previous)
        return self


@functools.cache
def covered_class(base: type) -> type:
    """The covered subclass of a linear module class (one per class)."""
    return type(f"Forge{base.__name__}", (CoveredLayer, base), {"__module__": __name__})


def cover_layer(module: nn.Module, forge: ForgeParam, forge_step) -> None:
    """Turn `module` (nn.Linear, or Conv1D) into its covered class, in place; `forge_step(x, dy,
    weight)` is its weight's part of each backward pass."""
    module.__class__ = covered_class(type(module))
    module.forge, module.forge_step = forge, forge_step
    module.transposed = not isinstance(module, nn.Linear)
    module.weight.requires_grad_(False)


class GradNormCarrier(nn.Module):
    """A parameter of the model whose gradient is the covered weights' gradient norm (over all
    data-parallel ranks), set after each step's last backward. clip_grad_norm_(model.parameters(),
    max_norm) then computes the global norm, covered weights included, and scales this gradient by
    the clip coefficient with all the others: the ratio tells FORGE the coefficient the loop
    clipped with. It does not require grad (DDP and the optimizers leave it alone), stays fp32
    through dtype conversions and is not part of the model's state_dict."""

    def __init__(self, device):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)
        self._held: torch.Tensor | None = None

    def hold(self, norm: torch.Tensor) -> None:
        """This step's norm of the covered weights' gradients (0-dim, on the device)."""
        self._held = norm.float().reshape(1)
        self.norm.grad = self._held.clone()

    def coefficient(self) -> float:
        """The coefficient the held norm was scaled by since `hold` (1 if it was not, or if the
        norm is zero); NaN if it became non-finite (the loop's norm was)."""
        if self._held is None or self.norm.grad is None:
            return 1.0
        held, now = float(self._held), float(self.norm.grad)
        if held == 0.0 or not math.isfinite(held):
            return 1.0 if math.isfinite(now) else math.nan
        return now / held

    def clear(self) -> None:
        self._held, self.norm.grad = None, None

    def _apply(self, fn, recurse=True):
        device = fn(torch.zeros(1, device=self.norm.device)).device  # follow the device, keep fp32
        self.norm.data = self.norm.data.to(device)
        self.clear()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # not model state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass
