# Llama-3 8B on one node of 8 GPUs with data parallelism (pretrain_gpt.py flags): tensor parallel
# TP (default 2, with sequence parallelism), data parallel 8 / TP, launched as
#   torchrun --nproc-per-node 8 pretrain_gpt.py "${LLAMA3_8B_DP_ARGS[@]}" --use-forge ...
# FORGE's owners hold 1/DP of the covered weights' states; Megatron's distributed optimizer
# shards the other parameters' (docs/megatron.md, "Data parallelism"). The model and training
# flags are configs/llama3_8b_tp8.sh's; the flags after them override (Megatron's parser keeps the
# last value): TP, a global batch of GBS sequences (GBS / (MBS x DP) micro-batches per rank and
# step) summed in the owners' rows (--forge-dp-accumulation owner: 4 / DP bytes per covered
# parameter instead of a whole local buffer, one reduce-scatter per micro-batch instead of one per
# step), SR weights, int8 states, and exact (two-pass) clipping, which costs nothing here: the
# step's gradient is in the owners' rows until Megatron's optimizer step computes the global norm,
# and FORGE then updates from it with Megatron's clip coefficient (no second pass, no more memory).
TP=${TP:-2}
MBS=${MBS:-1}
GBS=${GBS:-64}
source "$(dirname "${BASH_SOURCE[0]}")/llama3_8b_tp8.sh"
LLAMA3_8B_DP_ARGS=(
    "${LLAMA3_8B_TP8_ARGS[@]}"
    --tensor-model-parallel-size "$TP" --global-batch-size "$GBS" --use-distributed-optimizer
    --forge-weight-store sr --forge-state-dtype int8 --forge-clip-grad-mode two-pass --forge-dp-accumulation owner
)
