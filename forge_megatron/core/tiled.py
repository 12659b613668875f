"""The tiled torch twin of the fused kernel: the CPU path and a second reference.

It runs the kernel's loop in PyTorch: for each [block_m, block_n] tile of W, accumulate
dy[:, rows]^T @ x[:, cols] in fp32 over T in block_t chunks, scale, then apply the rule's torch
update (the same function the Triton epilogue compiles) to the tile's weight and state, read and
written in every precision regime with the torch twins of the kernel's numerics. Extra memory is
one tile and two token panels, never the full gradient.

Every GEMM call has the same shapes ([block_m, block_t] @ [block_t, block_n], contiguous,
zero-padded at ragged edges): BLAS picks different kernels (and summation orders) for different
shapes, and a fixed shape makes dW[i, j] independent of where the tile sits, so a weight sharded
across tensor-parallel ranks gets the same bits as the unsharded one, as with the Triton kernel.
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
    WEIGHT_SR,
    StepPlan,
    TileConfig,
)

DEFAULT_CONFIG = TileConfig(block_m=64, block_n=128, block_t=256, group_m=1)


def run(x, dy, weight, plan: StepPlan, config: TileConfig) -> None:
    """Same contract as kernels.launch."""
    bm, bn, bt = config.block_m, config.block_n, config.block_t
    n_tokens = x.shape[0]
    n_out, n_in = weight.shape
    num_n = -(-n_in // bn)
    device = weight.device
    dy_panel = torch.zeros(bm, bt, dtype=torch.float32, device=device)
    x_panel = torch.zeros(bt, bn, dtype=torch.float32, device=device)
    acc = torch.empty(bm, bn, dtype=torch.float32, device=device)
    grad_scale = plan.coefs[0]
    for pid_m in range(-(-n_out // bm)):
        r0, r1 = pid_m * bm, min(n_out, (pid_m + 1) * bm)
        for pid_n in range(num_n):
            c0, c1 = pid_n * bn, min(n_in, (pid_n + 1) * bn)
            acc.zero_()
            for t0 in range(0, n_tokens, bt):
                t1 = min(n_tokens, t0 + bt)
                _fill(dy_panel, dy[t0:t1, r0:r1].t())
                _fill(x_panel, x[t0:t1, c0:c1])
                acc.addmm_(dy_panel, x_panel)
            raw = acc[: r1 - r0, : c1 - c0]
            g = raw * grad_scale
            tile = pid_m * num_n + pid_n
            bad = (~(g.abs() < float("inf"))).sum()
            plan.stats[tile, 0] = (raw * raw).sum()
            plan.stats[tile, 1] = bad
            if not plan.apply:
                continue
            if plan.grad_out is not None:
                plan.grad_out[r0:r1, c0:c1] = g
            if not bad:
                _epilogue(g, weight, plan, r0, r1, c0, c1)


def _epilogue(g, weight, plan: StepPlan, r0, r1, c0, c1) -> None:
    rows, cols = slice(r0, r1), slice(c0, c1)
    device = weight.device
    index = numerics.global_index_torch(torch.arange(r0, r1, device=device), torch.arange(c0, c1, device=device),
                                        plan.placement)
    w_tile = weight[rows, cols]
    p = (plan.master[rows, cols] if plan.weight_store == WEIGHT_MASTER else w_tile).float()
    zero = torch.zeros((), dtype=torch.float32, device=device)
    state = tuple(_load_state(plan, k, rows, cols) if stored else zero for k, stored in enumerate(plan.stored))
    p, state = plan.update_fn(p, g, state, tuple(plan.coefs[COEF_HEAD:COEF_HEAD + plan.num_coefs]))
    step = int(plan.coefs[1])

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
    for k, stored in enumerate(plan.stored):
        if stored:
            _store_state(plan, k, rows, cols, state[k], index, numerics.stream_keys_int(plan.seed, plan.weight_id,
                                                                                         step, 1 + k))


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


def _fill(panel: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into the top-left corner of the fixed-shape `panel`, zeroing the rest."""
    h, w = src.shape
    if (h, w) != panel.shape:
        panel.zero_()
    panel[:h, :w] = src
