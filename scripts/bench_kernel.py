"""Kernel benchmark: FORGE's fused weight-gradient + optimizer step against the unfused step.

For each Llama-3 8B linear shape (whole, and one TP=8 shard) and token count, side by side in one
run, medians of triton.testing.do_bench after warm-up (wall clock on CPU, where the numbers only
show that the code runs):

  baseline  cuBLAS wgrad (bf16 in, fp32 gradient) + torch.optim.AdamW(fused=True) on the fp32
            master + the master copied into the bf16 weight (what Megatron does per weight);
  foreach   the same with AdamW(foreach=True);
  forge-*   FORGE's fused step in each regime (master, sr, sr + int8 states), timed as training
            runs it: the weight bound to a StepTable whose row is on the device, so that a step is
            one kernel launch with nothing copied or synchronized around it (the table's per-step
            write serves every weight of a model at once and is not in these times);
  peers     (--peers) bitsandbytes AdamW8bit, FlashOptim's FlashAdamW and torchao AdamW8bit /
            AdamW with bf16 stochastic rounding after the same cuBLAS wgrad, where installed
            (scripts/fetch_gpu_wheels.sh pins them; torch's compile cache is reset per case, so
            torchao's per-shape recompiles never fall back to eager).

Also measured in the same run: a device-to-device copy (the bandwidth ceiling) and torch.matmul on
the same GEMM (the TFLOP/s ceiling). Every FORGE time is reported against both: achieved bandwidth
over the bytes the step must move (x and dy read once, weight/master/states read and written), and
GEMM TFLOP/s. Peak memory above the inputs is torch.cuda.max_memory_allocated (LiveTensorMemory's
exact tensor bytes on CPU). `--sweep` then times each regime's tile configs (plan.TILE_SPACE) at a
few shapes, so that the run also says which config wins.

The report is written after every case (a run stopped at any moment has returned what it
measured), and `--budget-s` stops starting new cases once that many seconds have passed.

    python scripts/bench_kernel.py --sweep --budget-s 180 --out bench/results/kernel_h200.json   # on a GPU
    python scripts/bench_kernel.py --smoke                                                        # tiny, any device
"""

from __future__ import annotations

import argparse
import time

import torch

from forge_megatron import ForgeState, fused_update
from forge_megatron.core.plan import TILE_SPACE, TileConfig, tile_space_key
from forge_megatron.core.table import StepTable
from forge_megatron.core.update import step_tiles
from forge_megatron.tools.benchmarking import CaseReport, bench, environment, peak_bytes

SHAPES = {  # name -> (out, in) of the weight
    "llama8b": {"qkv": (6144, 4096), "proj": (4096, 4096), "fc1": (28672, 4096), "fc2": (4096, 14336)},
    "llama8b-tp8": {"qkv": (768, 4096), "proj": (4096, 512), "fc1": (3584, 4096), "fc2": (4096, 1792)},
    "smoke": {"fc": (96, 80)},
}
TOKENS = (2048, 512, 16384, 8192)  # the goals' token counts, the most telling first
SWEEP = {"llama8b": ("fc1",), "llama8b-tp8": ("qkv",)}  # the shapes the tile configs are swept at
SWEEP_TOKENS = (512, 16384)
REGIMES = {"forge-master": ("master", "fp32"), "forge-sr": ("sr", "fp32"), "forge-sr-int8": ("sr", "int8")}
STATE_BYTES = {"fp32": 8, "int8": 2 * (1 + 4 / 32)}


def step_bytes_per_parameter(store: str, state_dtype: str) -> float:
    """Bytes FORGE's step must move per weight element: the master store reads and writes the fp32
    master and writes the bf16 weight; the others read and write the bf16 weight; both read and
    write the two states (docs/performance.md)."""
    weight = 4 + 4 + 2 if store == "master" else 2 + 2
    return weight + 2 * STATE_BYTES[state_dtype]


def ceilings(device, smoke: bool) -> dict:
    n = (1 << 20) if smoke else (1 << 29)  # 1 GiB of bf16 on a GPU
    src = torch.randn(n, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return {"copy_bytes": 2 * src.numel() * 2, "copy_ms": ms, "copy_GBps": 2 * src.numel() * 2 / ms / 1e6}


def wgrad(dy, x):
    """cuBLAS wgrad with an fp32 result (bf16 operands, fp32 accumulation)."""
    if dy.is_cuda:
        return torch.mm(dy.t(), x, out_dtype=torch.float32)
    return torch.mm(dy.t(), x).float()  # CPU (smoke): no mixed-dtype mm


def unfused(weight, master, optimizer, dy, x):
    def step():
        master.grad = wgrad(dy, x)
        optimizer.step()
        with torch.no_grad():
            weight.copy_(master)
    return step


def forge_step(x, dy, weight, state: ForgeState, config: TileConfig | None = None):
    """FORGE's step as training runs it: bound to a StepTable row written once on the device, so
    that each call is the kernel launch alone (the step count in the row stays that of the first
    step: the same work)."""
    table = StepTable([state], [step_tiles(weight, state, config=config)], weight.device)
    table.write(1.0)
    slots = table.slots[0]
    return lambda: fused_update(x, dy, weight, state, slots=slots, config=config)


def peer_step(weight, optimizer, dy, x):
    def step():
        weight.grad = torch.mm(dy.t(), x)
        optimizer.step()
    return step


def peers(weight) -> dict:
    """Memory-lean optimizers a user would pick instead, where installed: name -> optimizer."""
    out = {}
    try:
        import bitsandbytes

        out["bnb-adamw8bit"] = lambda p: bitsandbytes.optim.AdamW8bit([p], lr=1e-4)
    except Exception:  # not installed, or no CUDA build
        pass
    try:
        import flashoptim

        # bf16 weight + 8-bit error-correction bits (24-bit master), 8-bit states, fused Triton step
        out["flashoptim-adamw"] = lambda p: flashoptim.FlashAdamW([p], lr=1e-4)
    except Exception:
        pass
    try:
        import torchao.optim

        out["torchao-adamw8bit-sr"] = lambda p: torchao.optim.AdamW8bit([p], lr=1e-4, bf16_stochastic_round=True)
        out["torchao-adamw-sr"] = lambda p: torchao.optim._AdamW([p], lr=1e-4, bf16_stochastic_round=True)
    except Exception:
        pass
    return out


def inputs(shape, tokens, device):
    gen = torch.Generator(device=device).manual_seed(0)
    n_out, n_in = shape
    x = torch.randn(tokens, n_in, device=device, generator=gen).to(torch.bfloat16)
    dy = torch.randn(tokens, n_out, device=device, generator=gen).to(torch.bfloat16) * 1e-3
    weight = torch.randn(n_out, n_in, device=device, generator=gen).to(torch.bfloat16)
    return x, dy, weight


def run_case(shape, tokens, device, ceiling, with_peers: bool = False) -> dict:
    n_out, n_in = shape
    x, dy, weight = inputs(shape, tokens, device)
    flops = 2 * n_out * n_in * tokens
    out = {"out": n_out, "in": n_in, "tokens": tokens, "flops": flops}
    out["matmul_ms"] = bench(lambda: torch.mm(dy.t(), x), device)
    out["matmul_TFLOPs"] = flops / out["matmul_ms"] / 1e9

    for name, kwargs in (("baseline", {"fused": True}), ("foreach", {"foreach": True})):
        master = weight.float().requires_grad_(True)
        optimizer = torch.optim.AdamW([master], lr=1e-4, **kwargs)
        step = unfused(weight, master, optimizer, dy, x)
        step()
        out[f"{name}_ms"] = bench(step, device)
        out[f"{name}_peak_bytes"] = peak_bytes(step, device)
        del master, optimizer

    io_bytes = tokens * (n_in + n_out) * 2
    for name, (store, state_dtype) in REGIMES.items():
        w = weight.clone()
        state = ForgeState(w, "adamw", weight_store=store, state_dtype=state_dtype, lr=1e-4)
        moved = io_bytes + n_out * n_in * step_bytes_per_parameter(store, state_dtype)
        step = forge_step(x, dy, w, state)
        step()
        ms = bench(step, device)
        out[f"{name}_ms"] = ms
        out[f"{name}_peak_bytes"] = peak_bytes(step, device)
        out[f"{name}_speedup_vs_baseline"] = out["baseline_ms"] / ms
        out[f"{name}_speedup_vs_foreach"] = out["foreach_ms"] / ms
        out[f"{name}_GBps"] = moved / ms / 1e6
        out[f"{name}_fraction_of_copy_bw"] = out[f"{name}_GBps"] / ceiling["copy_GBps"]
        out[f"{name}_TFLOPs"] = flops / ms / 1e9
        out[f"{name}_fraction_of_matmul"] = out[f"{name}_TFLOPs"] / out["matmul_TFLOPs"]
        del w, state

    for name, make in (peers(weight) if with_peers else {}).items():
        torch._dynamo.reset()  # torchao compiles per shape: a fresh cache per case, never eager fallback
        try:
            w = weight.clone().requires_grad_(True)
            step = peer_step(w, make(w), dy, x)
            step()
            out[f"{name}_ms"] = bench(step, device)
            out[f"{name}_peak_bytes"] = peak_bytes(step, device)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            out[f"{name}_error"] = repr(err)[:200]
    return out


def sweep_case(shape, tokens, regime: str, configs, device) -> dict:
    """One regime's tile configs at one shape: each config's median time (a config that fails to
    compile or launch is reported with its error)."""
    store, state_dtype = REGIMES[regime]
    x, dy, weight = inputs(shape, tokens, device)
    out = {"out": shape[0], "in": shape[1], "tokens": tokens, "regime": regime, "configs": {}}
    for config in configs:
        w = weight.clone()
        state = ForgeState(w, "adamw", weight_store=store, state_dtype=state_dtype, lr=1e-4)
        try:
            step = forge_step(x, dy, w, state, config)
            step()
            out["configs"][repr(config)] = bench(step, device)
        except Exception as err:
            out["configs"][repr(config)] = repr(err)[:200]
        del w, state
    times = {k: v for k, v in out["configs"].items() if isinstance(v, float)}
    out["fastest"] = min(times, key=times.get) if times else None
    return out


def sweep_configs(regime: str) -> tuple[TileConfig, ...]:
    store, state_dtype = REGIMES[regime]
    return TILE_SPACE[tile_space_key(torch.bfloat16, state_dtype)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["llama8b", "llama8b-tp8"], choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one token count and two tile configs per regime, any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sweep", action="store_true", help="also time each regime's tile configs (plan.TILE_SPACE)")
    parser.add_argument("--peers", action="store_true", help="also time bitsandbytes, FlashOptim, torchao (installed)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    shapes, tokens = (["smoke"], [16]) if args.smoke else (args.shapes, args.tokens)
    ceiling = ceilings(device, args.smoke)
    report = CaseReport(args.out, {**environment(device), "ceilings": ceiling, "part": "kernel"})
    main_cases = [("case", family, layer, t) for t in tokens for family in shapes for layer in SHAPES[family]]
    sweep_cases = []
    if args.sweep:
        sweep = {"smoke": ("fc",)} if args.smoke else SWEEP
        sweep_cases = [("sweep", family, layer, t, regime) for t in (tokens if args.smoke else SWEEP_TOKENS)
                       for family in shapes for layer in sweep.get(family, ()) for regime in REGIMES]
    # the first two token counts, then the sweep, then the rest: a short budget keeps the most telling
    first = sum(1 for case in main_cases if case[3] in tokens[:2])
    cases = main_cases[:first] + sweep_cases + main_cases[first:]
    stopped = None
    for kind, family, layer, t, *regime in cases:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            stopped = f"budget of {args.budget_s:.0f} s spent; {len(cases) - len(report.report['cases'])} cases left"
            break
        try:
            case, line = measure_case(kind, family, layer, t, regime, device, ceiling, args.peers,
                                      2 if args.smoke else None)
        except Exception as error:  # noqa: BLE001 - one failing case must not cost the others
            case, line = {"family": family, "layer": layer, "tokens": t, "error": repr(error)[-1500:]}, \
                f"{family} {layer} T={t}: ERROR {error!r}"[:300]
        report.add({"kind": kind, **case}, line)
    return report.finish(stopped=stopped, seconds=time.monotonic() - start)


def measure_case(kind, family, layer, t, regime, device, ceiling, with_peers, configs: int | None = None
                 ) -> tuple[dict, str]:
    """One case of the run (kind "case": the comparison; "sweep": the first `configs` tile configs,
    all by default) and its line."""
    shape = SHAPES[family][layer]
    if kind == "sweep":
        case = {"family": family, "layer": layer,
                **sweep_case(shape, t, regime[0], sweep_configs(regime[0])[:configs], device)}
        return case, f"sweep {family:12s} {layer:5s} T={t:6d} {regime[0]:14s} fastest {case['fastest']}"
    case = {"family": family, "layer": layer, **run_case(shape, t, device, ceiling, with_peers)}
    line = (f"{family:12s} {layer:5s} T={t:6d}  baseline {case['baseline_ms']:8.3f} ms  " + "  ".join(
        f"{name.removeprefix('forge-')} x{case[f'{name}_speedup_vs_baseline']:.2f}" for name in REGIMES)
        + f"  master {100 * case['forge-master_fraction_of_copy_bw']:.0f}% of copy bw, "
        f"{100 * case['forge-master_fraction_of_matmul']:.0f}% of matmul")
    return case, line


if __name__ == "__main__":
    main()
