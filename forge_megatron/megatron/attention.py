"""Core attention through torch's scaled_dot_product_attention, for the local layer spec.

FORGE covers megatron-core's local linears, so FORGE models are built with the local spec, whose
DotProductAttention materializes the [b, heads/tp, s, s] score and probability matrices: at 8k
tokens they, not weights or optimizer state, fill a GPU (docs/memory.md). `SDPAttention` takes
the same constructor and forward arguments and calls `torch.nn.functional.scaled_dot_product_attention`, which on a GPU runs a
fused kernel (flash or memory-efficient attention) that keeps O(s) statistics instead of the
O(s²) matrices, and on CPU torch's fused CPU kernel. It is a drop-in replacement for the
core attention of megatron-core's local spec (`core_attention("sdpa")`, for every layer spec built
within, the launcher's --forge-core-attention); the two agree to rounding (tests/test_attention.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

CORE_ATTENTIONS = ("local", "sdpa")


class SDPAttention(MegatronModule):
    """DotProductAttention's interface, computed by torch's fused scaled_dot_product_attention.

    query [sq, b, heads/tp, dk], key [sk, b, groups/tp, dk] and value [sk, b, groups/tp, dv] ->
    context [sq, b, heads/tp·dv] (multi-latent attention passes dk != dv as k_channels / v_channels,
    which megatron-core 0.19's local DotProductAttention does not take).
    Megatron's boolean mask marks the positions to drop; with no mask and a causal mask type the
    kernel's own causal path runs (the fastest: flash attention on a GPU). Grouped-query attention
    runs inside the kernel where flash attention takes it (`uses_native_gqa`); elsewhere keys and
    values are repeated per query head first, because torch's other fused kernels refuse unequal
    head counts and it would silently fall back to its unfused math kernel (the s × s scores).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        _refuse_unsupported(config)
        self.attn_mask_type = attn_mask_type
        # apply_query_key_layer_scaling divides the scale by the layer number and the softmax
        # multiplies it back (DotProductAttention): the probabilities see the plain scale.
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(k_channels or config.kv_channels))
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed sequences nor an attention bias; use "
                             "--forge-core-attention local or Transformer Engine's attention")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, batch = query.shape[:2]
        # [s, b, heads, d] -> [b, heads, s, d]: a view, the head dimension stays contiguous.
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        repeat = query.shape[1] // key.shape[1]  # query heads per key/value group on this rank
        native_gqa = repeat > 1 and uses_native_gqa(query, attention_mask)
        if repeat > 1 and not native_gqa:
            key, value = (t.repeat_interleave(repeat, dim=1) for t in (key, value))
        if attention_mask is not None:
            attention_mask = ~attention_mask  # Megatron: True drops a position; SDPA: True keeps it.
        dropout = self.dropout if self.training else 0.0
        with (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
              else contextlib.nullcontext()):
            context = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=native_gqa)
        # [b, heads, sq, d] -> [sq, b, heads·d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)


def uses_native_gqa(query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether SDPA's flash kernel will take grouped-query attention as is: on a GPU, 16-bit, no
    mask, head dimension <= 256 (the cases where enable_gqa does not fall back to the math kernel)."""
    return (query.is_cuda and attention_mask is None and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256)


def _refuse_unsupported(config) -> None:
    """DotProductAttention options the fused kernel does not compute, each with the fix."""
    if config.context_parallel_size != 1:
        raise ValueError("SDPAttention does not split sequences across ranks; set --context-parallel-size 1")
    if config.window_size is not None:
        raise ValueError("SDPAttention has no sliding window; drop --window-size or use --forge-core-attention local")
    if config.softmax_type != "vanilla":
        raise ValueError(f"SDPAttention computes the vanilla softmax, not {config.softmax_type!r}; use "
                         "--forge-core-attention local")


@contextlib.contextmanager
def core_attention(kind: str):
    """Within, every layer spec megatron-core builds with its local spec provider (the decoder's, a
    mixture-of-experts block's, the multi-token-prediction layers') gets `kind`'s core attention:
    "local" is megatron-core's DotProductAttention, "sdpa" SDPAttention. Parameter-free, so the
    model's parameters are the same either way."""
    if kind not in CORE_ATTENTIONS:
        raise ValueError(f"unknown core attention {kind!r}; choose one of {CORE_ATTENTIONS}")
    original = LocalSpecProvider.core_attention
    chosen = {"local": DotProductAttention, "sdpa": SDPAttention}[kind]
    LocalSpecProvider.core_attention = lambda self: chosen
    try:
        yield
    finally:
        LocalSpecProvider.core_attention = original
