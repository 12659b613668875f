"""State dicts laid out for Megatron's Transformer Engine spec, in the FORGE (local) spec's names.

The TE spec fuses each layer's two norms into the linear that follows them
(TELayerNormColumnParallelLinear), so its state dict names them
`self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight` where the
local spec has `input_layernorm.weight` and `pre_mlp_layernorm.weight`; TE's linears also carry an
`_extra_state` (FP8 metadata) that the local linears accept and ignore. Everything else (qkv's
grouped layout, fc1's [gate; up]) is the same in both.

In torch_dist checkpoints megatron-core already writes the local norms under the TE names (the
local spec's `sharded_state_dict_keys_map`), so a TE-spec torch_dist checkpoint loads into the
FORGE spec as it is; the renaming here is for plain state dicts: `--ckpt-format torch`
checkpoints and `state_dict()` of a TE-spec model.
"""

from __future__ import annotations

import re

# local spec name -> TE spec name, within a layer
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}
_LAYER = re.compile(r"^(.*decoder\.layers\.(?:\d+\.)?)(.+)$")  # per layer, or stacked (torch_dist)


def is_te_layout(names) -> bool:
    return any(_rename(name, TE_TO_LOCAL) != name for name in names)


def te_to_local(state_dict: dict) -> dict:
    """A TE-spec state dict with the local spec's names (order kept; other entries unchanged)."""
    return {_rename(name, TE_TO_LOCAL): value for name, value in state_dict.items()}


def local_to_te(state_dict: dict) -> dict:
    """The inverse of te_to_local."""
    return {_rename(name, LOCAL_TO_TE): value for name, value in state_dict.items()}


def _rename(name: str, table: dict[str, str]) -> str:
    match = _LAYER.match(name)
    if match and match.group(2) in table:
        return match.group(1) + table[match.group(2)]
    return name
