"""`lors-bench select --dataset D --budget B --method M`: pick `budget` real train pairs and write them in the synthetic-set format.

The set holds each chosen pair's real image (test transform at the prepared resolution, normalised),
its caption's frozen text features, the identity similarity and the expert learning rates
(`experts.lr_img` / `lr_txt`), so the evaluator treats coresets and distilled sets alike.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from baselines.features import PairPool, load_clip_scores, load_expert_embeddings, load_forgetting_record
from baselines.ranking import Selection
from baselines.registry import get_selector
from lors.config import Params
from lors.data.image_store import gather_images
from lors.data.transforms import normalize
from lors.errors import ConfigError
from lors.io import write_json
from lors.paths import Layout
from lors.runtime import resolve_device, seed_everything
from lors.stages.experts import expert_paths
from lors.similarity import IdentitySimilarity
from lors.synset import FILENAME, SyntheticSet
from lors.tracking import stage_run

log = logging.getLogger(__name__)


def check_selection(selection: Selection, budget: int, n_pairs: int) -> None:
    """Every selector must return exactly `budget` distinct caption rows of the pool."""
    indices = selection.indices
    if indices.ndim != 1 or len(indices) != budget or len(torch.unique(indices)) != budget:
        raise RuntimeError(f"selector returned {len(indices)} rows ({len(torch.unique(indices))} distinct), "
                           f"expected {budget} distinct")
    if int(indices.min()) < 0 or int(indices.max()) >= n_pairs:
        raise RuntimeError(f"selector returned rows outside the pool of {n_pairs}")


def coreset_synset(images: np.ndarray, text_features: torch.Tensor, txt2img: np.ndarray,
                   indices: torch.Tensor, lr_img: float, lr_txt: float, meta: dict) -> SyntheticSet:
    """The chosen caption rows as a synthetic set: real image, caption features, identity targets."""
    rows = indices.cpu().numpy()
    return SyntheticSet(images=normalize(gather_images(images, np.asarray(txt2img)[rows])), texts=text_features[indices.cpu()].float(),
                        similarity=IdentitySimilarity(len(rows)).matrix(), lr_img=lr_img, lr_txt=lr_txt,
                        meta={**meta, "indices": [int(r) for r in rows], "n_pairs": len(rows)})


def run_selection(params: Params, dataset: str, budget: int, method: str) -> Path:
    """Select a coreset of `budget` pairs with `method`; returns the written synset path."""
    from lors.data import load_split, load_text_features

    selector = get_selector(method)
    params.dataset(dataset)
    split = load_split(params, dataset, "train")
    text_features = load_text_features(params, dataset, "train")
    n_pairs = len(split.txt2img)
    if not 1 <= budget <= n_pairs:
        raise ConfigError(f"budget {budget} is outside 1..{n_pairs}, the train pairs of '{dataset}'")

    device = resolve_device(params.device)
    experts = expert_paths(params, dataset)
    pool = PairPool(
        n_pairs,
        load_embeddings=lambda: load_expert_embeddings(params, experts, split.images, text_features,
                                                       split.txt2img, device),
        load_forgetting=lambda: load_forgetting_record(experts, n_pairs),
        load_clip_scores=None if params.select.clip_model is None else lambda: load_clip_scores(
            params.select.clip_model, split.images, split.captions, split.txt2img, device))
    out_dir = Layout(params.work_dir).synset(dataset, budget, method)
    tags = {"dataset": dataset, "method": method, "budget": budget}
    with stage_run(params, "select", f"select/{dataset}/{method}-{budget}", tags) as tracker:
        tracker.log_params({"seed": params.seed, "expert_index": params.select.expert_index,
                            "vas_clip_fraction": params.select.vas_clip_fraction,
                            "image_encoder": params.model.image_encoder, "text_encoder": params.text_encoder.name})
        start = time.perf_counter()
        for name in selector.reads:
            getattr(pool, name)
        feature_seconds = time.perf_counter() - start
        generator = seed_everything(params.seed)
        start = time.perf_counter()
        selection = selector.select(pool, budget, generator, params.select)
        selection_seconds = time.perf_counter() - start
        check_selection(selection, budget, n_pairs)

        meta = {"dataset": dataset, "budget": budget, "method": method, "seed": params.seed,
                "image_encoder": params.model.image_encoder, "text_encoder": params.text_encoder.name,
                "image_size": int(split.images.shape[-1]), "protocol": params.protocol,
                "feature_source": pool.feature_source, "pair_scorer": pool.pair_scorer}
        synset = coreset_synset(split.images, text_features, split.txt2img, selection.indices,
                                params.experts.lr_img, params.experts.lr_txt, meta)
        path = out_dir / FILENAME
        synset.save(path)
        chosen_images = np.unique(np.asarray(split.txt2img)[selection.indices.cpu().numpy()])
        metrics = {"selection_seconds": selection_seconds, "feature_seconds": feature_seconds,
                   "pool_size": n_pairs, "n_unique_images": int(len(chosen_images)), **selection.stats}
        write_json(out_dir / "metrics.json", {**metrics, "feature_source": pool.feature_source,
                                              "pair_scorer": pool.pair_scorer})
        tracker.log_metrics(metrics)
        tracker.log_artifact(out_dir / "metrics.json")
        if tracker.active:
            from lors.artifacts import log_synset_artifacts

            log_synset_artifacts(tracker, synset, split.captions, text_features)
    log.info("%s-%d on %s: %d pairs from %d images in %.2f s (features %.2f s) -> %s", method, budget, dataset,
             budget, len(chosen_images), selection_seconds, feature_seconds, path)
    return path
