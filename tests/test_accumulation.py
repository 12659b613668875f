"""Gradient accumulation in the fused step (core): over k micro-batches the buffer holds the sum
of the earlier ones, the last adds its own and runs the rule on the total.

fp32: the update equals the unfused rule applied to the accumulated gradient bit for bit, the sum
taken in the order Megatron's fp32 main_grad takes it (((G1 + G2) + G3) + ...), each G_j the
kernel's own fp32 GEMM of micro-batch j; the two-pass route (the total stored, then
apply_accumulated) gives the same bits. bf16 buffers round stochastically: unbiased."""

import itertools
import math

import pytest
import torch
from helpers import BACKENDS, assert_bits_equal, randn, reference_step, rule_cases, snapshot

from forge_megatron import Accumulation, ForgeState, apply_accumulated, fused_update
from forge_megatron.core import numerics

SHAPES = [(37, 130, 70), (5, 17, 33)]  # (tokens per micro-batch, out, in): ragged tiles


def _micro_batches(gen, k, tokens, n_out, n_in, dtype, device):
    return [(randn(gen, tokens, n_in, dtype=dtype, device=device), randn(gen, tokens, n_out, dtype=dtype, device=device))
            for _ in range(k)]


def _kernel_gradient(x, dy, weight, backend):
    """The kernel's own fp32 GEMM of one micro-batch (materialized on a throwaway copy)."""
    copy = weight.clone()
    return fused_update(x, dy, copy, ForgeState(copy, "sgd"), materialize=True, backend=backend).grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", rule_cases()[:4], ids=lambda c: c[0])
def test_accumulated_update_is_the_rule_on_the_summed_gradient(backend, k, shape, case, gen, device):
    rule, hp = case
    tokens, n_out, n_in = shape
    weight = randn(gen, n_out, n_in, device=device)
    state = ForgeState(weight, rule, **hp)
    for step in (1, 2):
        batches = _micro_batches(gen, k, tokens, n_out, n_in, torch.float32, device)
        total = None
        for x, dy in batches:  # Megatron's main_grad order
            g = _kernel_gradient(x, dy, weight, backend)
            total = g if total is None else total + g
        w0, s0 = snapshot(weight, state)
        buffer = torch.full_like(weight, float("nan"))  # poisoned: the first micro-batch must not read it
        for j, (x, dy) in enumerate(batches):
            fused_update(x, dy, weight, state, grad_scale=0.5, backend=backend, accumulate=Accumulation(buffer, j, k))
            if j < k - 1:
                assert state.step == step - 1 and torch.equal(weight, w0)  # nothing updated yet
        assert state.step == step
        expected_w, expected_s = reference_step(w0, s0, state, total * torch.tensor(0.5), step)
        assert_bits_equal(weight, expected_w, f"weight, step {step}")
        for name, tensor in state.tensors.items():
            assert_bits_equal(tensor, expected_s[name], f"{name}, step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_products_are_the_accumulated_gradients(backend, gen, device):
    tokens, n_out, n_in = 20, 130, 70
    weight = randn(gen, n_out, n_in, device=device)
    batches = _micro_batches(gen, 3, tokens, n_out, n_in, torch.float32, device)
    total = sum(_kernel_gradient(x, dy, weight, backend) for x, dy in batches)
    buffer = torch.empty_like(weight)
    state = ForgeState(weight, "adamw")
    for j, (x, dy) in enumerate(batches):
        result = fused_update(x, dy, weight, state, apply=False, backend=backend, accumulate=Accumulation(buffer, j, 3))
    assert float(result.sumsq) == pytest.approx(float((total.double() ** 2).sum()), rel=1e-5)
    assert int(result.nonfinite) == 0 and state.step == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_two_pass_route_gives_the_same_bits(backend, gen, device):
    """apply=False over the micro-batches stores the total; apply_accumulated then updates from it:
    the same update as the last micro-batch's own, bit for bit (fp32 buffer)."""
    tokens, n_out, n_in = 20, 130, 70
    start = randn(gen, n_out, n_in, device=device)
    batches = _micro_batches(gen, 3, tokens, n_out, n_in, torch.float32, device)
    results = []
    for two_pass in (False, True):
        weight, buffer = start.clone(), torch.empty_like(start)
        state = ForgeState(weight, "adamw", lr=1e-2, weight_decay=0.1)
        for j, (x, dy) in enumerate(batches):
            fused_update(x, dy, weight, state, grad_scale=0.25, apply=not two_pass, backend=backend,
                         accumulate=Accumulation(buffer, j, 3))
        if two_pass:
            assert torch.equal(weight, start) and state.step == 0
            apply_accumulated(weight, state, buffer, grad_scale=0.25, backend=backend)
        results.append((weight, state))
    (w_a, s_a), (w_b, s_b) = results
    assert_bits_equal(w_b, w_a, "weight")
    assert s_a.step == s_b.step == 1
    for name in s_a.tensors:
        assert_bits_equal(s_b.tensors[name], s_a.tensors[name], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_held_gradients_by_products_come_before_its_update(backend, gen, device):
    """apply_accumulated(apply=False) (a held gradient's norm, before the coefficient is known)
    writes the by-products the update writes (+inf, -inf and NaN counted) and nothing else."""
    weight = randn(gen, 130, 70, device=device)
    buffer = randn(gen, 130, 70, device=device)
    buffer[7, 3], buffer[100, 60], buffer[70, 40] = float("inf"), float("-inf"), float("nan")
    state = ForgeState(weight, "adamw", lr=1e-2, weight_decay=0.1)
    w0, s0 = snapshot(weight, state)
    held = apply_accumulated(weight, state, buffer, apply=False, backend=backend).stats.clone()
    assert_bits_equal(weight, w0, "weight")
    assert state.step == 0
    for name, tensor in state.tensors.items():
        assert_bits_equal(tensor, s0[name], name)
    applied = apply_accumulated(weight, state, buffer, backend=backend)
    assert_bits_equal(held, applied.stats, "by-products")
    assert state.step == 1
    assert int(applied.nonfinite) == 3 and not torch.equal(weight, w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bf16_buffer_accumulates_without_bias(backend, gen, device):
    """Over N seeds, the mean of a bf16 buffer after 4 micro-batches (each rounded
    stochastically) is the exact fp32 sum within 6 standard deviations; each micro-batch's
    rounding error is at most one bf16 spacing of the running sum, so the sum's standard
    deviation is at most sqrt(4) spacings of its largest value / 2."""
    tokens, n_out, n_in, k, n = 8, 64, 64, 4, 64
    weight = randn(gen, n_out, n_in, device=device)
    batches = _micro_batches(gen, k, tokens, n_out, n_in, torch.float32, device)
    grads = [_kernel_gradient(x, dy, weight, backend).double() for x, dy in batches]
    exact = sum(grads)
    running = torch.stack([sum(grads[:j + 1]).abs() for j in range(k)]).amax(0)
    spacing = running * 2.0**-7  # bf16 spacing is at most 2^-7 relative
    total = torch.zeros_like(exact)
    for seed in range(n):
        buffer = torch.empty(n_out, n_in, dtype=torch.bfloat16, device=device)
        state = ForgeState(weight.clone(), "sgd", seed=seed)
        for j, (x, dy) in enumerate(batches):
            fused_update(x, dy, weight.clone(), state, apply=False, backend=backend,
                         accumulate=Accumulation(buffer, j, k))
        total += buffer.double()
    mean = total / n
    assert bool(((mean - exact).abs() <= 6 * spacing * math.sqrt(k) / (2 * math.sqrt(n)) + 1e-30).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_micro_batch_rounds_a_bf16_buffer_with_its_own_bits(backend, gen, device):
    """A bf16 buffer's stochastic rounding is keyed by its micro-batch (`Accumulation.micro`, which
    a data-parallel rank sets to k * rank + j, else the index j): the same gradient stored as
    micro-batches 0 to 5 draws the host's bits for each (numerics.stream_keys_int), and the rounding
    directions of any two are uncorrelated. With u_j = 1 where micro-batch j rounded away from zero
    and p its probability, mean((u_j - p)(u_k - p)) over N elements is 0 within 6 standard
    deviations, sqrt(sum (p (1 - p))^2) / N, for independent bits; with the same bits it is
    mean(p (1 - p)), about 1/6."""
    tokens, n_out, n_in = 8, 64, 64
    weight = randn(gen, n_out, n_in, device=device)
    x, dy = randn(gen, tokens, n_in, device=device), randn(gen, tokens, n_out, device=device)
    grad = _kernel_gradient(x, dy, weight, backend)
    state = ForgeState(weight, "sgd", seed=3, weight_id=7)
    index = numerics.global_index_torch(torch.arange(n_out, device=device), torch.arange(n_in, device=device),
                                        state.placement)
    toward_zero = (grad.view(torch.int32) & ~0xFFFF).view(torch.float32)  # the bf16 neighbour rounding down
    away = ((grad.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)
    p = ((grad - toward_zero) / (away - toward_zero)).double()
    directions = []
    for micro in range(6):
        window = torch.full((n_out, n_in), float("nan"), dtype=torch.bfloat16, device=device)
        fused_update(x, dy, weight, state, apply=False, backend=backend,
                     accumulate=Accumulation(window, 0, 1, micro=micro))
        keys = numerics.stream_keys_int(3, 7, 1, numerics.ACCUMULATION_STREAM, micro)
        expected = numerics.stochastic_round_to_bf16_torch(grad, numerics.random_bits_torch(index, *keys))
        assert_bits_equal(window.view(torch.int16), expected.view(torch.int16), f"micro-batch {micro}")
        directions.append((window.float() != toward_zero).double())
    sd = float((p * (1 - p)).square().sum().sqrt()) / p.numel()
    for a, b in itertools.combinations(range(len(directions)), 2):
        covariance = float(((directions[a] - p) * (directions[b] - p)).mean())
        assert abs(covariance) <= 6 * sd, f"micro-batches {a} and {b} round alike: {covariance:.3g} (sd {sd:.2g})"


def test_refusals_leave_everything_untouched(gen):
    weight = randn(gen, 16, 8)
    state = ForgeState(weight, "adamw")
    x, dy = randn(gen, 4, 8), randn(gen, 4, 16)
    w0 = weight.clone()
    with pytest.raises(ValueError, match="contiguous \\(16, 8\\) tensor"):
        fused_update(x, dy, weight, state, accumulate=Accumulation(torch.empty(8, 16), 0, 2))
    with pytest.raises(TypeError, match="fp32 or bf16"):
        fused_update(x, dy, weight, state, accumulate=Accumulation(torch.empty(16, 8, dtype=torch.float16), 0, 2))
    with pytest.raises(ValueError, match="counts from 0"):
        fused_update(x, dy, weight, state, accumulate=Accumulation(torch.empty(16, 8), 2, 2))
    assert torch.equal(weight, w0) and state.step == 0
