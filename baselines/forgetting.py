"""Forgetting (Toneva et al. 2019): keep the pairs the experts forgot most often.

The experts stage counts, per caption row and expert, forgetting events: presentations at which the
pair's in-batch retrieval (image -> caption and caption -> image both ranked first) was wrong after
having been right at the pair's previous presentation, and whether the pair was ever right. As in
Toneva, a pair never learned is more forgettable than any learned one: pairs are ranked by the number
of experts that never learned them, then by their forgetting events summed over all experts, both
descending, with ties in a seeded random order.
"""

from __future__ import annotations

import torch

from baselines.features import PairPool
from baselines.ranking import Selection, rank_descending
from lors.config import SelectConfig


def forgetting_order(events: torch.Tensor, learned: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """All pairs, most forgettable first, from (n_experts, n_pairs) event counts and learned flags."""
    never_learned = (~learned.bool()).sum(0).long()
    total_events = events.long().sum(0)
    # lexicographic (never_learned, total_events) as one integer key
    key = never_learned * (int(total_events.max()) + 1) + total_events
    return rank_descending(key, generator)


def select_forgetting(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    record = pool.forgetting
    indices = forgetting_order(record.events, record.learned, generator)[:budget]
    never = (~record.learned[:, indices]).any(0)
    return Selection(indices, {"never_learned_selected": int(never.sum()),
                               "min_events_selected": int(record.events[:, indices].sum(0).min())})
