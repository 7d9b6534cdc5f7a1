"""What the selectors read about the pool of train pairs: expert embeddings, forgetting counts and
pair scores.

A pair is one caption row j of the train split: image txt2img[j] with caption j. Feature-based
selectors use the trained expert `select.expert_index` (last snapshot of its trajectory): the
L2-normalised image embedding of each image, encoded once in eval mode and float32, and the
L2-normalised text embedding of each caption's frozen text features. The pair score of CLIP-score
filtering is the cosine of a real CLIP model's image and caption embeddings when `select.clip_model`
names one (scorer `clip`), else the expert's image-caption cosine (scorer `expert_cosine`). All are
loaded lazily, so a selector only pays for what it reads (random reads nothing, forgetting only the
count files).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lors.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class PairEmbeddings:
    image: torch.Tensor  # (n_images, D) unit rows, one per train image
    text: torch.Tensor  # (n_pairs, D) unit rows, one per caption row
    txt2img: torch.Tensor  # (n_pairs,) int64 image of each caption row
    source: str  # which expert produced them, for metrics.json

    @property
    def joint(self) -> torch.Tensor:
        """(n_pairs, 2D) unit rows: a pair's image and text embeddings concatenated, then renormalised."""
        return F.normalize(torch.cat([self.image[self.txt2img], self.text], dim=1), dim=1)

    @cached_property
    def pair_cosines(self) -> torch.Tensor:
        """(n_pairs,) cosine of each pair's image and caption embeddings."""
        return torch.cat([(self.image[self.txt2img[s:s + 65536]] * self.text[s:s + 65536]).sum(1)
                          for s in range(0, len(self.text), 65536)])


@dataclass
class PairScores:
    scores: torch.Tensor  # (n_pairs,) agreement of each pair's image and caption
    scorer: str  # "clip" (a real CLIP model) or "expert_cosine" (fallback: the expert's cosine)
    source: str


@dataclass
class ForgettingRecord:
    events: torch.Tensor  # (n_experts, n_pairs) int64 forgetting events per expert
    learned: torch.Tensor  # (n_experts, n_pairs) bool: ever retrieved correctly by that expert
    source: str


class PairPool:
    """The candidate pairs; embeddings and forgetting counts are produced on first access."""

    def __init__(self, n_pairs: int, load_embeddings: Callable[[], PairEmbeddings],
                 load_forgetting: Callable[[], ForgettingRecord],
                 load_clip_scores: Callable[[], PairScores] | None = None) -> None:
        self.n_pairs = n_pairs
        self._load_embeddings = load_embeddings
        self._load_forgetting = load_forgetting
        self._load_clip_scores = load_clip_scores

    @cached_property
    def embeddings(self) -> PairEmbeddings:
        return self._load_embeddings()

    @cached_property
    def forgetting(self) -> ForgettingRecord:
        return self._load_forgetting()

    @cached_property
    def pair_scores(self) -> PairScores:
        """A real CLIP's scores when one is configured, else the expert's cosine (named so)."""
        if self._load_clip_scores is not None:
            return self._load_clip_scores()
        emb = self.embeddings
        return PairScores(emb.pair_cosines, "expert_cosine", f"expert cosine ({emb.source})")

    @property
    def pair_scorer(self) -> str | None:
        """`clip` or `expert_cosine` once pair scores were read, else None."""
        return self.__dict__["pair_scores"].scorer if "pair_scores" in self.__dict__ else None

    @property
    def feature_source(self) -> str:
        """What the selection actually read (only what was loaded)."""
        names = ("embeddings", "forgetting", "pair_scores")
        loaded = list(dict.fromkeys(self.__dict__[name].source for name in names if name in self.__dict__))
        return "; ".join(loaded) or "none (uniform sampling)"


def expert_files(files: list[Path]) -> list[Path]:
    """The grid's expert trajectory files (`grid.experts` order), each of which must exist."""
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: expert trajectory not found (run `lors-bench experts` first)")
    return files


def load_expert_embeddings(params, experts: list[Path], images: np.ndarray, text_features: torch.Tensor,
                           txt2img: np.ndarray, device: torch.device) -> PairEmbeddings:
    """Embed the pool with the last snapshot of expert `params.select.expert_index`."""
    from lors.experts import load_trajectory
    from lors.models import FunctionalDualEncoder, build_dual_encoder
    from lors.retrieval import encode_images, encode_texts

    files = expert_files(experts)
    index = params.select.expert_index
    if not 0 <= index < len(files):
        raise ConfigError(f"select.expert_index={index} but the grid has {len(files)} experts (grid.experts)")
    trajectory = load_trajectory(files[index])
    model = build_dual_encoder(params.model.image_encoder, text_features.shape[1], params.model.pretrained,
                               params.model.temperature, params.model.text_head_dropout,
                               image_trainable=params.model.image_trainable)
    FunctionalDualEncoder(model).load(trajectory.image[-1], trajectory.text[-1])
    model.to(device).eval()
    log.info("embedding %d images and %d captions with %s", len(images), len(text_features), files[index].name)
    # float32 on every device: the selection must not depend on autocast rounding
    image = encode_images(model, images, device, amp=False)
    text = encode_texts(model, text_features, device)
    return PairEmbeddings(image=image, text=text, txt2img=torch.as_tensor(np.asarray(txt2img), device=device),
                          source=f"{files[index].name} (epoch {len(trajectory.image) - 1})")


def load_forgetting_record(experts: list[Path], n_pairs: int) -> ForgettingRecord:
    """Forgetting events and learned flags of the grid's experts (`expert_XXX.{forgetting,learned}.npy`)."""
    events, learned = [], []
    files = expert_files(experts)
    for expert in files:
        for suffix, into, dtype in ((".forgetting.npy", events, torch.int64), (".learned.npy", learned, torch.bool)):
            path = expert.with_suffix(suffix)
            if not path.is_file():
                raise DataError(f"{path}: missing (the experts stage records forgetting events; re-run it)")
            values = np.load(path)
            if values.shape != (n_pairs,):
                raise DataError(f"{path}: shape {values.shape}, expected ({n_pairs},) = train caption rows")
            into.append(torch.as_tensor(values).to(dtype))
    return ForgettingRecord(torch.stack(events), torch.stack(learned),
                            source=f"forgetting events of {len(files)} experts")


@torch.inference_mode()
def clip_pair_scores(model, image_processor, tokenizer, images: np.ndarray, captions: list[str],
                     txt2img: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """(n_pairs,) cosine of CLIP's image embedding of image txt2img[j] and text embedding of caption j
    (the CLIPScore of Hessel et al. up to its affine rescaling, which does not change a ranking)."""
    image, text = [], []
    for s in range(0, len(images), batch_size):
        batch = list(torch.from_numpy(np.array(images[s:s + batch_size])))  # uint8 (3, S, S) each
        pixels = image_processor(images=batch, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        image.append(F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1).cpu())
    for s in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[s:s + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        text.append(F.normalize(model.get_text_features(**tokens).pooler_output.float(), dim=-1).cpu())
    return (torch.cat(image)[torch.as_tensor(np.asarray(txt2img))] * torch.cat(text)).sum(1)


def load_clip_scores(name: str, images: np.ndarray, captions: list[str], txt2img: np.ndarray,
                     device: torch.device) -> PairScores:
    """Score the pool with the transformers CLIPModel `select.clip_model` (hub id or local folder)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from lors.hub import load_pretrained

    key = "select.clip_model"
    model = load_pretrained(key, name, lambda n, local: CLIPModel.from_pretrained(n, local_files_only=local))
    processor = load_pretrained(key, name, lambda n, local: AutoImageProcessor.from_pretrained(
        n, local_files_only=local))
    tokenizer = load_pretrained(key, name, lambda n, local: AutoTokenizer.from_pretrained(n, local_files_only=local))
    log.info("scoring %d pairs with CLIP %s", len(captions), name)
    scores = clip_pair_scores(model.to(device).eval(), processor, tokenizer, images, captions, txt2img, device)
    return PairScores(scores, "clip", f"CLIP {name}")
