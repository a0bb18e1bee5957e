"""Every other causal-LM family transformers ships compresses correctly on the generic path.

The architecture matrix (``tests/test_architectures.py``) runs every stage on the families with a model layout.  The
rest of ``transformers``' causal LMs (decoders without a layout, hybrids with state-space or recurrent layers, the
encoder-only models that have a causal-LM head) get the plain path: ``CausalLMSpec.default_targets`` picks every
``nn.Linear`` that is safe to replace, and ``svd`` / ``svd_llm`` factorize them.  For each family here, a tiny model
built from its config (hidden 32, 2 layers, vocab 128, float32) must show that:

- the targets are safe: factorized at *full* rank (``U V = W`` up to float32 rounding) every default target leaves the
  logits unchanged (relative difference <= 1e-5).  A layer whose weight the model reads elsewhere, or one the forward
  never calls through its module, would break or change them; a wrong target is caught here, not at a user's run;
- ``svd_llm`` at ratio 0.3 runs from calibration statistics and gives finite logits that differ from the dense ones.

Families absent from the installed transformers are skipped.  What a family needs beyond the shared tiny sizes (its
config's own names for layer patterns, state sizes, rotary widths...) is in :data:`EXTRA`; :data:`PLAIN` need nothing.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from compression import Recipe, compress_
from lightning_modules.specs import CausalLMSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = dict(vocab_size=128, hidden_size=32, n_embd=32, d_model=32, intermediate_size=64, n_inner=64, ffn_dim=64,
              num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, num_attention_heads=4, n_head=4, n_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_positions=64, moe_intermediate_size=32,
              num_experts=4, n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
              q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, shared_expert_intermediate_size=32, first_k_dense_replace=1,
              first_dense_intermediate_size=64, n_group=1, topk_group=1)
# families that build tiny from SHARED alone
PLAIN = (
    "afmoe", "aria_text", "axk1", "beam", "bert", "bert-generation", "big_bird", "biogpt", "bitnet", "bloom",
    "camembert", "cohere2_moe", "data2vec-text", "doge", "dory", "electra", "ernie", "exaone", "exaone_moe",
    "falcon_mamba", "gemma4_unified_text", "glm4_moe_lite", "gpt_bigcode", "gpt_neox_japanese", "granitemoe_swa",
    "hrm_text", "hy_v3", "hy_v4", "internlm3", "iquestcoder", "jetmoe", "kolibri1", "laguna", "lara_mini", "lfm2",
    "lfm3", "mamba", "megatron-bert", "mellum", "mimo_v2_flash", "minicpm3", "minicpm5_moe", "minimax",
    "minimax_m3_vl_text", "modernbert-decoder", "moshi", "mpt", "olmo_hybrid", "param2moe", "persimmon", "roberta",
    "roberta-prelayernorm", "roformer", "rwkv", "sarvam_mla", "sarvam_moe", "solar_open", "xglm", "xlm-roberta",
    "xlm-roberta-xl", "youtu",
)
# model type -> config keywords on top of SHARED (the ones a family names its own way or needs to build tiny)
EXTRA: dict[str, dict] = {
    # families whose default sizes outlive SHARED under their own names (a 10240-wide MLP is a 10240² Gram)
    "cpmant": dict(dim_ff=64, dim_head=8),
    "ctrl": dict(dff=64),
    "xlnet": dict(d_inner=64),
    "ergo": dict(shared_intermediate_size=32),
    "deepseek_v4": dict(o_lora_rank=16, o_groups=2),
    "inkling_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4),
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
                       moe_shared_expert_intermediate_size=32),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                      mamba_chunk_size=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False),
    "kimi_linear": dict(linear_attn_config=dict(kda_layers=[1], full_attn_layers=[2], head_dim=8, num_heads=4,
                                                short_conv_kernel_size=4)),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=32, attention_window_size=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "bamba": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, attn_layer_indices=[1],
                  mamba_chunk_size=8),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                             layer_types=["mamba", "attention"], mamba_chunk_size=8),
    "mamba2": dict(num_heads=4, head_dim=16, expand=2, n_groups=1, state_size=8, chunk_size=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], mamba_headdim=16, n_mamba_heads=4, mamba_d_state=8,
                   hybrid_layer_ids=[1]),
    # sparse-attention MLA MoE decoders: GLM-5 (DSA) and A.X K2, dense first layer, sparse second
    "glm_moe_dsa": dict(num_key_value_heads=4, index_head_dim=8, index_n_heads=2, index_topk=4, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, mlp_layer_types=["dense", "sparse"]),
    "axk2": dict(num_key_value_heads=4, index_head_dim=8, index_n_heads=2, index_topk=4, qk_rope_head_dim=4,
                 qk_nope_head_dim=4, mlp_layer_types=["dense", "sparse"]),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"], layer_group_size=2),
    # Gemma 3n: AltUp and per-layer inputs, no KV sharing at two layers
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0,
                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, sliding_window=4,
                         activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2, laurel_rank=4),
    "deepseek_v32": dict(num_key_value_heads=4, index_head_dim=8, index_n_heads=2, index_topk=4, qk_rope_head_dim=4,
                         qk_nope_head_dim=4),
}


# tensors a family initializes to constants that a trained checkpoint has otherwise, refilled after the build (name
# suffix -> fill): Gemma 3n's AltUp output scale at 0 zeroes the per-layer-input gate's input, which then cannot be
# whitened; AFMoE's zero router weights and DeepSeek-V4's zero token -> expert hash table route every token to the
# same experts, so the others are never calibrated
NONZERO = {"gemma3n_text": {"altup.correct_output_scale": lambda t, g: t.fill_(1.0)},
           "afmoe": {"router.gate.weight": lambda t, g: t.normal_(0.0, 0.02, generator=g)},
           "deepseek_v4": {"gate.tid2eid": lambda t, g: t.random_(0, SHARED["n_routed_experts"], generator=g)}}


def _build(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config_cls = type(AutoConfig.for_model(model_type))
    except ValueError:
        pytest.skip(f"transformers has no {model_type!r}")
    accepted = inspect.signature(config_cls.__init__).parameters
    fields = getattr(config_cls, "__dataclass_fields__", {})
    kwargs = {k: v for k, v in SHARED.items() if k in accepted or k in fields}
    kwargs.update(FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**kwargs)).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            for suffix, fill in NONZERO.get(model_type, {}).items():
                if name.endswith(suffix):
                    fill(t, g)
    return model


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


FAMILIES = {**{name: {} for name in PLAIN}, **EXTRA}


# experts modules the generic path linearizes (compression.forms: the transformers experts interface, checked on a
# probe), per family; the rest of the MoE families here keep experts in a form no reading reproduces (Ergo's
# per-expert norms, JetMoE's own layout), which stay as they are, or have per-expert linears already
EXPERTS = {"afmoe": 1, "aria_text": 2, "axk1": 1, "axk2": 1, "bailing_hybrid": 1, "cohere2_moe": 2,
           "deepseek_v32": 1, "deepseek_v4": 2, "exaone_moe": 1, "glm4_moe_lite": 1, "glm_moe_dsa": 1,
           "granitemoe_swa": 2, "granitemoehybrid": 2, "hy_v3": 1, "hy_v4": 1, "inkling_text": 2, "jamba": 1,
           "kimi_linear": 1, "kolibri1": 2, "laguna": 1, "lara_mini": 2, "lfm2_moe": 1, "mellum": 2,
           "mimo_v2_flash": 1, "minicpm5_moe": 1, "minimax": 2, "minimax_m3_vl_text": 2, "nemotron_h": 1,
           "param2moe": 1, "sarvam_mla": 1, "sarvam_moe": 1, "solar_open": 2}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_generic_path_is_exact_at_full_rank_and_runs(model_type):
    model = _build(model_type)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000, "the tiny config did not take"
    g = torch.Generator().manual_seed(1)
    # 192 tokens: enough for every expert of the MoE families to be routed some (svd_llm needs its statistics)
    batches = [{"input_ids": torch.randint(3, 128, (4, 24), generator=g)} for _ in range(2)]
    ids = batches[0]["input_ids"][:2, :12]
    ref = _logits(model, ids)
    spec = CausalLMSpec(model=model)
    model = spec.build()  # as train.py builds it: other weight forms (experts, Conv1D) become nn.Linear
    assert len(spec.forms.get("experts", {})) == EXPERTS.get(model_type, 0)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) <= 1e-6
    targets = CausalLMSpec(model=model).default_targets(model)
    assert targets, "no default target"
    full = copy.deepcopy(model)
    ranks = {n: {"rank": min(full.get_submodule(n).weight.shape)} for n in targets}
    report = compress_(full, Recipe("svd", targets=targets, overrides=ranks), family=CausalLMSpec(model=full),
                       batches=batches)
    assert len(report.layers) == len(targets)
    err = float((_logits(full, ids) - ref).norm() / ref.norm())
    assert err <= 1e-5, err
    low = copy.deepcopy(model)
    compress_(low, Recipe("svd_llm", ratio=0.3), family=CausalLMSpec(model=low), batches=batches)
    out = _logits(low, ids)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) > 1e-4


def test_router_shaped_linears_of_a_family_without_a_layout_are_kept_dense_and_named(caplog):
    """Without a layout the routers are not known; the linears shaped as a router (hidden size -> the config's expert
    count: AFMoE's ``mlp.router.gate`` on its sparse layer, JetMoE's two per layer) are left out of the default targets
    and of quantization and named in a warning; nothing is named for a dense family or one whose layout knows its
    routers (Mixtral, DBRX).  Listed as targets, they are factorized."""
    from lightning_modules.specs import unlaid_router_suspects

    expected = {"afmoe": ["model.layers.1.mlp.router.gate"],
                "jetmoe": [f"model.layers.{i}.{p}.router.layer" for i in range(2) for p in ("self_attention.experts",
                                                                                            "mlp")],
                "mpt": []}
    for model_type, routers in expected.items():
        model = _build(model_type)
        caplog.clear()
        spec = CausalLMSpec(model=model)
        with caplog.at_level("WARNING", logger="lightning_modules.specs"):
            targets = spec.default_targets(model)
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        assert sorted(unlaid_router_suspects(model, linears)) == sorted(routers), model_type
        assert not set(routers) & set(targets)
        assert set(routers) <= set(spec.quant_exclude(model))
        warned = [r.getMessage() for r in caplog.records if "router" in r.getMessage()]
        assert len(warned) == (1 if routers else 0), model_type
        assert all(r in warned[0] for r in routers[:4])
        if routers:  # listed as targets, they are factorized
            report = compress_(model, Recipe("svd", ratio=0.3, targets=targets + routers), family=spec,
                               batches=[{"input_ids": torch.randint(3, 128, (2, 12))}])
            assert set(routers) <= {layer.name for layer in report.layers}
    from benchmarks.architectures import build

    for family in ("Mixtral", "DBRX"):
        model = build(family)
        assert unlaid_router_suspects(model, [n for n, _ in model.named_modules()]) == [], family
