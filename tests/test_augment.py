"""Batched train augmentation: identities, hand-checked ops, and PIL/torchvision as independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lors.data.augment import (FILL, autocontrast, equalize, protocol_translate_px, random_resized_crop_boxes,
                               resized_crop, train_augment)
from lors.errors import ConfigError

NO_CROP = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip_p": 0.0}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 6, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=gen(seed))


def only(op: str, magnitude: float = 5) -> dict:
    return {**NO_CROP, "ops": (op,), "num_ops": 1, "op_prob": 1.0, "magnitude": magnitude}


def x_ramp(b: int, s: int) -> torch.Tensor:
    """Pixel value = column index / s: a bilinear warp of it is exact, so shifts can be read off."""
    ramp = torch.arange(s, dtype=torch.float32) / s
    return ramp.view(1, 1, 1, s).expand(b, 3, s, s).contiguous()


def test_identity_when_everything_is_disabled():
    x = images()
    out = train_augment(x, gen(), ops=(), **NO_CROP)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_only_mirrors_columns():
    x = images()
    out = train_augment(x, gen(), ops=(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_default_recipe_shape_dtype_range_and_per_sample_variation():
    x = images(1).expand(8, -1, -1, -1).contiguous()  # one image, eight draws
    out = train_augment(x, gen())
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) == 8


def test_deterministic_under_a_generator():
    x = images()
    torch.testing.assert_close(train_augment(x, gen(3)), train_augment(x, gen(3)), atol=0, rtol=0)
    assert not torch.equal(train_augment(x, gen(3)), train_augment(x, gen(4)))


def test_unknown_op_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown augmentation op 'Solarize'"):
        train_augment(images(), gen(), ops=("Solarize",))


def test_crop_boxes_follow_random_resized_crop():
    s = 64
    boxes = random_resized_crop_boxes(2000, s, s, (0.5, 1.0), (3 / 4, 4 / 3), gen())
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= s).all() and (left + w <= s).all()
    area = (h * w).double() / s**2
    assert area.min() > 0.45 and area.max() <= 1.0 and area.mean() > 0.6
    aspect = (w / h).double()
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    assert len({tuple(b) for b in boxes.tolist()}) > 500  # per-sample draws


def test_resized_crop_matches_torchvision_bicubic():
    """Away from the box edges; there our taps read the real neighbouring pixels, torchvision (and
    PIL, differently again) replicate the crop's edge."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    x = images(3, 32)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 20, 17], [10, 0, 22, 30]])
    flip = torch.tensor([False, True, False])
    out = resized_crop(x, boxes, flip)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = tvf.resized_crop(x[i:i + 1], top, left, h, w, [32, 32], interpolation=InterpolationMode.BICUBIC,
                               antialias=False).clamp(0, 1)
        if flip[i]:
            ref = ref.flip(-1)
        m = 0 if (h, w) == (32, 32) else 5  # bicubic taps reach 2 source pixels = up to 4 output pixels
        torch.testing.assert_close(out[i, :, m:32 - m, m:32 - m], ref[0, :, m:32 - m, m:32 - m], atol=1e-4, rtol=0)


def test_brightness_scales_pixels_by_the_level_factor():
    x = images()
    out = train_augment(x, gen(), **only("Brightness", magnitude=10))  # factor (10/10)*1.8+0.1 = 1.9
    torch.testing.assert_close(out, (x * 1.9).clamp(0, 1), atol=1e-5, rtol=0)
    # at the reference's M=5 the factor is exactly 1: brightness and sharpness are no-ops
    torch.testing.assert_close(train_augment(x, gen(), **only("Brightness")), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(train_augment(x, gen(), **only("Sharpness")), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("axis", ["X", "Y"])
def test_translate_moves_by_five_pixels_at_224_and_fills_grey(axis):
    s, k = 224, 5  # BLIP: (5/10) * 10 pixels at M=5
    x = images(8, s)
    out = train_augment(x, gen(1), **only(f"Translate{axis}"))
    signs = set()
    for o, i in zip(out, x):
        o, i = (o, i) if axis == "X" else (o.transpose(-1, -2), i.transpose(-1, -2))
        if torch.allclose(o[..., :-k], i[..., k:], atol=1e-4):  # dst(x) = src(x + 5)
            assert torch.allclose(o[..., -k:], torch.full_like(o[..., -k:], FILL), atol=1e-5)
            signs.add(+1)
        else:
            torch.testing.assert_close(o[..., k:], i[..., :-k], atol=1e-4, rtol=0)
            torch.testing.assert_close(o[..., :k], torch.full_like(o[..., :k], FILL), atol=1e-5, rtol=0)
            signs.add(-1)
    assert signs == {-1, +1}


@pytest.mark.parametrize("translate_px, shift", [(10.0, 5), (None, 0)])
def test_translate_in_absolute_pixels_at_32_px(translate_px, shift):
    # reference: BLIP's 10 px at the top level whatever the size (5 px at M=5 on a 32 px image);
    # clean: scaled with the size (5 * 32/224 = 0.71 px, a sub-pixel blend, never a whole-pixel shift)
    s = 32
    x = x_ramp(8, s)
    out = train_augment(x, gen(1), **only("TranslateX"), translate_px=translate_px)
    interior = slice(6, s - 6)
    moved = (out[..., interior] - x[..., interior]).abs().mean(dim=(1, 2, 3)) * s  # mean shift in pixels
    if shift:
        torch.testing.assert_close(moved, torch.full_like(moved, float(shift)), atol=1e-3, rtol=0)
    else:
        assert bool(((moved - 5 * s / 224).abs() < 1e-3).all())
    assert protocol_translate_px("reference") == 10.0 and protocol_translate_px("clean") is None


def test_shear_x_shifts_row_y_by_level_times_y():
    s = 64
    x = x_ramp(4, s)
    out = train_augment(x, gen(2), **only("ShearX"))  # factor 0.15, random sign
    ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    interior = (xs >= 12) & (xs < s - 12)  # where the sheared source column stays inside
    for o in out[:, 0]:
        candidates = [(xs - sign * 0.15 * ys) / s for sign in (1, -1)]
        assert any(torch.allclose(o[interior], c[interior].float(), atol=1e-4) for c in candidates)


def test_rotate_matches_pil_counter_clockwise_rotation():
    s = 48
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2])[None].repeat(4, 1, 1, 1)
    out = train_augment(smooth, gen(5), **only("Rotate", magnitude=10))  # 30 degrees, random sign
    u8 = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    refs = [torch.from_numpy(np.array(Image.fromarray(u8).rotate(a, Image.BILINEAR, fillcolor=(128,) * 3)))
            .permute(2, 0, 1).float() / 255 for a in (30, -30)]
    for o in out:
        errors = [(o - r)[:, 4:-4, 4:-4].abs().mean().item() for r in refs]
        assert min(errors) < 0.01 < max(errors)
    centre = s // 2
    assert math.isclose(out[0, 0, centre, centre].item(), smooth[0, 0, centre, centre].item(), abs_tol=0.02)


def test_equalize_matches_pil():
    rng = np.random.default_rng(0)
    u8 = (rng.beta(2, 5, size=(3, 20, 20, 3)) * 255).astype(np.uint8)  # skewed histograms
    u8[2, :, :, 1] = 77  # a constant channel: PIL leaves it unchanged
    out = equalize(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    for o, img in zip(out, u8):
        ref = np.asarray(ImageOps.equalize(Image.fromarray(img)))
        np.testing.assert_array_equal((o.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), ref)


def test_autocontrast_matches_pil_within_rounding():
    rng = np.random.default_rng(1)
    u8 = rng.integers(40, 180, size=(2, 16, 16, 3), dtype=np.uint8)
    out = autocontrast(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    for o, img in zip(out, u8):
        ref = np.asarray(ImageOps.autocontrast(Image.fromarray(img))).astype(np.float32)
        assert np.abs(o.permute(1, 2, 0).numpy() * 255 - ref).max() <= 1.0 + 1e-4
    assert out.amin(dim=(2, 3)).max() < 1e-6 and out.amax(dim=(2, 3)).min() > 1 - 1e-6


def test_each_op_is_applied_with_probability_one_half():
    x = x_ramp(400, 16)
    out = train_augment(x, gen(7), **{**only("TranslateX"), "op_prob": 0.5})
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert 0.4 < changed.float().mean().item() < 0.6
