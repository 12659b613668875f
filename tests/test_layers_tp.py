"""FORGE Column/Row parallel linears on 2 gloo ranks (CPU): exactness per shard, Megatron's DDP and
optimizer, Float16Module, the frozen-input case and the refused configurations."""

import pytest
import torch
from distributed import result, run_scenarios
from helpers import assert_bits_equal, reference_step, snapshot
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from forge_megatron import ForgeConfig
from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear

TP = 2
HIDDEN, FFN, SEQ, BATCH = 40, 96, 12, 3
ADAMW = ForgeConfig("adamw", {"lr": 1e-2, "weight_decay": 0.1})


def init_std(x):
    return torch.nn.init.normal_(x, std=0.5)


def setup(tp=TP, sp=False, seed=1234, **overrides):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return model_config(tp, sp, **overrides)


def model_config(tp=TP, sp=False, **overrides):
    fields = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
                  tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1, use_cpu_initialization=True,
                  gradient_accumulation_fusion=False, params_dtype=torch.float32)
    return TransformerConfig(**{**fields, **overrides})


def mlp_pair(config, forge=ADAMW, bias=True):
    fc1 = ForgeColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_std, bias=bias, gather_output=False,
                                    forge=forge)
    fc2 = ForgeRowParallelLinear(FFN, HIDDEN, config=config, init_method=init_std, bias=bias, input_is_parallel=True,
                                 skip_bias_add=False, forge=forge)
    return fc1, fc2


def local_sequence(x, config):
    """The rank's sequence-parallel shard of a full [s, b, h] tensor (the whole tensor without SP)."""
    if not config.sequence_parallel:
        return x
    n = x.shape[0] // parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    return x[r * n:(r + 1) * n]


def scenario_each_shard_update_is_the_rule_on_its_own_shard_gradient():
    for sp in (False, True):
        config = setup(sp=sp)
        fc1, fc2 = mlp_pair(config)
        for layer in (fc1, fc2):
            layer.forge.materialize = True
        for step in range(1, 4):
            before = {layer: snapshot(layer.weight, layer.forge.state) for layer in (fc1, fc2)}
            x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(step))
            out, _ = fc2(torch.nn.functional.gelu(fc1(local_sequence(x, config))[0]))
            out.square().sum().backward()
            for layer in (fc1, fc2):
                w0, s0 = before[layer]
                expected_w, expected_s = reference_step(w0, s0, layer.forge.state, layer.forge.grad, step)
                assert_bits_equal(layer.weight, expected_w, f"{type(layer).__name__} sp={sp} step {step}")
                for name, tensor in layer.forge.state.tensors.items():
                    assert_bits_equal(tensor, expected_s[name], f"{type(layer).__name__} {name} step {step}")
                assert layer.weight.grad is None
            assert fc1.bias.grad is not None and fc2.bias.grad is not None
        assert fc1.weight.shape == (FFN // TP, HIDDEN) and fc2.weight.shape == (HIDDEN, FFN // TP)
        parallel_state.destroy_model_parallel()
    return True


def scenario_weight_gradient_matches_standard_megatron_layers():
    """The shard gradient FORGE consumes is megatron-core's own weight gradient: both layers see the
    same x and dy bits; their wgrad GEMMs sum the tokens in different orders, so each element of
    either is within gamma_T sum_t |dy_ti x_tj| of the exact float64 value. The input gradient is
    the standard layers' exactly (the same dgrad GEMM, the same collectives)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = setup(sp=True)
    fc1, fc2 = mlp_pair(config)
    seen = {}
    for layer in (fc1, fc2):
        layer.forge.materialize = True
        layer.forge.step = _recording(layer.forge.step, seen, layer)
    torch.manual_seed(1234)
    ref1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_std, bias=True, gather_output=False)
    ref2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init_std, bias=True, input_is_parallel=True,
                             skip_bias_add=False)
    assert torch.equal(ref1.weight, fc1.weight) and torch.equal(ref2.weight, fc2.weight)
    x = local_sequence(torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(7)), config)
    inputs = []
    for a, b in ((fc1, fc2), (ref1, ref2)):
        inputs.append(x.clone().requires_grad_(True))
        out, _ = b(torch.nn.functional.gelu(a(inputs[-1])[0]))
        out.square().sum().backward()
    # The input gradient (dgrad with the weight of the forward pass, then the sequence-parallel
    # reduce-scatter, through both layers) is the standard layers' bit for bit.
    assert torch.equal(inputs[0].grad, inputs[1].grad)
    for forge, ref in ((fc1, ref1), (fc2, ref2)):
        total_input, dy = (t.reshape(-1, t.shape[-1]).double() for t in seen[forge])
        tokens = total_input.shape[0]
        assert tokens == SEQ * BATCH  # the sequence-parallel shards were gathered
        exact = dy.T @ total_input
        bound = tokens * 2.0**-24 / (1 - tokens * 2.0**-24) * (dy.abs().T @ total_input.abs())
        for g in (forge.forge.grad.double(), ref.weight.grad.double()):
            assert bool(((g - exact).abs() <= bound).all())
    assert torch.equal(fc1.bias.grad, ref1.bias.grad) and torch.equal(fc2.bias.grad, ref2.bias.grad)
    return True


def _recording(step, seen, layer):
    def run(x, dy, weight):
        seen[layer] = (x.clone(), dy.clone())
        step(x, dy, weight)
    return run


def scenario_first_layer_after_a_frozen_input_still_updates():
    config = setup()
    fc1 = ForgeColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_std, bias=False, gather_output=True,
                                    forge=ADAMW)
    w0 = fc1.weight.clone()
    x = torch.randn(SEQ, BATCH, HIDDEN)  # requires_grad=False, and the layer has no bias
    out, _ = fc1(x)
    out.square().sum().backward()
    assert fc1.forge.state.step == 1 and not torch.equal(fc1.weight, w0)
    return True


def scenario_ddp_and_optimizer_see_only_uncovered_parameters():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    config = setup()
    fc1, fc2 = mlp_pair(config)
    model = torch.nn.Sequential(fc1, fc2)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    buffered = sum(buffer.numel_unpadded for buffer in ddp.buffers)
    expected = fc1.bias.numel() + fc2.bias.numel()
    assert buffered == expected, (buffered, expected)
    covered = {id(fc1.weight), id(fc2.weight)}
    assert not covered & {id(p) for p in ddp.param_to_bucket_group}
    groups = _get_param_groups([ddp], OptimizerConfig(optimizer="adam", lr=1e-3), None)
    in_optimizer = {id(p) for group in groups for p in group["params"]}
    assert in_optimizer == {id(fc1.bias), id(fc2.bias)}
    return buffered


def scenario_float16_module_keeps_forge_state_in_fp32():
    from megatron.core.transformer.module import Float16Module

    config = setup(bf16=True)
    fc1, fc2 = mlp_pair(config)
    fp32_weights = [fc1.weight.detach().clone(), fc2.weight.detach().clone()]
    model = Float16Module(config, torch.nn.Sequential(fc1, fc2))
    for layer, w in zip((fc1, fc2), fp32_weights):
        assert layer.weight.dtype == torch.bfloat16
        assert layer.forge.state.master.dtype == torch.float32
        assert torch.equal(layer.forge.state.master, w), "the master must be the pre-cast fp32 weight"
        assert all(t.dtype == torch.float32 for t in layer.forge.state.tensors.values())
    x = torch.randn(SEQ, BATCH, HIDDEN)
    hidden, _ = model.module[0](x.bfloat16())
    out, _ = model.module[1](torch.nn.functional.gelu(hidden))
    out.float().square().sum().backward()
    for layer, w in zip((fc1, fc2), fp32_weights):
        master = layer.forge.state.master
        assert layer.forge.state.step == 1 and not torch.equal(master, w)
        assert torch.equal(layer.weight, master.to(torch.bfloat16))
        assert all(t.dtype == torch.float32 for t in layer.forge.state.tensors.values())
    return True


def scenario_unsupported_configurations_are_refused_with_the_fix():
    messages = []
    config = setup()
    for kwargs, expected in [({"skip_weight_param_allocation": True}, "passed at forward time")]:
        with pytest.raises(ValueError, match=expected) as err:
            ForgeColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_std, **kwargs)
        messages.append(str(err.value))
    config.gradient_accumulation_fusion = True
    with pytest.raises(ValueError, match="--no-gradient-accumulation-fusion") as err:
        ForgeRowParallelLinear(FFN, HIDDEN, config=config, init_method=init_std, bias=False, input_is_parallel=True,
                               skip_bias_add=False)
    messages.append(str(err.value))
    config.gradient_accumulation_fusion = False
    fc1 = ForgeColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_std)
    other = ForgeColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init_std)
    other.weight = fc1.weight
    with pytest.raises(ValueError, match="already covered by another FORGE layer") as err:
        other._cover(ADAMW, partition_dim=0)
    messages.append(str(err.value))
    with pytest.raises(ValueError, match="got a weight at forward time"):
        fc1(torch.randn(SEQ, BATCH, HIDDEN), weight=torch.zeros_like(fc1.weight))
    half = model_config(params_dtype=torch.float16, fp16=True)
    with pytest.raises(TypeError, match="fp16 weights are not supported.*--bf16") as err:
        ForgeColumnParallelLinear(HIDDEN, FFN, config=half, init_method=init_std)
    messages.append(str(err.value))
    return messages


SCENARIOS = [
    scenario_each_shard_update_is_the_rule_on_its_own_shard_gradient,
    scenario_weight_gradient_matches_standard_megatron_layers,
    scenario_first_layer_after_a_frozen_input_still_updates,
    scenario_ddp_and_optimizer_see_only_uncovered_parameters,
    scenario_float16_module_keeps_forge_state_in_fp32,
    scenario_unsupported_configurations_are_refused_with_the_fix,
]


@pytest.fixture(scope="module")
def results():
    return run_scenarios(TP, SCENARIOS)


def test_each_shard_update_is_the_rule_on_its_own_shard_gradient(results):
    assert result(results, "scenario_each_shard_update_is_the_rule_on_its_own_shard_gradient") == [True, True]


def test_weight_gradient_matches_standard_megatron_layers(results):
    assert result(results, "scenario_weight_gradient_matches_standard_megatron_layers") == [True, True]


def test_first_layer_after_a_frozen_input_still_updates(results):
    assert result(results, "scenario_first_layer_after_a_frozen_input_still_updates") == [True, True]


def test_ddp_and_optimizer_see_only_uncovered_parameters(results):
    buffered = result(results, "scenario_ddp_and_optimizer_see_only_uncovered_parameters")
    assert buffered == [FFN // TP + HIDDEN] * TP


def test_float16_module_keeps_forge_state_in_fp32(results):
    assert result(results, "scenario_float16_module_keeps_forge_state_in_fp32") == [True, True]


def test_unsupported_configurations_are_refused_with_the_fix(results):
    messages = result(results, "scenario_unsupported_configurations_are_refused_with_the_fix")[0]
    assert len(messages) == 4
