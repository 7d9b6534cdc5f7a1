"""Contrastive losses against a soft target matrix (method.md 3.4).

Z = logits with rows = images and columns = texts; Y = target similarity of the same shape (the
identity for plain contrastive learning, LoRS's learned S~ otherwise). Y is not clamped or
renormalised: the learned similarity may leave [0, 1], as in the reference.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lors.errors import ConfigError

EPS = 1e-6


def ence(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target InfoNCE ("eNCE"), symmetric over the image->text and text->image directions."""
    row = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    col = -(target * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (row + col) / 2


def infonce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with identity targets (the experts' loss)."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of sigmoid(Z) against Y (logs clamped at -100 as nn.BCELoss)."""
    p = torch.sigmoid(logits)
    log_p = torch.log(p).clamp(min=-100)
    log_q = torch.log(1 - p).clamp(min=-100)
    return -(target * log_p + (1 - target) * log_q).mean()


def wbce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Balanced BCE: positives (Y > 0.5, mask detached) and negatives averaged separately, then halved."""
    p = torch.sigmoid(logits)
    per_pair = -target * torch.log(p + EPS) - (1 - target) * torch.log(1 - p + EPS)
    positive = (target > 0.5).detach()
    pos = (per_pair * positive).sum() / (positive.sum() + EPS)
    neg = (per_pair * ~positive).sum() / ((~positive).sum() + EPS)
    return (pos + neg) / 2


LOSSES = {"ence": ence, "bce": bce, "wbce": wbce}


def soft_contrastive_loss(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}' (choose from {', '.join(LOSSES)})")
    return LOSSES[name](logits, target)
