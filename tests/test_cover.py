"""forge-pretrain-gpt builds the model Megatron-LM builds, and FORGE covers it after the build.

The launcher's model (its argument parsing and model config, Megatron's own builder) is compared,
parameter name by name and shape by shape, with the model Megatron-LM's gpt_builders.py (tag
core_v0.19.0) builds from the same flags with the local spec: its spec routing restated below
with megatron-core's own spec functions (dense layer spec, the decoder block spec with experts,
multi-latent attention, the multi-token-prediction block). Then `cover_model` turns every
coverable linear of each into its FORGE class and says why the others stay standard.
"""

import hashlib
import json
import os
import tempfile

import pytest
from distributed import result, run_scenarios

BASE = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 10 --lr 1e-3 "
        "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear "
        "--untie-embeddings-and-output-weights --use-cpu-initialization --tokenizer-type NullTokenizer "
        "--vocab-size 128 --mock-data").split()
MLA = ("--multi-latent-attention --q-lora-rank 32 --kv-lora-rank 16 --qk-head-dim 16 --qk-pos-emb-head-dim 8 "
       "--v-head-dim 16 --forge-core-attention sdpa").split()
# A Nemotron-style heterogeneous model (megatron-core reads an HF config): a normal layer, then one whose
# attention is replaced by a linear and whose MLP is gone
HETEROGENEOUS = json.dumps({
    "hidden_act": "silu", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
    "tie_word_embeddings": False, "rope_theta": 10000, "rope_scaling": {"factor": 8.0}, "block_configs": [
    {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
     "ffn": {"ffn_hidden_size": 96, "no_op": False, "replace_with_linear": False}},
    {"attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
     "ffn": {"ffn_hidden_size": None, "no_op": True, "replace_with_linear": False}}]})
# megatron-core builds heterogeneous layers from a config file (its encoded-JSON flag skips the config class)
HETEROGENEOUS_PATH = os.path.join(tempfile.gettempdir(),
                                  f"forge-heterogeneous-{hashlib.sha256(HETEROGENEOUS.encode()).hexdigest()[:12]}.json")
with open(HETEROGENEOUS_PATH, "w") as f:
    f.write(HETEROGENEOUS)
VARIANTS = {
    "dense": [],
    "heterogeneous": ["--heterogeneous-layers-config-path", HETEROGENEOUS_PATH, "--group-query-attention",
                      "--num-query-groups", "2", "--use-rope-scaling", "--rope-scaling-factor", "8.0",
                      "--use-rotary-position-embeddings"],
    "moe": "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 96 --moe-aux-loss-coeff 0.01".split(),
    "mla": MLA,
    "mtp": ["--mtp-num-layers", "1"],
}


def _megatron_lm_model(args, config):
    """The GPT Megatron-LM's gpt_builders.py builds with --transformer-impl local: the decoder
    block spec with experts, else the local layer spec (with MLA when asked); with MTP, its block
    from the last decoder layer's spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_decoder_layer_specs,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec

    if args.num_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                          qk_l2_norm=args.qk_l2_norm)
    elif args.heterogeneous_layers_config_path is not None:
        spec = get_gpt_heterogeneous_layer_spec(config, False)
    else:
        spec = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                                        config.multi_latent_attention, config.experimental_attention_variant,
                                        normalization=config.normalization)
    mtp = None
    if args.mtp_num_layers:
        last = get_gpt_decoder_layer_specs(config, use_transformer_engine=False, normalization=args.normalization,
                                           qk_l2_norm=args.qk_l2_norm)[-1]
        mtp = get_gpt_mtp_block_spec(config, last, use_transformer_engine=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=True, post_process=True,
                    parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, mtp_block_spec=mtp)


def _launcher_model(flags, base=BASE):
    """(args, the model forge-pretrain-gpt builds from `base` + `flags`, Megatron-LM's model from them)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.global_vars import unset_global_variables

    from forge_megatron.cli.pretrain_gpt import model_config, parse_arguments
    from forge_megatron.megatron.attention import core_attention

    unset_global_variables()
    args = parse_arguments([*base, *flags])
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    model_cfg = model_config(args)
    with core_attention(args.forge_core_attention):
        ours = model_cfg.get_builder_cls()(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups(),
                                                                   pre_process=True, post_process=True)
        theirs = _megatron_lm_model(args, core_transformer_config_from_args(args))
    return args, ours, theirs


def _shapes(model):
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def scenario_the_launcher_builds_megatron_lms_model():
    out = {}
    for variant, flags in VARIANTS.items():
        _, ours, theirs = _launcher_model(flags)
        out[variant] = (_shapes(ours), _shapes(theirs))
    return out


TIED = [f for f in BASE if f != "--untie-embeddings-and-output-weights"]


def scenario_cover_reports():
    """What cover_model covers in each model FORGE takes, why the rest stays standard, and which
    parameters no longer require grad (Megatron's DDP and optimizer skip those)."""
    from forge_megatron import ForgeConfig
    from forge_megatron.megatron.cover import cover_model
    from forge_megatron.megatron.layers import _ForgeLinear

    out = {}
    for variant, (base, flags) in {"dense": (BASE, []), "mla": (BASE, MLA), "mtp": (BASE, VARIANTS["mtp"]),
                                   "heterogeneous": (BASE, VARIANTS["heterogeneous"]), "tied": (TIED, [])}.items():
        args, model, _ = _launcher_model(flags, base)
        report = cover_model([model], ForgeConfig("adamw", {"lr": 1e-3}),
                             multi_token_prediction=bool(args.mtp_num_layers))
        forge_modules = [name for name, module in model.named_modules() if isinstance(module, _ForgeLinear)]
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        out[variant] = (dict(report.covered), report.standard, forge_modules, frozen, _updated(model, forge_modules))
    return out


def _updated(model, forge_modules) -> list[str]:
    """The covered modules whose weight one forward and backward changed (each covered weight
    steps on its own here, as a standalone layer)."""
    import torch

    modules = dict(model.named_modules())
    before = {name: modules[name].weight.detach().clone() for name in forge_modules}
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    model(tokens, positions, mask, labels=tokens).sum().backward()
    return [name for name in forge_modules if not torch.equal(before[name], modules[name].weight)]


def scenario_grouped_experts():
    """--moe-grouped-gemm: cover_model makes each SequentialMLP FORGE's grouped experts module
    (megatron/experts.py). Its parameters stay SequentialMLP's, as views of the stacked weights;
    one forward and backward steps every expert (those without tokens too: weight decay); a bf16
    conversion keeps the views, with an fp32 master equal to the fp32 weights."""
    import torch

    from forge_megatron import ForgeConfig
    from forge_megatron.megatron.cover import cover_model

    _, model, _ = _launcher_model(VARIANTS["moe"])
    keys = sorted(model.state_dict())
    report = cover_model([model], ForgeConfig("adamw", {"lr": 1e-3, "weight_decay": 0.1}), grouped_experts=True)
    experts = model.decoder.layers[0].mlp.experts
    stacked = {kind: experts.stacked(kind) for kind in ("linear_fc1", "linear_fc2")}

    def views() -> bool:
        return all(getattr(expert, kind).weight.data_ptr() == weight[e].data_ptr() and
                   getattr(expert, kind).weight.dtype == weight.dtype and not getattr(expert, kind).weight.requires_grad
                   for kind, weight in stacked.items() for e, expert in enumerate(experts.local_experts))

    out = {"class": type(experts).__name__, "covered": dict(report.covered), "same keys": sorted(model.state_dict()) ==
           keys, "views": views(), "shapes": {kind: tuple(w.shape) for kind, w in stacked.items()}}
    before = {kind: w.clone() for kind, w in stacked.items()}
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    model(tokens, torch.arange(16).expand(2, 16), mask, labels=tokens).sum().backward()
    out["stepped"] = {kind: [not torch.equal(before[kind][e], w[e]) for e in range(w.shape[0])]
                      for kind, w in stacked.items()}
    fp32 = {kind: w.clone() for kind, w in stacked.items()}
    model.bfloat16()
    out["bf16 views"] = views() and all(experts.stacked(kind) is w and w.dtype == torch.bfloat16
                                        for kind, w in stacked.items())
    out["masters"] = all(torch.equal(w._forge_param.state.master, fp32[kind]) for kind, w in stacked.items())
    return out


@pytest.fixture(scope="module")
def results():
    return run_scenarios(1, [scenario_the_launcher_builds_megatron_lms_model, scenario_cover_reports,
                             scenario_grouped_experts])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_launcher_builds_megatron_lms_model(results, variant):
    ours, theirs = result(results, "scenario_the_launcher_builds_megatron_lms_model")[0][variant]
    assert ours == theirs
    names = [n for n, _ in ours]
    expected = {"dense": "decoder.layers.0.mlp.linear_fc1.weight",
                "heterogeneous": "decoder.layers.1.self_attention.weight",
                "moe": "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight",
                "mla": "decoder.layers.0.self_attention.linear_kv_down_proj.weight",
                "mtp": "mtp.layers.0.eh_proj.weight"}[variant]
    assert expected in names


LAYER = {"linear_qkv": 2, "linear_proj": 2, "linear_fc1": 2, "linear_fc2": 2}


def test_cover_takes_every_linear_forge_can_own(results):
    reports = result(results, "scenario_cover_reports")[0]
    for variant, (_, _, modules, _, updated) in reports.items():
        assert updated == modules, variant  # every covered weight stepped in backward
    covered, standard, modules, frozen, _ = reports["dense"]
    assert covered == {**LAYER, "output_layer": 1} and standard == {}
    assert frozen == [f"{m}.weight" for m in modules]  # exactly the covered weights leave Megatron's optimizer
    covered, standard, *_ = reports["mla"]
    assert covered == {"linear_q_down_proj": 2, "linear_q_up_proj": 2, "linear_kv_down_proj": 2,
                       "linear_kv_up_proj": 2, "linear_proj": 2, "linear_fc1": 2, "linear_fc2": 2, "output_layer": 1}
    covered, standard, *_ = reports["mtp"]
    assert covered == {"linear_qkv": 3, "linear_proj": 3, "linear_fc1": 3, "linear_fc2": 3, "eh_proj": 1}
    assert standard == {"used for the main and every multi-token-prediction head's logits": ["output_layer"]}
    covered, standard, modules, *_ = reports["heterogeneous"]  # layer 1's attention is one linear
    assert covered == {"linear_qkv": 1, "linear_proj": 1, "linear_fc1": 1, "linear_fc2": 1, "self_attention": 1,
                       "output_layer": 1} and standard == {}
    assert "decoder.layers.1.self_attention" in modules
    covered, standard, *_ = reports["tied"]
    assert covered == LAYER
    assert standard == {"tied to the embedding: add --untie-embeddings-and-output-weights to cover it": ["output_layer"]}


def test_grouped_experts_replace_sequential_mlp_in_place(results):
    out = result(results, "scenario_grouped_experts")[0]
    assert out["class"] == "ForgeGroupedMLP"
    assert out["covered"] == {"linear_fc1 of grouped experts": 2, "linear_fc2 of grouped experts": 2,
                              "linear_qkv": 2, "linear_proj": 2, "output_layer": 1}
    assert out["same keys"] and out["views"] and out["bf16 views"] and out["masters"]
    assert out["shapes"] == {"linear_fc1": (4, 192, 64), "linear_fc2": (4, 64, 96)}  # SwiGLU: [E, 2 ffn, h]
    assert out["stepped"] == {"linear_fc1": [True] * 4, "linear_fc2": [True] * 4}
