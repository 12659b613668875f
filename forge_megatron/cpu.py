"""Let megatron-core's tensor-parallel model code run on CPU (gloo), for the CPU job and tests.

megatron-core assumes CUDA in four places that FORGE's CPU path meets:
  1. `torch.cuda.current_device()` names the device of new tensors -> "cpu";
  2. the model-parallel RNG tracker saves and restores CUDA generator states -> the CPU generator;
  3. WrappedTorchNorm (the local spec's norm) refuses sequence parallelism -> build it without the
     flag and tag its parameters `sequence_parallel = True`, as Megatron's own fused norms are, so
     finalize_model_grads all-reduces their gradients across tensor-parallel ranks;
  4. the pipeline schedules (forward_backward_func) allocate their token counter with
     device="cuda" -> their module sees a `torch` whose tensor factories map "cuda" to "cpu";
  5. DDP's gradient sync orders its collectives with CUDA streams -> `torch.cuda.current_stream()`
     returns a stream whose waits do nothing (CPU collectives are synchronous anyway);
  6. megatron.training's argument validation asks the GPU's architecture (for TP > 1) -> 0;
  7. dist_checkpointing synchronizes the GPU before writing -> `torch.cuda.synchronize()` does nothing.
Only call this on a machine without CUDA; it is idempotent.
"""

from __future__ import annotations

import functools
import types

import torch

_ENABLED = False


def enable_megatron_on_cpu() -> None:
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_megatron_on_cpu() is for machines without CUDA")
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import torch_norm

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.current_stream = lambda device=None: _NULL_STREAM
    torch.cuda.synchronize = lambda device=None: None
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new_norm(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new_norm

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu("torch")

    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0
    _ENABLED = True


class _NullStream:
    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


_NULL_STREAM = _NullStream()


class _TorchOnCpu(types.ModuleType):
    """`torch`, except that tensor factories asked for device="cuda" allocate on the CPU."""

    FACTORIES = ("zeros", "ones", "empty", "full", "tensor")

    def __getattr__(self, name):
        value = getattr(torch, name)
        return functools.partial(_on_cpu, value) if name in self.FACTORIES else value


def _on_cpu(factory, *args, **kwargs):
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs["device"] = "cpu"
    return factory(*args, **kwargs)
