"""Data parallelism: every data-parallel rank owns a block of each covered weight's rows (its
optimizer state and its update); the gradient is reduce-scattered to the owners and the updated
blocks all-gathered (core/owner.py).

Core, on 2 gloo ranks: the owner's update is the unfused rule applied to the reduce-scattered
gradient (each rank's kernel gradient scaled by 1/2, then summed, as Megatron's data-parallel
reduction takes it) bit for bit, with one and two micro-batches summed locally or in the owner's
rows, and held (exact clipping) until the coefficient is known, and both ranks end with the
same weight. In Megatron's loop (forge-pretrain-gpt on CPU, fp32, 20 steps), against standard
Megatron with --use-distributed-optimizer and the same layout within 1e-5 in loss, grad norm and
weights: DP = 2 without clipping, with the collectives overlapping backward (Megatron's
--overlap-grad-reduce); the default clipping (exact, no replay), active at every step, at DP = 2 and at
DP = 2 x TP = 2 with two micro-batches summed in the owners' rows; stale clipping with two
micro-batches summed locally under Megatron's non-distributed optimizer; a checkpoint saved at
DP = 2 resumed at DP = 1 and one saved at DP = 1 resumed at DP = 2, against the uninterrupted
run."""

import pytest
import torch
from distributed import result, run_scenarios
from helpers import assert_bits_equal, randn, reference_step, snapshot
from training_runs import TOL, Run, assert_same_training, checkpoint, forge_state, model_keys, rel, run_all

from forge_megatron.core.plan import ShardPlacement

DP2 = ["--micro-batch-size", "2", "--global-batch-size", "4"]  # one micro-batch per rank and step
DP2_K2 = ["--micro-batch-size", "1", "--global-batch-size", "4"]  # two
DP1_K2 = DP2  # the same 4 samples per step on one rank: two micro-batches of 2
DISTRIBUTED = ["--use-distributed-optimizer"]
OVERLAP = ["--overlap-grad-reduce"]  # Megatron's buckets and FORGE's weights reduce-scatter asynchronously
STALE = ["--use-forge", "--clip-grad", "0.05", "--forge-clip-grad-mode", "stale"]  # stale clipping, active
CLIP = ["--clip-grad", "0.05"]  # active at every step
AUTO = ["--use-forge"]  # the default clipping mode: exact here (the owners' rows are held anyway), no replay


def test_a_block_of_rows_draws_the_bits_those_rows_draw_in_the_whole_shard():
    from forge_megatron.core.numerics import global_index_torch

    fc1 = ShardPlacement(row_offset=6, row_split=6, row_jump=18, global_cols=10)  # a SwiGLU shard [gate; up]
    cols = torch.arange(10)
    whole = global_index_torch(torch.arange(12), cols, fc1)
    for start, stop in ((0, 3), (3, 6), (4, 8), (6, 12), (9, 12), (0, 12)):
        block = global_index_torch(torch.arange(stop - start), cols, fc1.rows(start, stop))
        assert torch.equal(block, whole[start:stop]), (start, stop)


def scenario_the_owners_update_is_the_rule_on_the_reduce_scattered_gradient():
    for owner_sums, grad_dtype, overlap in ((False, "fp32", False), (True, "fp32", False), (True, "bf16", True),
                                            (False, "bf16", True)):
        _owner_update_case(owner_sums, grad_dtype, overlap)
    return True


def _owner_update_case(owner_sums: bool, grad_dtype: str, overlap: bool):
    """`grad_dtype` bf16: each local gradient (or local sum) is rounded stochastically to bf16
    (numerics.py's rounding, keyed by the step, the micro-batch and the data-parallel rank) and
    reduce-scattered in bf16.
    `overlap`: the collectives are asynchronous and complete at `wait()`."""
    import torch.distributed as dist

    from forge_megatron import ForgeConfig, ForgeParam, fused_update
    from forge_megatron.core.owner import Collectives
    from forge_megatron.core.state import ForgeState
    from forge_megatron.core.table import StepTable
    from forge_megatron.core.update import step_tiles

    rank = dist.get_rank()
    for rule, hp in (("adamw", dict(lr=1e-2, weight_decay=0.1)), ("sgd", dict(lr=0.1, momentum=0.9))):
        weight = randn(torch.Generator().manual_seed(1), 38, 70)  # the same on both ranks
        param = ForgeParam(weight, ForgeConfig(rule=rule, hyperparameters=hp, backend="torch",
                                               accumulation_dtype="fp32" if owner_sums else grad_dtype))
        shard = param.state.placement  # the whole shard's, which keys the gradient's rounding
        param.own_rows(weight, dist.group.WORLD, owner_sums=owner_sums, grad_dtype=grad_dtype,
                       collectives=Collectives(overlap=overlap))
        assert param.state.shape == (19, 70) and all(t.shape[0] == 19 for t in param.state.tensors.values())
        table = StepTable([param.state], [step_tiles(param.rows(weight), param.state)], weight.device)
        param.bind(table.slots[0])
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        # Steps 3 and 4: two-pass clipping, the owner's rows held until the coefficient is known.
        for step, k, coefficient in ((1, 1, None), (2, 2, None), (3, 1, 0.5), (4, 2, 0.25)):
            batches = [(randn(gen, 13, 70), randn(gen, 13, 38)) for _ in range(k)]
            grads = []  # the kernel's fp32 GEMM of each micro-batch
            for x, dy in batches:
                copy = weight.clone()
                grads.append(fused_update(x, dy, copy, ForgeState(copy, "sgd"), materialize=True,
                                          backend="torch").grad)

            def stored(g, j, step=step, state=param.state, shard=shard, k=k):  # as it is reduce-scattered
                # rounded with micro-batch j's stream on this rank (each rank its own streams)
                return g if grad_dtype == "fp32" else _rounded_to_bf16(g, shard, state, step, rank * k + j)

            if owner_sums:  # each micro-batch reduce-scattered, the owner's rows summed in fp32 in micro-batch order
                blocks = [_reduce_scatter(stored(g, j), param.owner) for j, g in enumerate(grads)]
                expected_grad = blocks[0] if k == 1 else blocks[0].float()
                for block in blocks[1:]:
                    expected_grad = expected_grad + block.float()
            else:  # summed locally in micro-batch order (Megatron's main_grad), reduce-scattered once
                local = stored(grads[0], 0)
                for j, g in enumerate(grads[1:], 1):
                    local = stored(local.float() + g, j)
                expected_grad = _reduce_scatter(local, param.owner)
            expected_grad = expected_grad.float()
            w0, s0 = snapshot(param.rows(weight).clone(), param.state)
            table.write(1.0)  # this step's coefficients, as the controller writes them
            param.begin_iteration(k)
            param.apply = coefficient is None
            for x, dy in batches:
                param.step(x, dy, weight)
            if overlap:  # nothing has arrived yet: the training loop waits after its backward pass
                assert param.state.step == step - 1 and param.updates == 0
            param.collectives.wait()
            what = f"{rule}, owner_sums={owner_sums}, {grad_dtype}, overlap={overlap}, step {step}"
            if coefficient is not None:  # held: the by-products of the reduced rows, nothing written
                assert_bits_equal(param.rows(weight), w0, f"held rows, {what}")
                assert param.state.step == step - 1
                assert float(table.totals()[0]) == pytest.approx(float(expected_grad.double().square().sum()),
                                                                 rel=1e-6)
                table.set_scale(coefficient)
                param.apply_accumulated(weight)
                param.collectives.wait()
                expected_grad = expected_grad * coefficient
            expected_w, expected_s = reference_step(w0, s0, param.state, expected_grad, step)
            assert_bits_equal(param.rows(weight), expected_w, f"rows, {what}")
            for name, tensor in param.state.tensors.items():
                assert_bits_equal(tensor, expected_s[name], f"{name}, {what}")
            gathered = [torch.empty_like(weight) for _ in range(2)]
            dist.all_gather(gathered, weight)
            assert torch.equal(gathered[0], gathered[1])  # every rank holds every owner's update
            assert param.buffer is None  # the gradient lives from the first backward to the update


def _rounded_to_bf16(g, placement, state, step, micro):
    """numerics.py's stochastic rounding of a whole-shard gradient, keyed as a bf16 buffer's is."""
    from forge_megatron.core import numerics

    index = numerics.global_index_torch(torch.arange(g.shape[0]), torch.arange(g.shape[1]), placement)
    keys = numerics.stream_keys_int(state.seed, state.weight_id, step, numerics.ACCUMULATION_STREAM, micro)
    return numerics.stochastic_round_to_bf16_torch(g, numerics.random_bits_torch(index, *keys))


def _reduce_scatter(local, owner):
    """The owner's rows of every rank's gradient scaled by 1/2, then summed (independently of
    core/owner.py: an all-gather and a sum)."""
    import torch.distributed as dist

    scaled = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(scaled, local * 0.5)
    return (scaled[0] + scaled[1])[owner.start:owner.stop]


def test_the_owners_update_is_the_rule_on_the_reduce_scattered_gradient():
    assert result(run_scenarios(2, [scenario_the_owners_update_is_the_rule_on_the_reduce_scattered_gradient]),
                  "scenario_the_owners_update_is_the_rule_on_the_reduce_scattered_gradient") == [True, True]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    work = str(tmp_path_factory.mktemp("data_parallel"))
    first = run_all(data, {
        "standard-dp2": Run(work, "standard-dp2", *DP2, *DISTRIBUTED, *OVERLAP, "--clip-grad", "0", dp=2),
        "forge-dp2": Run(work, "forge-dp2", *DP2, *DISTRIBUTED, *OVERLAP, "--use-forge", "--clip-grad", "0", dp=2),
        "forge-stale-dp2": Run(work, "forge-stale-dp2", *DP2_K2, *STALE, "--save-interval", "10", dp=2),
        "standard-clip-dp2": Run(work, "standard-clip-dp2", *DP2, *DISTRIBUTED, *CLIP, dp=2),
        "forge-auto-dp2": Run(work, "forge-auto-dp2", *DP2, *DISTRIBUTED, *CLIP, *AUTO, dp=2),
        "standard-clip-dp2-tp2-k2": Run(work, "standard-clip-dp2-tp2-k2", *DP2_K2, *DISTRIBUTED, *CLIP, tp=2, dp=2),
        "forge-auto-dp2-tp2-k2": Run(work, "forge-auto-dp2-tp2-k2", *DP2_K2, *DISTRIBUTED, *CLIP, *AUTO,
                                     "--forge-dp-accumulation", "owner", tp=2, dp=2),
    })
    # Resumes under Megatron's plain optimizer: its distributed optimizer cannot load without
    # Apex or Transformer Engine (DistributedOptimizer.state_dict asserts one step count).
    second = run_all(data, {
        "dp2-to-dp1": Run(work, "dp2-to-dp1", *DP1_K2, *STALE, "--load", first["forge-stale-dp2"].save, "--ckpt-step",
                          "10", "--save-interval", "5"),
        # a switch between FORGE and standard through the distributed optimizer's per-bucket format: one line
        "standard-to-forge-dp2": Run(work, "standard-to-forge-dp2", *DP2, *DISTRIBUTED, "--use-forge", "--clip-grad",
                                     "0", "--load", first["standard-dp2"].save, dp=2, expect_ok=False),
        "forge-to-standard-dp2": Run(work, "forge-to-standard-dp2", *DP2, *DISTRIBUTED, "--clip-grad", "0", "--load",
                                     first["forge-dp2"].save, dp=2, expect_ok=False),
    })
    third = run_all(data, {"dp1-to-dp2": Run(work, "dp1-to-dp2", *DP2, *STALE, "--load", second["dp2-to-dp1"].save,
                                             "--ckpt-step", "15", dp=2)})
    return {**first, **second, **third}


def test_data_parallel_matches_megatrons_distributed_optimizer(runs):
    forge, standard = runs["forge-dp2"], runs["standard-dp2"]
    assert_same_training(forge, standard)
    norms, reference = forge.record("grad-norm"), standard.record("grad-norm")
    assert all(abs(norms[i] - reference[i]) <= TOL * reference[i] for i in reference) and len(norms) == 20


@pytest.mark.parametrize("layout", ["dp2", "dp2-tp2-k2"])
def test_default_clipping_matches_megatrons_clipped_distributed_optimizer(runs, layout):
    """The default mode ('auto' -> exact): the owners' rows held until Megatron's optimizer step,
    every step clipped with its own global norm, as Megatron clips its parameters, with one
    forward and backward per micro-batch (no replay) (DP = 2; DP = 2 x TP = 2 with two
    micro-batches summed in the owners' rows)."""
    forge, standard = runs[f"forge-auto-{layout}"], runs[f"standard-clip-{layout}"]
    passes = forge.record("forge/forward-passes")
    assert set(passes.values()) == {1} and len(passes) == 20, passes
    assert "FORGE: clipping auto -> exact" in forge.stdout
    assert_same_training(forge, standard)
    norms, reference, scale = forge.record("grad-norm"), standard.record("grad-norm"), forge.record("forge/grad-scale")
    assert all(abs(norms[i] - reference[i]) <= TOL * reference[i] for i in reference) and len(norms) == 20
    for i in range(1, 21):
        assert scale[i] == pytest.approx(min(1.0, 0.05 / (norms[i] + 1e-6)), rel=1e-6) and scale[i] < 1.0, i


def test_stale_clipping_under_megatrons_non_distributed_optimizer(runs):
    """Megatron's plain optimizer sums the grad norm over model-parallel ranks only: FORGE adds its
    owners' blocks summed over the data-parallel ranks. The first step (no previous norm, no
    clipping; two micro-batches summed in the local buffer) has standard Megatron's norm (one
    micro-batch of two sequences per rank); each later step clips with the previous one's."""
    forge = runs["forge-stale-dp2"]
    scale, norm = forge.record("forge/grad-scale"), forge.record("grad-norm")
    assert norm[1] == pytest.approx(runs["standard-dp2"].record("grad-norm")[1], rel=TOL)
    assert scale[1] == 1.0 and any(s < 1.0 for s in scale.values())
    for i in range(2, 21):
        assert scale[i] == pytest.approx(min(1.0, 0.05 / (norm[i - 1] + 1e-6)), rel=1e-6), i


def test_a_checkpoint_resumes_at_another_data_parallel_size(runs):
    """Saved at DP = 2 (iteration 10), resumed at DP = 1 (to 20, saving at 15), that saved at
    DP = 1 resumed at DP = 2 (from 15), stale clipping active throughout: every resumed loss and
    the final weights and FORGE state as in the uninterrupted DP = 2 run (the two layouts sum the
    step's gradient in different orders)."""
    reference = runs["forge-stale-dp2"].losses()
    for name, first in (("dp2-to-dp1", 11), ("dp1-to-dp2", 16)):
        resumed = runs[name].losses()
        assert sorted(resumed) == list(range(first, 21)), name
        assert all(abs(resumed[i] - reference[i]) <= TOL * abs(reference[i]) for i in resumed), (name, resumed)
    saved, _ = checkpoint(runs["forge-stale-dp2"].save, 10)
    for key, tensor in forge_state(saved).items():  # the whole shard's state, as at DP = 1
        weight = key.removeprefix("optimizer.forge.").removeprefix("optimizer.state.").split(".", 1)[1]
        weight = weight.removeprefix("scale.")
        assert weight in saved and tensor.shape[0] == saved[weight].shape[0], key
    final, _ = checkpoint(runs["dp1-to-dp2"].save)
    uninterrupted, _ = checkpoint(runs["forge-stale-dp2"].save)
    assert forge_state(final).keys() == forge_state(uninterrupted).keys() and forge_state(final)
    for key in model_keys(uninterrupted):
        assert rel(final[key], uninterrupted[key]) <= TOL, key
    for key, tensor in forge_state(uninterrupted).items():
        assert rel(final[key], tensor) <= 1e-4, key  # second moments: squares of the summed gradients


def test_a_switch_through_the_distributed_optimizers_bucket_format_is_one_line(runs):
    for name, message in (
            ("standard-to-forge-dp2", "the standard checkpoint's distributed-optimizer state is saved per data-parallel "
                                      "bucket, not per weight; save it with --dist-ckpt-optim-fully-reshardable, or add "
                                      "--no-load-optim to load the weights only"),
            ("forge-to-standard-dp2", "a FORGE checkpoint holds the covered weights' optimizer state per weight, which "
                                      "the distributed optimizer reads only with --dist-ckpt-optim-fully-reshardable; "
                                      "add it, or add --no-load-optim to load the weights only")):
        run = runs[name]
        assert run.returncode != 0, name
        assert [line for line in run.stderr.splitlines() if "error:" in line] == [
            f"forge-pretrain-gpt: error: {message}"], (name, run.stderr[-3000:])
