"""FORGE inside Megatron: layers, layer spec, flags, the controller, checkpoint state, the hook into
Megatron's training loop, and what that loop needs on CPU.

`enable_forge(args, model_cfg)` and `add_forge_args(parser)` are what a Megatron-LM pretrain_gpt.py needs
(patches/). They load on first use, so that importing a light submodule (errors) stays light.
"""

import importlib

__all__ = ["add_forge_args", "enable_forge"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("forge_megatron.megatron.hook"), name)
    raise AttributeError(f"module 'forge_megatron.megatron' has no attribute {name!r}")
