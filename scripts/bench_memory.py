"""Measured peak memory of forward + backward + step against the memory model.

One TP=8 rank of Llama-3 8B is emulated on one GPU: the per-rank shapes at TP=1 (hidden 4096,
4 heads and 1 query group of 128 channels, SwiGLU ffn 1792, vocabulary 129024 / 8 = 16128), so
qkv is [768, 4096], proj [4096, 512], fc1 [3584, 4096], fc2 [4096, 1792] as on the real rank. Without
sequence parallelism the norm and residual activations are whole-sequence here; the model is
evaluated on the same emulated configuration, so measurement and model compare like with like.

For standard Megatron and each FORGE regime: the peak of torch.cuda.max_memory_allocated over a few
steps of forge-pretrain-gpt (Megatron's loop and optimizer, mock data; Megatron's own memory report,
each rank's) at micro-batch 1 and 2, its model value (reserve 0: the CUDA context is not in
max_memory_allocated) and the relative error, and the same for what a rank holds between steps
(Megatron's "allocated" after the last step against the model's weights, gradient buffers, master
and states: no activations, no data-parallel window); then, bounded, the largest micro-batch that
runs against the model's answer for the GPU's memory: `--search double` keeps doubling from the
largest measured micro-batch that fit (up to --max-micro-batch), `--search model` runs the model's
largest micro-batch and the next one (the first should fit, the second not). A run that fails
for another reason than device memory is recorded as an error, never as "does not fit". The
report is written after every run; `--budget-s` stops starting runs after that many seconds. `--micro-batches K` runs K micro-batches
per step (FORGE's accumulation buffer); `--pipeline P` runs P pipeline stages (P ranks), each
stage's peak against the model's for that stage (1F1B: stage s holds min(K, P - s) micro-batches);
`--data-parallel D` runs D data-parallel ranks (FORGE's owners hold 1/D of its states).

On CPU (the torch backend) the same runs are measured with LiveTensorMemory (forge_megatron.tools.
measured_pretrain): the peak bytes of live tensor storage, which is what max_memory_allocated counts
on a GPU minus the caching allocator's rounding. There is no out-of-memory on CPU to search for, so
the micro-batch search is skipped.

    python scripts/bench_memory.py --out bench/results/memory_h100.json [--layers 8] [--seq-length 4096]
    python scripts/bench_memory.py --layers 2 --seq-length 512 --out bench/results/memory_cpu.json   # CPU
    python scripts/bench_memory.py --pipeline-smoke --out bench/results/memory_pp2_cpu.json           # CPU, PP=2
"""

from __future__ import annotations

import argparse
import time

import torch

from forge_megatron.megatron.args import add_forge_args
from forge_megatron.tools import memory
from forge_megatron.tools.benchmarking import RankMemory, environment, pretrain_memory, write_report

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
# Two stages of one layer, where a micro-batch's activations weigh as much as a layer's state.
PIPELINE_SMOKE = [*emulated_rank(2, 1024, hidden=256, ffn=512, kv_channels=64, vocab=1024),
                  "--no-create-attention-mask-in-dataloader"]


def _batch(argv: list[str], micro_batch: int, micro_batches: int, data_parallel: int = 1) -> list[str]:
    return [*argv, "--micro-batch-size", str(micro_batch), "--global-batch-size",
            str(micro_batch * micro_batches * data_parallel)]


def measure(argv: list[str], micro_batch: int, micro_batches: int = 1, pipeline: int = 1,
            data_parallel: int = 1, timeout: float | None = None) -> list[RankMemory] | None:
    """Each rank's (pipeline stage's) peak and between-steps allocated bytes from Megatron's
    memory report (on a GPU torch.cuda's counters, live tensor bytes under LiveTensorMemory on
    CPU), or None if the run did not fit (any other failure raises)."""
    return pretrain_memory(_batch(argv, micro_batch, micro_batches, data_parallel), nproc=pipeline * data_parallel,
                           measure_cpu_memory=not torch.cuda.is_available(), timeout=timeout)


class Deadline:
    """A budget of seconds for starting runs (None: no limit)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def left(self) -> float | None:
        return None if self.end is None else max(1.0, self.end - time.monotonic())


def compare(base: list[str], measure_fn, gib: float | None, max_micro_batch: int, micro_batches: int = 1,
            pipeline: int = 1, regimes: dict = REGIMES, micro_batch_sizes=(1, 2), data_parallel: int = 1,
            search: str = "double", deadline: Deadline | None = None, on_entry=None) -> dict:
    """Per regime and micro-batch b: measured and modelled peak of the most loaded stage and their
    relative error, and with pipeline stages each stage's; then the bounded search for the largest
    micro-batch that runs (`search`: 'double' from the largest measured size that fit, up to
    `max_micro_batch`, 0 skips it; 'model': the model's largest micro-batch for `gib` GiB and the
    next) and the model's largest micro-batch for `gib` GiB (None: not asked). `on_entry(name,
    entry)` is called after every run; a run that fails for another reason than memory is recorded
    under "errors"; runs stop once `deadline` has passed."""
    deadline = deadline or Deadline(None)
    out = {}
    parallel = ["--pipeline-model-parallel-size", str(pipeline)] if pipeline > 1 else []
    for name, flags in regimes.items():
        if deadline.passed():
            break
        argv = base + flags + parallel
        parsed = memory.parse_megatron_args(argv, extra_args_provider=add_forge_args, data_parallel_size=data_parallel)

        def model(b: int, stage=None, reserve_gib=0.0, parsed=parsed) -> memory.MemoryBreakdown:
            args = memory.replace_args(parsed, micro_batch_size=b, global_batch_size=b * micro_batches * data_parallel)
            return memory.rank_memory(args, b, reserve_gib=reserve_gib, stage=stage)

        model_max = None if gib is None else memory.max_micro_batch(
            lambda m, model=model: model(m, reserve_gib=memory.DEFAULT_RESERVE_GIB), gib)
        entry = out[name] = {"model_max_micro_batch": model_max, "errors": {}, "fits": {}}

        def run(b: int, entry=entry, argv=argv, name=name):
            """The run's ranks, None if it did not fit; a failure of another kind is recorded (and None)."""
            try:
                ranks = measure_fn(argv, b, micro_batches, pipeline, data_parallel, **(
                    {"timeout": deadline.left()} if deadline.end is not None else {}))
            except Exception as error:  # noqa: BLE001 - a crash or a timeout: an error, not "does not fit"
                entry["errors"][str(b)] = repr(error)[-1500:]
                ranks = None
            else:
                entry["fits"][str(b)] = ranks is not None
            if on_entry is not None:
                on_entry(name, entry)
            return ranks

        for b in micro_batch_sizes:
            if deadline.passed():
                break
            ranks = run(b)
            peaks = None if ranks is None else [r.peak for r in ranks]
            held = None if ranks is None else max(r.held for r in ranks)
            predicted = model(b)
            entry[f"measured_peak_bytes_mb{b}"] = None if ranks is None else max(peaks)
            entry[f"model_peak_bytes_mb{b}"] = predicted.total
            entry[f"relative_error_mb{b}"] = None if ranks is None else predicted.total / max(peaks) - 1
            # Between steps (no activations, no window): the weights, gradient buffers, master and states.
            entry[f"measured_held_bytes_mb{b}"] = held
            entry[f"model_held_bytes_mb{b}"] = predicted.held
            entry[f"held_relative_error_mb{b}"] = None if ranks is None else predicted.held / held - 1
            if pipeline > 1:
                stages = [model(b, stage).total for stage in range(pipeline)]
                entry[f"stage_measured_peak_bytes_mb{b}"], entry[f"stage_model_peak_bytes_mb{b}"] = peaks, stages
                entry[f"stage_relative_error_mb{b}"] = None if ranks is None else [
                    m / peak - 1 for m, peak in zip(stages, peaks)]
            if on_entry is not None:
                on_entry(name, entry)
        if search == "model":
            if model_max:
                for b in (model_max, model_max + 1):
                    if deadline.passed() or entry["errors"]:
                        break
                    if str(b) not in entry["fits"]:
                        run(b)
        elif max_micro_batch:
            fitted = [int(b) for b, ok in entry["fits"].items() if ok]
            largest = max(fitted, default=0)
            b = 2 * largest if largest else 1
            while b <= max_micro_batch and not deadline.passed() and not entry["errors"]:
                if run(b) is None:
                    break
                largest, b = b, 2 * b
            entry["largest_power_of_two_micro_batch"] = largest
        if on_entry is not None:
            on_entry(name, entry)
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
    parser.add_argument("--pipeline-smoke", action="store_true",
                        help="a tiny two-layer model on two pipeline stages, four micro-batches per step")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline stages (ranks)")
    parser.add_argument("--data-parallel", type=int, default=1,
                        help="data-parallel ranks (each with the micro-batches of one rank; Megatron reports "
                             "data-parallel rank 0's memory)")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2],
                        help="the micro-batches measured against the model")
    parser.add_argument("--search", default="double", choices=("double", "model"),
                        help="GPU only: how the largest micro-batch that runs is looked for (bounded)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    gib = torch.cuda.get_device_properties(0).total_memory / memory.GIB if gpu else None
    if args.pipeline_smoke:
        args.pipeline, args.micro_batches = 2, 4
    model = PIPELINE_SMOKE if args.pipeline_smoke else SMOKE if args.smoke else emulated_rank(args.layers, args.seq_length)
    base = [*model, "--forge-core-attention", args.core_attention, "--train-iters", str(args.iters)]
    report = {**environment(torch.device("cuda" if gpu else "cpu")), "gpu_gib": gib,
              "measure": "torch.cuda.max_memory_allocated" if gpu else "LiveTensorMemory (live tensor bytes, CPU)",
              "flags": base, "micro_batches_per_step": args.micro_batches, "pipeline_stages": args.pipeline,
              "data_parallel": args.data_parallel, "search": args.search if gpu else None, "complete": False,
              "regimes": {}}

    def on_entry(name, entry):  # the report after every run: a stopped run keeps what it measured
        report["regimes"][name] = entry
        write_report(args.out, report)

    deadline = Deadline(args.budget_s)
    regimes = compare(base, measure, gib, args.max_micro_batch if gpu else 0, args.micro_batches, args.pipeline,
                      {name: REGIMES[name] for name in args.regimes}, micro_batch_sizes=args.micro_batch_sizes,
                      data_parallel=args.data_parallel, search=args.search if gpu else "double", deadline=deadline,
                      on_entry=on_entry)
    report.update(regimes=regimes, complete=True, stopped=deadline.passed())
    for name, entry in regimes.items():
        line = f"{name:14s}"
        for b in args.micro_batch_sizes:
            measured = entry.get(f"measured_peak_bytes_mb{b}")
            if measured is None:
                continue
            if args.pipeline > 1 and measured:
                line += f"  mbs {b} stages: " + ", ".join(
                    f"{m / 2**20:.1f}/{p / 2**20:.1f} MiB" for m, p in zip(entry[f"stage_model_peak_bytes_mb{b}"],
                                                                          entry[f"stage_measured_peak_bytes_mb{b}"]))
            line += (f"  mbs {b}: measured {measured / 2**20 if measured else float('nan'):.1f} MiB, model "
                     f"{entry[f'model_peak_bytes_mb{b}'] / 2**20:.1f} MiB "
                     f"({100 * entry[f'relative_error_mb{b}'] if measured else float('nan'):+.1f}%; between steps "
                     f"{100 * entry[f'held_relative_error_mb{b}'] if measured else float('nan'):+.2f}%)")
        print(f"{line}  fits {entry['fits']}  largest mbs (2^k) {entry.get('largest_power_of_two_micro_batch')}  "
              f"model max mbs {entry['model_max_micro_batch']}  errors {list(entry['errors'])}", flush=True)
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
