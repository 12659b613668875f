"""The tiled torch twin of the fused kernel: the CPU path and a second reference.

It runs the kernel's loop in PyTorch: for each [block_m, block_n] tile of W, accumulate
dy[:, rows]^T @ x[:, cols] in fp32 over T in block_t chunks, scale, then apply the rule's torch
update (the same function the Triton epilogue compiles) to the tile's weight and state views.
Extra memory is one tile and two token panels, never the full gradient.

Every GEMM call has the same shapes ([block_m, block_t] @ [block_t, block_n], contiguous,
zero-padded at ragged edges): BLAS picks different kernels (and summation orders) for different
shapes, and a fixed shape makes dW[i, j] independent of where the tile sits, so a weight sharded
across tensor-parallel ranks gets the same bits as the unsharded one, as with the Triton kernel.
"""

from __future__ import annotations

import torch

from forge_megatron.kernels import TileConfig

DEFAULT_CONFIG = TileConfig(block_m=64, block_n=128, block_t=256, group_m=1)


def run(x, dy, weight, master, states, stored, update_fn, coefs, grad_out, sumsq, nonfinite, config: TileConfig,
        apply: bool = True):
    """Same contract as kernels.launch."""
    bm, bn, bt = config.block_m, config.block_n, config.block_t
    n_tokens = x.shape[0]
    n_out, n_in = weight.shape
    num_m, num_n = -(-n_out // bm), -(-n_in // bn)
    device = weight.device
    dy_panel = torch.zeros(bm, bt, dtype=torch.float32, device=device)
    x_panel = torch.zeros(bt, bn, dtype=torch.float32, device=device)
    acc = torch.empty(bm, bn, dtype=torch.float32, device=device)
    grad_scale, coef = coefs[0], tuple(coefs[1:])
    zero = torch.zeros((), dtype=torch.float32, device=device)

    for pid_m in range(num_m):
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
            sumsq[tile] = (raw * raw).sum()
            nonfinite[tile] = bad
            if not apply:
                continue
            if grad_out is not None:
                grad_out[r0:r1, c0:c1] = g
            if bad:
                continue
            w_tile = weight[r0:r1, c0:c1]
            p_tile = w_tile if master is None else master[r0:r1, c0:c1]  # the rule runs on the master
            state_tiles = [s[r0:r1, c0:c1] for s in states]
            state = tuple(t if keep else zero for t, keep in zip(state_tiles, stored))
            p, state = update_fn(p_tile.float(), g, state, coef)
            if master is not None:
                p_tile.copy_(p)
            w_tile.copy_(p)  # torch rounds fp32 -> bf16 to nearest even, as the kernel does
            for t, new, keep in zip(state_tiles, state, stored):
                if keep:
                    t.copy_(new)


def _fill(panel: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into the top-left corner of the fixed-shape `panel`, zeroing the rest."""
    h, w = src.shape
    if (h, w) != panel.shape:
        panel.zero_()
    panel[:h, :w] = src
