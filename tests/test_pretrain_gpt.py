"""forge-pretrain-gpt end to end on CPU, in Megatron's own training loop (megatron.training.pretrain):
--use-forge against standard Megatron (its own optimizer) in each clipping mode at TP=1 and
TP=2 + SP, the lr/wd schedule, checkpoints (resume bit for bit with the default clipping, both
checkpoint formats, TP resharding, fresh FORGE state, --no-load-optim, a bf16 --finetune), Megatron's
--exit-interval / --save-interval / --tensorboard-dir, full recompute, the rerun guard and the
command line's behaviour (--help, one-line refusals).

Each run is a real CLI process (torchrun with 2 gloo ranks for TP=2); per-iteration values come
from Megatron's tensorboard log (float32), weights from the torch_dist checkpoints the runs save.
Independent runs go two at a time.
"""

import os
import subprocess
import sys

import pytest
import torch
from prewarmed import launch_in_subprocess
from training_runs import (
    BASE,
    MLA_MTP,
    TOL,
    Run,
    assert_same_training,
    checkpoint,
    forge_state,
    forge_steps,
    model_keys,
    rel,
    run_all,
)

from forge_megatron.hf.checkpoint import load_torch_file
from forge_megatron.tools import benchmarking
from forge_megatron.tools.benchmarking import run_pretrain


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    work = str(tmp_path_factory.mktemp("runs"))
    first = run_all(data, {
        "standard": Run(work, "standard", "--clip-grad", "0", "--save-interval", "20"),
        "forge": Run(work, "forge", "--use-forge", "--clip-grad", "0", "--save-interval", "20"),
        # two-pass clipping on a model with multi-latent attention and multi-token prediction
        "standard-clip": Run(work, "standard-clip", *MLA_MTP, "--clip-grad", "0.05", "--save-interval", "10"),
        "forge-two-pass": Run(work, "forge-two-pass", *MLA_MTP, "--use-forge", "--clip-grad", "0.05",
                              "--forge-clip-grad-mode", "two-pass", "--save-interval", "10"),
        # the default clipping (auto: progressive at one micro-batch in one process), and stale
        "forge-auto": Run(work, "forge-auto", "--use-forge", "--clip-grad", "0.05", "--save-interval", "10"),
        "forge-stale": Run(work, "forge-stale", "--use-forge", "--clip-grad", "0.05", "--forge-clip-grad-mode",
                           "stale"),
        "standard-tp2": Run(work, "standard-tp2", "--clip-grad", "0", "--save-interval", "20", tp=2),
        "forge-tp2": Run(work, "forge-tp2", "--use-forge", "--clip-grad", "0", "--save-interval", "20", tp=2),
        "standard-clip-tp2": Run(work, "standard-clip-tp2", *MLA_MTP, "--clip-grad", "0.05", tp=2),
        "forge-two-pass-tp2": Run(work, "forge-two-pass-tp2", *MLA_MTP, "--use-forge", "--clip-grad", "0.05",
                                  "--forge-clip-grad-mode", "two-pass", tp=2),
        # full recompute, and stale clipping that never triggers (one run for two tests)
        "forge-recompute": Run(work, "forge-recompute", "--use-forge", "--clip-grad", "1e9", "--forge-clip-grad-mode", "stale",
                               "--save-interval", "20",
                               "--recompute-granularity", "full", "--recompute-method", "uniform",
                               "--recompute-num-layers", "1"),
        "int8-tp2": Run(work, "int8-tp2", "--use-forge", "--forge-state-dtype", "int8", "--clip-grad", "0",
                        "--train-iters", "3", "--lr-warmup-iters", "1", "--save-interval", "3", tp=2),
        "torch-format-10": Run(work, "torch-format-10", "--use-forge", "--clip-grad", "0.05", "--ckpt-format",
                               "torch", "--exit-interval", "10"),
        "standard-torch-format": Run(work, "standard-torch-format", "--clip-grad", "0", "--ckpt-format", "torch",
                                     "--train-iters", "2", "--lr-warmup-iters", "1", "--save-interval", "2"),
    })
    auto = first["forge-auto"].save
    second = run_all(data, {
        # resume the default-clipping run from iteration 10; --exit-interval stops (and saves) at 15
        "resume-15": Run(work, "resume-15", "--use-forge", "--clip-grad", "0.05", "--load", auto, "--ckpt-step",
                         "10", "--exit-interval", "15"),
        "torch-format-20": Run(work, "torch-format-20", "--use-forge", "--clip-grad", "0.05", "--ckpt-format", "torch",
                               "--load", first["torch-format-10"].save),
        "reshard-tp2-to-tp1": Run(work, "reshard-tp2-to-tp1", "--use-forge", "--load", first["forge-tp2"].save,
                                  "--ckpt-convert-format", "torch_dist", "--ckpt-convert-save",
                                  os.path.join(work, "reshard-tp2-to-tp1", "converted")),
        "reshard-tp1-to-tp2": Run(work, "reshard-tp1-to-tp2", "--use-forge", "--load", first["forge"].save,
                                  "--ckpt-convert-format", "torch_dist", "--ckpt-convert-save",
                                  os.path.join(work, "reshard-tp1-to-tp2", "converted"), tp=2),
        "int8-tp1": Run(work, "int8-tp1", "--use-forge", "--forge-state-dtype", "int8", "--train-iters", "3",
                        "--lr-warmup-iters", "1", "--load", first["int8-tp2"].save, "--ckpt-convert-format", "torch_dist",
                        "--ckpt-convert-save", os.path.join(work, "int8-tp1", "converted")),
        # switch at iteration 10, keeping the optimizer state: standard -> FORGE and FORGE -> standard
        "switch-to-forge": Run(work, "switch-to-forge", *MLA_MTP, "--use-forge", "--clip-grad", "0.05",
                               "--forge-clip-grad-mode", "two-pass", "--load", first["standard-clip"].save,
                               "--ckpt-step", "10"),
        "switch-to-standard": Run(work, "switch-to-standard", *MLA_MTP, "--clip-grad", "0.05", "--load",
                                  first["forge-two-pass"].save, "--ckpt-step", "10"),
        # switches whose optimizer state does not map: one line each
        "int8-to-standard": Run(work, "int8-to-standard", "--clip-grad", "0", "--load", first["int8-tp2"].save,
                                expect_ok=False),
        "torch-format-to-standard": Run(work, "torch-format-to-standard", "--clip-grad", "0.05", "--ckpt-format",
                                        "torch", "--load", first["torch-format-10"].save, expect_ok=False),
        "torch-format-to-forge": Run(work, "torch-format-to-forge", "--use-forge", "--clip-grad", "0", "--ckpt-format",
                                     "torch", "--load", first["standard-torch-format"].save, expect_ok=False),
        "no-load-optim": Run(work, "no-load-optim", "--use-forge", "--clip-grad", "0", "--train-iters", "21",
                             "--override-opt-param-scheduler", "--load", first["forge"].save, "--no-load-optim"),
        # bf16 from the fp32 checkpoint, another seed (so that its initialization is not the other run's)
        "finetune": Run(work, "finetune", "--use-forge", "--clip-grad", "0", "--train-iters", "6", "--load",
                        first["forge"].save, "--finetune", "--bf16", "--seed", "4321"),
    })
    third = run_all(data, {"resume-20": Run(work, "resume-20", "--use-forge", "--clip-grad", "0.05", "--load",
                                            second["resume-15"].save)})
    return {**first, **second, **third}


def test_forge_without_clipping_matches_standard_megatron(runs):
    assert "weight-gradient memory not allocated" in runs["forge"].stdout + runs["forge"].stderr
    assert_same_training(runs["forge"], runs["standard"])


def test_forge_matches_standard_megatron_at_tp2_with_sequence_parallelism(runs):
    assert_same_training(runs["forge-tp2"], runs["standard-tp2"])


def test_two_pass_clipping_matches_the_standard_clipped_run(runs):
    """On a model with multi-latent attention and a multi-token-prediction layer, at TP=1 and at
    TP=2 with sequence parallelism: the same grad norm (FORGE's part counted once), losses of both
    heads and weights as standard Megatron's, with clipping active at every step."""
    for forge, standard in (("forge-two-pass", "standard-clip"), ("forge-two-pass-tp2", "standard-clip-tp2")):
        std, fg = runs[standard], runs[forge]
        assert "linear_kv_down_proj 3" in fg.stdout and "eh_proj 1" in fg.stdout  # the FORGE log line
        mtp, mtp_reference = fg.record("mtp_1 loss"), std.record("mtp_1 loss")
        assert len(mtp) == 20 and all(abs(mtp[i] - mtp_reference[i]) <= TOL * mtp_reference[i] for i in mtp)
        norms = std.record("grad-norm")
        assert len(norms) == 20 and all(n > 0.05 for n in norms.values())  # clipping was active at every step
        for i, norm in fg.record("grad-norm").items():
            assert abs(norm - norms[i]) <= TOL * norms[i]
            assert fg.record("forge/grad-scale")[i] == pytest.approx(0.05 / (norms[i] + 1e-6), rel=TOL)
        assert_same_training(fg, std)


def test_stale_clipping_uses_the_previous_steps_global_norm(runs):
    forge = runs["forge-stale"]
    scale, norm = forge.record("forge/grad-scale"), forge.record("grad-norm")
    assert scale[1] == 1.0  # no previous norm at the first step
    assert any(s < 1.0 for s in scale.values())
    for i in range(2, 21):
        assert scale[i] == pytest.approx(min(1.0, 0.05 / (norm[i - 1] + 1e-6)), rel=1e-6), i


def test_stale_clipping_that_never_triggers_matches_standard_megatron(runs):
    """(The run also recomputes activations: the same bits as without, test below.)"""
    a, b = runs["forge-recompute"].losses(), runs["standard"].losses()
    assert set(runs["forge-recompute"].record("forge/grad-scale").values()) == {1.0}
    assert all(abs(a[i] - b[i]) <= TOL * abs(b[i]) for i in b) and len(a) == 20


def test_forge_follows_megatrons_lr_and_weight_decay_schedule(runs):
    forge, std = runs["forge"], runs["standard"]
    lrs = std.record("learning-rate")
    assert lrs[1] < lrs[5] and max(lrs.values()) == pytest.approx(3e-3) and lrs[20] < lrs[10]  # warmup, cosine
    assert forge.record("learning-rate") == lrs
    # FORGE logs the lr its step used; Megatron logs the lr its scheduler set after the step
    forge_lrs = forge.record("forge/learning-rate")
    assert forge_lrs[1] == 0.0 and all(forge_lrs[i] == lrs[i - 1] for i in range(2, 21))
    assert all(wd == pytest.approx(0.1) for wd in forge.record("forge/weight-decay").values())


def test_the_default_clipping_is_progressive_at_one_micro_batch_and_its_first_step_exact(runs):
    """auto at one micro-batch in one process: the first step, with no norm to estimate from, runs
    a norms-only pass first (exact coefficient); every later step one pass, each weight's
    coefficient from the running estimate (not stale's: the weights updated later see this step)."""
    auto, stale = runs["forge-auto"], runs["forge-stale"]
    assert "FORGE: clipping auto -> progressive" in auto.stdout
    assert auto.record("forge/forward-passes") == {1: 2.0, **{i: 1.0 for i in range(2, 21)}}
    errors, stale_errors = auto.record("forge/clip-coefficient-error"), stale.record("forge/clip-coefficient-error")
    assert errors[1] < 1e-5 and stale_errors[1] > 1  # stale's first step is unclipped (coefficient 1)
    assert all(0 < errors[i] < 1 for i in range(2, 21)), errors


def test_resume_with_the_default_clipping_is_bit_exact(runs):
    """Saved at 10, resumed, stopped by --exit-interval at 15 (saving), resumed again to 20: every
    later iteration's loss and every final tensor (model and FORGE state) as in the uninterrupted
    run. The last norm and each weight's sum of squares (progressive clipping's starting estimate)
    travel in the checkpoint, so the first resumed step clips as the uninterrupted one did."""
    reference = runs["forge-auto"].losses()
    resumed = {**runs["resume-15"].losses(), **runs["resume-20"].losses()}
    assert sorted(runs["resume-15"].losses()) == list(range(11, 16))  # --exit-interval 15
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[i] == reference[i] for i in resumed), (resumed, reference)
    assert runs["resume-15"].record("forge/grad-scale")[11] == runs["forge-auto"].record("forge/grad-scale")[11] < 1
    assert runs["resume-15"].record("forge/forward-passes")[11] == 1  # no exact first step after a resume
    assert sorted(os.listdir(runs["forge-auto"].save)) == ["iter_0000010", "iter_0000020",
                                                            "latest_checkpointed_iteration.txt"]  # --save-interval
    final, common = checkpoint(runs["resume-20"].save)
    uninterrupted, common_ref = checkpoint(runs["forge-auto"].save)
    assert final.keys() == uninterrupted.keys() and forge_state(final)
    for key in final:
        assert torch.equal(final[key], uninterrupted[key]), key
    assert common["optimizer"]["forge"] == common_ref["optimizer"]["forge"]
    assert len(common["optimizer"]["forge"]["__controller__"]["weight_sumsqs"]) == 9  # 4 per layer, the output layer


def test_resume_in_the_torch_checkpoint_format_is_bit_exact(runs):
    reference = runs["forge-auto"].losses()
    first, second = runs["torch-format-10"].losses(), runs["torch-format-20"].losses()
    assert sorted(first) == list(range(1, 11)) and sorted(second) == list(range(11, 21))
    assert all(v == reference[i] for i, v in {**first, **second}.items())
    saved = load_torch_file(os.path.join(runs["torch-format-10"].save, "iter_0000010", "mp_rank_00",
                                         "model_optim_rng.pt"))  # no pickled code: weights_only=True
    forge = saved["optimizer"]["forge"]
    assert forge["__controller__"]["grad_norm"] > 0
    assert {entry["step"] for name, entry in forge.items() if name != "__controller__"} == {10}


def test_checkpoints_reshard_forge_state_between_tp_sizes(runs):
    for saved, converted in ((runs["forge-tp2"].save, "reshard-tp2-to-tp1"), (runs["forge"].save, "reshard-tp1-to-tp2")):
        (a, common_a) = checkpoint(saved)
        (b, common_b) = checkpoint(os.path.join(runs[converted].dir, "converted", "torch_dist"))
        state_a, state_b = forge_state(a), forge_state(b)
        assert len(state_a) == 2 * 5  # exp_avg, exp_avg_sq of qkv, proj, fc1, fc2 (layers stacked) and output
        assert state_a.keys() == state_b.keys()
        for key in [*state_a, *model_keys(a)]:
            assert torch.equal(a[key], b[key]), key
        assert common_a["optimizer"]["forge"] == common_b["optimizer"]["forge"]  # the stale norm
        assert forge_steps(a) == forge_steps(b) == {20}


def test_int8_state_checkpoints_reshard_between_tp_sizes(runs):
    """8-bit codes and their block scales (one per 32 columns) round-trip TP=2 -> TP=1."""
    a, _ = checkpoint(runs["int8-tp2"].save)
    b, _ = checkpoint(os.path.join(runs["int8-tp1"].dir, "converted", "torch_dist"))
    state_a, state_b = forge_state(a), forge_state(b)
    assert any(k.startswith("optimizer.forge.exp_avg.scale") for k in state_a) and state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_a_run_switches_between_forge_and_standard_keeping_its_optimizer_state(runs):
    """Standard Megatron for 10 iterations then FORGE for 10, and the reverse, each resumed from the
    other's checkpoint with its optimizer state (moments under Megatron's own keys, the step count
    Megatron's): the same losses and weights as standard Megatron's 20 iterations."""
    reference = runs["standard-clip"]
    weights, _ = checkpoint(reference.save)
    for name in ("switch-to-forge", "switch-to-standard"):
        run = runs[name]
        losses, expected = run.losses(), reference.losses()
        assert sorted(losses) == list(range(11, 21)), name
        assert all(abs(losses[i] - expected[i]) <= TOL * expected[i] for i in losses), name
        switched, _ = checkpoint(run.save)
        for key in model_keys(weights):
            assert rel(switched[key], weights[key]) <= TOL, (name, key)
    tensors, _ = checkpoint(runs["switch-to-forge"].save)
    assert forge_steps(tensors) == {20}  # Megatron's step count at 10, then FORGE's ten


def test_a_switch_whose_optimizer_state_does_not_map_is_one_line(runs):
    for name, message in (("int8-to-standard", "the checkpoint holds FORGE optimizer state (exp_avg, exp_avg_sq) that "
                                               "Megatron's optimizer does not keep; resume it with --use-forge, or add "
                                               "--no-load-optim to load the weights only"),
                          ("torch-format-to-standard", "the checkpoint (--ckpt-format torch) holds FORGE optimizer "
                                                       "state, which a standard run reads from torch_dist checkpoints "
                                                       "only; add --no-load-optim to load the weights only"),
                          ("torch-format-to-forge", "the checkpoint (--ckpt-format torch) is standard Megatron's; FORGE "
                                                    "reads a standard optimizer state from torch_dist checkpoints only: "
                                                    "add --no-load-optim to load the weights only")):
        run = runs[name]
        assert run.returncode == 2, name
        assert [line for line in run.stderr.splitlines() if "error:" in line] == [
            f"forge-pretrain-gpt: error: {message}"], (name, run.stderr[-2000:])


def test_no_load_optim_and_finetune(runs):
    assert sorted(runs["no-load-optim"].losses()) == [21]  # the iteration count resumes
    tensors, _ = checkpoint(runs["no-load-optim"].save)
    assert forge_steps(tensors) == {1}  # FORGE state is optimizer state
    assert sorted(runs["finetune"].losses()) == [1, 2, 3, 4, 5, 6]  # the iteration count restarts
    tensors, _ = checkpoint(runs["finetune"].save)
    assert forge_steps(tensors) == {6}
    # The bf16 fine-tune's covered weights went on from the loaded ones (FORGE's fp32 masters take their
    # values: measured 0.14-0.19 away after 6 steps), not from its own initialization (1.2-1.3 away).
    trained, _ = checkpoint(runs["forge"].save)
    covered = [k for k in model_keys(trained) if k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))]
    assert len(covered) == 4 and all(tensors[k].dtype == torch.bfloat16 for k in covered)
    for key in covered:
        assert rel(tensors[key], trained[key]) < 0.5, (key, rel(tensors[key], trained[key]))


def test_activation_recompute_updates_once_per_backward(runs):
    """Full recompute re-runs each layer's forward inside backward; FORGE's update lives in the
    backward of its autograd function, so it still fires once per weight and step: the same bits
    as the run without recompute (its stale clipping never triggers: scale 1, as clipping off)."""
    assert runs["forge-recompute"].losses() == runs["forge"].losses()
    weights, _ = checkpoint(runs["forge-recompute"].save)
    reference, _ = checkpoint(runs["forge"].save)
    assert forge_steps(weights) == {20}
    for key in model_keys(reference) + list(forge_state(reference)):
        assert torch.equal(weights[key], reference[key]), key


def test_checkpoint_has_forge_state_honours_ckpt_step(runs, tmp_path):
    """A checkpoint folder whose iteration 10 is a standard run's and whose latest (20) is a FORGE
    run's: the check follows --ckpt-step. (In a fresh process: Megatron's checkpoint code needs
    the CPU shims.)"""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    os.symlink(os.path.join(runs["standard"].save, "iter_0000020"), mixed / "iter_0000010")
    os.symlink(os.path.join(runs["forge"].save, "iter_0000020"), mixed / "iter_0000020")
    (mixed / "latest_checkpointed_iteration.txt").write_text("20")
    script = (
        "import argparse, sys\n"
        "from forge_megatron.megatron.cpu import enable_megatron_on_cpu\n"
        "from forge_megatron.megatron.checkpoint import checkpoint_has_forge_state\n"
        "from forge_megatron.megatron.world import init_world_of_one\n"
        "enable_megatron_on_cpu()\n"
        "init_world_of_one()\n"
        "print([checkpoint_has_forge_state(argparse.Namespace(load=sys.argv[1], ckpt_step=step))"
        " for step in (None, 10, 20)])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(mixed)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[True, False, True]"


def test_a_rerun_of_an_updated_iteration_is_refused(data, tmp_path):
    """Megatron's rerun state machine re-runs an iteration whose result fails validation (here an
    injected failure); FORGE has already updated the weights and says so instead of updating twice."""
    run = Run(str(tmp_path), "rerun", "--use-forge", "--train-iters", "4", "--lr-warmup-iters", "1",
              "--error-injection-rate", "1",
              "--error-injection-type", "transient_error", expect_ok=False)(data)
    assert run.returncode != 0
    assert "ran its forward and backward a second time" in run.stderr and "--rerun-mode disabled" in run.stderr


def test_help_lists_forge_flags():
    proc = run_pretrain(["--help"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--use-forge" in proc.stdout and "--forge-clip-grad-mode" in proc.stdout and "--lr " in proc.stdout


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_refusal_is_one_line_on_rank_0(data, tmp_path, nproc, monkeypatch):
    monkeypatch.setattr(benchmarking, "launch", launch_in_subprocess)  # what torchrun itself shows
    argv = [*BASE, "--data-path", data, "--use-forge", "--fp16", "--tensor-model-parallel-size", str(nproc)]
    proc = run_pretrain(argv, nproc=nproc, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["forge-pretrain-gpt: error: --use-forge: --fp16 needs a loss scaler that unscales gradients "
                      "or skips steps after the backward pass, which is too late for an update inside it; use --bf16"]
    assert "-- arguments --" not in proc.stdout  # FORGE's checks run before Megatron's argument dump
    # no rank prints a traceback (under torchrun, torchrun itself then reports the failed child)
    assert proc.stderr.count("Traceback (most recent call last)") == (0 if nproc == 1 else 1)
    assert nproc == 1 or "ChildFailedError" in proc.stderr
