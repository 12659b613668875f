#!/usr/bin/env bash
# Everything FORGE checks on a GPU, in one command (run from the repository root on the GPU
# machine, with .whl/ from scripts/fetch_gpu_wheels.sh carried along). Results go to $OUT (or
# bench/results/gpu when $OUT is unset):
#   1. the kernel, rule, precision, accumulation, launch and property tests, compiled for the GPU;
#   2. the kernel benchmark (bench_kernel.py): FORGE vs cuBLAS wgrad + fused AdamW, and peers;
#   3. measured peak memory against the model (bench_memory.py);
#   4. one transformer layer (bench_layer.py): FORGE's backward vs backward + optimizer step;
#   5. end to end (bench_e2e.py): a ~1B GPT, iteration time and peak memory per micro-batch.
#   PART=tests|kernel|memory|layer|e2e runs one part (each fits a 10-minute device call).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
    export PYTHONPATH=$PWD
fi
part=${PART:-all}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; } \
    2>&1 | tee "$out/device.txt"
if [ "$part" = all ] || [ "$part" = tests ]; then
    # -o addopts=: no pytest-xdist on the GPU machine (one GPU: the files run one after the other).
    python3 -m pytest -q -x -p no:cacheprovider -o addopts= tests/test_fused_update.py tests/test_precision.py \
        tests/test_rules.py tests/test_errors.py tests/test_numerics.py tests/test_accumulation.py \
        tests/test_launches.py tests/test_properties.py 2>&1 | tee "$out/tests.log" | tail -5
fi
if [ "$part" = all ] || [ "$part" = kernel ]; then
    python3 scripts/bench_kernel.py --out "$out/kernel.json" 2>&1 | tee "$out/kernel.log" | tail -40
fi
if [ "$part" = all ] || [ "$part" = memory ]; then
    python3 scripts/bench_memory.py --out "$out/memory.json" 2>&1 | tee "$out/memory.log" | tail -30
fi
if [ "$part" = all ] || [ "$part" = layer ]; then
    python3 scripts/bench_layer.py --out "$out/layer.json" 2>&1 | tee "$out/layer.log" | tail -5
    # fp32: the two layers' first updates agree to the wgrad GEMMs' summation order (IEEE fp32 dots).
    python3 scripts/bench_layer.py --dtype fp32 --seq-length 1024 --out "$out/layer_fp32.json" 2>&1 \
        | tee "$out/layer_fp32.log" | tail -5
fi
if [ "$part" = all ] || [ "$part" = e2e ]; then
    python3 scripts/bench_e2e.py --out "$out/e2e.json" 2>&1 | tee "$out/e2e.log" | tail -20
fi
