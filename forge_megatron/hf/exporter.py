"""A Megatron checkpoint (forge-pretrain-gpt's torch_dist, any TP; or TP=1 torch format; local or
Transformer Engine layout) -> a Hugging Face directory that transformers' from_pretrained loads.

The config.json comes from the source Hugging Face directory (--hf-config-from; its tokenizer and
generation-config files are copied too) or, without one, from the Megatron arguments saved in the
checkpoint. Either way the checkpoint's shapes are checked against it. The model is built at TP=1
from that config, exactly as the importer builds it, with the checkpoint's padded vocabulary and
dtype, filled from the checkpoint, and its state dict mapped back (padding rows dropped).
"""

from __future__ import annotations

import json
import os

import torch

from forge_megatron.hf.checkpoint import Checkpoint, resolve
from forge_megatron.hf.config import architecture, config_from_megatron_args, megatron_flags, read_config
from forge_megatron.hf.errors import ConversionError
from forge_megatron.hf.files import copy_side_files, write_safetensors
from forge_megatron.hf.mapping import megatron_to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_megatron_model(ckpt_dir: str, config: dict | None = None, iteration: int | None = None,
                        vocab_size: int | None = None):
    """(Hugging Face config, Megatron TP=1 model filled from the checkpoint, Checkpoint)."""
    from forge_megatron.hf.model import build_gpt
    from forge_megatron.megatron.world import init_world_of_one

    init_world_of_one()
    ckpt = Checkpoint(resolve(ckpt_dir, iteration))
    if config is None:
        if ckpt.args is None:
            raise ConversionError(f"{ckpt.path} holds no Megatron arguments: pass --hf-config-from")
        config = config_from_megatron_args(ckpt.args, vocab_size)
    arch = architecture(config)
    _check_shapes(ckpt, arch)
    flags = [*megatron_flags(config, seq_length=1), "--seq-length", "1", "--padded-vocab-size", str(ckpt.padded_vocab)]
    if ckpt.dtype == torch.bfloat16:
        flags.append("--bf16")
    elif ckpt.dtype == torch.float16:
        flags.append("--fp16")
    _, model = build_gpt(flags)
    ckpt.load_into(model)
    return config, model, ckpt


def _check_shapes(ckpt: Checkpoint, arch) -> None:
    """The checkpoint's embedding and qkv shapes against the config (a wrong --hf-config-from)."""
    hidden = ckpt.shapes["embedding.word_embeddings.weight"][1]
    qkv_rows = arch.num_query_groups * (arch.heads_per_group + 2) * arch.head_dim
    qkv = [s for k, s in ckpt.shapes.items() if k.endswith("linear_qkv.weight")]
    if hidden != arch.hidden_size or not qkv or qkv[0][-2] != qkv_rows or ckpt.padded_vocab < arch.vocab_size:
        raise ConversionError(f"the checkpoint (hidden {hidden}, qkv {qkv[:1]}, padded vocab {ckpt.padded_vocab}) "
                                 f"does not match the config (hidden {arch.hidden_size}, qkv rows {qkv_rows}, vocab "
                                 f"{arch.vocab_size})")


def export_hf(ckpt_dir: str, out_dir: str, hf_config_from: str | None = None, iteration: int | None = None,
              dtype: str | None = None, vocab_size: int | None = None) -> dict:
    """Write the Hugging Face directory `out_dir`; returns its config."""
    source = read_config(hf_config_from) if hf_config_from else None
    config, model, ckpt = load_megatron_model(ckpt_dir, source, iteration, vocab_size)
    out_dtype = DTYPES[dtype] if dtype else ckpt.dtype
    state = megatron_to_hf(model.state_dict(), architecture(config))
    tensors = {name: t.detach().to(out_dtype).contiguous() for name, t in state.items()}
    if torch.distributed.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors(out_dir, tensors)
        dtype_key = "dtype" if "dtype" in config else "torch_dtype"  # transformers 5 / 4 spelling
        config = {**config, dtype_key: str(out_dtype).removeprefix("torch."),
                  "architectures": config.get("architectures") or [_architecture_name(config)]}
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if hf_config_from:
            copy_side_files(hf_config_from, out_dir)
    return config


def _architecture_name(config: dict) -> str:
    from forge_megatron.hf.config import ARCHITECTURES

    return ARCHITECTURES[config["model_type"]]
