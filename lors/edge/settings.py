"""EDGE's params block (`distill.edge`): the authors' defaults, one field per knob of their scripts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lors.config import Strict


class FinetuneSettings(Strict):
    """`edge_diffusion_train.py` defaults: SGD lr 1e-3, 10 epochs, batch 128, 224 px, tau 0.1, weights 1/1."""

    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=2)  # the diversity loss needs two pairs per batch
    resolution: int = Field(224, ge=8)  # real images are resized to this before the VAE
    temperature: float = Field(0.1, gt=0)
    contrastive_weight: float = Field(1.0, ge=0)
    diversity_weight: float = Field(1.0, ge=0)
    fraction: float = Field(1.0, gt=0, le=1)  # share of the train caption rows used (`--fraction`)


class SamplingSettings(Strict):
    """`edge_diffusion_sampling.py` passes nothing, so diffusers' defaults apply: 50 steps, guidance 7.5,
    the UNet's native size (512 px for SD v1.5); images are then resized to the dataset's size."""

    steps: int = Field(50, ge=1)
    guidance: float = Field(7.5, ge=0)
    size: int | None = Field(None, ge=8)  # None: unet.sample_size x VAE scale factor
    batch_size: int = Field(16, ge=1)  # prompts per pipeline call (and per checkpoint)
    prompt_prefix: str = ""  # the authors' --prompt_engineering uses "A picture of a "


class EdgeSettings(Strict):
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or folder; tiny-random: offline toy
    clip_model: str = "openai/clip-vit-base-patch32"  # CLIP of the losses; hub id, folder or tiny-random
    vlm: str | None = None  # image-text-to-text model adding captions (e.g. llava-hf/llava-1.5-7b-hf)
    cpi: int | None = Field(None, ge=1)  # captions per image; None: 1 without a VLM, 2 (the paper's best) with
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # the authors load everything in fp16
    vlm_max_new_tokens: int = Field(77, ge=1)
    finetune: FinetuneSettings = FinetuneSettings()
    sampling: SamplingSettings = SamplingSettings()

    def captions_per_image(self) -> int:
        return self.cpi if self.cpi is not None else (2 if self.vlm else 1)
