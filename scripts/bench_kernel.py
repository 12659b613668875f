"""Kernel benchmark: FORGE's fused weight-gradient + optimizer step against the unfused step.

For each Llama-3 8B linear shape (whole, and one TP=8 shard) and token count, side by side in one
run, medians of triton.testing.do_bench after warm-up:

  baseline  cuBLAS wgrad (bf16 in, fp32 gradient) + torch.optim.AdamW(fused=True) on the fp32
            master + the master copied into the bf16 weight (what Megatron does per weight);
  foreach   the same with AdamW(foreach=True);
  forge-*   FORGE's fused step in each regime (master, sr, sr + int8 states);
  peers     bitsandbytes AdamW8bit, FlashOptim's FlashAdamW (24-bit master, 8-bit states) and
            torchao AdamW8bit / AdamW with bf16 stochastic rounding (bf16 weights, their own state
            formats) after the same cuBLAS wgrad, where installed (all need CUDA).

Also measured in the same run: a device-to-device copy (the bandwidth ceiling) and torch.matmul on
the same GEMM (the TFLOP/s ceiling). Every FORGE time is reported against both: achieved bandwidth
over the bytes the step must move (x and dy read once, weight/master/states read and written), and
GEMM TFLOP/s. Peak memory above the inputs is read with torch.cuda.max_memory_allocated
(LiveTensorMemory's exact tensor bytes on CPU).

    python scripts/bench_kernel.py --out bench/results/kernel_h100.json        # on a GPU
    python scripts/bench_kernel.py --smoke                                      # tiny shapes, any device
"""

from __future__ import annotations

import argparse

import torch

from forge_megatron import ForgeState, fused_update
from forge_megatron.tools.benchmarking import bench, device_name, peak_bytes, write_report

SHAPES = {  # name -> (out, in) of the weight
    "llama8b": {"qkv": (6144, 4096), "proj": (4096, 4096), "fc1": (28672, 4096), "fc2": (4096, 14336)},
    "llama8b-tp8": {"qkv": (768, 4096), "proj": (4096, 512), "fc1": (3584, 4096), "fc2": (4096, 1792)},
    "smoke": {"fc": (96, 80)},
}
TOKENS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
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


def run_case(shape, tokens, device, ceiling) -> dict:
    n_out, n_in = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, n_in, device=device, generator=gen).to(torch.bfloat16)
    dy = torch.randn(tokens, n_out, device=device, generator=gen).to(torch.bfloat16) * 1e-3
    flops = 2 * n_out * n_in * tokens
    out = {"out": n_out, "in": n_in, "tokens": tokens, "flops": flops}
    out["matmul_ms"] = bench(lambda: torch.mm(dy.t(), x), device)
    out["matmul_TFLOPs"] = flops / out["matmul_ms"] / 1e9

    weight = torch.randn(n_out, n_in, device=device).to(torch.bfloat16)
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
        step = lambda w=w, state=state: fused_update(x, dy, w, state)  # noqa: E731
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

    for name, make in peers(weight).items():
        try:
            w = weight.clone().requires_grad_(True)
            step = peer_step(w, make(w), dy, x)
            step()
            out[f"{name}_ms"] = bench(step, device)
            out[f"{name}_peak_bytes"] = peak_bytes(step, device)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            out[f"{name}_error"] = repr(err)[:200]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["llama8b-tp8", "llama8b"], choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and token counts, any device")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, tokens = (["smoke"], [16, 40]) if args.smoke else (args.shapes, args.tokens)
    ceiling = ceilings(device, args.smoke)
    report = {"device": device_name(device), "torch": torch.__version__, "triton": __import__("triton").__version__,
              "timer": "triton.testing.do_bench median" if device.type == "cuda" else "wall clock (smoke)",
              "ceilings": ceiling, "cases": []}
    for family in shapes:
        for layer, shape in SHAPES[family].items():
            for t in tokens:
                case = {"family": family, "layer": layer, **run_case(shape, t, device, ceiling)}
                report["cases"].append(case)
                print(f"{family:12s} {layer:5s} T={t:6d}  baseline {case['baseline_ms']:8.3f} ms  "
                      f"forge-master {case['forge-master_ms']:8.3f} ms  x{case['forge-master_speedup_vs_baseline']:.2f}  "
                      f"{100 * case['forge-master_fraction_of_copy_bw']:.0f}% of copy bw  "
                      f"{100 * case['forge-master_fraction_of_matmul']:.0f}% of matmul", flush=True)
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
