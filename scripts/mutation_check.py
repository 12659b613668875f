"""Mutation check of forge_megatron/core: do the fast core tests catch realistic one-line bugs?

Each mutation below is a bug someone could plausibly write (a loop bound rounded down, a key
that ignores an index, an operation moved, a coefficient off by one step), given as exact edits
(file, original text, replacement). One at a time, in a scratch copy of the checkout (never in the
checkout itself), the script plants it and runs the fast core tests with -x, then reports it
killed (with the first failing test) or survived. Before anything runs it checks that every
original text occurs exactly once, and stops naming the mutations that are out of sync with the
code. It also runs the unmutated copy first: a failing baseline would make every mutation look
killed.

Not in CI (a survivor costs a full run of the tests, ~20 minutes on 2 cores; the whole check takes
hours): run it after changing core/ or its tests, and keep every mutation killed.

    .venv/bin/python scripts/mutation_check.py                 # everything, baseline first
    .venv/bin/python scripts/mutation_check.py --list          # the mutations
    .venv/bin/python scripts/mutation_check.py --only lion-decay-after-sign-step --skip-baseline

The tests run on one worker (-n 0), with FORGE_TEST_SEED fixed (--seed) and hypothesis's
derandomized "ci" profile, so a result reproduces.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Ordered cheapest first: -x stops at the first failure. conftest.py moves test_data_parallel.py first.
TESTS = [
    "tests/test_running_clip.py", "tests/test_numerics.py", "tests/test_rules.py", "tests/test_tiled.py", "tests/test_accumulation.py",
    "tests/test_precision.py", "tests/test_fused_update.py", "tests/test_properties.py", "tests/test_tp_invariance.py",
    "tests/test_data_parallel.py::test_a_block_of_rows_draws_the_bits_those_rows_draw_in_the_whole_shard",
    "tests/test_data_parallel.py::test_the_owners_update_is_the_rule_on_the_reduce_scattered_gradient",
]
# The memory test measures memory, not values, and takes minutes.
DESELECT = "not test_torch_backend_memory_is_a_panel_not_the_gradient"


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    edits: tuple[tuple[str, str, str], ...]  # (file under forge_megatron/core, exact original text, replacement)


def _one(file: str, original: str, replacement: str, name: str, description: str) -> Mutation:
    return Mutation(name, description, ((file, original, replacement),))


MUTATIONS = [
    # -- the three survivors and two partial misses of issue 27 --
    _one("tiled.py", "        for c0 in range(0, n_in, panel_cols):",
         "        for c0 in range(0, max(1, n_in // panel_cols) * panel_cols, panel_cols):",
         "tiled-column-panels-rounded-down", "the twin's column-panel count rounded down: a partial last panel "
         "is never updated"),
    Mutation("accumulation-keys-ignore-micro-batch", "a bf16 buffer's keys ignore the micro-batch, host and kernel "
             "alike: every micro-batch and data-parallel rank draws the same bits", (
                 ("numerics.py", "    return k1, _lowbias32((k1 ^ 0x68E31DA4) + micro.to(tl.uint32) * 0x9E3779B9)",
                  "    return k1, _lowbias32(k1 ^ 0x68E31DA4)"),
                 ("numerics.py",
                  "    return k1, _lowbias32_int((k1 ^ 0x68E31DA4) + (micro * 0x9E3779B9 & 0xFFFFFFFF))",
                  "    return k1, _lowbias32_int(k1 ^ 0x68E31DA4)"))),
    _one("rules.py", "        p = p * decay + neg_lr * direction", "        p = (p + neg_lr * direction) * decay",
         "lion-decay-after-sign-step", "Lion decays the weight after the sign step, not before (lr^2 wd per step)"),
    _one("numerics.py",
         "    return global_rows[:, None] * placement.global_cols + (cols + placement.col_offset)[None, :]",
         "    return global_rows[:, None] * placement.global_cols + cols[None, :]",
         "twin-global-index-ignores-column-offset", "the torch twin's (and the tests' reference's) global index "
         "ignores a row-parallel shard's column offset"),
    _one("tiled.py", '    return sumsq, per_tile((~(g.abs() < float("inf"))).to(torch.int32))',
         '    return sumsq, per_tile((torch.isnan(g) | (g == float("inf"))).to(torch.int32))',
         "twin-nonfinite-count-misses-minus-inf", "the twin's non-finite count misses -inf (the tile updates)"),
    # -- tiling --
    _one("tiled.py", "    for r0 in range(0, n_out, panel_rows):",
         "    for r0 in range(0, max(1, n_out // panel_rows) * panel_rows, panel_rows):",
         "tiled-row-panels-rounded-down", "the twin's row-panel count rounded down"),
    _one("tiled.py", "    for t0 in range(0, x_cols.shape[0], TOKEN_CHUNK):",
         "    for t0 in range(0, max(1, x_cols.shape[0] // TOKEN_CHUNK) * TOKEN_CHUNK, TOKEN_CHUNK):",
         "tiled-token-chunks-rounded-down", "the twin's GEMM drops a partial last chunk of tokens"),
    _one("tiled.py",
         "                _epilogue(g[t0:t1, u0:u1], weight, plan, r0 + t0, r0 + t1, c0 + u0, c0 + u1)",
         "                _epilogue(g[t0:t1, u0:u1], weight, plan, r0 + t0, r0 + t1, u0, u1)",
         "tiled-good-tile-ignores-panel-column", "in a panel with a non-finite tile, the good tiles are written "
         "at the panel's column 0"),
    _one("tiled.py", "c0 // bn:c0 // bn + bad.shape[1]] = torch.stack(", "c0 // bm:c0 // bm + bad.shape[1]] = torch.stack(",
         "tiled-by-product-slot-uses-block-m", "the twin's by-product slot of a panel divides its column by block_m"),
    _one("tiled.py", "torch.arange(c0, c0 + raw.shape[1], device=raw.device), plan.placement)",
         "torch.arange(raw.shape[1], device=raw.device), plan.placement)",
         "tiled-buffer-index-ignores-panel-column", "the twin's bf16 buffer keys a panel's elements from its own "
         "column 0"),
    _one("numerics.py", "    return (global_rows.to(tl.uint32)[:, None] * GLOBAL_COLS + (cols + COL_OFFSET).to(tl.uint32)[None, :])",
         "    return (global_rows.to(tl.uint32)[:, None] * GLOBAL_COLS + cols.to(tl.uint32)[None, :])",
         "kernel-global-index-ignores-column-offset", "the kernel's global index ignores the column offset"),
    # -- non-finite gradients --
    _one("kernels.py",
         '    bad = tl.sum(tl.sum((in_bounds & ~(tl.abs(g) < float("inf"))).to(tl.int32), axis=1), axis=0)',
         '    bad = tl.sum(tl.sum((in_bounds & (tl.abs(g) == float("inf"))).to(tl.int32), axis=1), axis=0)',
         "kernel-nonfinite-count-misses-nan", "the kernel's non-finite count misses NaN"),
    _one("kernels.py", "        ok_tile = bad == 0", "        ok_tile = bad >= 0",
         "kernel-bad-tile-updates", "the kernel updates a tile with a non-finite gradient"),
    # -- accumulation --
    _one("kernels.py",
         "            k1, k2 = micro_stream_keys(SEED, WEIGHT_ID, tl.load(coef_ptr + 1).to(tl.uint32), ACC_STREAM, MICRO)",
         "            k1, k2 = stream_keys(SEED, WEIGHT_ID, tl.load(coef_ptr + 1).to(tl.uint32), ACC_STREAM)",
         "kernel-buffer-keys-ignore-micro-batch", "the kernel's bf16 buffer uses the stream's keys without the "
         "micro-batch"),
    _one("tiled.py", "numerics.ACCUMULATION_STREAM,\n                                    plan.micro)",
         "numerics.ACCUMULATION_STREAM,\n                                    0)",
         "twin-buffer-keys-ignore-micro-batch", "the twin's bf16 buffer keys every micro-batch as the first"),
    _one("update.py",
         "plan.micro = accumulate.buffer, accumulate.index if accumulate.micro is None else accumulate.micro",
         "plan.micro = accumulate.buffer, accumulate.index",
         "update-ignores-explicit-micro", "an Accumulation's explicit micro (a data-parallel rank's) is ignored"),
    _one("update.py", "accumulate.index > 0, not (last and apply)", "accumulate.index > 0, not last",
         "update-held-total-not-stored", "the last micro-batch of a norms-only pass does not store the total"),
    _one("update.py", "    if plan.apply:\n        state.step = step", "    if apply:\n        state.step = step",
         "update-step-counted-per-micro-batch", "every micro-batch counts a step, not only the updating one"),
    # -- data-parallel owners --
    _one("param.py", "        micro = self.owner.rank * self.micro_batches + self.backwards",
         "        micro = self.backwards", "owner-gradient-keys-ignore-rank",
         "every data-parallel rank rounds its bf16 gradient with the same bits"),
    _one("owner.py", "        scale = 1.0 / self.size if self.scale is None else self.scale",
         "        scale = 1.0 if self.scale is None else self.scale",
         "owner-sum-not-mean", "the reduce-scatter sums the ranks' gradients instead of averaging them"),
    _one("owner.py", "start=rank * block, stop=(rank + 1) * block,", "start=rank * block, stop=(rank + 1) * block - 1,",
         "owner-block-one-row-short", "an owner's block of rows stops one row short"),
    _one("plan.py", "row_offset=self.row_offset + start + self.row_jump,", "row_offset=self.row_offset + start,",
         "placement-rows-forget-jump", "an owner block past a SwiGLU shard's split forgets the jump"),
    # -- rules (caught only by the independent references: torch.optim, the Lion paper, reference_rules.py) --
    Mutation("adamw-decay-after-step", "AdamW decays the weight after the Adam step, not before", (
        ("rules.py", "    p = p * decay\n    exp_avg = beta1", "    exp_avg = beta1"),
        ("rules.py", "    p = p + neg_step_size * ops.div(exp_avg, denom)",
         "    p = (p + neg_step_size * ops.div(exp_avg, denom)) * decay"))),
    _one("rules.py", "                coefficient_sqrt(bias_correction2), hp[\"eps\"])",
         "                bias_correction2, hp[\"eps\"])",
         "adam-bias-correction2-without-sqrt", "Adam's second bias correction is not square-rooted"),
    _one("rules.py", "momentum * later, 1.0 - hp[\"dampening\"] * later",
         "momentum * later, 1.0 - hp[\"dampening\"]",
         "sgd-first-step-dampened", "SGD dampens the first step's momentum buffer (torch copies the gradient)"),
    _one("rules.py", "            g_weight, buffer_weight = 1.0, momentum", "            g_weight, buffer_weight = 0.0, momentum",
         "sgd-nesterov-drops-gradient", "Nesterov SGD steps along the buffer only"),
    _one("rules.py", "grad_avg_gain = 1.0 - alpha if hp[\"centered\"] else 0.0",
         "grad_avg_gain = alpha if hp[\"centered\"] else 0.0",
         "rmsprop-centered-gain", "centered RMSprop averages the gradient with gain alpha"),
    _one("rules.py", "clr = hp[\"lr\"] / (1.0 + (step - 1) * hp[\"lr_decay\"])",
         "clr = hp[\"lr\"] / (1.0 + step * hp[\"lr_decay\"])",
         "adagrad-lr-decay-one-step-early", "Adagrad's learning-rate decay starts one step early"),
    # -- numerics --
    Mutation("stochastic-rounding-biased", "stochastic rounding draws 15 bits, not 16, host and kernel alike: "
             "biased toward zero", (
                 ("numerics.py", "_NAN_BITS, (xb + (bits & 0xFFFF)) >> 16)", "_NAN_BITS, (xb + (bits & 0x7FFF)) >> 16)"),
                 ("numerics.py", "BF16_NAN, ((xb + (bits & 0xFFFF)) >> 16) & 0xFFFF)",
                  "BF16_NAN, ((xb + (bits & 0x7FFF)) >> 16) & 0xFFFF)"))),
    _one("numerics.py", "_NAN_BITS, (bits + 0x7FFF + lsb) >> 16)", "_NAN_BITS, (bits + 0x8000) >> 16)",
         "round-to-nearest-ties-up", "the kernel's round to nearest breaks ties up, not to even"),
    Mutation("stream-keys-step-stride", "a stream's key mixes step + stream instead of 8 step + stream, host and "
             "kernel alike: streams of neighbouring steps collide", (
                 ("numerics.py", "    return _lowbias32(base + step.to(tl.uint32) * 8 + stream)",
                  "    return _lowbias32(base + step.to(tl.uint32) + stream)"),
                 ("numerics.py", "    k1 = _lowbias32_int(base + 8 * step + stream)",
                  "    k1 = _lowbias32_int(base + step + stream)"))),
    _one("numerics.py", "    uniform = (bits >> 8).float() * (1.0 / 16777216.0)",
         "    uniform = (bits & 0xFFFFFF).float() * (1.0 / 16777216.0)",
         "twin-quantize-low-bits", "the twin's 8-bit quantization draws from the low 24 bits (the kernel's the top)"),
    _one("kernels.py", "        k1, k2 = stream_keys(SEED, WEIGHT_ID, step, 0)",
         "        k1, k2 = stream_keys(SEED, WEIGHT_ID, step, 1)",
         "kernel-weight-uses-first-state-stream", "the kernel rounds the weight with its first state's bits"),
    # -- progressive clipping --
    _one("running_clip.py", "self.estimate + now - self.previous[i], self.estimate)",
         "self.estimate + now, self.estimate)", "progressive-estimate-counts-a-weight-twice",
         "progressive clipping adds an updated weight's new sum without removing its previous one"),
    _one("table.py", "        return sums * self.multipliers.double().square()",
         "        return sums * self.multipliers.double()", "table-weight-sums-unsquared-multiplier",
         "each weight's sum of squares is scaled by its multiplier, not its square"),
]


def check_in_sync(root: Path) -> list[str]:
    """The mutations whose original text does not occur exactly once (the code changed)."""
    problems = []
    for m in MUTATIONS:
        for file, original, _ in m.edits:
            count = (root / "forge_megatron" / "core" / file).read_text().count(original)
            if count != 1:
                problems.append(f"{m.name}: {file} holds the original text {count} times: {original.strip()!r}")
    return problems


def scratch_copy() -> Path:
    """A copy of the checkout's tracked and unignored files (uncommitted changes included)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    scratch = Path(tempfile.mkdtemp(prefix="forge-mutation-"))
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, scratch / name)
    return scratch


def run_tests(scratch: Path, tests: list[str], seed: int, timeout: int) -> tuple[str | None, float]:
    """(the first failing test, or None if all passed; seconds)."""
    env = dict(os.environ, PYTHONPATH=str(scratch), FORGE_TEST_SEED=str(seed), HYPOTHESIS_PROFILE="ci",
               PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode of a same-size edit within a second
    env.pop("FORGE_BACKEND", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", DESELECT, *tests]
    start = time.monotonic()
    try:
        out = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"(timed out after {timeout} s)", time.monotonic() - start
    elapsed = time.monotonic() - start
    if out.returncode == 0:
        return None, elapsed
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.MULTILINE)
    return (failed[0] if failed else f"(pytest exit {out.returncode}: {out.stdout[-300:]!r})"), elapsed


def plant(scratch: Path, m: Mutation) -> dict[Path, str]:
    """Apply `m`'s edits; returns the original text of each file edited."""
    saved = {}
    for file, original, replacement in m.edits:
        path = scratch / "forge_megatron" / "core" / file
        saved.setdefault(path, path.read_text())
        path.write_text(path.read_text().replace(original, replacement, 1))
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated tests first")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="test files or node ids (default: the fast core tests)")
    parser.add_argument("--seed", type=int, default=0, help="FORGE_TEST_SEED for the tests' random inputs")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per run of the tests")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.description} ({', '.join(sorted({f for f, _, _ in m.edits}))})")
        return 0
    problems = check_in_sync(ROOT)
    if problems:
        print("mutation_check: these mutations no longer match forge_megatron/core; update them:", *problems, sep="\n  ")
        return 2
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"mutation_check: unknown mutation(s) {sorted(unknown)}; see --list")
        return 2
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    scratch = scratch_copy()
    print(f"scratch copy: {scratch}", flush=True)
    try:
        if not args.skip_baseline:
            failed, seconds = run_tests(scratch, args.tests, args.seed, args.timeout)
            if failed:
                print(f"baseline: the unmutated tests fail ({failed}); fix that first")
                return 2
            print(f"baseline: the unmutated tests pass ({seconds:.0f} s)", flush=True)
        survivors = []
        for i, m in enumerate(chosen, 1):
            saved = plant(scratch, m)
            try:
                failed, seconds = run_tests(scratch, args.tests, args.seed, args.timeout)
            finally:
                for path, text in saved.items():
                    path.write_text(text)
            verdict = f"killed by {failed}" if failed else "SURVIVED"
            print(f"[{i}/{len(chosen)}] {m.name}: {verdict} ({seconds:.0f} s)", flush=True)
            if not failed:
                survivors.append(m.name)
        print(f"\nmutation score: {len(chosen) - len(survivors)}/{len(chosen)} killed"
              + (f"; survived: {', '.join(survivors)}" if survivors else ""))
        return 1 if survivors else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
