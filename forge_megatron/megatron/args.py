"""`--use-forge` and FORGE's flags, and the validation that refuses what an update inside backward
cannot honour (one ConfigurationError per case, naming the flag to change).

Hyperparameters come from Megatron's own flags (--lr, --adam-beta1/2, --adam-eps, --weight-decay,
--sgd-momentum, --clip-grad and the schedule flags); FORGE adds only how it stores and clips.
"""

from __future__ import annotations

import argparse
import contextlib
import math

from forge_megatron.core.param import ACCUMULATION_DTYPES, ForgeConfig
from forge_megatron.core.rules import get_rule, registered_rules
from forge_megatron.core.state import STATE_DTYPES, WEIGHT_STORES
from forge_megatron.megatron.attention import CORE_ATTENTIONS
from forge_megatron.megatron.errors import ConfigurationError

CLIP_MODES = ("stale", "two-pass", "off")
DP_ACCUMULATIONS = ("local", "owner")  # where a data-parallel step sums its micro-batches (--forge-dp-accumulation)
RULE_FOR_OPTIMIZER = {"adam": "adamw", "sgd": "sgd"}  # Megatron's "adam" is AdamW (decoupled decay)
CHECKPOINT_FORMATS = ("torch_dist", "torch")  # the formats FORGE's state travels in


def add_forge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """FORGE's flags, in Megatron's style; usable as `extra_args_provider`."""
    group = parser.add_argument_group("FORGE", "optimizer step fused into the weight-gradient GEMM")
    group.add_argument("--use-forge", action="store_true",
                       help="Train the transformer linears (and optionally the output layer) with FORGE: the "
                            "optimizer step runs inside backward and their weight gradients are never stored.")
    group.add_argument("--forge-rule", default=None, choices=registered_rules(),
                       help="Element-wise rule for covered weights (default: from --optimizer; adam -> adamw).")
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
    group.add_argument("--forge-clip-grad-mode", default="stale", choices=CLIP_MODES,
                       help="How --clip-grad applies to covered weights: 'stale' uses the previous step's global "
                            "norm (no extra cost), 'two-pass' clips with this step's exact norm (a norms-only backward first, "
                            "~2x forward+backward; with several micro-batches or data parallelism the step's "
                            "gradient is held instead, see docs/megatron.md), 'off' does not clip them. The "
                            "logged norm always covers both.")
    group.add_argument("--forge-max-nonfinite-iterations", type=int, default=3,
                       help="Stop after this many consecutive iterations with non-finite gradients in covered "
                            "weights (each such iteration is skipped or partly skipped, see docs/megatron.md).")
    group.add_argument("--forge-cover-output-layer", action="store_true",
                       help="Also cover the output layer (needs --untie-embeddings-and-output-weights).")
    group.add_argument("--forge-backend", default=None, choices=("triton", "torch"),
                       help="Kernel backend (default: triton on CUDA, the tiled torch twin on CPU).")
    group.add_argument("--forge-core-attention", default="local", choices=CORE_ATTENTIONS,
                       help="Core attention of the local layer spec: 'local' is megatron-core's "
                            "DotProductAttention (materializes the s x s scores), 'sdpa' is torch's fused "
                            "scaled_dot_product_attention (flash or memory-efficient attention on a GPU). "
                            "forge-pretrain-gpt applies it to standard runs too, for like-for-like comparisons.")
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


def forge_config_from_args(args) -> ForgeConfig:
    """The rule and its hyperparameters, read from Megatron's own optimizer flags."""
    name = args.forge_rule or RULE_FOR_OPTIMIZER.get(args.optimizer)
    if name is None:
        raise ConfigurationError(f"--use-forge has no rule for --optimizer {args.optimizer}; pass --forge-rule "
                                 f"(one of {', '.join(registered_rules())})")
    from_flags = {"lr": args.lr, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_eps,
                  "weight_decay": args.weight_decay, "momentum": getattr(args, "sgd_momentum", 0.0)}
    rule = get_rule(name)
    hyperparameters = {k: v for k, v in from_flags.items() if k in rule.defaults}
    return ForgeConfig(name, hyperparameters, weight_store=args.forge_weight_store,
                       state_dtype=args.forge_state_dtype, seed=args.seed, backend=args.forge_backend,
                       accumulation_dtype=args.forge_accumulation_dtype)


def validate_forge_args(args) -> ForgeConfig:
    """Refuse configurations where an update inside backward would not be the step the user asked
    for; each message names the flag to change. Returns the ForgeConfig (nothing without
    --use-forge)."""
    if not args.use_forge:
        return None
    for problem in _refusals(args):
        if problem:
            raise ConfigurationError(f"--use-forge: {problem}")
    return forge_config_from_args(args)


def _refusals(args):
    """Each refusal, or None; the first that applies is reported."""
    dp = args.data_parallel_size
    grad_dtype = args.forge_dp_grad_dtype or args.forge_accumulation_dtype
    yield (dp > 1 and args.forge_dp_accumulation == "local" and grad_dtype != args.forge_accumulation_dtype
           and (args.global_batch_size > args.micro_batch_size * dp or getattr(args, "rampup_batch_size", None))) and (
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
    yield (args.forge_cover_output_layer and not args.untie_embeddings_and_output_weights) and (
        "--forge-cover-output-layer with tied embeddings: the shared weight gets gradients from the embedding "
        "and the output layer; add --untie-embeddings-and-output-weights or drop --forge-cover-output-layer")
    yield args.gradient_accumulation_fusion and (
        "gradient accumulation fusion writes weight gradients into main_grad buffers that FORGE removes; add "
        "--no-gradient-accumulation-fusion")
    yield (args.transformer_impl != "local") and (
        "FORGE's layer spec is megatron-core's local spec with FORGE linears; add --transformer-impl local")
    yield getattr(args, "num_experts", None) and "mixture-of-experts layers are not covered; drop --num-experts"
    yield getattr(args, "multi_latent_attention", False) and (
        "FORGE's layer spec covers standard self-attention; drop --multi-latent-attention")
    yield getattr(args, "experimental_attention_variant", None) and (
        "FORGE's layer spec covers standard self-attention; drop --experimental-attention-variant")
    yield getattr(args, "heterogeneous_layers_config_path", None) and (
        "heterogeneous layer configs build their own layer specs, which FORGE does not cover; drop "
        "--heterogeneous-layers-config-path")
    yield getattr(args, "mtp_num_layers", None) and (
        "multi-token prediction keeps a grad norm of its own, to which FORGE's norm would be added as well as "
        "to the main one; drop --mtp-num-layers")
    yield args.spec is not None and (
        f"--spec {' '.join(args.spec)} replaces the layer spec; FORGE brings its own: drop --spec")
    yield getattr(args, "calculate_per_token_loss", False) and (
        "--calculate-per-token-loss divides the gradients by the step's token count after backward, when "
        "FORGE has already applied them; drop --calculate-per-token-loss")
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


@contextlib.contextmanager
def check_forge_args_before_megatron():
    """While Megatron parses and validates the arguments, run FORGE's checks right after Megatron's
    own and before its argument dump, so that a refusal is the first thing printed."""
    from megatron.training import arguments

    validate_args, print_args = arguments.validate_args, arguments._print_args

    def validate_then_check(args, defaults=None):
        arguments._print_args = lambda *unused: None
        try:
            validate_args(args, defaults or {})
        finally:
            arguments._print_args = print_args
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
    --external-cuda-graph into --cuda-graph-impl local / transformer_engine; to be yielded from
    `_refusals`."""
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
