"""One TESLA-style trajectory-matching iteration, for LoRS and TESLA-VL (method.md 3.5).

Pass 1 unrolls K student steps theta_{k+1} = theta_k - a G_k from the expert's theta*_s with plain
first-order gradients (no graph is kept: the reference builds a second-order graph here and drops
it). With Sigma = sum_k G_k, a = the learnable lr (a constant inside the unroll) and
delta = theta*_{s+M} - theta*_s, the matching loss per branch is

    L = || a Sigma + delta ||^2 / D,    D = || delta ||^2.

Pass 2 gives the data gradient in constant memory. The theta_k do not depend on the data (they
were built from detached gradients: TESLA's truncation), so dL/d(data) flows only through each
G_k, and dL/dG_k = 2 (a delta + a^2 Sigma) / D = c. For every k the step's loss is recomputed at
the stored theta_k on the same mini-batch and S~ block, G_k is formed with a graph, and c . G_k is
back-propagated into images, texts and the similarity parameters. Only one step's graph is alive
at a time. With `batched_steps` the K recomputations run as one `torch.func.vmap` over the stored
theta_k instead (fewer, larger kernels; all K graphs alive at once, so more memory); the gradients
equal the loop's up to rounding (tests/test_speedups.py). Text-head dropout then draws its masks
through vmap (randomness="different"), i.e. other masks than the loop would, from the same
distribution. A student vmap cannot handle (BatchNorm buffers, norm layers other than nn.LayerNorm)
falls back to the loop. With a frozen backbone (model.image_trainable false) the images act only
through embeddings no theta_k changes: both passes embed the set once per iteration, and pass 2 sums
the K text-head terms before one backward through the backbone. With `merge_branches` (COCO) the data
gradient uses (N^I + N^T) / (D^I + D^T), while the lr gradients keep the separate L^I, L^T (quirk 8.6).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from lors.distill.synthetic import LearnableSet
from lors.distill.trajectories import Segment
from lors.losses import soft_contrastive_loss
from lors.models import FunctionalDualEncoder


@dataclass(frozen=True)
class MatchResult:
    """The matching losses of one iteration (floats, for logging and NaN checks)."""

    loss: float  # the objective whose gradient reached the data
    loss_img: float
    loss_txt: float


def walk_batches(n: int, batch: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`steps` mini-batches walking a permutation in chunks of b; a new permutation when fewer
    than b indices remain (the leftovers are skipped), method.md 3.5 step 3."""
    b = min(batch, n)
    batches: list[torch.Tensor] = []
    perm, position = torch.empty(0, dtype=torch.long), n
    while len(batches) < steps:
        if n - position < b:
            perm, position = torch.randperm(n, generator=generator), 0
        batches.append(perm[position:position + b])
        position += b
    return batches


def distances(segment: Segment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """delta = theta*_{s+M} - theta*_s and D = ||delta||^2 for the image and the text branch.
    A frozen backbone's branch is empty (model.image_trainable false): it has nothing to match, so its
    D is 1 and its normalised terms (sums over no entries) are 0, not 0/0. An expert that did not move
    keeps D = 0 and a non-finite loss."""
    delta_img = segment.target_img - segment.start_img
    delta_txt = segment.target_txt - segment.start_txt
    return delta_img, delta_txt, _squared_norm(delta_img), _squared_norm(delta_txt)


def _squared_norm(delta: torch.Tensor) -> torch.Tensor:
    return delta.square().sum() if delta.numel() else delta.new_ones(())


def branch_grads(loss: torch.Tensor, theta_img: torch.Tensor, theta_txt: torch.Tensor,
                 create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d theta for both branches; a frozen backbone's empty branch is unused and gets zeros."""
    g_img, g_txt = torch.autograd.grad(loss, (theta_img, theta_txt), create_graph=create_graph,
                                       allow_unused=True, materialize_grads=True)
    return g_img, g_txt


def step_loss(student: FunctionalDualEncoder, theta_img: torch.Tensor, theta_txt: torch.Tensor,
              images: torch.Tensor, texts: torch.Tensor, target: torch.Tensor, loss: str,
              temperature: float) -> torch.Tensor:
    """The inner loss l_k: soft contrastive loss of the student's logits against the S~ block."""
    logits = student.logits(theta_img, theta_txt, images, texts, temperature)
    return soft_contrastive_loss(loss, logits, target)


def lr_gradients(syn: LearnableSet, sum_img: torch.Tensor, sum_txt: torch.Tensor, delta_img: torch.Tensor,
                 delta_txt: torch.Tensor, dist_img: torch.Tensor, dist_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Separately normalised L^I(a_I), L^T(a_T) with Sigma detached; backprop into the two lrs."""
    loss_img = (syn.lr_img * sum_img.detach() + delta_img).square().sum() / dist_img
    loss_txt = (syn.lr_txt * sum_txt.detach() + delta_txt).square().sum() / dist_txt
    (loss_img + loss_txt).backward(inputs=[syn.lr_img, syn.lr_txt])
    return loss_img.detach(), loss_txt.detach()


def loop_data_gradient(student: FunctionalDualEncoder, syn: LearnableSet, thetas_img: torch.Tensor,
                       thetas_txt: torch.Tensor, batches: list[torch.Tensor], coef_img: torch.Tensor,
                       coef_txt: torch.Tensor, loss: str, temperature: float, data: list[torch.Tensor]) -> None:
    """Pass 2, one step at a time: recompute G_k with a graph and backprop c . G_k into `data`."""
    for theta_img, theta_txt, idx in zip(thetas_img, thetas_txt, batches):
        t_img, t_txt = theta_img.detach().requires_grad_(True), theta_txt.detach().requires_grad_(True)
        inner = step_loss(student, t_img, t_txt, syn.images[idx], syn.texts[idx], syn.similarity.matrix(idx),
                          loss, temperature)
        g_img, g_txt = branch_grads(inner, t_img, t_txt, create_graph=True)
        ((coef_img * g_img).sum() + (coef_txt * g_txt).sum()).backward(inputs=data)


def frozen_data_gradient(student: FunctionalDualEncoder, syn: LearnableSet, thetas_img: torch.Tensor,
                         thetas_txt: torch.Tensor, batches: list[torch.Tensor], coef_txt: torch.Tensor, loss: str,
                         temperature: float, data: list[torch.Tensor]) -> None:
    """Pass 2 with a frozen backbone (empty `thetas_img` rows): the images act only through embeddings
    that no theta_k changes, so the set is embedded once, the K text-head terms c . G_k are summed
    (their graphs are small) and one backward runs through the backbone instead of K."""
    images = student.embed_if_frozen(syn.images)
    total = images.new_zeros(())
    for theta_img, theta_txt, idx in zip(thetas_img, thetas_txt, batches):
        t_txt = theta_txt.detach().requires_grad_(True)
        inner = step_loss(student, theta_img, t_txt, images[idx], syn.texts[idx], syn.similarity.matrix(idx), loss,
                          temperature)
        (g_txt,) = torch.autograd.grad(inner, t_txt, create_graph=True)
        total = total + (coef_txt * g_txt).sum()
    total.backward(inputs=data)


def batched_data_gradient(student: FunctionalDualEncoder, syn: LearnableSet, thetas_img: torch.Tensor,
                          thetas_txt: torch.Tensor, batches: list[torch.Tensor], coef_img: torch.Tensor,
                          coef_txt: torch.Tensor, loss: str, temperature: float, data: list[torch.Tensor],
                          chunk: int = 0) -> None:
    """Pass 2 as vmaps over the K steps: sum_k c . G_k(theta_k, batch_k), one backward into `data` per
    `chunk` steps (0: all K at once; fewer steps per vmap keep fewer graphs alive). The mini-batches
    must all have the same size (walk_batches' are)."""
    chunk = chunk or len(batches)
    for first in range(0, len(batches), chunk):
        steps = slice(first, first + chunk)
        _vmapped_steps(student, syn, thetas_img[steps], thetas_txt[steps], batches[steps], coef_img, coef_txt, loss,
                       temperature).backward(inputs=data)


def _vmapped_steps(student: FunctionalDualEncoder, syn: LearnableSet, thetas_img: torch.Tensor,
                   thetas_txt: torch.Tensor, batches: list[torch.Tensor], coef_img: torch.Tensor,
                   coef_txt: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    """sum over the given steps of c . G_k, one vmap over them, with a graph back to the data."""
    idx = torch.stack(batches)
    targets = torch.stack([syn.similarity.matrix(i) for i in batches])

    def directional(t_img: torch.Tensor, t_txt: torch.Tensor, images: torch.Tensor, texts: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        g_img, g_txt = grad(step_loss, argnums=(1, 2))(student, t_img, t_txt, images, texts, target, loss,
                                                       temperature)
        return (coef_img * g_img).sum() + (coef_txt * g_txt).sum()

    per_step = vmap(directional, randomness="different")(thetas_img, thetas_txt, syn.images[idx], syn.texts[idx],
                                                         targets)
    return per_step.sum()


def tesla_iteration(student: FunctionalDualEncoder, syn: LearnableSet, segment: Segment,
                    batches: list[torch.Tensor], *, loss: str, temperature: float,
                    merge_branches: bool, batched_steps: bool = False, step_chunk: int = 0) -> MatchResult:
    """Set `.grad` of every parameter of `syn` for one match of `segment`; return the losses.
    `batched_steps`: pass 2 vmapped over the steps, `step_chunk` steps per vmap (0: all)."""
    a_img, a_txt = syn.lr_img.item(), syn.lr_txt.item()
    images, texts = student.embed_if_frozen(syn.images.detach()), syn.texts.detach()

    # pass 1: first-order unroll, keeping theta_k (rows of one tensor per branch) and the gradient sums
    theta_img, theta_txt = segment.start_img, segment.start_txt
    thetas_img = theta_img.new_empty((len(batches), theta_img.numel()))
    thetas_txt = theta_txt.new_empty((len(batches), theta_txt.numel()))
    sum_img, sum_txt = torch.zeros_like(theta_img), torch.zeros_like(theta_txt)
    for k, idx in enumerate(batches):
        thetas_img[k], thetas_txt[k] = theta_img, theta_txt
        t_img, t_txt = theta_img.detach().requires_grad_(True), theta_txt.detach().requires_grad_(True)
        with torch.no_grad():
            target = syn.similarity.matrix(idx)
        inner = step_loss(student, t_img, t_txt, images[idx], texts[idx], target, loss, temperature)
        g_img, g_txt = branch_grads(inner, t_img, t_txt)
        theta_img, theta_txt = theta_img - a_img * g_img, theta_txt - a_txt * g_txt
        sum_img += g_img
        sum_txt += g_txt

    delta_img, delta_txt, dist_img, dist_txt = distances(segment)
    resid_img, resid_txt = a_img * sum_img + delta_img, a_txt * sum_txt + delta_txt
    if merge_branches:  # ||delta||^2 over both branches (an empty branch adds nothing)
        denom_img = denom_txt = delta_img.square().sum() + delta_txt.square().sum()
        matching = (resid_img.square().sum() + resid_txt.square().sum()) / denom_img
    else:
        denom_img, denom_txt = dist_img, dist_txt
        matching = None
    coef_img = (2 * a_img / denom_img) * resid_img  # = 2 (a delta + a^2 Sigma) / D
    coef_txt = (2 * a_txt / denom_txt) * resid_txt
    del resid_img, resid_txt

    # pass 2: recompute each G_k with a graph on the same batch and S~ block; backprop c . G_k
    syn.zero_grad(set_to_none=False)
    data = [syn.images, syn.texts, *syn.similarity.parameters()]
    if student.image_frozen:
        frozen_data_gradient(student, syn, thetas_img, thetas_txt, batches, coef_txt, loss, temperature, data)
    elif batched_steps and (twin := student.vmappable()) is not None:
        batched_data_gradient(twin, syn, thetas_img, thetas_txt, batches, coef_img, coef_txt, loss, temperature, data,
                              step_chunk)
    else:
        if batched_steps:
            warnings.warn("batched_steps: this student cannot be vmapped (buffers or norm layers); pass 2 uses "
                          "the loop", stacklevel=2)
        loop_data_gradient(student, syn, thetas_img, thetas_txt, batches, coef_img, coef_txt, loss, temperature, data)
    del thetas_img, thetas_txt

    loss_img, loss_txt = lr_gradients(syn, sum_img, sum_txt, delta_img, delta_txt, dist_img, dist_txt)
    total = matching if matching is not None else loss_img + loss_txt
    return MatchResult(total.item(), loss_img.item(), loss_txt.item())
