"""The shipped configs parse and validate with Megatron's own argument code and FORGE's checks."""

import os
import subprocess

import pytest

from forge_megatron.training import add_forge_args, validate_forge_args

ROOT = os.path.join(os.path.dirname(__file__), "..")


def config_args(script: str, array: str) -> list[str]:
    out = subprocess.run(["bash", "-c", f'source "{script}"; printf "%s\\n" "${{{array}[@]}}"'], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def parse(argv, world_size, monkeypatch):
    import sys

    from megatron.training.arguments import parse_args, validate_args

    from forge_megatron.cli.pretrain_gpt import add_launcher_args

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    args = parse_args(extra_args_provider=add_launcher_args)
    validate_args(args)
    return args


def test_llama3_8b_tp8_config(monkeypatch):
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setattr("megatron.training.arguments.get_device_arch_version", lambda: 9)
    args = parse(config_args("configs/llama3_8b_tp8.sh", "LLAMA3_8B_TP8_ARGS") + ["--mock-data"], 8, monkeypatch)
    assert (args.tensor_model_parallel_size, args.data_parallel_size, args.sequence_parallel) == (8, 1, True)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_query_groups) == (32, 4096, 14336, 8)
    assert vocab_size_with_padding(128256, args, logging_enabled=False) == 129024
    forge = validate_forge_args(args)
    assert forge.rule == "adamw" and forge.hyperparameters["betas"] == (0.9, 0.95)


def test_tiny_cpu_config(monkeypatch):
    args = parse(config_args("configs/tiny_gpt_cpu.sh", "TINY_GPT_ARGS") + ["--use-forge"], 1, monkeypatch)
    assert args.forge_corpus == "stdlib" and args.num_layers == 4
    validate_forge_args(args)


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", "16"], "2 micro-batches per step.*--global-batch-size"),
    (["--fp16"], "--bf16"),
    (["--forge-cover-output-layer", "--untie-embeddings-and-output-weights"], None),
])
def test_validation_names_the_flag(flags, message, monkeypatch):
    argv = config_args("configs/tiny_gpt_cpu.sh", "TINY_GPT_ARGS") + ["--use-forge", *flags]
    args = parse(argv, 1, monkeypatch)
    if message is None:
        validate_forge_args(args)
        return
    with pytest.raises(ValueError, match=message):
        validate_forge_args(args)


def test_data_parallel_and_tied_output_are_refused(monkeypatch):
    argv = config_args("configs/tiny_gpt_cpu.sh", "TINY_GPT_ARGS") + ["--use-forge", "--global-batch-size", "16"]
    args = parse(argv, 2, monkeypatch)  # 2 ranks, TP=1: data-parallel size 2
    with pytest.raises(ValueError, match="data-parallel size 2.*--tensor-model-parallel-size"):
        validate_forge_args(args)
    argv = [a for a in config_args("configs/tiny_gpt_cpu.sh", "TINY_GPT_ARGS")
            if a != "--untie-embeddings-and-output-weights"] + ["--use-forge", "--forge-cover-output-layer"]
    with pytest.raises(ValueError, match="--untie-embeddings-and-output-weights"):
        validate_forge_args(parse(argv, 1, monkeypatch))


def test_add_forge_args_defaults():
    import argparse

    args = add_forge_args(argparse.ArgumentParser()).parse_args([])
    assert (args.use_forge, args.forge_clip_grad_mode, args.forge_weight_store) == (False, "stale", "master")
