"""Smoke runs of the benchmark and study scripts on CPU (tiny shapes): they run end to end and
write what they promise. The GPU figures themselves come from scripts/gpu_bench.sh on a GPU."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

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


def test_convergence_study_smoke(tmp_path):
    out, plot = tmp_path / "conv.json", tmp_path / "conv.png"
    study = load("convergence_study")
    study.main(["--iters", "12", "--seeds", "7", "8", "--runs", "standard-fp32", "forge-fp32", "--reference",
                "standard-fp32", "--out", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"standard-fp32", "forge-fp32"} and plot.stat().st_size > 0
    assert report["reference"] == "standard-fp32"
    assert report["runs"]["forge-fp32"]["steps_within_1e-4_of_standard"] == 12
    assert set(report["by_seed"]) == {"7", "8"}
    reference_gap = report["gap_vs_reference_over_seeds"]["standard-fp32"]
    assert reference_gap["each"] == [0.0, 0.0] and reference_gap["n"] == 2
    fp32 = report["gap_vs_reference_over_seeds"]["forge-fp32"]
    assert fp32["mean"] == pytest.approx(sum(fp32["each"]) / 2) and fp32["stderr"] >= 0
