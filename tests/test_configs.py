"""The shipped configs parse and validate with Megatron's own argument code and FORGE's checks,
and every refusal is one message naming the flag to change."""

import copy
import os
import subprocess
import sys

import pytest

from forge_megatron.megatron.args import add_forge_args, check_forge_args_before_megatron, validate_forge_args
from forge_megatron.megatron.errors import ConfigurationError

ROOT = os.path.join(os.path.dirname(__file__), "..")


def config_args(script: str, array: str, **env: str) -> list[str]:
    """The config's flags as a launcher expands them, with `env` set (e.g. TP=1)."""
    out = subprocess.run(["bash", "-c", f'source "{script}"; printf "%s\\n" "${{{array}[@]}}"'], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def parse(argv, world_size, monkeypatch):
    """Megatron's parser and validation (no FORGE checks yet)."""
    from megatron.training.arguments import parse_args, validate_args

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setattr("megatron.training.arguments.get_device_arch_version", lambda: 9)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    args = parse_args(extra_args_provider=add_forge_args)
    validate_args(args)
    return args


def tiny(*flags):
    return config_args("configs/tiny_gpt_cpu.sh", "TINY_GPT_ARGS") + ["--use-forge", *flags]


def test_llama3_8b_tp8_config(monkeypatch):
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    args = parse(config_args("configs/llama3_8b_tp8.sh", "LLAMA3_8B_TP8_ARGS") + ["--mock-data"], 8, monkeypatch)
    assert (args.tensor_model_parallel_size, args.data_parallel_size, args.sequence_parallel) == (8, 1, True)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_query_groups) == (32, 4096, 14336, 8)
    assert vocab_size_with_padding(128256, args, logging_enabled=False) == 129024
    forge = validate_forge_args(args)
    assert forge.rule == "adamw" and forge.hyperparameters["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("script, array, world, shape, accumulation", [
    ("configs/llama3_8b_tp2.sh", "LLAMA3_8B_TP2_ARGS", 2, (32, 4096, 14336, 32, 8), "fp32"),
    ("configs/llama3_70b_tp8.sh", "LLAMA3_70B_TP8_ARGS", 8, (80, 8192, 28672, 64, 8), "bf16"),
])
def test_accumulating_llama3_configs(script, array, world, shape, accumulation, monkeypatch):
    """Data-parallel size 1 and a global batch of 64 sequences: 64 micro-batches per step at the
    default micro-batch of 1, in FORGE's leanest regime with the config's accumulation dtype."""
    args = parse(config_args(script, array) + ["--mock-data"], world, monkeypatch)
    assert (args.tensor_model_parallel_size, args.data_parallel_size, args.sequence_parallel) == (world, 1, True)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
            args.num_query_groups) == shape
    assert (args.micro_batch_size, args.global_batch_size) == (1, 64)
    assert args.untie_embeddings_and_output_weights and args.forge_cover_output_layer
    forge = validate_forge_args(args)
    assert (forge.rule, forge.weight_store, forge.state_dtype, forge.accumulation_dtype) == (
        "adamw", "sr", "int8", accumulation)


@pytest.mark.parametrize("tp", [1, 2])
def test_llama3_8b_data_parallel_config(tp, monkeypatch):
    """One node of 8 ranks: TP x DP = 8, Megatron's distributed optimizer for the uncovered
    parameters, FORGE's owners for the covered ones, 64 / (8 / TP) micro-batches per rank."""
    argv = config_args("configs/llama3_8b_dp.sh", "LLAMA3_8B_DP_ARGS", TP=str(tp))
    args = parse([*argv, "--mock-data", "--use-forge"], 8, monkeypatch)
    assert (args.tensor_model_parallel_size, args.data_parallel_size) == (tp, 8 // tp)
    assert args.use_distributed_optimizer and (args.micro_batch_size, args.global_batch_size) == (1, 64)
    forge = validate_forge_args(args)
    assert (args.forge_clip_grad_mode, forge.weight_store, forge.state_dtype) == ("two-pass", "sr", "int8")
    assert args.forge_dp_accumulation == "owner" and args.clip_grad > 0


def test_tiny_cpu_config(monkeypatch):
    args = parse(tiny(), 1, monkeypatch)
    assert args.data_path == ["data/stdlib_text_document"] and args.num_layers == 4 and args.vocab_size == 257
    assert validate_forge_args(args).rule == "adamw"


REFUSALS = [
    (["--global-batch-size", "16", "--data-parallel-random-init"], 2, "drop the flag"),
    (["--global-batch-size", "32", "--forge-dp-grad-dtype", "bf16"], 2,
     "dp-grad-dtype bf16 with several micro-batches summed locally.*add --forge-dp-accumulation owner"),
    (["--fp16"], 1, "--fp16 needs a loss scaler.*use --bf16"),
    (["--context-parallel-size", "2"], 2, "--context-parallel-size 1"),
    (["--transformer-impl", "transformer_engine"], 1, "add --transformer-impl local"),
    (["--calculate-per-token-loss"], 1, "drop --calculate-per-token-loss"),
    (["--rerun-mode", "report_stats"], 1, "--rerun-mode report_stats re-runs every iteration"),
    (["--check-for-spiky-loss"], 1, "--check-for-spiky-loss re-runs.*add --rerun-mode disabled"),
    (["--check-for-large-grads"], 1, "--check-for-large-grads re-runs.*add --rerun-mode disabled"),
    (["--mtp-num-layers", "1"], 1, "drop --mtp-num-layers"),
    (["--forge-max-nonfinite-iterations", "0"], 1, "--forge-max-nonfinite-iterations must be at least 1"),
]


@pytest.mark.parametrize("flags, world_size, message", REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_each_refusal_names_the_flag(flags, world_size, message, monkeypatch):
    args = parse(tiny(*flags), world_size, monkeypatch)
    with pytest.raises(ConfigurationError, match=f"^--use-forge: .*{message}"):
        validate_forge_args(args)


def test_refusals_on_flags_megatron_sets_together(monkeypatch):
    """Flags whose Megatron validation needs company: experts, tied output covered, gradient
    accumulation fusion, --rerun-mode disabled lifting the spiky-loss refusal; accumulation,
    pipeline parallelism and a bf16 data-parallel gradient (one micro-batch, or summed in the
    owners' rows) are accepted."""
    for flags, world in ((("--global-batch-size", "32"), 1), (("--pipeline-model-parallel-size", "2"), 2),
                         (("--global-batch-size", "16", "--forge-dp-grad-dtype", "bf16"), 2),
                         (("--global-batch-size", "32", "--forge-dp-grad-dtype", "bf16", "--forge-dp-accumulation",
                           "owner"), 2)):
        assert validate_forge_args(parse(tiny(*flags), world, monkeypatch)).rule == "adamw"
    args = parse([a for a in tiny("--forge-cover-output-layer") if a != "--untie-embeddings-and-output-weights"], 1,
                 monkeypatch)
    with pytest.raises(ConfigurationError, match="add --untie-embeddings-and-output-weights"):
        validate_forge_args(args)
    args = parse(tiny("--num-experts", "2", "--moe-router-topk", "1"), 1, monkeypatch)
    with pytest.raises(ConfigurationError, match="drop --num-experts"):
        validate_forge_args(args)
    args = parse([a for a in tiny() if a != "--no-gradient-accumulation-fusion"], 1, monkeypatch)
    with pytest.raises(ConfigurationError, match="add --no-gradient-accumulation-fusion"):
        validate_forge_args(args)
    args = parse(tiny(), 1, monkeypatch)
    args.ckpt_format = "torch_dcp"  # Megatron allows it with FSDP only, which FORGE refuses first
    with pytest.raises(ConfigurationError, match="--ckpt-format torch_dcp does not carry.*use --ckpt-format torch_dist"):
        validate_forge_args(args)
    args = parse(tiny("--check-for-spiky-loss", "--rerun-mode", "disabled"), 1, monkeypatch)
    validate_forge_args(args)


def test_nothing_is_checked_without_use_forge(monkeypatch):
    argv = [a for a in tiny("--fp16") if a != "--use-forge"]
    assert validate_forge_args(parse(argv, 1, monkeypatch)) is None


def test_forge_checks_run_before_megatrons_argument_dump(monkeypatch, capsys):
    from megatron.training.arguments import parse_and_validate_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *tiny("--fp16")])
    with pytest.raises(ConfigurationError), check_forge_args_before_megatron():
        parse_and_validate_args(extra_args_provider=add_forge_args)
    assert "arguments" not in capsys.readouterr().out


def test_add_forge_args_defaults():
    import argparse

    args = add_forge_args(argparse.ArgumentParser()).parse_args([])
    assert (args.use_forge, args.forge_clip_grad_mode, args.forge_weight_store) == (False, "stale", "master")


SET_REFUSALS = [  # refusals of flags whose Megatron validation needs company, set on parsed args
    ({"multi_latent_attention": True}, "covers standard self-attention; drop --multi-latent-attention"),
    ({"experimental_attention_variant": "gated_delta_net"}, "drop --experimental-attention-variant"),
    ({"heterogeneous_layers_config_path": "layers.json"}, "drop --heterogeneous-layers-config-path"),
    ({"spec": ["my_module", "my_spec"]}, "--spec my_module my_spec replaces the layer spec.*drop --spec"),
    ({"use_torch_fsdp2": True}, "drop --use-torch-fsdp2 / --use-megatron-fsdp"),
    ({"use_megatron_fsdp": True}, "drop --use-torch-fsdp2 / --use-megatron-fsdp"),
    ({"grad_norm_skip_threshold": 10.0}, "grad_norm_skip_threshold skips a step.*leave it unset"),
]


def test_each_refusal_docs_megatron_md_lists_names_the_flag(monkeypatch):
    parsed = parse(tiny(), 1, monkeypatch)
    for changes, message in SET_REFUSALS:
        args = copy.copy(parsed)
        for name, value in changes.items():
            setattr(args, name, value)
        with pytest.raises(ConfigurationError, match=f"^--use-forge: .*{message}"):
            validate_forge_args(args)
