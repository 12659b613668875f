"""The fused kernel compiled for Hopper (sm_90a) on any machine, as a launch compiles it, for every
rule in every precision regime with its default tile config: ptxas's registers and spills, shared
memory, whether the GEMM loop is software-pipelined (cp.async) and uses wgmma, the epilogue's
fused multiply-adds (must be 0) and correctly rounded division/sqrt. Prints JSON (the last line;
tests/test_compile.py reads it) and, with --table, the markdown table of docs/performance.md.

    env -u TRITON_INTERPRET .venv/bin/python scripts/compile_report.py --table [--out bench/results/compile_sm90.json]
    env -u TRITON_INTERPRET .venv/bin/python scripts/compile_report.py --space bench/results/compile_sm90_space_triton3.8.json

Under the device's Triton (a scratch venv, scripts/triton_venv.sh 3.6) the same commands write the
reports named for that version (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from forge_megatron.core import kernels, plan, rules

REGIMES = [  # (activation dtype, weight store, state format): every precision regime
    (torch.float32, plan.WEIGHT_FP32, "fp32"), (torch.bfloat16, plan.WEIGHT_MASTER, "fp32"),
    (torch.bfloat16, plan.WEIGHT_SR, "fp32"), (torch.bfloat16, plan.WEIGHT_SR, "bf16"),
    (torch.bfloat16, plan.WEIGHT_SR, "int8"), (torch.bfloat16, plan.WEIGHT_MASTER, "int8"),
]
FORMATS = {"fp32": plan.STATE_FP32, "bf16": plan.STATE_BF16, "int8": plan.STATE_INT8}
STORES = {plan.WEIGHT_FP32: "fp32", plan.WEIGHT_MASTER: "master", plan.WEIGHT_SR: "sr"}


def fmas(compiled) -> int:
    return compiled.asm["ptx"].count("fma.rn.f32")


def report() -> list[dict]:
    """One record per (rule, regime), then the control: AdamW compiled with FMA contraction on."""
    norms_only = {}  # (dtype, config): the kernel without its epilogue (the GEMM's own FMAs, if any)
    out = []
    adamw = rules.get_rule("adamw")
    for name in rules.registered_rules():
        rule = rules.get_rule(name)
        for dtype, store, states in REGIMES:
            config = plan.default_config(torch.device("cuda"), dtype, states)
            compiled, resources, specialized = kernels.compile_for_target(rule, dtype, config, arch=90,
                                                                          weight_store=store,
                                                                          state_format=FORMATS[states])
            if (dtype, config) not in norms_only:
                norms_only[(dtype, config)] = fmas(kernels.compile_for_target(adamw, dtype, config, arch=90,
                                                                              apply=False, weight_store=store)[0])
            ptx = compiled.asm["ptx"]
            out.append(dict(rule=name, dtype=str(dtype), store=STORES[store], states=states, config=repr(config),
                            **resources, shared_bytes=compiled.metadata.shared, cp_async="cp.async" in ptx,
                            wgmma="wgmma.mma_async" in ptx, div_full="div.full.f32" in ptx,
                            sqrt_approx="sqrt.approx" in ptx, cubin_bytes=len(compiled.asm["cubin"]),
                            epilogue_fmas=fmas(compiled) - norms_only[(dtype, config)], **specialized))
    config = plan.default_config(torch.device("cuda"), torch.bfloat16, "fp32")
    fused = kernels.compile_for_target(adamw, torch.bfloat16, config, weight_store=plan.WEIGHT_SR, fp_fusion=True)[0]
    out.append(dict(rule="adamw with FMA contraction on (the check's control)",
                    epilogue_fmas=fmas(fused) - norms_only[(torch.bfloat16, config)]))
    return out


SPACE_REGIMES = {"bf16": [(plan.WEIGHT_MASTER, "fp32"), (plan.WEIGHT_SR, "fp32"), (plan.WEIGHT_SR, "bf16")],
                 "bf16-int8": [(plan.WEIGHT_SR, "int8"), (plan.WEIGHT_MASTER, "int8")]}


def _space_record(job) -> dict:
    key, config, store, states = job
    compiled, resources, _ = kernels.compile_for_target(rules.get_rule("adamw"), torch.bfloat16, config, arch=90,
                                                        weight_store=store, state_format=FORMATS[states])
    return dict(space=key, config=repr(config), store=STORES[store], states=states, **resources,
                shared_bytes=compiled.metadata.shared, wgmma="wgmma.mma_async" in compiled.asm["ptx"])


def space_report(workers: int) -> list[dict]:
    """AdamW compiled with every config of plan.TILE_SPACE in each regime it serves (in parallel)."""
    import concurrent.futures

    jobs = [(key, config, store, states) for key, configs in plan.TILE_SPACE.items() for config in configs
            for store, states in SPACE_REGIMES[key]]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_space_record, jobs))


def table(records: list[dict]) -> str:
    lines = ["| activations, weights, states | config | registers (min–max over rules) | shared KB | spills |",
             "| --- | --- | --- | --- | --- |"]
    groups = {}
    for r in records[:-1]:
        groups.setdefault((r["dtype"].removeprefix("torch."), r["store"], r["states"], r["config"]), []).append(r)
    for (dtype, store, states, config), rs in groups.items():
        regs = sorted(r["registers"] for r in rs)
        spills = max(r["spill_stores"] + r["spill_loads"] for r in rs)
        lines.append(f"| {dtype}, {store}, {states} | {config} | {regs[0]}–{regs[-1]} | "
                     f"{max(r['shared_bytes'] for r in rs) / 1024:.0f} | {spills} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="also print the markdown table")
    parser.add_argument("--out", default=None, help="write the records as JSON here")
    parser.add_argument("--space", default=None, metavar="PATH",
                        help="instead: compile plan.TILE_SPACE (AdamW, every config and regime) and write it here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles for --space")
    args = parser.parse_args(argv)
    if args.space:
        records = space_report(args.workers)
        os.makedirs(os.path.dirname(os.path.abspath(args.space)), exist_ok=True)
        with open(args.space, "w") as f:
            json.dump({"target": "sm_90a", "triton": __import__("triton").__version__, "space": records}, f, indent=1)
        print(json.dumps(records))
        return
    records = report()
    if args.table:
        print(table(records))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"target": "sm_90a", "triton": __import__("triton").__version__, "records": records}, f, indent=1)
    print(json.dumps(records))


if __name__ == "__main__":
    main()
