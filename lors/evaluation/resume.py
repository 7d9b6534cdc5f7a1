"""Per-network results kept while an evaluation runs, so a killed run resumes at the next network.

Each finished network is written as `net{k}.json` with a fingerprint of everything its numbers depend
on (synthetic set, evaluation and model config, seed, architecture); a stale or foreign file is
ignored and recomputed, never mixed in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from lors.io import read_json, write_json


@dataclass(frozen=True)
class NetworkCache:
    directory: Path
    fingerprint: str

    def _path(self, k: int) -> Path:
        return self.directory / f"net{k}.json"

    def load(self, k: int) -> dict | None:
        path = self._path(k)
        try:
            stored = read_json(path) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None
        if not stored or stored.get("fingerprint") != self.fingerprint:
            return None
        return stored["record"]

    def save(self, k: int, record: dict) -> None:
        write_json(self._path(k), {"fingerprint": self.fingerprint, "record": record})

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
