"""Resumable state of long stages: one mechanism for experts, distillation and evaluation.

A `CheckpointStore` is a folder of named states, each written atomically and stamped with the
fingerprint of everything it depends on. Loading gives the state back only if its fingerprint
matches: a state written under other settings or inputs is ignored (the stage starts afresh), and an
unreadable file (a truncated write, a full disk) is moved aside with a warning instead of failing every
rerun. Fingerprints hash content (`content_fingerprint`), never modification times, so a
`dvc checkout` of unchanged inputs keeps the checkpoints valid.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lors.io import save_torch, sha256_file, sha256_json

log = logging.getLogger(__name__)


def content_fingerprint(settings: Mapping[str, Any], files: Iterable[str | Path] = ()) -> str:
    """sha256 of the settings and of the bytes of every input file (in the given order)."""
    return sha256_json({"settings": settings, "files": [(Path(f).name, sha256_file(f)) for f in files]})


class CheckpointStore:
    """Named, fingerprinted states under one folder (kept outside DVC outputs, so DVC never deletes them)."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def path(self, name: str) -> Path:
        """Where a stage keeps a file of its own next to the states (valid only with a matching state)."""
        return self.folder / name

    def save(self, name: str, state: Any) -> Path:
        path = self.path(f"{name}.pt")
        save_torch(path, {"fingerprint": self.fingerprint, "state": state})
        return path

    def load(self, name: str) -> Any | None:
        """The state saved under `name`, or None when absent, foreign or unreadable (then set aside)."""
        path = self.path(f"{name}.pt")
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any damage (truncation, garbage) means: start afresh
            aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            path.rename(aside)
            log.warning("%s: unreadable checkpoint (%s); moved to %s, starting afresh", path,
                        exc.__class__.__name__, aside.name)
            return None
        if not isinstance(stored, dict) or stored.get("fingerprint") != self.fingerprint:
            log.warning("%s was written under other settings or inputs; starting afresh", path)
            return None
        return stored["state"]

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
