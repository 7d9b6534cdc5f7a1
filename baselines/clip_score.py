"""CLIP-score filtering: keep the pairs whose image and caption agree most.

The score of a pair is the cosine of its image and caption embeddings under a real CLIP model when
`select.clip_model` names one, else under the trained expert (scorer `expert_cosine`); the set's
metrics say which scorer ran.
"""

from __future__ import annotations

import torch

from baselines.features import PairPool
from baselines.ranking import Selection, rank_descending
from lors.config import SelectConfig


def select_clip_score(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    pair = pool.pair_scores
    indices = rank_descending(pair.scores, generator)[:budget]
    return Selection(indices, {"min_clip_score": float(pair.scores[indices].min())})
