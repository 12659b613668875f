"""Smoke runs of the study scripts on CPU (tiny shapes): they run end to end and write what they
promise. The benchmark scripts run through the device plan's dry run (tests/test_device_plan.py);
the GPU figures themselves come from scripts/device_plan.sh on a GPU."""

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


def test_convergence_study_smoke(tmp_path):
    out, plot = tmp_path / "conv.json", tmp_path / "conv.png"
    study = load("convergence_study")
    study.main(["--iters", "6", "--seeds", "7", "8", "--runs", "standard-fp32", "forge-fp32", "--reference",
                "standard-fp32", "--out", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"standard-fp32", "forge-fp32"} and plot.stat().st_size > 0
    assert report["reference"] == "standard-fp32"
    assert report["runs"]["forge-fp32"]["steps_within_1e-4_of_standard"] == 6
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
