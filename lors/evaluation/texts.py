"""Text features an evaluation trains and tests on, incl. the transfer to another text encoder.

Synthetic texts are vectors in the source (distillation) text encoder's feature space. Evaluating
with another encoder needs a choice (`evaluate.text_transfer`, recorded in the result):
- "reference" (method.md 4.4, the authors' code): the head trains on the source-space synthetic
  vectors and only the TEST captions are encoded by the new encoder; needs equal widths.
- "nearest_caption": each synthetic text is replaced by its nearest real training caption (cosine in
  the source space); those captions and the test captions are encoded by the new encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F

from lors.config import Params, TextEncoderConfig
from lors.errors import ConfigError
from lors.evaluation.arch import EvalArch
from lors.io import atomic_path, sha256_json
from lors.paths import Layout

log = logging.getLogger(__name__)


@dataclass
class EvalTexts:
    train: torch.Tensor  # (N, d) what the text head trains on
    transfer: str  # "none" | "reference" | "nearest_caption"
    nearest_rows: list[int] | None = None  # train caption rows chosen by nearest_caption


def split_features(params: Params, dataset: str, split: str, arch: EvalArch, device: torch.device) -> torch.Tensor:
    """(n_captions, d) features of a split's captions under the evaluation's text encoder."""
    from lors.data import load_text_features

    if arch.source_text:
        return load_text_features(params, dataset, split)
    return cached_caption_features(params, dataset, split, arch.text, device)


def cached_caption_features(params: Params, dataset: str, split: str, cfg: TextEncoderConfig,
                            device: torch.device) -> torch.Tensor:
    """Encode a split's captions with a non-source encoder once; later calls read the cache.

    The cache folder is keyed by name AND pooling, so it never overwrites the source encoder's features
    (`embed-text` keys by name only), and by a hash of the captions, so a re-prepared split re-encodes.
    """
    from lors.data import load_split
    from lors.data.text_features import encode_captions

    captions = load_split(params, dataset, split).captions
    key = sha256_json({"captions": captions, "encoder": cfg.model_dump()})
    path = Layout(params.work_dir).text_features(dataset, f"{cfg.name}:{cfg.pooling}") / f"{split}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return fh.get_tensor("features")
    log.info("encoding %d %s captions of %s with %s (%s pooling)", len(captions), split, dataset, cfg.name, cfg.pooling)
    features = encode_captions(captions, cfg, device).float().cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file({"features": features}, str(tmp), metadata={"key": key})
    return features


def nearest_rows(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of each query's nearest key by cosine similarity (first index on ties)."""
    q = F.normalize(queries.float(), dim=1)
    best = torch.full((len(q),), float("-inf"), device=q.device)
    arg = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for start in range(0, len(keys), chunk):
        sims = q @ F.normalize(keys[start:start + chunk].to(q.device).float(), dim=1).T
        value, index = sims.max(1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, index + start, arg)
    return arg


def training_texts(params: Params, dataset: str, synthetic_texts: torch.Tensor, arch: EvalArch,
                   test_dim: int, device: torch.device) -> EvalTexts:
    """The vectors the text head trains on for this architecture and `evaluate.text_transfer` mode."""
    if arch.source_text:
        return EvalTexts(synthetic_texts, "none")
    mode = params.evaluate.text_transfer
    if mode == "reference":
        if synthetic_texts.shape[1] != test_dim:
            raise ConfigError(
                f"evaluate.text_transfer: 'reference' trains on the {synthetic_texts.shape[1]}-d source-space "
                f"synthetic texts but '{arch.text.name}' gives {test_dim}-d test features; "
                "set evaluate.text_transfer: nearest_caption")
        return EvalTexts(synthetic_texts, "reference")
    from lors.data import load_split, load_text_features
    from lors.data.text_features import encode_captions

    rows = nearest_rows(synthetic_texts, load_text_features(params, dataset, "train")).tolist()
    train_captions = load_split(params, dataset, "train").captions
    features = encode_captions([train_captions[r] for r in rows], arch.text, device).float().cpu()
    return EvalTexts(features, "nearest_caption", rows)
