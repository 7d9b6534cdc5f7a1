"""The coreset methods by name: what `lors-bench select --method M` accepts.

Adding a method = one module with `select_x(pool, budget, generator, config) -> Selection` and one
entry here naming the pool inputs it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from baselines.clip_score import select_clip_score
from baselines.features import PairPool
from baselines.forgetting import select_forgetting
from baselines.herding import select_herding
from baselines.kcenter import select_kcenter
from baselines.random_pairs import select_random
from baselines.ranking import Selection
from baselines.vas import select_vas
from lors.config import SelectConfig
from lors.errors import ConfigError


@dataclass(frozen=True)
class Selector:
    select: Callable[[PairPool, int, torch.Generator, SelectConfig], Selection]
    reads: tuple[str, ...]  # PairPool inputs it needs, loaded (and timed) before selection


SELECTORS: dict[str, Selector] = {
    "random": Selector(select_random, ()),
    "herding": Selector(select_herding, ("embeddings",)),
    "kcenter": Selector(select_kcenter, ("embeddings",)),
    "forgetting": Selector(select_forgetting, ("forgetting",)),
    "vas": Selector(select_vas, ("embeddings", "pair_scores")),
    "clip_score": Selector(select_clip_score, ("pair_scores",)),
}


def get_selector(method: str) -> Selector:
    if method not in SELECTORS:
        raise ConfigError(f"unknown selection method '{method}' (known: {', '.join(SELECTORS)})")
    return SELECTORS[method]


def check_params(params) -> list[str]:
    """The coreset part of params, for load_params: every grid method must be a known selector."""
    return [f"grid.select_methods: unknown method '{m}' (known: {', '.join(SELECTORS)})"
            for m in params.grid.select_methods if m not in SELECTORS]
