"""Train the networks of one evaluation at once, as if each were trained alone (method.md 4.1).

The `num_eval` networks of an evaluation see the same set and differ only in seed, so their
parameters are stacked along a leading axis and each mini-batch step is one `torch.func.vmap`'d
forward and backward over the stack, followed by one SGD step of the stack (SGD is elementwise:
the stack steps exactly as each network would alone). Every network keeps its own random streams:
its init is drawn after seeding with its member seed, its mini-batch rows come from its own
generator, and its dropout masks from a copy of the global CPU stream taken right after its build,
drawn with the call `F.dropout` makes on CPU. On CPU the curves therefore equal sequential training
(`lors.evaluation.train.synset_epoch`) with the same seeds up to rounding (vmapped convolutions sum
in another order; tests/test_speedups.py). On CUDA sequential dropout uses a fused kernel with its
own stream, so the masks differ there (same distribution). Retrieval is measured per network, as in
`run_network`. Needs a model without buffers (no BatchNorm) and no normalisation layer other than
nn.LayerNorm: `train_stacked` raises ConfigError otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from lors.config import EvalSettings
from lors.errors import ConfigError
from lors.evaluation.train import RetrievalSplit, branch_optimizer, eval_epochs
from lors.losses import soft_contrastive_loss
from lors.models import DualEncoder
from lors.models.functional import vmappable_twin
from lors.retrieval import test_retrieval
from lors.runtime import seed_everything


@dataclass
class Member:
    """One network of the stack with the two random streams it would use alone."""

    model: DualEncoder
    rows: torch.Generator  # mini-batch sampling: the generator seed_everything returned
    dropout: torch.Generator  # the global CPU stream as it stood right after the build


def seeded_members(build: Callable[[], DualEncoder], seeds: Sequence[int]) -> list[Member]:
    """Seed and build each network exactly as sequential evaluation does (seed_everything, then build)."""
    members = []
    for seed in seeds:
        rows = seed_everything(seed)
        model = build()
        members.append(Member(model, rows, torch.Generator().set_state(torch.get_rng_state())))
    return members


class MaskedDropout(nn.Module):
    """Dropout whose scaled keep-mask is the buffer `mask`, so vmap can give each network its own."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask if self.training else x


def _dropout_calls(model: DualEncoder, images: torch.Tensor, texts: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-row input shape) of every active dropout layer, in the order a forward calls them."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, tuple(args[0].shape[1:]))))
             for name, module in model.named_modules() if isinstance(module, nn.Dropout) and module.p > 0]
    was_training = model.training
    model.eval()  # the hooks still fire, and eval-mode dropout draws nothing
    try:
        with torch.no_grad():
            model(images[:1], texts[:1])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return calls


def _masked_twin(model: DualEncoder, names: set[str]) -> nn.Module:
    twin = vmappable_twin(model)
    if twin is None:
        raise ConfigError(f"evaluate.stacked: {type(model.image_encoder).__name__} has buffers or a normalisation "
                          "layer vmap cannot stack (BatchNorm, GroupNorm); set evaluate.stacked: false")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, MaskedDropout(twin.get_submodule(name).p))
    return twin.train()


class StackedNetworks:
    """The members' parameters stacked as leaf tensors, one vmapped loss per mini-batch step."""

    def __init__(self, members: list[Member], images: torch.Tensor, texts: torch.Tensor,
                 similarity: torch.Tensor, loss: str) -> None:
        host = members[0].model
        self.members, self.images, self.texts, self.similarity, self.loss = members, images, texts, similarity, loss
        self.dropouts = _dropout_calls(host, images, texts)
        self.twin = _masked_twin(host, {name for name, _ in self.dropouts})
        names = [name for name, _ in host.named_parameters()]
        per_member = [dict(m.model.named_parameters()) for m in members]
        self.params = {n: torch.stack([p[n].detach() for p in per_member]).requires_grad_(True) for n in names}

    def branch(self, prefix: str) -> list[torch.Tensor]:
        return [p for name, p in self.params.items() if name.startswith(prefix)]

    def _masks(self, rows: int) -> dict[str, torch.Tensor]:
        """Each member's masks for one step, drawn in forward order as F.dropout draws them on CPU."""
        dtype = self.images.dtype
        masks: dict[str, list[torch.Tensor]] = {f"{name}.mask": [] for name, _ in self.dropouts}
        for member in self.members:
            for name, shape in self.dropouts:
                p = self.twin.get_submodule(name).p
                keep = torch.empty((rows, *shape), dtype=dtype).bernoulli_(1 - p, generator=member.dropout)
                masks[f"{name}.mask"].append(keep.div_(1 - p))
        return {key: torch.stack(value).to(self.images.device) for key, value in masks.items()}

    def step_losses(self, batch_size: int) -> torch.Tensor:
        """(members,) losses of one step, each on its own random subset of min(b, N) pairs."""
        n = len(self.images)
        rows = torch.stack([torch.randperm(n, generator=m.rows)[:min(batch_size, n)] for m in self.members])
        masks = self._masks(rows.shape[1])

        def member_loss(params: dict, buffers: dict, idx: torch.Tensor) -> torch.Tensor:
            logits = functional_call(self.twin, (params, buffers), (self.images[idx], self.texts[idx]))
            return soft_contrastive_loss(self.loss, logits, self.similarity[idx][:, idx])

        return vmap(member_loss)(self.params, masks, rows.to(self.images.device))

    def load(self, k: int, model: DualEncoder) -> DualEncoder:
        """Member k's current weights into `model` (a module of the members' architecture)."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.params[name][k])
        return model


def train_stacked(members: list[Member], images: torch.Tensor, texts: torch.Tensor, similarity: torch.Tensor, *,
                  lr_img: float, lr_txt: float, settings: EvalSettings, amp: bool, splits: dict[str, RetrievalSplit],
                  device: torch.device, progress: bool = True, desc: str = "stacked epochs") -> list[dict]:
    """The LoRS protocol of `lors.evaluation.protocol.train_networks_on_set` for all members at once; one
    curve per member as `run_network` returns it (its train_s is the stack's training time / members).
    Each member's module ends holding its trained weights."""
    cfg = settings
    if cfg.protocol != "lors":
        raise ConfigError(f"evaluate.stacked trains the LoRS protocol only, not '{cfg.protocol}'")
    stack = StackedNetworks(members, images, texts, similarity, cfg.loss)
    optimizer, scheduler = branch_optimizer(stack.branch("image_encoder."), stack.branch("text_head."), lr_img,
                                            lr_txt, cfg.momentum, cfg.weight_decay, cfg.epochs)
    curves: list[dict] = [{"epochs": [], "loss": [], **{name: [] for name in splits}, "eval_s": 0.0} for _ in members]
    wanted = set(eval_epochs(0, cfg.epochs, cfg.eval_every))
    train_s = 0.0
    for epoch in tqdm(range(cfg.epochs + 1), desc=desc, leave=False, disable=not progress):
        start = time.perf_counter()
        history = []
        for _ in range(math.ceil(len(images) / cfg.batch_size)):
            losses = stack.step_losses(cfg.batch_size)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            history.append(losses.detach())
        scheduler.step()
        epoch_losses = torch.stack(history).mean(0).tolist()
        train_s += time.perf_counter() - start
        if epoch not in wanted:
            continue
        for k, curve in enumerate(curves):
            start = time.perf_counter()
            curve["epochs"].append(epoch)
            curve["loss"].append(epoch_losses[k])
            model = stack.load(k, members[0].model)
            for name, split in splits.items():
                curve[name].append(test_retrieval(model, split.images, split.features, split.txt2img, device, amp))
            curve["eval_s"] += time.perf_counter() - start
    for k, (member, curve) in enumerate(zip(members, curves)):
        stack.load(k, member.model)
        curve["train_s"] = train_s / len(members)
    return curves
