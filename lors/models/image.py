"""Image encoders: any timm model, used as a pooled-feature backbone (no classifier)."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from lors.errors import ConfigError


def check_image_encoder_name(name: str) -> None:
    import timm  # here, not at the top: timm pulls in torchvision (seconds) and only model stages need it

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown image encoder '{name}': not a timm model name{hint}")


@functools.lru_cache(maxsize=4)
def _pretrained_backbone(name: str) -> nn.Module:
    try:
        # fork: timm draws a random init before loading weights, and only on the first (uncached) call,
        # which would make the first network of a process start differently from later ones
        with torch.random.fork_rng(devices=[]):
            import timm

            return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # hub unreachable, no cached weights, ...
        raise ConfigError(
            f"cannot load pretrained weights for image encoder '{name}' ({exc.__class__.__name__}): "
            "put them in the Hugging Face cache (HF_HOME) or set model.pretrained: false"
        ) from exc


def build_image_encoder(name: str, pretrained: bool) -> nn.Module:
    """A timm backbone returning globally pooled features; width is `module.num_features`.

    Pretrained weights are loaded once per process and deep-copied, so every network built in a run
    starts from identical weights (as the reference's lru_cache + deepcopy does). Random init draws
    from torch's global RNG, so seed it before calling.
    """
    import timm

    check_image_encoder_name(name)
    if pretrained:
        return copy.deepcopy(_pretrained_backbone(name))
    return timm.create_model(name, pretrained=False, num_classes=0)


def image_feature_dim(encoder: nn.Module) -> int:
    return int(encoder.num_features)
