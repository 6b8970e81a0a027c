"""Sample decoding and timm image augmentation, split between data workers and the batch.

Workers decode and augment to uint8 tensors: random resized crop, flip, RandAugment /
color jitter (timm's own transforms), or resize + center crop for evaluation. Float
conversion, normalization and random erasing run once per batch on the training device
(`BatchPreprocess`), which is cheaper than per image in a worker.

JPEGs are decoded at a reduced DCT scale (PIL draft mode, 1/2, 1/4 or 1/8) whenever the
region that will be resized to the output is at least twice the output size, so large
photos are never decoded at full resolution only to be shrunk.

Only the image member and the `.cls` label member of a sample are ever decoded, with
PIL and `int()`: any other member (a `.pyd` or `.pth` pickle, say) is ignored, so a
shard can never run code.
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms.functional import pil_to_tensor

from pretrain.config import Config

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class BadSample(ValueError):
    """A sample that cannot be decoded (skipped and counted, never fatal)."""


def sample_parts(sample: dict[str, Any]) -> tuple[bytes, int]:
    """(encoded image bytes, label) of a raw WebDataset sample; BadSample if either is missing or bad."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "cls" not in sample:
        raise BadSample(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or .cls member")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample(f"sample {sample.get('__key__')}: label {sample['cls'][:20]!r} is not an integer") from None
    return sample[key], label


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    """(RGB image at full resolution, label); for tools that want plain PIL images."""
    data, label = sample_parts(sample)
    return decode(open_lazy(data)), label


def open_lazy(data: bytes) -> Image.Image:
    """Open without decoding: the header gives format and size. BadSample if it is no image."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many exception types for bad data
        raise BadSample(f"{type(e).__name__}: {e}") from None


def decode(im: Image.Image, box: tuple[float, float, float, float] | None = None, out_size: int = 0) -> Image.Image:
    """Decode a lazily opened image to RGB. A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps `box` at least `out_size` pixels on its shorter side. BadSample on undecodable data."""
    try:
        if box is not None and im.format == "JPEG":
            reduce = min(box[2] - box[0], box[3] - box[1]) / out_size
            if reduce >= 2:
                scale = 2 ** min(3, int(math.log2(reduce)))
                im.draft("RGB", (math.ceil(im.width / scale), math.ceil(im.height / scale)))
        return im.convert("RGB")
    except Exception as e:
        raise BadSample(f"{type(e).__name__}: {e}") from None


class TrainTransform:
    """timm's training augmentation from encoded bytes to a uint8 tensor, with draft decoding.

    The crop parameters are drawn first (from the header's image size), so the JPEG is
    decoded at a reduced scale when the crop is large relative to the output.
    """

    def __init__(self, cfg: Config, img_size: int):
        a = cfg.augment
        primary, self.secondary, _ = create_transform(
            input_size=img_size, is_training=True, scale=tuple(a.crop_scale), hflip=a.hflip,
            auto_augment=a.auto_augment or None, color_jitter=a.color_jitter, re_prob=0.0,
            interpolation=a.interpolation, separate=True,
        )
        self.crop, *self.flip = primary.transforms
        self.size = img_size
        self.pil_interpolations = ([str_to_pil_interp(m) for m in ("bilinear", "bicubic")]
                                   if a.interpolation == "random" else [str_to_pil_interp(a.interpolation)])

    def __call__(self, data: bytes) -> torch.Tensor:
        im = open_lazy(data)
        full_w, full_h = im.size
        i, j, h, w = self.crop.get_params(im, self.crop.scale, self.crop.ratio)
        # Draw in the same order as timm's RandomResizedCropAndInterpolation (same RNG stream).
        interpolation = self.pil_interpolations[0]
        if len(self.pil_interpolations) > 1:
            interpolation = random.choice(self.pil_interpolations)
        im = decode(im, (j, i, j + w, i + h), self.size)
        sx, sy = im.width / full_w, im.height / full_h
        box = (round(j * sx), round(i * sy), round((j + w) * sx), round((i + h) * sy))
        im = im.crop(box).resize((self.size, self.size), interpolation)
        for t in self.flip:
            im = t(im)
        return pil_to_tensor(self.secondary(im))


class EvalTransform:
    """Resize the shorter side to size / crop_pct, center crop, as a uint8 tensor."""

    def __init__(self, cfg: Config, img_size: int):
        a = cfg.augment
        interpolation = "bicubic" if a.interpolation == "random" else a.interpolation
        self.transform = create_transform(
            input_size=img_size, is_training=False, crop_pct=a.eval_crop_pct, interpolation=interpolation,
        ).transforms[:-2]  # everything before ToTensor + Normalize
        self.resize_to = math.floor(img_size / a.eval_crop_pct)

    def __call__(self, data: bytes) -> torch.Tensor:
        im = open_lazy(data)
        im = decode(im, (0, 0, *im.size), self.resize_to)
        for t in self.transform:
            im = t(im)
        return pil_to_tensor(im)


def build_transform(cfg: Config, img_size: int, training: bool):
    return TrainTransform(cfg, img_size) if training else EvalTransform(cfg, img_size)


class BatchPreprocess:
    """uint8 batch -> normalized float batch (+ random erasing in training), on the batch's device."""

    def __init__(self, cfg: Config, training: bool, device: torch.device):
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.erasing = None
        if training and cfg.augment.random_erasing > 0:
            self.erasing = RandomErasing(cfg.augment.random_erasing, mode="const", max_count=1, device=str(device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.sub(self.mean).div_(self.std)  # uint8 - float gives float: two passes, no temporary
        if self.erasing is not None:
            x = self.erasing(x)
        return x
