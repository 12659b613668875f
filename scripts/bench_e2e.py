"""End to end on one GPU: a ~1B GPT (16 layers, hidden 2048, SwiGLU ffn 5632, 16 heads, sequence
2048, vocabulary 32000) trained with forge-pretrain-gpt (Megatron's loop) on mock data, with and
without --use-forge, at micro-batch 1, 2, 4, ... until it no longer fits: median iteration time
(iterations after the first two, from Megatron's log) and peak memory (Megatron's memory log:
torch.cuda.max_memory_allocated) of each.

    python scripts/bench_e2e.py --out bench/results/e2e_h100.json
"""

from __future__ import annotations

import argparse

import torch

from forge_megatron.tools.benchmarking import device_name, median_iteration_ms, pretrain_records, write_report

MODEL = ("--num-layers 16 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 --seq-length 2048 "
         "--max-position-embeddings 2048 --swiglu --normalization RMSNorm --position-embedding-type rope --no-rope-fusion "
         "--disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 32000 --bf16 --transformer-impl local "
         "--no-persist-layer-norm "
         "--no-gradient-accumulation-fusion --lr 1e-4 --lr-decay-style constant --clip-grad 1.0 --attention-dropout 0 "
         "--hidden-dropout 0 --eval-iters 1 --eval-interval 100000 --mock-data --tokenizer-type NullTokenizer").split()
SMOKE = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 32 "
         "--max-position-embeddings 32 --swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 256 --transformer-impl local "
         "--no-rope-fusion --no-persist-layer-norm --eval-iters 1 --eval-interval 100000 "
         "--no-gradient-accumulation-fusion --lr 1e-4 --lr-decay-style constant --clip-grad 1.0 "
         "--mock-data --tokenizer-type NullTokenizer").split()
RUNS = {"standard": [], "forge-master": ["--use-forge"],
        "forge-sr-int8": ["--use-forge", "--forge-weight-store", "sr",
                          "--forge-state-dtype", "int8"]}


def run(model: list[str], flags: list[str], micro_batch: int, iters: int) -> dict | None:
    records = pretrain_records([*model, *flags, "--train-iters", str(iters), "--micro-batch-size", str(micro_batch),
                                "--global-batch-size", str(micro_batch)])
    if records is None:
        return None
    peaks = [r["mem-max-allocated-bytes"] for r in records if "mem-max-allocated-bytes" in r]
    return {"iteration_ms": median_iteration_ms(records, skip=2), "peak_bytes": max(peaks) if peaks and max(peaks) else None,
            "final_loss": records[-1]["lm loss"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--max-micro-batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on any device, micro-batch 1")
    parser.add_argument("--core-attention", default="sdpa", choices=("sdpa", "local"),
                        help="--forge-core-attention for every run, standard ones included (default: torch's fused "
                             "attention, as a GPU user would run; local materializes the s x s scores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_e2e.py needs a GPU (or --smoke)")
    model = [*(SMOKE if args.smoke else MODEL), "--forge-core-attention", args.core_attention]
    max_micro_batch = 1 if args.smoke else args.max_micro_batch
    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"device": device, "torch": torch.__version__, "model": model, "runs": {}}
    for name, flags in RUNS.items():
        report["runs"][name] = {}
        b = 1
        while b <= max_micro_batch:
            result = run(model, flags, b, args.iters)
            report["runs"][name][b] = result
            peak = "" if result is None or result["peak_bytes"] is None else f", peak {result['peak_bytes'] / 2**30:.1f} GiB"
            print(f"{name:14s} mbs {b:3d}: " + ("does not fit" if result is None else
                  f"{result['iteration_ms']:.1f} ms/iter{peak}"), flush=True)
            if result is None:
                break
            b *= 2
    write_report(args.out, report)


if __name__ == "__main__":
    main()
