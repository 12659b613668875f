"""Host work around the fused step: in training (weights bound to the controller's StepTable) a
covered weight's step is exactly one kernel launch, with no other device op, copy or sync
around it; per step, the whole model's scalars are derived on the device (no copy from the host
unless the lr or weight decay changed: then one) and its by-products come back in one
reduction. Counted with a dispatch mode that sees every aten op: each one is a launch (or a copy)
on a GPU. Runs on a GPU (the layers on it) and on CPU (the Triton kernel interpreted)."""

import pytest
import torch
from distributed import result, run_scenarios
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from forge_megatron import ForgeConfig
from forge_megatron.core import kernels
from forge_megatron.core.param import ForgeParam
from forge_megatron.megatron.controller import ForgeController
from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear

HIDDEN, FFN, TOKENS = 64, 128, 8


class DeviceOps(TorchDispatchMode):
    """Records the aten ops that compute or allocate (views, which alias an input, are free), and
    lift_fresh (a tensor made from host data, copied to the device on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if not outputs or any(t.untyped_storage().data_ptr() not in inputs for t in outputs) or \
                    func._schema.is_mutable or func.overloadpacket.__name__ == "lift_fresh":
                self.ops.append(str(func.overloadpacket.__name__))
        return out


def scenario_one_launch_per_weight_and_one_reduction_per_step():
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                               use_cpu_initialization=device.type == "cpu", gradient_accumulation_fusion=False,
                               params_dtype=torch.float32)
    forge = ForgeConfig("adamw", {"lr": 1e-2}, backend="triton")
    fc1 = ForgeColumnParallelLinear(HIDDEN, FFN, config=config, init_method=torch.nn.init.normal_, bias=False,
                                    gather_output=True, forge=forge)
    fc2 = ForgeRowParallelLinear(FFN, HIDDEN, config=config, init_method=torch.nn.init.normal_, bias=False,
                                 input_is_parallel=False, skip_bias_add=True, forge=forge)
    controller = ForgeController([torch.nn.ModuleList([fc1, fc2])], OptimizerConfig(lr=1e-2), clip_grad=1.0,
                                 clip_mode="stale")
    counter, launches, steps = DeviceOps(), [], []
    launch, step = kernels.launch, ForgeParam.step

    def counted_launch(*args, **kwargs):
        launches.append(1)
        counter.paused = True  # the interpreter's own work stands for the one launch
        try:
            return launch(*args, **kwargs)
        finally:
            counter.paused = False

    def counted_step(self, *args):
        before = len(counter.ops)
        with counter:
            step(self, *args)
        steps.append(counter.ops[before:])

    def forward_backward(**unused):
        x = torch.randn(TOKENS, 1, HIDDEN, device=device, requires_grad=True)
        out, _ = fc2(fc1(x)[0])
        out.sum().backward()
        return []

    kernels.launch, ForgeParam.step = counted_launch, counted_step
    try:
        for iteration in (1, 2, 3):
            controller.forward_backward(forward_backward, lambda: None, iteration=iteration)
            with counter:
                assert controller.step_decision(iteration)
            per_step = counter.ops
            counter.ops = []
            assert per_step.count("sum") == 1, per_step  # one reduction of all by-products
            assert "_local_scalar_dense" in per_step  # (and the one sync that reads it, for the decision)
    finally:
        kernels.launch, ForgeParam.step = launch, step
    assert len(launches) == 2 * 3  # one per weight and step
    # and nothing else around it (the very first step also copies the 8-bit code tables, once per device)
    assert steps[0] in ([], ["lift_fresh"]) and steps[1:] == [[]] * 5, steps
    assert fc1.weight.device.type == device.type
    with counter:
        controller.table.write(0.5)  # the next step, the same lr: derived on the device
    assert "lift_fresh" not in counter.ops and "_local_scalar_dense" not in counter.ops, counter.ops
    for param in controller.params:
        param.state.set_hyperparameters(lr=5e-3)
    counter.ops = []
    with counter:
        controller.table.write(0.5)  # a new lr: one copy of every weight's schedule
    assert counter.ops.count("lift_fresh") == 1 and "_local_scalar_dense" not in counter.ops, counter.ops
    return True


@pytest.fixture(scope="module")
def results():
    return run_scenarios(1, [scenario_one_launch_per_weight_and_one_reduction_per_step])


def test_one_launch_per_weight_and_step(results):
    assert result(results, "scenario_one_launch_per_weight_and_one_reduction_per_step") == [True]
