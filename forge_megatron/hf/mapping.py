"""The weight mapping between a Hugging Face Llama-family state dict and a Megatron GPT's (local
layer spec, TP=1 full tensors). Torch only.

Megatron packs q, k and v into one linear_qkv weight in grouped-query layout: for each of the
`num_query_groups` groups, that group's q heads, then its k head, then its v head (so a
tensor-parallel shard of whole groups is a contiguous row block). SwiGLU's gate and up projections
are one linear_fc1 weight, [gate; up] (Megatron's swiglu chunks its input in two and gates with
the first half). The vocabulary is padded to `padded_vocab` rows with zeros; export drops them.
RoPE needs no permutation: Megatron's rotary embedding uses the rotate-half convention of
transformers' Llama (the logits tests check it). With tied embeddings the model has no
output_layer weight and Hugging Face's lm_head is the embedding.

Mixtures of experts (Qwen3-MoE, Mixtral; every layer): the router's weight [experts, hidden] is
Megatron's `mlp.router.weight`, and expert e's gate, up and down projections are SequentialMLP's
`mlp.experts.local_experts.e.linear_fc1.weight` ([gate; up]) and `linear_fc2.weight`, at expert-
parallel size 1 (megatron-core's sharded_state_dict then writes them under the expert-sharded keys
`decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`, which load at any expert-parallel size).
Qwen3's per-head q and k norms are `self_attention.q_layernorm` / `k_layernorm`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from forge_megatron.hf.config import Architecture

HF_LAYER = "model.layers.{i}."
MEGATRON_LAYER = "decoder.layers.{i}."
# one-to-one per-layer names (Hugging Face -> Megatron local spec)
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
}
QK_NORM_RENAMES = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
                   "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}
GLOBAL_RENAMES = {"model.norm.weight": "decoder.final_layernorm.weight"}
# model type -> (router weight, expert e's prefix, its gate, up and down projections), in a layer
EXPERTS = {"qwen3_moe": ("mlp.gate.weight", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
           "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"))}
MEGATRON_ROUTER = "mlp.router.weight"
MEGATRON_EXPERT = "mlp.experts.local_experts.{e}."


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """[q; k; v] rows (weights [rows, hidden] or biases [rows]) into Megatron's grouped layout."""
    tail = q.shape[1:]
    q = q.reshape(arch.num_query_groups, arch.heads_per_group * arch.head_dim, *tail)
    k = k.reshape(arch.num_query_groups, arch.head_dim, *tail)
    v = v.reshape(arch.num_query_groups, arch.head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def unpack_qkv(qkv: torch.Tensor, arch: Architecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_qkv."""
    tail = qkv.shape[1:]
    grouped = qkv.reshape(arch.num_query_groups, (arch.heads_per_group + 2) * arch.head_dim, *tail)
    q, k, v = grouped.split([arch.heads_per_group * arch.head_dim, arch.head_dim, arch.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if weight.shape[0] > padded_vocab:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows does not fit a padded vocabulary of {padded_vocab}")
    if weight.shape[0] == padded_vocab:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])])


def layer_renames(arch: Architecture) -> dict[str, str]:
    """The one-to-one names of a layer (Hugging Face -> Megatron) for this architecture."""
    return {**LAYER_RENAMES, **(QK_NORM_RENAMES if arch.qk_layernorm else {}),
            **({EXPERTS[arch.model_type][0]: MEGATRON_ROUTER} if arch.num_experts else {})}


def gated_mlps(arch: Architecture) -> list[tuple[str, tuple[str, str, str], str]]:
    """A layer's SwiGLU MLPs: (Hugging Face prefix, its gate, up and down names, Megatron prefix),
    the dense MLP or every expert."""
    if not arch.num_experts:
        return [("mlp.", ("gate_proj", "up_proj", "down_proj"), "mlp.")]
    _, prefix, names = EXPERTS[arch.model_type]
    return [(prefix.format(e=e), names, MEGATRON_EXPERT.format(e=e)) for e in range(arch.num_experts)]


def hf_to_megatron(get: Callable[[str], torch.Tensor], arch: Architecture,
                   padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, tensor) for every weight of the Megatron model, one at a time; `get(name)`
    returns the Hugging Face tensor of that name (so a caller can read them lazily)."""
    yield "embedding.word_embeddings.weight", pad_vocab(get("model.embed_tokens.weight"), padded_vocab)
    for i in range(arch.num_layers):
        hf, meg = HF_LAYER.format(i=i), MEGATRON_LAYER.format(i=i)
        for hf_name, meg_name in layer_renames(arch).items():
            yield meg + meg_name, get(hf + hf_name)
        attn = hf + "self_attn."
        yield meg + "self_attention.linear_qkv.weight", pack_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), arch)
        if arch.qkv_bias:
            yield meg + "self_attention.linear_qkv.bias", pack_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), arch)
        for hf_mlp, (gate, up, down), meg_mlp in gated_mlps(arch):
            yield meg + meg_mlp + "linear_fc1.weight", torch.cat([get(f"{hf}{hf_mlp}{gate}.weight"),
                                                                  get(f"{hf}{hf_mlp}{up}.weight")])
            yield meg + meg_mlp + "linear_fc2.weight", get(f"{hf}{hf_mlp}{down}.weight")
    for hf_name, meg_name in GLOBAL_RENAMES.items():
        yield meg_name, get(hf_name)
    if not arch.tied:
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"), padded_vocab)


def hf_names(arch: Architecture) -> set[str]:
    """The Hugging Face tensors the mapping reads (a checkpoint's other tensors, e.g. rotary
    inv_freq buffers, are derived ones and are ignored)."""
    per_layer = [*layer_renames(arch),
                 *(f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")[:1 + arch.qkv_bias]),
                 *(f"{prefix}{name}.weight" for prefix, names, _ in gated_mlps(arch) for name in names)]
    names = {"model.embed_tokens.weight", *GLOBAL_RENAMES, *(() if arch.tied else ("lm_head.weight",))}
    return names | {HF_LAYER.format(i=i) + name for i in range(arch.num_layers) for name in per_layer}


def megatron_to_hf(state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a Megatron TP=1 model state dict (padding rows dropped;
    lm_head written only for untied embeddings, as transformers saves it)."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:arch.vocab_size]}
    for i in range(arch.num_layers):
        hf, meg = HF_LAYER.format(i=i), MEGATRON_LAYER.format(i=i)
        for hf_name, meg_name in layer_renames(arch).items():
            out[hf + hf_name] = state[meg + meg_name]
        attn = hf + "self_attn."
        q, k, v = unpack_qkv(state[meg + "self_attention.linear_qkv.weight"], arch)
        out.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v})
        if arch.qkv_bias:
            q, k, v = unpack_qkv(state[meg + "self_attention.linear_qkv.bias"], arch)
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
        for hf_mlp, (gate, up, down), meg_mlp in gated_mlps(arch):
            gate_weight, up_weight = state[meg + meg_mlp + "linear_fc1.weight"].chunk(2)
            out.update({f"{hf}{hf_mlp}{gate}.weight": gate_weight, f"{hf}{hf_mlp}{up}.weight": up_weight,
                        f"{hf}{hf_mlp}{down}.weight": state[meg + meg_mlp + "linear_fc2.weight"]})
    for hf_name, meg_name in GLOBAL_RENAMES.items():
        out[hf_name] = state[meg_name]
    if not arch.tied:
        out["lm_head.weight"] = state["output_layer.weight"][:arch.vocab_size]
    return {name: t.contiguous() for name, t in out.items()}
