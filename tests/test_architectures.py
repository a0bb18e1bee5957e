"""The architecture matrix: every transformers family with a layout x 7 compression stages, on tiny models built
from configs.

Every cell either passes its exactness / accounting check (``benchmarks/architectures.py`` says what each
checks) or is a refusal raised up front, naming the model class, without touching the model.  The table in
``docs/results/architectures.md`` is this matrix (``benchmarks/architectures.py --out ...``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.architectures import CELLS, FAMILIES, REFUSED, build, prepared, run_cell

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matrix_cell(family, cell):
    status, detail = run_cell(family, cell)
    assert status == ("refused" if (family, cell) in REFUSED else "pass"), detail


def test_layouts_resolve_by_config_class_and_name_real_modules():
    from compression.layout import rows_index
    from models.layouts import layout_of

    for family in FAMILIES:
        model = build(family)
        layout = layout_of(model)
        modules = dict(model.named_modules())
        for block in layout.blocks:
            norms = [n.path for n in (block.attn_norm, block.mlp_norm, block.attn_out_norm, block.mlp_out_norm) if n]
            for path in (*block.attn.readers, block.attn.o, *norms, *block.mlp.readers):
                assert path in modules, (family, path)
            if block.attn.fused:  # q, k, v rows partition the fused output exactly once
                rows = [i for part in block.attn.qkv_rows for i in rows_index(part)]
                assert sorted(rows) == list(range(modules[block.attn.qkv].weight.numel()
                                                 // layout.hidden)), family
    with pytest.raises(NotImplementedError, match="no model layout for BertConfig"):
        from transformers import BertConfig

        from models.layouts import family_for_config

        family_for_config(BertConfig())


def test_linearized_forms_compute_the_same_function():
    """Conv1D (GPT-2), FalconLinear and 3-D experts (Mixtral, Qwen3-MoE; GPT-OSS's transposed, biased, interleaved
    and clamped ones; Llama 4's transposed ones fed with score-scaled copies of every token; Gemma 4's beside a dense
    MLP) converted to nn.Linear:
    same logits (float32: the transformers experts kernel takes no float64)."""
    for family in ("GPT-2", "Falcon", "Mixtral", "Qwen3-MoE", "GPT-OSS", "Llama-4", "Gemma4-MoE"):
        model = build(family).float()
        ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
        linear, _, forms = prepared(family)
        assert forms, family
        with torch.no_grad():
            torch.testing.assert_close(linear.float()(ids).logits, ref, rtol=0, atol=2e-6)
        assert not any(type(m).__name__ in ("Conv1D", "FalconLinear", "MixtralExperts", "Qwen3MoeExperts",
                                            "GptOssExperts", "Gemma4TextExperts") for m in linear.modules())


def test_untied_gpt2_head_is_not_the_only_target():
    """With Conv1D blocks an untied GPT-2 head used to be the only eligible layer; now the blocks are the
    targets and the head is reported as not covered."""
    import transformers

    from benchmarks.architectures import targets
    from compression import select_targets

    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match="Conv1D"):
        select_targets(model, ["c_attn"])
    from compression.forms import linearize_

    linearize_(model)
    names = targets(model)
    assert len(names) == 8 and "lm_head" not in names
    skipped = select_targets(model, names).skipped
    assert skipped["lm_head.weight"].startswith("output head") and "[4,096 parameters]" in skipped["lm_head.weight"]


def test_linearize_leaves_a_linear_subclass_that_is_not_a_linear_map_and_routers_alone(caplog):
    """A foreign nn.Linear subclass whose forward is not ``x Wᵀ + b`` (one returning a tuple, as Phi-3.5-MoE's router
    does; one whose forward cannot take a ``[3, in]`` probe, as DeepSeek-V4's grouped projection) stays as it is,
    named in a warning, and is no default target (skipped with the reason); the same module as the layout's MoE
    router is left as it is, and the report counts its weight as not covered."""
    from torch import nn

    from compression.forms import linearize_
    from compression.targets import select_targets

    class Routing(nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    class Grouped(nn.Linear):
        def forward(self, x):
            return super().forward(x.reshape(-1, 2, self.in_features))

    model = build("LLaMA")
    model.model.layers[0].mlp.extra = Routing(32, 4)
    model.model.layers[1].mlp.extra = Grouped(32, 4)
    with caplog.at_level("WARNING", logger="compression.forms"):
        assert linearize_(model) == {}
    assert type(model.model.layers[0].mlp.extra) is Routing and type(model.model.layers[1].mlp.extra) is Grouped
    for i, cls in enumerate(("Routing", "Grouped")):
        assert f"model.layers.{i}.mlp.extra is a {cls}, an nn.Linear subclass whose forward is not x Wᵀ + b" \
            in caplog.text
        assert select_targets(model).skipped[f"model.layers.{i}.mlp.extra"].startswith(f"not a plain nn.Linear ({cls})")

    model, layout, forms = prepared("Phi-3.5-MoE")
    router = model.get_submodule(layout.blocks[0].mlp.experts.router)
    assert type(router).__name__ == "PhimoeTopKRouter" and "linear" not in forms
    skipped = select_targets(model).skipped
    assert skipped[layout.blocks[0].mlp.experts.router] == "not a plain nn.Linear (PhimoeTopKRouter); " \
        "compression.forms.linearize_ converts it when its forward is x Wᵀ + b and it is not a MoE router " \
        "[128 parameters]"


def test_linear_routers_stay_dense_and_in_float():
    """HunYuan-MoE's router is a plain ``nn.Linear`` (``mlp.gate.wg``, float32 by the family's own choice): the
    default targets leave it out (a factorized router sends tokens to other experts) and quantization keeps it."""
    from torch import nn

    from lightning_modules.specs import CausalLMSpec
    from models.layouts import layout_of

    model = build("HunYuan-MoE")
    spec = CausalLMSpec(model=model)
    routers = layout_of(model).routers()
    assert routers == ["model.layers.0.mlp.gate.wg", "model.layers.1.mlp.gate.wg"]
    assert all(type(model.get_submodule(r)) is nn.Linear for r in routers)
    assert model.get_submodule(routers[0]).weight.dtype == torch.float32
    assert not set(routers) & set(spec.default_targets(model))
    assert set(routers) <= set(spec.quant_exclude(model))
    assert layout_of(build("Mixtral")).routers() == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_mla_attention_reads_the_stream_through_its_first_projections():
    """DeepSeek's MLA: only ``q_a_proj`` (V3; ``q_proj`` without a q LoRA rank, V2-Lite) and ``kv_a_proj_with_mqa``
    read the normed stream; they are the attention's readers and its joint group, and a spec mixing them with a
    q/k/v triple is refused."""
    from compression.layout import Attention
    from models.layouts import layout_of

    for family, q in (("DeepSeek-V2", "q_proj"), ("DeepSeek-V3", "q_a_proj")):
        layout = layout_of(build(family))
        attn = layout.blocks[1].attn
        assert attn.readers == (f"model.layers.1.self_attn.{q}", "model.layers.1.self_attn.kv_a_proj_with_mqa")
        assert layout.joint_groups()["model.layers.1.self_attn"] == list(attn.readers) and not attn.fused
        assert not layout.supports("latent_cache") and layout.supports("rotation")
    with pytest.raises(ValueError, match="give inputs, or q/k/v"):
        Attention(path="a", o="a.o", heads=1, kv_heads=1, head_dim=4, q="a.q", k="a.k", v="a.v", inputs=("a.x",))


# config options a family's default matrix row leaves off: (family, options, why it matters, {cell: refusal regex})
VARIANTS = [
    ("Falcon", dict(new_decoder_architecture=True, num_kv_heads=2),
     "Falcon-40B / 180B: grouped kv heads in per-group blocks of the fused qkv", {}),
    ("Falcon", dict(multi_query=False, parallel_attn=False),
     "Falcon-RW: multi-head qkv interleaved per head, sequential block", {}),
    ("Phi", dict(qk_layernorm=True), "per-head q/k LayerNorms (mean subtracted, with biases)", {}),
    ("StableLM", dict(use_parallel_residual=True), "attention and MLP read one norm (parallel residual)", {}),
    # rebuilt without its per-head q/k norms, StableLM 2 12B's latent-cache scores were off by 6e-2
    ("StableLM", dict(qk_layernorm=True), "StableLM 2 12B: per-head q/k LayerNorms under their own names",
     {"latent cache": r"\['q_layernorm', 'k_layernorm'\] \(StableLmLayerNormPerHead\)"}),
    # 0.05 is below most of the tiny model's projected values: the clamp bites in the joint QKV and rotation cells
    ("OLMo", dict(clip_qkv=0.05), "OLMo 1.7: q, k and v clamped after their projections",
     {"latent cache": "clip_qkv: 0.05 clamps q, k and v"}),
    ("HyperCLOVAX", dict(use_post_norm=False), "no post-norms: a pre-norm block with Granite's scalars, rotated on "
     "the stream instead of at the readers", {}),
]


@pytest.mark.parametrize("cell", ["joint QKV", "rotation + W4A4", "latent cache"])
@pytest.mark.parametrize("family, options, why, refused", VARIANTS,
                         ids=[f"{f}-{'-'.join(o)}" for f, o, _, _ in VARIANTS])
def test_config_variants(family, options, why, refused, cell, monkeypatch):
    """A family's config options that change its blocks pass the cells its default row shows, or are refused up front
    where the matrix says why (:data:`VARIANTS`)."""
    import benchmarks.architectures as matrix

    config, model, kwargs = FAMILIES[family]
    monkeypatch.setitem(matrix.FAMILIES, family, (config, model, {**kwargs, **options}))
    if cell in refused:
        with pytest.raises(NotImplementedError, match=refused[cell]):
            run_cell(family, cell)
        return
    status, detail = run_cell(family, cell)
    assert status == "pass", (why, detail)


def test_llama4_experts_see_only_the_tokens_routed_to_them():
    """Llama 4 hands every expert a copy of every token scaled by its routing score (zero where not routed); the
    linearized experts run on the routed rows only, so calibration counts each token once per expert it reaches:
    ``top_k`` tokens' worth per token in all, not ``E``."""
    from benchmarks.architectures import batches
    from compression import collect_stats

    model, layout, _ = prepared("Llama-4")
    moe = layout.blocks[1].mlp
    names = list(moe.readers)
    stats = collect_stats(model, names, batches())
    tokens = sum(b["input_ids"].numel() for b in batches())
    counts = [stats[n].count for n in names]
    assert sum(counts) == tokens * model.config.num_experts_per_tok and all(c < tokens for c in counts), counts
