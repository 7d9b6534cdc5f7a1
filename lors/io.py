"""Small I/O helpers every stage shares: atomic writes, hashing, JSON."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A killed or failing writer leaves at most a `.tmp` file, never a half-written output that
    looks finished. An OSError raised in the block names `path` (writes report no file name, and
    the temporary name means nothing to the user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename in (None, str(tmp)):
            exc.filename = str(path)
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def slug(name: str) -> str:
    """A file-system-safe name for a model name or path (e.g. 'bert-base-uncased', '/x/y' -> 'x_y')."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in str(name).strip("/"))


def save_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` to `path` atomically. The bytes are built in memory and written by Python, because
    torch's own file writer reports a full disk as an opaque RuntimeError ("unexpected pos ..."),
    where a Python write raises ENOSPC, which the CLI turns into one line naming `path`."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())


def save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically with the same bytes for the same tensors and metadata.

    safetensors writes its metadata dict in hash order, which changes from process to process; the
    header is re-serialised here with sorted keys (the format allows any JSON layout, padded to 8
    bytes), so identical features give identical files and DVC sees no change.
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        fh.write(memoryview(blob)[8 + size:])
