"""Measured peak memory of forward + backward + step against the memory model (GPU).

One TP=8 rank of Llama-3 8B is emulated on one GPU: the per-rank shapes at TP=1 (hidden 4096,
4 heads and 1 query group of 128 channels, SwiGLU ffn 1792, vocabulary 129024 / 8 = 16128), so
qkv is [768, 4096], proj [4096, 512], fc1 [3584, 4096], fc2 [4096, 1792] as on the real rank. Without
sequence parallelism the norm and residual activations are whole-sequence here; the model is
evaluated on the same emulated configuration, so measurement and model compare like with like.

For standard Megatron and each FORGE regime: the peak of torch.cuda.max_memory_allocated over a few
steps of forge-pretrain-gpt (mock data) at micro-batch 1, its model value (reserve 0: the CUDA
context is not in max_memory_allocated) and the relative error; then the largest micro-batch that
runs, found by doubling, against the model's answer for the GPU's memory.

    python scripts/bench_memory.py --out bench/results/memory_h100.json [--layers 8] [--seq-length 4096]
"""

from __future__ import annotations

import argparse

import torch

from forge_megatron import memory
from forge_megatron.benchmarking import pretrain_records, write_report
from forge_megatron.training import add_forge_args

REGIMES = {
    "standard": [],
    "forge-master": ["--use-forge"],
    "forge-sr": ["--use-forge", "--forge-weight-store", "sr"],
    "forge-sr-int8": ["--use-forge", "--forge-weight-store", "sr", "--forge-state-dtype", "int8"],
}


def emulated_rank(layers: int, seq: int) -> list[str]:
    return ("--num-layers {} --hidden-size 4096 --ffn-hidden-size 1792 --num-attention-heads 4 --group-query-attention "
            "--num-query-groups 1 --kv-channels 128 --seq-length {} --max-position-embeddings {} --swiglu "
            "--normalization RMSNorm --position-embedding-type rope --no-rope-fusion --disable-bias-linear "
            "--untie-embeddings-and-output-weights --vocab-size 16128 --make-vocab-size-divisible-by 128 --bf16 "
            "--transformer-impl local --no-gradient-accumulation-fusion --lr 1e-4 --lr-decay-style constant "
            "--train-iters 4 --clip-grad 0 --attention-dropout 0 --hidden-dropout 0 --log-interval 1 "
            "--mock-data --tokenizer-type NullTokenizer").format(layers, seq, seq).split()


def measure(argv: list[str], micro_batch: int) -> int | None:
    """Peak bytes over the run's steps, or None if it did not fit (or failed)."""
    records = pretrain_records([*argv, "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch)])
    return None if records is None else max(r["max_memory_allocated"] for r in records)


def compare(base: list[str], measure_fn, gib: float, max_micro_batch: int) -> dict:
    """Per regime: measured and modelled peak at micro-batch 1, their relative error, the largest
    power-of-two micro-batch that ran and the model's largest micro-batch for `gib` GiB."""
    out = {}
    for name, flags in REGIMES.items():
        model_args = memory.parse_megatron_args(base + flags, extra_args_provider=add_forge_args)
        model_peak = memory.rank_memory(model_args, 1, reserve_gib=0).total
        measured = measure_fn(base + flags, 1)
        largest, b = 0, 1
        while b <= max_micro_batch and measure_fn(base + flags, b) is not None:
            largest, b = b, 2 * b
        out[name] = {"measured_peak_bytes_mb1": measured, "model_peak_bytes_mb1": model_peak,
                     "relative_error": None if measured is None else model_peak / measured - 1,
                     "largest_power_of_two_micro_batch": largest,
                     "model_max_micro_batch": memory.max_micro_batch(
                         lambda m, model_args=model_args: memory.rank_memory(model_args, m), gib)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--max-micro-batch", type=int, default=64)
    parser.add_argument("--core-attention", default="sdpa", choices=("sdpa", "local"),
                        help="--forge-core-attention for every regime, standard included (the model follows it)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_memory.py measures GPU memory; run it on a GPU (the model alone: memory_headroom.py)")
    gib = torch.cuda.get_device_properties(0).total_memory / memory.GIB
    base = [*emulated_rank(args.layers, args.seq_length), "--forge-core-attention", args.core_attention]
    regimes = compare(base, measure, gib, args.max_micro_batch)
    report = {"device": torch.cuda.get_device_name(), "gpu_gib": gib, "layers": args.layers,
              "seq_length": args.seq_length, "core_attention": args.core_attention, "torch": torch.__version__,
              "regimes": regimes}
    for name, entry in regimes.items():
        measured = entry["measured_peak_bytes_mb1"]
        print(f"{name:14s} measured {measured / memory.GIB if measured else float('nan'):.2f} GiB  model "
              f"{entry['model_peak_bytes_mb1'] / memory.GIB:.2f} GiB  error "
              f"{100 * entry['relative_error'] if measured else float('nan'):+.1f}%  largest mbs (2^k) "
              f"{entry['largest_power_of_two_micro_batch']}  model max mbs {entry['model_max_micro_batch']}", flush=True)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
