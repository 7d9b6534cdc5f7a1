"""Herding (Welling 2009) on the pool's joint embeddings.

Greedy running-mean matching: pick t+1 is the pair x minimising |mu - (S_t + x)/(t+1)|, where mu is the
pool mean and S_t the sum of the t pairs already picked; equivalently the pair nearest
w_t = (t+1) mu - S_t, which for unit rows is Welling's herding (argmax_x x.w_t, with the update
w <- w + mu - x from w = mu). Picks are without replacement; the first is the pair nearest the mean.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from baselines.features import PairPool
from baselines.ranking import Selection, check_unit_rows
from baselines.screening import CHUNK_ROWS, ScreenedProducts
from lors.config import SelectConfig


def herding(features: torch.Tensor, budget: int, progress: bool = True) -> torch.Tensor:
    """Indices of `budget` distinct unit rows whose running mean tracks the mean of all rows."""
    check_unit_rows(features)
    products = ScreenedProducts(features)
    # float64 weights: the update adds budget-many terms, and nearby pairs differ in the 7th digit
    mean = sum(block.double().sum(0) for block in products.features.split(CHUNK_ROWS)) / len(features)
    weight = mean.clone()
    picked = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    order = []
    for _ in tqdm(range(budget), desc="herding", disable=not progress, leave=False):
        index = products.nearest(weight, excluded=picked)
        picked[index] = True
        order.append(index)
        weight += mean - products.features[index].double()
    return torch.tensor(order, dtype=torch.long)


def select_herding(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    return Selection(herding(pool.embeddings.joint, budget))
