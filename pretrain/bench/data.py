"""Decode + augment throughput of one data worker: our shard loader vs ImageFolder + timm."""

from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.datasets import ImageFolder

from pretrain.bench.timing import rate
from pretrain.config import Config
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import train_loader
from pretrain.data.transforms import BatchPreprocess
from pretrain.data.write_shards import write_shards


def make_photos(out: Path, width: int, height: int, count: int, seed: int = 0) -> Path:
    """JPEGs cut from scikit-learn's bundled photographs, resized to width x height, in 2 class folders."""
    from sklearn.datasets import load_sample_images  # scikit-learn comes with the test extra only

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        s = rng.uniform(0.5, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(src[y:y + ch, x:x + cw]).resize((width, height), Image.BICUBIC)
        folder = out / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:05d}.jpg", quality=90)
    return out


def _baseline_rate(images: Path, img_size: int, samples: int, batch: int) -> float:
    transform = create_transform(img_size, is_training=True, scale=(0.08, 1.0), hflip=0.5,
                                 auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25,
                                 interpolation="bicubic")
    dataset = ImageFolder(str(images), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch, len(dataset)), shuffle=True, num_workers=0,
                                         drop_last=True)
    return rate((x.shape[0] for _ in itertools.count() for x, _ in loader), samples)  # epochs until done


def _our_rate(shards: Path, img_size: int, samples: int, batch: int) -> float:
    cfg = Config()
    cfg.data.root, cfg.data.workers, cfg.data.shuffle_buffer = str(shards), 0, 200
    cfg.batch.micro_batch = batch
    info = DatasetInfo.read(shards)
    preprocess = BatchPreprocess(cfg, training=True, device=torch.device("cpu"))
    batches = iter(train_loader(cfg, info, img_size, rank=0, world=1, start_step=0))
    return rate((preprocess(batch.images).shape[0] for batch in batches), samples)


def bench_data(images: Path, img_size: int, samples: int, repeats: int, batch: int = 32) -> dict:
    batch = max(1, min(batch, samples))
    torch.set_num_threads(1)  # one data worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        write_shards(images, shards, val_fraction=0.0, shard_samples=100, workers=1)
        ours, base = [], []
        _our_rate(shards, img_size, batch, batch), _baseline_rate(images, img_size, batch, batch)  # warm-up
        for _ in range(repeats):
            ours.append(_our_rate(shards, img_size, samples, batch))
            base.append(_baseline_rate(images, img_size, samples, batch))
    result = {
        "img_size": img_size,
        "samples": samples,
        "ours_images_per_s": [round(r, 1) for r in ours],
        "baseline_images_per_s": [round(r, 1) for r in base],
        "ratio_median": statistics.median(ours) / statistics.median(base),
    }
    return result
