"""Drive a dual encoder functionally over flat parameter vectors.

Trajectory matching treats each branch's parameters as one vector (expert snapshots, the student's
unrolled steps, the matching distance). The student network is built once per run and called with
`torch.func.functional_call`, so no module is rebuilt or re-copied per iteration.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lors.models.dual import DualEncoder


class FlatParams:
    """The layout of a module's trainable parameters (requires_grad): names, shapes and offsets into one
    flat vector. A frozen module has an empty layout; `functional_call` then uses its own parameters."""

    def __init__(self, module: nn.Module) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        if not self.names:  # frozen: an empty vector on the module's device
            return next(module.parameters()).detach().new_empty(0)
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat` shaped like the module's parameters (differentiable w.r.t. `flat`)."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} entries, the module needs {self.numel}")
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def load(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat vector into the module's parameters in place."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                params[name].copy_(value)


class AffineAfterLayerNorm(nn.LayerNorm):
    """nn.LayerNorm written as normalise-then-affine: the same function, but one that
    `torch.func.vmap` over a batch of weights differentiates twice correctly (torch 2.15's fused
    layer_norm gives a wrong second derivative w.r.t. the input when its weight is batched)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


def vmappable_twin(model: nn.Module) -> nn.Module | None:
    """A copy of `model` sharing its parameters, with every nn.LayerNorm made AffineAfterLayerNorm, for
    vmapping over stacked parameter sets; None when the model has buffers (BatchNorm running stats
    cannot be updated per stacked member) or another normalisation layer with parameters."""
    if any(True for _ in model.buffers()):
        return None
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))
        if is_norm and type(module) is not nn.LayerNorm:
            return None
    twin = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    for module in twin.modules():
        if type(module) is nn.LayerNorm:
            module.__class__ = AffineAfterLayerNorm
    return twin


class FunctionalDualEncoder:
    """A DualEncoder whose image-encoder and text-head parameters come from two flat vectors."""

    def __init__(self, model: DualEncoder) -> None:
        self.model = model
        self.image_layout = FlatParams(model.image_encoder)
        self.text_layout = FlatParams(model.text_head)
        self._twin: FunctionalDualEncoder | None | bool = False  # False: not built yet

    def vmappable(self) -> "FunctionalDualEncoder | None":
        """The same network (shared parameters, same train/eval mode) in a form torch.func.vmap can
        differentiate twice over stacked parameter vectors; None when the model does not allow it."""
        if self._twin is False:
            twin = vmappable_twin(self.model)
            self._twin = None if twin is None else FunctionalDualEncoder(twin)
        if self._twin is not None:
            self._twin.model.train(self.model.training)
        return self._twin

    def initial(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_layout.flatten(self.model.image_encoder), self.text_layout.flatten(self.model.text_head)

    def encode_image(self, image_params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        feats = functional_call(self.model.image_encoder, self.image_layout.unflatten(image_params), (images,))
        return F.normalize(feats, dim=-1)

    def encode_text(self, text_params: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        feats = functional_call(self.model.text_head, self.text_layout.unflatten(text_params), (texts,))
        return F.normalize(feats, dim=-1)

    @property
    def image_frozen(self) -> bool:
        """A frozen backbone (model.image_trainable false): the image embeddings do not depend on the
        parameter vectors, so a matching iteration embeds its images once (`embed_if_frozen`)."""
        return self.image_layout.numel == 0

    def embed_if_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """With a frozen backbone, the embeddings of `images` (differentiable w.r.t. them), which
        `logits` accepts in their place; otherwise `images` as they are."""
        return self.model.encode_image(images) if self.image_frozen else images

    def logits(self, image_params: torch.Tensor, text_params: torch.Tensor, images: torch.Tensor,
               texts: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Image-text logits; `images` are pixels, or (2-D) the embeddings `embed_if_frozen` made."""
        tau = self.model.temperature if temperature is None else temperature
        embedded = images if images.dim() == 2 else self.encode_image(image_params, images)
        return embedded @ self.encode_text(text_params, texts).T / tau

    def load(self, image_params: torch.Tensor, text_params: torch.Tensor) -> None:
        self.image_layout.load(self.model.image_encoder, image_params)
        self.text_layout.load(self.model.text_head, text_params)
