"""VLM family spec (LLaVA-1.5, LLaVA-NeXT, SmolVLM/Idefics3): build, targets, calibration, loss, generation.

- ``build``: :func:`models.vlm.load_vlm` (hub id, local folder, or ``tiny-<family>``); keeps the
  processor for decoding; weights in other forms (3-D experts) become ``nn.Linear``
  (:func:`compression.forms.linearize_`, listed in ``forms`` for the plan).
- ``default_targets``: every eligible ``nn.Linear`` of the language model's decoder layers
  (attention q/k/v/o and MLP gate/up/down); optionally the vision tower's encoder layers
  (attention and MLP) and the projector.  ``lm_head`` is never a default target.
- ``calibration_forward``: one forward on an image+text batch, so the hooks see the vision
  tower's activations (pixels) and the language model's (text and projected image tokens).
- ``training_loss``: next-token cross-entropy on the answer only (``labels = -100`` on the
  prompt, image tokens and padding; :class:`data.vqa.common.VQACollator`)::

      L = Σ_t [y_{t+1} ≠ -100] · -log softmax(logits_t)[y_{t+1}]  /  #{t : y_{t+1} ≠ -100}

- ``evaluate``: greedy generation (``max_new_tokens``, 16 by default as in the ScienceQA/VizWiz
  protocols) from the left-padded prompt, decoded without special tokens and scored by
  :mod:`metrics.vqa` (ScienceQA option parsing or VQA soft accuracy, per the batch's task); the
  returned loss is the teacher-forced answer loss of the same batch.
- ``joint_groups``: the base behaviour covers both towers (CLIP and SigLIP/Idefics3 attentions have
  separate ``q_proj``/``k_proj``/``v_proj``); a tower with one fused ``qkv`` Linear needs no group.
- ``quant_exclude``: the output head (and, with ``quantize_vision=False``, the vision tower) stays in
  high precision.
- ``trainable``: the parts a training run updates (LLaVA stage 1: ``[projector]``); every other
  parameter is frozen when the model is built.  ``None`` (default) leaves the model as loaded.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression import eligible_linears
from lightning_modules.specs import _DTYPES, ModelSpec
from metrics.vqa import VQAScores

log = logging.getLogger(__name__)

# Set in a LLaVA config once ``VLMSpec.normalize_projector_input_`` has folded the statistics (saved in config.json).
NORMALIZED_FLAG = "projector_input_normalized"

_NOT_MODEL_INPUTS = ("labels",)
PARTS = ("vision_tower", "projector", "language_model")


def freeze_except_(model: nn.Module, parts: list[str]) -> dict[str, int]:
    """Freeze every parameter of a VLM except those of ``parts`` (names of :func:`models.vlm.vlm_parts`);
    returns ``{part: trainable parameter count}``.  A tied output head follows the input embedding."""
    from models.vlm import vlm_parts

    names = vlm_parts(model)
    model.requires_grad_(False)
    counts = {}
    for part in parts:
        module = model.get_submodule(names[part])
        module.requires_grad_(True)
        counts[part] = sum(p.numel() for p in module.parameters())
    log.info("trainable parameters: %s", counts)
    return counts


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model's forward in a training batch (everything but ``labels``)."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def _layer_list_linears(module: nn.Module, prefix: str, eligible: dict[str, nn.Module]) -> list[str]:
    """Eligible Linears inside ``module``'s layer lists (``nn.ModuleList``): the transformer blocks."""
    lists = [f"{prefix}.{n}." for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and n]
    return [n for n in eligible if any(n.startswith(p) for p in lists)]


class VLMSpec(ModelSpec):
    """A ``transformers`` VLM scored on VQA by generation.

    Args:
        name_or_path: hub id (``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-v1.6-vicuna-7b-hf``,
            ``HuggingFaceTB/SmolVLM-Instruct``...), a local ``save_pretrained`` folder, or
            ``tiny-<family>`` of :mod:`models.vlm_tiny` (random-init, CPU tests).
        dtype: weights dtype: ``float32``, ``bfloat16``, ``float16`` or ``float64``.
        compress_language: the language model's attention and MLP layers are default targets.
        compress_vision: the vision tower's attention and MLP layers are default targets too.
        compress_projector: the projector's layers are default targets too.
        quantize_vision: whether a ``callbacks.Quantization`` stage also quantizes the vision tower
            (``False`` keeps it in high precision: the residual rotation covers only the language model).
        max_new_tokens: greedy decoding budget per answer.
        eval_loss: also compute the teacher-forced answer loss of every evaluation batch (one more
            forward per batch; ``False`` logs NaN as ``val/loss``).
        trainable: parts whose parameters train (``vision_tower``, ``projector``, ``language_model``);
            the rest is frozen at build time.  ``None``: leave ``requires_grad`` as loaded.
        projector_learning_rate: the projector's own learning rate when it trains together with other parts
            (LLaVA's ``mm_projector_lr``: a freshly initialised projector needs a far larger step than a
            pretrained language model); ``None``: the run's ``learning_rate`` for every part.
        seed: initialisation seed of the tiny models.
        model: an already built model (tests); needs ``processor`` too.
        processor: its processor.
    """

    def __init__(self, name_or_path: str = "tiny-llava", dtype: str = "float32", compress_language: bool = True,
                 compress_vision: bool = False, compress_projector: bool = False, quantize_vision: bool = True,
                 max_new_tokens: int = 16, eval_loss: bool = True, trainable: list[str] | None = None,
                 seed: int = 0, model: nn.Module | None = None, processor: Any = None,
                 projector_learning_rate: float | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not (compress_language or compress_vision or compress_projector):
            raise ValueError("VLMSpec needs at least one of compress_language / compress_vision / compress_projector")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if (model is None) != (processor is None):
            raise ValueError("pass both `model` and `processor`, or neither")
        if trainable is not None:
            trainable = list(trainable)
            bad = [t for t in trainable if t not in PARTS]
            if bad or not trainable:
                raise ValueError(f"trainable must list parts among {PARTS}, got {trainable}")
        if projector_learning_rate is not None:
            if projector_learning_rate <= 0:
                raise ValueError(f"projector_learning_rate must be > 0, got {projector_learning_rate}")
            if trainable is not None and "projector" not in trainable:
                raise ValueError(f"projector_learning_rate is set but the projector does not train "
                                 f"(trainable: {trainable}); add projector to trainable or drop the rate")
        self.projector_learning_rate = projector_learning_rate
        self.eval_loss, self.trainable = eval_loss, trainable
        self.name_or_path, self.dtype, self.seed = name_or_path, dtype, seed
        self.compress_language, self.compress_vision = compress_language, compress_vision
        self.compress_projector, self.max_new_tokens = compress_projector, max_new_tokens
        self.quantize_vision = quantize_vision
        self._model, self.processor = model, processor

    # -- model ------------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        if self._model is not None:
            model = self._model
        else:
            from models.vlm import load_vlm

            model, self.processor = load_vlm(self.name_or_path, dtype=_DTYPES[self.dtype], seed=self.seed)
        self._linearize(model)  # Qwen3.5-MoE's 3-D experts as nn.Linear, recorded for the plan
        if self.trainable is not None:
            freeze_except_(model, self.trainable)
        return model

    def default_targets(self, model: nn.Module) -> list[str] | None:
        from models.vlm import vlm_parts

        parts = vlm_parts(model)
        eligible, _ = eligible_linears(model)
        names: list[str] = []
        if self.compress_language:
            names += _layer_list_linears(model.get_submodule(parts["language_model"]), parts["language_model"],
                                         eligible)
        if self.compress_vision:
            names += _layer_list_linears(model.get_submodule(parts["vision_tower"]), parts["vision_tower"], eligible)
        if self.compress_projector:
            projector = [n for n in eligible if n.startswith(parts["projector"] + ".")]
            if not projector:
                raise ValueError(f"compress_projector: the projector of {type(model).__name__} "
                                 f"({type(model.get_submodule(parts['projector'])).__name__}) holds no nn.Linear to "
                                 "factorize (Gemma 3's is a raw weight matrix); set compress_projector: false")
            names += projector
        if not names:
            raise ValueError(f"no eligible nn.Linear among the parts chosen for {type(model).__name__}")
        order = {n: i for i, n in enumerate(eligible)}
        return sorted(set(names), key=order.__getitem__)

    def layout(self, model: nn.Module):
        """The language model's layout (rotation and joint groups use it; the vision tower's attentions are
        listed as extra joint groups)."""
        from models.layouts import layout_of

        return layout_of(model)

    def quant_exclude(self, model: nn.Module) -> list[str]:
        """The output head stays in high precision (its error hits every token's logits directly);
        so does the vision tower unless ``quantize_vision``."""
        from models.vlm import vlm_parts

        parts = vlm_parts(model)
        return [parts["lm_head"]] + ([] if self.quantize_vision else [f"{parts['vision_tower']}.*"])

    def learning_rates(self, model: nn.Module) -> dict[str, float]:
        if self.projector_learning_rate is None:
            return {}
        from models.vlm import vlm_parts

        return {vlm_parts(model)["projector"]: self.projector_learning_rate}

    @torch.no_grad()
    def normalize_projector_input_(self, model: nn.Module, pixel_batches: Iterable[torch.Tensor],
                                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the per-channel mean and standard deviation of the projector's inputs on ``pixel_batches`` (the
        vision features exactly as the model computes them for its projector: a hook on the projector's input)
        into the projector's first Linear, so at the start of training it sees standardized features.  The
        projector stays LLaVA's ``linear_1 -> GELU -> linear_2``.  Statistics run over every token of every
        image; a channel with std <= ``eps`` is only centred.  Returns ``(mean, std)`` (float64, per channel).

        Why: CLIP's features are a small image-dependent change on a large constant (one channel reaches
        ``|x| = 88`` against an rms of 0.9; docs/results/vlm_real.md), so a freshly initialised projector
        maps every image to nearly the same tokens."""
        from models.vlm import fold_input_normalization_, vlm_parts

        if getattr(model.config, "model_type", None) != "llava":
            raise ValueError(f"normalize_projector_input_ supports LLaVA-1.5 models (model_type 'llava'), got "
                             f"{getattr(model.config, 'model_type', type(model).__name__)!r}")
        if getattr(model.config, NORMALIZED_FLAG, False):
            raise ValueError("this model's projector already holds an input normalization (folded by an earlier run; "
                             f"config.{NORMALIZED_FLAG} is true): folding again would change what the trained "
                             "projector computes; continue training it without the normalization")
        projector = model.get_submodule(vlm_parts(model)["projector"])
        first = getattr(projector, "linear_1", None)
        if not isinstance(first, nn.Linear):
            raise ValueError(f"the projector has no nn.Linear linear_1 to fold into: {type(projector).__name__}")
        total, squares, count = None, None, 0

        def accumulate(_module, args):
            nonlocal total, squares, count
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            total = x.sum(0) if total is None else total + x.sum(0)
            squares = x.square().sum(0) if squares is None else squares + x.square().sum(0)
            count += x.shape[0]

        hook = projector.register_forward_pre_hook(accumulate)
        device = first.weight.device
        try:
            for pixels in pixel_batches:
                model.get_image_features(pixel_values=pixels.to(device, first.weight.dtype),
                                         vision_feature_layer=model.config.vision_feature_layer,
                                         vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        finally:
            hook.remove()
        if count < 2:
            raise ValueError("normalize_projector_input_ needs at least one image batch (got no image tokens)")
        mean = total / count
        std = ((squares - count * mean.square()).clamp_min(0) / (count - 1)).sqrt()
        std = torch.where(std > eps, std, torch.ones_like(std))
        fold_input_normalization_(first, mean, std)
        setattr(model.config, NORMALIZED_FLAG, True)  # saved with the model: a later fit must not fold again
        log.info("projector input normalized over %d image tokens: channel std %.3g to %.3g, |mean| up to %.3g",
                 count, float(std.min()), float(std.max()), float(mean.abs().max()))
        return mean, std

    # -- forward passes ---------------------------------------------------------------------------
    @staticmethod
    def _train_part(batch: dict) -> dict:
        return batch["full"] if "full" in batch else batch

    def calibration_forward(self, model: nn.Module, batch: dict) -> None:
        model(**model_inputs(self._train_part(batch)), use_cache=False)

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        nll, count = self._nll(model, self._train_part(batch))
        return nll / count.clamp_min(1)

    @staticmethod
    def _nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer-token NLL (float32 logits) and the number of scored tokens."""
        nll, count = VLMSpec.answer_nll(model, batch)
        return nll.sum(), count.sum()

    @staticmethod
    def answer_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the summed NLL of its answer tokens (float32 logits; ``[B]``) and their count (``[B]``).
        ``-answer_nll`` is the conditional log-likelihood an lm-eval-harness multiple-choice task compares."""
        if "labels" not in batch:
            raise ValueError("a VLM training batch needs `labels` (prompt tokens at -100); use data.vqa.VQADataModule")
        labels = batch["labels"]
        target = labels[:, 1:]
        scored = target != -100
        keep = torch.cat([scored, scored.new_zeros(len(scored), 1)], 1)  # position t predicts token t + 1
        logits = None
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            # the output head only on the answer positions: the full [B, T, vocab] logits cost as much as a
            # third of a small LM's forward and backward (SmolLM2: 576 x 49k head), and only ~2 rows per question score
            logits = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep.to(labels.device)).logits
            if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
                logits = None  # a transformers version without boolean masks: fall back to the full logits
        if logits is None:
            logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1][scored.to(labels.device)]
        rows = scored.nonzero()[:, 0].to(logits.device)  # the example of every scored token, in logits' order
        target = target[scored].to(logits.device)
        per_token = F.cross_entropy(logits.float(), target, reduction="none")
        nll = per_token.new_zeros(len(scored)).index_add(0, rows, per_token)
        return nll, scored.sum(1)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt: dict) -> list[str]:
        """Greedy answers (decoded, special tokens dropped, stripped) for a left-padded prompt batch."""
        if self.processor is None:
            raise RuntimeError("VLMSpec.generate needs the processor: build() the model first")
        tok = self.processor.tokenizer
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = model.generate(**prompt, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos if eos is not None else tok.eos_token_id, pad_token_id=pad)
        new = out[:, prompt["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    # -- scoring ----------------------------------------------------------------------------------
    def make_metrics(self) -> nn.Module:
        return VQAScores()

    def evaluate(self, model: nn.Module, batch: dict, metrics: nn.Module, batch_idx: int = 0) -> torch.Tensor:
        if "prompt" not in batch or "task" not in batch:
            raise ValueError("a VLM evaluation batch needs `prompt`, `full` and `task` (data.vqa.VQADataModule)")
        loss = self.training_loss(model, batch) if self.eval_loss else torch.tensor(float("nan"))
        predictions = self.generate(model, batch["prompt"])
        metrics.update(batch["task"], predictions, batch["choices"], batch["answer_index"], batch["answers"])
        if batch_idx == 0:
            log.debug("%s predictions: %s", batch["task"], list(zip(batch["qid"], predictions))[:4])
        return loss

    def compute_metrics(self, metrics: nn.Module) -> dict[str, torch.Tensor]:
        return metrics.compute()


__all__ = ["PARTS", "VLMSpec", "freeze_except_", "model_inputs"]
