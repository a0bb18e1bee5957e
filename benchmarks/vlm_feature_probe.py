"""Linear probe: do the real VLM's vision features separate the labelled images' classes?

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vlm_feature_probe.py --train 300 --test 200

Features are computed as the LLaVA model feeds its projector: the processor's pixel values through
``model.model.get_image_features`` (a forward pre-hook on the projector captures its input: CLIP's
penultimate layer, CLS dropped, 49 tokens at 112 px), mean-pooled over the tokens.  For comparison the
same forward also gives the penultimate CLS token, the last layer's mean patch token and CLIP's pooled
output (post-LayerNorm CLS of the last layer).  Per dataset (Fashion-MNIST, OpenCV digits; images from
:func:`data.vqa.labelled.labelled_images` with ``--train`` / 1 / ``--test`` images per split, disjoint), a
multinomial logistic regression (L-BFGS, L2 penalty ``lambda * |W|^2``) is fit on the train features and
scored on the test features, raw and with per-channel standardization (train mean / std).  Chance: 10 %.
"""

from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
import torch.nn.functional as F
from PIL import Image

from data.vqa.labelled import labelled_images
from models.vlm import load_vlm

KINDS = ("projector input, token mean", "penultimate CLS", "last layer, token mean", "CLIP pooled output")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def features(model, processor, images: list, batch: int = 25) -> dict[str, torch.Tensor]:
    """``kind -> [N, 768]`` for the images (uint8 arrays), the projector input captured by a hook."""
    captured: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    cfg = model.config
    try:
        for i in range(0, len(images), batch):
            pil = [Image.fromarray(x).convert("RGB") for x in images[i: i + batch]]
            pixels = processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
            res = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                                 vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                 output_hidden_states=True)
            fed = captured.pop()
            if fed.shape[1] != cfg.image_seq_length:
                raise RuntimeError(f"the projector got {fed.shape[1]} tokens, expected {cfg.image_seq_length}")
            hs = res.hidden_states
            out[KINDS[0]].append(fed.mean(1))
            out[KINDS[1]].append(hs[cfg.vision_feature_layer][:, 0])
            out[KINDS[2]].append(hs[-1][:, 1:].mean(1))
            tower = model.model.vision_tower
            post = getattr(tower, "vision_model", tower).post_layernorm
            out[KINDS[3]].append(post(hs[-1][:, 0]))
    finally:
        hook.remove()
    return {k: torch.cat(v).double() for k, v in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, lam: float, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: ``argmin mean CE(x W^T + b, y) + lam |W|^2`` by L-BFGS."""
    w = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + lam * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w.T + b).argmax(1) == y).double().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="clip-smollm2", help="'clip-smollm2' or a save_pretrained folder")
    p.add_argument("--train", type=int, default=300, help="train images per dataset")
    p.add_argument("--test", type=int, default=200, help="test images per dataset")
    p.add_argument("--lambdas", default="1e-4,1e-2,1", help="L2 penalties, comma separated")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    model, processor = load_vlm(args.model, dtype=torch.float32)
    model.eval()
    data = labelled_images({"train": args.train, "val": 1, "test": args.test})
    feats = {}
    for split in ("train", "test"):
        t0 = time.time()
        feats[split] = features(model, processor, [x for _, x, _, _ in data[split]])
        log(f"{split}: {len(data[split])} images in {time.time() - t0:.0f} s")
    print("| dataset | features | n train / test | " + " | ".join(f"raw, lambda {v:g}" for v in lambdas) + " | "
          + " | ".join(f"standardized, lambda {v:g}" for v in lambdas) + " |")
    print("|---|---|---|" + "---:|" * (2 * len(lambdas)))
    for name in ("fashion_mnist", "digits"):
        rows = {s: [i for i, item in enumerate(data[s]) if item[0] == name] for s in ("train", "test")}
        y = {s: torch.tensor([data[s][i][2] for i in rows[s]]) for s in rows}
        for kind in KINDS:
            x = {s: feats[s][kind][rows[s]] for s in rows}
            mean, std = x["train"].mean(0), x["train"].std(0).clamp_min(1e-6)
            cells = []
            for standardize in (False, True):
                xs = {s: (v - mean) / std if standardize else v for s, v in x.items()}
                for lam in lambdas:
                    w, b = fit_probe(xs["train"], y["train"], lam)
                    cells.append(f"{100 * accuracy(w, b, xs['test'], y['test']):.1f}")
            print(f"| {name} | {kind} | {len(rows['train'])} / {len(rows['test'])} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
