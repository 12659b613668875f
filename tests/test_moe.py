"""Mixture of experts with FORGE, in Megatron's own loop (fp32, 20 steps, two-pass clipping active
at every step, against standard Megatron with the same flags within 1e-5 in loss, grad norm and
weights).

Every local expert's linears are covered (SequentialMLP's experts are megatron-core linears);
the router stays with Megatron's optimizer. An expert's gradient comes from the tokens routed to
it on its rank; Megatron's DDP scales it by 1 / data-parallel size and sums it over the expert-
data-parallel group, and so does FORGE: in the owners' rows over that group, or, alone in it, in
its kernel's gradient scale (core/table.py's multipliers). Layouts: EP = 1 and TP = 2 x EP = 2
(ETP = 1, sequence parallel, 4 ranks, two micro-batches, the experts' rows owned over their
expert-data-parallel pair) under Megatron's distributed optimizer; EP = 2 on two ranks under its
plain optimizer, whose checkpoint at iteration 10 resumes at EP = 1 as the uninterrupted run goes
on. With 16 experts, top-1 routing and 32 tokens per step, experts receive no token in some
iterations (FORGE logs how many covered weights' backward saw none): they take the step standard
Megatron takes, a zero gradient's (moments decay, weight decay applies). With --moe-grouped-gemm,
FORGE's grouped experts module (EP = 1) against standard Megatron's SequentialMLP and FORGE's
per-expert path.
"""

import pytest
import torch
from training_runs import TOL, Run, assert_same_training, checkpoint, model_keys, rel, run_all

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96", "--moe-token-dispatcher-type",
       "alltoall", "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01"]
CLIP = ["--clip-grad", "0.05"]
TWO_PASS = ["--use-forge", "--forge-clip-grad-mode", "two-pass"]
DISTRIBUTED = ["--use-distributed-optimizer"]
EP2 = ["--expert-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]
TP2_EP2 = ["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1", "--micro-batch-size", "1",
           "--global-batch-size", "4"]  # DP = 2 for the dense layers, two micro-batches per rank
STARVED = ["--num-experts", "16", "--moe-router-topk", "1", "--moe-router-pre-softmax", "--moe-ffn-hidden-size", "32", "--moe-token-dispatcher-type",
           "alltoall", "--micro-batch-size", "1", "--global-batch-size", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    work = str(tmp_path_factory.mktemp("moe"))
    first = run_all(data, {
        "standard-ep1": Run(work, "standard-ep1", *MOE, *CLIP, *DISTRIBUTED),
        "forge-ep1": Run(work, "forge-ep1", *MOE, *CLIP, *DISTRIBUTED, *TWO_PASS),
        "standard-ep2": Run(work, "standard-ep2", *MOE, *EP2, *CLIP, dp=2),
        "forge-ep2": Run(work, "forge-ep2", *MOE, *EP2, *CLIP, *TWO_PASS, "--save-interval", "10", dp=2),
        "standard-starved": Run(work, "standard-starved", *STARVED, *CLIP),
        "forge-starved": Run(work, "forge-starved", *STARVED, *CLIP, *TWO_PASS),
    })
    second = run_all(data, {
        "standard-tp2-ep2": Run(work, "standard-tp2-ep2", *MOE, *TP2_EP2, *CLIP, *DISTRIBUTED, tp=2, dp=2),
        "forge-tp2-ep2": Run(work, "forge-tp2-ep2", *MOE, *TP2_EP2, *CLIP, *DISTRIBUTED, *TWO_PASS, tp=2, dp=2),
        # EP = 2 resumed at EP = 1 (the same four sequences per step, as two micro-batches)
        "ep2-to-ep1": Run(work, "ep2-to-ep1", *MOE, *CLIP, *TWO_PASS, "--micro-batch-size", "2", "--global-batch-size",
                          "4", "--load", first["forge-ep2"].save, "--ckpt-step", "10"),
        # FORGE's grouped experts module; its standard reference is standard-ep1 (SequentialMLP: standard
        # Megatron's grouped GEMM needs Transformer Engine), its per-expert twin forge-ep1
        "forge-grouped-ep1": Run(work, "forge-grouped-ep1", *MOE, *CLIP, *DISTRIBUTED, *TWO_PASS, "--moe-grouped-gemm"),
    })
    return {**first, **second}


def _same_norms(forge, standard):
    norms, reference = forge.record("grad-norm"), standard.record("grad-norm")
    assert len(norms) == 20 and all(n > 0.05 for n in reference.values())  # clipping active at every step
    assert all(abs(norms[i] - reference[i]) <= TOL * reference[i] for i in reference)


@pytest.mark.parametrize("layout", ["ep1", "ep2", "tp2-ep2"])
def test_experts_trained_by_forge_match_standard_megatron(runs, layout):
    forge, standard = runs[f"forge-{layout}"], runs[f"standard-{layout}"]
    experts = 8 if layout == "ep1" else 4  # 2 layers x 4 experts, or x 2 per expert-parallel rank
    assert f"linear_fc1 {experts}" in forge.stdout
    balance, reference = forge.record("load_balancing_loss"), standard.record("load_balancing_loss")
    assert all(abs(balance[i] - reference[i]) <= TOL * abs(reference[i]) for i in reference) and len(balance) == 20
    _same_norms(forge, standard)
    assert_same_training(forge, standard)


def test_an_expert_without_tokens_takes_the_zero_gradients_step(runs):
    forge, standard = runs["forge-starved"], runs["standard-starved"]
    empty = forge.record("forge/empty-backwards")
    assert sum(empty.values()) > 0, empty  # it happened
    _same_norms(forge, standard)
    assert_same_training(forge, standard)


def test_a_checkpoint_resumes_at_another_expert_parallel_size(runs):
    reference, resumed = runs["forge-ep2"].losses(), runs["ep2-to-ep1"].losses()
    assert sorted(resumed) == list(range(11, 21))
    assert all(abs(resumed[i] - reference[i]) <= TOL * abs(reference[i]) for i in resumed), resumed
    final, _ = checkpoint(runs["ep2-to-ep1"].save)
    uninterrupted, _ = checkpoint(runs["forge-ep2"].save)
    assert any("experts" in key for key in model_keys(uninterrupted))
    for key in model_keys(uninterrupted):
        assert rel(final[key], uninterrupted[key]) <= TOL, key


def test_grouped_experts_match_sequential_mlp(runs):
    """--moe-grouped-gemm --use-forge: FORGE's grouped experts module (megatron/experts.py: stacked
    weights, grouped matmuls, one fused step per weight kind) trains as standard Megatron's
    SequentialMLP does (within 1e-5), and equals FORGE's per-expert path bit for bit: losses, grad
    norms and every checkpoint tensor under the same keys (weights, per-expert states and steps), so
    checkpoints move between the two paths."""
    grouped, standard, per_expert = runs["forge-grouped-ep1"], runs["standard-ep1"], runs["forge-ep1"]
    assert "linear_fc1 of grouped experts 2, linear_fc2 of grouped experts 2" in grouped.stdout
    balance, reference = grouped.record("load_balancing_loss"), standard.record("load_balancing_loss")
    assert all(abs(balance[i] - reference[i]) <= TOL * abs(reference[i]) for i in reference) and len(balance) == 20
    _same_norms(grouped, standard)
    assert_same_training(grouped, standard)
    assert grouped.losses() == per_expert.losses()
    assert grouped.record("grad-norm") == per_expert.record("grad-norm")
    tensors, _ = checkpoint(grouped.save)
    twin, _ = checkpoint(per_expert.save)
    assert sorted(tensors) == sorted(twin)
    assert any(".local_experts.3.linear_fc2." in key for key in tensors)  # FORGE's per-expert step counts
    for key in twin:
        assert torch.equal(tensors[key], twin[key]), key
