# A tiny GPT for CPU: 4 layers, hidden 128, SwiGLU, RoPE, RMSNorm, byte-level on the Python standard
# library's source (forge-stdlib-dataset writes it as a Megatron indexed dataset). Sourced by
# scripts/train_tiny_cpu.sh; Megatron-LM pretrain_gpt.py flags. The --no-*-fusion flags turn off
# kernels that need Transformer Engine or CUDA. MBS and GBS (default 8 and 8) set the micro and global batch.
TINY_DATA=${TINY_DATA:-data/stdlib_text_document}
TINY_GPT_ARGS=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128
    --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
    --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 128
    --transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --no-persist-layer-norm
    --no-masked-softmax-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion
    --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
    --micro-batch-size "${MBS:-8}" --global-batch-size "${GBS:-8}"
    --train-iters 300 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 30
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --data-path "$TINY_DATA" --split 90,10,0 --tokenizer-type NullTokenizer --vocab-size 257
    --log-interval 25 --log-throughput --eval-interval 100 --eval-iters 4 --seed 1234
)
