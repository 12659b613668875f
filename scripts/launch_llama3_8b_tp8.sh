#!/usr/bin/env bash
# Llama-3 8B, TP=8 + SP, with --use-forge (configs/llama3_8b_tp8.sh) on one 8-GPU node.
#   MEGATRON_LM=/path/to/Megatron-LM (core_v0.19.0 with patches/pretrain_gpt.patch applied):
#       bash scripts/launch_llama3_8b_tp8.sh --data-path ... --tokenizer-type HuggingFaceTokenizer --tokenizer-model ...
#   without MEGATRON_LM: forge-pretrain-gpt on mock data (throughput and memory checks):
#       MBS=4 bash scripts/launch_llama3_8b_tp8.sh --train-iters 20
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/configs/llama3_8b_tp8.sh"
export CUDA_DEVICE_MAX_CONNECTIONS=1
if [ -n "${MEGATRON_LM:-}" ]; then
    cd "$MEGATRON_LM"
    exec torchrun --nproc-per-node 8 pretrain_gpt.py "${LLAMA3_8B_TP8_ARGS[@]}" "$@"
fi
exec torchrun --nproc-per-node 8 -m forge_megatron.cli.pretrain_gpt "${LLAMA3_8B_TP8_ARGS[@]}" \
    --mock-data --tokenizer-type NullTokenizer "$@"
