"""EDGE's two fine-tuning losses on CLIP features, as in the authors' `edge_diffusion_train.py`.

L_C: symmetric InfoNCE between the L2-normalised image and text features of a batch (temperature tau).
L_D: mean off-diagonal cosine of the joint embeddings normalise([img; txt]) (raw features concatenated,
then normalised), minimised so that pairs of a batch move apart. Both are means over the batch; a
batch of one pair has no off-diagonal entry, so L_D needs at least two pairs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """0.5 * (CE(I T^T / tau, diag) + CE(T I^T / tau, diag)) over unit rows."""
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = image @ text.T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def diversity_loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} z_i . z_j / (B (B - 1)) with z = normalise([image; text])."""
    n = len(image)
    if n < 2:
        raise ValueError("the diversity loss needs a batch of at least two pairs")
    joint = F.normalize(torch.cat([image.float(), text.float()], dim=-1), dim=-1)
    sim = (joint @ joint.T).masked_fill(torch.eye(n, dtype=torch.bool, device=joint.device), 0.0)
    return sim.sum() / (n * (n - 1))
