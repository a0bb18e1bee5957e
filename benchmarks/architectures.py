"""Architecture matrix: every supported transformers family x every compression stage, on tiny models.

    .venv/bin/python benchmarks/architectures.py --out docs/results/architectures.md

Each family is a random-init model (hidden 32, 2 layers, vocab 128, float64) built from its transformers config;
each cell runs one stage through the model's layout (:mod:`models.layouts`) and checks what the stage promises:

- ``svd_llm``: every targeted matrix (``Conv1D``, ``nn.Linear`` subclasses and 3-D experts included, after
  :func:`compression.forms.linearize_`) is factorized; parameters add up exactly: whole model = targeted +
  reported-not-covered matrices + vectors outside the targets;
- ``svd_llm_v2 + v2``: the v2 allocation keeps each layer type's parameter-weighted mean ratio;
- ``joint QKV``: separate q/k/v (or the fused qkv matrix) factorized jointly at full rank reproduces the logits
  (relative error shown), and at ratio 0.3 stores ``r (E + Σm)`` weights;
- ``rotation + W4A4``: the fused rotation leaves float64 logits unchanged (relative error shown, must be
  ``<= 1e-6``), then every linear but the head is fake-quantized W4A4 and the plan rebuilds the model bit-exactly;
- ``latent cache``: greedy generation (left-padded batch, sliding windows longer than the window) gives the same
  tokens and scores (max score difference shown, must be ``<= 1e-5``) as the plain cache, which holds latents;
  both key modes (``keys="latent"`` / ``keys="plain"``: rebuilt / cached rotated keys), shown in that order.
  Where the plain model's own scores are NaN (Gemma 2's eager attention takes its softmax in float32, where a
  float64 model's mask minimum is -inf, so the left-padded row's fully masked queries give NaN in transformers
  itself) the latent cache must give NaN at the same places, and at least two rows must stay finite;
- ``export``: ``save_compressed`` -> ``load_compressed`` gives bit-identical logits;
- ``U/V LoRA``: adapters on both factors of every low-rank layer; one step on the up side lowers the loss and,
  merged, changes only up factors.

A cell either passes its check or is a refusal raised before anything is changed (the message names the model
class and the missing piece); ``refused`` cells are listed with the reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the family table is imported as benchmarks.architecture_families
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.architecture_families import FAMILIES, HIDDEN, VOCAB  # noqa: E402
from compression import (  # noqa: E402
    ActQuantConfig,
    LowRankLinear,
    Recipe,
    WeightQuantConfig,
    apply_plan,
    collect_stats,
    compress_,
    merge_plans,
    quantize_model_,
)
from compression.export import load_compressed, save_compressed  # noqa: E402
from compression.forms import linearize_  # noqa: E402
from compression.plan import make_plan  # noqa: E402
from compression.quant import QuantLinear  # noqa: E402
from compression.rotation import rotate_model_  # noqa: E402
from compression.targets import layer_type  # noqa: E402
from lightning_modules.specs import CausalLMSpec  # noqa: E402
from models.causal_lm import output_cache  # noqa: E402
from models.layouts import layout_of  # noqa: E402

CELLS = ("svd_llm", "svd_llm_v2 + v2", "joint QKV", "rotation + W4A4", "latent cache", "export", "U/V LoRA")
# cells each family refuses up front (and the test asserts the refusal): the latent cache needs LLaMA-like attention
# (rotary, q/k/v, 1-D positions); MLA caches its own latent
NO_ROTATION_FAMILIES: tuple[str, ...] = ("Gemma4-MoE",)
NO_LATENT_FAMILIES = ("DeepSeek-V2", "DeepSeek-V3", "Llama-4", "Qwen3-Next", "Qwen3.5", "Qwen3.5-MoE", "DiffLlama",
                      "Gemma4", "Gemma4-MoE", "Gemma4-dense", "DBRX")
REFUSED = {(f, "rotation + W4A4") for f in NO_ROTATION_FAMILIES} | {(f, "latent cache") for f in NO_LATENT_FAMILIES}
RATIO = 0.3


class Refused(Exception):
    """A stage refused the model up front (the cell's expected outcome for unsupported layouts)."""


def build(family: str, seed: int = 0) -> nn.Module:
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float64)  # built in float64, as load_compressed(dtype=float64) builds it
        try:
            model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
        finally:
            torch.set_default_dtype(default)
    kept = [p for p in model.parameters() if p.dtype == torch.float32]  # float32 by the family's own choice
    model = model.double().eval()  # (HunYuan-MoE's router): kept so, as from_pretrained and load_compressed keep it
    for p in kept:
        p.data = p.data.float()
    with torch.no_grad():  # norms away from their init (1 or 0) so that folding them is tested
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif "bias" in name and not p.any():  # zero-initialized biases nonzero, so that every bias path counts
                p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() == 1 and p.numel() > 1 and bool((p == p[0]).all()) and p[0] in (0, 1):
                # any other constant-initialized vector (a per-channel residual or output scale at 1, a gate at 0):
                # a constant commutes with a rotation, and would hide a scale the layout does not know
                p.copy_(p + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.25)
    return model


def prepared(family: str, seed: int = 0):
    """``(model, layout, forms entry)`` with every weight in ``nn.Linear`` form."""
    model = build(family, seed)
    forms = linearize_(model, layout_of(model))
    return model, layout_of(model), forms


def batches(n: int = 4, length: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(3, VOCAB, (2, length), generator=g)} for _ in range(n)]


def targets(model: nn.Module) -> list[str]:
    """``CausalLMSpec.default_targets``: every eligible linear but the head, the MoE routers and layers no rank can
    shrink."""
    return CausalLMSpec(model=model).default_targets(model)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def _compress(model, method="svd_llm", allocation="uniform"):
    names = targets(model)
    stats = collect_stats(model, names, batches())
    return compress_(model, Recipe(method, ratio=RATIO, allocation=allocation, targets=names), stats), names


def sequential_vs_all_at_once(model: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits of model, of a copy)`` on the first calibration batch after ``svd_llm`` at :data:`RATIO` on
    ``names``: ``model`` compressed block by block with dense propagation (in place), the copy with every statistic
    collected in one pass.  The two are the same computation, so the logits must be equal bit for bit."""
    ref = copy.deepcopy(model)
    compress_(ref, Recipe("svd_llm", ratio=RATIO, targets=names), collect_stats(ref, names, batches()))
    compress_(model, Recipe("svd_llm", ratio=RATIO, targets=names, calibration={"mode": "sequential",
                                                                               "propagate": "dense"}),
              family=CausalLMSpec(model=model), batches=batches())
    ids = batches()[0]["input_ids"]
    return logits(model, ids), logits(ref, ids)


def _refusal(fn, model) -> str:
    """Run ``fn``; it must refuse (NotImplementedError naming the model class) without changing the model."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fn()
    except NotImplementedError as err:
        msg = str(err)
        assert type(model).__name__ in msg, msg
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        raise Refused(msg.split(": ", 1)[-1]) from err
    raise AssertionError("expected a refusal")


# -- cells ---------------------------------------------------------------------------------------------
def cell_svd_llm(family: str) -> str:
    model, _, _ = prepared(family)
    total = sum(p.numel() for p in model.parameters())
    report, names = _compress(model)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in names)
    targeted = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2 and id(p) not in targeted)
    assert report.targeted_params_before + report.uncovered_params + vectors == total, "parameters do not add up"
    assert abs(report.params_ratio - RATIO) < 0.05, report.params_ratio
    assert torch.isfinite(logits(model, batches()[0]["input_ids"])).all()
    return (f"{len(names)} layers, {report.params_ratio:.3f} of targets / {report.model_params_ratio:.3f} of model; "
            f"not covered {report.uncovered_params:,}")


def cell_svd_llm_v2(family: str) -> str:
    model, _, _ = prepared(family)
    report, _ = _compress(model, "svd_llm_v2", "v2")
    groups: dict[str, list] = {}
    for r in report.layers:
        groups.setdefault(layer_type(r.name), []).append(r)
    for rows in groups.values():  # the parameter-weighted mean ratio of each layer type is the asked ratio
        mean = sum(r.ratio_assigned * r.out_features * r.in_features for r in rows) / sum(
            r.out_features * r.in_features for r in rows)
        assert abs(mean - RATIO) < 1e-9, mean
    assert abs(report.params_ratio - RATIO) < 0.06, report.params_ratio
    spread = [r.ratio_assigned for r in report.layers]
    return f"ratios {min(spread):.2f}-{max(spread):.2f}, removed {report.params_ratio:.3f}"


def _joint(model, layout, ratio=None, full=False, method="svd"):
    """Joint q/k/v through the recipe: separate projections as joint groups (the family spec finds them in
    the layout), a fused qkv as one matrix (which is the joint factorization); ``full``: every rank full."""
    if layout.blocks[0].attn.fused:
        names = [b.attn.qkv for b in layout.blocks]
        full_ranks = {n: {"rank": min(model.get_submodule(n).weight.shape)} for n in names}
        recipe = Recipe(method, ratio=ratio or RATIO, targets=names, overrides=full_ranks if full else {})
        return compress_(model, recipe, family=CausalLMSpec(model=model), batches=batches())
    names = [n for b in layout.blocks for n in b.attn.readers]
    # an attention with one stream reader (Gemma 4's KV-sharing layers: q_proj alone) is no group, its layer a single
    full_ranks = {b.attn.path if len(b.attn.readers) > 1 else b.attn.readers[0]: {"rank": layout.hidden}
                  for b in layout.blocks}
    recipe = Recipe(method, ratio=ratio or RATIO, joint_qkv=True, targets=names, overrides=full_ranks if full else {})
    return compress_(model, recipe, family=CausalLMSpec(model=model), batches=batches())


def cell_joint(family: str) -> str:
    model, layout, _ = prepared(family)
    ids = batches()[0]["input_ids"]
    ref = logits(model, ids)
    full = copy.deepcopy(model)
    _joint(full, layout, full=True)
    err = rel(logits(full, ids), ref)
    assert err < 1e-9, err
    report = _joint(model, layout, method="svd_llm")
    for r in report.layers:
        bias = r.params_before - r.out_features * r.in_features
        assert r.params_after == r.rank * (r.in_features + r.out_features) + bias, r
    attn = layout.blocks[0].attn
    kind = "fused qkv" if attn.fused else "stream readers, no q/k/v triple" if attn.inputs else "separate q/k/v"
    return f"{kind}: full rank rel {err:.0e}; ranks {[r.rank for r in report.layers]}"


def _round_trip(model, plan, family, ids) -> None:
    fresh = build(family, seed=5)
    apply_plan(fresh, plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(fresh, ids), logits(model, ids)), "plan rebuild is not bit-exact"


def cell_rotation(family: str) -> str:
    model, layout, forms = prepared(family)
    ids = batches()[0]["input_ids"]
    report = _joint(model, layout)
    layout = layout_of(model)
    if family in NO_ROTATION_FAMILIES:
        _refusal(lambda: rotate_model_(model, layout), model)
    ref = logits(model, ids)
    rotation = rotate_model_(model, layout, seed=1)
    err = rel(logits(model, ids), ref)
    assert err <= 1e-6, err
    kept = CausalLMSpec(model=model).quant_exclude(model)  # the head and Linear routers stay in float
    quant = quantize_model_(model, WeightQuantConfig(bits=4, grid=20), ActQuantConfig(bits=4, clip_ratio=0.9),
                            exclude=kept)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in kept]
    assert not plain, f"not quantized: {plain[:3]}"
    plan = merge_plans(make_plan({"name": "forms"}, 0.0, "none", {}, forms=forms, rotation=rotation), report.plan,
                       make_plan({"name": "quantization"}, 0.0, "none", {}, quantization=quant))
    _round_trip(model, plan, family, ids)
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    return f"rel {err:.0e}; {n} W4A4 layers; plan rebuild bit-exact"


def cell_latent(family: str) -> str:
    from compression.latent_cache import LatentAttention, disable_latent_cache_, enable_latent_cache_

    model, layout, _ = prepared(family)
    if family in NO_LATENT_FAMILIES:
        _refusal(lambda: enable_latent_cache_(model, layout), model)
    _joint(model, layout, method="svd_llm_v2")
    prompt = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # left padding: positions come from the mask
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    a = model.generate(prompt, **kw)
    fused = layout.blocks[0].attn.fused
    diffs, kinds = [], []
    nan_rows = int(torch.stack(a.scores).isnan().any(dim=-1).any(dim=0).sum())
    for keys in ("latent", "plain"):
        latent = copy.deepcopy(model)
        paths = enable_latent_cache_(latent, layout_of(latent), keys=keys)
        assert len(paths) == len(layout.blocks)
        got = latent.generate(prompt, **kw)
        assert torch.equal(a.sequences, got.sequences), f"greedy tokens differ (keys={keys})"
        ref, new = torch.stack(a.scores), torch.stack(got.scores)
        # NaN only where the plain cache gives NaN too (Gemma 2's eager softmax runs in float32, where a float64
        # model's mask minimum becomes -inf: a fully masked left-padding query is NaN in transformers itself)
        assert torch.equal(ref.isnan(), new.isnan()), f"NaN scores differ (keys={keys})"
        assert ref.isfinite().all(dim=-1).all(dim=0).sum() >= 2, "fewer than two batch rows with finite scores"
        diffs.append(float((ref - new).nan_to_num().abs().max()))
        assert diffs[-1] <= 1e-5, (keys, diffs[-1])
        with torch.no_grad():
            out = latent(prompt, use_cache=True)
        cache = output_cache(out)
        ranks = [latent.get_submodule(p).rank for p in (b.attn.qkv for b in layout.blocks)] if fused \
            else [latent.get_submodule(p).qkv_latent.rank for p in paths]
        held = [(layer.keys if keys == "latent" else layer.values).shape[-1] for layer in cache.layers]
        assert held == ranks, "the cache does not hold the latents"
        kinds.append("+".join(sorted({type(layer).__name__ for layer in cache.layers})))
        disable_latent_cache_(latent)
        assert not any(isinstance(m, LatentAttention) for m in latent.modules())
    nan = f"; {nan_rows} of 3 rows NaN in the plain model too (float64 eager softmax)" if nan_rows else ""
    return f"same tokens, max score diff {diffs[0]:.0e} / {diffs[1]:.0e}{nan}; {kinds[0]} / {kinds[1]}"


def cell_export(family: str) -> str:
    model, _, forms = prepared(family)
    report, _ = _compress(model)
    plan = merge_plans(make_plan({"name": "forms"}, 0.0, "none", {}, forms=forms), report.plan)
    ids = batches()[0]["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, Path(tmp) / "export", plan)
        loaded, _ = load_compressed(Path(tmp) / "export", dtype=torch.float64)
    assert torch.equal(logits(loaded, ids), logits(model, ids)), "export round trip is not bit-exact"
    return f"bit-exact ({', '.join(k for k in forms) or 'no conversions'})"


def cell_lora(family: str) -> str:
    from peft import LoraConfig, inject_adapter_in_model

    from callbacks.lora import lora_layers, merge_and_unwrap_lora_

    model, _, _ = prepared(family)
    _compress(model)
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    with torch.random.fork_rng(devices=[]):  # the adapters' init draws from the global generator: seed it, so that
        torch.manual_seed(0)                 # a cell's figures do not depend on which cells ran before it
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=[f"{n}.{s}" for n in names
                                                                              for s in ("down", "up")]), model)
    assert len(lora_layers(model, "down")) == len(lora_layers(model, "up")) == len(names)
    downs = {n: model.get_submodule(f"{n}.down").get_base_layer().weight.clone() for n in names}
    ups = {n: model.get_submodule(f"{n}.up").get_base_layer().weight.clone() for n in names}
    params = [p for layer in lora_layers(model, "up").values() for p in layer.parameters() if p.requires_grad]
    ids = batches()[1]["input_ids"]
    loss = lm_loss(model, ids)
    before = float(loss.detach())
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 0.5 * p.grad
        after = float(lm_loss(model, ids))
    assert after < before, (before, after)
    merge_and_unwrap_lora_(model)
    assert all(torch.equal(model.get_submodule(f"{n}.down").weight, downs[n]) for n in names)
    changed = sum(not torch.equal(model.get_submodule(f"{n}.up").weight, ups[n]) for n in names)
    assert changed > 0
    return f"{len(names)} layers x 2 sides; loss {before:.4f} -> {after:.4f}; {changed} up factors changed"


RUNNERS = {"svd_llm": cell_svd_llm, "svd_llm_v2 + v2": cell_svd_llm_v2, "joint QKV": cell_joint,
           "rotation + W4A4": cell_rotation, "latent cache": cell_latent, "export": cell_export,
           "U/V LoRA": cell_lora}


def run_cell(family: str, cell: str) -> tuple[str, str]:
    """``("pass", detail)`` or ``("refused", reason)``; a failed check raises."""
    try:
        return "pass", RUNNERS[cell](family)
    except Refused as r:
        return "refused", str(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here (default: print)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    start = time.perf_counter()
    rows, reasons = [], {}
    for family, (_, model_cls, _) in FAMILIES.items():
        cells = []
        for cell in CELLS:
            status, detail = run_cell(family, cell)
            if status == "refused":
                reasons.setdefault(detail, []).append(f"{family} {cell}")
                cells.append("refused")
            else:
                cells.append(f"✓ {detail}")
        rows.append(f"| {family} (`{model_cls}`) | " + " | ".join(cells) + " |")
    seconds = time.perf_counter() - start
    lines = [
        "# Architecture matrix",
        "",
        "Every family x every compression stage on a tiny random-init model built from its transformers config "
        f"(hidden {HIDDEN}, 2 layers, vocab {VOCAB}, float64; transformers {transformers.__version__}). Each ✓ cell "
        "passed its check (see `benchmarks/architectures.py`); `refused` cells raise before touching the model, "
        "with the model class and the reason. The same cells run as `tests/test_architectures.py`.",
        "",
        "    .venv/bin/python benchmarks/architectures.py --out docs/results/architectures.md",
        "",
        "| family | " + " | ".join(CELLS) + " |",
        "|---|" + "---|" * len(CELLS),
        *rows,
        "",
        "Refusals:",
        "",
        *[f"- {', '.join(where)}: {reason}" for reason, where in reasons.items()],
        "",
        f"Whole matrix: {seconds:.0f} s on one thread.",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
