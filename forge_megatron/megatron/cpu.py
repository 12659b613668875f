"""Megatron's training loop (megatron.training.pretrain) on a machine without CUDA: gloo processes,
CPU tensors. For the CPU main job and CI; on a GPU machine nothing is patched.

One shim per CUDA assumption met on the way, each applied only when no CUDA device is present:
  1. `initialize_megatron` asserts CUDA unless told `allow_no_cuda` -> it is told;
  2. Megatron sets up the model-parallel groups and the model-parallel RNG tracker only when
     `torch.cuda.device_count() > 0` -> initialize.py sees one device (the CPU) and a
     `torch.cuda.set_device` that does nothing;
  3. new tensors are placed with `torch.cuda.current_device()` -> "cpu";
  4. the RNG tracker saves and restores CUDA generator states -> the CPU generator's;
  5. `device="cuda"` tensor factories in Megatron's loop, optimizer, clipping, checkpointing,
     schedules and buffers (and the JIT warm-up) -> those modules see a `torch` whose factories
     put "cuda" tensors on the CPU;
  6. the model is moved with `Module.cuda()` before DDP wraps it -> it stays where it is;
  7. DDP is built under a fresh `torch.cuda.Stream()` and syncs on streams -> streams that do
     nothing (CPU collectives are synchronous);
  8. `torch.cuda.synchronize`, `empty_cache` and the memory counters Megatron's timers and logs
     read -> no-ops and zeros;
  9. argument validation asks the GPU's architecture (TP > 1) -> 0;
 10. gradient clipping asserts that gradients are 'torch.cuda.FloatTensor' -> it checks the dtype;
 13. the JIT warm-up runs Megatron's fused bias-activation and bias-dropout-add functions on
     "cuda" tensors, which torch.compile builds for the CPU in ~30 s -> skipped (a fusion the model
     uses still compiles on first use);
 12. the process-group backend defaults to NCCL -> `adapt_args_to_cpu` chooses gloo;
 11. WrappedTorchNorm (the local spec's norm) refuses sequence parallelism -> it is built without
     the flag and its parameters are tagged `sequence_parallel = True`, as Megatron's fused norms
     are, so finalize_model_grads all-reduces their gradients across tensor-parallel ranks.
Idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

# The modules whose `torch` sees CPU tensor factories and a CUDA namespace without a GPU (5, 7, 8).
_MODULES_ON_CPU = (
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.checkpointing",
    "megatron.training.utils.common_utils",
    "megatron.training.utils.utils",
    "megatron.training.models.dist_utils",
    "megatron.core.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_ENABLED = False


def enable_megatron_on_cpu() -> None:
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_megatron_on_cpu() is for machines without CUDA")
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.training import arguments, initialize, training

    # 1. initialize_megatron without CUDA
    initialize_megatron = initialize.initialize_megatron
    training.initialize_megatron = functools.partial(initialize_megatron, allow_no_cuda=True)
    # 13. the JIT warm-up
    initialize._warmup_jit_function = lambda *args, **kwargs: None
    # 3, 4. devices and RNG states
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    # 7, 8 (outside the listed modules too: DDP's buffers, dist_checkpointing)
    torch.cuda.current_stream = lambda device=None: _NULL_STREAM
    torch.cuda.synchronize = lambda device=None: None
    # 2, 5, 7, 8
    for name in _MODULES_ON_CPU:
        module = importlib.import_module(name)
        module.torch = _TorchOnCpu("torch")
    # 6. Module.cuda()
    torch.nn.Module.cuda = lambda self, device=None: self
    # 9. argument validation
    arguments.get_device_arch_version = lambda: 0
    # 10. clip_grads' type assertion
    _accept_cpu_grads_in_clipping()
    # 11. sequence-parallel norms
    _tag_sequence_parallel_norms()
    _ENABLED = True


def adapt_args_to_cpu(args) -> None:
    """12. Megatron's default process-group backend, NCCL, needs GPUs: use gloo."""
    if args.distributed_backend == "nccl":
        args.distributed_backend = "gloo"


class _NullStream:
    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


_NULL_STREAM = _NullStream()


class _CudaWithoutGpu(types.SimpleNamespace):
    """`torch.cuda` as Megatron's loop uses it, answered for a machine whose only device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_CUDA = _CudaWithoutGpu(
    device_count=lambda: 1, set_device=lambda device: None, current_device=lambda: "cpu",
    Stream=lambda *args, **kwargs: _NULL_STREAM, current_stream=lambda device=None: _NULL_STREAM,
    stream=lambda stream=None: contextlib.nullcontext(), synchronize=lambda device=None: None,
    empty_cache=lambda: None, memory_allocated=lambda device=None: 0, max_memory_allocated=lambda device=None: 0,
    memory_reserved=lambda device=None: 0, max_memory_reserved=lambda device=None: 0,
    memory_stats=lambda device=None: {}, reset_peak_memory_stats=lambda device=None: None,
)


class _TorchOnCpu(types.ModuleType):
    """`torch`, except that tensor factories asked for device="cuda" allocate on the CPU and
    `torch.cuda` answers for a machine whose only device is the CPU."""

    FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "rand", "randn", "arange", "zeros_like",
                 "ones_like", "empty_like", "full_like")

    def __getattr__(self, name):
        if name == "cuda":
            return _CUDA
        value = getattr(torch, name)
        return functools.partial(_on_cpu, value) if name in self.FACTORIES else value


def _on_cpu(factory, *args, **kwargs):
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs["device"] = "cpu"
    return factory(*args, **kwargs)


def _accept_cpu_grads_in_clipping() -> None:
    from megatron.core.optimizer import clip_grads

    clip_by_total_norm = clip_grads.clip_grad_by_total_norm_fp32

    @functools.wraps(clip_by_total_norm)
    def clip_grad_by_total_norm_fp32(parameters, *args, **kwargs):
        grads = [p.grad for p in (parameters if isinstance(parameters, list) else [parameters]) if p.grad is not None]
        if any(g.dtype != torch.float32 for g in grads):
            raise TypeError("gradient clipping expects fp32 gradients")
        with _cuda_type_names():
            return clip_by_total_norm(parameters, *args, **kwargs)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    from megatron.core.optimizer import optimizer as optimizer_module

    optimizer_module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _cuda_type_names():
    """Within, a CPU float tensor's `.type()` answers 'torch.cuda.FloatTensor'."""
    original = torch.Tensor.type

    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None and self.device.type == "cpu" and self.dtype == torch.float32:
            return "torch.cuda.FloatTensor"
        return original(self, dtype, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _tag_sequence_parallel_norms() -> None:
    from megatron.core.transformer import torch_norm

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
