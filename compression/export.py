"""Export a compressed model to a folder and rebuild it offline, without pickles.

A compressed export is a folder that ``transformers`` tools half understand and this
project fully rebuilds::

    model.safetensors        every tensor of the compressed state dict, shared (tied) tensors once
    compression_plan.json    the plan (plain JSON): which layers are low-rank, at which rank
    svd_vggt_export.json     the manifest: format, whether compressed, and the SHA-256 of every
                             tensor file, checked before any tensor is read back
    config.json              the dense model's ``transformers`` config (when it has one)
    generation_config.json   (when the model has one)
    tokenizer files          (when a tokenizer is given)

:func:`load_compressed` inverts it: ``AutoConfig.from_pretrained`` ->
``AutoModelForCausalLM.from_config`` (weights tied as the config says) -> :func:`apply_plan`
(factored structure, no calibration) -> strict safetensors load.  The round trip is
bit-exact: the same tensors land in the same modules.  Before writing, :func:`save_compressed`
checks that the model *is* what the plan says (:func:`compression.plan.check_model_matches_plan`),
so a plan that cannot rebuild the model is refused instead of exported.  Reading checks each
tensor file's checksum first (a flipped byte is an error naming the file); exports written
before the manifest existed load with a warning that they cannot be verified.

``merge_to_dense=True`` instead writes a plain dense ``save_pretrained`` folder
(``W = up @ down`` per layer, merged on a copy) for tools that only read dense models;
it costs the parameter savings, not the accuracy (float64 product, rounded once).

Every export is written into a temporary folder beside the target and renamed into place,
so an interrupted export leaves no half folder under the target name; the temporary folder of a
killed export is removed by the next export to the same target (naming and rules:
:mod:`compression.io`).  Folders and files get ordinary modes (0755 / 0644 under umask 022).
``transformers`` is imported lazily (this package never imports Lightning).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.io import (
    check_sha256,
    fsync_dir,
    normalize_modes,
    read_json,
    remove_orphans,
    safetensors_error,
    sha256_file,
    temp_sibling,
)
from compression.plan import (
    apply_plan,
    check_model_matches_plan,
    load_plan,
    merge_lowrank_,
    save_plan,
    validate_plan,
)

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "compression_plan.json"
MANIFEST_NAME = "svd_vggt_export.json"
EXPORT_FORMAT = "svd-vggt/compressed"
_DENSE_UNSUPPORTED = ("joint_groups", "quantization", "rotation")


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    plan: dict,
    tokenizer: Any = None,
    merge_to_dense: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (compressed by ``plan``) to ``directory``; returns the folder.

    Args:
        model: the compressed model (``LowRankLinear`` layers in place).  LoRA adapters must
            be merged first (``callbacks.lora`` does so at the end of fit).
        directory: target folder; it must not exist unless ``overwrite``.
        plan: the compression plan that built ``model`` (``CompressionModule.plan``).
        tokenizer: saved with ``save_pretrained`` when given.
        merge_to_dense: write a dense ``save_pretrained`` folder instead (no plan, no savings);
            only plans made of per-matrix low-rank layers can be merged.
        overwrite: replace an existing ``directory``.

    Raises ``ValueError`` before writing anything when the model does not match the plan
    (a planned layer missing or of another shape/rank, or a low-rank layer the plan omits).
    """
    validate_plan(plan)
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"export folder {target} exists; pass overwrite=True or choose another directory")
    _check_no_adapters(model)
    check_model_matches_plan(model, plan)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    tmp = temp_sibling(target, directory=True)
    try:
        if merge_to_dense:
            _write_dense(model, tmp, plan)
        else:
            _write_compressed(model, tmp, plan)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, compressed=not merge_to_dense, plan=plan)
        normalize_modes(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s model to %s", "dense (merged)" if merge_to_dense else "compressed", target)
    return target


def load_compressed(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    build: Callable[[], nn.Module] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Any]:
    """Rebuild a model written by :func:`save_compressed`; returns ``(model, tokenizer or None)``.

    Args:
        directory: the export folder.
        dtype: cast the weights to this dtype (default: the dtype of the stored tensors).
        build: a callable returning the dense model to rebuild into, for models that are not
            ``transformers`` causal LMs (default: ``AutoModelForCausalLM.from_config``).
        device: where the tensors are loaded.

    Every tensor file listed in the manifest is checksummed before it is read; a mismatch, a
    missing plan of a compressed export, an unreadable safetensors file or malformed JSON each
    raise an error naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"export folder {directory} does not exist (save_compressed writes one)")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_NAME}; is it a folder written by save_compressed?")
    verify_export(directory)
    plan_path = directory / PLAN_NAME
    plan = load_plan(plan_path) if plan_path.is_file() else None
    if plan is None and read_export_info(directory).get("compressed") == "true":
        raise FileNotFoundError(
            f"{plan_path} is missing: {weights} holds a compressed model whose low-rank structure is rebuilt "
            f"from that plan (save_compressed writes it next to the weights); restore it or export again"
        )
    dtype = dtype or _stored_dtype(weights) or torch.float32
    if build is not None:
        model = build().to(dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(directory)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if plan is not None:
        changed = apply_plan(model, plan)
        log.info("rebuilt %d low-rank layers from %s", len(changed), plan_path)
    try:
        missing, unexpected = load_model(model, weights, strict=False, device=str(device))
    except SafetensorError as err:
        raise safetensors_error(weights, err) from None
    except RuntimeError as err:  # shape mismatches
        missing, unexpected = [str(err).replace("\n", " ")], []
    if missing or unexpected:
        raise RuntimeError(
            f"{weights} does not match the rebuilt model: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}; the config or plan in {directory} belongs to another model"
        )
    model.to(device).eval()
    return model, _load_tokenizer(directory)


def verify_export(directory: str | os.PathLike) -> dict | None:
    """Check every file the manifest lists against its SHA-256; returns the manifest (None if absent).

    Raises ``ValueError`` naming the first file whose bytes changed, ``FileNotFoundError`` naming
    a listed file that is gone.  An export without a manifest (written before checksums were
    recorded) is accepted with a warning.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        log.warning("%s has no %s (an export from before checksums were recorded); its tensor files cannot be "
                    "verified -- export again to add them", directory, MANIFEST_NAME)
        return None
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                              for v in files.values()):
        raise ValueError(f"{path}: expected {{\"files\": {{name: {{\"sha256\": hex}}}}}}; the manifest is damaged")
    for name, entry in files.items():
        check_sha256(Path(directory) / name, entry["sha256"], path)
    return manifest


def read_export_info(directory: str | os.PathLike) -> dict:
    """The metadata stored in the safetensors header (format, whether it is compressed)."""
    from safetensors import SafetensorError, safe_open

    weights = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(weights, framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise safetensors_error(weights, err) from None


# -- writers ----------------------------------------------------------------------------------------
def _write_compressed(model: nn.Module, folder: Path, plan: dict) -> None:
    from safetensors.torch import save_model

    # save_model stores tensors that share memory (tied embeddings) once and load_model restores them
    save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "export": EXPORT_FORMAT,
                                                            "compressed": "true", "layers": str(len(plan["layers"]))})
    save_plan(plan, folder / PLAN_NAME)
    _save_configs(model, folder)


def _write_manifest(folder: Path, compressed: bool, plan: dict) -> None:
    """``svd_vggt_export.json``: what the folder is, and the SHA-256 of every tensor file in it."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.glob("*.safetensors"))}
    manifest = {"export": EXPORT_FORMAT, "compressed": compressed, "files": files}
    if not compressed:
        manifest["merged_layers"] = len(plan["layers"])
    # a side file, not the HF config: dense readers must not see foreign keys
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _write_dense(model: nn.Module, folder: Path, plan: dict) -> None:
    sections = [k for k in _DENSE_UNSUPPORTED if plan.get(k)]
    if sections:
        raise ValueError(
            f"merge_to_dense cannot represent plan sections {sections} (joint/quantized/rotated layers); "
            "export with merge_to_dense=False"
        )
    dense = copy.deepcopy(model)
    merged = merge_lowrank_(dense)
    if hasattr(dense, "save_pretrained"):
        dense.save_pretrained(folder, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(dense, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "export": EXPORT_FORMAT,
                                                                "compressed": "false"})
    log.info("merged %d low-rank layers into dense weights for export", len(merged))


def _save_configs(model: nn.Module, folder: Path) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(folder)


def _check_no_adapters(model: nn.Module) -> None:
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    if lora:
        raise ValueError(
            f"the model still carries LoRA adapters ({lora[0]}, ...); merge them into the factors first "
            "(callbacks.lora.merge_and_unwrap_lora_) so the export holds the plan's structure only"
        )


def _replace_dir(tmp: Path, target: Path) -> None:
    """``tmp`` becomes ``target``; an existing ``target`` is moved aside first and removed after.

    The old folder waits inside a temporary of the same naming, so a kill between the two renames
    leaves an orphan that the next export to ``target`` removes.
    """
    old = None
    if target.exists():
        old = temp_sibling(target, directory=True)
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- readers ----------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_dtype(weights: Path) -> torch.dtype | None:
    """The floating dtype of the stored tensors (the first floating one found), read from the header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    except SafetensorError as err:
        raise safetensors_error(weights, err) from None
    return None


def _load_tokenizer(directory: Path) -> Any:
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


__all__ = ["MANIFEST_NAME", "PLAN_NAME", "WEIGHTS_NAME", "load_compressed", "read_export_info", "save_compressed",
           "verify_export"]
