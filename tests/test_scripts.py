"""Smoke runs of the benchmark and study scripts on CPU (tiny shapes): they run end to end and
write what they promise. The GPU figures themselves come from scripts/gpu_bench.sh on a GPU."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kernel_smoke(tmp_path):
    out = tmp_path / "kernel.json"
    report = load("bench_kernel").main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(report["cases"]))
    for case in report["cases"]:
        for regime in ("forge-master", "forge-sr", "forge-sr-int8"):
            assert case[f"{regime}_ms"] > 0 and case[f"{regime}_speedup_vs_baseline"] > 0


def test_bench_layer_smoke(tmp_path):
    """In its own process: the script sets up a process group and model parallelism."""
    out = tmp_path / "layer.json"
    script = os.path.join(SCRIPTS, "bench_layer.py")
    proc = subprocess.run([sys.executable, script, "--smoke", "--dtype", "fp32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["standard_covered_weights"], report["forge_covered_weights"]) == (0, 4)
    assert report["standard_step_ms"] > 0 and report["forge_step_ms"] > 0
    # fp32: the first updates differ only by the wgrad GEMMs' summation order (AdamW's first step
    # is about lr * sign(g), so the difference is relative rounding, ~1e-7, and 0 for the norms).
    diffs = report["first_update_relative_difference"]
    assert len(diffs) == 6 and max(diffs.values()) <= 1e-5, diffs


def test_bench_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    load("bench_e2e").main(["--smoke", "--iters", "4", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"standard", "forge-master", "forge-sr-int8"}
    assert all(r["1"] is not None and r["1"]["iteration_ms"] > 0 for r in runs.values())


def test_bench_memory_compares_measurements_with_the_model():
    bench = load("bench_memory")
    budget = 24 * 2**30

    def fake_measure(flags, micro_batch):  # a device where the model is exact and 24 GiB fit
        from forge_megatron.megatron.args import add_forge_args
        from forge_megatron.tools import memory

        peak = memory.rank_memory(memory.parse_megatron_args(flags, extra_args_provider=add_forge_args),
                                  micro_batch, reserve_gib=0).total
        return peak if peak <= budget else None

    regimes = bench.compare(bench.emulated_rank(2, 1024), fake_measure, gib=24, max_micro_batch=64)
    assert set(regimes) == set(bench.REGIMES)
    for entry in regimes.values():
        assert entry["relative_error_mb1"] == pytest.approx(0.0) and entry["relative_error_mb2"] == pytest.approx(0.0)
        assert entry["largest_power_of_two_micro_batch"] >= 1
    assert regimes["forge-sr-int8"]["model_max_micro_batch"] >= regimes["standard"]["model_max_micro_batch"]


def test_bench_memory_measures_live_tensor_bytes_on_cpu(tmp_path):
    """The CPU measurement end to end (a tiny model): every regime runs, FORGE holds less than the
    standard run, and the model is within 25 % of the measurement (the tiny model's fixed costs, the
    CPU twin's block buffers and the launcher's own tensors weigh more here than on the 8B rank)."""
    out = tmp_path / "memory.json"
    regimes = load("bench_memory").main(["--smoke", "--iters", "2", "--out", str(out)])["regimes"]
    assert json.loads(out.read_text())["regimes"] == json.loads(json.dumps(regimes))
    for b in (1, 2):
        peaks = {name: entry[f"measured_peak_bytes_mb{b}"] for name, entry in regimes.items()}
        assert peaks["forge-sr-int8"] < peaks["forge-sr"] < peaks["forge-master"] < peaks["standard"], peaks
        assert all(abs(entry[f"relative_error_mb{b}"]) <= 0.25 for entry in regimes.values()), regimes


def test_live_tensor_memory_counts_storages_once_until_freed():
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    tracker = LiveTensorMemory()
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        view = a.view(10, 100)  # the same storage: not counted again
        b = a + 1  # 4000
        del b
        c = torch.empty(250, dtype=torch.float64)  # 2000, after b was freed
    assert (tracker.peak, tracker.current) == (8000, 6000)
    del a, view, c
    assert tracker.current == 0


def test_live_tensor_memory_ignores_tensors_made_before_it():
    """Views of, and in-place or out= writes to, storages made outside the mode allocate nothing."""
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    outside, other = torch.zeros(1000), torch.ones(1000)
    with LiveTensorMemory() as tracker:
        outside[:500].add_(1)
        outside.view(10, 100).mul_(2)
        torch.add(outside, other, out=outside)
        new = outside * 2  # 4000 bytes
    assert (tracker.peak, tracker.current) == (4000, 4000) and new.numel() == 1000


def test_read_and_reset_peak_starts_a_new_period_on_cpu():
    from forge_megatron.tools.benchmarking import LiveTensorMemory, read_and_reset_peak

    assert read_and_reset_peak() is None  # no GPU and no tracker: nothing to read
    with LiveTensorMemory():
        kept = torch.zeros(100)  # 400 bytes
        torch.zeros(1000)  # 4000, freed at once
        assert read_and_reset_peak() == 4400
        assert read_and_reset_peak() == 400  # the new period starts from what is alive
    assert LiveTensorMemory.active is None and kept.numel() == 100


def test_convergence_study_smoke(tmp_path):
    out, plot = tmp_path / "conv.json", tmp_path / "conv.png"
    study = load("convergence_study")
    study.main(["--iters", "12", "--seeds", "7", "8", "--runs", "standard-fp32", "forge-fp32", study.REFERENCE,
                "--out", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"standard-fp32", "forge-fp32", study.REFERENCE} and plot.stat().st_size > 0
    assert report["runs"]["forge-fp32"]["steps_within_1e-4_of_standard"] == 12
    assert set(report["by_seed"]) == {"7", "8"}
    reference_gap = report["gap_vs_reference_over_seeds"][study.REFERENCE]
    assert reference_gap["each"] == [0.0, 0.0] and reference_gap["n"] == 2
    fp32 = report["gap_vs_reference_over_seeds"]["forge-fp32"]
    assert fp32["mean"] == pytest.approx(sum(fp32["each"]) / 2) and fp32["stderr"] >= 0
