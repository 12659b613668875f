"""Smoke runs of the study scripts on CPU (tiny shapes): they run end to end and write what they
promise. The benchmark scripts run through the device plan's dry run (tests/test_device_plan.py);
the GPU figures themselves come from scripts/device_plan.sh on a GPU."""

import importlib.util
import json
import os

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
