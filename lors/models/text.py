"""The trainable text side: a projection head over frozen text-encoder features (method.md 1.2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TextProjectionHead(nn.Module):
    """h = W1 x + b1;  y = LayerNorm(h + Dropout(W2 GELU(h) + b2)).

    With 768 -> 2304 this has 7,087,104 parameters, as the reference's ProjectionHead.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.projection(x)
        return self.layer_norm(h + self.dropout(self.fc(F.gelu(h))))
