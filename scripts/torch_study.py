"""The numbers of docs/torch.md: FORGE on a plain Hugging Face model (forge_megatron.torch).

Memory (LiveTensorMemory, CPU, torch backend): a transformers Llama (hidden 512, 4 layers, vocabulary
2048, micro-batch 2 x 128 tokens: the weights' gradients, not the activations, make the peak) trained by torch.optim.AdamW alone and by FORGE in each regime
(the rest on torch.optim.AdamW): bytes held between steps (parameters and optimizer states), at the
backward/optimizer seam (what backward leaves for the step: gradients, held buffers) and the
step's peak above what is held between steps. bf16 + stochastic rounding against fp32 on the stdlib
text (tools/torch_study.bf16_against_fp32), and round-to-nearest for contrast, over seeds.

    python scripts/torch_study.py --out bench/results/torch_cpu.json
"""

from __future__ import annotations

import argparse

import torch

from forge_megatron.tools.benchmarking import write_report
from forge_megatron.tools.torch_study import bf16_against_fp32, stdlib_batches, step_memory, tiny_llama
from forge_megatron.torch import cover

REGIMES = {  # name: (model dtype, cover() options, or None for torch.optim.AdamW alone)
    "torch AdamW fp32": (torch.float32, None),
    "FORGE fp32": (torch.float32, {}),
    "FORGE fp32, two-pass": (torch.float32, {"clip_mode": "two-pass"}),
    "torch AdamW bf16": (torch.bfloat16, None),
    "FORGE bf16 + master": (torch.bfloat16, {"weight_store": "master"}),
    "FORGE bf16 + SR": (torch.bfloat16, {"weight_store": "sr"}),
    "FORGE bf16 + SR, int8 states": (torch.bfloat16, {"weight_store": "sr", "state_dtype": "int8"}),
}


def memory(hidden: int, layers: int, vocab: int, batch: int, seq: int) -> dict:
    tokens = stdlib_batches(1, batch, seq)[0] % vocab
    out = {}
    for name, (dtype, options) in REGIMES.items():
        model = tiny_llama(vocab=vocab, hidden=hidden, layers=layers).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters()) if options is None else cover(model, "adamw", **options)
        out[name] = step_memory(model, optimizer, tokens)
        out[name]["covered_parameters"] = sum(w.numel() for w in getattr(optimizer, "weights", []))
        out[name]["parameters"] = sum(p.numel() for p in model.parameters() if p.dim() > 0 and p.numel() > 1)
        print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the bf16 study")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"memory": {"model": "Llama hidden 512, 4 layers, vocab 2048, SwiGLU 1024, micro-batch 2 x 128",
                         "regimes": memory(512, 4, 2048, 2, 128)}}
    study = {}
    for store in ("sr", "rne"):
        for seed in range(args.seeds):
            result = bf16_against_fp32(store, seed=seed)
            study[f"{store} seed {seed}"] = result
            print(store, seed, "worst window", max(result["excess"]), "last", result["excess"][-1], flush=True)
    report["bf16_against_fp32"] = study
    write_report(args.out, report)


if __name__ == "__main__":
    main()
