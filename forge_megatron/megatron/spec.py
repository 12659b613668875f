"""A GPT layer spec with FORGE linears, and the output-layer swap.

`get_gpt_layer_forge_spec` is megatron-core's local GPT layer spec (`get_gpt_layer_local_spec`)
with linear_qkv / linear_fc1 built as ForgeColumnParallelLinear and linear_proj / linear_fc2 as
ForgeRowParallelLinear, all sharing one ForgeConfig. GPTModel's output layer is not part of the
layer spec (gpt_model.py builds a ColumnParallelLinear itself): `cover_output_layer` turns it
into a FORGE layer after the model is built and before it is wrapped in DDP.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from forge_megatron.core.param import ForgeConfig
from forge_megatron.megatron.attention import with_core_attention
from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear

logger = logging.getLogger(__name__)


def get_gpt_layer_forge_spec(forge: ForgeConfig | None = None, core_attention: str = "local",
                             **local_spec_kwargs) -> ModuleSpec:
    """The local GPT layer spec with the four transformer linears covered by FORGE.

    `core_attention` is "local" (megatron-core's DotProductAttention) or "sdpa" (torch's fused
    attention, forge_megatron.megatron.attention). `local_spec_kwargs` go to megatron-core's
    get_gpt_layer_local_spec (normalization, qk_layernorm, ...). Mixture-of-experts and
    multi-latent attention are not covered.
    """
    if local_spec_kwargs.get("num_experts"):
        raise ValueError("FORGE does not cover mixture-of-experts layers (experts see a different token set per "
                         "rank); drop --num-experts or use the standard layer spec")
    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("FORGE's GPT spec covers standard self-attention only; drop --multi-latent-attention")
    forge = forge or ForgeConfig()
    column = functools.partial(ForgeColumnParallelLinear, forge=forge)
    row = functools.partial(ForgeRowParallelLinear, forge=forge)
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    layer = spec.submodules
    attention = layer.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, linear_qkv=column, linear_proj=row))
    layer = dataclasses.replace(layer, self_attention=attention, mlp=_cover_mlp(layer.mlp, column, row))
    return with_core_attention(dataclasses.replace(spec, submodules=layer), core_attention)


def layer_spec_provider(forge: ForgeConfig | None, core_attention: str = "local"):
    """A `transformer_layer_spec` for Megatron's GPT model config: called with the config when the
    model is built, it gives FORGE's spec (or, with `forge` None, megatron-core's local spec) with
    the config's normalization and qk-layernorm, and the given core attention."""

    def spec(model_config, vp_stage=None):
        kwargs = dict(normalization=model_config.transformer.normalization,
                      qk_layernorm=model_config.transformer.qk_layernorm)
        if forge is None:
            return with_core_attention(get_gpt_layer_local_spec(**kwargs), core_attention)
        return get_gpt_layer_forge_spec(forge, core_attention, **kwargs)

    return spec


def _cover_mlp(mlp, column, row):
    """Swap the MLP's fc1/fc2 builders; megatron-core 0.19 spells the MLP entry as a partial."""
    if isinstance(mlp, functools.partial):
        submodules = dataclasses.replace(mlp.keywords["submodules"], linear_fc1=column, linear_fc2=row)
        return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
    if isinstance(mlp, ModuleSpec):
        return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc1=column,
                                                                         linear_fc2=row))
    raise TypeError(f"unexpected MLP entry in the layer spec: {mlp!r}")


def cover_output_layer(model, forge: ForgeConfig | None = None) -> bool:
    """Turn a built GPTModel's output layer into a ForgeColumnParallelLinear, in place.

    Call after the model is built and before DDP wrapping. The layer keeps its weight, buffers
    and Megatron attributes; only its class (hence its autograd function) changes. Returns False,
    with a log line, when the output weight is tied to the embedding (the shared weight gets
    gradients from two places, so it stays with the standard optimizer) or when this pipeline
    stage has no output layer.
    """
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return False
    if getattr(model, "share_embeddings_and_output_weights", False) or layer.weight is None:
        logger.info("FORGE: the output layer shares its weight with the embedding; it stays with the standard "
                    "optimizer (untie with --untie-embeddings-and-output-weights to cover it)")
        return False
    if type(layer) is not ColumnParallelLinear:
        raise TypeError(f"cover_output_layer expects megatron-core's ColumnParallelLinear, got {type(layer).__name__}")
    ForgeColumnParallelLinear._refuse_unsupported("output layer", layer.config, {"is_expert": layer.is_expert})
    layer.__class__ = ForgeColumnParallelLinear
    layer._cover(forge, partition_dim=0)
    return True
