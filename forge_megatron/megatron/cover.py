"""FORGE's one way into a Megatron model: after Megatron has built it (whatever spec, block spec or
builder chose its layers) and before DDP wraps it, every megatron-core `ColumnParallelLinear` and
`RowParallelLinear` whose weight FORGE can own becomes its FORGE class in place
(`ForgeColumnParallelLinear` / `ForgeRowParallelLinear`: same weight, buffers and attributes; only
the autograd function changes). Attention and MLA projections, MLPs, mixture-of-experts experts
(each local expert's linears, or with --moe-grouped-gemm FORGE's grouped experts module, experts.py)
and shared experts, the multi-token-prediction layers and the output layer are covered alike.

A weight FORGE cannot own stays with Megatron's optimizer, and the log line says why: it is tied
or shared (the output layer of a model with tied embeddings, a parameter reachable from two
modules), it is passed in at forward time (no weight of its own), it is frozen, its partition
stride is one FORGE does not place, its layer is used more than once per forward (the output
layer computes the main and every MTP head's logits), or it is a Transformer Engine module (TE's
own fused wgrad, which FORGE does not replace).
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from forge_megatron.core.param import ForgeConfig
from forge_megatron.megatron.experts import cover_grouped, grouped_linears
from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear, _ForgeLinear

PARENTS = ((ColumnParallelLinear, ForgeColumnParallelLinear, 0), (RowParallelLinear, ForgeRowParallelLinear, 1))


@dataclass
class CoverReport:
    """What `cover_model` did: covered weights per kind (the module's attribute name, e.g.
    linear_qkv), and the linears left to Megatron's optimizer per reason."""

    covered: collections.Counter = field(default_factory=collections.Counter)
    standard: dict[str, list[str]] = field(default_factory=dict)

    def covered_summary(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.covered.items()))
        return f"covered {sum(self.covered.values())} linear weights ({kinds})"

    def standard_summary(self) -> str:
        """'; with Megatron's optimizer: ... (why)', or '' when every linear is covered."""
        if not self.standard:
            return ""
        rest = "; ".join(f"{', '.join(_shorten(names))} ({reason})" for reason, names in self.standard.items())
        return f"; with Megatron's optimizer: {rest}"


def cover_model(model_chunks, forge: ForgeConfig, multi_token_prediction: bool = False,
                grouped_experts: bool = False, output: ForgeConfig | None = None) -> CoverReport:
    """Turn every coverable megatron-core parallel linear of the built `model_chunks` into its
    FORGE class, in place (after the build, before DDP wrapping). With `grouped_experts`
    (--moe-grouped-gemm), every SequentialMLP first becomes FORGE's grouped experts module
    (experts.py), which trains its experts' linears itself. `output`: the config of the output
    layer's weight (Megatron's embedding-or-output parameter) where it differs from `forge`."""
    report = CoverReport()
    grouped = set()
    if grouped_experts:
        for kind, n in cover_grouped(model_chunks, forge).items():
            report.covered[f"{kind} of grouped experts"] += n
        grouped = grouped_linears(model_chunks)
    for chunk in model_chunks:
        owners = collections.Counter(id(p) for _, p in chunk.named_parameters(remove_duplicate=False))
        for name, module in chunk.named_modules():
            if not _is_linear(module) or id(module) in grouped:
                continue
            reason = _why_standard(module, name, chunk, owners, multi_token_prediction)
            if reason is not None:
                report.standard.setdefault(reason, []).append(name)
                continue
            forge_class, partition_dim = forge_class_of(type(module))
            module.__class__ = forge_class
            is_output = getattr(module.weight, "is_embedding_or_output_parameter", False)
            module._cover(output if output is not None and is_output else forge, partition_dim)
            report.covered[name.rsplit(".", 1)[-1]] += 1
    return report


@functools.cache
def forge_class_of(cls: type) -> tuple[type, int]:
    """The FORGE class a megatron-core parallel linear becomes, and its weight's partition axis:
    ForgeColumnParallelLinear / ForgeRowParallelLinear for the two, and for a subclass (e.g. the
    heterogeneous models' ColumnParallelLinearGathered, whose forward calls its parent's) the
    subclass with FORGE's autograd function."""
    for parent, forge_class, partition_dim in PARENTS:
        if cls is parent:
            return forge_class, partition_dim
        if issubclass(cls, parent):
            return type(f"Forge{cls.__name__}", (_ForgeLinear, cls), {"__module__": __name__}), partition_dim
    raise TypeError(f"{cls.__name__} is not a megatron-core parallel linear")


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or _is_transformer_engine_linear(module)


def _why_standard(module, name: str, chunk, owners, multi_token_prediction: bool) -> str | None:
    """Why a linear stays with Megatron's optimizer (None: FORGE covers it)."""
    if _is_transformer_engine_linear(module):
        return "Transformer Engine modules"
    if isinstance(module, _ForgeLinear):
        return "covered already"
    cls = type(module)
    if cls not in (ColumnParallelLinear, RowParallelLinear) and (
            not cls.__module__.startswith("megatron.core.") or "_forward_impl" in vars(cls)):
        return f"{cls.__name__}: a linear of its own kind, which FORGE does not cover"
    if module is getattr(chunk, "output_layer", None):
        if getattr(chunk, "share_embeddings_and_output_weights", False):
            return "tied to the embedding: add --untie-embeddings-and-output-weights to cover it"
        if multi_token_prediction:
            return "used for the main and every multi-token-prediction head's logits"
    weight = module.weight
    if weight is None:
        return "weight passed in at forward time"
    if owners[id(weight)] > 1:
        return "shared by several modules"
    if not weight.requires_grad:
        return "frozen"
    stride = getattr(weight, "partition_stride", 1)
    if stride not in (1, 2) or (stride == 2 and forge_class_of(type(module))[1] != 0):
        return f"partition stride {stride}"
    return None


def _is_transformer_engine_linear(module: torch.nn.Module) -> bool:
    origin = type(module).__module__
    return "Linear" in type(module).__name__ and (
        origin.startswith("transformer_engine") or origin.startswith("megatron.core.extensions.transformer_engine"))


def _shorten(names: list[str], limit: int = 3) -> list[str]:
    return names if len(names) <= limit else [*names[:limit], f"{len(names) - limit} more"]
