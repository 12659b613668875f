"""Measured memory on CPU: scripts/bench_memory.py end to end against the memory model, the
pipeline stages' and the accumulation buffer's memory in Megatron's loop, and LiveTensorMemory,
the CPU counterpart of torch.cuda.max_memory_allocated that the measurements rely on. (Apart
from tests/test_scripts.py so that pytest-xdist runs the two files side by side.)"""

import json

import pytest
import torch
from test_scripts import load

from forge_megatron.megatron.args import output_layer_covered


@pytest.mark.parametrize("data_parallel", [1, 2])
def test_bench_memory_compares_measurements_with_the_model(data_parallel):
    bench = load("bench_memory")
    budget = 24 * 2**30

    def fake_measure(flags, micro_batch, micro_batches, pipeline, data_parallel):  # the model exact, 24 GiB fit
        from forge_megatron.megatron.args import add_forge_args
        from forge_megatron.tools import memory
        from forge_megatron.tools.benchmarking import RankMemory

        args = memory.parse_megatron_args(bench._batch(flags, micro_batch, micro_batches, data_parallel),
                                          extra_args_provider=add_forge_args, data_parallel_size=data_parallel)
        stages = [memory.rank_memory(args, micro_batch, reserve_gib=0, stage=s) for s in range(pipeline)]
        ranks = [RankMemory(stage.total, stage.held) for stage in stages]
        return ranks if max(r.peak for r in ranks) <= budget else None

    regimes = bench.compare(bench.emulated_rank(2, 1024), fake_measure, gib=24, max_micro_batch=64,
                            data_parallel=data_parallel)
    assert set(regimes) == set(bench.REGIMES)
    for entry in regimes.values():
        assert entry["relative_error_mb1"] == pytest.approx(0.0) and entry["relative_error_mb2"] == pytest.approx(0.0)
        assert entry["held_relative_error_mb1"] == pytest.approx(0.0)
        assert entry["largest_power_of_two_micro_batch"] >= 1
    assert regimes["forge-sr-int8"]["model_max_micro_batch"] >= regimes["standard"]["model_max_micro_batch"]


def test_bench_memory_measures_live_tensor_bytes_on_cpu(tmp_path):
    """The CPU measurement end to end (a tiny model; three of the four regimes and one micro-batch,
    to keep CI short):
    FORGE holds less than the standard run, 8-bit states less than fp32 ones; the model's peak is
    within 25 % of the measurement (the tiny model's fixed costs, the CPU twin's block buffers and
    the launcher's own tensors weigh more here than on the 8B rank), and what a rank holds
    between steps (weights, gradient buffers, master, states) within 1 %.

    Data parallelism, measured against that run (FORGE bf16 + fp32 master and states, the same
    micro-batch per rank at DP = 2, the gradient reduce-scattered in bf16): between steps the
    rank holds the master and states its owner block sheds (1/2 of 12 bytes per covered
    parameter) less, as the model says within 1 %; its peak falls by at most that and grows back
    by at most the model's gradient window (the largest covered weight's bf16 gradient plus the
    block reduce-scattered to it): no gradient beyond the window is held."""
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.tools import memory

    bench = load("bench_memory")
    out = tmp_path / "memory.json"
    regimes = bench.main(["--smoke", "--iters", "2", "--regimes", "standard", "forge-master",
                          "forge-sr-int8", "--micro-batch-sizes", "1", "--out", str(out)])["regimes"]
    assert json.loads(out.read_text())["regimes"] == json.loads(json.dumps(regimes))
    assert set(regimes) == {"standard", "forge-master", "forge-sr-int8"}
    peaks = {name: entry["measured_peak_bytes_mb1"] for name, entry in regimes.items()}
    assert peaks["forge-sr-int8"] < peaks["forge-master"] < peaks["standard"], peaks
    assert all(abs(entry["relative_error_mb1"]) <= 0.25 for entry in regimes.values()), regimes
    assert all(abs(entry["held_relative_error_mb1"]) <= 0.01 for entry in regimes.values()), regimes
    argv = [*bench.SMOKE, *bench.REGIMES["forge-master"], "--forge-core-attention", "sdpa", "--train-iters", "2",
            "--forge-dp-grad-dtype", "bf16"]
    dp2 = bench.measure(argv, 1, 1, data_parallel=2)[0]
    args = memory.parse_megatron_args(bench._batch(argv, 1, 1, 2), extra_args_provider=add_forge_args,
                                      data_parallel_size=2)
    model = memory.rank_memory(args, 1, reserve_gib=0)
    assert abs(model.held / dp2.held - 1) <= 0.01, (model.held, dp2.held)
    shed = (4 + 8) / 2 * memory.covered_parameters_per_rank(args, output_layer_covered(args))
    one = regimes["forge-master"]
    assert abs((one["measured_held_bytes_mb1"] - dp2.held) / shed - 1) <= 0.01, (one["measured_held_bytes_mb1"], dp2)
    assert model.window > 0
    assert -shed <= dp2.peak - one["measured_peak_bytes_mb1"] <= model.window - shed, (dp2, shed, model.window)


def test_accumulation_allocates_only_its_buffer_on_cpu():
    """Measured in Megatron's loop (FORGE SR + int8 states, one stage): a step of two micro-batches
    holds the covered weights' bf16 accumulation buffers (2 bytes per covered parameter) beyond a
    step of one, and nothing else (at one micro-batch there is no buffer: tests/test_controller.py;
    the fp32 buffer's 4 bytes are measured per pipeline stage below)."""
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.tools import memory

    bench = load("bench_memory")
    argv = [*bench.SMOKE, *bench.REGIMES["forge-sr-int8"], "--forge-core-attention", "sdpa", "--train-iters", "2"]
    args = memory.parse_megatron_args(argv, extra_args_provider=add_forge_args)
    covered = memory.covered_parameters_per_rank(args, output_layer_covered(args))
    one = bench.measure(argv, 1, 1)[0].peak
    two = bench.measure([*argv, "--forge-accumulation-dtype", "bf16"], 1, 2)[0].peak
    assert two - one == pytest.approx(2 * covered, rel=0.02), (one, two, 2 * covered)


def test_pipeline_stages_hold_1f1b_micro_batches_and_the_accumulation_buffer_on_cpu():
    """Measured per stage in Megatron's loop (PP = 2, FORGE SR + int8 states, fp32 buffer) at 1, 2
    and 4 micro-batches per step, against the memory model's two assumptions: stage s holds
    min(k, P - s) micro-batches in flight (stage 0 grows by one micro-batch from k = 1 to 2, then
    stops; stage 1 never grows), and at k > 1 every stage holds its covered weights' buffers."""
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.tools import memory

    bench = load("bench_memory")
    argv = [*bench.PIPELINE_SMOKE, *bench.REGIMES["forge-sr-int8"], "--forge-core-attention", "sdpa",
            "--train-iters", "2", "--pipeline-model-parallel-size", "2"]
    peaks = {k: [rank.peak for rank in bench.measure(argv, 1, k, pipeline=2)] for k in (1, 2, 4)}
    args = memory.parse_megatron_args(argv, extra_args_provider=add_forge_args)
    buffers = [4 * memory.covered_parameters_per_rank(args, output_layer_covered(args), stage) for stage in (0, 1)]
    # Up to two [s, b, h] bf16 tensors: 1F1B's steady state receives the next micro-batch's input
    # (and the previous one's output gradient) while one is in flight.
    p2p = 2 * args.seq_length * args.hidden_size * 2
    held = peaks[2][0] - peaks[1][0] - buffers[0]  # stage 0: a second micro-batch in flight
    assert held > 0.2 * peaks[1][0], peaks  # activations weigh here, or the test would tell nothing
    assert 0 <= peaks[2][1] - peaks[1][1] - buffers[1] <= p2p, (peaks, buffers)  # stage 1: the buffer only
    assert abs(peaks[4][0] - peaks[2][0]) <= p2p and abs(peaks[4][1] - peaks[2][1]) <= p2p, peaks  # at most P


MOE = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256", "--moe-token-dispatcher-type",
       "alltoall", "--no-bias-swiglu-fusion"]  # unfused SwiGLU, as it runs on CPU


@pytest.mark.parametrize("case", ["forge-experts-over-expert-dp", "standard-routed-tokens"])
def test_mixture_of_experts_memory_model_against_measurement_on_cpu(case):
    """Measured in Megatron's loop (8 experts, top-2, alltoall dispatcher, two ranks) against the
    memory model, within the dense model's tolerances (what a rank holds between steps 1 %, its
    peak 25 %):
    - FORGE SR + int8 states at EP = 1, DP = 2, a short sequence (weights and states weigh): the
      experts' master and states are shared over their expert-data-parallel pair;
    - standard Megatron with its distributed optimizer at EP = 2, DP = 2 (expert-data-parallel size
      1: the experts' gradients, master and states whole on each rank, the dense ones halved), a
      long sequence: the routed tokens' activations are most of the peak."""
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.tools import memory

    bench = load("bench_memory")
    if case == "forge-experts-over-expert-dp":
        argv = [*bench.SMOKE, *MOE, *bench.REGIMES["forge-sr-int8"]]
    else:
        argv = [*bench.emulated_rank(2, 1024, hidden=256, ffn=512, kv_channels=64, vocab=1024), *MOE,
                "--use-distributed-optimizer", "--expert-model-parallel-size", "2"]
    argv += ["--forge-core-attention", "sdpa", "--train-iters", "2"]
    measured = bench.measure(argv, 1, 1, data_parallel=2)[0]
    args = memory.parse_megatron_args(bench._batch(argv, 1, 1, 2), extra_args_provider=add_forge_args,
                                      data_parallel_size=2)
    model = memory.rank_memory(args, 1, reserve_gib=0)
    print(f"{case}: peak measured {measured.peak}, model {model.total} ({model.total / measured.peak - 1:+.3f}); held "
          f"measured {measured.held}, model {model.held} ({model.held / measured.held - 1:+.4f})")
    assert abs(model.held / measured.held - 1) <= 0.01, (model, measured)
    assert abs(model.total / measured.peak - 1) <= 0.25, (model, measured)
    experts = memory.expert_parameters_per_rank(args)
    assert experts == args.num_layers * 8 * 3 * args.hidden_size * 256 // args.expert_model_parallel_size
    if case == "standard-routed-tokens":
        assert measured.peak - measured.held > 0.5 * measured.peak  # activations weigh
    else:
        assert memory.expert_data_parallel_size(args) == 2


def test_live_tensor_memory_counts_storages_once_until_freed():
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    tracker = LiveTensorMemory()
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        view = a.view(10, 100)  # the same storage: not counted again
        b = a + 1  # 4000
        del b
        c = torch.empty(250, dtype=torch.float64)  # 2000, after b was freed
    assert (tracker.peak, tracker.current) == (8000, 6000)
    del a, view, c
    assert tracker.current == 0


def test_live_tensor_memory_ignores_tensors_made_before_it():
    """Views of, and in-place or out= writes to, storages made outside the mode allocate nothing."""
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    outside, other = torch.zeros(1000), torch.ones(1000)
    with LiveTensorMemory() as tracker:
        outside[:500].add_(1)
        outside.view(10, 100).mul_(2)
        torch.add(outside, other, out=outside)
        new = outside * 2  # 4000 bytes
    assert (tracker.peak, tracker.current) == (4000, 4000) and new.numel() == 1000


def test_read_and_reset_peak_starts_a_new_period_on_cpu():
    from forge_megatron.tools.benchmarking import LiveTensorMemory, read_and_reset_peak

    assert read_and_reset_peak() is None  # no GPU and no tracker: nothing to read
    with LiveTensorMemory():
        kept = torch.zeros(100)  # 400 bytes
        torch.zeros(1000)  # 4000, freed at once
        assert read_and_reset_peak() == 4400
        assert read_and_reset_peak() == 400  # the new period starts from what is alive
    assert LiveTensorMemory.active is None and kept.numel() == 100


@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_a_deferred_state_allocates_only_the_rows_an_owner_keeps(state_dtype):
    """A covered weight's state (ForgeParam's, deferred) allocates nothing until it is used, and a
    data-parallel owner's rows of it (ForgeState.rows) allocate only those rows, with the values
    the whole state has there: the whole shard's master and states never exist on a DP > 1 rank
    (they used to, while the model was set up: the measured peak of a small model at DP = 2)."""
    from forge_megatron.core.state import ForgeState
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    weight = torch.randn(8, 64).bfloat16()
    whole = ForgeState(weight, state_dtype=state_dtype)
    expected = whole.rows(2, 6).named_tensors()
    with LiveTensorMemory() as tracker:
        deferred = ForgeState(weight, state_dtype=state_dtype, defer=True)
        assert tracker.current == 0 and deferred.state_names() == whole.state_names()
        block = deferred.rows(2, 6)
        assert tracker.peak == tracker.current == sum(t.nbytes for t in expected.values())
    got = block.named_tensors()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(torch.equal(t, whole.named_tensors()[k]) for k, t in deferred.named_tensors().items())


@pytest.mark.parametrize("regime", ["standard", "forge-sr"])
def test_muon_memory_model_against_measurement_on_cpu(regime):
    """--optimizer muon in Megatron's loop (bf16, one rank) against the memory model: what the rank
    holds between steps within 1 % (the dense layers' linear weights with one momentum each:
    14 bytes standard, 2 + 4 for FORGE with SR; the output layer and the rest with Adam), its peak
    within 25 % (the model adds the largest matrix's Newton-Schulz temporaries)."""
    from forge_megatron.megatron.args import add_forge_args
    from forge_megatron.tools import memory

    bench = load("bench_memory")
    argv = [*bench.SMOKE, *bench.REGIMES[regime], "--optimizer", "muon", "--forge-core-attention", "sdpa",
            "--train-iters", "2"]
    measured = bench.measure(argv, 1, 1)[0]
    args = memory.parse_megatron_args(bench._batch(argv, 1, 1), extra_args_provider=add_forge_args)
    model = memory.rank_memory(args, 1, reserve_gib=0)
    print(f"muon {regime}: peak measured {measured.peak}, model {model.total} ({model.total / measured.peak - 1:+.3f});"
          f" held measured {measured.held}, model {model.held} ({model.held / measured.held - 1:+.4f})")
    assert abs(model.held / measured.held - 1) <= 0.01, (model, measured)
    assert abs(model.total / measured.peak - 1) <= 0.25, (model, measured)
    matrices = memory.covered_parameters_per_rank(args, False)
    expected = 2 + 4 if regime == "forge-sr" else 2 + 4 + 4 + 4
    per = (memory.forge_bytes_per_parameter(args, 1, memory.MUON_STATES) if regime == "forge-sr"
           else memory.standard_bytes_per_parameter(args, memory.MUON_STATES))
    assert per.total == expected and matrices > 0
