"""Train one fresh network and record its retrieval curve (method.md 4.1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lors.losses import infonce, soft_contrastive_loss
from lors.models import DualEncoder
from lors.retrieval import Ties, test_retrieval


@dataclass
class RetrievalSplit:
    """A split as retrieval reads it, uploaded once per evaluation call (not once per test pass)."""

    images: torch.Tensor  # uint8 (n_images, 3, S, S) on the device, or (frozen backbone) their embeddings
    features: torch.Tensor  # (n_captions, d) frozen text features, on the device
    txt2img: torch.Tensor  # (n_captions,)
    ties: Ties = "pessimistic"  # the rule of the recorded metrics (the other rule's come prefixed)

    @classmethod
    def upload(cls, images: np.ndarray | torch.Tensor, features: torch.Tensor, txt2img: np.ndarray | torch.Tensor,
               device: torch.device, ties: Ties = "pessimistic") -> "RetrievalSplit":
        images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        return cls(images.to(device), features.float().to(device), torch.as_tensor(txt2img, dtype=torch.long), ties)


def eval_epochs(first: int, last: int, every: int) -> list[int]:
    """Epochs after which retrieval is measured: multiples of `every` in [first, last], plus `last`."""
    epochs = [e for e in range(first, last + 1) if e % every == 0]
    return epochs if epochs and epochs[-1] == last else [*epochs, last]


def synset_optimizer(model: DualEncoder, lr_img: float, lr_txt: float, momentum: float, weight_decay: float,
                     epochs: int | None) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR | None]:
    """SGD with one lr per branch; x0.1 from epoch epochs//2+1 on (51 of 0..100), no decay for None."""
    return branch_optimizer(model.image_encoder.parameters(), model.text_head.parameters(), lr_img, lr_txt,
                            momentum, weight_decay, epochs)


def branch_optimizer(image_params: Iterable[torch.Tensor], text_params: Iterable[torch.Tensor], lr_img: float,
                     lr_txt: float, momentum: float, weight_decay: float,
                     epochs: int | None) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR | None]:
    """synset_optimizer over given tensors (also stacked ones: SGD is elementwise, so a stack of
    networks steps exactly as each network would alone)."""
    optimizer = torch.optim.SGD([{"params": list(image_params), "lr": lr_img},
                                 {"params": list(text_params), "lr": lr_txt}],
                                momentum=momentum, weight_decay=weight_decay)
    if epochs is None:
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs // 2 + 1], gamma=0.1)


def synset_epoch(model: DualEncoder, optimizer: torch.optim.Optimizer, images: torch.Tensor, texts: torch.Tensor,
                 similarity: torch.Tensor, *, batch_size: int, loss: str, generator: torch.Generator) -> float:
    """One reference epoch: ceil(N/b) mini-batches, EACH an independent random subset of min(b, N) pairs
    with its similarity block (so batches of one epoch may overlap, method.md 8.8). Returns the mean loss."""
    n = len(images)
    model.train()
    losses = []
    for _ in range(math.ceil(n / batch_size)):
        rows = torch.randperm(n, generator=generator)[:min(batch_size, n)].to(images.device)
        value = soft_contrastive_loss(loss, model(images[rows], texts[rows]), similarity[rows][:, rows])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.detach())
    return torch.stack(losses).mean().item()


def partition_epoch(model: DualEncoder, optimizer: torch.optim.Optimizer, images: torch.Tensor, texts: torch.Tensor,
                    *, batch_size: int, generator: torch.Generator) -> float:
    """One VL-Distill epoch (method.md 4.2): a shuffled partition into batches of b pairs (the last one
    smaller), InfoNCE with identity targets. Returns the mean loss."""
    model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    losses = []
    for rows in order.split(batch_size):
        value = infonce(model(images[rows], texts[rows]))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.detach())
    return torch.stack(losses).mean().item()


def run_network(model: DualEncoder, train_epoch: Callable[[int], float], epochs: Sequence[int],
                splits: dict[str, RetrievalSplit], eval_at: Sequence[int], device: torch.device, amp: bool,
                progress: bool = True, desc: str = "epochs") -> dict:
    """Train for `epochs` (calling `train_epoch(epoch)`), measuring retrieval on every split after each
    epoch in `eval_at`. Returns the curves (lists parallel to "epochs") and the time split."""
    curve: dict = {"epochs": [], "loss": [], **{name: [] for name in splits}}
    train_s = eval_s = 0.0
    wanted = set(eval_at)
    for epoch in tqdm(epochs, desc=desc, leave=False, disable=not progress):
        start = time.perf_counter()
        loss = train_epoch(epoch)
        train_s += time.perf_counter() - start
        if epoch in wanted:
            start = time.perf_counter()
            curve["epochs"].append(epoch)
            curve["loss"].append(loss)
            for name, split in splits.items():
                curve[name].append(test_retrieval(model, split.images, split.features, split.txt2img, device, amp,
                                                  split.ties))
            eval_s += time.perf_counter() - start
    curve.update(train_s=train_s, eval_s=eval_s)
    return curve
