"""Helpers the benchmark and study scripts share: timing, peak memory, running forge-pretrain-gpt
and writing reports."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


def bench(fn, device: torch.device) -> float:
    """Median milliseconds: do_bench (CUDA events, warm-up) on a GPU; wall clock elsewhere (smoke)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak allocation during one call above what was allocated before it: the caching
    allocator's statistics on a GPU, LiveTensorMemory (exact tensor bytes) elsewhere."""
    if device.type != "cuda":
        with LiveTensorMemory() as tracker:
            fn()
        return tracker.peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


class LiveTensorMemory(TorchDispatchMode):
    """CPU counterpart of torch.cuda.memory_allocated / max_memory_allocated: the bytes of tensor
    storage alive, and their peak, counting every storage an op under this mode creates (factory
    ops included) until it is freed. Exact tensor bytes: no allocator rounding, caching or
    fragmentation, which a GPU's caching allocator adds on top. An op's output that aliases one of
    its inputs (a view, an in-place or out= op) allocates nothing, so storages made outside the mode
    (or by from_numpy) are never counted, even when written or viewed under it.
    `LiveTensorMemory.active` is the innermost tracker entered."""

    active: LiveTensorMemory | None = None

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        self._outer: LiveTensorMemory | None = None

    def __enter__(self):
        self._outer, LiveTensorMemory.active = LiveTensorMemory.active, self
        return super().__enter__()

    def __exit__(self, *exc):
        LiveTensorMemory.active = self._outer
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _cpu_tensors((args, kwargs))}
        for t in _cpu_tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in inputs:
                self._track(storage)
        return out

    def _track(self, storage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        weakref.finalize(storage, self._free, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size


def _cpu_tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]


def read_and_reset_peak() -> int | None:
    """The peak of allocated tensor bytes since the last call, then start a new period: CUDA's
    max_memory_allocated on a GPU, the active LiveTensorMemory's peak on CPU, None without either."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak
    tracker = LiveTensorMemory.active
    if tracker is None:
        return None
    peak, tracker.peak = tracker.peak, tracker.current
    return peak


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    """Where and how a report was measured: the device, the versions, the timer."""
    import triton

    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "timer": ("triton.testing.do_bench median (CUDA events, 25 ms warm-up, 100 ms of repeats)"
                      if device.type == "cuda" else "wall clock, median of 3 after one warm-up call (CPU: not a "
                      "measurement of anything but that the code runs)")}


def pretrain_records(argv: list[str], nproc: int = 1, env: dict | None = None,
                     timeout: float | None = None) -> list[dict] | None:
    """Run forge-pretrain-gpt (Megatron's loop) in fresh processes, `nproc` of them under
    torchrun, so that an out-of-memory run cannot poison the caller; its per-iteration records
    from Megatron's own tensorboard log (see `tensorboard_records`), or None if it ran out of
    device memory. Any other failure (or running past `timeout` seconds) raises: it is not a
    measurement.
    Megatron logs every iteration: "iteration-time" (seconds, from the second iteration) and its
    memory counters ("mem-max-allocated-bytes": the peak so far, on a GPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        logging = ["--tensorboard-dir", tmp, "--tensorboard-log-interval", "1", "--log-interval", "1",
                   "--log-timers-to-tensorboard", "--log-memory-to-tensorboard"]
        proc = run_pretrain([*argv, *logging], nproc=nproc, env=env, timeout=timeout)
        if not ran_to_the_end(proc):
            return None
        return tensorboard_records(tmp)


MEMORY_REPORT = re.compile(r"^\[Rank (\d+)\] \(after \d+ iterations\) memory \(MB\) \| allocated: ([0-9.]+) "
                           r"\| max allocated: ([0-9.]+)", re.MULTILINE)


class RankMemory(NamedTuple):
    """One rank's measured memory over a run, in bytes (MB to two decimals)."""

    peak: int  # max_memory_allocated over the run
    held: int  # allocated after the last step: what the rank holds between steps


def pretrain_memory(argv: list[str], nproc: int = 1, measure_cpu_memory: bool = False,
                    timeout: float | None = None) -> list[RankMemory] | None:
    """Each rank's memory over a forge-pretrain-gpt run (`nproc` ranks under torchrun), from the
    memory report Megatron prints on every data-parallel rank 0 after each step
    (`--log-memory-interval`: torch.cuda.memory_allocated and max_memory_allocated, live tensor
    bytes under `measure_cpu_memory`), in rank order; None if the run ran out of device memory.
    Any other failure raises: it is not a measurement."""
    proc = run_pretrain([*argv, "--log-interval", "1", "--log-memory-interval", "1"], nproc=nproc,
                        measure_cpu_memory=measure_cpu_memory, timeout=timeout)
    if not ran_to_the_end(proc):
        return None
    peaks: dict[int, float] = {}
    held: dict[int, float] = {}
    for rank, allocated, max_allocated in MEMORY_REPORT.findall(proc.stdout):
        peaks[int(rank)] = max(peaks.get(int(rank), 0.0), float(max_allocated))
        held[int(rank)] = float(allocated)  # the reports come in step order
    if not peaks:
        raise RuntimeError("Megatron printed no memory report; the run's output:\n" + proc.stdout[-2000:])
    return [RankMemory(round(peaks[rank] * 2**20), round(held[rank] * 2**20)) for rank in sorted(peaks)]


OUT_OF_MEMORY = ("torch.OutOfMemoryError", "CUDA out of memory", "torch.cuda.OutOfMemoryError")


def ran_to_the_end(proc: subprocess.CompletedProcess) -> bool:
    """True if the run succeeded, False if it ran out of device memory; any other failure raises
    with the end of its output (a crash is not an out-of-memory result)."""
    if proc.returncode == 0:
        return True
    if any(marker in proc.stdout + proc.stderr for marker in OUT_OF_MEMORY):
        return False
    raise RuntimeError(f"the run failed (exit {proc.returncode}), not for lack of memory:\n" + proc.stdout[-2000:]
                       + proc.stderr[-3000:])


def run_pretrain(argv: list[str], nproc: int = 1, measure_cpu_memory: bool = False, env: dict | None = None,
                 timeout: float | None = None) -> subprocess.CompletedProcess:
    """forge-pretrain-gpt `argv` in a subprocess (under torchrun for nproc > 1), output captured;
    past `timeout` seconds it is killed and subprocess.TimeoutExpired raised."""
    module = "forge_megatron.tools.measured_pretrain" if measure_cpu_memory else "forge_megatron.cli.pretrain_gpt"
    environment = dict(os.environ, **(env or {}))
    environment.pop("TRITON_INTERPRET", None)
    return launch(module, argv, nproc, environment, timeout)


def launch(module: str, argv: list[str], nproc: int, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """`python -m module *argv` in a subprocess, as `nproc` torchrun ranks when nproc > 1. (The
    tests replace it with ranks forked from a process that has imported Megatron: tests/prewarmed.py.)"""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", module, *argv]  # --standalone: the agent binds its store's port, none is raced for
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def tensorboard_records(logdir: str) -> list[dict]:
    """Per-iteration scalars of Megatron's tensorboard log in `logdir`: one dict per iteration,
    {"iteration": n, "lm loss": ..., "grad-norm": ..., "learning-rate": ..., "forge/...": ...},
    in iteration order. (Tensorboard stores float32.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    by_step: dict[int, dict] = {}
    for tag in events.Tags()["scalars"]:
        if tag.endswith(" vs samples"):
            continue
        for event in events.Scalars(tag):
            by_step.setdefault(event.step, {"iteration": event.step})[tag] = event.value
    return [by_step[step] for step in sorted(by_step)]


def tiny_gpt_args(root: str) -> list[str]:
    """The flags of configs/tiny_gpt_cpu.sh in the checkout at `root`, its data written (once) and
    named by absolute path, so that a run works from any folder."""
    from forge_megatron.megatron.data import write_stdlib_dataset

    data = write_stdlib_dataset(os.path.join(root, "data", "stdlib_text_document"))
    out = subprocess.run(["bash", "-c", 'source configs/tiny_gpt_cpu.sh; printf "%s\\n" "${TINY_GPT_ARGS[@]}"'],
                         cwd=root, env=dict(os.environ, TINY_DATA=data), capture_output=True, text=True, check=True)
    return out.stdout.split()


def median_iteration_ms(records: list[dict], skip: int = 2) -> float:
    """Median of Megatron's per-iteration times after the first `skip` iterations (warm-up)."""
    times = [r["iteration-time"] for r in records[skip:] if "iteration-time" in r]
    if not times:
        raise ValueError("no iteration times in the records: run with more iterations")
    return 1000 * statistics.median(times)


def write_report(path: str | None, report: dict) -> None:
    """Write `report` as indented JSON to `path` (creating its folder); nothing if path is None.
    Written to a temporary file, flushed to disk and renamed over `path`: a process killed at any
    moment leaves the previous complete report or this one, never a partial file."""
    if path is None:
        return
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CaseReport:
    """A report written case by case: `header` (device, versions, ...) plus a list of cases, the
    whole file rewritten (write_report) after every case, so that a part stopped at any moment
    has returned every case it finished. `add` also prints the case's `line` (flushed)."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.report = path, {**header, "complete": False, "cases": []}
        write_report(self.path, self.report)

    def add(self, case: dict, line: str | None = None) -> dict:
        self.report["cases"].append(case)
        write_report(self.path, self.report)
        if line is not None:
            print(line, flush=True)
        return case

    def finish(self, **fields) -> dict:
        """Mark the report complete (every planned case ran, or the budget stopped it: `fields` say)."""
        self.report.update(fields, complete=True)
        write_report(self.path, self.report)
        return self.report
