"""ForgeController's per-iteration policy on a FORGE layer (one gloo rank): the non-finite policy in
each clipping mode, the stop after too many bad iterations in a row, and the guard against a
second forward/backward of an iteration (Megatron's rerun state machine)."""

import dataclasses

import pytest
import torch
from distributed import result, run_scenarios
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from forge_megatron import ForgeConfig
from forge_megatron.megatron.controller import ForgeController
from forge_megatron.megatron.layers import ForgeColumnParallelLinear

IN, OUT, TOKENS = 64, 192, 16  # the CPU twin's 64 x 128 tiles: 3 x 1 tiles


def _layer_and_controller(clip_mode, max_bad=2):
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=4, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, params_dtype=torch.float32)
    layer = ForgeColumnParallelLinear(IN, OUT, config=config, init_method=torch.nn.init.normal_, bias=False,
                                      gather_output=True, forge=ForgeConfig("adamw", {"lr": 1e-2}))
    module = torch.nn.ModuleDict({"layer": layer})
    controller = ForgeController([module], OptimizerConfig(lr=1e-2, weight_decay=0.0), clip_grad=1.0,
                                 clip_mode=clip_mode, max_nonfinite_iterations=max_bad)
    return layer, controller


def _pass(layer, bad_row=None):
    """A forward_backward_func: one micro-batch; the output gradient of row `bad_row` is inf."""

    def forward_backward(**unused):
        x = torch.randn(TOKENS, 1, IN, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out, _ = layer(x)
        dy = torch.ones_like(out)
        if bad_row is not None:
            dy[..., bad_row] = float("inf")
        out.backward(dy)
        return [{"lm loss": torch.ones(2)}]

    return forward_backward


def scenario_stale_mode_skips_bad_tiles_and_the_rest_of_the_step():
    layer, controller = _layer_and_controller("stale")
    before = layer.weight.detach().clone()
    controller.forward_backward(_pass(layer), lambda: None, iteration=1)
    assert controller.step_decision(1) and layer.forge.state.step == 1
    assert not torch.equal(layer.weight, before)
    before = layer.weight.detach().clone()
    controller.forward_backward(_pass(layer, bad_row=5), lambda: None, iteration=2)
    assert not controller.step_decision(2)  # Megatron's optimizer step is skipped
    assert controller.nonfinite == IN and controller.nonfinite_streak == 1  # row 5 of dW
    assert torch.equal(layer.weight[:64], before[:64])  # the tile holding row 5 is unchanged
    assert not torch.equal(layer.weight[64:], before[64:])  # the other tiles stepped
    controller.forward_backward(_pass(layer), lambda: None, iteration=3)
    assert controller.step_decision(3) and controller.nonfinite_streak == 0  # a good iteration resets the count
    controller.forward_backward(_pass(layer, bad_row=70), lambda: None, iteration=4)
    assert not controller.step_decision(4)
    controller.forward_backward(_pass(layer, bad_row=70), lambda: None, iteration=5)
    with pytest.raises(RuntimeError, match="2 consecutive iterations with non-finite gradients.*"
                                           "--forge-max-nonfinite-iterations"):
        controller.step_decision(5)
    return True


def scenario_two_pass_mode_skips_the_whole_iteration():
    layer, controller = _layer_and_controller("two-pass")
    calls = []

    def counted(**kwargs):
        calls.append(kwargs.get("data_iterator"))
        return _pass(layer, bad_row=100)()

    before = layer.weight.detach().clone()
    controller.forward_backward(counted, lambda: None, iteration=1, data_iterator=iter([]))
    assert len(calls) == 1  # the norms-only pass found it: no second pass
    assert not controller.step_decision(1)
    assert torch.equal(layer.weight, before) and layer.forge.state.step == 0  # nothing written
    assert float(layer.forge.state.tensors["exp_avg"].abs().max()) == 0.0
    calls.clear()
    controller.forward_backward(lambda **kw: (calls.append(1), _pass(layer)())[1], lambda: None, iteration=2,
                                data_iterator=iter([]))
    assert len(calls) == 2 and controller.step_decision(2) and layer.forge.state.step == 1
    return True


def scenario_a_held_two_pass_gradient_is_applied_at_the_optimizer_step_or_never():
    """Two micro-batches: the norms-only pass holds their sum and writes nothing; a next
    iteration before the optimizer step is refused; `after_step` applies it with the coefficient
    of Megatron's norm. Non-finite values skip the step, and a step Megatron did not run (its
    update refused) writes nothing either: weight and state as they were."""
    layer, controller = _layer_and_controller("two-pass")

    def two(bad_row=None):
        return lambda **unused: [_pass(layer, bad_row)() for _ in range(2)][-1]

    start = layer.weight.detach().clone()
    controller.forward_backward(two(), lambda: None, iteration=1, num_microbatches=2)
    assert torch.equal(layer.weight, start) and layer.forge.state.step == 0 and controller.held
    with pytest.raises(RuntimeError, match="held update is still pending.*optimizer step did not run"):
        controller.forward_backward(two(), lambda: None, iteration=2, num_microbatches=2)
    assert controller.step_decision(1)
    controller.after_step(8.0, 1)  # Megatron's global norm, --clip-grad 1
    assert controller.grad_scale == pytest.approx(1 / (8.0 + 1e-6)) and layer.forge.state.step == 1
    assert not controller.held and not torch.equal(layer.weight, start)
    for iteration, bad_row, norm in ((2, 100, float("nan")), (3, None, 8.0)):
        before, exp_avg = layer.weight.detach().clone(), layer.forge.state.tensors["exp_avg"].clone()
        controller.forward_backward(two(bad_row), lambda: None, iteration=iteration, num_microbatches=2)
        assert controller.step_decision(iteration) == (bad_row is None)
        controller.after_step(norm, iteration, stepped=False)
        assert torch.equal(layer.weight, before) and torch.equal(layer.forge.state.tensors["exp_avg"], exp_avg)
        assert layer.forge.state.step == 1 and not controller.held
    return True


def scenario_a_second_forward_backward_of_an_iteration_is_refused():
    layer, controller = _layer_and_controller("off")
    controller.forward_backward(_pass(layer), lambda: None, iteration=7)
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="iteration 7 ran its forward and backward a second time.*"
                                           "--rerun-mode disabled"):
        controller.forward_backward(_pass(layer), lambda: None, iteration=7)
    assert torch.equal(layer.weight, before)
    return True


def scenario_the_kernel_applies_the_stale_clip_coefficient():
    """The scale the kernel multiplies the gradient by is Megatron's coefficient for the previous
    step's norm: the materialized gradient is the raw one (a standalone step of a copy at scale 1)
    times that fp32 coefficient, and the update is the rule on it."""
    from helpers import assert_bits_equal, reference_step, snapshot

    from forge_megatron import ForgeState, fused_update

    layer, controller = _layer_and_controller("stale")
    controller.grad_norm = 4.0  # as if the previous step's global norm were 4 (clip-grad 1)
    layer.forge.materialize = True
    w0, s0 = snapshot(layer.weight.detach(), layer.forge.state)
    x = torch.randn(TOKENS, 1, IN, generator=torch.Generator().manual_seed(0))
    copy, copy_state = w0.clone(), ForgeState(w0.clone(), "adamw", lr=1e-2)
    raw = fused_update(x, torch.ones(TOKENS, 1, OUT), copy, copy_state, materialize=True).grad
    controller.forward_backward(_pass(layer), lambda: None, iteration=1)
    coefficient = torch.tensor(1.0 / (4.0 + 1e-6), dtype=torch.float32)
    assert controller.grad_scale == pytest.approx(1.0 / (4.0 + 1e-6))
    assert_bits_equal(layer.forge.grad, raw * coefficient, "the kernel's scaled gradient")
    expected_w, _ = reference_step(w0, s0, layer.forge.state, layer.forge.grad, 1)
    assert_bits_equal(layer.weight.detach(), expected_w, "the update on the clipped gradient")
    return True


def scenario_accumulation_keeps_one_buffer_and_one_micro_batch_keeps_none():
    """Measured (LiveTensorMemory): an iteration of one micro-batch leaves nothing allocated; of
    four, exactly the accumulation buffer (the weight's size in the chosen dtype); freed with
    free_accumulation_buffers. The update comes at the fourth backward, once."""
    from forge_megatron.tools.benchmarking import LiveTensorMemory

    for dtype, width in (("fp32", 4), ("bf16", 2)):
        layer, controller = _layer_and_controller("off")
        layer.forge.config = dataclasses.replace(layer.forge.config, accumulation_dtype=dtype)
        controller.forward_backward(_pass(layer), lambda: None, iteration=1)  # builds the table
        def micro_batches_of(layer):
            def run(**kwargs):
                for _ in range(kwargs["num_microbatches"]):
                    _pass(layer)()
                return []
            return run

        four = micro_batches_of(layer)
        for micro_batches, iteration, expected in ((1, 2, 0), (4, 3, width * IN * OUT)):
            with LiveTensorMemory() as tracker:
                before = layer.forge.state.step
                controller.forward_backward(four, lambda: None, iteration=iteration, num_microbatches=micro_batches)
            assert tracker.current == expected, (dtype, micro_batches, tracker.current)
            assert layer.forge.state.step == before + 1
        controller.free_accumulation_buffers = True
        with LiveTensorMemory() as tracker:
            controller.forward_backward(four, lambda: None, iteration=4, num_microbatches=4)
        assert tracker.current == 0 and layer.forge.buffer is None
        parallel_state.destroy_model_parallel()
    return True


SCENARIOS = [scenario_accumulation_keeps_one_buffer_and_one_micro_batch_keeps_none,
             scenario_the_kernel_applies_the_stale_clip_coefficient,
             scenario_stale_mode_skips_bad_tiles_and_the_rest_of_the_step,
             scenario_two_pass_mode_skips_the_whole_iteration,
             scenario_a_held_two_pass_gradient_is_applied_at_the_optimizer_step_or_never,
             scenario_a_second_forward_backward_of_an_iteration_is_refused]


@pytest.fixture(scope="module")
def results():
    return run_scenarios(1, SCENARIOS)


@pytest.mark.parametrize("name", [s.__name__ for s in SCENARIOS])
def test_controller(results, name):
    assert result(results, name) == [True]
