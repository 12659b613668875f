"""One transformer layer: FORGE's backward (the update fused in) against the standard layer's
backward plus the optimizer step, side by side in one run.

Llama-3 8B shapes divided by TP=8 (one TP=8 rank emulated at TP=1, as bench_memory.py: hidden
4096, 4 heads and 1 query group of 128 channels, SwiGLU ffn 1792, RMSNorm, no biases), bf16,
micro-batch 1, sequence 4096, torch's fused attention in both layers.

  standard  megatron-core's local-spec layer in Megatron's DDP (gradients into its fp32 grad
            buffer) and Megatron's own optimizer (get_megatron_optimizer: fp32 masters of the bf16
            weights, Adam with Megatron's parameter groups, masters copied back);
  forge     the FORGE layer spec: the four linears update inside backward (bf16 weights with an
            fp32 master, fp32 states), bound to one StepTable written once per step, as Megatron's
            loop does with FORGE's controller (each weight's step is then one launch); only the two
            norms go through DDP and the same optimizer.

Times are medians of triton.testing.do_bench on a GPU (wall clock on CPU, --smoke only, where the
difference below is noise): the forward alone, and forward + backward + step; "backward + step" is
their difference. Peak memory is torch.cuda.max_memory_allocated (LiveTensorMemory's tensor bytes
on CPU) during one full step above the resting state (weights, masters and states allocated). The
run also checks, from the same weights and inputs, each covered weight's gradient (FORGE's,
materialized for that step, against the standard layer's in Megatron's fp32 grad buffer) and the
first update of every weight (norm-wise relative differences). The gradient check sees the
gradient's scale, which the first AdamW update from zero state (about -lr sign(g)) does not.

    python scripts/bench_layer.py --out bench/results/layer_h100.json          # on a GPU
    python scripts/bench_layer.py --smoke --dtype fp32                          # tiny, any device
"""

from __future__ import annotations

import argparse

import torch

from forge_megatron import ForgeConfig
from forge_megatron.core.param import ForgeParam
from forge_megatron.core.table import StepTable
from forge_megatron.core.update import step_tiles
from forge_megatron.megatron.world import init_world_of_one
from forge_megatron.tools.benchmarking import bench, environment, peak_bytes, write_report

SHAPES = {"llama8b-tp8": {"hidden_size": 4096, "num_attention_heads": 4, "num_query_groups": 1, "kv_channels": 128,
                          "ffn_hidden_size": 1792},
          "smoke": {"hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
                    "ffn_hidden_size": 96}}
HP = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def init_single_rank(device: torch.device) -> None:
    """A one-rank process group and TP=1 model parallelism (megatron-core needs both)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if device.type == "cpu":
        from forge_megatron.megatron.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    init_world_of_one("nccl" if device.type == "cuda" else "gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)


def build_layer(shape: dict, dtype: torch.dtype, forge: bool, device: torch.device):
    """A TransformerLayer from the local spec, torch's fused attention, its linears covered by FORGE
    (forge) or not."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from forge_megatron.megatron.attention import core_attention
    from forge_megatron.megatron.cover import cover_model

    config = TransformerConfig(num_layers=1, **shape, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                               normalization="RMSNorm", add_bias_linear=False, bf16=dtype == torch.bfloat16,
                               params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
                               gradient_accumulation_fusion=False, bias_activation_fusion=False,
                               masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                               use_cpu_initialization=device.type == "cpu")
    torch.manual_seed(1234)
    with core_attention("sdpa"):
        layer = build_module(get_gpt_layer_local_spec(normalization="RMSNorm"), config=config, layer_number=1)
    if forge:
        cover_model([layer], ForgeConfig("adamw", HP))
    return layer.to(device)


def wrap_and_optimizer(layer, dtype: torch.dtype):
    """The layer in Megatron's DDP and Megatron's own optimizer for what FORGE does not cover
    (everything in the standard layer): Megatron's parameter groups, fp32 masters of bf16
    parameters, masters copied back."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=HP["lr"], weight_decay=HP["weight_decay"], adam_beta1=HP["betas"][0],
                             adam_beta2=HP["betas"][1], adam_eps=HP["eps"], bf16=dtype == torch.bfloat16,
                             params_dtype=dtype, clip_grad=0.0)
    ddp = DistributedDataParallel(layer.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), layer)
    return ddp, get_megatron_optimizer(config, [ddp])


def masters(layer, optimizer) -> dict[str, torch.Tensor]:
    """Every weight's fp32 value: FORGE's master where FORGE covers it, else Megatron's (the
    optimizer's fp32 main parameter for bf16 weights, the weight itself in fp32)."""
    out = {}
    for name, p in layer.named_parameters():
        if p.requires_grad:
            main = getattr(p, "main_param", None)
            out[name] = (p if main is None else main).detach().float().clone()
    for name, module in _covered(layer):
        master = module.forge.state.master
        out[f"{name}.weight"] = (module.weight if master is None else master).detach().float().clone()
    return out


LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def gradients(layer) -> dict[str, torch.Tensor]:
    """The last step's weight gradient of each linear: FORGE's materialized one where FORGE covers
    it, else the one in Megatron's fp32 grad buffer (main_grad)."""
    out = {}
    for name in LINEARS:
        module = layer.get_submodule(name)
        forge = getattr(module, "forge", None)
        grad = forge.grad if isinstance(forge, ForgeParam) else module.weight.main_grad
        out[f"{name}.weight"] = grad.detach().float().clone()
    return out


def _covered(layer):
    return [(n, m) for n, m in layer.named_modules() if isinstance(getattr(m, "forge", None), ForgeParam)]


def run(shape_name: str, dtype_name: str, seq: int, device: torch.device) -> dict:
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(seq, 1, shape["hidden_size"], device=device, generator=gen).to(dtype).requires_grad_(True)
    dy = (torch.randn(seq, 1, shape["hidden_size"], device=device, generator=gen) * 1e-2).to(dtype)
    out = {"shape": shape_name, **shape, "dtype": dtype_name, "seq_length": seq, "micro_batch": 1}
    moved, grads = {}, {}
    for name in ("standard", "forge"):
        layer = build_layer(shape, dtype, name == "forge", device)
        ddp, optimizer = wrap_and_optimizer(layer, dtype)
        before = masters(layer, optimizer)
        covered = [m.forge for _, m in _covered(layer)]
        table = StepTable([p.state for p in covered], [step_tiles(p.rows(m.weight), p.state) for p, (_, m) in
                                                       zip(covered, _covered(layer))], device) if covered else None
        for param, slots in zip(covered, table.slots if table else []):
            param.bind(slots)
            param.materialize = True  # the first step's gradient, for the check

        def forward(ddp=ddp):  # with autograd recording, as in the step; the graph is dropped
            ddp(x, attention_mask=None)

        def step(ddp=ddp, optimizer=optimizer, table=table, covered=covered):
            if table is not None:  # the controller's per-step work: one table write for all weights
                table.write(1.0)
                for param in covered:
                    param.begin_iteration(1)
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            output, _ = ddp(x, attention_mask=None)
            output.backward(dy)
            x.grad = None
            ddp.finish_grad_sync()
            optimizer.step()

        step()  # the first step: compared across the two layers, and allocates the optimizer states
        after = masters(layer, optimizer)
        moved[name] = {k: after[k] - before[k] for k in after}
        grads[name] = gradients(layer)
        for param in covered:
            param.materialize, param.grad = False, None
        out[f"{name}_forward_ms"] = bench(forward, device)
        out[f"{name}_step_ms"] = bench(step, device)
        out[f"{name}_backward_and_step_ms"] = out[f"{name}_step_ms"] - out[f"{name}_forward_ms"]
        out[f"{name}_peak_bytes"] = peak_bytes(step, device)
        out[f"{name}_covered_weights"] = len(_covered(layer))
        del layer, ddp, optimizer
    out["speedup_backward_and_step"] = out["standard_backward_and_step_ms"] / out["forge_backward_and_step_ms"]
    out["speedup_step"] = out["standard_step_ms"] / out["forge_step_ms"]
    out["peak_ratio"] = out["forge_peak_bytes"] / out["standard_peak_bytes"]
    out["gradient_relative_difference"] = {
        k: float((grads["forge"][k] - grads["standard"][k]).norm() / grads["standard"][k].norm()) for k in grads["standard"]}
    out["first_update_relative_difference"] = {
        k: float((moved["forge"][k] - moved["standard"][k]).norm() / moved["standard"][k].norm())
        for k in moved["standard"]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--smoke", action="store_true", help="a tiny layer and sequence, any device")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("bench_layer.py times a GPU; on CPU run it with --smoke")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    init_single_rank(device)
    shape, seq = ("smoke", 24) if args.smoke else ("llama8b-tp8", args.seq_length)
    result = run(shape, args.dtype, seq, device)
    report = {**environment(device), **result}
    print(f"{shape} {args.dtype} seq {seq}: backward + step  standard {result['standard_backward_and_step_ms']:.3f} ms"
          f"  forge {result['forge_backward_and_step_ms']:.3f} ms  x{result['speedup_backward_and_step']:.2f};  "
          f"whole step x{result['speedup_step']:.2f};  peak ratio {result.get('peak_ratio')}", flush=True)
    print("gradient, FORGE vs standard (relative):",
          {k: f"{v:.1e}" for k, v in result["gradient_relative_difference"].items()}, flush=True)
    print("first update, FORGE vs standard (relative):",
          {k: f"{v:.1e}" for k, v in result["first_update_relative_difference"].items()}, flush=True)
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
