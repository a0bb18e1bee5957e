"""VGGT re-implementation, checkpoint-compatible with facebook/VGGT-1B (see ``model.py``)."""

from models.vggt.config import VGGTConfig
from models.vggt.convert import load_official_state_dict, timm_dinov2_to_patch_embed
from models.vggt.model import VGGT
from models.vggt.pose import (
    extri_intri_to_pose_encoding,
    matrix_to_quaternion,
    pose_encoding_to_extri_intri,
    quaternion_to_matrix,
)
from models.vggt.preprocess import preprocess_images

__all__ = [
    "VGGT",
    "VGGTConfig",
    "extri_intri_to_pose_encoding",
    "load_official_state_dict",
    "matrix_to_quaternion",
    "pose_encoding_to_extri_intri",
    "preprocess_images",
    "quaternion_to_matrix",
    "timm_dinov2_to_patch_embed",
]
