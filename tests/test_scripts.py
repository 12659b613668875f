"""Smoke runs of the benchmark and study scripts on CPU (tiny shapes): they run end to end and
write what they promise. The GPU figures themselves come from scripts/gpu_bench.sh on a GPU."""

import importlib.util
import json
import os
import re
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


TRAIN_TINY = os.path.join(SCRIPTS, "train_tiny_cpu.sh")


def train_tiny(env: dict, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """scripts/train_tiny_cpu.sh with this interpreter, its layout and batch variables in `env`."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MBS", "GBS")}
    environment.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", TRAIN_TINY, *flags], capture_output=True, text=True, env=environment,
                          timeout=timeout)


def test_train_tiny_cpu_runs_pipeline_and_data_parallel(tmp_path):
    """PP=2 x DP=2 (4 gloo ranks): the layout and the micro-batch arithmetic (global batch 8 over 2
    data-parallel ranks, 2 micro-batches of 2 each to fill the pipeline); --log-interval and
    --lr-warmup-iters follow --train-iters."""
    proc = train_tiny({"PP": "2", "DP": "2"}, "--train-iters", "4", "--eval-iters", "1", "--data-cache-path",
                      str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    parsed = dict(re.findall(r"^  (\w+) \.+ (\S+)$", proc.stdout, re.M))  # Megatron's argument dump
    assert {k: parsed[k] for k in ("pipeline_model_parallel_size", "data_parallel_size", "micro_batch_size",
                                   "global_batch_size", "log_interval", "lr_warmup_iters")} == {
        "pipeline_model_parallel_size": "2", "data_parallel_size": "2", "micro_batch_size": "2",
        "global_batch_size": "8", "log_interval": "1", "lr_warmup_iters": "1"}
    assert len(re.findall(r"iteration +\d+/ +4 \|.*lm loss", proc.stdout)) == 4  # one line per iteration
    assert "validation loss at iteration 4" in proc.stdout


@pytest.mark.parametrize("env, message", [
    ({"DP": "3"}, "GBS=8 is not a multiple of DP=3: each data-parallel rank takes whole micro-batches"),
    ({"DP": "2", "MBS": "3"}, "GBS=8 is not a multiple of MBS*DP=6 (Megatron's training and evaluation batches): "
                              "set MBS to a divisor of 4, or GBS"),
    ({"PP": "two"}, "TP, PP, DP, GBS and MBS are positive integers (got 'two')"),
])
def test_train_tiny_cpu_refuses_a_batch_that_does_not_divide_in_one_line(env, message):
    proc = train_tiny(env, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"train_tiny_cpu.sh: error: {message}\n", proc.stderr
