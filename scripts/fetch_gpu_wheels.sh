#!/usr/bin/env bash
# The wheels the GPU machine lacks (it has torch 2.11, triton 3.6, transformers, hypothesis, pytest,
# tensorboard, pybind11, but no megatron-core and no package index), into .whl/ (git-ignored) for
# scripts/device_plan.sh. Pinned, one version of each (two versions of a package stop the install):
# .whl/ is emptied first. PEERS=1 adds the memory-lean optimizers the kernel part compares with.
#   bash scripts/fetch_gpu_wheels.sh            # megatron-core and emerging-optimizers (every part)
#   PEERS=1 bash scripts/fetch_gpu_wheels.sh    # + torchao, bitsandbytes, flashoptim
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# megatron-core requires torch, numpy, packaging (all on the machine); emerging-optimizers (and its
# absl-py) is FORGE's own dependency: the core's rules import Muon's Newton-Schulz from it.
wheels=(megatron-core==0.19.2 emerging-optimizers==0.3.0 absl-py==2.5.1)
if [ "${PEERS:-0}" = 1 ]; then
    wheels+=(torchao==0.18.0 bitsandbytes==0.50.2 flashoptim==0.1.4)
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "${wheels[@]}"
ls -la .whl
