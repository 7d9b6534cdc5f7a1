"""Where each stage reads and writes under `work_dir` (one place, so stages and dvc.yaml agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lors.io import slug


@dataclass(frozen=True)
class Layout:
    work: Path

    def prepared(self, dataset: str) -> Path:
        return self.work / dataset / "prepared"

    def text_features(self, dataset: str, text_encoder: str) -> Path:
        return self.work / dataset / "text" / slug(text_encoder)

    def experts(self, dataset: str, image_encoder: str, text_encoder: str) -> Path:
        return self.work / dataset / "experts" / f"{slug(image_encoder)}+{slug(text_encoder)}"

    def expert(self, dataset: str, image_encoder: str, text_encoder: str, index: int) -> Path:
        """One expert's folder (its own DVC output): trajectory.safetensors, forgetting.npy, learned.npy."""
        return self.experts(dataset, image_encoder, text_encoder) / f"expert_{index}"

    def synset(self, dataset: str, budget: int, method: str) -> Path:
        return self.work / dataset / "synsets" / f"{method}-{budget}"

    def evaluation(self, dataset: str, budget: int, method: str, arch: str) -> Path:
        return self.work / dataset / "eval" / f"{method}-{budget}" / f"{slug(arch)}.json"

    def checkpoints(self, dataset: str, name: str) -> Path:
        """Resumable state of a long stage; kept outside DVC outputs so DVC never deletes it."""
        return self.work / "checkpoints" / dataset / name
