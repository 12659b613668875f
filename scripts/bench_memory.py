"""Measured peak memory of forward + backward + step against the memory model.

One TP=8 rank of Llama-3 8B is emulated on one GPU: the per-rank shapes at TP=1 (hidden 4096,
4 heads and 1 query group of 128 channels, SwiGLU ffn 1792, vocabulary 129024 / 8 = 16128), so
qkv is [768, 4096], proj [4096, 512], fc1 [3584, 4096], fc2 [4096, 1792] as on the real rank. Without
sequence parallelism the norm and residual activations are whole-sequence here; the model is
evaluated on the same emulated configuration, so measurement and model compare like with like.

For standard Megatron and each FORGE regime: the peak of torch.cuda.max_memory_allocated over a few
steps of forge-pretrain-gpt (Megatron's loop and optimizer, mock data; Megatron's own memory log)
at micro-batch 1 and 2, its model value (reserve 0: the CUDA context is not in
max_memory_allocated) and the relative error; then the largest micro-batch that runs, found by
doubling, against the model's answer for the GPU's memory.

On CPU (the torch backend) the same runs are measured with LiveTensorMemory (forge_megatron.tools.
measured_pretrain): the peak bytes of live tensor storage, which is what max_memory_allocated counts
on a GPU minus the caching allocator's rounding. There is no out-of-memory on CPU to search for, so
the micro-batch search is skipped.

    python scripts/bench_memory.py --out bench/results/memory_h100.json [--layers 8] [--seq-length 4096]
    python scripts/bench_memory.py --layers 2 --seq-length 512 --out bench/results/memory_cpu.json   # CPU
"""

from __future__ import annotations

import argparse

import torch

from forge_megatron.megatron.args import add_forge_args
from forge_megatron.tools import memory
from forge_megatron.tools.benchmarking import device_name, pretrain_records, write_report

REGIMES = {
    "standard": [],
    "forge-master": ["--use-forge"],
    "forge-sr": ["--use-forge", "--forge-weight-store", "sr"],
    "forge-sr-int8": ["--use-forge", "--forge-weight-store", "sr", "--forge-state-dtype", "int8"],
}


def emulated_rank(layers: int, seq: int, hidden: int = 4096, ffn: int = 1792, kv_channels: int = 128,
                  vocab: int = 16128) -> list[str]:
    """forge-pretrain-gpt flags for one TP=8 rank of Llama-3 8B at TP=1 (4 heads, 1 query group);
    the size arguments shrink it for --smoke."""
    return (f"--num-layers {layers} --hidden-size {hidden} --ffn-hidden-size {ffn} --num-attention-heads 4 "
            f"--group-query-attention --num-query-groups 1 --kv-channels {kv_channels} --seq-length {seq} "
            f"--max-position-embeddings {seq} --swiglu --normalization RMSNorm --position-embedding-type rope "
            "--no-rope-fusion --no-persist-layer-norm --disable-bias-linear --untie-embeddings-and-output-weights "
            f"--vocab-size {vocab} --make-vocab-size-divisible-by 128 --bf16 --transformer-impl local "
            "--no-gradient-accumulation-fusion --lr 1e-4 --lr-decay-style constant --train-iters 4 --clip-grad 0 "
            "--attention-dropout 0 --hidden-dropout 0 --eval-iters 1 --eval-interval 100000 --mock-data "
            "--tokenizer-type NullTokenizer"
            ).split()


SMOKE = emulated_rank(1, 64, hidden=512, ffn=1024, kv_channels=128, vocab=1024)


def _batch(argv: list[str], micro_batch: int) -> list[str]:
    return [*argv, "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch)]


def measure(argv: list[str], micro_batch: int) -> int | None:
    """The run's peak allocated bytes from Megatron's memory log (max_memory_allocated on a GPU,
    live tensor bytes under LiveTensorMemory on CPU), or None if it did not fit."""
    records = pretrain_records(_batch(argv, micro_batch), measure_cpu_memory=not torch.cuda.is_available())
    peaks = [] if records is None else [r["mem-max-allocated-bytes"] for r in records if "mem-max-allocated-bytes" in r]
    return int(max(peaks)) if peaks else None


def compare(base: list[str], measure_fn, gib: float | None, max_micro_batch: int) -> dict:
    """Per regime: measured and modelled peak at micro-batch 1 and 2, their relative errors, the
    largest power-of-two micro-batch that ran (up to `max_micro_batch`; 0 skips the search) and the
    model's largest micro-batch for `gib` GiB (None: not asked)."""
    out = {}
    for name, flags in REGIMES.items():
        model_args = memory.parse_megatron_args(base + flags, extra_args_provider=add_forge_args)
        entry = {}
        for b in (1, 2):
            measured, modelled = measure_fn(base + flags, b), memory.rank_memory(model_args, b, reserve_gib=0).total
            entry[f"measured_peak_bytes_mb{b}"], entry[f"model_peak_bytes_mb{b}"] = measured, modelled
            entry[f"relative_error_mb{b}"] = None if measured is None else modelled / measured - 1
        largest, b = 0, 1
        while b <= max_micro_batch and measure_fn(base + flags, b) is not None:
            largest, b = b, 2 * b
        out[name] = {**entry, "largest_power_of_two_micro_batch": largest if max_micro_batch else None,
                     "model_max_micro_batch": None if gib is None else memory.max_micro_batch(
                         lambda m, model_args=model_args: memory.rank_memory(model_args, m), gib)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--max-micro-batch", type=int, default=64, help="GPU only: the doubling search's limit")
    parser.add_argument("--core-attention", default="sdpa", choices=("sdpa", "local"),
                        help="--forge-core-attention for every regime, standard included (the model follows it)")
    parser.add_argument("--iters", type=int, default=4, help="training steps per run")
    parser.add_argument("--smoke", action="store_true", help="a tiny model instead of the emulated 8B rank")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    gib = torch.cuda.get_device_properties(0).total_memory / memory.GIB if gpu else None
    base = [*(SMOKE if args.smoke else emulated_rank(args.layers, args.seq_length)), "--forge-core-attention",
            args.core_attention, "--train-iters", str(args.iters)]
    regimes = compare(base, measure, gib, args.max_micro_batch if gpu else 0)
    report = {"device": device_name(torch.device("cuda" if gpu else "cpu")), "gpu_gib": gib,
              "measure": "torch.cuda.max_memory_allocated" if gpu else "LiveTensorMemory (live tensor bytes, CPU)",
              "flags": base, "torch": torch.__version__,
              "regimes": regimes}
    for name, entry in regimes.items():
        line = f"{name:14s}"
        for b in (1, 2):
            measured = entry[f"measured_peak_bytes_mb{b}"]
            line += (f"  mbs {b}: measured {measured / 2**20 if measured else float('nan'):.1f} MiB, model "
                     f"{entry[f'model_peak_bytes_mb{b}'] / 2**20:.1f} MiB "
                     f"({100 * entry[f'relative_error_mb{b}'] if measured else float('nan'):+.1f}%)")
        print(f"{line}  largest mbs (2^k) {entry['largest_power_of_two_micro_batch']}  model max mbs "
              f"{entry['model_max_micro_batch']}", flush=True)
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
