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
  7. DDP is built under a fresh `torch.cuda.Stream()` and syncs on streams, as the MoE alltoall
     dispatcher does for its device-to-host copies -> streams and events that do nothing (CPU
     collectives are synchronous);
  8. `torch.cuda.synchronize`, `empty_cache` and the memory counters Megatron's timers and logs
     read -> no-ops, and the counters of the memory tracker set with `set_memory_counter` (live
     tensor bytes; zeros without one);
  9. argument validation asks the GPU's architecture (TP > 1) -> 0;
 10. Megatron's mixed-precision and distributed optimizers and its gradient clipping check tensors
     by their CUDA type names ('torch.cuda.FloatTensor', ...) -> within them a CPU tensor's
     `.type()` answers with the CUDA name of its dtype;
 13. the JIT warm-up runs Megatron's fused bias-activation and bias-dropout-add functions on
     "cuda" tensors, which torch.compile builds for the CPU in ~30 s -> skipped (a fusion the model
     uses still compiles on first use);
 12. the process-group backend defaults to NCCL -> `adapt_args_to_cpu` chooses gloo;
 11. WrappedTorchNorm (the local spec's norm) refuses sequence parallelism -> it is built without
     the flag and its parameters are tagged `sequence_parallel = True`, as Megatron's fused norms
     are, so finalize_model_grads all-reduces their gradients across tensor-parallel ranks.
 14. the MoE alltoall dispatcher moves its split sizes to the host with `maybe_move_tensor_to_cpu(...,
     as_numpy=True)`, which converts only CUDA tensors; torch's all_to_all_single refuses a tensor
     of sizes -> a CPU tensor asked for as numpy is converted too.
 15. (time, not CUDA) Megatron's torch_dist checkpoint writer takes its results queue from a
     multiprocessing Manager started with 'spawn', which imports the entry module, torch and
     Megatron again: ~20 s of CPU in every process that saves, more than the tiny models' whole
     training -> the Manager is started with 'fork', as Megatron's persistent async worker starts it.
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
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.moe.token_dispatcher",
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
    # 10. type-name checks in optimizers and clipping
    _accept_cpu_tensors_in_type_checks()
    # 11. sequence-parallel norms
    _tag_sequence_parallel_norms()
    # 14. the MoE alltoall dispatcher's split sizes
    _moe_split_sizes_as_numpy()
    # 15. the checkpoint writer's results queue
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.get_write_results_queue = functools.partial(filesystem_async.get_write_results_queue,
                                                                 mp_mode="fork")
    _ENABLED = True


def adapt_args_to_cpu(args) -> None:
    """12. Megatron's default process-group backend, NCCL, needs GPUs: use gloo."""
    if args.distributed_backend == "nccl":
        args.distributed_backend = "gloo"


class _NullEvent:
    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass


class _NullStream:
    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


_NULL_STREAM = _NullStream()


class _CudaWithoutGpu(types.SimpleNamespace):
    """`torch.cuda` as Megatron's loop uses it, answered for a machine whose only device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_MEMORY = types.SimpleNamespace(counter=None)  # an object with .current and .peak bytes, or None


def set_memory_counter(counter) -> None:
    """8. Let the memory counters Megatron reads report `counter` (e.g. a LiveTensorMemory)."""
    _MEMORY.counter = counter


def _allocated(device=None) -> int:
    return 0 if _MEMORY.counter is None else _MEMORY.counter.current


def _max_allocated(device=None) -> int:
    return 0 if _MEMORY.counter is None else _MEMORY.counter.peak


def _reset_peak(device=None) -> None:
    if _MEMORY.counter is not None:
        _MEMORY.counter.peak = _MEMORY.counter.current


def _memory_stats(device=None) -> dict:
    return {"reserved_bytes.all.current": _allocated(), "allocated_bytes.all.current": _allocated(),
            "allocated_bytes.all.peak": _max_allocated(), "allocation.all.current": 0}


_CUDA = _CudaWithoutGpu(
    device_count=lambda: 1, set_device=lambda device: None, current_device=lambda: "cpu",
    Stream=lambda *args, **kwargs: _NULL_STREAM, current_stream=lambda device=None: _NULL_STREAM,
    stream=lambda stream=None: contextlib.nullcontext(), synchronize=lambda device=None: None,
    empty_cache=lambda: None, memory_allocated=_allocated, max_memory_allocated=_max_allocated,
    memory_reserved=_allocated, max_memory_reserved=_max_allocated, memory_stats=_memory_stats,
    reset_peak_memory_stats=_reset_peak,
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


def _accept_cpu_tensors_in_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as optimizer_module

    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer_module.clip_grad_by_total_norm_fp32 = clip
    for cls in (optimizer_module.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
                    torch.float16: "torch.cuda.HalfTensor"}


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _cuda_type_names():
    """Within, a CPU floating tensor's `.type()` answers with the CUDA type name of its dtype."""
    original = torch.Tensor.type

    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
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


def _moe_split_sizes_as_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
