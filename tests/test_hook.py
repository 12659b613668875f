"""The hook (forge_megatron.megatron.hook.enable_forge) on Megatron's real model builder: the cover
of every linear and the controller it installs before DDP wraps the model; and the Megatron-LM
patch that installs the same hook. The hook's work in Megatron's training loop
(optimizer, scheduler, schedules, checkpoints) is tested end to end in test_pretrain_gpt.py."""

import os

import pytest
from distributed import result, run_scenarios

BASE = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 10 --lr 1e-3 "
        "--lr-warmup-iters 2 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 --transformer-impl local "
        "--no-gradient-accumulation-fusion --no-persist-layer-norm --normalization RMSNorm "
        "--position-embedding-type rope --no-rope-fusion --untie-embeddings-and-output-weights --use-cpu-initialization "
        "--tokenizer-type NullTokenizer --vocab-size 128 --mock-data --use-forge --forge-core-attention sdpa").split()


def _model_and_controller():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    from forge_megatron.megatron import hook

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import sys

    saved, sys.argv = sys.argv, ["pretrain_gpt.py", *BASE]
    try:
        args = parse_args(extra_args_provider=hook.add_forge_args)
    finally:
        sys.argv = saved
    validate_args(args)
    set_args(args)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    model_cfg = gpt_config_from_args(args)
    hook.enable_forge(args, model_cfg)
    hook.enable_forge(args, model_cfg)  # safe twice
    assert len(model_cfg.pre_wrap_hooks) == 1
    model_cfg.vocab_size = args.vocab_size
    from megatron.core.process_groups_config import ProcessGroupCollection

    from forge_megatron.megatron.attention import core_attention

    builder = model_cfg.get_builder_cls()(model_cfg)
    with core_attention(args.forge_core_attention):
        model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups(), pre_process=True,
                                    post_process=True)
    chunks = model_cfg.pre_wrap_hooks[0]([model])
    return args, chunks, hook._STATE["controller"]


def scenario_cover_and_pre_wrap_hook():
    from forge_megatron.megatron.attention import SDPAttention
    from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear

    args, (model,), controller = _model_and_controller()
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention, SDPAttention)  # --forge-core-attention sdpa
    assert isinstance(layer.self_attention.linear_qkv, ForgeColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, ForgeRowParallelLinear)
    assert isinstance(model.output_layer, ForgeColumnParallelLinear)  # untied: covered too
    assert len(controller.params) == 2 * 4 + 1
    assert not any(p.requires_grad for _, p in controller.named)
    return True


@pytest.fixture(scope="module")
def results():
    return run_scenarios(1, [scenario_cover_and_pre_wrap_hook])


def test_cover_and_pre_wrap_hook(results):
    assert result(results, "scenario_cover_and_pre_wrap_hook") == [True]


def test_patch_installs_the_hook_forge_pretrain_gpt_installs():
    """The patch's added lines import what exists here and call the hook as forge-pretrain-gpt does."""
    patch = open(os.path.join(os.path.dirname(__file__), "..", "patches", "pretrain_gpt.patch")).read()
    added = [line[1:].strip() for line in patch.splitlines() if line.startswith("+") and not line.startswith("+++")]
    imports = [line for line in added if line.startswith("from forge_megatron")]
    assert imports == ["from forge_megatron.megatron import add_forge_args, enable_forge, forge_argument_checks"]
    exec(imports[0], {})
    assert any(line.startswith("enable_forge(args, model_cfg)") for line in added)
    assert any(line.startswith("with forge_argument_checks():") for line in added)
    assert any("add_forge_args(" in line for line in added)
