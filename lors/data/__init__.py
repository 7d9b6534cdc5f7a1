"""Datasets as the training stages see them: prepared splits and cached caption features.

`prepare` (lors.data.prepare) and `embed-text` (lors.data.text_features) write these files;
everything downstream reads them only through `load_split` and `load_text_features`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lors.config import Params
from lors.data.captions import pre_caption
from lors.data.image_store import open_image_store
from lors.data.readers import SPLITS
from lors.errors import DataError
from lors.io import read_json, sha256_json
from lors.paths import Layout

__all__ = ["SPLITS", "Split", "load_split", "load_text_features", "pre_caption"]


@dataclass
class Split:
    """One prepared split. One training sample is one caption row j with image txt2img[j]."""

    name: str
    images: np.ndarray  # uint8 memmap (n_images, 3, S, S), test transform already applied
    captions: list[str]  # normalised (pre_caption), one per caption row
    txt2img: np.ndarray  # int64 (n_captions,)
    image_names: list[str]

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")


def load_split(params: Params, dataset: str, split: str) -> Split:
    """Read a split written by `lors-bench prepare`; the images stay memory-mapped."""
    _check_split(split)
    params.dataset(dataset)
    folder = Layout(params.work_dir).prepared(dataset)
    json_path = folder / f"{split}.json"
    if not (folder / "manifest.json").is_file() or not json_path.is_file():
        raise DataError(f"{json_path} not found: run `lors-bench prepare --dataset {dataset}` first")
    meta = read_json(json_path)
    images = open_image_store(folder / f"{split}.images.npy")
    txt2img = np.asarray(meta["txt2img"], dtype=np.int64)
    if len(meta["captions"]) != len(txt2img) or len(meta["image_names"]) != len(images) or (
            len(txt2img) and not 0 <= txt2img.min() <= txt2img.max() < len(images)):
        raise DataError(f"{json_path}: inconsistent with its image store; run "
                        f"`lors-bench prepare --dataset {dataset}` again")
    return Split(split, images, list(meta["captions"]), txt2img, list(meta["image_names"]))


def load_text_features(params: Params, dataset: str, split: str) -> torch.Tensor:
    """Cached frozen-encoder features (n_captions, d) float32 of a split's captions."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_split(split)
    params.dataset(dataset)
    encoder = params.text_encoder
    folder = Layout(params.work_dir).text_features(dataset, encoder.name)
    path = folder / f"{split}.safetensors"
    hint = f"run `lors-bench embed-text --dataset {dataset}` first"
    if not path.is_file() or not (folder / "manifest.json").is_file():
        raise DataError(f"{path} not found: {hint}")
    manifest = read_json(folder / "manifest.json")
    if manifest.get("pooling") != encoder.pooling:
        raise DataError(f"{path}: cached with pooling '{manifest.get('pooling')}', params ask for "
                        f"'{encoder.pooling}': {hint}")
    if split not in manifest.get("splits", {}):
        raise DataError(f"{path}: not recorded in {folder / 'manifest.json'} (interrupted run?): {hint}")
    entry = manifest["splits"][split]
    if entry.get("captions_hash") != sha256_json(load_split(params, dataset, split).captions):
        raise DataError(f"{path}: encodes other captions than the prepared {split} split (stale after a new "
                        f"prepare?): {hint}")
    try:
        features = load_file(str(path))["features"]
    except (SafetensorError, KeyError) as exc:
        reason = (str(exc).strip() or exc.__class__.__name__).splitlines()[0]
        raise DataError(f"{path}: damaged feature file ({reason}): run `lors-bench embed-text --dataset {dataset}` "
                        "again to rewrite it") from None
    if tuple(features.shape) != (entry.get("n"), entry.get("dim")):
        raise DataError(f"{path}: holds {tuple(features.shape)} features, its manifest records "
                        f"({entry.get('n')}, {entry.get('dim')}): run `lors-bench embed-text --dataset {dataset}` again")
    return features
