"""Sample decoding and timm image transforms.

Only the image member and the `.cls` label member of a sample are ever decoded, with
PIL and `int()`: any other member (a `.pyd` or `.pth` pickle, say) is ignored, so a
shard can never run code.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from pretrain.config import Config

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    """(RGB image, label) from a raw WebDataset sample; raises ValueError if either is missing or bad."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or .cls member")
    label = int(sample["cls"].decode("ascii").strip())
    with Image.open(io.BytesIO(sample[key])) as im:
        image = im.convert("RGB")
    return image, label


def build_transform(cfg: Config, img_size: int, training: bool) -> Callable[[Image.Image], Any]:
    """timm's train (random resized crop, flip, auto-augment, erasing) or eval (resize, center crop) transform."""
    a = cfg.augment
    if training:
        return create_transform(
            input_size=img_size,
            is_training=True,
            scale=tuple(a.crop_scale),
            hflip=a.hflip,
            auto_augment=a.auto_augment or None,
            color_jitter=a.color_jitter,
            re_prob=a.random_erasing,
            interpolation=a.interpolation,
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )
    return create_transform(
        input_size=img_size,
        is_training=False,
        crop_pct=a.eval_crop_pct,
        interpolation="bicubic" if a.interpolation == "random" else a.interpolation,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
