"""forge-demo: fit a linear layer with the fused step, side by side with torch.optim.

y = x W^T is trained to match a random teacher. FORGE applies AdamW inside the weight-gradient
computation (dW = dy^T x is never stored); the reference computes W.grad and calls
torch.optim.AdamW. In fp32 both follow the same trajectory up to the GEMM's rounding.
"""

import argparse

import torch

from forge_megatron import ForgeState, fused_update


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="adamw")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=96)
    parser.add_argument("--out-features", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--backend", default=None, help="triton or torch (default: triton on CUDA, torch on CPU)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = torch.randn(args.out_features, args.in_features, device=device)
    weight = torch.zeros(args.out_features, args.in_features, device=device)
    state = ForgeState(weight, args.rule, lr=args.lr)
    reference = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.AdamW([reference], lr=args.lr) if args.rule == "adamw" else None

    for step in range(1, args.steps + 1):
        x = torch.randn(args.tokens, args.in_features, device=device)
        target = x @ teacher.T
        dy = (x @ weight.T - target) * (2.0 / target.numel())  # d(mean squared error)/dy
        loss = float(((x @ weight.T - target) ** 2).mean())
        result = fused_update(x, dy, weight, state, backend=args.backend)
        line = f"step {step:4d} | loss {loss:.6f} | grad norm {float(result.sumsq) ** 0.5:.4e}"
        if optimizer is not None:
            optimizer.zero_grad()
            ref_loss = ((x @ reference.T - target) ** 2).mean()
            ref_loss.backward()
            optimizer.step()
            diff = float((weight - reference.detach()).norm() / reference.detach().norm())
            line += f" | torch.optim loss {ref_loss.item():.6f} | weight rel. diff {diff:.2e}"
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(line)
    print(f"weight gradient bytes never allocated per step: {weight.numel() * 4:,}")


if __name__ == "__main__":
    main()
