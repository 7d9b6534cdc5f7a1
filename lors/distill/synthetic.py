"""The learnable synthetic set and its initialisation (method.md 3.2, 3.3, 8.4-8.5).

What distillation optimises: N image-text pairs (images in CLIP-normalised pixel space, texts in
the frozen text encoder's feature space), the two inner-loop learning rates, and for LoRS the
similarity matrix S~. Everything is an `nn.Module` parameter so one optimizer and one
`state_dict` cover it (checkpoints, resume).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lors.data.image_store import gather_images
from lors.data.transforms import normalize, to_unit
from lors.errors import ConfigError
from lors.synset import SyntheticSet

# method.md 3.2: the reference's noise initialisation statistics (per image channel; texts scalar)
NOISE_IMAGE_MEAN = (-0.0626, -0.0221, 0.0680)
NOISE_IMAGE_STD = (1.0451, 1.0752, 1.0539)
NOISE_TEXT_MEAN, NOISE_TEXT_STD = -0.0094, 0.5253

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class LearnableSet(nn.Module):
    """Pairs, learnable inner-loop lrs and the similarity module, as one optimisable module."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, similarity: nn.Module, init_lr: float) -> None:
        super().__init__()
        if images.shape[0] != texts.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {texts.shape[0]} texts")
        self.images = nn.Parameter(images.float().clone())
        self.texts = nn.Parameter(texts.float().clone())
        self.lr_img = nn.Parameter(torch.tensor(float(init_lr)))
        self.lr_txt = nn.Parameter(torch.tensor(float(init_lr)))
        self.similarity = similarity

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def learns_similarity(self) -> bool:
        return any(True for _ in self.similarity.parameters())

    def to_synset(self, meta: dict[str, Any]) -> SyntheticSet:
        """Detached snapshot in the shared format: full N x N S~ materialised (method.md 3.3)."""
        with torch.no_grad():
            similarity = self.similarity.matrix().detach().clone()
            extra = {name: p.detach().clone() for name, p in self.similarity.named_parameters()}
            return SyntheticSet(images=self.images.detach().clone(), texts=self.texts.detach().clone(),
                                similarity=similarity, lr_img=self.lr_img.item(), lr_txt=self.lr_txt.item(),
                                meta=dict(meta), extra=extra)


def check_pool(n: int, n_rows: int, where: str = "the training split") -> None:
    if n < 1:
        raise ConfigError(f"distillation needs at least one synthetic pair, the budget gives {n}")
    if n > n_rows:
        raise ConfigError(f"distillation needs {n} pairs but {where} has only {n_rows} caption rows")


def sample_caption_rows(n_rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """The first n of a seeded permutation of caption rows (an image may be drawn twice, 8.4)."""
    check_pool(n, n_rows)
    return torch.randperm(n_rows, generator=generator)[:n]


def real_init(images_uint8: np.ndarray | torch.Tensor, txt2img: np.ndarray | torch.Tensor,
              text_features: torch.Tensor, n: int, generator: torch.Generator,
              augment: Augment | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and texts of n sampled caption rows; images train-augmented unless `augment` is None.

    Returns (images normalised, text features, caption rows).
    """
    rows = sample_caption_rows(len(text_features), n, generator)
    pixels = to_unit(gather_images(images_uint8, np.asarray(txt2img)[rows.numpy()]))
    if augment is not None:
        pixels = augment(pixels, generator)
    return normalize(pixels), text_features[rows].float().clone(), rows


def noise_init(n: int, image_size: int, text_dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian pixels and texts with the reference's statistics (method.md 3.2, `--pix_init noise`)."""
    mean = torch.tensor(NOISE_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(NOISE_IMAGE_STD).view(1, 3, 1, 1)
    images = torch.randn(n, 3, image_size, image_size, generator=generator) * std + mean
    texts = torch.randn(n, text_dim, generator=generator) * NOISE_TEXT_STD + NOISE_TEXT_MEAN
    return images, texts
