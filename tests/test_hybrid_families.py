"""Hybrid decoders with no model layout (state-space or linear-attention layers beside attention) still compress
on their default targets: every plain nn.Linear their layers call is factorized, the ones a mixer hands to its
fused kernel as weights (``out_proj.weight``, ``dt_proj.weight``) are skipped with that line as the reason, and
the compressed model runs.  Layout features (joint QKV, rotation, latent cache) are refused for them elsewhere
("no model layout"); this is the plain SVD-LLM path.

The check that whitening does its job on data it saw: on a calibration batch, ``svd_llm``'s logits are closer to
the dense ones than plain ``svd``'s at the same ratio (measured, relative: Nemotron-H 0.288 vs 0.521, Bamba 0.151
vs 0.248, LFM2 0.160 vs 0.224, Jamba 0.106 vs 0.164).  Qwen3-Next, a hybrid with a layout, is in the architecture
matrix instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compression import Recipe, compress_
from lightning_modules.specs import CausalLMSpec

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)
# family -> (config class, model class, config kwargs, layers skipped because a kernel reads their weight)
HYBRIDS = {
    "Nemotron-H": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                        n_groups=1, chunk_size=8), ["model.layers.0.mixer.out_proj"]),
    "Bamba": ("BambaConfig", "BambaForCausalLM",
              dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, attn_layer_indices=[1],
                   mamba_chunk_size=8), ["model.layers.0.mamba.out_proj"]),
    "LFM2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"]), []),
    "Jamba": ("JambaConfig", "JambaForCausalLM",
              dict(num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                   attn_layer_period=2, attn_layer_offset=0, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4,
                   use_mamba_kernels=False), ["model.layers.1.mamba.dt_proj"]),
}


@pytest.mark.parametrize("family", list(HYBRIDS))
def test_hybrid_decoder_compresses_on_its_default_targets(family):
    import transformers

    config_cls, model_cls, kwargs, kernel_read = HYBRIDS[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **kwargs)).eval()
    batches = [{"input_ids": torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for method in ("svd", "svd_llm"):
        compressed = copy.deepcopy(model)
        report = compress_(compressed, Recipe(method, ratio=0.2), family=CausalLMSpec(model=compressed),
                           batches=batches)
        names = {r.name for r in report.layers}
        assert len(names) >= 5 and not names & set(kernel_read), (family, sorted(names))
        for name in kernel_read:
            assert "reads its weight directly" in report.skipped[name], report.skipped[name]
        with torch.no_grad():
            out = compressed(ids).logits
        assert torch.isfinite(out).all()
        errors[method] = float((out - ref).norm() / ref.norm())
    assert 0 < errors["svd_llm"] < errors["svd"], errors
