"""FORGE-Muon in Megatron's own loop (forge-pretrain-gpt --optimizer muon --use-forge) against
standard Megatron with --optimizer muon and the same flags (emerging_optimizers' Muon for the
matrices, Adam for the output layer and the rest), fp32, 20 steps, within 1e-5 in loss and weights:
TP=1 with two micro-batches per step and two-pass clipping active at every step, TP=2 + SP in
--muon-tp-mode duplicated (with Nesterov) and blockwise, a save -> resume that is exact; a switch
between standard and FORGE Muon with the optimizer state is one line."""

import pytest
from training_runs import TOL, Run, assert_same_training, checkpoint, forge_state, rel, run_all

MUON = ["--optimizer", "muon", "--muon-fp32-matmul-prec", "high"]  # fp32 matmuls on a CPU (medium: bf16 where it has AMX)
CLIPPED = ["--clip-grad", "0.05", "--global-batch-size", "8", "--save-interval", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    work = str(tmp_path_factory.mktemp("muon"))
    first = run_all(data, {
        "standard": Run(work, "standard", *MUON, *CLIPPED),
        "forge": Run(work, "forge", *MUON, *CLIPPED, "--use-forge", "--forge-clip-grad-mode", "two-pass"),
        "standard-duplicated": Run(work, "standard-duplicated", *MUON, "--clip-grad", "0", "--muon-tp-mode",
                                   "duplicated", "--muon-nesterov", tp=2),
        "forge-duplicated": Run(work, "forge-duplicated", *MUON, "--clip-grad", "0", "--muon-tp-mode", "duplicated",
                                "--muon-nesterov", "--use-forge", tp=2),
        "standard-blockwise": Run(work, "standard-blockwise", *MUON, "--clip-grad", "0", tp=2),
        "forge-blockwise": Run(work, "forge-blockwise", *MUON, "--clip-grad", "0", "--use-forge", tp=2),
    })
    resumed = run_all(data, {
        "resume": Run(work, "resume", *MUON, *CLIPPED, "--use-forge", "--forge-clip-grad-mode", "two-pass", "--load",
                      first["forge"].save, "--ckpt-step", "10"),
        # a switch between standard and FORGE Muon with the optimizer state: refused
        "switch-to-forge": Run(work, "switch-to-forge", *MUON, *CLIPPED, "--use-forge", "--load",
                               first["standard"].save, "--ckpt-step", "10", expect_ok=False),
        "switch-to-standard": Run(work, "switch-to-standard", *MUON, *CLIPPED, "--load", first["forge"].save,
                                  "--ckpt-step", "10", expect_ok=False),
    })
    return {**first, **resumed}


def test_two_micro_batches_with_two_pass_clipping_match_standard_muon(runs):
    forge, standard = runs["forge"], runs["standard"]
    assert "FORGE: rule muon" in forge.stdout
    norms = standard.record("grad-norm")
    assert len(norms) == 20 and all(n > 0.05 for n in norms.values())  # clipping acts at every step
    for i, norm in forge.record("grad-norm").items():
        assert abs(norm - norms[i]) <= TOL * norms[i]
    assert_same_training(forge, standard)


@pytest.mark.parametrize("mode", ["duplicated", "blockwise"])
def test_tp2_with_sequence_parallelism_matches_standard_muon(runs, mode):
    assert_same_training(runs[f"forge-{mode}"], runs[f"standard-{mode}"])


def test_a_resumed_run_continues_exactly(runs):
    """From the checkpoint at iteration 10: the same losses, weights and momenta at 20 (bit for bit)."""
    resumed, straight = runs["resume"], runs["forge"]
    assert resumed.losses() == {i: v for i, v in straight.losses().items() if i > 10}
    a, _ = checkpoint(resumed.save)
    b, _ = checkpoint(straight.save)
    state = forge_state(b)
    assert any("momentum_buffer" in k for k in state), sorted(state)[:5]
    for key in [*state, *(k for k in b if k.endswith("linear_fc1.weight") and not k.startswith("optimizer"))]:
        assert rel(a[key], b[key]) == 0, key


def test_a_switch_between_standard_and_forge_muon_is_one_line(runs):
    """Megatron's Muon optimizer is a chain (Muon's groups, then Adam's) matched group by group on
    load, which a FORGE run's optimizer (without the covered matrices) cannot follow: one line,
    either way."""
    for name, saved, run, fix in (("switch-to-forge", "standard", "FORGE's", ""),
                                  ("switch-to-standard", "FORGE", "standard", "resume it with --use-forge, or ")):
        proc = runs[name]
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
            f"forge-pretrain-gpt: error: the checkpoint is a {saved} Muon run's, whose optimizer groups a {run} Muon "
            "run cannot match (Megatron chains Muon's and Adam's in order; a FORGE run's lack the covered matrices); "
            f"{fix}add --no-load-optim to load the weights only"], (name, proc.stderr[-2000:])
