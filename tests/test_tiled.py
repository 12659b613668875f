"""The torch twin (core/tiled.py) runs a weight a panel of whole tiles at a time (at most
tiled.PANEL_ELEMENTS gradient values) and its tokens tiled.TOKEN_CHUNK at a time. The other tests'
weights fit one panel and their tokens one chunk, so here: a 64 x 1040 weight with the shipped
constants (two column panels, the last 16 columns wide), and a 40 x 300 weight with 16 x 64 tiles,
panels of two tiles and chunks of 16 tokens (the twin reads both constants at each call): three
panels each way and three chunks, the last of each partial.

References that know nothing of panels: the gradient is dy^T x in float64 within the fp32 dot
bound (gamma_T |dy|^T |x|); the by-products are the float64 per-tile sums of squares of that
gradient; the update and the bf16 accumulation buffer are the whole-tensor unfused step
(helpers.reference_step) and stochastic rounding (numerics.py) on it, bit for bit, so that every
element's random bits and every 8-bit block are checked where they sit in the whole weight. A
non-finite value skips its column of tiles and no other.
"""

import pytest
import torch
from helpers import assert_bits_equal, randn, reference_step, snapshot

from forge_megatron import Accumulation, ForgeState, apply_accumulated, fused_update
from forge_megatron.core import numerics, tiled
from forge_megatron.core.plan import TileConfig

U = 2.0**-24
REGIMES = [(torch.float32, "master", "fp32"), (torch.bfloat16, "sr", "bf16"), (torch.bfloat16, "master", "int8")]
LOWERED = TileConfig(block_m=16, block_n=64, block_t=16, group_m=1)  # the smallest tiles int8 states allow
# name: (tokens, out, in, tile config, panel elements, token chunk, panels (rows, columns), a column in the second
# tile of a column panel: lowered, of the second panel)
LAYOUTS = {
    "shipped-64x1040": (8, 64, 1040, tiled.DEFAULT_CONFIG, tiled.PANEL_ELEMENTS, tiled.TOKEN_CHUNK, (1, 2), 200),
    "lowered-40x300": (40, 40, 300, LOWERED, 2 * 16 * 64, 16, (3, 3), 200),
}


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def layout(request, monkeypatch):
    tokens, n_out, n_in, config, panel, chunk, panels, bad_col = LAYOUTS[request.param]
    monkeypatch.setattr(tiled, "PANEL_ELEMENTS", panel)
    monkeypatch.setattr(tiled, "TOKEN_CHUNK", chunk)
    rows, cols = tiled.panel_shape((n_out, n_in), config)
    assert (-(-n_out // rows), -(-n_in // cols)) == panels and n_out % rows + n_in % cols > 0
    return tokens, n_out, n_in, config, bad_col


def _check_gradient(result, x, dy, scale, config):
    exact = scale * (dy.double().T @ x.double())
    tokens = x.shape[0]
    gamma = (tokens + 1) * U / (1 - (tokens + 1) * U)  # a T-term dot, then one scaling
    bound = gamma * abs(scale) * (dy.double().abs().T @ x.double().abs())
    assert bool(((result.grad.double() - exact).abs() <= bound).all()), "gradient (NaN: an element never written)"
    # Per tile, in the kernel's tile order: the sum of squares of the raw (materialized / scale)
    # gradient, bm * bn positive fp32 terms: within (bm * bn + 1) u of the float64 sum.
    bm, bn = config.block_m, config.block_n
    raw = torch.nn.functional.pad(result.grad.double() / scale, (0, -exact.shape[1] % bn, 0, -exact.shape[0] % bm))
    tiles = raw.reshape(raw.shape[0] // bm, bm, raw.shape[1] // bn, bn).square().sum(dim=(1, 3)).flatten()
    sumsq = result.stats[:, 0].double()
    assert bool(((sumsq - tiles).abs() <= (bm * bn + 1) * U * tiles).all()), "per-tile sums of squares"
    assert bool((result.stats[:, 1] == 0).all())


def _assert_stored(weight, state, expected_w, expected_s, what):
    as_bits = (lambda t: t.view(torch.int16)) if weight.dtype == torch.bfloat16 else (lambda t: t)
    assert_bits_equal(as_bits(weight), as_bits(expected_w.to(weight.dtype)), f"weight, {what}")
    for name, tensor in state.named_tensors().items():
        got, want = (tensor.view(torch.int16), expected_s[name].view(torch.int16)) if tensor.dtype == torch.bfloat16 \
            else (tensor, expected_s[name])
        assert_bits_equal(got, want, f"{name}, {what}")


@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: f"{str(r[0])[6:]}-{r[1]}-{r[2]}")
def test_a_weight_of_several_panels_is_updated_everywhere(layout, regime, gen):
    """Two AdamW steps in each precision regime, the second with a non-finite gradient column."""
    tokens, n_out, n_in, config, bad_col = layout
    weight_dtype, store, state_dtype = regime
    weight = randn(gen, n_out, n_in).to(weight_dtype)
    state = ForgeState(weight, "adamw", weight_store=store, state_dtype=state_dtype, seed=3, weight_id=1,
                       lr=1e-2, weight_decay=0.1)
    x, dy = randn(gen, tokens, n_in), randn(gen, tokens, n_out)
    w0, s0 = snapshot(weight, state)
    result = fused_update(x, dy, weight, state, grad_scale=0.5, materialize=True, backend="torch", config=config)
    _check_gradient(result, x, dy, 0.5, config)
    _assert_stored(weight, state, *reference_step(w0, s0, state, result.grad, 1), "step 1")

    # Step 2: a NaN in x poisons one column of the gradient; its column of tiles stores nothing,
    # the other tiles of its panels update one by one.
    x, dy = randn(gen, tokens, n_in), randn(gen, tokens, n_out)
    x[tokens // 2, bad_col] = float("nan")
    w0, s0 = snapshot(weight, state)
    result = fused_update(x, dy, weight, state, materialize=True, backend="torch", config=config)
    assert int(result.nonfinite) == n_out
    block_n = config.block_n
    skipped = torch.zeros(n_in, dtype=torch.bool)
    skipped[bad_col // block_n * block_n:(bad_col // block_n + 1) * block_n] = True
    grad = torch.where(skipped, 0.0, result.grad)  # finite where the reference's result is kept
    expected_w, expected_s = reference_step(w0, s0, state, grad, 2)
    expected_w = torch.where(skipped, w0, expected_w.to(w0.dtype))
    for name, before in s0.items():
        mask = skipped[::numerics.QBLOCK] if name.endswith(".scale") else skipped
        expected_s[name] = torch.where(mask, before, expected_s[name])
    _assert_stored(weight, state, expected_w, expected_s, "step 2, a non-finite column")


def test_a_bf16_accumulation_buffer_over_several_panels(layout, gen):
    """Two micro-batches summed in a bf16 buffer (each sum rounded stochastically with its
    micro-batch's bits), the total held (apply=False) and then applied from the buffer."""
    tokens, n_out, n_in, config, _ = layout
    weight = randn(gen, n_out, n_in)
    state = ForgeState(weight, "adamw", seed=2, weight_id=5, lr=1e-2)
    batches = [(randn(gen, tokens, n_in), randn(gen, tokens, n_out)) for _ in range(2)]
    index = numerics.global_index_torch(torch.arange(n_out), torch.arange(n_in), state.placement)
    buffer = torch.full((n_out, n_in), float("nan"), dtype=torch.bfloat16)
    expected = torch.zeros(n_out, n_in)
    for j, (x, dy) in enumerate(batches):
        copy = weight.clone()
        result = fused_update(x, dy, copy, ForgeState(copy, "sgd"), materialize=True, backend="torch", config=config)
        _check_gradient(result, x, dy, 1.0, config)
        gradient = result.grad
        keys = numerics.stream_keys_int(state.seed, state.weight_id, 1, numerics.ACCUMULATION_STREAM, j)
        expected = numerics.stochastic_round_to_bf16_torch(expected.float() + gradient,
                                                           numerics.random_bits_torch(index, *keys))
        fused_update(x, dy, weight, state, apply=False, backend="torch", config=config,
                     accumulate=Accumulation(buffer, j, 2))
        assert_bits_equal(buffer.view(torch.int16), expected.view(torch.int16), f"bf16 buffer after micro-batch {j}")
    w0, s0 = snapshot(weight, state)
    apply_accumulated(weight, state, buffer, grad_scale=0.25, backend="torch", config=config)
    _assert_stored(weight, state, *reference_step(w0, s0, state, buffer.float() * 0.25, 1), "applied from the buffer")
