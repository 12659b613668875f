"""Clipping study on CPU: the tiny GPT of the main job (configs/tiny_gpt_cpu.sh, byte-level on the
Python standard library's source, one micro-batch, D = 1), 300 steps, --clip-grad 1.0, per seed:
standard Megatron, FORGE 'stale', FORGE 'auto' (the default: 'progressive' at one micro-batch in one
process, its first step exact) and FORGE 'two-pass' (exact, a norms-only pass first), in fp32 and in bf16 with stochastic rounding and
8-bit states. Per run: validation loss after the last step (16 held-out batches), median ms/iter
(Megatron's iteration time after two warm-up steps), and for FORGE runs the clip coefficient's
error against the exact one of the same step, min(1, clip / (norm + 1e-6)) from the logged
global norm: of the covered gradient as a whole (forge/grad-scale) and per weight, averaged over the
weights (forge/clip-coefficient-error).

Writes bench/results/clip_study_<precision>.json run by run and docs/clip_study.png (mean final
validation loss ± standard error per mode and precision). Runs already in the JSON (same iters and
clip) are kept and not rerun, so more seeds add to a study.

    .venv/bin/python scripts/clip_study.py                                   # 5 seeds, fp32 and bf16-sr-int8
    .venv/bin/python scripts/clip_study.py --seeds 1234 --precisions fp32 --iters 30   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

from forge_megatron.tools.benchmarking import median_iteration_ms, pretrain_records, tiny_gpt_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = {"fp32": [], "bf16-sr-int8": ["--bf16", "--forge-weight-store", "sr", "--forge-state-dtype", "int8"]}
MODES = {  # name -> flags (FORGE-only precision flags are dropped for the standard run)
    "standard": [],
    "stale": ["--use-forge", "--forge-clip-grad-mode", "stale"],
    "auto": ["--use-forge"],  # the default: 'progressive' here (one micro-batch, one process)
    "two-pass": ["--use-forge", "--forge-clip-grad-mode", "two-pass"],
}


def train(precision: str, mode: str, iters: int, seed: int, clip: float) -> dict:
    flags = PRECISIONS[precision] if mode != "standard" else [f for f in PRECISIONS[precision] if f == "--bf16"]
    argv = tiny_gpt_args(ROOT) + ["--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 10)),
                                  "--eval-interval", str(iters), "--eval-iters", "16", "--clip-grad", str(clip),
                                  "--seed", str(seed), *flags, *MODES[mode]]
    records = pretrain_records(argv, env={"OMP_NUM_THREADS": "1"})
    if records is None:
        raise RuntimeError(f"run {precision} {mode} seed {seed} failed")
    validation = [r["lm loss validation"] for r in records if "lm loss validation" in r][-1]
    result = {"precision": precision, "mode": mode, "seed": seed, "validation": validation,
              "ms_per_iter": median_iteration_ms(records)}
    norms = {r["iteration"]: r["grad-norm"] for r in records if "grad-norm" in r}
    scales = {r["iteration"]: r["forge/grad-scale"] for r in records if "forge/grad-scale" in r}
    if scales:
        # the coefficient of the covered gradient as a whole (progressive: its clipped norm over its raw norm)
        errors = [abs(scales[i] / min(1.0, clip / (norms[i] + 1e-6)) - 1) for i in scales if i in norms]
        result["coefficient_rel_error_mean"] = sum(errors) / len(errors)
        result["coefficient_rel_error_max"] = max(errors)
        # each covered weight's coefficient, averaged over the weights (FORGE's own log)
        per_weight = [r["forge/clip-coefficient-error"] for r in records if "forge/clip-coefficient-error" in r]
        result["per_weight_coefficient_rel_error_mean"] = sum(per_weight) / len(per_weight)
        result["clipped_steps"] = sum(1 for i in norms if norms[i] > clip)
        result["forward_passes"] = sum(r["forge/forward-passes"] for r in records if "forge/forward-passes" in r)
    print(f"{precision:14s} {mode:9s} seed {seed}: validation {validation:.5f}, {result['ms_per_iter']:.1f} ms/iter"
          + (f", coefficient error mean {result['coefficient_rel_error_mean']:.4f}" if scales else ""), flush=True)
    return result


def summarize(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    stderr = statistics.stdev(values) / n**0.5 if n > 1 else 0.0
    return {"mean": mean, "stderr": stderr, "n": n, "each": values}


def results_path(precision: str) -> str:
    return os.path.join(ROOT, "bench", "results", f"clip_study_{precision}.json")


def earlier_runs(precision: str, iters: int, clip: float) -> list[dict]:
    """The runs an earlier study of the same length and clip wrote (kept and not rerun: a study
    stopped part-way, or one given more seeds, goes on from them)."""
    if not os.path.exists(results_path(precision)):
        return []
    with open(results_path(precision)) as f:
        earlier = json.load(f)
    return earlier["runs"] if (earlier["iters"], earlier["clip"]) == (iters, clip) else []


def write(precision: str, runs: list[dict], args) -> dict:
    """bench/results/clip_study_<precision>.json from the runs done so far; returns its summary."""
    modes = {}
    for mode in args.modes:
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["seed"])
        if not mine:
            continue
        modes[mode] = {"validation": summarize([r["validation"] for r in mine]),
                       "ms_per_iter": summarize([r["ms_per_iter"] for r in mine])}
        for key in ("coefficient_rel_error_mean", "per_weight_coefficient_rel_error_mean"):
            if key in mine[0]:
                modes[mode][key] = summarize([r[key] for r in mine])
    standard = {r["seed"]: r["validation"] for r in runs if r["mode"] == "standard"}
    for mode, summary in modes.items():  # paired: over the seeds this mode and standard both ran
        gaps = [r["validation"] / standard[r["seed"]] - 1 for r in runs if r["mode"] == mode and r["seed"] in standard]
        if gaps:
            summary["gap_vs_standard"] = summarize(gaps)["mean"]
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "config": "configs/tiny_gpt_cpu.sh, one micro-batch, D = 1", "iters": args.iters, "clip": args.clip,
           "seeds": sorted({r["seed"] for r in runs}), "summary": modes,
           "runs": sorted(runs, key=lambda r: (r["seed"], r["mode"]))}
    with open(results_path(precision), "w") as f:
        json.dump(out, f, indent=1)
    return modes


def plot(summaries: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 3.5), squeeze=False)
    for ax, (precision, modes) in zip(axes[0], summaries.items()):
        names = list(modes)
        ax.errorbar(range(len(names)), [modes[m]["validation"]["mean"] for m in names],
                    yerr=[modes[m]["validation"]["stderr"] for m in names], fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), [f"{m}\n(n={modes[m]['validation']['n']})" for m in names])
        ax.set_title(f"{precision}, clip 1.0: final validation loss (mean ± SE)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 7, 1235, 1236, 1237])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--workers", type=int, default=2, help="runs at a time")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "clip_study.png"))
    args = parser.parse_args(argv)
    tiny_gpt_args(ROOT)  # writes the dataset once, before runs in parallel read it
    summaries = {}
    for precision in args.precisions:
        runs = earlier_runs(precision, args.iters, args.clip)
        done = {(r["seed"], r["mode"]) for r in runs}
        jobs = [(precision, mode, args.iters, seed, args.clip) for seed in args.seeds for mode in args.modes
                if (seed, mode) not in done]
        if runs:
            summaries[precision] = write(precision, runs, args)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for future in as_completed([pool.submit(train, *job) for job in jobs]):
                runs.append(future.result())
                summaries[precision] = write(precision, runs, args)  # run by run: a stopped study keeps them
        for mode, s in summaries.get(precision, {}).items():
            print(f"{precision} {mode}: {s['validation']['mean']:.5f} ± {s['validation']['stderr']:.5f} "
                  f"(gap {s.get('gap_vs_standard', 0):+.3%}), {s['ms_per_iter']['mean']:.1f} ms/iter", flush=True)
    for precision in PRECISIONS:  # the plot shows every precision studied, this run's and earlier runs'
        if precision not in summaries and os.path.exists(results_path(precision)):
            with open(results_path(precision)) as f:
                summaries[precision] = json.load(f)["summary"]
    plot({precision: summaries[precision] for precision in PRECISIONS if precision in summaries}, args.plot)


if __name__ == "__main__":
    main()
