#!/usr/bin/env bash
# The main job: a tiny GPT trained with --use-forge on CPU in Megatron's own loop (configs/tiny_gpt_cpu.sh),
# in any layout of tensor (TP), pipeline (PP) and data (DP) parallelism: TP*PP*DP gloo ranks under torchrun.
#   bash scripts/train_tiny_cpu.sh                     # one process
#   TP=2 bash scripts/train_tiny_cpu.sh                # tensor parallel 2 + sequence parallel
#   PP=2 bash scripts/train_tiny_cpu.sh                # pipeline parallel 2 (1F1B over 2 micro-batches of 4)
#   DP=2 bash scripts/train_tiny_cpu.sh                # data parallel 2 (each rank a micro-batch of 4)
#   TP=2 PP=2 DP=2 bash scripts/train_tiny_cpu.sh      # all three: 8 ranks
#   bash scripts/train_tiny_cpu.sh --train-iters 50 --forge-clip-grad-mode two-pass   # extra flags are passed on
# Batch: GBS sequences per step (default 8, the config's), split into micro-batches of MBS per data-parallel
# rank (default GBS / (DP*PP), else GBS / DP: several micro-batches feed the pipeline); GBS must be a
# multiple of MBS*DP, for training and for Megatron's evaluation alike. --log-interval (train iters / 12)
# and --lr-warmup-iters (train iters / 10) follow --train-iters unless given. PYTHON: the interpreter
# (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TP=${TP:-1} PP=${PP:-1} DP=${DP:-1}
GBS=${GBS:-8}
fail() { echo "train_tiny_cpu.sh: error: $*" >&2; exit 2; }
for n in "$TP" "$PP" "$DP" "$GBS" "${MBS:-1}"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || fail "TP, PP, DP, GBS and MBS are positive integers (got '$n')"
done
(( GBS % DP == 0 )) || fail "GBS=$GBS is not a multiple of DP=$DP: each data-parallel rank takes whole micro-batches"
if [ -z "${MBS:-}" ]; then
    MBS=$(( GBS % (DP * PP) == 0 ? GBS / (DP * PP) : GBS / DP ))
fi
(( GBS % (MBS * DP) == 0 )) || fail "GBS=$GBS is not a multiple of MBS*DP=$((MBS * DP)) (Megatron's training and \
evaluation batches): set MBS to a divisor of $((GBS / DP)), or GBS"
export MBS GBS

value_of() {  # the value of flag $1 among the remaining arguments (the last one wins, as in argparse), or nothing
    local flag=$1 value=
    shift
    while [ $# -gt 0 ]; do
        case "$1" in
            "$flag") value=${2:-} ;;
            "$flag"=*) value=${1#*=} ;;
        esac
        shift
    done
    echo "$value"
}
source configs/tiny_gpt_cpu.sh
iters=$(value_of --train-iters "${TINY_GPT_ARGS[@]}" "$@")
derived=()
[ -n "$(value_of --log-interval "$@")" ] || derived+=(--log-interval $(( iters / 12 > 1 ? iters / 12 : 1 )))
[ -n "$(value_of --lr-warmup-iters "$@")" ] || derived+=(--lr-warmup-iters $(( iters / 10 > 1 ? iters / 10 : 1 )))

"$PY" -m forge_megatron.megatron.data "$TINY_DATA" >/dev/null   # written once: data/stdlib_text_document.{bin,idx}
layout=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
[ "$TP" -eq 1 ] || layout+=(--sequence-parallel)
world=$(( TP * PP * DP ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( world > 1 ? 1 : 2 ))}
if [ "$world" -gt 1 ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$world" -m forge_megatron.cli.pretrain_gpt \
        "${TINY_GPT_ARGS[@]}" "${layout[@]}" "${derived[@]}" --use-forge "$@"
fi
exec "$PY" -m forge_megatron.cli.pretrain_gpt "${TINY_GPT_ARGS[@]}" "${derived[@]}" --use-forge "$@"
