"""End to end on one GPU: a ~1B GPT (16 layers, hidden 2048, SwiGLU ffn 5632, 16 heads, sequence
2048, vocabulary 32000) trained with forge-pretrain-gpt (Megatron's loop) on mock data, with and
without --use-forge, at the micro-batches given (bounded: 1, 2, 4, ... up to --max-micro-batch by
default), each run's micro-batches in turn until one does not fit: median iteration time
(iterations after the first two, from Megatron's log) and peak memory (Megatron's memory log:
torch.cuda.max_memory_allocated) of each. A run that fails for another reason than device memory
is recorded as an error, never as "does not fit". The standard baseline here is megatron-core's
local layers and torch's AdamW, without Transformer Engine or Apex (not installed on the device):
every ratio in the report carries that note. The report is written after every run;
`--budget-s` stops starting runs after that many seconds.

    python scripts/bench_e2e.py --micro-batches 1 4 16 --budget-s 120 --out bench/results/e2e_h200.json
"""

from __future__ import annotations

import argparse
import time

import torch

from forge_megatron.tools.benchmarking import environment, median_iteration_ms, pretrain_records, write_report

MODEL = ("--num-layers 16 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 --seq-length 2048 "
         "--max-position-embeddings 2048 --swiglu --normalization RMSNorm --position-embedding-type rope --no-rope-fusion "
         "--disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 32000 --bf16 --transformer-impl local "
         "--no-persist-layer-norm "
         "--no-gradient-accumulation-fusion --lr 1e-4 --lr-decay-style constant --clip-grad 1.0 --attention-dropout 0 "
         "--hidden-dropout 0 --eval-iters 1 --eval-interval 100000 --mock-data --tokenizer-type NullTokenizer").split()
SMOKE = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 32 "
         "--max-position-embeddings 32 --swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 256 --bf16 --transformer-impl local "
         "--no-rope-fusion --no-persist-layer-norm --eval-iters 1 --eval-interval 100000 "
         "--no-gradient-accumulation-fusion --lr 1e-4 --lr-decay-style constant --clip-grad 1.0 "
         "--mock-data --tokenizer-type NullTokenizer").split()
BASELINE_NOTE = ("standard = megatron-core local layers + torch AdamW (no Transformer Engine, no Apex on this "
                 "device): a handicapped baseline")
RUNS = {"standard": [], "forge-master": ["--use-forge"],
        "forge-sr-int8": ["--use-forge", "--forge-weight-store", "sr",
                          "--forge-state-dtype", "int8"]}


def run(model: list[str], flags: list[str], micro_batch: int, iters: int, timeout: float | None = None) -> dict | None:
    """The run's median iteration, peak and last loss; None if it ran out of device memory (any
    other failure raises)."""
    records = pretrain_records([*model, *flags, "--train-iters", str(iters), "--micro-batch-size", str(micro_batch),
                                "--global-batch-size", str(micro_batch)], timeout=timeout)
    if records is None:
        return None
    peaks = [r["mem-max-allocated-bytes"] for r in records if "mem-max-allocated-bytes" in r]
    return {"iteration_ms": median_iteration_ms(records, skip=2), "peak_bytes": max(peaks) if peaks and max(peaks) else None,
            "final_loss": records[-1]["lm loss"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--max-micro-batch", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=None,
                        help="the micro-batches to run, in order (default: powers of two up to --max-micro-batch)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on any device, micro-batch 1")
    parser.add_argument("--core-attention", default="sdpa", choices=("sdpa", "local"),
                        help="--forge-core-attention for every run, standard ones included (default: torch's fused "
                             "attention, as a GPU user would run; local materializes the s x s scores)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_e2e.py needs a GPU (or --smoke)")
    start = time.monotonic()
    model = [*(SMOKE if args.smoke else MODEL), "--forge-core-attention", args.core_attention]
    sizes = [1] if args.smoke else args.micro_batches or [1 << k for k in range(args.max_micro_batch.bit_length())]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**environment(device), "model": model, "baseline_note": BASELINE_NOTE, "complete": False, "runs": {},
              "cases": []}
    stopped, done = False, set()  # done: the runs whose last micro-batch did not fit (or failed)
    report["runs"] = {name: {} for name in RUNS}
    for b in sizes:  # every run at one micro-batch before the next: the ratios come first
        for name, flags in RUNS.items():
            if name in done:
                continue
            left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
            if left is not None and left <= 0:
                stopped = True
                break
            try:
                result, error = run(model, flags, b, args.iters, timeout=left), None
            except Exception as failure:  # noqa: BLE001 - a crash or a timeout is an error, not "does not fit"
                result, error = None, repr(failure)[-1500:]
            report["runs"][name][b] = result if error is None else {"error": error}
            report["cases"].append({"run": name, "micro_batch": b, "fits": error is None and result is not None,
                                    "error": error})
            write_report(args.out, report)
            peak = "" if result is None or result["peak_bytes"] is None else f", peak {result['peak_bytes'] / 2**30:.1f} GiB"
            print(f"{name:14s} mbs {b:3d}: " + (f"error {error[-200:]}" if error else "does not fit" if result is None
                                                else f"{result['iteration_ms']:.1f} ms/iter{peak}"), flush=True)
            if result is None:
                done.add(name)
    standard = report["runs"].get("standard", {})
    report["speedups_vs_standard"] = {
        name: {b: standard[b]["iteration_ms"] / r["iteration_ms"] for b, r in runs.items()
               if r and "iteration_ms" in r and standard.get(b) and "iteration_ms" in standard[b]}
        for name, runs in report["runs"].items() if name != "standard"}
    report.update(complete=True, stopped=stopped, seconds=time.monotonic() - start)
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
