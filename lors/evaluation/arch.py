"""Which encoders an evaluation trains and tests: the source pair or a cross-architecture one.

An architecture is written `IMAGE+TEXT`: IMAGE any timm name, TEXT any transformers name or path
(optionally `:cls` / `:mean` to choose the pooling); an omitted part or `-` means the source encoder
(`params.model.image_encoder`, `params.text_encoder`), whose feature space the synthetic texts live in.
"""

from __future__ import annotations

from dataclasses import dataclass

from lors.config import Params, TextEncoderConfig
from lors.errors import ConfigError
from lors.models import check_image_encoder_name

POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class EvalArch:
    image_encoder: str
    text: TextEncoderConfig  # encoder of the test captions (and of transferred synthetic texts)
    source_text: bool  # True: `text` is the source encoder, the synthetic texts need no transfer

    @property
    def name(self) -> str:
        return f"{self.image_encoder}+{self.text.name}" + ("" if self.source_text else f":{self.text.pooling}")


def _split_pooling(text: str, default: str) -> tuple[str, str]:
    name, sep, pooling = text.rpartition(":")
    if sep and pooling in POOLINGS and name:
        return name, pooling
    return text, default


def parse_arch(arch: str | None, params: Params) -> EvalArch:
    """`IMAGE+TEXT` (either part optional) -> encoders; an unknown timm name is one ConfigError line."""
    source = params.text_encoder
    if arch and arch.count("+") > 1:
        raise ConfigError(f"arch '{arch}': expected IMAGE+TEXT with at most one '+'")
    image, _, text = (arch or "").strip().partition("+")
    image = image.strip() if image.strip() not in ("", "-") else params.model.image_encoder
    check_image_encoder_name(image)
    text = text.strip()
    if text in ("", "-"):
        return EvalArch(image, source, source_text=True)
    name, pooling = _split_pooling(text, source.pooling)
    if name in ("", "-"):
        name = source.name
    text_cfg = source.model_copy(update={"name": name, "pooling": pooling})
    same = (text_cfg.name, text_cfg.pooling) == (source.name, source.pooling)
    return EvalArch(image, source if same else text_cfg, source_text=same)

