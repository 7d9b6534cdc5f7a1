"""Random selection: a seeded uniform sample of caption rows without replacement."""

from __future__ import annotations

import torch

from baselines.features import PairPool
from baselines.ranking import Selection
from lors.config import SelectConfig


def select_random(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    return Selection(torch.randperm(pool.n_pairs, generator=generator)[:budget])
