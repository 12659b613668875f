"""Muon (rules.Muon, core/muon.py): the fused pass's momentum update against its element-wise
definition (torch.lerp, as emerging_optimizers' OrthogonalizedOptimizer writes it), bit for bit in
fp32 on both backends, and the pass plus the whole-weight step against emerging_optimizers' Muon
(what Megatron's --optimizer muon runs)."""

import math

import pytest
import torch
import triton
import triton.language as tl
from emerging_optimizers.orthogonalized_optimizers.muon import Muon
from helpers import BACKENDS, assert_bits_equal, randn

from forge_megatron import ForgeState, fused_update
from forge_megatron.core import ops_torch, ops_triton, rules
from forge_megatron.core.state import GroupedForgeState


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pass_updates_the_momentum_as_lerp_bit_for_bit(backend, nesterov, gen, device, monkeypatch):
    """Three steps on a 9 x 13 weight (partial tiles): the momentum is momentum.lerp(g, 1 - beta)
    and the Nesterov direction g.lerp(momentum, beta), bit for bit, with g the gradient the pass
    used (materialized); beta 0.95 takes lerp's |w| >= 0.5 branch for one and < 0.5 for the other.
    The pass leaves the weight alone: the whole-weight step after it (captured here) updates it."""
    seen = []
    monkeypatch.setattr(rules.Muon, "weight_step", staticmethod(
        lambda weight, state, stats: seen.append(state.take_workspace("direction") if state.workspace else None)))
    weight = randn(gen, 9, 13, device=device)
    before = weight.clone()
    state = ForgeState(weight, "muon", momentum=0.95, nesterov=nesterov)
    momentum = torch.zeros_like(weight)
    for step in range(3):
        x, dy = randn(gen, 5, 13, device=device), randn(gen, 5, 9, device=device)
        g = fused_update(x, dy, weight, state, materialize=True, backend=backend).grad
        momentum = momentum.lerp(g, 1 - 0.95)
        assert_bits_equal(state.tensors["momentum_buffer"], momentum, f"momentum, step {step + 1}")
        if nesterov:
            assert_bits_equal(seen[-1], g.lerp(momentum, 0.95), f"direction, step {step + 1}")
        else:
            assert seen[-1] is None
        assert not state.workspace, "the workspace is the step's only"
        assert_bits_equal(weight, before, "the pass leaves the weight alone")
    assert len(seen) == 3 and state.step == 3


@pytest.mark.parametrize("nesterov", [False, True])
def test_five_steps_equal_emerging_optimizers_muon(nesterov, gen, device):
    """The fused pass and its whole-weight step against emerging_optimizers' own Muon on the same
    gradients: the momentum is the same lerp, both call the same Newton-Schulz and apply the decay
    and the update in the same order with the same ops: bit for bit."""
    hp = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov, num_ns_steps=5,
              coefficient_type="quintic", scale_mode="spectral", extra_scale_factor=0.5, fp32_matmul_prec="highest")
    weight = randn(gen, 70, 20, device=device)  # the update's row blocks: 64 and 6
    reference = torch.nn.Parameter(weight.clone())
    optimizer = Muon([reference], **hp)
    state = ForgeState(weight, "muon", **hp)
    for _ in range(5):
        x, dy = randn(gen, 7, 20, device=device), randn(gen, 7, 70, device=device)
        result = fused_update(x, dy, weight, state, materialize=True, backend="torch")
        reference.grad = result.grad.clone()
        optimizer.step()
    assert_bits_equal(state.tensors["momentum_buffer"], optimizer.state[reference]["momentum_buffer"], "momentum")
    assert_bits_equal(weight, reference.detach(), "weight")


def test_bf16_weights_with_a_master_step_as_fp32_muon_on_the_master(gen, device):
    """bf16 weights, master store: the fp32 master takes emerging_optimizers' Muon step exactly
    (fed the same gradient) and the weight is its round-to-nearest copy."""
    hp = dict(lr=0.02, momentum=0.9, weight_decay=0.1, fp32_matmul_prec="highest")
    weight = randn(gen, 70, 20, device=device).bfloat16()  # the update's row blocks: 64 and 6
    reference = torch.nn.Parameter(weight.float())
    optimizer = Muon([reference], **hp)
    state = ForgeState(weight, "muon", weight_store="master", **hp)
    for _ in range(3):
        x, dy = randn(gen, 7, 20, device=device).bfloat16(), randn(gen, 7, 70, device=device).bfloat16()
        reference.grad = fused_update(x, dy, weight, state, materialize=True, backend="torch").grad.clone()
        optimizer.step()
    assert_bits_equal(state.master, reference.detach(), "master")
    assert_bits_equal(weight, reference.detach().bfloat16(), "weight")


def test_bf16_weights_without_a_master_round_stochastically_and_unbiased(gen, device):
    """bf16 weights, SR store, an update of about a quarter of the weight's rounding step (lr
    1e-2: the median |step| is 0.24 ulp): each new weight is one of the two bf16 neighbours of
    the fp32 result of Muon's step on the old weight's value, and on average the step lands where
    fp32 would; rounding to nearest keeps only the steps past half an ulp (0.64 of it) and fails. Over 38400 elements rounded up with
    probability ~0.24 the summed move's relative standard deviation is ~0.9 %, so [0.9, 1.1] is
    ~11 sigma wide and does not depend on the last bits a BLAS gives the exact step (an earlier
    lr, 2e-4, made the step 0.005 ulp: ~64 ulp in all, a 12 % spread, and a CI machine's BLAS
    landed at 0.86)."""
    hp = dict(lr=1e-2, momentum=0.9, weight_decay=0.0, fp32_matmul_prec="highest")
    weight = (randn(gen, 150, 256, device=device) * 0.01 + 1.0).bfloat16()  # one binade: one ulp, 2**-7
    old = weight.float()
    reference = torch.nn.Parameter(old.clone())
    state = ForgeState(weight, "muon", weight_store="sr", **hp)
    x, dy = randn(gen, 8, 256, device=device).bfloat16(), randn(gen, 8, 150, device=device).bfloat16()
    reference.grad = fused_update(x, dy, weight, state, materialize=True, backend="torch").grad.clone()
    Muon([reference], **hp).step()
    exact, new = reference.detach(), weight.float()
    down = exact.bfloat16().float()
    inf = torch.tensor(float("inf"), dtype=torch.bfloat16, device=device)
    up = torch.where(down > exact, down, torch.nextafter(exact.bfloat16(), inf).float())
    down = torch.where(down > exact, torch.nextafter(exact.bfloat16(), -inf).float(), down)
    assert bool(((new == down) | (new == up) | (new == exact)).all()), "a value that is not a neighbour"
    direction = torch.sign(exact - old)
    moved = float(((new - old) * direction).sum() / ((exact - old) * direction).sum())
    assert 0.9 <= moved <= 1.1, moved


def test_a_non_finite_gradient_keeps_the_weight(gen, device):
    """After a finite step (a momentum to apply), a pass that counts a non-finite gradient value
    leaves the weight as it was (the update and the decay masked on the device, no host read) and
    the bad tile's momentum too; the other tiles' momentum advances, as every rule's does."""
    from forge_megatron.core.plan import TileConfig

    config = TileConfig(block_m=16, block_n=16, block_t=16)  # 48 x 40: 3 x 3 tiles
    weight = randn(gen, 48, 40, device=device)
    state = ForgeState(weight, "muon", lr=0.1, weight_decay=0.1)
    fused_update(randn(gen, 3, 40, device=device), randn(gen, 3, 48, device=device), weight, state, backend="torch",
                 config=config)
    before, momentum = weight.clone(), state.tensors["momentum_buffer"].clone()
    x, dy = randn(gen, 3, 40, device=device), randn(gen, 3, 48, device=device)
    x[0, 0] = float("inf")  # column 0: the first tile column's gradients
    result = fused_update(x, dy, weight, state, backend="torch", config=config)
    assert int(result.nonfinite) > 0
    assert_bits_equal(weight, before, "weight after a non-finite gradient")
    assert_bits_equal(state.tensors["momentum_buffer"][:, :16], momentum[:, :16], "the skipped tiles' momentum")
    assert not torch.equal(state.tensors["momentum_buffer"][:, 16:], momentum[:, 16:])


def test_refusals_name_the_fix(gen):
    from forge_megatron.core.param import ForgeConfig, ForgeParam

    weight = randn(gen, 6, 8)
    with pytest.raises(ValueError, match="train it without data parallelism"):
        ForgeParam(weight.clone(), ForgeConfig("muon")).own_rows(weight, group=None)
    with pytest.raises(ValueError, match="not int8"):
        ForgeState(weight, "muon", state_dtype="int8")
    with pytest.raises(ValueError, match="drop --moe-grouped-gemm"):
        GroupedForgeState(randn(gen, 2, 6, 8), "muon")
    with pytest.raises(ValueError, match="coefficient_type must be one of"):
        ForgeState(weight, "muon", coefficient_type="nope")


def _nearest_float32(x) -> float:
    """The float32 nearest the rational x, ties to even (the reference of a correctly rounded op)."""
    from fractions import Fraction

    f = torch.tensor(float(x), dtype=torch.float32)
    candidates = [f, torch.nextafter(f, torch.tensor(float("inf"))), torch.nextafter(f, torch.tensor(float("-inf")))]
    def key(c):
        bits = int(c.view(torch.int32))
        return abs(Fraction(float(c)) - x), bits & 1
    return float(min(candidates, key=key))


@triton.jit
def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    a = tl.load(a_ptr + offs, mask=ok, other=0.0)
    b = tl.load(b_ptr + offs, mask=ok, other=0.0)
    c = tl.load(c_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, ops_triton.fma(a, b, c), mask=ok)


def _fma_cases(gen):
    """Random values, and edge cases: float64 sums on a float32 tie that the exact sum is just off
    (either sign), signed zeros, subnormal products and results, infinities and NaN."""
    tiny, sub = 2.0**-70, 2.0**-140
    edges = [(1 + 2**-12, 1 + 2**-12, tiny), (1 + 2**-12, 1 + 2**-12, -tiny), (-(1 + 2**-12), 1 + 2**-12, -tiny),
             (-(1 + 2**-12), 1 + 2**-12, tiny), (0.0, 5.0, -0.0), (-0.0, 5.0, 0.0), (-0.0, 5.0, -0.0),
             (2.0**-70, 2.0**-70, sub), (3 * 2.0**-75, 2.0**-75, -sub), (2.0**-126, 0.5, 2.0**-149),
             (float("inf"), 1.0, 1.0), (float("inf"), 0.0, 1.0), (1.0, 1.0, float("-inf")), (float("nan"), 1.0, 2.0),
             (3.0e38, 2.0, -3.0e38)]
    a, b, c = (torch.tensor(column, dtype=torch.float32) for column in zip(*edges))
    return [torch.cat([randn(gen, 400), a]), torch.cat([randn(gen, 400), b]), torch.cat([randn(gen, 400), c])]


def _exact_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c in exact rational arithmetic, rounded once to float32 (IEEE specials by float64)."""
    from fractions import Fraction

    out = []
    for x, y, z in zip(a.tolist(), b.tolist(), c.tolist()):
        if not all(map(math.isfinite, (x, y, z))) or x * y + z == 0.0:  # specials, and zero's sign
            out.append(float(torch.tensor(x * y + z, dtype=torch.float64).float()))
            continue
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        out.append(_nearest_float32(exact) if exact != 0 else 0.0)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fma_rounds_once(backend, gen, device):
    """ops.fma (Muon's lerp), on the torch backend and in a Triton kernel, against the exact
    a * b + c rounded once to float32 (`_fma_cases`)."""
    a, b, c = _fma_cases(gen)
    if backend == "torch":
        got = ops_torch.fma(a, b, c)
    else:
        on_device = [t.to(device) for t in (a, b, c)]
        got = torch.full_like(on_device[0], float("nan"))
        _fma_kernel[(triton.cdiv(a.numel(), 128),)](*on_device, got, a.numel(), BLOCK=128)
        got = got.cpu()
    assert_bits_equal(got, _exact_fma(a, b, c), "fma")
    assert got[400] == 1 + 2**-11 + 2**-23 and got[401] == 1 + 2**-11  # not the float64 sum rounded again


def _muon_step_memory(layers: int, forge: bool, width: int = 96, tokens: int = 4) -> dict:
    """Live tensor bytes of a bias-free MLP's second step (the first allocates the states): after
    the forward, after backward (the seam), and the step's peak, for FORGE-Muon (forge_megatron.torch)
    or emerging_optimizers' Muon on the stored gradients."""
    from forge_megatron.tools.benchmarking import LiveTensorMemory
    from forge_megatron.torch import cover

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = MLP()
    hp = dict(lr=0.01, momentum=0.9, weight_decay=0.1, fp32_matmul_prec="highest")
    optimizer = cover(model, "muon", **hp) if forge else Muon(model.parameters(), **hp)
    x = torch.randn(tokens, width)

    def step(tracker=None):
        loss = model(x).square().mean()
        forward = tracker.current if tracker else 0
        loss.backward()
        seam = tracker.current if tracker else 0
        optimizer.step()
        optimizer.zero_grad()
        return forward, seam

    step()
    with LiveTensorMemory() as tracker:
        forward, seam = step(tracker)
    return {"forward": forward, "seam": seam, "peak": tracker.peak}


def test_no_gradient_is_stored_and_one_layers_workspace_at_a_time():
    """Measured on CPU (LiveTensorMemory), 3 and 6 layers of 96 x 96: after backward FORGE-Muon
    holds none of the covered weights' gradients (Muon holds all of them), and what its step adds
    above the forward's activations is the same at both depths: the Newton-Schulz workspace (and
    the torch twin's padded tiles, the CPU backend's own) exists for one layer at a time, inside
    that layer's backward. Standard Muon's grows by a gradient per layer (less the activations
    backward frees)."""
    grad = 96 * 96 * 4
    measured = {(layers, forge): _muon_step_memory(layers, forge) for layers in (3, 6) for forge in (False, True)}
    for layers in (3, 6):
        standard, forge = measured[layers, False], measured[layers, True]
        assert standard["seam"] >= layers * grad
        assert forge["seam"] < 64  # the step's scalars only: no gradient
    added = {key: m["peak"] - m["forward"] for key, m in measured.items()}
    activations = measured[6, False]["forward"] - measured[3, False]["forward"]
    assert added[6, True] == added[3, True], measured
    assert added[6, False] - added[3, False] >= 3 * grad - activations, measured
