"""Which modules `cover` covers, and why each other module with a weight matrix is not covered.

By default every nn.Linear (the class itself, not a subclass: a subclass's forward may not be
nn.Linear's, e.g. nn.MultiheadAttention's out_proj, whose weight is used without calling it) and
every Hugging Face Conv1D. `include` narrows that to the modules matching one of its items and
`exclude` removes those matching one of its items; an item is a module type (isinstance; listing
an nn.Linear subclass in `include` covers it) or an fnmatch pattern of the module's name in
model.named_modules() ("lm_head", "*.mlp.*", "model.layers.0.*").
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

from forge_megatron.core.state import WEIGHT_DTYPES
from forge_megatron.torch.layers import CoveredLayer, conv1d_type

Selector = str | type


def select_modules(model: nn.Module, include: Iterable[Selector] | None = None,
                   exclude: Iterable[Selector] | None = None) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """([(name, module)] to cover, in module order; {name: why not covered} for every other module
    that owns a weight of two or more dimensions)."""
    include, exclude = _selectors(include, "include"), _selectors(exclude, "exclude")
    kinds = tuple(k for k in (nn.Linear, conv1d_type()) if k is not None)
    for item in include or ():
        if isinstance(item, type) and not issubclass(item, kinds):
            raise ValueError(f"include: {item.__name__} is not an nn.Linear or Conv1D class; FORGE covers linear "
                             "layers only")
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    chosen, uncovered = [], {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None or weight.dim() < 2:
            continue
        reason = _why_not(name, module, weight, kinds, include, exclude, names_of)
        if reason is None:
            chosen.append((name, module))
        else:
            uncovered[name] = reason
    return chosen, uncovered


def _why_not(name, module, weight, kinds, include, exclude, names_of) -> str | None:
    if isinstance(module, CoveredLayer):
        return "already covered (by an earlier cover call)"
    included_type = any(isinstance(item, type) and isinstance(module, item) for item in include or ())
    if type(module) not in kinds and not included_type:
        if isinstance(module, kinds):
            return (f"a subclass of {_kind(module, kinds)} ({type(module).__name__}), whose forward may not be its "
                    "parent's: include its type to cover it")
        return f"not a linear layer ({type(module).__name__})"
    if include is not None and not any(_matches(item, name, module) for item in include):
        return "not included"
    if exclude is not None and any(_matches(item, name, module) for item in exclude):
        return "excluded"
    if not weight.requires_grad:
        return "frozen (its weight does not require grad)"
    shared = [n for n in names_of[id(weight)] if n != f"{name}.weight"]
    if shared:
        return (f"its weight is shared with {shared[0]} (tied): updated in backward here and by the optimizer "
                "there, it would be updated twice")
    if weight.dtype not in WEIGHT_DTYPES:
        return f"its weight is {weight.dtype}; FORGE trains float32 and bfloat16 weights"
    return None


def _kind(module, kinds) -> str:
    return next(k.__name__ for k in kinds if isinstance(module, k))


def _matches(item: Selector, name: str, module: nn.Module) -> bool:
    return isinstance(module, item) if isinstance(item, type) else fnmatch.fnmatchcase(name, item)


def _selectors(items, what: str) -> list[Selector] | None:
    if items is None:
        return None
    items = [items] if isinstance(items, (str, type)) else list(items)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(f"{what}: {item!r} is neither a module type nor a module-name pattern")
    return items
