"""Helpers the benchmark and study scripts share: timing, peak memory, running forge-pretrain-gpt
and writing reports."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


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


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak allocation during one call above what was allocated before it (None off a GPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def pretrain_records(argv: list[str]) -> list[dict] | None:
    """Run forge-pretrain-gpt in a fresh process (so an out-of-memory run cannot poison the
    caller); its per-iteration --forge-log-json records, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [sys.executable, "-m", "forge_megatron.cli.pretrain_gpt", *argv, "--forge-log-json", log]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(log):
            return None
        with open(log) as f:
            return [json.loads(line) for line in f]


def write_report(path: str | None, report: dict) -> None:
    """Write `report` as indented JSON to `path` (creating its folder); nothing if path is None."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
