# Qwen3-30B-A3B, a full fine-tune on ONE node of 8 GPUs: expert parallel 8 (16 of the 128 experts per
# rank), data parallel 8 for the dense weights (pretrain_gpt.py flags), launched as
#   torchrun --nproc-per-node 8 pretrain_gpt.py "${QWEN3_30B_A3B_EP8_ARGS[@]}" $(cat $IMPORTED/model_flags.txt) ...
# 30.5 B parameters, 29.0 B of them in the routed experts; each rank holds its 16 experts' 3.6 B
# parameters whole (expert-data-parallel size 1) and 1/8 of the dense weights' optimizer state.
# Standard Megatron's distributed optimizer cannot shard the experts' fp32 gradient, master and
# states (16 bytes per expert parameter on every rank); FORGE (stochastically rounded bf16 weights,
# int8 states, a bf16 accumulation buffer) holds 2 + 2.25 + 2 of them (docs/memory.md, "Mixtures of
# experts": the memory model's numbers, not measurements).
# 48 layers, hidden 2048, 32 heads / 4 query groups (kv-channels 128), q/k RMSNorm, 128 experts of
# SwiGLU 768, top-8 (renormalized: Megatron's default softmax router), vocab 151936, untied embeddings,
# RoPE base 1e6, sequence 4096. A step is GBS / (MBS x 8) micro-batches per rank (64 sequences).
MBS=${MBS:-1}
GBS=${GBS:-64}
QWEN3_30B_A3B_EP8_ARGS=(
    --num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144
    --num-attention-heads 32 --group-query-attention --num-query-groups 4 --kv-channels 128 --qk-layernorm
    --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768 --moe-router-score-function softmax
    --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
    --expert-model-parallel-size 8
    --seq-length 4096 --max-position-embeddings 40960
    --swiglu --normalization RMSNorm --norm-epsilon 1e-6 --disable-bias-linear
    --position-embedding-type rope --rotary-base 1000000 --no-rope-fusion
    --untie-embeddings-and-output-weights --vocab-size 151936 --make-vocab-size-divisible-by 128
    --transformer-impl local --bf16 --no-gradient-accumulation-fusion --use-distributed-optimizer
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 100 --train-iters 5000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
    --log-interval 10 --save-interval 500 --eval-interval 500 --eval-iters 10
    --use-forge --forge-weight-store sr --forge-state-dtype int8
    --forge-accumulation-dtype bf16
    --forge-core-attention sdpa --no-create-attention-mask-in-dataloader
)
