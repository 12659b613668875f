#!/usr/bin/env bash
# The device plan's parts on the GPU machine (scripts/device_plan.py), in the order given, each
# under its own limit (its budget + 60 s for start-up and its last case). From the repository
# root on the GPU machine; results in $OUT (bench/results/device when unset): each part's JSON,
# written case by case, and one log.txt. The wheels in .whl/ (scripts/fetch_gpu_wheels.sh), when
# carried, are installed first (layer, memory and e2e need megatron-core).
#   bash scripts/device_plan.sh smoke kernel layer
#   bash scripts/device_plan.sh memory e2e tests
# docs/performance.md gives the device calls (and their time limits) that run these. Dry run on a
# CPU machine: DEVICE=cpu PYTHON=.venv/bin/python bash scripts/device_plan.sh smoke.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/device}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONPATH=$PWD
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$log" 2>&1 || { echo "installing .whl/ failed (see $log)"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv >> "$log" 2>&1
for part in "$@"; do
    budget=$(python3 -c "import ast, sys; src = open('scripts/device_plan.py').read(); \
print(ast.literal_eval(src.split('BUDGETS = ', 1)[1].split('  #', 1)[0])['$part'])") || exit 1
    echo "== $part (budget ${budget} s) $(date -u +%T)" | tee -a "$log"
    timeout --kill-after=10 $((budget + 60)) "${PYTHON:-python3}" scripts/device_plan.py "$part" --out "$out" \
        ${DEVICE:+--device "$DEVICE"} 2>&1 | tee -a "$log" \
        | grep -v -i warn | tail -n 30
    echo "== $part exit ${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$log"
done
