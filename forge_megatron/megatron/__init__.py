"""FORGE inside Megatron: layers, the cover of a built model, flags, the controller, checkpoint
state, the hook into Megatron's training loop, and what that loop needs on CPU.

`add_forge_args(parser)`, `forge_argument_checks()` and `enable_forge(args, model_cfg)` are what a
Megatron-LM pretrain_gpt.py needs (patches/). They load on first use, so that importing a light
submodule (errors) stays light.
"""

import importlib

_PUBLIC = {"add_forge_args": "forge_megatron.megatron.args", "forge_argument_checks": "forge_megatron.megatron.args",
           "enable_forge": "forge_megatron.megatron.hook"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'forge_megatron.megatron' has no attribute {name!r}")
