"""Convergence study on CPU: the tiny GPT (configs/tiny_gpt_cpu.sh, byte-level on the Python
standard library's source) trained 300 steps in Megatron's own loop in each precision regime:
standard Megatron (its optimizer, fp32 or bf16 with an fp32 master) and FORGE's regimes.

Every run is repeated for three seeds (initialization and data order). Writes
bench/results/convergence_cpu.json (the first seed's per-step losses; every seed's validation loss,
wall time and gap) and docs/convergence.png (the first seed's loss curves); prints the
validation-loss gaps against the standard bf16 run with an fp32 master (Megatron's default), as
mean and standard error over seeds.

    .venv/bin/python scripts/convergence_study.py            # all runs, three seeds (~35 min on 2 cores)
    .venv/bin/python scripts/convergence_study.py --iters 20 --seeds 1 --runs forge-fp32 standard-fp32   # a smoke run
    .venv/bin/python scripts/convergence_study.py --runs standard-bf16 standard-bf16-k4 \
        forge-bf16-master-k4-bf16acc forge-sr-int8-k4-bf16acc \
        --out bench/results/convergence_accumulation_cpu.json --plot docs/convergence_accumulation.png
    .venv/bin/python scripts/convergence_study.py --runs standard-muon-bf16 forge-muon-bf16-sr --seeds 1234 \
        --reference standard-muon-bf16 --out bench/results/convergence_muon_cpu.json --plot docs/convergence_muon.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from forge_megatron.tools.benchmarking import pretrain_records, tiny_gpt_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# name -> (label, extra flags, bytes per covered parameter: weight + gradient (bf16 under --bf16,
# as the run allocates it) + master + optimizer states). Every run uses the same seed (same
# initialization and data order) and --clip-grad 0, so that runs differ by precision alone (the
# clipping modes are tested in tests/test_pretrain_gpt.py). Training is chaotic: two runs that
# differ in the last bit of anything drift apart; the two control runs (the reference with its
# initialization scaled by 1 +- 1e-7) measure how far, the noise floor against which the gaps are
# read. Round-to-nearest bf16 weights without a master (forge-bf16-rne) is the usual low-memory
# bf16 practice, the failure mode stochastic rounding fixes.
FORGE = ["--use-forge"]
RUNS = {
    "standard-fp32": ("Megatron AdamW, fp32", [], 4 + 4 + 8),
    "forge-fp32": ("FORGE, fp32", FORGE, 4 + 8),
    "standard-bf16": ("Megatron AdamW, bf16 + fp32 master", ["--bf16"], 2 + 4 + 4 + 8),
    "forge-bf16-master": ("FORGE, bf16 + fp32 master", ["--bf16", *FORGE], 2 + 4 + 8),
    "forge-bf16-sr": ("FORGE, bf16 SR, no master", ["--bf16", *FORGE, "--forge-weight-store", "sr"], 2 + 8),
    "forge-bf16-rne": ("FORGE, bf16 round-to-nearest, no master", ["--bf16", *FORGE, "--forge-weight-store", "rne"],
                       2 + 8),
    "forge-int8": ("FORGE, bf16 + master, 8-bit states", ["--bf16", *FORGE, "--forge-state-dtype", "int8"],
                   2 + 4 + 2.25),
    "forge-sr-int8": ("FORGE, bf16 SR + 8-bit states",
                      ["--bf16", *FORGE, "--forge-weight-store", "sr", "--forge-state-dtype", "int8"], 2 + 2.25),
}
REFERENCE = "standard-bf16"
CONTROLS = {"control-init+1e-7": ("control: reference, init std x (1 + 1e-7)", ["--bf16", "--init-method-std",
                                  "0.020000002"], 2 + 4 + 4 + 8),
            "control-init-1e-7": ("control: reference, init std x (1 - 1e-7)", ["--bf16", "--init-method-std",
                                  "0.019999998"], 2 + 4 + 4 + 8)}
RUNS.update(CONTROLS)
# Gradient accumulation: the same 8 sequences per step as 4 micro-batches of 2 (Megatron sums them
# in its fp32 main_grad; FORGE in its accumulation buffer, here the 2-byte bf16 one).
K4 = ["--micro-batch-size", "2", "--global-batch-size", "8"]
ACCUMULATION = {
    "standard-bf16-k4": ("Megatron AdamW, bf16 + fp32 master, 4 micro-batches", ["--bf16", *K4], 2 + 4 + 4 + 8),
    "forge-bf16-master-k4-bf16acc": ("FORGE, bf16 + master, 4 micro-batches, bf16 accumulation",
                                     ["--bf16", *FORGE, *K4, "--forge-accumulation-dtype", "bf16"], 2 + 2 + 4 + 8),
    "forge-sr-int8-k4-bf16acc": ("FORGE, bf16 SR + 8-bit states, 4 micro-batches, bf16 accumulation",
                                 ["--bf16", *FORGE, *K4, "--forge-weight-store", "sr", "--forge-state-dtype", "int8",
                                  "--forge-accumulation-dtype", "bf16"], 2 + 2 + 2.25),
}
RUNS.update(ACCUMULATION)
# Muon (--optimizer muon: the matrices with Muon, the output layer and the rest with Adam): Megatron's
# in bf16 with an fp32 master against FORGE's without one (stochastic rounding), 4-byte momentum.
MUON = ["--optimizer", "muon"]
MUON_RUNS = {
    "standard-muon-bf16": ("Megatron Muon, bf16 + fp32 master", ["--bf16", *MUON], 2 + 4 + 4 + 4),
    "forge-muon-bf16-sr": ("FORGE Muon, bf16 SR, no master", ["--bf16", *MUON, *FORGE, "--forge-weight-store", "sr"],
                           2 + 4),
}
RUNS.update(MUON_RUNS)


def train(name: str, iters: int, seed: int = 1234) -> dict:
    """One run of forge-pretrain-gpt (Megatron's loop) in its own process; its losses from Megatron's
    tensorboard log."""
    label, flags, bytes_per_param = RUNS[name]
    argv = tiny_gpt_args(ROOT) + ["--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 10)),
                            "--eval-interval", str(iters), "--eval-iters", "16", "--clip-grad", "0",
                            "--seed", str(seed), *flags]
    start = time.perf_counter()
    records = pretrain_records(argv)
    if records is None:
        raise RuntimeError(f"run {name} (seed {seed}) failed")
    loss = [r["lm loss"] for r in records if "lm loss" in r]
    validation = [r["lm loss validation"] for r in records if "lm loss validation" in r]
    return {
        "label": label, "flags": flags, "bytes_per_covered_parameter": bytes_per_param,
        "wall_s": time.perf_counter() - start, "loss": loss, "validation": validation[-1], "seed": seed,
        "final_train_loss": sum(loss[-50:]) / len(loss[-50:]),
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_zoom) = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in results.items():
        loss = torch.tensor(r["loss"])
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
        style = "--" if name.startswith(("standard", "control")) else "-"
        for axis in (ax, ax_zoom):
            axis.plot(range(1, len(loss) + 1), smooth, style, label=r["label"], linewidth=1.2)
    ax.set(xlabel="iteration", ylabel="training loss (9-step mean)", title="tiny GPT on the Python stdlib (CPU)")
    n = len(next(iter(results.values()))["loss"])
    ax_zoom.set(xlabel="iteration", title="last third", xlim=(2 * n // 3, n))
    low = min(min(r["loss"][2 * n // 3:]) for r in results.values())
    high = max(max(r["loss"][2 * n // 3:]) for r in results.values())
    ax_zoom.set_ylim(low - 0.05, high + 0.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--runs", nargs="*", default=[r for r in RUNS if r not in ACCUMULATION and r not in MUON_RUNS],
                        choices=list(RUNS),
                        help="default: every run but the accumulation and Muon ones (studies of their own, "
                             "docs/numerics.md)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236],
                        help="every run is repeated per seed (initialization and data order); gaps are taken "
                             "against the reference of the same seed, then averaged")
    parser.add_argument("--reference", default=REFERENCE, choices=list(RUNS),
                        help="the run every gap is taken against (one of --runs)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "convergence_cpu.json"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "convergence.png"))
    args = parser.parse_args(argv)
    if args.reference not in args.runs:
        parser.error(f"the reference run {args.reference} is not among --runs; add it, or choose another --reference")
    by_seed = {seed: {} for seed in args.seeds}
    for seed in args.seeds:
        for name in args.runs:
            r = by_seed[seed][name] = train(name, args.iters, seed)
            print(f"seed {seed} {name:24s} validation {r['validation']:.4f}  train (last 50) "
                  f"{r['final_train_loss']:.4f}  {r['wall_s']:.0f}s", flush=True)
        reference = by_seed[seed][args.reference]
        for r in by_seed[seed].values():
            r["gap_vs_reference"] = r["validation"] / reference["validation"] - 1
    results = by_seed[args.seeds[0]]  # the curves plotted and kept in full
    controls = [abs(runs[c]["gap_vs_reference"]) for runs in by_seed.values() for c in CONTROLS if c in runs]
    noise = max(controls) if controls else None
    gaps = {name: summarize([by_seed[seed][name]["gap_vs_reference"] for seed in args.seeds])
            for name in args.runs}
    if "standard-fp32" in results and "forge-fp32" in results:  # where the two fp32 runs part
        pairs = zip(results["forge-fp32"]["loss"], results["standard-fp32"]["loss"])
        results["forge-fp32"]["steps_within_1e-4_of_standard"] = next(
            (i for i, (a, b) in enumerate(pairs) if abs(a - b) > 1e-4 * abs(b)), args.iters)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "config": "configs/tiny_gpt_cpu.sh with --clip-grad 0", "iters": args.iters, "reference": args.reference,
        "metric": "validation loss after the last step (16 batches of held-out stdlib files); "
                  "final_train_loss = mean training loss of the last 50 steps",
        "noise_floor_relative": noise, "seeds": args.seeds,
        "gap_vs_reference_over_seeds": gaps,
        "by_seed": {str(seed): {name: {k: r[k] for k in ("validation", "final_train_loss", "gap_vs_reference", "wall_s")
                                       if k in r} for name, r in runs.items()} for seed, runs in by_seed.items()},
        "runs": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    plot(results, args.plot)
    if noise is not None:
        print(f"noise floor (largest control gap): {100 * noise:.2f}%")
    print(f"validation-loss gap to {args.reference}, over seeds {args.seeds}: mean, standard error, each seed")
    for name, gap in gaps.items():
        print(f"{RUNS[name][0]:48s} {100 * gap['mean']:+.2f}%  +- {100 * gap['stderr']:.2f}%  "
              f"[{', '.join(f'{100 * g:+.2f}' for g in gap['each'])}]")


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and standard error of a run's gaps over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "std": std, "stderr": std / n**0.5, "n": n, "each": values}


if __name__ == "__main__":
    main()
