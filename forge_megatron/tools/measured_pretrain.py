"""forge-pretrain-gpt under LiveTensorMemory, on a machine without CUDA: Megatron's memory log
(`--log-memory-to-tensorboard`, the "memory (MB)" report) then gives live tensor bytes, the CPU
counterpart of torch.cuda.memory_allocated / max_memory_allocated. For scripts/bench_memory.py.

    python -m forge_megatron.tools.measured_pretrain <forge-pretrain-gpt flags>
"""

from __future__ import annotations

import torch

from forge_megatron.tools.benchmarking import LiveTensorMemory


def main() -> None:
    from forge_megatron.cli.pretrain_gpt import main as pretrain_main
    from forge_megatron.megatron import cpu

    if torch.cuda.is_available():  # CUDA's allocator statistics are the measurement there
        pretrain_main()
        return
    with LiveTensorMemory() as tracker:
        cpu.set_memory_counter(tracker)
        pretrain_main()


if __name__ == "__main__":
    main()
