"""Block-sequential compression (``calibration.mode: sequential``, :mod:`compression.sequential`).

- dense propagation reproduces the all-at-once factors exactly (float64 models: bitwise here; the
  assertion allows 1e-12) for every method, joint q/k/v, a two-pass spectral allocation and a FLOPs
  budget, on LLaMA, Gemma 3 (a mask per layer type) and GPT-2 (positional block arguments);
- compressed propagation equals compressing block 0 all-at-once, then block 1 all-at-once on the
  partly compressed model (the error of block 0 reaches block 1's statistics);
- only one block's statistics are alive at any moment (counted with the garbage collector);
- host and disk activations change nothing; refusals are up front and name what to change.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from compression import ChannelStats, Recipe, compress_
from compression.sequential import SequentialRun, block_paths
from lightning_modules.specs import CausalLMSpec
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = {"mode": "sequential", "propagate": "dense", "progress": False}


def _batches(vocab: int = 128, count: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (2, 12), generator=g)} for _ in range(count)]


def _llama(layers: int = 2):
    model = make_tiny_llama()
    if layers != 2:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": layers}))
    return model.double().eval()


def _both(model, batches, calibration=None, **fields):
    """(all-at-once model, report), (sequential model, report) from two copies of ``model``."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = compress_(a, Recipe(**fields), family=CausalLMSpec(model=a), batches=batches)
    rb = compress_(b, Recipe(**fields, calibration={**SEQ, **(calibration or {})}), family=CausalLMSpec(model=b),
                   batches=batches)
    return (a, ra), (b, rb)


def _assert_same(a, b, ra, rb):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=1e-12, msg=key)
    assert rb.plan.get("layers") == ra.plan.get("layers") and rb.plan.get("joint_groups") == ra.plan.get("joint_groups")


QKV = ["q_proj", "k_proj", "v_proj"]
CASES = {
    "svd": dict(method="svd"),
    "asvd": dict(method="asvd"),
    "svd_llm": dict(method="svd_llm"),
    "svd_llm_v2": dict(method="svd_llm_v2"),
    "svd_llm_v2+v2 (two passes)": dict(method="svd_llm_v2", allocation="v2"),
    "svd_llm+greedy+flops (two passes)": dict(method="svd_llm", allocation="greedy", budget="flops"),
    "joint qkv svd_llm_v2": dict(method="svd_llm_v2", joint_qkv=True, targets=QKV),
    "joint qkv + v2": dict(method="svd_llm", joint_qkv=True, targets=[*QKV, "o_proj"], allocation="v2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dense_propagation_reproduces_all_at_once(case):
    (a, ra), (b, rb) = _both(_llama(), _batches(), ratio=0.4, **CASES[case])
    _assert_same(a, b, ra, rb)
    assert len(rb.blocks) == 2 and all(0 < r["output_error"] < r["update_error"] for r in rb.blocks)


@pytest.mark.parametrize("family", ["Gemma3", "Gemma2", "GPT-2", "Qwen3-MoE", "Granite", "Ministral", "SmolLM3",
                                    "StarCoder2", "Seed-OSS", "OLMo3", "GLM-4", "EXAONE4", "OLMoE", "Apertus",
                                    "Cohere", "HunYuan", "Phi-3.5-MoE", "Granite-MoE-Shared",
                                    "GLM-4.5", "HunYuan-MoE", "FlexOlmo", "DeepSeek-V3", "Llama-4",
                                    "Qwen3-Next", "Qwen3.5-MoE", "VaultGemma", "Phi"])
def test_dense_propagation_other_layouts(family):
    """Gemma 3 gives sliding and full layers different masks and rotary tables; GPT-2 passes its mask
    positionally and its blocks come from Conv1D converted to nn.Linear; Qwen3-MoE routes through 3-D experts
    converted to nn.Linear next to a plain MLP layer; Granite scales every writer by ``residual_multiplier``;
    Ministral alternates sliding and full layers; SmolLM3 has a NoPE layer; Gemma 2 caps its attention scores;
    StarCoder2 has LayerNorm and a plain MLP with biases; Seed-OSS has biases on q/k/v/o and the MLP;
    OLMo 3 has post-norms only and alternates sliding and full layers; GLM-4 has a fused gate/up MLP and
    sandwich norms; EXAONE 4 has global NoPE layers; OLMoE routes experts; Apertus has a plain MLP with a learned
    activation; Cohere runs attention and MLP in parallel off one LayerNorm; HunYuan normalizes q/k after RoPE;
    Phi-3.5-MoE has LayerNorm and a router that is an nn.Linear subclass; Granite-MoE-Shared has its shared expert
    beside the MoE module, not in it; GLM-4.5 has a dense first layer, always-on shared experts and partial RoPE;
    HunYuan-MoE routes through a float32 nn.Linear; FlexOlmo is post-norm-only with experts; DeepSeek-V3's
    attention reads its own latents through q_b_proj and kv_b_proj; Llama 4 scales every token by its routing score
    before the experts; Qwen3-Next alternates linear (recurrent) and gated full attention; Qwen3.5-MoE's linear
    attention reads the stream through four projections; VaultGemma caps its scores with no post-norms; Phi runs
    attention and MLP in parallel off one LayerNorm with partial RoPE."""
    from benchmarks.architectures import VOCAB, prepared, targets

    model = prepared(family)[0].eval()
    names = targets(model)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches(VOCAB)
    ra = compress_(a, Recipe("svd_llm", ratio=0.3, targets=names), family=CausalLMSpec(model=a), batches=batches)
    rb = compress_(b, Recipe("svd_llm", ratio=0.3, targets=names, calibration=SEQ), family=CausalLMSpec(model=b),
                   batches=batches)
    _assert_same(a, b, ra, rb)


def test_compressed_propagation_feeds_the_compressed_block():
    """Sequential with error propagation == block 0 all-at-once, then block 1 all-at-once on that model."""
    model, batches = _llama(), _batches()
    seq = copy.deepcopy(model)
    report = compress_(seq, Recipe("svd_llm", ratio=0.4, calibration={**SEQ, "propagate": "compressed"}),
                       family=CausalLMSpec(model=seq), batches=batches)
    ref = copy.deepcopy(model)
    for i in range(2):
        compress_(ref, Recipe("svd_llm", ratio=0.4, targets=[f"model.layers.{i}.*"]), batches=batches)
    _assert_same(ref, seq, report, report)
    dense = copy.deepcopy(model)
    compress_(dense, Recipe("svd_llm", ratio=0.4), batches=batches)
    first = [k for k in dense.state_dict() if k.startswith("model.layers.0.")]
    later = [k for k in dense.state_dict() if k.startswith("model.layers.1.") and k.endswith(".down")]
    assert all(torch.equal(dense.state_dict()[k], seq.state_dict()[k]) for k in first)  # same inputs
    assert all(not torch.equal(dense.state_dict()[k], seq.state_dict()[k]) for k in later)  # propagated error


def _alive_stats_bytes() -> int:
    gc.collect()
    return sum(o.nbytes() for o in gc.get_objects() if type(o) is ChannelStats)


def test_only_one_blocks_statistics_alive():
    """At the moment a block's statistics are complete (their peak), the ChannelStats alive in the whole
    process are exactly that block's: 1/L of the all-at-once statistics for L equal blocks."""
    model, batches = _llama(layers=4), _batches()
    from compression import collect_stats
    from compression.pipeline import CompressionPipeline

    names = CompressionPipeline(model, Recipe("svd_llm")).names
    full = collect_stats(copy.deepcopy(model), names, batches, needs={"gram"}).nbytes()
    gc.collect()
    alive: list[tuple[int, int]] = []

    def observer(event, info):
        if event == "stats":
            alive.append((_alive_stats_bytes(), info["stats"].nbytes()))

    pipe = CompressionPipeline(model, Recipe("svd_llm", ratio=0.4, calibration=SEQ), CausalLMSpec(model=model))
    SequentialRun(pipe, observer=observer).run(batches)
    assert len(alive) == 4
    for counted, block in alive:
        assert counted == block == full // 4
    assert _alive_stats_bytes() == 0


@pytest.mark.parametrize("where", ["host", "disk"])
def test_activation_storage_changes_nothing(where):
    model, batches = _llama(), _batches()
    (a, ra), (b, rb) = _both(model, batches, method="svd_llm", ratio=0.3)
    c = copy.deepcopy(model)
    rc = compress_(c, Recipe("svd_llm", ratio=0.3, calibration={**SEQ, "activations": where}),
                   family=CausalLMSpec(model=c), batches=batches)
    _assert_same(b, c, rb, rc)
    assert [r["output_error"] for r in rc.blocks] == [r["output_error"] for r in rb.blocks]


def test_refusals_name_what_to_change():
    with pytest.raises(ValueError, match="stream_weights never holds the dense model"):
        Recipe("svd_llm", allocation="gradient", calibration={"mode": "sequential", "stream_weights": True})
    with pytest.raises(ValueError, match="quantization"):
        Recipe("svd_llm", quantization={"weight_bits": 4}, calibration={"mode": "sequential"})
    with pytest.raises(ValueError, match="mode: sequential only"):
        Recipe("svd_llm", calibration={"propagate": "dense"})
    with pytest.raises(ValueError, match="calibration.mode must be one of"):
        Recipe("svd_llm", calibration={"mode": "blockwise"})
    model = make_tiny_llama(tie=False).double()
    untouched = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"lm_head'\] lie outside"):
        compress_(model, Recipe("svd_llm", targets=["lm_head", "q_proj"], calibration=SEQ),
                  family=CausalLMSpec(model=model), batches=_batches())
    with pytest.raises(ValueError, match="needs the model's blocks"):
        compress_(model, Recipe("svd_llm", calibration=SEQ), batches=_batches())
    with pytest.raises(ValueError, match="stats= applies"):
        compress_(model, Recipe("svd_llm", calibration=SEQ), object(), batches=_batches())
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())
    assert block_paths(model, CausalLMSpec(model=model)) == ["model.layers.0", "model.layers.1"]


def test_failure_in_a_later_block_restores_every_block():
    """A non-finite activation in block 1 (after block 0 was compressed) leaves the model as it was."""
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * float("nan"),))
    with pytest.raises(FloatingPointError, match="layers.1.mlp.down_proj"):
        compress_(model, Recipe("svd_llm", ratio=0.4, calibration=SEQ), family=CausalLMSpec(model=model),
                  batches=_batches())
    hook.remove()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_lightning_fit_runs_one_sequential_stage_and_logs_block_errors(tmp_path):
    """The recipe's mode picks the stages; dense propagation gives the all-at-once factors through Lightning
    too; TensorBoard gets one output error per block."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_modules import CompressionModule
    from tests.lightning_helpers import TinyTokens

    def fit(calibration, root):
        module = CompressionModule(CausalLMSpec(model=make_tiny_llama()),
                                   compression=Recipe("svd_llm", ratio=0.3, allocation="v2", calibration=calibration))
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=0, enable_progress_bar=False,
                          logger=TensorBoardLogger(root, name="run"), enable_model_summary=False,
                          num_sanity_val_steps=0)
        trainer.fit(module, datamodule=TinyTokens())
        return module, trainer

    dense, _ = fit({"progress": False}, tmp_path / "a")
    seq, t = fit({**SEQ, "block_device": "cpu"}, tmp_path / "b")
    assert [type(cb).__name__ for cb in t.callbacks if hasattr(cb, "run_compression_stage")] == [
        "SequentialCompression"]
    assert seq.plan["layers"] == dense.plan["layers"] and len(seq.report.blocks) == 2
    for key, value in dense.model.state_dict().items():
        torch.testing.assert_close(seq.model.state_dict()[key], value, rtol=0, atol=1e-6)
    events = EventAccumulator(str(t.logger.log_dir))
    events.Reload()
    errors = events.Scalars("compress/block_output_error")
    assert [e.step for e in errors] == [0, 1]
    assert [e.value for e in errors] == pytest.approx([r["output_error"] for r in seq.report.blocks], rel=1e-6)


def test_meta_count_matches_the_measured_statistics():
    """benchmarks/sequential_count.py counts one block's Grams on the meta device; on a real tiny LLaMA the
    sequential run's per-block statistics bytes are exactly that count."""
    from benchmarks.sequential_count import block_streams

    model, batches = _llama(), _batches()
    with torch.device("meta"):
        ghost = copy.deepcopy(model).to("meta")
    counted = sum(8 * n * n for n in block_streams(ghost).values())
    report = compress_(model, Recipe("svd_llm", ratio=0.4, calibration=SEQ), family=CausalLMSpec(model=model),
                       batches=batches)
    assert [r["stats_bytes"] for r in report.blocks] == [counted, counted]
    assert counted == 8 * (3 * 64 * 64 + 96 * 96)  # q/k/v share, o, gate/up share, down


def test_streamed_weights_compress_block_by_block_to_disk(tmp_path):
    """A model built with its parameters on meta, weights read from safetensors one block at a time and the
    compressed blocks written out: the folder reloads into exactly the in-memory sequential result."""
    from transformers import LlamaForCausalLM

    from compression.sequential import compress_streamed_
    from compression.streaming import empty_parameters, load_streamed

    model, batches = _llama(), _batches()
    model.save_pretrained(tmp_path / "dense")  # model.safetensors, the tied head once
    recipe = Recipe("svd_llm", ratio=0.4, allocation="v2", calibration={**SEQ, "propagate": "compressed"})
    ref = copy.deepcopy(model)
    ref_report = compress_(ref, recipe, family=CausalLMSpec(model=ref), batches=batches)

    def skeleton():
        with empty_parameters():
            return LlamaForCausalLM(model.config).to(torch.float64).eval()

    ghost = skeleton()
    assert all(p.device.type == "meta" for p in ghost.parameters())
    report = compress_streamed_(ghost, recipe, tmp_path / "dense", tmp_path / "out", family=CausalLMSpec(model=ghost),
                                batches=batches)
    assert report.plan["layers"] == ref_report.plan["layers"]
    assert all(p.device.type == "meta" for p in ghost.model.layers.parameters())  # nothing kept in memory
    assert sorted(f.name for f in (tmp_path / "out").glob("*.safetensors")) == [
        "block-00000.safetensors", "block-00001.safetensors", "rest.safetensors"]
    loaded = load_streamed(skeleton(), tmp_path / "out")
    expected = ref.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
