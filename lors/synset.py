"""The one synthetic-set format every distillation method and coreset selector writes.

A set is N image-text pairs: images in normalised pixel space (N, 3, H, W), texts as vectors in the
frozen text encoder's feature space (N, d), the target similarity matrix (N, N; the identity for
methods without similarity learning), and the inner-loop learning rates the evaluator trains with.
Stored as one safetensors file whose header carries the metadata as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open

from lors.io import save_safetensors

FILENAME = "synset.safetensors"


@dataclass
class SyntheticSet:
    images: torch.Tensor
    texts: torch.Tensor
    similarity: torch.Tensor
    lr_img: float
    lr_txt: float
    meta: dict[str, Any] = field(default_factory=dict)  # dataset, budget, method, encoders, seed, ...
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. similarity factors w, L, R

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.texts.shape[0] != n or tuple(self.similarity.shape) != (n, n):
            raise ValueError(f"inconsistent synthetic set: {n} images, {self.texts.shape[0]} texts, "
                             f"similarity {tuple(self.similarity.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def save(self, path: str | Path) -> None:
        tensors = {"images": self.images, "texts": self.texts, "similarity": self.similarity,
                   "lr_img": torch.tensor(float(self.lr_img)), "lr_txt": torch.tensor(float(self.lr_txt))}
        tensors.update({f"extra.{k}": v for k, v in self.extra.items()})
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors(path, tensors, {"meta": json.dumps(self.meta, default=str, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: synthetic set not found (run distill or select first)")
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(images=tensors["images"], texts=tensors["texts"], similarity=tensors["similarity"],
                   lr_img=tensors["lr_img"].item(), lr_txt=tensors["lr_txt"].item(), meta=meta, extra=extra)
