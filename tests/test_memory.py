"""The per-rank memory model (forge_megatron/tools/memory.py) and the headroom tool
(scripts/memory_headroom.py): parameter counts of the 8B TP=8 config, Megatron's bytes per
parameter, FORGE's per regime (checked against the tensors ForgeState allocates), monotone
micro-batch search, a smoke run of the tool, what it writes (nothing without --out) and its
refusals."""

import dataclasses
import glob
import importlib.util
import json
import os
import re
import subprocess

import pytest
import torch

from forge_megatron import ForgeState
from forge_megatron.megatron.args import output_layer_covered
from forge_megatron.tools import memory

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
spec = importlib.util.spec_from_file_location("memory_headroom", os.path.join(ROOT, "scripts", "memory_headroom.py"))
headroom = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headroom)

# (bf16 weights, --forge-weight-store, --forge-state-dtype) -> bytes per covered parameter (docs/numerics.md)
FORGE_REGIMES = {
    (False, "master", "fp32"): 4 + 8,
    (True, "master", "fp32"): 2 + 4 + 8,
    (True, "sr", "fp32"): 2 + 8,
    (True, "sr", "bf16"): 2 + 4,
    (True, "master", "int8"): 2 + 4 + 2 * (1 + 4 / 32),
    (True, "sr", "int8"): 2 + 2 * (1 + 4 / 32),
}


@pytest.fixture(scope="module")
def llama():
    argv = headroom.config_argv(os.path.join(ROOT, "configs", "llama3_8b_tp8.sh"), "LLAMA3_8B_TP8_ARGS")
    return headroom.parse_config(argv)


def forge(args, bf16=True, weight_store="master", state_dtype="fp32"):
    return memory.replace_args(args, use_forge=True, bf16=bf16, forge_weight_store=weight_store,
                               forge_state_dtype=state_dtype)


def test_llama3_8b_tp8_parameters_per_rank(llama):
    assert (llama.padded_vocab_size, llama.tensor_model_parallel_size, llama.data_parallel_size) == (129024, 8, 1)
    assert memory.parameters_per_rank(llama) == pytest.approx(1.005e9, rel=1e-3)
    assert memory.covered_parameters_per_rank(llama, cover_output_layer=False) == pytest.approx(0.872e9, rel=1e-3)
    output_layer = 129024 * 4096 // 8
    assert (memory.covered_parameters_per_rank(llama, cover_output_layer=True)
            == memory.covered_parameters_per_rank(llama, cover_output_layer=False) + output_layer)
    # what is not covered: the embedding, the output layer and the norms
    norms = (2 * 32 + 1) * 4096
    assert (memory.parameters_per_rank(llama) - memory.covered_parameters_per_rank(llama, cover_output_layer=False)
            == 2 * output_layer + norms)


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_standard_bytes_per_parameter_are_megatrons(llama, dp):
    args = memory.replace_args(llama, use_forge=False, data_parallel_size=dp, world_size=8 * dp)
    assert memory.standard_bytes_per_parameter(args).total == 18
    distributed = memory.replace_args(args, use_distributed_optimizer=True)
    assert memory.standard_bytes_per_parameter(distributed).total == pytest.approx(6 + 12 / dp)
    for run in (args, distributed):  # the parameter part is Megatron's own estimate
        held = memory.rank_memory(run, 1)
        assert held.weights + held.grads + held.master + held.states == pytest.approx(
            memory.compute_weight_and_optimizer_memory(run), rel=1e-9)


@pytest.mark.parametrize("flags, expected", [
    ({"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}, 2 + 4 + 2 + 2 + 2),  # 16-bit master (remainder)
    ({"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp8", "main_grads_dtype": "bf16"}, 2 + 2 + 2 + 1 + 1),
    ({"main_params_dtype": "fp16"}, 2 + 4 + 2 + 8),
])
def test_precision_aware_optimizer_bytes(llama, flags, expected):
    args = memory.replace_args(llama, use_forge=False, use_distributed_optimizer=True,
                               use_precision_aware_optimizer=True, **flags)
    assert memory.standard_bytes_per_parameter(args).total == expected


@pytest.mark.parametrize("regime, expected", FORGE_REGIMES.items(), ids=["-".join(map(str, r)) for r in FORGE_REGIMES])
def test_forge_bytes_per_covered_parameter(llama, regime, expected):

    bf16, weight_store, state_dtype = regime
    per = memory.forge_bytes_per_parameter(forge(llama, bf16, weight_store, state_dtype))
    assert per.grad == 0 and per.total == pytest.approx(expected)
    weight = torch.zeros(4, 64, dtype=torch.bfloat16 if bf16 else torch.float32)
    state = ForgeState(weight, "adamw", weight_store=weight_store, state_dtype=state_dtype)
    assert per.total == pytest.approx(state.bytes_per_parameter(weight))  # what the kernel's state allocates


def test_forge_rank_keeps_standard_accounting_for_uncovered(llama):
    args = forge(llama, weight_store="sr", state_dtype="int8")
    covered = memory.covered_parameters_per_rank(args, output_layer_covered(args))
    other = memory.parameters_per_rank(args) - covered
    held = memory.rank_memory(args, 1)
    assert held.grads == 4 * other  # no gradient for covered weights
    # Megatron's own estimate of the standard run, less what it charges the covered weights, plus
    # what a FORGE state of this regime really allocates per parameter.
    standard_params = memory.compute_weight_and_optimizer_memory(memory.replace_args(args, use_forge=False))
    weight = torch.zeros(4, 64, dtype=torch.bfloat16)
    allocated = ForgeState(weight, "adamw", weight_store="sr", state_dtype="int8").bytes_per_parameter(weight)
    assert held.weights + held.grads + held.master + held.states == pytest.approx(
        standard_params - memory.MEGATRON_BYTES_PER_PARAMETER * covered + allocated * covered, rel=1e-9)
    standard = memory.rank_memory(memory.replace_args(args, use_forge=False), 1)
    # Without gradient-accumulation fusion the loss stage holds the output layer's bf16 weight
    # gradient, unless FORGE covers that layer.
    output_grad = 2 * args.padded_vocab_size * args.hidden_size // 8
    assert not args.gradient_accumulation_fusion
    assert held.activations == standard.activations
    assert held.logits == standard.logits - (output_grad if output_layer_covered(args) else 0)



@pytest.mark.parametrize("micro_batches", [1, 4])
def test_forge_data_parallel_owners_hold_one_block_of_state_and_a_gradient_window(llama, micro_batches):
    """At D = 4 each rank holds 1/4 of FORGE's master and states; its gradient is one weight's
    local gradient at a time plus the block reduce-scattered to it (at k = 1), or the per-weight
    accumulation buffers plus that block (k > 1), a window that counts at the step's peak and not
    between steps; the uncovered parameters keep Megatron's bytes."""
    args = memory.replace_args(forge(llama), forge_clip_grad_mode="stale")  # bf16 + fp32 master + fp32 states
    dp4 = memory.replace_args(args, data_parallel_size=4, world_size=4 * args.world_size)
    batch = {"global_batch_size": micro_batches, "micro_batch_size": 1}
    one, four = (memory.rank_memory(memory.replace_args(a, **batch), 1) for a in (args, dp4))
    covered = memory.covered_parameters_per_rank(args, output_layer_covered(args))
    four_steps = memory.replace_args(dp4, global_batch_size=4 * micro_batches)  # k micro-batches per rank
    four = memory.rank_memory(four_steps, 1)
    assert memory.micro_batches_per_step(four_steps, 1) == micro_batches
    assert four.master == pytest.approx(one.master - 3 / 4 * 4 * covered, abs=1)
    assert four.states == pytest.approx(one.states - 3 / 4 * 8 * covered, abs=1)
    largest = memory.largest_covered_weight(args, output_layer_covered(args))
    # the output layer's shard if covered, else linear_fc1's (SwiGLU), at TP = 8
    assert largest == max(2 * 4096 * 14336, args.padded_vocab_size * 4096 * output_layer_covered(args)) // 8
    window = 4 * (largest if micro_batches == 1 else 0) + 4 * largest / 4
    buffers = 4 * covered if micro_batches > 1 else 0  # freed at every step at D > 1: in the window
    assert (four.grads, four.window, one.window) == (one.grads - buffers, round(window) + buffers, 0)
    assert four.total - four.held == one.total - one.held + four.window  # the window counts at the peak only
    # --forge-dp-accumulation owner: the step's gradient summed in the owner's rows (fp32, 1/4 of
    # the buffer), each micro-batch's local gradient through an fp32 window (bf16: half of it)
    owner_args = memory.replace_args(four_steps, forge_dp_accumulation="owner")
    owner = memory.rank_memory(owner_args, 1)
    rows = round(buffers / 4)
    assert (owner.grads, owner.window) == (one.grads - buffers, rows + round(4 * largest + 4 * largest / 4))
    bf16 = memory.rank_memory(memory.replace_args(owner_args, forge_dp_grad_dtype="bf16"), 1)
    assert (bf16.grads, bf16.window) == (owner.grads, rows + round(2 * largest + 2 * largest / 4))
    overlap = memory.rank_memory(memory.replace_args(four_steps, overlap_grad_reduce=True), 1)
    assert overlap.window == round(2 * window) + buffers  # two weights' collectives in flight
    # two-pass clipping at one micro-batch: every weight's reduce-scattered rows held until the step
    two_pass = memory.rank_memory(memory.replace_args(four_steps, forge_clip_grad_mode="two-pass", clip_grad=1.0), 1)
    assert two_pass.window == round(window + (4 * covered / 4 if micro_batches == 1 else 0)) + buffers
    # the default ('auto') is exact at D > 1: it holds the same rows as two-pass
    auto = memory.rank_memory(memory.replace_args(four_steps, forge_clip_grad_mode="auto", clip_grad=1.0), 1)
    assert auto.window == two_pass.window


@pytest.mark.parametrize("fused", [{"transformer_impl": "transformer_engine"}, {"forge_core_attention": "sdpa"}])
def test_activations_are_megatrons_where_its_assumptions_hold(llama, fused):
    """Fused attention (no score matrix): held activations plus Megatron's 4 bytes per logit are its
    estimate, plus each layer's fp32 log-sum-exp per query row and head."""
    args = memory.replace_args(llama, use_forge=False, micro_batch_size=3, **fused)
    activations, logits, workspace = memory.activation_memory(args, 3)
    logits_per_rank = args.seq_length * 3 * args.padded_vocab_size // 8
    rows = 3 * (32 // 8) * args.seq_length  # one layer's [b, heads/tp, s] softmax statistics
    assert activations + 4 * logits_per_rank - 32 * 4 * rows == pytest.approx(
        memory.compute_activation_memory(args, 1), rel=1e-9)
    output_grad = 2 * args.padded_vocab_size * args.hidden_size // 8  # no gradient-accumulation fusion
    assert (logits, workspace) == (6 * logits_per_rank + output_grad, 4 * rows * 128)  # dQ accumulated in fp32
    local = memory.replace_args(args, transformer_impl="local", forge_core_attention="local")
    unfused = memory.activation_memory(local, 3)
    selective = memory.activation_memory(memory.replace_args(local, recompute_granularity="selective"), 3)
    scores = rows * args.seq_length  # one layer's [b, heads/tp, s, s]
    held = activations - 32 * 4 * rows
    assert unfused[0] - held == pytest.approx(2 * scores * (32 + 1), abs=1)  # softmaxes, raw-score buffer
    assert selective[0] - held == pytest.approx(2 * scores, abs=1)
    assert (unfused[2], selective[2]) == (2 * 2 * scores, 3 * 2 * scores)


@pytest.mark.parametrize("state_dtype, accumulation", [("fp32", "fp32"), ("int8", "bf16")])
def test_forge_accumulation_buffer_is_held_only_with_several_micro_batches(llama, state_dtype, accumulation):
    """k > 1 micro-batches per step: each covered weight holds an accumulation buffer of
    --forge-accumulation-dtype; the standard run's fp32 main_grad is there anyway."""
    args = memory.replace_args(forge(llama, weight_store="sr", state_dtype=state_dtype),
                               forge_accumulation_dtype=accumulation)
    covered = memory.covered_parameters_per_rank(args, output_layer_covered(args))
    for micro_batch, global_batch, k in [(1, None, 1), (2, 2, 1), (1, 8, 8), (3, 8, 3)]:
        assert memory.micro_batches_per_step(memory.replace_args(args, global_batch_size=global_batch),
                                             micro_batch) == k
    one = memory.rank_memory(memory.replace_args(args, global_batch_size=2), 2)
    several = memory.rank_memory(memory.replace_args(args, global_batch_size=16), 2)
    assert several.grads - one.grads == {"fp32": 4, "bf16": 2}[accumulation] * covered
    assert dataclasses.replace(several, grads=one.grads) == one  # nothing else changes at PP = 1
    standard = memory.replace_args(args, use_forge=False)
    assert (memory.rank_memory(memory.replace_args(standard, global_batch_size=16), 2)
            == memory.rank_memory(memory.replace_args(standard, global_batch_size=2), 2))


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_stages_split_the_model_and_hold_1f1b_micro_batches_in_flight(llama, pp):
    """Stage s of p: num_layers / p layers, the embedding on the first stage, the output layer on
    the last (which alone has the loss stage), min(k, p - s) micro-batches of activations held."""
    whole = memory.replace_args(llama, use_forge=False, global_batch_size=16)
    args = memory.replace_args(whole, pipeline_model_parallel_size=pp, world_size=8 * pp)
    stages = range(pp)
    norm = llama.hidden_size  # the final norm, counted on every stage
    assert (sum(memory.parameters_per_rank(args, s) for s in stages)
            == memory.parameters_per_rank(whole) + (pp - 1) * norm)
    for cover in (False, True):
        assert (sum(memory.covered_parameters_per_rank(args, cover, s) for s in stages)
                == memory.covered_parameters_per_rank(whole, cover))
    embedding = llama.padded_vocab_size * llama.hidden_size // 8
    middle = [memory.parameters_per_rank(args, s) for s in stages[1:-1]]
    assert memory.parameters_per_rank(args, 0) == memory.parameters_per_rank(args, pp - 1)
    assert all(count == memory.parameters_per_rank(args, 0) - embedding for count in middle)
    one_stage = memory.replace_args(whole, num_layers=llama.num_layers // pp)
    per_micro_batch = memory.activation_memory(one_stage, 1)[0]
    for k in (1, 2, 16):
        run = memory.replace_args(args, global_batch_size=k)
        for s in stages:
            activations, logits, _ = memory.activation_memory(run, 1, s)
            assert activations == pytest.approx(min(k, pp - s) * per_micro_batch, rel=1e-9)
            assert logits == (memory.activation_memory(one_stage, 1)[1] if s == pp - 1 else 0)
        peak = memory.rank_memory(run, 1)
        assert peak.total == max(memory.rank_memory(run, 1, stage=s).total for s in stages)
    assert memory.rank_memory(memory.replace_args(args, global_batch_size=16), 1).stage == 0  # pp in flight
    with pytest.raises(ValueError, match="interleaved"):
        memory.rank_memory(memory.replace_args(args, virtual_pipeline_model_parallel_size=2), 1)


def test_max_micro_batch_is_monotone_and_tight(llama):
    for regime in (llama, forge(llama, weight_store="sr", state_dtype="int8")):
        args = memory.replace_args(regime, seq_length=2048)

        def at(micro_batch, args=args):
            return memory.rank_memory(args, micro_batch)

        fits = [memory.max_micro_batch(at, gib) for gib in range(8, 200, 4)]
        assert fits == sorted(fits) and fits[0] == 0 and fits[-1] > 0
        best = memory.max_micro_batch(at, 80)
        assert at(best).total <= 80 * memory.GIB < at(best + 1).total


def test_headroom_tool_smoke(tmp_path, capsys):
    out_json, out_png = tmp_path / "memory.json", tmp_path / "memory.png"
    # The local spec's unfused attention: at 40 GiB and s = 8192 the standard run fits no sequence.
    assert headroom.main(["--gpu-gib", "40", "80", "--seq-lengths", "8192", "--sweep-gib", "20", "40",
                          "--json", str(out_json), "--plot", str(out_png), "--", "--forge-core-attention",
                          "local"]) == 0
    printed = capsys.readouterr().out
    assert "Largest micro-batch, seq 8192" in printed and "4x standard" in printed
    assert "unfused local DotProductAttention" in printed
    result = json.loads(out_json.read_text())
    assert set(result["max_micro_batch"]["8192"]) == set(headroom.RUNS)
    assert result["max_micro_batch"]["8192"]["standard"]["40"] == 0  # said as such, no division by zero
    assert {e["gpu_gib"] for e in result["four_x"]["standard_fits_none"]} == {40.0}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The configs whose results are committed (docs/memory.md regenerates them with --out): config, its
# array, the layout variables it reads, the data-parallel size, and the name of its results.
COMMITTED = [
    ("llama3_8b_tp8.sh", "LLAMA3_8B_TP8_ARGS", {}, 1, "llama3_8b_tp8"),
    ("llama3_8b_tp2.sh", "LLAMA3_8B_TP2_ARGS", {}, 1, "llama3_8b_tp2"),
    ("llama3_8b_muon_tp2.sh", "LLAMA3_8B_MUON_TP2_ARGS", {}, 1, "llama3_8b_muon_tp2"),
    ("llama3_8b_dp.sh", "LLAMA3_8B_DP_ARGS", {"TP": "2"}, 4, "llama3_8b_tp2_dp4"),
    ("llama3_8b_dp.sh", "LLAMA3_8B_DP_ARGS", {"TP": "1"}, 8, "llama3_8b_tp1_dp8"),
    ("llama3_70b_tp8.sh", "LLAMA3_70B_TP8_ARGS", {}, 1, "llama3_70b_tp8"),
    ("qwen3_30b_a3b_ep8.sh", "QWEN3_30B_A3B_EP8_ARGS", {}, 8, "qwen3_30b_a3b_tp1_ep8_dp8"),
    ("qwen3_30b_a3b_ep8.sh", "QWEN3_30B_A3B_EP8_ARGS", {}, 16, "qwen3_30b_a3b_tp1_ep8_dp16"),
]
SMALL_GRID = ["--gpu-gib", "80", "--seq-lengths", "2048", "--sweep-gib", "79", "80"]


def repository_files() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every tracked file and every file under bench/ and docs/."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = [os.path.relpath(os.path.join(d, f), ROOT) for top in ("bench", "docs")
             for d, _, files in os.walk(os.path.join(ROOT, top)) for f in files]
    return {p: (os.stat(os.path.join(ROOT, p)).st_mtime_ns, os.stat(os.path.join(ROOT, p)).st_size)
            for p in {*listed, *found} if os.path.exists(os.path.join(ROOT, p))}


def test_headroom_runs_write_nothing_without_out_and_name_results_after_their_config(monkeypatch, capsys):
    """Every config of configs/, at each committed layout, leaves the repository as it was; with
    --out its results go to bench/results/memory_model_NAME.json and docs/memory_headroom_NAME.png,
    NAME from the config and its layout: the committed files, made by this version of the model."""
    arrays = {os.path.basename(path): re.findall(r"^(\w+_ARGS)=\(", open(path).read(), re.M)[0]
              for path in glob.glob(os.path.join(ROOT, "configs", "*.sh"))}
    layouts = [(config, array, {}, 1, None) for config, array in arrays.items()
               if config not in {c for c, *_ in COMMITTED}] + COMMITTED
    before = repository_files()
    for config, array, env, dp, name in layouts:
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        path = os.path.join(ROOT, "configs", config)
        assert headroom.main(["--config", path, "--array", array, "--data-parallel-size", str(dp), *SMALL_GRID]) == 0
        if name is not None:
            args = headroom.parse_config(headroom.config_argv(path, array), dp)
            assert headroom.output_name(path, args) == name
            with open(os.path.join(ROOT, "bench", "results", f"memory_model_{name}.json")) as f:
                committed = json.load(f)
            assert (committed["config"], committed["array"], committed["data_parallel"]) == (
                f"configs/{config}", array, dp)
            assert committed["model"].startswith("forge_megatron.tools.memory")
            assert os.path.exists(os.path.join(ROOT, "docs", f"memory_headroom_{name}.png"))
    assert "wrote" not in capsys.readouterr().out
    assert repository_files() == before


def test_headroom_refuses_in_one_line(capsys):
    """What the memory model does not cover, and --out with extra flags (they change the results)."""
    for extra, message in (
            (["--", "--recompute-granularity", "full"], "memory model: --recompute-granularity full is not modelled"),
            (["--out", "--", "--forge-core-attention", "local"],
             "--out writes the config's own results, which extra flags would change; write these with --json and "
             "--plot")):
        assert headroom.main([*SMALL_GRID, *extra]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert errors == [f"memory_headroom.py: error: {message}"], errors


def test_experts_share_their_state_over_the_expert_data_parallel_group():
    """Qwen3-30B-A3B at EP = 8: on 8 ranks each holds its experts' master and states whole
    (expert-data-parallel size 1), on 16 ranks half of them; the dense weights' are split over the
    8 or 16 data-parallel ranks. Standard Megatron's distributed optimizer and FORGE alike."""
    argv = headroom.config_argv(os.path.join(ROOT, "configs", "qwen3_30b_a3b_ep8.sh"), "QWEN3_30B_A3B_EP8_ARGS")
    for use_forge in (False, True):
        one, two = (memory.replace_args(headroom.parse_config(argv, dp), use_forge=use_forge) for dp in (8, 16))
        assert (memory.expert_data_parallel_size(one), memory.expert_data_parallel_size(two)) == (1, 2)
        experts = memory.expert_parameters_per_rank(one)
        assert experts == memory.expert_parameters_per_rank(two) == 48 * 16 * 3 * 2048 * 768
        dense = memory.parameters_per_rank(one) - experts
        shed = [memory.rank_memory(run, 1).master + memory.rank_memory(run, 1).states for run in (one, two)]
        if use_forge:  # SR weights: no master; int8 states; covered and uncovered dense weights
            covered = memory.covered_parameters_per_rank(one, output_layer_covered(one))
            per_state = 2 * memory.FORGE_STATE_BYTES["int8"]
            expected = (experts / 2 + covered / 16) * per_state + (dense - covered) * 12 / 16
        else:
            expected = (experts / 2 + dense / 16) * 12
        assert shed[0] - shed[1] == pytest.approx(expected, rel=1e-6), (shed, expected)


def test_mixtures_outside_the_model_are_refused_in_one_line():
    argv = headroom.config_argv(os.path.join(ROOT, "configs", "qwen3_30b_a3b_ep8.sh"), "QWEN3_30B_A3B_EP8_ARGS")
    args = headroom.parse_config([*argv, "--moe-shared-expert-intermediate-size", "1024"], 8)
    with pytest.raises(memory.NotModelled, match="drop --moe-layer-freq / --moe-shared-expert-intermediate-size"):
        memory.rank_memory(args, 1)


def test_a_muon_config_compares_megatrons_muon_with_forges():
    """configs/llama3_8b_muon_tp2.sh (--optimizer muon, 64 micro-batches per step): per layer linear
    weight, standard Muon holds 2 + 4 + 4 + 4 bytes (weight, main gradient, master, momentum);
    FORGE 2 + 4 (its accumulation buffer) + 4 + 4 with a master, without it 2 + 4 + 4, and with a
    bf16 momentum 2 + 4 + 2."""
    argv = headroom.config_argv(os.path.join(ROOT, "configs", "llama3_8b_muon_tp2.sh"), "LLAMA3_8B_MUON_TP2_ARGS")
    args = headroom.parse_config(argv)
    assert headroom.runs_for(args) is headroom.MUON_RUNS
    result = headroom.study(args, [80], [2048], [80], 2.0)
    assert result["bytes_per_covered_parameter"] == {"standard": 14, "forge-master": 14, "forge-sr": 10,
                                                     "forge-sr-bf16": 8}
    fits = result["max_micro_batch"]["2048"]
    assert fits["forge-sr-bf16"]["80"] > fits["forge-sr"]["80"] > fits["standard"]["80"] > 0
