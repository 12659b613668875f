# Llama-3 8B on two GPUs, tensor parallel 2 with sequence parallelism (pretrain_gpt.py flags): the
# regime where parameter state dominates each GPU (4 B parameters per rank), so FORGE's lean step
# buys the most micro-batch (docs/memory.md, scripts/memory_headroom.py).
# 32 layers, hidden 4096, SwiGLU ffn 14336, 32 heads / 8 query groups (kv-channels 128), RMSNorm,
# RoPE (base 500000), vocab 128256 (padded to 128512 at TP=2), untied embeddings, sequence 8192.
# Data-parallel size 1: a step is GBS / MBS micro-batches, accumulated in FORGE's fp32 buffers.
MBS=${MBS:-1}
GBS=${GBS:-64}
LLAMA3_8B_TP2_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
    --seq-length 8192 --max-position-embeddings 8192
    --swiglu --normalization RMSNorm --norm-epsilon 1e-5 --disable-bias-linear
    --position-embedding-type rope --rotary-base 500000 --no-rope-fusion
    --untie-embeddings-and-output-weights --vocab-size 128256 --make-vocab-size-divisible-by 128
    --tensor-model-parallel-size 2 --sequence-parallel --transformer-impl local
    --bf16 --no-gradient-accumulation-fusion
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --train-iters 100000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
    --log-interval 10 --save-interval 1000 --eval-interval 1000 --eval-iters 10
    --use-forge --forge-cover-output-layer --forge-weight-store sr --forge-state-dtype int8
    --forge-core-attention sdpa --no-create-attention-mask-in-dataloader
)
