"""Decoding and augmentation in the data workers: the same pictures as PIL and timm, faster."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import Config
from tests.helpers import photo


def test_fast_train_transform_matches_timm_when_no_draft_applies():
    """Same random draws as timm's transform; only the resize kernel differs (torch's vs PIL's)."""
    import random as pyrandom

    from timm.data import create_transform

    from pretrain.data.transforms import BatchPreprocess, TrainTransform

    cfg = Config()
    cfg.augment.random_erasing = 0.0
    ours = TrainTransform(cfg, 64)
    reference = create_transform(64, is_training=True, scale=(0.08, 1.0), hflip=0.5,
                                 auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.0,
                                 interpolation="bicubic")
    norm = BatchPreprocess(cfg, training=False, device=torch.device("cpu"))
    data = photo(120, 90, 0)  # a crop of a 90px-high image is never 2x the 64px output: no draft
    def reseed(seed: int) -> None:  # timm draws from python's, numpy's and torch's RNGs
        pyrandom.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    for seed in range(20):
        reseed(seed)
        a = norm(ours(data)[None])[0]
        reseed(seed)
        b = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        levels = (a - b).abs() * 0.226 * 255  # back to 0-255 levels (std ~0.226)
        assert levels.mean() < 0.05, seed  # observed <= 0.012: the same picture
        assert (levels > 4).float().mean() < 1e-3, seed  # a rare pixel crosses a solarize/posterize step


def test_eval_transform_matches_timm():
    from timm.data import create_transform
    from torchvision.transforms.functional import pil_to_tensor

    from pretrain.data.transforms import EvalTransform

    reference = create_transform(64, is_training=False, crop_pct=0.875, interpolation="bicubic").transforms[:-2]
    ours = EvalTransform(Config(), 64)
    for width, height in ((120, 90), (90, 120), (73, 74), (140, 139)):  # down- and upscaling, odd rounding
        data = photo(width, height, 0)
        expected = Image.open(io.BytesIO(data)).convert("RGB")
        for t in reference:
            expected = t(expected)
        levels = (ours(data).float() - pil_to_tensor(expected).float()).abs()
        assert levels.shape == (3, 64, 64)
        assert levels.mean() < 0.02 and levels.max() <= 2, (width, height)  # observed: max 1 level


def test_jpeg_decoding_gives_pil_pixels_and_falls_back_to_pil_for_other_formats():
    from pretrain.data.transforms import BadSample, decode_rgb, image_size

    data = photo(120, 90, 1)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert image_size(data) == (120, 90)
    assert np.array_equal(decode_rgb(data), pil)
    for mode, fmt in (("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "WEBP")):
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert(mode).save(buf, format=fmt)
        expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(decode_rgb(buf.getvalue()), expected), (mode, fmt)
    with pytest.raises(BadSample, match="truncated|Premature|bad|corrupt"):
        decode_rgb(data[: len(data) // 2])
    with pytest.raises(BadSample):
        decode_rgb(b"not an image at all")


def test_decoding_refuses_images_over_pils_pixel_limit(monkeypatch):
    from pretrain.data.transforms import BadSample, decode_rgb

    small, large = photo(100, 80, 0), photo(101, 80, 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 80)
    assert decode_rgb(small).shape == (80, 100, 3)
    with pytest.raises(BadSample, match="101x80 pixels exceeds the 8000-pixel limit"):
        decode_rgb(large)


def test_draft_decoding_of_large_jpegs_stays_close_to_full_decoding():
    from pretrain.data.transforms import EvalTransform, decode_rgb

    big = photo(1600, 1200, 1)
    assert decode_rgb(big, (0, 0, 1600, 1200), 256).shape == (300, 400, 3)  # 1/4 scale DCT decode
    cfg = Config()
    fast = EvalTransform(cfg, 224)(big).float()
    from timm.data import create_transform

    reference = create_transform(224, is_training=False, crop_pct=0.875, interpolation="bicubic").transforms[:-2]
    full = Image.open(io.BytesIO(big)).convert("RGB")
    for t in reference:
        full = t(full)
    from torchvision.transforms.functional import pil_to_tensor

    assert (fast - pil_to_tensor(full).float()).abs().mean() < 4.0  # out of 255


def test_randaugment_at_high_magnitude_never_fails():
    from pretrain.data.transforms import TrainTransform

    cfg = Config()
    cfg.augment.auto_augment = "rand-m10-n4-mstd1.0-inc1"
    transform = TrainTransform(cfg, 32)
    data = photo(64, 48, 0)
    for _ in range(300):
        assert transform(data).shape == (3, 32, 32)
