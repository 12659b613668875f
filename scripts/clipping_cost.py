"""What FORGE's clipping modes cost: median iteration time of the tiny CPU GPT (configs/
tiny_gpt_cpu.sh, --clip-grad 1.0) for the standard run and FORGE with stale and two-pass clipping,
each in its own process. Writes bench/results/clipping_cost_cpu.json.

    .venv/bin/python scripts/clipping_cost.py [--iters 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess

import torch

from forge_megatron.benchmarking import pretrain_records, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"standard": [], "forge-stale": ["--use-forge"],
        "forge-two-pass": ["--use-forge", "--forge-clip-grad-mode", "two-pass"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "clipping_cost_cpu.json"))
    args = parser.parse_args(argv)
    config = subprocess.run(["bash", "-c", 'source configs/tiny_gpt_cpu.sh; printf "%s\\n" "${TINY_GPT_ARGS[@]}"'],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "config": "configs/tiny_gpt_cpu.sh", "iters": args.iters, "runs": {}}
    for name, flags in RUNS.items():
        records = pretrain_records([*config, "--train-iters", str(args.iters), "--lr-warmup-iters", "5",
                                    "--clip-grad", "1.0", *flags])
        if records is None:
            raise RuntimeError(f"the {name} run failed")
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(records[4:], records[5:])]
        report["runs"][name] = {"median_iteration_ms": 1000 * statistics.median(times)}
    base = report["runs"]["forge-stale"]["median_iteration_ms"]
    for name, run in report["runs"].items():
        run["relative_to_forge_stale"] = run["median_iteration_ms"] / base
        print(f"{name:16s} {run['median_iteration_ms']:8.1f} ms/iteration  ({run['relative_to_forge_stale']:.2f}x stale)")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
