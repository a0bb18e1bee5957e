"""Track head: DPT feature maps + an iterative CoTracker-style point tracker.

Features ``F = LN_C(DPT_feat(tokens))`` of shape ``[B, S, c, H/2, W/2]`` (``c = 128``).
Query points ``q [B, N, 2]`` (pixels in frame 0) are divided by the stride (2); every
frame starts at ``x_s = q``, with track features ``f_s = F_0(q)``.  Each of ``K``
iterations::

    corr  = CorrPyramid(F).sample(f, x)                                  [B, S, N, L(2r+1)²]
    flow  = x_s - x_0;  u = [FlowEmb(flow), flow/518, flow/518, Mlp(corr), f] + PE(q) + ref_s
    Δ     = UpdateFormer(u)                                              [B, N, S, 2 + c]
    f     = f + GELU(W · GroupNorm(Δ_feat));  x = x + Δ_xy;  x_0 = q   (frame 0 stays the query)
    emit stride · x                                                      (pixels)

``PE`` is a fixed sin/cos embedding of the query position and ``ref_s`` a learned token
(slot 0 for frame 0, slot 1 for the others).  After the last iteration visibility and
confidence are ``σ(W_v f)`` and ``σ(W_c f)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.vggt.dpt_head import DPTHead
from models.vggt.layers import Mlp
from models.vggt.track_modules import CorrPyramid, UpdateFormer, flow_embedding, sample_points, sincos_grid_embedding


class TrackerPredictor(nn.Module):
    """Iterative tracker over feature maps (see module docstring).

    Args:
        latent_dim: feature width ``c``.
        stride: feature map stride relative to the image.
        corr_levels / corr_radius: correlation pyramid levels ``L`` and radius ``r``.
        hidden_size / depth / num_heads / num_virtual_tracks: UpdateFormer sizes.
        max_scale: normaliser of the raw flow features.
        predict_conf: also predict a per-point confidence.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        num_virtual_tracks: int = 64,
        max_scale: float = 518.0,
        predict_conf: bool = True,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.stride = stride
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.transformer_dim = 3 * latent_dim + 4
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.query_ref_token = nn.Parameter(torch.zeros(1, 2, self.transformer_dim))
        self.updateformer = UpdateFormer(
            depth=depth,
            input_dim=self.transformer_dim,
            hidden_size=hidden_size,
            num_heads=num_heads,
            output_dim=latent_dim + 2,
            num_virtual_tracks=num_virtual_tracks,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if not self.query_ref_token.is_meta:
            nn.init.normal_(self.query_ref_token)

    def forward(
        self, query_points: Tensor, fmaps: Tensor, iters: int = 4
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Track ``query_points [B, N, 2]`` (pixels) through ``fmaps [B, S, c, h, w]``.

        Returns ``(tracks, vis, conf)``: ``iters`` tensors ``[B, S, N, 2]`` in pixels,
        visibility ``[B, S, N]`` and confidence ``[B, S, N]`` (None without ``predict_conf``).
        """
        B, N, _ = query_points.shape
        _, S, c, h, w = fmaps.shape
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        query = query_points / float(self.stride)
        coords = query.reshape(B, 1, N, 2).repeat(1, S, 1, 1)
        track_feats = sample_points(fmaps[:, 0], coords[:, 0]).unsqueeze(1).repeat(1, S, 1, 1)  # [B, S, N, c]
        corr = CorrPyramid(fmaps, self.corr_levels, self.corr_radius)
        grid_pe = sincos_grid_embedding(self.transformer_dim, h, w, device=fmaps.device).to(query.dtype)
        query_pe = sample_points(grid_pe.expand(B, -1, -1, -1), coords[:, 0]).reshape(B * N, 1, -1)
        ref = torch.cat([self.query_ref_token[:, :1], self.query_ref_token[:, 1:2].expand(-1, S - 1, -1)], dim=1)

        tracks = []
        for _ in range(iters):
            coords = coords.detach()
            fcorr = corr.sample(track_feats, coords).permute(0, 2, 1, 3).reshape(B * N, S, -1)
            flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(B * N, S, 2)
            flow_emb = torch.cat(
                [flow_embedding(flows, c // 2), flows / self.max_scale, flows / self.max_scale], dim=-1
            )
            feats = track_feats.permute(0, 2, 1, 3).reshape(B * N, S, c)
            x = torch.cat([flow_emb, self.corr_mlp(fcorr), feats], dim=2) + query_pe + ref.to(query.dtype)
            delta = self.updateformer(x.reshape(B, N, S, -1)).reshape(B * N * S, -1)
            feats = self.ffeat_updater(self.ffeat_norm(delta[:, 2:])) + feats.reshape(B * N * S, c)
            track_feats = feats.reshape(B, N, S, c).permute(0, 2, 1, 3)
            coords = coords + delta[:, :2].reshape(B, N, S, 2).permute(0, 2, 1, 3)
            coords = torch.cat([query.unsqueeze(1), coords[:, 1:]], dim=1)
            tracks.append(coords * self.stride)

        flat = track_feats.reshape(B * S * N, c)
        vis = torch.sigmoid(self.vis_predictor(flat)).reshape(B, S, N)
        conf = torch.sigmoid(self.conf_predictor(flat)).reshape(B, S, N) if self.predict_conf else None
        return tracks, vis, conf


class TrackHead(nn.Module):
    """DPT feature extractor (``feature_only``, half resolution, no UV embedding) + tracker."""

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        out_channels: tuple[int, ...] = (256, 512, 1024, 1024),
        layers: tuple[int, ...] = (4, 11, 17, 23),
        iters: int = 4,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        num_virtual_tracks: int = 64,
        max_scale: float = 518.0,
    ) -> None:
        super().__init__()
        self.iters = iters
        self.feature_extractor = DPTHead(
            dim_in,
            patch_size=patch_size,
            features=features,
            out_channels=out_channels,
            layers=layers,
            pos_embed=False,
            feature_only=True,
            down_ratio=2,
        )
        self.tracker = TrackerPredictor(
            latent_dim=features,
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            num_virtual_tracks=num_virtual_tracks,
            max_scale=max_scale,
        )

    def forward(
        self,
        aggregated_tokens: list[Tensor | None],
        images: Tensor,
        patch_start_idx: int,
        query_points: Tensor,
        iters: int | None = None,
        frames_chunk_size: int | None = 8,
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """``images [B, S, 3, H, W]``, ``query_points [B, N, 2]`` -> tracks / vis / conf (see tracker)."""
        fmaps = self.feature_extractor(aggregated_tokens, images, patch_start_idx, frames_chunk_size)
        return self.tracker(query_points, fmaps, self.iters if iters is None else iters)
