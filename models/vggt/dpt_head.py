"""DPT head: dense depth / point-map prediction from four aggregator layers.

For each of the layers ``l_1..l_4`` the patch tokens ``[B·S, hw, D]`` are layer-normed and
reshaped to a ``h × w`` map, then (``k = 1..4``)::

    F_k = Resize_k(Proj_k(x) + 0.1·PE)      Proj_k: 1×1 conv D -> c_k;  Resize: ×4 deconv, ×2 deconv, id, stride-2 conv
    R_k = Conv3×3(F_k)                      (c_k -> F channels, no bias)
    y   = Fuse_4(R_4) ; y = Fuse_k(y, R_k) for k = 3, 2, 1
    Fuse(y, r) = Conv1×1(Up×(RCU_2(y + RCU_1(r))))       Up: bilinear, align_corners
    RCU(x) = relu(x) + Conv(relu(Conv(relu(x))))         (the ReLU is in place in the original,
                                                           so the skip carries relu(x))
    out = Conv2(Up_{H×W}(Conv1(y)) + 0.1·PE)             Conv2 = 3×3 conv, ReLU, 1×1 conv

``PE`` is a sin/cos embedding of the normalised UV grid (x then y halves, ω₀ = 100).
Activations of the last ``c`` output channels: depth ``exp``, points
``sign(x)·(exp|x| - 1)``, confidence ``1 + exp``.  With ``feature_only`` (track head)
the fused ``F``-channel map at ``1/down_ratio`` resolution is returned instead.
Frames are processed ``frames_chunk_size`` at a time to bound memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INT_MAX = 1610612736  # element limit above which F.interpolate is applied in batch chunks


def interpolate(x: Tensor, size: tuple[int, int] | None = None, scale_factor: float | None = None) -> Tensor:
    """Bilinear (align_corners) resize of ``[N, C, h, w]``, chunked over N for huge outputs."""
    if size is None:
        size = (int(x.shape[-2] * scale_factor), int(x.shape[-1] * scale_factor))
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements > _INT_MAX:
        chunks = torch.chunk(x, elements // _INT_MAX + 1, dim=0)
        return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks])
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _sincos(dim: int, pos: Tensor, omega_0: float = 100.0) -> Tensor:
    """``[M] -> [M, dim]`` as ``[sin(pos ω), cos(pos ω)]``, ``ω_j = ω₀^(-2j/dim)``, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    out = pos.reshape(-1, 1).double() * omega
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def uv_embedding(width: int, height: int, channels: int, aspect_ratio: float, device=None, dtype=None) -> Tensor:
    """Sin/cos embedding ``[channels, height, width]`` of the UV grid normalised by the diagonal."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, device=device, dtype=dtype)
    ys = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, height, device=device, dtype=dtype
    )
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")  # [height, width]
    emb = torch.cat([_sincos(channels // 2, uu), _sincos(channels // 2, vv)], dim=-1)
    return emb.view(height, width, channels).permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    """``x -> relu(x) + conv2(relu(conv1(relu(x))))`` on ``[N, F, h, w]``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """``(y, r) -> Conv1×1(Up(RCU_2(y + RCU_1(r))))``; without residual input ``y -> ...(RCU_2(y))``."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = interpolate(x, size=size, scale_factor=None if size is not None else 2)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense prediction head (see module docstring).

    Args:
        dim_in: token width ``D``.
        patch_size: ViT patch size.
        output_dim: output channels (last one is the confidence): 2 for depth, 4 for points.
        activation: ``"exp"`` (depth) or ``"inv_log"`` (points).
        features: fusion width ``F``.
        out_channels: projection widths ``c_1..c_4``.
        layers: aggregator layer indices read.
        pos_embed: add the UV sin/cos embedding.
        feature_only: return fused features (track head) instead of predictions.
        down_ratio: output resolution divisor.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        layers: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if activation not in ("exp", "inv_log"):
            raise ValueError(f"activation must be 'exp' or 'inv_log', got {activation!r}")
        self.patch_size = patch_size
        self.activation = activation
        self.layers = tuple(layers)
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, 1) for c in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for k in range(4):
            setattr(self.scratch, f"layer{k + 1}_rn", nn.Conv2d(oc[k], features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
            )

    def forward(
        self,
        aggregated_tokens: list[Tensor | None],
        images: Tensor,
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run the head frame-chunk by frame-chunk.

        Args:
            aggregated_tokens: aggregator outputs; entries ``self.layers`` are ``[B, S, P, D]``.
            images: ``[B, S, 3, H, W]`` (only the shape is used).
            patch_start_idx: index of the first patch token.
            frames_chunk_size: frames per chunk (None = all at once).

        Returns:
            ``feature_only``: features ``[B, S, F, H/r, W/r]``; otherwise
            ``(pred [B, S, H, W, output_dim-1], conf [B, S, H, W])``.
        """
        S = images.shape[1]
        if frames_chunk_size is None or frames_chunk_size >= S:
            return self._forward_frames(aggregated_tokens, images, patch_start_idx, 0, S)
        parts = [
            self._forward_frames(aggregated_tokens, images, patch_start_idx, s, min(s + frames_chunk_size, S))
            for s in range(0, S, frames_chunk_size)
        ]
        if self.feature_only:
            return torch.cat(parts, dim=1)
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _add_pos(self, x: Tensor, W: int, H: int) -> Tensor:
        emb = uv_embedding(x.shape[-1], x.shape[-2], x.shape[1], W / H, device=x.device, dtype=x.dtype)
        return x + 0.1 * emb.to(x.dtype)[None]

    def _forward_frames(
        self, aggregated_tokens: list[Tensor | None], images: Tensor, patch_start_idx: int, start: int, end: int
    ) -> Tensor | tuple[Tensor, Tensor]:
        B, _, _, H, W = images.shape
        S = end - start
        h, w = H // self.patch_size, W // self.patch_size
        feats = []
        for k, layer in enumerate(self.layers):
            tokens = aggregated_tokens[layer]
            if tokens is None:
                raise ValueError(f"the DPT head needs aggregator layer {layer}; keep it in keep_layers")
            x = tokens[:, start:end, patch_start_idx:]
            x = self.norm(x.reshape(B * S, -1, x.shape[-1]).to(self.norm.weight.dtype))
            proj = self.projects[k]
            if isinstance(proj, nn.Conv2d):
                x = proj(x.permute(0, 2, 1).reshape(B * S, -1, h, w))
            else:  # a token-wise Linear (linearize_projections_): the same map as the 1x1 conv
                x = proj(x).permute(0, 2, 1).reshape(B * S, -1, h, w)
            if self.pos_embed:
                x = self._add_pos(x, W, H)
            feats.append(self.resize_layers[k](x))

        sc = self.scratch
        r1, r2, r3, r4 = sc.layer1_rn(feats[0]), sc.layer2_rn(feats[1]), sc.layer3_rn(feats[2]), sc.layer4_rn(feats[3])
        y = sc.refinenet4(r4, size=r3.shape[2:])
        y = sc.refinenet3(y, r3, size=r2.shape[2:])
        y = sc.refinenet2(y, r2, size=r1.shape[2:])
        y = sc.refinenet1(y, r1)
        y = sc.output_conv1(y)
        y = interpolate(
            y, size=(int(h * self.patch_size / self.down_ratio), int(w * self.patch_size / self.down_ratio))
        )
        if self.pos_embed:
            y = self._add_pos(y, W, H)
        if self.feature_only:
            return y.view(B, S, *y.shape[1:])

        out = sc.output_conv2(y).permute(0, 2, 3, 1)  # [B*S, H, W, output_dim]
        raw, conf = out[..., :-1], out[..., -1]
        pred = torch.exp(raw) if self.activation == "exp" else torch.sign(raw) * torch.expm1(raw.abs())
        conf = 1 + conf.exp()
        return pred.reshape(B, S, *pred.shape[1:]), conf.reshape(B, S, *conf.shape[1:])


@torch.no_grad()
def linearize_projections_(head: DPTHead) -> list[int]:
    """Replace the 1x1 ``projects`` convolutions by equal ``nn.Linear`` layers, in place.

    A 1x1 conv ``D -> c`` is the Linear ``W = weight[:, :, 0, 0]`` applied to every token, so the
    outputs are unchanged; as plain Linears the projections can be factorized like any other
    layer.  The state-dict keys stay ``projects.k.{weight,bias}`` but the weights become
    ``[c, D]`` instead of ``[c, D, 1, 1]`` (load official weights first).  Returns the indices changed.
    """
    changed = []
    for k, conv in enumerate(head.projects):
        if not isinstance(conv, nn.Conv2d):
            continue
        w = conv.weight
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device=w.device,
                           dtype=w.dtype)
        linear.weight.copy_(w[:, :, 0, 0])
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        head.projects[k] = linear
        changed.append(k)
    return changed
