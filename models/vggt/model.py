"""VGGT: Visual Geometry Grounded Transformer (checkpoint-compatible re-implementation).

``VGGT(images)`` runs the aggregator once and the enabled heads on its outputs::

    tokens_0..tokens_{L-1} = Aggregator(images)             each [B, S, P, 2C]
    pose_enc   = CameraHead(tokens_{L-1})                   [B, S, 9] (last of 4 refinements)
    depth      = DPT_depth(tokens_{4,11,17,23})             [B, S, H, W, 1], conf [B, S, H, W]
    points     = DPT_point(tokens_{4,11,17,23})             [B, S, H, W, 3], conf [B, S, H, W]
    tracks     = TrackHead(tokens_{4,11,17,23}, queries)    [B, S, N, 2], vis / conf [B, S, N]

Parameter names match the official checkpoint (facebook/VGGT-1B), so its state dict loads
strictly into ``VGGT()``; ``models.vggt.convert.load_official_state_dict`` also handles a
model built without the track head.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from models.vggt.aggregator import Aggregator
from models.vggt.camera_head import CameraHead
from models.vggt.config import VGGTConfig
from models.vggt.dpt_head import DPTHead
from models.vggt.track_head import TrackHead

logger = logging.getLogger(__name__)


class VGGT(nn.Module):
    """VGGT with camera, depth, point and (optionally) track heads.

    Args:
        config: architecture sizes; default = the public 1B model.
        enable_camera / enable_depth / enable_point / enable_track: build each head.
            A disabled head has no parameters (``load_official_state_dict`` skips its keys).

    Build the 1B model without memory on the meta device::

        with torch.device("meta"):
            model = VGGT()
    """

    def __init__(
        self,
        config: VGGTConfig | None = None,
        enable_camera: bool = True,
        enable_depth: bool = True,
        enable_point: bool = True,
        enable_track: bool = True,
    ) -> None:
        super().__init__()
        self.config = c = config if config is not None else VGGTConfig()
        dim = 2 * c.embed_dim
        self.aggregator = Aggregator(c)
        self.camera_head = (
            CameraHead(dim, c.camera_trunk_depth, c.camera_num_heads, c.mlp_ratio, c.init_values, c.camera_iters)
            if enable_camera
            else None
        )
        dpt = dict(
            patch_size=c.patch_size, features=c.dpt_features, out_channels=c.dpt_out_channels, layers=c.dpt_layers
        )
        self.point_head = DPTHead(dim, output_dim=4, activation="inv_log", **dpt) if enable_point else None
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", **dpt) if enable_depth else None
        self.track_head = (
            TrackHead(
                dim,
                patch_size=c.patch_size,
                features=c.track_features,
                out_channels=c.dpt_out_channels,
                layers=c.dpt_layers,
                iters=c.track_iters,
                stride=c.track_stride,
                corr_levels=c.track_corr_levels,
                corr_radius=c.track_corr_radius,
                hidden_size=c.track_hidden_size,
                depth=c.track_depth,
                num_heads=c.track_num_heads,
                num_virtual_tracks=c.track_num_virtual,
                max_scale=c.track_max_scale,
            )
            if enable_track
            else None
        )

    def needed_layers(self, with_track: bool) -> set[int]:
        """Aggregator layers read by the enabled heads."""
        layers: set[int] = set()
        if self.camera_head is not None:
            layers.add(self.config.depth - 1)
        if self.depth_head is not None or self.point_head is not None or (with_track and self.track_head is not None):
            layers.update(self.config.dpt_layers)
        return layers

    def forward(
        self, images: Tensor, query_points: Tensor | None = None, frames_chunk_size: int | None = -1
    ) -> dict[str, Tensor | list[Tensor]]:
        """Predict cameras, depth, point maps and (with ``query_points``) tracks.

        Args:
            images: ``[B, S, 3, H, W]`` or ``[S, 3, H, W]`` RGB in [0, 1]; H and W multiples
                of ``config.patch_size`` (14).  ImageNet normalisation happens inside.
            query_points: ``[B, N, 2]`` or ``[N, 2]`` pixel coordinates (x, y) in frame 0.
            frames_chunk_size: frames per DPT chunk; -1 = ``config.frames_chunk_size``,
                None = all frames at once.

        Returns:
            dict with (present when the head is enabled)
              ``pose_enc [B, S, 9]`` (last refinement), ``pose_enc_list`` (list of
              ``camera_iters`` ``[B, S, 9]``), ``depth [B, S, H, W, 1]``,
              ``depth_conf [B, S, H, W]``, ``world_points [B, S, H, W, 3]``,
              ``world_points_conf [B, S, H, W]``, ``images [B, S, 3, H, W]``; with query
              points and a track head also ``track [B, S, N, 2]`` (pixels, last iteration),
              ``vis [B, S, N]`` and ``conf [B, S, N]``.
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}")
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        chunk = self.config.frames_chunk_size if frames_chunk_size == -1 else frames_chunk_size
        with_track = self.track_head is not None and query_points is not None

        tokens, patch_start_idx = self.aggregator(images, keep_layers=self.needed_layers(with_track))
        predictions: dict[str, Tensor | list[Tensor]] = {}
        device_type = images.device.type if images.device.type in ("cuda", "cpu") else "cpu"
        with torch.autocast(device_type, enabled=False):
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(tokens)
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(tokens, images, patch_start_idx, chunk)
                predictions["depth"], predictions["depth_conf"] = depth, depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(tokens, images, patch_start_idx, chunk)
                predictions["world_points"], predictions["world_points_conf"] = points, points_conf
        if with_track:
            if query_points.shape[0] != images.shape[0] or query_points.shape[-1] != 2:
                raise ValueError(
                    f"query_points must be [B, N, 2] with B={images.shape[0]}, got {tuple(query_points.shape)}"
                )
            tracks, vis, conf = self.track_head(tokens, images, patch_start_idx, query_points, frames_chunk_size=chunk)
            predictions["track"], predictions["vis"], predictions["conf"] = tracks[-1], vis, conf
        predictions["images"] = images
        return predictions
