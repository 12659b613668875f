"""The tiled torch twin of the fused kernel: the CPU path and a second reference.

It runs the kernel's contract in PyTorch, a panel of whole tiles at a time: the panel's gradient
dy[:, rows]^T @ x[:, cols] in fp32 (one GEMM per chunk of TOKEN_CHUNK tokens), scaled; per [block_m,
block_n] tile the by-products (sum of squares of the raw gradient, non-finite count) in the
kernel's tile order; then the rule's torch update (the same function the Triton epilogue
compiles) on the panel's weight and states, read and written in every precision regime with the
torch twins of the kernel's numerics. A tile with a non-finite value stores nothing, as in the
kernel. Extra memory is one panel of at most PANEL_ELEMENTS gradient values (plus the epilogue's
panel-sized temporaries and a token chunk of the inputs in fp32: `workspace_bytes`), whatever the
weight's size.

Each gradient element is the BLAS's dot product of one column of dy and one of x. Whether its bits
depend on where the element sits in the GEMM (hence on tensor-parallel sharding) is up to the
BLAS; the tests assert shard invariance on CPU with inputs whose sums are exact in fp32, and the
general claim is the Triton kernel's, whose summation order is fixed per element.
"""

from __future__ import annotations

import torch

from forge_megatron.core import numerics
from forge_megatron.core.plan import (
    COEF_HEAD,
    STATE_BF16,
    STATE_FP32,
    WEIGHT_FP32,
    WEIGHT_MASTER,
    WEIGHT_NONE,
    WEIGHT_SR,
    StepPlan,
    TileConfig,
    num_tiles,
)

DEFAULT_CONFIG = TileConfig(block_m=64, block_n=128, block_t=256, group_m=1)
PANEL_ELEMENTS = 1 << 16  # gradient values held at once (256 KiB in fp32)
TOKEN_CHUNK = 1024  # tokens per GEMM (bf16 inputs are upcast a chunk at a time)
FP32_MAX = torch.finfo(torch.float32).max


def run(x, dy, weight, plan: StepPlan, config: TileConfig) -> None:
    """Same contract as kernels.launch."""
    _run(weight, plan, config, lambda raw, rows, cols: _wgrad(raw, x[:, cols], dy[:, rows]))


def apply_buffer(weight, plan: StepPlan, config: TileConfig) -> None:
    """Same contract as kernels.apply_buffer: the update from the gradient in `plan.buffer`."""
    _run(weight, plan, config, lambda raw, rows, cols: raw.copy_(plan.buffer[rows, cols]))


def run_grouped(x, dy, offsets, weight, plan: StepPlan, config: TileConfig, from_buffer: bool = False) -> None:
    """Same contract as kernels.launch_grouped: expert by expert, the step of its own weight on its
    own tokens (StepPlan.expert), as the kernel's programs run it for each (tile, expert)."""
    ids, tiles = plan.weight_id.tolist(), num_tiles(weight.shape[1:], config)
    bounds = None if from_buffer else offsets.tolist()
    for e in range(weight.shape[0]):
        expert = plan.expert(e, ids, tiles)
        if from_buffer:
            apply_buffer(weight[e], expert, config)
        else:
            run(x[bounds[e]:bounds[e + 1]], dy[bounds[e]:bounds[e + 1]], weight[e], expert, config)


WORKSPACE_BYTES_PER_ELEMENT = 96  # the epilogue's temporaries per panel value (fp32, float64 sqrt, int64 bits)


def workspace_bytes(tokens: int, shape, config: TileConfig = DEFAULT_CONFIG) -> int:
    """An upper bound of the twin's extra memory during one step of a weight of `shape`."""
    rows, cols = panel_shape(shape, config)
    return WORKSPACE_BYTES_PER_ELEMENT * rows * cols + 4 * min(tokens, TOKEN_CHUNK) * (rows + cols)


def panel_shape(shape, config: TileConfig) -> tuple[int, int]:
    """Rows and columns of the panels a weight of `shape` is processed in: whole tiles, at most
    PANEL_ELEMENTS values (at least one tile)."""
    bm, bn = config.block_m, config.block_n
    n_out, n_in = shape
    cols = min(-(-n_in // bn) * bn, max(bn, PANEL_ELEMENTS // bm // bn * bn))
    rows = min(-(-n_out // bm) * bm, max(bm, PANEL_ELEMENTS // cols // bm * bm))
    return rows, cols


def _run(weight, plan: StepPlan, config: TileConfig, gradient) -> None:
    """Panel by panel: `gradient(raw, rows, cols)` writes the raw gradient of W[rows, cols] into `raw`."""
    bm, bn = config.block_m, config.block_n
    n_out, n_in = weight.shape
    panel_rows, panel_cols = panel_shape(weight.shape, config)
    acc = torch.empty(min(panel_rows, n_out), min(panel_cols, n_in), dtype=torch.float32, device=weight.device)
    stats = plan.stats.view(-(-n_out // bm), -(-n_in // bn), 2)
    grad_scale = plan.coefs[0]
    scale = float(grad_scale)
    for r0 in range(0, n_out, panel_rows):
        for c0 in range(0, n_in, panel_cols):
            r1, c1 = min(n_out, r0 + panel_rows), min(n_in, c0 + panel_cols)
            rows, cols = slice(r0, r1), slice(c0, c1)
            raw = acc[: r1 - r0, : c1 - c0]
            gradient(raw, rows, cols)
            if plan.read_buffer:
                raw.add_(plan.buffer[rows, cols])  # the sum of the earlier micro-batches, plus this one's
            if plan.write_buffer:
                _store_buffer(raw, plan, r0, c0)
            if not plan.stats_on:
                continue
            g = raw * grad_scale
            sumsq, bad = _tile_stats(raw, g, scale, bm, bn)
            stats[r0 // bm:r0 // bm + bad.shape[0], c0 // bn:c0 // bn + bad.shape[1]] = torch.stack(
                [sumsq, bad.float()], dim=2)
            if not plan.apply:
                continue
            if plan.grad_out is not None:
                plan.grad_out[rows, cols] = g
            if not bool(bad.any()):
                _epilogue(g, weight, plan, r0, r1, c0, c1)
                continue
            for i, j in (bad == 0).nonzero().tolist():  # a panel with a bad tile: the good tiles one by one
                t0, t1, u0, u1 = i * bm, min(r1 - r0, (i + 1) * bm), j * bn, min(c1 - c0, (j + 1) * bn)
                _epilogue(g[t0:t1, u0:u1], weight, plan, r0 + t0, r0 + t1, c0 + u0, c0 + u1)


def _store_buffer(raw: torch.Tensor, plan: StepPlan, r0: int, c0: int) -> None:
    target = plan.buffer[r0:r0 + raw.shape[0], c0:c0 + raw.shape[1]]
    if target.dtype == torch.float32:
        target.copy_(raw)
        return
    index = numerics.global_index_torch(torch.arange(r0, r0 + raw.shape[0], device=raw.device),
                                        torch.arange(c0, c0 + raw.shape[1], device=raw.device), plan.placement)
    keys = numerics.stream_keys_int(plan.seed, plan.weight_id, int(plan.coefs[1]), numerics.ACCUMULATION_STREAM,
                                    plan.micro)
    target.copy_(numerics.stochastic_round_to_bf16_torch(raw, numerics.random_bits_torch(index, *keys)))


def _wgrad(out: torch.Tensor, x_cols: torch.Tensor, dy_rows: torch.Tensor) -> None:
    """out = dy_rows^T @ x_cols in fp32, TOKEN_CHUNK tokens per GEMM."""
    out.zero_()
    for t0 in range(0, x_cols.shape[0], TOKEN_CHUNK):
        xs, ds = x_cols[t0:t0 + TOKEN_CHUNK], dy_rows[t0:t0 + TOKEN_CHUNK]
        out.addmm_(ds.float().t(), xs.float())


def _tile_stats(raw: torch.Tensor, g: torch.Tensor, scale: float, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per [bm, bn] tile of the panel: the sum of squares of `raw` and the non-finite count of
    g = raw * scale. Finite sums of squares bound every |raw| (and |g|, by |scale| times that), so
    the count is taken per tile only when those bounds do not show g finite."""
    rows, cols = raw.shape
    pad = (0, -cols % bn, 0, -rows % bm)
    shape = (-(-rows // bm), bm, -(-cols // bn), bn)

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.pad(t, pad) if any(pad) else t).reshape(shape).sum(dim=(1, 3))

    sumsq = per_tile(raw * raw)
    if float(sumsq.max()) ** 0.5 * abs(scale) < FP32_MAX:
        return sumsq, torch.zeros(shape[0], shape[2], dtype=torch.int32, device=raw.device)
    return sumsq, per_tile((~(g.abs() < float("inf"))).to(torch.int32))


def _epilogue(g, weight, plan: StepPlan, r0, r1, c0, c1) -> None:
    rows, cols = slice(r0, r1), slice(c0, c1)
    device = weight.device
    randomized = (plan.weight_store == WEIGHT_SR or (plan.state_format != STATE_FP32 and any(plan.stored)))
    index = numerics.global_index_torch(torch.arange(r0, r1, device=device), torch.arange(c0, c1, device=device),
                                        plan.placement) if randomized else None
    w_tile = weight[rows, cols]
    zero = torch.zeros((), dtype=torch.float32, device=device)
    p = zero  # a rule that updates its states only (rules.Muon) neither reads nor writes the weight
    if plan.weight_store != WEIGHT_NONE:
        p = (plan.master[rows, cols] if plan.weight_store == WEIGHT_MASTER else w_tile).float()
    state = tuple(_load_state(plan, k, rows, cols) if stored else zero for k, stored in enumerate(plan.stored))
    p, state = plan.update_fn(p, g, state, tuple(plan.coefs[COEF_HEAD:COEF_HEAD + plan.num_coefs]))
    step = int(plan.coefs[1])
    if plan.weight_store != WEIGHT_NONE:
        _store_weight(p, w_tile, plan, rows, cols, index, step)
    for k, stored in enumerate(plan.stored):
        if stored:
            _store_state(plan, k, rows, cols, state[k], index, numerics.stream_keys_int(plan.seed, plan.weight_id,
                                                                                         step, 1 + k))


def _store_weight(p, w_tile, plan: StepPlan, rows: slice, cols: slice, index, step: int) -> None:
    if plan.weight_store == WEIGHT_FP32:
        w_tile.copy_(p)
    elif plan.weight_store == WEIGHT_MASTER:
        plan.master[rows, cols] = p
        w_tile.copy_(p)  # torch rounds fp32 -> bf16 to nearest even, as the kernel does
    elif plan.weight_store == WEIGHT_SR:
        keys = numerics.stream_keys_int(plan.seed, plan.weight_id, step, 0)
        w_tile.copy_(numerics.stochastic_round_to_bf16_torch(p, numerics.random_bits_torch(index, *keys)))
    else:
        w_tile.copy_(p)


def _load_state(plan: StepPlan, k: int, rows: slice, cols: slice) -> torch.Tensor:
    tensor = plan.states[k][rows, cols]
    if plan.state_format in (STATE_FP32, STATE_BF16):
        return tensor.float()
    blocks = slice(cols.start // numerics.QBLOCK, -(-cols.stop // numerics.QBLOCK))
    table = plan.tables[0 if plan.signed[k] else 1]
    values = numerics.dequantize_torch(_padded(tensor), plan.scales[k][rows, blocks], table)
    return values[:, : cols.stop - cols.start]


def _store_state(plan: StepPlan, k: int, rows: slice, cols: slice, value: torch.Tensor, index, keys) -> None:
    target = plan.states[k][rows, cols]
    if plan.state_format == STATE_FP32:
        target.copy_(value)
    elif plan.state_format == STATE_BF16:
        bits = numerics.random_bits_torch(index, *keys)
        target.copy_(numerics.stochastic_round_to_bf16_torch(value, bits))
    else:
        bits = numerics.random_bits_torch(_padded_index(index), *keys)
        codes, scales = numerics.quantize_torch(_padded(value), plan.tables[0 if plan.signed[k] else 1], bits)
        width = cols.stop - cols.start
        target.copy_(codes[:, :width])
        first = cols.start // numerics.QBLOCK
        plan.scales[k][rows, first:first + scales.shape[1]] = scales


def _padded(t: torch.Tensor) -> torch.Tensor:
    """`t` with zero columns appended up to a multiple of QBLOCK (ragged right edge)."""
    pad = -t.shape[1] % numerics.QBLOCK
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def _padded_index(index: torch.Tensor) -> torch.Tensor:
    """Element indices continued over the zero columns `_padded` appends (their codes do not
    depend on the bits: zero is a table value)."""
    pad = -index.shape[1] % numerics.QBLOCK
    if not pad:
        return index
    extra = index[:, -1:] + torch.arange(1, pad + 1, device=index.device)
    return torch.cat([index, extra], dim=1)
