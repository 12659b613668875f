"""The fused step equals the unfused rule on the same gradient, bit for bit, on both backends.

"Unfused" means: the same kernel run with materialize=True writes the scaled gradient G, and the
rule's torch formula (helpers.reference_step) is applied to the whole tensors. Every fp32
operation in the epilogue is correctly rounded on both sides and FMA contraction is off, so the
only acceptable difference is none.
"""

import pytest
import torch
from helpers import (
    BACKENDS,
    assert_bits_equal,
    case_id,
    randn,
    reference_step,
    rule_cases,
    shard_invariance_inputs,
    snapshot,
)

from forge_megatron import ForgeState, fused_update
from forge_megatron.core.plan import ShardPlacement
from forge_megatron.core.update import default_tile_config, resolve_backend

# (tokens, out, in): unit, odd, a single token, many tokens, more than one tile per dimension
# for every backend's default tiles (interpreter 64x64, torch 64x128), none a multiple of a tile.
SHAPES = [(1, 1, 1), (300, 17, 33), (1, 17, 33), (37, 130, 70), (5, 70, 131)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", rule_cases(), ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_equals_materialized_gradient_plus_reference(backend, case, shape, dtype, gen, device):
    rule, hp = case
    tokens, n_out, n_in = shape
    weight = randn(gen, n_out, n_in, device=device)
    state = ForgeState(weight, rule, **hp)
    twin = weight.clone()
    twin_state = ForgeState(twin, rule, **hp)
    for step in range(1, 4):
        x = randn(gen, tokens, n_in, dtype=dtype, device=device)
        dy = randn(gen, tokens, n_out, dtype=dtype, device=device)
        w0, s0 = snapshot(weight, state)
        result = fused_update(x, dy, weight, state, materialize=True, backend=backend)
        assert state.step == step
        assert not torch.isnan(result.grad).any(), "materialize left unwritten gradient elements"
        assert int(result.nonfinite) == 0 and torch.isfinite(result.sumsq)
        expected_w, expected_s = reference_step(w0, s0, state, result.grad, step)
        assert_bits_equal(weight, expected_w, f"weight, step {step}")
        for name, tensor in state.tensors.items():
            assert_bits_equal(tensor, expected_s[name], f"state {name}, step {step}")
        # Materializing must not change the fused step itself.
        fused_update(x, dy, twin, twin_state, backend=backend)
        assert_bits_equal(twin, weight, f"non-materialized weight, step {step}")
        for name in state.tensors:
            assert_bits_equal(twin_state.tensors[name], state.tensors[name], f"non-materialized {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", rule_cases(), ids=case_id)
def test_bf16_weight_is_the_rounded_copy_of_the_fp32_master(backend, case, gen, device):
    """weight_store='master': the rule runs on the fp32 master exactly as on an fp32 weight, and
    the bf16 weight is the master rounded to nearest even."""
    rule, hp = case
    tokens, n_out, n_in = 40, 70, 131
    master_init = randn(gen, n_out, n_in, device=device)
    weight = master_init.to(torch.bfloat16)
    state = ForgeState(weight, rule, **hp)
    assert state.master.dtype == torch.float32 and torch.equal(state.master, weight.float())
    fp32_twin = weight.float()  # the same start, trained as an fp32 weight
    twin_state = ForgeState(fp32_twin, rule, **hp)
    for step in range(1, 3):
        x = randn(gen, tokens, n_in, dtype=torch.bfloat16, device=device)
        dy = randn(gen, tokens, n_out, dtype=torch.bfloat16, device=device)
        fused_update(x, dy, weight, state, backend=backend)
        fused_update(x, dy, fp32_twin, twin_state, backend=backend)
        assert_bits_equal(state.master, fp32_twin, f"master vs fp32 weight, step {step}")
        assert_bits_equal(weight, fp32_twin.to(torch.bfloat16), f"bf16 weight, step {step}")
        for name in state.tensors:
            assert_bits_equal(state.tensors[name], twin_state.tensors[name], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_dyT_x_within_the_fp32_dot_bound(backend, gen, device):
    """|G - G64| <= gamma_T * (|dy|^T |x|), the textbook bound for a T-term fp32 dot product."""
    tokens, n_out, n_in = 300, 70, 131
    x, dy = randn(gen, tokens, n_in, device=device), randn(gen, tokens, n_out, device=device)
    weight = randn(gen, n_out, n_in, device=device)
    result = fused_update(x, dy, weight, ForgeState(weight, "sgd"), materialize=True, backend=backend)
    exact = dy.double().T @ x.double()
    gamma = tokens * 2.0**-24 / (1 - tokens * 2.0**-24)
    bound = gamma * (dy.double().abs().T @ x.double().abs())
    assert bool(((result.grad.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_multiplies_the_gradient_before_the_rule(backend, gen, device):
    x, dy = randn(gen, 40, 33, device=device), randn(gen, 40, 17, device=device)
    weight = randn(gen, 17, 33, device=device)
    plain = fused_update(x, dy, weight.clone(), ForgeState(weight, "adamw"), materialize=True, backend=backend)
    for scale in (0.5, torch.tensor(0.25, device=device)):
        w = weight.clone()
        state = ForgeState(w, "adamw")
        w0, s0 = snapshot(w, state)
        result = fused_update(x, dy, w, state, grad_scale=scale, materialize=True, backend=backend)
        assert_bits_equal(result.grad, plain.grad * float(scale), "scaled gradient (powers of two are exact)")
        expected_w, _ = reference_step(w0, s0, state, result.grad, 1)
        assert_bits_equal(w, expected_w, "weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_squares_by_product(backend, gen, device):
    tokens, n_out, n_in = 50, 130, 70
    x, dy = randn(gen, tokens, n_in, device=device), randn(gen, tokens, n_out, device=device)
    weight = randn(gen, n_out, n_in, device=device)
    result = fused_update(x, dy, weight, ForgeState(weight, "adamw"), grad_scale=0.5, materialize=True, backend=backend)
    exact = ((result.grad.double() / 0.5) ** 2).sum()  # of the raw gradient, before the scale
    # n positive fp32 terms summed in any order: |error| <= (n - 1) * u * sum, plus one rounding per square.
    tol = (n_out * n_in + 1) * 2.0**-24 * float(exact)
    assert abs(float(result.sumsq) - float(exact)) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_only_pass_writes_nothing_but_the_by_products(backend, gen, device):
    tokens, n_out, n_in = 30, 130, 70
    x, dy = randn(gen, tokens, n_in, device=device), randn(gen, tokens, n_out, device=device)
    weight = randn(gen, n_out, n_in, device=device)
    state = ForgeState(weight, "adamw")
    w0, s0 = snapshot(weight, state)
    norms = fused_update(x, dy, weight, state, grad_scale=0.5, apply=False, backend=backend).stats.clone()
    assert state.step == 0
    assert_bits_equal(weight, w0, "weight after a norms-only pass")
    for name, tensor in state.tensors.items():
        assert_bits_equal(tensor, s0[name], name)
    applied = fused_update(x, dy, weight, state, grad_scale=0.5, backend=backend)
    assert_bits_equal(norms, applied.stats, "by-products")  # the step's slot: the applied step overwrote it
    assert int(applied.nonfinite) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), "overflow"])
def test_non_finite_gradient_skips_only_its_tiles(backend, poison, gen, device):
    block_m = default_tile_config(resolve_backend(device, backend), device, torch.float32, "fp32").block_m
    tokens, n_out, n_in = 20, 2 * block_m + 2, 70  # three row-blocks of the config in use, the last ragged
    x, dy = randn(gen, tokens, n_in, device=device), randn(gen, tokens, n_out, device=device)
    bad_row = block_m + 36  # in the second row-block
    if poison == "overflow":  # finite inputs, non-finite gradient: (1e20 * 1e20) overflows fp32
        dy[3, bad_row] = 1e20
        x[3] = torch.where(x[3] >= 0, 1e20, -1e20)
    else:
        dy[3, bad_row] = poison
    weight = randn(gen, n_out, n_in, device=device)
    state = ForgeState(weight, "adamw")
    w0, s0 = snapshot(weight, state)
    result = fused_update(x, dy, weight, state, materialize=True, backend=backend)
    g = result.grad
    bad = ~torch.isfinite(g)
    assert int(result.nonfinite) == int(bad.sum()) == n_in
    bad_rows = torch.arange(block_m, 2 * block_m)  # the row-block of the bad tiles
    good_rows = torch.cat([torch.arange(0, block_m), torch.arange(2 * block_m, n_out)])
    assert_bits_equal(weight[bad_rows], w0[bad_rows], "weights of non-finite tiles")
    for name, tensor in state.tensors.items():
        assert_bits_equal(tensor[bad_rows], s0[name][bad_rows], f"state {name} of non-finite tiles")
    expected_w, expected_s = reference_step(
        w0[good_rows], {k: v[good_rows] for k, v in s0.items()}, state, g[good_rows], 1)
    assert_bits_equal(weight[good_rows], expected_w, "weights of finite tiles")
    for name, tensor in state.tensors.items():
        assert_bits_equal(tensor[good_rows], expected_s[name], f"state {name} of finite tiles")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regime", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")], ids=["fp32", "bf16-sr"])
def test_update_does_not_depend_on_sharding(backend, regime, gen, device):
    """Row shards (column-parallel) and column shards (row-parallel) of one weight, at offsets that
    are not tile multiples, get exactly the bits of the unsharded update (inputs exact on CPU,
    see shard_invariance_inputs); bf16 weights and states, stochastically rounded, draw the bits
    their elements draw unsharded (each shard's placement says where it sits; a smaller weight, as
    the interpreter's random bits are slow)."""
    weight_dtype, state_dtype = regime
    tokens, n_out, n_in, cuts = (90, 130, 150, (37, 101)) if state_dtype == "fp32" else (16, 70, 90, (37,))
    x = shard_invariance_inputs(gen, tokens, n_in, device=device)
    dy = shard_invariance_inputs(gen, tokens, n_out, device=device)
    weight = randn(gen, n_out, n_in, device=device).to(weight_dtype)

    def state_of(shard, placement):
        st = ForgeState(shard, "adamw", weight_store="sr", state_dtype=state_dtype, seed=4, weight_id=3)
        st.placement = placement
        return st

    def bits(t):
        return t.view(torch.int16) if t.dtype == torch.bfloat16 else t

    full = weight.clone()
    full_state = state_of(full, ShardPlacement.whole(weight.shape))
    fused_update(x, dy, full, full_state, backend=backend)
    for cut in cuts:
        for rows in (slice(0, cut), slice(cut, n_out)):
            shard = weight[rows].clone()
            st = state_of(shard, ShardPlacement(row_offset=rows.start, global_cols=n_in))
            fused_update(x, dy[:, rows], shard, st, backend=backend)
            assert_bits_equal(bits(shard), bits(full[rows]), f"row shard {rows}")
            for name, tensor in st.tensors.items():
                assert_bits_equal(bits(tensor), bits(full_state.tensors[name][rows]), f"row shard {name}")
        for cols in (slice(0, cut), slice(cut, n_in)):
            shard = weight[:, cols].clone()
            st = state_of(shard, ShardPlacement(col_offset=cols.start, global_cols=n_in))
            fused_update(x[:, cols], dy, shard, st, backend=backend)
            assert_bits_equal(bits(shard), bits(full[:, cols]), f"column shard {cols}")
            for name, tensor in st.tensors.items():
                assert_bits_equal(bits(tensor), bits(full_state.tensors[name][:, cols]), f"column shard {name}")


def test_backends_agree_bit_for_bit_when_the_gradient_is_exact(gen, device):
    """With small-integer inputs every product and partial sum is exact in fp32, so both backends
    see the same gradient whatever their summation order; from there on they must agree exactly
    (one rule function, correctly rounded ops). For general inputs the gradients differ within
    the dot-product bound (test_gradient_is_dyT_x_within_the_fp32_dot_bound, applied to both)."""
    tokens, n_out, n_in = 70, 75, 130
    for rule, hp in rule_cases():
        results = {}
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        for backend in BACKENDS:
            g = torch.Generator().manual_seed(seed)
            weight = randn(g, n_out, n_in, device=device)
            state = ForgeState(weight, rule, **hp)
            for _ in range(3):
                x = torch.randint(-4, 5, (tokens, n_in), generator=g).to(device=device, dtype=torch.bfloat16)
                dy = torch.randint(-4, 5, (tokens, n_out), generator=g).to(device=device, dtype=torch.bfloat16)
                fused_update(x, dy, weight, state, grad_scale=0.125, backend=backend)
            results[backend] = (weight, state)
        (w_a, s_a), (w_b, s_b) = results.values()
        assert_bits_equal(w_a, w_b, f"{rule}: weights, triton vs torch")
        for name in s_a.tensors:
            assert_bits_equal(s_a.tensors[name], s_b.tensors[name], f"{rule}: {name}, triton vs torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_3d_inputs_give_the_same_bits(backend, gen, device):
    s, b, n_in, n_out = 6, 5, 33, 17
    x3 = randn(gen, s, b, n_in, device=device)
    dy3 = randn(gen, s, b, n_out, device=device)
    weight = randn(gen, n_out, n_in, device=device)

    def run(x, dy):
        w = weight.clone()
        st = ForgeState(w, "adamw")
        fused_update(x, dy, w, st, backend=backend)
        return w, st.tensors["exp_avg"]

    w_ref, m_ref = run(x3.reshape(-1, n_in), dy3.reshape(-1, n_out))
    column_major = x3.reshape(-1, n_in).t().contiguous().t()  # strides (1, T)
    gathered = torch.cat([dy3.reshape(-1, n_out), randn(gen, s * b, 9, device=device)], 1)[:, :n_out]
    transposed_3d = x3.transpose(0, 1).contiguous().transpose(0, 1)  # [s, b, h] view of [b, s, h]
    dy2 = dy3.reshape(-1, n_out)
    for x, dy, what in [(x3, dy3, "3-D [s, b, h]"), (column_major, dy2, "column-major x"),
                        (x3.reshape(-1, n_in), gathered, "dy slice of a wider buffer"),
                        (transposed_3d, dy3, "[b, s, h] storage")]:
        w, m = run(x, dy)
        assert_bits_equal(w, w_ref, what)
        assert_bits_equal(m, m_ref, what)


@pytest.mark.parametrize("regime", [(torch.float32, "master", "fp32"), (torch.bfloat16, "sr", "int8")],
                         ids=["fp32", "bf16-sr-int8"])
def test_torch_backend_memory_is_a_panel_not_the_gradient(regime, gen):
    """The tiled twin's extra memory (live tensor bytes during the step, LiveTensorMemory) is one
    panel of at most tiled.PANEL_ELEMENTS gradient values with the epilogue's panel-sized
    temporaries (the rule's fp32 intermediates, its float64 square roots, int64 random bits):
    within tiled.workspace_bytes plus 8 bytes of by-products a tile, the same for weights of
    1024 x 1040 and 8192 x 2080 (whose fp32 gradient, 68 MB, is over ten times it). Measured at
    the second step: the first makes the state's slots (by-products and scalars), which it keeps."""
    from forge_megatron.core.tiled import DEFAULT_CONFIG, workspace_bytes
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    dtype, store, state_dtype = regime
    peaks, tiles = {}, {}
    for shape in ((1024, 1040), (8192, 2080)):
        weight = randn(gen, *shape, dtype=dtype)
        x, dy = randn(gen, 40, shape[1], dtype=dtype), randn(gen, 40, shape[0], dtype=dtype)
        state = ForgeState(weight, "adamw", weight_store=store, state_dtype=state_dtype)
        fused_update(x, dy, weight, state, backend="torch")
        with LiveTensorMemory() as tracker:
            fused_update(x, dy, weight, state, backend="torch")
        assert tracker.current == 0  # nothing left behind
        tiles[shape] = -(-shape[0] // DEFAULT_CONFIG.block_m) * -(-shape[1] // DEFAULT_CONFIG.block_n)
        assert tracker.peak <= workspace_bytes(40, shape) + 8 * tiles[shape], (shape, tracker.peak)
        peaks[shape] = tracker.peak
    print({s: f"{p / 2**20:.2f} MiB" for s, p in peaks.items()})
    (small, large), (t_small, t_large) = peaks.values(), tiles.values()
    assert abs(large - small) <= 8 * (t_large - t_small) + 4 * 40 * (8192 + 2080) and 10 * large < 8192 * 2080 * 4
