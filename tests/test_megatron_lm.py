"""The Megatron-LM integration (forge_megatron.megatron.hook, applied by patches/pretrain_gpt.patch),
exercised on CPU around megatron-core's real model builder and scheduler; Megatron-LM's optimizer
needs CUDA, so a stand-in with its interface checks the optimizer hooks."""

import os

import pytest
import torch
from distributed import result, run_scenarios

BASE = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 10 --lr 1e-3 "
        "--lr-warmup-iters 2 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 --transformer-impl local "
        "--no-gradient-accumulation-fusion --no-persist-layer-norm --normalization RMSNorm "
        "--position-embedding-type rope --no-rope-fusion --untie-embeddings-and-output-weights --use-cpu-initialization "
        "--tokenizer-type NullTokenizer --vocab-size 128 --mock-data --use-forge --forge-cover-output-layer --forge-core-attention sdpa").split()


class StandInOptimizer:
    """The interface of a Megatron optimizer that FORGE's hooks use."""

    def __init__(self, grads):
        self.grads = grads
        self.loaded = None

    def get_grads_for_grad_norm(self):
        return list(self.grads)

    def step(self):
        norm = torch.stack([g.float().square().sum() for g in self.get_grads_for_grad_norm()]).sum().sqrt()
        return True, float(norm), 0

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, **kwargs):
        return {"param_groups": []}

    def load_state_dict(self, state_dict):
        self.loaded = state_dict


def _model_and_controller():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    from forge_megatron.megatron import hook as megatron_lm

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import sys

    saved, sys.argv = sys.argv, ["pretrain_gpt.py", *BASE]
    try:
        args = parse_args(extra_args_provider=megatron_lm.add_forge_args)
    finally:
        sys.argv = saved
    validate_args(args)
    set_args(args)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    model_cfg = gpt_config_from_args(args)
    megatron_lm.enable_forge(args, model_cfg)
    megatron_lm.enable_forge(args, model_cfg)  # safe twice
    assert len(model_cfg.pre_wrap_hooks) == 1
    model_cfg.vocab_size = args.vocab_size
    from megatron.core.process_groups_config import ProcessGroupCollection

    builder = model_cfg.get_builder_cls()(model_cfg)
    model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups(), pre_process=True,
                                post_process=True)
    chunks = model_cfg.pre_wrap_hooks[0]([model])
    return args, chunks, megatron_lm._STATE["controller"]


def scenario_layer_spec_and_pre_wrap_hook():
    from forge_megatron.megatron.attention import SDPAttention
    from forge_megatron.megatron.layers import ForgeColumnParallelLinear, ForgeRowParallelLinear

    args, (model,), controller = _model_and_controller()
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention, SDPAttention)  # --forge-core-attention sdpa
    assert isinstance(layer.self_attention.linear_qkv, ForgeColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, ForgeRowParallelLinear)
    assert isinstance(model.output_layer, ForgeColumnParallelLinear)  # --forge-cover-output-layer
    assert len(controller.params) == 2 * 4 + 1
    assert not any(p.requires_grad for _, p in controller.named)
    return True


def scenario_optimizer_hooks():
    from megatron.core import parallel_state

    from forge_megatron.megatron import hook as megatron_lm

    args, (model,), controller = _model_and_controller()
    for p in controller.params:
        p.sumsq = torch.tensor(4.0)
    other = [torch.full((3,), 2.0)]
    optimizer = StandInOptimizer(other)
    megatron_lm.attach_to_optimizer(optimizer, controller)
    grads = optimizer.get_grads_for_grad_norm()
    assert len(grads) == 2 and float(grads[-1].square().sum()) == pytest.approx(4.0 * len(controller.params))
    ok, norm, _ = optimizer.step()
    assert norm == pytest.approx((12.0 + 4.0 * len(controller.params)) ** 0.5)
    assert controller.grad_norm == norm  # reported back: stale clipping's next coefficient
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    model_sd = model.sharded_state_dict(metadata=metadata)
    state = optimizer.sharded_state_dict(model_sd)
    assert set(state["forge"]) == {name for name, _ in controller.named}
    for p in controller.params:
        p.state.tensors["exp_avg"].fill_(1.5)
        p.state.step = 7
    saved = {name: {k: (v.data.clone() if hasattr(v, "data") else v) for k, v in entry.items()}
             for name, entry in controller.sharded_state_dict(model_sd).items()}
    for p in controller.params:
        p.state.tensors["exp_avg"].zero_()
        p.state.step = 0
    optimizer.load_state_dict({"param_groups": [], "forge": saved})
    assert optimizer.loaded == {"param_groups": []}
    assert all(p.state.step == 7 and float(p.state.tensors["exp_avg"].min()) == 1.5 for p in controller.params)
    return True


def scenario_scheduler_and_forward_backward_hooks():
    from megatron.training import training

    from forge_megatron.megatron import hook as megatron_lm

    args, (model,), controller = _model_and_controller()
    groups = [{"params": [], "wd_mult": 1.0, "max_lr": args.lr, "min_lr": 0.0}]
    stand_in = type("Opt", (), {"param_groups": groups})()
    scheduler = training.get_optimizer_param_scheduler(stand_in)
    for _ in range(3):
        scheduler.step(increment=args.global_batch_size)
        assert all(p.state.hyperparameters["lr"] == groups[0]["lr"] for p in controller.params)
        assert all(p.state.hyperparameters["weight_decay"] == groups[0]["weight_decay"] for p in controller.params)
    calls = []

    def fake_forward_backward(**kwargs):
        calls.append((kwargs["data_iterator"], [p.grad_scale for p in controller.params][0]))
        return []

    wrapped = megatron_lm._wrap_forward_backward_factory(lambda *a, **k: fake_forward_backward)()
    controller.grad_norm = 4.0
    wrapped(model=[model], data_iterator="batches", forward_only=False)
    assert calls == [("batches", pytest.approx(1.0 / (4.0 + 1e-6)))]  # stale: previous norm 4, clip 1
    return True


@pytest.fixture(scope="module")
def results():
    return run_scenarios(1, [scenario_layer_spec_and_pre_wrap_hook, scenario_optimizer_hooks,
                             scenario_scheduler_and_forward_backward_hooks])


@pytest.mark.parametrize("name", ["scenario_layer_spec_and_pre_wrap_hook", "scenario_optimizer_hooks",
                                  "scenario_scheduler_and_forward_backward_hooks"])
def test_megatron_lm_hooks(results, name):
    assert result(results, name) == [True]


def test_patch_targets_the_named_release():
    patch = open(os.path.join(os.path.dirname(__file__), "..", "patches", "pretrain_gpt.patch")).read()
    assert "enable_forge(args, model_cfg)" in patch and "add_forge_args(" in patch
