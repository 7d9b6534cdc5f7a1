"""Fetch the Karpathy annotation files (method.md 7.1) with resume and checksum verification.

Only annotation json files are downloaded; images never are (Flickr30k needs the user's own copy,
COCO's zips come from the COCO site). A download goes to `<file>.part`, resumes it with an HTTP Range
request after an interruption, and is renamed into place only after its sha256 checks out.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from lors.errors import DataError
from lors.io import sha256_file

log = logging.getLogger(__name__)

ANNOTATION_URL = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
ANNOTATION_URL_ENV = "LORS_ANNOTATION_URL"  # override of the base URL (mirrors, tests)

# sha256 of the files whose published bytes are known (shared/data/karpathy/README.md); the train
# files were never available to hash, so they are only checked for being valid JSON when read.
KNOWN_SHA256 = {
    "flickr30k_test.json": "5d2a8e7365ff2220cf885e3fb656dd33b72b3a8f8c761067deebb0b22718806d",
    "flickr30k_val.json": "eed9daa3c88f980fda8a1481b9ebec811e7f8d9d862a79e259e97c2b2a0481c2",
    "coco_karpathy_test.json": "5b202a235ee2a4e13f82b984ef9293b8e2d34f9b1f92147bf8340580f20faf15",
    "coco_karpathy_val.json": "51f6dcf544cc0d3bd7086b1cd5aa3dcc9a26fcc718e623099027a902da06a848",
}

_BLOCK = 1 << 16


def annotation_url(filename: str) -> str:
    base = os.environ.get(ANNOTATION_URL_ENV) or ANNOTATION_URL
    return base.rstrip("/") + "/" + filename


def download_file(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` if present; verify `sha256` when given.

    A checksum mismatch deletes the partial file (the next attempt starts clean) and raises DataError.
    Network errors propagate as urllib errors so the caller can name every missing file at once.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:  # 416: the partial file is already whole
            raise
        response = None
    if response is not None:
        with response:
            resumed = response.status == 206
            if have and not resumed:
                log.info("%s: server ignored the range request; downloading from the start", url)
            mode, start = ("ab", have) if resumed else ("wb", 0)
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, mode) as fh, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                              desc=dest.name) as bar:
                while block := response.read(_BLOCK):
                    fh.write(block)
                    bar.update(len(block))
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()
            raise DataError(f"{dest}: sha256 mismatch after download from {url} "
                            f"(expected {sha256}, got {actual}); the partial file was removed, run again")
    os.replace(part, dest)
    log.info("downloaded %s", dest)
    return dest


def fetch_annotations(filenames: Sequence[str], ann_root: Path) -> list[Path]:
    """Download the missing annotation `filenames` into `ann_root`; offline -> one DataError line."""
    unreachable: list[str] = []
    for name in filenames:
        try:
            download_file(annotation_url(name), ann_root / name, KNOWN_SHA256.get(name))
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            log.warning("cannot download %s: %s", name, reason)
            unreachable.append(f"{name} ({reason})")
    if unreachable:
        raise DataError(f"could not download {', '.join(unreachable)} from {annotation_url('')}; "
                        f"put the files in {ann_root}")
    return [ann_root / name for name in filenames]
