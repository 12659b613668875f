"""forge-pretrain-gpt end to end on CPU: --use-forge against the standard run, the lr/wd schedule,
the three clipping modes, checkpoints across TP sizes, and resuming without FORGE state.

Each run is a real CLI process (torchrun with 2 gloo ranks for TP=2) writing --forge-log-json;
weights are compared through the torch_dist checkpoints the runs save.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

BASE = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 256 "
    "--attention-dropout 0 --hidden-dropout 0 --micro-batch-size 4 --global-batch-size 4 --train-iters 20 "
    "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --adam-beta2 0.95 "
    "--forge-corpus stdlib --tokenizer-type NullTokenizer --vocab-size 256 --log-interval 5 --save-interval 1000 "
    "--seed 1234"
).split()
TOL = 1e-5  # fp32: the runs differ only by the wgrad GEMM's summation order and AdamW's roundings


def launch(workdir, name, *flags, tp=1):
    """Run forge-pretrain-gpt; returns (per-iteration records, stdout)."""
    log = os.path.join(workdir, f"{name}.jsonl")
    argv = [*BASE, *flags, "--forge-log-json", log]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if tp == 1:
        cmd = [sys.executable, "-m", "forge_megatron.cli.pretrain_gpt", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "-m",
               "forge_megatron.cli.pretrain_gpt", *argv, "--tensor-model-parallel-size", str(tp),
               "--sequence-parallel"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(log) as f:
        return [json.loads(line) for line in f], proc.stdout


def checkpoint(save_dir):
    """(plain full tensors, common state) of the latest checkpoint in `save_dir`."""
    from megatron.core import dist_checkpointing

    if not dist.is_initialized():  # dist_checkpointing reads through torch.distributed.checkpoint
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
        path = os.path.join(save_dir, f"iter_{int(f.read()):07d}")
    tensors = dist_checkpointing.load_plain_tensors(path)  # also holds the common (non-tensor) state
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return tensors, dist_checkpointing.load_common_state_dict(path)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("runs"))
    out = {}
    # The clipping runs use torch's fused attention (--forge-core-attention sdpa, applied to the
    # standard run too), so that FORGE matching the standard run is shown with either attention.
    sdpa = ["--forge-core-attention", "sdpa"]
    for name, flags in [
        ("standard", ["--clip-grad", "0"]),
        ("forge", ["--use-forge", "--clip-grad", "0"]),
        ("standard-clip", ["--clip-grad", "0.05", *sdpa]),
        ("forge-two-pass", ["--use-forge", "--clip-grad", "0.05", "--forge-clip-grad-mode", "two-pass", *sdpa]),
        ("forge-stale", ["--use-forge", "--clip-grad", "0.05", *sdpa]),
    ]:
        save = os.path.join(work, name)
        out[name] = (*launch(work, name, *flags, "--save", save), save)
    out["work"] = work
    return out


def test_forge_fp32_matches_the_standard_run(runs):
    (std, _, std_dir), (forge, stdout, forge_dir) = runs["standard"], runs["forge"]
    assert "weight-gradient memory not allocated" in stdout
    for a, b in zip(forge, std):
        assert abs(a["lm loss"] - b["lm loss"]) <= TOL * abs(b["lm loss"]), (a["iteration"], a, b)
    weights, _ = checkpoint(forge_dir)
    reference, _ = checkpoint(std_dir)
    model_keys = [k for k in reference if not k.startswith("optimizer.")]
    assert any("linear_fc1" in k for k in model_keys)
    for key in model_keys:
        assert rel(weights[key], reference[key]) <= TOL, key


def test_forge_uses_the_lr_and_weight_decay_megatrons_scheduler_gives(runs):
    std, forge = runs["standard"][0], runs["forge"][0]
    lrs = [r["lr"] for r in std]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3) and lrs[-1] < lrs[10]  # warmup, then cosine decay
    for a, b in zip(forge, std):
        assert all(lr == b["lr"] and wd == b["weight_decay"] for lr, wd in a["forge lr, wd"]), a["iteration"]


def test_two_pass_clipping_matches_the_standard_clipped_run(runs):
    std, forge = runs["standard-clip"][0], runs["forge-two-pass"][0]
    assert all(r["grad norm"] > 0.05 for r in std)  # clipping was active at every step
    for a, b in zip(forge, std):
        assert abs(a["lm loss"] - b["lm loss"]) <= TOL * abs(b["lm loss"])
        assert abs(a["grad norm"] - b["grad norm"]) <= TOL * b["grad norm"]
        assert a["forge grad scale"] == pytest.approx(0.05 / (b["grad norm"] + 1e-6), rel=TOL)
    weights, _ = checkpoint(runs["forge-two-pass"][2])
    reference, _ = checkpoint(runs["standard-clip"][2])
    for key in (k for k in reference if not k.startswith("optimizer.")):
        assert rel(weights[key], reference[key]) <= TOL, key


def test_stale_clipping_uses_the_previous_steps_global_norm(runs):
    forge = runs["forge-stale"][0]
    assert forge[0]["forge grad scale"] == 1.0  # no previous norm at the first step
    for previous, current in zip(forge, forge[1:]):
        expected = min(1.0, 0.05 / (previous["grad norm"] + 1e-6))
        assert current["forge grad scale"] == pytest.approx(expected, rel=1e-12)


def _forge_state(tensors):
    return {k: v for k, v in tensors.items() if k.startswith("optimizer.forge.")}


def test_checkpoints_reshard_forge_state_between_tp_sizes(runs):
    work = runs["work"]
    tp1_dir = runs["forge"][2]
    # TP=1 -> TP=2: load, train no further, save; the FORGE state must come back unchanged.
    launch(work, "tp2-from-tp1", "--use-forge", "--clip-grad", "0", "--load", tp1_dir,
           "--save", os.path.join(work, "tp2-from-tp1"), tp=2)
    # TP=2 -> TP=1, from a run trained at TP=2.
    launch(work, "tp2", "--use-forge", "--clip-grad", "0", "--train-iters", "6",
           "--save", os.path.join(work, "tp2"), tp=2)
    launch(work, "tp1-from-tp2", "--use-forge", "--clip-grad", "0", "--train-iters", "6",
           "--load", os.path.join(work, "tp2"), "--save", os.path.join(work, "tp1-from-tp2"))
    for saved, resaved in [(tp1_dir, "tp2-from-tp1"), (os.path.join(work, "tp2"), "tp1-from-tp2")]:
        (a, common_a), (b, common_b) = checkpoint(saved), checkpoint(os.path.join(work, resaved))
        state_a, state_b = _forge_state(a), _forge_state(b)
        assert len(state_a) == 2 * 4  # exp_avg, exp_avg_sq of qkv, proj, fc1, fc2 (layers stacked in one key)
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
        assert common_a["forge"] == common_b["forge"]  # the step counts


def test_int8_state_checkpoints_reshard_between_tp_sizes(runs):
    """8-bit codes and their block scales (one per 32 columns) round-trip TP=2 -> TP=1."""
    work = runs["work"]
    flags = ["--use-forge", "--forge-state-dtype", "int8", "--clip-grad", "0", "--train-iters", "3", "--lr-warmup-iters", "1"]
    launch(work, "int8-tp2", *flags, "--save", os.path.join(work, "int8-tp2"), tp=2)
    launch(work, "int8-tp1", *flags, "--load", os.path.join(work, "int8-tp2"), "--save", os.path.join(work, "int8-tp1"))
    (a, _), (b, _) = checkpoint(os.path.join(work, "int8-tp2")), checkpoint(os.path.join(work, "int8-tp1"))
    state_a, state_b = _forge_state(a), _forge_state(b)
    assert any(k.startswith("optimizer.forge.exp_avg.scale") for k in state_a) and state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_resuming_without_forge_state_starts_it_fresh(runs):
    work = runs["work"]
    records, stdout = launch(work, "forge-from-standard", "--use-forge", "--clip-grad", "0", "--train-iters", "21",
                             "--override-opt-param-scheduler",
                             "--load", runs["standard"][2], "--save", os.path.join(work, "forge-from-standard"))
    assert "checkpoint holds no FORGE state" in stdout and "FORGE state starts fresh" in stdout
    assert [r["iteration"] for r in records] == [21]
    _, common = checkpoint(os.path.join(work, "forge-from-standard"))
    assert {entry["step"] for entry in common["forge"].values()} == {1}


def test_no_load_optim_and_finetune(runs):
    work = runs["work"]
    forge_dir = runs["forge"][2]
    records, _ = launch(work, "no-load-optim", "--use-forge", "--clip-grad", "0", "--train-iters", "21",
                        "--override-opt-param-scheduler", "--load",
                        forge_dir, "--no-load-optim", "--save", os.path.join(work, "no-load-optim"))
    assert [r["iteration"] for r in records] == [21]  # the iteration count resumes
    _, common = checkpoint(os.path.join(work, "no-load-optim"))
    assert {entry["step"] for entry in common["forge"].values()} == {1}  # FORGE state is optimizer state
    records, _ = launch(work, "finetune", "--use-forge", "--clip-grad", "0", "--train-iters", "6", "--load",
                        forge_dir, "--finetune", "--save", os.path.join(work, "finetune"))
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]  # the iteration count restarts
    _, common = checkpoint(os.path.join(work, "finetune"))
    assert {entry["step"] for entry in common["forge"].values()} == {6}


def test_activation_recompute_updates_once_per_backward(runs):
    """Full recompute re-runs each layer's forward inside backward; FORGE's update lives in the
    backward of its autograd function, so it still fires once per weight and step: the same bits
    as the run without recompute."""
    work = runs["work"]
    records, _ = launch(work, "forge-recompute", "--use-forge", "--clip-grad", "0", "--recompute-granularity", "full",
                        "--recompute-method", "uniform", "--recompute-num-layers", "1",
                        "--save", os.path.join(work, "forge-recompute"))
    assert [r["lm loss"] for r in records] == [r["lm loss"] for r in runs["forge"][0]]
    weights, common = checkpoint(os.path.join(work, "forge-recompute"))
    reference, _ = checkpoint(runs["forge"][2])
    assert {entry["step"] for entry in common["forge"].values()} == {20}
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key
