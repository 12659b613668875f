"""Rounding, random bits and 8-bit block quantization, spelled once for Triton and once for torch
so that the interpreter, the GPU and the tiled torch backend produce the same bits.

Round to nearest even (bf16). Torch's fp32 -> bf16 conversion rounds to nearest even on every
device; a GPU's Triton cast does too, but the Triton interpreter truncates (and flushes
subnormals), so the kernel rounds with integer operations and builds the bf16 bits itself.

Stochastic rounding (bf16). x is rounded up to the next bf16 value with probability equal to
its distance from the lower one, in units of the bf16 spacing: add 16 uniform random bits to the
fp32 bit pattern and drop the low 16 bits. Working on the magnitude bits makes it unbiased for
negative values too: E[SR(x)] = x.

Random bits. A counter-based generator: 32 bits = hash(hash(index ^ k1) + k2), with the
lowbias32 integer hash (Wellons' hash-prospector), `index` the element's index in the
*unsharded* weight (`global_index`: a shard's rows and columns placed where they sit unsharded)
and (k1, k2) = `stream_keys(seed, weight_id, step, stream)`, hashed from the run's seed,
the weight's id, the step and the stream (0: the weight, 1 + k: state k, ACCUMULATION_STREAM: the
bf16 accumulation buffer, with the micro-batch's index: `micro_stream_keys`); the kernel derives them
itself from scalars, the twin and the tests with the Python-int twin. The bits depend on those
and the global element index only: not on tiles, launch order or tensor-parallel sharding.
Torch has no uint32 multiply, so the torch twin multiplies in int64 with the constant split in
16-bit halves (every partial product < 2^48, no overflow).

8-bit block quantization. A state is stored as one uint8 code per element and one fp32 scale
(the block's absolute maximum) per block of QBLOCK = 32 consecutive elements of a row (blocks
never straddle a kernel tile: block_n is a multiple of 64, so each epilogue half-tile holds
whole blocks). A code indexes a 256-entry table of values in [-1, 1] (signed, first moments)
or [0, 1] (unsigned, second moments); x ~ table[code] * scale. The tables are logarithmic: each
value is a constant ratio above the previous, so the relative error is the same at every
magnitude, which is what a second moment needs (it spans many decades and is used through
1 / sqrt(v)). Quantizing rounds stochastically between the two table values that bracket
x / scale, found by a binary search over the table (comparisons only, so every backend finds
the same pair), with the probability of the upper one set by linear interpolation: the stored
value is unbiased, so a state whose per-step change is smaller than a table step still moves
in expectation (an exponential average with beta2 = 0.999 would freeze under rounding to
nearest). docs/numerics.md derives the error bounds.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

QBLOCK = 32
ACCUMULATION_STREAM = 4  # the random stream of a bf16 accumulation buffer (0: weight, 1-3: states)
SIGNED_DECADES = 5  # first moments: |x| / absmax in [1e-5, 1] keeps a relative error bound
UNSIGNED_DECADES = 10  # second moments: v / absmax in [1e-10, 1] (sqrt: 5 decades, as m)
LOWBIAS_A, LOWBIAS_B = 0x7FEB352D, 0x846CA68B

# -- round to nearest even -------------------------------------------------------------------


BF16_NAN = 0x7FC0  # the quiet NaN a NaN rounds to (torch's own fp32 -> bf16 conversion gives it too)
_NAN_BITS = tl.constexpr(BF16_NAN)  # the same, as a constant kernels may read


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest, ties to even (inf stays inf; overflow goes to inf; NaN
    stays NaN: adding the rounding bias to a NaN whose low bits are set, such as a GPU's
    canonical 0x7FFFFFFF, would carry into the sign bit and give -0.0)."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = tl.where(x != x, _NAN_BITS, (bits + 0x7FFF + lsb) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# -- random bits -------------------------------------------------------------------------------


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def random_bits(index, k1, k2):
    """32 random bits (uint32) for element `index` (uint32) under keys k1, k2."""
    return _lowbias32(_lowbias32(index ^ k1) + k2)


@triton.jit
def _stream_key(seed, weight_id, step, stream: tl.constexpr):
    base = _lowbias32(_lowbias32(seed.to(tl.uint32) ^ 0x2545F491) + weight_id.to(tl.uint32))
    return _lowbias32(base + step.to(tl.uint32) * 8 + stream)


@triton.jit
def stream_keys(seed, weight_id, step, stream: tl.constexpr):
    """The keys (uint32 scalars) of one random stream of one weight at one step; `stream_keys_int`
    is the host's twin. 8 * step + stream is unique for step < 2^29 and up to 8 streams."""
    k1 = _stream_key(seed, weight_id, step, stream)
    return k1, _lowbias32(k1 ^ 0x68E31DA4)


@triton.jit
def micro_stream_keys(seed, weight_id, step, stream: tl.constexpr, micro):
    """`stream_keys` of the accumulation buffer's stream, one pair per micro-batch (`micro` a
    runtime scalar; micro 0 gives `stream_keys`)."""
    k1 = _stream_key(seed, weight_id, step, stream)
    return k1, _lowbias32((k1 ^ 0x68E31DA4) + micro.to(tl.uint32) * 0x9E3779B9)


def _lowbias32_int(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * LOWBIAS_A) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * LOWBIAS_B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def stream_keys_int(seed: int, weight_id: int, step: int, stream: int, micro: int = 0) -> tuple[int, int]:
    """Host twin of `stream_keys` (micro 0) and `micro_stream_keys`, in Python ints."""
    base = _lowbias32_int(_lowbias32_int((seed & 0xFFFFFFFF) ^ 0x2545F491) + weight_id)
    k1 = _lowbias32_int(base + 8 * step + stream)
    return k1, _lowbias32_int((k1 ^ 0x68E31DA4) + (micro * 0x9E3779B9 & 0xFFFFFFFF))


@triton.jit
def global_index(rows, cols, ROW_OFFSET, ROW_SPLIT, ROW_JUMP, COL_OFFSET, GLOBAL_COLS):
    """uint32 index in the unsharded weight of local elements (rows[:, None], cols[None, :]);
    see ShardPlacement (plan.py). `global_index_torch` is the torch twin."""
    global_rows = rows + ROW_OFFSET + tl.where(rows >= ROW_SPLIT, ROW_JUMP, 0)
    return (global_rows.to(tl.uint32)[:, None] * GLOBAL_COLS + (cols + COL_OFFSET).to(tl.uint32)[None, :])


def global_index_torch(rows: torch.Tensor, cols: torch.Tensor, placement) -> torch.Tensor:
    """int64 index in the unsharded weight of local elements (rows[:, None], cols[None, :])."""
    global_rows = rows + placement.row_offset + torch.where(rows >= placement.row_split, placement.row_jump, 0)
    return global_rows[:, None] * placement.global_cols + (cols + placement.col_offset)[None, :]


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo = (x * (constant & 0xFFFF)) & 0xFFFFFFFF
    hi = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def _lowbias32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, LOWBIAS_A)
    x = x ^ (x >> 15)
    x = _mul32(x, LOWBIAS_B)
    return x ^ (x >> 16)


def random_bits_torch(index: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Torch twin of `random_bits`: int64 tensor of values in [0, 2^32)."""
    return _lowbias32_torch((_lowbias32_torch(index ^ k1) + k2) & 0xFFFFFFFF)


# -- stochastic rounding to bf16 -------------------------------------------------------------


@triton.jit
def stochastic_round_to_bf16(x, bits):
    """fp32 -> bf16, rounding up with probability (distance to the lower value) / spacing; NaN
    stays NaN (BF16_NAN; the random bits would carry a NaN's payload into its sign, or wrap it
    to zero)."""
    xb = x.to(tl.uint32, bitcast=True)
    rounded = tl.where(x != x, _NAN_BITS, (xb + (bits & 0xFFFF)) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


def stochastic_round_to_bf16_torch(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Torch twin of `stochastic_round_to_bf16` (x fp32, bits int64 from random_bits_torch)."""
    xb = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = torch.where(torch.isnan(x), BF16_NAN, ((xb + (bits & 0xFFFF)) >> 16) & 0xFFFF)
    return rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)


# -- 8-bit block quantization -----------------------------------------------------------------


def code_tables() -> torch.Tensor:
    """[2, 256] fp32 sorted tables of code values: row 0 signed, row 1 unsigned."""
    # signed: -1 .. -1e-5 (127 values), 0, 1e-5 .. 1 (128 values, one more step at the bottom)
    ratio = 10.0 ** (SIGNED_DECADES / 126)
    magnitudes = [ratio ** -k for k in range(127)]  # 1 .. 1e-5
    positive = magnitudes[::-1]
    signed = [-m for m in magnitudes] + [0.0] + [positive[0] / ratio] + positive
    # unsigned: 0, 1e-10 .. 1 (255 values)
    u_ratio = 10.0 ** (UNSIGNED_DECADES / 254)
    unsigned = [0.0] + [u_ratio ** -k for k in range(254, -1, -1)]
    return torch.tensor([signed, unsigned], dtype=torch.float32)


def relative_error_bound(signed: bool) -> float:
    """Largest |x_hat - x| / |x| for |x| / absmax inside the table's range: one step, r - 1."""
    return 10.0 ** ((SIGNED_DECADES / 126) if signed else (UNSIGNED_DECADES / 254)) - 1


def range_floor(signed: bool) -> float:
    return 10.0 ** -(SIGNED_DECADES if signed else UNSIGNED_DECADES)


@triton.jit
def dequantize(codes, scales, table_ptr):
    """codes uint8 [M, N] and per-element scales fp32 [M, N] -> fp32 values."""
    return tl.load(table_ptr + codes.to(tl.int32)) * scales


@triton.jit
def quantize(x, bits, table_ptr, QB: tl.constexpr):
    """fp32 [M, N] -> (codes uint8 [M, N], block scales fp32 [M, N // QB]), rounding stochastically.

    Scale = the block's absmax (1 for an all-zero block; NaN for a block with a NaN or an infinite
    value, so that the whole block reads back as NaN: `tl.max` would skip a NaN where torch.amax
    keeps it). y = x / scale lies between table[j] and table[j + 1], j = the number of table[1:]
    values <= y (binary lifting over 255 sorted values; 0 for a NaN y); the code is j + 1 with
    probability (y - table[j]) / (table[j + 1] - table[j]), drawn from the top 24 of the 32 random
    `bits`."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    blocks = tl.reshape(x, (M, N // QB, QB))
    absmax = tl.max(tl.abs(blocks), axis=2)
    finite = tl.min((tl.abs(blocks) < float("inf")).to(tl.int32), axis=2) > 0
    scale = tl.where(finite, tl.where(absmax > 0, absmax, 1.0), float("nan"))
    y = tl.reshape(tl.div_rn(blocks, scale[:, :, None]), (M, N))
    j = tl.zeros((M, N), dtype=tl.int32)
    for k in tl.static_range(8):
        probe = j + (128 >> k)
        j = tl.where(tl.load(table_ptr + probe) <= y, probe, j)
    lo = tl.load(table_ptr + j)
    hi = tl.load(table_ptr + tl.minimum(j + 1, 255))
    up = tl.div_rn(y - lo, tl.where(hi > lo, hi - lo, 1.0))
    uniform = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
    code = j + (uniform < up).to(tl.int32)
    return code.to(tl.uint8), scale


def dequantize_torch(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """codes uint8 [M, N], block scales fp32 [M, N // QBLOCK] -> fp32 [M, N]."""
    return table[codes.long()] * scales.repeat_interleave(QBLOCK, dim=1)


def quantize_torch(x: torch.Tensor, table: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `quantize` (x fp32 [M, N] with N a multiple of QBLOCK; bits from random_bits_torch)."""
    m, n = x.shape
    blocks = x.reshape(m, n // QBLOCK, QBLOCK)
    absmax = blocks.abs().amax(dim=2)
    finite = (blocks.abs() < float("inf")).all(dim=2)
    scale = torch.where(finite, torch.where(absmax > 0, absmax, torch.ones_like(absmax)), float("nan"))
    y = torch.div(blocks, scale[:, :, None]).reshape(m, n).contiguous()
    j = torch.searchsorted(table[1:].contiguous(), y, right=True)  # = #{table[1:] <= y}
    j = torch.where(torch.isnan(y), 0, j)  # the kernel's search finds no table value <= NaN
    lo, hi = table[j], table[(j + 1).clamp(max=255)]
    up = torch.div(y - lo, torch.where(hi > lo, hi - lo, torch.ones_like(hi)))
    uniform = (bits >> 8).float() * (1.0 / 16777216.0)
    return (j + (uniform < up).long()).to(torch.uint8), scale


def num_blocks(n: int) -> int:
    return math.ceil(n / QBLOCK)
