"""A Hugging Face Llama-family directory -> a Megatron torch_dist checkpoint for forge-pretrain-gpt.

The model is built at TP=1 in this process, on the CPU, by forge-pretrain-gpt's own model config
(FORGE's local spec), every weight is written from the Hugging Face tensors (read one at a time),
and the model's sharded_state_dict is saved as a release checkpoint: Megatron then loads it at any
tensor-parallel size (`--load OUT --finetune`), resharding qkv, SwiGLU and the vocabulary itself.

The one TP-dependent choice is the padded vocabulary: Megatron pads to a multiple of
--make-vocab-size-divisible-by x TP, so the importer pads as Megatron would at the TP it is told
(--tensor-model-parallel-size, default 1; the model is still built at TP=1) and writes the result
as --padded-vocab-size into model_flags.txt, which every later run passes: that size then loads
at every TP that divides it.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from forge_megatron.hf.checkpoint import save_release
from forge_megatron.hf.config import architecture, megatron_flags, read_config
from forge_megatron.hf.errors import ConversionError
from forge_megatron.hf.files import SafetensorsWeights
from forge_megatron.hf.mapping import hf_names, hf_to_megatron

FLAGS_FILE = "model_flags.txt"


def padding_args(extra: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The padding flags the importer reads itself (the rest are Megatron build flags)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--padded-vocab-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    return parser.parse_known_args(extra)


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding rule (megatron.training.vocab_utils)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def import_hf(hf_dir: str, out_dir: str, extra: list[str] | None = None) -> list[str]:
    """Convert `hf_dir` into a release checkpoint in `out_dir`; returns the model flags (also
    written to out_dir/model_flags.txt). `extra`: Megatron flags, e.g. --bf16 for bf16 weights,
    and the padding flags above."""
    from forge_megatron.hf.model import build_gpt

    config = read_config(hf_dir)
    arch = architecture(config)
    known, build_extra = padding_args(list(extra or []))
    padded = known.padded_vocab_size or padded_vocab_size(arch.vocab_size, known.make_vocab_size_divisible_by,
                                                          known.tensor_model_parallel_size)
    if padded < arch.vocab_size:
        raise ConversionError(f"--padded-vocab-size {padded} is below the vocabulary ({arch.vocab_size})")
    flags = [*megatron_flags(config, known.seq_length), "--padded-vocab-size", str(padded)]
    seq = known.seq_length or config.get("max_position_embeddings", 4096)
    args, model = build_gpt([*flags, "--seq-length", str(seq), *build_extra])

    weights = SafetensorsWeights(hf_dir)
    needed = hf_names(arch)
    missing = sorted(needed - set(weights))
    if missing:
        raise ConversionError(f"{hf_dir} lacks {len(missing)} weights the config implies, e.g. {missing[:3]}")
    ignored = {"lm_head.weight"} if arch.tied else set()
    unexpected = sorted(n for n in set(weights) - needed - ignored if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(f"{hf_dir} has weights this Llama-family mapping does not know, e.g. {unexpected[:3]}")

    params = dict(model.named_parameters())
    written = set()
    with torch.no_grad():
        for name, tensor in hf_to_megatron(weights.__getitem__, arch, padded):
            if params[name].shape != tensor.shape:
                raise ConversionError(f"{name}: Hugging Face gives {tuple(tensor.shape)}, the Megatron model has "
                                         f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
            written.add(name)
    if written != set(params):
        raise ConversionError(f"model weights not written: {sorted(set(params) - written)[:4]}")
    save_release(model, args, out_dir)
    return write_flags(out_dir, flags)


def write_flags(out_dir: str, flags: list[str]) -> list[str]:
    """Write out_dir/model_flags.txt: the model's flags and what the FORGE (local) spec needs to
    build it anywhere (LOCAL_SPEC_FLAGS), every flag a run on the checkpoint must pass; returns them."""
    from forge_megatron.hf.model import LOCAL_SPEC_FLAGS

    flags = [*flags, *LOCAL_SPEC_FLAGS]
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_dir, FLAGS_FILE), "w") as f:
            f.write(" ".join(flags) + "\n")
    return flags


def read_flags(ckpt_dir: str) -> list[str]:
    """The model flags an import wrote (for the training run's command line)."""
    with open(os.path.join(ckpt_dir, FLAGS_FILE)) as f:
        return f.read().split()
