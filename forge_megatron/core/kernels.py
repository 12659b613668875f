"""The fused weight-gradient + optimizer-step Triton kernel and its launcher.

One program owns one [BLOCK_M, BLOCK_N] tile of the weight W [out, in]. It accumulates
dW_tile = dy[:, rows]^T @ x[:, cols] over all T tokens in an fp32 register accumulator, BLOCK_T
tokens at a time, multiplies by the gradient scale, and then, in the same program, loads the
weight tile and its state tiles, applies the rule's epilogue and stores them back. The gradient
tile is never written to memory (unless MATERIALIZE, a debug mode for exactness proofs).

By-products, one slot per tile (indexed by tile position, not by launch order, so they are
deterministic; every tile writes its slot, so the buffer needs no initialization): the sum of
squares of the raw gradient dy^T x, before the scale (for the global grad norm, which clipping
needs unclipped) and the number of non-finite scaled-gradient values. A tile with any non-finite
value stores nothing.

Everything that changes from step to step is read from device memory, not passed as an argument:
the gradient scale, the step and the rule's coefficients from one fp32 row (plan.COEF_HEAD), from
which the kernel also derives its random keys (numerics.stream_keys, with the run's seed and the
weight's id): a step is one launch, with nothing to copy or fill around it.

The epilogue reads and writes every precision regime (state.py): fp32 weights, bf16 weights with
an fp32 master, with stochastic rounding or round-to-nearest; fp32, bf16 (stochastically
rounded) or 8-bit block-quantized states, dequantized and requantized in registers
(numerics.py).

Determinism and tensor parallelism: the value of dW[i, j] depends only on column i of dy, column j
of x, BLOCK_T and the dot instruction, never on the tile's position or on out/in. The launcher
therefore picks the tile config from (device, dtype) only, never from the weight's shape, so a
weight sharded across tensor-parallel ranks gets the same bits as the unsharded one. There is
no split over T (that would need a cross-program reduction before the rule could run).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forge_megatron.core import plan
from forge_megatron.core.numerics import (
    ACCUMULATION_STREAM,
    QBLOCK,
    dequantize,
    global_index,
    micro_stream_keys,
    quantize,
    random_bits,
    round_to_bf16,
    stochastic_round_to_bf16,
    stream_keys,
)
from forge_megatron.core.plan import (
    COEF_HEAD,
    STATE_BF16,
    STATE_FP32,
    STATE_INT8,
    WEIGHT_FP32,
    WEIGHT_MASTER,
    ShardPlacement,
    StepPlan,
    TileConfig,
    interpreting,
    num_tiles,
)

QB = tl.constexpr(QBLOCK)  # the quantization block, as a constant the kernel may read
# plan.py's weight stores and state formats, as constants the kernel may read
_FP32_WEIGHT = tl.constexpr(plan.WEIGHT_FP32)
_MASTER = tl.constexpr(plan.WEIGHT_MASTER)
_SR = tl.constexpr(plan.WEIGHT_SR)
_NO_WEIGHT = tl.constexpr(plan.WEIGHT_NONE)
_FP32_STATE = tl.constexpr(plan.STATE_FP32)
_BF16_STATE = tl.constexpr(plan.STATE_BF16)
_INT8_STATE = tl.constexpr(plan.STATE_INT8)
_COEF_HEAD = tl.constexpr(plan.COEF_HEAD)
ACC_STREAM = tl.constexpr(ACCUMULATION_STREAM)

@triton.jit
def _tile_coordinates(pid, N_OUT, N_IN, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile `pid`'s row and column blocks, in grouped launch order (tiles sharing dy columns run
    together, for L2 reuse)."""
    num_m = tl.cdiv(N_OUT, BLOCK_M)
    num_n = tl.cdiv(N_IN, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows
    return pid_m, pid_n, num_n


@triton.jit(do_not_specialize=["SEED", "WEIGHT_ID", "MICRO"])  # per-weight, per-micro-batch: one compile for all
def fused_wgrad_update_kernel(
    x_ptr, dy_ptr, w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr, stats_ptr, buf_ptr,
    T, N_OUT, N_IN, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID, MICRO,
    stride_xt, stride_xi, stride_dt, stride_do,
    UPDATE: tl.constexpr,
    WEIGHT_STORE: tl.constexpr,
    STATE_STORED: tl.constexpr,
    STATE_SIGNED: tl.constexpr,
    STATE_FORMAT: tl.constexpr,
    NUM_COEFS: tl.constexpr,
    MATERIALIZE: tl.constexpr,
    STATS: tl.constexpr,
    APPLY: tl.constexpr,
    READ_BUFFER: tl.constexpr,
    WRITE_BUFFER: tl.constexpr,
    BUFFER_BF16: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n, num_n = _tile_coordinates(tl.program_id(0), N_OUT, N_IN, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _wgrad_tile(x_ptr, dy_ptr, 0, T, rows, cols, N_OUT, N_IN, stride_xt, stride_xi, stride_dt, stride_do,
                      UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_T)
    acc = _accumulate(acc, rows, cols, N_OUT, N_IN, buf_ptr, coef_ptr, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET,
                      GLOBAL_COLS, SEED, WEIGHT_ID, MICRO, READ_BUFFER, WRITE_BUFFER, BUFFER_BF16)
    _finish_tile(acc, rows, pid_n * BLOCK_N, pid_m * num_n + pid_n, N_OUT, N_IN,
                 w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr, stats_ptr,
                 ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID,
                 UPDATE, WEIGHT_STORE, STATE_STORED, STATE_SIGNED, STATE_FORMAT, NUM_COEFS, MATERIALIZE, STATS, APPLY,
                 BLOCK_M, BLOCK_N)


@triton.jit
def _wgrad_tile(x_ptr, dy_ptr, t_start, t_end, rows, cols, N_OUT, N_IN, stride_xt, stride_xi, stride_dt, stride_do,
                UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """dW_tile = dy[t_start:t_end, rows]^T @ x[t_start:t_end, cols], fp32 accumulation in registers,
    BLOCK_T tokens at a time from t_start (the same chunks as a weight stepped on those tokens alone)."""
    row_ok = rows < N_OUT
    col_ok = cols < N_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < t_end
        dy_t = tl.load(dy_ptr + rows[:, None] * stride_do + ts[None, :] * stride_dt,
                       mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        x_t = tl.load(x_ptr + ts[:, None] * stride_xt + cols[None, :] * stride_xi,
                      mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            dy_t = dy_t.to(tl.float32)
            x_t = x_t.to(tl.float32)
        acc = tl.dot(dy_t, x_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _buffer_tile(buf_ptr, rows, cols, N_OUT, N_IN):
    """The fp32 value of a gradient tile held in a buffer [out, in] (fp32 or bf16)."""
    in_bounds = (rows < N_OUT)[:, None] & (cols < N_IN)[None, :]
    return tl.load(buf_ptr + rows[:, None] * N_IN + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)


@triton.jit
def _accumulate(acc, rows, cols, N_OUT, N_IN, buf_ptr, coef_ptr,
                ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SEED, WEIGHT_ID, MICRO,
                READ_BUFFER: tl.constexpr, WRITE_BUFFER: tl.constexpr, BUFFER_BF16: tl.constexpr):
    """Gradient accumulation over micro-batches: the buffer holds the sum of the earlier ones; this
    micro-batch's whole tile is added to it (the order of Megatron's fp32 main_grad). Returns the sum."""
    if READ_BUFFER:
        acc = acc + _buffer_tile(buf_ptr, rows, cols, N_OUT, N_IN)
    if WRITE_BUFFER:
        in_bounds = (rows < N_OUT)[:, None] & (cols < N_IN)[None, :]
        offs = rows[:, None] * N_IN + cols[None, :]
        if BUFFER_BF16:  # rounded stochastically: the sum stays unbiased in 16 bits
            k1, k2 = micro_stream_keys(SEED, WEIGHT_ID, tl.load(coef_ptr + 1).to(tl.uint32), ACC_STREAM, MICRO)
            index = global_index(rows, cols, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS)
            tl.store(buf_ptr + offs, stochastic_round_to_bf16(acc, random_bits(index, k1, k2)), mask=in_bounds)
        else:
            tl.store(buf_ptr + offs, acc, mask=in_bounds)
    return acc


@triton.jit(do_not_specialize=["SEED", "WEIGHT_ID"])
def apply_buffer_kernel(
    buf_ptr, w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr, stats_ptr,
    N_OUT, N_IN, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID,
    UPDATE: tl.constexpr,
    WEIGHT_STORE: tl.constexpr,
    STATE_STORED: tl.constexpr,
    STATE_SIGNED: tl.constexpr,
    STATE_FORMAT: tl.constexpr,
    NUM_COEFS: tl.constexpr,
    MATERIALIZE: tl.constexpr, APPLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The update from a gradient already in memory (an accumulation buffer, fp32 or bf16): the
    fused kernel's tile finish without its GEMM, the same by-products and the same epilogue
    (without APPLY, the by-products only)."""
    pid_m, pid_n, num_n = _tile_coordinates(tl.program_id(0), N_OUT, N_IN, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _buffer_tile(buf_ptr, rows, cols, N_OUT, N_IN)
    _finish_tile(acc, rows, pid_n * BLOCK_N, pid_m * num_n + pid_n, N_OUT, N_IN,
                 w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr, stats_ptr,
                 ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID,
                 UPDATE, WEIGHT_STORE, STATE_STORED, STATE_SIGNED, STATE_FORMAT, NUM_COEFS, MATERIALIZE, True, APPLY,
                 BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["SEED", "MICRO"])
def grouped_wgrad_update_kernel(
    x_ptr, dy_ptr, offsets_ptr, ids_ptr, w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr,
    stats_ptr, buf_ptr,
    N_OUT, N_IN, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, MICRO,
    stride_xt, stride_xi, stride_dt, stride_do,
    UPDATE: tl.constexpr,
    WEIGHT_STORE: tl.constexpr,
    STATE_STORED: tl.constexpr,
    STATE_SIGNED: tl.constexpr,
    STATE_FORMAT: tl.constexpr,
    NUM_COEFS: tl.constexpr,
    MATERIALIZE: tl.constexpr,
    STATS: tl.constexpr,
    APPLY: tl.constexpr,
    READ_BUFFER: tl.constexpr,
    WRITE_BUFFER: tl.constexpr,
    BUFFER_BF16: tl.constexpr,
    FROM_BUFFER: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The fused kernel for E experts' weights stacked [E, out, in] (weight, master, states and
    buffer; int8 scales [E, out, blocks]) in one launch: program (tile, expert) runs the dense
    kernel's program for that tile of expert e's weight, on expert e's tokens (rows offsets[e] to
    offsets[e + 1] of x and dy, none for an expert without tokens: a zero gradient), with expert
    e's random-stream id, ids[e]. Its by-products go to slot e * tiles + tile. FROM_BUFFER: the
    gradient is the buffer's (apply_buffer_kernel's update, for every expert)."""
    expert = tl.program_id(1)
    expert64 = expert.to(tl.int64)  # offsets into the stacked tensors: E * out * in may pass 2**31
    pid_m, pid_n, num_n = _tile_coordinates(tl.program_id(0), N_OUT, N_IN, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    weight_id = tl.load(ids_ptr + expert)
    first = expert64 * N_OUT * N_IN  # the expert's first element in every stacked tensor
    if FROM_BUFFER:
        acc = _buffer_tile(buf_ptr + first, rows, cols, N_OUT, N_IN)
    else:
        t_start = tl.load(offsets_ptr + expert).to(tl.int32)
        t_end = tl.load(offsets_ptr + expert + 1).to(tl.int32)
        acc = _wgrad_tile(x_ptr, dy_ptr, t_start, t_end, rows, cols, N_OUT, N_IN, stride_xt, stride_xi, stride_dt,
                          stride_do, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_T)
        acc = _accumulate(acc, rows, cols, N_OUT, N_IN, buf_ptr + first, coef_ptr, ROW_OFFSET, ROW_SPLIT, ROW_JUMP,
                          COL_OFFSET, GLOBAL_COLS, SEED, weight_id, MICRO, READ_BUFFER, WRITE_BUFFER, BUFFER_BF16)
    tiles = tl.cdiv(N_OUT, BLOCK_M) * num_n
    _finish_tile(acc, rows, pid_n * BLOCK_N, expert * tiles + pid_m * num_n + pid_n, N_OUT, N_IN,
                 w_ptr + first, master_ptr + first, _shifted(state_ptrs, first),
                 _shifted(scale_ptrs, expert64 * N_OUT * SCALE_COLS), coef_ptr, table_ptr, grad_ptr + first, stats_ptr,
                 ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, weight_id,
                 UPDATE, WEIGHT_STORE, STATE_STORED, STATE_SIGNED, STATE_FORMAT, NUM_COEFS, MATERIALIZE, STATS, APPLY,
                 BLOCK_M, BLOCK_N)


@triton.jit
def _shifted(ptrs, offset):
    """Each pointer of a tuple moved `offset` elements on (to one expert's part of stacked tensors)."""
    out = ()
    for k in tl.static_range(len(ptrs)):
        out = out + (ptrs[k] + offset,)
    return out


@triton.jit
def _finish_tile(acc, rows, col0, tile, N_OUT, N_IN,
                 w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr, stats_ptr,
                 ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID,
                 UPDATE: tl.constexpr, WEIGHT_STORE: tl.constexpr, STATE_STORED: tl.constexpr,
                 STATE_SIGNED: tl.constexpr, STATE_FORMAT: tl.constexpr, NUM_COEFS: tl.constexpr,
                 MATERIALIZE: tl.constexpr, STATS: tl.constexpr, APPLY: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A gradient tile's by-products and update: the raw tile `acc` is scaled; the tile's sum of
    squares (of the raw gradient) and non-finite count go to its by-product slot; with APPLY the
    rule runs on it unless it has a non-finite value (then the tile stores nothing)."""
    g = acc * tl.load(coef_ptr)
    cols = col0 + tl.arange(0, BLOCK_N)
    in_bounds = (rows < N_OUT)[:, None] & (cols < N_IN)[None, :]
    bad = tl.sum(tl.sum((in_bounds & ~(tl.abs(g) < float("inf"))).to(tl.int32), axis=1), axis=0)
    if STATS:
        tl.store(stats_ptr + 2 * tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
        tl.store(stats_ptr + 2 * tile + 1, bad.to(tl.float32))
    if APPLY:
        # Epilogue in two column halves (lower register pressure); a bad tile stores nothing.
        ok_tile = bad == 0
        g3 = tl.permute(tl.reshape(g, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        g_lo, g_hi = tl.split(g3)
        step = tl.load(coef_ptr + 1).to(tl.uint32)
        _epilogue(g_lo, rows, col0, N_OUT, N_IN, ok_tile,
                  w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr,
                  ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID, step,
                  UPDATE, WEIGHT_STORE, STATE_STORED, STATE_SIGNED, STATE_FORMAT, NUM_COEFS, MATERIALIZE,
                  BLOCK_N // 2)
        _epilogue(g_hi, rows, col0 + BLOCK_N // 2, N_OUT, N_IN, ok_tile,
                  w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr,
                  ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID, step,
                  UPDATE, WEIGHT_STORE, STATE_STORED, STATE_SIGNED, STATE_FORMAT, NUM_COEFS, MATERIALIZE,
                  BLOCK_N // 2)


@triton.jit
def _epilogue(g, rows, col0, N_OUT, N_IN, ok_tile,
              w_ptr, master_ptr, state_ptrs, scale_ptrs, coef_ptr, table_ptr, grad_ptr,
              ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS, SCALE_COLS, SEED, WEIGHT_ID, step,
              UPDATE: tl.constexpr, WEIGHT_STORE: tl.constexpr, STATE_STORED: tl.constexpr,
              STATE_SIGNED: tl.constexpr, STATE_FORMAT: tl.constexpr, NUM_COEFS: tl.constexpr,
              MATERIALIZE: tl.constexpr, WIDTH: tl.constexpr):
    """The rule on one [BLOCK_M, WIDTH] half-tile starting at column col0."""
    cols = col0 + tl.arange(0, WIDTH)
    in_bounds = (rows < N_OUT)[:, None] & (cols < N_IN)[None, :]
    offs = rows[:, None] * N_IN + cols[None, :]
    if MATERIALIZE:
        tl.store(grad_ptr + offs, g, mask=in_bounds)
    ok = in_bounds & ok_tile
    # The element's index in the unsharded weight keys its random bits (TP-invariant).
    index = global_index(rows, cols, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS)

    if WEIGHT_STORE == _NO_WEIGHT:  # the rule updates its states only (rules.Muon)
        p = tl.zeros_like(g)
    elif WEIGHT_STORE == _MASTER:  # the rule runs on the fp32 master; the weight is its rounded copy
        p = tl.load(master_ptr + offs, mask=ok, other=0.0)
    else:
        p = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    state = ()
    for k in tl.static_range(len(STATE_STORED)):
        if STATE_STORED[k]:
            if STATE_FORMAT == _INT8_STATE:
                codes = tl.load(state_ptrs[k] + offs, mask=ok, other=0)
                scale = tl.load(scale_ptrs[k] + rows[:, None] * SCALE_COLS + (cols // QB)[None, :], mask=ok,
                                other=0.0)
                value = dequantize(codes, scale, table_ptr + (0 if STATE_SIGNED[k] else 256))
            else:
                value = tl.load(state_ptrs[k] + offs, mask=ok, other=0.0).to(tl.float32)
            state = state + (value,)
        else:
            state = state + (0.0,)
    coef = ()
    for k in tl.static_range(NUM_COEFS):
        coef = coef + (tl.load(coef_ptr + _COEF_HEAD + k),)
    p, state = UPDATE(p, g, state, coef)

    if WEIGHT_STORE == _FP32_WEIGHT:
        tl.store(w_ptr + offs, p, mask=ok)
    elif WEIGHT_STORE == _MASTER:
        tl.store(master_ptr + offs, p, mask=ok)
        tl.store(w_ptr + offs, round_to_bf16(p), mask=ok)
    elif WEIGHT_STORE == _SR:
        k1, k2 = stream_keys(SEED, WEIGHT_ID, step, 0)
        tl.store(w_ptr + offs, stochastic_round_to_bf16(p, random_bits(index, k1, k2)), mask=ok)
    elif WEIGHT_STORE != _NO_WEIGHT:
        tl.store(w_ptr + offs, round_to_bf16(p), mask=ok)
    for k in tl.static_range(len(STATE_STORED)):
        if STATE_STORED[k]:
            if STATE_FORMAT == _FP32_STATE:
                tl.store(state_ptrs[k] + offs, state[k], mask=ok)
            elif STATE_FORMAT == _BF16_STATE:
                k1, k2 = stream_keys(SEED, WEIGHT_ID, step, 1 + k)
                tl.store(state_ptrs[k] + offs, stochastic_round_to_bf16(state[k], random_bits(index, k1, k2)),
                         mask=ok)
            else:
                k1, k2 = stream_keys(SEED, WEIGHT_ID, step, 1 + k)
                value = tl.where(in_bounds, state[k], 0.0)
                codes, scale = quantize(value, random_bits(index, k1, k2),
                                        table_ptr + (0 if STATE_SIGNED[k] else 256), QB)
                tl.store(state_ptrs[k] + offs, codes, mask=ok)
                blocks = col0 // QB + tl.arange(0, WIDTH // QB)
                scale_ok = ((rows < N_OUT)[:, None] & (blocks < SCALE_COLS)[None, :]) & ok_tile
                tl.store(scale_ptrs[k] + rows[:, None] * SCALE_COLS + blocks[None, :], scale, mask=scale_ok)


def _constexprs(plan: StepPlan, dtype, config: TileConfig) -> dict:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # follow torch.matmul's own setting for fp32 inputs
    else:
        precision = "ieee"
    return dict(
        UPDATE=plan.update_fn,
        WEIGHT_STORE=plan.weight_store,
        STATE_STORED=tuple(plan.stored),
        STATE_SIGNED=tuple(plan.signed),
        STATE_FORMAT=plan.state_format,
        NUM_COEFS=plan.num_coefs,
        MATERIALIZE=plan.grad_out is not None,
        STATS=plan.stats_on,
        APPLY=plan.apply,
        READ_BUFFER=plan.read_buffer,
        WRITE_BUFFER=plan.write_buffer,
        BUFFER_BF16=plan.buffer is not None and plan.buffer.dtype == torch.bfloat16,
        UPCAST_DOT=interpreting() and dtype != torch.float32,
        DOT_PRECISION=precision,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_T=config.block_t, GROUP_M=config.group_m,
    )


def launch(x, dy, weight, plan: StepPlan, config: TileConfig) -> None:
    """Launch the kernel, one program per tile of `weight` (see StepPlan for the rest): the only
    work on the device is this one launch."""
    args, kwargs = _launch_arguments(x, dy, weight, plan, config)
    fused_wgrad_update_kernel[(num_tiles(weight.shape, config),)](*args, **kwargs)


def _launch_arguments(x, dy, weight, plan: StepPlan, config: TileConfig) -> tuple[tuple, dict]:
    """The kernel's arguments for one step, shared by `launch` and `compile_for_target`."""
    n_out, n_in = weight.shape
    args = (x, dy, *_update_pointers(weight, plan), plan.buffer if plan.buffer is not None else weight,
            x.shape[0], n_out, n_in, *_placement_args(n_in, plan), plan.seed, plan.weight_id, plan.micro,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1))
    kwargs = dict(**_constexprs(plan, x.dtype, config), num_warps=config.num_warps, num_stages=config.num_stages,
                  enable_fp_fusion=False)
    return args, kwargs


def launch_grouped(x, dy, offsets, weight, plan: StepPlan, config: TileConfig, from_buffer: bool = False) -> None:
    """Launch grouped_wgrad_update_kernel for E experts' weights stacked [E, out, in]: one launch,
    program (tile, expert) for every tile of every expert (`plan.weight_id` the experts' ids, an
    int64 [E] device tensor; `offsets` their token ranges, [E + 1] on the device). `from_buffer`:
    the update from `plan.buffer` ([E, out, in]) instead of x and dy (which are then not read)."""
    args, kwargs = _grouped_launch_arguments(x, dy, offsets, weight, plan, config, from_buffer)
    grouped_wgrad_update_kernel[(num_tiles(weight.shape[1:], config), weight.shape[0])](*args, **kwargs)


def _grouped_launch_arguments(x, dy, offsets, weight, plan: StepPlan, config: TileConfig,
                              from_buffer: bool) -> tuple[tuple, dict]:
    """The grouped kernel's arguments, shared by `launch_grouped` and `compile_for_target`."""
    _, n_out, n_in = weight.shape
    args = (x, dy, offsets, plan.weight_id, *_update_pointers(weight, plan),
            plan.buffer if plan.buffer is not None else weight, n_out, n_in, *_placement_args(n_in, plan),
            plan.seed, plan.micro, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1))
    kwargs = dict(**_constexprs(plan, x.dtype, config), FROM_BUFFER=from_buffer, num_warps=config.num_warps,
                  num_stages=config.num_stages, enable_fp_fusion=False)
    return args, kwargs


def apply_buffer(weight, plan: StepPlan, config: TileConfig) -> None:
    """Launch apply_buffer_kernel: the update from `plan.buffer`, one program per tile."""
    fused = _constexprs(plan, torch.float32, config)
    constexprs = {k: fused[k] for k in ("UPDATE", "WEIGHT_STORE", "STATE_STORED", "STATE_SIGNED", "STATE_FORMAT",
                                        "NUM_COEFS", "MATERIALIZE", "APPLY", "BLOCK_M", "BLOCK_N", "GROUP_M")}
    apply_buffer_kernel[(num_tiles(weight.shape, config),)](
        plan.buffer, *_update_pointers(weight, plan), *weight.shape, *_placement_args(weight.shape[1], plan), plan.seed,
        plan.weight_id, **constexprs,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)


def _update_pointers(weight, plan: StepPlan) -> tuple:
    return (weight, plan.master if plan.master is not None else weight, tuple(plan.states), tuple(plan.scales),
            plan.coefs, plan.tables, plan.grad_out if plan.grad_out is not None else weight, plan.stats)


def _placement_args(n_in: int, plan: StepPlan) -> tuple:
    """Where the (each expert's) weight sits in its unsharded weight, and its int8 scales' columns."""
    place = plan.placement
    return (place.row_offset, place.row_split, place.row_jump, place.col_offset, place.global_cols,
            triton.cdiv(n_in, QBLOCK))


def compile_for_target(rule, dtype: torch.dtype, config: TileConfig, arch: int = 90, weight_store: int = None,
                       state_format: int = STATE_FP32, shape: tuple[int, int] = (4096, 4096), tokens: int = 8192,
                       apply: bool = True, fp_fusion: bool = False, materialize: bool = False,
                       hyperparameters: dict | None = None, experts: int = 0):
    """Compile the kernel for an NVIDIA target without a GPU, as a launch would compile it: the
    arguments `launch` passes for contiguous [tokens, in] x and [tokens, out] dy and a weight of
    `shape` (placeholders that allocate nothing) go through Triton's own binder, so that pointers
    get their 16-byte alignment, integers their divisibility by 16, and unit strides become
    constants, exactly as at launch (this relies on triton.runtime.jit's binder and
    JITFunction._pack_args, Triton 3.x). Then ptxas reports the resources.

    `dtype` is the activation dtype; the weight is fp32 for fp32 activations and bf16 otherwise
    (with an fp32 master unless `weight_store` says otherwise). `rule` is a registered Rule; its
    default hyperparameters decide which states are stored. `apply=False` compiles the norms-only
    variant (no epilogue); `fp_fusion` lets the compiler contract mul+add into FMA (off in every
    real launch; for the test that shows the check would see it); `materialize` the debug variant
    that writes the gradient out; `hyperparameters` (the rule's defaults otherwise) decide which
    states are stored; `experts` > 0 compiles the grouped kernel for that many experts' weights of
    `shape` stacked (the `tokens` all theirs). The compiled kernel lands in Triton's cache, where a launch with the same
    specialization finds it (scripts/device_plan.py compiles ahead this way, in parallel). Returns the compiled kernel
    (`.asm["ptx"]`, `.asm["cubin"]`), ptxas's resource report (registers, spill bytes) and the
    specialization (which arguments became constants, which got divisibility).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if weight_store is None:
        weight_store = WEIGHT_FP32 if dtype == torch.float32 else WEIGHT_MASTER
    hp = rule.hyperparameters(**(hyperparameters or {}))
    names = rule.states
    n_out, n_in = shape
    stack = (experts,) if experts else ()  # the grouped kernel's weights are stacked [E, out, in]
    weight_dtype = torch.float32 if weight_store == WEIGHT_FP32 else torch.bfloat16
    state_dtype = {STATE_FP32: torch.float32, STATE_BF16: torch.bfloat16, STATE_INT8: torch.uint8}[state_format]

    def placeholder(*dims, dtype_):  # any shape, contiguous, no storage (address 0: aligned)
        return torch.empty(*dims, dtype=dtype_, device="meta")

    weight = placeholder(*stack, n_out, n_in, dtype_=weight_dtype)
    stored = tuple(n in rule.stored_states(hp) for n in names)
    # as ForgeState.kernel_states passes them: the weight where a state (or its int8 scales) is not stored
    states = [placeholder(*stack, n_out, n_in, dtype_=state_dtype) if keep else weight for keep in stored]
    scales = [placeholder(*stack, n_out, -(-n_in // QBLOCK), dtype_=torch.float32)
              if keep and state_format == STATE_INT8 else weight for keep in stored]
    plan = StepPlan(
        update_fn=rule.triton_update, weight_store=weight_store,
        master=placeholder(*stack, n_out, n_in, dtype_=torch.float32) if weight_store == WEIGHT_MASTER else None,
        states=states, scales=scales, stored=stored,
        signed=tuple(n not in rule.nonnegative_states for n in names), state_format=state_format,
        coefs=torch.empty(COEF_HEAD + rule.num_coefficients, device="meta"), num_coefs=rule.num_coefficients,
        seed=1234, weight_id=placeholder(experts, dtype_=torch.int64) if experts else 7,
        tables=torch.empty(2, 256, device="meta"), placement=ShardPlacement.whole(shape),
        grad_out=placeholder(*stack, n_out, n_in, dtype_=torch.float32) if materialize else None,
        stats=torch.empty(num_tiles(weight.shape, config), 2, device="meta"), apply=apply)
    x, dy = placeholder(tokens, n_in, dtype_=dtype), placeholder(tokens, n_out, dtype_=dtype)
    if experts:
        kernel = grouped_wgrad_update_kernel
        offsets = placeholder(experts + 1, dtype_=torch.int64)
        args, kwargs = _grouped_launch_arguments(x, dy, offsets, weight, plan, config, from_buffer=False)
    else:
        kernel = fused_wgrad_update_kernel
        args, kwargs = _launch_arguments(x, dy, weight, plan, config)
    kwargs["enable_fp_fusion"] = fp_fusion
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    names_ = list(kernel.signature.parameters)
    specialized = {"constants": sorted(names_[path[0]] for path in constexprs
                                       if not kernel.params[path[0]].is_constexpr),
                   "divisible_by_16": sorted({names_[path[0]] for path, attr in attrs.items()
                                              if any("divisibility" in str(a) for a in attr)})}
    return compiled, _ptxas_report(compiled.asm["ptx"], arch), specialized


def _ptxas_report(ptx: str, arch: int) -> dict:
    import re
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", text).group(1)),
    }
