"""Runs of forge-pretrain-gpt (Megatron's own loop) for the training-loop tests: the tiny test
model's flags, a run in its own folder (tensorboard log, checkpoints, output), independent runs two
at a time, and reading what they saved."""

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from forge_megatron.megatron.world import init_world_of_one
from forge_megatron.tools.benchmarking import run_pretrain, tensorboard_records

BASE = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 256 "
    "--transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --no-persist-layer-norm "
    "--no-masked-softmax-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion "
    "--attention-dropout 0 --hidden-dropout 0 --micro-batch-size 4 --global-batch-size 4 --train-iters 20 "
    "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --adam-beta2 0.95 "
    "--split 90,10,0 --tokenizer-type NullTokenizer --vocab-size 257 --log-interval 5 --eval-interval 1000 "
    "--eval-iters 1 --tensorboard-log-interval 1 --save-interval 20 --seed 1234"
).split()
TOL = 1e-5  # fp32: the runs differ only by the wgrad GEMM's summation order and AdamW's roundings
SDPA = ["--forge-core-attention", "sdpa"]  # applied to standard runs too: both attentions are covered
# Multi-latent attention (which needs SDPAttention on megatron-core's local layers) and one multi-token-prediction layer
MLA_MTP = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-head-dim", "16",
           "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--mtp-num-layers", "1", *SDPA]


class Run:
    """One forge-pretrain-gpt run in its own folder: tensorboard log, checkpoints, output."""

    def __init__(self, work, name, *flags, tp=1, pp=1, dp=1, expect_ok=True):
        self.dir = os.path.join(work, name)
        self.save = os.path.join(self.dir, "checkpoints")
        self.name, self.flags, self.tp, self.pp, self.dp, self.expect_ok = name, list(flags), tp, pp, dp, expect_ok

    def __call__(self, data):
        tb = os.path.join(self.dir, "tensorboard")
        argv = [*BASE, "--data-path", data, "--data-cache-path", os.path.join(self.dir, "cache"),
                "--tensorboard-dir", tb, "--save", self.save, *self.flags]
        if self.tp > 1:
            argv += ["--tensor-model-parallel-size", str(self.tp), "--sequence-parallel"]
        if self.pp > 1:
            argv += ["--pipeline-model-parallel-size", str(self.pp)]
        proc = run_pretrain(argv, nproc=self.tp * self.pp * self.dp, env={"OMP_NUM_THREADS": "1"}, timeout=900)
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        if self.expect_ok:
            assert proc.returncode == 0, f"run {self.name}:\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
            self.records = tensorboard_records(tb) if os.path.isdir(tb) else []
        return self

    def losses(self):
        return {r["iteration"]: r["lm loss"] for r in self.records if "lm loss" in r}

    def record(self, key):
        return {r["iteration"]: r[key] for r in self.records if key in r}


def run_all(data, runs):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: future.result() for name, future in [(name, pool.submit(run, data)) for name, run in runs.items()]}


def checkpoint(save_dir, iteration=None):
    """(plain full tensors, common state) of a torch_dist checkpoint in `save_dir`."""
    from megatron.core import dist_checkpointing

    init_world_of_one()  # dist_checkpointing reads through torch.distributed.checkpoint
    if iteration is None:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
            iteration = int(f.read())
    path = os.path.join(save_dir, f"iter_{iteration:07d}")
    tensors = dist_checkpointing.load_plain_tensors(path)  # also holds the common (non-tensor) state
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return tensors, dist_checkpointing.load_common_state_dict(path)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def model_keys(tensors):
    """The model's keys: not the optimizer's (with expert parameters, Megatron's optimizer is a
    chain whose parts save under chained_<i>.optimizer.*) nor the RNG states."""
    return [k for k in tensors if not k.startswith(("optimizer.", "chained_", "rng_state"))]


COVERED = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight", "output_layer.weight")


def forge_state(tensors):
    """FORGE's state tensors (masters, states, scales) by sharded key, the step counts apart: its
    own (8-bit, bf16) and those under Megatron's keys (fp32) of the covered weights."""
    return {k: v for k, v in tensors.items() if (k.startswith("optimizer.forge.") and ".step." not in k)
            or (k.startswith("optimizer.state.") and k.endswith(COVERED))}


def forge_steps(tensors):
    return {int(v) for k, v in tensors.items() if k.startswith("optimizer.forge.step.")}


def assert_same_training(forge, standard):
    """Loss at every iteration and every model weight at the end within TOL (relative)."""
    a, b = forge.losses(), standard.losses()
    assert sorted(a) == list(range(1, 21)) and a.keys() == b.keys(), (sorted(a), sorted(b))
    for i in a:
        assert abs(a[i] - b[i]) <= TOL * abs(b[i]), (i, a[i], b[i])
    weights, _ = checkpoint(forge.save)
    reference, _ = checkpoint(standard.save)
    keys = model_keys(reference)
    assert any("linear_fc1" in k for k in keys)
    for key in keys:
        assert rel(weights[key], reference[key]) <= TOL, key


