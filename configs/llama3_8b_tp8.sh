# Llama-3 8B on one node of 8 GPUs, tensor parallel 8 with sequence parallelism (pretrain_gpt.py flags).
# 32 layers, hidden 4096, SwiGLU ffn 14336, 32 heads / 8 query groups (kv-channels 128), RMSNorm,
# RoPE (base 500000), vocab 128256 (padded to 129024 at TP=8), untied embeddings, sequence 8192.
# Data-parallel size 1; one micro-batch per step here (global batch = micro batch; for accumulation
# see configs/llama3_8b_tp2.sh).
MBS=${MBS:-1}
LLAMA3_8B_TP8_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
    --seq-length 8192 --max-position-embeddings 8192
    --swiglu --normalization RMSNorm --norm-epsilon 1e-5 --disable-bias-linear
    --position-embedding-type rope --rotary-base 500000 --no-rope-fusion
    --untie-embeddings-and-output-weights --vocab-size 128256 --make-vocab-size-divisible-by 128
    --tensor-model-parallel-size 8 --sequence-parallel --transformer-impl local
    --bf16 --no-gradient-accumulation-fusion
    --micro-batch-size "$MBS" --global-batch-size "$MBS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --train-iters 100000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0
    --log-interval 10 --save-interval 1000 --eval-interval 1000 --eval-iters 10
    --use-forge
    --forge-core-attention sdpa --no-create-attention-mask-in-dataloader
)
