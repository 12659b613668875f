"""The shipped configs parse and validate with Megatron's own argument code and FORGE's checks,
and every refusal is one message naming the flag to change."""

import copy
import os
import subprocess
import sys

import pytest

from forge_megatron.megatron.args import (
    add_forge_args,
    apply_defaults,
    forge_argument_checks,
    output_layer_covered,
    validate_forge_args,
)
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
    assert output_layer_covered(args)
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


def test_qwen3_30b_a3b_one_node_config(monkeypatch):
    """One node of 8 ranks: expert parallel 8 (16 experts each, expert-data-parallel size 1), data
    parallel 8 for the dense weights; the model's 30.5 B parameters (29.0 B in the experts), as
    published; FORGE's leanest regime."""
    from forge_megatron.tools import memory

    argv = config_args("configs/qwen3_30b_a3b_ep8.sh", "QWEN3_30B_A3B_EP8_ARGS")
    args = parse([*argv, "--mock-data"], 8, monkeypatch)
    assert (args.expert_model_parallel_size, args.data_parallel_size, args.num_experts, args.moe_router_topk,
            args.moe_ffn_hidden_size, args.qk_layernorm) == (8, 8, 128, 8, 768, True)
    forge = validate_forge_args(args)
    assert (forge.rule, forge.weight_store, forge.state_dtype, forge.accumulation_dtype) == ("adamw", "sr", "int8",
                                                                                            "bf16")
    whole = memory.parse_megatron_args([*argv, "--expert-model-parallel-size", "1"], extra_args_provider=add_forge_args)
    assert memory.parameters_per_rank(whole) == pytest.approx(30.53e9, rel=1e-3)
    assert memory.expert_parameters_per_rank(whole) == 48 * 128 * 3 * 2048 * 768
    on_rank = memory.parse_megatron_args(argv, extra_args_provider=add_forge_args, data_parallel_size=8)
    assert memory.expert_data_parallel_size(on_rank) == 1
    assert memory.expert_parameters_per_rank(on_rank) * 8 == memory.expert_parameters_per_rank(whole)


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
    (["--transformer-impl", "transformer_engine"], 1, "use --transformer-impl local"),
    (["--rerun-mode", "report_stats"], 1, "--rerun-mode report_stats re-runs every iteration"),
    (["--check-for-spiky-loss"], 1, "--check-for-spiky-loss re-runs.*add --rerun-mode disabled"),
    (["--check-for-large-grads"], 1, "--check-for-large-grads re-runs.*add --rerun-mode disabled"),
    (["--mtp-num-layers", "1", "--mtp-detach-heads"], 1, "drop --mtp-detach-heads"),
    (["--optimizer", "soap"], 1, "FORGE has no rule for --optimizer soap.*--forge-mix-optimizers"),
    (["--forge-rule", "muon", "--forge-mix-optimizers"], 1, "--forge-rule muon needs --optimizer muon"),
    (["--optimizer", "muon", "--muon-tp-mode", "distributed"], 1, "--muon-tp-mode distributed is not supported"),
    (["--optimizer", "muon", "--global-batch-size", "16"], 2, "use data-parallel size 1 with --optimizer muon"),
    (["--optimizer", "muon", "--forge-state-dtype", "int8"], 1, "keep it in fp32 or bf16 \\(--forge-state-dtype\\)"),
    (["--optimizer", "muon", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--num-experts", "4",
      "--expert-tensor-parallel-size", "1"], 2, "expert-data-parallel ranks \\(2\\).*--expert-model-parallel-size"),
    (["--forge-max-nonfinite-iterations", "0"], 1, "--forge-max-nonfinite-iterations must be at least 1"),
    (["--cuda-graph-impl", "local"], 1, "--cuda-graph-impl local would replay covered layers' backward.*drop it"),
]


@pytest.mark.parametrize("flags, world_size, message", REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_each_refusal_names_the_flag(flags, world_size, message, monkeypatch):
    args = parse(tiny(*flags), world_size, monkeypatch)
    with pytest.raises(ConfigurationError, match=f"^--use-forge: .*{message}"):
        validate_forge_args(args)


UNUSED = [  # a FORGE flag that cannot take effect: (flags, world size, what the one line says)
    (["--forge-weight-store", "sr"], 1, "^--forge-weight-store applies to bf16 weights; add --bf16"),
    (["--forge-accumulation-dtype", "bf16"], 1, "^--forge-accumulation-dtype has no effect with one micro-batch"),
    (["--forge-free-accumulation-buffers"], 1, "^--forge-free-accumulation-buffers has no effect with one micro"),
    (["--forge-dp-grad-dtype", "bf16"], 1, "^--forge-dp-grad-dtype applies at data-parallel size > 1 only"),
    (["--global-batch-size", "16", "--forge-dp-accumulation", "owner"], 2,
     "^--forge-dp-accumulation differs between local and owner only with several micro-batches"),
    (["--clip-grad", "0", "--forge-clip-grad-mode", "two-pass"], 1, "^--forge-clip-grad-mode needs clipping"),
    (["--global-batch-size", "16", "--forge-clip-grad-mode", "progressive"], 2, "^--forge-clip-grad-mode progressive .* needs one process"),
    (["--global-batch-size", "16", "--forge-clip-grad-mode", "progressive"], 1,
     "^--forge-clip-grad-mode progressive .* one micro-batch per step"),
    (["--forge-clip-grad-mode", "progressive", "--calculate-per-token-loss"], 1,
     "^--forge-clip-grad-mode progressive .* no --calculate-per-token-loss"),
    (["--forge-rule", "rmsprop"], 1, "^--forge-rule rmsprop differs from --optimizer adam.*--forge-mix-optimizers"),
    (["--optimizer", "sgd", "--forge-rule", "adamw"], 1, "^--forge-rule adamw differs from --optimizer sgd"),
    (["--forge-mix-optimizers"], 1, "^--forge-mix-optimizers has no effect unless --forge-rule differs"),
]


@pytest.mark.parametrize("flags, world_size, message", UNUSED, ids=[" ".join(r[0]) for r in UNUSED])
def test_a_flag_without_effect_is_refused(flags, world_size, message, monkeypatch):
    args = parse(tiny(*flags), world_size, monkeypatch)
    with pytest.raises(ConfigurationError, match=message):
        validate_forge_args(args)


def test_forge_flags_without_use_forge_are_refused(monkeypatch):
    for flags in (["--forge-state-dtype", "int8", "--forge-clip-grad-mode", "two-pass"], ["--forge-rule", "lion"]):
        args = parse([a for a in tiny(*flags) if a != "--use-forge"], 1, monkeypatch)
        with pytest.raises(ConfigurationError, match=f"^{flags[0]} has no effect without --use-forge"):
            validate_forge_args(args)
    # --forge-core-attention shapes standard runs too (like-for-like comparisons)
    args = parse([a for a in tiny("--forge-core-attention", "sdpa") if a != "--use-forge"], 1, monkeypatch)
    assert validate_forge_args(args) is None


def test_triton_backend_without_cuda_names_the_torch_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = parse(tiny("--forge-backend", "triton"), 1, monkeypatch)
    with pytest.raises(ConfigurationError, match="^--forge-backend triton needs a CUDA device.*--forge-backend torch"):
        validate_forge_args(args)


def test_multi_latent_attention_on_local_layers_needs_sdpa(monkeypatch):
    mla = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-head-dim", "16",
           "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16"]
    for argv in (tiny(*mla), [a for a in tiny(*mla) if a != "--use-forge"]):  # standard runs too
        with pytest.raises(ConfigurationError, match="^--multi-latent-attention on megatron-core's local layers "
                                                     "needs --forge-core-attention sdpa"):
            validate_forge_args(parse(argv, 1, monkeypatch))
    assert validate_forge_args(parse(tiny(*mla, "--forge-core-attention", "sdpa"), 1, monkeypatch)).rule == "adamw"


@pytest.mark.parametrize("flags, rule, hyperparameters", [
    ([], "adamw", {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}),
    (["--optimizer", "sgd", "--sgd-momentum", "0.8"], "sgd", {"momentum": 0.8, "weight_decay": 0.1}),
    (["--optimizer", "lion", "--lion-beta1", "0.8", "--lion-beta2", "0.9"], "lion",
     {"betas": (0.8, 0.9), "weight_decay": 0.1}),
    (["--forge-rule", "rmsprop", "--forge-mix-optimizers"], "rmsprop", {"eps": 1e-8, "weight_decay": 0.1}),
    (["--optimizer", "muon", "--muon-momentum", "0.8", "--muon-nesterov", "--muon-num-ns-steps", "3",
      "--muon-coefficient-type", "polar_express", "--muon-scale-mode", "unit_rms_norm", "--muon-extra-scale-factor",
      "0.2", "--muon-fp32-matmul-prec", "high"], "muon",
     {"momentum": 0.8, "nesterov": True, "num_ns_steps": 3, "coefficient_type": "polar_express",
      "scale_mode": "unit_rms_norm", "extra_scale_factor": 0.2, "fp32_matmul_prec": "high", "weight_decay": 0.1}),
])
def test_the_rule_follows_megatrons_optimizer(flags, rule, hyperparameters, monkeypatch):
    forge = validate_forge_args(parse(tiny(*flags), 1, monkeypatch))
    assert forge.rule == rule and forge.hyperparameters["lr"] == 1e-3
    assert {k: forge.hyperparameters[k] for k in hyperparameters} == hyperparameters


def test_muons_output_layer_trains_with_the_scalar_optimizer(monkeypatch):
    """Megatron's Muon leaves the output layer (an embedding-or-output parameter) to
    --muon-scalar-optimizer; FORGE covers it with that rule and its flags."""
    from forge_megatron.megatron.args import output_layer_config

    assert output_layer_config(parse(tiny(), 1, monkeypatch)) is None
    for scalar, rule in (("adam", "adamw"), ("lion", "lion")):
        args = parse(tiny("--optimizer", "muon", "--muon-scalar-optimizer", scalar), 1, monkeypatch)
        config = output_layer_config(args)
        assert config.rule == rule and config.hyperparameters["lr"] == 1e-3 and "momentum" not in config.hyperparameters


def test_adam_without_decoupled_weight_decay_is_coupled_adam(monkeypatch):
    args = parse(tiny(), 1, monkeypatch)
    args.decoupled_weight_decay = False  # Megatron's OptimizerConfig field (torch.optim.Adam's L2)
    assert validate_forge_args(args).rule == "adam"


def test_defaults_fill_what_the_command_line_leaves_out(monkeypatch):
    """Under --use-forge the local linears without gradient-accumulation fusion, and without CUDA no
    CUDA-only kernels, where the command line is silent; an explicit --transformer-impl is kept
    (and refused), never overridden."""
    from megatron.training.arguments import parse_args

    bare = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--use-forge"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *bare])
    args = parse_args(extra_args_provider=add_forge_args)
    assert (args.transformer_impl, args.gradient_accumulation_fusion, args.apply_rope_fusion) == (
        "transformer_engine", True, True)
    set_flags = apply_defaults(args, bare)
    assert set_flags[:2] == ["--transformer-impl local", "--no-gradient-accumulation-fusion"]
    assert "--no-rope-fusion" in set_flags  # this machine has no CUDA
    assert (args.transformer_impl, args.gradient_accumulation_fusion, args.apply_rope_fusion) == ("local", False, False)
    explicit = [*bare, "--transformer-impl", "transformer_engine"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *explicit])
    args = parse_args(extra_args_provider=add_forge_args)
    assert "--transformer-impl local" not in apply_defaults(args, explicit)
    assert args.transformer_impl == "transformer_engine"


def test_refusals_on_flags_megatron_sets_together(monkeypatch):
    """Flags whose Megatron validation needs company: gradient accumulation fusion (set by
    Megatron's parser unless given, refused here because `parse` skips FORGE's defaults),
    --rerun-mode disabled lifting the spiky-loss refusal; accumulation, pipeline parallelism, a
    bf16 data-parallel gradient (one micro-batch, or summed in the owners' rows), multi-token
    prediction and a per-token loss are accepted."""
    for flags, world in ((("--global-batch-size", "32"), 1), (("--pipeline-model-parallel-size", "2"), 2),
                         (("--global-batch-size", "16", "--forge-dp-grad-dtype", "bf16"), 2),
                         (("--global-batch-size", "32", "--forge-dp-grad-dtype", "bf16", "--forge-dp-accumulation",
                           "owner"), 2), (("--mtp-num-layers", "1", "--calculate-per-token-loss"), 1)):
        assert validate_forge_args(parse(tiny(*flags), world, monkeypatch)).rule == "adamw"
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
    with pytest.raises(ConfigurationError), forge_argument_checks():
        parse_and_validate_args(extra_args_provider=add_forge_args)
    assert "arguments" not in capsys.readouterr().out


def test_add_forge_args_defaults():
    import argparse

    args = add_forge_args(argparse.ArgumentParser()).parse_args([])
    assert (args.use_forge, args.forge_clip_grad_mode, args.forge_weight_store) == (False, "auto", "master")


SET_REFUSALS = [  # refusals of flags whose Megatron validation needs company, set on parsed args
    ({"experimental_attention_variant": "gated_delta_net"},
     "--experimental-attention-variant gated_delta_net: megatron-core builds it with Transformer Engine only.*drop it"),
    ({"defer_embedding_wgrad_compute": True}, "--defer-embedding-wgrad-compute postpones.*drop it"),
    ({"use_torch_fsdp2": True}, "drop --use-torch-fsdp2 / --use-megatron-fsdp"),
    ({"use_megatron_fsdp": True}, "drop --use-torch-fsdp2 / --use-megatron-fsdp"),
    ({"grad_norm_skip_threshold": 10.0}, "grad_norm_skip_threshold skips a step.*leave it unset"),
    ({"optimizer": "muon", "moe_grouped_gemm": True}, "Muon orthogonalizes each expert's weight; drop --moe-grouped"),
]


def test_each_refusal_docs_megatron_md_lists_names_the_flag(monkeypatch):
    parsed = parse(tiny(), 1, monkeypatch)
    for changes, message in SET_REFUSALS:
        args = copy.copy(parsed)
        for name, value in changes.items():
            setattr(args, name, value)
        with pytest.raises(ConfigurationError, match=f"^--use-forge: .*{message}"):
            validate_forge_args(args)


GROUPED = ["--num-experts", "4", "--moe-ffn-hidden-size", "96", "--moe-grouped-gemm"]
GROUPED_REFUSALS = [  # (world size, args changed after parsing, the one line): FORGE's grouped experts (experts.py)
    (1, {"expert_tensor_parallel_size": 2}, r"set --expert-tensor-parallel-size 1 \(it is 2\)"),
    (2, {}, "the expert-data-parallel size is 2: raise --expert-model-parallel-size"),
    (1, {"add_bias_linear": True}, "grouped experts have no biases; add --disable-bias-linear"),
]


def _parsed_grouped(world_size, monkeypatch):
    """--moe-grouped-gemm as forge-pretrain-gpt parses it: Megatron's validation (which checks the
    GPU for Transformer Engine's grouped GEMM) under forge_argument_checks, which lets FORGE's
    grouped experts through on CPU; then FORGE's checks."""
    from megatron.training import arguments

    argv = tiny("--global-batch-size", "16", *GROUPED)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    args = arguments.parse_args(extra_args_provider=add_forge_args)
    with forge_argument_checks(argv):
        return arguments.validate_args(args)


def test_grouped_experts_pass_megatrons_validation_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = _parsed_grouped(1, monkeypatch)
    assert args.moe_grouped_gemm and args.num_experts == 4 and validate_forge_args(args).rule == "adamw"


@pytest.mark.parametrize("world_size, changes, message", GROUPED_REFUSALS, ids=["etp2", "expert-dp2", "bias"])
def test_grouped_experts_refusals_name_the_flag(world_size, changes, message, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    if not changes:  # refused by FORGE's checks inside forge_argument_checks
        with pytest.raises(ConfigurationError, match=f"^--use-forge: .*{message}"):
            _parsed_grouped(world_size, monkeypatch)
        return
    args = copy.copy(_parsed_grouped(world_size, monkeypatch))
    for name, value in changes.items():
        setattr(args, name, value)
    with pytest.raises(ConfigurationError, match=f"^--use-forge: .*{message}"):
        validate_forge_args(args)
