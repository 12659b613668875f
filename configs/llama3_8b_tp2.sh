# Llama-3 8B on two GPUs, tensor parallel 2 with sequence parallelism (pretrain_gpt.py flags): the
# regime where parameter state dominates each GPU (4 B parameters per rank), so FORGE's lean step
# buys the most micro-batch (docs/memory.md, scripts/memory_headroom.py).
# The model and training flags are configs/llama3_8b_tp8.sh's; the flags after them override
# (Megatron's parser keeps the last value): TP=2 (vocab padded to 128256), a global batch of GBS
# sequences as GBS / MBS micro-batches accumulated in FORGE's fp32 buffers (data-parallel size 1),
# SR weights and int8 states.
MBS=${MBS:-1}
GBS=${GBS:-64}
source "$(dirname "${BASH_SOURCE[0]}")/llama3_8b_tp8.sh"
LLAMA3_8B_TP2_ARGS=(
    "${LLAMA3_8B_TP8_ARGS[@]}"
    --tensor-model-parallel-size 2 --global-batch-size "$GBS"
    --forge-weight-store sr --forge-state-dtype int8
)
