"""Readers of the on-disk annotation formats into raw splits (image files + captions + txt2img).

Two formats are understood: the BLIP/LAVIS Karpathy json files (Flickr30k and COCO, method.md 7.1)
and the official Flickr8k release. Readers only parse and validate annotations; images are decoded
later, once, by the image store. A malformed annotation stops with one DataError line naming the
file and the row, and so does a degenerate one: an empty caption (also one that normalisation
empties, such as "..."), or an image listed with no caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lors.data.captions import pre_caption
from lors.errors import DataError

SPLITS = ("train", "val", "test")

# Karpathy annotation file prefix per dataset kind: `{prefix}_{split}.json`.
KARPATHY_PREFIX = {"flickr30k": "flickr30k", "coco": "coco_karpathy"}

FLICKR8K_IMAGES = "Flicker8k_Dataset"  # the release's own misspelling
FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}


@dataclass
class RawSplit:
    """One split as annotated: `image_names` are relative to `root`; captions are not normalised."""

    root: Path
    image_names: list[str]
    captions: list[str]
    txt2img: np.ndarray  # int64 (n_captions,)

    @property
    def image_paths(self) -> list[Path]:
        return [self.root / name for name in self.image_names]


def karpathy_filename(kind: str, split: str) -> str:
    return f"{KARPATHY_PREFIX[kind]}_{split}.json"


def _load_json_list(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _field(path: Path, index: int, row: object, key: str, kinds: type | tuple[type, ...]) -> object:
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {index}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{path}: row {index}: missing key '{key}'")
    value = row[key]
    if not isinstance(value, kinds):
        raise DataError(f"{path}: row {index}: '{key}' has type {type(value).__name__}")
    return value


def _caption(where: str, text: str) -> str:
    """`text`, refused with one line naming `where` when it is empty (or only punctuation)."""
    if not pre_caption(text):
        raise DataError(f"{where}: empty caption {text!r}; remove the row or write a caption")
    return text


def read_karpathy_train(ann_file: Path, root: Path) -> RawSplit:
    """Rows `{image, caption, image_id}`, one per caption; images numbered in first-seen order."""
    index: dict[str, int] = {}
    captions: list[str] = []
    txt2img: list[int] = []
    for i, row in enumerate(_load_json_list(ann_file)):
        image = _field(ann_file, i, row, "image", str)
        captions.append(_caption(f"{ann_file}: row {i}", _field(ann_file, i, row, "caption", str)))
        txt2img.append(index.setdefault(image, len(index)))
    return RawSplit(root, list(index), captions, np.asarray(txt2img, dtype=np.int64))


def read_karpathy_eval(ann_file: Path, root: Path) -> RawSplit:
    """Rows `{image, caption: [...]}`, one per image, any number of captions each (COCO: 5 or 6)."""
    names: list[str] = []
    captions: list[str] = []
    txt2img: list[int] = []
    for i, row in enumerate(_load_json_list(ann_file)):
        names.append(_field(ann_file, i, row, "image", str))
        texts = _field(ann_file, i, row, "caption", list)
        if not texts:
            raise DataError(f"{ann_file}: row {i}: image '{names[-1]}' has no caption; remove the row or add captions")
        for text in texts:
            if not isinstance(text, str):
                raise DataError(f"{ann_file}: row {i}: a caption has type {type(text).__name__}")
            captions.append(_caption(f"{ann_file}: row {i}", text))
            txt2img.append(i)
    return RawSplit(root, names, captions, np.asarray(txt2img, dtype=np.int64))


def read_karpathy(ann_root: Path, root: Path, kind: str, split: str) -> RawSplit:
    ann_file = ann_root / karpathy_filename(kind, split)
    return read_karpathy_train(ann_file, root) if split == "train" else read_karpathy_eval(ann_file, root)


def _read_flickr8k_tokens(path: Path) -> dict[str, list[str]]:
    """`name.jpg#k<TAB>caption` lines -> captions per image name, in file order."""
    by_image: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: Flickr8k caption file not found") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, k = key.rpartition("#")
        if not tab or not hash_ or not k.isdigit() or not name:
            raise DataError(f"{path}: line {number}: expected '<image>#<k><TAB><caption>'")
        by_image.setdefault(name, []).append(_caption(f"{path}: line {number}", caption))
    return by_image


def read_flickr8k(root: Path) -> dict[str, RawSplit]:
    """The official release: images in `Flicker8k_Dataset/`, captions in `Flickr8k.token.txt`, and
    the train/dev/test image lists (dev becomes `val`)."""
    tokens = _read_flickr8k_tokens(root / FLICKR8K_TOKENS)
    splits: dict[str, RawSplit] = {}
    for split, list_name in FLICKR8K_SPLIT_LISTS.items():
        list_path = root / list_name
        if not list_path.is_file():
            raise DataError(f"{list_path}: Flickr8k split list not found")
        names, captions, txt2img = [], [], []
        for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            if name not in tokens:
                raise DataError(f"{list_path}: line {number}: '{name}' has no caption in {FLICKR8K_TOKENS}")
            for caption in tokens[name]:
                captions.append(caption)
                txt2img.append(len(names))
            names.append(f"{FLICKR8K_IMAGES}/{name}")
        splits[split] = RawSplit(root, names, captions, np.asarray(txt2img, dtype=np.int64))
    return splits
