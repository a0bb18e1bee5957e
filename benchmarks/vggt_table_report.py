"""Markdown and plot for ``benchmarks/vggt_table.py`` (from its JSON; rerun alone to re-render).

    python benchmarks/vggt_table_report.py docs/results/vggt_table.json

The hand-written analysis under ``## Why this ordering`` in an existing markdown file is kept
when the tables are rewritten.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ANALYSIS = "## Why this ordering"
COLUMNS = [("gflops_1", "GFLOPs 1 fr.", "{:.4f}"), ("gflops_8", "GFLOPs 8 fr.", "{:.4f}"),
           ("params", "params", "{:,}"), ("camera_auc30", "AUC@30 ↑", "{:.1f}"),
           ("depth_abs_rel", "AbsRel ↓", "{:.3f}"), ("points_chamfer", "Chamfer ↓", "{:.3f}"),
           ("two_view_auc10", "2-view AUC@10 ↑", "{:.1f}"), ("two_view_auc30", "2-view AUC@30 ↑", "{:.1f}"),
           ("err_pose_enc", "pose err. vs dense ↓", "{:.4f}"), ("err_depth", "depth err. vs dense ↓", "{:.4f}"),
           ("latency_ms", "CPU ms (8 fr.)", "{:.1f}")]
PLOTTED = [("camera_auc30", "camera AUC@30 (↑)"), ("depth_abs_rel", "depth AbsRel (↓)"),
           ("points_chamfer", "point Chamfer (↓)"), ("two_view_auc30", "two-view AUC@30 (↑)"),
           ("err_pose_enc", "pose encoding: rel. error vs dense (↓)"),
           ("err_depth", "depth: rel. error vs dense (↓)")]
COMMAND = "flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vggt_table.py --out docs/results/vggt_table.md"


def row_line(r: dict) -> str:
    cells = [f.format(r[k]) if k in r else "-" for k, _, f in COLUMNS]
    removed = r.get("targeted_flops_removed")
    extra = f"{r['targeted_params_removed']:.1%} / {removed:.1%}" if removed is not None else "-"
    return f"| {r['row']} | " + " | ".join(cells) + f" | {extra} |"


def write_markdown(out: dict, path: Path, group_table, big_table) -> None:
    rows, args = out["rows"], out["args"]
    dense = rows[0]
    old = path.read_text() if path.is_file() else ""
    analysis = old[old.index(ANALYSIS):] if ANALYSIS in old else f"{ANALYSIS}\n\n(to be written)\n"
    lines = [
        "# Compressing VGGT: the tiny testbed table",
        "",
        f"Command (2 CPU threads, {out['total_seconds'] / 60:.0f} min):",
        "",
        f"    {COMMAND}",
        "",
        f"Settings: `{json.dumps(args)}`. Protocol and row definitions: the docstring of "
        "`benchmarks/vggt_table.py` and `docs/vggt.md`. Testbed: `models/vggt/weights/vggt_tiny_synthetic` "
        f"(docs/results/vggt_testbed.md); {args['scenes']} held-out synthetic test scenes (8 views, 56x56), "
        f"calibration on {args['calib_scenes']} scenes of the disjoint calibration split "
        f"({out['calibration_seconds']:.0f} s). `ratio` = fraction of the targeted parameters removed "
        "(except the FLOPs-budget row, where it is the fraction of the targeted Linear FLOPs removed). "
        "Last column: measured fraction of the targeted parameters / targeted Linear FLOPs removed.",
        "",
    ]
    head = "| row | " + " | ".join(c[1] for c in COLUMNS) + " | removed (params / FLOPs) |"
    rule = "|---|" + "---:|" * (len(COLUMNS) + 1)
    for ratio in args["ratios"]:
        lines += [f"## ratio {ratio:g}", "", head, rule, row_line(dense)]
        lines += [row_line(r) for r in rows[1:] if r["ratio"] == ratio]
        lines.append("")
    lines += ["Fraction of each group's targeted parameters kept (dense-kept layers count fully):", "",
              "| row | ratio | patch_embed | frame | global | camera_trunk | layers kept dense |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "group_kept" in r:
            g = r["group_kept"]
            lines.append(f"| {r['row']} | {r['ratio']:g} | " + " | ".join(
                f"{g.get(k, 1.0):.2f}" for k in ("patch_embed", "frame", "global", "camera_trunk"))
                + f" | {r['dense_kept']} |")
    lora = [r for r in rows if "lora_steps" in r]
    if lora:
        lines += ["", "U/V LoRA rows: base row chosen by the lowest multi-task loss on the 8 validation scenes; "
                  f"`callbacks.UVLoRA`, r={args['lora_r']}, α={2 * args['lora_r']}, lr {args['lora_lr']}, "
                  f"{args['lora_steps']} steps per side (V then U), batch {args['lora_batch']}, on training "
                  "scenes: " + "; ".join(f"ratio {r['ratio']:g}: {r['base_row']} ({r['lora_seconds']:.0f} s)"
                                         for r in lora) + "."]
    lines += ["", "![metric vs GFLOPs](vggt_table.png)", "",
              "## What each group costs", "", "Tiny testbed (56x56):", "", *group_table(out["testbed_groups"]), "",
              "VGGT-1B (518x518, no track head, meta device):", "", *group_table(out["big_groups"]), "",
              "## VGGT-1B at each ratio (uniform; meta device, no weights)", "",
              "Same targets as the table; the plan alone builds the factored structure "
              "(`benchmarks/vggt_costs.py`).", "", *big_table(out["big_rows"]), "", analysis.rstrip(), ""]
    path.write_text("\n".join(lines))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    dense = rows[0]
    methods: dict[str, list[dict]] = {}
    for r in rows[1:]:
        key = "best + U/V LoRA" if "lora_steps" in r else r["row"]
        methods.setdefault(key, []).append(r)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=110)
    markers = "osD^vP*X"
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        if not key.startswith("err_"):
            ax.axhline(dense[key], color="grey", lw=1, ls=":")
            ax.plot([dense["gflops_8"]], [dense[key]], "k*", ms=12, label="dense")
        else:  # errors against the dense model: the dense point is 0, off a log axis
            ax.plot([], [], "k*", ms=12, label="dense")
        for i, (name, pts) in enumerate(methods.items()):
            pts = sorted(pts, key=lambda r: -r["gflops_8"])
            ax.plot([p["gflops_8"] for p in pts], [p[key] for p in pts], marker=markers[i % len(markers)],
                    lw=1.5, ls="--" if "LoRA" in name else "-", label=name)
            for p in pts:
                ax.annotate(f"{p['ratio']:g}", (p["gflops_8"], p[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(title)
        ax.set_xlabel("GFLOPs per forward, 8 frames (56x56)")
        ax.grid(alpha=0.3)
        if key in ("depth_abs_rel", "points_chamfer") or key.startswith("err_"):
            ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle("Tiny VGGT testbed, held-out synthetic scenes: metric vs GFLOPs (labels = ratio)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    from benchmarks.vggt_costs import big_table, group_table

    src = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs/results/vggt_table.json")
    out = json.loads(src.read_text())
    plot(out, src.with_suffix(".png"))
    write_markdown(out, src.with_suffix(".md"), group_table, big_table)


if __name__ == "__main__":
    main()
