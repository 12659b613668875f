"""Memory headroom: per-rank memory and the largest micro-batch that fits, standard Megatron against
each FORGE regime, across GPU memory sizes and sequence lengths, from forge_megatron.tools.memory's
analytic model (model numbers, not measurements; docs/memory.md).

Reads a config the way the launchers do (source the file, expand its array of pretrain_gpt.py
flags) and parses it with Megatron's parser. Prints the tables and where FORGE's micro-batch is at
least 4x the standard one and where it is not. Writes nothing unless asked: --out writes the raw
numbers to bench/results/memory_model_NAME.json and the plot to docs/memory_headroom_NAME.png, NAME
from the config file and the layout it was read at (llama3_8b_tp8, llama3_8b_tp2_dp4, ...): the
committed results, which the docs' commands regenerate; --json and --plot write elsewhere. A
configuration outside the memory model is one line naming the flag, and exit status 2.

    .venv/bin/python scripts/memory_headroom.py                                     # the 8B TP=8 config, printed
    .venv/bin/python scripts/memory_headroom.py --out                               # ... and its committed results
    .venv/bin/python scripts/memory_headroom.py -- --recompute-granularity selective  # extra Megatron flags
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOUR_X = 4

FORGE = {"use_forge": True, "bf16": True, "forge_accumulation_dtype": "fp32"}
# key -> (label, changes to the parsed config); the FORGE runs keep the config's output-layer cover.
# The accumulation buffer (grads) counts only where a step has several micro-batches.
RUNS = {
    "standard": ("standard Megatron", {"use_forge": False}),
    "standard-pa": ("standard, precision-aware optimizer, bf16 m and v",
                    {"use_forge": False, "use_distributed_optimizer": True, "use_precision_aware_optimizer": True,
                     "exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}),
    "forge-fp32": ("FORGE fp32 weights, fp32 states (fp32 training)",
                   {**FORGE, "bf16": False, "forge_state_dtype": "fp32"}),
    "forge-master": ("FORGE bf16 + fp32 master, fp32 states",
                     {**FORGE, "forge_weight_store": "master", "forge_state_dtype": "fp32"}),
    "forge-sr": ("FORGE bf16 SR, fp32 states", {**FORGE, "forge_weight_store": "sr", "forge_state_dtype": "fp32"}),
    "forge-sr-bf16": ("FORGE bf16 SR, bf16 states",
                      {**FORGE, "forge_weight_store": "sr", "forge_state_dtype": "bf16"}),
    "forge-master-int8": ("FORGE bf16 + fp32 master, int8 states",
                          {**FORGE, "forge_weight_store": "master", "forge_state_dtype": "int8"}),
    "forge-sr-int8": ("FORGE bf16 SR, int8 states", {**FORGE, "forge_weight_store": "sr", "forge_state_dtype": "int8"}),
    "forge-sr-int8-bf16acc": ("FORGE bf16 SR, int8 states, bf16 accumulation",
                              {**FORGE, "forge_weight_store": "sr", "forge_state_dtype": "int8",
                               "forge_accumulation_dtype": "bf16"}),
}
# A config with --optimizer muon (configs/llama3_8b_muon_tp2.sh): Megatron's Muon against FORGE's,
# the momentum in fp32 or bf16 (int8 is refused for Muon).
MUON = {**FORGE, "optimizer": "muon"}
MUON_RUNS = {
    "standard": ("standard Megatron, Muon", {"use_forge": False}),
    "forge-master": ("FORGE Muon, bf16 + fp32 master, fp32 momentum",
                     {**MUON, "forge_weight_store": "master", "forge_state_dtype": "fp32"}),
    "forge-sr": ("FORGE Muon, bf16 SR, fp32 momentum", {**MUON, "forge_weight_store": "sr", "forge_state_dtype": "fp32"}),
    "forge-sr-bf16": ("FORGE Muon, bf16 SR, bf16 momentum",
                      {**MUON, "forge_weight_store": "sr", "forge_state_dtype": "bf16"}),
}
BASELINE = "standard"


def runs_for(args) -> dict:
    """The runs a config is compared in: Muon's under --optimizer muon, else Adam's."""
    return MUON_RUNS if args.optimizer == "muon" else RUNS


def forge_runs(by_run: dict) -> list[str]:
    return [key for key in by_run if key != BASELINE]
BREAKDOWN = ("weights", "grads", "master", "states", "window", "activations", "logits", "attention_workspace")


def config_argv(path: str, array: str) -> list[str]:
    """The flags of a bash config file's array, as the launchers expand them."""
    out = subprocess.run(["bash", "-c", f'source "$0"; printf "%s\\n" "${{{array}[@]}}"', path],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def parse_config(argv: list[str], data_parallel_size: int = 1):
    """Megatron's parser with FORGE's flags, so that --use-forge and --forge-* in a config are
    understood; the data-parallel size is the launcher's (world size over TP x PP), not a flag."""
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.tools.memory import parse_megatron_args

    return parse_megatron_args(argv, extra_args_provider=add_forge_args, data_parallel_size=data_parallel_size)


def study(args, gpu_gib: list[float], seq_lengths: list[int], sweep_gib: list[float], reserve_gib: float) -> dict:
    """Every number the tables, the verdicts and the plot need, keyed by strings (for JSON)."""
    from forge_megatron.tools import memory

    result = {"breakdown_mbs1": {}, "bytes_per_covered_parameter": {}, "max_micro_batch": {}, "sweep": {}}
    runs = runs_for(args)
    states = memory.MUON_STATES if args.optimizer == "muon" else memory.ADAM_STATES  # of a layer's linear weight
    for key, (_, changes) in runs.items():
        run = memory.replace_args(args, **changes)
        k = memory.micro_batches_per_step(run, 1)  # the accumulation buffer counts when a step has several
        per = (memory.forge_bytes_per_parameter(run, k, states) if run.use_forge
               else memory.standard_bytes_per_parameter(run, states))
        result["bytes_per_covered_parameter"][key] = per.total
    for seq in seq_lengths:
        result["breakdown_mbs1"][str(seq)], result["max_micro_batch"][str(seq)] = {}, {}
        result["sweep"][str(seq)] = {}
        for key, (_, changes) in runs.items():
            run = memory.replace_args(args, **changes, seq_length=seq)

            def at(micro_batch: int, run=run):
                return memory.rank_memory(run, micro_batch, reserve_gib)

            one, two = at(1), at(2)
            result["breakdown_mbs1"][str(seq)][key] = {**dataclasses.asdict(one), "total": one.total,
                                                       "per_extra_micro_batch": two.total - one.total}
            result["max_micro_batch"][str(seq)][key] = {f"{g:g}": memory.max_micro_batch(at, g) for g in gpu_gib}
            result["sweep"][str(seq)][key] = [memory.max_micro_batch(at, g) for g in sweep_gib]
    return result


def verdicts(max_mbs: dict) -> dict:
    """Sort every (sequence length, GPU size, FORGE regime) by how it stands against 4x the
    standard micro-batch; a standard run that fits nothing has no ratio and is said so."""
    out = {"holds": [], "standard_fits_none": [], "neither_fits": [], "below": []}
    for seq, by_run in max_mbs.items():
        for gib, standard in by_run[BASELINE].items():
            for key in forge_runs(by_run):
                forge = by_run[key][gib]
                entry = {"seq_length": int(seq), "gpu_gib": float(gib), "run": key, "standard": standard,
                         "forge": forge}
                if standard == 0:
                    out["standard_fits_none" if forge else "neither_fits"].append(entry)
                else:
                    out["holds" if forge >= FOUR_X * standard else "below"].append({**entry, "ratio": forge / standard})
    return out


def sweep_ranges(sweep: dict, sweep_gib: list[float]) -> dict:
    """Per sequence length and FORGE regime, the GPU sizes of the sweep where 4x holds (standard >= 1)."""
    out = {}
    for seq, by_run in sweep.items():
        standard = by_run[BASELINE]
        for key in forge_runs(by_run):
            sizes = [g for g, s, f in zip(sweep_gib, standard, by_run[key]) if s and f >= FOUR_X * s]
            if sizes:
                out.setdefault(seq, {})[key] = _ranges(sizes, sweep_gib[1] - sweep_gib[0])
    return out


def _ranges(values: list[float], step: float) -> list[list[float]]:
    ranges = [[values[0], values[0]]]
    for value in values[1:]:
        if value - ranges[-1][1] > step * 1.5:
            ranges.append([value, value])
        ranges[-1][1] = value
    return ranges


def report(info: dict, result: dict, verdict: dict, ranges: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = [f"Per-rank memory model (analytic, not measured): {info['config']}"
             + (f" + {' '.join(info['extra_flags'])}" if info["extra_flags"] else ""),
             f"  {info['parameters_per_rank'] / 1e9:.3f} B parameters per rank, "
             f"{info['covered_parameters_per_rank'] / 1e9:.3f} B of them FORGE-covered "
             f"({'with' if info['cover_output_layer'] else 'without'} the output layer; "
             f"{info['layer_linears_per_rank'] / 1e9:.3f} B in linear_qkv/proj/fc1/fc2)"
             + (f", and {info['expert_parameters_per_rank'] / 1e9:.3f} B routed-expert weights (FORGE-covered; "
                f"expert-data-parallel size {info['expert_data_parallel']})" if info["expert_parameters_per_rank"] else "")
             + "; "
             f"TP={info['tensor_parallel']}, PP={info['pipeline_parallel']}, DP={info['data_parallel']}"
             f"{' (distributed optimizer)' if info['distributed_optimizer'] else ''}, padded vocab "
             f"{info['padded_vocab_size']}; global batch {info['global_batch_size'] or 'one micro-batch'}"
             + (" (FORGE accumulates below it)" if info["global_batch_size"] else ""),
             f"  attention: {info['attention']}; reserve {info['reserve_gib']:g} GiB (CUDA context, fragmentation)", ""]
    seq = str(info["seq_length"])
    header = ["run", "B/param", *BREAKDOWN, "total", "+1 mbs"]
    labels = {key: run["label"] for key, run in info["runs"].items()}
    rows = [[labels[key], f"{result['bytes_per_covered_parameter'][key]:g}",
             *(gib(b[field]) for field in BREAKDOWN), gib(b["total"]), gib(b["per_extra_micro_batch"])]
            for key, b in result["breakdown_mbs1"][seq].items()]
    lines += [f"Per-rank memory at micro-batch 1, seq {seq}, GiB (B/param: bytes per covered parameter, the "
              "accumulation buffer in grads; total counts the larger of logits and attention_workspace):",
              *_table(header, rows), ""]
    for seq, by_run in result["max_micro_batch"].items():
        sizes = list(by_run[BASELINE])
        rows = []
        for key, by_gib in by_run.items():
            cells = []
            for size in sizes:
                standard, mbs = by_run[BASELINE][size], by_gib[size]
                ratio = "" if key == BASELINE else f" ({mbs / standard:.2f}x)" if standard else " (std 0)"
                cells.append(f"{mbs}{ratio}")
            rows.append([labels[key], *cells])
        lines += [f"Largest micro-batch, seq {seq}:", *_table(["run", *(f"{s} GiB" for s in sizes)], rows), ""]
    lines.append(f"FORGE micro-batch >= {FOUR_X}x standard (standard >= 1): "
                 + (_by_setting(verdict["holds"]) or "nowhere in this grid"))
    lines.append("Standard fits no micro-batch, FORGE does (no ratio; not counted as 4x): "
                 + (_by_setting(verdict["standard_fits_none"]) or "none"))
    if verdict["neither_fits"]:
        lines.append("Neither fits: " + _by_setting(verdict["neither_fits"]))
    if verdict["below"]:
        best = max(verdict["below"], key=lambda e: e["ratio"])
        lines.append(f"Below {FOUR_X}x: the other {len(verdict['below'])} (setting, regime) pairs; the best of them is "
                     f"{best['ratio']:.2f}x: {_by_setting([best])}")
    span = lambda a, b: f"{a:g}" if a == b else f"{a:g}-{b:g}"
    sweep = "; ".join(f"seq {seq} {key} at {', '.join(span(a, b) for a, b in spans)} GiB"
                      for seq, by_run in ranges.items() for key, spans in by_run.items())
    lines.append(f"Sweep {info['sweep_gib'][0]:g}-{info['sweep_gib'][-1]:g} GiB: {FOUR_X}x holds (standard >= 1) "
                 + (f"for {sweep}" if sweep else "at no GPU size"))
    return "\n".join(lines)


def _by_setting(entries: list[dict]) -> str:
    """'seq S @ G GiB (standard n): regime m, ...' for each setting in `entries`."""
    groups = {}
    for e in entries:
        groups.setdefault((e["seq_length"], e["gpu_gib"], e["standard"]), []).append(f"{e['run']} {e['forge']}")
    return "; ".join(f"seq {seq} @ {gib:g} GiB (standard {standard}): {', '.join(runs)}"
                     for (seq, gib, standard), runs in groups.items())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def plot(result: dict, labels: dict, sweep_gib: list[float], gpu_gib: list[float], title: str, path: str) -> None:
    """Largest micro-batch against GPU memory (top) and FORGE's ratio to standard (bottom), per sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(result["sweep"])
    colors = {**dict(zip(labels, plt.cm.tab10.colors[1:])), BASELINE: "black"}  # the same run, the same colour
    fig, axes = plt.subplots(2, len(seqs), figsize=(5 * len(seqs), 8), squeeze=False, sharex=True)
    for column, seq in enumerate(seqs):
        top, bottom = axes[0][column], axes[1][column]
        standard = result["sweep"][seq][BASELINE]
        for key, mbs in result["sweep"][seq].items():
            style = {"color": colors[key], "linewidth": 2.5 if key == BASELINE else 1.2}
            top.step(sweep_gib, mbs, where="post", label=labels[key], **style)
            if key != BASELINE:
                ratio = [f / s if s else float("nan") for f, s in zip(mbs, standard)]
                bottom.step(sweep_gib, ratio, where="post", **style)
        bottom.axhline(FOUR_X, color="red", linestyle="--", linewidth=1)
        for ax in (top, bottom):
            for size in gpu_gib:
                ax.axvline(size, color="grey", linestyle=":", linewidth=0.8)
            ax.grid(alpha=0.3)
        top.set_title(f"seq {seq}")
        top.set_ylabel("largest micro-batch")
        bottom.set_ylabel("FORGE / standard micro-batch (where standard >= 1)")
        bottom.set_xlabel("GPU memory, GiB")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_path(args) -> str:
    """Which attention the config runs, in words: it decides whether score matrices are held."""
    if args.transformer_impl != "local":
        return "fused (Transformer Engine): no score matrix stored"
    if args.forge_core_attention == "sdpa":
        return ("fused (torch SDPA, --forge-core-attention sdpa; a standard run would use Transformer Engine's): "
                "no score matrix stored")
    if args.recompute_granularity == "selective":
        return "unfused local DotProductAttention, selective recompute: scores recomputed in backward"
    return "unfused local DotProductAttention, no recompute: every layer keeps its [heads/tp, s, s] softmax"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "llama3_8b_tp8.sh"))
    parser.add_argument("--array", default="LLAMA3_8B_TP8_ARGS", help="the bash array of flags in --config")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="data-parallel ranks (the launch's world size over TP x PP)")
    parser.add_argument("--gpu-gib", type=float, nargs="+", default=[40, 80, 94, 141])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--sweep-gib", type=float, nargs=2, default=[16, 160], metavar=("LOW", "HIGH"),
                        help="GPU sizes for the plot and the 4x ranges, in 1 GiB steps")
    parser.add_argument("--reserve-gib", type=float, default=None,
                        help="set aside for the CUDA context and fragmentation (default: the model's)")
    parser.add_argument("--out", action="store_true",
                        help="write the committed results: bench/results/memory_model_NAME.json and "
                             "docs/memory_headroom_NAME.png, NAME from the config and its layout")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    parser.add_argument("--plot", default=None, help="draw the plot here")
    parser.add_argument("megatron_flags", nargs="*",
                        help="extra pretrain_gpt.py flags after --, appended to the config's")
    options = parser.parse_args(argv)

    from forge_megatron.tools import memory

    if options.out and options.megatron_flags:
        return _error("--out writes the config's own results, which extra flags would change; write these with "
                      "--json and --plot")
    reserve = memory.DEFAULT_RESERVE_GIB if options.reserve_gib is None else options.reserve_gib
    flags = config_argv(options.config, options.array) + options.megatron_flags
    try:
        return _headroom(options, flags, reserve)
    except memory.NotModelled as error:
        return _error(str(error))


def _error(message: str) -> int:
    print(f"memory_headroom.py: error: {message}", file=sys.stderr)
    return 2


def output_name(config: str, args) -> str:
    """The config file's name without its layout part, then the layout it was read at:
    configs/llama3_8b_dp.sh at TP=2 with 4 data-parallel ranks -> llama3_8b_tp2_dp4."""
    name = re.sub(r"(_(tp|pp|ep|dp)\d*)+$", "", os.path.splitext(os.path.basename(config))[0])
    name += f"_tp{args.tensor_model_parallel_size}"
    for flag, size in (("pp", args.pipeline_model_parallel_size), ("ep", args.expert_model_parallel_size),
                       ("dp", args.data_parallel_size)):
        name += f"_{flag}{size}" if size > 1 else ""
    return name


def _headroom(options, flags: list[str], reserve: float) -> int:
    from forge_megatron.megatron.args import output_layer_covered
    from forge_megatron.tools import memory

    args = parse_config(flags, options.data_parallel_size)
    if options.out:
        name = output_name(options.config, args)
        options.json = options.json or os.path.join(ROOT, "bench", "results", f"memory_model_{name}.json")
        options.plot = options.plot or os.path.join(ROOT, "docs", f"memory_headroom_{name}.png")
    low, high = options.sweep_gib
    sweep_gib = [low + i for i in range(int(high - low) + 1)]
    info = {
        "model": "forge_megatron.tools.memory: analytic per-rank peak, not a measurement (docs/memory.md)",
        "config": os.path.relpath(options.config, ROOT), "array": options.array, "flags": flags,
        "extra_flags": options.megatron_flags, "seq_length": args.seq_length, "reserve_gib": reserve,
        "parameters_per_rank": memory.parameters_per_rank(args),
        "covered_parameters_per_rank": memory.covered_parameters_per_rank(args, output_layer_covered(args)),
        "layer_linears_per_rank": memory.covered_parameters_per_rank(args, False),
        "expert_parameters_per_rank": memory.expert_parameters_per_rank(args),
        "expert_data_parallel": memory.expert_data_parallel_size(args),
        "cover_output_layer": output_layer_covered(args), "tensor_parallel": args.tensor_model_parallel_size,
        "data_parallel": args.data_parallel_size, "distributed_optimizer": args.use_distributed_optimizer,
        "pipeline_parallel": args.pipeline_model_parallel_size, "global_batch_size": args.global_batch_size,
        "padded_vocab_size": args.padded_vocab_size, "attention": attention_path(args), "sweep_gib": sweep_gib,
        "runs": {key: {"label": label, "changes": changes} for key, (label, changes) in runs_for(args).items()},
    }
    seq_lengths = sorted(set(options.seq_lengths) | {args.seq_length})
    result = study(args, options.gpu_gib, seq_lengths, sweep_gib, reserve)
    verdict = verdicts(result["max_micro_batch"])
    ranges = sweep_ranges(result["sweep"], sweep_gib)
    print(report(info, result, verdict, ranges))
    if options.json:
        os.makedirs(os.path.dirname(os.path.abspath(options.json)), exist_ok=True)
        with open(options.json, "w") as f:
            json.dump({**info, **result, "four_x": verdict, "four_x_sweep_gib": ranges}, f, indent=1)
            f.write("\n")
        print(f"\nwrote {os.path.relpath(options.json, ROOT)}")
    if options.plot:
        title = (f"{info['config']}{' ' + ' '.join(options.megatron_flags) if options.megatron_flags else ''} "
                 f"(TP={info['tensor_parallel']}, PP={info['pipeline_parallel']}, DP={info['data_parallel']}): "
                 f"largest micro-batch per rank (model, reserve {reserve:g} GiB; {info['attention']})")
        plot(result, {key: run["label"] for key, run in info["runs"].items()}, sweep_gib, options.gpu_gib, title,
             options.plot)
        print(f"wrote {os.path.relpath(options.plot, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
