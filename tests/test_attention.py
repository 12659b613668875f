"""SDPAttention (torch's fused attention) against megatron-core's DotProductAttention, on 2 gloo
ranks (CPU): the same context and input gradients at TP=1 and on each TP=2 head shard (grouped-
query attention, causal with and without an explicit mask, an arbitrary mask, fp32 and bf16), and a
tiny GPT trained 5 steps with FORGE and either attention.

The two compute the same softmax(QKᵀ·scale)·V in another order (a fused online softmax against
scores, then probabilities), so they agree to rounding, not bit for bit: fp32 at 1e-5 relative
(the sums run over 24 keys of O(1) terms: a few units of fp32's 6e-8, with margin), bf16 at 2e-2
(DotProductAttention rounds its probabilities to bf16 before the product with V: 2⁻⁸ relative per
term; SDPA keeps them in fp32).
"""

import functools

import pytest
import torch
from distributed import result, run_scenarios
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from test_models_tp import _gpt, _gpt_batch, _train

from forge_megatron.megatron import attention
from forge_megatron.megatron.attention import SDPAttention, core_attention

WORLD = 2
HEADS, GROUPS, D, S, B = 4, 2, 8, 24, 3
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _config(tp, **fields):
    return TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS, num_query_groups=GROUPS,
                             tensor_model_parallel_size=tp, use_cpu_initialization=True, attention_dropout=0.0,
                             hidden_dropout=0.0, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
                             **fields)


def _masks():
    causal = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1)
    drop = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(7)) < 0.3
    drop[..., torch.arange(S), torch.arange(S)] = False  # no row drops every key
    return {"causal, no mask": (AttnMaskType.causal, None), "causal, mask": (AttnMaskType.causal, causal),
            "arbitrary mask": (AttnMaskType.padding, drop)}


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def scenario_matches_dot_product_attention():
    """{(tp, dtype, mask, gqa path): largest relative difference of context, dq, dk, dv} on this
    rank, with keys and values repeated per head (the CPU path) and through enable_gqa (the flash
    path on a GPU, forced here)."""
    out = {}
    for native_gqa in (False, True):
        attention.uses_native_gqa = lambda query, mask, native_gqa=native_gqa: native_gqa
        out.update({(*key, f"native gqa {native_gqa}"): diff for key, diff in _compare_on_tp_1_and_2().items()})
    return out


def _compare_on_tp_1_and_2():
    out = {}
    for tp in (1, 2):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        model_parallel_cuda_manual_seed(3)
        rank = parallel_state.get_tensor_model_parallel_rank()
        heads, groups = HEADS // tp, GROUPS // tp
        for dtype in (torch.float32, torch.bfloat16):
            config = _config(tp, bf16=dtype == torch.bfloat16, params_dtype=dtype)
            g = torch.Generator().manual_seed(11)
            q, k, v = (torch.randn(S, B, n, D, generator=g)[:, :, rank * (n // tp):(rank + 1) * (n // tp)]
                       .to(dtype) for n in (HEADS, GROUPS, GROUPS))
            assert q.shape[2] == heads and k.shape[2] == groups
            dcontext = torch.randn(S, B, heads * D, generator=g).to(dtype)
            causal = _masks()["causal, mask"][1]
            for name, (mask_type, mask) in _masks().items():
                results = []
                for cls in (SDPAttention, DotProductAttention):
                    module = cls(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
                    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
                    # Megatron builds its default causal mask on "cuda": give the reference one.
                    given = mask if mask is not None or cls is SDPAttention else causal
                    context = module(*inputs, given)
                    context.backward(dcontext)
                    results.append([context, *(t.grad for t in inputs)])
                out[(tp, str(dtype), name)] = max(_relative(a, b) for a, b in zip(*results))
        parallel_state.destroy_model_parallel()
    return out


def scenario_dropout_and_refusals():
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(5)
    config = _config(1)
    module = SDPAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.5)
    q, k, v = torch.randn(S, B, HEADS, D), torch.randn(S, B, GROUPS, D), torch.randn(S, B, GROUPS, D)
    plain = module.eval()(q, k, v, None)
    dropped = module.train()(q, k, v, None)
    outcome = {"dropout changes the training context": not torch.equal(plain, dropped),
               "no dropout in eval": torch.equal(plain, module.eval()(q, k, v, None))}
    errors = {}
    for fields in ({"window_size": (4, 0)}, {"softmax_type": "off-by-one"}):
        try:
            SDPAttention(_config(1, **fields), 1, AttnMaskType.causal, "self")
        except ValueError as error:
            errors[str(fields)] = str(error)
    parallel_state.destroy_model_parallel()
    return outcome, errors


def _gqa_gpt(core_attention):
    """test_models_tp's tiny GPT with grouped-query attention (4 heads, 2 groups)."""
    return functools.partial(_gpt, core_attention=core_attention, num_query_groups=2)


def scenario_gpt():
    """Per-step relative loss differences of the FORGE GPT trained 5 steps with SDPAttention (at
    TP=1 and TP=2 + SP) against the same GPT with DotProductAttention at TP=1."""
    local = _train(_gqa_gpt("local"), _gpt_batch, 1, False, forge=True)[0]
    return {run: max(abs(a - b) / abs(b) for a, b in zip(_train(_gqa_gpt("sdpa"), _gpt_batch, *run, forge=True)[0],
                                                           local))
            for run in ((1, False), (2, True))}


@pytest.fixture(scope="module")
def results():
    return run_scenarios(WORLD, [scenario_matches_dot_product_attention, scenario_dropout_and_refusals, scenario_gpt])


def test_sdpa_matches_dot_product_attention_on_every_shard(results):
    for rank_diffs in result(results, "scenario_matches_dot_product_attention"):
        assert len(rank_diffs) == 2 * 2 * 3 * 2
        for (tp, dtype, mask, gqa), diff in rank_diffs.items():
            assert diff <= TOLERANCE[getattr(torch, dtype.split(".")[1])], (tp, dtype, mask, gqa, diff)


def test_dropout_only_in_training_and_named_refusals(results):
    outcome, errors = result(results, "scenario_dropout_and_refusals")[0]
    assert all(outcome.values()), outcome
    assert "--window-size" in errors["{'window_size': (4, 0)}"]
    assert "--forge-core-attention local" in errors["{'softmax_type': 'off-by-one'}"]


def test_gpt_trains_the_same_with_either_attention(results):
    # 5 AdamW steps pass the attention's fp32 rounding differences on (as across TP sizes in
    # test_models_tp.py): asserted at the same 1e-5 relative per-step loss.
    for run, diff in result(results, "scenario_gpt")[0].items():
        assert diff <= 1e-5, (run, diff)


def test_core_attention_swaps_only_the_local_specs_core_attention():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    def attention(**kwargs):
        return get_gpt_layer_local_spec(**kwargs).submodules.self_attention.submodules

    with core_attention("sdpa"):
        swapped, mla = attention(), attention(multi_latent_attention=True)
    assert swapped.core_attention is SDPAttention and mla.core_attention is SDPAttention
    assert swapped.linear_qkv is attention().linear_qkv
    assert attention().core_attention is DotProductAttention  # restored on exit
    with core_attention("local"):
        assert attention().core_attention is DotProductAttention
    with pytest.raises(ValueError, match="choose one of"), core_attention("flash"):
        pass
