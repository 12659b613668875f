#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (it has torch and triton but no package index) into
# .whl/ (git-ignored), for scripts/gpu_bench.sh: megatron-core, and the memory-lean peers
# (torchao, bitsandbytes, FlashOptim), and hypothesis (with its dependencies) for the property tests.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl megatron-core==0.19.2 torchao==0.18.0 bitsandbytes flashoptim==0.1.4 hypothesis sortedcontainers attrs
ls -la .whl
