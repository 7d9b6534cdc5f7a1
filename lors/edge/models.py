"""The networks EDGE uses: a Stable Diffusion pipeline's parts and a CLIP model.

Each is named by a Hugging Face hub id or a local folder; a name that is neither a folder nor a
cached model while the Hub is unreachable is one ConfigError line saying which weights are missing.
`tiny-random` builds small random-weight versions from configs (no download), so the whole method
runs and is tested offline; its outputs carry no meaning beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lors.hub import load_pretrained

TINY = "tiny-random"
TINY_SEED = 0
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The authors' `mark_difffit_trainable` (DiffFit): 'gamma' and 'y_embed' are DiT names that match
# nothing in a Stable Diffusion UNet, so there it selects exactly the biases and norm weights.
TRAINABLE_KEYS = ("bias", "norm", "gamma", "y_embed")


@dataclass
class Diffusion:
    """The parts of a text-to-image latent diffusion pipeline that EDGE touches."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    def pipeline(self):
        """A StableDiffusionPipeline over these parts; the safety checker is off, as in the authors' code."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_diffusion(name: str, dtype: torch.dtype, device: torch.device, key: str = "base_model") -> Diffusion:
    """A Stable Diffusion pipeline folder or hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)."""
    if name == TINY:
        parts = tiny_diffusion()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = load_pretrained(key, name, lambda n, local: StableDiffusionPipeline.from_pretrained(
            n, dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=local))
        parts = Diffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device).requires_grad_(False).eval()
        if module.dtype != dtype:
            module.to(dtype)
    return parts


def load_clip(name: str, dtype: torch.dtype, device: torch.device, key: str = "clip_model") -> torch.nn.Module:
    """A frozen transformers CLIPModel (e.g. openai/clip-vit-base-patch32) in eval mode."""
    if name == TINY:
        model = tiny_clip(len(tiny_tokenizer()))
    else:
        from transformers import CLIPModel

        model = load_pretrained(key, name, lambda n, local: CLIPModel.from_pretrained(n, local_files_only=local))
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def mark_trainable(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Biases and norm parameters train, everything else is frozen; returns the trainable ones."""
    trainable = []
    for name, param in unet.named_parameters():
        param.requires_grad_(any(key in name for key in TRAINABLE_KEYS))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# -- tiny random-weight parts (tests and the offline demo) ---------------------------------------------

def tiny_tokenizer(max_length: int = 77):
    """A byte-level tokenizer with no merges (one token per byte), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {bos: len(vocab), eos: len(vocab) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                       special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   model_max_length=max_length)


def _tiny_text_config(vocab_size: int, bos: int, eos: int) -> dict:
    # eos != 2: transformers' legacy CLIP pooling (argmax of ids) applies only to eos_token_id 2
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=eos)


def tiny_diffusion() -> Diffusion:
    """Shapes of diffusers' own dummy Stable Diffusion test components; VAE downsamples by 2."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
        text = CLIPTextModel(CLIPTextConfig(**_tiny_text_config(len(tokenizer), tokenizer.bos_token_id,
                                                                tokenizer.eos_token_id)))
    # Stable Diffusion v1.5's own scheduler configuration
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    return Diffusion(unet, vae, text, tokenizer, scheduler)


def tiny_clip(vocab_size: int, image_size: int = 32) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    config = CLIPConfig(text_config=_tiny_text_config(vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id),
                        vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        return CLIPModel(config)
