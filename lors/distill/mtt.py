"""One MTT-VL iteration: full back-propagation through the unrolled student (method.md 3.7).

Unlike TESLA, every step keeps its graph (create_graph) and the learnable lrs sit inside it, so
the data gradient includes the dependence of later steps on earlier batches, at a memory cost
linear in the number of steps. Each step draws a fresh random subset of the pairs; the inner loss
is CLIP's InfoNCE with identity targets. VL-Distill scales its inner-loop logits by the raw
log(1/tau) = 2.659 instead of 1/tau (quirk 1.4); `protocol: reference` keeps that.
"""

from __future__ import annotations

import math

import torch

from lors.distill.matching import MatchResult, branch_grads, distances
from lors.distill.synthetic import LearnableSet
from lors.distill.trajectories import Segment
from lors.losses import infonce
from lors.models import FunctionalDualEncoder


def mtt_temperature(tau: float, protocol: str) -> float:
    """The temperature whose inverse scales the inner-loop logits: 1/log(1/tau) under the
    reference protocol (scale 2.659 at tau = 0.07), tau itself under the clean one."""
    return 1.0 / math.log(1.0 / tau) if protocol == "reference" else tau


def random_subsets(n: int, size: int | None, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh random subset of min(size, n) pairs per step (size None: all pairs, shuffled)."""
    k = n if size is None else min(size, n)
    return [torch.randperm(n, generator=generator)[:k] for _ in range(steps)]


def mtt_iteration(student: FunctionalDualEncoder, syn: LearnableSet, segment: Segment,
                  subsets: list[torch.Tensor], *, temperature: float) -> MatchResult:
    """Set `.grad` of images, texts and both lrs from the exact unrolled objective L^I + L^T."""
    theta_img = segment.start_img.detach().requires_grad_(True)
    theta_txt = segment.start_txt.detach().requires_grad_(True)
    images = student.embed_if_frozen(syn.images)  # a frozen backbone: embedded once, one backward through it
    for idx in subsets:
        inner = infonce(student.logits(theta_img, theta_txt, images[idx], syn.texts[idx], temperature))
        g_img, g_txt = branch_grads(inner, theta_img, theta_txt, create_graph=True)
        theta_img, theta_txt = theta_img - syn.lr_img * g_img, theta_txt - syn.lr_txt * g_txt

    _, _, dist_img, dist_txt = distances(segment)
    loss_img = (theta_img - segment.target_img).square().sum() / dist_img
    loss_txt = (theta_txt - segment.target_txt).square().sum() / dist_txt
    syn.zero_grad(set_to_none=False)
    (loss_img + loss_txt).backward(inputs=[syn.images, syn.texts, syn.lr_img, syn.lr_txt])
    return MatchResult((loss_img + loss_txt).item(), loss_img.item(), loss_txt.item())
