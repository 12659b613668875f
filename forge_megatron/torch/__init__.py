"""FORGE on any PyTorch or Hugging Face model: `cover(model, rule, **hyperparameters)` has FORGE
train the model's linear weights inside backward and returns the optimizer a training loop (or
transformers' Trainer) steps; docs/torch.md.

    optimizer = cover(model, "adamw", lr=3e-4, weight_decay=0.1)
    for batch in loader:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, covered weights included
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from forge_megatron.core.param import ForgeConfig, ForgeParam
from forge_megatron.torch.checkpoint import load_checkpoint, save_checkpoint
from forge_megatron.torch.layers import GradNormCarrier, cover_layer
from forge_megatron.torch.optimizer import CLIP_MODES, ForgeOptimizer
from forge_megatron.torch.select import Selector, select_modules

__all__ = ["CLIP_MODES", "ForgeOptimizer", "cover", "load_checkpoint", "save_checkpoint"]

# The torch.optim class that trains the rest of the model by default, per rule (same hyperparameters).
REST_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                   "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}
CARRIER = "forge_grad_norm"  # the name of the GradNormCarrier module added to the model


def cover(model: nn.Module, rule: str = "adamw", *, include: Iterable[Selector] | None = None,
          exclude: Iterable[Selector] | None = None,
          rest: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer] | None = None,
          micro_batches: int = 1, clip_mode: str = "stale", weight_store: str = "master", state_dtype: str = "fp32",
          accumulation_dtype: str = "fp32", seed: int = 0, backend: str | None = None, process_group=None,
          max_nonfinite_steps: int = 3, **hyperparameters: Any) -> ForgeOptimizer:
    """Have FORGE train `model`'s linear weights (nn.Linear, Hugging Face Conv1D; `include` and
    `exclude` by module type or name pattern, see select.py) with `rule` (any registered rule:
    adamw, adam, sgd, lion, rmsprop, adagrad, ...; torch.optim's hyperparameter names), in place,
    and return the optimizer to step. Cover before wrapping the model in DDP.

    rest: builds the optimizer of the model's other trainable parameters (biases, norms,
    embeddings, uncovered layers) from their (name, parameter) pairs; by default the rule's
    torch.optim class with the same hyperparameters. micro_batches: backward passes per step
    (gradient accumulation). clip_mode: how the covered weights follow the loop's
    clip_grad_norm_: 'stale' (the previous step's coefficient, no extra memory) or 'two-pass'
    (this step's, exact: the step's gradient is held until step()). weight_store, state_dtype,
    accumulation_dtype, seed, backend: the precision regime and kernel (ForgeConfig).
    process_group: data parallelism over this group (DDP's); by default the default group when
    torch.distributed is initialized with more than one rank. `optimizer.uncovered` names the
    modules with a weight matrix left to the rest, and why.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("cover the model before wrapping it in DistributedDataParallel (DDP must not see the "
                         "covered weights): cover(model), then DistributedDataParallel(model)")
    if hasattr(model, CARRIER):
        raise ValueError("this model is already covered (it has a FORGE optimizer); cover it once, with include= "
                         "and exclude= choosing the layers")
    covered, uncovered = select_modules(model, include, exclude)
    if not covered:
        raise ValueError(f"no layer to cover in this model: {uncovered or 'it has no nn.Linear or Conv1D layer'}")
    config = ForgeConfig(rule=rule, hyperparameters=hyperparameters, weight_store=weight_store,
                         state_dtype=state_dtype, seed=seed, backend=backend, accumulation_dtype=accumulation_dtype)
    if process_group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        process_group = dist.group.WORLD
    rest_optimizer = _rest_optimizer(rest, _rest_parameters(model, {id(m.weight) for _, m in covered}), rule,
                                     hyperparameters)
    # Everything is checked before the model changes: a refusal leaves it as it was.
    names, weights = [f"{name}.weight" for name, _ in covered], [m.weight for _, m in covered]
    carrier = GradNormCarrier(weights[0].device)
    try:
        params = [ForgeParam(w, config) for w in weights]
        optimizer = ForgeOptimizer(names, weights, params, carrier, config, rest_optimizer,
                                   micro_batches=micro_batches, clip_mode=clip_mode,
                                   max_nonfinite_steps=max_nonfinite_steps, process_group=process_group)
    except BaseException:
        for w in weights:
            vars(w).pop("_forge_param", None)
        raise
    for (_, module), param in zip(covered, params):
        cover_layer(module, param, optimizer.covered_backward)
    model.add_module(CARRIER, carrier)
    optimizer.uncovered = uncovered
    return optimizer


def _rest_parameters(model: nn.Module, covered: set[int]) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]


def _rest_optimizer(rest, params, rule: str, hyperparameters) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if rest is not None:
        optimizer = rest(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"rest must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer
    if rule not in REST_OPTIMIZERS:
        raise ValueError(f"torch.optim has no {rule!r} for the parameters FORGE does not cover ({params[0][0]}, ...): "
                         "pass rest=lambda params: <an optimizer of them>")
    return REST_OPTIMIZERS[rule](params, **hyperparameters)
