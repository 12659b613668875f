"""The grouped step (update.fused_update_grouped): E experts' weights stacked [E, out, in], their
tokens grouped by expert, one kernel launch. Each expert must take, bit for bit, the step that
`fused_update` takes for it on its own tokens with its own ForgeState (the per-expert path: the
same id, so the same random bits), in every precision regime, on both backends (the Triton kernel
interpreted on CPU, on small shapes: ~4 ms per program and token block). Independent references:
the gradient is dy[rows_e]^T x[rows_e] in float64 within the fp32 dot bound (exactly zero for an
expert without tokens), its per-tile sums of squares the float64 ones, and an expert without tokens
steps as torch.optim.AdamW steps on a zero gradient. Outputs are poisoned with NaN (the
materialized gradient; the by-product slots with -1), so an element a backend fails to write shows up.
"""

import pytest
import torch
from helpers import BACKENDS, assert_bits_equal, randn, snapshot

from forge_megatron import (
    Accumulation,
    ForgeState,
    GroupedForgeState,
    apply_accumulated,
    fused_update,
    fused_update_grouped,
)
from forge_megatron.core import kernels
from forge_megatron.core.table import StepTable
from forge_megatron.core.update import default_tile_config, resolve_backend, step_tiles

U = 2.0**-24
# (weight dtype, weight store, state dtype); the Triton kernel is interpreted on the first three
REGIMES = [(torch.float32, "master", "fp32"), (torch.bfloat16, "sr", "bf16"), (torch.bfloat16, "master", "int8"),
           (torch.bfloat16, "sr", "int8")]
COUNTS = [37, 0, 70, 5]  # tokens per expert: uneven, one expert without any, one over a token block (64)
SHAPE = (70, 40)  # [out, in]: two row tiles, ragged, and a ragged int8 block (32 + 8 columns)


def offsets_of(counts) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])


def experts_pair(gen, device, counts, dtype, store, state_dtype, rule="adamw", shape=SHAPE, **hp):
    """A stacked weight with its GroupedForgeState, and each expert's own copy with its own
    ForgeState (the per-expert path), same seed and ids."""
    weight = randn(gen, len(counts), *shape, device=device).to(dtype)
    ids = [int(i) for i in torch.randint(0, 2**32, (len(counts),), generator=gen)]
    options = dict(weight_store=store, state_dtype=state_dtype, seed=9, **hp)
    grouped = GroupedForgeState(weight, rule, weight_ids=ids, **options)
    per_expert = [weight[e].clone() for e in range(len(counts))]
    states = [ForgeState(w, rule, weight_id=ids[e], **options) for e, w in enumerate(per_expert)]
    return weight, grouped, per_expert, states


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def assert_experts_equal(weight, state, per_expert, states, what):
    for e, (w, st) in enumerate(zip(per_expert, states)):
        assert_bits_equal(bits(weight[e]), bits(w), f"{what}: expert {e}'s weight")
        for name, tensor in st.named_tensors().items():
            assert_bits_equal(bits(state.named_tensors()[name][e]), bits(tensor), f"{what}: expert {e}'s {name}")
        assert st.step == state.step


class Launches:
    """Counts the launches of every kernel of kernels.py (their grids), interpreted or compiled."""

    def __init__(self, monkeypatch):
        self.grids = {}
        for name in ("fused_wgrad_update_kernel", "apply_buffer_kernel", "grouped_wgrad_update_kernel"):
            monkeypatch.setattr(kernels, name, self._counted(name, getattr(kernels, name)))

    def _counted(self, name, kernel):
        launches = self

        class Counted:
            def __getitem__(self, grid):
                launches.grids.setdefault(name, []).append(grid)
                return kernel[grid]

        return Counted()

    def take(self) -> dict:
        grids, self.grids = self.grids, {}
        return grids


def check_one_launch(launches, backend, weight, config):
    grids = launches.take()
    if backend == "triton":  # one program per tile of every expert, (tile, expert)
        tiles = -(-weight.shape[1] // config.block_m) * -(-weight.shape[2] // config.block_n)
        assert grids == {"grouped_wgrad_update_kernel": [(tiles, weight.shape[0])]}, grids
    else:
        assert grids == {}, grids


# int8 with stochastic rounding runs on the torch twin only: the kernel's int8 and SR paths are each
# interpreted in another regime (~10 s each).
EXPERT_STEP_CASES = [pytest.param(backend, regime, id=f"{str(regime[0])[6:]}-{regime[1]}-{regime[2]}-{backend}")
                     for regime in REGIMES for backend in BACKENDS
                     if not (backend == "triton" and regime == REGIMES[3])]


@pytest.mark.parametrize("backend, regime", EXPERT_STEP_CASES)
def test_each_expert_takes_its_per_expert_step(backend, regime, gen, device, monkeypatch):
    """Two AdamW steps (the Triton kernel: one in the 16-bit regimes), the second with a NaN in
    expert 0's tokens (its column of tiles stores nothing, as on the per-expert path); the grouped
    weight is one StepTable row (gradient scale 0.5 from the table, by-product slots poisoned
    before each step), the per-expert path standalone with grad_scale=0.5."""
    dtype, store, state_dtype = regime
    steps = 2 if backend == "torch" or dtype == torch.float32 else 1
    weight, state, per_expert, states = experts_pair(gen, device, COUNTS, dtype, store, state_dtype, lr=1e-2,
                                                     weight_decay=0.1)
    config = default_tile_config(resolve_backend(weight.device, backend), weight.device, dtype, state_dtype)
    table = StepTable([state], [step_tiles(weight, state, backend)], weight.device)
    launches = Launches(monkeypatch)
    offsets, tokens = offsets_of(COUNTS), sum(COUNTS)
    for step in range(1, steps + 1):
        x, dy = randn(gen, tokens, SHAPE[1], dtype=dtype, device=device), randn(gen, tokens, SHAPE[0], dtype=dtype,
                                                                               device=device)
        if step == 2:
            x[3, 17] = float("nan")  # expert 0's token
        table.write(0.5)
        table.stats.fill_(-1.0)  # poisoned (a NaN marks a non-finite tile's sum of squares)
        result = fused_update_grouped(x, dy, offsets, weight, state, materialize=True, backend=backend,
                                      slots=table.slots[0])
        check_one_launch(launches, backend, weight, config)
        assert state.step == step
        expert_tiles = result.stats.shape[0] // len(COUNTS)
        for e, (w, st) in enumerate(zip(per_expert, states)):
            rows = slice(int(offsets[e]), int(offsets[e + 1]))
            own = fused_update(x[rows], dy[rows], w, st, grad_scale=0.5, materialize=True, backend=backend)
            assert_bits_equal(result.grad[e], own.grad, f"step {step}: expert {e}'s gradient")
            assert_bits_equal(result.stats[e * expert_tiles:(e + 1) * expert_tiles], own.stats,
                              f"step {step}: expert {e}'s by-products")
        launches.take()
        assert_experts_equal(weight, state, per_expert, states, f"step {step}")
        assert not (table.stats == -1.0).any()
        assert int(result.nonfinite) == (0 if step == 1 else SHAPE[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [("sgd", {}), ("rmsprop", dict(momentum=0.9, centered=True, weight_decay=0.01))],
                         ids=["sgd-no-state", "rmsprop-three-states"])
def test_rules_with_no_and_three_stored_states(backend, case, gen, device):
    """States not stored reach the kernel as the stacked weight (placeholders, moved to each
    expert's part too, never read); every stored one is moved to the expert's part."""
    rule, hp = case
    counts = [9, 0, 20]
    weight, state, per_expert, states = experts_pair(gen, device, counts, torch.float32, "master", "fp32", rule,
                                                     lr=0.1, **hp)
    offsets = offsets_of(counts)
    x, dy = randn(gen, sum(counts), SHAPE[1], device=device), randn(gen, sum(counts), SHAPE[0], device=device)
    fused_update_grouped(x, dy, offsets, weight, state, backend=backend)
    for e, (w, st) in enumerate(zip(per_expert, states)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        fused_update(x[rows], dy[rows], w, st, backend=backend)
    assert_experts_equal(weight, state, per_expert, states, rule)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_each_experts_dyT_x(backend, gen, device):
    """Against float64: expert e's gradient within the fp32 dot bound of its T_e tokens, exactly zero
    without tokens; its per-tile sums of squares (expert-major slots) within (bm bn + 1) u."""
    counts = [30, 0, 66]
    n_out, n_in = 40, 70
    weight = randn(gen, len(counts), n_out, n_in, device=device)
    state = GroupedForgeState(weight, "sgd", lr=0.1)
    offsets = offsets_of(counts)
    x, dy = randn(gen, sum(counts), n_in, device=device), randn(gen, sum(counts), n_out, device=device)
    result = fused_update_grouped(x, dy, offsets, weight, state, materialize=True, backend=backend)
    config = default_tile_config(resolve_backend(weight.device, backend), weight.device, torch.float32, "fp32")
    bm, bn = config.block_m, config.block_n
    sumsq = result.stats.view(len(counts), -1, 2)[:, :, 0].double().cpu()
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        xs, ds = x[rows].double().cpu(), dy[rows].double().cpu()
        tokens = xs.shape[0]
        gamma = tokens * U / (1 - tokens * U)
        error = (result.grad[e].double().cpu() - ds.T @ xs).abs()
        assert bool((error <= gamma * (ds.abs().T @ xs.abs())).all()), f"expert {e}'s gradient (NaN: unwritten)"
        if tokens == 0:
            assert bool((result.grad[e] == 0).all())
        raw = torch.nn.functional.pad(result.grad[e].double().cpu(), (0, -n_in % bn, 0, -n_out % bm))
        tiles = raw.reshape(raw.shape[0] // bm, bm, raw.shape[1] // bn, bn).square().sum(dim=(1, 3)).flatten()
        assert bool(((sumsq[e] - tiles).abs() <= (bm * bn + 1) * U * tiles).all()), f"expert {e}'s sums of squares"
    assert int(result.nonfinite) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expert_without_tokens_steps_as_torch_optim_on_a_zero_gradient(backend, gen, device):
    """Expert 1 gets tokens at step 1 and none at steps 2 and 3: its moments decay and its weight
    decays, as torch.optim.AdamW's do on a zero gradient (the gradient each expert gets is the
    kernel's own, materialized). The rules differ from torch.optim by rounding only, ~1e-7 relative
    per step (tests/test_rules.py): 1e-6 in norm after three steps leaves a margin; a skipped step,
    or a gradient that is not zero, is off by far more (lr * weight decay = 1e-3 per step)."""
    n_out, n_in = 20, 24
    hp = dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    weight = randn(gen, 2, n_out, n_in, device=device)
    state = GroupedForgeState(weight, "adamw", **hp)
    reference = [torch.nn.Parameter(weight[e].clone()) for e in range(2)]
    optimizer = torch.optim.AdamW(reference, **hp)
    for counts in ([5, 6], [8, 0], [3, 0]):
        x, dy = randn(gen, sum(counts), n_in, device=device), randn(gen, sum(counts), n_out, device=device)
        before = weight[1].clone()
        result = fused_update_grouped(x, dy, offsets_of(counts), weight, state, materialize=True, backend=backend)
        assert bool((result.grad[1] == 0).all()) == (counts[1] == 0)
        assert not torch.equal(weight[1], before), "expert 1 was not stepped"
        for e in range(2):
            reference[e].grad = result.grad[e].clone()
        optimizer.step()
        for e in range(2):
            expected = {"weight": reference[e].detach(), **optimizer.state[reference[e]]}
            for name, got in (("weight", weight[e]), ("exp_avg", state.tensors["exp_avg"][e]),
                              ("exp_avg_sq", state.tensors["exp_avg_sq"][e])):
                relative = (got - expected[name]).norm() / expected[name].norm()
                assert float(relative) <= 1e-6, f"expert {e}'s {name}, tokens {counts}: {float(relative):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16], ids=["fp32-buffer", "bf16-buffer-held"])
def test_accumulation_over_micro_batches_is_the_per_expert_one(backend, buffer_dtype, gen, device):
    """Two micro-batches with different routings (expert 1 empty in the first, expert 0 in the
    second) summed in a stacked buffer: fp32, updating at the last; bf16 (stochastically rounded
    with each expert's id and micro-batch), held (apply=False) and applied by apply_accumulated."""
    routings = ([9, 0, 20], [0, 12, 7])
    held = buffer_dtype == torch.bfloat16
    weight, state, per_expert, states = experts_pair(gen, device, routings[0], torch.float32, "master", "fp32",
                                                     "sgd", shape=(40, 70), lr=0.1, momentum=0.9)
    buffer = torch.full(weight.shape, float("nan"), dtype=buffer_dtype, device=device)
    buffers = [torch.full(w.shape, float("nan"), dtype=buffer_dtype, device=device) for w in per_expert]
    for j, counts in enumerate(routings):
        offsets = offsets_of(counts)
        x, dy = randn(gen, sum(counts), 70, device=device), randn(gen, sum(counts), 40, device=device)
        fused_update_grouped(x, dy, offsets, weight, state, apply=not held, backend=backend,
                             accumulate=Accumulation(buffer, j, 2))
        for e, (w, st) in enumerate(zip(per_expert, states)):
            rows = slice(int(offsets[e]), int(offsets[e + 1]))
            fused_update(x[rows], dy[rows], w, st, apply=not held, backend=backend,
                         accumulate=Accumulation(buffers[e], j, 2))
            if j == 0 or held:
                assert_bits_equal(bits(buffer[e]), bits(buffers[e]), f"micro-batch {j}: expert {e}'s buffer")
    if held:
        assert state.step == 0
        w0, s0 = snapshot(weight, state)
        result = apply_accumulated(weight, state, buffer, grad_scale=0.5, materialize=True, backend=backend)
        for e, (w, st) in enumerate(zip(per_expert, states)):
            own = apply_accumulated(w, st, buffers[e], grad_scale=0.5, materialize=True, backend=backend)
            assert_bits_equal(result.grad[e], own.grad, f"expert {e}'s applied gradient")
        assert not torch.equal(weight, w0)
    assert_experts_equal(weight, state, per_expert, states, "after the step")


def _bad(problem):
    """(offsets, x, dy, weight, state, kwargs) of a valid grouped step, with `problem` applied."""
    gen = torch.Generator().manual_seed(1)
    counts = [3, 0, 4]
    weight = randn(gen, 3, 6, 5)
    state = GroupedForgeState(weight, "adamw")
    case = dict(offsets=offsets_of(counts), x=randn(gen, 7, 5), dy=randn(gen, 7, 6), weight=weight, state=state,
                kwargs={})
    problem(case)
    return case


PROBLEMS = {
    "offsets decrease": (lambda c: c.update(offsets=torch.tensor([0, 4, 3, 7])), ValueError,
                         "offsets must not decrease: offsets[2] = 3 < offsets[1] = 4"),
    "offsets start past 0": (lambda c: c.update(offsets=torch.tensor([1, 3, 3, 7])), ValueError, "offsets[0] must be 0"),
    "offsets of the wrong length": (lambda c: c.update(offsets=torch.tensor([0, 3, 7])), ValueError,
                                    "offsets must be [E + 1] = [4] for 3 experts"),
    "offsets not summing to the tokens": (lambda c: c.update(offsets=torch.tensor([0, 3, 3, 6])), ValueError,
                                          "offsets[3] = 6, but x and dy hold 7 tokens"),
    "float offsets": (lambda c: c.update(offsets=torch.tensor([0.0, 3, 3, 7])), TypeError,
                      "offsets must be an int32 or int64 tensor"),
    "offsets of two dims": (lambda c: c.update(offsets=torch.tensor([[0, 3, 3, 7]])), ValueError,
                            "got shape (1, 4)"),
    "a 2-D weight": (lambda c: c.update(weight=c["weight"][0]), ValueError,
                     "a grouped step's weight must be E experts' weights stacked [E, out, in]"),
    "3-D tokens": (lambda c: c.update(x=c["x"][None]), ValueError, "x and dy must be [tokens, in] and [tokens, out]"),
    "a dense state": (lambda c: c.update(state=ForgeState(c["weight"][0])), TypeError,
                      "needs the experts' GroupedForgeState"),
    "another expert count": (lambda c: c.update(state=GroupedForgeState(torch.zeros(2, 6, 5))), ValueError,
                             "state was built for a weight of shape (2, 6, 5)"),
    "slots of one expert's tiles": (
        lambda c: c["kwargs"].update(slots=StepTable([c["state"]], [1], torch.device("cpu")).slots[0]), ValueError,
        "slots hold by-products for 1 tiles"),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bad_inputs_are_refused_in_one_line_and_nothing_changes(problem):
    change, error, message = PROBLEMS[problem]
    case = _bad(change)
    weight, state = case["weight"], case["state"]
    before = snapshot(weight, state)
    with pytest.raises(error) as caught:
        fused_update_grouped(case["x"], case["dy"], case["offsets"], weight, state, backend="torch", **case["kwargs"])
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert_bits_equal(weight, before[0], "weight after a refused step")
    for name, tensor in state.named_tensors().items():
        assert_bits_equal(tensor, before[1][name], f"{name} after a refused step")
    assert state.step == 0


def test_a_grouped_state_has_one_id_per_expert():
    weight = torch.zeros(3, 4, 64)
    state = GroupedForgeState(weight, "adamw", state_dtype="int8", weight_ids=[5, 6, 7])
    assert state.tensors["exp_avg.scale"].shape == (3, 4, 2) and state.placement.global_cols == 64
    refusals = [
        (lambda: GroupedForgeState(weight, weight_ids=[1, 2]), ValueError, "weight_ids has 2 ids for 3 experts"),
        (lambda: GroupedForgeState(weight, weight_id=1), TypeError, "pass weight_ids, one per expert"),
        (lambda: GroupedForgeState(weight[0]), ValueError, "stacked [E, out, in]"),
        (lambda: setattr(state, "weight_id", 3), AttributeError, "set weight_ids, one per expert"),
        (lambda: state.rows(0, 2), ValueError, "owner rows of a grouped weight are not supported"),
        (lambda: fused_update(torch.zeros(2, 64), torch.zeros(2, 4), weight, state), ValueError, "must be 2-D"),
        (lambda: fused_update(torch.zeros(2, 64), torch.zeros(2, 4), weight[0], state), TypeError,
         "steps with fused_update_grouped"),
    ]
    for make, error, message in refusals:
        with pytest.raises(error, match=None) as caught:
            make()
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert state.weight_ids == (5, 6, 7)


@pytest.mark.parametrize("path", ["loop", "torch._grouped_mm"])
def test_the_experts_module_grouped_matmul_is_each_experts_matmul(path, gen, monkeypatch):
    """megatron/experts.py's grouped matmul (forward: x_e W_e^T; dgrad: dy_e W_e) against each
    expert's own matmul: the loop bit for bit, torch's grouped matmul (the GPU path in bf16; taken
    here on CPU in fp32, where torch has it too) within fp32 rounding. An expert without tokens."""
    from forge_megatron.megatron import experts

    if path != "loop":
        monkeypatch.setattr(experts, "_torch_grouped_mm_takes", lambda a, b: True)
    counts = [3, 0, 5, 8]
    offsets = offsets_of(counts)
    weights = randn(gen, len(counts), 24, 16)
    x, dy = randn(gen, sum(counts), 16), randn(gen, sum(counts), 24)
    y = experts.grouped_matmul(x, weights, counts, offsets, transpose=True)
    dx = experts.grouped_matmul(dy, weights, counts, offsets, transpose=False)
    assert y.shape == (16, 24) and dx.shape == (16, 16)
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        for got, want in ((y[rows], x[rows] @ weights[e].T), (dx[rows], dy[rows] @ weights[e])):
            if path == "loop":
                assert_bits_equal(got, want, f"expert {e}")
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
