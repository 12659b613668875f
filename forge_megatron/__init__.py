"""FORGE for Megatron-LM: the optimizer step fused into the weight-gradient GEMM.

The weight gradient of each covered linear layer is computed one output tile at a time and
consumed by the optimizer rule in the same program; it is never stored.

The public names load on first use (PEP 562), so that importing a submodule, e.g. the console
entry point that a spawned helper process re-imports, does not load torch and Triton by itself.
"""

import importlib

_PUBLIC = {
    "Accumulation": "forge_megatron.core.update",
    "ForgeConfig": "forge_megatron.core.param",
    "ForgeParam": "forge_megatron.core.param",
    "ForgeState": "forge_megatron.core.state",
    "GroupedForgeState": "forge_megatron.core.state",
    "Rule": "forge_megatron.core.rules",
    "TileConfig": "forge_megatron.core.plan",
    "UpdateResult": "forge_megatron.core.update",
    "apply_accumulated": "forge_megatron.core.update",
    "fused_update": "forge_megatron.core.update",
    "fused_update_grouped": "forge_megatron.core.update",
    "get_rule": "forge_megatron.core.rules",
    "register_rule": "forge_megatron.core.rules",
    "registered_rules": "forge_megatron.core.rules",
}

__all__ = sorted([*_PUBLIC, "ops"])


def __getattr__(name):
    if name == "ops":  # the rule vocabulary; see rules.py
        return importlib.import_module("forge_megatron.core.ops_torch")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'forge_megatron' has no attribute {name!r}")
