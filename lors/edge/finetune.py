"""Phase 1: fine-tune the UNet's biases and norms with EDGE's loss (authors' `edge_diffusion_train.py`).

One step on a batch of real pairs (images, captions):
  z0 = VAE.encode(x) * s,  t ~ U{0..T-1},  eps ~ N(0, I),  z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps
  eps_hat = UNet(z_in, t, text(captions))
  z0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t),  x_hat = VAE.decode(z0_hat ...)
  loss = w_C L_C(CLIP_img(x_hat), CLIP_txt(captions)) + w_D L_D(same)
with only the UNet's biases and norms trained by plain SGD (no momentum, no weight decay).

`protocol: reference` keeps four quirks of the released code; `clean` fixes them (each is decided
in the function named):
  1. z_in = z0, the clean latent, not z_t (`unet_input`).
  2. The VAE encodes CLIP-normalised pixels, not the [-1, 1] range it was trained on (`vae_input`).
  3. The VAE decodes z0_hat as is, without undoing the scaling factor s (`decode_input`).
  4. The decoded image, in the VAE's output range, goes to CLIP without CLIP normalisation (`clip_input`).
Under reference the UNet trains in `dtype` (fp16 by default, as released: SGD on fp16 weights);
under clean it trains in float32. The seeds of the reference (none) become `seed` under both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from lors.data.image_store import gather_images
from lors.data.transforms import normalize, to_unit
from lors.edge.losses import contrastive_loss, diversity_loss
from lors.edge.models import Diffusion, load_trainable_state, mark_trainable, trainable_state
from lors.edge.settings import FinetuneSettings

log = logging.getLogger(__name__)
PHASE = "edge-finetune"


class Store(Protocol):
    """What the phases need of the suite's checkpoint store (lors.checkpoints.CheckpointStore)."""

    def save(self, name: str, obj: Any) -> Any: ...

    def load(self, name: str) -> Any | None: ...


def vae_input(images: torch.Tensor, protocol: str) -> torch.Tensor:
    """[0, 1] pixels -> VAE input. Quirk 2: the reference feeds CLIP-normalised pixels."""
    return normalize(images) if protocol == "reference" else images * 2 - 1


def unet_input(clean: torch.Tensor, noisy: torch.Tensor, protocol: str) -> torch.Tensor:
    """Quirk 1: the reference denoises the clean latent z0 instead of z_t."""
    return clean if protocol == "reference" else noisy


def decode_input(latents: torch.Tensor, scaling: float, protocol: str) -> torch.Tensor:
    """Quirk 3: the reference decodes s * z without dividing by s."""
    return latents if protocol == "reference" else latents / scaling


def clip_input(decoded: torch.Tensor, size: int, protocol: str) -> torch.Tensor:
    """Quirk 4: the reference gives CLIP the raw VAE output; clean maps [-1, 1] to [0, 1] and
    CLIP-normalises (no clamp, so gradients pass everywhere). Both resize to CLIP's input size
    (a no-op at the authors' 224 px with ViT-B/32)."""
    if protocol != "reference":
        mean = decoded.new_tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = decoded.new_tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        decoded = ((decoded + 1) / 2 - mean) / std
    if decoded.shape[-1] != size or decoded.shape[-2] != size:
        decoded = F.interpolate(decoded, size=(size, size), mode="bilinear", align_corners=False)
    return decoded


def tokenize(parts: Diffusion, captions: Sequence[str], device: torch.device):
    """The pipeline tokenizer padded to its maximum length; the reference gives these ids to CLIP too
    (SD v1.5 and CLIP ViT-B/32 share one vocabulary)."""
    return parts.tokenizer(list(captions), padding="max_length", max_length=parts.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").to(device)


def edge_losses(parts: Diffusion, clip: torch.nn.Module, images: torch.Tensor, captions: Sequence[str],
                settings: FinetuneSettings, protocol: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """EDGE's loss on one batch; `images` are [0, 1] floats at the fine-tuning resolution."""
    device, unet = images.device, parts.unet
    tokens = tokenize(parts, captions, device)
    with torch.no_grad():
        hidden = parts.text_encoder(tokens.input_ids)[0]
        text = clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        posterior = parts.vae.encode(vae_input(images, protocol).to(parts.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).float() * parts.vae.config.scaling_factor
    n = len(images)
    steps = torch.randint(0, parts.scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    alpha = parts.scheduler.alphas_cumprod.to(device)[steps].view(-1, 1, 1, 1).float()
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise  # scheduler.add_noise
    eps = unet(unet_input(latents, noisy, protocol).to(unet.dtype), steps,
               encoder_hidden_states=hidden.to(unet.dtype)).sample.float()
    denoised = (noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    decoded = parts.vae.decode(decode_input(denoised, parts.vae.config.scaling_factor, protocol)
                               .to(parts.vae.dtype)).sample.float()
    clip_dtype = next(clip.parameters()).dtype
    image = clip.get_image_features(pixel_values=clip_input(decoded, clip.config.vision_config.image_size, protocol)
                                    .to(clip_dtype)).pooler_output
    l_c = contrastive_loss(image, text, settings.temperature)
    l_d = diversity_loss(image, text)
    loss = settings.contrastive_weight * l_c + settings.diversity_weight * l_d
    return {"loss": loss, "contrastive": l_c, "diversity": l_d}


def sgd_step(parts: Diffusion, clip: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             captions: Sequence[str], settings: FinetuneSettings, protocol: str,
             generator: torch.Generator) -> dict[str, float]:
    """One optimiser step on EDGE's loss; returns the loss terms before the step."""
    losses = edge_losses(parts, clip, images, captions, settings, protocol, generator)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {k: v.detach().item() for k, v in losses.items()}


def batch_images(images: np.ndarray, index: np.ndarray, resolution: int, device: torch.device) -> torch.Tensor:
    """uint8 store rows -> [0, 1] float at the fine-tuning resolution (the authors' Resize, bilinear)."""
    batch = to_unit(gather_images(images, index).to(device))
    if batch.shape[-1] != resolution:
        batch = F.interpolate(batch, size=(resolution, resolution), mode="bilinear", antialias=True,
                              align_corners=False)
    return batch


def epoch_batches(rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled pass over the rows; a last batch of one pair is dropped (L_D has no pair to compare)."""
    order = rows[torch.randperm(len(rows), generator=generator)]
    return [b for b in order.split(batch_size) if len(b) >= 2]


def finetune(parts: Diffusion, clip: torch.nn.Module, images: np.ndarray, captions: Sequence[str],
             txt2img: np.ndarray, settings: FinetuneSettings, protocol: str, seed: int, store: Store,
             log_metrics: Callable[[dict[str, float], int], None]) -> dict[str, Any]:
    """Train the UNet's biases and norms; resumes from the last finished epoch. Returns the final state
    {'trainable', 'history', 'seconds', ...}; the UNet holds the trained values afterwards."""
    if protocol != "reference":
        parts.unet.float()
    params = mark_trainable(parts.unet)
    parts.unet.train()
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.0, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n_rows = len(captions)
    rows = torch.randperm(n_rows, generator=generator)[:max(2, int(settings.fraction * n_rows))]
    state = store.load(PHASE) or {"epoch": 0, "history": [], "seconds": 0.0}
    if state["epoch"]:
        load_trainable_state(parts.unet, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        log.info("EDGE fine-tune resumed after epoch %d", state["epoch"])
    device = next(parts.unet.parameters()).device
    for epoch in range(state["epoch"], settings.epochs):
        start = time.perf_counter()
        for batch in epoch_batches(rows, settings.batch_size, generator):
            index = batch.numpy()
            pixels = batch_images(images, np.asarray(txt2img)[index], settings.resolution, device)
            losses = sgd_step(parts, clip, optimizer, pixels, [captions[i] for i in index], settings, protocol,
                              generator)
            row = {"iteration": len(state["history"]), "epoch": epoch, **losses}
            state["history"].append(row)
            log_metrics({k: row[k] for k in losses}, row["iteration"])
        state.update(epoch=epoch + 1, trainable=trainable_state(parts.unet), optimizer=optimizer.state_dict(),
                     generator=generator.get_state(), seconds=state["seconds"] + time.perf_counter() - start)
        store.save(PHASE, state)
        log.info("EDGE fine-tune epoch %d/%d: loss %.4f", epoch + 1, settings.epochs,
                 state["history"][-1]["loss"] if state["history"] else float("nan"))
    state.setdefault("trainable", trainable_state(parts.unet))
    parts.unet.eval().requires_grad_(False)
    return state
