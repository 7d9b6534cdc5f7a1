"""The experts' train-time augmentation on batched tensors (method.md 2 and 7.3).

The reference augments PIL images one at a time on CPU loader workers: RandomResizedCrop(scale
0.5-1, ratio 3/4-4/3, bicubic) -> horizontal flip -> BLIP's RandomAugment(N=2, M=5). Here the
same recipe runs on a whole batch on the images' device, each sample with its own random draws,
so the uint8 store can feed a GPU without decoding or augmenting on CPU workers.

BLIP RandomAugment semantics: N ops drawn uniformly with replacement from the list; each is
applied with probability 0.5 at level M of 10, in the drawn order. Levels map as in BLIP:
enhance factor (M/10)*1.8+0.1 (= 1.0, i.e. a no-op, at M=5), shear (M/10)*0.3, rotation
(M/10)*30 degrees, translation (M/10)*10 pixels; shear, translation and rotation take a random
sign. Geometric ops fill uncovered pixels with grey 128. Deliberate differences, all small:
values stay float in [0, 1] between ops (no uint8 rounding); by default the translation is 10
pixels *at 224 px* and scales with the image size (`translate_px` gives BLIP's absolute pixels, the
`reference` protocol's choice: 10 px of a 32 px image is a third of it); the crop uses PyTorch's bicubic kernel (a=-0.75, as
torchvision's tensor resize) rather than PIL's, and its taps at the box edge read the real
neighbouring pixels instead of replicating the edge; rotation is about the exact image centre.

All random numbers are drawn from the given generator on its own device (a CPU generator keeps
the GPU free of host syncs), so a generator state fully determines the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from lors.errors import ConfigError

OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
       "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
MAX_LEVEL = 10
FILL = 128 / 255
TRANSLATE_PIXELS_AT_224 = 10.0  # BLIP's translate_const, in pixels of a 224 px image
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before a centre crop


def protocol_translate_px(protocol: str) -> float | None:
    """RandAugment's translation for a protocol: BLIP's absolute 10 px under `reference` (the authors'
    loader, at any image size), scaled with the image size (None) under `clean`."""
    return TRANSLATE_PIXELS_AT_224 if protocol == "reference" else None


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64) * (high - low) + low


def random_resized_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """(batch, 4) integer boxes (top, left, h, w) drawn as torchvision's RandomResizedCrop.get_params."""
    area = height * width
    target = area * _uniform((batch, CROP_ATTEMPTS), scale[0], scale[1], generator)
    aspect = torch.exp(_uniform((batch, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.long().argmax(dim=1)  # first successful attempt (0 if none; masked below)
    found = ok.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # torchvision's fallback when all attempts fail: the largest centred box within the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    u_top = _uniform((batch,), 0.0, 1.0, generator)
    u_left = _uniform((batch,), 0.0, 1.0, generator)
    top = torch.where(found, (u_top * (height - h + 1)).floor().long(), (height - fh) // 2)
    left = torch.where(found, (u_left * (width - w + 1)).floor().long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box (top, left, h, w), resize back to the input size with bicubic
    interpolation (edge pixels replicated, as torchvision), optionally mirrored; one grid_sample."""
    b, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, device=images.device)
    sign = 1.0 - 2.0 * flip.to(images.device, torch.float32)
    # output normalised coordinate o in [-1, 1] -> source edge coordinate left + (o + 1) / 2 * w
    theta[:, 0, 0] = w / width * sign
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def _index_to_normalised(height: int, width: int) -> torch.Tensor:
    """3x3 map from pixel-index coordinates (centres at integers) to align_corners=False [-1, 1]."""
    return torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
                        dtype=torch.float64)


def _inverse_maps(names: Sequence[str], signs: torch.Tensor, magnitude: float, height: int,
                  width: int, translate_px: float | None = None) -> torch.Tensor:
    """(k, 3, 3) output-pixel -> input-pixel maps (index coordinates) of BLIP's cv2 warps; the
    translation at the top level is `translate_px` pixels, or 10 px scaled by size/224 if None."""
    level = magnitude / MAX_LEVEL
    shear = 0.3 * level
    if translate_px is None:
        shift_x = TRANSLATE_PIXELS_AT_224 * level * width / 224
        shift_y = TRANSLATE_PIXELS_AT_224 * level * height / 224
    else:
        shift_x = shift_y = translate_px * level
    angle = math.radians(30 * level)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    maps = torch.eye(3, dtype=torch.float64).repeat(len(names), 1, 1)
    for k, (name, sign) in enumerate(zip(names, signs.tolist())):
        if name == "ShearX":  # dst = (x + s y, y)
            maps[k, 0, 1] = -sign * shear
        elif name == "ShearY":  # dst = (x, y + s x)
            maps[k, 1, 0] = -sign * shear
        elif name == "TranslateX":  # dst(x) = src(x + t)
            maps[k, 0, 2] = sign * shift_x
        elif name == "TranslateY":
            maps[k, 1, 2] = sign * shift_y
        elif name == "Rotate":  # cv2: dst = R (src - c) + c, counter-clockwise for positive angles
            c, s = math.cos(sign * angle), math.sin(sign * angle)
            rot_t = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)  # R^T
            centre = torch.tensor([cx, cy], dtype=torch.float64)
            maps[k, :2, :2] = rot_t
            maps[k, :2, 2] = centre - rot_t @ centre
    return maps


def warp_with_fill(images: torch.Tensor, index_maps: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """Bilinear affine warp with a constant border, like cv2.warpAffine(borderValue=fill).

    Sampling (x - fill) with zero padding and adding fill back makes out-of-image taps count as
    `fill`, exactly as a constant border does.
    """
    _, _, height, width = images.shape
    norm = _index_to_normalised(height, width)
    theta = (norm @ index_maps @ torch.linalg.inv(norm))[:, :2].to(images.device, torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to span [0, 1]; constant channels stay unchanged."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (images - low) / span.clamp_min(1e-12), images)


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    return (images * factor).clamp(0, 1)


def sharpness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel); the one-pixel frame is left untouched."""
    kernel = torch.ones(3, 3, device=images.device, dtype=images.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(images.shape[1], 1, 3, 3)
    smooth = F.conv2d(images, kernel, groups=images.shape[1])  # valid conv = interior pixels
    out = images.clone()
    inner = images[:, :, 1:-1, 1:-1]
    out[:, :, 1:-1, 1:-1] = (smooth + factor * (inner - smooth)).clamp(0, 1)
    return out


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation with PIL's ImageOps.equalize lookup table."""
    b, c = images.shape[:2]
    levels = (images * 255).round().clamp(0, 255).long().flatten(2)  # (b, c, n)
    hist = torch.zeros(b, c, 256, device=images.device, dtype=torch.long)
    hist.scatter_add_(2, levels, torch.ones_like(levels))
    # step = (pixels - count of the highest occupied level) // 255
    highest = (torch.arange(256, device=images.device) * (hist > 0)).argmax(dim=2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - hist.gather(2, highest)) // 255
    below = hist.cumsum(2) - hist  # pixels strictly below each level
    table = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    out = table.gather(2, levels).view_as(images).to(images.dtype) / 255
    return torch.where(step.view(b, c, 1, 1) > 0, out, images)


def _colour_op(name: str, images: torch.Tensor, magnitude: float) -> torch.Tensor:
    factor = (magnitude / MAX_LEVEL) * 1.8 + 0.1
    if name == "AutoContrast":
        return autocontrast(images)
    if name == "Brightness":
        return brightness(images, factor)
    if name == "Sharpness":
        return sharpness(images, factor)
    if name == "Equalize":
        return equalize(images)
    raise AssertionError(name)


def train_augment(images: torch.Tensor, generator: torch.Generator, *, scale: tuple[float, float] = (0.5, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, num_ops: int = 2,
                  magnitude: float = 5, op_prob: float = 0.5, ops: Sequence[str] = OPS,
                  translate_px: float | None = None) -> torch.Tensor:
    """Randomly crop, flip and RandAugment a float batch (B, 3, S, S) in [0, 1]; same shape/device.

    The defaults are the reference recipe but for `translate_px` (None: scaled with the size; a
    number: BLIP's absolute top-level shift in pixels); the knobs exist so each part can be switched
    off or isolated (e.g. `ops=()` disables RandAugment).
    """
    unknown = [name for name in ops if name not in OPS]
    if unknown:
        raise ConfigError(f"unknown augmentation op '{unknown[0]}' (choose from {', '.join(OPS)})")
    b, _, height, width = images.shape
    boxes = random_resized_crop_boxes(b, height, width, scale, ratio, generator)
    flip = torch.rand(b, generator=generator, device=generator.device) < flip_p
    out = resized_crop(images.float(), boxes, flip)
    if not ops or num_ops == 0:
        return out
    chosen = torch.randint(len(ops), (b, num_ops), generator=generator, device=generator.device).cpu()
    applied = (torch.rand(b, num_ops, generator=generator, device=generator.device) <= op_prob).cpu()
    signs = torch.where(torch.rand(b, num_ops, generator=generator, device=generator.device) > 0.5,
                        -1.0, 1.0).cpu()
    for slot in range(num_ops):
        names = [ops[k] if on else "Identity" for k, on in zip(chosen[:, slot].tolist(), applied[:, slot].tolist())]
        geometric = [i for i, name in enumerate(names) if name in GEOMETRIC]
        if geometric:
            maps = _inverse_maps([names[i] for i in geometric], signs[geometric, slot], magnitude, height, width,
                                 translate_px)
            index = torch.tensor(geometric, device=out.device)
            out[index] = warp_with_fill(out[index], maps)
        for name in ("AutoContrast", "Brightness", "Sharpness", "Equalize"):
            members = [i for i, n in enumerate(names) if n == name]
            if members:
                index = torch.tensor(members, device=out.device)
                out[index] = _colour_op(name, out[index], magnitude)
    return out
