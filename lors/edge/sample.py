"""Phase 2: draw prompts among the real training captions and generate one image per prompt
(authors' `edge_diffusion_sampling.py`: `random.sample(captions, n)`, then `pipe(prompt)` with
diffusers' defaults and the safety checker off).

The reference draws prompts and noise unseeded; here both are seeded under every protocol: the
prompts from the method's generator (without replacement, as `random.sample`), the initial noise of
chunk c from `seed + c`, so a resumed run and a fresh one give the same images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from lors.edge.finetune import Store
from lors.edge.models import Diffusion
from lors.edge.settings import SamplingSettings

log = logging.getLogger(__name__)
PHASE = "edge-sample"


def choose_prompts(n_captions: int, n_images: int, generator: torch.Generator) -> torch.Tensor:
    """`n_images` distinct caption rows, in random order."""
    if not 1 <= n_images <= n_captions:
        raise ValueError(f"cannot draw {n_images} prompts from {n_captions} captions")
    return torch.randperm(n_captions, generator=generator)[:n_images]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, the quantisation of the PNG files the authors write."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def sample_images(parts: Diffusion, prompts: Sequence[str], settings: SamplingSettings, seed: int,
                  store: Store) -> dict[str, Any]:
    """uint8 (n, 3, H, W) images at the pipeline's size, generated in checkpointed chunks.
    Returns {'images', 'seconds'}."""
    pipe = parts.pipeline()
    size = settings.size or parts.unet.config.sample_size * pipe.vae_scale_factor
    state = store.load(PHASE) or {"chunks": [], "seconds": 0.0}
    chunks = [prompts[i:i + settings.batch_size] for i in range(0, len(prompts), settings.batch_size)]
    for c in range(len(state["chunks"]), len(chunks)):
        start = time.perf_counter()
        out = pipe([settings.prompt_prefix + p for p in chunks[c]], num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance, height=size, width=size, output_type="pt",
                   generator=torch.Generator().manual_seed(seed + c))
        state["chunks"].append(to_uint8(out.images))
        state["seconds"] += time.perf_counter() - start
        store.save(PHASE, state)
        log.info("EDGE sampling: %d/%d images", min((c + 1) * settings.batch_size, len(prompts)), len(prompts))
    images = torch.cat(state["chunks"]) if state["chunks"] else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return {"images": images, "seconds": state["seconds"]}
