"""CLIP-score filtering: keep the pairs whose image and caption agree most.

The score of a pair is the cosine of its image and caption embeddings under the trained expert (the
suite's own dual encoder stands in for CLIP, which cannot be downloaded offline).
"""

from __future__ import annotations

import torch

from baselines.features import PairPool
from baselines.ranking import Selection, rank_descending
from lors.config import SelectConfig


def select_clip_score(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    scores = pool.embeddings.clip_scores
    indices = rank_descending(scores, generator)[:budget]
    return Selection(indices, {"min_clip_score": float(scores[indices].min())})
