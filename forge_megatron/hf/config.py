"""Hugging Face config.json <-> Megatron model flags, for the Llama family (Llama, Mistral, Qwen2) and
its mixtures of experts (Qwen3-MoE, Mixtral).

Every architectural field of config.json either maps to a Megatron flag or is refused with a
ConversionError that says why: a model that imports runs the same function in Megatron. The
other direction (a config.json from a checkpoint's Megatron arguments) serves an export without a
source Hugging Face directory. Torch only; no Megatron, no transformers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from forge_megatron.hf.errors import ConversionError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
MIXTURES = ("qwen3_moe", "mixtral")  # every layer's MLP is a mixture of SwiGLU experts
# megatron-core 0.19's Llama-3 rope scaling (RotaryEmbedding._apply_scaling) has these fixed;
# only the factor is a flag (--rope-scaling-factor).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Architecture:
    """The shapes the weight mapping needs (Hugging Face names in the comments)."""

    num_layers: int  # num_hidden_layers
    hidden_size: int
    ffn_hidden_size: int  # intermediate_size
    num_heads: int  # num_attention_heads
    num_query_groups: int  # num_key_value_heads
    head_dim: int
    vocab_size: int
    tied: bool  # tie_word_embeddings
    qkv_bias: bool  # Qwen2
    model_type: str = "llama"
    qk_layernorm: bool = False  # Qwen3's q_norm / k_norm: RMSNorm over each head before RoPE
    num_experts: int = 0  # num_experts (Qwen3-MoE) / num_local_experts (Mixtral); 0: a dense MLP
    moe_ffn_hidden_size: int = 0  # moe_intermediate_size (Qwen3-MoE) / intermediate_size (Mixtral)
    topk: int = 0  # num_experts_per_tok
    norm_topk_prob: bool = True  # the top-k probabilities renormalized to sum to 1 (Mixtral always)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def read_config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def architecture(config: dict) -> Architecture:
    """The shapes of a supported config.json; refuses what Megatron's GPT cannot compute."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"model_type {model_type!r} is not supported: Llama-family models only "
                                 f"({', '.join(ARCHITECTURES)})")
    _refuse_unmapped(config)
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConversionError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {groups}")
    moe = {}
    if model_type in MIXTURES:
        qwen = model_type == "qwen3_moe"
        moe = {"qk_layernorm": qwen, "topk": config["num_experts_per_tok"],
               "num_experts": config.get("num_experts") or config["num_local_experts"],
               "moe_ffn_hidden_size": config["moe_intermediate_size" if qwen else "intermediate_size"],
               "norm_topk_prob": bool(config.get("norm_topk_prob", False)) if qwen else True}
    return Architecture(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"], num_heads=heads, num_query_groups=groups,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab_size=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2", model_type=model_type,
        **moe)


def _refuse_unmapped(config: dict) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r}: Megatron's --swiglu is SiLU-gated; other activations do not map")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError("attention_bias / mlp_bias: Megatron has biases on all linears (--add-bias-linear) "
                                 "or on q/k/v only (--add-qkv-bias), not on the attention or MLP alone")
    if config.get("model_type") in ("qwen2", "qwen3_moe") and config.get("use_sliding_window"):
        raise ConversionError("use_sliding_window: the FORGE (local) spec has no sliding-window attention")
    if config.get("model_type") == "qwen3_moe" and (config.get("mlp_only_layers") or
                                                     config.get("decoder_sparse_step", 1) != 1):
        raise ConversionError("mlp_only_layers / decoder_sparse_step != 1: dense MLP layers between the mixture-of-"
                              "experts ones are not mapped (every layer must be a mixture of experts)")
    if config.get("model_type") == "mixtral" and config.get("router_jitter_noise", 0.0):
        raise ConversionError("router_jitter_noise: Mixtral scales the experts' input by the noise, Megatron's "
                              "--moe-input-jitter-eps only the router's; set it to 0")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported by this importer")


def rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either spelling: transformers 5's `rope_parameters`
    or the older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def megatron_flags(config: dict, seq_length: int | None = None) -> list[str]:
    """The Megatron model flags of a supported config.json (the model's shape and numerics; the
    training run adds its own --seq-length, batch, schedule and data flags)."""
    arch = architecture(config)
    theta, scaling = rope(config)
    if theta != int(theta):
        raise ConversionError(f"rope_theta {theta}: Megatron's --rotary-base is an integer")
    max_positions = config.get("max_position_embeddings", 4096)
    flags = [
        "--num-layers", arch.num_layers, "--hidden-size", arch.hidden_size, "--ffn-hidden-size", arch.ffn_hidden_size,
        "--num-attention-heads", arch.num_heads, "--kv-channels", arch.head_dim,
        "--max-position-embeddings", max_positions,
        "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", config.get("rms_norm_eps", 1e-6),
        "--disable-bias-linear", "--position-embedding-type", "rope", "--rotary-base", int(theta),
        "--attention-dropout", config.get("attention_dropout", 0.0), "--hidden-dropout", 0.0,
        "--vocab-size", arch.vocab_size,
    ]
    if arch.num_query_groups != arch.num_heads:
        flags += ["--group-query-attention", "--num-query-groups", arch.num_query_groups]
    if arch.qkv_bias:
        flags += ["--add-qkv-bias"]
    if arch.qk_layernorm:
        flags += ["--qk-layernorm"]
    if arch.num_experts:
        flags += _moe_flags(arch)
    if not arch.tied:
        flags += ["--untie-embeddings-and-output-weights"]
    flags += _rope_scaling_flags(scaling)
    window = config.get("sliding_window")
    if window is not None and config.get("model_type") in ("mistral", "mixtral") and window < max_positions:
        # The window never binds when no sequence is longer than it: attention is then plain causal.
        if seq_length is None or seq_length > window:
            raise ConversionError(f"sliding_window {window}: the FORGE (local) spec has no sliding-window "
                                     f"attention; it is exact only with --seq-length <= {window}")
    return [str(f) for f in flags]


def _moe_flags(arch: Architecture) -> list:
    """Every layer a mixture of `num_experts` SwiGLU experts, `topk` of them per token, routed as
    transformers routes: a softmax over all experts' logits, the top k, and (norm_topk_prob, and
    Mixtral always) those k renormalized. Megatron's softmax router does exactly this: by default it
    takes the top k logits and a softmax over them (the same renormalized probabilities); with
    --moe-router-pre-softmax a softmax over all logits and the top k of it (not renormalized). No
    capacity factor (no token dropped), no shared expert, no expert bias; the load-balancing loss
    is a training choice (--moe-aux-loss-coeff; transformers applies router_aux_loss_coef only with
    output_router_logits)."""
    flags = ["--num-experts", arch.num_experts, "--moe-router-topk", arch.topk, "--moe-ffn-hidden-size",
             arch.moe_ffn_hidden_size, "--moe-router-score-function", "softmax"]
    return flags + ([] if arch.norm_topk_prob else ["--moe-router-pre-softmax"])


def _rope_scaling_flags(scaling: dict | None) -> list:
    if scaling is None:
        return []
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        for key, value in MEGATRON_LLAMA3_ROPE.items():
            if not math.isclose(float(scaling.get(key, value)), value):
                raise ConversionError(f"rope_scaling {key} = {scaling.get(key)}: megatron-core 0.19's Llama-3 rope "
                                         f"scaling fixes it at {value} (only the factor is a flag)")
        return ["--use-rope-scaling", "--rope-scaling-factor", float(scaling["factor"])]
    if kind == "linear":
        factor = float(scaling["factor"])
        if factor != int(factor):
            raise ConversionError(f"linear rope scaling factor {factor}: Megatron's "
                                     "--rotary-seq-len-interpolation-factor is an integer")
        return ["--rotary-seq-len-interpolation-factor", int(factor)]
    raise ConversionError(f"rope scaling {kind!r} does not map to megatron-core 0.19 (it implements 'llama3' "
                             "and 'linear' for the GPT model)")


def config_from_megatron_args(args, vocab_size: int | None = None) -> dict:
    """A config.json for the Megatron arguments saved in a checkpoint (export without a source
    Hugging Face directory): Qwen2 when q/k/v have biases, Llama otherwise."""
    if not args.swiglu or args.normalization != "RMSNorm" or args.position_embedding_type != "rope":
        raise ConversionError("the checkpoint is not a Llama-family model (needs --swiglu, RMSNorm and rope)")
    if getattr(args, "add_bias_linear", False):
        raise ConversionError("the checkpoint has biases on every linear (--add-bias-linear): no Llama-family "
                                 "config maps it")
    vocab = vocab_size or args.vocab_size
    if vocab is None:
        raise ConversionError("the checkpoint's arguments have no --vocab-size: pass --hf-config-from or "
                                 "--vocab-size")
    model_type = _model_type_of(args)
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    config = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "num_hidden_layers": args.num_layers, "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size, "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": groups, "head_dim": args.kv_channels or args.hidden_size // args.num_attention_heads,
        "vocab_size": vocab, "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.layernorm_epsilon, "hidden_act": "silu", "rope_theta": float(args.rotary_base),
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "attention_dropout": args.attention_dropout,
    }
    if model_type in ("llama", "qwen3_moe"):
        config.update(attention_bias=False, **({} if model_type == "qwen3_moe" else {"mlp_bias": False}))
    if model_type == "qwen3_moe":
        config.update(num_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
                      moe_intermediate_size=args.moe_ffn_hidden_size, norm_topk_prob=not args.moe_router_pre_softmax,
                      decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    elif model_type == "mixtral":
        config.update(num_local_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
                      intermediate_size=args.moe_ffn_hidden_size, router_jitter_noise=0.0, sliding_window=None)
    if args.use_rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE}
    elif args.rotary_seq_len_interpolation_factor:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(args.rotary_seq_len_interpolation_factor)}
    return config


def _model_type_of(args) -> str:
    """The Hugging Face model type of a checkpoint's arguments: Qwen2 (q/k/v biases), Llama,
    Qwen3-MoE (experts with q/k norms), Mixtral (experts without); what none of them is, refused.
    (Checkpoints saved before a flag existed lack its argument: it is read with its default.)"""
    qk_norms = getattr(args, "qk_layernorm", False)
    if not getattr(args, "num_experts", None):
        if qk_norms:
            raise ConversionError("the checkpoint has q/k norms (--qk-layernorm) without experts: a dense Qwen3, which "
                                  "this exporter does not map")
        return "qwen2" if args.add_qkv_bias else "llama"
    if (getattr(args, "moe_layer_freq", 1) != 1 or getattr(args, "moe_shared_expert_intermediate_size", None)
            or getattr(args, "moe_router_topk_scaling_factor", None)
            or getattr(args, "moe_router_score_function", "softmax") != "softmax"
            or getattr(args, "moe_router_enable_expert_bias", False) or args.add_qkv_bias):
        raise ConversionError("the checkpoint's mixture of experts is neither Qwen3-MoE's nor Mixtral's (every layer "
                              "routed by softmax, no shared expert, expert bias or score scaling, no q/k/v biases)")
    if not qk_norms and getattr(args, "moe_router_pre_softmax", False):
        raise ConversionError("--moe-router-pre-softmax without q/k norms: Mixtral always renormalizes its top-k "
                              "probabilities (Megatron's default router)")
    return "qwen3_moe" if qk_norms else "mixtral"
