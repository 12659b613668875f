"""FORGE's grouped experts module (`--moe-grouped-gemm --use-forge`): a drop-in for megatron-core's
SequentialMLP that needs no Transformer Engine.

After Megatron has built the model (its local spec builds SequentialMLP, with or without
--moe-grouped-gemm), `cover_grouped` turns each SequentialMLP into a ForgeGroupedMLP in place: the
local experts' linear_fc1 weights are stacked into one tensor [E, ffn(*2), hidden], their
linear_fc2 weights into one [E, hidden, ffn], and each expert's weight Parameter becomes a view of
its slice. The module's parameters, state_dict and sharded_state_dict are SequentialMLP's
(`local_experts.<i>.linear_fc1.weight`, ...), so checkpoints are interchangeable with the per-expert
path and with standard Megatron; a load writes through the views into the stacked weights.

Forward: MLP.forward's own code (activation, gating, the router's probabilities as per-token
scale) on all of the experts' tokens at once, with its two linears replaced by grouped matmuls
(torch's grouped matmul on a GPU in bf16, else a loop over the experts). Backward of each grouped
linear: dgrad as a grouped matmul with the weights of the forward pass, then the fused wgrad +
update of all local experts' weights of that kind in one launch (GroupedForgeParam: one
GroupedForgeState, the experts' random streams keyed by their per-expert names, as on the
per-expert path). The experts' linears do no collectives here (Megatron's token dispatcher does,
around the experts); expert tensor parallelism, expert data parallelism over several ranks and
expert biases are refused at argument time (args.py).
"""

from __future__ import annotations

import types

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from forge_megatron.core.param import ForgeConfig, GroupedForgeParam

KINDS = ("linear_fc1", "linear_fc2")


def cover_grouped(model_chunks, forge: ForgeConfig) -> dict[str, int]:
    """Every SequentialMLP of the built `model_chunks` becomes a ForgeGroupedMLP (in place, before
    DDP). Returns how many stacked weights of each kind were covered."""
    covered = {}
    for chunk in model_chunks:
        for _, module in chunk.named_modules():
            if type(module) is SequentialMLP:
                module.__class__ = ForgeGroupedMLP
                module._cover(forge)
                for kind in KINDS:
                    covered[kind] = covered.get(kind, 0) + 1
    return covered


def grouped_linears(model_chunks) -> set[int]:
    """ids of the experts' linears a ForgeGroupedMLP trains (not to be covered one by one)."""
    return {id(getattr(expert, kind)) for chunk in model_chunks for module in chunk.modules()
            if isinstance(module, ForgeGroupedMLP) for expert in module.local_experts for kind in KINDS}


class ForgeGroupedMLP(SequentialMLP):
    """SequentialMLP whose local experts run as grouped matmuls and are trained by FORGE's grouped
    fused step (one launch per weight kind). Made from a built SequentialMLP by `cover_grouped`."""

    def _cover(self, forge: ForgeConfig | None) -> None:
        forge = forge or ForgeConfig()
        for kind in KINDS:
            linears = [getattr(expert, kind) for expert in self.local_experts]
            for linear in linears:
                if linear.bias is not None:
                    raise ValueError("FORGE's grouped experts have no biases: add --disable-bias-linear, or drop "
                                     "--moe-grouped-gemm (the per-expert path trains experts with biases)")
                if linear.tp_group is not None and linear.tp_group.size() > 1:
                    raise ValueError("FORGE's grouped experts do not split an expert across ranks: set "
                                     "--expert-tensor-parallel-size 1, or drop --moe-grouped-gemm")
            stacked = torch.stack([linear.weight.detach() for linear in linears])
            stacked.allreduce = False  # Megatron's mark of an expert weight (reduced over the expert-data group)
            stacked._forge_group_param = linears[0].weight  # the parameter group every expert's weight is in
            stacked._forge_expert_weights = [linear.weight for linear in linears]
            for e, linear in enumerate(linears):
                linear.weight.data = stacked[e]  # a view: the module's parameters stay SequentialMLP's
                linear.weight.requires_grad_(False)  # trained by FORGE: no grad buffer, no optimizer state
            GroupedForgeParam(stacked, forge)  # sets stacked._forge_param
            object.__setattr__(self, f"_forge_{kind}", stacked)  # not a parameter nor a buffer: not saved twice
        object.__setattr__(self, "_forge_calls", {kind: _GroupedLinearCall(self, kind) for kind in KINDS})

    def stacked(self, kind: str) -> torch.Tensor:
        """The experts' stacked weights [E, out, in] of `kind` (linear_fc1 or linear_fc2)."""
        return getattr(self, f"_forge_{kind}")

    def forge_params(self) -> dict[str, GroupedForgeParam]:
        return {kind: self.stacked(kind)._forge_param for kind in KINDS}

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        counts = [int(c) for c in torch.as_tensor(tokens_per_expert).tolist()]
        if len(counts) != self.num_local_experts or sum(counts) != hidden.shape[0]:
            raise ValueError(f"FORGE grouped experts: {len(counts)} token counts summing to {sum(counts)} for "
                             f"{self.num_local_experts} local experts and {hidden.shape[0]} tokens")
        offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
        calls = self._forge_calls
        for call in calls.values():
            call.counts, call.offsets = counts, offsets
        expert = self.local_experts[0]
        view = types.SimpleNamespace(config=expert.config, activation_func=expert.activation_func,
                                     linear_fc1=calls["linear_fc1"], linear_fc2=calls["linear_fc2"])
        output, _ = MLP.forward(view, hidden, per_token_scale=probs)  # MLP's activation and scaling, all tokens
        return output, None

    def _apply(self, fn, recurse=True):
        """Module conversions (.cuda(), Float16Module's .bfloat16()) convert each expert's weight:
        the stacked weights follow (the same tensor objects, their data replaced), the experts'
        weights become views again, and the FORGE state adopts them (an fp32 master from the
        pre-conversion values for bf16 weights)."""
        previous = {kind: self.stacked(kind).data for kind in KINDS}
        super()._apply(fn, recurse)
        for kind in KINDS:
            stacked = self.stacked(kind)
            weights = stacked._forge_expert_weights
            stacked.data = torch.stack([w.data for w in weights])
            for e, w in enumerate(weights):
                w.data = stacked[e]
            stacked._forge_param.adopt(stacked, previous=previous[kind])
        return self


class _GroupedLinearCall(torch.nn.Module):
    """One grouped linear as MLP.forward calls it: (output, bias None) for all experts' tokens."""

    def __init__(self, owner: ForgeGroupedMLP, kind: str):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule (no cycle in named_modules)
        self.kind = kind
        self.counts: list[int] = []
        self.offsets: torch.Tensor | None = None

    def forward(self, x: torch.Tensor):
        weight = self._owner.stacked(self.kind)
        trigger = torch.empty(0, device=x.device, requires_grad=True)
        return GroupedLinearFunction.apply(x, weight, self.counts, self.offsets, weight._forge_param, trigger), None


class GroupedLinearFunction(torch.autograd.Function):
    """y[rows_e] = x[rows_e] W_e^T for every expert e; backward: dgrad with the forward's weights,
    then all experts' fused wgrad + update (GroupedForgeParam.step). The weight needs no grad: the
    zero-size `trigger` makes autograd run this backward even if nothing else here needs one."""

    @staticmethod
    def forward(ctx, x, weight, counts, offsets, forge: GroupedForgeParam, trigger):
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.offsets, ctx.forge = counts, offsets, forge
        return grouped_matmul(x, weight, counts, offsets, transpose=True)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_matmul(dy, weight, ctx.counts, ctx.offsets, transpose=False) if ctx.needs_input_grad[0] else None
        with torch.no_grad():
            ctx.forge.step(x, dy, weight, ctx.offsets)
        return dx, None, None, None, None, None


def grouped_matmul(a: torch.Tensor, weights: torch.Tensor, counts: list[int], offsets: torch.Tensor,
                   transpose: bool) -> torch.Tensor:
    """out[rows_e] = a[rows_e] @ W_e^T (`transpose`, the forward) or a[rows_e] @ W_e (dgrad), with
    rows_e = offsets[e]:offsets[e + 1]: torch's grouped matmul on a GPU where it takes the operands
    (bf16, 16-byte aligned), else a loop over the experts (every CPU run)."""
    b = weights.transpose(-2, -1) if transpose else weights
    if _torch_grouped_mm_takes(a, b):
        return torch._grouped_mm(a, b, offs=offsets[1:].to(device=a.device, dtype=torch.int32))
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, count in enumerate(counts):
        torch.matmul(a[start:start + count], b[e], out=out[start:start + count])
        start += count
    return out


def _torch_grouped_mm_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these operands: bf16 on a Hopper-or-newer GPU, rows
    16-byte aligned."""
    return (a.is_cuda and hasattr(torch, "_grouped_mm") and a.dtype == b.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(a.device) >= (9, 0)
            and a.shape[-1] % 8 == 0 and b.shape[-1] % 8 == 0 and a.is_contiguous())
