#!/usr/bin/env bash
# A Hugging Face fine-tune with FORGE, end to end on CPU, in one command (docs/finetune.md):
#   bash scripts/finetune_tiny_cpu.sh           # one process
#   TP=2 bash scripts/finetune_tiny_cpu.sh      # tensor parallel 2 + sequence parallel, 2 gloo ranks
#   BF16=1 bash scripts/finetune_tiny_cpu.sh    # fine-tune in bf16 from the fp32 import
# 1. a tiny Llama with random weights (transformers) and a byte-level BPE tokenizer trained on the corpus
#    (tokenizers), saved together as a Hugging Face directory; the corpus: Python stdlib modules as JSONL;
# 2. forge-hf-import; 3. forge-hf-dataset; 4. forge-pretrain-gpt --finetune --use-forge;
# 5. forge-hf-export; 6. transformers loads the export and generates, its weights moved away from the
#    import and its logits equal those of the fine-tune's last checkpoint (scripts/finetune_tiny_cpu.py check).
# Everything goes to WORK (default data/finetune_tiny_cpu, emptied first). PYTHON: the interpreter
# (default .venv/bin/python). Extra flags go to forge-pretrain-gpt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TP=${TP:-1}
WORK=${WORK:-data/finetune_tiny_cpu}
forge() { local module=$1; shift; "$PY" -m "forge_megatron.cli.$module" "$@"; }   # forge-hf-import is hf_import
step() { echo "== $* (at ${SECONDS} s)"; }
rm -rf "$WORK" && mkdir -p "$WORK"

step "1. a tiny Llama, its tokenizer and the corpus"
"$PY" scripts/finetune_tiny_cpu.py make "$WORK"

step "2. forge-hf-import"
forge hf_import "$WORK/hf" "$WORK/imported"
read -ra MODEL_FLAGS < "$WORK/imported/model_flags.txt"   # the model's flags: every run on the checkpoint passes them

step "3. forge-hf-dataset"
forge hf_dataset "$WORK/corpus" --tokenizer-model "$WORK/hf" "$WORK/corpus.jsonl"

step "4. forge-pretrain-gpt --finetune --use-forge (TP=$TP)"
FINETUNE=(
    --load "$WORK/imported" --finetune --save "$WORK/finetuned" --save-interval 30
    --use-forge
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/hf"
    --data-path "$WORK/corpus" --split 90,10,0 --data-cache-path "$WORK/cache"
    --seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters 30
    --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 3 --weight-decay 0.1 --clip-grad 1.0
    --log-interval 5 --eval-interval 15 --eval-iters 2
)
[ "${BF16:-0}" = 0 ] || FINETUNE+=(--bf16)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( TP > 1 ? 1 : 2 ))}
if [ "$TP" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$TP" -m forge_megatron.cli.pretrain_gpt \
        "${MODEL_FLAGS[@]}" "${FINETUNE[@]}" --tensor-model-parallel-size "$TP" --sequence-parallel "$@"
else
    forge pretrain_gpt "${MODEL_FLAGS[@]}" "${FINETUNE[@]}" "$@"
fi

step "5. forge-hf-export"
forge hf_export "$WORK/finetuned" "$WORK/export" --hf-config-from "$WORK/hf"

step "6. transformers loads the export"
"$PY" scripts/finetune_tiny_cpu.py check "$WORK"
echo "fine-tuned, exported and checked in ${SECONDS} s: $WORK"
