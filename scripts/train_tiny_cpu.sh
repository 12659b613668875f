#!/usr/bin/env bash
# The main job: a tiny GPT trained with --use-forge on CPU in Megatron's own loop (configs/tiny_gpt_cpu.sh).
#   bash scripts/train_tiny_cpu.sh                 # one process, TP=1
#   TP=2 bash scripts/train_tiny_cpu.sh            # torchrun, 2 gloo ranks, TP=2 + sequence parallel
#   bash scripts/train_tiny_cpu.sh --train-iters 50 --forge-clip-grad-mode two-pass   # extra flags are passed on
set -euo pipefail
cd "$(dirname "$0")/.."
source configs/tiny_gpt_cpu.sh
.venv/bin/forge-stdlib-dataset "$TINY_DATA" >/dev/null   # written once: data/stdlib_text_document.{bin,idx}
TP=${TP:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((TP > 1 ? 1 : 2))}
if [ "$TP" -gt 1 ]; then
    exec .venv/bin/torchrun --nproc-per-node "$TP" .venv/bin/forge-pretrain-gpt "${TINY_GPT_ARGS[@]}" \
        --tensor-model-parallel-size "$TP" --sequence-parallel --use-forge "$@"
fi
exec .venv/bin/forge-pretrain-gpt "${TINY_GPT_ARGS[@]}" --use-forge "$@"
