"""Model library: timm image encoders, the text projection head, the dual encoder, functional forward."""

from lors.models.dual import DualEncoder, build_dual_encoder
from lors.models.functional import FlatParams, FunctionalDualEncoder
from lors.models.image import build_image_encoder, check_image_encoder_name, image_feature_dim
from lors.models.text import TextProjectionHead

__all__ = [
    "DualEncoder", "FlatParams", "FunctionalDualEncoder", "TextProjectionHead",
    "build_dual_encoder", "build_image_encoder", "check_image_encoder_name", "image_feature_dim",
]
