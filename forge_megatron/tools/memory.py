"""Per-rank memory of one training step, standard Megatron or FORGE: an analytic model, no GPU.

It answers "how many bytes does one GPU rank hold at the peak of a step, and what is the largest
micro-batch that fits in G GiB?" from a Megatron argument set (`parse_megatron_args`).

The peak comes in backward: DDP's gradient buffer (or FORGE's accumulation buffer when a step has
several micro-batches), the master weights and the optimizer states live for the whole run, and
every layer's activations are held from forward until its backward. So the peak is weights +
gradients + master + states + activations, plus the larger of two short-lived buffers that come
one after the other: the loss stage (logits and cross entropy) and one layer's attention backward
(only where attention materializes its score matrix).

Pipeline parallelism (1F1B): stage s of p holds its num_layers / p layers, the word embedding on the
first stage and the output layer (or, tied, Megatron's copy of the embedding) on the last, and the
activations of min(k, p - s) micro-batches in flight (k micro-batches per step: 1F1B runs p - s - 1
warm-up forwards before its first backward); only the last stage has the loss stage. The rank's
peak is the most loaded stage's.

Megatron's estimator (megatron/training/theoretical_memory_usage.py) gives the parameter count
and the stored activations; it is called, not copied. This module adds what it cannot give:
- which parameters FORGE covers (the estimator returns one total);
- bytes per parameter for the precision-aware optimizer and for each FORGE regime (the
  estimator knows 18, or 6 + 12/dp with the distributed optimizer, only);
- the attention-score matrices of unfused attention (the estimator assumes selective recompute,
  which stores none), and the loss stage at its real size (the estimator counts 4 bytes per logit).
Mixtures of experts (every layer; docs/memory.md, "Mixtures of experts"): the routed experts'
weights are split over expert-parallel x expert-tensor-parallel ranks, and their gradients, master
and states over the expert-data-parallel group (world / (EP x ETP x PP)), as Megatron's DDP and
distributed optimizer (and FORGE's owner rows) split them; FORGE covers every expert linear. Each
layer holds the routed tokens' expert activations (top-k copies of each token, balanced over the
experts) and the router's per-expert scores; one layer's dispatcher buffers (its permuted tokens
and what the all-to-all receives) are short-lived, at the moment of attention's workspace.
docs/memory.md states what is and is not counted. CP = 1, no interleaved pipeline, Adam (and Muon for dense
models) only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from typing import Callable

import torch
from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
from megatron.training.theoretical_memory_usage import compute_activation_memory, compute_weight_and_optimizer_memory

from forge_megatron.core import tiled
from forge_megatron.megatron.args import expert_data_parallel_size, output_layer_covered

GIB = 2**30
DEFAULT_RESERVE_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation: not modelled, set aside
MEGATRON_BYTES_PER_PARAMETER = 18  # what Megatron's estimator charges without the distributed optimizer
ADAM_STATES = 2
MUON_STATES = 1  # Muon's momentum (--optimizer muon: the dense layers' linear weights)
FP32 = 4
# Megatron's dtype flags, as parsed (strings) and as validate_args maps them (fp8 states are uint8).
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1,
               torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.uint8: 1}
# FORGE's --forge-state-dtype: int8 is one code per element plus one fp32 scale per 32 elements
# (forge_megatron.core.numerics.QBLOCK; this module imports only torch and megatron, the test checks both
# against ForgeState's allocations).
FORGE_STATE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1 + 4 / 32}
FORGE_ACCUMULATION_BYTES = {"fp32": 4, "bf16": 2}  # --forge-accumulation-dtype: k > 1, and the D > 1 window
FORGE_WEIGHT_STORES = ("master", "sr", "rne")


class NotModelled(ValueError):
    """A configuration outside the model; the message names the flag to change."""


@dataclasses.dataclass(frozen=True)
class ParameterBytes:
    """Bytes one parameter costs, by what holds them."""

    weight: float
    grad: float
    master: float
    states: float

    @property
    def total(self) -> float:
        return self.weight + self.grad + self.master + self.states


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds at the peak of a step."""

    weights: int
    grads: int  # gradient buffers kept between steps (Megatron's main_grad; FORGE's accumulation buffers)
    master: int
    states: int
    window: int  # gradient memory of the step only: FORGE's data-parallel window, buffers and held rows
    activations: int  # held from forward until backward
    logits: int  # loss stage: 16-bit logits, cross entropy's fp32 copy, the output layer's weight gradient
    attention_workspace: int  # one layer's attention backward: gradients of its score matrices
    reserve: int
    stage: int = 0  # the pipeline stage these bytes are for

    @property
    def held(self) -> int:
        """What the rank holds between steps (Megatron's "allocated" after a step)."""
        return self.weights + self.grads + self.master + self.states

    @property
    def total(self) -> int:
        """The loss stage ends before the first layer's backward starts, so only the larger counts."""
        return (self.held + self.window + self.activations + max(self.logits, self.attention_workspace)
                + self.reserve)


def parse_megatron_args(argv: list[str], extra_args_provider=None, data_parallel_size: int = 1) -> argparse.Namespace:
    """Megatron's own parser on `argv` (pretrain_gpt.py flags), then the sizes the model reads.

    Only parse_args: validate_args queries the GPU. The few sizes it would derive are set here:
    data-parallel and world size (data-parallel size is not a flag), the padded vocabulary,
    kv-channels and query groups.
    """
    from megatron.training.arguments import parse_args

    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        args = parse_args(extra_args_provider=extra_args_provider)
    finally:
        sys.argv = saved
    if args.vocab_size is None or args.ffn_hidden_size is None:
        raise NotModelled("memory model: it needs --vocab-size and --ffn-hidden-size in the flags")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    return replace_args(
        args,
        data_parallel_size=data_parallel_size,
        world_size=model_parallel * data_parallel_size,
        padded_vocab_size=vocab_size_with_padding(args.vocab_size, args, logging_enabled=False),
        kv_channels=args.kv_channels or args.hidden_size // args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        virtual_pipeline_model_parallel_size=args.num_virtual_stages_per_pipeline_rank,  # refused if set
    )


def replace_args(args: argparse.Namespace, **changes) -> argparse.Namespace:
    """A copy of `args` with `changes`: variants of one run (and Megatron's estimator writes to its args)."""
    new = copy.copy(args)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


def micro_batches_per_step(args, micro_batch: int) -> int:
    """k, the micro-batches of one step on one data-parallel rank: --global-batch-size over
    micro-batch x data-parallel size (rounded up; Megatron needs it to divide). Without
    --global-batch-size Megatron runs one micro-batch per step."""
    if not args.global_batch_size:
        return 1
    return max(1, math.ceil(args.global_batch_size / (micro_batch * args.data_parallel_size)))


def stage_layers(args) -> int:
    return args.num_layers // args.pipeline_model_parallel_size


def parameters_per_rank(args, stage: int = 0) -> int:
    """Parameters on one rank of pipeline stage `stage`: Megatron's estimator (which returns them at
    18 bytes each when the distributed optimizer is off) on the stage's layers, with the word
    embedding on the first stage and the output layer (tied: Megatron's copy of the embedding) on
    the last. The final norm is counted on every stage (a few thousand parameters)."""
    one_stage = replace_args(args, num_layers=stage_layers(args), pipeline_model_parallel_size=1,
                             untie_embeddings_and_output_weights=False, use_distributed_optimizer=False,
                             world_size=args.world_size // args.pipeline_model_parallel_size)
    with_one_embedding = round(compute_weight_and_optimizer_memory(one_stage) / MEGATRON_BYTES_PER_PARAMETER)
    last = args.pipeline_model_parallel_size - 1
    embeddings = (stage == 0) + (stage == last and (last > 0 or args.untie_embeddings_and_output_weights))
    return with_one_embedding + (embeddings - 1) * _embedding_per_rank(args)


def _embedding_per_rank(args) -> int:
    return args.padded_vocab_size * args.hidden_size // args.tensor_model_parallel_size


def expert_parameters_per_rank(args, stage: int = 0) -> int:
    """Routed experts' weights on one rank of stage `stage` (all covered by FORGE): num_experts /
    EP experts of each of its layers, each expert's fc1 and fc2 split over ETP."""
    if not args.num_experts:
        return 0
    fc1, fc2 = _expert_weights(args)
    return stage_layers(args) * args.num_experts * (fc1 + fc2) // (
        args.expert_model_parallel_size * args.expert_tensor_parallel_size)


def _expert_weights(args) -> tuple[int, int]:
    """Elements of one expert's linear_fc1 and linear_fc2, unsharded."""
    hidden, ffn = args.hidden_size, args.moe_ffn_hidden_size
    return hidden * ffn * (2 if args.swiglu else 1), ffn * hidden


def covered_parameters_per_rank(args, cover_output_layer: bool, stage: int = 0) -> int:
    """Dense weights FORGE covers on one rank of pipeline stage `stage`: linear_qkv, linear_proj,
    linear_fc1 and linear_fc2 of each of its layers (in a mixture of experts only the attention's;
    the experts: expert_parameters_per_rank), and on the last stage the output layer if covered.
    Weights only: biases stay with the standard optimizer."""
    layer, output = _covered_weights(args, cover_output_layer, stage)
    return (stage_layers(args) * sum(layer) + output) // args.tensor_model_parallel_size


def largest_covered_weight(args, cover_output_layer: bool, stage: int = 0) -> int:
    """Elements of the largest covered weight on one rank of stage `stage` (its local shard)."""
    layer, output = _covered_weights(args, cover_output_layer, stage)
    return max(*layer, output) // args.tensor_model_parallel_size


def _covered_weights(args, cover_output_layer: bool, stage: int) -> tuple[tuple[int, ...], int]:
    """(elements of a layer's linear_qkv, linear_proj, linear_fc1, linear_fc2; of the output layer
    if covered on this stage, else 0), unsharded."""
    hidden, ffn = args.hidden_size, args.ffn_hidden_size
    query = args.num_attention_heads * args.kv_channels
    qkv = hidden * (query + 2 * args.num_query_groups * args.kv_channels)
    last = stage == args.pipeline_model_parallel_size - 1
    output = args.padded_vocab_size * hidden if cover_output_layer and last else 0
    if args.num_experts:
        return (qkv, query * hidden), output
    return (qkv, query * hidden, hidden * ffn * (2 if args.swiglu else 1), ffn * hidden), output


def standard_bytes_per_parameter(args, states: int = ADAM_STATES) -> ParameterBytes:
    """Megatron's accounting: bf16 weight 2, fp32 main gradient 4, fp32 master 4, Adam's two fp32
    states 8 = 18 (Muon's matrices: one state, 14); the distributed optimizer shards master and
    states over data-parallel ranks (6 + 12/dp). The precision-aware optimizer (TE FusedAdam) takes the state dtypes from
    --exp-avg-dtype / --exp-avg-sq-dtype and keeps a 16-bit master: fp16 with --main-params-dtype
    fp16, and with fp32 only the 16 bits the bf16 weight lacks (store_param_remainders, on by default)."""
    weight = 2 if args.bf16 else FP32
    grad = 2 if args.bf16 and (args.grad_reduce_in_bf16 or DTYPE_BYTES[args.main_grads_dtype] == 2) else FP32
    if args.use_precision_aware_optimizer:
        master = 2 if args.bf16 else 0
        states = DTYPE_BYTES[args.exp_avg_dtype] + DTYPE_BYTES[args.exp_avg_sq_dtype]
    else:
        master = FP32 if args.bf16 else 0
        states = states * FP32
    shards = args.data_parallel_size if args.use_distributed_optimizer else 1
    return ParameterBytes(weight, grad, master / shards, states / shards)


def forge_bytes_per_parameter(args, micro_batches: int = 1, states: int = ADAM_STATES) -> ParameterBytes:
    """A FORGE-covered weight: no gradient at one micro-batch per step, the accumulation buffer
    (--forge-accumulation-dtype) at several; the weight, an fp32 master for bf16 weights under
    --forge-weight-store master, and Adam's two states (Muon's one) in --forge-state-dtype
    (docs/numerics.md), master and states held by one data-parallel owner per block of rows (1/D each)."""
    if args.forge_weight_store not in FORGE_WEIGHT_STORES:
        raise ValueError(f"unknown --forge-weight-store {args.forge_weight_store!r}")
    owners = args.data_parallel_size
    master = FP32 if args.bf16 and args.forge_weight_store == "master" else 0
    buffer = FORGE_ACCUMULATION_BYTES[args.forge_accumulation_dtype] if micro_batches > 1 else 0
    if owners > 1 and micro_batches > 1 and args.forge_dp_accumulation == "owner":
        buffer = FP32 / owners  # the owner's rows of the step's gradient, summed in fp32
    return ParameterBytes(2 if args.bf16 else FP32, buffer, master / owners,
                          states * FORGE_STATE_BYTES[args.forge_state_dtype] / owners)


def muon_workspace_bytes(args, stage: int = 0) -> int:
    """Newton-Schulz's fp32 temporaries for the largest Muon matrix of a rank (n <= m its sides:
    its local shard, or the whole weight gathered with --muon-tp-mode duplicated): the normalized
    matrix, its next iterate, their product in the middle and the scaled update (n m each), X X^T,
    its square and polynomial (n^2 each); duplicated over TP > 1, the gathered shards and their
    concatenation too (n m each: emerging_optimizers' newton_schulz_tp holds both while it
    iterates). One matrix at a time: in standard Muon's step, in FORGE's backward right after the
    weight's gradient (with Nesterov, plus the direction, n m)."""
    if args.optimizer != "muon" or not stage_layers(args):
        return 0
    hidden, ffn, tp = args.hidden_size, args.ffn_hidden_size, args.tensor_model_parallel_size
    query, kv = args.num_attention_heads * args.kv_channels, args.num_query_groups * args.kv_channels
    split = 1 if args.muon_tp_mode == "duplicated" else tp  # the local shard's rows (column) or columns (row)
    shapes = [((query + 2 * kv) // split, hidden), (hidden, query // split),
              (ffn * (2 if args.swiglu else 1) // split, hidden), (hidden, ffn // split)]
    direction = 1 if getattr(args, "use_forge", False) and args.muon_nesterov else 0
    gathered = 2 if args.muon_tp_mode == "duplicated" and tp > 1 else 0
    return max(FP32 * ((4 + direction + gathered) * n * m + 3 * min(n, m) ** 2) for n, m in shapes)


def forge_window_bytes(args, micro_batches: int, stage: int = 0) -> int:
    """FORGE's data-parallel gradient memory of a step on one rank, in --forge-dp-grad-dtype:
    one weight's local gradient (at one micro-batch per step, or at every micro-batch with
    --forge-dp-accumulation owner; with several under 'local' it is the weight's accumulation
    buffer, counted per parameter) and the block of it reduce-scattered to this rank; with
    two-pass or auto (exact) clipping at one micro-batch, every weight's reduce-scattered rows, held until the
    optimizer step. With --overlap-grad-reduce two weights' windows are in flight. Nothing at
    D = 1. Experts are reduced over their expert-data-parallel group the same way; one weight
    (dense or expert) is in flight at a time, the held rows of both add up."""
    dense = _window_elements(args, micro_batches, args.data_parallel_size,
                             largest_covered_weight(args, output_layer_covered(args), stage),
                             covered_parameters_per_rank(args, output_layer_covered(args), stage))
    experts = (0.0, 0.0)
    if args.num_experts:
        shards = args.expert_tensor_parallel_size
        experts = _window_elements(args, micro_batches, expert_data_parallel_size(args),
                                   max(_expert_weights(args)) // shards, expert_parameters_per_rank(args, stage))
    return round((max(dense[0], experts[0]) + dense[1] + experts[1]) * _window_bytes(args))


def _window_elements(args, micro_batches: int, owners: int, largest: int, covered: int) -> tuple[float, float]:
    """(elements in flight for one weight, elements held until the optimizer step) over `owners`
    data-parallel ranks sharing weights of at most `largest` and `covered` elements in all."""
    if owners == 1:
        return 0.0, 0.0
    window = largest if micro_batches == 1 or args.forge_dp_accumulation == "owner" else 0
    in_flight = 2 if args.overlap_grad_reduce else 1
    held = 0.0
    if micro_batches == 1 and args.forge_clip_grad_mode in ("two-pass", "auto") and args.clip_grad > 0:
        held = covered / owners
    return in_flight * (window + largest / owners), held


def _window_bytes(args) -> int:
    """Bytes per element of the data-parallel gradient window and of the rows it is reduce-
    scattered to (--forge-dp-grad-dtype, by default the accumulation buffer's)."""
    return FORGE_ACCUMULATION_BYTES[getattr(args, "forge_dp_grad_dtype", None) or args.forge_accumulation_dtype]



def rank_memory(args, micro_batch: int, reserve_gib: float = DEFAULT_RESERVE_GIB,
                stage: int | None = None) -> MemoryBreakdown:
    """Peak bytes on one rank for `args` (standard Megatron, or FORGE with --use-forge) at
    `micro_batch` sequences of args.seq_length tokens per micro-batch (args.global_batch_size per
    step): of pipeline stage `stage`, or of the most loaded stage."""
    _refuse_unmodelled(args)
    stages = range(args.pipeline_model_parallel_size) if stage is None else [stage]
    return max((_stage_memory(args, micro_batch, reserve_gib, s) for s in stages), key=lambda b: b.total)


def _stage_memory(args, micro_batch: int, reserve_gib: float, stage: int) -> MemoryBreakdown:
    forge = getattr(args, "use_forge", False)
    k = micro_batches_per_step(args, micro_batch)
    # Muon's matrices (the dense layers' linear weights, one state each), the other covered weights
    # (all of them without Muon; with it the output layer, which Muon leaves to Adam) and the experts.
    matrices = covered_parameters_per_rank(args, False, stage) if args.optimizer == "muon" else 0
    covered = covered_parameters_per_rank(args, output_layer_covered(args), stage) - matrices if forge else 0
    experts = expert_parameters_per_rank(args, stage)
    expert_args = replace_args(args, data_parallel_size=expert_data_parallel_size(args))
    groups = [(parameters_per_rank(args, stage) - matrices - covered - experts, standard_bytes_per_parameter(args))]
    window = forge_window_bytes(args, k, stage) if forge else 0
    for count, group_args, states in ((matrices, args, MUON_STATES), (covered, args, ADAM_STATES),
                                      (experts, expert_args, ADAM_STATES)):
        if not forge:
            groups.append((count, standard_bytes_per_parameter(group_args, states)))
            continue
        per = forge_bytes_per_parameter(group_args, k, states)
        if group_args.data_parallel_size > 1:  # FORGE's data-parallel buffers are freed at every step
            window += round(count * per.grad)
            per = dataclasses.replace(per, grad=0)
        groups.append((count, per))
    held = {field: round(sum(count * getattr(per, field) for count, per in groups))
            for field in ("weight", "grad", "master", "states")}
    activations, logits, workspace = activation_memory(args, micro_batch, stage)
    if forge and _runs_the_torch_twin(args):  # its panel workspace, at another moment than attention's
        ffn = args.moe_ffn_hidden_size if args.num_experts else args.ffn_hidden_size
        workspace = max(workspace, tiled.workspace_bytes(args.seq_length * micro_batch, (
            max(2 * ffn, args.hidden_size) // args.tensor_model_parallel_size, args.hidden_size)))
    workspace = max(workspace, muon_workspace_bytes(args, stage))
    return MemoryBreakdown(held["weight"], held["grad"], held["master"], held["states"], window, activations, logits,
                           workspace, round(reserve_gib * GIB), stage)


def _runs_the_torch_twin(args) -> bool:
    """FORGE's CPU path (the tiled torch twin) holds a panel's workspace during each covered
    weight's step; the Triton kernel keeps its tiles in registers."""
    backend = getattr(args, "forge_backend", None)
    return backend == "torch" or (backend is None and not torch.cuda.is_available())


def in_flight_micro_batches(args, micro_batch: int, stage: int) -> int:
    """Micro-batches whose activations stage `stage` holds at once under 1F1B."""
    return min(micro_batches_per_step(args, micro_batch), args.pipeline_model_parallel_size - stage)


def activation_memory(args, micro_batch: int, stage: int = 0) -> tuple[int, int, int]:
    """(activations held from forward to backward, loss stage, one layer's attention backward), bytes,
    on pipeline stage `stage`.

    Megatron's formula (Korthikanti et al. 2022, sequence parallel + selective recompute) on the
    stage's layers for one micro-batch counts 16-bit activations and, among them, 4 bytes per logit;
    its logit term moves to the loss stage (last stage only), the rest scales to the activation
    dtype and to the micro-batches in flight.
    """
    in_flight = in_flight_micro_batches(args, micro_batch, stage)
    last = stage == args.pipeline_model_parallel_size - 1
    args = replace_args(args, micro_batch_size=micro_batch, num_layers=stage_layers(args),
                        pipeline_model_parallel_size=1)
    element = 2 if args.bf16 else FP32
    logits_per_rank = args.seq_length * micro_batch * args.padded_vocab_size // args.tensor_model_parallel_size
    routed, dispatcher = routed_token_bytes(args, micro_batch, element)
    dense_args = replace_args(args, ffn_hidden_size=0) if args.num_experts else args  # experts: routed
    layers = (compute_activation_memory(dense_args, num_microbatches=1) - FP32 * logits_per_rank) * element / 2
    layers += args.num_layers * routed
    # Loss stage: the 16-bit logits, and cross entropy's fp32 copy (softmax, then gradient, in place);
    # in fp32 training they are one tensor. Without gradient-accumulation fusion the output layer's
    # backward also materializes its weight gradient (16-bit, [vocab/tp, hidden]) before DDP's hook
    # adds it into the fp32 buffer; a FORGE-covered output layer has none.
    logits = logits_per_rank * (FP32 if element == FP32 else element + FP32)
    covered = output_layer_covered(args)
    if not args.gradient_accumulation_fusion and not covered:
        logits += element * args.padded_vocab_size * args.hidden_size // args.tensor_model_parallel_size
    scores_per_layer = micro_batch * (args.num_attention_heads // args.tensor_model_parallel_size) * args.seq_length**2
    held_per_score, buffer_per_score, workspace_per_score = _attention_score_bytes(args, element)
    per_micro_batch = layers + held_per_score * scores_per_layer
    workspace = max(workspace_per_score * scores_per_layer, dispatcher)
    if fused_attention(args):
        # Fused attention keeps each layer's softmax log-sum-exp (fp32, one per query row and head)
        # for its backward, which accumulates dQ in fp32.
        rows = micro_batch * (args.num_attention_heads // args.tensor_model_parallel_size) * args.seq_length
        per_micro_batch += args.num_layers * FP32 * rows
        workspace = max(FP32 * rows * args.kv_channels, dispatcher)
    activations = in_flight * per_micro_batch + buffer_per_score * scores_per_layer
    return round(activations), round(logits if last else 0), round(workspace)


def routed_token_bytes(args, micro_batch: int, element: int) -> tuple[float, float]:
    """(held per mixture-of-experts layer, one layer's dispatcher buffers), bytes on one rank, for
    top-k routing balanced over the experts: each of the rank's tokens (s b / TP with sequence
    parallelism, gathered over ETP for the experts) reaches k experts. Held for backward: the
    permuted copy of each routed token (the experts' fc1 input), fc1's output (2 f with SwiGLU)
    and the activation's (fc2's input), f split over ETP; unfused (--no-bias-swiglu-fusion), also
    SiLU's output and the product the routing probability then weighs; the router's fp32 scores and probabilities
    and its routing map (one byte) per token and expert. Short-lived: the permuted tokens and what
    the all-to-all hands the experts (two [k tokens, h] tensors) in one layer's forward or backward."""
    if not args.num_experts:
        return 0.0, 0.0
    tokens = args.seq_length * micro_batch / args.tensor_model_parallel_size
    routed = args.moe_router_topk * tokens * args.expert_tensor_parallel_size
    ffn = args.moe_ffn_hidden_size / args.expert_tensor_parallel_size
    per_ffn = (3 + 2 * (not args.bias_swiglu_fusion)) if args.swiglu else 2
    held = routed * element * (args.hidden_size + ffn * per_ffn)
    router = tokens * args.num_experts * (2 * FP32 + 1)
    return held + router, 2 * routed * element * args.hidden_size


def fused_attention(args) -> bool:
    """Whether attention keeps O(s) statistics instead of [heads/tp, s, s] scores: Transformer
    Engine's attention, or SDPAttention (--forge-core-attention sdpa, which forge-pretrain-gpt
    applies to standard runs too; a standard Megatron-LM run would use Transformer Engine's)."""
    return args.transformer_impl != "local" or getattr(args, "forge_core_attention", "local") == "sdpa"


def _attention_score_bytes(args, element: int) -> tuple[float, float, float]:
    """Bytes per score of one layer's [heads/tp, s, s] matrix: held per micro-batch (all the
    stage's layers), held once (the raw-score buffer) and in one layer's backward. Only the local
    spec's unfused DotProductAttention materializes scores; fused attention keeps O(s) statistics
    (counted by the caller)."""
    if fused_attention(args):
        return 0.0, 0.0, 0.0
    recomputed = args.recompute_granularity == "selective" and "core_attn" in (args.recompute_modules or ["core_attn"])
    # Stored per layer: the softmax output (also the input of the matmul with V); with attention
    # dropout also its mask and output (Korthikanti's 5 bytes per score).
    per_layer = 0 if recomputed else element + (1 + element if args.attention_dropout > 0 else 0)
    raw_scores = element  # Megatron's global memory buffer for Q·Kᵀ, kept once allocated
    # Backward of one layer: gradients of the probabilities and of the scores, and under selective
    # recompute the recomputed probabilities.
    workspace = element * (2 + recomputed)
    return args.num_layers * per_layer, raw_scores, workspace


def _refuse_unmodelled(args) -> None:
    """Name the flag when a configuration falls outside the model."""
    def refuse(message: str):
        raise NotModelled(f"memory model: {message}")

    if args.context_parallel_size > 1:
        refuse("context parallelism is not modelled (FORGE refuses it); set --context-parallel-size 1")
    if args.virtual_pipeline_model_parallel_size or args.num_layers_per_virtual_pipeline_stage:
        refuse("the interleaved pipeline schedule is not modelled; drop --num-virtual-stages-per-pipeline-rank "
               "/ --num-layers-per-virtual-pipeline-stage")
    if args.num_layers % args.pipeline_model_parallel_size or args.decoder_first_pipeline_num_layers \
            or args.decoder_last_pipeline_num_layers or args.account_for_embedding_in_pipeline_split \
            or args.account_for_loss_in_pipeline_split:
        refuse("only pipeline stages of num_layers / pipeline size layers each are modelled")
    if args.num_experts and (args.moe_layer_freq != 1 or args.moe_shared_expert_intermediate_size
                             or args.moe_latent_size or args.moe_expert_capacity_factor):
        refuse("only mixtures of experts in every layer without shared experts, latent projection or capacity "
               "factor are modelled; drop --moe-layer-freq / --moe-shared-expert-intermediate-size / "
               "--moe-latent-size / --moe-expert-capacity-factor")
    if args.optimizer not in ("adam", "muon"):
        refuse(f"only Adam and Muon are modelled, not --optimizer {args.optimizer}")
    if args.optimizer == "muon" and (args.muon_scalar_optimizer != "adam" or args.num_experts
                                     or args.use_precision_aware_optimizer):
        refuse("Muon is modelled with --muon-scalar-optimizer adam, without experts or the precision-aware optimizer")
    if args.fp16:
        refuse("--fp16 is not modelled (FORGE refuses it); use --bf16")
    if args.recompute_granularity == "full":
        refuse("--recompute-granularity full is not modelled")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        refuse("Megatron's activation formula assumes --sequence-parallel with tensor parallelism")
    if args.use_precision_aware_optimizer and not args.use_distributed_optimizer:
        refuse("--use-precision-aware-optimizer needs --use-distributed-optimizer (Megatron refuses it otherwise)")
    if args.multi_latent_attention:
        refuse("multi-latent attention is not modelled")
    if args.mtp_num_layers:
        refuse("multi-token prediction is not modelled")


def max_micro_batch(memory_at: Callable[[int], MemoryBreakdown], gib: float, limit: int = 1 << 20) -> int:
    """The largest micro-batch whose peak fits in `gib` GiB, 0 if one sequence does not. Memory
    grows with the micro-batch, so doubling then bisection finds it."""
    budget = gib * GIB

    def fits(micro_batch: int) -> bool:
        return memory_at(micro_batch).total <= budget

    if not fits(1):
        return 0
    low = 1
    while fits(2 * low):
        low *= 2
        if low >= limit:
            raise ValueError(f"memory does not grow with the micro-batch (still fits at {low})")
    high = 2 * low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
