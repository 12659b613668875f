"""FORGE inside Megatron: layers, layer spec, flags, the controller, checkpoint state, the hook into
Megatron's training loop, and what that loop needs on CPU.

`enable_forge(args, model_cfg)` and `add_forge_args(parser)` are what a Megatron-LM pretrain_gpt.py needs
(patches/).
"""

from forge_megatron.megatron.hook import add_forge_args, enable_forge

__all__ = ["add_forge_args", "enable_forge"]
