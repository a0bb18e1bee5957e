"""What VGGT's compressible groups cost (parameters vs FLOPs), and a compressed model's cost, on any device.

Imported by ``benchmarks/vggt_table.py`` (and usable alone)::

    python benchmarks/vggt_costs.py            # prints the 1B table (meta device, no weights)

Per group (``lightning_modules.vggt_spec.TARGET_GROUPS``) the parameters of its targeted
Linears and their FLOPs per forward, counted with ``FlopCounterMode`` hooks on every Linear
(``2 · tokens · in · out``), next to the model total: a group's share of the parameters and
its share of the FLOPs differ by how many tokens pass through it.  A compressed model's cost
on the meta device needs only the plan (ranks), not weights: ``apply_plan`` builds the factors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compression import apply_plan, rank_for_ratio  # noqa: E402
from compression.plan import make_plan  # noqa: E402
from lightning_modules.vggt_spec import DEFAULT_GROUPS, TARGET_GROUPS, VGGTSpec  # noqa: E402
from metrics.flops import count_flops, vggt_flops  # noqa: E402
from models.vggt import VGGT, VGGTConfig  # noqa: E402


def group_costs(model: nn.Module, image_hw: tuple[int, int], frames: Sequence[int] = (1, 8)) -> dict:
    """``{"groups": {group: {"params", "gflops_<S>"}}, "total": {...}}`` of the dense Linears per group.

    ``model`` may live on the meta device.  The DPT projections are counted as the 1x1 convs
    they are (same FLOPs as the equivalent Linears).
    """
    spec = VGGTSpec(target_groups=list(TARGET_GROUPS))
    names = spec.default_targets(model) if any(isinstance(m, nn.Linear) for m in model.modules()) else []
    convs = [f"{h}.projects.{k}" for h in ("depth_head", "point_head") if getattr(model, h, None) is not None
             for k in range(4) if not isinstance(model.get_submodule(f"{h}.projects.{k}"), nn.Linear)]
    layers = names + convs
    device = next(model.parameters()).device
    out: dict = {"groups": {g: {"params": 0} for g in TARGET_GROUPS}, "total": {}}
    for name in layers:
        group = VGGTSpec.target_group(name)
        out["groups"][group]["params"] += sum(p.numel() for p in model.get_submodule(name).parameters())
    out["total"]["params"] = sum(p.numel() for p in model.parameters())
    for s in frames:
        images = torch.zeros(1, s, 3, *image_hw, device=device)
        per_layer = count_flops(model, images, prefixes=layers)
        for g in TARGET_GROUPS:
            out["groups"][g][f"gflops_{s}"] = 0.0
        for name in layers:
            out["groups"][VGGTSpec.target_group(name)][f"gflops_{s}"] += per_layer[name]
        out["total"][f"gflops_{s}"] = per_layer["total"]
    return out


def uniform_plan(model: nn.Module, ratio: float, groups: Sequence[str] = DEFAULT_GROUPS) -> dict:
    """A plan giving every targeted Linear of ``groups`` the rank of ``ratio`` (structure only)."""
    names = VGGTSpec(target_groups=list(groups)).default_targets(model)
    layers = {}
    for n in names:
        lin = model.get_submodule(n)
        layers[n] = {"rank": rank_for_ratio(lin.out_features, lin.in_features, ratio), "in_features": lin.in_features,
                     "out_features": lin.out_features, "bias": lin.bias is not None}
    return make_plan({"name": "svd"}, ratio, "uniform", layers)


def model_cost(model: nn.Module, image_hw: tuple[int, int], frames: Sequence[int] = (1, 8)) -> dict:
    """``{"params": int, "gflops_<S>": float}`` of ``model`` as it is (dense or factored)."""
    out: dict = {"params": sum(p.numel() for p in model.parameters())}
    for s in frames:
        out[f"gflops_{s}"] = vggt_flops(model, num_frames=s, image_hw=image_hw)["total"]
    return out


def big_model_rows(ratios: Sequence[float], config: VGGTConfig | None = None,
                   image_hw: tuple[int, int] = (518, 518)) -> list[dict]:
    """Cost of VGGT-1B (no track head, meta device) at each uniform ratio, with and without the camera trunk."""
    variants = (("all default groups", DEFAULT_GROUPS), ("camera trunk kept dense", ("patch_embed", "frame", "global")))
    rows = []
    for label, groups in variants:
        for ratio in ratios:
            with torch.device("meta"):
                model = VGGT(config, enable_track=False)
            if ratio > 0:
                apply_plan(model, uniform_plan(model, ratio, groups))
            rows.append({"targets": label, "ratio": ratio, **model_cost(model, image_hw)})
    return rows


def group_table(costs: dict, frames: Sequence[int] = (1, 8)) -> list[str]:
    """Markdown rows: group, params (share), GFLOPs per S (share)."""
    total = costs["total"]
    head = "| group | params | share | " + " | ".join(f"GFLOPs {s} fr. | share" for s in frames) + " |"
    lines = [head, "|---|---:|---:|" + "---:|---:|" * len(frames)]
    for g, c in costs["groups"].items():
        cells = [f"{c['params']:,}", f"{c['params'] / total['params']:.1%}"]
        for s in frames:
            cells += [f"{c[f'gflops_{s}']:.4g}", f"{c[f'gflops_{s}'] / total[f'gflops_{s}']:.1%}"]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    cells = [f"{total['params']:,}", "100%"] + [x for s in frames for x in (f"{total[f'gflops_{s}']:.4g}", "100%")]
    lines.append("| whole model | " + " | ".join(cells) + " |")
    return lines


def big_table(rows: list[dict]) -> list[str]:
    dense = rows[0]
    lines = ["| targets | ratio | params | params removed | GFLOPs 1 fr. | GFLOPs 8 fr. | FLOPs removed (8 fr.) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['targets']} | {r['ratio']:g} | {r['params']:,} | {1 - r['params'] / dense['params']:.1%} | "
                     f"{r['gflops_1']:.0f} | {r['gflops_8']:.0f} | {1 - r['gflops_8'] / dense['gflops_8']:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    args = parser.parse_args()
    with torch.device("meta"):
        model = VGGT(enable_track=False)
    print("\n".join(group_table(group_costs(model, (518, 518)))))
    print()
    print("\n".join(big_table(big_model_rows(args.ratios))))


if __name__ == "__main__":
    main()
