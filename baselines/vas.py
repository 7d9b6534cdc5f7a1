"""VAS (Wang et al. 2024, arXiv 2402.02055) combined with the CLIP-score filter, as that paper advises.

Variance Alignment Score of a pair: <Sigma_target, f f^T> = f^T Sigma_target f, with f the pair's
L2-normalised image embedding under the trained expert and Sigma_target = mean of f f^T over every
train pair (the paper's uncentred "variance" of the target distribution). The filter first keeps the
top `select.vas_clip_fraction` of the pool by CLIP score (a real CLIP when `select.clip_model` names
one, as in the paper; else the expert's cosine), then the top-`budget` of those by VAS.
"""

from __future__ import annotations

import math

import torch

from baselines.features import PairPool
from baselines.ranking import Selection, rank_descending
from lors.config import SelectConfig
from lors.errors import ConfigError


def second_moment(features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sigma = sum_i w_i f_i f_i^T / sum_i w_i (uniform weights when None)."""
    if weights is None:
        return features.T @ features / len(features)
    weights = weights.to(features.dtype)
    return (features * weights[:, None]).T @ features / weights.sum()


def vas_scores(features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """f_i^T Sigma f_i for every row f_i."""
    return ((features @ sigma) * features).sum(1)


def select_vas(pool: PairPool, budget: int, generator: torch.Generator, config: SelectConfig) -> Selection:
    emb = pool.embeddings
    clip_fraction = config.vas_clip_fraction
    kept_count = math.ceil(clip_fraction * pool.n_pairs)
    if kept_count < budget:
        raise ConfigError(f"select.vas_clip_fraction={clip_fraction} keeps {kept_count} of {pool.n_pairs} pairs, "
                          f"fewer than the budget {budget}")
    pair = pool.pair_scores
    kept = rank_descending(pair.scores, generator)[:kept_count]
    # every train pair is one sample of the target, so each image weighs as many times as it has captions
    images_per_pair = torch.bincount(emb.txt2img, minlength=len(emb.image))
    sigma = second_moment(emb.image, images_per_pair)
    kept_images, pair_to_kept_image = torch.unique(emb.txt2img[kept], return_inverse=True)
    scores = vas_scores(emb.image[kept_images], sigma)[pair_to_kept_image]
    order = rank_descending(scores, generator)[:budget]
    return Selection(kept[order], {"clip_kept": kept_count, "min_vas_selected": float(scores[order].min())})
