"""FORGE in a Megatron training loop: arguments, validation, schedules, grad norm and clipping,
checkpoint state.

The pieces a training loop needs, whether it is forge-pretrain-gpt or Megatron-LM's
pretrain_gpt.py with patches/ applied:

* `add_forge_args(parser)`: Megatron's `extra_args_provider`; `--use-forge` and FORGE options.
  Hyperparameters come from Megatron's own flags (--lr, --adam-beta1/2, --adam-eps,
  --weight-decay, --sgd-momentum, --clip-grad and the schedule flags).
* `validate_forge_args(args)`: refuses what an in-backward update cannot do, naming the flag.
* `forge_config_from_args(args)`: the ForgeConfig for the layer spec.
* `ForgeController`: per step, gives every covered weight the lr and weight decay that Megatron's
  OptimizerParamScheduler computes for the parameter group Megatron itself would have put it in,
  and its gradient scale (the clip coefficient); runs the two passes of exact clipping; adds
  FORGE's gradients to the global grad norm; exposes FORGE state as sharded optimizer state.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from forge_megatron.attention import CORE_ATTENTIONS
from forge_megatron.numerics import QBLOCK
from forge_megatron.param import ForgeConfig, ForgeParam
from forge_megatron.rules import get_rule, registered_rules
from forge_megatron.state import STATE_DTYPES, WEIGHT_STORES

logger = logging.getLogger(__name__)

CLIP_MODES = ("stale", "two-pass", "off")
CHECKPOINT_PREFIX = "optimizer.forge"  # FORGE state is optimizer state: --no-save-optim/--no-load-optim skip it
RULE_FOR_OPTIMIZER = {"adam": "adamw", "sgd": "sgd"}  # Megatron's "adam" is AdamW (decoupled decay)


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
    group.add_argument("--forge-clip-grad-mode", default="stale", choices=CLIP_MODES,
                       help="How --clip-grad applies to covered weights: 'stale' uses the previous step's global "
                            "norm (no extra cost), 'two-pass' runs a norms-only backward first (exact, ~2x "
                            "forward+backward), 'off' does not clip them. The logged norm always covers both.")
    group.add_argument("--forge-cover-output-layer", action="store_true",
                       help="Also cover the output layer (needs --untie-embeddings-and-output-weights).")
    group.add_argument("--forge-backend", default=None, choices=("triton", "torch"),
                       help="Kernel backend (default: triton on CUDA, the tiled torch twin on CPU).")
    group.add_argument("--forge-core-attention", default="local", choices=CORE_ATTENTIONS,
                       help="Core attention of FORGE's layer spec: 'local' is megatron-core's DotProductAttention "
                            "(materializes the s x s scores), 'sdpa' is torch's fused scaled_dot_product_attention "
                            "(flash or memory-efficient attention on a GPU). forge-pretrain-gpt applies it to "
                            "standard runs too, so that comparisons are like for like.")
    return parser


def forge_config_from_args(args) -> ForgeConfig:
    """The rule and its hyperparameters, read from Megatron's own optimizer flags."""
    name = args.forge_rule or RULE_FOR_OPTIMIZER.get(args.optimizer)
    if name is None:
        raise ValueError(f"--use-forge has no rule for --optimizer {args.optimizer}; pass --forge-rule "
                         f"(one of {', '.join(registered_rules())})")
    from_flags = {"lr": args.lr, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_eps,
                  "weight_decay": args.weight_decay, "momentum": getattr(args, "sgd_momentum", 0.0)}
    rule = get_rule(name)
    hyperparameters = {k: v for k, v in from_flags.items() if k in rule.defaults}
    return ForgeConfig(name, hyperparameters, weight_store=args.forge_weight_store,
                       state_dtype=args.forge_state_dtype, seed=args.seed, backend=args.forge_backend)


def validate_forge_args(args) -> ForgeConfig:
    """Refuse configurations where an update inside backward would not be the step the user asked
    for; each message names the flag to change. Returns the ForgeConfig."""
    def refuse(message: str):
        raise ValueError(f"--use-forge: {message}")

    dp = args.data_parallel_size
    micro = args.global_batch_size // (args.micro_batch_size * dp)
    if micro != 1:
        refuse(f"{micro} micro-batches per step: FORGE updates the weights in every backward pass, i.e. once per "
               f"micro-batch; set --global-batch-size to --micro-batch-size x data-parallel size "
               f"({args.micro_batch_size * dp}), or raise --micro-batch-size")
    if dp > 1:
        refuse(f"data-parallel size {dp}: each data-parallel rank would update the weights with its own "
               "gradient before DDP's all-reduce could average them; spread the model with "
               "--tensor-model-parallel-size (and --sequence-parallel) so that data-parallel size is 1")
    if args.pipeline_model_parallel_size > 1:
        refuse("pipeline parallelism interleaves several micro-batches per step; set "
               "--pipeline-model-parallel-size 1")
    if getattr(args, "context_parallel_size", 1) > 1:
        refuse("context parallelism splits each weight gradient across ranks, which would need an all-reduce "
               "before the update; set --context-parallel-size 1")
    if args.fp16:
        refuse("--fp16 needs a loss scaler that unscales gradients or skips steps after the backward pass, "
               "which is too late for an update inside it; use --bf16")
    if args.forge_cover_output_layer and not args.untie_embeddings_and_output_weights:
        refuse("--forge-cover-output-layer with tied embeddings: the shared weight gets gradients from the "
               "embedding and the output layer; add --untie-embeddings-and-output-weights or drop "
               "--forge-cover-output-layer")
    if args.gradient_accumulation_fusion:
        refuse("gradient accumulation fusion writes weight gradients into main_grad buffers that FORGE "
               "removes; add --no-gradient-accumulation-fusion")
    if args.transformer_impl != "local":
        refuse("FORGE's layer spec is megatron-core's local spec with FORGE linears; add --transformer-impl local")
    if getattr(args, "num_experts", None):
        refuse("mixture-of-experts layers are not covered; drop --num-experts")
    return forge_config_from_args(args)


def covered_params(model_chunks: Iterable[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, weight) of every FORGE-covered weight, in module order."""
    return [(name, p) for chunk in model_chunks for name, p in chunk.named_parameters()
            if getattr(p, "_forge_param", None) is not None]


class ForgeController:
    """Per-step glue between the covered weights and the training loop (see module docstring)."""

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer_config, config_overrides=None,
                 clip_grad: float = 0.0, clip_mode: str = "stale", model_parallel_group=None):
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"unknown FORGE clip mode {clip_mode!r}; choose one of {CLIP_MODES}")
        self.chunks = model_chunks
        self.named = covered_params(model_chunks)
        if not self.named:
            raise ValueError("no FORGE-covered weights in the model: build it with get_gpt_layer_forge_spec")
        self.params: list[ForgeParam] = [p._forge_param for _, p in self.named]
        for index, param in enumerate(self.params):  # the same order, hence keys, on every rank
            param.state.layer = index
        self.groups = _megatron_param_groups(model_chunks, [p for _, p in self.named], optimizer_config,
                                             config_overrides)
        self.clip_grad = float(clip_grad)
        self.clip_mode = clip_mode if self.clip_grad > 0 else "off"
        self.group = model_parallel_group
        self.grad_norm: float | None = None  # the last step's global norm
        self.nonfinite = 0  # the last step's non-finite gradient values in covered weights
        logger.info("FORGE covers %d weights (%s parameters on this rank), rule %s, clipping %s%s",
                    len(self.params), f"{self.num_parameters():,}", self.params[0].config.rule, self.clip_mode,
                    "" if self.clip_mode == "off" else f" at {self.clip_grad}")

    def num_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named)

    # -- schedules --------------------------------------------------------------------------------

    def attach_scheduler(self, scheduler) -> None:
        """Follow Megatron's OptimizerParamScheduler: whenever it steps, each covered weight gets
        the lr and weight decay the scheduler gives its parameter group."""
        step = scheduler.step

        def step_and_follow(increment: int) -> None:
            step(increment)
            self.apply_schedule(scheduler)

        scheduler.step = step_and_follow
        self.apply_schedule(scheduler)

    def apply_schedule(self, scheduler) -> None:
        for param, group in zip(self.params, self.groups):
            lr = scheduler.get_lr(group)
            wd = scheduler.get_wd(group) * group.get("wd_mult", 1.0)
            overrides = {k: group[k] for k in ("eps",) if k in group and k in param.state.hyperparameters}
            param.state.set_hyperparameters(lr=lr, weight_decay=wd, **overrides)

    # -- one step ---------------------------------------------------------------------------------

    def forward_backward(self, forward_backward_func: Callable, zero_grads: Callable[[], None], **kwargs):
        """Run Megatron's forward_backward_func for one step with FORGE's gradient scale.

        'stale' and 'off': one pass; the clip coefficient comes from the previous step's norm
        (or is 1). 'two-pass': a norms-only pass first (FORGE writes nothing; the other
        parameters' gradients are computed), the global norm and the exact coefficient, then
        `zero_grads()`, the first pass's micro-batches and RNG state replayed, and the real pass.
        """
        self._reset_stats()
        if self.clip_mode != "two-pass":
            coefficient = self._coefficient(self.grad_norm) if self.clip_mode == "stale" else 1.0
            self._set(scale=coefficient, apply=True)
            return forward_backward_func(**kwargs)
        rng = _rng_states()
        recorder = _Recorder(kwargs.get("data_iterator"))
        self._set(scale=1.0, apply=False)
        forward_backward_func(**{**kwargs, "data_iterator": recorder.recording()})
        coefficient = self._coefficient(self.global_grad_norm(sumsq(counted_grads(self.chunks))))
        zero_grads()
        _restore_rng_states(rng)
        self._reset_stats()
        self._set(scale=coefficient, apply=True)
        return forward_backward_func(**{**kwargs, "data_iterator": recorder.replay()})

    def global_grad_norm(self, other_sumsq: torch.Tensor | float) -> float:
        """The L2 norm of all of the step's gradients: FORGE's (raw, before clipping) and the
        other parameters' (their local sum of squares, counted by Megatron's rule, see
        `counted_grads`), summed over the model-parallel group. Also gathers the step's
        non-finite count."""
        local = torch.zeros(2, dtype=torch.float64, device=self.named[0][1].device)
        local[0] = self.local_sumsq() + other_sumsq
        for p in self.params:
            local[1] += p.nonfinite
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(local, group=self.group)
        self.grad_norm = math.sqrt(float(local[0]))
        self.nonfinite = int(local[1])
        return self.grad_norm

    def local_sumsq(self) -> torch.Tensor:
        """This rank's sum of squares of the covered weights' raw gradients in the last backward."""
        total = torch.zeros((), dtype=torch.float32, device=self.named[0][1].device)
        for p in self.params:
            total = total + p.sumsq
        return total

    def clip_coefficient(self) -> float:
        """Megatron's clip coefficient for the current global norm, to apply to the other grads."""
        return self._coefficient(self.grad_norm) if self.clip_grad > 0 else 1.0

    def _coefficient(self, norm: float | None) -> float:
        if norm is None or not math.isfinite(norm):
            return 1.0
        return min(1.0, self.clip_grad / (norm + 1.0e-6))  # Megatron's clip_grad_by_total_norm_fp32

    def _set(self, scale: float, apply: bool) -> None:
        for p in self.params:
            p.grad_scale = scale
            p.apply = apply

    def _reset_stats(self) -> None:
        for p in self.params:
            p.reset_stats()

    # -- checkpoints ------------------------------------------------------------------------------

    def sharded_state_dict(self, model_sharded_state_dict: dict) -> dict:
        """FORGE state as sharded optimizer state: each state tensor (and master) sharded exactly
        like its weight, so a checkpoint saved at one TP size loads at another."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

        # ShardedTensors, and ShardedTensorFactories (e.g. SwiGLU's fc1, split per TP rank on save)
        tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        by_data = {id(t.data): t for t in nested_values(tensors)}
        out = {}
        for (name, weight), param in zip(self.named, self.params):
            sharded_weight = by_data.get(id(weight))
            if sharded_weight is None:
                raise KeyError(f"covered weight {name} is not in the model's sharded state dict")
            entry = {state_name: _sharded_like(sharded_weight, tensor, f"{CHECKPOINT_PREFIX}.{state_name}", name)
                     for state_name, tensor in param.state.named_tensors().items()}
            entry["step"] = param.state.step
            out[name] = entry  # sharded keys are per stacked layer; the parameter name is unique
        return out

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Copy what dist_checkpointing loaded for `sharded_state_dict()` into the states."""
        for (name, _), param in zip(self.named, self.params):
            entry = loaded[name]
            for state_name, tensor in param.state.named_tensors().items():
                tensor.copy_(entry[state_name])
            param.state.step = int(entry["step"])


def _sharded_like(sharded_weight, tensor: torch.Tensor, prefix: str, name: str):
    """`tensor` sharded like its weight: states and master have the weight's shape; the int8
    states' block scales have one column per QBLOCK weight columns, so their last axis is the
    weight's divided by QBLOCK (which the shard boundaries must respect)."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    if not isinstance(sharded_weight, ShardedTensor) or tuple(tensor.shape) == sharded_weight.local_shape:
        return make_sharded_optimizer_tensor(sharded_weight, tensor, prefix)  # factories split rows only
    offset, columns = sharded_weight.global_offset[-1], sharded_weight.global_shape[-1]
    if offset % QBLOCK or (sharded_weight.local_shape[-1] != columns and columns % QBLOCK):
        raise ValueError(f"{name}: int8 state scales cover {QBLOCK}-column blocks, but this shard starts at column "
                         f"{offset} of {columns}; checkpointing needs shard widths that are multiples of {QBLOCK}")
    scaled = dataclasses.replace(
        sharded_weight, key=f"{prefix}.{sharded_weight.key}", data=tensor, dtype=tensor.dtype,
        local_shape=tuple(tensor.shape), global_shape=(*sharded_weight.global_shape[:-1], -(-columns // QBLOCK)),
        global_offset=(*sharded_weight.global_offset[:-1], offset // QBLOCK))
    scaled.validate_metadata_integrity()
    return scaled


class _Recorder:
    """Wraps Megatron's data iterator(s) (one, a list per model chunk, or None) so that the micro-
    batches drawn in the first pass can be drawn again, identically, in the second."""

    def __init__(self, data_iterator):
        self.source = data_iterator
        self.seen: list[list] = []

    def recording(self):
        if self.source is None:
            return None
        sources = self.source if isinstance(self.source, list) else [self.source]
        self.seen = [[] for _ in sources]
        wrapped = [self._record(it, seen) for it, seen in zip(sources, self.seen)]
        return wrapped if isinstance(self.source, list) else wrapped[0]

    def replay(self):
        if self.source is None:
            return None
        replays = [iter(seen) for seen in self.seen]
        return replays if isinstance(self.source, list) else replays[0]

    @staticmethod
    def _record(iterator, seen):
        for item in iterator:
            seen.append(item)
            yield item


def _megatron_param_groups(model_chunks, weights, optimizer_config, config_overrides) -> list[dict]:
    """The parameter group Megatron's optimizer would put each covered weight in (wd_mult, max_lr,
    min_lr, decoupled lr, ...), from Megatron's own `_get_param_groups` run with the covered
    weights visible."""
    from megatron.core.optimizer import _get_param_groups

    uncovered = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
    for p in uncovered:
        p.requires_grad_(False)
    for p in weights:
        p.requires_grad_(True)
    try:
        groups = _get_param_groups(model_chunks, optimizer_config, config_overrides)
    finally:
        for p in weights:
            p.requires_grad_(False)
        for p in uncovered:
            p.requires_grad_(True)
    group_of = {id(p): {k: v for k, v in g.items() if k != "params"} for g in groups for p in g["params"]}
    return [group_of[id(w)] for w in weights]


def counted_grads(model_chunks) -> list[torch.Tensor]:
    """Gradients of the non-covered parameters that count once in the global norm (Megatron's rule:
    no tensor-parallel duplicates, no shared copies)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    out = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            if not p.requires_grad or not param_is_not_shared(p) or not param_is_not_tensor_parallel_duplicate(p):
                continue
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            if grad is not None:
                out.append(grad)
    return out


def sumsq(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of `tensors` in fp32 (0-dim)."""
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        total = total.to(t.device) + t.float().square().sum()
    return total


def _rng_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
