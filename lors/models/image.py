"""Image encoders: any timm model, used as a pooled-feature backbone (no classifier)."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from lors.errors import ConfigError
from lors.models.pretrained import LITE0_ENCODER, LITE0_PACKAGE, load_image_weights


def check_image_encoder_name(name: str) -> None:
    import timm  # here, not at the top: timm pulls in torchvision (seconds) and only model stages need it

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown image encoder '{name}': not a timm model name{hint}")


@functools.lru_cache(maxsize=4)
def _pretrained_backbone(name: str, pretrained: bool | str) -> nn.Module:
    # fork: timm draws a random init before loading weights, and only on the first (uncached) call,
    # which would make the first network of a process start differently from later ones
    import timm

    with torch.random.fork_rng(devices=[]):
        if isinstance(pretrained, str):
            model = timm.create_model(name, pretrained=False, num_classes=0)
            load_image_weights(model, name, pretrained)
            return model
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # hub unreachable, no cached weights, ...
            raise ConfigError(
                f"cannot load pretrained weights for image encoder '{name}' ({exc.__class__.__name__}): "
                "put them in the Hugging Face cache (HF_HOME), set model.pretrained to a checkpoint file, "
                f"to '{LITE0_PACKAGE}' (with image encoder {LITE0_ENCODER}) or to false"
            ) from exc


def build_image_encoder(name: str, pretrained: bool | str) -> nn.Module:
    """A timm backbone returning globally pooled features; width is `module.num_features`.

    `pretrained`: True = timm's hub weights (Hugging Face cache), a string = a local checkpoint file or
    the weights of a package (lors.models.pretrained), False = random init. Pretrained weights are
    loaded once per process and deep-copied, so every network built in a run starts from identical
    weights (as the reference's lru_cache + deepcopy does). Random init draws from torch's global RNG,
    so seed it before calling.
    """
    import timm

    check_image_encoder_name(name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    return copy.deepcopy(_pretrained_backbone(name, pretrained))


def image_feature_dim(encoder: nn.Module) -> int:
    return int(encoder.num_features)
