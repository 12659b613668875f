"""The device plan: what FORGE measures and checks on a GPU, in parts that each fit a short device
call and write their JSON case by case (a part stopped at any moment has returned every case it
finished; see docs/performance.md for the command lines and time limits).

  smoke    the fused kernel against the unfused reference (tests/helpers.reference_step) on the
           device, for every rule x precision regime at three shapes (two ragged, one Llama-8B
           TP=8 qkv shard at 4096 tokens), two steps each (the second from non-zero state, with a
           gradient scale): weight and state bits, the gradient against float64 within the fp32
           accumulation bound gamma_T = T u / (1 - T u) (elementwise, relative to |dy|^T |x|: TF32
           or a short wgmma accumulator breaks it), NaN from a finite gradient (centered RMSprop,
           eps = 0: the GPU's canonical NaN) stays NaN in every weight store, and (CUDA only) a
           CUDA graph of the table's advance and two covered layers' forward and backward,
           replayed, equals eager steps. The kernels compile ahead in parallel.
  kernel   scripts/bench_kernel.py: FORGE vs cuBLAS wgrad + fused AdamW + master copy at Llama-3 8B
           TP=1 and TP=8 shapes and 2k, 512, 16k, 8k tokens, the copy and matmul ceilings in the same
           run, and the tile-config sweep (plan.TILE_SPACE) after the first two token counts.
  layer    scripts/bench_layer.py: one Llama-8B TP=8 transformer layer's backward + step, FORGE vs
           Megatron's DDP + optimizer (needs megatron-core), gradients checked against the
           standard layer's.
  memory   scripts/bench_memory.py, bounded: measured peak against the memory model, and the
           model's largest micro-batch tried (needs megatron-core).
  e2e      scripts/bench_e2e.py, bounded: a ~1B GPT's iteration time and peak memory (needs
           megatron-core; the standard baseline there has no Transformer Engine or Apex).
  tests    a short, explicit list of tests (GPU_TESTS) that compiles a bounded number of kernels.

Each part stops starting new cases when its budget (BUDGETS, or --budget-s) is spent. On CPU
(`--device cpu`) every part runs the same code on tiny shapes (the dry run CI runs: Triton
interpreted where the part uses the kernel).

    python scripts/device_plan.py smoke --out "$OUT"              # on the GPU machine (scripts/device_plan.sh)
    python scripts/device_plan.py smoke --device cpu --out /tmp/plan   # dry run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("TRITON_INTERPRET") is None and "--device" in sys.argv and "cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # the dry run interprets the kernel: set before Triton loads
sys.path[:0] = [os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")]

import torch  # noqa: E402

BUDGETS = {"smoke": 60, "kernel": 140, "layer": 60, "memory": 100, "e2e": 100, "tests": 60}  # seconds
GPU_TESTS = ["tests/test_numerics.py", "tests/test_muon.py", "tests/test_capture.py", "tests/test_launches.py"]
SMOKE_SHAPES = {"cuda": [(130, 100, 37), (333, 205, 1030), (768, 4096, 4096)], "cpu": [(70, 40, 9)]}
SMOKE_RULES = {"adamw": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6},
               "adam": {"lr": 1e-2, "weight_decay": 0.05}, "lion": {"lr": 1e-3, "weight_decay": 0.1},
               "sgd": {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
               "rmsprop": {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.01},
               "adagrad": {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}}
NAN_RULE = {"lr": 1e-2, "centered": True, "eps": 0.0}  # centered RMSprop without eps: NaN from a negative variance
GRAPH_RULE = {"lr": 1e-2, "weight_decay": 0.1}
REGIMES = [  # (activation dtype, weight store, state dtype): compile_report.py's
    ("float32", "master", "fp32"), ("bfloat16", "master", "fp32"), ("bfloat16", "sr", "fp32"),
    ("bfloat16", "sr", "bf16"), ("bfloat16", "sr", "int8"), ("bfloat16", "master", "int8")]


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def spent(self) -> bool:
        return time.monotonic() - self.start > self.seconds

    def left(self) -> float:
        return max(0.0, self.seconds - (time.monotonic() - self.start))


# -- smoke ---------------------------------------------------------------------------------------


def _compile_ahead(variant):
    """One kernel variant compiled into Triton's cache (a worker process: no CUDA needed)."""
    from forge_megatron.core import kernels, plan, rules

    rule, hp, dtype, store, states, shape, tokens, config, materialize = variant
    stores = {"master": plan.WEIGHT_MASTER, "sr": plan.WEIGHT_SR}
    formats = {"fp32": plan.STATE_FP32, "bf16": plan.STATE_BF16, "int8": plan.STATE_INT8}
    dtype = getattr(torch, dtype)
    config = config or plan.default_config(torch.device("cuda"), dtype, states)
    start = time.monotonic()
    try:
        kernels.compile_for_target(rules.get_rule(rule), dtype, config, weight_store=plan.WEIGHT_FP32 if dtype ==
                                   torch.float32 else stores[store], state_format=formats[states], shape=shape,
                                   tokens=tokens, materialize=materialize, hyperparameters=hp)
        return None, time.monotonic() - start
    except Exception as error:  # reported; the launch then compiles it itself
        return repr(error)[:300], time.monotonic() - start


def compile_ahead(variants, budget: Budget) -> dict:
    """Compile the variants a part will launch, in parallel worker processes, into Triton's cache,
    where each launch finds its kernel (kernels.compile_for_target specializes as a launch does)."""
    if not variants:
        return {"variants": 0}
    start = time.monotonic()
    workers = min(len(variants), os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    errors, seconds = [], []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_compile_ahead, v) for v in variants]
        done, _ = concurrent.futures.wait(futures, timeout=max(1.0, budget.left() - 5))
        for future in done:
            error, s = future.result()
            seconds.append(s)
            if error:
                errors.append(error)
        for future in futures:
            future.cancel()
    return {"variants": len(variants), "compiled": len(seconds), "workers": workers, "errors": errors[:5],
            "seconds": time.monotonic() - start, "max_variant_s": max(seconds, default=None)}


def _fraction_equal(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach(), expected.detach().to(actual.dtype)
    same = (a == e) | (torch.isnan(a.float()) & torch.isnan(e.float()))
    return float(same.float().mean())


def smoke_case(shape, rule, hp, regime, device, gen) -> dict:
    """Two fused steps (the second from the first's state, with grad scale 0.5) against the
    unfused reference from the materialized gradient, and the gradient against float64."""
    from helpers import reference_step, snapshot

    from forge_megatron import ForgeState, fused_update

    n_out, n_in, tokens = shape
    dtype, store, states = regime
    dtype = getattr(torch, dtype)
    case = {"shape": [n_out, n_in], "tokens": tokens, "rule": rule, "activations": str(dtype).removeprefix("torch."),
            "store": store, "states": states}
    weight = torch.randn(n_out, n_in, generator=gen).to(device=device, dtype=dtype)
    try:
        state = ForgeState(weight, rule, weight_store=store, state_dtype=states, seed=5, weight_id=3, **hp)
    except (ValueError, TypeError) as refusal:  # e.g. int8 states of a rule that starts a state away from 0
        return {**case, "refused": str(refusal)}
    worst = {"weight": 1.0, "states": 1.0}
    for step, scale in ((1, 1.0), (2, 0.5)):
        x = torch.randn(tokens, n_in, generator=gen).to(device=device, dtype=dtype)
        dy = torch.randn(tokens, n_out, generator=gen).to(device=device, dtype=dtype)
        w0, s0 = snapshot(weight, state)
        start = time.monotonic()
        result = fused_update(x, dy, weight, state, grad_scale=scale, materialize=True, backend="triton")
        if device.type == "cuda":
            torch.cuda.synchronize()
        case[f"step{step}_first_call_s"] = time.monotonic() - start
        expected_w, expected_s = reference_step(w0, s0, state, result.grad, step)
        worst["weight"] = min(worst["weight"], _fraction_equal(weight, expected_w))
        for name, tensor in expected_s.items():
            worst["states"] = min(worst["states"], _fraction_equal(state.named_tensors()[name], tensor))
    exact = (x.double().t() @ dy.double()).t() * scale  # the last step's gradient in float64
    magnitude = (dy.double().abs().t() @ x.double().abs()) * scale
    unit = 2.0**-24
    gamma = tokens * unit / (1 - tokens * unit)
    error = (result.grad.double() - exact).abs()
    case.update(weight_bits_equal=worst["weight"], state_bits_equal=worst["states"],
                gradient_bound_ratio=float((error / (gamma * magnitude + 1e-300)).max()),
                gradient_relative_error=float(error.norm() / exact.norm()))
    case["ok"] = worst["weight"] == 1.0 and worst["states"] == 1.0 and case["gradient_bound_ratio"] <= 1.0
    return case


def nan_case(regime, device, gen) -> dict:
    """Centered RMSprop with eps = 0 and a state whose variance goes negative: the rule makes NaN
    from a finite gradient (on a GPU, its canonical 0x7FFFFFFF); the stored weight must be NaN
    there (it once rounded to -0.0), and nowhere else."""
    from forge_megatron import ForgeState, fused_update

    dtype, store, states = regime
    weight = torch.randn(64, 64, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    try:
        state = ForgeState(weight, "rmsprop", weight_store=store, state_dtype=states, **NAN_RULE)
    except (ValueError, TypeError) as refusal:
        return {"nan": True, "store": store, "states": states, "refused": str(refusal)}
    # grad_avg = 1 (the signed code table's top value, 255, times scale 1) over square_avg = 0 in the
    # first 8 rows: the new variance is negative there
    state.tensors["grad_avg"][:8].fill_(255 if states == "int8" else 1.0)
    x, dy = (torch.randn(16, 64, generator=gen).to(device=device, dtype=weight.dtype) * 1e-3 for _ in range(2))
    fused_update(x, dy, weight, state, backend="triton")
    nan_rows = torch.isnan(weight.float()).any(dim=1)
    negative_zero = (weight.float() == 0) & (torch.signbit(weight.float()))
    master_nan = torch.isnan(state.master).any(dim=1) if state.master is not None else None
    ok = (bool(nan_rows[:8].all()) and not bool(nan_rows[8:].any()) and not bool(negative_zero[:8].any())
          and (master_nan is None or torch.equal(master_nan, nan_rows)))
    return {"nan": True, "store": store, "states": states, "activations": dtype,
            "nan_rows": int(nan_rows.sum()), "negative_zeros_in_nan_rows": int(negative_zero[:8].sum()), "ok": ok}


def graph_case(device, gen) -> dict:
    """A CUDA graph of one step (the table advanced on the device, two covered layers' forward
    and backward from static buffers), replayed three times with new inputs and an lr change,
    against eager steps from the same start: the same bits."""
    if device.type != "cuda":
        return {"graph": True, "skipped": "CUDA graphs need a GPU (tests/test_capture.py checks the data flow on CPU)"}
    from forge_megatron import ForgeConfig, ForgeState, fused_update
    from forge_megatron.core.param import ForgeParam
    from forge_megatron.core.table import LR, StepTable
    from forge_megatron.core.update import step_tiles
    from forge_megatron.megatron.autograd import forge_linear

    shapes, tokens = [(768, 512), (512, 1024)], 256
    config = ForgeConfig("adamw", GRAPH_RULE, weight_store="sr")
    weights = [torch.randn(*s, generator=gen).to(device=device, dtype=torch.bfloat16) for s in shapes]
    params = [ForgeParam(w, config) for w in weights]
    table = StepTable([p.state for p in params], [step_tiles(w, p.state) for w, p in zip(weights, params)], device)
    for p, slots in zip(params, table.slots):
        p.bind(slots)
    xs = [torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True) for _, n_in in shapes]
    dys = [torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16) for n_out, _ in shapes]

    def region():
        table.advance()
        for w, p, x, dy in zip(weights, params, xs, dys):
            forge_linear(x, w, None, p, allreduce_dgrad=False, sequence_parallel=False, tp_group=None).backward(dy)

    table.write(1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles), as before any capture
        for p in params:
            p.begin_iteration(1)
        region()
    torch.cuda.current_stream().wait_stream(side)
    start_step = int(table.schedule[0, 2])
    snapshots = [(w.clone(), {k: v.clone() for k, v in p.state.named_tensors().items()}) for w, p in
                 zip(weights, params)]
    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.begin_iteration(1)
    with torch.cuda.graph(graph):
        region()
    feeds = []
    for replay in range(3):
        new_x = [torch.randn_like(x) for x in xs]
        new_dy = [torch.randn_like(dy) for dy in dys]
        lr = 1e-2 if replay < 2 else 3e-3
        with torch.no_grad():
            for buffer, value in zip(xs + dys, new_x + new_dy):
                buffer.copy_(value)
        table.schedule[:, LR].fill_(lr)
        graph.replay()
        feeds.append((new_x, new_dy, lr))
    torch.cuda.synchronize()
    equal = []
    for k, ((w0, s0), weight, param) in enumerate(zip(snapshots, weights, params)):
        state = ForgeState(w0, "adamw", weight_store="sr", weight_id=param.state.weight_id, **GRAPH_RULE)
        for name, tensor in s0.items():
            state.named_tensors()[name].copy_(tensor)
        state.step = start_step
        for new_x, new_dy, lr in feeds:
            state.set_hyperparameters(lr=lr)
            fused_update(new_x[k], new_dy[k], w0, state)
        equal.append(_fraction_equal(weight, w0))
    return {"graph": True, "replays": 3, "weight_bits_equal": equal, "ok": all(e == 1.0 for e in equal)}


def guarded(case, fn, *args) -> dict:
    """fn(*args), or the case's description with the error that stopped it: one failing case
    must not cost the part's others."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - recorded in the report, the part goes on
        return {**case, "error": "".join(traceback.format_exception(error))[-2000:], "ok": False}


def smoke(args, report, budget: Budget) -> None:
    from forge_megatron.core.plan import interpreting

    device = torch.device(args.device)
    shapes = SMOKE_SHAPES[device.type]
    rules = SMOKE_RULES if device.type == "cuda" else {"adamw": SMOKE_RULES["adamw"]}
    if device.type == "cuda" and not interpreting():
        variants = [(rule, hp, *regime, (n_out, n_in), tokens, None, True) for n_out, n_in, tokens in shapes[1:]
                    for rule, hp in rules.items() for regime in REGIMES]
        variants += [("rmsprop", NAN_RULE, *regime, (64, 64), 16, None, False) for regime in REGIMES[1:]]
        variants += [("adamw", GRAPH_RULE, "bfloat16", "sr", "fp32", (768, 512), 256, None, False)]
        report.add({"compile_ahead": compile_ahead(variants, budget)}, "compiled ahead")
    gen = torch.Generator().manual_seed(0)
    case = report.add(guarded({"graph": True}, graph_case, device, gen))
    print(f"graph: {case.get('skipped') or ('ok' if case['ok'] else 'FAILED')}", flush=True)
    for regime in REGIMES[1:] if device.type == "cuda" else (REGIMES[1], REGIMES[4]):
        case = report.add(guarded({"nan": True, "regime": regime}, nan_case, regime, device, gen))
        print(f"nan {regime}: {'ok' if case.get('ok', True) else 'FAILED'}", flush=True)
    for shape in shapes:
        for rule, hp in rules.items():
            for regime in REGIMES:
                if budget.spent():
                    return
                case = report.add(guarded({"shape": shape, "rule": rule, "regime": regime}, smoke_case, shape, rule,
                                          hp, regime, device, gen))
                print(f"{shape} {rule:8s} {regime}: " + ("refused" if "refused" in case else "ERROR" if "error" in case else
                      f"{'ok' if case['ok'] else 'FAILED'}  weight bits {case['weight_bits_equal']:.6f}  states "
                      f"{case['state_bits_equal']:.6f}  gradient / bound {case['gradient_bound_ratio']:.2f}"),
                      flush=True)


# -- the benchmark parts -------------------------------------------------------------------------


def kernel(args, report, budget: Budget) -> None:
    import bench_kernel

    from forge_megatron.core.plan import TILE_SPACE, tile_space_key

    extra = ["--smoke"] if args.device == "cpu" else []
    if args.device == "cuda":  # every Llama shape and token count is one specialization (all divisible by 16)
        variants = [("adamw", {"lr": 1e-4}, "bfloat16", store, states, (4096, 4096), 8192, config, False)
                    for store, states in bench_kernel.REGIMES.values()
                    for config in (None, *TILE_SPACE[tile_space_key(torch.bfloat16, states)])]
        report.add({"compile_ahead": compile_ahead(variants, budget)}, "compiled ahead")
    result = bench_kernel.main([*extra, "--sweep", "--device", args.device, "--budget-s", str(budget.left()),
                                "--out", os.path.join(args.out, "kernel.json")])
    report.add({"wrote": "kernel.json", "cases": len(result["cases"]), "stopped": result["stopped"]})


def layer(args, report, budget: Budget) -> None:
    """bench_layer in its own process (it sets up a process group), bf16 then fp32."""
    extra = ["--smoke"] if args.device == "cpu" else []
    # fp32: the two layers' gradients agree to the wgrad GEMMs' summation order (IEEE fp32 dots)
    for dtype, seq in (("fp32", "24"),) if args.device == "cpu" else (("bf16", "4096"), ("fp32", "1024")):
        if budget.spent():
            return
        out = os.path.join(args.out, f"layer_{dtype}.json")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_layer.py"), *extra, "--dtype", dtype,
                               "--seq-length", seq, "--out", out], capture_output=True, text=True,
                              timeout=max(10.0, budget.left()))
        report.add({"wrote": os.path.basename(out), "returncode": proc.returncode,
                    "output": (proc.stdout + proc.stderr)[-1500:]}, proc.stdout.strip()[-600:])


def memory(args, report, budget: Budget) -> None:
    import bench_memory

    extra = ["--smoke", "--iters", "2", "--regimes", "standard", "forge-sr-int8"] if args.device == "cpu" else [
        "--layers", "4", "--seq-length", "4096", "--iters", "3", "--regimes", "standard", "forge-master",
        "forge-sr-int8"]
    result = bench_memory.main([*extra, "--micro-batch-sizes", "1", "--search", "model", "--budget-s",
                                str(budget.left()), "--out", os.path.join(args.out, "memory.json")])
    report.add({"wrote": "memory.json", "regimes": list(result["regimes"]), "stopped": result["stopped"]})


def e2e(args, report, budget: Budget) -> None:
    import bench_e2e

    extra = ["--smoke", "--iters", "3"] if args.device == "cpu" else ["--iters", "6", "--micro-batches", "1", "4", "16"]
    result = bench_e2e.main([*extra, "--budget-s", str(budget.left()), "--out", os.path.join(args.out, "e2e.json")])
    report.add({"wrote": "e2e.json", "cases": len(result["cases"]), "stopped": result.get("stopped")})


def tests(args, report, budget: Budget) -> None:
    """GPU_TESTS, one pytest process, stopped at the budget; its summary line per file."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for path in GPU_TESTS:
        if budget.spent():
            return
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                   path], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(10.0, budget.left()))
            summary, code = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]], proc.returncode
        except subprocess.TimeoutExpired:
            summary, code = ["stopped at the budget"], None
        report.add({"tests": path, "returncode": code, "summary": summary[0]}, f"{path}: {summary[0]}")


PARTS = {"smoke": smoke, "kernel": kernel, "layer": layer, "memory": memory, "e2e": e2e, "tests": tests}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", "device"))
    parser.add_argument("--budget-s", type=float, default=None, help="default: BUDGETS[part]")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_plan.py: no CUDA device here; add --device cpu for the dry run")
    from forge_megatron.tools.benchmarking import CaseReport, environment

    os.makedirs(args.out, exist_ok=True)
    budget = Budget(args.budget_s if args.budget_s is not None else BUDGETS[args.part])
    report = CaseReport(os.path.join(args.out, f"plan_{args.part}.json"),
                        {**environment(torch.device(args.device)), "part": args.part, "budget_s": budget.seconds})
    PARTS[args.part](args, report, budget)
    return report.finish(seconds=time.monotonic() - budget.start, budget_spent=budget.spent())


if __name__ == "__main__":
    main()
