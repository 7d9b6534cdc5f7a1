"""What every selector returns, and the one seeded ranking rule they share.

Scores often tie (five captions share an image's VAS, many pairs are never forgotten), so a plain
sort would break ties by row order, which is the order of the annotation file. Ranking a seeded
random permutation with a stable sort breaks ties at random but reproducibly under the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Selection:
    indices: torch.Tensor  # (budget,) int64 caption rows of the train split, in selection order
    stats: dict[str, float] = field(default_factory=dict)  # method-specific numbers for metrics.json


def rank_descending(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of `scores` from highest to lowest, ties in a seeded random order."""
    perm = torch.randperm(len(scores), generator=generator).to(scores.device)
    order = torch.argsort(scores[perm], descending=True, stable=True)
    return perm[order]


def check_unit_rows(features: torch.Tensor, tol: float = 1e-3) -> None:
    """The greedy selectors work on the unit sphere (distance^2 = 2 - 2 cos); refuse anything else."""
    norms = features.norm(dim=1)
    if features.ndim != 2 or not torch.allclose(norms, torch.ones_like(norms), atol=tol):
        raise ValueError("features must be a 2-d tensor of L2-normalised rows")
