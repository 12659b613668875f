"""Measurements of FORGE on a plain Hugging Face model (forge_megatron.torch), for docs/torch.md
(scripts/torch_study.py) and its tests: memory at the backward/optimizer seam and over a step
against torch.optim.AdamW (LiveTensorMemory), and bf16 + stochastic rounding against fp32 on the
stdlib text."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from forge_megatron.megatron.data import BYTE_VOCAB, stdlib_documents
from forge_megatron.tools.benchmarking import LiveTensorMemory
from forge_megatron.torch import cover


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, init: float = 0.02):
    """A transformers LlamaForCausalLM with random weights (SwiGLU ffn 2 x hidden, 4 heads, 2 query groups)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=init)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def stdlib_batches(steps: int, batch: int, seq: int, seed: int = 0, max_bytes: int = 1 << 19) -> list[torch.Tensor]:
    """`steps` batches of `batch` byte sequences of length `seq`, drawn at random from the stdlib text."""
    stream = torch.from_numpy(np.concatenate(stdlib_documents(max_bytes)).astype(np.int64))
    starts = torch.randint(0, stream.numel() - seq, (steps, batch), generator=torch.Generator().manual_seed(seed))
    return [torch.stack([stream[i:i + seq] for i in row]) for row in starts]


class MasterAdamW(torch.optim.AdamW):
    """torch.optim.AdamW on fp32 copies of (bf16) parameters, written back rounded to nearest:
    the usual mixed-precision practice, for the parameters FORGE does not cover in a bf16 model."""

    def __init__(self, named_params, **hyperparameters):
        self.model_params = [p for _, p in named_params]
        masters = [p.detach().float().requires_grad_(True) for p in self.model_params]
        super().__init__(masters, **hyperparameters)

    @torch.no_grad()
    def step(self, closure=None):
        masters = self.param_groups[0]["params"]
        for p, master in zip(self.model_params, masters):
            master.grad = None if p.grad is None else p.grad.float()
        super().step()
        for p, master in zip(self.model_params, masters):
            p.copy_(master)


def train_losses(model: nn.Module, optimizer, scheduler, batches: list[torch.Tensor], clip: float = 1.0) -> list[float]:
    """One step per batch (next-token loss, clip_grad_norm_ at `clip`); the losses."""
    losses = []
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def bf16_against_fp32(weight_store: str = "sr", steps: int = 200, batch: int = 8, seq: int = 32, seed: int = 0,
                      lr: float = 1e-3, window: int = 20) -> dict:
    """A byte-level tiny Llama (init std 0.2, so that AdamW's updates at `lr` are below half a
    bf16 spacing for most weights) trained `steps` steps with cosine decay, fp32 against bf16 with
    `weight_store` ('sr' or 'rne'; the rest on fp32 masters, MasterAdamW): each `window` steps'
    mean loss, and bf16's relative excess over fp32 per window."""
    base = tiny_llama(seed, vocab=BYTE_VOCAB, init=0.2)
    batches = stdlib_batches(steps, batch, seq, seed)
    means = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base).to(dtype)
        rest = (lambda params: MasterAdamW(params, lr=lr, weight_decay=0.1)) if dtype == torch.bfloat16 else None
        store = weight_store if dtype == torch.bfloat16 else "master"
        optimizer = cover(model, "adamw", lr=lr, weight_decay=0.1, weight_store=store, rest=rest)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        losses = torch.tensor(train_losses(model, optimizer, scheduler, batches), dtype=torch.float64)
        means[name] = losses.view(-1, window).mean(1)
    excess = (means["bf16"] - means["fp32"]) / means["fp32"]
    return {"fp32": means["fp32"].tolist(), "bf16": means["bf16"].tolist(), "excess": excess.tolist()}


def step_memory(model: nn.Module, optimizer, batch: torch.Tensor) -> dict:
    """Bytes of one step after a warm-up step: `static`, the parameters and every optimizer state
    (FORGE's and the rest's) held between steps; `seam`, what the step's forward and backward
    leave alive for the optimizer (gradients, held or accumulated buffers); `peak`, the most alive
    at once during the step beyond `static`; `after`, what the step leaves alive after zero_grad."""

    def step(tracker=None):
        model(input_ids=batch, labels=batch).loss.backward()
        seam = tracker.current if tracker is not None else None
        optimizer.step()
        optimizer.zero_grad()
        return seam

    step()
    with LiveTensorMemory() as tracker:
        seam = step(tracker)
    return {"static": static_bytes(model, optimizer), "seam": seam, "peak": tracker.peak, "after": tracker.current}


def static_bytes(model: nn.Module, optimizer) -> int:
    """The parameters' bytes and the optimizer states' (torch.optim's `state`, FORGE's states)."""
    tensors = {id(p): p for p in model.parameters()}
    optimizers = [optimizer] + ([optimizer.rest] if getattr(optimizer, "rest", None) is not None else [])
    for opt in optimizers:
        for state in opt.state.values():
            tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    for param in getattr(optimizer, "params", []):
        tensors.update({id(t): t for t in param.state.named_tensors().values()})
    return sum(t.numel() * t.element_size() for t in tensors.values())
