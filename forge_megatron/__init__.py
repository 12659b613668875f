"""FORGE for Megatron-LM: the optimizer step fused into the weight-gradient GEMM.

The weight gradient of each covered linear layer is computed one output tile at a time and
consumed by the optimizer rule in the same program; it is never stored.
"""

from forge_megatron.core import ops_torch as ops  # the rule vocabulary; see rules.py
from forge_megatron.core.param import ForgeConfig, ForgeParam
from forge_megatron.core.plan import TileConfig
from forge_megatron.core.rules import Rule, get_rule, register_rule, registered_rules
from forge_megatron.core.state import ForgeState
from forge_megatron.core.update import UpdateResult, fused_update

__all__ = [
    "ForgeConfig",
    "ForgeParam",
    "ForgeState",
    "Rule",
    "TileConfig",
    "UpdateResult",
    "fused_update",
    "get_rule",
    "ops",
    "register_rule",
    "registered_rules",
]
