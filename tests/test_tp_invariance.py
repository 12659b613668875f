"""One FORGE layer fed identical X and dY gets bit-identical weights and states at TP=1, 2 and 4
(sequence parallel off and on), on both backends: the tile reduction over tokens does not
depend on the shard; with bf16 weights and states stochastically rounded, neither do the random
bits. 4 gloo ranks on CPU, with exact inputs (helpers.shard_invariance_inputs: on CPU the GEMMs'
summation order is the BLAS's, which may depend on an element's position on some machines; on a
GPU the inputs are general random values)."""

import pytest
import torch
import torch.distributed as dist
from distributed import result, run_scenarios
from helpers import shard_invariance_inputs
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from forge_megatron import ForgeConfig
from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear

WORLD = 4
H, F, S, B = 40, 96, 12, 3  # F/4 = 24 and H are not tile multiples; S divisible by 4 for SP
RUNS = [(1, False), (2, False), (2, True), (4, False), (4, True)]


def _sliced(t, dim, tp):
    n, r = t.shape[dim] // tp, parallel_state.get_tensor_model_parallel_rank()
    return t.narrow(dim, r * n, n)


def _gathered(t, dim):
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def _run(tp, sp, backend, regime=None):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    dtype = torch.bfloat16 if regime else torch.float32
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, tensor_model_parallel_size=tp,
                               sequence_parallel=sp, use_cpu_initialization=True, gradient_accumulation_fusion=False,
                               params_dtype=dtype, bf16=regime is not None)
    forge = ForgeConfig("adamw", {"lr": 1e-2, "weight_decay": 0.1}, backend=backend, seed=3,
                        **(regime or {}))
    init = lambda w: torch.nn.init.normal_(w, std=0.5)  # noqa: E731
    column = ForgeColumnParallelLinear(H, F, config=config, init_method=init, bias=False, gather_output=False,
                                       forge=forge)
    row = ForgeRowParallelLinear(F, H, config=config, init_method=init, bias=False, input_is_parallel=True,
                                 skip_bias_add=False, forge=forge)
    # A SwiGLU fc1 (built with stride 2, as Megatron's MLP builds it): the local weight is
    # [gate_k; up_k] of the unsharded [gate; up].
    fc1 = ForgeColumnParallelLinear(H, 2 * F, config=config, init_method=init, bias=False, gather_output=False,
                                    forge=forge, stride=2)
    for index, layer in enumerate((column, row, fc1)):  # the ids a controller gives, the same at every TP size
        layer.forge.state.weight_id = index
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x1, dy1 = (shard_invariance_inputs(g, S, B, n, dtype=dtype) for n in (H, F))
        x2, dy2 = (shard_invariance_inputs(g, S, B, n, dtype=dtype) for n in (F, H))
        out, _ = column(_sliced(x1, 0, tp) if sp else x1)
        out.backward(_sliced(dy1, 2, tp))
        out, _ = row(_sliced(x2, 2, tp))
        out.backward(_sliced(dy2, 0, tp) if sp else dy2)
        dy3 = shard_invariance_inputs(g, S, B, 2 * F, dtype=dtype)
        out, _ = fc1(_sliced(x1, 0, tp) if sp else x1)
        out.backward(torch.cat([_sliced(dy3[..., :F], 2, tp), _sliced(dy3[..., F:], 2, tp)], dim=2))
    parts = _gathered(fc1.weight.detach(), 0).chunk(2 * tp)  # gate_0, up_0, gate_1, up_1, ...
    state = {"fc1 [gate; up]": torch.cat(parts[0::2] + parts[1::2]),
             "column": _gathered(column.weight.detach(), 0), "row": _gathered(row.weight.detach(), 1),
             "column.exp_avg_sq": _gathered(column.forge.state.tensors["exp_avg_sq"], 0),
             "row.exp_avg": _gathered(row.forge.state.tensors["exp_avg"], 1)}
    parallel_state.destroy_model_parallel()
    return state


def _compare(backend, regime=None):
    reference = _run(1, False, backend, regime)
    for tp, sp in RUNS[1:]:
        for name, value in _run(tp, sp, backend, regime).items():
            assert torch.equal(value, reference[name]), f"{backend} {regime}: {name} differs at tp={tp} sp={sp}"
    return True


def scenario_torch_backend():
    return _compare("torch")


def scenario_triton_backend():
    return _compare("triton")


def scenario_bf16_stochastic_rounding():
    """bf16 weights rounded stochastically, bf16 states: the random bits follow the global index."""
    return _compare("torch", {"weight_store": "sr", "state_dtype": "bf16"})


@pytest.fixture(scope="module")
def results():
    return run_scenarios(WORLD, [scenario_torch_backend, scenario_triton_backend, scenario_bf16_stochastic_rounding])


@pytest.mark.parametrize("scenario", ["torch_backend", "triton_backend", "bf16_stochastic_rounding"])
def test_gathered_weights_are_bit_identical_at_tp_1_2_4(results, scenario):
    assert result(results, f"scenario_{scenario}") == [True] * WORLD
