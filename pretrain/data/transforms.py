"""Sample decoding and timm image augmentation, split between data workers and the batch.

Workers decode and augment to uint8 tensors: random resized crop, flip, RandAugment /
color jitter (timm's own transforms), or resize + center crop for evaluation. Float
conversion, normalization and random erasing run once per batch on the training device
(`BatchPreprocess`), which is cheaper than per image in a worker.

JPEGs are decoded by libjpeg-turbo straight into an array (simplejpeg; PIL for other
formats), at a reduced DCT scale (1/2, 1/4 or 1/8) whenever the region that will be
resized to the output is at least twice the output size, so large photos are never
decoded at full resolution only to be shrunk. Resizing (the training crop, the evaluation
image) is done by torch's antialiased uint8 kernels, which give PIL's pixels within a few
levels at about a fifth of PIL's time on one core; timm's flip and RandAugment then run
unchanged on the output-size PIL image.

Only the image member and the `.cls` label member of a sample are ever decoded, with
image decoders and `int()`: any other member (a `.pyd` or `.pth` pickle, say) is ignored,
so a shard can never run code.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from typing import Any, Iterator

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms.functional import pil_to_tensor

from pretrain.config import Config
from pretrain.data.sources import IMAGE_EXTENSIONS


class BadSample(ValueError):
    """A sample that cannot be decoded (skipped and counted, never fatal)."""


def sample_parts(sample: dict[str, Any]) -> tuple[bytes, int]:
    """(encoded image bytes, label) of a raw WebDataset sample; BadSample if either is missing or bad."""
    key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
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
    return Image.fromarray(decode_rgb(data)), label


@contextlib.contextmanager
def _pil_errors_as_bad_sample() -> Iterator[None]:
    """Whatever PIL raises on bad data (many exception types) becomes a BadSample naming it."""
    try:
        yield
    except BadSample:
        raise
    except Exception as e:
        raise BadSample(f"{type(e).__name__}: {e}") from None


def _checked_size(width: int, height: int) -> tuple[int, int]:
    if width * height > (Image.MAX_IMAGE_PIXELS or math.inf):  # PIL's decompression-bomb limit, for both decoders
        raise BadSample(f"image of {width}x{height} pixels exceeds the {Image.MAX_IMAGE_PIXELS}-pixel limit")
    return width, height


def _turbo_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a YCbCr or grayscale JPEG, which simplejpeg decodes to PIL's very pixels; else None."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL reads more JPEG variants; let it decide
    return (width, height) if colorspace in ("YCbCr", "Gray") else None  # PIL converts CMYK its own way


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header alone. BadSample if it is no image."""
    size = _turbo_jpeg_size(data)
    if size is not None:
        return _checked_size(*size)
    with _pil_errors_as_bad_sample(), Image.open(io.BytesIO(data)) as im:
        return _checked_size(*im.size)


def decode_rgb(data: bytes, box: tuple[float, float, float, float] | None = None, out_size: int = 0) -> np.ndarray:
    """RGB pixels (height, width, 3; uint8) of an encoded image. BadSample on undecodable data.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps `box` at least
    `out_size` pixels on its shorter side, by libjpeg-turbo directly (simplejpeg: the same
    pixels as PIL, without PIL's buffering and copies). Other formats, CMYK JPEGs and JPEGs
    with recoverable errors (which simplejpeg declines) go through PIL.
    """
    scale = 1
    if box is not None:
        reduce = min(box[2] - box[0], box[3] - box[1]) / out_size
        if reduce >= 2:
            scale = 2 ** min(3, int(math.log2(reduce)))
    turbo_size = _turbo_jpeg_size(data)
    if turbo_size is not None:
        width, height = _checked_size(*turbo_size)
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height / scale),
                                          min_width=math.ceil(width / scale))
        except ValueError:
            pass
    with _pil_errors_as_bad_sample():
        im = Image.open(io.BytesIO(data))
        _checked_size(*im.size)
        if scale > 1 and im.format == "JPEG":
            im.draft("RGB", (math.ceil(im.width / scale), math.ceil(im.height / scale)))
        return np.array(im.convert("RGB"))


def _shape_only(width: int, height: int) -> torch.Tensor:
    """A pixel-less stand-in of an image's size: timm's crop parameters read only the size."""
    return torch.empty(1, 1).expand(height, width)


def resize(pixels: np.ndarray, height: int, width: int, mode: str) -> torch.Tensor:
    """`pixels` (H, W, 3 uint8) resized by torch's antialiased uint8 kernels ("bicubic" or "bilinear"):
    PIL's pixels within a few levels, about 5x faster. A (3, height, width) view of channels-last memory."""
    # A contiguous channels-last input takes torch's vectorized uint8 path and gives a channels-last result.
    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(image, size=(height, width), mode=mode, antialias=True)[0]


class TrainTransform:
    """timm's training augmentation from encoded bytes to a uint8 tensor.

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
        self.interpolations = ["bilinear", "bicubic"] if a.interpolation == "random" else [a.interpolation]

    def __call__(self, data: bytes) -> torch.Tensor:
        full_w, full_h = image_size(data)
        i, j, h, w = self.crop.get_params(_shape_only(full_w, full_h), self.crop.scale, self.crop.ratio)
        # Draw in the same order as timm's RandomResizedCropAndInterpolation (same RNG stream).
        interpolation = self.interpolations[0]
        if len(self.interpolations) > 1:
            interpolation = random.choice(self.interpolations)
        pixels = decode_rgb(data, (j, i, j + w, i + h), self.size)
        sx, sy = pixels.shape[1] / full_w, pixels.shape[0] / full_h
        left, top, right, bottom = round(j * sx), round(i * sy), round((j + w) * sx), round((i + h) * sy)
        crop = resize(pixels[top:bottom, left:right], self.size, self.size, interpolation)
        im = Image.fromarray(crop.permute(1, 2, 0).numpy())  # timm's flip and RandAugment work on PIL images
        for t in self.flip:
            im = t(im)
        return pil_to_tensor(self.secondary(im))


class EvalTransform:
    """timm's evaluation transform: shorter side to floor(size / crop_pct), center crop; a uint8 tensor."""

    def __init__(self, cfg: Config, img_size: int):
        a = cfg.augment
        self.mode = "bicubic" if a.interpolation == "random" else a.interpolation
        self.size = img_size
        self.resize_to = math.floor(img_size / a.eval_crop_pct)

    def __call__(self, data: bytes) -> torch.Tensor:
        pixels = decode_rgb(data, (0, 0, *image_size(data)), self.resize_to)
        h, w = pixels.shape[:2]
        long_side = int(self.resize_to * max(h, w) / min(h, w))  # torchvision Resize's rounding
        out_h, out_w = (self.resize_to, long_side) if h <= w else (long_side, self.resize_to)
        image = resize(pixels, out_h, out_w, self.mode)
        top, left = int(round((out_h - self.size) / 2.0)), int(round((out_w - self.size) / 2.0))
        return image[:, top:top + self.size, left:left + self.size]


def build_transform(cfg: Config, img_size: int, training: bool):
    return TrainTransform(cfg, img_size) if training else EvalTransform(cfg, img_size)


class BatchPreprocess:
    """uint8 batch -> normalized float batch (+ random erasing in training), on the batch's device."""

    def __init__(self, cfg: Config, training: bool, device: torch.device):
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.erasing = None
        if training and cfg.augment.random_erasing > 0:
            # Per-pixel normal noise in one rectangle, as in Swin's and timm's recipes.
            self.erasing = RandomErasing(cfg.augment.random_erasing, mode="pixel", max_count=1, device=str(device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().sub_(self.mean).div_(self.std)  # same-dtype kernels: faster than uint8 - float on CPU
        if self.erasing is not None:
            x = self.erasing(x)
        return x
