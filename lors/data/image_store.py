"""Decode every image once into a memory-mappable uint8 (n, 3, S, S) `.npy` store.

Images are resized with the reference's test transform (bicubic to S x S, no crop, aspect ratio not
kept; method.md 7.3), so training loops read tensors instead of decoding JPEGs. The store is written
under a temporary name and renamed when complete. Its disk space is reserved before the first image is
written: a full disk is then one ENOSPC error naming the store, not a SIGBUS from a memory-mapped write.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lors.errors import DataError, producer_hint
from lors.io import atomic_path

log = logging.getLogger(__name__)

_CHUNK = 256  # images decoded per thread-pool round (bounds memory, keeps the order)


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 (3, size, size); any unreadable file becomes a DataError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _try_decode(path: Path, size: int) -> np.ndarray | DataError:
    try:
        return decode_image(path, size)
    except DataError as exc:
        return exc


def build_image_store(paths: Sequence[Path], out: Path, size: int, skip_bad: bool = False,
                      workers: int | None = None, desc: str = "decode") -> list[int]:
    """Write the store for `paths` to `out`; return the indices of skipped (bad) images.

    Without `skip_bad` the first missing or corrupt file stops the build with a DataError naming it.
    With it, bad images are left out of the store (the caller drops their captions).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    skipped: list[int] = []
    with atomic_path(out) as tmp:
        store = _new_store(tmp, (len(paths), 3, size, size))
        kept = 0
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for start in range(0, len(paths), _CHUNK):
                chunk = paths[start:start + _CHUNK]
                for offset, result in enumerate(pool.map(_try_decode, chunk, [size] * len(chunk))):
                    if isinstance(result, DataError):
                        if not skip_bad:
                            raise result
                        log.warning("skipping %s", result)
                        skipped.append(start + offset)
                    else:
                        store[kept] = result
                        kept += 1
                bar.update(len(chunk))
        store.flush()
        del store
        if kept == 0 and paths:
            raise DataError(f"{out}: every one of the {len(paths)} images is missing or unreadable")
        if skipped:
            _truncate_store(tmp, kept)
    return skipped


def _truncate_store(path: Path, n: int) -> None:
    """Keep the first `n` images of a store (the kept ones, written front to back)."""
    with atomic_path(path) as short_path:
        full = np.load(path, mmap_mode="r")
        short = _new_store(short_path, (n, *full.shape[1:]))
        step = _CHUNK * 16
        for start in range(0, n, step):
            short[start:start + step] = full[start:min(start + step, n)]
        short.flush()
        del short, full


def _new_store(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 `.npy` store of `shape`, memory-mapped for writing, with its disk blocks reserved."""
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve: write as is
                raise
    return store


def write_image_store(images: np.ndarray, out: Path) -> None:
    """Store images generated in memory (the embedded dataset) in the same format."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (n, 3, S, S) images, got {images.dtype} {images.shape}")
    with atomic_path(out) as tmp:
        store = _new_store(tmp, images.shape)
        store[:] = images
        store.flush()
        del store


def open_image_store(path: Path) -> np.ndarray:
    """Memory-map a store read-only; a missing or damaged file is a DataError."""
    try:
        images = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"{path}: image store not found; {producer_hint(path)}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npy image store ({exc}); {producer_hint(path)}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{path}: expected uint8 (n, 3, S, S), found {images.dtype} {images.shape}")
    return images


def gather_images(images: np.ndarray | torch.Tensor, index: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images at `index` from a store (memory-mapped array, or a tensor already on a device),
    as a tensor on the store's device; only the indexed images are read."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(index).to(images.device)]
    return torch.from_numpy(np.asarray(images[np.asarray(index)]))
