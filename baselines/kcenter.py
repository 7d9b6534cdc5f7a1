"""K-center greedy (Sener & Savarese 2018) on the pool's joint embeddings.

The first centre is a seeded random pair; each further centre is the pair farthest from its nearest
centre, which is the 2-approximation of the minimax facility-location (k-center) problem. Distances
are Euclidean on the unit sphere, |x - c|^2 = 2 - 2 x.c.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from baselines.features import PairPool
from baselines.ranking import Selection, check_unit_rows
from baselines.screening import ScreenedProducts
from lors.config import SelectConfig


def kcenter_greedy(features: torch.Tensor, budget: int, generator: torch.Generator,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of `budget` distinct centres, covering radius after each centre)."""
    check_unit_rows(features)
    products = ScreenedProducts(features)
    n = len(features)
    min_sqdist = torch.full((n,), math.inf, dtype=torch.float64, device=features.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    centre = int(torch.randint(n, (1,), generator=generator))
    order, radii = [], []
    for _ in tqdm(range(budget), desc="k-center", disable=not progress, leave=False):
        order.append(centre)
        chosen[centre] = True
        products.shrink_min_sqdist(min_sqdist, products.features[centre])
        min_sqdist[centre] = 0.0
        radii.append(math.sqrt(max(float(min_sqdist.max()), 0.0)))
        # chosen centres are excluded explicitly: duplicates in the pool also sit at distance 0
        centre = int(torch.argmax(min_sqdist.masked_fill(chosen, -1.0)))
    return torch.tensor(order, dtype=torch.long), torch.tensor(radii)


def select_kcenter(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    indices, radii = kcenter_greedy(pool.embeddings.joint, budget, generator)
    return Selection(indices, {"covering_radius": float(radii[-1]), "first_radius": float(radii[0])})
