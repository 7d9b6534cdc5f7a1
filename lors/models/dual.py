"""The paper's dual encoder: image backbone (trainable, or frozen) + projection head on frozen text features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lors.models.image import build_image_encoder, image_feature_dim
from lors.models.text import TextProjectionHead


class DualEncoder(nn.Module):
    """Image and text embeddings, L2-normalised; logits = cos / tau with rows = images.

    There is no image projection: the image embedding is the pooled backbone feature itself, and the
    text head maps text features to that width (method.md 1.1-1.3). tau is fixed, never learned.
    With `image_trainable=False` the backbone is frozen: no parameter of it requires grad and it stays
    in eval mode (BatchNorm statistics fixed) whatever `train()` is called with. Its weights are then
    stored channels-last, the layout oneDNN and cuDNN convolutions run fastest in (a convolution with
    channels-last weights runs channels-last on any input): on a 2-core CPU a frozen EfficientNet-Lite0
    embeds 32 px images 4.1x faster and back-propagates to them 2.3x faster
    (benchmarks/bench_channels_last.py). A frozen backbone is never flattened into a trajectory, so
    the layout shows nowhere else.
    """

    def __init__(self, image_encoder: nn.Module, text_dim: int, temperature: float = 0.07,
                 text_head_dropout: float = 0.1, image_trainable: bool = True) -> None:
        super().__init__()
        self.image_encoder = image_encoder.requires_grad_(image_trainable)
        if not image_trainable:
            self.image_encoder.to(memory_format=torch.channels_last)
        self.text_head = TextProjectionHead(text_dim, image_feature_dim(image_encoder), text_head_dropout)
        self.temperature = temperature
        self.image_trainable = image_trainable
        self.train()

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        if not self.image_trainable:
            self.image_encoder.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_text(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text_features), dim=-1)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images) @ self.encode_text(text_features).T / self.temperature


def build_dual_encoder(image_encoder: str, text_dim: int, pretrained: bool | str, temperature: float = 0.07,
                       text_head_dropout: float = 0.1, backbone_seed: int | None = None,
                       image_trainable: bool = True) -> DualEncoder:
    """Seed torch before calling: the text head (and a non-pretrained backbone) are drawn fresh.
    With `backbone_seed`, the backbone is drawn from that seed instead, leaving torch's RNG as it was.
    `image_trainable=False` freezes the backbone (model.image_trainable)."""
    if backbone_seed is None:
        backbone = build_image_encoder(image_encoder, pretrained)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(backbone_seed)
            backbone = build_image_encoder(image_encoder, pretrained)
    return DualEncoder(backbone, text_dim, temperature, text_head_dropout, image_trainable)


def shared_backbone_seed(protocol: str, pretrained: bool, seed: int) -> int | None:
    """The authors build every backbone of a process by deep-copying one cached timm model
    (LoRS:src/networks.py load_from_timm is lru_cached), so with a random-init backbone all experts of
    a run, and all evaluation networks, start from ONE draw. `reference` keeps that (one seed per run
    and stage); `clean` draws each network's own. Pretrained backbones are identical either way."""
    return seed if protocol == "reference" and not pretrained else None
