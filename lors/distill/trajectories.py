"""Which expert segment each distillation iteration matches (method.md 3.5 steps 1-2).

Experts are consumed round-robin over a seeded shuffled order, reshuffled after every pass. Only
the snapshots distillation can reach (0 .. max_start_epoch - 1 + expert_epochs) are moved to the
device, and the last few trajectories stay there in a small LRU cache, so a trajectory in use is
read from disk once per load rather than once per iteration as in the reference (8.15).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from lors.errors import DataError

log = logging.getLogger(__name__)


class TrajectoryLike(Protocol):
    image: torch.Tensor  # (E+1, P_img) flat snapshots
    text: torch.Tensor  # (E+1, P_txt)


class Segment(NamedTuple):
    """theta*_s and theta*_{s+M} of both branches: the start and the target of one match."""

    start_img: torch.Tensor
    start_txt: torch.Tensor
    target_img: torch.Tensor
    target_txt: torch.Tensor


class ExpertPool:
    """Seeded round-robin over experts, with the reachable snapshots of recent ones on the device."""

    def __init__(self, sources: Sequence[Path | TrajectoryLike], n_snapshots: int, numels: tuple[int, int],
                 device: torch.device, cache_size: int = 2) -> None:
        if not sources:
            raise DataError("no expert trajectories given (run the experts stage first)")
        self.sources = list(sources)
        self.n_snapshots = n_snapshots
        self.numels = numels
        self.device = device
        self.cache_size = cache_size
        self.order: list[int] = []
        self.position = 0
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.sources)

    def _name(self, index: int) -> str:
        source = self.sources[index]
        return str(source) if isinstance(source, Path) else f"expert {index}"

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.sources[index]
        if isinstance(source, Path):
            from lors.experts import load_trajectory

            log.debug("loading %s", source)
            source = load_trajectory(source)
        name = self._name(index)
        for branch, flat, numel in (("image", source.image, self.numels[0]), ("text", source.text, self.numels[1])):
            if flat.ndim != 2 or flat.shape[1] != numel:
                raise DataError(f"{name}: {branch} snapshots have shape {tuple(flat.shape)}, the student needs "
                                f"(epochs+1, {numel}) (experts trained with another model?)")
            if flat.shape[0] < self.n_snapshots:
                raise DataError(f"{name}: {flat.shape[0]} {branch} snapshots, distillation needs "
                                f"{self.n_snapshots} (max_start_epoch + expert_epochs)")
        return (source.image[:self.n_snapshots].to(self.device, torch.float32),
                source.text[:self.n_snapshots].to(self.device, torch.float32))

    def trajectory(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self._cache:
            self._cache.move_to_end(index)
        else:
            while len(self._cache) >= self.cache_size:
                self._cache.popitem(last=False)
            self._cache[index] = self._load(index)
        return self._cache[index]

    def next_expert(self, generator: torch.Generator) -> int:
        if self.position >= len(self.order):
            self.order = torch.randperm(len(self.sources), generator=generator).tolist()
            self.position = 0
        index = self.order[self.position]
        self.position += 1
        return index

    def sample(self, generator: torch.Generator, max_start_epoch: int, expert_epochs: int) -> tuple[int, int, Segment]:
        """Next expert, s ~ U{0..max_start_epoch-1}, and its (theta*_s, theta*_{s+M}) segment."""
        index = self.next_expert(generator)
        start = int(torch.randint(max_start_epoch, (1,), generator=generator))
        image, text = self.trajectory(index)
        end = start + expert_epochs
        return index, start, Segment(image[start], text[start], image[end], text[end])

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = list(state["order"]), int(state["position"])
