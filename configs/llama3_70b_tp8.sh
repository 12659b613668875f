# Llama-3 70B, a full fine-tune on ONE node of 8 GPUs: tensor parallel 8 with sequence parallelism
# (pretrain_gpt.py flags). 8.8 B parameters per rank: standard Megatron's 18 bytes per parameter
# (158 GiB) fit no GPU; FORGE with stochastically rounded bf16 weights, int8 states and a bf16
# accumulation buffer holds 6.25 bytes per covered parameter (docs/memory.md).
# 80 layers, hidden 8192, SwiGLU ffn 28672, 64 heads / 8 query groups (kv-channels 128), RMSNorm,
# RoPE (base 500000), vocab 128256 (padded to 129024 at TP=8), untied embeddings, sequence 4096.
# Data-parallel size 1: a step is GBS / MBS micro-batches (64 sequences, 262144 tokens by default).
MBS=${MBS:-1}
GBS=${GBS:-64}
LLAMA3_70B_TP8_ARGS=(
    --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
    --num-attention-heads 64 --group-query-attention --num-query-groups 8 --kv-channels 128
    --seq-length 4096 --max-position-embeddings 8192
    --swiglu --normalization RMSNorm --norm-epsilon 1e-5 --disable-bias-linear
    --position-embedding-type rope --rotary-base 500000 --no-rope-fusion
    --untie-embeddings-and-output-weights --vocab-size 128256 --make-vocab-size-divisible-by 128
    --tensor-model-parallel-size 8 --sequence-parallel --transformer-impl local
    --bf16 --no-gradient-accumulation-fusion
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --lr-warmup-iters 100 --train-iters 5000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
    --log-interval 10 --save-interval 500 --eval-interval 500 --eval-iters 10
    --use-forge --forge-weight-store sr --forge-state-dtype int8
    --forge-accumulation-dtype bf16
    --forge-core-attention sdpa --no-create-attention-mask-in-dataloader
)
