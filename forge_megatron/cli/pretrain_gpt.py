"""forge-pretrain-gpt: Megatron's pretrain_gpt.py, with FORGE's flags.

It takes Megatron-LM pretrain_gpt.py's flags and runs Megatron's own training loop
(`megatron.training.pretrain`, from the megatron-core wheel): its optimizers, schedules,
checkpointing, evaluation and logging. FORGE is installed by the same hook that patches/ adds to
a Megatron-LM checkout (`enable_forge`), so what runs here is what runs there. This module adds
only what Megatron-LM keeps outside the wheel: the model config, the forward step and loss, and
the dataset provider (Megatron's GPTDataset over --data-path, or --mock-data).

On a machine without CUDA it first applies forge_megatron.megatron.cpu (gloo, CPU tensors).
A configuration error is one line on rank 0 and exit status 2.

The module imports torch and Megatron inside its functions: dist_checkpointing's writer starts a
spawned helper process, which re-imports this module, and should not pay for them.
"""

from __future__ import annotations

import os
import sys
from functools import partial

from forge_megatron.megatron.data_checks import check_data
from forge_megatron.megatron.errors import ConfigurationError, exit_on_configuration_error
from forge_megatron.megatron.world import export_world_of_one


def main(argv: list[str] | None = None) -> None:
    import torch

    export_world_of_one()  # a plain process (not under torchrun) is a world of one
    # Megatron's tensor-parallel overlap (and FORGE's: the dgrad collective is issued before the
    # fused update) needs kernels launched in program order; Megatron refuses TP > 1 without it.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with exit_on_configuration_error(validating=True):
        if not torch.cuda.is_available():
            from forge_megatron.megatron.cpu import enable_megatron_on_cpu

            enable_megatron_on_cpu()
        args = parse_arguments(argv)
        check_data(args)  # a missing dataset or an empty --split part: one line, not a hang in Megatron
        model_cfg = model_config(args)
    from forge_megatron.megatron.attention import core_attention

    # refusals met while building the model or checkpointing; the local spec's core attention is
    # --forge-core-attention's (standard runs too, for like-for-like comparisons)
    with exit_on_configuration_error(), core_attention(args.forge_core_attention):
        train(args, model_cfg)


def parse_arguments(argv: list[str] | None):
    """Megatron's parser and validation with FORGE's flags and defaults; FORGE's own checks come
    before Megatron's argument dump, so a refusal is the first thing printed."""
    from megatron.training.arguments import parse_and_validate_args

    from forge_megatron.megatron.args import add_forge_args, forge_argument_checks

    saved = sys.argv
    sys.argv = [saved[0], *(argv if argv is not None else saved[1:])]
    try:
        with forge_argument_checks(sys.argv[1:]):
            args = parse_and_validate_args(extra_args_provider=add_forge_args,
                                           args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    finally:
        sys.argv = saved
    import torch

    if not torch.cuda.is_available():
        from forge_megatron.megatron.cpu import adapt_args_to_cpu

        adapt_args_to_cpu(args)
    return args


def model_config(args):
    """Megatron's GPT model config from the flags, as Megatron-LM's pretrain_gpt.py makes it: its
    builder chooses the layer or block spec (and the MTP block) from the config. Under --use-forge,
    FORGE covers the built model's linears (enable_forge)."""
    from megatron.training.argument_utils import gpt_config_from_args

    from forge_megatron.megatron.hook import enable_forge

    model_cfg = gpt_config_from_args(args)
    enable_forge(args, model_cfg)  # no-op without --use-forge
    return model_cfg


def train(args, model_cfg) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    _use_the_wheels_dataset_helpers()
    datasets_provider.is_distributed = True  # built on the ranks that read data (Megatron's convention)
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), datasets_provider, ModelType.encoder_or_decoder,
             forward_step, get_embedding_ranks=embedding_ranks)


def _use_the_wheels_dataset_helpers() -> None:
    """Megatron's initialization builds the dataset helpers with `make` in their source folder, as
    in a Megatron-LM checkout; the megatron-core wheel ships them compiled (helpers_cpp) and has
    no Makefile, so the build is skipped when the compiled module loads."""
    from megatron.core.datasets import utils

    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError:
        return
    utils.compile_helpers = lambda: None


# -- data ------------------------------------------------------------------------------------------


def datasets_provider(train_valid_test_num_samples, vp_stage=None):
    """Megatron's GPTDataset over --data-path (MockGPTDataset with --mock-data), through its
    BlendedMegatronDatasetBuilder."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training import get_args
    from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        data_parallel_size=args.data_parallel_size, context_parallel_size=args.context_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel)

    def built_on_this_rank():
        return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)

    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_valid_test_num_samples, built_on_this_rank,
                                         config).build()


def embedding_ranks(pp_ranks: list[int]) -> list[int]:
    """The first stage holds the embedding; the last one too when the output layer shares it."""
    from megatron.training import get_args

    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not get_args().untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return ranks


# -- forward step and loss ----------------------------------------------------------------------------


BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator, vp_stage=None) -> dict:
    """The micro-batch on this rank's device, broadcast from tensor-parallel rank 0 (Megatron's
    get_batch_on_this_tp_rank); middle pipeline stages need none."""
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return dict.fromkeys(BATCH_KEYS)
    args = get_args()
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        import torch

        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        sample = next(data_iterator)
        batch = {k: sample[k].to(device, non_blocking=True) if sample.get(k) is not None else None for k in BATCH_KEYS}
    return get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(), micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length, mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage))


def loss_func(loss_mask, output_tensor):
    """Summed token loss, the token count, and the report Megatron's loop averages and logs."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    if get_args().check_for_nan_in_loss_and_grad:
        machine = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject, message=f"found {what} in local forward loss",
                                    tolerance=0.0, fatal=True)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}


def forward_step(data_iterator, model):
    """Megatron's forward step contract: (output tensor, loss function of it)."""
    from megatron.core.utils import get_attr_wrapped_model

    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


__all__ = ["ConfigurationError", "main"]

if __name__ == "__main__":
    main()
