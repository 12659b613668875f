"""`--use-forge` and FORGE's flags, the defaults FORGE sets where the command line is silent, and
the validation that refuses what an update inside backward cannot honour (one ConfigurationError
per case, naming the flag to change).

The rule and its hyperparameters come from Megatron's own optimizer flags (--optimizer, --lr,
--adam-beta1/2, --adam-eps, --weight-decay, --sgd-momentum, --lion-beta1/2, --clip-grad and the
schedule flags), so that the covered weights and the rest of the model train with one optimizer;
FORGE adds only how it stores, accumulates and clips. No FORGE flag is silently ignored: one that
cannot take effect in the configuration is refused with what would make it count.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os

from forge_megatron.core.param import ACCUMULATION_DTYPES, ForgeConfig
from forge_megatron.core.plan import interpreting
from forge_megatron.core.rules import get_rule, registered_rules
from forge_megatron.core.state import STATE_DTYPES, WEIGHT_STORES
from forge_megatron.megatron.attention import CORE_ATTENTIONS
from forge_megatron.megatron.errors import ConfigurationError

logger = logging.getLogger(__name__)

CLIP_MODES = ("auto", "progressive", "stale", "two-pass", "off")
DP_ACCUMULATIONS = ("local", "owner")  # where a data-parallel step sums its micro-batches (--forge-dp-accumulation)
CHECKPOINT_FORMATS = ("torch_dist", "torch")  # the formats FORGE's state travels in
# FORGE flags that also shape a standard run (like-for-like comparisons): allowed without --use-forge.
LAUNCHER_FLAGS = ("forge_core_attention",)
# Megatron flags that need CUDA kernels (Transformer Engine, Apex or fused CUDA code): (dest, the value that
# turns the kernel off, the flag that sets it). On a machine without CUDA they are turned off unless given.
CUDA_ONLY = (("gradient_accumulation_fusion", False, "--no-gradient-accumulation-fusion"),
             ("apply_rope_fusion", False, "--no-rope-fusion"),
             ("no_persist_layer_norm", True, "--no-persist-layer-norm"),
             ("masked_softmax_fusion", False, "--no-masked-softmax-fusion"),
             ("bias_swiglu_fusion", False, "--no-bias-swiglu-fusion"),
             ("bias_dropout_fusion", False, "--no-bias-dropout-fusion"))


def add_forge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """FORGE's flags, in Megatron's style; usable as `extra_args_provider`."""
    group = parser.add_argument_group("FORGE", "optimizer step fused into the weight-gradient GEMM")
    group.add_argument("--use-forge", action="store_true",
                       help="Train every megatron-core linear layer of the model FORGE can own (attention, MLA, MLP, "
                            "multi-token prediction, the untied output layer) with FORGE: the optimizer step runs "
                            "inside backward and their weight gradients are never stored. The rule follows "
                            "--optimizer (adam: AdamW, sgd, lion, muon: momentum in the kernel, Newton-Schulz per "
                            "layer right after its weight gradient).")
    group.add_argument("--forge-rule", default=None, choices=registered_rules(),
                       help="The element-wise rule for covered weights when it is not what --optimizer means "
                            "(e.g. rmsprop, adagrad, or a rule you registered); needs --forge-mix-optimizers, since "
                            "the other parameters keep Megatron's --optimizer.")
    group.add_argument("--forge-mix-optimizers", action="store_true",
                       help="Accept a --forge-rule that differs from --optimizer: covered weights train with the "
                            "FORGE rule, the other parameters with Megatron's optimizer.")
    group.add_argument("--forge-weight-store", default="master", choices=WEIGHT_STORES,
                       help="How bf16 weights are written back: 'master' keeps an fp32 master copy in FORGE's state "
                            "(the weight is its rounded copy); 'sr' keeps none and rounds the fp32 result "
                            "stochastically; 'rne' keeps none and rounds to nearest (loses small updates; for "
                            "studies).")
    group.add_argument("--forge-state-dtype", default="fp32", choices=tuple(STATE_DTYPES),
                       help="Optimizer state storage: fp32, bf16 (stochastically rounded) or int8 (8-bit codes with "
                            "one fp32 scale per 32 elements).")
    group.add_argument("--forge-accumulation-dtype", default="fp32", choices=tuple(ACCUMULATION_DTYPES),
                       help="Gradient accumulation over several micro-batches (global batch > micro-batch x "
                            "data-parallel size): each covered weight sums its first micro-batches' gradients in a "
                            "buffer of this dtype (fp32: 4 bytes/param, the order of Megatron's fp32 main_grad; "
                            "bf16: 2 bytes/param, rounded stochastically) and updates at its last.")
    group.add_argument("--forge-free-accumulation-buffers", action="store_true",
                       help="Free the accumulation buffers after every step (they are allocated again at the next "
                            "step's first backward) instead of keeping them.")
    group.add_argument("--forge-dp-accumulation", default="local", choices=DP_ACCUMULATIONS,
                       help="With data parallelism and several micro-batches per step: 'local' sums each covered "
                            "weight's gradient in a whole local buffer and reduce-scatters it once per step "
                            "(Megatron's traffic; --forge-accumulation-dtype bytes per parameter); 'owner' "
                            "reduce-scatters every micro-batch's gradient (in --forge-dp-grad-dtype) and sums the "
                            "owner's rows in fp32 "
                            "(4 / data-parallel-size bytes per parameter, a reduce-scatter per micro-batch).")
    group.add_argument("--forge-dp-grad-dtype", default=None, choices=tuple(ACCUMULATION_DTYPES),
                       help="With data parallelism: the dtype each covered weight's local gradient is written and "
                            "reduce-scattered in (fp32, or bf16 rounded stochastically: half the traffic and "
                            "window; Megatron's counterpart is --grad-reduce-in-bf16). Default: "
                            "--forge-accumulation-dtype, which it must equal with --forge-dp-accumulation local "
                            "and several micro-batches (the local sum is what is reduce-scattered).")
    group.add_argument("--forge-clip-grad-mode", default="auto", choices=CLIP_MODES,
                       help="How --clip-grad applies to covered weights: 'auto' (default) clips exactly, with "
                            "Megatron's coefficient and no replay, where the step's gradient is held anyway (several "
                            "micro-batches or data parallelism) and is 'progressive' at one micro-batch in one "
                            "process ('stale' with tensor or pipeline parallelism or a per-token loss; the log says "
                            "which runs and why); 'progressive' estimates this step's norm as backward goes: the "
                            "weights already updated count with this step's sums of squares, the rest with the "
                            "previous step's (no extra pass); 'stale' uses the previous step's global "
                            "norm (no extra cost), 'two-pass' clips with this step's exact norm (a norms-only backward first, "
                            "~2x forward+backward; with several micro-batches or data parallelism the step's "
                            "gradient is held instead, see docs/megatron.md), 'off' does not clip them. The "
                            "logged norm always covers both.")
    group.add_argument("--forge-max-nonfinite-iterations", type=int, default=3,
                       help="Stop after this many consecutive iterations with non-finite gradients in covered "
                            "weights (each such iteration is skipped or partly skipped, see docs/megatron.md).")
    group.add_argument("--forge-backend", default=None, choices=("triton", "torch"),
                       help="Kernel backend (default: triton on CUDA, the tiled torch twin on CPU; triton without "
                            "CUDA only with TRITON_INTERPRET=1).")
    group.add_argument("--forge-core-attention", default="local", choices=CORE_ATTENTIONS,
                       help="Core attention of the local layer spec: 'local' is megatron-core's "
                            "DotProductAttention (materializes the s x s scores), 'sdpa' is torch's fused "
                            "scaled_dot_product_attention (flash or memory-efficient attention on a GPU). "
                            "It applies to standard runs too (with or without --use-forge), for like-for-like "
                            "comparisons; it swaps the core attention of megatron-core's SelfAttention only.")
    _escape_stray_percent_signs(parser)
    return parser


def _escape_stray_percent_signs(parser: argparse.ArgumentParser) -> None:
    """argparse %-formats every help string for --help; a stray '%' in one of Megatron's (0.19.2:
    --moe-paged-stash-buffer-size-factor-cuda) makes --help crash, so it is escaped."""
    for action in parser._actions:
        if not action.help:
            continue
        try:
            action.help % {**vars(action), "prog": parser.prog, "default": action.default}
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")


def rule_for_optimizer(args, optimizer: str | None = None) -> str | None:
    """The FORGE rule that is Megatron's --optimizer (or `optimizer`; None where FORGE has none)."""
    optimizer = optimizer or args.optimizer
    if optimizer == "adam":  # torch.optim.AdamW, or Adam with coupled L2 when decay is not decoupled
        return "adamw" if getattr(args, "decoupled_weight_decay", True) else "adam"
    return {"sgd": "sgd", "lion": "lion", "muon": "muon"}.get(optimizer)


def forge_config_from_args(args, rule: str | None = None) -> ForgeConfig:
    """The rule (by default --forge-rule or --optimizer's) and its hyperparameters, read from
    Megatron's own optimizer flags."""
    name = rule or args.forge_rule or rule_for_optimizer(args)
    momentum = getattr(args, "muon_momentum", 0.9) if name == "muon" else getattr(args, "sgd_momentum", 0.0)
    from_flags = {"lr": args.lr, "eps": args.adam_eps, "weight_decay": args.weight_decay, "momentum": momentum,
                  "betas": ((args.lion_beta1, args.lion_beta2) if name == "lion" else (args.adam_beta1, args.adam_beta2))}
    if name == "muon":
        from_flags.update({key: getattr(args, f"muon_{key}") for key in MUON_FLAGS})
    rule_class = get_rule(name)
    hyperparameters = {k: v for k, v in from_flags.items() if k in rule_class.defaults}
    return ForgeConfig(name, hyperparameters, weight_store=args.forge_weight_store,
                       state_dtype=args.forge_state_dtype, seed=args.seed, backend=args.forge_backend,
                       accumulation_dtype=args.forge_accumulation_dtype)


def output_layer_config(args) -> ForgeConfig | None:
    """The config of the output layer when it differs from the other covered weights': under
    --optimizer muon Megatron trains it (an embedding-or-output parameter) with
    --muon-scalar-optimizer, so FORGE does too."""
    if (args.forge_rule or rule_for_optimizer(args)) != "muon":
        return None
    return forge_config_from_args(args, rule=rule_for_optimizer(args, args.muon_scalar_optimizer))


MUON_FLAGS = ("nesterov", "num_ns_steps", "coefficient_type", "scale_mode", "extra_scale_factor", "fp32_matmul_prec")


def output_layer_covered(args) -> bool:
    """Whether FORGE covers the output layer (cover.py's decision, for the memory model): under
    --use-forge when it is not tied to the embedding and computes only the main logits."""
    return bool(getattr(args, "use_forge", False) and args.untie_embeddings_and_output_weights
                and not getattr(args, "mtp_num_layers", None))


def micro_batches_per_step(args) -> int:
    """Micro-batches each data-parallel rank runs per step (more than one under a batch ramp-up)."""
    if getattr(args, "rampup_batch_size", None):
        return 2
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def progressive_clipping_applies(world_size: int, micro_batches: int, per_token_loss: bool) -> bool:
    """Whether progressive clipping can run: one process (its estimate sums this process's weights),
    one micro-batch per step (with several, the step's gradient is held and 'auto' clips exactly)
    and no per-token loss (whose token count scales the update after the estimate is made)."""
    return world_size == 1 and micro_batches == 1 and not per_token_loss


def validate_forge_args(args) -> ForgeConfig | None:
    """Refuse configurations where an update inside backward would not be the step the user asked
    for, and FORGE flags that would have no effect; each message names the flag to change. Returns
    the ForgeConfig (None without --use-forge)."""
    for problem in _unused_flags(args):
        if problem:
            raise ConfigurationError(problem)
    if not args.use_forge:
        return None
    for problem in _refusals(args):
        if problem:
            raise ConfigurationError(f"--use-forge: {problem}")
    return forge_config_from_args(args)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given_forge_flags(args) -> list[str]:
    """The FORGE flags (dests) whose value is not their default."""
    defaults = {a.dest: a.default for a in add_forge_args(argparse.ArgumentParser())._actions if a.dest != "help"}
    return [dest for dest, default in defaults.items() if dest != "use_forge" and getattr(args, dest, default) != default]


def _unused_flags(args):
    """Each FORGE flag that cannot take effect in this configuration, or None."""
    given = _given_forge_flags(args)
    yield (getattr(args, "multi_latent_attention", False) and args.transformer_impl == "local"
           and args.forge_core_attention == "local") and (
        "--multi-latent-attention on megatron-core's local layers needs --forge-core-attention sdpa (megatron-core "
        "0.19's local DotProductAttention does not take MLA's key and value head sizes)")
    if "forge_core_attention" in given:
        for flag in ("experimental_attention_variant", "heterogeneous_layers_config_path"):
            yield getattr(args, flag, None) and (
                f"--forge-core-attention {args.forge_core_attention} swaps the core attention of megatron-core's "
                f"SelfAttention, which {_flag(flag)} does not build; drop --forge-core-attention")
        yield args.spec is not None and (
            f"--forge-core-attention {args.forge_core_attention} swaps the core attention of Megatron's own layer "
            "spec, not of --spec; drop one of them")
    if not args.use_forge:
        for dest in given:
            yield dest not in LAUNCHER_FLAGS and (
                f"{_flag(dest)} has no effect without --use-forge (the run is standard Megatron); add --use-forge or "
                "drop it")
        return
    one_micro_batch = micro_batches_per_step(args) == 1
    dp = args.data_parallel_size
    for dest in given:
        if dest == "forge_weight_store":
            yield not args.bf16 and (
                "--forge-weight-store applies to bf16 weights; add --bf16 or drop it (fp32 weights are updated in place)")
        elif dest in ("forge_accumulation_dtype", "forge_free_accumulation_buffers"):
            yield one_micro_batch and dp == 1 and (
                f"{_flag(dest)} has no effect with one micro-batch per step and no data parallelism; it applies when "
                "--global-batch-size exceeds --micro-batch-size x data-parallel size, or at data-parallel size > 1")
        elif dest in ("forge_dp_accumulation", "forge_dp_grad_dtype"):
            yield dp == 1 and f"{_flag(dest)} applies at data-parallel size > 1 only; drop it"
            yield (dest == "forge_dp_accumulation" and one_micro_batch) and (
                "--forge-dp-accumulation differs between local and owner only with several micro-batches per step; "
                "drop it or raise --global-batch-size")
        elif dest == "forge_clip_grad_mode":
            yield args.clip_grad <= 0 and "--forge-clip-grad-mode needs clipping (--clip-grad > 0); drop it"
            applies = progressive_clipping_applies(args.world_size, micro_batches_per_step(args),
                                                   getattr(args, "calculate_per_token_loss", False))
            yield (args.forge_clip_grad_mode == "progressive" and not applies) and (
                "--forge-clip-grad-mode progressive estimates the norm from this process's own weights in backward, "
                "so it needs one process, one micro-batch per step and no --calculate-per-token-loss; use auto "
                "(exact with data parallelism or several micro-batches) or two-pass")
        elif dest == "forge_rule":
            yield (args.forge_rule != rule_for_optimizer(args) and not args.forge_mix_optimizers) and (
                f"--forge-rule {args.forge_rule} differs from --optimizer {args.optimizer} (the other parameters' "
                f"optimizer): set --optimizer to the same rule, or add --forge-mix-optimizers to train covered weights "
                "with one rule and the rest with another")
        elif dest == "forge_mix_optimizers":
            yield (args.forge_rule is None or args.forge_rule == rule_for_optimizer(args)) and (
                "--forge-mix-optimizers has no effect unless --forge-rule differs from --optimizer; drop it")
        elif dest == "forge_backend":
            yield (args.forge_backend == "triton" and not _has_cuda() and not interpreting()) and (
                "--forge-backend triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret the kernel, slowly); "
                "use --forge-backend torch")


def expert_data_parallel_size(args) -> int:
    """Ranks that hold the same experts (Megatron's expert-data-parallel group)."""
    etp = getattr(args, "expert_tensor_parallel_size", 1) or 1
    return args.world_size // (args.pipeline_model_parallel_size * etp * args.expert_model_parallel_size)


def _muon_refusals(args):
    """What FORGE's Muon does not do yet, each with the flag to change."""
    yield (args.optimizer != "muon") and (
        "--forge-rule muon needs --optimizer muon (Megatron then gives the output layer and the other "
        "parameters --muon-scalar-optimizer, as FORGE does)")
    yield (args.muon_tp_mode == "distributed") and (
        "--muon-tp-mode distributed is not supported with --use-forge; use blockwise or duplicated")
    yield (args.data_parallel_size > 1) and (
        "Muon orthogonalizes each whole weight, while FORGE's data-parallel ranks each hold a block of its rows; "
        "use data-parallel size 1 with --optimizer muon (tensor and pipeline parallelism work)")
    expert_dp = expert_data_parallel_size(args) if getattr(args, "num_experts", None) else 1
    yield (expert_dp > 1) and (
        f"Muon orthogonalizes each whole expert weight, while FORGE's expert-data-parallel ranks ({expert_dp}) each "
        "hold a block of its rows; raise --expert-model-parallel-size to the data-parallel size")
    yield getattr(args, "moe_grouped_gemm", False) and (
        "--moe-grouped-gemm steps all experts of a kind at once, while Muon orthogonalizes each expert's weight; "
        "drop --moe-grouped-gemm")
    yield (args.forge_state_dtype == "int8") and (
        "Muon's momentum is orthogonalized as a whole matrix: keep it in fp32 or bf16 (--forge-state-dtype)")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _refusals(args):
    """Each refusal, or None; the first that applies is reported."""
    rule = args.forge_rule or rule_for_optimizer(args)
    yield rule is None and (
        f"FORGE has no rule for --optimizer {args.optimizer} (it has adam, sgd, lion and muon); choose one of them, "
        f"or pass --forge-rule (one of {', '.join(registered_rules())}) with --forge-mix-optimizers")
    if rule == "muon":
        yield from _muon_refusals(args)
    dp = args.data_parallel_size
    grad_dtype = args.forge_dp_grad_dtype or args.forge_accumulation_dtype
    yield (dp > 1 and args.forge_dp_accumulation == "local" and grad_dtype != args.forge_accumulation_dtype
           and micro_batches_per_step(args) > 1) and (
        f"--forge-dp-grad-dtype {grad_dtype} with several micro-batches summed locally: the local sum (in "
        f"--forge-accumulation-dtype {args.forge_accumulation_dtype}) is what is reduce-scattered; set both to the "
        "same dtype, or add --forge-dp-accumulation owner")
    yield (dp > 1 and getattr(args, "data_parallel_random_init", False)) and (
        "--data-parallel-random-init initializes each data-parallel rank differently and broadcasts rank 0's "
        "weights after FORGE has taken its masters from its own; drop the flag")
    yield (getattr(args, "context_parallel_size", 1) > 1) and (
        "context parallelism splits each weight gradient across ranks, which would need an all-reduce before "
        "the update; set --context-parallel-size 1")
    yield args.fp16 and (
        "--fp16 needs a loss scaler that unscales gradients or skips steps after the backward pass, which is too "
        "late for an update inside it; use --bf16")
    yield args.gradient_accumulation_fusion and (
        "gradient accumulation fusion writes weight gradients into main_grad buffers that FORGE removes; add "
        "--no-gradient-accumulation-fusion")
    yield getattr(args, "experimental_attention_variant", None) and (
        f"--experimental-attention-variant {args.experimental_attention_variant}: megatron-core builds it with "
        "Transformer Engine only, whose linears FORGE does not train; drop it")
    yield (args.transformer_impl != "local") and (
        f"FORGE trains megatron-core's local linear layers, which --transformer-impl {args.transformer_impl} "
        "replaces; use --transformer-impl local (the default under --use-forge)")
    yield getattr(args, "mtp_detach_heads", False) and (
        "--mtp-detach-heads clips the multi-token-prediction layers with a grad norm of their own, which FORGE "
        "does not keep; drop --mtp-detach-heads")
    yield getattr(args, "defer_embedding_wgrad_compute", False) and (
        "--defer-embedding-wgrad-compute postpones the output layer's weight gradient to a main_grad buffer that "
        "FORGE removes; drop it")
    yield (getattr(args, "use_torch_fsdp2", False) or getattr(args, "use_megatron_fsdp", False)) and (
        "FSDP shards each weight across data-parallel ranks and gathers its gradient there, while FORGE updates "
        "whole local weights inside backward; drop --use-torch-fsdp2 / --use-megatron-fsdp")
    yield (args.ckpt_format not in CHECKPOINT_FORMATS) and (
        f"--ckpt-format {args.ckpt_format} does not carry FORGE's optimizer state; use --ckpt-format torch_dist")
    rerun_mode = getattr(args, "rerun_mode", "disabled")
    yield (rerun_mode == "report_stats") and (
        "--rerun-mode report_stats re-runs every iteration's forward and backward, which would apply FORGE's "
        "update twice; use --rerun-mode validate_results or disabled")
    for flag in ("check_for_spiky_loss", "check_for_large_grads"):
        yield (getattr(args, flag, False) and rerun_mode != "disabled") and (
            f"--{flag.replace('_', '-')} re-runs an iteration that fails the check after FORGE has already "
            f"updated the weights; add --rerun-mode disabled (the check then only logs) or drop the flag")
    yield math.isfinite(getattr(args, "grad_norm_skip_threshold", math.inf)) and (
        "grad_norm_skip_threshold skips a step after FORGE has already applied it; leave it unset")
    yield (args.forge_max_nonfinite_iterations < 1) and "--forge-max-nonfinite-iterations must be at least 1"
    yield from _grouped_experts_refusals(args)
    yield cuda_graph_refusal(args)


def _grouped_experts_refusals(args):
    """--moe-grouped-gemm under --use-forge: FORGE's grouped experts module (megatron/experts.py),
    which keeps every local expert whole on its rank and each weight kind whole in one state."""
    if not (getattr(args, "moe_grouped_gemm", False) and getattr(args, "num_experts", None)):
        return
    etp = getattr(args, "expert_tensor_parallel_size", 1) or 1
    yield etp > 1 and (
        f"--moe-grouped-gemm with --use-forge keeps every expert whole on its rank (FORGE's grouped experts); set "
        f"--expert-tensor-parallel-size 1 (it is {etp}), or drop --moe-grouped-gemm")
    expert_dp = expert_data_parallel_size(args)
    yield expert_dp > 1 and (
        f"--moe-grouped-gemm with --use-forge updates each expert weight kind as one stacked tensor, which is not "
        f"split into data-parallel owner rows; the expert-data-parallel size is {expert_dp}: raise "
        "--expert-model-parallel-size to the data-parallel size, or drop --moe-grouped-gemm")
    yield getattr(args, "add_bias_linear", False) and (
        "--moe-grouped-gemm with --use-forge: FORGE's grouped experts have no biases; add --disable-bias-linear, "
        "or drop --moe-grouped-gemm")


def apply_defaults(args, argv: list[str]) -> list[str]:
    """Set what the run needs where the command line (`argv`) is silent, before Megatron validates
    the arguments: under --use-forge, megatron-core's local linears (--transformer-impl local)
    without gradient-accumulation fusion; without CUDA, no CUDA-only kernels. Returns the flags
    set (an explicit conflicting value is left for validation to refuse)."""
    set_flags = []
    cuda = _has_cuda()
    if (args.use_forge or not cuda) and args.transformer_impl != "local" and not _on_command_line(
            "--transformer-impl", argv):
        args.transformer_impl = "local"
        set_flags.append("--transformer-impl local")
    for dest, off, flag in CUDA_ONLY:
        needed_off = not cuda or (args.use_forge and dest == "gradient_accumulation_fusion")
        if needed_off and getattr(args, dest) != off:
            setattr(args, dest, off)
            set_flags.append(flag)
    return set_flags


def _on_command_line(flag: str, argv: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


@contextlib.contextmanager
def forge_argument_checks(argv: list[str] | None = None):
    """While Megatron parses and validates the arguments (parse_and_validate_args): FORGE's
    defaults first (apply_defaults, one log line), then Megatron's validation, then FORGE's checks,
    before Megatron's argument dump, so that a refusal is the first thing printed."""
    import sys

    from megatron.training import arguments

    argv = sys.argv[1:] if argv is None else argv
    validate_args, print_args = arguments.validate_args, arguments._print_args

    def validate_then_check(args, defaults=None):
        set_flags = apply_defaults(args, argv)
        if set_flags and int(os.environ.get("RANK", "0")) == 0:
            print(f"FORGE: set {' '.join(set_flags)} (the command line did not say; "
                  f"{'FORGE trains local linears' if args.use_forge else 'this machine has no CUDA'})", flush=True)
        arguments._print_args = lambda *unused: None
        # Megatron checks the GPU's compute capability for Transformer Engine's grouped GEMM; FORGE's
        # grouped experts (megatron/experts.py) need neither TE nor a GPU
        grouped = args.use_forge and getattr(args, "moe_grouped_gemm", False) and not _has_cuda()
        if grouped:
            args.moe_grouped_gemm = False
        try:
            validate_args(args, defaults or {})
        finally:
            arguments._print_args = print_args
            if grouped:
                args.moe_grouped_gemm = True
        validate_forge_args(args)
        print_args("arguments", args)
        return args

    arguments.validate_args = validate_then_check
    try:
        yield
    finally:
        arguments.validate_args = validate_args


def cuda_graph_refusal(args) -> str | None:
    """Megatron's CUDA-graph options with --use-forge, refused in one line (None: none is set).
    They would replay a covered layer's backward without its Python: FORGE's per-iteration
    bookkeeping (the micro-batch and update counters behind the one-update guard, the host's step
    count the checkpoint saves, the data-parallel collectives' callbacks) would not run. FORGE's
    step itself reads only device memory (core/table.py: StepTable.advance is capturable).
    Checked after Megatron's own validation, which turns --enable-cuda-graph and
    --external-cuda-graph into --cuda-graph-impl local / transformer_engine (`_refusals`)."""
    flags = [f"--cuda-graph-impl {args.cuda_graph_impl}"] if getattr(args, "cuda_graph_impl", "none") != "none" else []
    flags += [flag for flag, name in (("--enable-cuda-graph", "enable_cuda_graph"),
                                      ("--external-cuda-graph", "external_cuda_graph"),
                                      ("--optimizer-cuda-graph", "optimizer_cuda_graph"),
                                      ("--rl-training-cuda-graphs", "rl_training_cuda_graphs"))
              if getattr(args, name, False)]
    if not flags:
        return None
    return (f"{' and '.join(flags)} would replay covered layers' backward without FORGE's per-iteration "
            "bookkeeping (its update guard, step count and data-parallel callbacks run in Python); drop "
            f"{'them' if len(flags) > 1 else 'it'}")
