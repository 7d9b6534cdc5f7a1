"""Tiny students, paired data and expert trajectories for the distillation tests (CPU, seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from torch import nn

from lors.distill.matching import branch_grads
from lors.losses import infonce
from lors.models import DualEncoder, FunctionalDualEncoder, build_dual_encoder

TEXT_DIM = 8
IMAGE_SIZE = 8


class TinyConv(nn.Module):
    """A few-hundred-parameter image encoder for the slow nested-autograd checks."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_features, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.conv(x)).mean((2, 3))


def tiny_student(arch: str = "test_nfnet", dropout: float = 0.0, dtype: torch.dtype = torch.float64,
                 seed: int = 0) -> FunctionalDualEncoder:
    torch.manual_seed(seed)
    if arch == "conv":
        model = DualEncoder(TinyConv(), TEXT_DIM, temperature=0.07, text_head_dropout=dropout)
    else:
        model = build_dual_encoder(arch, TEXT_DIM, pretrained=False, temperature=0.07, text_head_dropout=dropout)
    return FunctionalDualEncoder(model.to(dtype).train())


def paired_data(n: int, classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64,
                noise: float = 0.5, noise_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and text features that share a class (prototypes from `seed`): a learnable retrieval
    problem; `noise_seed` draws fresh samples of the same classes (held-out pairs)."""
    g = torch.Generator().manual_seed(seed)
    proto_img = torch.randn(classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    proto_txt = torch.randn(classes, TEXT_DIM, generator=g)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
    labels = torch.arange(n) % classes
    images = proto_img[labels] + noise * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    texts = proto_txt[labels] + noise * torch.randn(n, TEXT_DIM, generator=g)
    return images.to(dtype), texts.to(dtype), labels


def expert_trajectory(student: FunctionalDualEncoder, images: torch.Tensor, texts: torch.Tensor, *,
                      epochs: int = 3, batch: int = 16, lr: float = 0.1, seed: int = 0) -> SimpleNamespace:
    """SGD on InfoNCE from the student's initial weights; flat snapshots after epochs 0..E."""
    g = torch.Generator().manual_seed(seed)
    theta_img, theta_txt = (t.to(images.dtype) for t in student.initial())
    theta_img = theta_img + 0.01 * torch.randn(theta_img.shape, generator=g, dtype=theta_img.dtype)
    snaps_img, snaps_txt = [theta_img], [theta_txt]
    n = len(images)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - batch + 1, batch):
            idx = perm[start:start + batch]
            t_img, t_txt = theta_img.detach().requires_grad_(True), theta_txt.detach().requires_grad_(True)
            loss = infonce(student.logits(t_img, t_txt, images[idx], texts[idx]))
            g_img, g_txt = branch_grads(loss, t_img, t_txt)
            theta_img, theta_txt = (t_img - lr * g_img).detach(), (t_txt - lr * g_txt).detach()
        snaps_img.append(theta_img)
        snaps_txt.append(theta_txt)
    return SimpleNamespace(image=torch.stack(snaps_img), text=torch.stack(snaps_txt))
