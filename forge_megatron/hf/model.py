"""A Megatron GPT built in this process exactly as forge-pretrain-gpt builds it, so that converted
weights carry the training run's parameter names and sharding metadata.

The flags go through forge-pretrain-gpt's own parser and `model_config` (Megatron's
`gpt_config_from_args`, FORGE's local layer spec); the model comes from Megatron's GPT builder.
Without torchrun the process is a world of one (gloo); inside one that Megatron's model
parallelism is already set up in (the tests' gloo ranks), that set-up is used. No tokenizer,
optimizer or training loop is created.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import torch

from forge_megatron.megatron.world import init_world_of_one

# What the FORGE (local) spec needs to build without Transformer Engine or Apex, on any machine:
# megatron-core's local layers (FORGE's), no Apex weight-gradient fusion, no TE rope fusion, torch's
# norms. The converters write them into model_flags.txt, so every run on a checkpoint builds this model.
LOCAL_SPEC_FLAGS = ("--transformer-impl", "local", "--no-gradient-accumulation-fusion", "--no-rope-fusion",
                    "--no-persist-layer-norm")
# Flags every conversion adds: build on the CPU without a random initialization (every weight is
# then written), and the kernels that need Transformer Engine or CUDA off (no weight depends on them).
BUILD_FLAGS = ("--use-cpu-initialization", "--no-initialization", *LOCAL_SPEC_FLAGS,
               "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
               "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer")


def build_gpt(flags: list[str]):
    """(args, GPTModel) for Megatron `flags` (model-shape flags; the build flags above are added
    first, so `flags` may override them), on this process's tensor-parallel rank."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    from forge_megatron.cli.pretrain_gpt import model_config
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.megatron.attention import core_attention

    init_world_of_one()  # torch.distributed as dist_checkpointing needs it, unless the caller's
    if not torch.cuda.is_available():
        from forge_megatron.megatron.cpu import adapt_args_to_cpu, enable_megatron_on_cpu

        enable_megatron_on_cpu()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK=str(torch.distributed.get_rank()), WORLD_SIZE=str(torch.distributed.get_world_size()))
    sys.argv = ["forge-hf", *BUILD_FLAGS, *flags]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron's argument dump
            args = parse_args(extra_args_provider=add_forge_args)
            validate_args(args, {})
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not torch.cuda.is_available():
        adapt_args_to_cpu(args)
    set_args(args)
    sizes = {"tensor_model_parallel_size": args.tensor_model_parallel_size,
             "expert_model_parallel_size": args.expert_model_parallel_size,
             "expert_tensor_parallel_size": args.expert_tensor_parallel_size}
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(**sizes)
    else:
        set_up = {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                  "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
                  "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size()}
        if set_up != sizes:
            raise RuntimeError(f"model parallelism is set up for {set_up}, the flags ask for {sizes}")
    model_parallel_cuda_manual_seed(args.seed)
    model_cfg = model_config(args)
    builder = model_cfg.get_builder_cls()(model_cfg)
    with core_attention(args.forge_core_attention):
        model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups(), pre_process=True,
                                    post_process=True)
    return args, model



def gpt_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The logits [batch, seq, padded vocabulary] of a GPT built by build_gpt on `tokens` [batch,
    seq], causal, in eval mode; gathered over the tensor-parallel ranks."""
    from megatron.core import parallel_state

    seq = tokens.shape[1]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]  # True: masked (Megatron's)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(seq).expand_as(tokens), causal)
    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits
