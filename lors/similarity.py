"""Learnable image-text similarity matrices S~ (method.md 3.3).

Rows index synthetic images, columns synthetic texts. `matrix(indices)` gives the mini-batch block
S~[B][:, B], built for the low-rank form from the indexed rows of its factors only.
"""

from __future__ import annotations

import torch
from torch import nn

from lors.errors import ConfigError


class LowRankSimilarity(nn.Module):
    """S~ = diag(w) + (alpha / rank) L R^T with w = 1, L ~ N(0, 1), R = 0, so S~ = I at start."""

    def __init__(self, n: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.n, self.rank, self.alpha = n, rank, alpha
        self.w = nn.Parameter(torch.ones(n))
        self.L = nn.Parameter(torch.randn(n, rank))
        self.R = nn.Parameter(torch.zeros(n, rank))

    def matrix(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        w, L, R = (self.w, self.L, self.R) if indices is None else (self.w[indices], self.L[indices], self.R[indices])
        return torch.diag(w) + (self.alpha / self.rank) * L @ R.T


class FullSimilarity(nn.Module):
    """A free N x N matrix initialised to the identity (the paper's full-rank ablation)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.S = nn.Parameter(torch.eye(n))

    def matrix(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.S if indices is None else self.S[indices][:, indices]


class IdentitySimilarity(nn.Module):
    """The fixed identity: plain paired targets (TESLA-VL, MTT-VL, coresets)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        # no parameters to carry the device, so an empty buffer follows `.to(device)` for it
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def matrix(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return torch.eye(self.n if indices is None else len(indices), device=self.anchor.device, dtype=self.anchor.dtype)


def build_similarity(kind: str, n: int, rank: int = 10, alpha: float = 1.0) -> nn.Module:
    if kind == "lowrank":
        return LowRankSimilarity(n, rank, alpha)
    if kind == "full":
        return FullSimilarity(n)
    if kind == "identity":
        return IdentitySimilarity(n)
    raise ConfigError(f"unknown similarity '{kind}' (choose from lowrank, full, identity)")
