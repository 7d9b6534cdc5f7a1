"""The prepare stage: annotations + images -> normalised captions, uint8 image stores, a manifest.

Output (`Layout.prepared(dataset)`): `{split}.images.npy`, `{split}.json` (`captions`, `txt2img`,
`image_names`, plus the split's input hash) for train/val/test and `manifest.json` (input hash,
sha256 of every output). Each split is hashed from what it is built from (annotation bytes, image
names/sizes/mtimes, image size, kind, reader version, caption length); a split whose hash is
unchanged is reused, so a second run is a no-op and an interrupted run resumes split by split.

Degenerate data is refused before anything is written, with one line naming the file: an empty split,
or a train split with fewer image-text pairs than the largest budget or batch that reads it (empty
captions and images without captions are refused by the readers). Duplicated image names and
captions are kept, counted in each split's summary and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lors.config import DatasetConfig, Params
from lors.data.captions import pre_caption
from lors.data.download import annotation_url, fetch_annotations
from lors.data.embedded import GENERATOR_VERSION, generate_split, split_size
from lors.data.image_store import build_image_store, open_image_store, write_image_store
from lors.data.readers import (FLICKR8K_SPLIT_LISTS, FLICKR8K_TOKENS, SPLITS, RawSplit, karpathy_filename,
                               read_flickr8k, read_karpathy)
from lors.errors import DataError
from lors.io import read_json, sha256_file, sha256_json, write_json
from lors.paths import Layout

log = logging.getLogger(__name__)

READER_VERSION = 1

_ROOT_HINTS = {
    "flickr30k": "it must hold flickr30k-images/*.jpg from your own copy of the Kaggle dataset "
                 "hsankesara/flickr-image-dataset",
    "coco": "it must hold train2014/ and val2014/ (train2014.zip and val2014.zip from cocodataset.org)",
    "flickr8k": "it must hold the Flickr8k release (Flicker8k_Dataset/, Flickr8k.token.txt, "
                "Flickr_8k.{train,dev,test}Images.txt)",
}


@dataclass
class BuiltSplit:
    """A split whose image store is written: raw captions and names of the images actually stored."""

    captions: list[str]
    txt2img: np.ndarray
    image_names: list[str]
    skipped: list[str]


@dataclass
class SplitSource:
    """What one split is built from: `fingerprint` decides reuse, `build` writes the image store."""

    fingerprint: dict
    build: Callable[[Path], BuiltSplit]
    origin: str  # the file (or params key) the split comes from, named when it is refused
    n_pairs: int  # image-text pairs as annotated, before any bad image is skipped


def prepare_dataset(params: Params, dataset: str) -> tuple[Path, bool]:
    """Build (or confirm up to date) the prepared splits of `dataset`; return the output folder and
    whether anything was built (its `manifest.json` then describes the new data)."""
    cfg = params.dataset(dataset)
    out = Layout(params.work_dir).prepared(dataset)
    sources = _embedded_sources(cfg, dataset) if cfg.kind == "embedded" else _file_sources(cfg, dataset)
    common = {"kind": cfg.kind, "image_size": cfg.image_size, "reader_version": READER_VERSION,
              "max_words": params.text_encoder.max_words, "skip_bad_images": cfg.skip_bad_images}
    split_hashes = {split: sha256_json({**common, **src.fingerprint}) for split, src in sources.items()}
    input_hash = sha256_json(split_hashes)
    needs = _pairs_needed(params)
    for split, src in sources.items():
        _check_pairs(src.origin, f"the {split} split", src.n_pairs, needs[split])
    if _up_to_date(out, input_hash):
        log.info("%s: prepared data in %s is up to date; nothing to do", dataset, out)
        return out, False
    (out / "manifest.json").unlink(missing_ok=True)  # the manifest marks finished data: gone until it is again
    summaries = {}
    for split, src in sources.items():
        summaries[split] = _prepare_split(out, split, src, split_hashes[split], params.text_encoder.max_words,
                                          needs[split])
    outputs = {}
    for split in sources:
        for name in (f"{split}.images.npy", f"{split}.json"):
            sha = summaries[split]["images_sha256"] if name.endswith(".npy") else sha256_file(out / name)
            outputs[name] = {"sha256": sha, "bytes": (out / name).stat().st_size}
    write_json(out / "manifest.json", {
        "dataset": dataset, **common, "input_hash": input_hash, "outputs": outputs,
        "splits": {split: {k: v for k, v in s.items() if k != "images_sha256"} for split, s in summaries.items()},
    })
    log.info("%s: prepared %s", dataset, ", ".join(f"{s} {v['n_images']} images/{v['n_captions']} captions"
                                                   for s, v in summaries.items()))
    return out, True


def _pairs_needed(params: Params) -> dict[str, tuple[int, str]]:
    """The fewest image-text pairs each split must hold, with the setting that needs them: train feeds
    every budget of the grid and the expert batches (drawn whole); val and test must not be empty."""
    grid = params.grid
    train = max([(b, f"grid.distill_budgets ({b})") for b in grid.distill_budgets]
                + [(b, f"grid.select_budgets ({b})") for b in grid.select_budgets]
                + [(params.experts.batch_size, f"experts.batch_size ({params.experts.batch_size})")])
    return {"train": train, "val": (1, "a non-empty split"), "test": (1, "a non-empty split")}


def _check_pairs(origin: str, what: str, n_pairs: int, need: tuple[int, str]) -> None:
    """Refuse a split that is empty or smaller than what reads it, naming the file it comes from."""
    if n_pairs == 0:
        raise DataError(f"{origin}: {what} is empty (no image-text pairs); check the file")
    if n_pairs < need[0]:
        raise DataError(f"{origin}: {what} has {n_pairs} image-text pairs, fewer than {need[1]} "
                        "needs; lower that setting or use more data")


def _duplicates(image_names: list[str], captions: list[str]) -> dict[str, int]:
    """Image rows naming an image listed before, and caption rows repeating an earlier (normalised) caption."""
    return {"duplicate_images": len(image_names) - len(set(image_names)),
            "duplicate_captions": len(captions) - len(set(captions))}


def _up_to_date(out: Path, input_hash: str) -> bool:
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = read_json(manifest_path)
    if manifest.get("input_hash") != input_hash:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == entry["bytes"]
               for name, entry in manifest["outputs"].items())


def _store_intact(path: Path, n_images: int) -> bool:
    """A cheap check that a store to reuse is whole (a damaged one is rebuilt): it parses, holds
    `n_images` images and ends where its last image does."""
    try:
        images = open_image_store(path)
    except DataError:
        return False
    return len(images) == n_images and images.offset + images.nbytes == path.stat().st_size


def _prepare_split(out: Path, split: str, src: SplitSource, split_hash: str, max_words: int,
                   need: tuple[int, str]) -> dict:
    """Reuse the split when its recorded hash matches, else rebuild it; return its summary."""
    json_path, store_path = out / f"{split}.json", out / f"{split}.images.npy"
    if json_path.is_file() and store_path.is_file():
        done = read_json(json_path)
        if done.get("input_hash") == split_hash and _store_intact(store_path, done["summary"]["n_images"]):
            log.info("%s: unchanged, reusing %s", split, store_path)
            return {**done["summary"], **_duplicates(done["image_names"], done["captions"])}
    log.info("%s: building %s", split, store_path)
    json_path.unlink(missing_ok=True)  # the split json marks a finished split: never pair it with a new store
    built = src.build(store_path)
    _check_pairs(src.origin, f"the {split} split without its bad images", len(built.captions), need)
    captions = [pre_caption(c, max_words) for c in built.captions]
    summary = {"n_images": len(built.image_names), "n_captions": len(captions),
               "images_sha256": sha256_file(store_path), "skipped_images": built.skipped,
               **_duplicates(built.image_names, captions)}
    log.info("%s: %d image rows name an image listed before, %d captions repeat an earlier one (kept; counted "
             "in the manifest)", split, summary["duplicate_images"], summary["duplicate_captions"])
    write_json(json_path, {"captions": captions, "txt2img": built.txt2img.tolist(),
                           "image_names": built.image_names, "input_hash": split_hash, "summary": summary})
    return summary


# ----------------------------------------------------------------------------------- embedded

def _embedded_sources(cfg: DatasetConfig, dataset: str) -> dict[str, SplitSource]:
    def builder(split: str) -> Callable[[Path], BuiltSplit]:
        def build(store_path: Path) -> BuiltSplit:
            images, captions = generate_split(cfg.embedded, cfg.image_size, split)
            write_image_store(images, store_path)
            return BuiltSplit(captions=[c for per_image in captions for c in per_image],
                              txt2img=np.repeat(np.arange(len(captions), dtype=np.int64),
                                                cfg.embedded.captions_per_image),
                              image_names=[f"embedded/{split}/{i:05d}" for i in range(len(captions))],
                              skipped=[])
        return build

    fingerprint = {"embedded": cfg.embedded.model_dump(), "generator_version": GENERATOR_VERSION}
    return {split: SplitSource({**fingerprint, "split": split}, builder(split), f"datasets.{dataset}.embedded",
                               split_size(cfg.embedded, split) * cfg.embedded.captions_per_image)
            for split in SPLITS}


# --------------------------------------------------------------------------------- file-based

def _file_sources(cfg: DatasetConfig, dataset: str) -> dict[str, SplitSource]:
    root = cfg.root
    if root is None:
        raise DataError(f"datasets.{dataset}.root is not set; {_ROOT_HINTS[cfg.kind]}")
    if not root.is_dir():
        raise DataError(f"datasets.{dataset}.root: {root} does not exist; {_ROOT_HINTS[cfg.kind]}")
    if cfg.kind == "flickr8k":
        raw = read_flickr8k(root)
        ann_files = [root / FLICKR8K_TOKENS] + [root / name for name in FLICKR8K_SPLIT_LISTS.values()]
        annotation = {split: sha256_json([sha256_file(p) for p in ann_files]) for split in SPLITS}
        origin = {split: root / FLICKR8K_SPLIT_LISTS[split] for split in SPLITS}
    else:
        ann_root = _karpathy_annotations(cfg, dataset)
        raw = {split: read_karpathy(ann_root, root, cfg.kind, split) for split in SPLITS}
        origin = {split: ann_root / karpathy_filename(cfg.kind, split) for split in SPLITS}
        annotation = {split: sha256_file(origin[split]) for split in SPLITS}
    return {split: _file_source(raw[split], annotation[split], cfg, str(origin[split]), f"{dataset}/{split}")
            for split in SPLITS}


def _karpathy_annotations(cfg: DatasetConfig, dataset: str) -> Path:
    """The folder holding the Karpathy json files, downloading missing ones if allowed."""
    ann_root = cfg.ann_root or cfg.root
    missing = [karpathy_filename(cfg.kind, s) for s in SPLITS if not (ann_root / karpathy_filename(cfg.kind, s)).is_file()]
    if missing and not cfg.download_annotations:
        raise DataError(f"datasets.{dataset}: missing {', '.join(missing)} in {ann_root}; download them from "
                        f"{annotation_url('')} or set download_annotations: true")
    if missing:
        log.info("%s: fetching missing annotation files %s", dataset, ", ".join(missing))
        fetch_annotations(missing, ann_root)
    return ann_root


def _image_stat(path: Path, skip_bad: bool) -> list:
    try:
        stat = path.stat()
    except FileNotFoundError:
        if skip_bad:
            return [path.name, None, None]
        raise DataError(f"{path}: image file not found") from None
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _file_source(raw: RawSplit, annotation_hash: str, cfg: DatasetConfig, origin: str, desc: str) -> SplitSource:
    fingerprint = {"annotation": annotation_hash,
                   "images": sha256_json([_image_stat(p, cfg.skip_bad_images) for p in raw.image_paths])}

    def build(store_path: Path) -> BuiltSplit:
        skipped = build_image_store(raw.image_paths, store_path, cfg.image_size,
                                    skip_bad=cfg.skip_bad_images, desc=desc)
        return _drop_images(raw, skipped, desc)

    return SplitSource(fingerprint, build, origin, len(raw.captions))


def _drop_images(raw: RawSplit, skipped: list[int], desc: str) -> BuiltSplit:
    """Remove skipped images and their captions; renumber txt2img onto the kept images."""
    keep = np.ones(len(raw.image_names), dtype=bool)
    keep[skipped] = False
    keep_caption = keep[raw.txt2img]
    if skipped:
        log.warning("%s: skipped %d of %d images (missing or unreadable) and their %d captions",
                    desc, len(skipped), len(keep), int((~keep_caption).sum()))
    new_index = np.cumsum(keep) - 1
    return BuiltSplit(captions=[c for c, k in zip(raw.captions, keep_caption) if k],
                      txt2img=new_index[raw.txt2img[keep_caption]].astype(np.int64),
                      image_names=[n for n, k in zip(raw.image_names, keep) if k],
                      skipped=[raw.image_names[i] for i in skipped])
