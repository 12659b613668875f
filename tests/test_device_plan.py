"""The device plan's dry run on CPU (scripts/device_plan.py --device cpu: the same code as on the
GPU, tiny shapes, the Triton kernel interpreted): every part writes a valid JSON report after
every case, so that a part stopped at any moment has returned what it measured; a killed part's
report is still valid; a run that crashes is recorded as an error, never as "does not fit"; and
the tile configs the kernel part sweeps compile without spills under the device's Triton and the
venv's (the committed compile reports)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from test_scripts import SCRIPTS, load

from forge_megatron.core import plan as plan_module
from forge_megatron.core.plan import TILE_SPACE, tile_space_key
from forge_megatron.tools import benchmarking

RESULTS = os.path.join(os.path.dirname(__file__), "..", "bench", "results")


@pytest.fixture
def writes(monkeypatch):
    """Every report the parts write, parsed at the moment it is written (so each must be valid
    JSON then), by file name."""
    seen: dict[str, list[dict]] = {}
    write = benchmarking.write_report

    def recording(path, report):
        write(path, report)
        if path is not None:
            with open(path) as f:
                seen.setdefault(os.path.basename(path), []).append(json.load(f))

    monkeypatch.setattr(benchmarking, "write_report", recording)
    for name in ("bench_kernel", "bench_memory", "bench_e2e"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # reloaded: they bind write_report at import
    monkeypatch.syspath_prepend(SCRIPTS)
    return seen


def plan(part, out, *extra):
    """A part's dry run, with a budget no CI machine reaches (the budgets are the GPU's)."""
    return load("device_plan").main([part, "--device", "cpu", "--out", str(out), "--budget-s", "900", *extra])


def grows_case_by_case(reports: list[dict], key: str = "cases") -> None:
    """Each write holds every case of the one before, plus one; only the last is complete."""
    counts = [len(r[key]) for r in reports]
    assert counts == sorted(counts) and counts[-1] >= 2 and len(reports) >= counts[-1], counts
    assert [r.get("complete") for r in reports[:-1]] == [False] * (len(reports) - 1) and reports[-1]["complete"]
    assert reports[-1]["device_type"] == "cpu" and reports[-1]["torch"] == torch.__version__


def test_smoke_checks_the_kernel_against_the_reference(tmp_path, writes):
    report = plan("smoke", tmp_path)
    grows_case_by_case(writes["plan_smoke.json"])
    cases = report["cases"]
    assert {c["store"] for c in cases if "rule" in c} == {"master", "sr"} and len(cases) >= 9
    assert all(c["ok"] for c in cases if "ok" in c), [c for c in cases if not c.get("ok", True)]
    assert all(0 < c["gradient_bound_ratio"] <= 1 for c in cases if "gradient_bound_ratio" in c)
    assert any(c.get("nan") and c["nan_rows"] == 8 for c in cases)
    assert any("skipped" in c for c in cases if c.get("graph"))  # CUDA graphs need a GPU


def test_kernel_times_forge_beside_the_baseline_and_sweeps_the_tile_configs(tmp_path, writes):
    plan("kernel", tmp_path)
    grows_case_by_case(writes["kernel.json"])
    report = writes["kernel.json"][-1]
    assert report["ceilings"]["copy_GBps"] > 0 and report["stopped"] is None
    for case in (c for c in report["cases"] if c["kind"] == "case"):
        for regime in ("forge-master", "forge-sr", "forge-sr-int8"):
            assert case[f"{regime}_ms"] > 0 and case[f"{regime}_speedup_vs_baseline"] > 0
    sweeps = [c for c in report["cases"] if c["kind"] == "sweep"]
    assert {c["regime"] for c in sweeps} == {"forge-master", "forge-sr", "forge-sr-int8"}
    assert all(list(c["configs"]) == [repr(config) for config in TILE_SPACE[tile_space_key(
        torch.bfloat16, "int8" if "int8" in c["regime"] else "fp32")][:2]] and c["fastest"] for c in sweeps)


def test_kernel_stops_at_its_budget_with_what_it_measured(tmp_path, writes):
    load("bench_kernel").main(["--smoke", "--budget-s", "0", "--out", str(tmp_path / "k.json")])
    report = writes["k.json"][-1]
    assert report["complete"] and report["cases"] == [] and report["stopped"].startswith("budget")


def test_layer_checks_the_gradient_against_the_standard_layers(tmp_path):
    """bench_layer in its own process (as on the GPU), fp32: each covered weight's gradient equals
    the standard layer's in Megatron's grad buffer up to the wgrad GEMMs' summation order, and so
    does the first update of every weight (AdamW's first step is about -lr sign(g))."""
    report = plan("layer", tmp_path)
    assert [c["returncode"] for c in report["cases"]] == [0], report["cases"]
    layer = json.loads((tmp_path / "layer_fp32.json").read_text())
    assert (layer["standard_covered_weights"], layer["forge_covered_weights"]) == (0, 4)
    assert layer["standard_step_ms"] > 0 and layer["forge_step_ms"] > 0
    gradients, updates = layer["gradient_relative_difference"], layer["first_update_relative_difference"]
    assert len(gradients) == 4 and max(gradients.values()) <= 1e-5, gradients
    assert len(updates) == 6 and max(updates.values()) <= 1e-5, updates


def test_e2e_runs_megatrons_loop_with_and_without_forge(tmp_path, writes):
    plan("e2e", tmp_path)
    reports = writes["e2e.json"]
    grows_case_by_case(reports)
    runs = reports[-1]["runs"]
    assert set(runs) == {"standard", "forge-master", "forge-sr-int8"}
    assert all(r["1"]["iteration_ms"] > 0 for r in runs.values())
    assert "no Transformer Engine" in reports[-1]["baseline_note"] and set(reports[-1]["speedups_vs_standard"]) == {
        "forge-master", "forge-sr-int8"}


def test_a_crash_is_not_an_out_of_memory_result(monkeypatch, tmp_path, writes):
    """Only a run that ran out of device memory 'does not fit'; any other failure is an error in
    the report (memory: the search stops there; e2e: the run is not counted as not fitting)."""
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ImportError: no module named x")
    out_of_memory = subprocess.CompletedProcess([], 1, stdout="", stderr="torch.OutOfMemoryError: CUDA out of memory")
    assert benchmarking.ran_to_the_end(subprocess.CompletedProcess([], 0)) is True
    assert benchmarking.ran_to_the_end(out_of_memory) is False
    with pytest.raises(RuntimeError, match="not for lack of memory"):
        benchmarking.ran_to_the_end(failed)

    bench_memory = load("bench_memory")
    calls = []

    def measure(argv, b, *unused, **timeout):
        calls.append(b)
        if b == 2:
            raise RuntimeError("the run failed (exit 1), not for lack of memory")
        return [benchmarking.RankMemory(2**30 * b, 2**29)]

    regimes = bench_memory.compare(bench_memory.SMOKE, measure, gib=None, max_micro_batch=64,
                                   regimes={"standard": []}, micro_batch_sizes=(1, 2))
    entry = regimes["standard"]
    assert calls == [1, 2] and entry["fits"] == {"1": True} and "not for lack of memory" in entry["errors"]["2"]
    assert entry["largest_power_of_two_micro_batch"] == 1  # the search did not go on from an error

    bench_e2e = load("bench_e2e")

    def crashes(model, flags, b, iters, timeout=None):
        raise RuntimeError("the run failed (exit 1), not for lack of memory")

    monkeypatch.setattr(bench_e2e, "run", crashes)
    report = bench_e2e.main(["--smoke", "--out", str(tmp_path / "e2e.json")])
    assert all(c["error"] and not c["fits"] for c in report["cases"]) and len(report["cases"]) == 3


def test_memory_and_tests_parts_write_case_by_case(monkeypatch, tmp_path, writes):
    """The memory part's plumbing with the model standing in for Megatron's runs (the real ones
    run in tests/test_memory_measured.py), and the tests part on a one-test file."""
    bench_memory = load("bench_memory")
    monkeypatch.setitem(sys.modules, "bench_memory", bench_memory)

    def measure(argv, b, *unused, **timeout):
        return [benchmarking.RankMemory(2**30, 2**29)]

    monkeypatch.setattr(bench_memory, "measure", measure)
    plan("memory", tmp_path)
    reports = writes["memory.json"]
    assert len(reports) >= 3 and reports[-1]["complete"] and set(reports[-1]["regimes"]) == {"standard",
                                                                                               "forge-sr-int8"}
    assert all(json.dumps(r) for r in reports)

    test_file = tmp_path / "test_one.py"
    test_file.write_text("def test_one():\n    assert True\n")
    device_plan = load("device_plan")
    monkeypatch.setattr(device_plan, "GPU_TESTS", [str(test_file), str(test_file)])
    report = device_plan.main(["tests", "--device", "cpu", "--out", str(tmp_path)])
    assert [c["returncode"] for c in report["cases"]] == [0, 0] and "1 passed" in report["cases"][0]["summary"]
    grows_case_by_case(writes["plan_tests.json"])


def test_a_killed_part_keeps_the_cases_it_finished(tmp_path):
    """The smoke part killed after its second case: its report is valid JSON with those cases."""
    path = tmp_path / "plan_smoke.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(SCRIPTS, ".."))
    proc = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "device_plan.py"), "smoke", "--device", "cpu",
                             "--out", str(tmp_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(json.loads(path.read_text())["cases"]) >= 2:
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    report = json.loads(path.read_text())
    assert len(report["cases"]) >= 2 and not report["complete"]


def test_the_swept_tile_configs_compile_without_spills_on_both_tritons(monkeypatch):
    """TILE_SPACE's first config per regime is the GPU's default; every config compiled for sm_90a
    under the device's Triton (3.6) and the venv's without spills (scripts/compile_report.py
    --space wrote the reports)."""
    monkeypatch.setattr(plan_module, "interpreting", lambda: False)  # the GPU's defaults, not the interpreter's
    for key, configs in TILE_SPACE.items():
        assert configs[0] == plan_module.default_config(torch.device("cuda"), torch.bfloat16, "int8" if "int8" in key
                                                 else "fp32")
    wanted = {(key, repr(c)) for key, configs in TILE_SPACE.items() for c in configs}
    for version in ("3.6", "3.8"):
        with open(os.path.join(RESULTS, f"compile_sm90_space_triton{version}.json")) as f:
            report = json.load(f)
        assert report["triton"].startswith(version)
        records = report["space"]
        assert {(r["space"], r["config"]) for r in records} == wanted
        assert all(r["spill_stores"] == r["spill_loads"] == 0 for r in records), [r for r in records if r["spill_stores"]]


def test_the_devices_triton_compiles_every_rule_and_regime_cleanly():
    """The committed compile report under the GPU machine's Triton (scripts/compile_report.py run
    in a Triton 3.6 venv, as tests/test_compile.py checks under the venv's): every rule in every
    regime without spills, with wgmma for bf16 (but with 8-bit states), correctly rounded division and square root, and
    no epilogue FMA (the control with contraction on has some)."""
    from forge_megatron import registered_rules

    with open(os.path.join(RESULTS, "compile_sm90_triton3.6.json")) as f:
        report = json.load(f)
    assert report["triton"].startswith("3.6") and report["target"] == "sm_90a"
    *records, control = report["records"]
    assert {r["rule"] for r in records} == set(registered_rules()) and len(records) == 6 * len(registered_rules())
    assert all(r["spill_stores"] == r["spill_loads"] == r["epilogue_fmas"] == 0 and r["cp_async"] for r in records)
    assert all(r["wgmma"] == (r["states"] != "int8") for r in records if "bfloat16" in r["dtype"])  # test_compile
    assert not any(r["div_full"] or r["sqrt_approx"] for r in records) and control["epilogue_fmas"] > 0
