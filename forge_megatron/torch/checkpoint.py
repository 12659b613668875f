"""Checkpoints of a covered model: its weights in safetensors (model.safetensors, as
save_pretrained writes them), the optimizer's state (FORGE's and the rest's) and the scheduler's
with torch.save, loaded with weights_only=True. With data parallelism FORGE's state is gathered
from the owners of its rows, so a checkpoint loads at any data-parallel size; saving is then a
collective (every rank calls it), and rank 0 writes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

MODEL, OPTIMIZER, SCHEDULER = "model.safetensors", "optimizer.pt", "scheduler.pt"


def save_checkpoint(directory: str, model: nn.Module, optimizer, scheduler=None) -> None:
    from safetensors.torch import save_model

    state = optimizer.state_dict(gather=True)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    save_model(_unwrapped(model), os.path.join(directory, MODEL))
    torch.save(state, os.path.join(directory, OPTIMIZER))
    if scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(directory, SCHEDULER))


def load_checkpoint(directory: str, model: nn.Module, optimizer, scheduler=None) -> None:
    from safetensors.torch import load_model

    device = optimizer.weights[0].device
    load_model(_unwrapped(model), os.path.join(directory, MODEL), device=str(device))
    optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER), map_location=device, weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(os.path.join(directory, SCHEDULER), weights_only=True))


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
