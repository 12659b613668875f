"""Hugging Face import and export (forge_megatron/hf) against transformers, on CPU, with tiny
random Llama (untied, grouped-query attention, Llama-3 rope scaling), Qwen2 (q/k/v biases, tied
embeddings), Qwen3-MoE (8 experts, top-2, q/k norms) and Mixtral (4 experts, top-2) models built
from their configs; no downloads.

* the imported model's logits equal transformers' (fp32) at TP=1 and, loaded by Megatron's
  resharding from the same TP=1 checkpoint, at TP=2 (gloo ranks); Qwen3-MoE's also at expert-
  parallel size 2 (each rank holds 4 of the 8 experts);
* the export loads in transformers with no missing or unexpected keys, its weights are the
  original ones bit for bit and its logits equal the Megatron model's (with and without a source
  config.json);
* checkpoints in the Transformer Engine spec's layout (torch format, renamed; torch_dist, as is)
  load into the FORGE spec;
* end to end: a Hugging Face tokenizer trained here, its indexed dataset, an import, a few steps
  of `forge-pretrain-gpt --use-forge --finetune` at TP=2 + SP and PP=2 from it, an export, and
  transformers' loss on the held-out windows equals Megatron's "lm loss validation".
"""

import inspect
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from distributed import result, run_scenarios

from forge_megatron.hf.config import architecture, megatron_flags
from forge_megatron.hf.errors import ConversionError
from forge_megatron.hf.mapping import pack_qkv, unpack_qkv
from forge_megatron.hf.model import gpt_logits
from forge_megatron.hf.tiny import train_tokenizer

TOL = 1e-5  # fp32, relative (norm of the difference over the norm)
SEQ, EVAL_SAMPLES = 32, 8  # the fine-tune's sequence length; its validation set holds exactly 8 windows
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=300, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Qwen3-30B-A3B's shape in miniature (q/k norms, a head dimension that is not hidden / heads: 128 against
# 2048 / 32 there) with norm_topk_prob off (Megatron's --moe-router-pre-softmax); its published
# norm_topk_prob=true is Mixtral's routing (Megatron's default router), which the Mixtral model checks.
QWEN3_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False, head_dim=32)
MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)
MODELS = ("llama", "qwen2", "qwen3_moe", "mixtral")
MIXTURES = ("qwen3_moe", "mixtral")
WORK_ENV = "FORGE_HF_TEST_DIR"  # the spawned scenario ranks find the models here


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


# -- the Hugging Face side, in the test process --------------------------------------------------------


def _hf_model(name: str):
    import transformers as hf

    torch.manual_seed(MODELS.index(name))
    if name == "llama":
        model = hf.LlamaForCausalLM(hf.LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                                   bos_token_id=1, eos_token_id=2, pad_token_id=0))
    elif name == "qwen2":
        model = hf.Qwen2ForCausalLM(hf.Qwen2Config(**SHAPE, rope_theta=1000000.0, tie_word_embeddings=True))
    elif name == "qwen3_moe":
        model = hf.Qwen3MoeForCausalLM(hf.Qwen3MoeConfig(**SHAPE, **QWEN3_MOE))
    else:
        model = hf.MixtralForCausalLM(hf.MixtralConfig(**{**SHAPE, **MIXTRAL}))
    with torch.no_grad():  # norms and biases away from their 1 / 0 initialization, so that a swap shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def _texts():
    import fnmatch
    import shlex
    import textwrap

    return [inspect.getsource(textwrap), inspect.getsource(shlex)], inspect.getsource(fnmatch)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Four Hugging Face directories with reference logits, and the fine-tune's tokenizer and texts."""
    root = str(tmp_path_factory.mktemp("hf"))
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(7))
    for name in MODELS:
        model = _hf_model(name)
        model.save_pretrained(os.path.join(root, name, "hf"))
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": model(tokens).logits}, os.path.join(root, name, "reference.pt"))
    train_texts, held_out = _texts()
    # the llama directory is the fine-tune's
    tokenizer = train_tokenizer(train_texts, SHAPE["vocab_size"], os.path.join(root, "llama", "hf"))
    assert len(tokenizer) <= SHAPE["vocab_size"] and tokenizer.eos_token_id == 2
    with open(os.path.join(root, "texts.json"), "w") as f:
        json.dump({"train": train_texts, "held_out": held_out}, f)
    os.environ[WORK_ENV] = root
    return root


# -- Megatron side, on spawned gloo ranks -------------------------------------------------------------------


def _compare(name, model, padded):
    root = os.environ[WORK_ENV]
    reference = torch.load(os.path.join(root, name, "reference.pt"))
    logits = gpt_logits(model, reference["tokens"])
    vocab = SHAPE["vocab_size"]
    return {"rel": rel(logits[..., :vocab], reference["logits"]), "padded": logits.shape[-1],
            "padding_max": float(logits[..., vocab:].abs().max()) if padded > vocab else 0.0, "logits": logits}


def scenario_import_export_tp1():
    """Import the models (CLI entry point in-process), their TP=1 logits, export (with and without
    a source config), the Transformer Engine layouts, and the fine-tune's data and import."""
    from megatron.core import dist_checkpointing

    from forge_megatron.cli.hf_import import main as hf_import
    from forge_megatron.hf.config import read_config
    from forge_megatron.hf.exporter import export_hf, load_megatron_model

    root = os.environ[WORK_ENV]
    out = {}
    for name, padding in (("llama", []), ("qwen2", ["--tensor-model-parallel-size", "2"]), ("qwen3_moe", []),
                          ("mixtral", [])):
        d = os.path.join(root, name)
        hf_import([os.path.join(d, "hf"), os.path.join(d, "megatron"), *padding])
        _, model, ckpt = load_megatron_model(os.path.join(d, "megatron"), read_config(os.path.join(d, "hf")))
        out[name] = _compare(name, model, ckpt.padded_vocab)
        torch.save(out[name].pop("logits"), os.path.join(d, "megatron_logits.pt"))
        out[name]["keys"] = sorted(dist_checkpointing.load_tensors_metadata(ckpt.path))
        export_hf(os.path.join(d, "megatron"), os.path.join(d, "export"), hf_config_from=os.path.join(d, "hf"))
    llama = os.path.join(root, "llama")
    for name in ("llama", *MIXTURES):  # config.json from the checkpoint's saved arguments
        export_hf(os.path.join(root, name, "megatron"), os.path.join(root, name, "export-from-args"))
    hf_import([os.path.join(llama, "hf"), os.path.join(llama, "megatron-bf16"), "--bf16"])
    export_hf(os.path.join(llama, "megatron-bf16"), os.path.join(llama, "export-bf16"),
              hf_config_from=os.path.join(llama, "hf"))
    out["te"] = _te_layouts(llama)
    out["data"] = _finetune_data(root)
    hf_import([os.path.join(llama, "hf"), os.path.join(root, "imported"), "--padded-vocab-size", str(SHAPE["vocab_size"])])
    return out


def _te_layouts(d):
    """A TE-spec torch-format checkpoint (renamed on load) and a TE-spec torch_dist one (TE's
    _extra_state objects; the names are already TE's) load into the FORGE spec with the same logits."""
    from megatron.core import dist_checkpointing
    from megatron.training.global_vars import get_args

    from forge_megatron.hf.config import read_config
    from forge_megatron.hf.exporter import export_hf, load_megatron_model
    from forge_megatron.hf.relayout import to_local_release
    from forge_megatron.hf.te_layout import is_te_layout, local_to_te, te_to_local

    config = read_config(os.path.join(d, "hf"))
    _, model, _ = load_megatron_model(os.path.join(d, "megatron"), config)
    reference = gpt_logits(model, torch.load(os.path.join(d, "reference.pt"))["tokens"])
    local = model.state_dict()
    te = local_to_te(local)  # what a TE-spec model's state_dict() holds
    for key in [k for k in te if k.endswith("_extra_state")]:
        te[key] = io.BytesIO(b"TE FP8 metadata")  # TE's linears keep their FP8 state here
    te["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"")  # TEDotProductAttention's
    checks = {"te_names": is_te_layout(te) and "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
              and not any("input_layernorm" in k for k in te),
              "round_trip": list(te_to_local(local_to_te(local))) == list(local)}
    torch_dir = os.path.join(d, "te-torch")
    os.makedirs(os.path.join(torch_dir, "iter_0000007", "mp_rank_00"))
    torch.save({"model": te, "args": get_args(), "checkpoint_version": 3.0, "iteration": 7},
               os.path.join(torch_dir, "iter_0000007", "mp_rank_00", "model_optim_rng.pt"))
    with open(os.path.join(torch_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7")
    to_local_release(torch_dir, os.path.join(d, "te-local"))  # forge-te-to-local
    _, relaid, _ = load_megatron_model(os.path.join(d, "te-local"), config)
    checks["torch_format"] = bool(torch.equal(gpt_logits(relaid, torch.load(
        os.path.join(d, "reference.pt"))["tokens"]), reference))
    export_hf(torch_dir, os.path.join(d, "export-te"), hf_config_from=os.path.join(d, "hf"))

    sharded = model.sharded_state_dict()  # torch_dist: the local spec writes the norms under TE's names
    for value in sharded.values():
        if value.key.endswith("_extra_state"):
            value.data = io.BytesIO(b"TE FP8 metadata")
    dist_dir = os.path.join(d, "te-dist", "iter_0000003")
    os.makedirs(dist_dir)
    dist_checkpointing.save({"model": sharded, "args": get_args(), "checkpoint_version": 3.0, "iteration": 3},
                            dist_dir)
    with open(os.path.join(d, "te-dist", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3")
    _, loaded, ckpt = load_megatron_model(os.path.join(d, "te-dist"), config)
    checks["torch_dist_te_names"] = ckpt.te_layout
    checks["torch_dist"] = bool(torch.equal(gpt_logits(loaded, torch.load(
        os.path.join(d, "reference.pt"))["tokens"]), reference))
    return checks


def _finetune_data(root):
    """The fine-tune's training set (two documents) and held-out set (one document of exactly
    EVAL_SAMPLES windows: one epoch, so Megatron's evaluation sees every window, in some order)."""
    from forge_megatron.hf.dataset import tokenized_documents, write_hf_dataset, write_token_documents

    with open(os.path.join(root, "texts.json")) as f:
        texts = json.load(f)
    tokenizer_dir = os.path.join(root, "llama", "hf")
    write_hf_dataset(os.path.join(root, "data", "train"), tokenizer_dir, texts["train"])
    held_out = next(tokenized_documents(tokenizer_dir, [texts["held_out"]]))[:EVAL_SAMPLES * SEQ + 1]
    write_token_documents(os.path.join(root, "data", "valid"), [held_out], SHAPE["vocab_size"])
    torch.save(torch.from_numpy(held_out.astype("int64")), os.path.join(root, "data", "valid.pt"))
    return {"held_out_tokens": int(held_out.size)}


def scenario_reshard_tp2():
    """The TP=1-built imports loaded by Megatron at TP=2 (llama also with sequence parallelism)."""
    from forge_megatron.hf.checkpoint import Checkpoint, resolve
    from forge_megatron.hf.importer import read_flags
    from forge_megatron.hf.model import build_gpt

    root = os.environ[WORK_ENV]
    out = {}
    for name, extra in (("llama", ["--sequence-parallel"]), ("qwen2", [])):
        d = os.path.join(root, name, "megatron")
        _, model = build_gpt([*read_flags(d), "--seq-length", str(SEQ), "--tensor-model-parallel-size", "2", *extra])
        ckpt = Checkpoint(resolve(d))
        ckpt.load_into(model)
        out[name] = _compare(name, model, ckpt.padded_vocab)
        out[name].pop("logits")
    return out


def scenario_experts_ep2():
    """The TP=1-built Qwen3-MoE import loaded by Megatron at expert-parallel size 2 (experts 0-3 on
    rank 0, 4-7 on rank 1; the tokens of both ranks dispatched over the pair)."""
    from megatron.core import parallel_state

    from forge_megatron.hf.checkpoint import Checkpoint, resolve
    from forge_megatron.hf.importer import read_flags
    from forge_megatron.hf.model import build_gpt

    d = os.path.join(os.environ[WORK_ENV], "qwen3_moe", "megatron")
    _, model = build_gpt([*read_flags(d), "--seq-length", str(SEQ), "--expert-model-parallel-size", "2"])
    ckpt = Checkpoint(resolve(d))
    ckpt.load_into(model)
    out = _compare("qwen3_moe", model, ckpt.padded_vocab)
    out.pop("logits")
    out["experts"] = sum(1 for name, _ in model.named_parameters() if name.startswith("decoder.layers.0.mlp.experts.")
                         and name.endswith("linear_fc1.weight"))
    out["ep_rank"] = parallel_state.get_expert_model_parallel_rank()
    return out


@pytest.fixture(scope="module")
def tp1(work):
    return result(run_scenarios(1, [scenario_import_export_tp1]), "scenario_import_export_tp1")[0]


@pytest.fixture(scope="module")
def two_ranks(tp1):
    return run_scenarios(2, [scenario_reshard_tp2, scenario_experts_ep2])


@pytest.fixture(scope="module")
def tp2(two_ranks):
    return result(two_ranks, "scenario_reshard_tp2")


# -- tests -------------------------------------------------------------------------------------------------


def test_config_maps_to_megatron_flags_and_refuses_what_does_not_map():
    llama = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE}, "max_position_embeddings": 131072,
             "tie_word_embeddings": False, "hidden_act": "silu"}
    flags = " ".join(megatron_flags(llama))
    for expected in ("--num-query-groups 8", "--kv-channels 128", "--rotary-base 500000", "--norm-epsilon 1e-05",
                     "--use-rope-scaling --rope-scaling-factor 8.0", "--untie-embeddings-and-output-weights",
                     "--swiglu", "--normalization RMSNorm", "--disable-bias-linear", "--hidden-dropout 0.0"):
        assert expected in flags, expected
    assert "--add-qkv-bias" not in flags
    qwen = {**llama, "model_type": "qwen2", "tie_word_embeddings": True, "rope_scaling": None}
    assert "--add-qkv-bias" in megatron_flags(qwen) and "--untie-embeddings-and-output-weights" not in megatron_flags(qwen)
    new_style = {**llama, "rope_scaling": None, "rope_theta": None,  # transformers 5 writes rope_parameters
                 "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    assert "--rotary-base 10000" in " ".join(megatron_flags(new_style))
    mistral = {**llama, "model_type": "mistral", "rope_scaling": None, "sliding_window": 4096}
    qwen3_moe = {**llama, "model_type": "qwen3_moe", "rope_scaling": None, "head_dim": 128, "num_experts": 128,
                 "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True}  # Qwen3-30B-A3B's
    flags = " ".join(megatron_flags(qwen3_moe))
    for expected in ("--num-experts 128", "--moe-router-topk 8", "--moe-ffn-hidden-size 768", "--qk-layernorm",
                     "--moe-router-score-function softmax", "--kv-channels 128"):
        assert expected in flags, expected
    assert "--moe-router-pre-softmax" not in flags  # top-k renormalized: Megatron's default router
    assert "--moe-router-pre-softmax" in megatron_flags({**qwen3_moe, "norm_topk_prob": False})
    mixtral = {**llama, "model_type": "mixtral", "rope_scaling": None, "num_local_experts": 8, "num_experts_per_tok": 2}
    assert "--moe-ffn-hidden-size 14336" in " ".join(megatron_flags(mixtral))
    assert "--qk-layernorm" not in megatron_flags(mixtral) and "--moe-router-pre-softmax" not in megatron_flags(mixtral)
    assert "--seq-length" not in megatron_flags(mistral, seq_length=4096)  # the window never binds
    refused = {
        "yarn": {**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "llama3 factors": {**llama, "rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 2.0}},
        "activation": {**llama, "hidden_act": "gelu"},
        "biases": {**llama, "attention_bias": True},
        "model type": {**llama, "model_type": "qwen3"},
        "qwen2 window": {**qwen, "use_sliding_window": True},
        "mistral window": mistral,  # at the default (unbounded) sequence length
        "dense layers between the experts": {**qwen3_moe, "mlp_only_layers": [0]},
        "sparse step": {**qwen3_moe, "decoder_sparse_step": 2},
        "router jitter": {**mixtral, "router_jitter_noise": 0.1},
    }
    for case, config in refused.items():
        with pytest.raises(ConversionError):
            megatron_flags(config, seq_length=8192 if case == "mistral window" else None)
            pytest.fail(case)


def test_qkv_is_packed_per_query_group():
    """Rows labelled by head: group g holds its q heads, then its k head, then its v head."""
    config = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 8,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2, "vocab_size": 4}
    arch = architecture(config)
    q = torch.arange(4).repeat_interleave(2).float()[:, None].expand(8, 3)  # head h -> value h
    k, v = 10 + torch.arange(2).repeat_interleave(2).float()[:, None].expand(4, 3), \
        20 + torch.arange(2).repeat_interleave(2).float()[:, None].expand(4, 3)
    packed = pack_qkv(q, k, v, arch)
    assert packed[::2, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(unpack_qkv(packed, arch), (q, k, v)))
    bias = pack_qkv(q[:, 0], k[:, 0], v[:, 0], arch)
    assert torch.equal(bias, packed[:, 0])


def test_imported_model_matches_transformers_at_tp1(tp1):
    for name in MODELS:
        r = tp1[name]
        print(f"TP=1 {name}: logits relative difference to transformers {r['rel']:.2e}")
        assert r["rel"] <= TOL, (name, r["rel"])
        assert r["padding_max"] == 0.0  # padded vocabulary rows are zeros
    assert tp1["llama"]["padded"] == 384 and tp1["qwen2"]["padded"] == 512  # 300 padded for TP=1 / TP=2 (x 128)
    assert "output_layer.weight" in tp1["llama"]["keys"] and "output_layer.weight" not in tp1["qwen2"]["keys"]
    for name in MIXTURES:  # every expert under megatron-core's expert-sharded keys (they load at any EP)
        assert {"decoder.layers.mlp.router.weight", "decoder.layers.mlp.experts.experts.linear_fc1.weight",
                "decoder.layers.mlp.experts.experts.linear_fc2.weight"} <= set(tp1[name]["keys"])
    assert "decoder.layers.self_attention.q_layernorm.weight" in tp1["qwen3_moe"]["keys"]
    assert not any("q_layernorm" in key for key in tp1["mixtral"]["keys"])


def test_imported_mixture_of_experts_matches_transformers_at_ep2(two_ranks):
    ranks = result(two_ranks, "scenario_experts_ep2")
    assert [r["ep_rank"] for r in ranks] == [0, 1] and all(r["experts"] == 4 for r in ranks)
    for rank in ranks:
        print(f"EP=2 qwen3_moe: logits relative difference to transformers {rank['rel']:.2e}")
        assert rank["rel"] <= TOL, rank["rel"]


def test_imported_model_matches_transformers_at_tp2(tp2):
    for rank in tp2:
        for name in ("llama", "qwen2"):
            print(f"TP=2 {name}: logits relative difference to transformers {rank[name]['rel']:.2e}")
            assert rank[name]["rel"] <= TOL, (name, rank[name]["rel"])


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def test_export_reloads_in_transformers_with_the_megatron_logits(tp1, work):
    for name, export in (*((name, "export") for name in MODELS), ("llama", "export-te"),
                         *((name, "export-from-args") for name in ("llama", *MIXTURES))):
        d = os.path.join(work, name)
        exported, original = _load_hf(os.path.join(d, export)), _load_hf(os.path.join(d, "hf"))
        assert type(exported) is type(original)
        reference = dict(original.named_parameters())
        for param_name, param in exported.named_parameters():
            assert torch.equal(param, reference[param_name]), (export, param_name)  # the original weights, bit for bit
        tokens = torch.load(os.path.join(d, "reference.pt"))["tokens"]
        with torch.no_grad():
            logits = exported(tokens).logits
        megatron = torch.load(os.path.join(d, "megatron_logits.pt"))[..., :SHAPE["vocab_size"]]
        print(f"{name} {export}: transformers against Megatron logits {rel(logits, megatron):.2e}")
        assert rel(logits, megatron) <= TOL, (name, export)
    assert _load_hf(os.path.join(work, "qwen2", "export")).lm_head.weight is not None


def test_bf16_import_and_export_keep_the_bf16_weights(tp1, work):
    d = os.path.join(work, "llama")
    with open(os.path.join(d, "export-bf16", "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    exported, original = _load_hf(os.path.join(d, "export-bf16")), _load_hf(os.path.join(d, "hf"))
    reference = dict(original.named_parameters())
    for param_name, param in exported.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, reference[param_name].to(torch.bfloat16))


def test_transformer_engine_layouts_load_into_the_forge_spec(tp1):
    te = tp1["te"]
    assert te["te_names"] and te["round_trip"]
    assert te["torch_format"]  # renamed state dict, same logits bit for bit
    assert te["torch_dist_te_names"] and te["torch_dist"]  # TE names and TE _extra_state, loaded as they are
    keys = tp1["llama"]["keys"]  # what megatron-core writes for the local spec
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert not any("input_layernorm" in k for k in keys)


def _cli(module, *argv, timeout=300):
    """A console entry point (forge-hf-export is forge_megatron.cli.hf_export) in a fresh process."""
    return subprocess.run([sys.executable, "-m", f"forge_megatron.cli.{module}", *argv], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_finetune_with_forge_then_export_matches_transformers_on_held_out_text(tp1, work, tmp_path):
    """Imported (TP=1 build) -> forge-pretrain-gpt --use-forge --finetune at TP=2 + SP and PP=2 on a
    Hugging Face tokenizer's dataset -> forge-hf-export -> transformers' loss on the held-out windows."""
    from forge_megatron.tools.benchmarking import run_pretrain, tensorboard_records

    assert tp1["data"]["held_out_tokens"] == EVAL_SAMPLES * SEQ + 1
    hf_dir, imported = os.path.join(work, "llama", "hf"), os.path.join(work, "imported")
    with open(os.path.join(imported, "model_flags.txt")) as f:
        model_flags = f.read().split()
    tb, save = str(tmp_path / "tb"), str(tmp_path / "finetuned")
    argv = [*model_flags, "--load", imported, "--finetune", "--use-forge",
            "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",  # the rest: model_flags
            "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--pipeline-model-parallel-size", "2",
            "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "5",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--lr-decay-style", "constant", "--weight-decay", "0",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
            "--train-data-path", os.path.join(work, "data", "train"),
            "--valid-data-path", os.path.join(work, "data", "valid"), "--data-cache-path", str(tmp_path / "cache"),
            "--eval-interval", "1000", "--eval-iters", str(EVAL_SAMPLES // 4), "--log-interval", "1",
            "--tensorboard-dir", tb, "--tensorboard-log-interval", "1", "--save", save, "--save-interval", "5"]
    proc = run_pretrain(argv, nproc=4, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "loading release distributed checkpoint" in proc.stdout + proc.stderr
    from megatron.core import dist_checkpointing

    from forge_megatron.megatron.world import init_world_of_one

    init_world_of_one()  # dist_checkpointing reads through torch.distributed.checkpoint
    steps = [k for k in dist_checkpointing.load_tensors_metadata(os.path.join(save, "iter_0000005"))
             if k.startswith("optimizer.forge.step.")]
    assert len(steps) == 9, steps  # FORGE trained 4 weights per layer and the output layer, over both stages
    losses = [r["lm loss validation"] for r in tensorboard_records(tb) if "lm loss validation" in r]
    assert len(losses) == 1

    export = str(tmp_path / "export")
    proc = _cli("hf_export", save, export, "--hf-config-from", hf_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert os.path.exists(os.path.join(export, "tokenizer.json"))
    model, original = _load_hf(export), _load_hf(hf_dir)
    changes = {n: rel(p, q) for (n, p), (_, q) in zip(model.named_parameters(), original.named_parameters())}
    assert 0 < max(changes.values()) < 0.2, changes  # fine-tuned from the import (a fresh init would be ~1.4 away)

    windows = torch.load(os.path.join(work, "data", "valid.pt")).unfold(0, SEQ + 1, SEQ)  # Megatron's samples
    assert windows.shape == (EVAL_SAMPLES, SEQ + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits.double()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    print(f"held-out loss: transformers {float(loss):.7f}, Megatron {losses[0]:.7f}, relative "
          f"{abs(float(loss) - losses[0]) / losses[0]:.2e}; largest weight change {max(changes.values()):.3f}")
    assert abs(float(loss) - losses[0]) <= TOL * losses[0], (float(loss), losses[0])


def test_cli_refuses_a_config_that_does_not_map_in_one_line(tmp_path, work):
    d = tmp_path / "yarn"
    d.mkdir()
    with open(os.path.join(work, "llama", "hf", "config.json")) as f:
        config = json.load(f)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(config))
    proc = _cli("hf_import", str(d), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("forge-hf-import: error: rope scaling 'yarn'")


def test_a_torch_checkpoint_that_needs_code_to_unpickle_is_refused(tmp_path):
    """Torch-format checkpoints are unpickled with weights_only=True: an entry whose unpickling
    calls a function (here open(); os.system alike) is refused in one line, and nothing runs."""
    from forge_megatron.hf.checkpoint import TORCH_FILE, Checkpoint, resolve

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "ckpt" / "iter_0000001" / TORCH_FILE
    path.parent.mkdir(parents=True)
    torch.save({"model": {}, "args": Payload(), "iteration": 1}, path)
    with pytest.raises(ConversionError) as refused:
        Checkpoint(resolve(str(tmp_path / "ckpt"), 1))
    assert str(refused.value) == (
        f"{path} is not read: unpickling it needs _io.open, which torch.load(weights_only=True) refuses because "
        "it could run code; if you trust the file, convert it with Megatron's --ckpt-convert-format torch_dist under "
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1")
    assert not marker.exists()


def test_forge_hf_dataset_without_a_usable_tokenizer_is_one_line(tmp_path, capsys):
    """A model directory made from a config alone (a random model) has no tokenizer; one without
    an eos_token gives Megatron no end-of-document id."""
    from transformers import LlamaConfig

    from forge_megatron.cli.hf_dataset import main as hf_dataset

    text = tmp_path / "text.txt"
    text.write_text("def f():\n    return 1\n")
    LlamaConfig(**SHAPE).save_pretrained(tmp_path / "model-only")
    no_eos = train_tokenizer([text.read_text()], 300)
    no_eos.eos_token = None
    no_eos.save_pretrained(tmp_path / "no-eos")
    for directory, message in (
            ("model-only", r"no usable Hugging Face tokenizer there \(.+\); save the model's tokenizer into it "
                           r"\(tokenizer.save_pretrained\), or train one with the tokenizers library as "
                           r"scripts/finetune_tiny_cpu.py does"),
            ("no-eos", r"the tokenizer has no eos_token, and Megatron needs an end-of-document id; set one "
                       r"\(tokenizer.eos_token = ...\) and save it again")):
        with pytest.raises(SystemExit) as exited:
            hf_dataset([str(tmp_path / "out"), "--tokenizer-model", str(tmp_path / directory), str(text)])
        assert exited.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1, errors
        assert re.fullmatch(f"forge-hf-dataset: error: --tokenizer-model {tmp_path / directory}: {message}", errors[0])
    assert not (tmp_path / "out.idx").exists()
