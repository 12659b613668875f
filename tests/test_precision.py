"""Precision regimes: bf16 weights with stochastic rounding or an fp32 master, bf16 and 8-bit
states. The kernel's numerics agree with their torch twins bit for bit; stochastic rounding is
unbiased; 8-bit block quantization stays within its documented bound; the fused step equals the
unfused step in every regime; and the memory each regime allocates is what docs/numerics.md says."""

import math

import pytest
import torch
import triton
import triton.language as tl
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
from forge_megatron.core import numerics
from forge_megatron.core.plan import ShardPlacement

# -- the kernel's numerics vs their torch twins (run through tiny Triton kernels) --------------


@triton.jit
def _bits_and_sr_kernel(x_ptr, bits_ptr, sr_ptr, n, k1, k2, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = numerics.random_bits(offs.to(tl.uint32), k1.to(tl.uint32), k2.to(tl.uint32))  # keys may pass 2^31
    tl.store(bits_ptr + offs, bits.to(tl.int64), mask=mask)
    tl.store(sr_ptr + offs, numerics.stochastic_round_to_bf16(tl.load(x_ptr + offs, mask=mask), bits), mask=mask)


def _kernel_bits_and_sr(x, k1, k2):
    bits = torch.full(x.shape, -1, dtype=torch.int64, device=x.device)
    sr = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=x.device)
    _bits_and_sr_kernel[(triton.cdiv(x.numel(), 1024),)](x, bits, sr, x.numel(), k1, k2, BLOCK=1024)
    return bits, sr


@triton.jit
def _stream_keys_kernel(out_ptr, seed, weight_id, step, micro, STREAM: tl.constexpr, MICRO_STREAM: tl.constexpr):
    if MICRO_STREAM:
        k1, k2 = numerics.micro_stream_keys(seed, weight_id, step, STREAM, micro)
    else:
        k1, k2 = numerics.stream_keys(seed, weight_id, step, STREAM)
    tl.store(out_ptr, k1.to(tl.int64))
    tl.store(out_ptr + 1, k2.to(tl.int64))


@pytest.mark.parametrize("stream, micro", [(0, None), (3, None), (numerics.ACCUMULATION_STREAM, 0),
                                           (numerics.ACCUMULATION_STREAM, 5)])
def test_the_kernels_stream_keys_are_the_hosts(stream, micro, gen, device):
    """The kernel derives its keys from (seed, weight id, step, stream[, micro-batch]) as the
    host's twin does, including values past 2^31 and steps near the limit of the fp32 step slot."""
    for seed, weight_id, step in [(0, 0, 1), (1234, 7, 11), (2**31 - 1, 2**20 + 5, 2**24 - 1),
                                  *[tuple(int(v) for v in torch.randint(0, 2**31, (3,), generator=gen)) for _ in range(3)]]:
        step = step % (2**24)
        out = torch.full((2,), -1, dtype=torch.int64, device=device)
        _stream_keys_kernel[(1,)](out, seed, weight_id, step, micro or 0, STREAM=stream, MICRO_STREAM=micro is not None)
        expected = numerics.stream_keys_int(seed, weight_id, step, stream, micro or 0)
        assert tuple(out.tolist()) == expected, (seed, weight_id, step, micro)


def test_stream_keys_differ_by_weight_step_stream_and_micro_batch():
    """The weight's and the states' streams, and the accumulation stream's per micro-batch (16 here:
    k micro-batches on each of D data-parallel ranks use k * rank + j)."""
    keys = {numerics.stream_keys_int(5, w, step, stream) for w in range(4) for step in range(1, 50) for stream in range(4)}
    keys |= {numerics.stream_keys_int(5, w, step, numerics.ACCUMULATION_STREAM, micro)
             for w in range(4) for step in range(1, 50) for micro in range(16)}
    assert len(keys) == 4 * 49 * (4 + 16)


def test_random_bits_and_stochastic_rounding_match_the_torch_twins(gen, device):
    x = randn(gen, 5000, device=device) * torch.logspace(-20, 20, 5000, device=device)
    k1, k2 = numerics.stream_keys_int(seed=7, weight_id=3, step=11, stream=0)
    bits, sr = _kernel_bits_and_sr(x, k1, k2)
    expected_bits = numerics.random_bits_torch(torch.arange(x.numel(), device=device), k1, k2)
    assert_bits_equal(bits, expected_bits, "random bits")
    assert_bits_equal(sr.view(torch.int16), numerics.stochastic_round_to_bf16_torch(x, expected_bits).view(torch.int16),
                      "stochastic rounding")


def test_random_bits_are_uniform_and_independent_of_keys(device):
    index = torch.arange(1 << 16, device=device)
    a = numerics.random_bits_torch(index, *numerics.stream_keys_int(0, 0, 1, 0))
    b = numerics.random_bits_torch(index, *numerics.stream_keys_int(0, 0, 2, 0))
    for bits in (a, b):
        low16 = (bits & 0xFFFF).double()
        # mean of 65536 uniform 16-bit values: 32767.5 +- 18918/sqrt(65536) = 74; 6 sigma
        assert abs(float(low16.mean()) - 32767.5) < 6 * 74
        counts = torch.bincount((bits >> 28).long(), minlength=16).double()  # top 4 bits: chi-square, 15 dof
        assert float(((counts - 4096) ** 2 / 4096).sum()) < 50
    assert float(((a ^ b) != 0).double().mean()) > 0.999  # another step, other bits


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(gen, device):
    """Over N keys, the mean of SR(x) is x within 6 standard deviations of the binomial mean
    (sd <= spacing / (2 sqrt(N))); every draw is the bf16 value just below or just above x."""
    x = randn(gen, 4000, device=device)
    lower = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)  # truncation: the neighbour towards 0
    upper = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)  # the one away from 0
    spacing = (upper - lower).abs().double()
    n = 800
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(n):
        bits = numerics.random_bits_torch(torch.arange(x.numel(), device=device), *numerics.stream_keys_int(seed, 0, 1, 0))
        draw = numerics.stochastic_round_to_bf16_torch(x, bits).float()
        assert bool(((draw == lower) | (draw == upper)).all())
        total += draw.double()
    mean = total / n
    assert bool(((mean - x.double()).abs() <= 6 * spacing / (2 * math.sqrt(n))).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stochastically_rounded_step_is_reproducible_and_its_bits_change_with_the_step(backend, gen, device):
    """Rerunning a step from the same weight, state and inputs stores the same bits (the keys
    depend on nothing else); the same step at another step count rounds differently."""
    x = randn(gen, 16, 64, dtype=torch.bfloat16, device=device)
    dy = randn(gen, 16, 64, dtype=torch.bfloat16, device=device)
    start = randn(gen, 64, 64, device=device).to(torch.bfloat16)
    stored = {}
    for run, step in (("first", 0), ("again", 0), ("later", 5)):
        weight = start.clone()
        state = ForgeState(weight, "sgd", lr=1e-3, weight_store="sr", state_dtype="bf16", seed=9, weight_id=1)
        state.step = step
        fused_update(x, dy, weight, state, backend=backend)
        stored[run] = weight.view(torch.int16)
    assert torch.equal(stored["first"], stored["again"])
    assert not torch.equal(stored["first"], stored["later"])


@triton.jit
def _quant_kernel(x_ptr, bits_ptr, code_ptr, scale_ptr, value_ptr, table_ptr, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    codes, scale = numerics.quantize(tl.load(x_ptr + offs), tl.load(bits_ptr + offs).to(tl.uint32), table_ptr, 32)
    tl.store(code_ptr + offs, codes)
    tl.store(scale_ptr + tl.arange(0, M)[:, None] * (N // 32) + tl.arange(0, N // 32)[None, :], scale)
    per_element = tl.reshape(tl.broadcast_to(scale[:, :, None], (M, N // 32, 32)), (M, N))
    tl.store(value_ptr + offs, numerics.dequantize(codes, per_element, table_ptr))


def _blocks(gen, device):
    """Rows of 64 = two blocks each: ordinary, all-zero, one huge outlier, all negative, tiny."""
    rows = randn(gen, 8, 64, device=device)
    rows[1, :32] = 0.0
    rows[2, 5] = 1e6
    rows[3] = -rows[3].abs()
    rows[4] *= 1e-30
    rows[5, :32] = rows[5, :32].abs() * torch.logspace(-12, 0, 32, device=device)
    return rows


def _bits(key: int, shape, device):
    index = torch.arange(shape[0] * shape[1], device=device).reshape(shape)
    return numerics.random_bits_torch(index, *numerics.stream_keys_int(key, 0, 1, 1))


def _table_step(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per element of x [M, N], the 8-bit code table's step around it: r - 1 relative inside the
    table's range, and floor * absmax of its block below it (between 0 and the smallest code)."""
    blocks = x.reshape(x.shape[0], -1, numerics.QBLOCK).abs()
    absmax = blocks.amax(dim=2, keepdim=True)
    return torch.maximum(numerics.relative_error_bound(signed) * blocks,
                         numerics.range_floor(signed) * absmax).reshape(x.shape)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantization_matches_the_twin_and_its_bound(signed, gen, device):
    x = _blocks(gen, device)
    if not signed:
        x = x.abs()
    table = numerics.code_tables().to(device)[0 if signed else 1]
    bits = _bits(0, x.shape, device)
    codes = torch.zeros(8, 64, dtype=torch.uint8, device=device)
    scales = torch.full((8, 2), float("nan"), device=device)
    values = torch.full((8, 64), float("nan"), device=device)
    _quant_kernel[(1,)](x, bits.to(torch.int64), codes, scales, values, table, M=8, N=64)
    expected_codes, expected_scales = numerics.quantize_torch(x, table, bits)
    assert_bits_equal(codes, expected_codes, "codes")
    assert_bits_equal(scales, expected_scales, "scales")
    decoded = numerics.dequantize_torch(codes, scales, table)
    assert_bits_equal(values, decoded, "dequantized values")

    # The documented bound, per block: relative error r - 1 (one table step, stochastic rounding
    # picks either neighbour) above floor * absmax, and at most floor * absmax below it; one fp32
    # rounding of the product on top.
    error, bound = (decoded - x).abs(), _table_step(x, signed)
    assert bool((error <= bound * (1 + 2**-22) + 1e-45).all())
    assert bool((decoded.reshape(8, 2, 32)[1, 0] == 0).all())  # the zero block stays zero
    assert bool(((decoded == 0) | (torch.sign(decoded) == torch.sign(x))).all())  # signs survive
    assert float(decoded.reshape(8, 2, 32)[2, 0, 5]) == pytest.approx(1e6, rel=1e-6)  # the outlier itself is exact


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_stochastic_requantization_is_unbiased(signed, gen, device):
    """Over N keys the mean decoded value is x within 6 standard deviations (one table step of
    spread: sd <= step / 2, so 6 * step / (2 sqrt(N))). The step is r - 1 relative for values
    inside the table's range and floor * absmax below it (rounding between 0 and the smallest code)."""
    x = randn(gen, 16, 64, device=device) * torch.logspace(-3, 0, 64, device=device)
    if not signed:
        x = x.abs()
    table = numerics.code_tables().to(device)[0 if signed else 1]
    n = 400
    total = torch.zeros_like(x, dtype=torch.float64)
    for key in range(n):
        codes, scales = numerics.quantize_torch(x, table, _bits(key, x.shape, device))
        total += numerics.dequantize_torch(codes, scales, table).double()
    step = _table_step(x, signed).double()
    assert bool(((total / n - x.double()).abs() <= 6 * step / (2 * math.sqrt(n)) + 1e-30).all())


# -- the fused step in every regime --------------------------------------------------------------

REGIMES = [  # (weight dtype, weight store, state dtype)
    (torch.bfloat16, "sr", "fp32"),
    (torch.bfloat16, "sr", "bf16"),
    (torch.bfloat16, "sr", "int8"),
    (torch.bfloat16, "master", "int8"),
    (torch.bfloat16, "rne", "bf16"),
    (torch.float32, "master", "int8"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", rule_cases(), ids=case_id)
@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: f"{str(r[0])[6:]}-{r[1]}-{r[2]}")
@pytest.mark.parametrize("shape", [(37, 70, 70), (1, 17, 33)], ids=lambda s: "x".join(map(str, s)))
def test_fused_step_equals_the_unfused_step_in_every_regime(backend, case, regime, shape, gen, device):
    rule, hp = case
    weight_dtype, store, state_dtype = regime
    tokens, n_out, n_in = shape
    weight = randn(gen, n_out, n_in, device=device).to(weight_dtype)
    try:
        state = ForgeState(weight, rule, weight_store=store, state_dtype=state_dtype, seed=5, weight_id=2, **hp)
    except ValueError as err:  # e.g. Adagrad's nonzero initial accumulator cannot start as int8 codes
        assert "int8 states start at zero" in str(err)
        return
    for step in range(1, 3):
        x = randn(gen, tokens, n_in, dtype=torch.bfloat16, device=device)
        dy = randn(gen, tokens, n_out, dtype=torch.bfloat16, device=device)
        w0, s0 = snapshot(weight, state)
        result = fused_update(x, dy, weight, state, materialize=True, backend=backend)
        expected_w, expected = reference_step(w0, s0, state, result.grad, step)
        assert_bits_equal(weight.view(torch.int16) if weight_dtype == torch.bfloat16 else weight,
                          expected_w.view(torch.int16) if weight_dtype == torch.bfloat16 else expected_w, "weight")
        for name, tensor in state.named_tensors().items():
            got, want = (tensor.view(torch.int16), expected[name].view(torch.int16)) if tensor.dtype == torch.bfloat16 \
                else (tensor, expected[name])
            assert_bits_equal(got, want, f"{name}, step {step}")


def test_stochastic_rounding_does_not_depend_on_tensor_parallel_sharding(gen, device):
    """Column shards, row shards and SwiGLU fc1 shards ([gate_k; up_k] of the unsharded [gate; up])
    draw the random bits their elements draw in the unsharded weight (inputs exact on CPU, see
    shard_invariance_inputs)."""
    tp = 2
    for backend in BACKENDS:
        tokens, n_out, n_in = 20, 96, 80
        x = shard_invariance_inputs(gen, tokens, n_in, dtype=torch.bfloat16, device=device)
        dy = shard_invariance_inputs(gen, tokens, n_out, dtype=torch.bfloat16, device=device)
        full = randn(gen, n_out, n_in, device=device).to(torch.bfloat16)
        weight = full.clone()
        fused_update(x, dy, weight, ForgeState(weight, "adamw", weight_store="sr", state_dtype="bf16", seed=1,
                                               weight_id=4), backend=backend)
        half, ffn = n_out // (2 * tp), n_out // 2  # gated: rows [gate (ffn); up (ffn)], a shard is 2 * half rows
        for rank in range(tp):
            cases = {
                "column": (slice(rank * n_out // tp, (rank + 1) * n_out // tp), slice(None),
                           ShardPlacement(row_offset=rank * n_out // tp, global_cols=n_in)),
                "row": (slice(None), slice(rank * n_in // tp, (rank + 1) * n_in // tp),
                        ShardPlacement(col_offset=rank * n_in // tp, global_cols=n_in)),
                "gated fc1": (torch.cat([torch.arange(rank * half, (rank + 1) * half),
                                         torch.arange(ffn + rank * half, ffn + (rank + 1) * half)]), slice(None),
                              ShardPlacement(row_offset=rank * half, row_split=half, row_jump=(tp - 1) * half,
                                             global_cols=n_in)),
            }
            for what, (rows, cols, placement) in cases.items():
                shard = full[rows][:, cols].clone()
                state = ForgeState(shard, "adamw", weight_store="sr", state_dtype="bf16", seed=1, weight_id=4)
                state.placement = placement
                fused_update(x[:, cols], dy[:, rows], shard, state, backend=backend)
                assert_bits_equal(shard.view(torch.int16), weight[rows][:, cols].view(torch.int16), f"{backend} {what}")


# -- memory ----------------------------------------------------------------------------------------

MEMORY_TABLE = {  # bytes per parameter: weight + master + two AdamW states (docs/numerics.md)
    (torch.float32, "master", "fp32"): 4 + 0 + 8,
    (torch.bfloat16, "master", "fp32"): 2 + 4 + 8,
    (torch.bfloat16, "sr", "fp32"): 2 + 0 + 8,
    (torch.bfloat16, "sr", "bf16"): 2 + 0 + 4,
    (torch.bfloat16, "master", "int8"): 2 + 4 + 2 * (1 + 4 / 32),
    (torch.bfloat16, "sr", "int8"): 2 + 0 + 2 * (1 + 4 / 32),
}


@pytest.mark.parametrize("regime", list(MEMORY_TABLE), ids=lambda r: f"{str(r[0])[6:]}-{r[1]}-{r[2]}")
def test_bytes_per_parameter_match_the_documented_table(regime):
    weight_dtype, store, state_dtype = regime
    weight = torch.zeros(256, 512, dtype=weight_dtype)
    state = ForgeState(weight, "adamw", weight_store=store, state_dtype=state_dtype)
    assert state.bytes_per_parameter(weight) == MEMORY_TABLE[regime]


# -- fidelity --------------------------------------------------------------------------------------


def test_bf16_sr_tracks_the_fp32_trajectory_better_than_the_usual_bf16_practice(gen, device, capsys):
    """Least squares, AdamW with lr 1e-4: each step moves a weight by ~1e-4, below half the bf16
    spacing of weights of size ~1 (2^-8 = 0.004), so round-to-nearest drops most updates. Usual
    practice here: the gradient rounded to bf16 and torch.optim.AdamW on bf16 weights (its
    states are bf16 too), no master. FORGE: the fp32 gradient in registers, fp32 states,
    stochastically rounded bf16 weights. Distance = ||W - W_fp32|| / ||W_fp32 - W_0|| after
    200 steps, W_fp32 the same problem trained in fp32. Round-to-nearest does not move (distance
    ~1); stochastic rounding is right on average, with noise sqrt(steps * lr * spacing) against a
    travelled distance of steps * lr, i.e. a ratio of about sqrt(spacing / (steps * lr)) = 0.6 here,
    falling as training goes on. The fp32 master run shows the floor all bf16 runs share: bf16
    activations and gradients of the forward pass (about 0.1 here)."""
    n_out, n_in, tokens, steps, lr = 64, 128, 256, 200, 1e-4
    teacher = randn(gen, n_out, n_in, device=device)
    w0 = randn(gen, n_out, n_in, device=device)
    batches = [randn(gen, tokens, n_in, device=device) for _ in range(steps)]

    def grad_out(w, x):  # d(0.5 * mean squared error)/dy for y = x w^T
        return (x @ w.float().T - x @ teacher.T) / tokens

    reference = w0.clone()
    ref_state = ForgeState(reference, "adamw", lr=lr, weight_decay=0.0)
    forge = w0.to(torch.bfloat16)
    forge_state = ForgeState(forge, "adamw", weight_store="sr", seed=1, lr=lr, weight_decay=0.0)
    master = w0.to(torch.bfloat16)
    master_state = ForgeState(master, "adamw", weight_store="master", lr=lr, weight_decay=0.0)
    usual = torch.nn.Parameter(w0.to(torch.bfloat16))
    usual_optim = torch.optim.AdamW([usual], lr=lr, weight_decay=0.0)
    for x in batches:
        fused_update(x, grad_out(reference, x), reference, ref_state)
        xb = x.to(torch.bfloat16)
        fused_update(xb, grad_out(forge, x).to(torch.bfloat16), forge, forge_state)
        fused_update(xb, grad_out(master, x).to(torch.bfloat16), master, master_state)
        usual.grad = grad_out(usual.detach(), x).to(torch.bfloat16).T @ xb  # a bf16 GEMM: bf16 gradient
        usual_optim.step()
    travelled = (reference - w0).norm()
    d_forge = float((forge.float() - reference).norm() / travelled)
    d_usual = float((usual.detach().float() - reference).norm() / travelled)
    d_master = float((master_state.master - reference).norm() / travelled)
    with capsys.disabled():
        print(f"\nfidelity after {steps} steps (distance to the fp32 trajectory / distance travelled): FORGE "
              f"bf16-SR {d_forge:.3f}, FORGE bf16 + fp32 master {d_master:.3f}, usual bf16 practice {d_usual:.3f}")
    assert d_usual > 0.95  # round-to-nearest lost (nearly) every update
    assert d_forge < 0.75 * d_usual and d_forge < 1.5 * math.sqrt(2.0**-7 / (steps * lr))
    assert d_master < d_forge


def test_states_built_without_an_id_draw_different_bits(gen, device):
    """Two same-shape weights covered outside a controller still get distinct random streams."""
    x = randn(gen, 8, 64, dtype=torch.bfloat16, device=device)
    dy = randn(gen, 8, 64, dtype=torch.bfloat16, device=device)
    start = randn(gen, 64, 64, device=device).to(torch.bfloat16)
    results, ids = [], set()
    for _ in range(2):
        weight = start.clone()
        state = ForgeState(weight, "adamw", weight_store="sr", seed=1)
        ids.add(state.weight_id)
        fused_update(x, dy, weight, state)
        results.append(weight)
    assert len(ids) == 2 and not torch.equal(results[0], results[1])
