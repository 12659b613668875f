"""What FORGE's clipping modes cost: median iteration time of the tiny CPU GPT (configs/
tiny_gpt_cpu.sh, --clip-grad 1.0, in Megatron's loop) for the standard run and FORGE with stale and two-pass clipping,
each in its own process. The three run in turn, round after round, so that a shared machine's
drifting speed hits them alike; each ratio to stale is taken within a round, then the median over
rounds is reported. Writes bench/results/clipping_cost_cpu.json.

    .venv/bin/python scripts/clipping_cost.py [--iters 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch

from forge_megatron.tools import benchmarking
from forge_megatron.tools.benchmarking import pretrain_records, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"standard": [], "forge-stale": ["--use-forge"],
        "forge-two-pass": ["--use-forge", "--forge-clip-grad-mode", "two-pass"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "clipping_cost_cpu.json"))
    args = parser.parse_args(argv)
    config = benchmarking.tiny_gpt_args(ROOT)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "config": "configs/tiny_gpt_cpu.sh", "iters": args.iters, "rounds": args.rounds, "runs": {}}
    rounds = [{name: median_iteration_ms(config, args.iters, flags) for name, flags in RUNS.items()}
              for _ in range(args.rounds)]
    for name in RUNS:
        report["runs"][name] = {
            "median_iteration_ms": statistics.median(r[name] for r in rounds),
            "relative_to_forge_stale": statistics.median(r[name] / r["forge-stale"] for r in rounds),
            "iteration_ms_by_round": [r[name] for r in rounds]}
        run = report["runs"][name]
        print(f"{name:16s} {run['median_iteration_ms']:8.1f} ms/iteration  ({run['relative_to_forge_stale']:.2f}x stale; "
              f"rounds: {', '.join(f'{t:.1f}' for t in run['iteration_ms_by_round'])})")
    write_report(args.out, report)


def median_iteration_ms(config: list[str], iters: int, flags: list[str]) -> float:
    """One run in its own process (Megatron's loop); the median of its iteration times after the
    first four."""
    records = pretrain_records([*config, "--train-iters", str(iters), "--lr-warmup-iters", "5", "--clip-grad", "1.0",
                                "--eval-interval", str(iters + 1), *flags])
    if records is None:
        raise RuntimeError(f"the run with {flags} failed")
    return benchmarking.median_iteration_ms(records, skip=4)


if __name__ == "__main__":
    main()
