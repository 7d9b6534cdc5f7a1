"""EDGE as a distillation method of the suite: fine-tune, sample, caption, then one synthetic set.

B pairs = images x CPI (captions per image): B / CPI prompts are drawn among the train captions, one
image is generated per prompt, and each image is paired with its prompt and, when a VLM is set, with
CPI - 1 generated captions (the image repeated once per caption, as the authors' caption scripts do).
The set is written like every other: images resized to the dataset's size and CLIP-normalised, texts
as features of the suite's frozen text encoder (the prompt's cached features; VLM captions encoded
with the same encoder), identity similarity, and the experts' learning rates as coresets use.
Each phase records its seconds (and GPU hours, peak memory on CUDA) in the method's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from lors.data import load_split, load_text_features, pre_caption
from lors.data.text_features import encode_captions
from lors.data.transforms import normalize
from lors.distill.registry import DistillMethod, MethodContext, MethodResult, register
from lors.edge.captions import load_vlm, synthesise_captions
from lors.edge.finetune import finetune
from lors.edge.models import DTYPES, load_clip, load_diffusion
from lors.edge.sample import choose_prompts, sample_images, to_uint8
from lors.edge.settings import EdgeSettings
from lors.errors import ConfigError
from lors.similarity import IdentitySimilarity
from lors.synset import SyntheticSet

__all__ = ["EDGE", "EdgeSettings", "EdgeOutput", "edge_set", "run_edge"]
log = logging.getLogger(__name__)
KEY = "distill.edge"


@dataclass
class EdgeOutput:
    synset: SyntheticSet
    history: list[dict[str, float]]
    metrics: dict[str, float] = field(default_factory=dict)


def check_budget(settings: EdgeSettings, budget: int, n_captions: int) -> int:
    """Images to generate for `budget` pairs; CPI > 1 needs a VLM and must divide the budget."""
    cpi = settings.captions_per_image()
    if cpi > 1 and not settings.vlm:
        raise ConfigError(f"{KEY}.cpi={cpi} needs {KEY}.vlm (without a VLM each image has its prompt only: cpi 1)")
    if budget % cpi:
        raise ConfigError(f"budget {budget} is not a multiple of {KEY}.cpi={cpi} (B pairs = images x CPI)")
    if budget // cpi > n_captions:
        raise ConfigError(f"budget {budget} needs {budget // cpi} prompts but the train split has "
                          f"{n_captions} captions")
    return budget // cpi


@contextmanager
def phase_cost(name: str, device: torch.device, metrics: dict[str, float]) -> Iterator[None]:
    """Peak accelerator memory of a phase (the seconds come from the phase, which survive resumption)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        metrics[f"{name}_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def record_seconds(name: str, seconds: float, device: torch.device, metrics: dict[str, float]) -> None:
    metrics[f"{name}_seconds"] = seconds
    if device.type == "cuda":
        metrics[f"{name}_gpu_hours"] = seconds / 3600
    log.info("EDGE %s: %.1f s on %s", name, seconds, device)


def dataset_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Generated uint8 images -> the dataset's size (bicubic, antialiased, requantised) -> CLIP-normalised."""
    if images.shape[-1] != size:
        images = to_uint8(F.interpolate(images.float() / 255, size=(size, size), mode="bicubic", antialias=True,
                                        align_corners=False))
    return normalize(images)


def caption_features(ctx: Any, captions: list[list[str]], rows: torch.Tensor,
                     train_features: torch.Tensor) -> torch.Tensor:
    """(images x CPI, d): each prompt's cached features, then its VLM captions encoded alike."""
    encoder = ctx.params.text_encoder
    new = [pre_caption(c, encoder.max_words) for caps in captions for c in caps[1:]]
    encoded = encode_captions(new, encoder, ctx.device) if new else torch.empty(0, train_features.shape[1])
    cpi, out = len(captions[0]), []
    for i, row in enumerate(rows.tolist()):
        out += [train_features[row][None], encoded[i * (cpi - 1):(i + 1) * (cpi - 1)]]
    return torch.cat(out).float()


def edge_set(ctx: Any, finetune_store: Any | None = None) -> EdgeOutput:
    """Run the three phases for `ctx` (a registry MethodContext) and build the synthetic set.

    The fine-tuned UNet does not depend on the budget (same data, settings and seed), so a store
    shared by every budget of a (dataset, settings) can be passed as `finetune_store`; by default
    the fine-tune is checkpointed in `ctx.checkpoints` with the other phases.
    """
    settings: EdgeSettings = ctx.settings
    params, device, protocol = ctx.params, ctx.device, ctx.params.protocol
    split = load_split(params, ctx.dataset, "train")
    train_features = load_text_features(params, ctx.dataset, "train")
    n_images = check_budget(settings, ctx.budget, len(split.captions))
    cpi = settings.captions_per_image()
    finetune_seed, prompt_seed, noise_seed = torch.randint(0, 2**62, (3,), generator=ctx.generator).tolist()
    dtype, metrics = DTYPES[settings.dtype], {"n_images": float(n_images), "cpi": float(cpi)}

    parts = load_diffusion(settings.base_model, dtype, device, key=f"{KEY}.base_model")
    with phase_cost("finetune", device, metrics):
        # CLIP stays float32, as the authors load it
        clip = load_clip(settings.clip_model, torch.float32, device, key=f"{KEY}.clip_model")
        if clip.config.text_config.vocab_size < len(parts.tokenizer):
            raise ConfigError(f"{KEY}.clip_model: its vocabulary ({clip.config.text_config.vocab_size}) is smaller "
                              f"than the tokenizer of {KEY}.base_model ({len(parts.tokenizer)}), whose ids it reads")
        tuned = finetune(parts, clip, split.images, split.captions, split.txt2img, settings.finetune, protocol,
                         finetune_seed, finetune_store or ctx.checkpoints, ctx.log_metrics)
        del clip
    record_seconds("finetune", tuned["seconds"], device, metrics)
    metrics["finetune_steps"] = float(len(tuned["history"]))
    parts.unet.to(dtype)  # sampled in the pipeline's dtype, as the authors' saved fp16 pipeline

    rows = choose_prompts(len(split.captions), n_images, torch.Generator().manual_seed(prompt_seed))
    prompts = [split.captions[r] for r in rows.tolist()]
    with phase_cost("sample", device, metrics):
        sampled = sample_images(parts, prompts, settings.sampling, noise_seed, ctx.checkpoints)
    record_seconds("sample", sampled["seconds"], device, metrics)
    del parts

    captions = [[p] for p in prompts]
    if cpi > 1:
        with phase_cost("caption", device, metrics):
            describe = load_vlm(settings.vlm, dtype, device, settings.vlm_max_new_tokens)
            synthesised = synthesise_captions(describe, sampled["images"], prompts, cpi, ctx.checkpoints)
        captions = synthesised["captions"]
        record_seconds("caption", synthesised["seconds"], device, metrics)
        metrics["caption_short_replies"] = float(synthesised["short"])

    image_size = int(split.images.shape[-1])
    images = dataset_images(sampled["images"], image_size).repeat_interleave(cpi, dim=0)
    texts = caption_features(ctx, captions, rows, train_features)
    meta = {"dataset": ctx.dataset, "budget": ctx.budget, "method": "edge", "seed": params.seed,
            "protocol": protocol, "image_size": image_size, "text_encoder": params.text_encoder.name,
            "base_model": settings.base_model, "clip_model": settings.clip_model, "vlm": settings.vlm, "cpi": cpi,
            "n_images": n_images, "n_pairs": len(images), "prompt_rows": [int(r) for r in rows],
            "captions": [c for caps in captions for c in caps]}
    synset = SyntheticSet(images=images, texts=texts, similarity=IdentitySimilarity(len(images)).matrix(),
                          lr_img=params.experts.lr_img, lr_txt=params.experts.lr_txt, meta=meta)
    return EdgeOutput(synset, tuned["history"], metrics)


def run_edge(ctx: MethodContext) -> MethodResult:
    out = edge_set(ctx)
    return MethodResult(synset=out.synset, history=out.history, metrics=out.metrics)


EDGE = register(DistillMethod("edge", EdgeSettings, run_edge, needs_experts=False))
