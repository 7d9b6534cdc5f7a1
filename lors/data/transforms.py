"""Pixel normalisation shared by every stage (CLIP statistics, method.md 1.1 and 7.3).

Images are stored as uint8 (n, 3, H, W) already resized to the configured size with the test
transform (bicubic, no crop); training loops turn them into normalised float tensors here.
"""

from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CLIP_MEAN, device=like.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=like.device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float input is returned as float32 unchanged."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (n, 3, H, W) -> CLIP-normalised float32."""
    mean, std = _stats(images)
    return (to_unit(images) - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised -> [0, 1] (clamped), e.g. to draw synthetic images."""
    mean, std = _stats(images)
    return (images.float() * std + mean).clamp(0, 1)
